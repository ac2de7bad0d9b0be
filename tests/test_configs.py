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
