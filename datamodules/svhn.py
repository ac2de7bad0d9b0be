"""SVHN (Street View House Numbers) through torchvision's reader, with a held-out validation split."""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch
from torch import Tensor
from torchvision import datasets

from lit_robust.datamodules.arrays import ImageDataModule
from lit_robust.datamodules.files import check_file
from lit_robust.datamodules.files import download as download_file


class SVHNDataModule(ImageDataModule):
    """SVHN as [0, 1] tensors ``[B, 3, 32, 32]`` and digit labels 0-9; normalisation belongs to the model.

    The cropped-digits format of Netzer et al., "Reading Digits in Natural Images with
    Unsupervised Feature Learning" (NIPS 2011 workshop): 73,257 training, 26,032 test and
    531,131 "extra" (somewhat easier) 32x32 colour images of house-number digits. The
    original files label the digit 0 as ``10``; torchvision's reader (used here) maps it to
    ``0``, so labels are 0-9.

    * Files: ``train_32x32.mat``, ``test_32x32.mat`` (and ``extra_32x32.mat`` with
      ``use_extra``) directly in ``data_dir``, as torchvision keeps them; each is checked
      against ``torchvision.datasets.SVHN.split_list``'s MD5, and a missing or corrupt one
      is named with the checksum it should have. ``download=True`` fetches only the files
      needed, through torchvision's ``download_url``.
    * ``use_extra``: the extra images are appended to the training images *before* the
      validation split is carved, so the pool is 604,388 images, the ``val_size`` held-out
      images may come from either part, and the split differs from the one without extra
      data even under the same ``seed``. Test images are never added. Loading the extra
      file needs about 4 GB of host memory at its peak; with ``on_device`` the training
      pool takes 1.9 GB of accelerator memory.
    * Validation: ``val_size`` pool images held out by ``np.random.RandomState(seed)
      .permutation(n)[:val_size]`` (see ``ImageDataModule``); select checkpoints on it, never
      on test.
    * Augmentation (training only, ``augment=True``): 4-pixel reflect padding and a random
      32x32 crop. No horizontal flip: a mirrored digit is a different glyph (2, 5, 7...), so
      ``flip = False``.

    Training recipes. Our research notes contain no SVHN recipe; the following is recalled
    from the papers, not verified against them here: Rice et al. 2020 ("Overfitting in
    adversarially robust deep learning", locuslab/robust_overfitting) train PreActResNet-18
    on SVHN at Linf eps 8/255 with a smaller PGD step (1/255 rather than CIFAR's 2/255), a
    smaller maximum learning rate than CIFAR's (0.01 rather than 0.1) and eps ramped up over
    the first epochs, since training at the full eps from the start can fail to converge on
    SVHN; their SVHN script may use no augmentation at all (``augment=False`` matches that).

    Args:
        use_extra: add the 531,131 extra images to the training pool (see above).
        others: as in :class:`~lit_robust.datamodules.arrays.ImageDataModule`.
    """

    num_classes = 10
    dims = (3, 32, 32)
    pad = 4
    flip = False

    def __init__(self, data_dir: str = "data", download: bool = True, batch_size: int = 128,
                 eval_batch_size: Optional[int] = None, num_workers: int = 4, val_size: int = 1000, seed: int = 0,
                 augment: bool = True, on_device: bool = False, use_extra: bool = False, cutmix: bool = False,
                 with_index: bool = False) -> None:
        super().__init__(data_dir, download, batch_size, eval_batch_size, num_workers, val_size, seed, augment,
                         on_device, cutmix, with_index)
        self.use_extra = use_extra
        self.save_hyperparameters()

    def _files(self) -> list[str]:
        return ["train", "test", "extra"] if self.use_extra else ["train", "test"]

    def download(self) -> None:
        for split in self._files():
            url, filename, md5 = datasets.SVHN.split_list[split]
            download_file(url, self.data_dir, filename, md5)

    def verify(self) -> None:
        for split in self._files():
            url, filename, md5 = datasets.SVHN.split_list[split]
            hint = f"pass download=True or put {filename} from {url} in {self.data_dir}"
            check_file(os.path.join(self.data_dir, filename), md5, hint)

    def load(self, split: str) -> tuple[Tensor, Tensor]:
        parts = [self._read(split)]
        if split == "train" and self.use_extra:
            parts.append(self._read("extra"))
        # torch.cat writes the transposed .mat views straight into one contiguous tensor
        return torch.cat([images for images, _ in parts]), torch.cat([labels for _, labels in parts])

    def _read(self, split: str) -> tuple[Tensor, Tensor]:
        data = datasets.SVHN(self.data_dir, split=split)
        # data.data: a [N, 3, 32, 32] uint8 view of the .mat's [32, 32, 3, N] array
        return torch.from_numpy(data.data), torch.from_numpy(np.asarray(data.labels, dtype=np.int64).reshape(-1))
