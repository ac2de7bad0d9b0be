"""A learning rate that is a piecewise-linear function of the training progress in epochs, set before every batch.

Wong, Rice & Kolter's ImageNet Fast AT (github.com/locuslab/fast_adversarial ``ImageNet/main_fast.py``)::

    lr_schedule = lambda t: np.interp([t], configs.TRAIN.lr_epochs, configs.TRAIN.lr_values)[0]
    lr = lr_schedule(epoch + (i + 1) / len(train_loader))   # before the update of batch i

with the knots of its three phases (``configs_fast_{2,4}px_phase{1,2,3}.yml``) joined: epochs ``[0, 1, 6, 12, 15]``,
learning rates ``[0, 0.4, 0.04, 0.004, 0.0004]``. Progress is measured in epochs, not optimizer steps, because
the batch size changes between phases (progressive resizing), so the number of steps per epoch does too: an
``LRScheduler`` stepped per optimizer step cannot know it in advance. A callback sees ``trainer.current_epoch``
and the batch index. The value is a pure function of both, so a resumed run continues exactly.
"""

from __future__ import annotations

from typing import Any, Sequence

import lightning.pytorch as L
import numpy as np


class PiecewiseLinearLR(L.Callback):
    """Sets every optimizer group's ``lr`` to ``np.interp(epoch + (batch_idx + 1) / batches, milestones, lrs)``.

    Give the defense a constant scheduler so that nothing else changes the learning rate
    (``lr_scheduler: {class_path: torch.optim.lr_scheduler.ConstantLR, init_args: {factor: 1.0}}``).

    Args:
        milestones: knots in epochs, increasing, from 0.
        lrs: the learning rate at each knot (absolute values; beyond the last knot the last value holds).
    """

    def __init__(self, milestones: Sequence[float], lrs: Sequence[float]) -> None:
        if len(milestones) != len(lrs) or len(milestones) < 2:
            raise ValueError(f"milestones and lrs need the same length >= 2, got {len(milestones)} and {len(lrs)}")
        if milestones[0] < 0 or any(b <= a for a, b in zip(milestones, milestones[1:])):
            raise ValueError(f"milestones must be >= 0 and increasing, got {list(milestones)}")
        if min(lrs) < 0:
            raise ValueError(f"lrs must be >= 0, got {list(lrs)}")
        self.milestones, self.lrs = [float(m) for m in milestones], [float(v) for v in lrs]

    def lr_at(self, progress: float) -> float:
        """The learning rate after ``progress`` epochs."""
        return float(np.interp(progress, self.milestones, self.lrs))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        lr = self.lr_at(trainer.current_epoch + (batch_idx + 1) / trainer.num_training_batches)
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr


__all__ = ["PiecewiseLinearLR"]
