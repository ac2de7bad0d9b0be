"""CIFAR-10 and CIFAR-100 through torchvision's readers, with a held-out validation split for model selection."""

from __future__ import annotations

import os

import torch
from torch import Tensor
from torchvision import datasets

from lit_robust.datamodules.arrays import ImageDataModule
from lit_robust.datamodules.files import check_file, download_unless_complete


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 as [0, 1] tensors ``[B, 3, 32, 32]``; normalisation belongs to the model.

    * Validation: ``val_size`` training images held out by ``np.random.RandomState(seed)
      .permutation(50000)[:val_size]``, which for ``seed=0, val_size=1000`` is exactly the
      split of Rice et al.'s ``generate_validation.py``. Select checkpoints on it, never on test.
    * Augmentation (training only): 4-pixel reflect padding, random 32x32 crop, horizontal
      flip, as in locuslab/robust_overfitting (torchvision's default padding would be zeros).
    * Files: with ``download=True``, unless the pickles are all in place, torchvision's archive
      (its URL and MD5; kept in ``data_dir``, and used instead of downloading when it is there)
      extracted by :func:`~lit_robust.datamodules.files.safe_extract`; every pickle is checked
      against torchvision's MD5, and a missing or corrupt one is named with the checksum it
      should have.

    Other arguments: :class:`~lit_robust.datamodules.arrays.ImageDataModule` (``on_device``
    keeps the dataset on the accelerator).
    """

    dataset_cls = datasets.CIFAR10
    num_classes = 10
    dims = (3, 32, 32)

    def download(self) -> None:
        cls = self.dataset_cls
        download_unless_complete(self.verify, cls.url, self.data_dir, cls.filename, cls.tgz_md5)

    def verify(self) -> None:
        cls = self.dataset_cls
        folder = os.path.join(self.data_dir, cls.base_folder)
        hint = f"pass download=True or put the contents of the original {cls.filename} in {folder}"
        for name, md5 in [*cls.train_list, *cls.test_list, (cls.meta["filename"], cls.meta["md5"])]:
            check_file(os.path.join(folder, name), md5, hint)

    def load(self, split: str) -> tuple[Tensor, Tensor]:
        data = self.dataset_cls(self.data_dir, train=split == "train")
        return torch.from_numpy(data.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(data.targets)


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100 (fine labels, 100 classes), otherwise exactly as :class:`CIFAR10DataModule`."""

    dataset_cls = datasets.CIFAR100
    num_classes = 100
