"""scikit-learn's bundled 8x8 handwritten digits: real images that need no download."""

from __future__ import annotations

from typing import Optional

import torch
from torch.utils.data import TensorDataset

from lit_robust.datamodules.base import SplitDataModule


class DigitsDataModule(SplitDataModule):
    """1,797 grey-scale 8x8 digits (UCI optdigits test set, shipped with scikit-learn), 10 classes.

    Yields ``[B, 1, 8, 8]`` float tensors in [0, 1] (raw values 0..16 divided by 16) and
    int64 labels. The train / val / test split is a seeded permutation, identical on every
    rank and every run with the same ``seed``; the validation split is held out from
    training for model selection (never select on the test split).
    """

    num_classes = 10
    dims = (1, 8, 8)

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: Optional[int] = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers)
        if not 0 < val_fraction < 1 or not 0 < test_fraction < 1 or val_fraction + test_fraction >= 1:
            raise ValueError(
                f"val_fraction and test_fraction must be in (0, 1) with a sum < 1, got {val_fraction}, {test_fraction}"
            )
        self.save_hyperparameters()

    def setup(self, stage: Optional[str] = None) -> None:
        if self.splits:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(digits.target, dtype=torch.long)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.hparams.seed))
        n_test = round(len(y) * self.hparams.test_fraction)
        n_val = round(len(y) * self.hparams.val_fraction)
        parts = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
        self.splits = {name: TensorDataset(x[idx], y[idx]) for name, idx in parts.items()}
