"""Images per second that GeneratedDataModule's training loader delivers for CIFAR-sized data, on this CPU.

Writes a temporary multi-part ``.npz`` set of random 32x32x3 uint8 images (default 200k in 4 parts,
614 MB, with ``np.savez``, the format of DeepMind's and DM-Improves-AT's files) and a fake real set of
50k images held in memory, then times the training loader (memory-mapped parts, batch 512, real
fraction 0.3, crop + flip on every image) for each number of DataLoader workers, with the generated
files' pages either evicted from the page cache before the run (``cold``: every generated image is
a read from the disk, ``posix_fadvise(DONTNEED)`` on these files only) or left there (``warm``).

The number to compare with is what one GPU consumes. ``shared/research/perf.md`` has no measured or
published WRN-28-10 TRADES-10 throughput on an H100 or A100 (its section 1.6: none published; "no
measured H100 numbers"), so the script reports a hard upper bound from perf.md's cost model instead:
TRADES-10 costs about 27 forward passes per image, a WRN-28-10 forward 10.5 GFLOP on a 32x32 image,
an H100 SXM 989 TFLOP/s dense bf16 at most, hence at most 989e12 / (27 * 10.5e9) = 3.5k images/s per
GPU at 100% utilisation (real runs reach a fraction of that). A loader faster than the bound can
never be what limits training.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mixed_loader.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mixed_loader.py --generated 20000 --batches 10  # quick
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lit_robust.datamodules import GeneratedDataModule, ImageDataModule

# perf.md: WRN-28-10 forward FLOPs per 32x32 image [MEAS], TRADES-10 forwards per image [EST], H100 SXM bf16 peak
WRN28_10_FORWARD_FLOPS, TRADES10_FORWARDS, H100_SXM_BF16_PEAK = 10.5e9, 27, 989e12


class FakeCIFAR(ImageDataModule):
    """``n`` random CIFAR-shaped images in memory, standing in for the real CIFAR-10 training set."""

    num_classes, dims = 10, (3, 32, 32)

    def __init__(self, n: int, **kwargs) -> None:
        super().__init__(download=False, **kwargs)
        self.n = n

    def verify(self) -> None:
        pass

    def load(self, split: str):
        g = torch.Generator().manual_seed(0 if split == "train" else 1)
        n = self.n if split == "train" else 1000
        return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.randint(0, 10, (n,))


def write_parts(directory: Path, total: int, parts: int) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    rng, paths = np.random.default_rng(0), []
    for i, n in enumerate(np.diff(np.linspace(0, total, parts + 1).astype(int))):
        path = directory / f"part{i}.npz"
        np.savez(path, image=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), label=rng.integers(0, 10, n))
        paths.append(str(path))
    return paths


def evict(paths: list[str]) -> None:
    """Drops these files' clean pages from the page cache (nothing else's)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def time_loader(paths: list[str], real: FakeCIFAR, args: argparse.Namespace, workers: int, replacement: bool,
                cache: str) -> dict:
    batches = args.warmup + args.batches
    dm = GeneratedDataModule(real, paths, real_fraction=args.real_fraction, replacement=replacement,
                             epoch_length=batches * args.batch_size, batch_size=args.batch_size, num_workers=workers)
    dm.setup()
    if cache == "cold":
        evict(paths)
    iterator = iter(dm.loader())
    for _ in range(args.warmup):  # worker start-up and first reads
        next(iterator)
    start, images, generated = time.perf_counter(), 0, 0
    for x, y, is_generated in iterator:
        images += len(x)
        generated += int(is_generated.sum())
    seconds = time.perf_counter() - start
    return {"workers": workers, "replacement": replacement, "cache": cache, "batches": args.batches,
            "seconds": round(seconds, 3), "images_per_s": round(images / seconds, 1),
            "generated_per_s": round(generated / seconds, 1), "ms_per_batch": round(1e3 * seconds / args.batches, 2)}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--generated", type=int, default=200_000, help="generated images in the temporary set")
    parser.add_argument("--parts", type=int, default=4)
    parser.add_argument("--real", type=int, default=50_000, help="images of the fake real set (1,000 held out)")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--real-fraction", type=float, default=0.3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--cache", nargs="+", default=["cold", "warm"], choices=["cold", "warm"])
    parser.add_argument("--batches", type=int, default=200, help="timed batches per configuration")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--dir", default="/tmp/lit_robust_mixed_loader", help="where the temporary set goes")
    parser.add_argument("--keep", action="store_true", help="keep the temporary set")
    parser.add_argument("--out", default="benchmarks/results/cpu_mixed_loader.json")
    args = parser.parse_args()

    directory = Path(args.dir)
    start = time.perf_counter()
    paths = write_parts(directory, args.generated, args.parts)
    print(f"wrote {args.generated} images in {args.parts} parts ({sum(map(os.path.getsize, paths)) / 1e6:.0f} MB) "
          f"in {time.perf_counter() - start:.1f} s")
    real = FakeCIFAR(args.real, batch_size=args.batch_size, val_size=1000, augment=True)
    rows = []
    try:
        for cache in args.cache:
            for workers in args.workers:
                for replacement in (True, False):
                    row = time_loader(paths, real, args, workers, replacement, cache)
                    rows.append(row)
                    print(json.dumps(row))
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
    gpu_bound = H100_SXM_BF16_PEAK / (TRADES10_FORWARDS * WRN28_10_FORWARD_FLOPS)
    result = {
        "benchmark": "mixed_loader", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
        "setup": {"generated_images": args.generated, "parts": args.parts, "real_images": args.real,
                  "batch_size": args.batch_size, "real_fraction": args.real_fraction, "image": [32, 32, 3],
                  "augment": "reflect pad 4, random crop, flip, every image"},
        "rows": rows,
        "gpu_comparison": {
            "measured_gpu_throughput": None,
            "note": "perf.md has no measured or published WRN-28-10 TRADES-10 img/s on an H100/A100; this is a "
                    "FLOP upper bound: 989e12 FLOP/s / (27 forwards x 10.5 GFLOP) per image",
            "h100_upper_bound_img_per_s": round(gpu_bound),
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"H100 upper bound for WRN-28-10 TRADES-10 (perf.md cost model, 100% of bf16 peak): {gpu_bound:.0f} img/s")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
