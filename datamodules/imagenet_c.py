"""ImageNet-C (Hendrycks & Dietterich, ICLR 2019): a test-only DataModule over the release's JPEG folders, read lazily.

Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations", ICLR 2019 (https://arxiv.org/abs/1903.12261; data: https://github.com/hendrycks/robustness,
zenodo record 2235448). The 50,000 ImageNet validation images, resized to 256 and centre
cropped to 224, corrupted by each of 15 benchmark (+ 4 extra) corruptions at 5 severities:
3.75 M JPEGs, served one by one from disk. Plugs into the corruption evaluation
(:func:`lit_robust.evaluation.corruption_accuracy`, ``evaluate(..., corruptions=...)``) exactly as
:class:`~lit_robust.datamodules.CIFAR10CDataModule` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from torchvision import transforms

from lit_robust.datamodules.base import SplitDataModule, TestOnly
from lit_robust.datamodules.cifar_c import corruption_pairs
from lit_robust.datamodules.image_folder import (ImageFiles, Sample, check_same_classes, eval_transform,
                                                 scan_class_folders, short_list)


class CorruptedImageFiles(ImageFiles):
    """:class:`ImageFiles` whose items also carry their ``(corruption index, severity)``: ``(x, y, c, s)``."""

    def __init__(self, samples: list[Sample], transform, tags: Tensor) -> None:
        super().__init__(samples, transform)
        self.tags = tags

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x, y = super().__getitem__(index)
        return x, y, self.tags[index, 0], self.tags[index, 1]


class ImageNetCDataModule(TestOnly, SplitDataModule):
    """ImageNet-C as [0, 1] tensors ``[B, 3, 224, 224]``, for ``trainer.test`` and the corruption evaluation only.

    Files: ``data_dir/<corruption>/<severity 1-5>/<wnid>/*.JPEG``, as the release's tars
    (``noise.tar``, ``blur.tar``, ``weather.tar``, ``digital.tar``, ``extra.tar``) unpack into
    one folder. Labels: the index of the wnid among the **sorted** wnids, the labelling of
    :class:`~lit_robust.datamodules.ImageNetDataModule` (and torchvision, timm). Every selected
    (corruption, severity) folder must hold the same class folders.

    Args:
        data_dir: the folder holding the corruption folders.
        corruptions: names to evaluate, in this order; default the 15 benchmark corruptions;
            any of ``CORRUPTIONS`` (the same names as CIFAR-10-C's, with the 4 extra ones).
        severities: in this order; default 1 to 5.
        num_classes: the number of class folders expected (``ValueError`` otherwise); ``None``: any.
        resolution: ``None`` serves the images as stored (224 x 224 in the release); an integer
            resizes the shorter side to it and centre crops (for a model trained at another size).
        batch_size, eval_batch_size, num_workers: as in ``SplitDataModule`` (test batches:
            ``eval_batch_size``, else ``batch_size``).
        combined: one test loader of ``(x, y, corruption_index, severity)`` batches, the pairs in
            the order of ``test_names``; ``False``: one ``(x, y)`` loader per pair,
            ``test_dataloader()[i]`` serving ``test_names[i]``.

    Attributes (as CIFAR10CDataModule's): ``corruptions``, ``severities``, ``pairs``,
    ``test_names`` (``"corruption/severity"``, corruption-major), ``labels`` (every served
    image's label, once set up), ``classes`` (the sorted wnids).

    A missing corruption or severity folder, a class folder without images, or class folders
    that differ between pairs raise ``FileNotFoundError`` naming the folder and the layout;
    an unreadable JPEG raises when it is read, naming it. Images are decoded in the loader's
    workers, never held in memory. The paper's mCE (errors normalised by AlexNet's) is not
    computed; the corruption evaluation reports accuracies.
    """

    base_folder = "ImageNet-C"
    corrupted_split, clean_hint = "validation", "ImageNetDataModule"

    def __init__(self, data_dir: str = "data/ImageNet-C", corruptions: Optional[Sequence[str]] = None,
                 severities: Optional[Sequence[int]] = None, num_classes: Optional[int] = 1000,
                 resolution: Optional[int] = None, batch_size: int = 256, eval_batch_size: Optional[int] = None,
                 num_workers: int = 8, combined: bool = True) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers)
        if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, int)
                                       or resolution < 1):
            raise ValueError(f"resolution must be an integer >= 1 (pixels) or None (as stored), got {resolution!r}")
        self.data_dir, self.expected_classes, self.resolution = data_dir, num_classes, resolution
        self.combined = combined
        self.corruptions, self.severities, self.pairs, self.test_names = corruption_pairs(corruptions, severities)
        self.labels: Optional[Tensor] = None
        self.classes: list[str] = []
        self._scanned: Optional[list[list[Sample]]] = None  # prepare_data's index, reused by setup

    @property
    def root(self) -> Path:
        return Path(self.data_dir)

    def layout(self) -> str:
        return (f"expected the ImageNet-C release unpacked into {self.root}: <corruption>/<severity 1-5>/<wnid>/*.JPEG "
                f"(the zenodo tars noise.tar, blur.tar, weather.tar, digital.tar and extra.tar)")

    def index(self) -> list[list[Sample]]:
        """The ``(path, label)`` of every selected pair, in the order of ``pairs``; checks the folders."""
        found = [scan_class_folders(self.root / self.corruptions[c] / str(s), self.layout()) for c, s in self.pairs]
        classes = list(found[0])
        first = self.root / self.test_names[0]
        if self.expected_classes is not None and len(classes) != self.expected_classes:
            raise ValueError(f"num_classes={self.expected_classes}, but {first} holds {len(classes)} class folders "
                             f"({short_list(classes)}); pass num_classes={len(classes)} or None")
        for name, by_class in zip(self.test_names[1:], found[1:]):
            check_same_classes(classes, list(by_class), first, self.root / name, self.layout())
        self.classes = classes
        return [[(path, label) for label, wnid in enumerate(classes) for path in by_class[wnid]] for by_class in found]

    def prepare_data(self) -> None:
        """Checks the folders (the release comes by hand: 3.75 M files in five tars); setup reuses the listing."""
        self._scanned = self.index()

    def setup(self, stage: Optional[str] = None) -> None:
        if self.labels is not None:
            return
        per_pair, self._scanned = self._scanned or self.index(), None
        transform = transforms.ToTensor() if self.resolution is None else eval_transform(self.resolution, 1.0)
        if self.combined:
            samples = [sample for pair in per_pair for sample in pair]
            tags = torch.tensor([pair for pair, files in zip(self.pairs, per_pair) for _ in files], dtype=torch.int64)
            self.splits = {"test": CorruptedImageFiles(samples, transform, tags)}
        else:
            self.splits = {name: ImageFiles(pair, transform) for name, pair in zip(self.test_names, per_pair)}
            samples = [sample for pair in per_pair for sample in pair]
        self.labels = torch.tensor([label for _, label in samples], dtype=torch.int64)

    def test_dataloader(self) -> Union[DataLoader, list[DataLoader]]:
        self.setup("test")
        if self.combined:
            return self._loader("test", train=False)
        # One loader per pair; workers end with each (persistent ones would pile up across the 75 loaders).
        return [DataLoader(self.splits[name], batch_size=self.eval_batch_size or self.batch_size,
                           num_workers=self.num_workers, pin_memory=torch.cuda.is_available())
                for name in self.test_names]
