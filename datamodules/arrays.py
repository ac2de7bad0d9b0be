"""Image datasets held as uint8 tensors: one base for CIFAR, SVHN and TinyImageNet, and a GPU-resident mode.

Every dataset here fits in memory as ``uint8 [N, C, H, W]`` (CIFAR-10: 150 MB, TinyImageNet:
1.2 GB). Batches are float [0, 1] images; normalisation belongs to the model.

Two ways to serve them, same API:

* the default: a ``DataLoader`` over an :class:`ArrayDataset` (per-sample augmentation on the
  CPU, in the loader's workers);
* ``on_device=True``: the whole split lives on the accelerator and a :class:`DeviceBatches`
  yields index slices, converted and augmented there in one batched operation. That removes
  the DataLoader bottleneck of fast methods (FGSM, Free AT), whose steps take milliseconds.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from lit_robust.datamodules.base import SplitDataModule
from lit_robust.datamodules.mixing import cutmix


def random_crop_flip(x: Tensor, pad: int, flip: bool, generator: Optional[torch.Generator] = None) -> Tensor:
    """Per-image random crop of the reflect-padded batch (``pad`` pixels each side) and horizontal flip.

    The batched form of ``RandomCrop(size, padding=pad, padding_mode="reflect")`` followed by
    ``RandomHorizontalFlip()`` (Rice et al.'s CIFAR augmentation), on any device. Offsets
    and flips are drawn on ``x``'s device from ``generator`` (or the global generator).
    """
    b, _, h, w = x.shape
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        dy = torch.randint(0, 2 * pad + 1, (b,), device=x.device, generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (b,), device=x.device, generator=generator)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None].expand(-1, x.shape[1], -1, w + 2 * pad)
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :].expand(-1, x.shape[1], h, -1)
        x = padded.gather(2, rows).gather(3, cols)
    if flip:
        mirrored = torch.rand(b, device=x.device, generator=generator) < 0.5
        x = torch.where(mirrored[:, None, None, None], x.flip(3), x)
    return x


class CropFlip:
    """:func:`random_crop_flip` as a picklable callable (DataLoader workers may be spawned)."""

    def __init__(self, pad: int, flip: bool) -> None:
        self.pad, self.flip = pad, flip

    def __call__(self, x: Tensor) -> Tensor:
        return random_crop_flip(x, self.pad, self.flip)


def to_unit_float(images: Tensor, max_value: int = 255) -> Tensor:
    """uint8 pixels to float32 in [0, 1]; ``max_value`` is the stored value of white (255, the digits' 16)."""
    return images.to(torch.float32).div_(float(max_value))


class ArrayDataset(Dataset):
    """``(image, label)`` pairs from uint8 ``[N, C, H, W]`` images: float [0, 1], optionally augmented;
    ``(image, label, index)`` with ``with_index`` (the position in this split, for per-example state)."""

    def __init__(self, images: Tensor, labels: Tensor, augment: Optional[Callable[[Tensor], Tensor]] = None,
                 max_value: int = 255, with_index: bool = False) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or len(images) != len(labels):
            raise ValueError(f"images must be uint8 [N, C, H, W] with one label each, got {images.dtype} "
                             f"{tuple(images.shape)} and {len(labels)} labels")
        self.images, self.labels, self.augment, self.max_value = images, labels, augment, max_value
        self.with_index = with_index

    @property
    def tensors(self) -> tuple[Tensor, Tensor]:
        """The whole split, never augmented: float [0, 1] images and labels (as ``TensorDataset.tensors``)."""
        return to_unit_float(self.images, self.max_value), self.labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        x = to_unit_float(self.images[index], self.max_value)
        if self.augment is not None:
            x = self.augment(x[None])[0]
        return (x, self.labels[index], index) if self.with_index else (x, self.labels[index])


class DeviceBatches:
    """Batches sliced from a split that lives on the accelerator (``on_device=True``).

    Shuffling is a permutation seeded by ``seed + epoch`` (the epoch comes from ``epoch_fn``),
    the same on every rank, as ``DistributedSampler`` does; each of ``world_size`` ranks then
    takes every ``world_size``-th index, the order padded by repeating its start so that all
    ranks get the same number of batches. A resumed run repeats the straight run's batches.
    With ``with_index`` a batch is ``(x, y, index)``: the examples' positions in the split.
    """

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int, shuffle: bool, seed: int = 0,
                 augment: Optional[Callable[[Tensor], Tensor]] = None, rank: int = 0, world_size: int = 1,
                 epoch_fn: Callable[[], int] = lambda: 0, max_value: int = 255, with_index: bool = False) -> None:
        self.images, self.labels, self.batch_size, self.shuffle = images, labels, batch_size, shuffle
        self.seed, self.augment, self.rank, self.world_size, self.epoch_fn = seed, augment, rank, world_size, epoch_fn
        self.max_value, self.with_index = max_value, with_index

    def _indices(self) -> Tensor:
        n = len(self.labels)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch_fn()))
        else:
            order = torch.arange(n)
        per_rank = math.ceil(n / self.world_size)
        order = torch.cat([order, order[:per_rank * self.world_size - n]])
        return order[self.rank::self.world_size].to(self.images.device)

    def __len__(self) -> int:
        return math.ceil(math.ceil(len(self.labels) / self.world_size) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        indices = self._indices()
        for start in range(0, len(indices), self.batch_size):
            index = indices[start:start + self.batch_size]
            x = to_unit_float(self.images[index], self.max_value)
            batch = (x if self.augment is None else self.augment(x)), self.labels[index]
            yield (*batch, index) if self.with_index else batch


def held_out_split(n: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation indices: ``np.random.RandomState(seed).permutation(n)``, the first
    ``val_size`` held out (Rice et al.'s ``generate_validation.py`` for CIFAR-10, seed 0, 1,000)."""
    order = np.random.RandomState(seed).permutation(n)
    return np.sort(order[val_size:]), order[:val_size]


class ImageDataModule(SplitDataModule):
    """Base of the uint8-array DataModules: held-out validation split, augmentation, GPU-resident mode.

    A subclass implements ``download`` (rank 0, in ``prepare_data``), ``verify`` (raise
    ``FileNotFoundError`` naming the missing or corrupt file and what was expected) and
    ``load(split) -> (uint8 [N, C, H, W], int64 labels)`` for ``"train"`` and ``"test"``;
    class attributes ``pad`` and ``flip`` give its augmentation, ``max_value`` the stored value
    of white (default 255). One whose splits are not "test, and training minus ``val_size``"
    overrides ``split_arrays`` instead of ``load``.

    Args:
        data_dir: where the files are (or go, with ``download``).
        download: fetch the files in ``prepare_data`` when missing or damaged (then check
            them); nothing is fetched when they are in place. ``False`` only checks. A failed
            download raises :class:`~lit_robust.datamodules.files.DownloadError` saying where
            to put the file by hand.
        batch_size, eval_batch_size, num_workers: as in ``SplitDataModule``.
        val_size: training images held out for validation (model selection), chosen by
            ``np.random.RandomState(seed).permutation``; the rest are trained on.
        seed: of the validation split and of the on-device shuffling.
        augment: the training augmentation (random crop of the ``pad``-reflect-padded image,
            horizontal flip when ``flip``); validation and test images are never augmented.
        on_device: keep each split on the accelerator (``trainer.strategy.root_device``) and
            serve index slices, augmented there; ``num_workers`` is then unused.
        cutmix: CutMix every training batch on the accelerator after the transfer
            (:func:`~lit_robust.datamodules.mixing.cutmix`, alpha = beta = 1 as Rebuffi et al. 2021): the
            targets become probability rows ``[B, num_classes]``. Rebuffi et al. find it helps robustness
            only together with weight averaging (:class:`~lit_robust.callbacks.EMA`); with TRADES, DeepMind
            attacks away from the mixed labels (``TRADES(attack_reference="targets")``).
        with_index: training batches are ``(x, y, index)``, ``index`` the examples' positions in the training
            split (int64), for defenses that keep state per training example (:class:`~lit_robust.defenses.ATAS`).
            Validation and test batches stay ``(x, y)``.
    """

    num_classes: int
    dims: tuple[int, int, int]
    pad: int = 4
    flip: bool = True
    max_value: int = 255

    def __init__(self, data_dir: str = "data", download: bool = True, batch_size: int = 128,
                 eval_batch_size: Optional[int] = None, num_workers: int = 4, val_size: int = 1000, seed: int = 0,
                 augment: bool = True, on_device: bool = False, cutmix: bool = False, with_index: bool = False) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers)
        if val_size < 0:
            raise ValueError(f"val_size must be >= 0, got {val_size}")
        self.save_hyperparameters()
        self.data_dir, self.download_files, self.val_size, self.seed = data_dir, download, val_size, seed
        self.augment, self.on_device, self.cutmix, self.with_index = augment, on_device, cutmix, with_index
        self.arrays: dict[str, tuple[Tensor, Tensor]] = {}

    # --- what a dataset implements ---------------------------------------------------------

    def download(self) -> None:
        raise NotImplementedError

    def verify(self) -> None:
        raise NotImplementedError

    def load(self, split: str) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    # --- shared ----------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Downloads (once per node) when asked, then checks the files."""
        if self.download_files:
            self.download()
        self.verify()

    def setup(self, stage: Optional[str] = None) -> None:
        if self.arrays:
            return
        self.verify()
        self.arrays = self.split_arrays()
        self.splits = {name: ArrayDataset(*arrays, self._augmentation() if name == "train" else None, self.max_value,
                                          with_index=self.with_index and name == "train")
                       for name, arrays in self.arrays.items()}

    def split_arrays(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{"train" | "val" | "test": (uint8 images, labels)}``: ``val_size`` training images held out."""
        images, labels = self.load("train")
        if not self.val_size < len(labels):
            raise ValueError(f"val_size must be smaller than the {len(labels)} training images, got {self.val_size}")
        train_idx, val_idx = held_out_split(len(labels), self.val_size, self.seed)
        return {"train": (images[train_idx], labels[train_idx]), "val": (images[val_idx], labels[val_idx]),
                "test": self.load("test")}

    def _augmentation(self) -> Optional[CropFlip]:
        return CropFlip(self.pad, self.flip) if self.augment else None

    def _loader(self, split: str, train: bool):
        if not self.on_device:
            return super()._loader(split, train)
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        images, labels = (t.to(device) for t in self.arrays[split])
        size = self.batch_size if train else self.eval_batch_size or self.batch_size
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return DeviceBatches(images, labels, size, shuffle=train, seed=self.seed,
                             augment=self._augmentation() if train else None, rank=rank, world_size=world,
                             epoch_fn=self._epoch, max_value=self.max_value, with_index=self.with_index and train)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """CutMix of the training batches (``cutmix``), on their device; other batches pass unchanged."""
        if not (self.cutmix and self.trainer is not None and self.trainer.training):
            return batch
        x, y, *rest = batch
        return (*cutmix(x, y, num_classes=self.num_classes), *rest)

    def _epoch(self) -> int:
        return 0 if self.trainer is None else self.trainer.current_epoch
