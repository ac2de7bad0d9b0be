"""Interpolated AT (Lamb et al. 2019): the mixup losses against their formula, the attack on the unmixed batch."""

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from digits_bench import EPS, digits_accuracy, fit_on_digits, sgd
from torch.distributions import Beta

from lit_robust.datamodules import DigitsDataModule
from lit_robust.defenses.interpolated_at import InterpolatedAT
from lit_robust.models import SmallCNN


@pytest.fixture
def batch():
    dm = DigitsDataModule(batch_size=32)
    dm.setup()
    return next(iter(dm.train_dataloader()))


def _iat(**kwargs):
    return InterpolatedAT(SmallCNN(width=4), **{"eps": 0.2, "steps": 3, "step_size": 0.1, **kwargs})


def _branch(model, x, y, lam, perm):
    """One mixup branch by its formula: its loss, and per example the logits and the heavier label."""
    logits = model(lam * x + (1 - lam) * x[perm])
    loss = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])
    heavier = y if lam >= 0.5 else y[perm]
    return loss, logits, heavier


@pytest.mark.parametrize("seed", [3, 4])
def test_outer_loss_equals_the_formula(batch, seed):
    x, y = batch
    module = _iat(alpha=0.4).eval()  # eval: the formula's forwards see the same BatchNorm as the module's
    x_adv = module.perturb(x, y)
    torch.manual_seed(seed)
    out = module.outer_loss(x, x_adv, y)

    torch.manual_seed(seed)  # the draws in their documented order: lam, pi (clean), lam', pi' (adversarial)
    draws = []
    for _ in range(2):
        lam = Beta(torch.tensor(0.4), torch.tensor(0.4)).sample()
        draws.append((lam, torch.randperm(len(y))))
    with torch.no_grad():
        clean_loss, clean_logits, clean_heavier = _branch(module.model, x, y, *draws[0])
        adv_loss, adv_logits, adv_heavier = _branch(module.model, x_adv, y, *draws[1])
    assert out.loss.item() == pytest.approx(((clean_loss + adv_loss) / 2).item(), rel=1e-5)
    # train/adv_acc and train/clean_acc: each mixed example judged by its heavier label
    assert torch.equal((out.adv_logits.argmax(1) == y).float().mean(),
                       (adv_logits.argmax(1) == adv_heavier).float().mean())
    assert torch.equal((out.clean_logits.argmax(1) == y).float().mean(),
                       (clean_logits.argmax(1) == clean_heavier).float().mean())
    assert sorted(out.adv_logits.sum(1).tolist()) == pytest.approx(sorted(adv_logits.sum(1).tolist()), abs=1e-5)
    # the mixing matters: neither branch is its unmixed loss, and a new seed gives a new loss
    with torch.no_grad():
        assert adv_loss.item() != pytest.approx(F.cross_entropy(module.model(x_adv), y).item(), rel=1e-3)
    torch.manual_seed(seed + 100)
    assert module.outer_loss(x, x_adv, y).loss.item() != pytest.approx(out.loss.item(), rel=1e-4)


def test_heavier_label_order_when_lam_below_half(batch, monkeypatch):
    """With lam = 0.2 the mixed example i is mostly x[pi_i]: its logits are reported on row pi_i."""
    x, y = batch
    module = _iat().eval()
    perm = torch.roll(torch.arange(len(y)), 1)
    monkeypatch.setattr(module, "sample_mix", lambda n, device: (torch.tensor(0.2), perm))
    out = module.outer_loss(x, x, y)
    with torch.no_grad():
        logits = module.model(0.2 * x + 0.8 * x[perm])
    assert torch.allclose(out.adv_logits[perm], logits, atol=1e-6)
    assert torch.allclose(out.clean_logits[perm], logits, atol=1e-6)


def test_the_attack_sees_the_unmixed_batch(batch):
    x, y = batch
    module = _iat(steps=4, alpha=50.0)  # lam close to 1/2: the mixed batches are far from the clean one
    fed = []
    module.model.register_forward_pre_hook(lambda m, args: fed.append(args[0].detach()))
    x_adv = module.perturb(x, y)
    assert len(fed) == 4
    for x_in in fed:  # every attack iterate is example-by-example within eps of the clean batch
        assert (x_in - x).abs().max() <= 0.2 + 1e-6
    assert (x_adv - x).abs().max() <= 0.2 + 1e-6 and (x_adv - x).abs().max() > 0.1
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert all(p.grad is None for p in module.parameters())
    # the outer loss then feeds two mixed batches, far outside the ball
    fed.clear()
    module.training_loss(x, y)
    assert len(fed) == 4 + 2
    assert all((x_in - x).abs().max() <= 0.2 + 1e-6 for x_in in fed[:4])
    assert all((x_in - x).abs().max() > 0.4 for x_in in fed[4:])


@pytest.mark.parametrize("alpha", [1.0, 0.2])
def test_lambda_is_beta_alpha_alpha(alpha):
    module = _iat(alpha=alpha)
    lams = torch.stack([module.sample_mix(8, torch.device("cpu"))[0] for _ in range(4000)])
    assert lams.min() >= 0 and lams.max() <= 1
    assert lams.mean().item() == pytest.approx(0.5, abs=0.02)
    assert lams.var().item() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.08)  # Var Beta(a, a)
    # alpha 0.2 piles up at the ends, alpha 1 is uniform
    ends = ((lams < 0.1) | (lams > 0.9)).float().mean().item()
    assert ends == pytest.approx(0.2 if alpha == 1.0 else 0.67, abs=0.04)
    perm = module.sample_mix(8, torch.device("cpu"))[1]
    assert sorted(perm.tolist()) == list(range(8))


def test_seeded_mixing_is_deterministic(batch):
    x, y = batch
    module = _iat().eval()
    losses = []
    for _ in range(2):
        L.seed_everything(7)
        losses.append(module.training_loss(x, y).loss.item())
    assert losses[0] == losses[1]


def test_defaults_follow_the_reference_code():
    module = InterpolatedAT(SmallCNN(width=4))
    assert module.alpha == 1.0 and module.eps == pytest.approx(8 / 255)
    assert module.attack.steps == 7 and module.attack.step_size == pytest.approx(2 / 255)
    assert module.attack.random_start and module.attack.bn_mode == "eval"
    assert _iat(attack_bn_mode="train").attack.bn_mode == "train"
    opt = module.default_optimizer(module.parameters())
    assert isinstance(opt, torch.optim.SGD)
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.1, 0.9, 2e-4)


@pytest.mark.parametrize("alpha", [0.0, -1.0])
def test_invalid_alpha_is_rejected(alpha):
    with pytest.raises(ValueError, match="alpha"):
        _iat(alpha=alpha)


def test_interpolated_at_beats_standard_training_under_pgd(standard_digits_accuracy):
    module = fit_on_digits(InterpolatedAT(SmallCNN(width=16), eps=EPS, steps=5, step_size=0.08, optimizer=sgd()))
    acc = digits_accuracy(module.model)
    assert acc["clean"] > 0.85
    assert acc["pgd"] > standard_digits_accuracy["pgd"] + 0.3
