"""One call for a publishable evaluation of any classifier: tiers, sanity checks, eps curve, CIFAR-10-C, report.

``evaluate(model, data, out_dir)`` is what ``lit-robust evaluate`` runs after loading a
checkpoint; it works on any ``nn.Module`` mapping [0, 1] images to logits, and runs it in eval
mode whatever mode it is given in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from lit_robust.attacks.pgd import module_mode
from lit_robust.batches import BatchKey, split_batch
from lit_robust.evaluation.corruptions import corruption_accuracy
from lit_robust.evaluation.report import write_report
from lit_robust.evaluation.sanity import EPS_GRID, gradient_masking_checks
from lit_robust.evaluation.tiers import DEFAULT_EPS, TIERS, evaluate_robustness


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
    corruptions: Any = None,
    metadata: Optional[dict] = None,
    inputs: BatchKey = 0,
    targets: BatchKey = 1,
    progress: Optional[bool] = None,
) -> dict[str, Any]:
    """Robust accuracy per tier and worst case, gradient-masking checks, accuracy vs eps, CIFAR-10-C.

    The model runs in eval mode throughout (BatchNorm's running statistics, no dropout), as
    published numbers assume: ``evaluate`` sets every submodule's flag itself and restores the
    flags afterwards; the report's metadata says so (``model_mode``).

    Args:
        model, data, eps, norm, tiers, n_examples, subset_seed, seed, batch_size, device: as in
            :func:`~lit_robust.evaluation.tiers.evaluate_robustness` (RobustBench defaults:
            the whole data, eps 8/255 Linf or 0.5 L2, the standard AutoAttack).
        out_dir: where ``report.json``, ``report.md`` and the plots go (None: no files).
        sanity_examples: the first examples the sanity checks and the eps curve use (0: skip
            both); they run many attacks, so a few hundred examples are the usual budget. The
            curve is the monotonicity check's own: PGD-20 at :data:`~lit_robust.evaluation.sanity.EPS_GRID`
            multiples of eps.
        corruptions: a ``CIFAR10CDataModule`` / ``CIFAR100CDataModule`` to also measure
            accuracy per corruption and severity.
        metadata: merged into the report (checkpoint path, command, ...).
        inputs, targets: where the images and labels are in each batch of ``data`` (indices, dict keys
            or callables; :mod:`lit_robust.batches`).
        progress: progress bars for the tiers and the sanity checks (None: only when stderr is
            a terminal).

    Returns ``{"robustness": dict, "sanity": [dict], "eps_curve": {"attack": "PGD-20", "accuracy":
    {eps: acc}}, "corruptions": dict | None, "files": {name: path}}``.
    """
    eps = DEFAULT_EPS[norm] if eps is None else float(eps)
    in_train = sum(m.training for m in model.modules())
    results: dict[str, Any] = {"robustness": None, "sanity": None, "eps_curve": None, "corruptions": None,
                               "files": {}}
    corruption_result = None
    with module_mode(model, "eval"):
        robustness = evaluate_robustness(model, data, eps, norm, tiers, n_examples, subset_seed, seed, batch_size,
                                         device, inputs=inputs, targets=targets, progress=progress)
        results["robustness"] = robustness.to_dict()
        if sanity_examples > 0:
            x, y = _first_examples(data, sanity_examples, device or _device_of(model), (inputs, targets))
            checks = gradient_masking_checks(model, x, y, eps, norm, seed, progress=progress)
            results["sanity"] = [c.to_dict() for c in checks]
            measured = next(c for c in checks if c.curve is not None)  # accuracy_decreases_with_eps
            on_grid = {e: a for e, a in measured.curve.items() if e <= EPS_GRID[-1] * eps}  # not a far unbounded eps
            results["eps_curve"] = {"attack": f"PGD-{measured.numbers['steps']:.0f}", "accuracy": on_grid}
        if corruptions is not None:
            corruption_result = corruption_accuracy(model, corruptions, device,
                                                    clean_accuracy=results["robustness"]["accuracy"]["clean"])
            results["corruptions"] = corruption_result.to_dict()
    if out_dir is not None:
        mode = "eval, set by evaluate" + (f" ({in_train} modules given in train mode; flags restored afterwards)"
                                          if in_train else " (the model was given in eval mode)")
        curve = results["eps_curve"] or {}
        results["files"] = write_report(out_dir, robustness=results["robustness"], sanity=results["sanity"],
                                        eps_curve=curve.get("accuracy"), eps_curve_attack=curve.get("attack"),
                                        corruptions=corruption_result,
                                        metadata={"model_mode": mode, **(metadata or {})})
    return results


def _device_of(model: nn.Module) -> torch.device:
    return next(iter(model.parameters()), torch.zeros(())).device


def _first_examples(data: Any, n: int, device: torch.device, keys: tuple) -> tuple[Tensor, Tensor]:
    """The first ``n`` examples of an ``(x, y)`` pair or of an iterable of batches (read with ``keys``)."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
        return data[0][:n].to(device), data[1][:n].to(device)
    xs, ys, count = [], [], 0
    for batch in data:
        x, y = split_batch(batch, *keys)
        xs.append(x)
        ys.append(y)
        count += len(y)
        if count >= n:
            break
    return torch.cat(xs)[:n].to(device), torch.cat(ys)[:n].to(device)
