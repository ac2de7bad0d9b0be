"""The digits rows of the README's certified-robustness table: train briefly, certify the test split.

    .venv/bin/python scripts/certified_digits.py ibp crown-ibp gls-rgs gls-pgpe standard-bounds
    .venv/bin/python scripts/certified_digits.py gaussian smoothmix standard-smoothed --sigma 0.25

Bound rows: CNN3, Linf eps 0.1, 10 epochs (Adam 5e-3, 1 epoch at eps 0, 5-epoch smoothed ramp),
certified by IBP or CROWN-IBP. Smoothing rows: SmallCNN(width=16), 8 epochs (SGD 0.05), CERTIFY
with N0 = 100, N = 1,000, alpha = 0.001. Seed 0, one thread, CPU.
"""

from __future__ import annotations

import argparse
import time

import lightning.pytorch as L
import torch

from lit_robust.certify import Smooth, average_certified_radius, certified_accuracy
from lit_robust.datamodules import DigitsDataModule
from lit_robust.defenses import (
    CertifiedTraining,
    GaussianAugmentation,
    GaussianLossSmoothing,
    SmoothMix,
    StandardTraining,
)
from lit_robust.models import CNN3, DIGITS_MEAN, DIGITS_STD, SmallCNN

EPS, RADII = 0.1, (0.0, 0.25, 0.5, 0.75, 1.0)


def _bounds_module(name: str) -> L.LightningModule:
    net = CNN3(in_channels=1, input_size=8, mean=DIGITS_MEAN, std=DIGITS_STD)
    adam = dict(optimizer=lambda p: torch.optim.Adam(p, lr=5e-3))
    ramp = dict(eps=EPS, eps_ramp_epochs=5, eps_warmup_epochs=1, **adam)
    return {"ibp": lambda: CertifiedTraining(net, method="ibp", **ramp),
            "crown-ibp": lambda: CertifiedTraining(net, method="crown-ibp", **ramp),
            "gls-rgs": lambda: GaussianLossSmoothing(net, estimator="rgs", **ramp),
            "gls-pgpe": lambda: GaussianLossSmoothing(net, estimator="pgpe", pairs=64, **ramp),
            "standard-bounds": lambda: StandardTraining(net, **adam)}[name]()


def _smoothed_module(name: str, sigma: float) -> L.LightningModule:
    sgd = dict(optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-4))
    net = SmallCNN(width=16)
    return {"gaussian": lambda: GaussianAugmentation(net, sigma=sigma, **sgd),
            "smoothmix": lambda: SmoothMix(net, sigma=sigma, step_size=2 * sigma, warmup_epochs=4, **sgd),
            "standard-smoothed": lambda: StandardTraining(net, **sgd)}[name]()


def run(name: str, sigma: float) -> str:
    L.seed_everything(0)
    bounds = name in ("ibp", "crown-ibp", "gls-rgs", "gls-pgpe", "standard-bounds")
    module = _bounds_module(name) if bounds else _smoothed_module(name, sigma)
    data = DigitsDataModule(batch_size=64)
    start = time.time()
    L.Trainer(accelerator="cpu", max_epochs=10 if bounds else 8, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0).fit(module, data)
    x, y = data.splits["test"].tensors
    model = module.model.eval()
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    if bounds:
        judge = CertifiedTraining(model, eps=EPS, ibp_init=False)
        result = f"clean {clean:.4f}  certified@{EPS} {judge.certify(x, y).float().mean().item():.4f}"
    else:
        generator = torch.Generator().manual_seed(0)
        prediction, radius = Smooth(model, sigma, 10, batch_size=4000).certify(x, 100, 1000, 0.001, generator)
        accuracy = certified_accuracy(prediction, radius, y, RADII).tolist()
        result = (f"sigma {sigma}  certified at r={list(RADII)}: {[round(a, 4) for a in accuracy]}  "
                  f"ACR {average_certified_radius(prediction, radius, y).item():.4f}")
    return f"{name}: {result}  ({time.time() - start:.0f} s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--sigma", type=float, default=0.25)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in args.runs:
        print(run(name, args.sigma), flush=True)


if __name__ == "__main__":
    main()
