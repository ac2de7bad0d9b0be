"""RobustEarlyStopping and robust_checkpoint: stop, remember and reload the best held-out robust epoch."""

import math

import lightning.pytorch as L
import pytest
import torch
from digits_bench import EPS, quiet_trainer, sgd
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_robust.callbacks.early_stopping import RobustEarlyStopping, robust_checkpoint
from lit_robust.defenses import PGDAT
from lit_robust.models import SmallCNN

SCRIPT = [0.3, 0.5, 0.45, 0.6, 0.55, 0.5, 0.4]  # val/robust_acc per epoch: best at epoch 3


class ScriptedRun(L.LightningModule):
    """Logs ``SCRIPT[epoch]`` as ``val/robust_acc``.

    ``trained_epoch`` is a buffer, saved with the weights: a loaded checkpoint names its epoch.
    """

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(2, 1)
        self.register_buffer("trained_epoch", torch.tensor(-1))
        self.validated_epochs = []

    def training_step(self, batch, batch_idx):
        self.trained_epoch.fill_(self.current_epoch)
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.validated_epochs.append(self.current_epoch)
        self.log("val/robust_acc", SCRIPT[self.current_epoch])

    def test_step(self, batch, batch_idx):
        self.log("test/trained_epoch", self.trained_epoch.float())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _loader():
    return DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=4)


def _fit(tmp_path, callbacks, max_epochs=len(SCRIPT), ckpt_path=None, module=None):
    module = module or ScriptedRun()
    trainer = quiet_trainer(tmp_path, max_epochs=max_epochs, callbacks=callbacks, num_sanity_val_steps=0,
                            enable_checkpointing=True)
    trainer.fit(module, _loader(), _loader(), ckpt_path=ckpt_path)
    return trainer, module


@pytest.mark.parametrize("patience, last_epoch, best_epoch", [(1, 2, 1), (2, 5, 3), (None, 6, 3)])
def test_stops_after_patience_checks_without_improvement(tmp_path, patience, last_epoch, best_epoch):
    stopper = RobustEarlyStopping(patience=patience)
    _, module = _fit(tmp_path, [stopper])
    assert module.validated_epochs == list(range(last_epoch + 1))
    assert stopper.stopped_epoch == (0 if patience is None else last_epoch)
    assert stopper.best_epoch == best_epoch
    assert stopper.best_score.item() == pytest.approx(max(SCRIPT[: last_epoch + 1]))


def test_best_checkpoint_is_the_best_epoch_and_test_loads_it(tmp_path):
    stopper, ckpt = RobustEarlyStopping(patience=2), robust_checkpoint(dirpath=tmp_path / "ckpt")
    trainer, module = _fit(tmp_path, [stopper, ckpt])
    assert ckpt.best_model_path.endswith("best-epoch003-robust_acc=0.6000.ckpt")
    assert ckpt.best_model_score.item() == pytest.approx(0.6)
    assert torch.load(ckpt.best_model_path, weights_only=False)["epoch"] == stopper.best_epoch == 3
    assert torch.load(ckpt.last_model_path, weights_only=False)["epoch"] == 5
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["best-epoch003-robust_acc=0.6000.ckpt",
                                                                    "last.ckpt"]
    assert module.trained_epoch.item() == 5
    (result,) = trainer.test(module, _loader(), ckpt_path="best", verbose=False)
    assert result["test/trained_epoch"] == 3


def test_a_resumed_run_stops_where_a_straight_one_does(tmp_path):
    """Resumed after epoch 4 (one check without improvement): patience 2 must still stop at epoch 5."""
    ckpt = robust_checkpoint(dirpath=tmp_path / "ckpt")
    first = RobustEarlyStopping(patience=2)
    _fit(tmp_path, [first, ckpt], max_epochs=5)
    assert (first.best_epoch, first.wait_count, first.stopped_epoch) == (3, 1, 0)
    resumed = RobustEarlyStopping(patience=2)
    _, module = _fit(tmp_path, [resumed, robust_checkpoint(dirpath=tmp_path / "ckpt")], ckpt_path=ckpt.last_model_path)
    assert module.validated_epochs == [5]
    assert (resumed.best_epoch, resumed.stopped_epoch) == (3, 5)


def test_state_dict_round_trip_keeps_best_epoch():
    stopper = RobustEarlyStopping(patience=None)
    stopper.best_epoch, stopper.wait_count, stopper.best_score = 7, 2, torch.tensor(0.53)
    state = stopper.state_dict()
    assert state["best_epoch"] == 7 and state["patience"] == math.inf
    restored = RobustEarlyStopping(patience=3)
    restored.load_state_dict(state)
    assert (restored.best_epoch, restored.wait_count, restored.patience) == (7, 2, math.inf)
    assert restored.best_score.item() == pytest.approx(0.53)


@pytest.mark.parametrize("make", [RobustEarlyStopping, robust_checkpoint])
def test_refuses_to_select_on_the_test_split(make):
    with pytest.raises(ValueError, match="monitor.*test/robust_acc"):
        make(monitor="test/robust_acc")


@pytest.mark.parametrize("patience", [0, -1, 2.5])
def test_refuses_bad_patience(patience):
    with pytest.raises(ValueError, match="patience"):
        RobustEarlyStopping(patience=patience)


def test_defaults():
    stopper, ckpt = RobustEarlyStopping(), robust_checkpoint()
    assert (stopper.monitor, stopper.mode, stopper.patience, stopper.best_epoch) == ("val/robust_acc", "max", 10, None)
    assert (ckpt.monitor, ckpt.mode, ckpt.save_top_k, ckpt.save_last) == ("val/robust_acc", "max", 1, True)
    assert not ckpt.auto_insert_metric_name


def test_pgdat_run_selects_on_the_real_validation_robust_accuracy(tmp_path, digits):
    logged = {}

    class Record(Callback):
        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                logged[trainer.current_epoch] = trainer.callback_metrics["val/robust_acc"].item()

    L.seed_everything(0)
    module = PGDAT(SmallCNN(width=8), eps=EPS, steps=2, step_size=EPS / 2, val_attack_steps=3, test_attack_steps=3,
                   optimizer=sgd())
    stopper, ckpt = RobustEarlyStopping(patience=None), robust_checkpoint(dirpath=tmp_path / "ckpt")
    trainer = quiet_trainer(tmp_path, max_epochs=3, limit_train_batches=6, limit_test_batches=1, num_sanity_val_steps=0,
                            callbacks=[stopper, ckpt, Record()], enable_checkpointing=True)
    trainer.fit(module, digits)
    assert sorted(logged) == [0, 1, 2] and len(set(logged.values())) > 1  # a real, changing metric
    best = max(logged, key=logged.get)
    assert stopper.best_score.item() == pytest.approx(logged[best])
    assert stopper.best_epoch == best
    assert torch.load(ckpt.best_model_path, weights_only=False)["epoch"] == best
    (result,) = trainer.test(module, digits, ckpt_path="best", verbose=False)
    assert 0 <= result["test/robust_acc"] <= 1
    best_weights = torch.load(ckpt.best_model_path, weights_only=False)["state_dict"]
    assert all(torch.equal(value, best_weights[name]) for name, value in module.state_dict().items())
