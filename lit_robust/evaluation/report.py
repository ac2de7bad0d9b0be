"""A robustness report on disk: ``report.json`` for machines, ``report.md`` for people, PNG plots.

The inputs are plain dictionaries (and a :class:`~lit_robust.evaluation.corruptions.CorruptionResult`),
so this module depends on no evaluation code: whatever produced the numbers, the report only
formats them, adds the environment it was written in, and writes only the parts it was given.
"""

from __future__ import annotations

import json
import math
import platform
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Optional, Union

import torch

from lit_robust.evaluation.corruptions import CorruptionResult

JSON_NAME, MARKDOWN_NAME = "report.json", "report.md"
EPS_PLOT_NAME, HEATMAP_NAME = "robust_accuracy_vs_eps.png", "cifar10c_heatmap.png"


def write_report(
    out_dir: Union[str, Path],
    *,
    robustness: Optional[dict] = None,
    sanity: Optional[list[dict]] = None,
    eps_curve: Optional[dict[float, float]] = None,
    eps_curve_attack: Optional[str] = None,
    corruptions: Optional[CorruptionResult] = None,
    metadata: Optional[dict] = None,
) -> dict[str, Path]:
    """Writes the report into ``out_dir`` (created if needed) and returns the paths written.

    Args:
        robustness: the adversarial evaluation, e.g. ``{"eps": 8/255, "norm": "linf",
            "n_examples": 1000, "seed": 0, "tiers": [...], "settings": {...}, "accuracy":
            {"clean": 0.9, "pgd": 0.5, ..., "worst_case": 0.45}}`` (accuracies as fractions).
        sanity: gradient-masking checks, each ``{"name", "passed", "status": "pass" | "warn",
            "numbers": {...}, "message"}``.
        eps_curve: ``eps -> robust accuracy``.
        eps_curve_attack: the attack that measured ``eps_curve`` (e.g. ``"PGD-20"``), named in the
            plot's legend, the table's header and the JSON: the curve is one attack, while the
            headline is the worst case over the tiers (marked on the plot at the evaluated eps).
        corruptions: the CIFAR-10-C (or -100-C) result.
        metadata: merged over the environment collected here (``lit_robust_version``,
            ``torch_version``, ``lightning_version``, ``pyautoattack_version``, ``cuda_version``,
            ``python_version``, ``platform``, ``device``, ``timestamp_utc``); its keys win, so a
            caller can name e.g. the device the evaluation actually ran on. Add the checkpoint
            path and the command here.

    Returns:
        ``{"json": .../report.json, "markdown": .../report.md}`` always, plus ``"eps_plot"``
        (``robust_accuracy_vs_eps.png``) with ``eps_curve`` and ``"heatmap"``
        (``cifar10c_heatmap.png``) with ``corruptions``. Sections and plots of parts not given
        are left out (an older plot of that name in ``out_dir`` is left alone).

    ``report.json`` holds ``metadata`` and each given part: ``robustness`` and ``sanity`` as given,
    ``eps_curve`` as ``{"attack": eps_curve_attack, "points": [{"eps", "accuracy"}, ...]}`` sorted by
    eps, ``corruptions`` as :meth:`CorruptionResult.to_dict`. It is strict JSON: tuples become lists,
    paths and other objects strings, non-finite numbers ``null``, and floats (keys too) lose their
    rounding noise: ``3 * 0.1`` reads ``0.3``. Plots use Matplotlib's Agg canvas directly
    (no pyplot, no backend switch, no global rcParams change).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = _plain({**environment(), **(metadata or {})})
    robustness, sanity = _plain(robustness), _plain(sanity)
    curve = sorted((float(eps), float(acc)) for eps, acc in eps_curve.items()) if eps_curve is not None else None
    report: dict[str, Any] = {"metadata": meta}
    if robustness is not None:
        report["robustness"] = robustness
    if sanity is not None:
        report["sanity"] = list(sanity)
    if curve is not None:
        report["eps_curve"] = {"attack": eps_curve_attack,
                               "points": [{"eps": eps, "accuracy": acc} for eps, acc in curve]}
    if corruptions is not None:
        report["corruptions"] = corruptions.to_dict()
    paths = {"json": out / JSON_NAME, "markdown": out / MARKDOWN_NAME}
    if curve:
        paths["eps_plot"] = out / EPS_PLOT_NAME
        _plot_eps_curve(paths["eps_plot"], curve, _curve_label(eps_curve_attack), robustness or {})
    if corruptions is not None:
        paths["heatmap"] = out / HEATMAP_NAME
        _plot_heatmap(paths["heatmap"], corruptions)
    paths["json"].write_text(json.dumps(_plain(report, strict=True), indent=2, allow_nan=False) + "\n")
    paths["markdown"].write_text(_markdown(robustness, sanity, curve, _curve_label(eps_curve_attack), corruptions,
                                           meta, paths))
    return paths


def environment() -> dict[str, str]:
    """Versions, device and time of this process, as strings."""
    if torch.cuda.is_available():
        device = f"cuda: {torch.cuda.get_device_name(torch.cuda.current_device())}"
    else:
        device = f"cpu: {platform.processor() or platform.machine() or 'unknown'}"
    return {
        "lit_robust_version": _version("lit_robust"),
        "torch_version": torch.__version__,
        "lightning_version": _version("lightning"),
        "pyautoattack_version": _version("pyautoattack"),
        "cuda_version": str(torch.version.cuda),
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "timestamp_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _version(distribution: str) -> str:
    try:
        return importlib_metadata.version(distribution)
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def _plain(value: Any, strict: bool = False) -> Any:
    """``value`` in JSON's types: string keys, lists, Python numbers (tensor and NumPy scalars unwrapped),
    ``str()`` for anything else; float keys, and with ``strict`` float values, lose their rounding noise
    (:func:`_tidy`); ``strict``: non-finite numbers become None."""
    if isinstance(value, dict):
        return {str(_tidy(k) if isinstance(k, float) else k): _plain(v, strict) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v, strict) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # a NumPy scalar
        value = value.item()
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        if not strict:
            return float(value)
        return _tidy(value) if math.isfinite(value) else None
    return str(value)


def _tidy(value: float) -> float:
    """``value`` rounded to 12 significant digits where that moves it by at most 4 ulps (float arithmetic's
    noise: ``3 * 0.1`` gives 0.3), else ``value`` itself (``8 / 255`` stays exact)."""
    short = float(f"{value:.12g}")
    return short if abs(short - value) <= 4 * math.ulp(value) else float(value)


# --- Markdown --------------------------------------------------------------------------------


def _percent(value: Any) -> str:
    return f"{100 * value:.2f}%" if isinstance(value, (int, float)) and math.isfinite(value) else _cell(value)


def _eps(eps: float) -> str:
    """``0.03137 (8/255)`` when eps is a whole number of 255ths."""
    steps = eps * 255
    return f"{eps:.4g} ({round(steps)}/255)" if eps > 0 and abs(steps - round(steps)) < 1e-6 else f"{eps:.4g}"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, (dict, list, tuple)):
        text = json.dumps(_plain(value, strict=True))
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows), ""]


def _curve_label(attack: Optional[str]) -> str:
    return f"{attack} accuracy" if attack else "robust accuracy"


def _markdown(robustness, sanity, curve, curve_label, corruptions, meta, paths) -> str:
    lines = ["# Robustness report", ""]
    if robustness is not None:
        lines += ["## Robust accuracy", ""]
        threat = [f"{k}: {_eps(v) if k == 'eps' and isinstance(v, (int, float)) else _cell(v)}"
                  for k, v in robustness.items() if k in ("eps", "norm", "n_examples", "seed")]
        if robustness.get("tiers") is not None:
            threat.append("tiers: " + ", ".join(map(str, robustness["tiers"])))
        lines += ([", ".join(threat), ""] if threat else [])
        accuracy = robustness.get("accuracy") or {}
        if accuracy:
            rows = [[f"**{k}**", f"**{_percent(v)}**"] if k == "worst_case" else [_cell(k), _percent(v)]
                    for k, v in accuracy.items()]
            lines += _table(["evaluation", "accuracy"], rows)
        settings = robustness.get("settings") or {}
        if settings:
            lines += ["### Settings", "", *_table(["setting", "value"], [[_cell(k), _cell(v)]
                                                                           for k, v in settings.items()])]
    if sanity is not None:
        lines += ["## Sanity checks (gradient masking)", ""]
        warned = [c for c in sanity if _status(c) != "pass"]
        lines += [f"{len(sanity) - len(warned)} of {len(sanity)} checks passed"
                  + (f"; warnings: {', '.join(_cell(c.get('name')) for c in warned)}" if warned else "") + ".", ""]
        if sanity:
            rows = [[_cell(c.get("name", "")), _status(c).upper(),
                     ", ".join(f"{k}={_cell(v)}" for k, v in (c.get("numbers") or {}).items()),
                     _cell(c.get("message", ""))] for c in sanity]
            lines += _table(["check", "status", "numbers", "message"], rows)
    if curve is not None:
        lines += ["## Robust accuracy vs eps", ""]
        if (robustness or {}).get("accuracy", {}).get("worst_case") is not None:
            lines += [f"{curve_label} at each eps; the headline above is the per-example worst case over the "
                      "tiers.", ""]
        lines += _table(["eps", curve_label], [[_eps(e), _percent(a)] for e, a in curve])
        if "eps_plot" in paths:
            lines += [f"![robust accuracy vs eps]({EPS_PLOT_NAME})", ""]
    if corruptions is not None:
        lines += _corruption_section(corruptions)
    rows = [[_cell(k), _cell(v)] for k, v in meta.items()]
    lines += ["## Environment and metadata", "", *_table(["key", "value"], rows)]
    return "\n".join(lines)


def _status(check: dict) -> str:
    return str(check.get("status") or ("pass" if check.get("passed") else "warn"))


def _corruption_section(result: CorruptionResult) -> list[str]:
    dataset = result.dataset or "common corruptions"
    lines = [f"## {dataset}", "", f"Mean corruption accuracy (all corruptions x severities): "
             f"**{_percent(result.mean)}**" + (f"; clean accuracy {_percent(result.clean_accuracy)}"
                                               if result.clean_accuracy is not None else "") + ".", ""]
    severities = list(result.per_severity)
    rows = [[name, *(_percent(by[s]) if s in by else "" for s in severities), _percent(result.per_corruption[name])]
            for name, by in result.accuracy.items()]
    rows.append(["**mean**", *(_percent(a) for a in result.per_severity.values()), f"**{_percent(result.mean)}**"])
    lines += _table(["corruption", *(f"severity {s}" for s in severities), "mean"], rows)
    return lines + [f"![{dataset} accuracy]({HEATMAP_NAME})", ""]


# --- plots -----------------------------------------------------------------------------------


def _figure(width: float, height: float):
    """A Figure on its own Agg canvas: nothing global (pyplot state, backend, rcParams) is touched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _plot_eps_curve(path: Path, curve: list[tuple[float, float]], label: str, robustness: dict) -> None:
    figure = _figure(5.5, 4)
    ax = figure.add_subplot()
    eps, accuracy = zip(*curve)
    norm = str(robustness.get("norm", "linf"))
    scale = 255 if norm == "linf" else 1  # Linf radii read as k/255; L2 radii as they are
    ax.plot([scale * e for e in eps], [100 * a for a in accuracy], marker="o", label=label)
    evaluated, worst = robustness.get("eps"), (robustness.get("accuracy") or {}).get("worst_case")
    if isinstance(evaluated, (int, float)):
        ax.axvline(scale * evaluated, color="gray", linestyle="--", label=f"evaluated eps {_eps(evaluated)}")
        if isinstance(worst, (int, float)):
            ax.plot([scale * evaluated], [100 * worst], marker="*", markersize=12, linestyle="none", color="C3",
                    label=f"worst case over tiers ({100 * worst:.1f}%)")
    ax.legend()
    ax.set(xlabel="eps (x 1/255)" if scale == 255 else "eps", ylabel="robust accuracy (%)", ylim=(0, 100),
           title=f"Robust accuracy vs eps ({norm})")
    ax.grid(alpha=0.3)
    figure.savefig(path, dpi=120)


def _plot_heatmap(path: Path, result: CorruptionResult) -> None:
    names, severities = list(result.accuracy), list(result.per_severity)
    values = [[100 * result.accuracy[n][s] if s in result.accuracy[n] else math.nan for s in severities]
              for n in names]
    figure = _figure(1.2 * len(severities) + 3.5, 0.42 * len(names) + 1.6)
    ax = figure.add_subplot()
    image = ax.imshow(values, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            if not math.isnan(value):
                ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=8,
                        color="black" if value > 60 else "white")
    ax.set_xticks(range(len(severities)), [str(s) for s in severities])
    ax.set_yticks(range(len(names)), [f"{n} ({100 * result.per_corruption[n]:.1f})" for n in names])
    ax.set(xlabel="severity", title=f"{result.dataset or 'Corruption'} accuracy (%), mean {100 * result.mean:.2f}")
    figure.colorbar(image, ax=ax, label="accuracy (%)")
    figure.savefig(path, dpi=120)
