"""Catastrophic overfitting, shown on the digits: plain FGSM collapses where N-FGSM, GradAlign, ZeroGrad, MultiGrad
and ATAS keep their PGD accuracy, each watched by the CatastrophicOverfittingMonitor.

At 8x8 plain FGSM never collapses (benchmarks/RESULTS.md). Resized bilinearly to 16x16 (``DigitsDataModule(size=16)``:
the same digits, a 256-dimensional threat model), at Linf 0.15 it does: in one epoch the PGD accuracy of the
monitor's check falls from about 0.47 to 0.25 and keeps falling, and the final network is 0% robust under PGD-20
while 88% accurate on clean images: robust to its own FGSM, not to PGD. The same run with each method instead
(measured while writing this test, 2 threads, PGD-20 on the 359 test digits): N-FGSM 0.43, GradAlign (lambda 1.0)
0.47, ZeroGrad 0.36, MultiGrad 0.35, ATAS 0.47, with the monitor quiet. GradAlign at lambda 0.2, its 8/255 value,
collapses here at epoch 4 (0.3% PGD-20): the paper raises lambda with eps, and 0.15 is a large radius.
"""

import lightning.pytorch as L
import pytest
import torch

from lit_robust.attacks import PGD
from lit_robust.callbacks.catastrophic_overfitting import CatastrophicOverfittingMonitor
from lit_robust.datamodules import DigitsDataModule
from lit_robust.defenses import ATAS, NFGSM, GradAlign, MultiGrad, ZeroGrad
from lit_robust.models import SmallCNN

EPS, SIZE, EPOCHS = 0.15, 16, 8
R = EPS / (8 / 255)  # ATAS's official step constants scaled from 8/255 to this eps

METHODS = {
    "FGSM": lambda net, kw: NFGSM(net, noise=0.0, clip=1.0, **kw),  # zero start, step eps, projected: plain FGSM
    "NFGSM": lambda net, kw: NFGSM(net, **kw),
    "GradAlign": lambda net, kw: GradAlign(net, grad_align_lambda=1.0, **kw),
    "ZeroGrad": lambda net, kw: ZeroGrad(net, **kw),
    "MultiGrad": lambda net, kw: MultiGrad(net, **kw),
    "ATAS": lambda net, kw: ATAS(net, step_scale=16 / 255 * R, min_step_size=4 / 255 * R, max_step_size=14 / 255 * R,
                                 pad=1, flip=False, warmup_epochs=1, **kw),
}


def _train(name):
    L.seed_everything(0)
    kw = dict(eps=EPS, optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4),
              lr_scheduler=lambda o: torch.optim.lr_scheduler.ConstantLR(o, factor=1.0))
    module = METHODS[name](SmallCNN(width=32, input_size=SIZE), kw)
    monitor = CatastrophicOverfittingMonitor(drop=0.2, restore=False, stop=False)
    data = DigitsDataModule(batch_size=64, size=SIZE, with_index=name == "ATAS")
    L.Trainer(accelerator="cpu", max_epochs=EPOCHS, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, callbacks=[monitor]).fit(module, data)
    test = DigitsDataModule(size=SIZE)
    test.setup()
    x, y = test.splits["test"].tensors
    module.model.eval()
    torch.manual_seed(0)
    with torch.no_grad():
        clean = (module.model(x).argmax(1) == y).float().mean().item()
    robust = (PGD(EPS, steps=20, restarts=2).run(module.model, x, y).predictions == y).float().mean().item()
    return monitor, clean, robust


def test_plain_fgsm_overfits_catastrophically_and_the_monitor_sees_it():
    monitor, clean, robust = _train("FGSM")
    assert monitor.collapsed_epochs, "the monitor saw no collapse"
    assert clean > 0.8 and robust < 0.05, (clean, robust)  # accurate, and not robust at all under PGD


@pytest.mark.parametrize("name", ["NFGSM", "GradAlign", "ZeroGrad", "MultiGrad", "ATAS"])
def test_each_single_step_remedy_keeps_its_pgd_accuracy(name):
    monitor, clean, robust = _train(name)
    assert monitor.collapsed_epochs == [], monitor.collapsed_epochs
    assert clean > 0.85 and robust > 0.25, (clean, robust)


def test_resized_digits_are_the_same_digits():
    small, big = DigitsDataModule(), DigitsDataModule(size=SIZE)
    small.setup()
    big.setup()
    (xs, ys), (xb, yb) = small.splits["test"].tensors, big.splits["test"].tensors
    assert xb.shape[1:] == (1, SIZE, SIZE) and torch.equal(ys, yb)
    grown = torch.nn.functional.interpolate(xs, size=SIZE, mode="bilinear", align_corners=False)
    assert (grown - xb).abs().max() <= 0.5 / 255 + 1e-6  # the bilinear resize, stored in steps of 1/255
    with pytest.raises(ValueError, match="size"):
        DigitsDataModule(size=4)
