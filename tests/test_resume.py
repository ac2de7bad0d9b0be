"""Exact resume: 2 epochs straight equal 1 epoch, a checkpoint, and a resumed second epoch."""

import io
import random

import lightning.pytorch as L
import numpy as np
import pytest
import torch
from digits_bench import EPS, quiet_trainer, sgd
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_robust.callbacks import EMA, EpsilonSchedule, ExactResume, FOSCSchedule
from lit_robust.defenses import PGDAT
from lit_robust.models import SmallCNN

# Shuffled training data, random PGD starts in training and validation, a sanity check, momentum
# and a learning-rate schedule: everything that makes a resumed run drift if any state is lost.
RUN = dict(limit_train_batches=3, limit_val_batches=1, num_sanity_val_steps=1)


def _module() -> PGDAT:
    L.seed_everything(0)
    return PGDAT(SmallCNN(width=4), eps=EPS, steps=2, step_size=EPS / 2, optimizer=sgd(),
                 lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, 0.5))


def _weights(module: PGDAT) -> torch.Tensor:
    return torch.cat([t.detach().flatten().float() for t in module.model.state_dict().values()])


def _straight_and_resumed(tmp_path, digits, callbacks=lambda: []) -> tuple[PGDAT, PGDAT]:
    straight = _module()
    quiet_trainer(tmp_path / "a", max_epochs=2, callbacks=callbacks(), **RUN).fit(straight, digits)
    first = _module()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    quiet_trainer(tmp_path / "b", max_epochs=1, enable_checkpointing=True, callbacks=[ckpt, *callbacks()], **RUN).fit(first, digits)
    resumed = _module()
    quiet_trainer(tmp_path / "c", max_epochs=2, callbacks=callbacks(), **RUN).fit(
        resumed, digits, ckpt_path=ckpt.last_model_path)
    return straight, resumed


def _schedules_and_ema() -> list:
    return [EpsilonSchedule(ramp_epochs=2, start_eps=EPS / 2), FOSCSchedule(c_max=0.5, dynamic_epochs=2),
            EMA(decay=0.9)]


@pytest.mark.parametrize("callbacks", [lambda: [], _schedules_and_ema], ids=["plain", "schedules+ema"])
def test_resumed_run_has_the_straight_runs_weights(tmp_path, digits, callbacks):
    """With EMA the weights after fit are the averaged ones, so the average is compared too."""
    straight, resumed = _straight_and_resumed(tmp_path, digits, callbacks)
    assert torch.equal(_weights(straight), _weights(resumed))


def test_without_the_saved_generator_state_the_resumed_run_drifts(tmp_path, digits, monkeypatch):
    """The check above is not vacuous: the random-generator state is what makes it pass."""
    monkeypatch.setattr(ExactResume, "load_state_dict", lambda self, state_dict: None)
    straight, resumed = _straight_and_resumed(tmp_path, digits)
    assert not torch.equal(_weights(straight), _weights(resumed))


def _draws() -> tuple:
    return torch.rand(3), np.random.rand(3), random.random()


def _same(a: tuple, b: tuple) -> bool:
    return torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_state_dict_round_trip_repeats_every_generator():
    callback = ExactResume()
    state = torch.load(_saved(callback.state_dict()), weights_only=True)  # loads like a checkpoint
    first = _draws()
    callback.load_state_dict(state)
    assert _same(_draws(), first)
    assert not _same(_draws(), first)


def test_sanity_check_leaves_the_generators_untouched():
    callback = ExactResume()
    callback.on_sanity_check_start(None, None)
    during = _draws()
    callback.on_sanity_check_end(None, None)
    assert _same(_draws(), during)


def test_every_defense_brings_it_along():
    assert any(isinstance(c, ExactResume) for c in _module().configure_callbacks())


def _saved(state: dict) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer
