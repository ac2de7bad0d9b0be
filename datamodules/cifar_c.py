"""CIFAR-10-C and CIFAR-100-C (Hendrycks & Dietterich, ICLR 2019): test-only DataModules over the release's .npy files.

Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations", ICLR 2019 (https://arxiv.org/abs/1903.12261; code and data:
https://github.com/hendrycks/robustness). The CIFAR-10 / CIFAR-100 test images, each
corrupted at five severities; a benchmark result is the accuracy averaged over the 15
benchmark corruptions x 5 severities (RobustBench's ``corruptions`` threat model).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lit_robust.datamodules import files
from lit_robust.datamodules.arrays import DeviceBatches, to_unit_float
from lit_robust.datamodules.base import SplitDataModule, TestOnly

#: The 15 corruptions of the benchmark (the paper's Figure 1 order).
BENCHMARK_CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness",
    "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
#: The 4 held-out corruptions the release also holds (the paper's validation corruptions).
EXTRA_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
CORRUPTIONS = BENCHMARK_CORRUPTIONS + EXTRA_CORRUPTIONS
SEVERITIES = (1, 2, 3, 4, 5)


class CorruptedImages(Dataset):
    """Rows of the chosen ``(corruption index, severity)`` pairs, read one by one from memory-mapped ``.npy`` files.

    ``files[c]`` is corruption ``c``'s ``uint8 [5 * n, 32, 32, 3]`` array and ``labels`` the
    ``[5 * n]`` labels; item ``p * n + i`` is image ``i`` of ``pairs[p]``: ``(x, y)``, or
    ``(x, y, c, severity)`` with ``extras``. Only the rows served are read, so selecting all
    19 corruptions costs no memory; each process (DataLoader worker) maps the files itself.
    """

    def __init__(self, files: Sequence[Path], labels: Tensor, pairs: Sequence[tuple[int, int]], extras: bool) -> None:
        self.files, self.labels, self.pairs, self.extras = list(files), labels, list(pairs), extras
        self.n = len(labels) // len(SEVERITIES)
        self._arrays: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.pairs) * self.n

    def __getitem__(self, index: int) -> tuple:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        pair, row = divmod(index, self.n)
        c, severity = self.pairs[pair]
        if c not in self._arrays:
            self._arrays[c] = np.load(self.files[c], mmap_mode="r")
        k = (severity - 1) * self.n + row
        x = to_unit_float(torch.from_numpy(np.array(self._arrays[c][k].transpose(2, 0, 1))))
        return (x, self.labels[k], c, severity) if self.extras else (x, self.labels[k])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": {}}  # workers map the files again rather than receive copies


class WithCorruption:
    """Device batches whose "labels" are rows ``(label, corruption index, severity)``, yielded as four fields."""

    def __init__(self, batches: DeviceBatches) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
        for x, targets in self.batches:
            yield x, targets[:, 0], targets[:, 1], targets[:, 2]


class CIFAR10CDataModule(files.ArchiveDataset, TestOnly, SplitDataModule):
    """CIFAR-10-C as [0, 1] tensors ``[B, 3, 32, 32]``, for ``trainer.test`` only.

    Files: ``data_dir/CIFAR-10-C/`` as the release unpacks it: ``labels.npy`` (``[5 * N]``)
    and one ``<corruption>.npy`` per corruption, ``uint8 [5 * N, 32, 32, 3]``, severities 1 to 5
    stacked in order (rows ``[(s - 1) * N, s * N)`` are severity ``s``; the labels repeat per
    severity). ``N`` is read from the files (10,000 in the release), never assumed.

    Args:
        data_dir: the folder holding ``CIFAR-10-C/`` (or where ``download`` puts it).
        download: in ``prepare_data``, unless the selected files are already there and sound,
            fetch ``CIFAR-10-C.tar`` (2.9 GB; kept in ``data_dir``, like torchvision's archives)
            from zenodo record 2535967 with the commonly used MD5
            ``56bf5dcef84df0e2308c6dcbcbbd8499`` and extract it with
            :func:`~lit_robust.datamodules.files.safe_extract` (staged, so an interrupted run
            leaves no half-filled folder; members escaping ``data_dir`` are refused). A new
            extraction replaces the whole folder.
        corruptions: names to evaluate on, in this order; default the 15 benchmark corruptions
            (``BENCHMARK_CORRUPTIONS``); any of ``CORRUPTIONS`` (which adds the 4 extra ones).
        severities: in this order; default 1 to 5.
        batch_size, eval_batch_size: the test batch size is ``eval_batch_size``, else ``batch_size``.
        num_workers: DataLoader workers (unused with ``on_device``).
        combined: one test dataloader yielding ``(x, y, corruption_index, severity)`` batches
            (``corruption_index`` into ``self.corruptions``, both int64), the pairs one after
            the other in the order of ``test_names``; ``False``: one dataloader of ``(x, y)``
            per pair, ``test_dataloader()[i]`` serving ``test_names[i]`` (Lightning logs its
            metrics with the suffix ``/dataloader_idx_i``).
        on_device: load the selected images onto the accelerator (``trainer.strategy.root_device``;
            the CPU without a trainer) when the test dataloader is built and serve index
            slices there (``DeviceBatches``): 30 MB per (corruption, severity) pair, 2.3 GB for
            the full benchmark. Otherwise images are read row by row from memory-mapped files.

    Attributes:
        corruptions, severities: the validated selection (tuples).
        test_names: ``"corruption/severity"`` for every pair, corruption-major (for each
            corruption, its severities), e.g. ``["gaussian_noise/1", ..., "jpeg_compression/5"]``.
        pairs: the same pairs as ``(index into corruptions, severity)``.

    ``verify`` (also in ``prepare_data`` and ``setup``) checks ``labels.npy`` and each selected
    ``.npy``: present, readable as a whole ``.npy`` (a truncated file is named), of the layout
    above, with the same number of rows as ``labels.npy``, a multiple of 5; the release
    publishes no per-file checksum. Any problem raises ``FileNotFoundError`` naming the file;
    a folder with some files missing (an interrupted manual extraction) lists all of them.

    There is no training or validation split: ``train_dataloader`` and ``val_dataloader``
    raise. Train and select on :class:`~lit_robust.datamodules.CIFAR10DataModule`, then
    ``trainer.test(module, datamodule=CIFAR10CDataModule(...))``.
    """

    url = "https://zenodo.org/records/2535967/files/CIFAR-10-C.tar"
    filename = "CIFAR-10-C.tar"
    md5 = "56bf5dcef84df0e2308c6dcbcbbd8499"
    base_folder = "CIFAR-10-C"
    num_classes = 10
    dims = (3, 32, 32)

    def __init__(self, data_dir: str = "data", download: bool = True, corruptions: Optional[Sequence[str]] = None,
                 severities: Optional[Sequence[int]] = None, batch_size: int = 256,
                 eval_batch_size: Optional[int] = None, num_workers: int = 4, combined: bool = True,
                 on_device: bool = False) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers)
        self.data_dir, self.download_files, self.combined, self.on_device = data_dir, download, combined, on_device
        self.corruptions, self.severities, self.pairs, self.test_names = corruption_pairs(corruptions, severities)
        self.labels: Optional[Tensor] = None

    def _files(self) -> list[Path]:
        return [self.root / f"{name}.npy" for name in self.corruptions]

    def verify(self) -> None:
        self._labels()

    def _labels(self) -> Tensor:
        """The int64 labels, after checking ``labels.npy`` and every selected corruption file."""
        hint, paths = self._hint(), [self.root / "labels.npy", *self._files()]
        missing = [p.name for p in paths if not p.is_file()]
        if missing and len(missing) < len(paths):
            hint = (f"{self.root} is incomplete (perhaps an interrupted extraction): missing {', '.join(missing)}; "
                    + hint)
        for path in paths:
            files.check_file(path, None, hint)
        labels = _open(paths[0], hint)
        if labels.ndim != 1 or labels.dtype.kind not in "iu" or not len(labels) or len(labels) % len(SEVERITIES):
            raise FileNotFoundError(f"{paths[0]} is corrupt: expected integer labels [5 * N] (N images per "
                                    f"severity), got {labels.dtype} {labels.shape}; {hint}")
        labels = np.array(labels, dtype=np.int64)
        if not (0 <= labels.min() and labels.max() < self.num_classes):
            raise FileNotFoundError(f"{paths[0]} is corrupt: labels in [{labels.min()}, {labels.max()}], expected "
                                    f"[0, {self.num_classes}); {hint}")
        for path in paths[1:]:
            images = _open(path, hint)
            if images.dtype != np.uint8 or images.shape != (len(labels), 32, 32, 3):
                raise FileNotFoundError(
                    f"{path} is corrupt: expected uint8 [{len(labels)}, 32, 32, 3] (5 severities x "
                    f"{len(labels) // len(SEVERITIES)} images, as many rows as labels.npy), got {images.dtype} "
                    f"{list(images.shape)}; {hint}")
        return torch.from_numpy(labels)

    # --- Lightning -------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Downloads (once per node) when asked, then checks the files."""
        if self.download_files:
            self.download()
        self.verify()

    def setup(self, stage: Optional[str] = None) -> None:
        if self.labels is not None:
            return
        self.labels = self._labels()
        groups = [self.pairs] if self.combined else [[pair] for pair in self.pairs]
        self.splits = {name: CorruptedImages(self._files(), self.labels, group, self.combined)
                       for name, group in zip(["test"] if self.combined else self.test_names, groups)}

    def test_dataloader(self) -> Union[DataLoader, WithCorruption, list]:
        self.setup("test")
        if self.on_device:
            return self._device_batches()
        if self.combined:
            return self._loader("test", train=False)
        # Workers end with each loader: persistent ones would pile up across the 75 loaders.
        return [DataLoader(self.splits[name], batch_size=self.eval_batch_size or self.batch_size,
                           num_workers=self.num_workers, pin_memory=torch.cuda.is_available())
                for name in self.test_names]

    def _device_batches(self) -> Union[WithCorruption, list[DeviceBatches]]:
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        n = len(self.labels) // len(SEVERITIES)
        images = torch.empty((len(self.pairs) * n, *self.dims), dtype=torch.uint8, device=device)
        arrays = [np.load(path, mmap_mode="r") for path in self._files()]
        for p, (c, s) in enumerate(self.pairs):  # one pair at a time through host memory
            rows = np.ascontiguousarray(arrays[c][(s - 1) * n:s * n].transpose(0, 3, 1, 2))
            images[p * n:(p + 1) * n].copy_(torch.from_numpy(rows))
        pairs = torch.tensor(self.pairs).repeat_interleave(n, 0)  # per image: corruption index, severity
        rows = (pairs[:, 1] - 1) * n + torch.arange(n).repeat(len(self.pairs))
        targets = torch.cat([self.labels[rows, None], pairs], 1).to(device)
        size = self.eval_batch_size or self.batch_size
        if self.combined:
            return WithCorruption(DeviceBatches(images, targets, size, shuffle=False, rank=rank, world_size=world))
        return [DeviceBatches(images[p * n:(p + 1) * n], targets[p * n:(p + 1) * n, 0], size, shuffle=False,
                              rank=rank, world_size=world) for p in range(len(self.pairs))]



class CIFAR100CDataModule(CIFAR10CDataModule):
    """CIFAR-100-C (fine labels, 100 classes), otherwise exactly as :class:`CIFAR10CDataModule`.

    ``download`` fetches ``CIFAR-100-C.tar`` from zenodo record 3555552 with the commonly used
    MD5 ``11f0ed0f1191edbf9fa23466ae6021d3``; the folder is ``data_dir/CIFAR-100-C/``.
    """

    url = "https://zenodo.org/records/3555552/files/CIFAR-100-C.tar"
    filename = "CIFAR-100-C.tar"
    md5 = "11f0ed0f1191edbf9fa23466ae6021d3"
    base_folder = "CIFAR-100-C"
    num_classes = 100


def corruption_pairs(corruptions: Optional[Sequence[str]], severities: Optional[Sequence[int]]
                     ) -> tuple[tuple[str, ...], tuple[int, ...], list[tuple[int, int]], list[str]]:
    """The checked selection (None: the 15 benchmark corruptions, severities 1-5), its ``(corruption index,
    severity)`` pairs and their test names ``"<corruption>/<severity>"``."""
    chosen = _selection("corruptions", BENCHMARK_CORRUPTIONS if corruptions is None else corruptions, CORRUPTIONS)
    levels = tuple(int(s) for s in _selection("severities", SEVERITIES if severities is None else severities,
                                              SEVERITIES))
    pairs = [(c, s) for c in range(len(chosen)) for s in levels]
    return chosen, levels, pairs, [f"{chosen[c]}/{s}" for c, s in pairs]


def _selection(argument: str, values: Sequence, accepted: Sequence) -> tuple:
    """``values`` as a tuple, or a ``ValueError`` naming the argument and what it accepts."""
    values = (values,) if isinstance(values, (str, int, np.integer)) else tuple(values)
    unknown = [v for v in values if v not in accepted or isinstance(v, bool)]
    if unknown or not values or len(set(values)) != len(values):
        problem = f"unknown {unknown}" if unknown else "empty" if not values else "repeated values"
        raise ValueError(f"{argument} must be distinct values from {list(accepted)}, got {list(values)} ({problem})")
    return values


def _open(path: Path, hint: str) -> np.ndarray:
    """Maps a ``.npy`` file, turning numpy's errors (truncated file, bad header) into one naming the file."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise FileNotFoundError(f"{path} is corrupt: not a whole .npy array, perhaps truncated ({error}); "
                                f"{hint}") from error
