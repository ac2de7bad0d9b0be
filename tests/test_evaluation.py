"""Reference AutoAttack: threat model respected, eval mode and fp32, and its place in ``trainer.test``."""

import lightning.pytorch as L
import pytest
import torch

from lit_robust.datamodules import DigitsDataModule
from lit_robust.defenses import StandardTraining
from lit_robust.evaluation import autoattack
from lit_robust.models import SmallCNN


@pytest.fixture(scope="module")
def trained():
    """A quickly trained standard model and a small digits test split (54 images)."""
    L.seed_everything(0)
    dm = DigitsDataModule(batch_size=64, eval_batch_size=64, test_fraction=0.03)
    module = StandardTraining(SmallCNN(width=4), eps=0.2, val_attack_steps=2, test_attack_steps=5,
                              test_autoattack=True, optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))
    trainer = L.Trainer(accelerator="cpu", max_epochs=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, dm)
    return trainer, module, dm


def test_autoattack_respects_threat_model_and_runs_in_eval_fp32(trained):
    _, module, dm = trained
    model = module.model.train()
    x, y = dm.splits["test"].tensors
    seen = []
    model.features[1].register_forward_hook(lambda m, i, o: seen.append((m.training, i[0].dtype)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_adv = autoattack(model, x, y, eps=0.2)
    assert all(m.training for m in model.modules())  # flags restored
    assert seen and all(flag is False and dtype == torch.float32 for flag, dtype in seen)
    assert (x_adv - x).abs().max() <= 0.2 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    model.eval()
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean()
        robust = (model(x_adv).argmax(1) == y).float().mean()
    assert clean > 0.8 and robust < 0.1  # a standard model collapses under AutoAttack at eps 0.2


def test_trainer_test_logs_autoattack_and_per_example_worst_case(trained):
    trainer, module, dm = trained
    result = trainer.test(module, dm, verbose=False)[0]
    assert set(result) == {"test/clean_acc", "test/robust_acc", "test/autoattack_acc", "test/worst_case_acc"}
    assert result["test/worst_case_acc"] <= min(result["test/robust_acc"], result["test/autoattack_acc"])
    assert result["test/autoattack_acc"] < result["test/clean_acc"]


def test_autoattack_rejects_bad_arguments(trained):
    _, module, dm = trained
    x, y = dm.splits["test"].tensors
    with pytest.raises(ValueError, match="eps"):
        autoattack(module.model, x, y, eps=0.0)
    with pytest.raises(ValueError, match="norm"):
        autoattack(module.model, x, y, eps=0.1, norm="l1")
