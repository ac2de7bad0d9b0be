"""Images per second one DataLoader worker decodes and augments for ImageNet training, on this CPU.

Writes synthetic JPEGs of ImageNet's typical size (default 500 x 375, quality 90; smooth random
colour fields plus noise, about 100 kB each, near ImageNet's mean of about 108 kB: the 138 GB
training tar over 1.28 M images) into a temporary class-folder tree, then times the training loader of
:class:`~lit_robust.datamodules.ImageFolderDataModule` (the real code path: PIL decode, RGB,
``RandomResizedCrop(224, scale=(0.08, 1))``, flip, to a float tensor, collate) with 0 and 1 workers.
With 0 workers the main process decodes; with 1, one worker does, the main process only
collates its batches: the per-worker rate, which scales with workers while cores last.

The number to compare with is what a GPU consumes. Fast AT (Wong, Rice & Kolter, ICLR 2020;
README of github.com/locuslab/fast_adversarial) trains ImageNet at eps 2/255 in 12 hours:
15 epochs (``ImageNet/configs/configs_fast_2px_phase{1,2,3}.yml``: epochs 0-6, 6-12, 12-15) of
the 1,281,167 training images, on one machine with four RTX 2080 Ti (the paper's section 5), i.e.
15 x 1,281,167 / 43,200 s = 445 images/s, 111 per GPU. Its first two phases read copies
pre-resized to 160 and 352 px (``ImageNet/resize.py``), cheaper to decode than the originals this
script times, and newer GPUs are several times faster than a 2080 Ti: treat the result as the
workers per 2080 Ti-equivalent of Fast AT's speed, and scale with the GPU.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/imagenet_loader.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/imagenet_loader.py --images 64 --batches 4  # quick
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lit_robust.datamodules import ImageFolderDataModule

IMAGENET_TRAIN_IMAGES = 1_281_167
FAST_AT_EPOCHS, FAST_AT_HOURS, FAST_AT_GPUS = 15, 12, 4  # eps 2/255 (README; configs; paper section 5)


def photo_like(rng: np.random.Generator, width: int, height: int, noise: float) -> Image.Image:
    """A smooth random colour field (bicubic upsampling of 8 x 6 values) plus Gaussian pixel noise."""
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(coarse, dtype=np.float32) + rng.normal(0, noise, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_tree(root: Path, images: int, width: int, height: int, quality: int, noise: float,
               classes: int = 10) -> float:
    """``root/train/<class>/*.JPEG`` and a small ``root/val``; returns the mean training file size in kB."""
    rng, sizes = np.random.default_rng(0), []
    for split, n in (("train", images), ("val", classes)):
        for i in range(n):
            path = root / split / f"c{i % classes}" / f"{i}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            photo_like(rng, width, height, noise).save(path, "JPEG", quality=quality)
            if split == "train":
                sizes.append(path.stat().st_size)
    return float(np.mean(sizes)) / 1e3


def time_loader(root: Path, workers: int, args: argparse.Namespace) -> dict:
    dm = ImageFolderDataModule(str(root), resolution=args.resolution, batch_size=args.batch_size,
                               num_workers=workers, val_size=0)
    dm.setup()
    timed, images, seconds = 0, 0, 0.0
    while timed < args.batches:  # epochs of the small tree until enough batches are timed
        iterator = iter(dm.train_dataloader())
        x, _ = next(iterator)  # worker start-up and the first batch: not timed
        start = time.perf_counter()
        for x, _ in iterator:
            images += len(x)
            timed += 1
            if timed == args.batches:
                break
        seconds += time.perf_counter() - start
    assert x.shape[1:] == (3, args.resolution, args.resolution) and x.dtype == torch.float32
    return {"workers": workers, "batches": timed, "images": images, "seconds": round(seconds, 3),
            "images_per_s": round(images / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256, help="synthetic training JPEGs written")
    parser.add_argument("--size", type=int, nargs=2, default=[500, 375], metavar=("WIDTH", "HEIGHT"))
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--noise", type=float, default=20.0, help="pixel noise sigma (sets the file size)")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=12, help="timed batches per worker count")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="lit_robust_imagenet_loader_"))
    try:
        start = time.perf_counter()
        kb = write_tree(root, args.images, *args.size, args.quality, args.noise)
        print(f"wrote {args.images} JPEGs of {args.size[0]}x{args.size[1]} (quality {args.quality}, mean {kb:.0f} kB) "
              f"in {time.perf_counter() - start:.1f} s; torch threads {torch.get_num_threads()}, "
              f"{os.cpu_count()} cores")
        rows = [time_loader(root, workers, args) for workers in args.workers]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for row in rows:
        print(json.dumps(row))
    need = FAST_AT_EPOCHS * IMAGENET_TRAIN_IMAGES / (FAST_AT_HOURS * 3600)
    per_worker = next((r["images_per_s"] for r in rows if r["workers"] == 1), rows[-1]["images_per_s"])
    print(f"Fast AT (eps 2/255): {FAST_AT_EPOCHS} epochs x {IMAGENET_TRAIN_IMAGES:,} images in {FAST_AT_HOURS} h = "
          f"{need:.0f} images/s on {FAST_AT_GPUS} GPUs, {need / FAST_AT_GPUS:.0f} per GPU; at {per_worker:.0f} "
          f"images/s per worker that is {math.ceil(need / FAST_AT_GPUS / per_worker)} workers (cores) per GPU, "
          f"{math.ceil(need / per_worker)} for the machine")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "mean_jpeg_kb": kb, "rows": rows,
                                              "fast_at_images_per_s": need}, indent=2) + "\n")


if __name__ == "__main__":
    main()
