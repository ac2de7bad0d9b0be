"""The contract every registered defense keeps (timm's test_models.py is the model): fast_dev_run fit,
validate and test under inference mode, checkpoint round-trip, an adversarial batch inside the threat
model that leaves no parameter gradient, and seeded determinism."""

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from digits_bench import InferenceModeSeen, data_per_defense, quiet_trainer as _trainer

from lit_robust.datamodules import DigitsDataModule
from lit_robust.defenses import DEFENSES, AdversarialModule
from lit_robust.models import SmallCNN

EPS = 0.2
CASES = [(name, {}) for name in DEFENSES] + [(name, {"awp_gamma": 0.01}) for name in ("PGDAT", "TRADES", "MART")]
IDS = [name + ("+awp" if kw else "") for name, kw in CASES]


def _make(name, extra):
    return DEFENSES[name](SmallCNN(width=4), eps=EPS, steps=2, step_size=0.1, val_attack_steps=1,
                          test_attack_steps=1, **extra)


@pytest.fixture(scope="module")
def data():
    """``data(name)``: the digits, with example indices in the training batches for a defense that needs them."""
    return data_per_defense(lambda flag: DigitsDataModule(batch_size=16, eval_batch_size=32, with_index=flag))


@pytest.mark.parametrize("name,extra", CASES, ids=IDS)
def test_fit_validate_test(tmp_path, data, name, extra):
    digits = data(name)
    module, seen = _make(name, extra), InferenceModeSeen()
    trainer = _trainer(tmp_path, fast_dev_run=2, callbacks=[seen])
    trainer.fit(module, digits)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    seen.flags.clear()
    val = trainer.validate(module, digits, verbose=False)[0]
    test = trainer.test(module, digits, verbose=False)[0]
    assert seen.flags and all(seen.flags)
    assert {"val/clean_acc", "val/robust_acc"} <= set(val) and {"test/clean_acc", "test/robust_acc"} <= set(test)
    assert all(0.0 <= v <= 1.0 for v in (*val.values(), *test.values()))


@pytest.mark.parametrize("name,extra", CASES, ids=IDS)
def test_checkpoint_round_trip(tmp_path, data, name, extra):
    digits = data(name)
    module = _make(name, extra)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    _trainer(tmp_path, max_steps=2, limit_val_batches=1, enable_checkpointing=True, callbacks=[ckpt]).fit(module, digits)
    restored = DEFENSES[name].load_from_checkpoint(ckpt.last_model_path, model=SmallCNN(width=4))
    assert dict(restored.hparams) == dict(module.hparams)
    state, back = module.state_dict(), restored.state_dict()
    assert state.keys() == back.keys()
    assert all(torch.equal(state[k], back[k]) for k in state)


@pytest.mark.parametrize("name,extra", CASES, ids=IDS)
def test_adversarial_batch_respects_threat_model_and_leaves_no_gradients(data, name, extra):
    digits = data(name)
    module = _make(name, extra)
    x, y, *_ = next(iter(digits.train_dataloader()))
    module.train()
    x_adv = module.perturb(x, y)
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert module.in_threat_model(x, x_adv).all()
    if type(module).in_threat_model is AdversarialModule.in_threat_model:  # union balls and N-FGSM's 3 eps reach past
        assert (x_adv - x).abs().max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert all(p.grad is None for p in module.parameters())
    assert all(m.training for m in module.modules())  # attack-time modes were restored


@pytest.mark.parametrize("name,extra", CASES, ids=IDS)
def test_seeded_training_is_deterministic(tmp_path, data, name, extra):
    digits = data(name)
    def run():
        L.seed_everything(7)
        module = _make(name, extra)
        _trainer(tmp_path, max_steps=3, limit_val_batches=0).fit(module, digits)
        return torch.cat([p.detach().flatten() for p in module.parameters()])

    assert torch.equal(run(), run())
