"""Relaxed LPIPS adversarial training, RLAT (Kireev, Andriushchenko & Flammarion, UAI 2022)."""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_robust.attacks.pgd import module_mode
from lit_robust.defenses.base import AdversarialModule, TrainingOutput, finite_total

EPS_POLICIES = ("scaling", "lpips", "constant")
GROW_POLICIES = ("descending", "ascending", "lindescending", "none")


class RLAT(AdversarialModule):
    """Kireev, Andriushchenko & Flammarion, "On the effectiveness of adversarial training against common
    corruptions", UAI 2022: Relaxed LPIPS Adversarial Training (RLAT).

    Official code: github.com/tml-epfl/adv-training-corruptions (``train.py --attack=rlat --distance=l2``,
    ``models.py``: ``PreActResNet.forward(x, delta)`` and ``get_layers_dict``).

    What "relaxed LPIPS" is in the official code: LPIPS measures a distance between the activations of a
    feature network; the relaxation bounds, instead of the LPIPS distance between two images, the size of
    a perturbation added directly to the activations of the classifier *being trained*. So there is no
    separate LPIPS network (no AlexNet) in RLAT: the "feature network" is the classifier itself, and the
    choice of features is the choice of ``layers`` whose outputs are perturbed (module paths, as in
    ``model.get_submodule``). The official repository has no other LPIPS-based training attack (its Fast-PAT
    checkpoint is an evaluated external model).

    Algorithm, per batch (one step, from zero)::

        layers: input (if perturb_input), then the outputs of `layers`, in forward order; i = 0, 1, ...
        eps_i   = eps * numel_i / numel_input / (i + 1)        # eps_policy="scaling", grow_policy="descending"
        delta_i = 0;  g_i = grad_{delta_i} CE(f(clamp(x + delta_0, 0, 1); delta_1, ...), y)   (weights frozen)
        delta_i = eps_i * g_i / ||g_i||_2   per example                     (norm="l2"; RLAT's setting)
        delta_i = clamp(eps_i * sign(g_i), -eps, eps)                       (norm="linf")
        theta  <- theta - lr * grad_theta CE(f(clamp(x + delta_0, 0, 1); delta_1, ...), y)

    ``numel_i`` is the number of elements per example of the perturbed tensor. Other budget rules of the
    official script: ``eps_policy="lpips"`` (``eps * H_in W_in / (H_i W_i)``: per spatial position),
    ``"constant"`` (``eps`` for every layer); ``grow_policy="ascending"`` (``x (i + 1)``), ``"lindescending"``
    (``x (n - i) / n``), ``"none"``. The perturbations are added by forward hooks that exist only during the
    attack's forward and the training forward (:func:`layer_perturbations`); the attack takes
    ``torch.autograd.grad`` with respect to the deltas only (no parameter ``.grad``), with the module modes
    of ``attack_bn_mode`` restored afterwards.

    ``layers=None`` picks :func:`default_rlat_layers`: for the library's CIFAR ResNets (PreActResNet-18,
    ResNet-18, ResNet-110) the official set, i.e. the stem convolution and the output of each stage
    (``conv1, layer1 ... layer4`` in the official PreActResNet-18); for ``SmallCNN`` its first convolution
    and the output of each of its two pooling stages. Any other backbone must name its ``layers``
    (``layers=[]`` perturbs the input only: then RLAT is a single normalised-gradient L2 step, the
    small-eps L2 adversarial training of the paper with one step).

    ``perturb(x, y)`` returns the input part, ``clamp(x + delta_0, 0, 1)`` (L2 norm ``<= eps``: the input's
    budget is ``eps`` under every policy), which is what ``in_threat_model`` checks; the layer perturbations
    of the same call are kept in ``layer_deltas`` and ``outer_loss`` trains on the forward with them added.
    ``steps`` and ``step_size`` are not used by the training attack (one step of size ``eps_i``); they only
    pass the base class's validation. Validation and test run the base class's PGD at ``eps`` in ``norm``
    (L2 0.08 by default); the paper's measure is CIFAR-10-C accuracy (``configs/cifar10/rlat.yaml``).

    Defaults (the README's CIFAR-10 command): L2, eps 0.08, the official layers, ``scaling`` and
    ``descending``, PreActResNet-18, 150 epochs, batch 128, SGD lr 0.1 momentum 0.9 weight decay 5e-4,
    lr x0.1 at 34% and 67% of training (piecewise, per iteration), the attack in train mode
    (``attack_bn_mode="train"``: the official script keeps the model in train mode, so the attack's
    forward uses batch statistics and updates the running ones).

    Baseline of the same paper: L2 adversarial training with a small radius (``--attack=pgd
    --distance=l2 --eps=0.1``, one step, step 0.5 then projection): ``PGDAT(model, eps=0.1, norm="l2",
    steps=1, step_size=0.5)`` with ``attack_bn_mode="train"`` (our PGD starts at random, theirs at zero);
    Linf: ``eps=1/255`` or ``2/255`` in the paper's tables.

    Cost: 2 forward+backward passes per step (the attack's backward stops at the deltas, with no weight
    gradients), the same as FGSM training.

    Reported (CIFAR-10-C mean accuracy over 15 corruptions x 5 severities, PreActResNet-18, the official
    ``full_evaluation_results``): standard 74.7%, L2-AT eps 0.1 83.4%, RLAT eps 0.08 84.1%, AugMix 86.6%,
    RLAT eps 0.05 + AugMix 88.5%.

    Deviations: the gradient norm is floored at 1e-12 (the official ``normreg`` is 0: a zero gradient gives
    NaN there, a zero delta here). The input budget's denominator is the input's number of elements (the
    official code hard-codes 3072 for CIFAR-10 and 224x224x3 otherwise; equal on those datasets), and the
    ``lpips`` policy's 32x32 is the input's H x W. Not implemented: the official ``adaptive`` and ``shared``
    eps policies, ``--layers-policy=random``, ``--batch-part`` (fraction of the batch perturbed) and the
    gradient-norm regulariser (all off in the RLAT command).
    """

    def __init__(
        self,
        model: nn.Module,
        eps: float = 0.08,
        norm: Literal["linf", "l2"] = "l2",
        layers: Optional[Sequence[str]] = None,
        perturb_input: bool = True,
        eps_policy: Literal["scaling", "lpips", "constant"] = "scaling",
        grow_policy: Literal["descending", "ascending", "lindescending", "none"] = "descending",
        attack_bn_mode: Literal["eval", "train", "batch"] = "train",
        **kwargs: Any,
    ) -> None:
        if eps_policy not in EPS_POLICIES:
            raise ValueError(f"eps_policy must be one of {EPS_POLICIES}, got {eps_policy!r}")
        if grow_policy not in GROW_POLICIES:
            raise ValueError(f"grow_policy must be one of {GROW_POLICIES}, got {grow_policy!r}")
        layers = default_rlat_layers(model) if layers is None else [str(name) for name in layers]
        for name in layers:
            try:
                model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"layers: the model has no submodule {name!r}") from None
        if not layers and not perturb_input:
            raise ValueError("layers is empty and perturb_input is False: nothing to perturb")
        super().__init__(model, eps=eps, norm=norm, attack_bn_mode=attack_bn_mode, **kwargs)
        self.layers, self.perturb_input = list(layers), perturb_input
        self.eps_policy, self.grow_policy = eps_policy, grow_policy
        #: the layer perturbations of the last ``perturb`` call (detached), used by ``outer_loss``
        self.layer_deltas: Optional[list[Tensor]] = None

    def default_lr_scheduler(self, optimizer: torch.optim.Optimizer) -> tuple[Any, str]:
        """x0.1 at 34% and 67% of the training steps (the official piecewise schedule), stepped every step."""
        total = finite_total(self.trainer.estimated_stepping_batches)
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, [int(total * 0.34), int(total * 0.67)], 0.1), "step"

    def layer_modules(self) -> list[nn.Module]:
        return [self.model.get_submodule(name) for name in self.layers]

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        x_adv, self.layer_deltas = rlat_perturbation(
            self.model, x, y, self.layer_modules(), self.eps, self.norm, self.eps_policy, self.grow_policy,
            self.perturb_input, self.attack_bn_mode)
        return x_adv

    def outer_loss(self, x: Tensor, x_adv: Tensor, y: Tensor) -> TrainingOutput:
        if self.layer_deltas is None or (self.layer_deltas and self.layer_deltas[0].shape[0] != x_adv.shape[0]):
            raise RuntimeError("RLAT.outer_loss needs the layer perturbations of perturb(x, y) on the same batch")
        return rlat_objective(self.model, x_adv, y, self.layer_modules(), self.layer_deltas, self.label_smoothing)


def default_rlat_layers(model: nn.Module) -> list[str]:
    """The official choice of perturbed layers for the library's backbones (module paths).

    CIFAR ResNets (``lit_robust.models.resnet``): the stem convolution and the last block of each stage
    (official PreActResNet-18: ``conv1, layer1, layer2, layer3, layer4``). ``SmallCNN``: the first
    convolution and each max-pool (the end of each stage). Other models: ``ValueError`` (name ``layers``).
    """
    from lit_robust.models import SmallCNN
    from lit_robust.models.resnet import BasicBlock, PreActBlock, _CifarResNet

    if isinstance(model, _CifarResNet):
        blocks = [i for i, m in enumerate(model.features) if isinstance(m, (BasicBlock, PreActBlock))]
        ends = [i for k, i in enumerate(blocks)
                if k + 1 == len(blocks) or model.features[blocks[k + 1]].conv1.stride[0] != 1]
        return ["features.0", *(f"features.{i}" for i in ends)]
    if isinstance(model, SmallCNN):
        pools = [f"features.{i}" for i, m in enumerate(model.features) if isinstance(m, nn.MaxPool2d)]
        return ["features.0", *pools]
    raise ValueError(f"layers: no default RLAT layers for {type(model).__name__}; name the modules whose outputs "
                     "to perturb (e.g. the stem and the end of each stage), or [] for the input only")


def rlat_budgets(eps: float, input_shape: Sequence[int], shapes: Sequence[Sequence[int]],
                 eps_policy: str = "scaling", grow_policy: str = "descending") -> list[float]:
    """The per-layer radii ``eps_i`` of the official script for per-example tensor shapes ``shapes``
    (in forward order, the input first when it is perturbed); ``input_shape`` is one example's (C, H, W)."""
    n_in, hw_in = math.prod(input_shape), math.prod(input_shape[1:])
    if eps_policy == "scaling":
        budgets = [eps * math.prod(s) / n_in for s in shapes]
    elif eps_policy == "lpips":
        budgets = [eps * hw_in / math.prod(s[1:]) for s in shapes]
    elif eps_policy == "constant":
        budgets = [eps for _ in shapes]
    else:
        raise ValueError(f"eps_policy must be one of {EPS_POLICIES}, got {eps_policy!r}")
    n = len(budgets)
    grow = {"descending": lambda i: 1 / (i + 1), "ascending": lambda i: i + 1.0,
            "lindescending": lambda i: (n - i) / n, "none": lambda i: 1.0}
    if grow_policy not in grow:
        raise ValueError(f"grow_policy must be one of {GROW_POLICIES}, got {grow_policy!r}")
    return [b * grow[grow_policy](i) for i, b in enumerate(budgets)]


@contextmanager
def layer_perturbations(modules: Sequence[nn.Module], deltas: list[Optional[Tensor]]) -> Iterator[list]:
    """Adds ``deltas[i]`` to the output of ``modules[i]`` while the block runs (forward hooks, removed on exit).

    A ``None`` entry becomes a zero leaf tensor of the output's shape that requires grad, created at the first
    forward and stored back into ``deltas``. A module that runs twice in one forward is an error.
    """
    fired = [0] * len(modules)

    def hook_for(i: int):
        def hook(module: nn.Module, args: Any, out: Tensor) -> Tensor:
            fired[i] += 1
            if fired[i] > 1:
                raise RuntimeError(f"RLAT: the perturbed layer {type(module).__name__} ran twice in one forward")
            if deltas[i] is None:
                deltas[i] = torch.zeros_like(out, requires_grad=True)
            return out + deltas[i]
        return hook

    handles = [m.register_forward_hook(hook_for(i)) for i, m in enumerate(modules)]
    try:
        yield fired
    finally:
        for handle in handles:
            handle.remove()


def rlat_perturbation(model: nn.Module, x: Tensor, y: Tensor, modules: Sequence[nn.Module], eps: float,
                      norm: str = "l2", eps_policy: str = "scaling", grow_policy: str = "descending",
                      perturb_input: bool = True, bn_mode: str = "train") -> tuple[Tensor, list[Tensor]]:
    """RLAT's one-step attack: ``(clamp(x + delta_0, 0, 1), [delta_1, ...])``, all detached (the input part is
    ``x`` itself when ``perturb_input`` is False). Input gradients only; module modes restored."""
    x = x.detach()
    delta_in = torch.zeros_like(x, requires_grad=True) if perturb_input else None
    layer_deltas: list[Optional[Tensor]] = [None] * len(modules)
    with torch.enable_grad(), module_mode(model, bn_mode), layer_perturbations(modules, layer_deltas) as fired:
        logits = model((x + delta_in).clamp(0, 1) if perturb_input else x)
        if not all(fired):
            raise RuntimeError("RLAT: a perturbed layer did not run in the forward: check `layers`")
        loss = F.cross_entropy(logits.float(), y)
    deltas = ([delta_in] if perturb_input else []) + layer_deltas
    grads = torch.autograd.grad(loss, deltas)
    budgets = rlat_budgets(eps, x.shape[1:], [d.shape[1:] for d in deltas], eps_policy, grow_policy)
    steps = []
    for g, budget in zip(grads, budgets):
        if norm == "l2":
            size = g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (g.dim() - 1))
            steps.append((budget * g / size).detach())
        else:
            steps.append((budget * g.sign()).clamp(-eps, eps).detach())
    x_adv = (x + steps[0]).clamp(0, 1) if perturb_input else x
    return x_adv, steps[1:] if perturb_input else steps


def rlat_objective(model: nn.Module, x_adv: Tensor, y: Tensor, modules: Sequence[nn.Module],
                   layer_deltas: Sequence[Tensor], label_smoothing: float = 0.0) -> TrainingOutput:
    """``CE(f(x_adv; delta_1, ...), y)``: the training forward with the layer perturbations added."""
    with layer_perturbations(modules, list(layer_deltas)):
        logits = model(x_adv)
    return TrainingOutput(F.cross_entropy(logits, y, label_smoothing=label_smoothing), logits)
