"""A LightningModule and DataModule we did not write, for the embedding tests and the DDP checks: dict batches,
its own loss, optimizer, metrics and logged names; nothing of lit_robust inside."""

from __future__ import annotations

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import MulticlassAccuracy

from lit_robust.datamodules import DigitsDataModule
from lit_robust.models import SmallCNN


class ForeignClassifier(L.LightningModule):
    def __init__(self, width: int = 16, lr: float = 0.05) -> None:
        super().__init__()
        self.net = SmallCNN(width=width)
        self.lr = lr
        self.train_acc, self.val_acc = MulticlassAccuracy(10, average="micro"), MulticlassAccuracy(10, average="micro")
        self.seen = []  # the images each training step received

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.seen.append(batch["image"].detach().clone())
        logits = self(batch["image"])
        loss = F.cross_entropy(logits, batch["label"])
        self.train_acc(logits, batch["label"])
        self.log("my/loss", loss)
        self.log("my/train_acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.val_acc(self(batch["image"]), batch["label"])
        self.log("my/val_acc", self.val_acc, on_step=False, on_epoch=True)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.log("my/test_acc", (self(batch["image"]).argmax(1) == batch["label"]).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)


class _Dicts(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "label": self.y[i], "index": i}


class DictDigits(L.LightningDataModule):
    """The digits splits as ``{"image", "label", "index"}`` batches."""

    def __init__(self, batch_size: int = 64) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.digits = DigitsDataModule()

    def setup(self, stage: str = None) -> None:
        self.digits.setup()

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(_Dicts(*self.digits.splits[split].tensors), batch_size=self.batch_size, shuffle=shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)
