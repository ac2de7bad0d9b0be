"""Attack-strength schedules: the ramp formulas, and the values the training attack really gets."""


import pytest
import torch
from digits_bench import EPS, RecordingPGDAT, sgd, training_only_trainer

from lit_robust.attacks import PGD
from lit_robust.callbacks.schedules import AttackStepsSchedule, EpsilonSchedule, ramp
from lit_robust.defenses import FreeAT
from lit_robust.models import SmallCNN


def _fit(tmp_path, digits, callback, epochs, batches=3) -> RecordingPGDAT:
    module = RecordingPGDAT()
    training_only_trainer(tmp_path, max_epochs=epochs, limit_train_batches=batches, callbacks=[callback]).fit(
        module, digits)
    return module


def test_linear_ramp():
    assert [ramp(u) for u in (-1.0, 0.0, 0.25, 0.5, 1.0, 2.0)] == [0.0, 0.0, 0.25, 0.5, 1.0, 1.0]


@pytest.mark.parametrize("mid,beta", [(0.25, 4.0), (0.5, 2.0), (0.1, 3.0)])
def test_smoothed_ramp_is_a_power_then_its_tangent(mid, beta):
    a = 1 / (mid ** (beta - 1) * (mid + beta * (1 - mid)))
    assert ramp(mid / 2, "smoothed", mid, beta) == pytest.approx(a * (mid / 2) ** beta)
    h = 1e-6  # value and slope continuous at mid, slope constant after it, ends at 1
    left = (ramp(mid, "smoothed", mid, beta) - ramp(mid - h, "smoothed", mid, beta)) / h
    right = (ramp(mid + h, "smoothed", mid, beta) - ramp(mid, "smoothed", mid, beta)) / h
    assert left == pytest.approx(right, rel=1e-4) == pytest.approx(a * beta * mid ** (beta - 1), rel=1e-4)
    assert ramp(0.9, "smoothed", mid, beta) - ramp(0.8, "smoothed", mid, beta) == pytest.approx(0.1 * right, rel=1e-4)
    assert ramp(1.0, "smoothed", mid, beta) == 1.0 and ramp(0.0, "smoothed", mid, beta) == 0.0
    values = [ramp(u / 100, "smoothed", mid, beta) for u in range(101)]
    assert all(b > a for a, b in zip(values[1:], values[2:]))


def test_epsilon_schedule_values():
    schedule = EpsilonSchedule(ramp_epochs=4, start_eps=0.0, final_eps=0.2, warmup_epochs=1)
    assert [schedule.value(p) for p in (0.0, 0.5, 1.0, 2.0, 3.5, 5.0, 9.0)] == pytest.approx(
        [0.0, 0.0, 0.0, 0.05, 0.125, 0.2, 0.2])
    smoothed = EpsilonSchedule(ramp_epochs=4, final_eps=0.2, shape="smoothed")
    assert smoothed.value(1.0) == pytest.approx(0.2 * ramp(0.25, "smoothed"))


def test_epsilon_schedule_sets_eps_and_step_size_every_batch(tmp_path, digits):
    module = _fit(tmp_path, digits, EpsilonSchedule(ramp_epochs=2, start_eps=0.0), epochs=3)
    for epoch, batch_idx, eps, step_size, *_ in module.seen:
        expected = EPS * min((epoch + batch_idx / 3) / 2, 1.0)
        assert eps == pytest.approx(expected) and step_size == pytest.approx(expected / 4)
    assert module.seen[-1][2] == pytest.approx(EPS)
    assert module.val_attack.eps == pytest.approx(EPS)  # evaluation stays at the target threat model


def test_zero_eps_returns_the_clean_batch(batch, tiny_cnn):
    attack = PGD(0.1, steps=3)
    attack.set_eps(0.0)
    x, y = batch
    assert torch.equal(attack(tiny_cnn, x, y), x)
    attack.set_eps(0.2)
    assert attack.step_size == pytest.approx(2.5 * 0.2 / 3)


def test_attack_steps_curriculum(tmp_path, digits):
    module = _fit(tmp_path, digits, AttackStepsSchedule(ramp_epochs=3, start_steps=1), epochs=5, batches=1)
    assert [seen[4] for seen in module.seen] == [1, 2, 3, 4, 4]  # round(1 + 3 t / 3), up to the module's 4
    assert all(seen[3] == pytest.approx(EPS / 4) for seen in module.seen)


def test_schedules_refuse_a_defense_without_a_pgd_attack(tmp_path, digits):
    module = FreeAT(SmallCNN(width=4), eps=EPS, replays=2, optimizer=sgd())
    with pytest.raises(TypeError, match="no PGD training attack"):
        training_only_trainer(tmp_path, max_epochs=1, limit_train_batches=1,
                              callbacks=[EpsilonSchedule(ramp_epochs=1)]).fit(module, digits)


def test_state_dict_keeps_the_resolved_target():
    schedule = EpsilonSchedule(ramp_epochs=2)
    schedule.final = 0.3
    restored = EpsilonSchedule(ramp_epochs=2)
    restored.load_state_dict(schedule.state_dict())
    assert restored.value(5.0) == pytest.approx(0.3)


@pytest.mark.parametrize("kwargs,name", [
    ({"ramp_epochs": 0}, "ramp_epochs"), ({"ramp_epochs": 1, "warmup_epochs": -1}, "warmup_epochs"),
    ({"ramp_epochs": 1, "shape": "cosine"}, "shape"), ({"ramp_epochs": 1, "start_eps": -0.1}, "start_eps"),
    ({"ramp_epochs": 1, "mid": 1.0}, "mid"),
])
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        EpsilonSchedule(**kwargs)
