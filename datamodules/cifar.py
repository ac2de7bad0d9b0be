"""CIFAR-10 through torchvision's reader, with a held-out validation split for model selection."""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
from torch.utils.data import Subset
from torchvision import datasets, transforms
from torchvision.datasets.utils import check_integrity

from lit_robust.datamodules.base import SplitDataModule


class CIFAR10DataModule(SplitDataModule):
    """CIFAR-10 as [0, 1] tensors ``[B, 3, 32, 32]``; normalisation belongs to the model.

    * Validation: ``val_size`` training images held out by ``np.random.RandomState(seed)
      .permutation(50000)[:val_size]``, which for ``seed=0, val_size=1000`` is exactly the
      split of Rice et al.'s ``generate_validation.py``. Select checkpoints on it, never on test.
    * Augmentation (training only): 4-pixel reflect padding, random 32x32 crop, horizontal
      flip, as in locuslab/robust_overfitting (torchvision's default padding would be zeros).
    * Files: torchvision's download (URL and archive MD5) when ``download=True``; otherwise
      every pickle is checked against torchvision's MD5 and a missing or corrupt one is
      named with the checksum it should have.
    """

    dataset_cls = datasets.CIFAR10
    num_classes = 10
    dims = (3, 32, 32)

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
        eval_batch_size: Optional[int] = None,
        val_size: int = 1000,
        seed: int = 0,
        num_workers: int = 4,
        download: bool = False,
        augment: bool = True,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers)
        if not 0 < val_size < 50000:
            raise ValueError(f"val_size must be in (0, 50000), got {val_size}")
        self.save_hyperparameters()

    def prepare_data(self) -> None:
        """Downloads (once per node) when asked, then verifies every file's checksum."""
        if self.hparams.download:
            for train in (True, False):
                self.dataset_cls(self.hparams.data_dir, train=train, download=True)
        cls = self.dataset_cls
        folder = os.path.join(self.hparams.data_dir, cls.base_folder)
        for name, md5 in [*cls.train_list, *cls.test_list, (cls.meta["filename"], cls.meta["md5"])]:
            path = os.path.join(folder, name)
            if not check_integrity(path, md5):
                state = "corrupt" if os.path.exists(path) else "missing"
                raise FileNotFoundError(
                    f"{cls.__name__} file {path} is {state} (expected MD5 {md5}); pass download=True "
                    f"or place the original {cls.filename} contents in {folder}"
                )

    def setup(self, stage: Optional[str] = None) -> None:
        if self.splits:
            return
        root, cls = self.hparams.data_dir, self.dataset_cls
        plain = transforms.ToTensor()
        augmented = transforms.Compose([
            transforms.RandomCrop(32, padding=4, padding_mode="reflect"),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
        ]) if self.hparams.augment else plain
        train_aug, train_plain = cls(root, train=True, transform=augmented), cls(root, train=True, transform=plain)
        order = np.random.RandomState(self.hparams.seed).permutation(len(train_plain))
        val_idx, train_idx = order[:self.hparams.val_size], order[self.hparams.val_size:]
        test = cls(root, train=False, transform=plain)
        self.splits = {
            "train": Subset(train_aug, np.sort(train_idx).tolist()),
            "val": Subset(train_plain, val_idx.tolist()),
            "test": Subset(test, list(range(len(test)))),
        }
