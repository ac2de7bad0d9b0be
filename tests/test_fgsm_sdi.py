"""FGSM-SDI (Jia et al., IEEE TIP 2022): the generator, the SDI adversarial batch, the paper's
label smoothing, the alternating schedule of the two optimizers, checkpoints, and digits."""

import pytest
import torch
import torch.nn.functional as F
from digits_bench import EPS, digits_accuracy, fit_on_digits, sgd
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from digits_bench import training_only_trainer as _trainer

from lit_robust.attacks.pgd import module_mode
from lit_robust.datamodules import DigitsDataModule
from lit_robust.defenses.fgsm_sdi import FGSMSDI, paper_label_smoothing
from lit_robust.models import SmallCNN
from lit_robust.models.sdi_generator import SDIGenerator


def _sdi(**kwargs):
    return FGSMSDI(SmallCNN(width=4), **{"eps": 0.2, "step_size": 0.2, "generator_every": 3, "generator_width": 8,
                                         "val_attack_steps": 2, "test_attack_steps": 2, **kwargs})




def _digits_batch(digits):
    return next(iter(digits.train_dataloader()))


def _flat(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()]).clone()


# --- the generator ----------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_generator_output_is_bounded_by_eps_even_when_saturated(channels):
    gen = SDIGenerator(eps=0.05, in_channels=channels, width=8).requires_grad_(False)
    assert gen.stem[0].in_channels == 2 * channels and gen.head[-1].out_channels == channels
    x = torch.rand(6, channels, 8, 8)
    grad_sign = torch.randn_like(x).sign()
    out = gen(x, grad_sign)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert out.abs().max() <= 0.05 and out.abs().max() > 0
    # extreme inputs and weights drive tanh to +-1 exactly in float32: the bound still holds
    with torch.no_grad():
        gen.head[-1].weight.mul_(1e4)
    for extreme in (x * 1e6, -x * 1e6, torch.full_like(x, float(torch.finfo(torch.float32).max) / 1e8)):
        out = gen.eval()(extreme, grad_sign)
        assert torch.isfinite(out).all() and out.abs().max() <= 0.05
        assert out.abs().max() == pytest.approx(0.05)  # saturated: the bound is really reached
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gen(x, grad_sign)
    assert out.dtype == torch.float32 and out.abs().max() <= 0.05


def test_generator_is_a_registered_submodule_sized_from_the_model():
    module = FGSMSDI(SmallCNN(in_channels=3, width=4, mean=(0.5,) * 3, std=(0.25,) * 3), eps=0.1)
    assert module.generator.stem[0].in_channels == 6 and module.generator.eps == pytest.approx(0.1)
    assert any(name.startswith("generator.") for name in module.state_dict())
    x, y = torch.rand(4, 3, 8, 8), torch.randint(0, 10, (4,))
    assert module.perturb(x, y).shape == x.shape


# --- the adversarial batch and the loss --------------------------------------------------------


def test_perturb_is_in_the_ball_and_box_and_touches_no_parameter_grad(digits):
    module = _sdi()
    x, y = _digits_batch(digits)
    sentinel = {p: torch.full_like(p, 7.0) for p in module.parameters()}
    for p, g in sentinel.items():
        p.grad = g.clone()
    buffers = {k: v.clone() for k, v in module.state_dict().items() if "running" in k}
    x_adv = module.perturb(x, y)
    assert not x_adv.requires_grad
    assert (x_adv - x).abs().max() <= 0.2 + 1e-6 and (x_adv - x).abs().max() > 0.1
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert all(torch.equal(p.grad, g) for p, g in sentinel.items())
    # eval-mode attack and generator: no BatchNorm statistic of either moved
    assert all(torch.equal(module.state_dict()[k], v) for k, v in buffers.items())


def test_every_training_forward_stays_in_the_threat_model_under_bf16(tmp_path, digits):
    module, clean, fed = _sdi(generator_every=2), [], []

    class RecordBatch(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            clean.append(batch[0].clone())

    module.model.register_forward_pre_hook(lambda m, args: fed.append((len(clean) - 1, args[0].detach().float())))
    _trainer(tmp_path, max_steps=3, precision="bf16-mixed", callbacks=[RecordBatch()]).fit(module, digits)
    # the epoch's input check; per batch: s0 and, per step, s1 and L; the generator steps on batches 0 and 2
    assert len(fed) == 1 + 3 * 3 + 2 * 2
    for step, x_in in fed:
        assert (x_in - clean[step]).abs().max() <= 0.2 + 1e-6 and x_in.min() >= 0 and x_in.max() <= 1
    assert any((x_in - clean[step]).abs().max() > 0.15 for step, x_in in fed)
    assert torch.isfinite(_flat(module)).all()


@pytest.mark.parametrize("num_classes", [10, 3])
def test_label_smoothing_gives_the_papers_targets(num_classes):
    logits, y = torch.randn(8, num_classes), torch.randint(0, num_classes, (8,))
    paper = torch.full((8, num_classes), 0.5 / (num_classes - 1))
    paper[torch.arange(8), y] = 0.5
    soft_ce = -(paper * logits.log_softmax(1)).sum(1).mean()
    s = paper_label_smoothing(num_classes)
    assert 1 - s + s / num_classes == pytest.approx(0.5) and s / num_classes == pytest.approx(0.5 / (num_classes - 1))
    assert _sdi().cross_entropy(logits, y).item() == pytest.approx(soft_ce.item(), rel=1e-6)
    assert soft_ce.item() != pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-3)
    # a float is torch's convention, as for every other defense
    assert _sdi(label_smoothing=0.0).cross_entropy(logits, y).item() == pytest.approx(F.cross_entropy(logits, y).item())
    assert paper_label_smoothing(10, 0.9) == pytest.approx(0.1 * 10 / 9)  # the official script's --factor default


def test_training_loss_is_the_smoothed_ce_at_the_sdi_batch(digits):
    module = _sdi()
    x, y = _digits_batch(digits)
    out = module.training_loss(x, y)
    assert all(p.grad is None for p in module.parameters())
    assert out.loss.item() == pytest.approx(module.cross_entropy(out.adv_logits, y).item(), rel=1e-6)


# --- the alternating schedule --------------------------------------------------------------------


class _Snapshots(Callback):
    def __init__(self):
        self.generator, self.model, self.lrs = [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self.generator:
            self.generator.append(_flat(pl_module.generator))
            self.model.append(_flat(pl_module.model))
        self.lrs.append([opt.param_groups[0]["lr"] for opt in trainer.optimizers])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.generator.append(_flat(pl_module.generator))
        self.model.append(_flat(pl_module.model))


def test_generator_steps_every_kth_batch_and_the_model_every_batch(tmp_path, digits):
    snaps = _Snapshots()
    trainer = _trainer(tmp_path, max_epochs=2, limit_train_batches=5, callbacks=[snaps])
    trainer.fit(_sdi(generator_every=3), digits)
    gen_moved = [not torch.equal(a, b) for a, b in zip(snaps.generator, snaps.generator[1:])]
    model_moved = [not torch.equal(a, b) for a, b in zip(snaps.model, snaps.model[1:])]
    # batch_idx % 3 == 0 in each epoch: batches 0 and 3 of both epochs
    assert gen_moved == [True, False, False, True, False] * 2
    assert all(model_moved)
    assert trainer.global_step == 10  # one global step per batch: the generator's steps are not counted


def test_generator_step_ascends_the_loss_for_fixed_model_weights():
    dm = DigitsDataModule(batch_size=64)
    dm.setup()
    x, y = dm.splits["train"].tensors[0][:64], dm.splits["train"].tensors[1][:64]
    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    # lr 0 freezes the classifier; train-mode BN everywhere, so L depends on no running statistic.
    # No weight decay: with it, Adam's first steps follow wd * theta where dL/dtheta is tiny.
    module = _sdi(generator_every=1, generator_lr=1e-2, generator_weight_decay=0.0, attack_bn_mode="train",
                  optimizer=lambda p: torch.optim.SGD(p, lr=0.0))

    def objective():
        with module_mode(module, "train"):
            grad_sign = module._grad_sign(x, torch.zeros_like(x), y)
            return module.outer_loss(x, module._sdi_batch(x, y, grad_sign), y).loss

    loss = objective()
    ascent = torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(module.generator.parameters()))])
    model_before, generator_before = _flat(module.model), _flat(module.generator)
    _trainer(None, max_steps=1).fit(module, loader)  # batch 0: a generator step, then a model step
    step = _flat(module.generator) - generator_before
    assert step.abs().max() > 0 and torch.equal(_flat(module.model), model_before)
    # Adam's first step is lr * sign(gradient of what it minimises): here -L, so G moves along +dL/dG
    assert F.cosine_similarity(step, ascent.sign(), dim=0) > 0.99
    assert objective().item() > loss.item() + 1e-3


@pytest.mark.parametrize("scheduler,epochs,batches,expected", [
    (None, 2, 11, [0.1] * 20 + [0.01] + [0.001]),  # x0.1 at 100/110 and 105/110 of the 22 iterations
    ("epoch", 3, 2, [0.1] * 2 + [0.05] * 2 + [0.025] * 2),
    ("step", 1, 4, [0.1, 0.05, 0.025, 0.0125]),
])
def test_schedules_are_stepped_by_hand_and_the_generator_lr_is_constant(tmp_path, digits, scheduler, epochs, batches,
                                                                       expected):
    kwargs = {} if scheduler is None else dict(
        lr_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
        lr_scheduler_interval=scheduler)
    snaps = _Snapshots()
    trainer = _trainer(tmp_path, max_epochs=epochs, limit_train_batches=batches, callbacks=[snaps])
    trainer.fit(_sdi(generator_every=50, generator_width=2, **kwargs), digits)
    model_opt, generator_opt = trainer.optimizers
    assert isinstance(model_opt, torch.optim.SGD) and isinstance(generator_opt, torch.optim.Adam)
    group = model_opt.param_groups[0]
    assert (group["momentum"], group["weight_decay"], group["initial_lr"]) == (0.9, 5e-4, 0.1)
    assert (generator_opt.param_groups[0]["lr"], generator_opt.param_groups[0]["weight_decay"]) == (1e-3, 5e-4)
    assert [lr for lr, _ in snaps.lrs] == pytest.approx(expected)
    assert {g for _, g in snaps.lrs} == {1e-3}


# --- Lightning plumbing --------------------------------------------------------------------------


def test_fast_dev_run_fit_validate_test(tmp_path, digits):
    module = _sdi()
    trainer = _trainer(tmp_path, fast_dev_run=2, limit_val_batches=None)
    trainer.fit(module, digits)
    assert {"train/loss", "train/adv_acc", "train/generator_loss", "val/robust_acc"} <= set(trainer.callback_metrics)
    assert trainer.global_step == 2
    assert set(trainer.validate(module, digits, verbose=False)[0]) == {"val/clean_acc", "val/robust_acc"}
    assert set(trainer.test(module, digits, verbose=False)[0]) == {"test/clean_acc", "test/robust_acc"}


def test_checkpoint_round_trip_includes_the_generator(tmp_path, digits):
    module = _sdi(generator_every=2, generator_width=6, generator_lr=0.01)
    fresh = _flat(module.generator)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    _trainer(tmp_path, max_steps=3, enable_checkpointing=True, callbacks=[ckpt]).fit(module, digits)
    assert not torch.equal(_flat(module.generator), fresh)  # trained, so the check below means something
    restored = FGSMSDI.load_from_checkpoint(ckpt.last_model_path, model=SmallCNN(width=4))
    assert restored.generator_every == 2 and restored.generator_lr == 0.01 and restored.label_smoothing is None
    assert restored.generator.stem[0].out_channels == 6
    state = restored.state_dict()
    assert any(key.startswith("generator.") for key in state)
    for key, value in module.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert len(torch.load(ckpt.last_model_path, weights_only=False)["optimizer_states"]) == 2
    resumed = _trainer(tmp_path, max_steps=5)
    resumed.fit(_sdi(generator_every=2, generator_width=6, generator_lr=0.01), digits, ckpt_path=ckpt.last_model_path)
    assert resumed.global_step == 5


@pytest.mark.parametrize("kwargs,name", [
    ({"generator_every": 0}, "generator_every"), ({"generator_every": 1.5}, "generator_every"),
    ({"generator_lr": 0.0}, "generator_lr"), ({"generator_weight_decay": -1.0}, "generator_weight_decay"),
    ({"generator_width": 0}, "width"), ({"norm": "l2"}, "norm"), ({"label_smoothing": 1.0}, "label_smoothing"),
    ({"eps": 0.0}, "eps"), ({"attack_bn_mode": "frozen"}, "attack_bn_mode"),
])
def test_invalid_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        _sdi(**kwargs)


def test_model_without_conv_needs_in_channels():
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    with pytest.raises(ValueError, match="in_channels"):
        FGSMSDI(mlp)
    assert FGSMSDI(mlp, in_channels=1).generator.head[-1].out_channels == 1


# --- behaviour on real data ------------------------------------------------------------------------


def test_fgsm_sdi_beats_standard_training_under_pgd(standard_digits_accuracy):
    # A width-16 generator: at 64 it would cost twice the classifier on 8x8 digits, for +0.02 PGD accuracy.
    # Seen (seeds 0/1/2): clean 0.96/0.96/0.95, PGD-20 0.51/0.52/0.54; standard training: 0.99 / 0.003.
    module = fit_on_digits(FGSMSDI(SmallCNN(width=16), eps=EPS, step_size=EPS, generator_every=5, generator_width=16,
                                   optimizer=sgd()))
    acc = digits_accuracy(module.model)
    assert acc["clean"] > 0.8
    assert acc["pgd"] > standard_digits_accuracy["pgd"] + 0.3
