"""CatastrophicOverfittingMonitor on its own: manual-optimization defenses (Free AT, FGSM-SDI), the
restore / stop options, its timing, its state, and its argument checks. FastAT's built-in guard
(the same callback, attached by the module) is tested in test_fast_at.py."""

import csv
import io
import math

import pytest
import torch
from digits_bench import training_only_trainer as _trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import CSVLogger

from lit_robust.callbacks.catastrophic_overfitting import CatastrophicOverfittingMonitor
from lit_robust.defenses import FGSMSDI, FastAT, FreeAT
from lit_robust.models import SmallCNN


def _flat(module):
    """All of the LightningModule's weights (classifier and, for FGSM-SDI, the generator)."""
    return torch.cat([t.detach().flatten().float() for t in module.state_dict().values()])


class _ScriptedMonitor(CatastrophicOverfittingMonitor):
    """Sees scripted check accuracies, records the weights it checked and the order of events."""

    def __init__(self, script, events=None, **kwargs):
        super().__init__(**kwargs)
        self.script, self.checked, self.events = list(script), [], events

    def check_accuracy(self, trainer, pl_module, x, y):
        self.checked.append(_flat(pl_module).clone())
        if self.events is not None:
            self.events.append("check")
        return self.script[len(self.checked) - 1]


class _EpochEndWeights(Callback):
    """The weights at each training epoch's end (after the monitor's hooks: it comes later in the list)."""

    def __init__(self):
        self.weights = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.weights.append(_flat(pl_module).clone())


DEFENSES = {
    "FreeAT": (lambda: FreeAT(SmallCNN(width=4), replays=2, eps=0.2), 2),  # (factory, optimizer steps per batch)
    "FGSMSDI": (lambda: FGSMSDI(SmallCNN(width=4), eps=0.2, step_size=0.2, generator_every=2, generator_width=4), 1),
}


def _logged(trainer):
    with open(trainer.logger.log_dir + "/metrics.csv") as f:
        return [float(row["train/co_check_acc"]) for row in csv.DictReader(f) if row.get("train/co_check_acc")]


@pytest.mark.parametrize("name", DEFENSES)
def test_restores_and_stops_a_manual_optimization_defense(tmp_path, digits, name):
    factory, steps_per_batch = DEFENSES[name]
    module, monitor = factory(), _ScriptedMonitor([0.5, 0.6, 0.1, 0.6])
    assert not module.automatic_optimization
    trainer = _trainer(tmp_path, max_epochs=4, limit_train_batches=3, callbacks=[monitor],
                       logger=CSVLogger(tmp_path, name="csv"))
    with pytest.warns(UserWarning, match=rf"{name}: catastrophic overfitting at epoch 2: .* 0\.600 to 0\.100 "
                                         r".*restored the weights of epoch 1 and stopped training"):
        trainer.fit(module, digits)
    assert len(monitor.checked) == 3 and trainer.global_step == 3 * 3 * steps_per_batch  # stopped after epoch 2
    assert monitor.stopped_epoch == 2 and monitor.collapsed_epochs == [2]
    assert torch.equal(_flat(module), monitor.checked[1])  # every weight of epoch 1 (FGSM-SDI's generator too)
    assert not torch.equal(_flat(module), monitor.checked[2])
    assert _logged(trainer) == pytest.approx([0.5, 0.6, 0.1])  # pl_module.log from the callback's hooks


@pytest.mark.parametrize("restore", [True, False], ids=["restore", "keep"])
@pytest.mark.parametrize("stop", [True, False], ids=["stop", "go_on"])
def test_restore_and_stop_options(tmp_path, digits, restore, stop):
    """Epoch 2 collapses (0.6 -> 0.1); epoch 3 (0.35) is compared with epoch 1, the last that passed."""
    monitor, ends = _ScriptedMonitor([0.5, 0.6, 0.1, 0.35], restore=restore, stop=stop), _EpochEndWeights()
    module = FreeAT(SmallCNN(width=4), replays=1, eps=0.2)
    trainer = _trainer(tmp_path, max_epochs=4, limit_train_batches=2, callbacks=[monitor, ends])
    action = ("restored the weights of epoch 1" if restore else "kept the current weights") + (
        " and stopped training" if stop else "; training goes on")
    with pytest.warns(UserWarning, match=r"catastrophic overfitting at epoch 2: .*; " + action) as record:
        trainer.fit(module, digits)
    warned = [str(w.message) for w in record if "catastrophic" in str(w.message)]
    assert len(warned) == (1 if stop else 2) and all(w.endswith(action) for w in warned)
    # restore: the weights at the end of epoch 2 (and of epoch 3) are epoch 1's; otherwise their own.
    assert torch.equal(ends.weights[2], monitor.checked[1 if restore else 2])
    assert (monitor.state_dict()["kept"] is not None) == restore  # no CPU copy held without restore
    assert monitor.previous_acc == pytest.approx(0.6) and monitor.previous_epoch == 1
    if stop:
        assert trainer.global_step == 6 and len(monitor.checked) == 3
        assert monitor.stopped_epoch == 2 and monitor.collapsed_epochs == [2]
    else:
        assert trainer.global_step == 8 and len(monitor.checked) == 4
        assert monitor.stopped_epoch is None and monitor.collapsed_epochs == [2, 3]
        assert torch.equal(ends.weights[3], monitor.checked[1] if restore else monitor.checked[3])


def test_check_runs_before_validation_and_falls_back_to_epoch_end(tmp_path, digits):
    events = []

    class Events(Callback):  # after the monitor in the list: its hooks run after the monitor's
        def on_train_batch_end(self, *args):
            events.append("batch")

        def on_validation_start(self, trainer, pl_module):
            if not trainer.sanity_checking:
                events.append("val")

        def on_train_epoch_end(self, trainer, pl_module):
            events.append("epoch_end")

    monitor = _ScriptedMonitor([0.5, 0.5], events=events)
    _trainer(tmp_path, max_epochs=2, limit_train_batches=3, limit_val_batches=1, num_sanity_val_steps=0,
             callbacks=[monitor, Events()]).fit(FreeAT(SmallCNN(width=4), replays=1, eps=0.2), digits)
    assert events == ["batch", "batch", "check", "batch", "val", "epoch_end"] * 2  # first batch kept, checked last

    # max_steps ends the epoch after its 2nd batch: the last-batch hook never sees the end, on_train_epoch_end checks.
    events.clear()
    monitor = _ScriptedMonitor([0.5], events=events)
    trainer = _trainer(tmp_path, max_steps=2, limit_train_batches=3, callbacks=[monitor, Events()])
    trainer.fit(FreeAT(SmallCNN(width=4), replays=1, eps=0.2), digits)
    assert events == ["batch", "batch", "check", "epoch_end"] and len(monitor.checked) == 1
    assert trainer.callback_metrics["train/co_check_acc"] == pytest.approx(0.5)


@pytest.mark.parametrize("name", DEFENSES)
def test_the_real_check_on_a_manual_defense(tmp_path, digits, name):
    """No script: PGD on the kept batch, logged once per epoch, the weights untouched when nothing collapses."""
    module, monitor, ends = DEFENSES[name][0](), CatastrophicOverfittingMonitor(drop=1.0), _EpochEndWeights()
    trainer = _trainer(tmp_path, max_epochs=2, limit_train_batches=2, callbacks=[monitor, ends],
                       logger=CSVLogger(tmp_path, name="csv"))
    trainer.fit(module, digits)
    logged = _logged(trainer)
    assert len(logged) == 2 and all(0.0 <= acc <= 1.0 for acc in logged)
    assert monitor.previous_acc == pytest.approx(logged[1]) and monitor.previous_epoch == 1
    assert torch.equal(torch.cat([v.flatten().float() for v in monitor.state_dict()["kept"].values()]),
                       ends.weights[1])  # the CPU copy is of the weights that passed


def test_attack_reads_the_modules_threat_model_unless_eps_is_given():
    module = FreeAT(SmallCNN(width=4), eps=0.2, norm="l2")
    attack = CatastrophicOverfittingMonitor(check_steps=3).attack(module)
    assert (attack.eps, attack.steps, attack.norm) == (pytest.approx(0.2), 3, "l2")
    assert attack.step_size == pytest.approx(0.05) and attack.random_start and attack.restarts == 1
    assert attack.bn_mode == "eval"
    module.eps = 0.4  # read at every check
    assert CatastrophicOverfittingMonitor().attack(module).eps == pytest.approx(0.4)
    fixed = CatastrophicOverfittingMonitor(eps=0.1).attack(module)
    assert fixed.eps == pytest.approx(0.1) and fixed.step_size == pytest.approx(0.025)


def test_state_dict_round_trip(tmp_path, digits):
    monitor = _ScriptedMonitor([0.5, 0.7, 0.1])
    module = FreeAT(SmallCNN(width=4), replays=1, eps=0.2)
    with pytest.warns(UserWarning, match="catastrophic"):
        _trainer(tmp_path, max_epochs=4, limit_train_batches=2, callbacks=[monitor]).fit(module, digits)
    buffer = io.BytesIO()
    torch.save(monitor.state_dict(), buffer)  # what a checkpoint holds, loadable with weights_only
    buffer.seek(0)
    fresh = CatastrophicOverfittingMonitor()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    state = fresh.state_dict()
    assert state["previous_acc"] == pytest.approx(0.7) and state["previous_epoch"] == 1
    assert state["stopped_epoch"] == 2 and state["collapsed_epochs"] == [2]
    assert fresh.stopped_epoch == 2 and fresh.previous_acc == pytest.approx(0.7)
    assert state["kept"].keys() == module.state_dict().keys()
    assert all(v.device.type == "cpu" for v in state["kept"].values())
    assert torch.equal(torch.cat([v.flatten().float() for v in state["kept"].values()]), monitor.checked[1])


def test_resume_compares_with_the_checkpoints_epoch(tmp_path, digits):
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    first = _ScriptedMonitor([0.5, 0.7])
    _trainer(tmp_path, max_epochs=2, limit_train_batches=2, enable_checkpointing=True, callbacks=[first, ckpt]).fit(
        FreeAT(SmallCNN(width=4), replays=1, eps=0.2), digits)
    resumed, module = _ScriptedMonitor([0.45]), FreeAT(SmallCNN(width=4), replays=1, eps=0.2)
    trainer = _trainer(tmp_path, max_epochs=4, limit_train_batches=2, callbacks=[resumed])
    with pytest.warns(UserWarning, match=r"epoch 2: .* 0\.700 to 0\.450 .*restored the weights of epoch 1"):
        trainer.fit(module, digits, ckpt_path=ckpt.last_model_path)  # 0.25 below 0.7: a collapse only if resumed
    assert resumed.stopped_epoch == 2 and trainer.global_step == 6
    assert torch.equal(_flat(module), first.checked[1])


def test_one_monitor_per_trainer(tmp_path, digits):
    """FastAT attaches its own; a user's monitor of another class would not be replaced, so fit refuses."""
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=1, callbacks=[_ScriptedMonitor([0.5])])
    with pytest.raises(ValueError, match="only one CatastrophicOverfittingMonitor per Trainer"):
        trainer.fit(FastAT(SmallCNN(width=4), eps=0.2), digits)
    monitor = _ScriptedMonitor([0.5])
    _trainer(tmp_path, max_epochs=1, limit_train_batches=1, callbacks=[monitor]).fit(
        FastAT(SmallCNN(width=4), eps=0.2, co_guard=False), digits)
    assert len(monitor.checked) == 1


def test_needs_an_adversarial_module(tmp_path):
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=1, callbacks=[CatastrophicOverfittingMonitor()])
    with pytest.raises(ValueError, match="needs a LightningModule with a classifier `model`"):
        trainer.fit(BoringModel())


@pytest.mark.parametrize("kwargs,name", [({"drop": 0.0}, "drop"), ({"drop": 1.5}, "drop"), ({"drop": -0.1}, "drop"),
                                         ({"drop": math.nan}, "drop"), ({"check_steps": 0}, "check_steps"),
                                         ({"check_steps": 2.5}, "check_steps"), ({"eps": 0.0}, "eps"),
                                         ({"eps": -0.1}, "eps")])
def test_invalid_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        CatastrophicOverfittingMonitor(**kwargs)
