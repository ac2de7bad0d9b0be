"""LightningDataModules yielding [0, 1] images (installed as ``lit_robust.datamodules``)."""

from lit_robust.datamodules.arrays import ImageDataModule
from lit_robust.datamodules.base import SplitDataModule
from lit_robust.datamodules.cifar import CIFAR10DataModule, CIFAR100DataModule
from lit_robust.datamodules.cifar_c import CIFAR10CDataModule, CIFAR100CDataModule
from lit_robust.datamodules.digits import DigitsDataModule
from lit_robust.datamodules.generated import GeneratedDataModule
from lit_robust.datamodules.image_folder import ImageFolderDataModule
from lit_robust.datamodules.imagenet import ImageNetDataModule
from lit_robust.datamodules.imagenet_c import ImageNetCDataModule
from lit_robust.datamodules.ood import OODDataModule
from lit_robust.datamodules.sparse_coding import SparseCodingDataModule
from lit_robust.datamodules.svhn import SVHNDataModule
from lit_robust.datamodules.tiny_imagenet import TinyImageNetDataModule

__all__ = ["CIFAR100CDataModule", "CIFAR100DataModule", "CIFAR10CDataModule", "CIFAR10DataModule", "DigitsDataModule",
           "GeneratedDataModule", "ImageDataModule", "ImageFolderDataModule", "ImageNetCDataModule",
           "ImageNetDataModule", "OODDataModule", "SVHNDataModule", "SparseCodingDataModule", "SplitDataModule",
           "TinyImageNetDataModule"]
