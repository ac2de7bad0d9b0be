"""Adversarial training and robust evaluation for a LightningModule that is not ours (tests/helpers/foreign_module.py:
dict batches, its own loss, optimizer, metrics and names), through the AdversarialTraining and RobustEvaluation
callbacks."""

import lightning.pytorch as L
import pytest
import torch
from digits_bench import EPS, InferenceModeSeen, digits_accuracy, quiet_trainer
from helpers.foreign_module import DictDigits, ForeignClassifier
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lit_robust.attacks import FGSM, PGD
from lit_robust.callbacks import (AdversarialTraining, AttackStepsSchedule, EpsilonSchedule, FOSCSchedule,
                                  RobustEarlyStopping, RobustEvaluation, robust_checkpoint)
from lit_robust.defenses import PGDAT
from lit_robust.evaluation.tiers import attack_batch
from lit_robust.models import SmallCNN

KEYS = dict(inputs="image", targets="label")


def pgd(**kwargs) -> PGD:
    return PGD(EPS, **{"steps": 4, "step_size": EPS / 3, **kwargs})


def fit(module, callbacks=(), epochs=1, tmp_path=None, **trainer_kwargs) -> L.Trainer:
    L.seed_everything(0)
    trainer = quiet_trainer(tmp_path, max_epochs=epochs, limit_val_batches=0, callbacks=list(callbacks),
                            **trainer_kwargs)
    trainer.fit(module, DictDigits())
    return trainer


# --- robustness, and the module's own metrics ------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The same module trained 8 epochs with and without the callback."""
    tmp_path = tmp_path_factory.mktemp("embedding")
    out = {}
    adversarial = [AdversarialTraining(pgd(steps=10, step_size=0.05), **KEYS)]
    for name, callbacks in (("plain", []), ("adversarial", adversarial)):
        module = ForeignClassifier()
        trainer = fit(module, callbacks, epochs=8, tmp_path=tmp_path)
        out[name] = (module, set(trainer.callback_metrics), digits_accuracy(module.net))
    return out


def test_the_callback_makes_a_foreign_module_robust(trained):
    plain, adversarial = trained["plain"][2], trained["adversarial"][2]
    assert adversarial["pgd"] > plain["pgd"] + 0.3 and adversarial["clean"] > 0.85, (plain, adversarial)


def test_the_modules_logged_metrics_are_its_own(trained):
    assert trained["plain"][1] == trained["adversarial"][1] == {"my/loss", "my/train_acc"}
    assert "training_step" not in vars(trained["adversarial"][0])  # its own step again after fit


def test_pgd_at_through_the_callback_is_the_pgdat_defense_bit_for_bit(tmp_path):
    """Same seed, weights, data order and optimizer: the callback's steps equal PGDAT's."""
    dm = DictDigits(batch_size=32)
    dm.setup()
    images, labels = dm.digits.splits["train"].tensors
    net = SmallCNN(width=4)
    foreign = ForeignClassifier(width=4, lr=0.05)
    foreign.net.load_state_dict(net.state_dict())
    defense = PGDAT(SmallCNN(width=4), eps=EPS, steps=3, step_size=0.1,
                    optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4),
                    lr_scheduler=lambda o: torch.optim.lr_scheduler.ConstantLR(o, factor=1.0))
    defense.model.load_state_dict(net.state_dict())
    L.seed_everything(0)
    quiet_trainer(tmp_path, max_steps=4, callbacks=[AdversarialTraining(PGD(EPS, 3, 0.1), **KEYS)]).fit(
        foreign, DataLoader(_dicts(images, labels), batch_size=32))
    L.seed_everything(0)
    quiet_trainer(tmp_path, max_steps=4).fit(defense, DataLoader(TensorDataset(images, labels), batch_size=32))
    weights = zip(foreign.net.state_dict().values(), defense.model.state_dict().values())
    assert all(torch.equal(a, b) for a, b in weights)


def _dicts(images, labels):
    from helpers.foreign_module import _Dicts

    return _Dicts(images, labels)


# --- fraction, schedules, resume ---------------------------------------------------------------------

def test_fraction_replaces_a_seeded_share_of_each_batch(tmp_path):
    module = ForeignClassifier(width=4)
    callback = AdversarialTraining(pgd(), fraction=0.25, **KEYS)
    dm = DictDigits(batch_size=32)
    dm.setup()
    images, labels = dm.digits.splits["train"].tensors
    data = DataLoader(_dicts(images, labels), batch_size=32)
    L.seed_everything(0)
    quiet_trainer(tmp_path, max_steps=3, callbacks=[callback]).fit(module, data)
    changed = [(seen != clean).flatten(1).any(1) for seen, clean in zip(module.seen, images.split(32))]
    assert [int(c.sum()) for c in changed] == [8, 8, 8]  # round(0.25 * 32) per batch; the rest stay clean
    expected = [callback._chosen(images[:32], 0, b).sort().values for b in range(3)]
    assert all(torch.equal(c.nonzero().squeeze(1), e) for c, e in zip(changed, expected))
    assert not torch.equal(expected[0], expected[1])  # a new draw per batch, the same on a rerun


def test_schedules_drive_the_callbacks_attack(tmp_path):
    attack = pgd(steps=4)
    seen = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((trainer.current_epoch, attack.eps, attack.steps, attack.fosc_threshold))

    callbacks = [AdversarialTraining(attack, **KEYS), EpsilonSchedule(2, per_step=False),
                 AttackStepsSchedule(2, start_steps=2), FOSCSchedule(c_max=0.5, dynamic_epochs=2, log_histogram=False),
                 Record()]
    trainer = fit(ForeignClassifier(width=4), callbacks, epochs=3, tmp_path=tmp_path, limit_train_batches=2)
    by_epoch = {epoch: (eps, steps, c) for epoch, eps, steps, c in seen}
    assert by_epoch[0] == (0.0, 2, 0.5) and by_epoch[1] == (pytest.approx(EPS / 2), 3, 0.25)
    assert by_epoch[2] == (pytest.approx(EPS), 4, 0.0)
    assert {"train/fosc_mean", "train/attack_steps", "train/fosc_threshold"} <= set(trainer.callback_metrics)


def _resume_fit(tmp_path, name, ckpt_path=None):
    L.seed_everything(0)
    module = ForeignClassifier(width=4)
    trainer = quiet_trainer(tmp_path, max_epochs=2, limit_train_batches=3, limit_val_batches=0,
                            enable_checkpointing=True,
                            callbacks=[AdversarialTraining(pgd(), fraction=0.5, **KEYS),
                                       ModelCheckpoint(dirpath=tmp_path / name, save_top_k=-1)])
    trainer.fit(module, DictDigits(batch_size=32), ckpt_path=ckpt_path)
    return module


def test_resume_is_exact(tmp_path):
    straight = _resume_fit(tmp_path, "straight")
    resumed = _resume_fit(tmp_path, "resumed", ckpt_path=tmp_path / "straight" / "epoch=0-step=3.ckpt")
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))


# --- bad arguments ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(fraction=0.0), r"fraction must be in \(0, 1\], got 0.0"),
    (dict(fraction=1.5), r"fraction must be in \(0, 1\]"),
    (dict(inputs=lambda b: b["image"]), "inputs must be an index or a key"),
    (dict(inputs=2.5), "inputs must be an index"),
])
def test_bad_arguments_are_refused_when_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdversarialTraining(pgd(), **{**KEYS, **kwargs})
    with pytest.raises(ValueError, match="attack must be a lit_robust.attacks.PGD"):
        AdversarialTraining(lambda m, x, y: x)


@pytest.mark.parametrize("kwargs, message", [
    (dict(inputs="img", targets="label"), r"inputs='img' is not a key of the batch, whose keys are \['image', "),
    (dict(inputs="image", targets="label", model="backbone"), "model='backbone' is not a submodule of "
                                                              r"ForeignClassifier; its children are \['net'"),
])
def test_bad_keys_and_models_are_named_at_the_first_batch(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        fit(ForeignClassifier(width=4), [AdversarialTraining(pgd(), **kwargs)], tmp_path=tmp_path, max_steps=1)


def test_a_model_that_does_not_return_logits_is_named(tmp_path):
    class Probabilities(ForeignClassifier):
        def forward(self, x):
            return self.net(x).softmax(1)

    with pytest.raises(ValueError, match="the model returns probabilities"):
        fit(Probabilities(width=4), [AdversarialTraining(pgd(), **KEYS)], tmp_path=tmp_path, max_steps=1)


# --- robust evaluation of a foreign module ------------------------------------------------------------

def test_robust_validation_is_the_exact_pgd_accuracy_under_inference_mode(tmp_path):
    module = ForeignClassifier(width=4).eval()
    dm = DictDigits(batch_size=50)  # 180 validation images: 50, 50, 50, 30
    dm.setup()
    x, y = dm.digits.splits["val"].tensors
    attack = PGD(EPS, steps=3)
    torch.manual_seed(5)
    expected = torch.cat([attack.run(module.net, xb, yb).predictions == yb
                          for xb, yb in zip(x.split(50), y.split(50))]).double().mean()
    torch.manual_seed(5)
    inference = InferenceModeSeen()
    trainer = quiet_trainer(tmp_path, callbacks=[RobustEvaluation(EPS, val_steps=3, **KEYS), inference])
    (metrics,) = trainer.validate(module, dm, verbose=False)
    assert inference.flags == [True] * 4  # Lightning's default: validation under inference mode
    assert metrics["val/robust_acc"] == pytest.approx(expected.item(), abs=1e-7)
    assert set(metrics) == {"my/val_acc", "val/robust_acc"}


def test_robust_test_runs_the_tiers_and_the_worst_case(tmp_path):
    module = ForeignClassifier(width=4).eval()
    dm = DictDigits(batch_size=16)
    dm.setup()
    x, y = dm.digits.splits["test"].tensors
    found = attack_batch(module.net, x[:16], y[:16], EPS, tiers=("pgd", "apgd"), pgd_steps=5)
    trainer = quiet_trainer(tmp_path, limit_test_batches=1,
                            callbacks=[RobustEvaluation(EPS, tiers=("pgd", "apgd"), test_steps=5, model="net", **KEYS)])
    (metrics,) = trainer.test(module, dm, verbose=False)
    names = {"pgd": "test/robust_acc", "apgd-ce": "test/apgd_ce_acc", "apgd-t": "test/apgd_t_acc",
             "worst_case": "test/worst_case_acc"}
    assert set(metrics) == set(names.values()) | {"my/test_acc"}
    for key, name in names.items():
        assert metrics[name] == pytest.approx(found[key].double().mean().item(), abs=1e-7), name


def test_robust_selection_works_on_a_foreign_module(tmp_path):
    """RobustEarlyStopping and robust_checkpoint monitor the callback's val/robust_acc."""
    stopping, checkpoint = RobustEarlyStopping(patience=None), robust_checkpoint(dirpath=tmp_path)
    trainer = quiet_trainer(tmp_path, max_epochs=2, limit_train_batches=2, limit_val_batches=2,
                            enable_checkpointing=True, num_sanity_val_steps=0,
                            callbacks=[AdversarialTraining(pgd(), **KEYS), RobustEvaluation(EPS, val_steps=2, **KEYS),
                                       stopping, checkpoint])
    trainer.fit(ForeignClassifier(width=4), DictDigits(batch_size=32))
    assert checkpoint.best_model_path and stopping.best_epoch in (0, 1)
    assert float(checkpoint.best_model_score) >= float(trainer.callback_metrics["val/robust_acc"])


def test_fgsm_rs_through_the_callback(tmp_path):
    """Fast AT with the module unchanged: FGSM-RS inputs stay in the ball and the box."""
    module = ForeignClassifier(width=4)
    dm = DictDigits(batch_size=32)
    dm.setup()
    images, labels = dm.digits.splits["train"].tensors
    L.seed_everything(0)
    quiet_trainer(tmp_path, max_steps=2, callbacks=[AdversarialTraining(FGSM(EPS, random_start=True), **KEYS)]).fit(
        module, DataLoader(_dicts(images, labels), batch_size=32))
    for seen, clean in zip(module.seen, images.split(32)):
        delta = (seen - clean).abs()
        assert delta.max() <= EPS + 1e-6 and delta.max() > EPS / 2 and seen.min() >= 0 and seen.max() <= 1
