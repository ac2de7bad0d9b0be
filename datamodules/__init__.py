"""LightningDataModules yielding [0, 1] images (installed as ``lit_robust.datamodules``)."""

from lit_robust.datamodules.base import SplitDataModule
from lit_robust.datamodules.cifar import CIFAR10DataModule
from lit_robust.datamodules.digits import DigitsDataModule

__all__ = ["CIFAR10DataModule", "DigitsDataModule", "SplitDataModule"]
