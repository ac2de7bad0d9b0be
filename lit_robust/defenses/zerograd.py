"""ZeroGrad and MultiGrad: single-step adversarial training that zeroes unreliable gradient coordinates before
the FGSM sign step (Golgooni, Saberi, Sharif, Rohban, Rabiee, 2023), against catastrophic overfitting."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from lit_robust.attacks import functional as AF
from lit_robust.attacks.pgd import module_mode
from lit_robust.defenses.base import AdversarialModule, TrainingOutput, finite_total, linf_only
from lit_robust.objectives import pgd_at_objective

_CARD = """
    Paper: Golgooni, Saberi, Sharif, Rohban, Rabiee, "ZeroGrad: Costless conscious remedies for catastrophic
    overfitting in the FGSM adversarial training", Intelligent Systems with Applications, 2023 (arXiv 2103.15476).
    Official code: github.com/rohban-lab/catastrophic_overfitting, ``train_cifar.py`` (``quantile_fgsm`` is
    ZeroGrad, ``--attack qfgsm``; ``consensus_fgsm`` is MultiGrad, ``--attack cfgsm``, the script's default).
"""


def _per_example(t: Tensor, x: Tensor) -> Tensor:
    return t.view(-1, *([1] * (x.dim() - 1)))


def row_quantile(values: Tensor, q: float) -> Tensor:
    """Per row of the 2-D ``values``, the ``q``-quantile with linear interpolation: ``torch.quantile(values, q,
    dim=1)`` (what the official code calls), written with a sort so it has no 2**24-element input limit."""
    ordered = values.sort(dim=1).values
    pos = q * (values.shape[1] - 1)
    lo, frac = int(pos), pos - int(pos)
    hi = min(lo + 1, values.shape[1] - 1)
    return ordered[:, lo] + frac * (ordered[:, hi] - ordered[:, lo])


def zerograd_gradient(grad: Tensor, q: float) -> Tensor:
    """``grad`` with, per example, every coordinate whose magnitude is below the ``q``-quantile of that example's
    ``|grad|`` set to 0 (the official ``grad[|grad| < quantile] = 0``: ties at the quantile are kept)."""
    mag = grad.abs()
    threshold = row_quantile(mag.flatten(1), q)
    return torch.where(mag < _per_example(threshold, grad), torch.zeros_like(grad), grad)


def multigrad_direction(grads: Tensor, agree: Optional[int] = None) -> Tensor:
    """The sum of the signs of ``grads`` [k, B, ...] (k gradients of one batch), set to 0 where fewer than ``agree``
    of them share the majority sign (official: ``|sum| < agree - (k - agree)``); ``agree=None`` means all k."""
    k = grads.shape[0]
    agree = k if agree is None else agree
    votes = grads.sign().sum(0)
    return torch.where(votes.abs() < 2 * agree - k, torch.zeros_like(votes), votes)


def zerograd_perturb(model: nn.Module, x: Tensor, y: Tensor, eps: float, step_size: float, q: float,
                     random_start: bool = True, bn_mode: str = "eval") -> Tensor:
    """ZeroGrad's FGSM: ``x + Proj(delta0 + alpha * sign(zerograd_gradient(g(x + delta0), q)))``, Linf."""
    delta = AF.random_start(x, eps, "linf") if random_start else torch.zeros_like(x)
    with module_mode(model, bn_mode), torch.enable_grad():
        _, _, grad = AF.loss_and_input_grad(model, x, delta, y, AF.per_example_loss("ce"))
    step = step_size * zerograd_gradient(grad, q).sign()
    return (x + AF.project(delta + step, x, eps, "linf")).detach()


def multigrad_perturb(model: nn.Module, x: Tensor, y: Tensor, eps: float, step_size: float, samples: int = 3,
                      agree: Optional[int] = None, bn_mode: str = "eval") -> Tensor:
    """MultiGrad's FGSM: ``samples`` input gradients at independent uniform starts (one forward+backward on the
    batch repeated ``samples`` times), then a step from the *clean* input along the agreeing signs:
    ``x + Proj(alpha * sign(multigrad_direction(grads, agree)))``, Linf."""
    xs = x.repeat(samples, *([1] * (x.dim() - 1)))
    delta = AF.random_start(xs, eps, "linf")
    with module_mode(model, bn_mode), torch.enable_grad():
        ys = y.repeat(samples, *([1] * (y.dim() - 1)))  # class indices or probability rows
        _, _, grad = AF.loss_and_input_grad(model, xs, delta, ys, AF.per_example_loss("ce"))
    direction = multigrad_direction(grad.view(samples, *x.shape), agree)
    return (x + AF.project(step_size * direction.sign(), x, eps, "linf")).detach()


class _MaskedFGSMAT(AdversarialModule):
    """What ZeroGrad and MultiGrad share: Linf only, alpha = ``step_size_factor * eps`` unless ``step_size``
    is given, PGD-AT's outer loss, SGD lr 0.1 (momentum 0.9, wd 5e-4) with one x0.1 drop at ``lr_drop``."""

    def __init__(self, model: nn.Module, eps: float = 8 / 255, step_size: Optional[float] = None,
                 step_size_factor: float = 2.0, lr_drop: float = 50 / 52, **kwargs: Any) -> None:
        linf_only(kwargs, type(self).__name__)
        if step_size_factor <= 0:
            raise ValueError(f"step_size_factor must be > 0, got {step_size_factor}")
        if not 0 < lr_drop <= 1:
            raise ValueError(f"lr_drop must be in (0, 1], got {lr_drop}")
        if step_size is None:
            step_size = step_size_factor * eps if eps > 0 else 2 / 255
        super().__init__(model, eps=eps, step_size=step_size, **kwargs)
        self.lr_drop = float(lr_drop)

    def outer_loss(self, x: Tensor, x_adv: Tensor, y: Tensor) -> TrainingOutput:
        return pgd_at_objective(self.model, x, x_adv, y, self.label_smoothing)

    def default_lr_scheduler(self, optimizer: torch.optim.Optimizer) -> tuple[Any, str]:
        """The official ``piecewise`` schedule: lr 0.1 until ``lr_drop`` of training (epoch 50 of 52), then 0.01."""
        drop_at = self.lr_drop * finite_total(self.trainer.estimated_stepping_batches)
        return LambdaLR(optimizer, lambda step: 1.0 if step < drop_at else 0.1), "step"


class ZeroGrad(_MaskedFGSMAT):
    __doc__ = """ZeroGrad: FGSM-RS whose gradient has its ``q`` smallest-magnitude fraction zeroed per example.
    """ + _CARD + """
    Algorithm, per batch (``quantile_fgsm``)::

        delta0 ~ U(-eps, eps), box-projected
        g = grad_delta CE(f(x + delta0), y)
        g[|g| < quantile_q(|g|)] = 0                      # per example, over all its pixels
        delta = Proj(delta0 + alpha * sign(g))           # sign(0) = 0: those pixels keep their random start
        theta <- theta - lr * grad_theta CE(f(x + delta), y)

    Defaults (the script's): Linf eps 8/255, ``q=0.4``, alpha ``= 2 eps`` (``--fgsm-alpha 2``, i.e. 16/255),
    random start, PreActResNet-18, batch 128, SGD lr 0.1 momentum 0.9 wd 5e-4, 52 epochs with lr x0.1 from
    epoch 50 (``--lr-schedule piecewise``). See ``configs/cifar10/zerograd.yaml``.

    Cost: 2 forward+backward passes per step (as FGSM-RS), plus a per-example sort of ``|g|``.

    Reported: the paper's Table values (CIFAR-10, PreActResNet-18, 8/255) are not restated here as we could not
    check them against the paper text in this session; the official code prints PGD-50-10 at the end of training.

    Deviations: the attack runs with BatchNorm in eval mode (``attack_bn_mode``; the official code attacks in
    train mode); the quantile is computed by a sort (same linear interpolation as ``torch.quantile``, no input
    size limit); Linf only.
    """

    def __init__(self, model: nn.Module, eps: float = 8 / 255, q: float = 0.4, **kwargs: Any) -> None:
        if not 0 <= q <= 1:
            raise ValueError(f"q must be in [0, 1], got {q}")
        super().__init__(model, eps=eps, **kwargs)
        self.q = float(q)

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        return zerograd_perturb(self.model, x, y, self.eps, self.step_size, self.q, True, self.attack_bn_mode)


class MultiGrad(_MaskedFGSMAT):
    __doc__ = """MultiGrad: FGSM from the clean input along the gradient signs that several random starts agree on.
    """ + _CARD + """
    Algorithm, per batch (``consensus_fgsm`` with ``--c-parallel``)::

        delta_i ~ U(-eps, eps), box-projected, i = 1..samples
        g_i = grad_delta CE(f(x + delta_i), y)           # one pass over the batch repeated `samples` times
        s = sum_i sign(g_i);  s[|s| < 2 * agree - samples] = 0    # agree = samples: all must agree
        delta = Proj(alpha * sign(s))                    # from zero, not from a random start
        theta <- theta - lr * grad_theta CE(f(x + delta), y)

    Defaults (the script's): Linf eps 8/255, ``samples=3`` (``--c-samps``), ``agree=None`` = all of them
    (``--c-th -1``), alpha ``= 2 eps`` (so every agreeing pixel moves to +-eps), PreActResNet-18, batch 128, SGD
    lr 0.1 momentum 0.9 wd 5e-4, 52 epochs with lr x0.1 from epoch 50. See ``configs/cifar10/multigrad.yaml``.

    Cost: ``samples`` forward+backward passes of the batch (one pass on a ``samples``-times larger batch) plus the
    update: 4 at the default.

    Reported: see ZeroGrad (not restated: unchecked in this session).

    Deviations: BatchNorm in eval mode during the attack (``attack_bn_mode``; the official code attacks in train
    mode, where the repeated batch shares its statistics); Linf only.
    """

    def __init__(self, model: nn.Module, eps: float = 8 / 255, samples: int = 3, agree: Optional[int] = None,
                 **kwargs: Any) -> None:
        if int(samples) != samples or samples < 1:
            raise ValueError(f"samples must be an integer >= 1, got {samples}")
        if agree is not None and not (int(agree) == agree and samples / 2 < agree <= samples):
            raise ValueError(f"agree must be None or an integer in (samples/2, samples], got {agree}")
        super().__init__(model, eps=eps, **kwargs)
        self.samples, self.agree = int(samples), agree

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        return multigrad_perturb(self.model, x, y, self.eps, self.step_size, self.samples, self.agree,
                                 self.attack_bn_mode)
