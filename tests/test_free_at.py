"""FreeAT (Shafahi et al. 2019): minibatch replay under manual optimization, the persistent
perturbation, the per-replay schedule, and robustness on the digits."""

import pytest
import torch
from digits_bench import EPS, digits_accuracy, fit_on_digits, sgd
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from digits_bench import training_only_trainer as _trainer
from torch.utils.data import DataLoader, TensorDataset

from lit_robust.defenses.free_at import FreeAT
from lit_robust.models import SmallCNN


def _free(**kwargs):
    return FreeAT(SmallCNN(width=4), **{"eps": 0.2, "replays": 3, "val_attack_steps": 2, "test_attack_steps": 2,
                                        **kwargs})


class _Recorder(Callback):
    """Every training forward's input and the weights it ran with, the clean batches, and delta after each batch
    (the eval-mode forward of each epoch's input check is not a training forward)."""

    def __init__(self):
        self.inputs, self.weights, self.batches, self.deltas = [], [], [], []

    def on_fit_start(self, trainer, module):
        def hook(model, args):
            if not model.training:
                return
            self.inputs.append(args[0].detach().clone())
            self.weights.append(torch.cat([p.detach().flatten() for p in module.model.parameters()]))
        module.model.register_forward_pre_hook(hook)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.batches.append(batch[0].clone())

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.deltas.append(module._delta.clone())


def test_replays_optimizer_steps_and_backwards_per_batch(tmp_path, digits, monkeypatch):
    module, backwards, steps = _free(replays=4), [], []
    original = module.manual_backward
    monkeypatch.setattr(module, "manual_backward", lambda loss, *a, **k: (backwards.append(1), original(loss, *a, **k)))

    class CountSteps(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            steps.append(trainer.global_step)

    trainer = _trainer(tmp_path, max_epochs=2, limit_train_batches=3, callbacks=[CountSteps()])
    trainer.fit(module, digits)
    assert not module.automatic_optimization
    assert trainer.global_step == 2 * 3 * 4 and len(steps) == 24 and len(backwards) == 24  # one of each per replay
    assert {"train/loss", "train/adv_acc"} <= set(trainer.callback_metrics)


def test_perturbation_persists_across_replays_and_batches(tmp_path, digits):
    rec, replays = _Recorder(), 3
    _trainer(tmp_path, max_epochs=2, limit_train_batches=3, callbacks=[rec]).fit(_free(replays=replays), digits)
    assert len(rec.inputs) == 6 * replays and len(rec.batches) == 6
    for b, x in enumerate(rec.batches):
        fed = rec.inputs[b * replays:(b + 1) * replays]
        for x_in in fed:
            assert (x_in - x).abs().max() <= 0.2 + 1e-6 and x_in.min() >= 0 and x_in.max() <= 1
        # the perturbation moves between replays of one batch ...
        assert all(not torch.equal(fed[r], fed[r + 1]) for r in range(replays - 1))
        assert rec.deltas[b].abs().max() <= 0.2 + 1e-6 and rec.deltas[b].abs().max() > 0.19
        if b == 0:
            assert torch.equal(fed[0], x)  # it starts at zero
            continue
        # ... and the next batch starts from where the previous one left it (also across the epoch)
        assert torch.allclose(fed[0], (x + rec.deltas[b - 1]).clamp(0, 1), atol=1e-6)
        assert not torch.equal(rec.deltas[b], rec.deltas[b - 1])
    # every replay is an optimizer step: the weights differ at every forward pass
    assert all(not torch.equal(rec.weights[i], rec.weights[i + 1]) for i in range(len(rec.weights) - 1))


def test_perturbation_step_is_eps_sign_of_the_input_gradient(tmp_path, digits):
    """After one replay from zero: delta = Proj(eps * sign(grad_delta CE)), the gradient of the train-mode forward."""
    module, (x, y) = _free(replays=1), next(iter(digits.train_dataloader()))
    before = SmallCNN(width=4)
    before.load_state_dict(module.model.state_dict())
    _trainer(tmp_path, max_steps=1).fit(module, DataLoader(TensorDataset(x, y), batch_size=32))
    delta = torch.zeros_like(x, requires_grad=True)
    torch.nn.functional.cross_entropy(before.train()(x + delta), y).backward()
    expected = (x + 0.2 * delta.grad.sign()).clamp(0, 1) - x
    assert torch.allclose(module._delta, expected, atol=1e-6)
    assert (expected.abs() > 0.19).float().mean() > 0.3  # a real step, not a trivial zero


def test_smaller_last_batch_uses_and_updates_only_its_rows(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(10, 1, 8, 8, generator=g), torch.randint(0, 10, (10,), generator=g))
    rec, module = _Recorder(), _free(replays=2)
    _trainer(tmp_path, max_epochs=1, callbacks=[rec]).fit(module, DataLoader(data, batch_size=4))
    assert [len(b) for b in rec.batches] == [4, 4, 2]
    assert [tuple(d.shape) for d in rec.deltas] == [(4, 1, 8, 8)] * 3  # sized to the largest batch
    assert torch.equal(rec.deltas[2][2:], rec.deltas[1][2:])  # rows the last batch did not use are kept
    assert not torch.equal(rec.deltas[2][:2], rec.deltas[1][:2])


def test_perturb_is_the_current_perturbation_and_touches_no_gradient(tmp_path, digits):
    module = _free()
    x, y = next(iter(digits.val_dataloader()))
    assert torch.equal(module.perturb(x, y), x)  # nothing kept yet: zeros
    _trainer(tmp_path, max_steps=6, limit_train_batches=2).fit(module, digits)
    for p in module.parameters():
        p.grad = None
    x_adv = module.perturb(x, y)
    assert all(p.grad is None for p in module.parameters())
    assert (x_adv - x).abs().max() <= 0.2 + 1e-6 and (x_adv - x).abs().max() > 0.1
    assert x_adv.min() >= 0 and x_adv.max() <= 1 and not x_adv.requires_grad
    kept = module._delta
    assert len(kept) == 32 and len(x) == 64  # rows beyond the kept ones are unperturbed
    assert torch.allclose(x_adv[:32], (x[:32] + kept).clamp(0, 1), atol=1e-6) and torch.equal(x_adv[32:], x[32:])


def test_default_schedule_steps_per_replay(tmp_path, digits):
    """SGD 0.1 / 0.9 / 2e-4 (the TF code); x0.1 at 50% and 75% of the *replay* steps."""
    seen = []

    class RecordLR(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.append(optimizer.param_groups[0]["lr"])

    module = _free(replays=2)
    trainer = _trainer(tmp_path, max_epochs=2, limit_train_batches=2, callbacks=[RecordLR()])
    trainer.fit(module, digits)
    assert seen == pytest.approx([0.1] * 4 + [0.01] * 2 + [0.001] * 2)
    group = trainer.optimizers[0].param_groups[0]
    assert (group["momentum"], group["weight_decay"]) == (0.9, 2e-4)


def test_total_replay_steps_respects_max_steps(tmp_path, digits):
    module = _free(replays=4)
    trainer = _trainer(tmp_path, max_steps=10, limit_train_batches=2)
    trainer.fit(module, digits)
    assert module.total_replay_steps() == 10 and trainer.global_step == 12  # stops at the batch boundary
    module = _free(replays=4)
    _trainer(tmp_path, max_epochs=3, limit_train_batches=2).fit(module, digits)
    assert module.total_replay_steps() == 3 * 2 * 4


def test_user_epoch_scheduler_is_stepped_once_per_epoch(tmp_path, digits):
    module = _free(replays=2, optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
                   lr_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5))
    trainer = _trainer(tmp_path, max_epochs=3, limit_train_batches=2)
    trainer.fit(module, digits)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)


def test_gradient_clipping_is_refused(tmp_path, digits):
    with pytest.raises(Exception, match="manual optimization"):
        _trainer(tmp_path, max_steps=1, gradient_clip_val=1.0).fit(_free(), digits)


def test_perturbation_survives_a_checkpoint(tmp_path, digits):
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    module = _free(replays=2)
    _trainer(tmp_path, max_steps=4, limit_train_batches=2, enable_checkpointing=True, callbacks=[ckpt]).fit(
        module, digits)
    restored = FreeAT.load_from_checkpoint(ckpt.last_model_path, model=SmallCNN(width=4))
    assert restored.replays == 2 and restored.eps == pytest.approx(0.2) and not restored.automatic_optimization
    assert torch.equal(restored._delta, module._delta) and restored._delta.abs().max() > 0
    for key, value in module.state_dict().items():
        assert torch.equal(value, restored.state_dict()[key]), key
    resumed = _trainer(tmp_path, max_steps=8, limit_train_batches=2)
    resumed.fit(_free(replays=2), digits, ckpt_path=ckpt.last_model_path)
    assert resumed.global_step == 8


@pytest.mark.parametrize("kwargs,name", [({"replays": 0}, "replays"), ({"replays": 1.5}, "replays"),
                                         ({"eps": 0.0}, "eps"), ({"step_size": -0.1}, "step_size")])
def test_invalid_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        _free(**kwargs)


def test_free_at_beats_standard_training_under_pgd(standard_digits_accuracy):
    module = fit_on_digits(FreeAT(SmallCNN(width=16), eps=EPS, replays=4, optimizer=sgd()), epochs=4)
    acc = digits_accuracy(module.model)
    assert acc["clean"] > 0.8
    assert acc["pgd"] > standard_digits_accuracy["pgd"] + 0.3
