"""Robust Mixup (IJSAT's interpolation half, Lau et al. 2023): mix, then attack the mixed images, train on rows."""

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from digits_bench import EPS, digits_accuracy, fit_on_digits, sgd

from lit_robust.defenses import DEFENSES, PGDAT
from lit_robust.defenses.robust_mixup import RobustMixup
from lit_robust.models import SmallCNN
from lit_robust.objectives import mixup_batch, robust_mixup_objective


@pytest.fixture
def batch(digits):
    """32 training digits (conftest's DataModule)."""
    return next(iter(digits.train_dataloader()))


def _rm(**kwargs):
    return RobustMixup(SmallCNN(width=4), **{"eps": 0.2, "steps": 3, "step_size": 0.1, **kwargs})


def _fixed_mix(module, monkeypatch, lam, perm):
    monkeypatch.setattr(module, "sample_mix", lambda n, device: (torch.tensor(lam), perm))


def test_registered_for_the_contract_tests():
    assert DEFENSES["RobustMixup"] is RobustMixup


def test_the_attack_starts_from_the_mixed_images_and_stays_in_their_ball(batch, monkeypatch):
    x, y = batch
    module = _rm(steps=4)
    perm = torch.roll(torch.arange(len(y)), 1)
    _fixed_mix(module, monkeypatch, 0.6, perm)
    x_mix = 0.6 * x + 0.4 * x[perm]
    fed = []
    module.model.register_forward_pre_hook(lambda m, args: fed.append(args[0].detach()))
    module.train()
    out = module.training_loss(x, y)
    assert len(fed) == 1 + 4 + 1  # num_classes read once (one image), 4 attack steps, the outer forward
    assert fed[0].shape[0] == 1
    for x_in in fed[1:]:  # every iterate and the trained batch: within eps of the mixed images, in [0, 1]
        assert (x_in - x_mix).abs().max() <= 0.2 + 1e-6 and x_in.min() >= 0 and x_in.max() <= 1
        assert (x_in - x).abs().max() > 0.4  # ... and far from the unmixed batch
    assert (fed[-1] - x_mix).abs().max() > 0.1  # the attack moved
    assert module.in_threat_model(x_mix, fed[-1]).all()
    assert torch.isfinite(out.loss) and out.clean_logits is None
    assert all(p.grad is None for p in module.parameters())
    assert all(m.training for m in module.modules())  # modes restored after the attack
    fed.clear()
    module.training_loss(x, y)
    assert len(fed) == 4 + 1  # num_classes was cached


def test_loss_is_ce_against_the_mixed_rows(batch, monkeypatch):
    x, y = batch
    module = _rm().eval()  # eval: the hand computation sees the same BatchNorm as the module
    lam, perm = 0.3, torch.randperm(len(y))
    _fixed_mix(module, monkeypatch, lam, perm)
    fed = []
    module.model.register_forward_pre_hook(lambda m, args: fed.append(args[0].detach()))
    torch.manual_seed(0)
    out = module.training_loss(x, y)
    x_adv = fed[-1]
    y_mix = lam * F.one_hot(y, 10).float() + (1 - lam) * F.one_hot(y[perm], 10).float()
    with torch.no_grad():
        logits = module.model(x_adv)
        by_hand = -(y_mix * logits.log_softmax(1)).sum(1).mean()
        split = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])
    assert out.loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(split.item(), rel=1e-5)
    # the objective's door: the same number from the mixed batch and the same attack
    x_mix, rows = mixup_batch(x, y, torch.tensor(lam), perm, 10)
    assert torch.allclose(rows, y_mix) and torch.allclose(rows.sum(1), torch.ones(len(y)))
    torch.manual_seed(0)
    again = module.attack(module.model, x_mix, rows)
    assert torch.equal(again, x_adv)
    door = robust_mixup_objective(module.model, x_mix, again, rows, torch.tensor(lam), perm)
    assert door.loss.item() == out.loss.item()
    # lam < 1/2: the mixed example i is mostly x[perm[i]], its logits are reported on row perm[i]
    assert torch.allclose(out.adv_logits[perm], logits, atol=1e-6)


def test_probability_row_targets_are_mixed_as_rows(batch, monkeypatch):
    x, y = batch
    module = _rm().eval()
    rows = 0.9 * F.one_hot(y, 10).float() + 0.01
    perm = torch.randperm(len(y))
    _fixed_mix(module, monkeypatch, 0.7, perm)
    fed = []
    module.model.register_forward_pre_hook(lambda m, args: fed.append(args[0].detach()))
    out = module.training_loss(x, rows)
    assert len(fed) == 3 + 1 and module.num_classes is None  # no class count needed for rows
    with torch.no_grad():
        expected = F.cross_entropy(module.model(fed[-1]), 0.7 * rows + 0.3 * rows[perm])
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_lam_one_is_pgd_at(batch, monkeypatch):
    x, y = batch
    L.seed_everything(1)
    rm = _rm(num_classes=10)
    at = PGDAT(SmallCNN(width=4), eps=0.2, steps=3, step_size=0.1)
    at.model.load_state_dict(rm.model.state_dict())
    _fixed_mix(rm, monkeypatch, 1.0, torch.randperm(len(y)))
    torch.manual_seed(5)
    out_rm = rm.training_loss(x, y)
    torch.manual_seed(5)
    out_at = at.training_loss(x, y)
    assert out_rm.loss.item() == pytest.approx(out_at.loss.item(), rel=1e-6)
    assert torch.allclose(out_rm.adv_logits, out_at.adv_logits, atol=1e-5)


def test_seeded_mixing_is_deterministic_and_varies_with_the_seed(batch):
    x, y = batch
    module = _rm().eval()
    losses = []
    for seed in (7, 7, 8):
        L.seed_everything(seed)
        losses.append(module.training_loss(x, y).loss.item())
    assert losses[0] == losses[1] != losses[2]


def test_defaults_and_invalid_arguments():
    module = RobustMixup(SmallCNN(width=4))
    assert module.alpha == 1.0 and module.eps == pytest.approx(8 / 255) and module.num_classes is None
    assert module.attack.steps == 10 and module.attack.step_size == pytest.approx(2 / 255)
    assert module.attack.random_start and module.attack.bn_mode == "eval"
    for bad in ({"alpha": 0.0}, {"alpha": -1.0}, {"num_classes": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            _rm(**bad)


def test_robust_mixup_beats_standard_training_under_pgd(standard_digits_accuracy):
    """alpha 0.2 (mixup's ImageNet value): with Beta(1, 1) the 8-epoch tiny CNN reaches 72% clean / 38% PGD on
    the 8x8 digits (0.2 eps is large there); with 0.2 89% / 51% (PGD-AT 94% / 55%, standard 99% / 0.3%)."""
    module = fit_on_digits(RobustMixup(SmallCNN(width=16), alpha=0.2, eps=EPS, steps=5, step_size=0.08,
                                       optimizer=sgd()))
    acc = digits_accuracy(module.model)
    assert acc["clean"] > 0.85
    assert acc["pgd"] > standard_digits_accuracy["pgd"] + 0.4
