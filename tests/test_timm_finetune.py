"""Robust fine-tuning of a pretrained timm model on real images: a tiny timm ResNet trained without AT on the
digits (upsampled to 32x32) has almost no PGD robustness; a short PGD-AT fine-tune that starts from its saved
weights (loaded by ``TimmClassifier(pretrained_path=...)``) makes it robust, judged by the same seeded PGD-10."""

import lightning.pytorch as L
import pytest
import torch

from lit_robust.attacks import PGD
from lit_robust.defenses import PGDAT, StandardTraining

pytest.importorskip("timm")

from test_timm_models import UpsampledDigits  # noqa: E402

from lit_robust.models import DIGITS_MEAN, DIGITS_STD, TimmClassifier  # noqa: E402

EPS = 0.2  # Linf on [0, 1] digits, as the other digits tests


def net(**kwargs) -> TimmClassifier:
    return TimmClassifier("test_resnet", num_classes=10, in_chans=1, mean=DIGITS_MEAN, std=DIGITS_STD, **kwargs)


def fit(module, data, epochs: int):
    L.seed_everything(0)
    L.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0).fit(module, data)
    return module.model.eval()


def accuracy(model, x, y) -> tuple[float, float]:
    """Clean and PGD-10 (random start, step 2.5 eps / 10, seed 0) accuracy."""
    torch.manual_seed(0)
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    robust = (PGD(EPS, steps=10).run(model, x, y).predictions == y).float().mean().item()
    return clean, robust


def sgd(lr):
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)


def test_adversarial_fine_tune_of_a_standard_timm_model_makes_it_robust(tmp_path):
    data = UpsampledDigits(channels=1, batch_size=64)
    data.setup()
    x, y = data.splits["test"].tensors  # the 359 held-out digits
    L.seed_everything(0)
    standard = fit(StandardTraining(net(), eps=EPS, optimizer=sgd(0.05)), data, epochs=4)
    clean_before, robust_before = accuracy(standard, x, y)
    torch.save(standard.model.state_dict(), tmp_path / "standard.pth")  # the timm model's own keys

    L.seed_everything(0)
    tuned = net(pretrained_path=str(tmp_path / "standard.pth"))
    assert accuracy(tuned.eval(), x, y)[0] == clean_before  # fine-tuning starts from the standard weights
    tuned.train()  # Lightning keeps the modes it finds
    tuned = fit(PGDAT(tuned, eps=EPS, steps=5, step_size=EPS / 4, optimizer=sgd(0.05)), data, epochs=6)
    clean_after, robust_after = accuracy(tuned, x, y)

    assert clean_before > 0.9 and robust_before < 0.1, (clean_before, robust_before)
    assert robust_after > robust_before + 0.3 and clean_after > 0.85, (clean_after, robust_after)
