"""LightningDataModules yielding [0, 1] images (installed as ``lit_robust.datamodules``)."""

from lit_robust.datamodules.arrays import ImageDataModule
from lit_robust.datamodules.base import SplitDataModule
from lit_robust.datamodules.cifar import CIFAR10DataModule, CIFAR100DataModule
from lit_robust.datamodules.cifar_c import CIFAR10CDataModule, CIFAR100CDataModule
from lit_robust.datamodules.digits import DigitsDataModule
from lit_robust.datamodules.generated import GeneratedDataModule
from lit_robust.datamodules.ood import OODDataModule
from lit_robust.datamodules.sparse_coding import SparseCodingDataModule
from lit_robust.datamodules.svhn import SVHNDataModule
from lit_robust.datamodules.tiny_imagenet import TinyImageNetDataModule

__all__ = ["CIFAR100CDataModule", "CIFAR100DataModule", "CIFAR10CDataModule", "CIFAR10DataModule", "DigitsDataModule",
           "GeneratedDataModule", "ImageDataModule", "OODDataModule", "SVHNDataModule", "SparseCodingDataModule",
           "SplitDataModule", "TinyImageNetDataModule"]
