"""Probability-row targets (CutMix, per-sample label smoothing, generated data): the transforms, every loss and
training attack on rows, the checks, and each defense trained on CutMix batches."""

import pytest
import torch
import torch.nn.functional as F

from digits_bench import digits_for, quiet_trainer

from lit_robust import objectives as O
from lit_robust.attacks import PGD, TradesKLAttack, smoothmix_attack
from lit_robust.attacks import functional as AF
from lit_robust.checks import check_batch, check_inputs
from lit_robust.datamodules import DigitsDataModule
from lit_robust.datamodules.mixing import cutmix, smooth_labels
from lit_robust.defenses import CERTIFIED_DEFENSES, DEFENSES, CertifiedTraining
from lit_robust.models import CNN3, SmallCNN
from lit_robust.targets import class_labels, probability_rows

K = 10


@pytest.fixture
def model():
    torch.manual_seed(3)
    return SmallCNN(width=4)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(5)
    return torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, K, (16,), generator=g)


# --- the transforms -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("split", [1, 4])
def test_cutmix_box_area_partner_and_rows(split):
    """Each image i is the constant i: the pixels that are not i form one box of area 1 - lam, filled with the
    partner's value; the target row is lam * own + (1 - lam) * partner's, partners within the sub-batch."""
    b, h, w = 16, 12, 10
    x = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, h, w).clone()
    y = torch.arange(b) % K
    seen_lams = []
    for seed in range(40):
        torch.manual_seed(seed)
        mixed, rows = cutmix(x, y, num_classes=K, split=split)
        assert torch.allclose(rows.sum(1), torch.ones(b))
        box = (mixed[:, 0] != x[:, 0]).any(0)  # [h, w]: where any image shows another (fixed points do not)
        lam = 1 - box.float().mean()
        if box.any():  # the box is a rectangle
            rows_hit, cols_hit = box.any(1).nonzero()[:, 0], box.any(0).nonzero()[:, 0]
            assert box.sum() == len(rows_hit) * len(cols_hit)
            assert torch.equal(rows_hit, torch.arange(rows_hit[0], rows_hit[-1] + 1))
            assert torch.equal(cols_hit, torch.arange(cols_hit[0], cols_hit[-1] + 1))
        assert torch.equal(mixed[:, :, ~box], x[:, :, ~box])
        partner = mixed[:, 0][:, box][:, 0].long() if box.any() else torch.arange(b)
        assert torch.equal(mixed[:, :, box], partner.view(b, 1, 1).float().expand(b, 3, int(box.sum())))
        assert sorted(partner.tolist()) == list(range(b))  # a permutation ...
        assert torch.equal(partner % split, torch.arange(b) % split)  # ... within each sub-batch
        expected = lam * F.one_hot(y, K) + (1 - lam) * F.one_hot(y[partner], K)
        assert torch.allclose(rows, expected.float())
        seen_lams.append(float(lam))
    assert min(seen_lams) < 0.5 < max(seen_lams)


def test_cutmix_keeps_rows_and_refuses_bad_arguments():
    x, rows = torch.rand(6, 1, 8, 8), torch.softmax(torch.randn(6, K), 1)
    _, mixed = cutmix(x, rows)
    assert torch.allclose(mixed.sum(1), torch.ones(6))
    with pytest.raises(ValueError, match="split"):
        cutmix(x, rows, split=4)
    with pytest.raises(ValueError, match="num_classes"):
        cutmix(x, torch.arange(6))


def test_smooth_labels_per_sample():
    y = torch.tensor([0, 3, 9, 3])
    generated = torch.tensor([False, True, True, False])
    rows = smooth_labels(y, K, 0.1 * generated)
    assert torch.equal(rows[0], F.one_hot(y[0], K).float()) and torch.equal(rows[3], F.one_hot(y[3], K).float())
    assert torch.allclose(rows[1][3], torch.tensor(0.91)) and torch.allclose(rows[1].sum(), torch.tensor(1.0))
    assert torch.allclose(rows[2][:9], torch.full((9,), 0.01))
    assert torch.equal(class_labels(rows), y)


# --- losses and attacks on rows --------------------------------------------------------------------------

OBJECTIVES = {
    "pgd_at": lambda m, x, xa, y: O.pgd_at_loss(m, x, xa, y),
    "trades": lambda m, x, xa, y: O.trades_loss(m, x, xa, y, beta=6.0),
    "mart": lambda m, x, xa, y: O.mart_loss(m, x, xa, y, beta=6.0),
    "interpolated_at": lambda m, x, xa, y: O.interpolated_at_objective(
        m, x, xa, y, mix=lambda b, d: (torch.tensor(0.3), torch.arange(b).flip(0))).loss,
    "gaussian_augmentation": lambda m, x, xa, y: _seeded(lambda: O.gaussian_augmentation_objective(m, x, y, 0.25)),
    "smoothmix": lambda m, x, xa, y: O.smoothmix_objective(
        m, x, xa, y, torch.randn(2, *x.shape, generator=torch.Generator().manual_seed(1)) * 0.25,
        torch.linspace(0, 1, x.shape[0])).loss,
}


def _seeded(fn):
    torch.manual_seed(11)
    return fn().loss


@pytest.mark.parametrize("name", OBJECTIVES)
def test_losses_on_one_hot_rows_equal_class_indices(model, data, name):
    x, y = data
    x_adv = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    model.eval()  # deterministic BatchNorm for the comparison
    hard = OBJECTIVES[name](model, x, x_adv, y)
    soft = OBJECTIVES[name](model, x, x_adv, probability_rows(y, K))
    assert torch.allclose(hard, soft, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["pgd_at", "trades", "mart", "interpolated_at"])
def test_losses_average_over_the_target_row(model, data, name):
    """Every term is linear in the one-hot label: a row a*e_c1 + (1-a)*e_c2 gives a*L(c1) + (1-a)*L(c2)."""
    x, y1 = data
    y2 = (y1 + 3) % K
    x_adv = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    model.eval()
    a = 0.35
    rows = a * probability_rows(y1, K) + (1 - a) * probability_rows(y2, K)
    mixed = OBJECTIVES[name](model, x, x_adv, rows)
    expected = a * OBJECTIVES[name](model, x, x_adv, y1) + (1 - a) * OBJECTIVES[name](model, x, x_adv, y2)
    assert torch.allclose(mixed, expected, rtol=1e-5, atol=1e-6)


def test_mart_rows_take_the_second_class_when_the_target_is_the_top_one(model, data):
    """The soft path's max over the wrong classes, checked against the class-index loss on each class."""
    x, _ = data
    model.eval()
    top = model(x).argmax(1)
    x_adv = x.clone()
    assert torch.allclose(O.mart_loss(model, x, x_adv, probability_rows(top, K)), O.mart_loss(model, x, x_adv, top),
                          rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("attack", [lambda: PGD(0.1, 3, 0.03), lambda: PGD(0.1, 3, 0.03, restarts=2)])
def test_pgd_on_one_hot_rows_equals_class_indices(model, data, attack):
    x, y = data
    model.eval()
    torch.manual_seed(2)
    hard = attack().run(model, x, y)
    torch.manual_seed(2)
    soft = attack().run(model, x, probability_rows(y, K))
    assert torch.equal(hard.x_adv, soft.x_adv)
    assert torch.allclose(hard.loss, soft.loss, atol=1e-6)


def test_ce_attack_on_rows_ascends_the_kl_to_the_rows(model, data):
    """CE against a row is KL(row || q) plus the row's entropy: the same input gradient (DeepMind's
    untargeted_kl_divergence against the mixed labels)."""
    x, y = data
    rows = smooth_labels(y, K, 0.2)
    delta = torch.zeros_like(x)
    ce = AF.per_example_loss("ce")
    _, _, g_ce = AF.loss_and_input_grad(model, x, delta, rows, ce)
    _, _, g_kl = AF.loss_and_input_grad(model, x, delta, rows, AF.distribution_kl)
    assert torch.allclose(g_ce, g_kl, atol=1e-7)
    entropy = -(rows * rows.log()).sum(1)
    with torch.no_grad():
        logits = model(x)
    assert torch.allclose(ce(logits, rows), AF.distribution_kl(logits, rows) + entropy, atol=1e-6)


def test_smoothmix_attack_on_one_hot_rows_equals_class_indices(model, data):
    x, y = data
    noises = 0.25 * torch.randn(2, *x.shape, generator=torch.Generator().manual_seed(8))
    hard = smoothmix_attack(model, x, y, noises, steps=2, step_size=0.5)
    soft = smoothmix_attack(model, x, probability_rows(y, K), noises, steps=2, step_size=0.5)
    assert all(torch.allclose(h, s, atol=1e-6) for h, s in zip(hard, soft))


@pytest.mark.parametrize("loss", ["margin", "dlr"])
def test_class_based_attack_losses_refuse_rows(model, data, loss):
    x, y = data
    with pytest.raises(ValueError, match="margin and DLR losses needs class labels"):
        PGD(0.1, 2, loss=loss)(model, x, probability_rows(y, K))


def test_trades_attack_reference_targets(model, data):
    x, y = data
    rows = smooth_labels(y, K, 0.3)
    model.eval()
    attack = TradesKLAttack(0.1, 3, 0.03, reference="targets")
    result = attack.run(model, x, rows)
    with torch.no_grad():
        assert torch.allclose(result.loss, AF.distribution_kl(model(result.x_adv), rows), atol=1e-6)
    # class indices are one-hot rows: the KL is the cross-entropy, the same attack as PGD on CE
    torch.manual_seed(4)
    on_labels = TradesKLAttack(0.1, 3, 0.03, reference="targets", start_std=None)(model, x, y)
    torch.manual_seed(4)
    assert torch.allclose(on_labels, PGD(0.1, 3, 0.03)(model, x, y), atol=1e-6)
    with pytest.raises(ValueError, match="reference"):
        TradesKLAttack(0.1, reference="labels")


# --- checks ------------------------------------------------------------------------------------------------

def test_checks_accept_rows_and_name_what_is_wrong(model, data):
    x, y = data
    rows = smooth_labels(y, K, 0.1)
    check_batch(model, x, rows)
    with pytest.raises(ValueError, match="sum to 1"):
        check_inputs(x, rows * 1.1)
    with pytest.raises(ValueError, match=">= 0"):
        check_inputs(x, rows - 0.05)
    with pytest.raises(ValueError, match="finite"):
        check_inputs(x, torch.where(rows > 0.5, float("nan"), rows))
    with pytest.raises(ValueError, match="12 columns for a model with 10 outputs"):
        check_batch(model, x, torch.full((16, 12), 1 / 12))
    with pytest.raises(ValueError, match=r"\[B, num_classes\]"):
        check_inputs(x, y.float())


# --- every defense on CutMix batches -------------------------------------------------------------------------

def _defense(name, **kw):
    if name in DEFENSES:
        return DEFENSES[name](SmallCNN(width=4), eps=0.2, steps=2, step_size=0.1, val_attack_steps=1,
                              test_attack_steps=1, **kw)
    return CERTIFIED_DEFENSES[name](SmallCNN(width=4), sigma=0.25, **kw)


@pytest.mark.parametrize("name", list(DEFENSES) + ["GaussianAugmentation", "SmoothMix"])
def test_defenses_train_on_cutmix_rows(tmp_path, name):
    """The DataModule's CutMix reaches every training step as probability rows; each defense trains on them
    (finite loss, training accuracy against the heavier label) and validates on class labels."""
    module, seen = _defense(name), []
    original = module.training_step

    def recording_step(batch, batch_idx):
        seen.append(batch[1])
        return original(batch, batch_idx)

    module.training_step = recording_step
    trainer = quiet_trainer(tmp_path, fast_dev_run=2)
    dm = digits_for(name, batch_size=16, eval_batch_size=32, cutmix=True)
    trainer.fit(module, dm)
    assert seen and all(y.dim() == 2 and torch.allclose(y.sum(1), torch.ones(len(y))) for y in seen)
    assert any((y.max(1).values < 1).any() for y in seen)  # mixed, not one-hot
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert 0.0 <= trainer.validate(module, dm, verbose=False)[0]["val/clean_acc"] <= 1.0  # class labels there


@pytest.mark.parametrize("name", [n for n, c in CERTIFIED_DEFENSES.items() if issubclass(c, CertifiedTraining)])
def test_certified_training_refuses_rows(tmp_path, name):
    module = CERTIFIED_DEFENSES[name](CNN3(in_channels=1, input_size=8, mean=[0.5], std=[0.5]), eps=0.1)
    with pytest.raises(ValueError, match="needs class labels"):
        quiet_trainer(tmp_path, fast_dev_run=1).fit(module, DigitsDataModule(batch_size=16, cutmix=True))


def test_evaluation_refuses_rows(model, data):
    x, y = data
    module = _defense("TRADES", attack_reference="targets")
    module.eval()
    with pytest.raises(ValueError, match="evaluation"):
        module.validation_step((x, smooth_labels(y, K, 0.1)), 0)
