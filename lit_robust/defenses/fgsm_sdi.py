"""FGSM-SDI: fast adversarial training from a learned, sample-dependent initialisation.

Jia, Zhang, Wu, Wang & Cao, "Boosting Fast Adversarial Training with Learnable Adversarial
Initialization", IEEE Transactions on Image Processing 31, 2022 (arXiv 2110.05007; not CVPR).
Official code: github.com/jiaxiaojunQAQ/FGSM-SDI (``FGSM_SDI.py`` loop, ``FGSM_SDI_loss.py``
adversarial example and loss, ``attacker.py`` generator).

Algorithm, per batch (``G`` is :class:`~lit_robust.models.sdi_generator.SDIGenerator`)::

    s0 = sign(grad_x CE(f(x), y))                       # input gradient, autograd.grad only
    delta0 = G(x, s0)                                   # |delta0| <= eps (eps * tanh)
    s1 = sign(grad CE(f(x1), y)),  x1 = clip(x + delta0, 0, 1)
    x_adv = clip(x + clip(delta0 + clip(alpha * s1, -eps, eps), -eps, eps), 0, 1)
    L = soft-CE(f(x_adv), y_ls)                         # p(true) = 0.5, p(other) = 0.5 / (C - 1)
    every k-th batch (batch_idx % k == 0): G <- Adam step maximising L   # model fixed
    every batch:                           f <- SGD step minimising L    # G fixed, recomputed
The generator's gradient reaches it through ``delta0`` only (``s0``, ``s1`` are constants);
where a clip is active it gets none, as in the official code.

Defaults (official code, CIFAR-10): Linf eps 8/255, alpha 8/255 (``step_size``), k = 20
(``att_num``, here ``generator_every``), generator Adam lr 1e-3, weight decay 5e-4, width 64;
ResNet-18, SGD lr 0.1, momentum 0.9, weight decay 5e-4, batch 128, 110 epochs, lr x0.1 at
100/110 and 105/110 of the iterations, stepped every iteration (``default_lr_scheduler``).
Label smoothing: p(true) = 0.5, 0.5 / (C - 1) elsewhere (torch's ``label_smoothing =
0.5 * C / (C - 1)``), the official ``--factor`` default at the repository's head
(``FGSM_SDI.py`` line 40, commit d54cac6 of 2023-08-22; the first commit, 48ff9a5, had 0.9).

BatchNorm, an explicit choice (the code does not say why it does what it does):

* target model, input-gradient forwards (``s0``, ``s1``): ``attack_bn_mode``; "eval" (default)
  uses the running statistics and leaves them untouched; "train" is the official code (batch
  statistics, running ones updated by every forward, the generator step's included).
* target model, the forward of ``L``: its own mode (train during fit), in both steps, so the
  generator maximises the very loss the model minimises. With "eval" the generator step puts
  the running statistics back, so they move once per batch, on the model step's forward.
* generator: train mode in its own step (batch statistics; its running statistics move only
  there), eval mode in the model step and in ``perturb``, as in the official code.

Deviations from the official code, on purpose:

* ``x1`` and ``x_adv`` are clipped to [0, 1] (the official training never clips them;
  DESIGN principle 3: pixels live in [0, 1]).
* The generator's learning rate is constant. The official code builds a MultiStepLR for it
  with milestones in iterations but steps it only on generator updates (every k-th
  iteration), so its milestones are never reached: constant in effect, so we say constant.
* The generator is stepped through the precision plugin without counting as a Lightning
  optimizer step, so ``global_step`` (``max_steps``, ``log_every_n_steps``) counts batches.
* Checkpoint selection on a held-out validation split, never on the test set (the official
  ``best_model.pth`` is picked on test PGD-10).

Official-code bugs not reproduced: ``FGSM_SDI.py`` reads ``args.attacker``, which no argument
defines (the script crashes as written); the generator's scheduler, above.

Cost: about 3 forward+backward passes of the classifier per batch (``s0``, ``s1``, the update)
plus a generator forward+backward, and every k-th batch 2 more (``s1`` and ``L`` for the
generator step) and one more generator forward+backward: about 3.1 F+B for k = 20.

Reported (CIFAR-10, ResNet-18, Linf 8/255): paper about 84.86 clean / PGD-10 53.73 /
AutoAttack 48.50 [recalled, unverified]; independent re-run in the AT-Field paper (AAAI'26,
Table 1), best checkpoint: 83.55 clean / PGD-10 51.94 / AutoAttack 46.31.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_robust.attacks import functional as AF
from lit_robust.attacks.pgd import module_mode
from lit_robust.objectives.awp import preserved_norm_statistics
from lit_robust.defenses.base import AdversarialModule, TrainingOutput, positive_int
from lit_robust.models.sdi_generator import SDIGenerator

PAPER_TRUE_CLASS_PROB = 0.5


def paper_label_smoothing(num_classes: int, true_class_prob: float = PAPER_TRUE_CLASS_PROB) -> float:
    """Torch's ``label_smoothing`` for the paper's targets: ``true_class_prob`` on the true class,
    the rest spread evenly over the other ``num_classes - 1`` classes.

    Torch puts ``1 - s + s / C`` on the true class, so ``s = (1 - p) * C / (C - 1)``.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    return (1.0 - true_class_prob) * num_classes / (num_classes - 1)


class FGSMSDI(AdversarialModule):
    """FGSM-SDI (Jia et al., IEEE TIP 2022); see the module docstring for the method card.

    Args:
        model: the classifier, [0, 1] images to logits.
        eps: Linf radius (only ``norm="linf"``: the generator's tanh output is an Linf box).
        step_size: alpha of the FGSM step taken from the generator's initialisation.
        generator_every: k, the generator takes an ascent step on batches with
            ``batch_idx % k == 0`` (the first of every epoch included).
        generator_lr, generator_weight_decay: its Adam optimizer (constant learning rate).
        generator_width: channels of the generator's hidden layers.
        in_channels: image channels; by default the ``in_channels`` of the model's first
            ``Conv2d``.
        label_smoothing: ``None`` (default) for the paper's targets, p(true) = 0.5 and
            0.5 / (C - 1) on every other class (:func:`paper_label_smoothing`); a float is
            torch's convention, as for every other defense (0 disables smoothing).
        **kwargs: the shared arguments of :class:`AdversarialModule`; ``steps`` is unused (one
            FGSM step), ``optimizer`` / ``lr_scheduler`` configure the classifier's optimizer
            only (default: the paper's SGD and per-iteration schedule).
    """

    def __init__(
        self,
        model: nn.Module,
        eps: float = 8 / 255,
        step_size: float = 8 / 255,
        generator_every: int = 20,
        generator_lr: float = 1e-3,
        generator_weight_decay: float = 5e-4,
        generator_width: int = 64,
        in_channels: Optional[int] = None,
        label_smoothing: Optional[float] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, eps=eps, step_size=step_size,
                         label_smoothing=0.0 if label_smoothing is None else label_smoothing, **kwargs)
        if self.norm != "linf":
            raise ValueError(f"norm must be 'linf' for FGSM-SDI (its generator is an Linf box), got {self.norm!r}")
        positive_int(generator_every, "generator_every")
        if not generator_lr > 0 or generator_weight_decay < 0:
            raise ValueError(f"generator_lr must be > 0 and generator_weight_decay >= 0, "
                             f"got {generator_lr}, {generator_weight_decay}")
        self.automatic_optimization = False
        self.label_smoothing = label_smoothing
        self.generator_every = int(generator_every)
        self.generator_lr, self.generator_weight_decay = generator_lr, generator_weight_decay
        channels = _first_conv_channels(model) if in_channels is None else in_channels
        self.generator = SDIGenerator(self.eps, channels, generator_width)

    # --- the algorithm -----------------------------------------------------------------------

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        """The SDI adversarial batch for the current classifier and generator (generator in eval mode).

        Input gradients only: no parameter's ``.grad`` is touched, nothing is updated.
        """
        with torch.no_grad(), module_mode(self.generator, "eval"):
            return self._sdi_batch(x, y, self._grad_sign(x, torch.zeros_like(x), y))

    def outer_loss(self, x: Tensor, x_adv: Tensor, y: Tensor) -> TrainingOutput:
        logits = self.model(x_adv)
        return TrainingOutput(self.cross_entropy(logits, y), logits)

    def cross_entropy(self, logits: Tensor, y: Tensor) -> Tensor:
        """Soft-target CE with the paper's label smoothing (or torch's ``label_smoothing`` if given)."""
        smoothing = self.label_smoothing
        if smoothing is None:
            smoothing = paper_label_smoothing(logits.shape[1])
        return F.cross_entropy(logits, y, label_smoothing=smoothing)

    def adversarial_step(self, x: Tensor, y: Tensor, batch_idx: int) -> Tensor:
        model_optimizer, generator_optimizer = self.optimizers()
        grad_sign = self._grad_sign(x, torch.zeros_like(x), y)  # shared by both steps, as in the code

        if batch_idx % self.generator_every == 0:
            keep_stats = nullcontext() if self.attack_bn_mode == "train" else preserved_norm_statistics(self.model)
            with module_mode(self.generator, "train"), keep_stats:  # restored after the backward
                ascent = self.outer_loss(x, self._sdi_batch(x, y, grad_sign), y).loss
                generator_optimizer.zero_grad()
                self.manual_backward(-ascent)
            # Through the precision plugin (AMP scaling, hooks) but not LightningOptimizer.step,
            # which would count a second global step for this batch.
            self.trainer.strategy.optimizer_step(generator_optimizer.optimizer, lambda: None)
            self.log("train/generator_loss", ascent.detach(), batch_size=x.shape[0])

        with module_mode(self.generator, "eval"):
            out = self.outer_loss(x, self._sdi_batch(x, y, grad_sign), y)
        model_optimizer.zero_grad()
        self.manual_backward(out.loss)  # also reaches G (unused, never stepped): keeps DDP's reducer whole
        model_optimizer.step()
        self._step_lr_scheduler("step")

        self.log_loss(out.loss, x.shape[0])
        self._log_accuracy("train/adv_acc", out.adv_logits, y)
        self.watch_loss(out.loss)
        return out.loss.detach()

    def _grad_sign(self, x: Tensor, delta: Tensor, y: Tensor) -> Tensor:
        """sign(grad CE(f(x + delta), y)) w.r.t. the input, the classifier in ``attack_bn_mode``."""
        with module_mode(self.model, self.attack_bn_mode), torch.enable_grad():
            _, _, grad = AF.loss_and_input_grad(self.model, x, delta, y, AF.per_example_loss("ce"))
        return grad.sign()

    def _sdi_batch(self, x: Tensor, y: Tensor, grad_sign: Tensor) -> Tensor:
        """x_adv from the generator's initialisation and one FGSM step; differentiable w.r.t. G."""
        delta0 = self.generator(x, grad_sign)
        x1 = (x + delta0.detach()).clamp(0.0, 1.0)
        step = (self.step_size * self._grad_sign(x, x1 - x, y)).clamp(-self.eps, self.eps)
        return (x + (delta0 + step).clamp(-self.eps, self.eps)).clamp(0.0, 1.0)

    # --- optimisation ------------------------------------------------------------------------

    def configure_optimizers(self) -> Any:
        config = super().configure_optimizers()  # the classifier's optimizer and schedule
        generator_optimizer = torch.optim.Adam(self.generator.parameters(), lr=self.generator_lr,
                                               weight_decay=self.generator_weight_decay)
        return [config["optimizer"], generator_optimizer], [config["lr_scheduler"]]

    def default_lr_scheduler(self, optimizer: torch.optim.Optimizer) -> tuple[Any, str]:
        """The official schedule: x0.1 at 100/110 and 105/110 of the iterations, stepped every iteration."""
        total = self.trainer.estimated_stepping_batches
        milestones = [int(total * 100 / 110), int(total * 105 / 110)]
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, 0.1), "step"

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        self._step_lr_scheduler("epoch")

    def _step_lr_scheduler(self, interval: str) -> None:
        """Manual optimization: Lightning does not step schedulers, so the classifier's is stepped here."""
        for config in self.trainer.lr_scheduler_configs:
            if config.interval == interval:
                config.scheduler.step()


def _first_conv_channels(model: nn.Module) -> int:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    raise ValueError("in_channels: the model has no Conv2d to read the image channels from; pass in_channels")
