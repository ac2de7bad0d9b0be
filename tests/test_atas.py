"""ATAS (Huang et al. 2023): the step, the write-back and the state against a transliteration of the official
code on identical tensors; indexed batches; the reset schedule; refusals; exact resume; training on digits."""

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from digits_bench import EPS, quiet_trainer, sgd
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lit_robust.attacks import PGD
from lit_robust.callbacks.catastrophic_overfitting import CatastrophicOverfittingMonitor
from lit_robust.datamodules import DigitsDataModule
from lit_robust.defenses import ATAS, DEFENSES, StandardTraining
from lit_robust.defenses.atas import STATE_KEY, atas_step_sizes
from lit_robust.models import SmallCNN


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))


# --- the official code, transliterated (ATAS.py train, adv_attack.py, data_aug.py), one example at a time ---------

def _official_crop(t, dy, dx, flip, size):
    out = torch.zeros(len(t), t.shape[1], *size)
    for i in range(len(t)):
        out[i] = t[i, :, int(dy[i]):int(dy[i]) + size[0], int(dx[i]):int(dx[i]) + size[1]]
        if flip[i]:
            out[i] = torch.flip(out[i], [2])
    return out


def _official_inverse(source, adv, dy, dx, flip, size):
    for i in range(len(source)):
        if flip[i]:
            adv[i] = torch.flip(adv[i], [2])
        source[i, :, int(dy[i]):int(dy[i]) + size[0], int(dx[i]):int(dx[i]) + size[1]] = adv[i]
    return source


def _official_batch(model, x_padded, y, delta, gdnorms, index, dy, dx, flip, eps, adaptive, c=0.01, beta=0.5,
                    min_step=4 / 255, max_step=14 / 255, warmup_step=None):
    size = (8, 8)
    delta_trans = _official_crop(delta[index], dy, dx, flip, size)
    nat_trans = _official_crop(x_padded, dy, dx, flip, size)
    x_adv = torch.clamp(delta_trans + nat_trans, 0, 1)
    model.eval()
    x_adv.requires_grad_()
    loss = F.cross_entropy(model(x_adv), y)
    grad = torch.autograd.grad(loss, [x_adv])[0]
    with torch.no_grad():
        if adaptive:
            cur = torch.norm(grad.view(len(x_adv), -1), dim=1).detach() ** 2 * (1 - beta) + gdnorms[index] * beta
            steps = torch.clamp(1 / (1 + torch.sqrt(cur) / c) * 2 * 8 / 255, min_step, max_step)
            gdnorms[index] = cur
            steps = steps.view(-1, 1, 1, 1).expand_as(grad)
        else:
            steps = warmup_step
    nxt = x_adv.detach() + steps * torch.sign(grad.detach())
    nxt = torch.clamp(torch.min(torch.max(nxt, nat_trans - eps), nat_trans + eps), 0.0, 1.0)
    delta[index] = _official_inverse(delta[index], nxt - nat_trans, dy, dx, flip, size)
    return nat_trans, nxt


@pytest.mark.parametrize("adaptive", [True, False], ids=["adaptive", "warm-up"])
def test_step_and_state_equal_the_official_code_on_identical_tensors(adaptive):
    eps, pad, n = 8 / 255, 2, 24
    g = torch.Generator().manual_seed(3)
    module = ATAS(_net(), eps=eps, pad=pad, warmup_epochs=0 if adaptive else 1)
    module.train()
    torch.manual_seed(5)
    module.init_state(n, (3, 8, 8), torch.device("cpu"))
    module.grad_norm_ema[::2] = torch.rand(n // 2, generator=g) * 1e-3  # some examples already have an average
    delta, gdnorms = module.delta.clone(), module.grad_norm_ema.clone()
    x = torch.rand(16, 3, 8, 8, generator=g)
    y = torch.randint(0, 10, (16,), generator=g)
    index = torch.randperm(n, generator=g)[:16]
    dy, dx = torch.randint(0, 2 * pad + 1, (16,), generator=g), torch.randint(0, 2 * pad + 1, (16,), generator=g)
    flip = torch.rand(16, generator=g) < 0.5

    x_crop, _, module._pending = module.augment(x, index, dy, dx, flip)
    x_adv = module.perturb(x_crop, y)
    nat, expected = _official_batch(module.model, F.pad(x, (pad,) * 4), y, delta, gdnorms, index, dy, dx,
                                    flip.tolist(), eps, adaptive, warmup_step=eps)
    assert torch.equal(x_crop, nat) and torch.equal(x_adv, expected)
    assert torch.equal(module.delta, delta) and torch.equal(module.grad_norm_ema, gdnorms)
    assert not torch.equal(module.delta, module.delta.clone().uniform_(-eps, eps))  # sanity: the state is data
    rest = torch.ones(n, dtype=torch.bool)
    rest[index] = False
    assert torch.equal(module.grad_norm_ema[rest], gdnorms[rest])  # untouched examples keep their averages
    if adaptive:
        assert not torch.equal(module.grad_norm_ema[index], module.grad_norm_ema[index] * 0)


def test_step_sizes_formula_and_clamp():
    ema = torch.tensor([0.0, 1e-6, 1e-4, 1.0])
    steps = atas_step_sizes(ema, 0.01, 16 / 255, 4 / 255, 14 / 255)
    expected = (16 / 255 / (1 + ema.double().sqrt() / 0.01)).clamp(4 / 255, 14 / 255)
    assert torch.allclose(steps.double(), expected, rtol=1e-6)
    assert steps[0] == pytest.approx(14 / 255) and steps[-1] == pytest.approx(4 / 255)  # both clamps bind
    assert steps[1] > steps[2]  # a larger gradient norm, a smaller step


def test_registered_with_official_defaults_and_refusals():
    assert DEFENSES["ATAS"] is ATAS
    m = ATAS(SmallCNN(width=4))
    assert (m.c, m.beta, m.warmup_epochs, m.reset_every, m.pad, m.flip) == (0.01, 0.5, 5, 10, 4, True)
    assert m.min_step_size == pytest.approx(4 / 255) and m.max_step_size == pytest.approx(14 / 255)
    assert m.step_scale == pytest.approx(16 / 255) and m.warmup_step_size == pytest.approx(8 / 255)
    assert m.lr_milestones == pytest.approx((0.8, 28 / 30))
    for bad, word in ((dict(norm="l2"), "norm"), (dict(c=0), "c > 0"), (dict(min_step_size=0.2, max_step_size=0.1),
                                                                        "min_step_size"), (dict(reset_every=0),
                                                                                           "reset_every")):
        with pytest.raises(ValueError, match=word):
            ATAS(SmallCNN(width=4), **bad)


def test_indexed_batches_name_their_examples():
    for on_device in (False, True):
        dm = DigitsDataModule(batch_size=32, with_index=True, on_device=on_device)
        dm.setup()
        images, labels = dm.splits["train"].tensors
        if on_device:
            dm.trainer = None
        x, y, i = next(iter(dm.train_dataloader()))
        assert i.dtype == torch.int64 and torch.equal(x, images[i]) and torch.equal(y, labels[i])
        assert len(next(iter(dm.val_dataloader()))) == 2  # evaluation batches stay (x, y)


def _atas(**kw):
    r = EPS / (8 / 255)  # the official step constants scaled from 8/255 to the digits' eps
    return ATAS(SmallCNN(width=16), eps=EPS, step_scale=16 / 255 * r, min_step_size=4 / 255 * r,
                max_step_size=14 / 255 * r, pad=1, flip=False, optimizer=sgd(), **kw)


def test_refuses_batches_without_indices_and_augmenting_datamodules(tmp_path):
    with pytest.raises(ValueError, match="with_index=True"):
        quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(_atas(), DigitsDataModule(batch_size=16))
    with pytest.raises(ValueError, match="augment=False"):
        quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(
            _atas(), DigitsDataModule(batch_size=16, augment=True, with_index=True))


class _Resets(L.Callback):
    """Per epoch: whether the perturbations changed between the previous epoch's end and the first batch."""

    def __init__(self):
        self.end, self.changed = None, []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == 0 and self.end is not None:
            self.changed.append(not torch.equal(self.end, module.delta))

    def on_train_epoch_end(self, trainer, module):
        self.end = module.delta.clone()


def test_perturbations_are_redrawn_every_reset_every_epochs_but_not_before_the_last(tmp_path):
    resets = _Resets()
    quiet_trainer(tmp_path, max_epochs=6, limit_train_batches=2, limit_val_batches=0, callbacks=[resets]).fit(
        _atas(reset_every=2), DigitsDataModule(batch_size=16, with_index=True))
    # 1-based epochs 2 and 4 start with a redraw; 3 and 5 do not; 6 is the last (official: epoch != args.epochs)
    assert resets.changed == [True, False, True, False, False]


def test_state_is_checkpointed_and_a_resumed_run_equals_the_straight_one(tmp_path):
    def module():  # a constant lr: the default schedule's milestones depend on max_epochs, which differ here
        L.seed_everything(0)
        return _atas(warmup_epochs=1, lr_scheduler=lambda o: torch.optim.lr_scheduler.ConstantLR(o, factor=1.0))

    run = dict(limit_train_batches=4, limit_val_batches=0)
    dm = DigitsDataModule(batch_size=16, with_index=True)
    straight = module()
    quiet_trainer(tmp_path / "a", max_epochs=3, **run).fit(straight, dm)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    quiet_trainer(tmp_path / "b", max_epochs=2, enable_checkpointing=True, callbacks=[ckpt], **run).fit(module(), dm)
    assert set(torch.load(ckpt.last_model_path, weights_only=True)[STATE_KEY]) == {"delta", "grad_norm_ema"}
    resumed = module()
    quiet_trainer(tmp_path / "c", max_epochs=3, **run).fit(resumed, dm, ckpt_path=ckpt.last_model_path)
    assert torch.equal(straight.delta, resumed.delta) and torch.equal(straight.grad_norm_ema, resumed.grad_norm_ema)
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters()))
    assert straight.grad_norm_ema.count_nonzero() > 0  # past the warm-up: the averages are in use


def _pgd_accuracy(model):
    dm = DigitsDataModule()
    dm.setup()
    x, y = dm.splits["test"].tensors
    model.eval()
    torch.manual_seed(0)
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    return clean, (PGD(EPS, steps=20, restarts=2).run(model, x, y).predictions == y).float().mean().item()


def test_trains_robustness_on_digits_with_the_monitor_quiet(tmp_path):
    """15 epochs (2 warm-up, a reset before the 10th) at Linf 0.2: PGD-20 accuracy far above standard training's
    (measured 0.96 clean / 0.45 PGD-20), and the catastrophic-overfitting monitor never fires (digits do not
    collapse under plain FGSM either: see tests/test_zerograd_atas.py). The monitor's check runs on one 64-image
    batch, whose PGD accuracy moves by up to 0.2 between epochs here, so a collapse is a drop of 0.3 (to near 0
    from about 0.5 is what one looks like)."""
    dm = DigitsDataModule(batch_size=64, with_index=True)
    monitor = CatastrophicOverfittingMonitor(drop=0.3, restore=False, stop=False)
    L.seed_everything(0)
    module = _atas(warmup_epochs=2, reset_every=10)
    quiet_trainer(tmp_path, max_epochs=15, limit_val_batches=0, callbacks=[monitor]).fit(module, dm)
    clean, robust = _pgd_accuracy(module.model)
    L.seed_everything(0)
    standard = StandardTraining(SmallCNN(width=16), optimizer=sgd())
    quiet_trainer(tmp_path, max_epochs=15, limit_val_batches=0).fit(standard, DigitsDataModule(batch_size=64))
    assert monitor.collapsed_epochs == []
    assert clean > 0.85 and robust > 0.35 and robust > _pgd_accuracy(standard.model)[1] + 0.3, (clean, robust)
    steps = atas_step_sizes(module.grad_norm_ema, module.c, module.step_scale, module.min_step_size,
                            module.max_step_size)
    assert steps.min() < steps.max()  # the step really adapts per example
