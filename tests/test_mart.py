"""MART: the outer loss against its formula (boosted CE, most likely wrong class, weighted KL), the recipe, digits."""

import math

import pytest
import torch
from digits_bench import EPS, digits_accuracy, fit_on_digits, sgd
from test_trades import ADV, CLEAN, Logits, check_default_recipe, check_fit_logs_clean_and_adversarial_accuracy, \
    check_perturb_contract, hand_batch, kl, official_defaults, small_digits, softmax, tiny_defense

from lit_robust.attacks import PGD
from lit_robust.attacks import functional as AF
from lit_robust.defenses.mart import MART
from lit_robust.models import SmallCNN

# Labels for the hand-made logits of test_trades, and the most likely wrong class under the
# adversarial softmax, read off by hand: example 0 is classified correctly (y' is the runner-up),
# examples 1 and 2 are not (y' = 2 is the top class for example 1; for example 2 the top class is
# the label, so y' is the runner-up, class 1).
LABELS = [1, 0, 2]
WRONG = [0, 2, 1]


def _reference(clean, adv, y, beta, detach_clean=False):
    """``mart_loss`` of the official code, written out: nothing detached unless asked."""
    p, q = clean.softmax(1), adv.softmax(1)
    if detach_clean:
        p = p.detach()
    wrong = torch.tensor(WRONG)
    bce = -q.gather(1, y[:, None]).log() - torch.log(1.0001 - q.gather(1, wrong[:, None]) + 1e-12)
    kls = (p * (p.log() - torch.log(q + 1e-12))).sum(1)
    return bce.mean() + beta * (kls * (1.0000001 - p.gather(1, y[:, None]).squeeze(1))).mean()


def test_outer_loss_matches_the_formula_by_hand():
    clean, adv, y = hand_batch(labels=LABELS)
    out = MART(Logits(), beta=6.0).outer_loss(clean, adv, y)
    expected = 0.0
    for c, a, t, w in zip(CLEAN, ADV, LABELS, WRONG):
        p, q = softmax(c), softmax(a)
        assert max((q[k], k) for k in range(3) if k != t)[1] == w  # the hand-read wrong class
        bce = -math.log(q[t]) - math.log(1.0001 - q[w] + 1e-12)
        expected += (bce + 6.0 * kl(p, q) * (1.0000001 - p[t])) / 3
    assert out.loss.item() == pytest.approx(expected, rel=1e-9)
    assert torch.equal(out.clean_logits, clean) and torch.equal(out.adv_logits, adv)


def test_gradient_flows_through_the_clean_softmax_and_the_weight():
    clean, adv, y = hand_batch(requires_grad=True, labels=LABELS)
    g_clean, g_adv = torch.autograd.grad(MART(Logits(), beta=5.0).outer_loss(clean, adv, y).loss, [clean, adv])
    r_clean, r_adv = torch.autograd.grad(_reference(clean, adv, y, 5.0), [clean, adv])
    assert torch.allclose(g_clean, r_clean, atol=1e-9) and torch.allclose(g_adv, r_adv, atol=1e-9)
    # detaching the clean distribution would leave no gradient on the clean logits at all
    detached = _reference(clean, adv, y, 5.0, detach_clean=True)
    assert torch.autograd.grad(detached, [clean], allow_unused=True)[0] is None
    assert g_clean.abs().max() > 0.01
    # the weight 1 - p_clean[y] is differentiated: dropping its gradient changes the clean gradient
    p = clean.softmax(1)
    kls = AF.kl_loss(adv, clean)
    frozen_weight = (5.0 * kls * (1.0000001 - p.gather(1, y[:, None]).squeeze(1).detach())).mean()
    (g_frozen,) = torch.autograd.grad(frozen_weight, [clean])
    assert (g_clean - g_frozen).abs().max() > 1e-3


def test_label_smoothing_reaches_the_ce_term():
    clean, adv, y = hand_batch(labels=LABELS)
    plain = MART(Logits()).outer_loss(clean, adv, y).loss
    smoothed = MART(Logits(), label_smoothing=0.2).outer_loss(clean, adv, y).loss
    ce = torch.nn.functional.cross_entropy
    assert (smoothed - plain).item() == pytest.approx((ce(adv, y, label_smoothing=0.2) - ce(adv, y)).item())


def _mart(**kwargs):
    return tiny_defense(MART, **kwargs)


def test_official_defaults_and_shared_arguments():
    attack = official_defaults(MART).attack
    assert isinstance(attack, PGD) and (attack.loss, attack.bn_mode, attack.start_std) == ("ce", "eval", 0.001)
    assert (attack.eps, attack.step_size, attack.random_start, attack.restarts) == (0.031, 0.007, True, 1)
    module = _mart(beta=5.0, attack_bn_mode="train", norm="l2", eps=0.5, test_attack_steps=3)
    assert module.hparams.beta == 5.0 and (module.attack.bn_mode, module.attack.norm) == ("train", "l2")
    assert module.test_attack.steps == 3
    with pytest.raises(ValueError, match="beta"):
        _mart(beta=float("nan"))


def test_perturb_starts_from_unprojected_gaussian_noise_and_keeps_the_contract():
    module = _mart()
    x, y = next(iter(small_digits().train_dataloader()))
    seen = []
    handle = module.model.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    torch.manual_seed(2)
    module.perturb(x, y)
    handle.remove()
    torch.manual_seed(2)
    assert torch.equal(seen[0], x + AF.gaussian_start(x, 0.001))
    assert len(seen) == 2 and seen[0].min() < 0  # digits have zero pixels: the start leaves the box
    check_perturb_contract(_mart(), 0.2)


def test_fit_logs_clean_and_adversarial_accuracy(tmp_path):
    check_fit_logs_clean_and_adversarial_accuracy(_mart(), tmp_path)


def test_default_optimizer_and_schedule_are_the_official_wrn_script():
    """SGD 0.1 / 0.9 / 7e-4; x0.1 from epoch 75 and x0.01 from epoch 90 of 90 (74/90 and 89/90 of the steps; 90 here)."""
    check_default_recipe(_mart(steps=1), 5, 18, [0.1] * 74 + [0.01] * 15 + [0.001], weight_decay=7e-4)


def test_mart_beats_standard_training_under_pgd(standard_digits_accuracy):
    # MART has no clean term (clean accuracy comes through the weighted KL only); on digits it
    # needs 16 epochs to clear 0.85 clean (8 epochs: 0.82 clean, 0.53 PGD).
    module = fit_on_digits(MART(SmallCNN(width=16), eps=EPS, steps=5, step_size=0.08, optimizer=sgd()), epochs=16)
    acc = digits_accuracy(module.model)
    assert acc["clean"] > 0.85
    assert acc["pgd"] > standard_digits_accuracy["pgd"] + 0.3
