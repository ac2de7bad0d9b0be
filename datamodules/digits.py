"""scikit-learn's bundled 8x8 handwritten digits: real images that need no download."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_robust.datamodules.arrays import ImageDataModule


class DigitsDataModule(ImageDataModule):
    """1,797 grey-scale 8x8 digits (UCI optdigits test set, shipped with scikit-learn), 10 classes.

    Yields ``[B, 1, 8, 8]`` float tensors in [0, 1] (raw values 0..16 divided by 16) and int64
    labels. The images have no official split: a permutation seeded by ``seed``
    (``torch.randperm``), the same on every rank and run, gives its first ``test_size`` images
    to the test split, the next ``val_size`` to validation (held out from training for model
    selection; never select on the test split) and the rest, 1,258 by default, to training.
    The defaults, 359 and 180, are the 20% and 10% of earlier versions, with the same images.

    Args:
        batch_size, eval_batch_size, num_workers: as in ``SplitDataModule``.
        val_size, test_size: see above; together fewer than 1,797.
        seed: of the split and of the on-device shuffling.
        augment: training augmentation, off by default: a random 8x8 crop of the 1-pixel
            reflect-padded image, no flip (a mirrored digit is another glyph, or none).
        on_device, cutmix, with_index: as in :class:`~lit_robust.datamodules.arrays.ImageDataModule`.
        size: side of the served images. 8 serves the originals; a larger size resizes them bilinearly
            (``F.interpolate``, ``align_corners=False``) and stores them in steps of 1/255: the same 1,797
            digits with a higher-dimensional threat model, where single-step training overfits
            catastrophically (16: plain FGSM at Linf 0.15 collapses, ``tests/test_single_step_collapse.py``), as it
            does not at 8x8.
    """

    num_classes = 10
    dims = (1, 8, 8)
    pad, flip, max_value = 1, False, 16
    num_images = 1797

    def __init__(self, batch_size: int = 64, eval_batch_size: Optional[int] = None, val_size: int = 180,
                 test_size: int = 359, seed: int = 0, num_workers: int = 0, augment: bool = False,
                 on_device: bool = False, cutmix: bool = False, with_index: bool = False, size: int = 8) -> None:
        super().__init__("", False, batch_size, eval_batch_size, num_workers, val_size, seed, augment, on_device,
                         cutmix, with_index)
        if test_size < 1 or val_size + test_size >= self.num_images:
            raise ValueError(f"test_size must be >= 1 and val_size + test_size < {self.num_images}, got test_size "
                             f"{test_size} and val_size {val_size}")
        if int(size) != size or size < 8:
            raise ValueError(f"size must be an integer >= 8 (the originals are 8x8), got {size}")
        self.test_size, self.size = test_size, int(size)
        if self.size != 8:
            self.dims, self.max_value = (1, self.size, self.size), 255
        self.remove_ignored_hparams(["data_dir", "download"])  # the base's, meaningless here
        self.save_hyperparameters()

    def verify(self) -> None:
        """Nothing to check: the images come with scikit-learn."""

    def split_arrays(self) -> dict[str, tuple[Tensor, Tensor]]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.from_numpy(digits.images.astype("uint8")).unsqueeze(1)  # values 0..16
        labels = torch.from_numpy(digits.target).long()
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
        test, val = self.test_size, self.val_size
        parts = {"train": order[test + val:], "val": order[test:test + val], "test": order[:test]}
        if self.size != 8:
            grown = F.interpolate(images.float() / 16, size=self.size, mode="bilinear", align_corners=False)
            images = (grown * 255).round().clamp(0, 255).to(torch.uint8)
        return {name: (images[index], labels[index]) for name, index in parts.items()}
