"""The generated-data recipes' parts: Swish WideResNets (official key names), SGD without norm/bias decay,
DeepMind's warm-up + cosine and DM-Improves-AT's "cosinew" schedules told the length by the defense, and
gradient accumulation."""

import math
from functools import partial

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_robust.attacks import PGD
from lit_robust.defenses import PGDAT, FGSMSDI, FreeAT
from lit_robust.models import (
    CIFAR10_MEAN, CIFAR10_STD, SmallCNN, SwishWideResNet, load_official_state_dict, official_state_dict,
    swish_wide_resnet, wrn_28_10_swish, wrn_70_16_swish,
)
from lit_robust.optim import (
    OneCycleCosineLR, SGDNoNormBiasDecay, WarmupCosineLR, decay_groups_by_name, split_weight_decay,
)

BN_STATS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _count(model):
    return sum(p.numel() for p in model.parameters())


def _small(**kwargs):
    return SwishWideResNet(depth=16, width=2, **kwargs)  # two blocks per group, widths 16/32/64/128


# --- Swish WideResNets -------------------------------------------------------------------------

@pytest.mark.parametrize("make,count", [
    (wrn_28_10_swish, 36_479_194),  # 36.5M, as WideResNet(28, 10)
    (wrn_70_16_swish, 266_796_506),  # 266.8M ("267M")
    (partial(swish_wide_resnet, "wrn-106-16-swish"), 415_475_162),
])
def test_parameter_counts_and_output_shape_on_the_meta_device(make, count):
    with torch.device("meta"):
        model = make()
        assert model(torch.empty(2, 3, 32, 32)).shape == (2, 10)
    assert _count(model) == count


def test_names_build_the_right_networks():
    with torch.device("meta"):
        big = swish_wide_resnet("wrn-70-16-swish")
        relu = swish_wide_resnet("WRN-28-10-relu", num_classes=100)
    assert (big.depth, big.width, big.activation) == (70, 16, "swish")
    assert (relu.depth, relu.width, relu.activation, relu.logits.out_features) == (28, 10, "relu", 100)
    with pytest.raises(ValueError, match="name"):
        swish_wide_resnet("wideresnet-28-10")


@pytest.mark.parametrize("kwargs,name", [
    (dict(depth=30), "depth"), (dict(width=0), "width"), (dict(activation="gelu"), "activation"),
    (dict(in_channels=1), "mean"), (dict(padding=-1), "padding"),
])
def test_bad_arguments_are_rejected(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SwishWideResNet(**kwargs)


def _official_key_names(depth, width):
    """The model zoo's state_dict keys, from its naming rule (``_Block``, ``_BlockGroup``, ``WideResNet``)."""
    widths = [16, 16 * width, 32 * width, 64 * width]
    keys = ["init_conv.weight"]
    for g in range(3):
        for i in range((depth - 4) // 6):
            cin = widths[g] if i == 0 else widths[g + 1]
            prefix = f"layer.{g}.block.{i}."
            keys += [prefix + f"batchnorm_0.{s}" for s in BN_STATS] + [prefix + "conv_0.weight"]
            keys += [prefix + f"batchnorm_1.{s}" for s in BN_STATS] + [prefix + "conv_1.weight"]
            keys += [prefix + "shortcut.weight"] if cin != widths[g + 1] else []
    return set(keys + [f"batchnorm.{s}" for s in BN_STATS] + ["logits.weight", "logits.bias"])


def test_state_dict_has_the_official_key_names_plus_normalize():
    model = _small()
    assert set(model.state_dict()) == _official_key_names(16, 2) | {"normalize.mean", "normalize.std"}
    assert set(official_state_dict(model)) == _official_key_names(16, 2)
    assert model.layer[1].block[0].shortcut is not None and model.layer[1].block[1].shortcut is None


def _reference_logits(model, x):
    """The model zoo's forward, written from its description with F.* on ``model``'s tensors (eval mode):
    every conv3x3 unpadded after an explicit F.pad, (1,1,1,1) at stride 1 and TF-SAME (0,1,0,1) at stride 2;
    the projection shortcut fed by the activated input; avg_pool2d(8) then the linear layer."""
    def bn(m, t):
        return F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)

    out = (x - torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    out = F.conv2d(out, model.init_conv.weight, padding=1)
    for g, group in enumerate(model.layer):
        for i, block in enumerate(group.block):
            stride = 2 if g > 0 and i == 0 else 1
            act = F.silu(bn(block.batchnorm_0, out))
            padded = F.pad(act, (1, 1, 1, 1) if stride == 1 else (0, 1, 0, 1))
            branch = F.conv2d(padded, block.conv_0.weight, stride=stride)
            branch = F.conv2d(F.silu(bn(block.batchnorm_1, branch)), block.conv_1.weight, padding=1)
            skip = F.conv2d(act, block.shortcut.weight, stride=stride) if block.shortcut is not None else out
            out = skip + branch
    out = F.avg_pool2d(F.silu(bn(model.batchnorm, out)), 8).flatten(1)
    return F.linear(out, model.logits.weight, model.logits.bias)


def _randomise_statistics(model):
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


def test_forward_is_the_model_zoos_function_with_tf_same_padding():
    model = _randomise_statistics(_small()).eval()
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(model(x), _reference_logits(model, x), rtol=1e-4, atol=1e-5)
    # not vacuous: torch's symmetric padding=1 at stride 2 computes another function
    block = model.layer[1].block[0]
    pre = torch.rand(1, block.conv_0.in_channels, 16, 16)
    same = block.conv_0(F.pad(pre, (0, 1, 0, 1)))
    assert same.shape == (1, block.conv_0.out_channels, 8, 8)
    assert not torch.allclose(same, F.conv2d(pre, block.conv_0.weight, stride=2, padding=1))


def test_swish_batchnorm_momentum_and_eps_as_the_official_code():
    model = _small()
    acts = [type(m) for m in model.modules() if isinstance(m, (nn.SiLU, nn.ReLU))]
    assert acts and set(acts) == {nn.SiLU}
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(m.momentum == 0.01 and m.eps == 1e-5 and m.affine for m in norms)
    relu = _small(activation="relu")
    assert not any(isinstance(m, nn.SiLU) for m in relu.modules())
    relu.load_state_dict(model.state_dict())
    x = torch.rand(2, 3, 32, 32)
    assert not torch.allclose(model.eval()(x), relu.eval()(x))


def test_official_checkpoints_load_and_round_trip():
    source = _randomise_statistics(_small()).eval()
    x = torch.rand(2, 3, 32, 32)
    expected = source(x)
    official = official_state_dict(source)

    deepmind = _small().eval()  # DeepMind's files: a bare state_dict with the model zoo's keys
    load_official_state_dict(deepmind, dict(official))
    torch.testing.assert_close(deepmind(x), expected)

    # DM-Improves-AT's: DataParallel(Sequential(backbone)) keys, the averaged weights under model_state_dict
    wrapped = {"model_state_dict": {f"module.0.{k}": v for k, v in official.items()},
               "unaveraged_model_state_dict": {f"module.0.{k}": torch.zeros_like(v) for k, v in official.items()}}
    dm = _small().eval()
    load_official_state_dict(dm, wrapped)
    torch.testing.assert_close(dm(x), expected)

    # converted from JAX without num_batches_tracked: BatchNorm fills it in
    no_counts = {k: v for k, v in official.items() if not k.endswith("num_batches_tracked")}
    jax = _small().eval()
    load_official_state_dict(jax, no_counts)
    torch.testing.assert_close(jax(x), expected)

    with pytest.raises(RuntimeError, match="Unexpected"):
        load_official_state_dict(_small(), {**official, "layer.0.block.0.extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="init_conv"):
        load_official_state_dict(_small(), {"conv.weight": torch.zeros(1)})


def test_bn_first_batch_takes_the_first_batch_statistics_once():
    torch.manual_seed(0)
    model = _small(bn_first_batch=True).train()
    x = torch.rand(8, 3, 32, 32)
    first_bn_input = model.init_conv(model.normalize(x)).detach()
    model(x)
    bn = model.layer[0].block[0].batchnorm_0
    torch.testing.assert_close(bn.running_mean, first_bn_input.mean((0, 2, 3)))
    torch.testing.assert_close(bn.running_var, first_bn_input.var((0, 2, 3), unbiased=True))
    assert bn.momentum == 0.01
    before = bn.running_mean.clone()
    x2 = torch.rand(8, 3, 32, 32)
    second_input = model.init_conv(model.normalize(x2)).detach()
    model(x2)
    torch.testing.assert_close(bn.running_mean, 0.99 * before + 0.01 * second_input.mean((0, 2, 3)))

    resumed = _small(bn_first_batch=True)
    resumed.load_state_dict(model.state_dict())  # statistics already updated: not reset again
    assert not resumed._bn_pending
    plain = _small()
    plain.train()(x)
    assert plain.layer[0].block[0].batchnorm_0.running_mean.abs().max() < first_bn_input.mean((0, 2, 3)).abs().max()


# --- SGD without decay on norm scales/offsets and biases ---------------------------------------

def test_one_step_with_zero_gradients_moves_only_the_decayed_parameters():
    model = _small()
    lr, momentum, wd = 0.2, 0.9, 5e-4
    opt = SGDNoNormBiasDecay(model.parameters(), lr=lr, momentum=momentum, nesterov=True, weight_decay=wd)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    moved = set()
    for n, p in model.named_parameters():
        if p.ndim >= 2:  # conv kernels and the classifier weight: Nesterov's first step is (1 + m) * wd * p
            torch.testing.assert_close(p.detach(), before[n] * (1 - lr * (1 + momentum) * wd))
            moved.add(n)
        else:
            assert torch.equal(p.detach(), before[n]), n
    assert "logits.weight" in moved and "init_conv.weight" in moved
    assert [g["weight_decay"] for g in opt.param_groups] == [wd, 0.0]
    assert all(g["nesterov"] and g["momentum"] == momentum for g in opt.param_groups)


def test_exempt_parameters_are_the_official_ones_plus_the_classifier_bias():
    model = _small()
    exempt_by_shape = {id(p) for g in split_weight_decay(model.parameters()) if g.get("weight_decay") == 0.0
                       for p in g["params"]}
    exempt_by_name = {id(p) for g in decay_groups_by_name(model.named_parameters()) if g.get("weight_decay") == 0.0
                      for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[i] for i in exempt_by_shape - exempt_by_name} == {"logits.bias"}
    assert exempt_by_name <= exempt_by_shape
    assert all("batchnorm" in names[i] for i in exempt_by_name)


def test_split_keeps_given_groups_options():
    a, b, c = nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(3, 1))
    groups = split_weight_decay([{"params": [a, b], "lr": 0.5}, {"params": [c], "weight_decay": 1e-3}])
    assert [(len(g["params"]), g.get("lr"), g.get("weight_decay")) for g in groups] == [
        (1, 0.5, None), (1, 0.5, 0.0), (1, None, 1e-3)]
    with pytest.raises(ValueError, match="params"):
        split_weight_decay([])


# --- schedules ---------------------------------------------------------------------------------

def _sgd(lr=0.4, params=None):
    params = [nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(2))] if params is None else params
    return SGDNoNormBiasDecay(params, lr=lr)


def _lrs(opt, scheduler, n, key="lr"):
    values = []
    for _ in range(n):
        values.append(opt.param_groups[0][key])
        opt.step()
        scheduler.step()
    return values


def test_warmup_cosine_is_deepminds_formula():
    opt = _sgd(0.4)
    scheduler = WarmupCosineLR(opt, total_steps=100, warmup_fraction=0.1)
    lrs = _lrs(opt, scheduler, 100) + [opt.param_groups[0]["lr"]]
    assert scheduler.warmup_steps == 10
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.2) and lrs[10] == pytest.approx(0.4)
    assert lrs[55] == pytest.approx(0.2)  # halfway through the cosine
    assert lrs[99] == pytest.approx(0.4 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert lrs[100] == pytest.approx(0.0, abs=1e-12)
    assert all(g["lr"] == lrs[100] for g in opt.param_groups)  # both groups follow
    scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # stays at 0 past the end, as optax's


def test_deepminds_warmup_in_steps():
    # 400 epochs at batch 1024: int(400 * 50000 / 1024) = 19531 steps, int(10 * 50000 / 1024) = 488 warm-up
    scheduler = WarmupCosineLR(_sgd(), total_steps=19531)
    assert scheduler.warmup_steps == 488
    assert WarmupCosineLR(_sgd(), total_steps=100, warmup_steps=7).warmup_steps == 7
    with pytest.raises(ValueError, match="warm-up"):
        WarmupCosineLR(_sgd(), total_steps=10, warmup_steps=10)
    with pytest.raises(ValueError, match="warmup_fraction"):
        WarmupCosineLR(_sgd(), warmup_fraction=1.0)


@pytest.mark.parametrize("make", [WarmupCosineLR, OneCycleCosineLR])
def test_the_length_can_come_later(make):
    opt = _sgd(0.4)
    scheduler = make(opt)
    assert scheduler.total_steps is None and opt.param_groups[0]["lr"] == 0.4  # untouched until the length is known
    with pytest.raises(RuntimeError, match="training length"):
        scheduler.step()
    scheduler.set_total_steps(80)
    assert scheduler.total_steps == 80 and opt.param_groups[0]["lr"] != 0.4
    with pytest.raises(ValueError, match="already"):
        scheduler.set_total_steps(50)
    with pytest.raises(ValueError, match="total_steps"):
        make(_sgd()).set_total_steps(0)


def test_cosinew_refuses_a_warmup_of_exactly_one_step():
    with pytest.raises(ValueError, match="pct_start"):
        OneCycleCosineLR(_sgd(), total_steps=40)  # 0.025 * 40 = 1: torch would divide by zero


@pytest.mark.parametrize("later", [False, True])
def test_cosinew_is_torchs_one_cycle_with_dm_improves_at_arguments(later):
    model_a, model_b = _small(), _small()
    ours = SGDNoNormBiasDecay(model_a.parameters(), lr=0.2, momentum=0.9, nesterov=True)
    theirs = torch.optim.SGD(model_b.parameters(), lr=0.2, momentum=0.9, nesterov=True)
    scheduler = OneCycleCosineLR(ours) if later else OneCycleCosineLR(ours, total_steps=400)
    if later:
        scheduler.set_total_steps(400)
    reference = torch.optim.lr_scheduler.OneCycleLR(theirs, max_lr=0.2, pct_start=0.025, total_steps=400)
    for epoch in range(400):
        for group in ours.param_groups:
            assert group["lr"] == theirs.param_groups[0]["lr"], epoch
            assert group["momentum"] == theirs.param_groups[0]["momentum"], epoch
        ours.step(), scheduler.step(), theirs.step(), reference.step()
    # the side effects, as the official run has them
    lrs = _lrs(*_fresh_cosinew(), 400)
    assert lrs[0] == pytest.approx(0.2 / 25) and lrs[9] == pytest.approx(0.2)  # peak at pct_start * 400 - 1
    assert lrs[399] == pytest.approx(0.2 / 25 / 1e4)
    momenta = _lrs(*_fresh_cosinew(), 400, key="momentum")
    assert (momenta[0], momenta[9], momenta[399]) == pytest.approx((0.95, 0.85, 0.95))


def _fresh_cosinew():
    opt = _sgd(0.2)
    return opt, OneCycleCosineLR(opt, total_steps=400)


def _lr_and_momentum(opt, scheduler, n):
    values = []
    for _ in range(n):
        values.append((opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"]))
        opt.step()
        scheduler.step()
    return values


@pytest.mark.parametrize("make", [partial(WarmupCosineLR, warmup_fraction=0.1), OneCycleCosineLR],
                         ids=["WarmupCosineLR", "OneCycleCosineLR"])
def test_state_dict_resumes_the_schedule(make):
    opt = _sgd()
    scheduler = make(opt, total_steps=100)
    _lrs(opt, scheduler, 37)
    saved_opt, saved = opt.state_dict(), scheduler.state_dict()
    rest = _lr_and_momentum(opt, scheduler, 30)

    opt2 = _sgd()
    resumed = make(opt2)  # built as a resumed fit builds it: length set, then the saved states loaded
    resumed.set_total_steps(100)
    opt2.load_state_dict(saved_opt)
    resumed.load_state_dict(saved)
    assert _lr_and_momentum(opt2, resumed, 30) == rest


def test_schedules_and_optimizer_from_a_config(tmp_path):
    """The YAML of the recipes builds SwishWideResNet (by class and by name), the optimizer and both schedules."""
    from lit_robust.cli import main

    def config(model, scheduler, interval):
        spec = {
            "trainer": {"max_epochs": 4, "accelerator": "cpu", "logger": False},
            "model": {"class_path": "lit_robust.defenses.PGDAT", "init_args": {
                "model": model,
                "optimizer": {"class_path": "lit_robust.optim.SGDNoNormBiasDecay",
                              "init_args": {"lr": 0.2, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}},
                "lr_scheduler": scheduler, "lr_scheduler_interval": interval}},
            "data": {"class_path": "lit_robust.datamodules.DigitsDataModule"},
        }
        path = tmp_path / f"{interval}.yaml"
        path.write_text(yaml.safe_dump(spec))
        return main(["--config", str(path), f"--trainer.default_root_dir={tmp_path}"], run=False).model

    module = config({"class_path": "lit_robust.models.SwishWideResNet", "init_args": {"depth": 10, "width": 1}},
                    {"class_path": "lit_robust.optim.WarmupCosineLR", "init_args": {"warmup_fraction": 0.1}}, "step")
    assert isinstance(module.model, SwishWideResNet) and module.model.depth == 10
    optimizer = module.optimizer_factory(module.model.parameters())
    assert isinstance(optimizer, SGDNoNormBiasDecay)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [5e-4, 0]
    scheduler = module.lr_scheduler_factory(optimizer)
    assert isinstance(scheduler, WarmupCosineLR) and scheduler.total_steps is None and scheduler.warmup_fraction == 0.1

    module = config({"class_path": "lit_robust.models.swish_wide_resnet", "init_args": {"name": "wrn-10-2-swish"}},
                    {"class_path": "lit_robust.optim.OneCycleCosineLR"}, "epoch")
    assert (module.model.depth, module.model.width) == (10, 2)
    scheduler = module.lr_scheduler_factory(module.optimizer_factory(module.model.parameters()))
    assert isinstance(scheduler, OneCycleCosineLR) and scheduler.total_steps is None


# --- through a real Trainer --------------------------------------------------------------------

class RecordLR(Callback):
    def __init__(self):
        self.lrs, self.momenta = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        group = trainer.optimizers[0].param_groups[0]
        self.lrs.append(group["lr"])
        self.momenta.append(group["momentum"])


def _loader(n=12, batch_size=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))
    return DataLoader(data, batch_size=batch_size, shuffle=False)


def _trainer(tmp_path, **kwargs):
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    return L.Trainer(**{**defaults, **kwargs})


def _pgdat(scheduler, interval, model=None):
    L.seed_everything(0)
    return PGDAT(SmallCNN(width=4) if model is None else model, eps=0.1, steps=1, step_size=0.1,
                 optimizer=partial(SGDNoNormBiasDecay, lr=0.1), lr_scheduler=scheduler, lr_scheduler_interval=interval)


def test_fit_sets_the_warmup_cosine_length_in_optimizer_steps(tmp_path):
    record = RecordLR()
    module = _pgdat(partial(WarmupCosineLR, warmup_fraction=0.25), "step")
    trainer = _trainer(tmp_path, max_epochs=2, callbacks=[record])
    trainer.fit(module, _loader())
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.total_steps == 6 and scheduler.warmup_steps == 1  # 3 batches x 2 epochs
    expected = [scheduler.lr_at(t, 0.1) for t in range(6)]
    assert record.lrs == pytest.approx(expected) and record.lrs[0] == 0.0
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # reached 0 at the end


def test_fit_sets_the_cosinew_length_in_epochs(tmp_path):
    record = RecordLR()
    module = _pgdat(OneCycleCosineLR, "epoch")
    trainer = _trainer(tmp_path, max_epochs=3, callbacks=[record])
    trainer.fit(module, _loader())
    assert trainer.lr_scheduler_configs[0].scheduler.total_steps == 3
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
    reference = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, pct_start=0.025, total_steps=3)
    lrs, momenta = [], []
    for _ in range(3):
        lrs += [opt.param_groups[0]["lr"]] * 3  # constant within an epoch
        momenta += [opt.param_groups[0]["momentum"]] * 3
        opt.step(), reference.step()
    assert record.lrs == pytest.approx(lrs) and record.momenta == pytest.approx(momenta)


@pytest.mark.parametrize("scheduler,interval", [
    (partial(WarmupCosineLR, warmup_fraction=0.25), "step"), (OneCycleCosineLR, "epoch")], ids=["step", "epoch"])
def test_resumed_fit_continues_the_schedule(tmp_path, scheduler, interval):
    straight = RecordLR()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    _trainer(tmp_path / "a", max_epochs=3, callbacks=[straight, ckpt], enable_checkpointing=True).fit(
        _pgdat(scheduler, interval), _loader())
    first_epoch = sorted((tmp_path / "ckpt").glob("epoch=0-*.ckpt"))[0]
    resumed = RecordLR()
    trainer = _trainer(tmp_path / "b", max_epochs=3, callbacks=[resumed])
    trainer.fit(_pgdat(scheduler, interval), _loader(), ckpt_path=first_epoch)
    assert resumed.lrs == pytest.approx(straight.lrs[3:]) and resumed.momenta == pytest.approx(straight.momenta[3:])


# --- gradient accumulation ---------------------------------------------------------------------

def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))  # no BatchNorm


def _one_step(tmp_path, batch_size, accumulate, **module_kwargs):
    module = PGDAT(_mlp(), eps=0.1, steps=2, step_size=0.05, **module_kwargs)
    module.attack = PGD(0.1, 2, 0.05, random_start=False)  # deterministic inner maximization
    _trainer(tmp_path, max_steps=1, accumulate_grad_batches=accumulate).fit(module, _loader(8, batch_size))
    return torch.cat([p.detach().flatten() for p in module.model.parameters()])


def test_accumulating_two_micro_batches_equals_the_double_batch(tmp_path):
    start = torch.cat([p.detach().flatten() for p in _mlp().parameters()])
    accumulated = _one_step(tmp_path / "a", batch_size=4, accumulate=2)
    large = _one_step(tmp_path / "b", batch_size=8, accumulate=1)
    torch.testing.assert_close(accumulated, large, rtol=1e-5, atol=1e-7)
    first_half = _one_step(tmp_path / "c", batch_size=4, accumulate=1)
    assert not torch.allclose(accumulated, start) and not torch.allclose(first_half, large, atol=1e-5)


def test_step_schedules_count_optimizer_steps_under_accumulation(tmp_path):
    module = PGDAT(_mlp(), eps=0.1, steps=1, step_size=0.1, optimizer=partial(SGDNoNormBiasDecay, lr=0.1),
                   lr_scheduler=WarmupCosineLR, lr_scheduler_interval="step")
    trainer = _trainer(tmp_path, max_epochs=2, accumulate_grad_batches=2)
    trainer.fit(module, _loader(16, 4))  # 4 batches per epoch: 2 optimizer steps per epoch
    assert trainer.lr_scheduler_configs[0].scheduler.total_steps == 4 and trainer.global_step == 4
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("make", [
    lambda: FreeAT(SmallCNN(width=4), replays=2, eps=0.1),
    lambda: FGSMSDI(SmallCNN(width=4), eps=0.1, step_size=0.1, generator_width=4)], ids=["FreeAT", "FGSMSDI"])
def test_manual_optimization_defenses_refuse_accumulation(tmp_path, make):
    with pytest.raises(MisconfigurationException, match="accumulation is not supported for manual optimization"):
        _trainer(tmp_path, max_steps=1, accumulate_grad_batches=2).fit(make(), _loader())
