"""Progressive resizing: the training resolution (and batch size) of a class-folder DataModule, by epoch.

Wong, Rice & Kolter, "Fast is better than free: Revisiting adversarial training", ICLR 2020
(https://arxiv.org/abs/2001.03994), train ImageNet in three phases of growing resolution
(official code: github.com/locuslab/fast_adversarial, ``ImageNet/configs/configs_fast_{2,4}px_phase{1,2,3}.yml``
run one after the other by ``ImageNet/run_fast_{2,4}px.sh``; ResNet-50, fp16, FGSM with random start):

=====  ======  ====  ==========  =======================================  ==========================
phase  epochs  crop  batch size  data (``run_fast_*.sh``)                 LR (``lr_epochs``/``lr_values``)
=====  ======  ====  ==========  =======================================  ==========================
1      0-5     128   512         ImageNet pre-resized to 160 px (shorter  0 -> 0.4 (epoch 1) -> 0.04 (6)
                                 side, ``resize.py``)
2      6-11    224   224         pre-resized to 352 px                    0.04 -> 0.004 (12)
3      12-14   288   128         the original images                      0.004 -> 0.0004 (15)
=====  ======  ====  ==========  =======================================  ==========================

"crop" is ``crop_size``, the side of ``RandomResizedCrop`` + flip (validation: ``CenterCrop``
of the same size, no resize); the batch is split over the 4 GPUs by ``nn.DataParallel`` (so
per GPU 128 / 56 / 32); 16, 16 and 4 loader workers; eps 2/255 (FGSM step 2.5/255) or 4/255
(step 5/255). The README reports 60.90 % clean / 43.46 % PGD accuracy at eps 2/255 in 12
hours (the paper: one machine with four RTX 2080 Ti). :meth:`ResolutionSchedule.fast_at` is
that resolution and batch schedule; the pre-resized copies only save decoding time (the
RandomResizedCrop then works on smaller images) and are not reproduced.
"""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as L


class ResolutionSchedule(L.Callback):
    """Sets the DataModule's training resolution, and optionally its batch size, for each epoch.

    ``resolutions`` maps the first epoch of each phase to its resolution (``{0: 128, 6: 224,
    12: 288}``); the phase holds until the next key. ``batch_sizes`` likewise (``None``: the
    DataModule's own throughout). Epochs before the first key keep the DataModule's settings.

    How it works: the schedule is a pure function of the epoch. The DataModule
    (:class:`~lit_robust.datamodules.ImageFolderDataModule` or a subclass) applies it whenever
    it builds a training loader, for ``trainer.current_epoch``; the Trainer must rebuild the
    loader every epoch, so ``Trainer(reload_dataloaders_every_n_epochs=1)`` is required (an
    error says so otherwise). A resumed run gets the resolution of the epoch it resumes at,
    and every DDP rank the same. Batch sizes are per process (under DDP, divide a recipe's
    global batch by the number of GPUs). Validation and test keep the DataModule's
    ``eval_resolution``. The training resolution is logged as ``train/resolution``.
    """

    def __init__(self, resolutions: dict[int, int], batch_sizes: Optional[dict[int, int]] = None) -> None:
        self.resolutions = _check_schedule("resolutions", resolutions)
        self.batch_sizes = _check_schedule("batch_sizes", batch_sizes) if batch_sizes is not None else {}

    @classmethod
    def fast_at(cls) -> "ResolutionSchedule":
        """Fast AT's ImageNet phases (module docstring): 128 / 224 / 288 px, batch 512 / 224 / 128, epochs 0/6/12."""
        return cls({0: 128, 6: 224, 12: 288}, {0: 512, 6: 224, 12: 128})

    def at(self, epoch: int) -> tuple[Optional[int], Optional[int]]:
        """``(resolution, batch size)`` for ``epoch``; ``None`` where the schedule sets nothing yet."""
        return _value_at(self.resolutions, epoch), _value_at(self.batch_sizes, epoch)

    def apply(self, datamodule: Any, epoch: int) -> None:
        """Sets ``datamodule``'s resolution and batch size for ``epoch`` (called by the DataModule)."""
        resolution, batch_size = self.at(epoch)
        if resolution is not None:
            datamodule.set_resolution(resolution)
        if batch_size is not None:
            datamodule.batch_size = batch_size

    # --- Lightning --------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        datamodule = trainer.datamodule
        if datamodule is None or not (hasattr(datamodule, "set_resolution") and hasattr(datamodule,
                                                                                       "resolution_schedule")):
            raise TypeError(f"ResolutionSchedule drives an ImageFolderDataModule (or ImageNetDataModule) passed as "
                            f"trainer.fit(..., datamodule=...); got {type(datamodule).__name__}")
        if trainer.reload_dataloaders_every_n_epochs != 1:
            raise ValueError(f"ResolutionSchedule needs Trainer(reload_dataloaders_every_n_epochs=1), so that each "
                             f"epoch's training loader is built with that epoch's resolution and batch size; got "
                             f"reload_dataloaders_every_n_epochs={trainer.reload_dataloaders_every_n_epochs}")
        datamodule.resolution_schedule = self

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        datamodule = trainer.datamodule
        if stage == "fit" and getattr(datamodule, "resolution_schedule", None) is self:
            datamodule.resolution_schedule = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        resolution = trainer.datamodule.resolution
        expected = self.at(trainer.current_epoch)[0]
        if expected is not None and resolution != expected:  # a loader not rebuilt this epoch
            raise RuntimeError(f"epoch {trainer.current_epoch} trains at {resolution} px, but the schedule says "
                               f"{expected}: the training loader was not rebuilt for this epoch")
        pl_module.log("train/resolution", float(resolution), on_step=False, on_epoch=True)


def _check_schedule(name: str, schedule: dict[int, int]) -> dict[int, int]:
    """The schedule with int keys (YAML may give strings), sorted; ``ValueError`` naming ``name`` otherwise."""
    try:
        out = {int(epoch): value for epoch, value in schedule.items()}
    except (AttributeError, TypeError, ValueError):
        raise ValueError(f"{name} must map first epochs (integers >= 0) to integers >= 1, got {schedule!r}") from None
    bad = [(e, v) for e, v in out.items() if e < 0 or isinstance(v, bool) or not isinstance(v, int) or v < 1]
    if bad or not out:
        raise ValueError(f"{name} must map first epochs (integers >= 0) to integers >= 1, got {schedule!r}")
    return dict(sorted(out.items()))


def _value_at(schedule: dict[int, int], epoch: int) -> Optional[int]:
    value = None
    for first, v in schedule.items():
        if first <= epoch:
            value = v
    return value
