"""Tiny ImageNet (200 classes, 64x64 RGB) from the official ``tiny-imagenet-200`` folder, with a decoded-array cache."""

from __future__ import annotations

import hashlib
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from lit_robust.datamodules import files
from lit_robust.datamodules.arrays import ImageDataModule

CACHE_FORMAT = 1  # bump when the cache's content or key changes meaning


class TinyImageNetDataModule(files.ArchiveDataset, ImageDataModule):
    """Tiny ImageNet as [0, 1] tensors ``[B, 3, 64, 64]``; normalisation belongs to the model.

    Files: ``data_dir/tiny-imagenet-200`` as the official archive
    (``http://cs231n.stanford.edu/tiny-imagenet-200.zip``) unpacks it::

        wnids.txt                              the 200 class ids (WordNet ids), one a line
        words.txt                              wnid -> words (not read)
        train/<wnid>/<wnid>_boxes.txt          one line per training image: file, x0, y0, x1, y1
        train/<wnid>/images/<wnid>_<k>.JPEG    500 per class
        val/val_annotations.txt                file, wnid, x0, y0, x1, y1 (tab-separated)
        val/images/val_<k>.JPEG                10,000, 50 per class
        test/images/test_<k>.JPEG              unlabelled: ignored

    * Labels: the index of the wnid in the **sorted** wnids of ``wnids.txt`` (not the file's
      line order), which is what ``torchvision.datasets.ImageFolder("tiny-imagenet-200/train")``
      assigns, so label ``i`` means the same class as in most published TinyImageNet code.
    * Training set: class by class in label order, within a class the files of
      ``<wnid>_boxes.txt`` sorted by name, i.e. ImageFolder's order on ``train/``.
    * Test split: the official **val** set (the official test set has no labels), labelled
      from ``val_annotations.txt`` in that file's line order; no file is moved.
    * Validation (model selection): ``val_size`` training images held out by
      ``np.random.RandomState(seed).permutation(100000)[:val_size]`` (see ``ImageDataModule``).
      Default 2,000: the same 2% of the training set as CIFAR's 1,000 of 50,000, and 10
      images per class on average rather than 5 with 1,000.
    * Augmentation (training only): random 64x64 crop of the 4-pixel padded image and
      horizontal flip, the usual TinyImageNet adversarial-training recipe
      (imrahulr/adversarial_robustness_pytorch ``core/data/tiny_imagenet.py``:
      ``RandomCrop(64, padding=4)``, ``RandomHorizontalFlip``); our padding reflects, as
      for CIFAR, where torchvision's default pads with zeros.
    * Decoding: PIL, ``convert("RGB")`` (some Tiny ImageNet JPEGs are greyscale), to
      ``uint8 [N, 3, 64, 64]`` (train 1.2 GB, test 123 MB).
    * Cache (``cache=True``): decoding the 110,000 JPEGs takes a while, so the decoded split is
      saved as ``tiny-imagenet-200/lit_robust_cache/{train,test}.pt`` (torch.save of images,
      labels and a key). The key is a SHA-256 of the cache format, the split, and every
      image's relative path, label, size and modification time; a cache whose key differs
      (files added, removed, replaced or touched, labels changed) or that cannot be read is
      rebuilt. Files are written to a temporary name and renamed, so a reader never sees a
      half-written cache; with several writers (DDP ranks) the last complete one wins. On a
      read-only data folder the cache is skipped with a warning. ``prepare_data`` builds it
      (once per node), so that ``setup`` on every rank only reads it. Re-downloading replaces
      the whole folder, cache included.

    ``download=True`` fetches the archive with the MD5 that torchvision-free loaders commonly
    check (``90528d7ca1a48142e341f4ef8d21d0de``), unless the folder is already complete, then
    extracts it through :func:`~lit_robust.datamodules.files.safe_extract` (staged, so an
    interrupted extraction never leaves a half-filled ``tiny-imagenet-200``; members that
    would escape ``data_dir`` are refused). ``verify`` checks that the folder is complete:
    every wnid has its boxes file and every image it lists, ``val_annotations.txt`` is well
    formed, names only known wnids, and every file it lists exists; otherwise it raises
    ``FileNotFoundError`` naming what is missing and what was expected (a folder left by an
    interrupted manual extraction is reported, not taken for the dataset).

    Other arguments: :class:`~lit_robust.datamodules.arrays.ImageDataModule` (``on_device``
    keeps the dataset on the accelerator).
    """

    url = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
    filename = "tiny-imagenet-200.zip"
    md5 = "90528d7ca1a48142e341f4ef8d21d0de"
    base_folder = "tiny-imagenet-200"
    num_classes = 200
    dims = (3, 64, 64)
    pad = 4
    flip = True

    def __init__(self, data_dir: str = "data", download: bool = True, batch_size: int = 128,
                 eval_batch_size: Optional[int] = None, num_workers: int = 4, val_size: int = 2000, seed: int = 0,
                 augment: bool = True, on_device: bool = False, cache: bool = True, cutmix: bool = False,
                 with_index: bool = False) -> None:
        super().__init__(data_dir, download, batch_size, eval_batch_size, num_workers, val_size, seed, augment,
                         on_device, cutmix, with_index)
        self.cache = cache

    def verify(self) -> None:
        self._index()

    def _index(self) -> dict[str, list[tuple[str, int]]]:
        """``{"train": [(path relative to root, label)], "test": [...]}``, checking the folder is complete."""
        root, hint = self.root, self._hint()
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is missing; {hint}")
        wnids_file = root / "wnids.txt"
        files.check_file(wnids_file, None, hint)
        listed = [line.strip() for line in wnids_file.read_text().splitlines() if line.strip()]
        if not listed or len(set(listed)) != len(listed):
            raise FileNotFoundError(f"{wnids_file} is corrupt: expected distinct class ids (wnids), one a line, got "
                                    f"{len(listed)} lines with {len(set(listed))} distinct; {hint}")
        wnids = sorted(listed)
        label_of = {wnid: label for label, wnid in enumerate(wnids)}
        train = []
        for wnid in wnids:
            boxes = root / "train" / wnid / f"{wnid}_boxes.txt"
            images = boxes.parent / "images"
            if not images.is_dir() or not boxes.is_file():
                missing = images if not images.is_dir() else boxes
                raise FileNotFoundError(f"{missing} is missing (class {wnid} is in wnids.txt): the dataset is "
                                        f"incomplete, perhaps an interrupted extraction; {hint}")
            names = sorted(fields[0] for fields in _table(boxes, 5, hint))
            _check_listed(names, images, boxes, hint)
            train += [(f"train/{wnid}/images/{name}", label_of[wnid]) for name in names]
        annotations = root / "val" / "val_annotations.txt"
        files.check_file(annotations, None, hint)
        rows = _table(annotations, 6, hint)
        for number, fields in enumerate(rows, 1):
            if fields[1] not in label_of:
                raise FileNotFoundError(f"{annotations} line {number}: wnid {fields[1]!r} of {fields[0]} is not in "
                                        f"wnids.txt; {hint}")
        names = [fields[0] for fields in rows]
        _check_listed(names, root / "val" / "images", annotations, hint)
        test = [(f"val/images/{fields[0]}", label_of[fields[1]]) for fields in rows]
        return {"train": train, "test": test}

    # --- arrays ----------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Downloads when asked, checks the files, and builds the decoded-array cache (once per node)."""
        super().prepare_data()
        if self.cache:
            index = self._index()
            for split in ("train", "test"):
                self._cached(split, index[split])

    def load(self, split: str) -> tuple[Tensor, Tensor]:
        entries = self._index()[split]
        if self.cache:
            return self._cached(split, entries)
        return self._decode(entries)

    def _decode(self, entries: list[tuple[str, int]]) -> tuple[Tensor, Tensor]:
        images = np.empty((len(entries), *self.dims), dtype=np.uint8)

        def decode(i: int) -> None:  # PIL releases the GIL while decoding: threads overlap
            path = self.root / entries[i][0]
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
            if pixels.shape != (*self.dims[1:], self.dims[0]):
                raise ValueError(f"{path} is {pixels.shape[1]}x{pixels.shape[0]}, expected "
                                 f"{self.dims[2]}x{self.dims[1]}: not a Tiny ImageNet image")
            images[i] = pixels.transpose(2, 0, 1)

        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            list(pool.map(decode, range(len(entries))))
        return torch.from_numpy(images), torch.tensor([label for _, label in entries], dtype=torch.int64)

    def _cache_key(self, split: str, entries: list[tuple[str, int]]) -> str:
        digest = hashlib.sha256(f"{CACHE_FORMAT}\n{split}\n{self.dims}\n".encode())
        for relative, label in entries:
            stat = os.stat(self.root / relative)
            digest.update(f"{relative}\t{label}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()

    def _cached(self, split: str, entries: list[tuple[str, int]]) -> tuple[Tensor, Tensor]:
        path = self.root / "lit_robust_cache" / f"{split}.pt"
        key = self._cache_key(split, entries)
        if path.is_file():
            try:
                saved = torch.load(path, weights_only=True)
                images, labels = saved["images"], saved["labels"]
                if (saved["key"] == key and images.dtype == torch.uint8 and tuple(images.shape[1:]) == self.dims
                        and len(images) == len(labels) == len(entries)):
                    return images, labels
            except Exception as error:  # unreadable: rebuilt below
                warnings.warn(f"ignoring the unreadable cache {path} ({error}); decoding the images again")
        images, labels = self._decode(entries)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(exist_ok=True)
            torch.save({"key": key, "images": images, "labels": labels}, temporary)
            os.replace(temporary, path)
        except OSError as error:
            try:
                temporary.unlink(missing_ok=True)
            except OSError:
                pass
            warnings.warn(f"could not write the decoded-image cache {path} ({error}); the JPEGs will be decoded "
                          f"again next time")
        return images, labels


def _table(path: Path, columns: int, hint: str) -> list[list[str]]:
    """The tab-separated rows of an annotation file, each with ``columns`` fields."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.rstrip("\n").split("\t")
        if len(fields) != columns or not fields[0]:
            raise FileNotFoundError(f"{path} is corrupt: line {number} has {len(fields)} tab-separated fields, "
                                    f"expected {columns} (file name first); {hint}")
        rows.append(fields)
    if not rows:
        raise FileNotFoundError(f"{path} is empty, expected one line per image; {hint}")
    return rows


def _check_listed(names: list[str], folder: Path, listing: Path, hint: str) -> None:
    """Every file ``listing`` names exists in ``folder``, once."""
    if len(set(names)) != len(names):
        raise FileNotFoundError(f"{listing} is corrupt: it lists a file twice; {hint}")
    present = set(os.listdir(folder)) if folder.is_dir() else set()
    missing = [name for name in names if name not in present]
    if missing:
        raise FileNotFoundError(f"{folder / missing[0]} is missing ({len(missing)} of the {len(names)} files that "
                                f"{listing} lists are): the dataset is incomplete, perhaps an interrupted "
                                f"extraction; {hint}")
