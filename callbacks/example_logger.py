"""Adversarial examples in TensorBoard: what the evaluation attack does to a fixed set of images.

Looking at the perturbations is the quickest check that the threat model is the intended one
(eps in [0, 1] pixel units, DESIGN principle 3), that the attack moves the images at all (a
grey perturbation row hints at masked gradients), and how adversarial training changes them:
against robust models they become perceptually aligned with the target class (Tsipras et
al., "Robustness May Be at Odds with Accuracy", ICLR 2019). The attack is the PGD of Madry
et al. (ICLR 2018) behind ``val/robust_acc`` unless another is given.
"""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.utils import make_grid

from lit_robust.attacks.pgd import PGD, module_mode
from lit_robust.batches import module_batch

TAG = "adversarial_examples"
MIN_SIDE = 64  # pixels: TensorBoard shows images at their own size, and an 8x8 digit is a speck
PAD = 2  # pixels between grid cells (make_grid's default)


def amplified_perturbation(delta: Tensor, eps: float, norm: str) -> Tensor:
    """Perturbations ``x_adv - x`` as images in [0, 1], mid-grey where a pixel is unchanged.

    Linf: ``0.5 + delta / (2 * eps)``, so black and white are exactly -eps and +eps. L2 bounds
    no single pixel, so each perturbation is scaled by its own largest ``|delta|`` instead
    (its extreme pixel is black or white); L2 pictures show where, not how much.
    """
    if norm == "linf":
        return (0.5 + delta / (2 * eps)).clamp(0, 1)
    peak = delta.flatten(1).abs().amax(1).clamp_min(1e-12).view(-1, *[1] * (delta.dim() - 1))
    return (0.5 + delta / (2 * peak)).clamp(0, 1)


def upsampled(images: Tensor, min_side: int = MIN_SIDE) -> Tensor:
    """Nearest-neighbour enlargement by the smallest integer factor giving a short side >= ``min_side``
    (8x8: 8 times, 32x32: twice, 64x64: unchanged), so every pixel stays a sharp square."""
    factor = -(-min_side // min(images.shape[-2:]))
    return images.repeat_interleave(factor, -2).repeat_interleave(factor, -1)


def captioned_grid(rows: Tensor, labels: Tensor, clean: Tensor, adversarial: Tensor) -> np.ndarray:
    """The ``[3 * n, C, H, W]`` rows as a uint8 ``[height, width, 3]`` picture, one column per image, each
    captioned below with its true label ``y``, and the ``clean`` and ``adv`` predictions (green when
    right, red when wrong), in PIL's default font."""
    grid = make_grid(rows.float().cpu(), nrow=len(labels), padding=PAD)
    pixels = grid.mul(255).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()  # truncates, as TensorBoard does
    font = ImageFont.load_default()
    line = font.getbbox("Ag=0")[3] + 2
    picture = Image.new("RGB", (pixels.shape[1], pixels.shape[0] + 3 * line + PAD))
    picture.paste(Image.fromarray(pixels), (0, 0))
    draw = ImageDraw.Draw(picture)
    for i, (y, c, a) in enumerate(zip(labels.tolist(), clean.tolist(), adversarial.tolist())):
        left = PAD + i * (rows.shape[-1] + PAD)
        for j, (text, right) in enumerate([(f"y={y}", None), (f"clean={c}", c == y), (f"adv={a}", a == y)]):
            colour = "white" if right is None else "lime" if right else "red"
            draw.text((left, pixels.shape[0] + j * line), text, fill=colour, font=font)
    return np.asarray(picture)


class AdversarialExampleLogger(Callback):
    """Logs clean images, their adversarial versions and the perturbations to TensorBoard.

    Every ``every_n_epochs`` epochs of ``fit`` (epochs ``n - 1``, ``2n - 1``, ... as Lightning's
    ``ModelCheckpoint`` counts), at the end of validation, the first ``num_images`` images of
    the first validation batch, kept from the first validation so they are the same images
    each time, are attacked with ``attack`` or else the module's ``val_attack``. With
    ``log_test``, the end of ``trainer.test`` does the same with the first test images and the
    module's ``test_attack``, under ``test/adversarial_examples``.

    Each time one image goes to tag ``adversarial_examples`` at the global step: a grid with
    one column per image and three rows, clean, adversarial, and the perturbation made
    visible by :func:`amplified_perturbation`, enlarged to at least 64 pixels a side by
    :func:`upsampled`, each column captioned below with the true label and the clean and
    adversarial predictions (:func:`captioned_grid`). Beside it, ``adversarial_examples/labels``
    holds the same as a table.

    Args:
        every_n_epochs: log every n-th training epoch (>= 1).
        num_images: how many images (>= 1; fewer if the first batch is smaller).
        attack: an :class:`~lit_robust.attacks.PGD` (``eps`` and ``norm`` scale the
            perturbation row); default the module's evaluation attacks.
        log_test: also log at the end of ``trainer.test``.

    The module's ``forward`` must map [0, 1] images to logits (``AdversarialModule``'s does).
    The attack sets its own module mode and the clean predictions use eval mode, each
    restoring every submodule's flag; the attack's random start draws from a forked generator,
    so logging does not change the run. Only global rank 0 captures, attacks and logs, and only
    into a ``TensorBoardLogger`` (it warns once when the trainer has none). To picture weights
    that a ``WeightAveraging`` callback swaps in for validation, list this callback before it.
    Cost: one attack on ``num_images`` images per picture.
    """

    def __init__(
        self, every_n_epochs: int = 5, num_images: int = 8, attack: Optional[PGD] = None, log_test: bool = True
    ) -> None:
        if int(every_n_epochs) != every_n_epochs or every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be an integer >= 1, got {every_n_epochs}")
        if int(num_images) != num_images or num_images < 1:
            raise ValueError(f"num_images must be an integer >= 1, got {num_images}")
        self.every_n_epochs, self.num_images = int(every_n_epochs), int(num_images)
        self.attack, self.log_test = attack, log_test
        self._images: dict[str, tuple[Tensor, Tensor]] = {}  # stage -> the fixed (x, y)
        self._warned = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.attack is None and not isinstance(getattr(pl_module, "val_attack", None), PGD):
            raise ValueError(f"attack must be given: {type(pl_module).__name__} has no PGD val_attack to picture")

    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if batch_idx == dataloader_idx == 0:
            self._keep(trainer, "val", module_batch(pl_module, batch))

    def on_test_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self.log_test and batch_idx == dataloader_idx == 0:
            self._keep(trainer, "test", module_batch(pl_module, batch))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
        if fitting and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._log(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.log_test:
            self._log(trainer, pl_module, "test")

    def _keep(self, trainer: L.Trainer, stage: str, batch: Any) -> None:
        if stage not in self._images and trainer.is_global_zero:
            x, y = batch
            with torch.inference_mode(False):  # validate/test batches are inference tensors; attacks need normal ones
                self._images[stage] = x[: self.num_images].clone(), y[: self.num_images].clone()

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        writer = self._writer(trainer)
        if writer is None or stage not in self._images:  # only rank 0 holds images
            return
        attack = self.attack or getattr(pl_module, f"{stage}_attack")
        x, y = (t.to(pl_module.device) for t in self._images[stage])
        devices = [] if x.device.type == "cpu" else [x.device]
        with torch.inference_mode(False), torch.random.fork_rng(devices):
            result = attack.run(pl_module, x, y)
            with torch.no_grad(), module_mode(pl_module, "eval"):
                clean = pl_module(x).argmax(1)
        rows = torch.cat([x, result.x_adv, amplified_perturbation(result.x_adv - x, attack.eps, attack.norm)])
        tag = TAG if stage == "val" else f"test/{TAG}"
        picture = captioned_grid(upsampled(rows), y, clean, result.predictions)
        writer.add_image(tag, picture, trainer.global_step, dataformats="HWC")
        writer.add_text(f"{tag}/labels", _label_table(y, clean, result.predictions), trainer.global_step)

    def _writer(self, trainer: L.Trainer) -> Any:
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                return logger.experiment
        if not self._warned:
            rank_zero_warn("AdversarialExampleLogger logs only to a TensorBoardLogger and the trainer has none; "
                           "it logs nothing")
            self._warned = True
        return None


def _label_table(y: Tensor, clean: Tensor, adversarial: Tensor) -> str:
    """A markdown table, one row per grid column: true label, clean and adversarial prediction."""
    lines = ["| column | true | clean prediction | adversarial prediction |", "|---|---|---|---|"]
    lines += [f"| {i} | {t} | {c} | {a} |" for i, (t, c, a) in enumerate(zip(y.tolist(), clean.tolist(),
                                                                             adversarial.tolist()))]
    return "\n".join(lines)
