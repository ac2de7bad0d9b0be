"""Exponential moving average (EMA) of the weights, "model weight averaging" in robust training.

Gowal et al. 2020, "Uncovering the Limits of Adversarial Training against Norm-Bounded
Adversarial Examples" (arXiv:2010.03593), and Rebuffi et al. 2021, "Data Augmentation Can
Improve Robustness" (NeurIPS 2021; with CutMix, robustness only improves when the weights are
averaged). Official code: github.com/deepmind/deepmind-research/tree/master/adversarial_robustness
(``swa_decay=0.995``, TF-style dynamic decay). Built on Lightning's ``WeightAveraging``
(``torch.optim.swa_utils.AveragedModel`` underneath, with an update that does not synchronise).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Literal, Optional

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

BN_BUFFERS = ("average", "live")


class EMAUpdate:
    """The averaging function: ``avg <- decay_t * avg + (1 - decay_t) * live``, in place.

    ``decay_t = min(decay, (1 + t) / (10 + t))`` with warm-up, else ``decay``; ``t`` is
    ``n_averaged``, the number of updates already made, and the first update (``t = 0``) copies
    (a lerp of weight 1 returns ``live`` exactly). ``t`` and the weight stay tensors on the
    weights' device (no host synchronisation). Integer tensors (BatchNorm's
    ``num_batches_tracked``) are counters, not weights: they are copied from the live model.
    A class rather than a closure so that the callback pickles (``ddp_spawn``).
    """

    def __init__(self, decay: float, warmup: bool) -> None:
        self.decay, self.warmup = decay, warmup

    @torch.no_grad()
    def __call__(self, averaged: list[Tensor], live: list[Tensor], n_averaged: Tensor) -> None:
        if not (averaged[0].is_floating_point() or averaged[0].is_complex()):
            torch._foreach_copy_(averaged, live)
            return
        weight = 1 - ((1 + n_averaged) / (10 + n_averaged)).clamp(max=self.decay) if self.warmup else 1 - self.decay
        weight = torch.where(n_averaged == 0, 1.0, weight).to(averaged[0].dtype)
        # One 0-d weight tensor per tensor: a bare tensor would be read on the host (.item()).
        torch._foreach_lerp_(averaged, live, [weight] * len(averaged))


class QueuedAveragedModel(AveragedModel):
    """``AveragedModel`` whose update never reads ``n_averaged`` on the host.

    torch's ``update_parameters`` asks ``n_averaged == 0`` and ``n_averaged > 0`` in Python, two
    GPU synchronisations per update that drain the queue every training step. Here every update,
    the first one (a copy) included, is one call of the averaging function (``EMAUpdate``), which
    decides on the device; the result is the same.
    """

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        if self.use_buffers:
            pairs = zip([*self.module.parameters(), *self.module.buffers()], [*model.parameters(), *model.buffers()],
                        strict=True)
        else:
            pairs = zip(self.module.parameters(), model.parameters(), strict=True)
        groups: dict[tuple, tuple[list[Tensor], list[Tensor]]] = defaultdict(lambda: ([], []))
        for average, live in pairs:
            averaged_list, live_list = groups[average.device, average.dtype]
            averaged_list.append(average.detach())
            live_list.append(live.detach().to(average.device))
        for averaged_list, live_list in groups.values():
            self.multi_avg_fn(averaged_list, live_list, self.n_averaged.to(averaged_list[0].device))
        if not self.use_buffers:  # buffers follow the live model
            for average, live in zip(self.module.buffers(), model.buffers(), strict=True):
                average.detach().copy_(live.detach().to(average.device))
        self.n_averaged += 1


class EMA(WeightAveraging):
    """EMA of the weights, updated after optimizer steps; validation, checkpoints and the final model use it.

    As in ``WeightAveraging``: validation during fit swaps the averaged weights in and back out;
    when fit ends the LightningModule keeps the averaged weights (``trainer.test`` after fit
    tests them); a checkpoint holds the averaged weights in ``state_dict`` and the live ones in
    ``current_model_state``, and resuming with ``ckpt_path`` restores both and ``n_averaged``
    exactly. The callback's own ``state_dict`` (the step of the last update) is all the schedule
    needs beyond that; it never updates per epoch.

    Evaluating a checkpoint always gives its averaged weights: ``trainer.test`` / ``validate`` /
    ``predict`` with ``ckpt_path`` (also ``"best"`` in the Trainer that fitted, where
    ``WeightAveraging`` would put the live weights back because its average is still alive),
    a fresh Trainer, ``load_from_checkpoint``, ``lit-robust evaluate --ckpt`` and the export
    all read ``state_dict``. Outside fit the callback neither swaps weights for validation nor
    rewrites checkpoints: the module's weights are the ones evaluated and saved.

    Until the first update the average does not exist yet: validation, checkpoints and the end
    of fit then use the live weights (guard against Lightning bug #21724, where they got the
    never-updated initial copy, which corrupts early stopping with a delayed start).

    Args:
        decay: the EMA decay in [0, 1); DeepMind's ``swa_decay`` 0.995 by default (Rebuffi et
            al.'s long CutMix runs may have used more, e.g. 0.999).
        warmup: TF-style dynamic decay ``decay_t = min(decay, (1 + t) / (10 + t))``, with ``t``
            the number of EMA updates already made. The first update (``t = 0``) copies the
            live weights, as ``AveragedModel`` always does; the second uses ``2/11``, and so on.
            DeepMind's ``ema_update`` takes ``t`` from the optimizer-step counter minus its
            ``warmup_steps`` instead, so its first update blends 0.9 live + 0.1 previous
            average (the initial weights when ``warmup_steps=0``) where this one copies; with
            ``start_step=0, every_n_steps=1`` both use the same ``decay_t`` afterwards. Its
            average tracks the live weights before ``warmup_steps``; here validation and
            checkpoints see the live weights before ``start_step`` (the guard above): the same.
            Without warm-up, ``decay`` from the second update on.
        start_step: the first ``start_step`` optimizer steps are not averaged; the first update
            (a copy) follows step ``start_step + 1`` (DeepMind: 0; its PyTorch port: 2.5% of
            training).
        every_n_steps: then update once at least this many optimizer steps have passed since
            the last update. ``t`` counts updates, so the warm-up lasts longer in steps.
        bn_buffers: ``"average"`` (default): BatchNorm running statistics are averaged like
            the weights (``use_buffers=True``), so they belong to the averaged weights; the live
            statistics describe weights far ahead of the average at decay 0.995 and above.
            ``"live"``: buffers are copied from the live model at each update
            (``use_buffers=False``, ``AveragedModel`` keeps them in sync), DeepMind's choice
            (its PyTorch port's ``update_bn`` copies the live statistics too).

    Manual optimization (``FreeAT``, ``FGSMSDI``): the callback runs once per batch, so it
    updates at most once per batch whatever the number of optimizer steps in it (``FreeAT``
    takes ``m`` per batch; ``every_n_steps`` still counts optimizer steps). The whole
    LightningModule is averaged, ``FGSMSDI``'s generator included (harmless, it is not used
    for evaluation).

    Cost: one ``lerp`` over the weights per update, without host synchronisation (the average is a
    :class:`QueuedAveragedModel`: torch's ``AveragedModel`` would read ``n_averaged`` on the host
    twice per update). The average is a deep copy of the LightningModule on the same device
    (memory for one more model).

    DDP: every rank holds the same weights after each step and updates its own average with the
    same deterministic rule, so the averages are identical on all ranks without communication.
    """

    def __init__(
        self,
        decay: float = 0.995,
        warmup: bool = True,
        start_step: int = 0,
        every_n_steps: int = 1,
        bn_buffers: Literal["average", "live"] = "average",
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if int(start_step) != start_step or start_step < 0:
            raise ValueError(f"start_step must be an integer >= 0, got {start_step}")
        if int(every_n_steps) != every_n_steps or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an integer >= 1, got {every_n_steps}")
        if bn_buffers not in BN_BUFFERS:
            raise ValueError(f"bn_buffers must be one of {BN_BUFFERS}, got {bn_buffers!r}")
        super().__init__(use_buffers=bn_buffers == "average", multi_avg_fn=EMAUpdate(decay, warmup))
        self.decay, self.warmup, self.bn_buffers = decay, warmup, bn_buffers
        self.start_step, self.every_n_steps = int(start_step), int(every_n_steps)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if type(self._average_model) is AveragedModel:  # Lightning builds torch's: give it the sync-free update
            self._average_model.__class__ = QueuedAveragedModel

    def should_update(self, step_idx: Optional[int] = None, epoch_idx: Optional[int] = None) -> bool:
        if step_idx is None or step_idx < self.start_step:
            return False
        # _latest_update_step: optimizer steps done at the last update, 0 before the first one
        # (read instead of n_averaged, which would synchronise with the device every step).
        return self._latest_update_step == 0 or step_idx + 1 - self._latest_update_step >= self.every_n_steps

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if _fitting(trainer):
            self._live_until_first_update(pl_module)
            super().on_validation_epoch_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if _fitting(trainer):
            super().on_validation_epoch_end(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._live_until_first_update(pl_module)
        super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if _fitting(trainer):
            self._live_until_first_update(pl_module)
            super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Resuming fit restores the live weights and the average; evaluation keeps ``state_dict``, the average."""
        if _fitting(trainer):
            super().on_load_checkpoint(trainer, pl_module, checkpoint)

    def _live_until_first_update(self, pl_module: L.LightningModule) -> None:
        """Lightning #21724: before the first update, make the average the live weights."""
        average = self._average_model
        if average is not None and self._latest_update_step == 0:  # read on the host, unlike n_averaged
            average.update_parameters(pl_module)  # a first update copies the live weights ...
            average.n_averaged.zero_()  # ... but this one does not count


def _fitting(trainer: L.Trainer) -> bool:
    return trainer.state.fn == TrainerFn.FITTING
