"""Export: a defense checkpoint becomes plain PyTorch files that reproduce its logits without lit_robust."""

import subprocess
import sys

import pytest
import torch
from digits_bench import EPS, quiet_trainer, sgd
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_robust.callbacks import EMA
from lit_robust.defenses import PGDAT
from lit_robust.evaluation.export import classifier_state_dict, export_checkpoint, load_exported
from lit_robust.models import SmallCNN


@pytest.fixture
def trained(tmp_path, digits):
    """A PGD-AT SmallCNN (with BatchNorm) after a few steps, its last checkpoint, and a test batch."""
    module = PGDAT(SmallCNN(width=4), eps=EPS, steps=2, optimizer=sgd())
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=5, limit_val_batches=1, enable_checkpointing=True,
                  callbacks=[ckpt]).fit(module, digits)
    x, _ = next(iter(digits.test_dataloader()))
    return module, ckpt.last_model_path, x


def test_exported_files_reproduce_the_checkpoints_logits(trained, tmp_path):
    module, path, x = trained
    paths = export_checkpoint(path, SmallCNN(width=4), x[:4], tmp_path / "export")
    expected = module.model.eval()(x)
    assert torch.allclose(load_exported(paths["program"])(x), expected, atol=1e-5)  # any batch size
    fresh = SmallCNN(width=4).eval()
    fresh.load_state_dict(torch.load(paths["state_dict"], weights_only=True))
    assert torch.allclose(fresh(x), expected, atol=1e-6)


def test_exported_program_loads_without_lit_robust_and_has_input_gradients(trained, tmp_path):
    module, path, x = trained
    paths = export_checkpoint(path, SmallCNN(width=4), x, tmp_path / "export")
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import sys, torch\n"
        f"m = torch.export.load({str(paths['program'])!r}).module()\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r}).requires_grad_(True)\n"
        "logits = m(x)\n"
        "(g,) = torch.autograd.grad(logits.logsumexp(1).sum(), x)\n"
        "assert g.abs().sum() > 0\n"
        "assert not any(name.startswith('lit_robust') for name in sys.modules)\n"
        f"torch.save(logits.detach(), {str(tmp_path / 'logits.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    assert torch.allclose(torch.load(tmp_path / "logits.pt"), module.model.eval()(x), atol=1e-5)


def test_an_ema_checkpoint_exports_the_averaged_weights(tmp_path, digits):
    module = PGDAT(SmallCNN(width=4), eps=EPS, steps=1, optimizer=sgd())
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    ema = EMA(decay=0.5)
    quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=4, limit_val_batches=0, enable_checkpointing=True,
                  callbacks=[ema, ckpt]).fit(module, digits)
    exported = classifier_state_dict(ckpt.last_model_path)
    averaged = ema._average_model.module.model.state_dict()
    assert all(torch.equal(exported[k], averaged[k]) for k in averaged)


def test_a_checkpoint_without_classifier_weights_is_refused(tmp_path):
    torch.save({"state_dict": {"net.weight": torch.zeros(1)}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="no 'model.\\*' weights"):
        classifier_state_dict(tmp_path / "other.ckpt")
