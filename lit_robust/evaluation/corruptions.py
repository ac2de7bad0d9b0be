"""Accuracy under common corruptions (CIFAR-10-C / CIFAR-100-C / ImageNet-C), per corruption and severity.

Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations", ICLR 2019 (https://arxiv.org/abs/1903.12261). The number usually reported for
CIFAR-10-C (and RobustBench's ``corruptions`` threat model) is the accuracy averaged over the 15
benchmark corruptions x 5 severities: :attr:`CorruptionResult.mean`. The paper's mCE is not
computed: it is normalised by AlexNet's errors, which exist for ImageNet-C only.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import fmean
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from lit_robust.attacks.pgd import module_mode


@dataclass
class CorruptionResult:
    """Accuracies per ``corruption -> severity``, with the number of images each was measured on.

    Dictionaries keep the evaluation order (the DataModule's ``corruptions`` and ``severities``).
    ``dataset`` names the benchmark (``"CIFAR-10-C"``, ``"CIFAR-100-C"``) when known.
    """

    accuracy: dict[str, dict[int, float]]
    counts: dict[str, dict[int, int]]
    clean_accuracy: Optional[float] = None
    dataset: Optional[str] = None

    @property
    def mean(self) -> float:
        """The corruption accuracy: the unweighted mean over every (corruption, severity) pair."""
        return fmean(a for by_severity in self.accuracy.values() for a in by_severity.values())

    @property
    def per_corruption(self) -> dict[str, float]:
        """Each corruption's accuracy averaged over its severities."""
        return {name: fmean(by_severity.values()) for name, by_severity in self.accuracy.items()}

    @property
    def per_severity(self) -> dict[int, float]:
        """Each severity's accuracy averaged over the corruptions evaluated at it."""
        severities = list(dict.fromkeys(s for by_severity in self.accuracy.values() for s in by_severity))
        return {s: fmean(by[s] for by in self.accuracy.values() if s in by) for s in severities}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary (severity keys as strings, as JSON requires), means included."""
        return {
            "dataset": self.dataset,
            "mean": self.mean,
            "clean_accuracy": self.clean_accuracy,
            "per_corruption": self.per_corruption,
            "per_severity": {str(s): a for s, a in self.per_severity.items()},
            "accuracy": {c: {str(s): float(a) for s, a in by.items()} for c, by in self.accuracy.items()},
            "counts": {c: {str(s): int(n) for s, n in by.items()} for c, by in self.counts.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CorruptionResult":
        """The inverse of :meth:`to_dict` (the derived means are recomputed, not read)."""
        return cls(accuracy={c: {int(s): float(a) for s, a in by.items()} for c, by in data["accuracy"].items()},
                   counts={c: {int(s): int(n) for s, n in by.items()} for c, by in data["counts"].items()},
                   clean_accuracy=data.get("clean_accuracy"), dataset=data.get("dataset"))


def corruption_accuracy(
    model: nn.Module,
    datamodule: Any,
    device: Optional[Union[str, torch.device]] = None,
    clean_accuracy: Optional[float] = None,
) -> CorruptionResult:
    """Top-1 accuracy of ``model`` on every (corruption, severity) pair of a corruption DataModule.

    Args:
        model: maps [0, 1] images to logits. It is not moved: it must already sit on ``device``.
            It runs with every submodule in eval mode (each ``training`` flag restored
            afterwards), under ``torch.no_grad``, in fp32 (autocast disabled).
        datamodule: a :class:`~lit_robust.datamodules.CIFAR10CDataModule`,
            :class:`~lit_robust.datamodules.CIFAR100CDataModule` or
            :class:`~lit_robust.datamodules.ImageNetCDataModule`, either layout: ``combined=True``
            (one loader of ``(x, y, corruption_index, severity)`` batches) or ``combined=False``
            (one ``(x, y)`` loader per entry of ``test_names``). Any object with ``corruptions``,
            ``severities``, ``test_names`` and a ``test_dataloader`` of either layout works. Unless
            it is set up already (``labels`` loaded), ``prepare_data`` (which downloads only if the
            DataModule was built with ``download=True``) and ``setup("test")`` are called.
            With ``on_device=True`` and no Trainer, the DataModule keeps its images on the CPU;
            batches are then copied to ``device`` like any other.
        device: where batches go and counts accumulate; default the device of the model's first
            parameter or buffer (the CPU for a model with neither).
        clean_accuracy: the model's accuracy on the clean test set, stored in the result (for
            reports); not measured here.

    Correct predictions and images are counted per pair on ``device`` with ``index_add_``: no
    host synchronisation per batch, one transfer at the end.

    Raises:
        ValueError: ``clean_accuracy`` outside [0, 1], ``datamodule`` lacking the attributes
            above, a per-pair loader list that does not match ``test_names``, a batch that is not
            floating point, images tagged with a corruption or severity outside the selection,
            or a pair that received no image (checked once, after the last batch).
    """
    if clean_accuracy is not None and not 0 <= clean_accuracy <= 1:
        raise ValueError(f"clean_accuracy must be in [0, 1] or None, got {clean_accuracy}")
    missing = [a for a in ("corruptions", "severities", "test_names", "test_dataloader") if not hasattr(datamodule, a)]
    if missing:
        raise ValueError(f"datamodule must be a corruption DataModule such as CIFAR10CDataModule (with corruptions, "
                         f"severities, test_names and test_dataloader), got {type(datamodule).__name__} lacking "
                         f"{', '.join(missing)}")
    if getattr(datamodule, "labels", None) is None:
        if hasattr(datamodule, "prepare_data"):
            datamodule.prepare_data()
        if hasattr(datamodule, "setup"):
            datamodule.setup("test")
    device = torch.device(device) if device is not None else _model_device(model)
    corruptions, severities = list(datamodule.corruptions), [int(s) for s in datamodule.severities]
    n_pairs = len(corruptions) * len(severities)
    # Pair index = corruption index * S + position of the severity in the selection; an image outside
    # the selection goes to the extra last bin (checked once at the end, not per batch).
    position = torch.full((max(severities) + 2,), -1, dtype=torch.long)
    position[severities] = torch.arange(len(severities))
    position = position.to(device)
    correct = torch.zeros(n_pairs + 1, dtype=torch.long, device=device)
    seen = torch.zeros(n_pairs + 1, dtype=torch.long, device=device)

    def pair_index(c: Tensor, s: Tensor) -> Tensor:
        j = position[s.clamp(0, len(position) - 1)]
        return torch.where((j >= 0) & (c >= 0) & (c < len(corruptions)), c * len(severities) + j, n_pairs)

    def count(logits: Tensor, y: Tensor, pair: Tensor) -> None:
        correct.index_add_(0, pair, (logits.argmax(1) == y).long())
        seen.index_add_(0, pair, torch.ones_like(pair))

    loaders = datamodule.test_dataloader()
    with module_mode(model, "eval"), torch.no_grad(), torch.autocast(device.type, enabled=False):
        if isinstance(loaders, (list, tuple)):  # combined=False: loader i serves test_names[i]
            if len(loaders) != len(datamodule.test_names):
                raise ValueError(f"datamodule.test_dataloader() returned {len(loaders)} loaders for "
                                 f"{len(datamodule.test_names)} test_names")
            for name, loader in zip(datamodule.test_names, loaders):
                corruption, severity = name.rsplit("/", 1)
                p = corruptions.index(corruption) * len(severities) + severities.index(int(severity))
                for x, y in loader:
                    y = y.to(device, non_blocking=True)
                    count(model(_float(x.to(device, non_blocking=True))), y, torch.full_like(y, p))
        else:
            for x, y, c, s in loaders:
                y, c, s = (t.to(device, non_blocking=True) for t in (y, c, s))
                count(model(_float(x.to(device, non_blocking=True))), y, pair_index(c, s))
    correct, seen = torch.stack([correct, seen]).tolist()  # the one host transfer
    if seen[n_pairs]:
        raise ValueError(f"the datamodule's test loader served {seen[n_pairs]} images whose corruption index or "
                         f"severity lies outside its corruptions {corruptions} and severities {severities}")
    empty = [f"{corruptions[p // len(severities)]}/{severities[p % len(severities)]}" for p in range(n_pairs)
             if not seen[p]]
    if empty:
        raise ValueError(f"the datamodule's test loader served no image for {', '.join(empty)}")
    accuracy, counts = {}, {}
    for ci, corruption in enumerate(corruptions):
        pairs = [(s, ci * len(severities) + j) for j, s in enumerate(severities)]
        accuracy[corruption] = {s: correct[p] / seen[p] for s, p in pairs}
        counts[corruption] = {s: seen[p] for s, p in pairs}
    return CorruptionResult(accuracy, counts, None if clean_accuracy is None else float(clean_accuracy),
                            getattr(datamodule, "base_folder", None))


def _model_device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _float(x: Tensor) -> Tensor:
    """fp32 images (the DataModules serve fp32 already; a reduced-precision batch is widened)."""
    if not x.is_floating_point():
        raise ValueError(f"the datamodule must serve [0, 1] float images, got a {x.dtype} batch")
    return x if x.dtype == torch.float32 else x.float()
