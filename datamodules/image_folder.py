"""Class-folder image datasets too large for memory (ImageNet, its subsets, user data), decoded per image in workers.

Unlike :class:`~lit_robust.datamodules.arrays.ImageDataModule`, nothing is decoded up front:
each item opens its file, decodes it with PIL and augments it, in the DataLoader's worker
processes. Images are served as float [0, 1] tensors ``[3, r, r]``; normalisation belongs
to the model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from lit_robust.datamodules.arrays import held_out_split
from lit_robust.datamodules.base import SplitDataModule

Sample = tuple[str, int]  # (path, label)


def is_image_file(name: str) -> bool:
    """torchvision ImageFolder's test: the extension (any case) is one of ``IMG_EXTENSIONS``."""
    return has_file_allowed_extension(name, IMG_EXTENSIONS)


def read_rgb(path: str) -> Image.Image:
    """The decoded RGB image at ``path`` (greyscale and CMYK JPEGs converted, as ImageNet holds a few).

    A file PIL cannot decode (corrupt, truncated, not an image) raises ``FileNotFoundError``
    naming it, at read time: it is never skipped silently.
    """
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise FileNotFoundError(f"{path} cannot be read as an image ({type(error).__name__}: {error}): the file is "
                                f"corrupt, truncated or not an image; replace it or remove it from the "
                                f"dataset") from error


def train_transform(resolution: int) -> Callable[[Image.Image], Tensor]:
    """RandomResizedCrop(resolution, scale=(0.08, 1)) + horizontal flip, to float [0, 1] (no normalisation).

    The standard ImageNet training augmentation (torchvision's reference recipe; Fast AT's
    ``main_fast.py`` uses the same with torchvision's defaults, ratio 3/4 to 4/3).
    """
    return transforms.Compose([transforms.RandomResizedCrop(resolution, scale=(0.08, 1.0)),
                               transforms.RandomHorizontalFlip(), transforms.ToTensor()])


def eval_transform(resolution: int, crop_ratio: float = 0.875) -> Callable[[Image.Image], Tensor]:
    """Resize the shorter side to ``round(resolution / crop_ratio)``, CenterCrop(resolution), to float [0, 1].

    ``crop_ratio=0.875`` is the standard 224 / 256; 1.0 crops without margin.
    """
    return transforms.Compose([transforms.Resize(round(resolution / crop_ratio)), transforms.CenterCrop(resolution),
                               transforms.ToTensor()])


class ImageFiles(Dataset):
    """``(image, label)`` from a list of ``(path, label)``: each image read and transformed when it is asked for."""

    def __init__(self, samples: list[Sample], transform: Callable[[Image.Image], Tensor]) -> None:
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        path, label = self.samples[index]
        return self.transform(read_rgb(path)), torch.tensor(label, dtype=torch.int64)


def short_list(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return f"{shown}, ... ({len(names)} in all)" if len(names) > limit else shown


def scan_class_folders(folder: Path, layout: str) -> dict[str, list[str]]:
    """``{class name: sorted image paths}`` of ``folder/<class>/*``, classes sorted (ImageFolder's order).

    Files that are not images by extension are ignored, as ImageFolder does; a missing
    folder, one without class folders, or a class folder without images raises
    ``FileNotFoundError`` naming it and ``layout`` (the expected layout).
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is missing; {layout}")
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if not classes:
        raise FileNotFoundError(f"{folder} holds no class folders; {layout}")
    found = {}
    for name in classes:
        files = sorted(e.path for e in os.scandir(folder / name) if e.is_file() and is_image_file(e.name))
        if not files:
            raise FileNotFoundError(f"{folder / name} holds no image files (extensions {', '.join(IMG_EXTENSIONS)}); "
                                    f"{layout}")
        found[name] = files
    return found


class ImageFolderDataModule(SplitDataModule):
    """Any class-folder dataset: ``data_dir/train/<class>/*.JPEG`` for training, ``data_dir/val/<class>/*`` for testing.

    * Labels: the index of the class folder's name among the **sorted** names, what
      ``torchvision.datasets.ImageFolder`` assigns (for ImageNet: the standard labelling of
      torchvision and timm). ``train`` and ``val`` must hold the same class folders.
    * Splits: ``test`` is the ``val`` folder (ImageNet's official validation set is its
      de facto test set); ``val`` (model selection) is ``val_size`` training images held out
      by ``np.random.RandomState(seed).permutation`` (:func:`~lit_robust.datamodules.arrays.held_out_split`,
      as for CIFAR): seeded and reproducible, not stratified (with 10,000 of ImageNet's
      1.28 M images every class gets about 10). ``train`` is the rest.
    * Training transform: ``RandomResizedCrop(resolution, scale=(0.08, 1))`` + horizontal
      flip (``augment=False``: the evaluation transform instead). Validation and test:
      resize the shorter side to ``round(eval_resolution / crop_ratio)``, centre crop
      ``eval_resolution`` (256 -> 224 with the defaults). Float [0, 1], never normalised.
    * Decoding: PIL, ``convert("RGB")``, per image in the DataLoader workers. An unreadable
      image raises ``FileNotFoundError`` naming the file when it is read (in a worker:
      re-raised in the main process with the message).
    * Resolution: :meth:`set_resolution` changes the training crop between epochs (progressive
      resizing, :class:`~lit_robust.callbacks.ResolutionSchedule`); validation and test stay
      at ``eval_resolution``, so that ``val/`` metrics compare across epochs. Workers are
      **not persistent** (for any split): each epoch's loader starts workers that copy the
      dataset as it is then, so a new resolution always reaches them, and Lightning's
      ``reload_dataloaders_every_n_epochs`` (which a new batch size needs) never meets
      persistent, pinned workers (an unstable combination, PyTorch issue 91252). Starting
      the workers again each epoch costs seconds at most, little next to an ImageNet epoch.

    Args:
        data_dir: the folder holding ``train_folder`` and ``test_folder``.
        resolution: the training crop's side in pixels.
        eval_resolution: the validation and test crop; default ``resolution`` as constructed.
        crop_ratio: evaluation crop / resize, in (0, 1]; 0.875 = 224 / 256.
        num_classes: when given, the number of class folders expected (``ValueError`` otherwise).
        batch_size, eval_batch_size, num_workers: as in ``SplitDataModule``.
        val_size: training images held out for model selection (0: none, an empty ``val``).
        seed: of the held-out split.
        augment: the training transform above; ``False`` serves training images like test ones.
        train_folder, test_folder: the subfolders of ``data_dir``.
    """

    def __init__(self, data_dir: str = "data", resolution: int = 224, eval_resolution: Optional[int] = None,
                 crop_ratio: float = 0.875, num_classes: Optional[int] = None, batch_size: int = 256,
                 eval_batch_size: Optional[int] = None, num_workers: int = 8, val_size: int = 1000, seed: int = 0,
                 augment: bool = True, train_folder: str = "train", test_folder: str = "val") -> None:
        super().__init__(batch_size, eval_batch_size, num_workers)
        for name, value in (("resolution", resolution), ("eval_resolution", eval_resolution)):
            _check_resolution(name, value, optional=name == "eval_resolution")
        if not 0 < crop_ratio <= 1:
            raise ValueError(f"crop_ratio must be in (0, 1], got {crop_ratio}")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 or None (any), got {num_classes}")
        if val_size < 0:
            raise ValueError(f"val_size must be >= 0, got {val_size}")
        self.save_hyperparameters()
        self.data_dir, self.resolution, self.crop_ratio = data_dir, resolution, crop_ratio
        self.eval_resolution = resolution if eval_resolution is None else eval_resolution
        self.expected_classes, self.val_size, self.seed, self.augment = num_classes, val_size, seed, augment
        self.train_folder, self.test_folder = train_folder, test_folder
        self.classes: list[str] = []
        self._scanned: Optional[dict[str, list[Sample]]] = None  # prepare_data's index, reused by setup
        #: set by :class:`~lit_robust.callbacks.ResolutionSchedule`: applied whenever a training loader is built
        self.resolution_schedule: Any = None

    @property
    def root(self) -> Path:
        return Path(self.data_dir)

    @property
    def num_classes(self) -> Optional[int]:
        return len(self.classes) if self.classes else self.expected_classes

    def layout(self) -> str:
        """The expected layout, for error messages."""
        return (f"expected {self.root / self.train_folder}/<class>/<image> and {self.root / self.test_folder}/"
                f"<class>/<image> (one folder per class, the same class folders in both)")

    # --- index ------------------------------------------------------------------------------

    def index(self) -> dict[str, list[Sample]]:
        """``{"train": [(path, label)], "test": [...]}`` after checking the layout; sets ``classes``."""
        train = scan_class_folders(self.root / self.train_folder, self.layout())
        classes = list(train)
        if self.expected_classes is not None and len(classes) != self.expected_classes:
            raise ValueError(f"num_classes={self.expected_classes}, but {self.root / self.train_folder} holds "
                             f"{len(classes)} class folders ({short_list(classes)}); pass num_classes={len(classes)} "
                             f"or None, or point data_dir at the intended dataset")
        test = self.test_samples(classes)
        self.classes = classes
        return {"train": [(path, label) for label, name in enumerate(classes) for path in train[name]], "test": test}

    def test_samples(self, classes: list[str]) -> list[Sample]:
        """The test split's ``(path, label)``: ``test_folder/<class>/*`` with the training classes' labels."""
        test = scan_class_folders(self.root / self.test_folder, self.layout())
        check_same_classes(classes, list(test), self.root / self.train_folder, self.root / self.test_folder,
                           self.layout())
        return [(path, label) for label, name in enumerate(classes) for path in test[name]]

    # --- Lightning --------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Checks the layout (nothing is downloaded: these datasets come by hand); setup reuses the listing."""
        self._scanned = self.index()

    def setup(self, stage: Optional[str] = None) -> None:
        if self.splits:
            return
        index, self._scanned = self._scanned or self.index(), None  # listing ImageNet's 1.28 M files takes a while
        train = index["train"]
        if not self.val_size < len(train):
            raise ValueError(f"val_size must be smaller than the {len(train)} training images, got {self.val_size}")
        train_idx, val_idx = held_out_split(len(train), self.val_size, self.seed)
        evaluation = eval_transform(self.eval_resolution, self.crop_ratio)
        self.splits = {"train": ImageFiles([train[i] for i in train_idx], self._train_transform()),
                       "val": ImageFiles([train[i] for i in val_idx], evaluation),
                       "test": ImageFiles(index["test"], evaluation)}

    def set_resolution(self, resolution: int) -> None:
        """The training crop for the loaders built from now on (the next epoch's, in a Trainer)."""
        _check_resolution("resolution", resolution)
        self.resolution = resolution
        if "train" in self.splits:
            self.splits["train"].transform = self._train_transform()

    def _train_transform(self) -> Callable[[Image.Image], Tensor]:
        if self.augment:
            return train_transform(self.resolution)
        return eval_transform(self.resolution, self.crop_ratio)

    def train_dataloader(self) -> DataLoader:
        if self.resolution_schedule is not None:
            self.resolution_schedule.apply(self, 0 if self.trainer is None else self.trainer.current_epoch)
        return self._loader("train", train=True)

    def _loader(self, split: str, train: bool) -> DataLoader:
        return DataLoader(self.splits[split], batch_size=self.batch_size if train else self.eval_batch_size
                          or self.batch_size, shuffle=train, num_workers=self.num_workers,
                          persistent_workers=False, pin_memory=torch.cuda.is_available())


def check_same_classes(reference: list[str], other: list[str], reference_where: Any, other_where: Any,
                       layout: str) -> None:
    """``FileNotFoundError`` naming the classes found in only one of two places that must hold the same ones."""
    only_reference, only_other = sorted(set(reference) - set(other)), sorted(set(other) - set(reference))
    if only_reference or only_other:
        raise FileNotFoundError(
            f"the classes differ ({len(reference)} and {len(other)}): only in {reference_where}: "
            f"{short_list(only_reference) or 'none'}; only in {other_where}: {short_list(only_other) or 'none'}; "
            f"{layout}")


def _check_resolution(name: str, value: Optional[int], optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1 (pixels){' or None' if optional else ''}, got {value!r}")
