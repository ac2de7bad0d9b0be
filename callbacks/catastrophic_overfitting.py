"""Catastrophic-overfitting monitor for single-step adversarial training (FGSM-RS, Free AT, FGSM-SDI, ...).

Single-step methods can collapse within a few iterations: the training attack stops finding
adversarial examples and the robust accuracy against a multi-step attack falls to about 0
("catastrophic overfitting", Wong, Rice & Kolter, "Fast is better than free: Revisiting
adversarial training", ICLR 2020). Their official code guards against it with ``--early-stop``
(github.com/locuslab/fast_adversarial, ``CIFAR10/train_fgsm.py``): PGD on the epoch's first
training batch, and on a large drop, the previous epoch's weights and stop.
:class:`CatastrophicOverfittingMonitor` is that guard as a callback, for any
:class:`~lit_robust.defenses.AdversarialModule` (automatic or manual optimization).
"""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lit_robust.attacks import PGD
from lit_robust.batches import module_batch
from lit_robust.targets import class_labels

METRIC = "train/co_check_acc"


class CatastrophicOverfittingMonitor(Callback):
    """Checks every epoch for catastrophic overfitting; on a collapse restores the last good weights and stops.

    Per epoch: the first training batch is kept (a copy, on its device). After the epoch's last
    training batch, *before* the end-of-epoch validation, PGD (``check_steps`` steps of
    ``eps / 4``, random start, 1 restart, every module in eval mode, outside the step's
    autocast) runs on it against ``pl_module.model``. Its accuracy is logged as
    ``train/co_check_acc`` (``pl_module.log``, epoch-level). If it is more than ``drop`` below
    the accuracy of the last epoch that passed (the previous epoch, unless ``stop=False``
    let training go on past a collapse), a warning says so, ``collapsed_epochs`` records the
    epoch, and:

    * ``restore``: all of ``pl_module``'s weights (its ``state_dict``: the classifier and any
      other trained part, e.g. FGSM-SDI's generator) are put back to those of that last good
      epoch, so validation and checkpoints of this epoch already see them;
    * ``stop``: ``trainer.should_stop`` is set and ``stopped_epoch`` records the epoch.

    The first check always passes. With an iterable dataset of unknown length, or when
    ``max_steps`` ends an epoch early, the check runs in ``on_train_epoch_end`` instead (after
    that epoch's validation, if any). An epoch resumed in its middle has no kept batch and
    skips its check. With ``min_epochs``/``min_steps`` not yet reached, Lightning ignores the
    stop request and training goes on (from the restored weights with ``restore``).

    DDP: each rank attacks its own first batch; the correct and total counts are summed over
    ranks (``trainer.strategy.reduce``) before comparing, so every rank takes the same
    decision. One host synchronisation per epoch, none per step.

    State (``state_dict``, saved in checkpoints under ``checkpoint["callbacks"]``): the last
    passing accuracy and its epoch, a CPU copy of that epoch's weights (with ``restore``;
    it adds the size of the weights to each checkpoint), ``stopped_epoch`` and
    ``collapsed_epochs``, so a resumed run compares against the right epoch. Optimizer state
    (momentum) and non-``state_dict`` state (Free AT's persistent perturbation) are not
    restored.

    Only one monitor per Trainer (``setup`` raises otherwise). :class:`~lit_robust.defenses.FastAT`
    attaches one itself (``co_guard``) through ``configure_callbacks``; by Lightning's rule it
    replaces a monitor of the same class given to the Trainer.

    Args:
        drop: the largest tolerated fall of the check accuracy from one passing epoch to the
            next, in (0, 1] (the official code: 0.2).
        check_steps: PGD iterations of the check, an integer >= 1 (the official code: 5).
        eps: the check's radius; ``None`` (default) reads ``pl_module.eps`` at every check.
            Give it when a schedule changes ``pl_module.eps`` during training, so that epochs
            are compared under one threat model. The norm is ``pl_module.norm`` ("linf" if absent).
        restore: put back the last good epoch's weights on a collapse.
        stop: stop training on a collapse.

    Cost per epoch: ``check_steps`` forward+backward passes and one forward on one batch, plus
    (with ``restore``) a CPU copy of the weights.
    """

    def __init__(
        self, drop: float = 0.2, check_steps: int = 5, eps: Optional[float] = None, restore: bool = True,
        stop: bool = True,
    ) -> None:
        if not 0 < drop <= 1:
            raise ValueError(f"drop must be in (0, 1], got {drop}")
        if int(check_steps) != check_steps or check_steps < 1:
            raise ValueError(f"check_steps must be an integer >= 1, got {check_steps}")
        if eps is not None and not eps > 0:
            raise ValueError(f"eps must be > 0 or None (pl_module.eps), got {eps}")
        self.drop, self.check_steps = float(drop), int(check_steps)
        self.eps = None if eps is None else float(eps)
        self.restore, self.stop = bool(restore), bool(stop)
        self.previous_acc: Optional[float] = None  #: check accuracy of the last epoch that passed
        self.previous_epoch: Optional[int] = None  #: that epoch
        self.stopped_epoch: Optional[int] = None  #: the epoch whose collapse stopped training (``stop``)
        self.collapsed_epochs: list[int] = []  #: every epoch whose check found a collapse
        self._batch: Optional[tuple[Tensor, Tensor]] = None  # this epoch's first training batch
        self._kept: Optional[dict[str, Tensor]] = None  # CPU copy of previous_epoch's weights

    # --- the check ---------------------------------------------------------------------------

    def attack(self, pl_module: L.LightningModule) -> PGD:
        """The check's PGD: ``check_steps`` steps of eps/4, random start, 1 restart, eval mode."""
        eps = float(pl_module.eps) if self.eps is None else self.eps
        norm = getattr(pl_module, "norm", "linf")
        return PGD(eps, self.check_steps, eps / 4, norm, random_start=True, restarts=1, bn_mode="eval")

    def check_accuracy(self, trainer: L.Trainer, pl_module: L.LightningModule, x: Tensor, y: Tensor) -> float:
        """PGD accuracy of ``pl_module.model`` on ``(x, y)``, pooled over DDP ranks (the same value on every rank)."""
        correct = self.attack(pl_module).run(pl_module.model, x, y).predictions == class_labels(y)
        counts = torch.stack([correct.sum(), torch.tensor(correct.numel(), device=correct.device)]).float()
        counts = trainer.strategy.reduce(counts, reduce_op="sum")
        return float(counts[0] / counts[1])  # the one host sync of the epoch

    def check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Runs this epoch's check once (if a first batch was kept); acts on a collapse."""
        if self._batch is None:
            return
        x, y = self._batch
        self._batch = None
        acc = self.check_accuracy(trainer, pl_module, x, y)
        pl_module.log(METRIC, acc, on_step=False, on_epoch=True, batch_size=len(y))
        if self.previous_acc is not None and acc < self.previous_acc - self.drop:
            self._on_collapse(trainer, pl_module, acc)
            return
        self.previous_acc, self.previous_epoch = acc, trainer.current_epoch
        if self.restore:
            self._kept = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()}

    def _on_collapse(self, trainer: L.Trainer, pl_module: L.LightningModule, acc: float) -> None:
        epoch = trainer.current_epoch
        self.collapsed_epochs.append(epoch)
        if self.restore and self._kept is not None:
            pl_module.load_state_dict(self._kept)
            torch.clear_autocast_cache()  # the weights changed in place
            action = f"restored the weights of epoch {self.previous_epoch}"
        elif self.restore:
            action = "found no earlier weights to restore (kept the current ones)"
        else:
            action = "kept the current weights"
        if self.stop:
            self.stopped_epoch = epoch
            trainer.should_stop = True
            action += " and stopped training"
        else:
            action += "; training goes on"
        rank_zero_warn(
            f"{type(pl_module).__name__}: catastrophic overfitting at epoch {epoch}: PGD accuracy on the epoch's "
            f"first training batch fell from {self.previous_acc:.3f} to {acc:.3f} (more than drop={self.drop} below "
            f"epoch {self.previous_epoch}); {action}"
        )

    # --- hooks -------------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not isinstance(getattr(pl_module, "model", None), nn.Module) or (
                self.eps is None and not hasattr(pl_module, "eps")):
            raise ValueError(
                f"{type(self).__name__} needs a LightningModule with a classifier `model` and a radius `eps` "
                f"(a lit_robust.defenses.AdversarialModule), got {type(pl_module).__name__}"
            )
        others = [c for c in trainer.callbacks if isinstance(c, CatastrophicOverfittingMonitor) and c is not self]
        if others:
            raise ValueError(
                f"callbacks: only one CatastrophicOverfittingMonitor per Trainer, got {len(others) + 1} (a defense "
                "may attach one itself, e.g. FastAT(co_guard=True): pass co_guard=False to use your own)"
            )

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if batch_idx == 0:
            x, y = module_batch(pl_module, batch)
            self._batch = (x.detach().clone(), y.detach().clone())

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if batch_idx + 1 == trainer.num_training_batches:
            self.check(trainer, pl_module)  # before the end-of-epoch validation

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check(trainer, pl_module)  # only if the last batch did not already (unknown length, max_steps)

    # --- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"previous_acc": self.previous_acc, "previous_epoch": self.previous_epoch, "kept": self._kept,
                "stopped_epoch": self.stopped_epoch, "collapsed_epochs": list(self.collapsed_epochs)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.previous_acc, self.previous_epoch = state_dict["previous_acc"], state_dict["previous_epoch"]
        kept = state_dict["kept"]
        self._kept = None if kept is None else {k: v.to("cpu") for k, v in kept.items()}
        self.stopped_epoch = state_dict["stopped_epoch"]
        self.collapsed_epochs = list(state_dict["collapsed_epochs"])
