"""Training batches with out-of-distribution images alongside, for OAT (Lee et al., ICLR 2021).

:class:`OODDataModule` wraps any DataModule (the in-distribution data, served unchanged) and appends to each of
its training batches a batch of images from another set (any images: the official code uses 1M low-confidence
80M-TinyImages images for CIFAR-10; that set has been withdrawn, so bring your own). The OAT defenses
(:mod:`lit_robust.defenses.oat`) read them from there and train them towards the uniform distribution.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

import lightning.pytorch as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from lit_robust.datamodules.arrays import random_crop_flip, to_unit_float
from lit_robust.datamodules.generated import PermutationStream, derived_seed
from lit_robust.datamodules.npz import npz_members

_OOD, _AUGMENT = 11, 12  # salts that keep the OOD streams of one seed apart from the other streams

OODSource = Union[str, L.LightningDataModule, Dataset]


class OODImages:
    """An OOD image set seen as ``read(index) -> float [n, C, H, W]`` in [0, 1], whatever it is stored as.

    ``source``: a path to an ``.npy`` or ``.npz`` file (memory-mapped) of uint8 images ``[N, H, W, C]`` (the
    generated-data convention) or ``[N, C, H, W]`` (the official OAT pickle's ``data``), an array or tensor
    of such images (uint8, or float in [0, 1]), a DataModule (its training split, after ``setup``), or a
    ``Dataset`` whose items are images or ``(image, ...)`` tuples of float ``[C, H, W]`` tensors in [0, 1].
    ``dims``: the in-distribution ``(C, H, W)``, which the OOD images must have.
    """

    def __init__(self, source: Any, dims: Optional[tuple[int, int, int]] = None, image_key: str = "image",
                 max_value: int = 255) -> None:
        self.dataset: Optional[Dataset] = None
        self.max_value = max_value
        if isinstance(source, (str, os.PathLike)):
            source = self._open(os.fspath(source), image_key)
        elif isinstance(source, L.LightningDataModule):
            arrays = getattr(source, "arrays", None)
            if arrays and "train" in arrays:  # an ImageDataModule: its uint8 training images
                source, self.max_value = arrays["train"][0], getattr(source, "max_value", 255)
            else:
                source = source.train_dataloader().dataset
        if isinstance(source, Dataset) and not isinstance(source, (Tensor, np.ndarray)):
            self.dataset, self.images = source, None
            if len(source) == 0:
                raise ValueError("the OOD dataset is empty")
            return
        if not hasattr(source, "shape") or len(source.shape) != 4:
            raise ValueError(f"OOD images must be [N, C, H, W] or [N, H, W, C], got {type(source).__name__} of shape "
                             f"{getattr(source, 'shape', None)}")
        if len(source) == 0:
            raise ValueError("the OOD image set is empty")
        self.channels_last = dims is not None and tuple(source.shape[1:]) != tuple(dims) and \
            tuple(source.shape[1:]) == (dims[1], dims[2], dims[0])
        shape = tuple(source.shape[1:])
        if dims is not None and shape != tuple(dims) and not self.channels_last:
            raise ValueError(f"OOD images of shape {shape} do not match the in-distribution images {tuple(dims)} "
                             f"(C, H, W), nor their (H, W, C) layout")
        self.images = source

    @staticmethod
    def _open(path: str, image_key: str) -> Any:
        if path.endswith(".npz"):
            members = npz_members(path)
            if image_key not in members:
                raise ValueError(f"{path} has no array {image_key!r} (it holds {sorted(members)}); name the images "
                                 "with image_key=")
            return members[image_key]
        if not os.path.isfile(path):
            raise FileNotFoundError(f"OOD image file {path} not found (expected an .npy or .npz of uint8 images)")
        return np.load(path, mmap_mode="r")

    def __len__(self) -> int:
        return len(self.dataset) if self.dataset is not None else len(self.images)

    def read(self, index: np.ndarray) -> Tensor:
        """Float [0, 1] images ``[n, C, H, W]`` at ``index`` (duplicates allowed), in that order."""
        if self.dataset is not None:
            items = [self.dataset[int(i)] for i in index]
            images = [item[0] if isinstance(item, (tuple, list)) else item for item in items]
            if not all(isinstance(t, Tensor) for t in images):
                raise ValueError("OOD dataset items must be image tensors [C, H, W] (or (image, ...) tuples); give the "
                                 "dataset a ToTensor transform")
            x = torch.stack(images)
        else:
            order = np.argsort(index, kind="stable")  # memory-mapped files: read in file order
            picked = self.images[torch.as_tensor(index[order])] if isinstance(self.images, Tensor) else \
                np.asarray(self.images[index[order]])
            x = torch.empty_like(torch.as_tensor(picked))
            x[torch.as_tensor(order)] = torch.as_tensor(picked)
            if self.channels_last:
                x = x.permute(0, 3, 1, 2).contiguous()
        if x.dtype == torch.uint8:
            return to_unit_float(x, self.max_value)
        if not x.is_floating_point():
            raise ValueError(f"OOD images must be uint8 or float in [0, 1], got {x.dtype}")
        return x.float()


class OODDataModule(L.LightningDataModule):
    """The training batches of ``data`` with a batch of out-of-distribution images appended to each.

    A tuple or list batch ``(x, y, ...)`` becomes ``(x, y, ..., x_ood)`` (the OOD images last); a dict batch gets
    them under ``ood_key``. Validation and test batches are ``data``'s, unchanged. ``data``'s own batch hooks
    (CutMix) still run on its part of each batch, before the OOD images are added.

    Official recipe (``Saehyung-Lee/OAT``, ``TRADES/train_trades_cifar10.py``, ``AT/train.py``): as many OOD
    images as in-distribution ones in every batch (64 + 64 for TRADES, 64 + 64 of the 128 for PGD-AT), the OOD
    images augmented like the training images (crop and flip), drawn in shuffled passes over the OOD set that
    run on across epochs; the epoch count is halved (50 for TRADES instead of 100) so that the number of
    updates stays that of the batch-64 run. Here the same: ``ood_batch_size`` defaults to ``data``'s batch size,
    ``augment`` to ``data``'s augmentation (its ``pad``, ``flip``), and the images are drawn without
    replacement by a seeded permutation of the OOD set, pass after pass, each rank and step taking its own
    stretch (a step's images are a pure function of the seed, the rank and the step count, which is saved in
    checkpoints: a resumed run draws what the uninterrupted one would have).

    The OOD images are gathered in the main process, before the batch goes to the device (``pin_memory`` where
    CUDA is available, so the copy is asynchronous), and augmented there on the CPU: cheap for a few hundred
    small images per step. For OOD sets far larger than memory, give an uncompressed ``.npz`` or ``.npy``: it is
    memory-mapped, one random read per image.

    Args:
        data: the in-distribution DataModule (e.g. ``CIFAR10DataModule``).
        ood: the OOD images: a path to an ``.npy`` / ``.npz`` of uint8 images ``[N, H, W, C]`` or
            ``[N, C, H, W]`` (the official ``ti_1M_lowconfidence_unlabeled.pickle`` holds ``data`` as
            ``[N, 3, 32, 32]``: save it once with ``np.save``), an array or tensor of such images (or float in
            [0, 1]), another DataModule (its training split), or a ``Dataset`` of float [0, 1] image tensors.
            They must have ``data``'s image shape.
        ood_batch_size: OOD images per training batch (and rank); default ``data.batch_size``.
        augment: crop and flip the OOD images as ``data`` does its training images (``data.pad``, ``data.flip``);
            ``None`` (default) follows ``data.augment``.
        image_key: the images' array in an ``.npz``.
        ood_key: where a dict batch gets the OOD images.
        max_value: the stored value of white in uint8 OOD images (255; a DataModule source gives its own).
        seed: of the OOD draws and their augmentation.
    """

    def __init__(self, data: L.LightningDataModule, ood: OODSource, ood_batch_size: Optional[int] = None,
                 augment: Optional[bool] = None, image_key: str = "image", ood_key: str = "ood",
                 max_value: int = 255, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["data", "ood"])
        batch_size = getattr(data, "batch_size", None) if ood_batch_size is None else ood_batch_size
        if batch_size is None or int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"ood_batch_size must be an integer >= 1 (default: data.batch_size), got {batch_size}")
        if max_value < 1:
            raise ValueError(f"max_value must be >= 1, got {max_value}")
        self.data, self.ood, self.ood_batch_size = data, ood, int(batch_size)
        self.augment, self.image_key, self.ood_key, self.max_value, self.seed = augment, image_key, ood_key, \
            max_value, seed
        self.images: Optional[OODImages] = None
        self.step = 0  #: training batches given OOD images so far on this rank (saved in checkpoints)

    @property
    def num_classes(self) -> Optional[int]:
        return getattr(self.data, "num_classes", None)

    @property
    def dims(self) -> Optional[tuple[int, int, int]]:
        return getattr(self.data, "dims", None)

    # --- Lightning hooks -----------------------------------------------------------------------

    def prepare_data(self) -> None:
        self.data.prepare_data()
        if isinstance(self.ood, L.LightningDataModule):
            self.ood.prepare_data()

    def setup(self, stage: Optional[str] = None) -> None:
        self.data.trainer = self.trainer
        self.data.setup(stage)
        if self.images is None and stage in (None, "fit"):
            if isinstance(self.ood, L.LightningDataModule):
                self.ood.trainer = self.trainer
                self.ood.setup("fit")
            self.images = OODImages(self.ood, self.dims, self.image_key, self.max_value)

    def teardown(self, stage: Optional[str] = None) -> None:
        self.data.teardown(stage)

    def train_dataloader(self) -> Any:
        return self._data_loader("train")

    def val_dataloader(self) -> Any:
        return self._data_loader("val")

    def test_dataloader(self) -> Any:
        return self._data_loader("test")

    def _data_loader(self, stage: str) -> Any:
        """``data``'s loader of ``stage``, with the trainer handed on (its loaders read the rank from it)."""
        self.data.trainer = self.trainer
        return getattr(self.data, f"{stage}_dataloader")()

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        batch = self.data.on_before_batch_transfer(batch, dataloader_idx)
        if not self._training():
            return batch
        x_ood = self.next_ood_batch()
        if torch.cuda.is_available():
            x_ood = x_ood.pin_memory()
        if isinstance(batch, dict):
            return {**batch, self.ood_key: x_ood}
        if isinstance(batch, (tuple, list)):
            return [*batch, x_ood] if isinstance(batch, list) else (*batch, x_ood)
        raise ValueError(f"OODDataModule appends the OOD images to tuple, list or dict batches; "
                         f"{type(self.data).__name__} "
                         f"gives {type(batch).__name__} batches")

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """``data``'s own hook (e.g. CutMix) on its part of the batch; the OOD images pass unchanged."""
        if not self._training():
            return self.data.on_after_batch_transfer(batch, dataloader_idx)
        if isinstance(batch, dict):
            own = {k: v for k, v in batch.items() if k != self.ood_key}
            return {**self.data.on_after_batch_transfer(own, dataloader_idx), self.ood_key: batch[self.ood_key]}
        own = self.data.on_after_batch_transfer(type(batch)(batch[:-1]), dataloader_idx)
        return [*own, batch[-1]] if isinstance(batch, list) else (*own, batch[-1])

    def state_dict(self) -> dict[str, Any]:
        return {"ood_step": self.step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = int(state_dict.get("ood_step", 0))

    # --- the OOD batches -----------------------------------------------------------------------

    def next_ood_batch(self) -> Tensor:
        """The next ``ood_batch_size`` OOD images of this rank, float [0, 1] ``[n, C, H, W]`` on the CPU."""
        if self.images is None:
            raise RuntimeError("call setup() (stage 'fit') before asking for OOD images")
        rank, world = self._rank_and_world()
        n = self.ood_batch_size
        stream = PermutationStream(len(self.images), self.seed, _OOD)
        x = self.images.read(stream.take((self.step * world + rank) * n, n))
        if self._augment():
            generator = torch.Generator().manual_seed(derived_seed(self.seed, _AUGMENT, self.step, rank))
            x = random_crop_flip(x, getattr(self.data, "pad", 0), getattr(self.data, "flip", False), generator)
        self.step += 1
        return x

    def _augment(self) -> bool:
        return bool(getattr(self.data, "augment", False) if self.augment is None else self.augment)

    def _training(self) -> bool:
        return self.trainer is not None and self.trainer.training

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
