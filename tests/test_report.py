"""write_report: report.json, report.md and the PNG plots, each only for the parts given."""

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.image import imread

from lit_robust.evaluation import report as report_module
from lit_robust.evaluation.corruptions import CorruptionResult
from lit_robust.evaluation.report import write_report

ROBUSTNESS = {"eps": 8 / 255, "norm": "linf", "n_examples": 1000, "seed": 0, "tiers": ("pgd", "apgd", "autoattack"),
              "settings": {"pgd_steps": 50, "restarts": 1, "version": "standard"},
              "accuracy": {"clean": 0.9, "pgd": 0.5, "apgd-ce": 0.48, "apgd-t": 0.46, "autoattack": 0.4512,
                           "worst_case": 0.4498}}
SANITY = [{"name": "stronger_attack_not_worse", "passed": True, "status": "pass",
           "numbers": {"pgd10": 0.5, "pgd50": 0.49}, "message": "more steps lower accuracy"},
          {"name": "unbounded_attack_reaches_zero", "passed": False, "status": "warn", "numbers": {"accuracy": 0.12},
           "message": "eps=1 | left 12% correct: gradient masking?"}]
EPS_CURVE = {8 / 255: 0.45, 0.0: 0.9, 2 / 255: 0.75, 16 / 255: 0.1}
CORRUPTIONS = CorruptionResult({"gaussian_noise": {s: 0.5 + 0.05 * s for s in range(1, 6)},
                                "fog": {s: 0.9 - 0.1 * s for s in range(1, 6)}},
                               {name: dict.fromkeys(range(1, 6), 10000) for name in ("gaussian_noise", "fog")},
                               clean_accuracy=0.9, dataset="CIFAR-10-C")
ENVIRONMENT = ("lit_robust_version", "torch_version", "python_version", "device", "timestamp_utc")


def _full(out: Path) -> dict:
    return write_report(out, robustness=ROBUSTNESS, sanity=SANITY, eps_curve=EPS_CURVE, eps_curve_attack="PGD-20",
                        corruptions=CORRUPTIONS,
                        metadata={"checkpoint": Path("runs/best.ckpt"), "command": "lit-robust evaluate"})


def test_a_full_report_holds_every_part(tmp_path):
    rc = dict(matplotlib.rcParams)
    paths = _full(tmp_path / "new" / "report")
    assert paths == {"json": tmp_path / "new/report/report.json", "markdown": tmp_path / "new/report/report.md",
                     "eps_plot": tmp_path / "new/report/robust_accuracy_vs_eps.png",
                     "heatmap": tmp_path / "new/report/cifar10c_heatmap.png"}
    assert sorted(p.name for p in (tmp_path / "new/report").iterdir()) == sorted(p.name for p in paths.values())
    assert dict(matplotlib.rcParams) == rc  # nothing global changed by plotting

    data = json.loads(paths["json"].read_text())
    assert set(data) == {"metadata", "robustness", "sanity", "eps_curve", "corruptions"}
    assert data["robustness"] == {**ROBUSTNESS, "tiers": list(ROBUSTNESS["tiers"])}
    assert data["sanity"] == SANITY
    assert data["eps_curve"] == {"attack": "PGD-20",
                                 "points": [{"eps": e, "accuracy": EPS_CURVE[e]} for e in sorted(EPS_CURVE)]}
    expected = json.loads(json.dumps(CORRUPTIONS.to_dict()))
    assert expected["per_severity"]["2"] == 0.6499999999999999
    expected["per_severity"]["2"] = 0.65  # float noise is not written
    assert data["corruptions"] == expected
    assert data["corruptions"]["mean"] == pytest.approx(0.625)
    meta = data["metadata"]
    assert meta["checkpoint"] == "runs/best.ckpt" and meta["command"] == "lit-robust evaluate"
    assert meta["torch_version"] == torch.__version__ and meta["lit_robust_version"]
    assert meta["python_version"].count(".") == 2 and meta["device"].startswith(("cpu", "cuda"))
    stamp = datetime.fromisoformat(meta["timestamp_utc"])
    assert stamp.utcoffset() == timedelta(0) and abs(datetime.now(timezone.utc) - stamp) < timedelta(minutes=5)

    md = paths["markdown"].read_text()
    for text in ("90.00%", "50.00%", "48.00%", "46.00%", "45.12%", "**44.98%**",  # the accuracy table
                 "0.03137 (8/255)", "linf", "pgd, apgd, autoattack", "| pgd_steps | 50 |",  # threat model, settings
                 "| stronger_attack_not_worse | PASS | pgd10=0.5, pgd50=0.49 |",
                 "| unbounded_attack_reaches_zero | WARN |",
                 "eps=1 \\| left 12%", "1 of 2 checks passed; warnings: unbounded_attack_reaches_zero",
                 "| eps | PGD-20 accuracy |", "| 0.06275 (16/255) | 10.00% |",
                 "![robust accuracy vs eps](robust_accuracy_vs_eps.png)",
                 "## CIFAR-10-C", "**62.50%**", "clean accuracy 90.00%",
                 "| corruption | severity 1 | severity 2 | severity 3 | severity 4 | severity 5 | mean |",
                 "| gaussian_noise | 55.00% | 60.00% | 65.00% | 70.00% | 75.00% | 65.00% |",
                 "| fog | 80.00% | 70.00% | 60.00% | 50.00% | 40.00% | 60.00% |",
                 "| **mean** | 67.50% | 65.00% | 62.50% | 60.00% | 57.50% | **62.50%** |",
                 "![CIFAR-10-C accuracy](cifar10c_heatmap.png)", "| checkpoint | runs/best.ckpt |",
                 f"| torch_version | {torch.__version__} |", *(f"| {key} |" for key in ENVIRONMENT)):
        assert text in md, text
    for line in md.splitlines():  # every table row has as many cells as its header
        if line.startswith("|"):
            assert line.count(" | ") in {0, 1, 3, 6}, line

    for name, min_size in (("eps_plot", (400, 600)), ("heatmap", (200, 600))):
        image = imread(paths[name])
        assert image.ndim == 3 and image.shape[0] >= min_size[0] and image.shape[1] >= min_size[1], image.shape
        assert image[..., :3].std() > 0.05  # something is drawn


def test_the_heatmap_grows_with_the_corruptions(tmp_path):
    many = CorruptionResult({f"c{i}": {s: i / 15 for s in range(1, 6)} for i in range(15)},
                            {f"c{i}": dict.fromkeys(range(1, 6), 1) for i in range(15)})
    small = imread(write_report(tmp_path / "a", corruptions=CORRUPTIONS)["heatmap"])
    large = imread(write_report(tmp_path / "b", corruptions=many)["heatmap"])
    assert large.shape[0] > 2 * small.shape[0] and large.shape[1] == small.shape[1]


@pytest.mark.parametrize("part", ["robustness", "sanity", "eps_curve", "corruptions", None])
def test_only_the_parts_given_are_written(tmp_path, part):
    given = {"robustness": ROBUSTNESS, "sanity": SANITY, "eps_curve": EPS_CURVE, "corruptions": CORRUPTIONS}
    paths = write_report(tmp_path, **({part: given[part]} if part else {}))
    plots = {"eps_curve": {"eps_plot"}, "corruptions": {"heatmap"}}.get(part, set())
    assert set(paths) == {"json", "markdown"} | plots
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths.values())
    data = json.loads(paths["json"].read_text())
    assert set(data) == {"metadata"} | ({part} if part else set())
    assert all(key in data["metadata"] for key in ENVIRONMENT)
    md = paths["markdown"].read_text()
    sections = {"robustness": "## Robust accuracy\n", "sanity": "## Sanity checks",
                "eps_curve": "## Robust accuracy vs eps", "corruptions": "## CIFAR-10-C"}
    for name, heading in sections.items():
        assert (heading in md) == (name == part), (name, heading)
    assert md.startswith("# Robustness report") and "## Environment" in md


def test_metadata_wins_over_the_environment_and_the_version_falls_back(tmp_path, monkeypatch):
    def missing(name):
        raise report_module.importlib_metadata.PackageNotFoundError(name)

    monkeypatch.setattr(report_module.importlib_metadata, "version", missing)
    data = json.loads(write_report(tmp_path, metadata={"device": "NVIDIA H200 (evaluation host)", "seed": 3})["json"]
                      .read_text())
    assert data["metadata"]["device"] == "NVIDIA H200 (evaluation host)" and data["metadata"]["seed"] == 3
    assert data["metadata"]["lit_robust_version"] == "unknown"
    assert data["metadata"]["torch_version"] == torch.__version__


def test_the_json_is_strict(tmp_path):
    robustness = {"eps": np.float32(0.5), "norm": "l2", "accuracy": {"clean": torch.tensor(0.875), "pgd": float("nan"),
                                                                     "apgd-ce": np.float64(0.5)}}
    paths = write_report(tmp_path, robustness=robustness, eps_curve={np.float64(0.25): torch.tensor(0.5)},
                         metadata={"tags": {"a", }, "shape": (1, 2)})
    text = paths["json"].read_text()
    assert "NaN" not in text
    data = json.loads(text)
    assert data["robustness"] == {"eps": 0.5, "norm": "l2", "accuracy": {"clean": 0.875, "pgd": None, "apgd-ce": 0.5}}
    assert data["eps_curve"] == {"attack": None, "points": [{"eps": 0.25, "accuracy": 0.5}]}
    assert data["metadata"]["tags"] == ["a"] and data["metadata"]["shape"] == [1, 2]
    md = paths["markdown"].read_text()
    assert "| clean | 87.50% |" in md and "| pgd | nan |" in md and "eps: 0.5," in md
    assert imread(paths["eps_plot"]).shape[0] > 100


def test_the_eps_curve_names_its_attack_beside_the_worst_case(tmp_path, monkeypatch):
    """The curve is one attack (PGD-20), the headline the worst case over tiers: the plot and table say which."""
    figures = []
    make = report_module._figure
    monkeypatch.setattr(report_module, "_figure", lambda *size: figures.append(make(*size)) or figures[-1])
    write_report(tmp_path, robustness=ROBUSTNESS, eps_curve=EPS_CURVE, eps_curve_attack="PGD-20")
    legend = [t.get_text() for t in figures[0].axes[0].get_legend().get_texts()]
    assert legend == ["PGD-20 accuracy", "evaluated eps 0.03137 (8/255)", "worst case over tiers (45.0%)"]
    md = (tmp_path / "report.md").read_text()
    assert "| eps | PGD-20 accuracy |" in md and "the per-example worst case over the tiers" in md


def test_json_numbers_and_keys_lose_float_noise(tmp_path):
    """``3 * 0.1`` is written 0.3 (values and keys), while 8/255 keeps every digit."""
    eps = 0.1
    curve = {m * eps: 1 - m / 4 for m in (0, 1, 3)}  # 3 * 0.1 == 0.30000000000000004
    sanity = [{"name": "x", "passed": True, "numbers": {"unbounded_eps": 3 * eps, "acc": 0.1 + 0.2}}]
    text = write_report(tmp_path, robustness={"eps": 8 / 255, "by_eps": {3 * eps: 0.5}}, sanity=sanity,
                        eps_curve=curve)["json"].read_text()
    assert "0000000000" not in text, text
    data = json.loads(text)
    assert [p["eps"] for p in data["eps_curve"]["points"]] == [0.0, 0.1, 0.3]
    assert data["sanity"][0]["numbers"] == {"unbounded_eps": 0.3, "acc": 0.3}
    assert data["robustness"] == {"eps": 8 / 255, "by_eps": {"0.3": 0.5}}
