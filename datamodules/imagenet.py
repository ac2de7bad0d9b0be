"""ImageNet (ILSVRC-2012, 1,000 classes) from the official folder layout, read lazily like any class-folder dataset."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Optional

import numpy as np

from lit_robust.datamodules.image_folder import (ImageFolderDataModule, Sample, check_same_classes, is_image_file,
                                                short_list)

DEVKIT = "ILSVRC2012_devkit_t12"
GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
META = "data/meta.mat"
KAGGLE_CSV = "LOC_val_solution.csv"


class ImageNetDataModule(ImageFolderDataModule):
    """ILSVRC-2012 as [0, 1] tensors at the chosen resolution (see :class:`ImageFolderDataModule`).

    Training images: ``data_dir/train/<wnid>/*.JPEG`` (1,000 class folders, as the official
    ``ILSVRC2012_img_train.tar``'s per-class tars unpack). Labels: the index of the wnid among
    the **sorted** wnids, the standard labelling (torchvision's ``ImageNet``/``ImageFolder``,
    timm, every published checkpoint). The official validation set (50,000 images) is the
    test split, found in the first of these layouts that is present:

    1. ``data_dir/val/<wnid>/*.JPEG``: already sorted into class folders (PyTorch's
       ``valprep.sh``, torchvision's ``ImageNet`` after its first run). Chosen whenever
       ``val/`` holds folders.
    2. ``data_dir/val/ILSVRC2012_val_<8 digits>.JPEG`` (flat, as ``ILSVRC2012_img_val.tar``
       unpacks) with the devkit ``ILSVRC2012_devkit_t12/``: line ``k`` of
       ``data/ILSVRC2012_validation_ground_truth.txt`` is the 1-based ILSVRC2012_ID of image
       ``k``; ``data/meta.mat`` (its ``synsets``: ILSVRC2012_ID, WNID, ..., num_children)
       maps the ids of the 1,000 leaf synsets to wnids, as torchvision's
       ``parse_devkit_archive`` reads it.
    3. The same flat folder with Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString``,
       the string starting with the wnid), in ``data_dir`` or, for the Kaggle download's
       ``ILSVRC/Data/CLS-LOC`` as ``data_dir``, three folders up.

    The devkit is preferred to the CSV (it is the official ground truth; both agree).
    ``val_labels`` names the devkit folder or the CSV explicitly. A flat ``val/`` without
    either, a label file that misses an image or names one that is absent, or a wnid that
    is not a training class raises ``FileNotFoundError`` naming the file and the layouts.

    Defaults: ``num_classes=1000`` (checked; ``None`` for subsets such as ImageNet-100),
    ``val_size=10000`` held-out training images (about 10 per class), 224 px.
    Other arguments: :class:`ImageFolderDataModule`.
    """

    def __init__(self, data_dir: str = "data/imagenet", resolution: int = 224, eval_resolution: Optional[int] = None,
                 crop_ratio: float = 0.875, num_classes: Optional[int] = 1000, batch_size: int = 256,
                 eval_batch_size: Optional[int] = None, num_workers: int = 8, val_size: int = 10000, seed: int = 0,
                 augment: bool = True, val_labels: Optional[str] = None) -> None:
        super().__init__(data_dir, resolution, eval_resolution, crop_ratio, num_classes, batch_size, eval_batch_size,
                         num_workers, val_size, seed, augment)
        self.val_labels = val_labels

    def layout(self) -> str:
        root = self.root
        return (f"expected the ILSVRC-2012 layout: {root}/train/<wnid>/*.JPEG, and the validation images either in "
                f"{root}/val/<wnid>/ folders, or flat in {root}/val/ with the devkit {root}/{DEVKIT}/ ({GROUND_TRUTH} "
                f"and {META}) or Kaggle's {root}/{KAGGLE_CSV} (nothing is downloaded: get the files from "
                f"image-net.org or Kaggle's ImageNet Object Localization Challenge)")

    def test_samples(self, classes: list[str]) -> list[Sample]:
        val = self.root / self.test_folder
        if not val.is_dir():
            raise FileNotFoundError(f"{val} is missing; {self.layout()}")
        entries = list(os.scandir(val))
        images = sorted(e.name for e in entries if e.is_file() and is_image_file(e.name))
        if any(e.is_dir() for e in entries):  # layout 1
            if images:
                raise FileNotFoundError(f"{val} holds both class folders and loose images ({short_list(images)}); "
                                        f"{self.layout()}")
            return super().test_samples(classes)
        if not images:
            raise FileNotFoundError(f"{val} holds no images and no class folders; {self.layout()}")
        source = self._label_source()
        wnid_of = read_devkit(source) if source.is_dir() else read_kaggle_csv(source)
        stems = {Path(name).stem: name for name in images}
        unlabelled = sorted(set(stems) - set(wnid_of))
        if unlabelled:
            raise FileNotFoundError(f"{val / stems[unlabelled[0]]} has no label in {source} ({len(unlabelled)} images "
                                    f"have none); {self.layout()}")
        absent = sorted(set(wnid_of) - set(stems))
        if absent:
            raise FileNotFoundError(f"{val / absent[0]}.JPEG is missing ({len(absent)} of the {len(wnid_of)} images "
                                    f"that {source} labels are): the validation set is incomplete; {self.layout()}")
        check_same_classes(classes, sorted(set(wnid_of.values())), self.root / self.train_folder, source,
                           self.layout())
        label_of = {wnid: label for label, wnid in enumerate(classes)}
        return [(str(val / name), label_of[wnid_of[stem]]) for stem, name in sorted(stems.items())]

    def _label_source(self) -> Path:
        """The devkit folder or the CSV labelling a flat ``val/`` (``val_labels``, else the first one found)."""
        if self.val_labels is not None:
            path = Path(self.val_labels)
            if not path.exists():
                raise FileNotFoundError(f"val_labels={self.val_labels!r} is missing; {self.layout()}")
            return path
        candidates = [self.root / DEVKIT, self.root / KAGGLE_CSV]
        if self.root.resolve().parts[-3:] == ("ILSVRC", "Data", "CLS-LOC"):  # the Kaggle download
            candidates.append(self.root.resolve().parents[2] / KAGGLE_CSV)
        for path in candidates:
            if path.exists():
                return path
        raise FileNotFoundError(f"{self.root / self.test_folder} holds the validation images flat, but their labels "
                                f"are nowhere: looked for {', '.join(map(str, candidates))}; {self.layout()}")


def read_devkit(devkit: Path) -> dict[str, str]:
    """``{"ILSVRC2012_val_00000001": wnid, ...}`` from the devkit's ground truth and ``meta.mat``."""
    from scipy.io import loadmat

    meta, truth = devkit / META, devkit / GROUND_TRUTH
    for path in (meta, truth):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the devkit {devkit} is incomplete (expected {META} and "
                                    f"{GROUND_TRUTH} from ILSVRC2012_devkit_t12.tar.gz)")
    try:
        synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
        ids, wnids = (np.atleast_1d(synsets[field]) for field in ("ILSVRC2012_ID", "WNID"))
        leaves = np.atleast_1d(synsets["num_children"]) == 0
    except Exception as error:  # scipy's errors for a damaged or foreign .mat vary
        raise FileNotFoundError(f"{meta} is corrupt: expected a MATLAB file whose 'synsets' have the fields "
                                f"ILSVRC2012_ID, WNID and num_children ({type(error).__name__}: {error})") from error
    wnid_of_id = {int(i): str(w) for i, w, leaf in zip(ids, wnids, leaves) if leaf}
    out = {}
    for number, line in enumerate(truth.read_text().split(), 1):
        try:
            out[f"ILSVRC2012_val_{number:08d}"] = wnid_of_id[int(line)]
        except (ValueError, KeyError):
            raise FileNotFoundError(f"{truth} line {number}: {line!r} is not the ILSVRC2012_ID of a leaf synset in "
                                    f"{meta} (expected 1 to {len(wnid_of_id)})") from None
    if not out:
        raise FileNotFoundError(f"{truth} is empty, expected one class id per validation image")
    return out


def read_kaggle_csv(path: Path) -> dict[str, str]:
    """``{ImageId: wnid}`` from Kaggle's ``LOC_val_solution.csv`` (the first word of PredictionString)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or [c.strip() for c in rows[0]] != ["ImageId", "PredictionString"]:
        raise FileNotFoundError(f"{path} is corrupt: expected the header 'ImageId,PredictionString', got "
                                f"{','.join(rows[0]) if rows else 'an empty file'}")
    out = {}
    for number, row in enumerate(rows[1:], 2):
        if len(row) != 2 or not row[0] or not row[1].split():
            raise FileNotFoundError(f"{path} line {number} is corrupt: expected 'ImageId,<wnid> <box> ...', got "
                                    f"{','.join(row)!r}")
        out[row[0]] = row[1].split()[0]
    if not out:
        raise FileNotFoundError(f"{path} lists no image")
    return out
