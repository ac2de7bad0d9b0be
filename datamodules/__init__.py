"""LightningDataModules yielding [0, 1] images (installed as ``lit_robust.datamodules``)."""

from lit_robust.datamodules.digits import DigitsDataModule

__all__ = ["DigitsDataModule"]
