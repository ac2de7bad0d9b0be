"""DEAT: the optimizer against Algorithm 2 of Sun, Sinha & Zhang (KDD 2023), and the PGD-AT module around it."""

import copy
import io
import math
from types import SimpleNamespace

import pytest
import torch
from digits_bench import EPS, digits_accuracy, fit_on_digits
from lightning.pytorch.callbacks import ModelCheckpoint
from digits_bench import quiet_trainer as _trainer
from torch import nn

from lit_robust.datamodules import DigitsDataModule
from lit_robust.defenses.deat import DEAT
from lit_robust.models import SmallCNN
from lit_robust.optim import DEATOptimizer


def _two_params(w=1.0, b=-2.0, dtype=torch.float32):
    """The 2-parameter model y = w * x + b."""
    model = nn.Linear(1, 1).to(dtype)
    with torch.no_grad():
        model.weight.fill_(w)
        model.bias.fill_(b)
    return model


def _values(model):
    return [model.weight.item(), model.bias.item()]


def _set_grads(model, gw, gb):
    model.weight.grad = torch.full_like(model.weight, gw)
    model.bias.grad = torch.full_like(model.bias, gb)


def test_update_equals_algorithm_2_by_hand():
    """k1 = 1, k2 = 0.8, lr = 0.1: a' = 0.1 / sqrt(5); the buffers alternate odd / even steps."""
    model = _two_params()
    opt = DEATOptimizer(model.parameters(), lr=0.1)
    scale = 0.1 / math.sqrt(5)
    grads = [(1.0, 2.0), (3.0, -1.0), (-2.0, 0.5), (0.5, 1.0)]
    # h_1 = .2 g1 = (.2, .4)               d_1 = 2 h_1 - h_0 = (.4, .8)
    # h_2 = .2 g2 = (.6, -.2)              d_2 = 2 h_2 - h_1 = (1.0, -.8)
    # h_3 = .8 h_1 + .2 g3 = (-.24, .42)   d_3 = 2 h_3 - h_2 = (-1.08, 1.04)
    # h_4 = .8 h_2 + .2 g4 = (.58, .04)    d_4 = 2 h_4 - h_3 = (1.40, -.34)
    directions = [(0.4, 0.8), (1.0, -0.8), (-1.08, 1.04), (1.40, -0.34)]
    expected = [1.0, -2.0]
    for g, d in zip(grads, directions):
        _set_grads(model, *g)
        opt.step()
        expected = [expected[0] - scale * d[0], expected[1] - scale * d[1]]
        assert _values(model) == pytest.approx(expected, abs=1e-6)
    state = opt.state[model.bias]
    assert state["step"] == 4
    assert state["h_odd"].item() == pytest.approx(0.42) and state["h_even"].item() == pytest.approx(0.04)
    assert opt.state[model.weight]["h_odd"].item() == pytest.approx(-0.24)


def test_weight_decay_forms_by_hand():
    """Zero gradient, wd 0.5, lr 0.1. Decoupled: w * (1 - 0.05), buffers untouched.
    Coupled: g = 0.5 w enters the buffer, w - a' * 2 * 0.2 * 0.5 w; ``param.grad`` is left alone."""
    decoupled, coupled = _two_params(), _two_params()
    for model in (decoupled, coupled):
        _set_grads(model, 0.0, 0.0)
    DEATOptimizer(decoupled.parameters(), lr=0.1, weight_decay=0.5).step()
    DEATOptimizer(coupled.parameters(), lr=0.1, weight_decay=0.5, decoupled_weight_decay=False).step()
    assert _values(decoupled) == pytest.approx([0.95, -1.9], abs=1e-7)
    scale = 0.1 / math.sqrt(5)
    assert _values(coupled) == pytest.approx([1.0 - scale * 0.2, -2.0 + scale * 0.4], abs=1e-7)
    assert coupled.weight.grad.item() == 0.0 and coupled.bias.grad.item() == 0.0


def _reference_run(theta, grad_fn, lrs, k1, k2, wd, decoupled):
    """Algorithm 2 written out with the step index: h[t] = k2 h[t-2] + (1 - k2) g_t (pure Python floats)."""
    h = {-1: [0.0, 0.0], 0: [0.0, 0.0]}
    trajectory = []
    for t, lr in enumerate(lrs, start=1):
        g = grad_fn(theta)
        if not decoupled:
            g = [gi + wd * th for gi, th in zip(g, theta)]
        h[t] = [k2 * a + (1 - k2) * gi for a, gi in zip(h[t - 2], g)]
        a_prime = lr / math.sqrt((1 + k1) ** 2 + k1 ** 2)
        shrink = 1 - lr * wd if decoupled else 1.0
        theta = [th * shrink - a_prime * ((1 + k1) * ht - k1 * hp) for th, ht, hp in zip(theta, h[t], h[t - 1])]
        trajectory.append(theta)
    return trajectory


@pytest.mark.parametrize("decoupled", [True, False])
def test_update_equals_the_equation_over_many_steps_with_a_real_loss(decoupled):
    """f(w, b) = 1.5 (w - 1)^2 + w b + b^4 / 4 by autograd, against the step-indexed recursion;
    k1, k2 away from the defaults (a' = lr / sqrt(1.5^2 + 0.5^2)), lr changed mid-run as a scheduler would."""
    k1, k2, wd = 0.5, 0.81, 0.05
    lrs = [0.3] * 4 + [0.03] * 5
    model = _two_params(0.3, 0.7, torch.float64)
    opt = DEATOptimizer(model.parameters(), lr=lrs[0], k1=k1, k2=k2, weight_decay=wd, decoupled_weight_decay=decoupled)
    expected = _reference_run([0.3, 0.7], lambda th: [3 * (th[0] - 1) + th[1], th[0] + th[1] ** 3], lrs, k1, k2, wd,
                              decoupled)
    for lr, want in zip(lrs, expected):
        opt.param_groups[0]["lr"] = lr
        opt.zero_grad()
        w, b = model.weight.squeeze(), model.bias.squeeze()
        (1.5 * (w - 1) ** 2 + w * b + b ** 4 / 4).backward()
        opt.step()
        assert _values(model) == pytest.approx(want, rel=1e-12, abs=1e-12)
    # the parameters really moved, and by more than rounding
    assert abs(_values(model)[0] - 0.3) > 0.05


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    data = [(torch.randn(4, 1), torch.randn(4, 1)) for _ in range(8)]

    def train(model, opt, batches):
        for x, y in batches:
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step()

    model = _two_params()
    opt = DEATOptimizer(model.parameters(), lr=0.5, weight_decay=1e-2)
    train(model, opt, data[:3])  # an odd number of steps: the next one uses the even buffer
    saved_model, buffer = copy.deepcopy(model.state_dict()), io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    train(model, opt, data[3:])

    restored = _two_params(0.0, 0.0)
    restored.load_state_dict(saved_model)
    restored_opt = DEATOptimizer(restored.parameters(), lr=0.5, weight_decay=1e-2)
    buffer.seek(0)
    restored_opt.load_state_dict(torch.load(buffer))
    assert restored_opt.state[restored.weight]["step"] == 3
    assert set(restored_opt.state[restored.weight]) == {"step", "h_odd", "h_even"}
    train(restored, restored_opt, data[3:])
    assert torch.equal(model.weight, restored.weight) and torch.equal(model.bias, restored.bias)
    # a fresh optimizer (zero buffers, step 0) would not have continued the same way
    fresh = _two_params(0.0, 0.0)
    fresh.load_state_dict(saved_model)
    train(fresh, DEATOptimizer(fresh.parameters(), lr=0.5, weight_decay=1e-2), data[3:])
    assert not torch.equal(model.weight, fresh.weight)


def test_parameter_without_gradient_is_skipped_and_keeps_its_parity():
    model = _two_params()
    opt = DEATOptimizer(model.parameters(), lr=0.1)
    _set_grads(model, 1.0, 1.0)
    opt.step()
    model.bias.grad = None
    model.weight.grad.fill_(1.0)
    bias_before = model.bias.item()
    opt.step()
    assert model.bias.item() == bias_before
    assert opt.state[model.weight]["step"] == 2 and opt.state[model.bias]["step"] == 1


@pytest.mark.parametrize("kwargs,name", [({"lr": -0.1}, "lr"), ({"k1": -1.0}, "k1"), ({"k2": 1.0}, "k2"),
                                         ({"k2": -0.1}, "k2"), ({"weight_decay": -1e-4}, "weight_decay")])
def test_invalid_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DEATOptimizer(_two_params().parameters(), **{"lr": 0.1, **kwargs})
    with pytest.raises(ValueError, match=name):
        DEAT(SmallCNN(width=4), **kwargs)


# --- the DEAT module ------------------------------------------------------------------------------


@pytest.fixture
def digits():
    dm = DigitsDataModule(batch_size=32, eval_batch_size=64)
    dm.setup()
    return dm


def _deat(**kwargs):
    return DEAT(SmallCNN(width=4), **{"eps": 0.2, "steps": 1, "step_size": 0.2, "val_attack_steps": 1,
                                      "test_attack_steps": 1, **kwargs})


def test_module_uses_the_deat_optimizer_by_default(tmp_path, digits):
    trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(_deat(k2=0.81, weight_decay=1e-3), digits)
    opt = trainer.optimizers[0]
    assert isinstance(opt, DEATOptimizer)
    group = opt.param_groups[0]
    assert (group["initial_lr"], group["k1"], group["k2"]) == (0.1, 1.0, 0.81)
    assert (group["weight_decay"], group["decoupled_weight_decay"]) == (1e-3, True)
    assert all(opt.state[p]["step"] == 2 for p in group["params"])
    config = trainer.lr_scheduler_configs[0]
    assert isinstance(config.scheduler, torch.optim.lr_scheduler.MultiStepLR) and config.interval == "step"
    trainer = _trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(_deat(optimizer=lambda p: torch.optim.SGD(p, lr=0.01)), digits)
    assert isinstance(trainer.optimizers[0], torch.optim.SGD)


@pytest.mark.parametrize("batches_per_epoch", [20, 391])
def test_default_schedule_drops_at_epochs_100_and_105_of_110(batches_per_epoch):
    module = _deat(lr=0.2)
    module.trainer = SimpleNamespace(estimated_stepping_batches=110 * batches_per_epoch)
    opt = module.default_optimizer(module.parameters())
    scheduler, interval = module.default_lr_scheduler(opt)
    assert interval == "step"
    seen = []
    for _ in range(110 * batches_per_epoch):
        seen.append(opt.param_groups[0]["lr"])
        scheduler.step()
    n = batches_per_epoch
    assert seen == pytest.approx([0.2] * 100 * n + [0.02] * 5 * n + [0.002] * 5 * n)


def test_default_schedule_needs_a_finite_run():
    module = _deat()
    module.trainer = SimpleNamespace(estimated_stepping_batches=float("inf"))
    with pytest.raises(ValueError, match="max_epochs or max_steps"):
        module.default_lr_scheduler(module.default_optimizer(module.parameters()))


def test_checkpoint_keeps_the_buffers_and_resumes(tmp_path, digits):
    model = _deat(restarts=2, k2=0.7)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    _trainer(tmp_path, max_steps=3, enable_checkpointing=True, callbacks=[ckpt], limit_val_batches=1).fit(model, digits)
    saved = torch.load(ckpt.last_model_path, weights_only=False)["optimizer_states"][0]["state"]
    assert saved and all(s["step"] == 3 and {"h_odd", "h_even"} <= set(s) for s in saved.values())
    restored = DEAT.load_from_checkpoint(ckpt.last_model_path, model=SmallCNN(width=4))
    assert restored.k2 == 0.7 and restored.attack.restarts == 2
    resumed = _trainer(tmp_path, max_steps=5, limit_val_batches=1)
    resumed.fit(_deat(restarts=2, k2=0.7), digits, ckpt_path=ckpt.last_model_path)
    assert resumed.global_step == 5
    assert all(s["step"] == 5 for s in resumed.optimizers[0].state.values())


def test_deat_beats_standard_training_under_pgd(standard_digits_accuracy):
    """PGD-AT trained by DEAT's own default optimizer and schedule. Its step per unit gradient is
    lr / sqrt(5), not SGD-momentum's 10 lr, hence lr 0.5 and 12 epochs (measured: clean 0.92, PGD 0.46;
    lr 0.2 for 8 epochs: 0.89 / 0.36)."""
    module = fit_on_digits(DEAT(SmallCNN(width=16), eps=EPS, steps=5, step_size=0.08, lr=0.5), epochs=12)
    acc = digits_accuracy(module.model)
    assert acc["clean"] > 0.85
    assert acc["pgd"] > standard_digits_accuracy["pgd"] + 0.3
