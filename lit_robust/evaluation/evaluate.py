"""One call for a publishable evaluation of any classifier: tiers, sanity checks, eps curve, CIFAR-10-C, report.

``evaluate(model, data, out_dir)`` is what ``lit-robust evaluate`` runs after loading a
checkpoint; it works on any ``nn.Module`` mapping [0, 1] images to logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from lit_robust.evaluation.corruptions import corruption_accuracy
from lit_robust.evaluation.report import write_report
from lit_robust.evaluation.sanity import accuracy_vs_eps, gradient_masking_checks
from lit_robust.evaluation.tiers import DEFAULT_EPS, TIERS, evaluate_robustness

EPS_CURVE_MULTIPLES = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)


def evaluate(
    model: nn.Module,
    data: Any,
    out_dir: Optional[Union[str, Path]] = None,
    *,
    eps: Optional[float] = None,
    norm: str = "linf",
    tiers: Sequence[str] = TIERS,
    n_examples: Optional[int] = None,
    subset_seed: Optional[int] = None,
    seed: int = 0,
    batch_size: int = 500,
    device: Optional[Union[str, torch.device]] = None,
    sanity_examples: int = 500,
    eps_curve: bool = True,
    corruptions: Any = None,
    metadata: Optional[dict] = None,
) -> dict[str, Any]:
    """Robust accuracy per tier and worst case, gradient-masking checks, accuracy vs eps, CIFAR-10-C.

    Args:
        model, data, eps, norm, tiers, n_examples, subset_seed, seed, batch_size, device: as in
            :func:`~lit_robust.evaluation.tiers.evaluate_robustness` (RobustBench defaults:
            the whole data, eps 8/255 Linf or 0.5 L2, the standard AutoAttack).
        out_dir: where ``report.json``, ``report.md`` and the plots go (None: no files).
        sanity_examples: the first examples the sanity checks and the eps curve use (0: skip
            both); they run many attacks, so a few hundred examples are the usual budget.
        eps_curve: PGD-20 accuracy at ``EPS_CURVE_MULTIPLES`` of eps, on those examples.
        corruptions: a ``CIFAR10CDataModule`` / ``CIFAR100CDataModule`` to also measure
            accuracy per corruption and severity.
        metadata: merged into the report (checkpoint path, command, ...).

    Returns ``{"robustness": dict, "sanity": [dict], "eps_curve": {eps: acc}, "corruptions":
    dict | None, "files": {name: path}}``.
    """
    eps = DEFAULT_EPS[norm] if eps is None else float(eps)
    robustness = evaluate_robustness(model, data, eps, norm, tiers, n_examples, subset_seed, seed, batch_size, device)
    results: dict[str, Any] = {"robustness": robustness.to_dict(), "sanity": None, "eps_curve": None,
                               "corruptions": None, "files": {}}
    if sanity_examples > 0:
        x, y = _first_examples(data, sanity_examples, device or _device_of(model))
        results["sanity"] = [c.to_dict() for c in gradient_masking_checks(model, x, y, eps, norm, seed)]
        if eps_curve:
            results["eps_curve"] = accuracy_vs_eps(model, x, y, [m * eps for m in EPS_CURVE_MULTIPLES], norm,
                                                   seed=seed)
    corruption_result = None
    if corruptions is not None:
        corruption_result = corruption_accuracy(model, corruptions, device,
                                                clean_accuracy=results["robustness"]["accuracy"]["clean"])
        results["corruptions"] = corruption_result.to_dict()
    if out_dir is not None:
        results["files"] = write_report(out_dir, robustness=results["robustness"], sanity=results["sanity"],
                                        eps_curve=results["eps_curve"], corruptions=corruption_result,
                                        metadata=metadata)
    return results


def _device_of(model: nn.Module) -> torch.device:
    return next(iter(model.parameters()), torch.zeros(())).device


def _first_examples(data: Any, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The first ``n`` examples of an ``(x, y)`` pair or of an iterable of ``(x, y, *extra)`` batches."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
        return data[0][:n].to(device), data[1][:n].to(device)
    xs, ys, count = [], [], 0
    for batch in data:
        xs.append(batch[0])
        ys.append(batch[1])
        count += len(batch[1])
        if count >= n:
            break
    return torch.cat(xs)[:n].to(device), torch.cat(ys)[:n].to(device)
