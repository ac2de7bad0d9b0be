"""The options the generated-data / CutMix recipes need from the defenses: BatchNorm on batch statistics without
updates (attack and clean forward, DeepMind / DM-Improves-AT), and checkpoint selection by a margin-loss PGD."""

from pathlib import Path

import pytest
import torch

from digits_bench import AttackSideEffects

from lit_robust.attacks import PGD, AdamAscent
from lit_robust.callbacks import EMA
from lit_robust.cli import main
from lit_robust.attacks.pgd import module_mode
from lit_robust.defenses import TRADES
from lit_robust.models import SmallCNN
from lit_robust.objectives import trades_objective


@pytest.fixture
def net():
    torch.manual_seed(0)
    return SmallCNN(width=4)


def _bn_state(net):
    bn = net.features[1]
    return bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()


def test_batch_mode_uses_batch_statistics_and_updates_nothing(net):
    x = torch.rand(16, 1, 8, 8)
    net.train()
    before = _bn_state(net)
    with torch.no_grad():
        train_logits = net(x)  # batch statistics, running ones updated
    after_train = _bn_state(net)
    assert not torch.equal(before[0], after_train[0])
    with module_mode(net, "batch"), torch.no_grad():
        batch_logits = net(x)
    assert all(torch.equal(a, b) for a, b in zip(after_train, _bn_state(net)))  # nothing moved
    assert torch.allclose(batch_logits, train_logits)  # the same batch statistics
    with module_mode(net, "eval"), torch.no_grad():
        assert not torch.allclose(net(x), batch_logits)  # running statistics differ
    assert all(m.track_running_stats for m in net.modules() if hasattr(m, "track_running_stats"))


def test_batch_mode_attack_leaves_model_as_found(net):
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    probe = AttackSideEffects(net)
    PGD(0.1, 3, 0.03, bn_mode="batch")(net, x, y)
    probe.assert_untouched()


@pytest.mark.parametrize("update", [True, False])
def test_trades_clean_bn_update(net, update):
    """False: only the adversarial forward moves the running statistics (DeepMind); the loss is the same."""
    x = torch.rand(16, 1, 8, 8)
    x_adv, y = (x + 0.05).clamp(0, 1), torch.randint(0, 10, (16,))
    net.train()
    start = {k: v.clone() for k, v in net.state_dict().items()}
    loss = trades_objective(net, x, x_adv, y, 6.0, clean_bn_update=update).loss
    got = _bn_state(net)
    net.load_state_dict(start)
    with torch.no_grad():
        if update:
            net(x)
        net(x_adv)
    expected = _bn_state(net)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    net.load_state_dict(start)
    assert torch.allclose(loss, trades_objective(net, x, x_adv, y, 6.0, clean_bn_update=not update).loss)


def test_defense_options_reach_attack_and_loss(net):
    module = TRADES(net, attack_bn_mode="batch", clean_bn_update=False, attack_reference="targets",
                    val_attack_steps=40, val_attack_loss="margin", val_attack_step_size=2 / 255)
    assert module.attack.bn_mode == "batch" and module.attack.reference == "targets"
    assert (module.val_attack.loss, module.val_attack.steps, module.val_attack.step_size) == ("margin", 40, 2 / 255)
    assert module.hparams["clean_bn_update"] is False and module.hparams["attack_reference"] == "targets"
    with pytest.raises(ValueError, match="val_attack_loss"):
        TRADES(SmallCNN(width=4), val_attack_loss="dlr")
    with pytest.raises(ValueError, match="attack_bn_mode"):
        TRADES(SmallCNN(width=4), attack_bn_mode="frozen")


# --- the recipes' configs -------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def _recipe(name, tmp_path):
    return main(["--config", str(ROOT / "configs" / "cifar10" / name), f"--trainer.default_root_dir={tmp_path}"],
                run=False)


def _ema(cli):
    (ema,) = [c for c in cli.trainer.callbacks if isinstance(c, EMA)]
    return ema


@pytest.mark.parametrize("name", ["gowal2021_generated.yaml", "rebuffi2021_cutmix_wa.yaml"])
def test_deepmind_recipes(tmp_path, name):
    """jax/experiment.py get_config: batch 1024, 30% real, 4 emulated workers (77 unique real x 4 + 716 generated),
    label smoothing 0.1 on generated samples, TRADES beta 6 with batch-statistics BatchNorm and only the adversarial
    forward updating it, SGD Nesterov lr 0.4, 2.5% warm-up then cosine per step, EMA 0.995 from step 0."""
    cli = _recipe(name, tmp_path)
    module, data = cli.model, cli.datamodule
    assert type(module).__name__ == "TRADES" and module.beta == 6.0
    assert (module.attack_bn_mode, module.clean_bn_update) == ("batch", False)
    assert module.attack.reference == ("targets" if "cutmix" in name else "clean")
    assert module.attack.start_std is None and module.attack.ascent.milestones == (5,)  # Adam, uniform start
    assert (module.attack.ascent.lr, module.attack.ascent.gamma, module.attack.steps) == (0.1, 0.1, 10)
    assert data.cutmix is ("cutmix" in name) and data.real.cutmix is False
    assert (data.batch_size, data.real.val_size, data.emulated_workers, data.smoothing) == (1024, 1024, 4, 0.1)
    assert data.unique_real * data.repeats == 308 and data.batch_size - 308 == 716
    assert type(module.model).__name__ == "SwishWideResNet"
    optimizer = module.optimizer_factory(module.parameters())
    assert optimizer.param_groups[0]["nesterov"] and optimizer.param_groups[0]["lr"] == 0.4
    ema = _ema(cli)
    assert (ema.decay, ema.warmup, ema.start_step, ema.bn_buffers) == (0.995, True, 0, "live")
    scheduler = module.lr_scheduler_factory(optimizer)
    assert module.lr_scheduler_interval == "step" and scheduler.total_steps is None  # told by the module at fit
    assert (module.val_attack.steps, module.val_attack.loss) == (40, "margin")


def test_wang2023_recipe(tmp_path):
    """DM-Improves-AT's 1M command: batch 512, 154 real + 358 generated with replacement, 98 batches an epoch
    (50,000 samples), TRADES beta 5 + LS 0.1, BatchNorm frozen in the attack, lr 0.2 OneCycle per epoch,
    EMA 0.995 after 2.5% of the 39,200 steps (980: start_step 979)."""
    cli = _recipe("wang2023_edm_wrn28.yaml", tmp_path)
    module, data = cli.model, cli.datamodule
    assert (module.beta, module.label_smoothing, module.attack_bn_mode, module.clean_bn_update) == (
        5.0, 0.1, "batch", True)
    assert (data.batch_size, data.unique_real, data.replacement, data.smoothing) == (512, 154, True, 0.0)
    assert data.num_batches() == 98 and data.real.val_size == 1024
    optimizer = module.optimizer_factory(module.parameters())
    scheduler = module.lr_scheduler_factory(optimizer)
    scheduler.set_total_steps(cli.trainer.max_epochs)
    reference_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.2, momentum=0.9, nesterov=True)
    reference = torch.optim.lr_scheduler.OneCycleLR(reference_opt, max_lr=0.2, total_steps=400, pct_start=0.025)
    for _ in range(399):  # every epoch's lr and (cycled) momentum, as the official run steps them
        mine, theirs = optimizer.param_groups[0], reference_opt.param_groups[0]
        assert (mine["lr"], mine["momentum"]) == pytest.approx((theirs["lr"], theirs["momentum"]))
        for opt, sched in ((optimizer, scheduler), (reference_opt, reference)):
            opt.step()
            sched.step()
    ema = _ema(cli)
    assert ema.start_step + 1 == int(0.025 * 400 * 98) and ema.bn_buffers == "live"
    assert module.model.bn_first_batch


# --- DeepMind's Adam attack ----------------------------------------------------------------------------------

def test_adam_ascent_is_adam_on_the_input_then_projected(net):
    """The same iterates as torch.optim.Adam minimising -CE over delta (eps 1e-9, lr 0.1 then 0.01 from step 5),
    each step followed by the projection: optax's scale_by_adam, which DeepMind's attack uses, is this update."""
    net.eval()
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    eps = 0.1
    ours = PGD(eps, 10, random_start=False, ascent=AdamAscent(0.1, (5,), 0.1))(net, x, y)
    assert all(p.grad is None for p in net.parameters())  # input gradients only
    delta = torch.zeros_like(x, requires_grad=True)
    adam = torch.optim.Adam([delta], lr=0.1, betas=(0.9, 0.999), eps=1e-9)
    for step in range(10):
        adam.param_groups[0]["lr"] = 0.1 if step < 5 else 0.01
        adam.zero_grad()
        (-torch.nn.functional.cross_entropy(net(x + delta), y, reduction="sum")).backward()
        adam.step()
        with torch.no_grad():
            delta.copy_(((x + delta.clamp(-eps, eps)).clamp(0, 1)) - x)
    assert torch.allclose(ours, (x + delta).detach(), atol=1e-6)


def test_adam_ascent_schedule_and_arguments():
    rule = AdamAscent(0.1, (20, 30), 0.1)  # DeepMind's evaluation attack
    assert [rule.lr_at(s) for s in (0, 19, 20, 29, 30)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001])
    with pytest.raises(ValueError, match="betas"):
        AdamAscent(betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="lr, gamma and eps"):
        AdamAscent(lr=0)


def test_trades_with_deepmind_attack_trains_and_round_trips(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from digits_bench import quiet_trainer
    from lit_robust.datamodules import DigitsDataModule

    module = TRADES(SmallCNN(width=4), eps=0.2, steps=3, attack_start_std=None, attack_ascent=AdamAscent(0.1, (2,)),
                    attack_bn_mode="batch", clean_bn_update=False, val_attack_steps=1)
    assert module.attack.ascent is module.attack_ascent and module.attack.start_std is None
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    quiet_trainer(tmp_path, max_steps=2, limit_val_batches=1, enable_checkpointing=True, callbacks=[ckpt]).fit(
        module, DigitsDataModule(batch_size=16))
    restored = TRADES.load_from_checkpoint(ckpt.last_model_path, model=SmallCNN(width=4))
    assert restored.attack.ascent.milestones == (2,) and restored.attack.start_std is None
