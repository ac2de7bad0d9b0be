"""What every lit_robust DataModule shares: named splits and their loaders."""

from __future__ import annotations

from typing import Optional

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader, Dataset


class SplitDataModule(L.LightningDataModule):
    """Serves ``self.splits["train" | "val" | "test"]`` (built by a subclass's ``setup``).

    Training batches are shuffled; ``eval_batch_size`` (default: ``batch_size``) sets the
    validation and test batches, which can be much larger since they hold no activations
    for a weight update (AutoAttack in particular runs far faster on large batches).
    """

    def __init__(self, batch_size: int, eval_batch_size: Optional[int], num_workers: int) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1 or None (same as batch_size), got {eval_batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.splits: dict[str, Dataset] = {}

    def _loader(self, split: str, train: bool) -> DataLoader:
        return DataLoader(
            self.splits[split],
            batch_size=self.batch_size if train else self.eval_batch_size or self.batch_size,
            shuffle=train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)


class TestOnly:
    """Mixin (before ``SplitDataModule`` in the bases) for a corruption benchmark: no training or validation
    loaders, and an error saying what to train on instead. The class names its ``base_folder``, the split the
    corrupted images come from (``corrupted_split``) and the DataModule to train and select on (``clean_hint``)."""

    base_folder: str
    corrupted_split: str = "test"
    clean_hint: str = "the clean dataset"

    def train_dataloader(self) -> DataLoader:
        raise RuntimeError(self._test_only("train_dataloader"))

    def val_dataloader(self) -> DataLoader:
        raise RuntimeError(self._test_only("val_dataloader"))

    def _test_only(self, method: str) -> str:
        return (f"{type(self).__name__} has no {method}: {self.base_folder} is a test set only (corrupted "
                f"{self.corrupted_split} images); train and select on {self.clean_hint}, then "
                "trainer.test(module, datamodule=this)")
