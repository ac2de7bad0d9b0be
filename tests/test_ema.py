"""EMA weight averaging (lit_robust.callbacks.ema): the formula, when it updates, where the average is used."""

import pickle

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from digits_bench import OpLog, quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_robust.callbacks.ema import EMA, EMAUpdate
from lit_robust.defenses import StandardTraining
from lit_robust.models import SmallCNN

STEPS = 6  # optimizer steps per epoch of `line_data` (batches of 2)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


class Recorder(L.LightningModule):
    """A tiny regression by plain SGD that records its state after every step and what validation/test saw."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.live, self.before_step, self.seen = [], [], {"val": [], "test": []}

    def training_step(self, batch, batch_idx):
        self.before_step.append(snapshot(self.net))
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.live.append(snapshot(self.net))

    def validation_step(self, batch, batch_idx):
        self.seen["val"].append((len(self.live), snapshot(self.net)))

    def test_step(self, batch, batch_idx):
        self.seen["test"].append(snapshot(self.net))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def line_data() -> DataLoader:
    x = torch.linspace(-1, 1, 2 * STEPS).unsqueeze(1)
    return DataLoader(TensorDataset(x, 3 * x + 1), batch_size=2)


def fit(tmp_path, ema: EMA, net: nn.Module = None, epochs: int = 1, **trainer_kwargs) -> tuple[Recorder, L.Trainer]:
    module = Recorder(net or nn.Linear(1, 1))
    trainer = quiet_trainer(tmp_path, max_epochs=epochs, callbacks=[ema, *trainer_kwargs.pop("callbacks", [])],
                            num_sanity_val_steps=0, **trainer_kwargs)
    trainer.fit(module, line_data(), line_data())
    return module, trainer


def ema_by_hand(live: list[dict], updates: list[int], decay: float, warmup: bool) -> dict:
    """The EMA of the live states after the 0-based optimizer steps `updates`; the first update copies."""
    average = dict(live[updates[0]])
    for t, step in enumerate(updates[1:], start=1):
        d = min(decay, (1 + t) / (10 + t)) if warmup else decay
        average = {k: d * average[k] + (1 - d) * live[step][k] if v.is_floating_point() else live[step][k]
                   for k, v in average.items()}
    return average


def assert_states_equal(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-6, msg=name)


def states_differ(a: dict, b: dict) -> bool:
    return any(not torch.allclose(a[k], b[k], atol=1e-4) for k in a)


def averaged_state(ema: EMA) -> dict:
    return snapshot(ema._average_model.module.net)


# --- 1. the formula and the schedule ----------------------------------------------------------

@pytest.mark.parametrize("warmup", [True, False])
def test_update_function_matches_the_formula(warmup):
    decay, live = 0.3, [torch.randn(3) for _ in range(6)]
    averaged = [torch.randn(3)]
    ema_fn = pickle.loads(pickle.dumps(EMAUpdate(decay, warmup)))  # ddp_spawn pickles callbacks
    ema_fn(averaged, [live[0]], torch.tensor(0))
    assert torch.equal(averaged[0], live[0])  # the first update copies, exactly
    for t in range(1, 6):
        ema_fn(averaged, [live[t]], torch.tensor(t))
    expected = live[0].double()
    for t in range(1, 6):
        d = min(decay, (1 + t) / (10 + t)) if warmup else decay  # the min switches to decay at t = 3
        expected = d * expected + (1 - d) * live[t].double()
    torch.testing.assert_close(averaged[0].double(), expected, rtol=0, atol=1e-6)


def test_update_function_never_reads_the_device_from_the_host():
    averaged, live = [torch.zeros(2), torch.zeros(3)], [torch.ones(2), torch.ones(3)]
    with OpLog() as log:
        EMAUpdate(0.995, warmup=True)(averaged, live, torch.tensor(4))
    assert not any("_local_scalar_dense" in op for op in log.counts), log.counts  # what .item() dispatches to
    torch.testing.assert_close(averaged[0], torch.full((2,), 1 - 5 / 14))


@pytest.mark.parametrize("warmup, start_step, every_n_steps, updates", [
    (True, 0, 1, [0, 1, 2, 3, 4, 5]),
    (False, 0, 1, [0, 1, 2, 3, 4, 5]),
    (True, 1, 2, [1, 3, 5]),
    (False, 2, 3, [2, 5]),
])
def test_fit_averages_the_live_weights_by_the_formula(tmp_path, warmup, start_step, every_n_steps, updates):
    ema = EMA(decay=0.3, warmup=warmup, start_step=start_step, every_n_steps=every_n_steps)
    module, _ = fit(tmp_path, ema, limit_val_batches=0)
    assert len(module.live) == STEPS and states_differ(module.live[0], module.live[-1])
    expected = ema_by_hand(module.live, updates, 0.3, warmup)
    assert_states_equal(averaged_state(ema), expected)
    assert int(ema._average_model.n_averaged) == len(updates)


class TwoStepsPerBatch(Recorder):
    """Manual optimization with two optimizer steps per batch, as FreeAT's replays."""

    def __init__(self) -> None:
        super().__init__(nn.Linear(1, 1))
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        for _ in range(2):
            optimizer.zero_grad()
            self.manual_backward(super().training_step(batch, batch_idx))
            optimizer.step()


def test_manual_optimization_updates_at_most_once_per_batch(tmp_path):
    ema, module = EMA(decay=0.3, every_n_steps=3), TwoStepsPerBatch()
    quiet_trainer(tmp_path, max_epochs=1, callbacks=[ema], limit_val_batches=0).fit(module, line_data())
    # global_step after each batch: 2, 4, 6, 8, 10, 12; update once 3 steps have passed since the last
    assert_states_equal(averaged_state(ema), ema_by_hand(module.live, [0, 2, 4], 0.3, True))


# --- 2, 3. validation -----------------------------------------------------------------------

def test_validation_sees_the_average_and_training_continues_from_the_live_weights(tmp_path):
    ema = EMA(decay=0.3)
    module, _ = fit(tmp_path, ema, epochs=2, val_check_interval=3, limit_val_batches=2)
    assert [n for n, _ in module.seen["val"]] == [3, 3, 6, 6, 9, 9, 12, 12]  # 2 val batches, 4 validations
    for n, seen in module.seen["val"]:
        assert_states_equal(seen, ema_by_hand(module.live[:n], list(range(n)), 0.3, True))
        assert states_differ(seen, module.live[n - 1])
    for step in range(1, 2 * STEPS):  # swapped back after each validation
        assert_states_equal(module.before_step[step], module.live[step - 1])


def test_delayed_start_validates_the_live_weights(tmp_path):
    """Lightning #21724: before the first update, validation got the never-updated initial copy."""
    initial = nn.Linear(1, 1)
    first = snapshot(initial)
    module, _ = fit(tmp_path, EMA(start_step=100), net=initial, limit_val_batches=1)
    assert states_differ(module.live[-1], first)
    assert_states_equal(module.seen["val"][0][1], module.live[-1])


def test_delayed_start_ends_fit_with_the_live_weights(tmp_path):
    """Lightning #21724: before the first update, on_train_end copied the initial weights into the model."""
    module, _ = fit(tmp_path, EMA(start_step=100), limit_val_batches=0)
    assert_states_equal(snapshot(module.net), module.live[-1])


def test_delayed_start_checkpoints_the_live_weights(tmp_path):
    """Lightning #21724: before the first update, checkpoints held the initial weights as state_dict."""
    module, _ = fit(tmp_path, EMA(start_step=100), limit_val_batches=0, enable_checkpointing=True,
                    callbacks=[ModelCheckpoint(dirpath=tmp_path)])
    live = module.live[-1]
    checkpoint = torch.load(next(tmp_path.glob("*.ckpt")), weights_only=False)
    for key in ("state_dict", "current_model_state"):
        assert_states_equal({k[4:]: v for k, v in checkpoint[key].items()}, live)
    assert int(checkpoint["averaging_state"]["n_averaged"]) == 0


# --- 4. BatchNorm statistics ---------------------------------------------------------------

@pytest.mark.parametrize("bn_buffers", ["average", "live"])
def test_batchnorm_statistics_are_averaged_or_live(tmp_path, bn_buffers):
    ema = EMA(decay=0.3, bn_buffers=bn_buffers)
    module, _ = fit(tmp_path, ema, net=nn.Sequential(nn.Linear(1, 1), nn.BatchNorm1d(1)), limit_val_batches=0)
    averaged, live = averaged_state(ema), module.live
    by_hand = ema_by_hand(live, list(range(STEPS)), 0.3, True)
    assert not torch.allclose(by_hand["1.running_mean"], live[-1]["1.running_mean"], atol=1e-4)
    for name in ("0.weight", "0.bias", "1.weight", "1.bias"):
        torch.testing.assert_close(averaged[name], by_hand[name], rtol=0, atol=1e-6)
    buffers = by_hand if bn_buffers == "average" else live[-1]
    for name in ("1.running_mean", "1.running_var"):
        torch.testing.assert_close(averaged[name], buffers[name], rtol=0, atol=1e-6)
    assert int(averaged["1.num_batches_tracked"]) == STEPS  # a counter: copied, never averaged


# --- 5. resume --------------------------------------------------------------------------------

def _resume_fit(tmp_path, name: str, ckpt_path=None) -> None:
    L.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(80, 1, 8, 8, generator=g), torch.randint(0, 10, (80,), generator=g))
    loaders = [DataLoader(data, batch_size=16)] * 2  # no shuffling: no RNG outside the EMA's concern
    module = StandardTraining(nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8), nn.ReLU(),
                                            nn.Linear(8, 10)),
                              eps=0.1, val_attack_steps=1,
                              optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4))
    trainer = quiet_trainer(tmp_path, max_epochs=2, limit_train_batches=5, limit_val_batches=1,
                            enable_checkpointing=True, num_sanity_val_steps=0,
                            callbacks=[EMA(decay=0.9, start_step=1, every_n_steps=3),
                                       ModelCheckpoint(dirpath=tmp_path / name, save_top_k=-1)])
    trainer.fit(module, *loaders, ckpt_path=ckpt_path)


def test_resume_continues_exactly(tmp_path):
    _resume_fit(tmp_path, "straight")
    _resume_fit(tmp_path, "resumed", ckpt_path=tmp_path / "straight" / "epoch=0-step=5.ckpt")
    first, straight, resumed = (torch.load(tmp_path / name / f"epoch={e}-step={5 * (e + 1)}.ckpt", weights_only=False)
                                for name, e in (("straight", 0), ("straight", 1), ("resumed", 1)))
    # steps 0-4 then 5-9: updates after steps 1 (a copy), 4 and 7; without the callback's state
    # (the step of the last update) the resumed run would update after 5 and 8 instead of 7
    assert int(first["averaging_state"]["n_averaged"]) == 2
    assert int(resumed["averaging_state"]["n_averaged"]) == int(straight["averaging_state"]["n_averaged"]) == 3
    for key in ("state_dict", "current_model_state"):
        assert_states_equal(resumed[key], straight[key])
    assert states_differ(straight["state_dict"], straight["current_model_state"])


# --- 6. after fit ---------------------------------------------------------------------------------

def test_after_fit_the_model_holds_the_average_and_test_uses_it(tmp_path):
    ema = EMA(decay=0.3)
    module, trainer = fit(tmp_path, ema, limit_val_batches=0)
    expected = ema_by_hand(module.live, list(range(STEPS)), 0.3, True)
    assert states_differ(expected, module.live[-1])
    assert_states_equal(snapshot(module.net), expected)
    trainer.test(module, line_data())
    assert_states_equal(module.seen["test"][0], expected)


# --- 7. evaluating a checkpoint gives its average, whatever the path ---------------------------------

class TestedWeights(L.Callback):
    """Records the classifier's weights at the start of each test and validation run."""

    def __init__(self):
        self.seen = []

    def on_test_start(self, trainer, pl_module):
        self.seen.append(snapshot(pl_module.model))

    on_validation_start = on_test_start


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    """A PGD-AT run with EMA and robust_checkpoint(): the Trainer that fitted, its module, the best checkpoint."""
    from digits_bench import tiny_defense

    from lit_robust.callbacks import robust_checkpoint

    tmp_path = tmp_path_factory.mktemp("ema_run")
    L.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g))
    loader = DataLoader(data, batch_size=16)
    module = tiny_defense("PGDAT", val_attack_steps=1, optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    weights = TestedWeights()
    trainer = quiet_trainer(tmp_path, max_epochs=3, num_sanity_val_steps=0, enable_checkpointing=True,
                            callbacks=[EMA(decay=0.9), robust_checkpoint(dirpath=tmp_path), weights])
    trainer.fit(module, loader, loader)
    best = trainer.checkpoint_callback.best_model_path
    checkpoint = torch.load(best, weights_only=False)
    average = {k[len("model."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    live = {k[len("model."):]: v for k, v in checkpoint["current_model_state"].items() if k.startswith("model.")}
    assert states_differ(average, live)  # else the tests below could not tell them apart
    return {"trainer": trainer, "module": module, "loader": loader, "best": best, "average": average,
            "weights": weights}


@pytest.mark.parametrize("entry", ["test", "validate"])
def test_the_trainer_that_fitted_evaluates_the_best_checkpoints_average(ema_run, entry):
    """Lightning's WeightAveraging would restore the live weights here (its average is still alive)."""
    weights = ema_run["weights"]
    getattr(ema_run["trainer"], entry)(ema_run["module"], ema_run["loader"], ckpt_path="best", verbose=False)
    assert_states_equal(weights.seen[-1], ema_run["average"])


def test_a_fresh_trainer_and_load_from_checkpoint_give_the_average(ema_run, tmp_path):
    from lit_robust.defenses import PGDAT

    weights = TestedWeights()
    quiet_trainer(tmp_path, callbacks=[EMA(decay=0.9), weights]).test(ema_run["module"], ema_run["loader"],
                                                                     ckpt_path=ema_run["best"], verbose=False)
    assert_states_equal(weights.seen[-1], ema_run["average"])
    loaded = PGDAT.load_from_checkpoint(ema_run["best"], model=SmallCNN(width=4))
    assert_states_equal(snapshot(loaded.model), ema_run["average"])


def test_evaluate_and_export_read_the_average(ema_run, tmp_path):
    """``lit-robust evaluate --ckpt`` loads ``classifier_state_dict``; the export writes what it loads."""
    from lit_robust.evaluation.export import classifier_state_dict, export_checkpoint

    assert_states_equal(classifier_state_dict(ema_run["best"]), ema_run["average"])
    paths = export_checkpoint(ema_run["best"], SmallCNN(width=4), torch.rand(2, 1, 8, 8), tmp_path)
    assert_states_equal(torch.load(paths["state_dict"], weights_only=True), ema_run["average"])


# --- 8. arguments ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, name", [
    (dict(decay=1.0), "decay"), (dict(decay=-0.1), "decay"),
    (dict(start_step=-1), "start_step"), (dict(start_step=1.5), "start_step"),
    (dict(every_n_steps=0), "every_n_steps"), (dict(bn_buffers="update"), "bn_buffers"),
])
def test_bad_arguments_are_rejected(kwargs, name):
    with pytest.raises(ValueError, match=name):
        EMA(**kwargs)


def test_defaults_and_pickling():
    ema = pickle.loads(pickle.dumps(EMA()))
    assert (ema.decay, ema.warmup, ema.start_step, ema.every_n_steps, ema.bn_buffers) == (0.995, True, 0, 1, "average")
    assert ema._use_buffers
