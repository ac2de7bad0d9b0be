"""Every recipe in configs/ instantiates: class paths resolve, arguments exist and pass validation."""

from pathlib import Path

import pytest
import torch
import yaml

from lit_robust.cli import main
from lit_robust.defenses import AdversarialModule

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(ROOT.glob("configs/**/*.yaml"))


def test_there_are_recipes():
    assert {"quickstart.yaml", "pgd_at.yaml", "pgd_at_awp.yaml", "trades_awp.yaml", "dynamic_at.yaml"} <= {
        c.name for c in CONFIGS}


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.relative_to(ROOT / "configs")) for c in CONFIGS])
def test_config_instantiates_with_its_values(config, tmp_path):
    cli = main(["--config", str(config), f"--trainer.default_root_dir={tmp_path}"], run=False)
    assert isinstance(cli.model, AdversarialModule)
    spec = yaml.safe_load(config.read_text())
    assert type(cli.model).__name__ == spec["model"]["class_path"].rsplit(".", 1)[1]
    assert type(cli.model.model).__name__ == spec["model"]["init_args"]["model"]["class_path"].rsplit(".", 1)[1]
    for key in ("eps", "steps", "step_size", "awp_gamma", "beta"):
        if key in spec["model"]["init_args"]:
            assert getattr(cli.model, key, cli.model.hparams.get(key)) == pytest.approx(spec["model"]["init_args"][key])
    assert cli.trainer.max_epochs == spec["trainer"]["max_epochs"]


def _instantiate(name, tmp_path):
    return main(["--config", str(ROOT / "configs" / name), f"--trainer.default_root_dir={tmp_path}"], run=False)


def _lr_of_each_epoch(module, epochs):
    """The lr of every 0-indexed epoch, the configured scheduler stepped at each epoch's end (interval "epoch")."""
    assert module.lr_scheduler_interval == "epoch"
    optimizer = module.optimizer_factory(module.parameters())
    scheduler = module.lr_scheduler_factory(optimizer)
    lrs = []
    for _ in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # no gradients: nothing moves; keeps the step order the scheduler expects
        scheduler.step()
    return optimizer, lrs


def test_trades_awp_is_the_official_recipe(tmp_path):
    """csdongxian/AWP trades_AWP/train_trades_cifar.py: eps 8/255, step 2/255, beta 6, gamma 0.005 from
    epoch 10 (counted from 1), SGD 0.1 / 0.9 / 5e-4, batch 128, 200 epochs, lr x0.1 at 100 and x0.01 at 150."""
    cli = _instantiate("cifar10/trades_awp.yaml", tmp_path)
    module = cli.model
    assert type(module).__name__ == "TRADES" and module.beta == 6.0 and module.attack_bn_mode == "eval"
    assert (module.eps, module.step_size, module.steps) == (pytest.approx(8 / 255), pytest.approx(2 / 255), 10)
    assert module.awp.gamma == 0.005 and module.awp_warmup_epochs == 9  # AWP once current_epoch >= 9
    assert module.model.normalize.mean.eq(0).all() and module.model.normalize.std.eq(1).all()
    assert cli.datamodule.hparams.batch_size == 128 and cli.trainer.max_epochs == 200
    optimizer, lrs = _lr_of_each_epoch(module, 200)
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert (group["momentum"], group["weight_decay"]) == (0.9, 5e-4)

    def adjust_learning_rate(epoch):  # the official function, epochs counted from 1
        lr = 0.1
        if epoch >= 100:
            lr = 0.1 * 0.1
        if epoch >= 150:
            lr = 0.1 * 0.01
        return lr

    assert lrs == pytest.approx([adjust_learning_rate(epoch) for epoch in range(1, 201)])


def test_dynamic_at_lr_drops_where_the_official_loop_does(tmp_path):
    """YisenWang/dynamic_adv_training train_models.py: lr / 10 before epoch ep when ep + 1 is 60 or 100."""
    optimizer, lrs = _lr_of_each_epoch(_instantiate("cifar10/dynamic_at.yaml", tmp_path).model, 120)
    official, lr = [], 0.01
    for ep in range(120):
        if ep + 1 == 60:
            lr = lr / 10.0
        if ep + 1 == 100:
            lr = lr / 10.0
        official.append(lr)
    assert lrs == pytest.approx(official)


def test_atas_is_the_official_recipe(tmp_path):
    """ATAS_CIFAR.sh: c 0.01, steps in [4/255, 14/255] from 2 * 8/255, 5 warm-up epochs, resets every 10, 30
    epochs; the DataModule serves indexed, unaugmented batches (ATAS crops and flips itself)."""
    cli = _instantiate("cifar10/atas.yaml", tmp_path)
    m, data = cli.model, cli.datamodule
    assert (m.c, m.beta, m.warmup_epochs, m.reset_every, m.pad, m.flip) == (0.01, 0.5, 5, 10, 4, True)
    assert (m.step_scale, m.min_step_size, m.max_step_size) == pytest.approx((16 / 255, 4 / 255, 14 / 255))
    assert m.warmup_step_size == pytest.approx(8 / 255) and cli.trainer.max_epochs == 30
    assert data.with_index and not data.augment and data.batch_size == 128


# --- ImageNet / fine-tuning recipes (timm backbones) -------------------------------------------------------------


def _callback(cli, name):
    (found,) = [c for c in cli.trainer.callbacks if type(c).__name__ == name]
    return found


def _groups(module):
    optimizer = module.optimizer_factory(module.parameters())
    return optimizer, {g["weight_decay"] for g in optimizer.param_groups}


@pytest.mark.parametrize("name,eps,step", [("fast_at.yaml", 4, 5), ("fast_at_eps2.yaml", 2, 2.5)])
def test_imagenet_fast_at_is_the_official_recipe(tmp_path, name, eps, step):
    """locuslab/fast_adversarial ImageNet/configs_fast_{4,2}px_phase{1,2,3}.yml and main_fast.py: ResNet-50, FGSM-RS
    eps/step 4/5 or 2/2.5 (/255) with the attack in train mode, SGD 0.9 / 1e-4 without decay on BatchNorm, the three
    phases' crops and batches, and each phase's per-iteration np.interp learning rate."""
    pytest.importorskip("timm")
    import numpy as np

    cli = _instantiate(f"imagenet/{name}", tmp_path)
    module = cli.model
    assert type(module).__name__ == "FastAT" and module.attack_bn_mode == "train" and module.co_monitor is None
    assert (module.eps, module.step_size) == (pytest.approx(eps / 255), pytest.approx(step / 255))
    net = module.model
    assert net.name == "resnet50" and sum(p.numel() for p in net.parameters()) == 25_557_032
    assert net.model.layer1[0].bn3.weight.eq(1).all()  # torchvision's init, not timm's zeroed last BN
    assert net.normalize.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])
    assert net.normalize.std.flatten().tolist() == pytest.approx([0.229, 0.224, 0.225])
    optimizer, decays = _groups(module)
    assert isinstance(optimizer, torch.optim.SGD) and decays == {1e-4, 0.0}
    assert all(g["momentum"] == 0.9 and not g["nesterov"] for g in optimizer.param_groups)
    resize = _callback(cli, "ResolutionSchedule")
    assert [resize.at(e) for e in (0, 5, 6, 11, 12, 14)] == [(128, 512)] * 2 + [(224, 224)] * 2 + [(288, 128)] * 2
    assert cli.trainer.reload_dataloaders_every_n_epochs == 1 and cli.trainer.max_epochs == 15
    assert cli.trainer.precision == "bf16-mixed" and module.label_smoothing == 0.0
    lr = _callback(cli, "PiecewiseLinearLR")
    phases = [((0, 6), [0, 1, 6], [0, 0.4, 0.04]), ((6, 12), [6, 12], [0.04, 0.004]),
              ((12, 15), [12, 15], [0.004, 0.0004])]
    for (start, end), lr_epochs, lr_values in phases:  # each phase's own schedule, iteration i of n per epoch
        for n in (7, 1000):
            for epoch in range(start, end):
                for i in (0, n // 2, n - 1):
                    t = epoch + (i + 1) / n
                    assert lr.lr_at(t) == pytest.approx(np.interp([t], lr_epochs, lr_values)[0])


def _singh_common(cli, arch, params):
    module = cli.model
    assert type(module).__name__ == "PGDAT" and module.model.name == arch
    assert sum(p.numel() for p in module.model.parameters()) == params
    assert module.model.normalize.mean.eq(0).all() and module.model.normalize.std.eq(1).all()
    assert (module.eps, module.steps, module.step_size) == (pytest.approx(4 / 255), 2, pytest.approx(8 / 255))
    assert type(module.attack).__name__ == "APGDTrain" and module.attack.step_size == pytest.approx(8 / 255)
    assert module.attack_bn_mode == "eval" and module.label_smoothing == 0.1
    optimizer, decays = _groups(module)
    assert isinstance(optimizer, torch.optim.AdamW) and decays == {0.05, 0.0}
    assert all(g["betas"] == (0.9, 0.95) and g["lr"] == 1e-3 for g in optimizer.param_groups)
    exempt = {p for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert all((p in exempt) == (p.ndim <= 1 or n.endswith(".bias")) for n, p in module.model.named_parameters())
    ema = _callback(cli, "EMA")
    assert (ema.decay, ema.warmup) == (0.9999, False)
    assert _callback(cli, "TimmPretrainedWeights").pretrained_path.endswith(".safetensors")
    assert cli.trainer.max_epochs == 50 and cli.datamodule.hparams.batch_size == 80
    assert cli.datamodule.hparams.resolution == 224


@pytest.mark.parametrize("name,arch,params", [("finetune_convnext.yaml", "convnext_base", 88_591_464),
                                              ("finetune_vit.yaml", "vit_base_patch16_224", 86_567_656)])
def test_imagenet_finetune_recipes_are_singh_et_al(tmp_path, name, arch, params):
    """nmndeep/revisiting-at run_train.sh and main.py: no input normalisation, APGD-2 (first step 2 eps) at
    4/255 in eval mode, AdamW (0.9, 0.95) lr 1e-3 wd 0.05 without decay on biases and 1-D tensors, label smoothing
    0.1, EMA 0.9999, batch 80, resolution 224; 50 epochs (README's ConvNeXt-B / ViT-B rows)."""
    pytest.importorskip("timm")
    _singh_common(_instantiate(f"imagenet/{name}", tmp_path), arch, params)


def test_imagenet_light_recipe_is_debenedetti_et_al(tmp_path):
    """dedeswim/vits-robustness-torch configs/xcit-adv-training.yaml: XCiT-S12 (drop path 0.05), PGD-1 step 1.5 eps
    at 4/255 in train mode, eps linear from 0 over 10 epochs by epoch, AdamW 5e-4 / wd 0.5, label smoothing 0.1,
    10 warm-up epochs then cosine, 100 + 10 cool-down epochs, batch 512."""
    pytest.importorskip("timm")
    cli = _instantiate("imagenet/light_recipe_xcit.yaml", tmp_path)
    module = cli.model
    assert module.model.name == "xcit_small_12_p16_224" and module.model.model.blocks[0].drop_path1.drop_prob == 0.05
    assert (module.eps, module.steps, module.step_size) == (pytest.approx(4 / 255), 1, pytest.approx(6 / 255))
    assert module.attack_bn_mode == "train" and module.label_smoothing == 0.1
    assert module.model.normalize.mean.eq(0).all() and module.model.normalize.std.eq(1).all()  # no_normalize
    ramp = _callback(cli, "EpsilonSchedule")
    ramp.final = module.eps
    ramped = [ramp.value(e) for e in (0, 1, 5, 10, 50)]
    assert ramped == pytest.approx([e / 10 * 4 / 255 for e in (0, 1, 5)] + [4 / 255] * 2)
    assert not ramp.per_step
    optimizer, decays = _groups(module)
    assert isinstance(optimizer, torch.optim.AdamW) and decays == {0.5, 0.0}
    assert all(g["betas"] == (0.9, 0.999) and g["lr"] == 5e-4 for g in optimizer.param_groups)
    scheduler = module.lr_scheduler_factory(optimizer)
    scheduler.set_total_steps(cli.trainer.max_epochs)
    assert scheduler.warmup_steps == 10 and module.lr_scheduler_interval == "epoch"
    assert cli.trainer.max_epochs == 110 and cli.datamodule.hparams.batch_size == 512


def test_cifar10_robust_finetune_is_croce_hein(tmp_path):
    """fra31/robust-finetuning train.py / utils.py: SGD 0.9, lr 0.01, wd 5e-4 on all parameters, 'piecewise-ft'
    (lr, lr/10, lr/100 by thirds) over 3 epochs, batch 128, Linf 8/255, from a robust checkpoint."""
    cli = _instantiate("cifar10/robust_finetune.yaml", tmp_path)
    module = cli.model
    assert _callback(cli, "WeightsFromCheckpoint").checkpoint.endswith(".ckpt")
    assert module.eps == pytest.approx(8 / 255) and module.attack_bn_mode == "eval"
    optimizer, lrs = _lr_of_each_epoch(module, 3)
    assert {g["weight_decay"] for g in optimizer.param_groups} == {5e-4}
    assert optimizer.param_groups[0]["momentum"] == 0.9
    assert lrs == pytest.approx([0.01, 0.001, 0.0001])
    assert cli.trainer.max_epochs == 3 and cli.datamodule.hparams.batch_size == 128
