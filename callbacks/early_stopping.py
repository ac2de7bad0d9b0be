"""Early stopping and best-checkpoint selection on held-out robust accuracy.

Rice, Wong & Kolter, "Overfitting in adversarially robust deep learning", ICML 2020
(official code: github.com/locuslab/robust_overfitting): after the first learning-rate decay,
robust test accuracy of adversarial training peaks and then falls by up to 8 points while
training robustness keeps rising. Their remedy is to keep the epoch with the best PGD accuracy
on a held-out validation split (their code evaluates every epoch and saves ``model_val.pth``;
it never stops). Here the PGD accuracy is ``val/robust_acc``, logged by every defense
(``AdversarialModule``) on the validation split, which DataModules carve from the training set.
Selecting on ``test/`` metrics is refused (DESIGN principle 7).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import lightning.pytorch as L
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint


def check_selection_metric(monitor: str) -> str:
    """Raises for a ``test/`` metric: the test split reports results, it never selects them."""
    if monitor.startswith("test/"):
        raise ValueError(
            f"monitor must be a validation metric such as 'val/robust_acc', got {monitor!r}: "
            "selecting on the test split biases the reported accuracy"
        )
    return monitor


class RobustEarlyStopping(EarlyStopping):
    """Lightning's ``EarlyStopping`` on ``val/robust_acc`` (mode max) that also records the best epoch.

    Args:
        monitor: a validation metric (``test/...`` raises ``ValueError``).
        patience: validation checks without improvement before stopping. The default, 10,
            stops about 10 epochs after the post-decay peak Rice et al. describe. With a step
            schedule robust accuracy can plateau for a long time before the first decay: make
            ``patience`` longer than that plateau, or pass ``None`` to never stop and only track
            the best epoch, as Rice et al.'s code does (stored as ``math.inf``).
        mode: ``"max"`` for accuracies.
        **kwargs: the other ``EarlyStopping`` arguments (``min_delta``, ``verbose``, ...).

    Attributes:
        best_epoch: the epoch (0-based, ``trainer.current_epoch``) of ``best_score``; ``None``
            before the first check. Saved in checkpoints with the parent's state
            (``wait_count``, ``best_score``, ...), so a resumed run stops where a straight one would.

    Pair it with :func:`robust_checkpoint`, which keeps that epoch's weights.
    """

    def __init__(
        self, monitor: str = "val/robust_acc", patience: Optional[int] = 10, mode: str = "max", **kwargs: Any
    ) -> None:
        if patience is not None and (int(patience) != patience or patience < 1):
            raise ValueError(f"patience must be an integer >= 1 or None (never stop), got {patience}")
        super().__init__(check_selection_metric(monitor), patience=math.inf if patience is None else int(patience),
                         mode=mode, **kwargs)
        self.best_epoch: Optional[int] = None

    def _run_early_stopping_check(self, trainer: L.Trainer) -> None:
        previous_best = self.best_score
        super()._run_early_stopping_check(trainer)
        if self.best_score is not previous_best:  # the parent assigns a new tensor only on improvement
            self.best_epoch = trainer.current_epoch

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "best_epoch": self.best_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.best_epoch = state_dict["best_epoch"]


class RobustCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` is always the latest epoch, as in Lightning < 2.6.

    Lightning 2.6 refreshes ``last.ckpt`` only in steps where a top-k file was written; with
    ``save_top_k=1`` that makes it a copy of the best checkpoint, useless for resuming a run
    past its best epoch. Build it with :func:`robust_checkpoint`.
    """

    def _save_topk_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> None:
        super()._save_topk_checkpoint(trainer, monitor_candidates)
        self._last_global_step_saved = trainer.global_step  # what lets the caller write last.ckpt


def robust_checkpoint(
    dirpath: Optional[str] = None,
    filename: Optional[str] = None,
    monitor: str = "val/robust_acc",
    **kwargs: Any,
) -> ModelCheckpoint:
    """A checkpoint callback that keeps the epoch with the best held-out robust accuracy, and the last one.

    The recipe (Rice et al.'s validation-based selection): ``mode="max"``, ``save_top_k=1``
    (only the best epoch's weights), ``save_last=True`` (``last.ckpt``, the latest epoch, to
    resume from; see :class:`RobustCheckpoint`), and ``auto_insert_metric_name=False``,
    because a metric name with ``/`` would otherwise become a sub-folder. The default filename
    reads e.g. ``best-epoch102-robust_acc=0.5311.ckpt``. Use it with
    :class:`RobustEarlyStopping` on the same ``monitor``, then report the selected weights
    with ``trainer.test(ckpt_path="best")``::

        trainer = L.Trainer(callbacks=[RobustEarlyStopping(), robust_checkpoint()])
        trainer.fit(defense, datamodule)
        trainer.test(defense, datamodule, ckpt_path="best")

    ``dirpath`` and the remaining keyword arguments go to ``ModelCheckpoint``; a ``test/``
    monitor raises ``ValueError``.
    """
    check_selection_metric(monitor)
    if filename is None:
        filename = f"best-epoch{{epoch:03d}}-{monitor.split('/')[-1]}={{{monitor}:.4f}}"
    options = dict(mode="max", save_top_k=1, save_last=True, auto_insert_metric_name=False)
    return RobustCheckpoint(dirpath=dirpath, filename=filename, monitor=monitor, **{**options, **kwargs})
