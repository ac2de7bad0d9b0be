"""PGDAT and the AdversarialModule plumbing inside a real Trainer (CPU, tiny model, digits)."""

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from digits_bench import quiet_trainer as _trainer

from lit_robust.defenses import PGDAT, TrainingOutput
from lit_robust.models import SmallCNN


def _pgdat(**kwargs):
    return PGDAT(SmallCNN(width=4), **{"eps": 0.2, "steps": 2, "step_size": 0.1, "val_attack_steps": 2,
                                       "test_attack_steps": 2, **kwargs})




def test_bf16_mixed_training_keeps_the_threat_model(tmp_path, digits):
    """Under autocast the attack's gradients come from bf16 activations; every input it feeds stays in the ball."""
    model, clean, fed = _pgdat(steps=3), [], []

    class RecordBatch(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            clean.append(batch[0].clone())

    model.model.register_forward_pre_hook(lambda m, args: fed.append((len(clean) - 1, args[0].detach().float())))
    _trainer(tmp_path, max_steps=3, limit_val_batches=0, precision="bf16-mixed", callbacks=[RecordBatch()]).fit(
        model, digits)
    assert len(fed) == 1 + 3 * 4  # the epoch's input check (one forward), then 3 attack steps + 1 outer forward per batch
    for step, x_in in fed:
        assert (x_in - clean[step]).abs().max() <= 0.2 + 1e-6 and x_in.min() >= 0 and x_in.max() <= 1
    assert any((x_in - clean[step]).abs().max() > 0.1 for step, x_in in fed)
    assert torch.isfinite(torch.cat([p.flatten() for p in model.parameters()])).all()


def test_logged_robust_accuracy_is_the_exact_dataset_accuracy(tmp_path, digits):
    """Epoch-level metric over uneven batches equals the per-example accuracy on the whole split."""
    model = _pgdat(val_attack_steps=3).eval()
    digits.eval_batch_size = 50  # 180 validation images: batches of 50, 50, 50, 30
    x, y = digits.splits["val"].tensors
    torch.manual_seed(11)
    expected = torch.cat([model.val_attack.run(model.model, xb, yb).predictions == yb
                          for xb, yb in zip(x.split(50), y.split(50))]).float().mean()
    torch.manual_seed(11)
    logged = _trainer(tmp_path).validate(model, digits, verbose=False)[0]["val/robust_acc"]
    assert logged == pytest.approx(expected.item(), abs=1e-6)
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    assert _trainer(tmp_path).validate(model, digits, verbose=False)[0]["val/clean_acc"] == pytest.approx(clean)


def test_training_attack_leaves_no_parameter_gradients(digits):
    model = _pgdat(steps=3)
    x, y = next(iter(digits.train_dataloader()))
    out = model.training_loss(x, y)
    assert all(p.grad is None for p in model.parameters())
    assert out.loss.requires_grad and out.adv_logits.shape == (len(y), 10)


def test_training_loss_is_ce_on_an_in_ball_adversarial_batch(digits):
    model = _pgdat(steps=3)
    x, y = next(iter(digits.train_dataloader()))
    seen = []
    model.model.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    out = model.training_loss(x, y)
    x_adv = seen[-1]  # the outer forward's input
    assert (x_adv - x).abs().max() <= 0.2 + 1e-6 and (x_adv - x).abs().max() > 0
    assert out.loss.item() == pytest.approx(F.cross_entropy(out.adv_logits, y).item(), rel=1e-6)


def test_label_smoothing_reaches_the_outer_loss(digits):
    model = _pgdat(label_smoothing=0.2)
    x, y = next(iter(digits.train_dataloader()))
    out = model.training_loss(x, y)
    expected = F.cross_entropy(out.adv_logits, y, label_smoothing=0.2)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert out.loss.item() != pytest.approx(F.cross_entropy(out.adv_logits, y).item(), rel=1e-3)


def test_checkpoint_round_trip(tmp_path, digits):
    model = _pgdat(restarts=2, eps=0.15)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = _trainer(tmp_path, max_steps=3, enable_checkpointing=True, callbacks=[ckpt],
                       limit_val_batches=1)
    trainer.fit(model, digits)
    restored = PGDAT.load_from_checkpoint(ckpt.last_model_path, model=SmallCNN(width=4))
    assert restored.hparams.restarts == 2 and restored.eps == pytest.approx(0.15)
    assert restored.attack.restarts == 2
    for key, value in model.state_dict().items():
        assert torch.equal(value, restored.state_dict()[key]), key
    # training resumes from the checkpoint (optimizer and loop state included)
    resumed = _trainer(tmp_path, max_steps=5, limit_val_batches=1)
    resumed.fit(_pgdat(restarts=2, eps=0.15), digits, ckpt_path=ckpt.last_model_path)
    assert resumed.global_step == 5


def test_default_schedule_is_rice_piecewise(tmp_path, digits):
    """lr 0.1, then x0.1 at 50% and x0.01 at 75% of the training steps (Rice et al.: 100/150 of 200 epochs)."""
    seen = []

    class RecordLR(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    _trainer(tmp_path, max_epochs=4, limit_train_batches=5, limit_val_batches=0, callbacks=[RecordLR()]).fit(
        _pgdat(steps=1), digits)
    assert seen == pytest.approx([0.1] * 10 + [0.01] * 5 + [0.001] * 5)


def test_default_optimizer_is_the_paper_sgd(tmp_path, digits):
    model = _pgdat()
    trainer = _trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(model, digits)
    group = trainer.optimizers[0].param_groups[0]
    assert isinstance(trainer.optimizers[0], torch.optim.SGD)
    assert (group["momentum"], group["weight_decay"], group["initial_lr"]) == (0.9, 5e-4, 0.1)


def test_custom_optimizer_and_scheduler_callables(tmp_path, digits):
    model = _pgdat(optimizer=lambda p: torch.optim.Adam(p, lr=1e-3),
                   lr_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
                   lr_scheduler_interval="step")
    trainer = _trainer(tmp_path, max_steps=3, limit_val_batches=0)
    trainer.fit(model, digits)
    assert isinstance(trainer.optimizers[0], torch.optim.Adam)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5**3)


def _shifted_loader(low, high):
    x = torch.rand(16, 1, 8, 8) * (high - low) + low
    return DataLoader(TensorDataset(x, torch.randint(0, 10, (16,))), batch_size=8)


@pytest.mark.parametrize("stage", ["fit", "validate", "test"])
def test_inputs_outside_unit_box_are_rejected(tmp_path, stage):
    model, loader = _pgdat(), _shifted_loader(-1.0, 1.0)
    trainer = _trainer(tmp_path, max_steps=1, **({"limit_val_batches": 0} if stage == "fit" else {}))
    run = {"fit": lambda: trainer.fit(model, loader), "validate": lambda: trainer.validate(model, loader),
           "test": lambda: trainer.test(model, loader)}[stage]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        run()


@pytest.mark.parametrize("kwargs,name", [
    ({"eps": 0.0}, "eps"), ({"eps": -0.1}, "eps"), ({"steps": 0}, "steps"), ({"step_size": 0.0}, "step_size"),
    ({"norm": "l1"}, "norm"), ({"attack_bn_mode": "frozen"}, "attack_bn_mode"), ({"restarts": 0}, "restarts"),
    ({"val_attack_steps": 0}, "val_attack_steps"), ({"test_attack_steps": 0}, "test_attack_steps"),
    ({"lr_scheduler_interval": "batch"}, "lr_scheduler_interval"), ({"label_smoothing": 1.0}, "label_smoothing"),
])
def test_invalid_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        _pgdat(**kwargs)


def test_attack_bn_mode_reaches_the_training_attack():
    assert _pgdat(attack_bn_mode="train").attack.bn_mode == "train"
    assert _pgdat().attack.bn_mode == "eval"
    assert _pgdat().val_attack.bn_mode == "eval" and _pgdat().test_attack.steps == 2


class _NanAfter(PGDAT):
    """PGDAT whose loss turns NaN from global step 3 on."""

    def training_loss(self, x, y):
        out = super().training_loss(x, y)
        return TrainingOutput(out.loss * (float("nan") if self.global_step >= 3 else 1.0), out.adv_logits)


@pytest.mark.parametrize("log_every", [1, 50])
def test_nonfinite_loss_stops_training_naming_the_first_step(tmp_path, digits, log_every):
    model = _NanAfter(SmallCNN(width=4), eps=0.2, steps=1, step_size=0.2)
    trainer = _trainer(tmp_path, max_epochs=3, limit_train_batches=6, limit_val_batches=0,
                       log_every_n_steps=log_every)
    with pytest.raises(FloatingPointError, match="global step 3"):
        trainer.fit(model, digits)
    # detected at once when checked every step, otherwise by the end of the epoch at the latest
    assert trainer.global_step <= (4 if log_every == 1 else 6)


def test_default_schedule_needs_a_finite_run(tmp_path, digits):
    """The default lr milestones are fractions of the run: an endless run is refused with a clear error."""
    module = PGDAT(SmallCNN(width=4), eps=0.2, steps=1)
    with pytest.raises(ValueError, match="finite training length"):
        _trainer(tmp_path, max_epochs=-1, max_steps=-1, limit_val_batches=0).fit(module, digits)
