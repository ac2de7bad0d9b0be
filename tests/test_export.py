"""Export: a defense checkpoint becomes plain PyTorch files that reproduce its logits without lit_robust."""

import subprocess
import sys

import pytest
import torch
from digits_bench import EPS, quiet_trainer, sgd
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_robust.callbacks import EMA
from lit_robust.defenses import PGDAT
from lit_robust.evaluation.export import classifier_state_dict, export_checkpoint, export_classifier, load_exported
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


class RecordingCNN(SmallCNN):
    """Records every instance whose ``cpu()`` is called (a class-level list, so copies do not carry their own)."""

    moved: list = []

    def cpu(self):
        RecordingCNN.moved.append(self)
        return super().cpu()


def _with_running_stats(model):
    """Random BatchNorm statistics, so that eval mode and train mode give different logits."""
    for name, buffer in model.named_buffers():
        if name.endswith("running_mean"):
            buffer.normal_()
        elif name.endswith("running_var"):
            buffer.uniform_(0.5, 2.0)
    return model


def test_export_leaves_the_users_model_alone(tmp_path, batch):
    model = _with_running_stats(RecordingCNN(width=4)).train()
    before = {name: (p, p.data_ptr(), p.detach().clone()) for name, p in model.named_parameters()}
    RecordingCNN.moved.clear()
    paths = export_classifier(model, batch[0], tmp_path)
    assert not any(m is model for m in RecordingCNN.moved) and RecordingCNN.moved  # a copy was moved, not the model
    assert model.training and all(m.training for m in model.modules())
    for name, p in model.named_parameters():
        same, ptr, value = before[name]
        assert p is same and p.data_ptr() == ptr and torch.equal(p, value)
    assert torch.allclose(load_exported(paths["program"])(batch[0]), model.eval()(batch[0]), atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_export_of_a_gpu_model_leaves_it_on_the_gpu(tmp_path, batch):
    model = SmallCNN(width=4).cuda()
    export_classifier(model, batch[0].cuda(), tmp_path)
    assert all(p.is_cuda for p in model.parameters()) and all(b.is_cuda for b in model.buffers())


def test_loaded_program_accepts_eval_and_train_and_stays_in_eval_mode(tmp_path, batch):
    model = _with_running_stats(SmallCNN(width=4))
    x = batch[0]
    exported = load_exported(export_classifier(model, x, tmp_path)["program"])
    with torch.no_grad():  # (a train-mode forward updates the running statistics: last)
        expected, batch_stats = model.eval()(x), model.train()(x)
    assert not torch.allclose(expected, batch_stats, atol=1e-3)  # the modes differ for this model
    assert exported.train() is exported and exported.training
    assert torch.allclose(exported(x), expected, atol=1e-5)  # the graph is eval mode, whatever the flag
    assert exported.eval() is exported and not exported.training and not any(m.training for m in exported.modules())
    assert torch.allclose(exported(x), expected, atol=1e-5)


@pytest.mark.parametrize("damage", ["truncated", "empty", "missing"])
def test_a_damaged_checkpoint_is_named(tmp_path, damage):
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"model.weight": torch.randn(32, 32)}}, path)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.unlink()
    with pytest.raises((ValueError, FileNotFoundError), match=f"checkpoint {path} is {damage}"):
        classifier_state_dict(path)
