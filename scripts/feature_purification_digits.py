"""The clean-then-adversarial experiment of Feature Purification (Allen-Zhu & Li, FOCS 2021) on the 8x8 digits.

    .venv/bin/python scripts/feature_purification_digits.py [--out DIR] [--clean_epochs N] [--adversarial_epochs M]
                                                            [--adversarial_lr LR]

Runs the two recipes through the command line's own code (``lit_robust.cli.main``), as
``python train.py fit --config ...`` would: stage 1, ``configs/feature_purification_digits_clean.yaml``
(standard training of SmallCNN(width=16), 20 epochs, FeaturePurificationProbe against the initialization, writes
``checkpoints/feature_purification_digits/clean.ckpt``); stage 2, ``configs/feature_purification_digits.yaml``
(PGD-AT, Linf 0.2, PGD-10, 20 epochs, started from that checkpoint, probe against the clean weights and the
clean run's initialization; ``--adversarial_lr`` replaces its SGD learning rate, 0.05). Each stage is tested
after fit (clean and PGD-20 accuracy on the 359 test digits).

Writes into ``--out`` (default ``lightning_logs/feature_purification_digits``): ``curves_all.png`` and
``curves_<first layer>.png`` (the probe's per-epoch statistics, clean stage then adversarial stage),
``filters.png`` (first-layer filters at initialization, after clean training, after adversarial training; also
one PNG each), ``results.json`` (the probe's values at the end of each stage, test accuracies, timings) and the
two runs' TensorBoard logs (``clean/``, ``adversarial/``). About 40 seconds on one CPU thread (seed 0).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import matplotlib
import torch
import yaml
from torchvision.utils import save_image

from lit_robust.callbacks import FeaturePurificationProbe
from lit_robust.callbacks.feature_purification import TAG, filter_grid, probed_layers
from lit_robust.cli import main as cli_main

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

ROOT = Path(__file__).resolve().parents[1]
CLEAN, ADVERSARIAL = "configs/feature_purification_digits_clean.yaml", "configs/feature_purification_digits.yaml"
STATS = ("cos_init", "cos_ref", "feature_share", "residual_ratio", "stable_rank", "energy_top1", "energy_top5",
         "update_norm")
TEST_KEYS = ("test/clean_acc", "test/robust_acc")


def run_stage(config: str, out: Path, epochs: int, *overrides: str) -> dict:
    """Fits (and tests) one recipe; returns its probe, module, test accuracies and wall time."""
    start = time.time()
    cli = cli_main(["fit", "--config", config, f"--trainer.default_root_dir={out}", f"--trainer.max_epochs={epochs}",
                    *overrides])
    probe = next(c for c in cli.trainer.callbacks if isinstance(c, FeaturePurificationProbe))
    tested = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k in TEST_KEYS}
    return {"probe": probe, "module": cli.model, "trainer": cli.trainer, "test": tested, "seconds": time.time() - start}


def config_lr(config: str) -> float:
    return float(yaml.safe_load(Path(config).read_text())["model"]["init_args"]["optimizer"]["init_args"]["lr"])


def plot_curves(clean: list[dict], adversarial: list[dict], layer: str, path: Path) -> None:
    """One panel per statistic: the clean stage (against the initialization) then the adversarial one (against
    the clean weights), epochs counted across both."""
    offset = clean[-1]["epoch"]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7), constrained_layout=True)
    for ax, stat in zip(axes.flat, STATS):
        key = f"{TAG}/{layer}/{stat}"
        for history, shift, label, colour in ((clean, 0, "clean (ref = init)", "tab:blue"),
                                              (adversarial, offset, "PGD-AT (ref = clean)", "tab:red")):
            points = [(h["epoch"] + shift, h[key]) for h in history if not math.isnan(h[key])]
            ax.plot(*zip(*points), marker=".", color=colour, label=label)
        ax.axvline(offset, color="grey", linestyle="--", linewidth=1)
        ax.set_title(stat)
        ax.set_xlabel("epoch")
    axes.flat[0].legend()
    fig.suptitle(f"FeaturePurificationProbe on digits, {layer}: clean training, then PGD-AT from the clean model")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_filters(grids: dict[str, torch.Tensor], out: Path) -> dict[str, str]:
    """Each grid as its own PNG, and the three side by side in ``filters.png``."""
    paths = {}
    fig, axes = plt.subplots(1, len(grids), figsize=(4 * len(grids), 4.4), constrained_layout=True)
    for ax, (name, grid) in zip(axes, grids.items()):
        paths[name] = str(out / f"filters_{name}.png")
        save_image(grid, paths[name])
        ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle("first-layer filters (each min-max normalised)")
    paths["side_by_side"] = str(out / "filters.png")
    fig.savefig(paths["side_by_side"], dpi=100)
    plt.close(fig)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="lightning_logs/feature_purification_digits")
    parser.add_argument("--clean_epochs", type=int, default=20)
    parser.add_argument("--adversarial_epochs", type=int, default=20)
    parser.add_argument("--adversarial_lr", type=float, help="stage 2's SGD learning rate (default: the config's)")
    args = parser.parse_args()
    os.chdir(ROOT)  # the recipes name checkpoints/feature_purification_digits/clean.ckpt relative to the repository
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))

    clean = run_stage(CLEAN, out / "clean", args.clean_epochs)
    first = next(iter(probed_layers(clean["module"].model)))
    grids = {"init": filter_grid(clean["probe"].init_weights[first]),
             "clean": clean["probe"].filter_picture(clean["trainer"], clean["module"])}
    lr = [] if args.adversarial_lr is None else [f"--model.init_args.optimizer.init_args.lr={args.adversarial_lr}"]
    adversarial = run_stage(ADVERSARIAL, out / "adversarial", args.adversarial_epochs, *lr)
    grids["adversarial"] = adversarial["probe"].filter_picture(adversarial["trainer"], adversarial["module"])

    files = {f"curves_{layer}": str(out / f"curves_{layer}.png") for layer in ("all", first)}
    for layer in ("all", first):
        plot_curves(clean["probe"].history, adversarial["probe"].history, layer, Path(files[f"curves_{layer}"]))
    files.update(save_filters({k: v for k, v in grids.items() if v is not None}, out))

    def end_of(stage: dict) -> dict:
        last = stage["probe"].history[-1]
        return {k: v for k, v in last.items() if k.startswith((f"{TAG}/all/", f"{TAG}/{first}/")) or k == "epoch"}

    results = {
        "experiment": "clean training, then PGD-AT from the clean checkpoint (Allen-Zhu & Li, arXiv:2005.10190)",
        "configs": {"clean": CLEAN, "adversarial": ADVERSARIAL},
        "epochs": {"clean": args.clean_epochs, "adversarial": args.adversarial_epochs},
        "adversarial_lr": args.adversarial_lr or config_lr(ADVERSARIAL),
        "test": {"clean_stage": clean["test"], "adversarial_stage": adversarial["test"]},
        "probe_end_of_clean_stage (reference = init)": end_of(clean),
        "probe_end_of_adversarial_stage (reference = clean)": end_of(adversarial),
        "seconds": {"clean": round(clean["seconds"], 1), "adversarial": round(adversarial["seconds"], 1)},
        "device": f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "files": files,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\n{'statistic':<40}{'end of clean':>14}{'end of PGD-AT':>15}")
    for key in end_of(clean):
        if key != "epoch":
            print(f"{key:<40}{end_of(clean)[key]:>14.4f}{end_of(adversarial)[key]:>15.4f}")
    for key in TEST_KEYS:
        print(f"{key:<40}{clean['test'].get(key, math.nan):>14.4f}{adversarial['test'].get(key, math.nan):>15.4f}")
    print(f"wrote {out / 'results.json'} and " + ", ".join(files.values()))


if __name__ == "__main__":
    main()
