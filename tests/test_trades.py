"""TRADES: the KL attack and the outer loss against their formulas, the official recipe, and the digits benchmark."""

import math

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from digits_bench import EPS, AttackSideEffects, digits_accuracy, fit_on_digits, sgd
from lightning.pytorch.callbacks import Callback
from torch import nn

from lit_robust.attacks import TradesKLAttack
from lit_robust.attacks import functional as AF
from lit_robust.datamodules import DigitsDataModule
from lit_robust.defenses.trades import TRADES
from lit_robust.models import SmallCNN

# --- helpers shared with test_mart.py ---------------------------------------------------------


class Logits(nn.Module):
    """A parameter-free "model" returning its input: the test picks the logits by hand."""

    def forward(self, x):
        return x.clone()


def softmax(z):
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


# clean and adversarial logits of three examples, and their labels
CLEAN = [[1.0, 0.2, -0.5], [0.3, 0.8, 0.1], [-1.0, 2.0, 0.5]]
ADV = [[0.4, 0.6, -0.2], [0.3, 0.1, 0.9], [0.5, 1.0, 1.5]]
LABELS = [0, 0, 1]


def hand_batch(requires_grad=False, labels=LABELS):
    clean, adv = (torch.tensor(z, dtype=torch.float64, requires_grad=requires_grad) for z in (CLEAN, ADV))
    return clean, adv, torch.tensor(labels)


def record_lr_fit(module, max_epochs, batches):
    """Fits ``module`` on digits for ``max_epochs * batches`` steps; returns the lr seen at each step and the trainer."""
    seen = []

    class RecordLR(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = quiet_trainer(max_epochs=max_epochs, limit_train_batches=batches, limit_val_batches=0,
                            callbacks=[RecordLR()])
    trainer.fit(module, small_digits())
    return seen, trainer


def quiet_trainer(**kwargs):
    return L.Trainer(**{"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
                        "enable_progress_bar": False, "enable_model_summary": False, **kwargs})


def small_digits():
    dm = DigitsDataModule(batch_size=16, eval_batch_size=64)
    dm.setup()
    return dm


def tiny_defense(cls, **kwargs):
    """``cls`` on a width-4 SmallCNN, eps 0.2, 2-step training and evaluation attacks."""
    return cls(SmallCNN(width=4), **{"eps": 0.2, "steps": 2, "step_size": 0.1, "val_attack_steps": 2,
                                     "test_attack_steps": 2, **kwargs})


def official_defaults(cls):
    """``cls`` with its defaults, checked against the official code's beta 6, eps 0.031, K 10, step 0.007."""
    module = cls(SmallCNN())
    assert (module.beta, module.eps, module.steps, module.step_size) == (6.0, 0.031, 10, 0.007)
    return module


def check_fit_logs_clean_and_adversarial_accuracy(module, tmp_path):
    trainer = quiet_trainer(fast_dev_run=2, default_root_dir=tmp_path)
    trainer.fit(module, small_digits())
    assert {"train/loss", "train/clean_acc", "train/adv_acc", "val/robust_acc"} <= set(trainer.callback_metrics)


def check_default_recipe(module, max_epochs, batches, expected_lrs, weight_decay):
    """The default optimizer is SGD(0.1, 0.9, weight_decay) and the lr per step follows ``expected_lrs``."""
    seen, trainer = record_lr_fit(module, max_epochs, batches)
    assert seen == pytest.approx(expected_lrs)
    group = trainer.optimizers[0].param_groups[0]
    assert isinstance(trainer.optimizers[0], torch.optim.SGD)
    assert (group["initial_lr"], group["momentum"], group["weight_decay"]) == (0.1, 0.9, weight_decay)


def check_perturb_contract(module, eps):
    """``perturb`` of a defense in train mode: in the ball and the box, no parameter gradients, flags and BN kept."""
    x, y = next(iter(small_digits().train_dataloader()))
    module.train()
    bn = module.model.features[1]
    stats = bn.running_mean.clone()
    x_adv = module.perturb(x, y)
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - x).abs().max() <= eps + 1e-6 and (x_adv - x).abs().max() > eps / 2
    assert all(p.grad is None for p in module.parameters())
    assert all(m.training for m in module.modules())
    assert torch.equal(bn.running_mean, stats)  # eval-mode attack: running statistics untouched


# --- the attack -------------------------------------------------------------------------------


def _official_reference(model, x, eps, step_size, steps):
    """The algorithm as the official code runs it: f(x) recomputed at every step, KL summed over the batch."""
    criterion = nn.KLDivLoss(reduction="sum")
    x_adv = x + 0.001 * torch.randn(x.shape)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = criterion(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x), dim=1))
        (grad,) = torch.autograd.grad(loss, [x_adv])
        x_adv = torch.min(torch.max(x_adv.detach() + step_size * grad.sign(), x - eps), x + eps).clamp(0, 1)
    return x_adv


def test_kl_loss_is_the_official_criterion_per_example():
    clean, adv = torch.randn(5, 7), torch.randn(5, 7)
    per_example = AF.kl_loss(adv, clean)
    official = nn.KLDivLoss(reduction="sum")(F.log_softmax(adv, dim=1), F.softmax(clean, dim=1))
    assert per_example.shape == (5,) and (per_example > 0).all()
    assert per_example.sum().item() == pytest.approx(official.item(), rel=1e-5)
    expected = [kl(softmax(c), softmax(a)) for c, a in zip(clean.tolist(), adv.tolist())]
    assert per_example.tolist() == pytest.approx(expected, rel=1e-5)
    assert torch.allclose(AF.kl_loss(clean, clean), torch.zeros(5), atol=1e-6)


def test_attack_matches_the_official_algorithm(tiny_cnn, batch):
    x, y = batch
    tiny_cnn.eval()
    torch.manual_seed(3)
    ours = TradesKLAttack(0.1, steps=5, step_size=0.02)(tiny_cnn, x, y)
    torch.manual_seed(3)
    reference = _official_reference(tiny_cnn, x, 0.1, 0.02, 5)
    assert torch.allclose(ours, reference, atol=1e-6)


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
def test_attack_increases_the_kl_inside_ball_and_box(tiny_cnn, batch, norm, eps):
    x, y = batch
    tiny_cnn.eval()
    attack = TradesKLAttack(eps, steps=5, step_size=eps / 4, norm=norm)
    torch.manual_seed(1)
    x_adv = attack(tiny_cnn, x, y)
    torch.manual_seed(1)
    start = x + AF.gaussian_start(x, 0.001)
    dist = (x_adv - x).flatten(1).abs().amax(1) if norm == "linf" else (x_adv - x).flatten(1).norm(dim=1)
    assert x_adv.min() >= 0 and x_adv.max() <= 1 and (dist <= eps * (1 + 1e-5)).all()
    with torch.no_grad():
        clean = tiny_cnn(x)
        kl_adv = AF.kl_loss(tiny_cnn(x_adv), clean)
        kl_start = AF.kl_loss(tiny_cnn(start), clean)
        kl_random = AF.kl_loss(tiny_cnn(x + AF.random_start(x, eps, norm)), clean)
    assert (kl_adv > kl_start).all()
    assert kl_adv.mean() > 3 * kl_random.mean()


def test_attack_runs_one_clean_forward_in_eval_mode_and_restores_flags(tiny_cnn, batch):
    x, y = batch
    probe, seen = AttackSideEffects(tiny_cnn), []
    tiny_cnn.features[1].register_forward_hook(lambda m, i, o: seen.append(m.training))
    TradesKLAttack(0.1, steps=4)(tiny_cnn, x, y)
    assert seen == [False] * 5  # the clean logits once, then one forward per step (the official: 2 per step)
    probe.assert_untouched()
    seen.clear()
    TradesKLAttack(0.1, steps=2, bn_mode="train")(tiny_cnn, x, y)
    assert seen == [True] * 3 and probe.flags_restored()


def test_run_reports_the_kl_and_ignores_labels(tiny_cnn, batch):
    x, y = batch
    tiny_cnn.eval()
    attack = TradesKLAttack(0.1, steps=3)
    torch.manual_seed(5)
    result = attack.run(tiny_cnn, x, y)
    torch.manual_seed(5)
    assert torch.equal(result.x_adv, attack(tiny_cnn, x, (y + 1) % 10))  # no labels in the objective
    with torch.no_grad():
        logits = tiny_cnn(result.x_adv)
        assert torch.allclose(result.logits, logits)
        assert torch.allclose(result.loss, AF.kl_loss(logits, tiny_cnn(x)))
    assert (result.steps == 3).all() and not result.x_adv.requires_grad


def test_attack_arguments():
    attack = TradesKLAttack(0.031, step_size=0.007)
    assert (attack.steps, attack.start_std, attack.bn_mode, attack.random_start) == (10, 0.001, "eval", True)
    for kwargs, name in [({"start_std": 0.0}, "start_std"), ({"steps": 0}, "steps"), ({"bn_mode": "x"}, "bn_mode")]:
        with pytest.raises(ValueError, match=name):
            TradesKLAttack(0.1, **kwargs)


# --- the outer loss -------------------------------------------------------------------------


def test_outer_loss_is_clean_ce_plus_beta_batchmean_kl():
    clean, adv, y = hand_batch()
    out = TRADES(Logits(), beta=6.0).outer_loss(clean, adv, y)
    ce = [-math.log(softmax(c)[t]) for c, t in zip(CLEAN, LABELS)]
    kls = [kl(softmax(c), softmax(a)) for c, a in zip(CLEAN, ADV)]
    assert out.loss.item() == pytest.approx(sum(ce) / 3 + 6.0 * sum(kls) / 3, rel=1e-6)
    assert torch.equal(out.clean_logits, clean) and torch.equal(out.adv_logits, adv)
    smoothed = TRADES(Logits(), beta=6.0, label_smoothing=0.3).outer_loss(clean, adv, y).loss
    assert smoothed.item() == pytest.approx(F.cross_entropy(clean, y, label_smoothing=0.3).item() + 6.0 * sum(kls) / 3)


def test_gradient_flows_through_the_clean_softmax():
    """d loss / d clean logits = (p - e_y)/B + beta/B * p * (log p/q - KL): the second term exists only undetached."""
    clean, adv, y = hand_batch(requires_grad=True)
    beta, n = 6.0, len(LABELS)
    g_clean, g_adv = torch.autograd.grad(TRADES(Logits(), beta=beta).outer_loss(clean, adv, y).loss, [clean, adv])
    ce_part, kl_part, adv_part = [], [], []
    for c, a, t in zip(CLEAN, ADV, LABELS):
        p, q = softmax(c), softmax(a)
        d = kl(p, q)
        ce_part.append([(pk - (k == t)) / n for k, pk in enumerate(p)])
        kl_part.append([beta / n * pk * (math.log(pk / qk) - d) for pk, qk in zip(p, q)])
        adv_part.append([beta / n * (qk - pk) for pk, qk in zip(p, q)])
    detached = torch.tensor(ce_part, dtype=torch.float64)
    assert torch.allclose(g_clean, detached + torch.tensor(kl_part, dtype=torch.float64), atol=1e-10)
    assert (g_clean - detached).abs().max() > 0.05
    assert torch.allclose(g_adv, torch.tensor(adv_part, dtype=torch.float64), atol=1e-10)


# --- the defense ----------------------------------------------------------------------------


def _trades(**kwargs):
    return tiny_defense(TRADES, **kwargs)


def test_official_defaults_and_shared_arguments():
    module = official_defaults(TRADES)
    assert isinstance(module.attack, TradesKLAttack) and module.attack.bn_mode == "eval"
    assert (module.attack.eps, module.attack.step_size, module.attack.start_std) == (0.031, 0.007, 0.001)
    module = _trades(beta=2.5, norm="l2", eps=0.5, attack_bn_mode="train", val_attack_steps=3, label_smoothing=0.1,
                     lr_scheduler_interval="step", test_autoattack=False)
    assert module.hparams.beta == 2.5 and module.beta == 2.5
    assert (module.attack.norm, module.attack.bn_mode, module.val_attack.steps) == ("l2", "train", 3)
    for kwargs, name in [({"beta": -1.0}, "beta"), ({"eps": 0.0}, "eps"), ({"attack_bn_mode": "x"}, "attack_bn_mode")]:
        with pytest.raises(ValueError, match=name):
            _trades(**kwargs)


def test_perturb_contract():
    check_perturb_contract(_trades(), 0.2)


def test_fit_logs_clean_and_adversarial_accuracy(tmp_path):
    check_fit_logs_clean_and_adversarial_accuracy(_trades(), tmp_path)


def test_default_optimizer_and_schedule_are_the_official_script():
    """SGD 0.1 / 0.9 / 2e-4; lr x0.1 from epoch 75 of 76, i.e. after 74/76 of the steps (76 here)."""
    check_default_recipe(_trades(steps=1), 4, 19, [0.1] * 74 + [0.01] * 2, weight_decay=2e-4)


def test_trades_beats_standard_training_under_pgd(standard_digits_accuracy):
    # 12 epochs: 0.94-0.96 clean, 0.62-0.64 PGD (1 or 2 threads); with 8 the clean accuracy
    # moved between 0.88 and 0.93 with the thread count alone, too close to the bar.
    module = fit_on_digits(TRADES(SmallCNN(width=16), eps=EPS, steps=5, step_size=0.08, optimizer=sgd()), epochs=12)
    acc = digits_accuracy(module.model)
    assert acc["clean"] > 0.85
    assert acc["pgd"] > standard_digits_accuracy["pgd"] + 0.3
