"""FastAT (FGSM-RS, Wong et al. 2020): the attack's defaults, the cyclic schedule, the
catastrophic-overfitting guard, and robustness on the digits."""

import csv

import pytest
import torch
from digits_bench import EPS, digits_accuracy, fit_on_digits, sgd
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from digits_bench import training_only_trainer as _trainer
from torch import nn

from lit_robust.attacks import PGD
from lit_robust.callbacks.catastrophic_overfitting import CatastrophicOverfittingMonitor
from lit_robust.defenses.fast_at import FastAT
from lit_robust.models import SmallCNN


def _flat(module):
    return torch.cat([t.detach().flatten().float() for t in module.model.state_dict().values()])


@pytest.fixture
def scripted(monkeypatch):
    """Makes FastAT modules whose guard sees scripted accuracies and records the weights it checked.

    The accuracy is scripted on the class, so *any* CatastrophicOverfittingMonitor that checks
    such a module records into ``module.checked`` (a stray or missing guard is visible).
    """

    def accuracy(monitor, trainer, pl_module, x, y):
        pl_module.checked.append(_flat(pl_module).clone())
        return pl_module.script[len(pl_module.checked) - 1]

    monkeypatch.setattr(CatastrophicOverfittingMonitor, "check_accuracy", accuracy)

    def make(script, **kwargs):
        module = FastAT(SmallCNN(width=4), eps=0.2, **kwargs)
        module.script, module.checked = list(script), []  # not constructor arguments: kept out of the hparams
        return module

    return make


def test_step_size_defaults_to_1_25_eps_and_follows_eps():
    assert FastAT(SmallCNN(width=4)).attack.step_size == pytest.approx(10 / 255)  # the paper's alpha at 8/255
    module = FastAT(SmallCNN(width=4), eps=0.2)
    assert module.attack.step_size == pytest.approx(0.25) and module.attack.steps == 1
    assert module.attack.random_start and module.attack.bn_mode == "eval"
    assert FastAT(SmallCNN(width=4), eps=0.2, step_size=0.1).attack.step_size == pytest.approx(0.1)
    assert FastAT(SmallCNN(width=4), attack_bn_mode="train").attack.bn_mode == "train"


def test_start_is_uniform_in_the_ball():
    """With a zero input gradient the FGSM step is 0, so x_adv - x is the random start itself."""
    flat = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    nn.init.zeros_(flat[1].weight)
    module = FastAT(flat, eps=0.2)
    x = torch.full((256, 1, 8, 8), 0.5)  # far enough from 0 and 1 that the box clips nothing
    delta = (module.perturb(x, torch.zeros(256, dtype=torch.long)) - x).flatten()
    assert delta.abs().max() <= 0.2 + 1e-6 and delta.abs().max() > 0.199
    counts = torch.histc(delta, bins=4, min=-0.2, max=0.2) / delta.numel()
    assert counts == pytest.approx(torch.full((4,), 0.25), abs=0.03)  # uniform, not a sign or a normal draw
    assert all(p.grad is None for p in flat.parameters())


@pytest.mark.parametrize("clip_start", [True, False])
def test_clip_start_decides_whether_the_first_gradient_sees_the_box(clip_start):
    """On saturated pixels (0 and 1): the unclipped start takes the FGSM gradient outside [0, 1], the clipped
    one inside; x_adv is Proj_box(Proj_ball(x + d0 + alpha * sign(g(x + d0)))) either way (the formula)."""
    g = torch.Generator().manual_seed(3)
    x = (torch.rand(16, 1, 8, 8, generator=g) > 0.5).float()  # every pixel saturated
    y = torch.randint(0, 10, (16,), generator=g)
    net = SmallCNN(width=4).eval()
    fed = []
    hook = net.register_forward_pre_hook(lambda m, args: fed.append(args[0].detach().clone()))
    module = FastAT(net, eps=0.3, clip_start=clip_start)
    torch.manual_seed(0)
    x_adv = module.perturb(x, y)
    hook.remove()
    torch.manual_seed(0)
    start = torch.empty_like(x).uniform_(-0.3, 0.3)
    start = (x + start).clamp(0, 1) - x if clip_start else start
    assert torch.equal(fed[0], x + start)
    leaves_box = bool((fed[0] < 0).any() or (fed[0] > 1).any())
    assert leaves_box is not clip_start
    x_in = (x + start).requires_grad_(True)
    (grad,) = torch.autograd.grad(nn.functional.cross_entropy(net(x_in), y, reduction="sum"), x_in)
    expected = (x + (start + 0.375 * grad.sign()).clamp(-0.3, 0.3)).clamp(0, 1)
    assert torch.equal(x_adv, expected)
    assert x_adv.min() >= 0 and x_adv.max() <= 1 and (x_adv - x).abs().max() <= 0.3 + 1e-6


@pytest.mark.parametrize("peak", [0.5, 0.4, 0.25])
def test_the_cycle_peaks_where_asked(peak):
    """Against np.interp of (0, 0) -> (peak * T, lr) -> (T, 0); the 0.5 case bit for bit as the old formula."""
    import numpy as np

    from lit_robust.defenses.fast_at import cyclic_lr

    total = 40
    optimizer = torch.optim.SGD([torch.zeros(1)], lr=1.0)
    schedule = cyclic_lr(optimizer, total, peak)
    lrs = []
    for _ in range(total + 2):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs == pytest.approx(list(np.interp(range(total + 2), [0, peak * total, total], [0, 1, 0])), abs=1e-12)
    if peak == 0.5:
        assert lrs == [max(0.0, 1.0 - abs(s - total / 2) / (total / 2)) for s in range(total + 2)]
    with pytest.raises(ValueError, match="lr_peak"):
        FastAT(SmallCNN(width=4), lr_peak=1.0)


def test_default_schedule_is_the_cyclic_lr(tmp_path, digits, scripted):
    """0 -> peak at the half-way iteration -> 0, stepped every iteration; SGD 0.9 / 5e-4 with peak 0.2."""
    seen = []

    class RecordLR(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            group = trainer.optimizers[0].param_groups[0]
            seen.append((group["lr"], group["momentum"]))

    module = scripted([0.5, 0.5], co_guard=True)
    trainer = _trainer(tmp_path, max_epochs=2, limit_train_batches=5, callbacks=[RecordLR()])
    trainer.fit(module, digits)
    lrs = [lr for lr, _ in seen]
    assert lrs == pytest.approx([0.0, 0.04, 0.08, 0.12, 0.16, 0.2, 0.16, 0.12, 0.08, 0.04])
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0)  # after the last step
    assert {m for _, m in seen} == {0.9}  # momentum is not cycled
    group = trainer.optimizers[0].param_groups[0]
    assert isinstance(trainer.optimizers[0], torch.optim.SGD) and group["weight_decay"] == 5e-4

    # The peak is the optimizer's lr, so a user's optimizer keeps its own scale.
    seen.clear()
    _trainer(tmp_path, max_steps=4, callbacks=[RecordLR()]).fit(
        scripted([0.5], optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.5)), digits)
    assert [lr for lr, _ in seen] == pytest.approx([0.0, 0.025, 0.05, 0.025])


def test_guard_restores_the_previous_epoch_and_stops_on_a_collapse(tmp_path, digits, scripted):
    module = scripted([0.5, 0.6, 0.1, 0.6, 0.6])
    trainer = _trainer(tmp_path, max_epochs=5, limit_train_batches=3, logger=CSVLogger(tmp_path, name="csv"))
    with pytest.warns(UserWarning, match=r"FastAT: catastrophic overfitting at epoch 2: .* 0\.600 to 0\.100"):
        trainer.fit(module, digits)
    assert trainer.global_step == 9 and len(module.checked) == 3  # stopped after the third epoch
    assert module.co_stopped_epoch == 2 and module.co_monitor.collapsed_epochs == [2]
    assert torch.equal(_flat(module), module.checked[1])  # the weights of the epoch before the collapse
    assert not torch.equal(_flat(module), module.checked[2])
    with open(trainer.logger.log_dir + "/metrics.csv") as f:
        logged = [float(row["train/co_check_acc"]) for row in csv.DictReader(f) if row.get("train/co_check_acc")]
    assert logged == pytest.approx([0.5, 0.6, 0.1])


@pytest.mark.parametrize("script", [[0.5, 0.4, 0.3, 0.2], [0.9, 0.71, 0.52, 0.33], [0.1, 0.0, 0.9, 0.8]])
def test_guard_does_not_stop_without_a_drop_above_co_drop(tmp_path, digits, script, recwarn, scripted):
    """Drops of at most co_drop against the *previous* epoch (not the best one) are tolerated."""
    module = scripted(script)
    trainer = _trainer(tmp_path, max_epochs=4, limit_train_batches=2)
    trainer.fit(module, digits)
    assert trainer.global_step == 8 and module.co_stopped_epoch is None and len(module.checked) == 4
    assert torch.equal(_flat(module), module.checked[-1])  # the final weights, nothing restored
    assert not [w for w in recwarn if "catastrophic" in str(w.message)]
    assert trainer.callback_metrics["train/co_check_acc"] == pytest.approx(script[-1])


def test_guard_off_and_co_drop(tmp_path, digits, scripted):
    module = scripted([0.9, 0.0], co_guard=False)
    trainer = _trainer(tmp_path, max_epochs=2, limit_train_batches=2)
    trainer.fit(module, digits)
    assert module.co_monitor is None
    assert not [c for c in module.configure_callbacks() if isinstance(c, CatastrophicOverfittingMonitor)]
    assert not [c for c in trainer.callbacks if isinstance(c, CatastrophicOverfittingMonitor)]
    assert module.checked == [] and module.co_stopped_epoch is None and trainer.global_step == 4
    assert "train/co_check_acc" not in trainer.callback_metrics
    module = scripted([0.9, 0.55], co_drop=0.3)  # a 0.35 drop exceeds co_drop=0.3
    assert module.co_monitor.drop == 0.3 and module.co_monitor.check_steps == 5
    with pytest.warns(UserWarning, match="catastrophic"):
        _trainer(tmp_path, max_epochs=3, limit_train_batches=2).fit(module, digits)
    assert module.co_stopped_epoch == 1


def test_modules_guard_replaces_a_monitor_given_to_the_trainer(tmp_path, digits, scripted):
    """Lightning's rule for configure_callbacks: the module's monitor replaces the Trainer's of the same class."""
    users = CatastrophicOverfittingMonitor(drop=0.9)  # would tolerate the 0.3 drop below
    module = scripted([0.9, 0.6, 0.6])
    trainer = _trainer(tmp_path, max_epochs=3, limit_train_batches=2, callbacks=[users])
    with pytest.warns(UserWarning, match="catastrophic overfitting at epoch 1"):
        trainer.fit(module, digits)
    monitors = [c for c in trainer.callbacks if isinstance(c, CatastrophicOverfittingMonitor)]
    assert len(monitors) == 1 and monitors[0] is module.co_monitor
    assert module.co_stopped_epoch == 1 and users.previous_acc is None and users.stopped_epoch is None


def test_check_is_eval_mode_pgd_on_the_epochs_first_batch(tmp_path, digits):
    """The real check: PGD-5 with step eps/4 in eval mode on the first batch; no gradients, BN untouched."""
    calls, firsts = [], []

    def state(module):  # BN statistics and parameter gradients
        return [t.clone() for t in module.model.buffers()] + [p.grad.clone() for p in module.parameters()]

    class RecordFirst(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                firsts.append(batch[0].clone())

    module = FastAT(SmallCNN(width=4), eps=0.2)
    monitor, real = module.co_monitor, module.co_monitor.check_accuracy

    def spy(trainer, pl_module, x, y):
        before = state(pl_module)
        acc = real(trainer, pl_module, x, y)
        calls.append(dict(x=x.clone(), y=y.clone(), acc=acc, training=pl_module.model.training,
                          untouched=all(torch.equal(a, b) for a, b in zip(before, state(pl_module)))))
        return acc

    monitor.check_accuracy = spy
    attack = monitor.attack(module)
    assert attack.steps == 5 and attack.step_size == pytest.approx(0.05) and attack.eps == pytest.approx(0.2)
    assert attack.bn_mode == "eval" and attack.restarts == 1 and attack.random_start and attack.norm == "linf"
    _trainer(tmp_path, max_epochs=2, limit_train_batches=3, callbacks=[RecordFirst()]).fit(module, digits)
    assert len(calls) == 2 and all(torch.equal(c["x"], f) for c, f in zip(calls, firsts))
    assert all(c["untouched"] and c["training"] for c in calls)  # the model's own mode is left alone
    x, y, acc = calls[-1]["x"], calls[-1]["y"], calls[-1]["acc"]
    expected = (PGD(0.2, 5, 0.05).run(module.model.eval(), x, y).predictions == y).float().mean().item()
    assert abs(acc - expected) <= 3 / len(y)  # the same attack from another random start


def test_check_pools_the_counts_of_all_ranks(digits):
    """The decision uses counts summed by the strategy (one value on every DDP rank)."""
    module = FastAT(SmallCNN(width=4), eps=0.2)
    x, y = next(iter(digits.train_dataloader()))

    class FakeStrategy:  # rank 0's counts plus another rank's 32 examples, all wrong
        def reduce(self, counts, reduce_op):
            assert reduce_op == "sum"
            return counts + torch.tensor([0.0, 32.0], dtype=counts.dtype)

    class FakeTrainer:
        strategy = FakeStrategy()

    monitor = module.co_monitor
    torch.manual_seed(0)
    correct = (monitor.attack(module).run(module.model, x, y).predictions == y).sum().item()
    torch.manual_seed(0)
    assert monitor.check_accuracy(FakeTrainer(), module, x, y) == pytest.approx(correct / 64)


def test_guard_state_survives_a_checkpoint_and_a_resume(tmp_path, digits, scripted):
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    first = scripted([0.5, 0.7])
    _trainer(tmp_path, max_epochs=2, limit_train_batches=2, enable_checkpointing=True, callbacks=[ckpt]).fit(
        first, digits)
    state = torch.load(ckpt.last_model_path, weights_only=False)["callbacks"]["CatastrophicOverfittingMonitor"]
    assert state["previous_acc"] == pytest.approx(0.7) and state["previous_epoch"] == 1
    assert all(v.device.type == "cpu" for v in state["kept"].values())
    assert torch.equal(torch.cat([v.flatten().float() for v in state["kept"].values()]), first.checked[1])
    restored = FastAT.load_from_checkpoint(ckpt.last_model_path, model=SmallCNN(width=4))
    assert restored.attack.step_size == pytest.approx(0.25) and restored.co_monitor.drop == 0.2

    resumed = scripted([0.45])  # 0.25 below the checkpoint's 0.7: a collapse only if the state came back
    trainer = _trainer(tmp_path, max_epochs=4, limit_train_batches=2)
    with pytest.warns(UserWarning, match="catastrophic overfitting at epoch 2: .* 0\\.700 to 0\\.450"):
        trainer.fit(resumed, digits, ckpt_path=ckpt.last_model_path)
    assert resumed.co_stopped_epoch == 2 and trainer.global_step == 6
    assert torch.equal(_flat(resumed), first.checked[1])


@pytest.mark.parametrize("kwargs,name", [({"co_drop": 0.0}, "co_drop"), ({"co_drop": 1.5}, "co_drop"),
                                         ({"co_check_steps": 0}, "co_check_steps"), ({"eps": 0.0}, "eps"),
                                         ({"step_size": -1.0}, "step_size")])
def test_invalid_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        FastAT(SmallCNN(width=4), **kwargs)


def test_fast_at_beats_standard_training_under_pgd(standard_digits_accuracy):
    """FGSM-RS with the paper's alpha = 1.25 eps and the cyclic schedule (peak 0.05) on the digits."""
    module = fit_on_digits(FastAT(SmallCNN(width=16), eps=EPS, optimizer=sgd()))
    acc = digits_accuracy(module.model)
    assert module.co_stopped_epoch is None
    assert acc["clean"] > 0.8
    assert acc["pgd"] > standard_digits_accuracy["pgd"] + 0.3
