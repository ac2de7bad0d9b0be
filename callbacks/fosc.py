"""Dynamic adversarial training: the FOSC threshold schedule of Wang et al. (ICML 2019)."""

from __future__ import annotations

from typing import Any, Literal, Optional

import lightning.pytorch as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn

from lit_robust.attacks import PGD
from lit_robust.attacks.pgd import FOSC_REFERENCES
from lit_robust.callbacks.schedules import AttackSchedule, attack_owner, scheduled_attack


class FOSCSchedule(AttackSchedule):
    """Wang, Ma, Bailey, Yi, Zhou & Gu, "On the Convergence and Robustness of Adversarial
    Training", ICML 2019. Official code: github.com/YisenWang/dynamic_adv_training (Keras).

    Each epoch t sets the training PGD's FOSC threshold to
    ``c_t = max(c_max - c_max * t / dynamic_epochs, 0)``; every example's PGD stops once its
    first-order stationary condition ``c(x_k) = eps * ||g||_1 - <x_k - x, g>`` is <= c_t
    (the first step is always taken; :class:`~lit_robust.attacks.PGD`, ``fosc_threshold``).
    Early epochs therefore train on weak, nearly-converged-enough adversarial examples and,
    from epoch ``dynamic_epochs`` on, every example takes all K steps (plain PGD-AT).

    Defaults as in the official code: ``c_max = 0.5``, ``dynamic_epochs = 100`` of 120 epochs,
    with eps 0.031, step eps/4, K = 10 (``configs/cifar10/dynamic_at.yaml``). FOSC is
    computed from per-example (summed, not averaged) cross-entropy gradients with respect
    to [0, 1] pixels, as the official code does; c_max means nothing at another scale.
    ``x`` in the formula is the clean image, as in the paper; the official ``pgd_attack.py``
    measures from the random start instead (``fosc_reference="start"``).

    Works with any defense whose training attack is a PGD (``pl_module.scheduled_attack()``):
    PGD-AT, TRADES (FOSC of its KL objective), MART, Fast AT; and with any LightningModule trained
    through the ``AdversarialTraining`` callback. Logged: ``train/fosc_threshold``, and by the
    defense (or the callback) ``train/fosc_mean`` and ``train/attack_steps`` (means over the epoch,
    global under DDP); the FOSC values of the epoch go to TensorBoard as the histogram
    ``train/fosc`` (rank 0's examples).

    Cost: like the official code, every example still runs all K iterations (frozen ones
    are masked, not removed), plus one forward+backward to measure FOSC at the final iterate.

    DDP: c_t depends on the epoch only, so every rank uses the same threshold. Ranks stop
    different examples at different steps, which is safe because the attack does no
    collective; with ``attack_bn_mode="train"`` and SyncBatchNorm every attack forward would
    be one, and ranks running different numbers of them would deadlock, so that combination
    is refused.

    Args:
        c_max, dynamic_epochs: c_t starts at ``c_max`` and reaches 0 at epoch ``dynamic_epochs``.
        log_histogram: log the epoch's FOSC values to TensorBoard.
        fosc_reference: set the attack's :class:`~lit_robust.attacks.PGD` ``fosc_reference``:
            ``"clean"`` (the paper) or ``"start"`` (the official code); None keeps the attack's own.
    """

    name = "fosc_threshold"

    def __init__(self, c_max: float = 0.5, dynamic_epochs: float = 100.0, log_histogram: bool = True,
                 fosc_reference: Optional[Literal["clean", "start"]] = None) -> None:
        if c_max < 0:
            raise ValueError(f"c_max must be >= 0, got {c_max}")
        if fosc_reference is not None and fosc_reference not in FOSC_REFERENCES:
            raise ValueError(f"fosc_reference must be one of {FOSC_REFERENCES} or None, got {fosc_reference!r}")
        super().__init__(ramp_epochs=dynamic_epochs, start=c_max, final=0.0)
        self.log_histogram = log_histogram
        self.fosc_reference = fosc_reference
        self._epoch_fosc: list[Tensor] = []

    def apply(self, attack: PGD, value: float) -> None:
        attack.set_fosc_threshold(value)
        if self.fosc_reference is not None:
            attack.fosc_reference = self.fosc_reference

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        attack = scheduled_attack(pl_module, self)
        synced = any(isinstance(m, nn.SyncBatchNorm) for m in pl_module.modules())
        if synced and attack.bn_mode == "train":
            raise ValueError("FOSCSchedule with SyncBatchNorm needs attack_bn_mode='eval': ranks stopping their "
                             "attacks at different steps would deadlock in train-mode SyncBatchNorm")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        result = getattr(attack_owner(pl_module, self), "last_attack_result", None)
        if self.log_histogram and trainer.is_global_zero and result is not None and result.fosc is not None:
            self._epoch_fosc.append(result.fosc.detach())

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        values, self._epoch_fosc = self._epoch_fosc, []
        if not values:
            return
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_histogram("train/fosc", torch.cat(values).float().cpu(), trainer.global_step)
