"""Training throughput of lit_robust defenses against a minimal plain-PyTorch loop doing the same work.

For each (model, defense) the script trains on synthetic CIFAR-shaped data (the same pre-made batches,
already on the device, for both sides) with

- the library: ``L.Trainer`` + the defense's LightningModule (``PGDAT``, ``FastAT``, ``TRADES``), and
- a plain loop: the same architecture, a hand-written attack and loss equal to the defense's, SGD,

alternating library / plain runs ``--repeats`` times and keeping the median, so that drift of the
machine hits both sides alike. ``tests/test_benchmark_parity.py`` checks that both sides run the same
convolutions, matrix products and batch norms, forward and backward, per step. It prints images/s, seconds per 50k-image epoch, the library/plain
time ratio (and the difference per step), the achieved FLOP rate from the cost model of ``shared/research/perf.md`` (forward FLOPs
measured with ``torch.utils.flop_counter``; PGD-k AT = (2k + 3) F per image, FGSM-RS = 5 F, TRADES-k =
(2k + 7) F) and, on a GPU with a known peak, the fraction of the bf16 roofline. JSON goes to ``--out``
with the device name, versions, date and command line.

    .venv/bin/python benchmarks/throughput.py --device cuda --batch-size 512 --steps 30
    .venv/bin/python benchmarks/throughput.py --device cpu --models preactresnet18 --batch-size 32 --steps 5
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from lit_robust.defenses import PGDAT, TRADES, FastAT
from lit_robust.models import CIFAR10_MEAN, CIFAR10_STD, PreActResNet18, SmallCNN, WideResNet

EPS, STEP, STEPS, LR = 8 / 255, 2 / 255, 10, 0.1
MODELS: dict[str, Callable[[], nn.Module]] = {
    "preactresnet18": PreActResNet18,
    "wrn-34-10": lambda: WideResNet(34, 10),
    # tiny steps, so per-step framework overhead shows (not in the default set)
    "smallcnn": lambda: SmallCNN(in_channels=3, input_size=32, width=8, mean=CIFAR10_MEAN, std=CIFAR10_STD),
}
DEFAULT_MODELS = ["preactresnet18", "wrn-34-10"]
COST_IN_FORWARDS = {"pgdat": 2 * STEPS + 3, "fastat": 5, "trades": 2 * STEPS + 7}
BF16_PEAK_FLOPS = {"H100 80GB HBM3": 989e12, "H100 PCIe": 756e12, "H200": 989e12, "A100": 312e12}


def sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR, momentum=0.9, weight_decay=5e-4)


def library_module(defense: str, model: nn.Module) -> L.LightningModule:
    common = dict(optimizer=sgd, lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0))
    if defense == "pgdat":
        return PGDAT(model, eps=EPS, steps=STEPS, step_size=STEP, **common)
    if defense == "fastat":
        return FastAT(model, eps=EPS, co_guard=False, **common)
    return TRADES(model, eps=EPS, steps=STEPS, step_size=STEP, beta=6.0, **common)


# --- the plain loop: what a user would write by hand --------------------------------------------


def _input_grad(model: nn.Module, x_adv: Tensor, loss_fn: Callable[[Tensor], Tensor]) -> Tensor:
    x_adv.requires_grad_(True)
    return torch.autograd.grad(loss_fn(model(x_adv)), x_adv)[0]


def plain_pgd(model, x, y, steps=STEPS, step_size=STEP, start=None):
    delta = torch.empty_like(x).uniform_(-EPS, EPS) if start is None else start
    x_adv = (x + delta).clamp(0, 1)
    for _ in range(steps):
        grad = _input_grad(model, x_adv, lambda logits: F.cross_entropy(logits.float(), y, reduction="sum"))
        x_adv = torch.min(torch.max(x_adv.detach() + step_size * grad.sign(), x - EPS), x + EPS).clamp(0, 1)
    return x_adv.detach()


def plain_step(defense: str, model: nn.Module, optimizer, x: Tensor, y: Tensor) -> Tensor:
    model.eval()
    if defense == "pgdat":
        x_adv = plain_pgd(model, x, y)
    elif defense == "fastat":
        x_adv = plain_pgd(model, x, y, steps=1, step_size=1.25 * EPS)
    else:
        with torch.no_grad():
            p_clean = F.softmax(model(x).float(), 1)
        x_adv = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)
        for _ in range(STEPS):
            kl = lambda logits: F.kl_div(F.log_softmax(logits.float(), 1), p_clean, reduction="sum")  # noqa: E731
            grad = _input_grad(model, x_adv, kl)
            x_adv = torch.min(torch.max(x_adv.detach() + STEP * grad.sign(), x - EPS), x + EPS).clamp(0, 1)
        x_adv = x_adv.detach()
    model.train()
    if defense == "trades":
        clean = model(x).float()
        loss = F.cross_entropy(clean, y) + 6.0 * F.kl_div(F.log_softmax(model(x_adv).float(), 1),
                                                          F.softmax(clean, 1), reduction="batchmean")
    else:
        loss = F.cross_entropy(model(x_adv).float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


# --- timing ---------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Timer(L.Callback):
    """Wall time from the start of batch ``warmup`` to the end of the last batch (device synced)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end = warmup, 0.0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            _sync(pl_module.device)
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        _sync(pl_module.device)
        self.end = time.perf_counter()


class _Batches:
    """The pre-made batches as one iterable (a bare list would be read by Lightning as many dataloaders)."""

    def __init__(self, batches: list) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def time_library(defense, make_model, batches, warmup, precision, channels_last, compile_model, device) -> float:
    torch.manual_seed(0)
    module = library_module(defense, make_model())
    if channels_last:
        module.model.to(memory_format=torch.channels_last)
    if compile_model:
        module.model.compile()
    timer = _Timer(warmup)
    trainer = L.Trainer(accelerator=device.type, devices=1, precision=precision, max_steps=len(batches),
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer])
    trainer.fit(module, train_dataloaders=_Batches(batches))
    return timer.end - timer.start


def time_plain(defense, make_model, batches, warmup, precision, channels_last, compile_model, device) -> float:
    torch.manual_seed(0)
    model = make_model().to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile_model:
        model.compile()
    optimizer = sgd(model.parameters())
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    start = 0.0
    for i, (x, y) in enumerate(batches):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        with autocast:
            plain_step(defense, model, optimizer, x, y)
    _sync(device)
    return time.perf_counter() - start


def forward_flops(make_model: Callable[[], nn.Module]) -> float:
    """FLOPs of one forward pass of one 32x32 image (conv and matmul, as counted by torch)."""
    model = make_model().eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.rand(1, 3, 32, 32))
    return float(counter.get_total_flops())


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return f"CPU: {line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    return f"CPU: {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def synthetic_batches(n: int, batch_size: int, device: torch.device, channels_last: bool) -> list:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n):
        x = torch.randint(0, 256, (batch_size, 3, 32, 32), generator=generator, dtype=torch.uint8)
        x = x.to(device).float().div_(255)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        batches.append((x, torch.randint(0, 10, (batch_size,), generator=generator).to(device)))
    return batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(MODELS))
    parser.add_argument("--defenses", nargs="+", default=list(COST_IN_FORWARDS), choices=list(COST_IN_FORWARDS))
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per run (cudnn autotune, compile)")
    parser.add_argument("--repeats", type=int, default=3, help="library / plain runs, alternated; medians kept")
    parser.add_argument("--precision", default="bf16-mixed", choices=["bf16-mixed", "32-true"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone (nn.Module.compile)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default="benchmarks/results.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    name = device_name(device)
    peak = next((v for k, v in BF16_PEAK_FLOPS.items() if k in name), None) if device.type == "cuda" else None
    batches = synthetic_batches(args.warmup + args.steps, args.batch_size, device, args.channels_last)
    images = args.steps * args.batch_size
    rows = []
    result = {"device": name, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "torch": torch.__version__,
              "lightning": L.__version__, "lit_robust": importlib.metadata.version("lit_robust"),
              "settings": vars(args), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for model_name in args.models:
        make_model = MODELS[model_name]
        flops = forward_flops(make_model)
        for defense in args.defenses:
            runs = {"library": [], "plain": []}
            settings = (defense, make_model, batches, args.warmup, args.precision, args.channels_last, args.compile,
                        device)
            for _ in range(args.repeats):
                runs["library"].append(time_library(*settings))
                runs["plain"].append(time_plain(*settings))
            lib, plain = statistics.median(runs["library"]), statistics.median(runs["plain"])
            achieved = images / lib * COST_IN_FORWARDS[defense] * flops
            row = {"model": model_name, "defense": defense, "library_s": runs["library"], "plain_s": runs["plain"],
                   "library_images_per_s": images / lib, "plain_images_per_s": images / plain,
                   "library_s_per_epoch": 50_000 / (images / lib), "plain_s_per_epoch": 50_000 / (images / plain),
                   "library_over_plain": lib / plain, "overhead_ms_per_step": 1000 * (lib - plain) / args.steps,
                   "forward_gflops_per_image": flops / 1e9,
                   "cost_in_forwards": COST_IN_FORWARDS[defense], "achieved_tflops": achieved / 1e12,
                   "fraction_of_bf16_peak": None if peak is None else achieved / peak}
            rows.append(row)
            print(f"{model_name:15s} {defense:7s} library {row['library_images_per_s']:9.1f} img/s "
                  f"({row['library_s_per_epoch']:8.1f} s/epoch)  plain {row['plain_images_per_s']:9.1f} img/s  "
                  f"ratio {row['library_over_plain']:.3f} ({row['overhead_ms_per_step']:+.2f} ms/step)  "
                  f"{row['achieved_tflops']:.3f} TFLOP/s"
                  + ("" if peak is None else f" ({100 * row['fraction_of_bf16_peak']:.1f}% of bf16 peak)"),
                  flush=True)
            Path(args.out).write_text(json.dumps(result, indent=2))  # after every row: a killed run keeps its rows
    print(f"wrote {args.out} ({name})")


if __name__ == "__main__":
    main()
