"""FGSM-RS on scikit-learn's 8x8 digits: the official MNIST script's recipe against ``FastAT`` through Lightning.

The official MNIST script (locuslab/fast_adversarial, ``MNIST/train_mnist.py``) differs from the CIFAR-10
one in its random start (``U(-eps, eps)`` *not* clipped to the image box before the FGSM gradient) and in
its learning-rate cycle (Adam, lr_max 5e-3, ``np.interp(t, [0, epochs * 2 // 5, epochs], [0, lr_max, 0])``
at ``t = epoch + (i + 1) / len(loader)``, i.e. peaking at 2/5 of training and one iteration ahead). This
script trains, per seed, the same BatchNorm-free CNN (the official ``mnist_net`` shrunk to 8x8 inputs) as

    plain_mnist        a plain PyTorch loop doing exactly what the MNIST script does
    plain_clipped      the same loop with the start clipped to the box (as the CIFAR-10 script does)
    fastat_mnist       FastAT(clip_start=False, lr_peak=0.4, co_guard=False), Adam 5e-3, L.Trainer
    fastat_default     FastAT with clip_start=True, lr_peak=0.5 (its defaults), otherwise as fastat_mnist

and variants that isolate what still differs between ``plain_mnist`` and ``fastat_mnist``:

    fastat_script_lr   fastat_mnist with the script's lr values (the (i + 1) offset, no zero-lr first step)
    plain_library_lr   plain_mnist with FastAT's cycle (``cyclic_lr``: lr 0 at the first step, peak one step later)
    fastat_guard       fastat_mnist with the catastrophic-overfitting guard on (co_guard=True); its check's
                       PGD start draws from the global RNG, so later batches and starts differ from fastat_mnist's
    plain_summed_grad  plain_mnist taking the FGSM gradient of the summed per-example losses, as the library's
                       attacks do, instead of the batch mean (the same sign up to rounding)

Both sides read the 1,258 training images of ``DigitsDataModule(seed=0)`` (the split is fixed; the seed
varies the initialisation, the batch order and the random starts) in shuffled batches of 100, the last
one partial (58), and are seeded the same way (``torch.manual_seed`` and ``np.random.seed``, as the
script does) right before the network is built. Every run records a hash of the label
sequence it trained on and the learning rates of its steps, so one can see whether two variants saw
the same batches in the same order.

Evaluation on the 359 test images, model in eval mode, at the training eps: clean accuracy, PGD-50
(CE, random start, step 2.5 eps / 50, 1 restart) and the reference APGD-CE and APGD-T, through
``lit_robust.evaluation.evaluate_robustness(tiers=("pgd", "apgd"), pgd_steps=50)``; ``worst`` is the
per-example worst case over the three attacks. Besides the per-variant table the script prints each
variant's per-seed difference from ``plain_mnist`` and how many of its runs ended with bit-identical
weights. ``--eps`` sets the radius (the script's 0.3 by default; step 1.25 eps, the script's ratio);
``--append`` adds runs to an existing ``--out`` file. The runs of ``benchmarks/RESULTS.md``:

    .venv/bin/python benchmarks/fast_at_recipes.py --eps 0.3 --epochs 10 30
    .venv/bin/python benchmarks/fast_at_recipes.py --eps 0.2 --epochs 30 --append
    .venv/bin/python benchmarks/fast_at_recipes.py --eps 0.3 --epochs 10 30 --variants plain_summed_grad --append
    .venv/bin/python benchmarks/fast_at_recipes.py --eps 0.2 --epochs 30 --variants plain_summed_grad --append
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.metadata
import json
import logging
import math
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import lightning.pytorch as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, TensorDataset

from lit_robust.datamodules import DigitsDataModule
from lit_robust.defenses import FastAT
from lit_robust.defenses.fast_at import cyclic_lr
from lit_robust.evaluation import evaluate_robustness

# the MNIST script's settings
EPS, LR_MAX, BATCH = 0.3, 5e-3, 100
ALPHA_PER_EPS = 1.25  # the script's alpha 0.375 at eps 0.3
METRICS = ("clean", "pgd50", "apgd_ce", "apgd_t", "worst")


def mnist_net_8x8() -> nn.Module:
    """The official ``mnist_net`` for 8x8 inputs: 8 -> 4 -> 2 pixels after the two strided convolutions."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 4, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 2 * 2, 100), nn.ReLU(),
        nn.Linear(100, 10),
    )


def seeded_net(seed: int) -> nn.Module:
    """Seeds torch and numpy as the MNIST script does, then builds the network (same weights for every variant)."""
    np.random.seed(seed)
    torch.manual_seed(seed)
    return mnist_net_8x8()


def script_lr(epochs: int) -> Callable[[float], float]:
    """The MNIST script's ``lr_schedule(t)``, t in epochs (integer peak ``epochs * 2 // 5``)."""
    return lambda t: float(np.interp([t], [0, epochs * 2 // 5, epochs], [0, LR_MAX, 0])[0])


class Trace:
    """The label sequence (hashed) and per-step learning rates a run trained with."""

    def __init__(self) -> None:
        self.sha1, self.lrs, self.batch_sizes = hashlib.sha1(), [], []
        self.guard_stopped_epoch = None  # FastAT's co_stopped_epoch, with the guard on

    def add(self, y: Tensor, lr: float) -> None:
        self.sha1.update(y.to(torch.int64).numpy().tobytes())
        self.lrs.append(float(lr))
        self.batch_sizes.append(len(y))

    def summary(self) -> dict:
        peak = max(range(len(self.lrs)), key=lambda s: self.lrs[s])
        return {"labels_sha1": self.sha1.hexdigest()[:12], "steps": len(self.lrs), "lr_first": self.lrs[0],
                "lr_second": self.lrs[1], "lr_peak_step": peak, "lr_last": self.lrs[-1],
                "last_batch": self.batch_sizes[-1], "guard_stopped_epoch": self.guard_stopped_epoch}


# --- (a), (b) and plain_library_lr: the MNIST script's loop --------------------------------------------

def train_plain(seed: int, epochs: int, train: tuple[Tensor, Tensor], eps: float, clip_start: bool = False,
                library_lr: bool = False, summed_grad: bool = False) -> tuple[nn.Module, Trace]:
    alpha = ALPHA_PER_EPS * eps
    model = seeded_net(seed)
    loader = DataLoader(TensorDataset(*train), batch_size=BATCH, shuffle=True)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=LR_MAX)
    lr_schedule = script_lr(epochs)
    # FastAT's cycle (LambdaLR, stepped after every optimizer step) in place of the script's lr formula
    scheduler = cyclic_lr(opt, epochs * len(loader), 0.4) if library_lr else None
    trace = Trace()
    for epoch in range(epochs):
        for i, (X, y) in enumerate(loader):
            if scheduler is None:
                opt.param_groups[0].update(lr=lr_schedule(epoch + (i + 1) / len(loader)))
            trace.add(y, opt.param_groups[0]["lr"])
            delta = torch.zeros_like(X).uniform_(-eps, eps)
            if clip_start:
                delta = torch.max(torch.min(1 - X, delta), 0 - X)
            delta.requires_grad = True
            if summed_grad:  # the library's FGSM: gradient of the sum of per-example losses (same sign)
                loss = F.cross_entropy(model(X + delta), y, reduction="none").sum()
            else:
                loss = F.cross_entropy(model(X + delta), y)
            loss.backward()
            grad = delta.grad.detach()
            delta.data = torch.clamp(delta + alpha * torch.sign(grad), -eps, eps)
            delta.data = torch.max(torch.min(1 - X, delta.data), 0 - X)
            delta = delta.detach()
            loss = F.cross_entropy(model(torch.clamp(X + delta, 0, 1)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if scheduler is not None:
                scheduler.step()
    return model, trace


# --- (c), (d), fastat_script_lr, fastat_guard: FastAT through L.Trainer ---------------------------------

class TraceCallback(L.Callback):
    def __init__(self, trace: Trace) -> None:
        self.trace = trace

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # the lr this step's optimizer.step() uses (the scheduler steps after it)
        self.trace.add(batch[1], trainer.optimizers[0].param_groups[0]["lr"])


def train_fastat(seed: int, epochs: int, eps: float, clip_start: bool = False, lr_peak: float = 0.4,
                 co_guard: bool = False, script_lr_values: bool = False) -> tuple[nn.Module, Trace]:
    net = seeded_net(seed)
    dm = DigitsDataModule(batch_size=BATCH, seed=0)
    extra = {}
    if script_lr_values:
        # global step s of epoch e, batch i is s = e * n + i, so the script's t = e + (i + 1) / n = (s + 1) / n
        dm.setup("fit")
        n = math.ceil(len(dm.splits["train"]) / BATCH)
        schedule = script_lr(epochs)
        extra = {"lr_scheduler": lambda opt: LambdaLR(opt, lambda s: schedule((s + 1) / n) / LR_MAX),
                 "lr_scheduler_interval": "step"}
    module = FastAT(net, eps=eps, step_size=ALPHA_PER_EPS * eps, clip_start=clip_start, lr_peak=lr_peak,
                    co_guard=co_guard, optimizer=lambda p: torch.optim.Adam(p, lr=LR_MAX), attack_bn_mode="train", **extra)
    trace = Trace()
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[TraceCallback(trace)])
    trainer.fit(module, datamodule=dm)
    trace.guard_stopped_epoch = module.co_stopped_epoch
    return module.model, trace


VARIANTS: dict[str, Callable] = {
    "plain_mnist": lambda s, e, tr, eps: train_plain(s, e, tr, eps),
    "plain_clipped": lambda s, e, tr, eps: train_plain(s, e, tr, eps, clip_start=True),
    "fastat_mnist": lambda s, e, tr, eps: train_fastat(s, e, eps),
    "fastat_default": lambda s, e, tr, eps: train_fastat(s, e, eps, clip_start=True, lr_peak=0.5),
    "fastat_script_lr": lambda s, e, tr, eps: train_fastat(s, e, eps, script_lr_values=True),
    "plain_library_lr": lambda s, e, tr, eps: train_plain(s, e, tr, eps, library_lr=True),
    "fastat_guard": lambda s, e, tr, eps: train_fastat(s, e, eps, co_guard=True),
    "plain_summed_grad": lambda s, e, tr, eps: train_plain(s, e, tr, eps, summed_grad=True),
}


def evaluate(model: nn.Module, test: tuple[Tensor, Tensor], eps: float) -> dict[str, float]:
    acc = evaluate_robustness(model.eval(), test, eps=eps, tiers=("pgd", "apgd"), pgd_steps=50,
                              progress=False).accuracy
    return {"clean": acc["clean"], "pgd50": acc["pgd"], "apgd_ce": acc["apgd-ce"], "apgd_t": acc["apgd-t"],
            "worst": acc["worst_case"]}


def weights_sha1(model: nn.Module) -> str:
    """A hash of the trained weights: equal hashes mean bit-identical training."""
    digest = hashlib.sha1()
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


def paired_table(runs: list[dict], reference: str = "plain_mnist") -> str:
    """Per-seed difference of each variant from ``reference`` (same eps, epochs and seed), in points."""
    ref = {(r["eps"], r["epochs"], r["seed"]): r for r in runs if r["variant"] == reference}
    lines = [f"{'eps':>5} {'epochs':>6} {'variant - ' + reference:<30} {'n':>2}  " +
             "  ".join(f"{m + ' mean (min-max)':<24}" for m in METRICS) + "  same weights"]
    for eps, epochs in sorted({(r["eps"], r["epochs"]) for r in runs}, key=lambda k: (-k[0], k[1])):
        for variant in VARIANTS:
            pairs = [(r, ref[eps, epochs, r["seed"]]) for r in runs if (r["eps"], r["epochs"], r["variant"]) ==
                     (eps, epochs, variant) and variant != reference and (eps, epochs, r["seed"]) in ref]
            if not pairs:
                continue
            cells = []
            for m in METRICS:
                diffs = [100 * (r[m] - q[m]) for r, q in pairs]
                cells.append(f"{statistics.mean(diffs):+6.2f} ({min(diffs):+6.2f} to {max(diffs):+6.2f})".ljust(24))
            same = sum(r["weights_sha1"] == q["weights_sha1"] for r, q in pairs)
            lines.append(f"{eps:>5g} {epochs:>6} {variant:<30} {len(pairs):>2}  " + "  ".join(cells) +
                         f"  {same}/{len(pairs)}")
    return "\n".join(lines)


def identical_pairs(runs: list[dict]) -> str:
    """Pairs of variants whose runs ended with bit-identical weights, for how many of their common seeds."""
    lines = []
    for eps, epochs in sorted({(r["eps"], r["epochs"]) for r in runs}, key=lambda k: (-k[0], k[1])):
        by = {(r["variant"], r["seed"]): r["weights_sha1"] for r in runs if (r["eps"], r["epochs"]) == (eps, epochs)}
        names = [v for v in VARIANTS if any(k[0] == v for k in by)]
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                seeds = [sd for (v, sd) in by if v == a and (b, sd) in by]
                same = sum(by[a, sd] == by[b, sd] for sd in seeds)
                if same:
                    lines.append(f"{eps:>5g} {epochs:>6}  {a} = {b}: {same}/{len(seeds)} seeds")
    return "\n".join(lines) or "none"


def summary_table(runs: list[dict]) -> str:
    lines = [f"{'eps':>5} {'epochs':>6} {'variant':<18} {'n':>2}  " +
             "  ".join(f"{m + ' mean (min-max)':<24}" for m in METRICS)]
    for eps, epochs in sorted({(r["eps"], r["epochs"]) for r in runs}, key=lambda k: (-k[0], k[1])):
        for variant in VARIANTS:
            rows = [r for r in runs if (r["eps"], r["epochs"], r["variant"]) == (eps, epochs, variant)]
            if not rows:
                continue
            cells = []
            for m in METRICS:
                vals = [100 * r[m] for r in rows]
                cells.append(f"{statistics.mean(vals):6.2f} ({min(vals):5.2f}-{max(vals):5.2f})".ljust(24))
            lines.append(f"{eps:>5g} {epochs:>6} {variant:<18} {len(rows):>2}  " + "  ".join(cells))
    return "\n".join(lines)


def one_run(variant: str, seed: int, epochs: int, eps: float, train: tuple[Tensor, Tensor],
            test: tuple[Tensor, Tensor]) -> dict:
    t0 = time.perf_counter()
    model, trace = VARIANTS[variant](seed, epochs, train, eps)
    t1 = time.perf_counter()
    acc = evaluate(model, test, eps)
    t2 = time.perf_counter()
    run = {"eps": eps, "epochs": epochs, "variant": variant, "seed": seed, **acc, "train_s": round(t1 - t0, 2),
           "eval_s": round(t2 - t1, 2), "weights_sha1": weights_sha1(model), **trace.summary()}
    print(f"{variant:<18} eps {eps:g} epochs {epochs:>3} seed {seed}  " +
          "  ".join(f"{m} {100 * acc[m]:5.2f}" for m in METRICS) +
          f"  | train {t1 - t0:5.1f} s eval {t2 - t1:5.1f} s  labels {run['labels_sha1']} "
          f"lr[0] {run['lr_first']:.3g} peak@{run['lr_peak_step']} weights {run['weights_sha1']}" +
          ("" if run["guard_stopped_epoch"] is None else f" guard stopped at epoch {run['guard_stopped_epoch']}"),
          flush=True)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, nargs="+", default=[10])
    parser.add_argument("--eps", type=float, nargs="+", default=[EPS],
                        help=f"Linf radii of training and evaluation (step {ALPHA_PER_EPS} eps); the script's {EPS}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "fast_at_recipes_digits.json"))
    parser.add_argument("--append", action="store_true",
                        help="add these runs to those already in --out (the tables then cover all of them)")
    args = parser.parse_args()
    previous = json.loads(Path(args.out).read_text()) if args.append and Path(args.out).exists() else None
    for epochs in args.epochs:
        if epochs % 5:
            print(f"note: {epochs} epochs is not a multiple of 5; the script's integer peak epochs*2//5 "
                  f"then differs from lr_peak=0.4", file=sys.stderr)

    warnings.filterwarnings("ignore", module="lightning")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    dm = DigitsDataModule(batch_size=BATCH, seed=0)
    dm.setup("fit")
    train, test = dm.splits["train"].tensors, dm.splits["test"].tensors
    print(f"digits: {len(train[1])} train / {len(test[1])} test images, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)

    runs, start = [], time.perf_counter()
    for eps in args.eps:
        for epochs in args.epochs:
            for variant in args.variants:
                for seed in args.seeds:
                    runs.append(one_run(variant, seed, epochs, eps, train, test))
    total = time.perf_counter() - start
    print(f"\nthis invocation: {len(runs)} runs, {total:.0f} s")
    if previous is not None:
        runs = previous["runs"] + runs
    print("\naccuracy in %, mean (min-max) over seeds\n" + summary_table(runs))
    print("\ndifference from plain_mnist, same seed, in points: mean (min-max); same weights = bit-identical\n"
          + paired_table(runs))
    print("\nbit-identical weights, same seed\n" + identical_pairs(runs))

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True, cwd=Path(__file__).parent).stdout.strip())
    except OSError:
        commit, dirty = "", False
    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name")), "")
    invocation = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
                  "runs": len(runs) - (len(previous["runs"]) if previous else 0), "total_s": round(total, 1),
                  "commit": commit + (" + uncommitted changes" if dirty else "")}
    out = {"invocations": (previous["invocations"] if previous else []) + [invocation],
           "machine": {"cpu": cpu or platform.processor(), "threads": torch.get_num_threads(), "device": "cpu"},
           "versions": {p: importlib.metadata.version(p) for p in ("torch", "lightning", "scikit-learn", "pyautoattack")},
           "settings": {"alpha_per_eps": ALPHA_PER_EPS, "lr_max": LR_MAX, "batch_size": BATCH,
                        "train_images": len(train[1]), "test_images": len(test[1])},
           "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
