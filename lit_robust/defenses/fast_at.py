"""Fast adversarial training: FGSM with a random start (Wong, Rice & Kolter, ICLR 2020), with the
catastrophic-overfitting guard of the official code."""

from __future__ import annotations

from typing import Any, Optional

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from lit_robust.attacks import FGSM
from lit_robust.callbacks.catastrophic_overfitting import CatastrophicOverfittingMonitor
from lit_robust.defenses.base import AdversarialModule, TrainingOutput, finite_total
from lit_robust.objectives import pgd_at_objective


class FastAT(AdversarialModule):
    """Wong, Rice & Kolter, "Fast is better than free: Revisiting adversarial training", ICLR 2020.

    Official code: github.com/locuslab/fast_adversarial (``CIFAR10/train_fgsm.py``).

    Algorithm, per batch (FGSM-RS)::

        delta ~ U(-eps, eps), box-projected
        delta <- Proj(delta + alpha * sign(grad_delta CE(f(x + delta), y)))     # alpha = 1.25 eps
        theta <- theta - lr_t * grad_theta CE(f(x + delta), y)                  # lr_t cyclic, per iteration

    Catastrophic-overfitting guard (the official ``--early-stop``; ``co_guard``): a
    :class:`~lit_robust.callbacks.catastrophic_overfitting.CatastrophicOverfittingMonitor`
    (``drop=co_drop``, ``check_steps=co_check_steps``), held in ``co_monitor`` and attached
    through ``configure_callbacks``. The first training batch of each epoch is kept; when the
    epoch's training batches are done, PGD (``co_check_steps`` steps of eps/4, i.e. 2/255 at
    8/255, random start, 1 restart, model in eval mode) is run on it. If that robust accuracy
    is more than ``co_drop`` below the previous epoch's check, the weights of the previous
    epoch are put back, a warning says so, ``co_stopped_epoch`` records the epoch and training
    stops. The accuracy is logged every epoch as ``train/co_check_acc``. By Lightning's rule a
    callback returned by ``configure_callbacks`` replaces the Trainer's callbacks of the same
    class, so with ``co_guard=True`` a ``CatastrophicOverfittingMonitor`` given to the Trainer is
    dropped in favour of this one; for other settings (``eps``, ``restore=False``,
    ``stop=False``) pass ``co_guard=False`` and give the Trainer your own monitor.

    Defaults (PreActResNet-18, CIFAR-10): Linf eps 8/255, alpha 10/255 (``step_size=None``
    means 1.25 eps, so it follows eps), 15 epochs at batch 128, SGD momentum 0.9, weight decay
    5e-4, learning rate linear from 0 up to 0.2 at the half-way iteration and back to 0
    (``cyclic_lr``; the peak is the optimizer's lr, 0.2 by default), guard on with a 0.2 drop.
    See ``configs/cifar10/fast_at.yaml``.

    Two official scripts, two details (``clip_start``, ``lr_peak``):

    * ``CIFAR10/train_fgsm.py`` (the defaults): the uniform start is box-clipped before the
      FGSM gradient (``clip_start=True``); SGD, lr cycle peaking at the half-way iteration
      (``lr_peak=0.5``).
    * ``MNIST/train_mnist.py`` (eps 0.3, alpha 0.375, Adam lr 5e-3, batch 100, 10 epochs, no
      BatchNorm in its network): the start is *not* clipped (``clip_start=False``; only the input
      after the step is), so on pixels saturated at 0 or 1 the gradient is taken outside the
      image box, where it is not zeroed by the clip; lr cycle peaking at 2/5 of training
      (``lr_peak=0.4``). The two differ only where pixels sit at 0 or 1: on handwriting and
      digits many do, on natural images few. Measured on the 8x8 digits (``benchmarks/RESULTS.md``,
      5 seeds, Adam, BN-free CNN): at eps 0.2 the clipped start is the more robust, +3.3 points
      worst case (+2.2 to +4.5 per seed) at -0.3 clean; at eps 0.3 neither trains robustness there.
      A reviewer's single-seed run on 28x28 digits found the opposite, so choose by measuring on
      your data. With the MNIST settings this module reproduces a plain loop of the script to
      seed noise; its one difference, the first step at lr 0 (see :func:`cyclic_lr`), leaves the
      weights bit-identical once the script's lr values are fed in.

    Cost: 2 forward+backward passes per step (FGSM + update). The guard adds
    ``co_check_steps`` forward+backward passes and one forward on a single batch per epoch,
    plus a CPU copy of the weights (the previous epoch's, to restore).

    Reported (CIFAR-10, Linf 8/255, PreActResNet-18, 15 epochs): README 86.06 clean (probably a
    typo: RobustBench measures 83.34, the paper says about 83.8) / 46.06 PGD-50-10, 12 minutes;
    RobustBench (Wong2020Fast) 83.34 clean / 43.21 AutoAttack. Too large a step (alpha
    16/255) collapses to 0% PGD accuracy: catastrophic overfitting, which the guard catches.

    Deviations we chose:

    * The FGSM attack runs with BatchNorm in eval mode; the official code attacks (and runs
      the guard's PGD) in train mode. ``attack_bn_mode="train"`` matches the training attack.
    * The guard's PGD always runs in eval mode and fp32 (it runs outside the training step's
      autocast), and its decision is the same on every DDP rank: each rank attacks its own
      first batch and the correct counts are summed over ranks before comparing.
    * The check runs after the epoch's last training batch and *before* the end-of-epoch
      validation, so on a collapse validation and checkpoints already see the restored
      weights. With an iterable dataset of unknown length, or when ``max_steps`` ends an
      epoch early, it runs in ``on_train_epoch_end`` instead (after validation).
    * The default schedule keeps the optimizer's momentum constant. The official code uses
      torch's ``CyclicLR``, whose defaults also cycle momentum between 0.9 and 0.8 inversely
      to the learning rate, an implementation side effect the paper does not describe.
    * Mixed precision: bf16 autocast in our configs; the official code uses apex O2 fp16 with
      a static loss scale of 1.

    Checkpoints carry the guard's state (the monitor's ``state_dict`` under
    ``checkpoint["callbacks"]``: previous accuracy, kept weights, stopped epoch), so a run
    resumed with ``Trainer.fit(ckpt_path=...)`` compares against the right epoch;
    ``load_from_checkpoint`` alone restores no callback state. The kept batch is not saved,
    so an epoch resumed in its middle skips its check. With ``min_epochs``/``min_steps`` not
    yet reached, Lightning ignores the stop request and training goes on from the restored
    weights.
    """

    def __init__(
        self,
        model: nn.Module,
        eps: float = 8 / 255,
        step_size: Optional[float] = None,
        co_guard: bool = True,
        co_drop: float = 0.2,
        co_check_steps: int = 5,
        clip_start: bool = True,
        lr_peak: float = 0.5,
        **kwargs: Any,
    ) -> None:
        if step_size is None and eps > 0:
            step_size = 1.25 * eps
        super().__init__(model, eps=eps, step_size=step_size, **kwargs)
        self.lr_peak = check_peak(lr_peak)
        self.attack = FGSM(self.eps, self.step_size, self.norm, random_start=True, bn_mode=self.attack_bn_mode,
                           clip_start=clip_start)
        try:  # validated even with the guard off; the monitor's messages start with the argument's name
            monitor = CatastrophicOverfittingMonitor(drop=co_drop, check_steps=co_check_steps)
        except ValueError as err:
            raise ValueError(f"co_{err}") from None
        self.co_guard, self.co_drop = co_guard, co_drop
        #: the guard (one object for the module's lifetime, so a second ``fit`` continues its comparison)
        self.co_monitor: Optional[CatastrophicOverfittingMonitor] = monitor if co_guard else None

    def outer_loss(self, x: Tensor, x_adv: Tensor, y: Tensor) -> TrainingOutput:
        return pgd_at_objective(self.model, x, x_adv, y, self.label_smoothing)

    # --- the learning-rate cycle ----------------------------------------------------------

    def default_optimizer(self, params: Any) -> torch.optim.Optimizer:
        """SGD with the cycle's peak lr 0.2, momentum 0.9, weight decay 5e-4."""
        return torch.optim.SGD(params, lr=0.2, momentum=0.9, weight_decay=5e-4)

    def default_lr_scheduler(self, optimizer: torch.optim.Optimizer) -> tuple[Any, str]:
        """The paper's cycle over all training iterations, stepped every iteration."""
        return cyclic_lr(optimizer, finite_total(self.trainer.estimated_stepping_batches), self.lr_peak), "step"

    # --- catastrophic-overfitting guard ----------------------------------------------------

    def defense_callbacks(self) -> list[Callback]:
        """The guard, when ``co_guard``: it replaces a user's ``CatastrophicOverfittingMonitor`` (Lightning's rule)."""
        callbacks = super().defense_callbacks()
        return callbacks if self.co_monitor is None else [*callbacks, self.co_monitor]

    @property
    def co_stopped_epoch(self) -> Optional[int]:
        """The epoch whose guard check found a collapse and stopped training (None: it did not, or no guard)."""
        return None if self.co_monitor is None else self.co_monitor.stopped_epoch


def cyclic_lr(optimizer: torch.optim.Optimizer, total_steps: int, peak: float = 0.5) -> LambdaLR:
    """Linear from 0 up to the optimizer's lr at ``peak * total_steps``, then down to 0 at ``total_steps``.

    ``peak=0.5``: the triangle of torch's ``CyclicLR(base_lr=0, step_size_up=step_size_down=total/2)``
    used by the official CIFAR-10 code, without its momentum cycle. ``peak=0.4``: the official MNIST
    script's ``np.interp(t, [0, epochs * 2 // 5, epochs], [0, lr_max, 0])`` (exactly for a number of
    epochs divisible by 5; that script evaluates it one iteration ahead, ``t = epoch + (i + 1) / n``,
    so its first step is not at lr 0). 0 after ``total_steps``.
    """
    up, down = check_peak(peak) * total_steps, (1 - peak) * total_steps
    return LambdaLR(optimizer, lambda step: max(0.0, 1.0 - (up - step) / up if step <= up else
                                                1.0 - (step - up) / down))


def check_peak(peak: float) -> float:
    """``peak`` if it is a fraction of training in (0, 1), else a ``ValueError`` naming ``lr_peak``."""
    if not 0 < peak < 1:
        raise ValueError(f"lr_peak must be in (0, 1), got {peak}")
    return float(peak)
