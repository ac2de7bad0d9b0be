"""Union of threat models (MSD, max, avg over Linf / L2 / L1): the L1 projection against its definition, the
sparse L1 step, MSD's per-example choice, the max and avg definitions, the balls and side effects of every
attack, per-norm and union metrics, the recipe, and robustness on the digits.

Digits radii: Linf 0.2 (the suite's), L2 1.0, L1 2.0 on the 8x8 images (64 pixels, each a 4x4 block of the
original bitmap). An Linf perturbation of 0.2 reaches L2 1.6 and L1 12.8 at the cube's corners; L2 1.0 lets an
attacker change one pixel completely or four by half, L1 2.0 two pixels completely. Standard training is not
robust at either radius, and Linf PGD-AT only partly (the reference L1-APGD leaves it 17% at L1 2.0).
"""

import numpy as np
import pytest
import torch
from digits_bench import AttackSideEffects, digits, fit_on_digits, quiet_trainer, sgd
from torch import nn

from lit_robust.attacks import MSD, L1PGD, AttackResult, WorstOfAttacks, union_attacks, union_correct
from lit_robust.attacks import functional as AF
from lit_robust.attacks.pgd import Attack
from lit_robust.attacks.union import SparseL1Step, highest_loss, in_union
from lit_robust.datamodules import DigitsDataModule
from lit_robust.defenses import PGDAT, StandardTraining, UnionAT
from lit_robust.defenses.union import MSD_LR_KNOTS, avg_objective, l1_attack_batch, piecewise_linear
from lit_robust.models import SmallCNN

EPS, EPS_L2, EPS_L1 = 0.2, 1.0, 2.0  # the digits threat models (see the module docstring)
RADII = {"linf": EPS, "l2": EPS_L2, "l1": EPS_L1}


# --- the L1 projection -------------------------------------------------------------------------------------

def _bisection_projection(v: torch.Tensor, eps: float) -> torch.Tensor:
    """The definition, solved slowly: argmin ||p - v||_2 over ||p||_1 <= eps is v inside the ball, else the soft
    threshold sign(v) max(|v| - theta, 0) with theta >= 0 such that its L1 norm is eps (found by bisection)."""
    if v.abs().sum() <= eps:
        return v.clone()
    low, high = 0.0, v.abs().max().item()
    for _ in range(200):
        theta = (low + high) / 2
        low, high = (theta, high) if (v.abs() - theta).clamp_min(0).sum() > eps else (low, theta)
    return v.sign() * (v.abs() - (low + high) / 2).clamp_min(0)


def test_l1_projection_is_the_closest_point_of_the_ball():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(40, 1, 1, 6, generator=g, dtype=torch.float64) * torch.linspace(0.05, 2, 40)[:, None, None, None]
    v[0] = 0.0
    v[1] = torch.tensor([0.7, -0.7, 0.7, 0.1, 0.0, -0.7])  # ties at the top, a zero
    eps = 1.0
    p = AF.project_l1_ball(v, eps)
    assert p.dtype == v.dtype and p.shape == v.shape
    assert (p.flatten(1).abs().sum(1) <= eps + 1e-9).all()
    for i in range(len(v)):
        assert torch.allclose(p[i], _bisection_projection(v[i], eps), atol=1e-9), i
    inside = v.flatten(1).abs().sum(1) <= eps
    assert inside.any() and (~inside).any() and torch.equal(p[inside], v[inside])  # unchanged inside the ball
    # no point of the ball is closer: random points on its sphere and inside it
    z = AF.l1_random_start(torch.zeros(40, 1, 1, 6, dtype=torch.float64), eps, clip=False, generator=g)
    assert ((v - p).flatten(1).norm(dim=1) <= (v - z).flatten(1).norm(dim=1) + 1e-12).all()
    # a rescaling onto the sphere, the usual shortcut, is feasible but not the projection
    scaled = v[1] * eps / v[1].abs().sum()
    assert not torch.allclose(scaled, p[1], atol=1e-3)


def test_l1_projection_with_the_box_stays_in_both_sets():
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(16, 1, 8, 8, generator=g) > 0.5).float()  # saturated pixels, as on the digits
    delta = torch.randn(16, 1, 8, 8, generator=g)
    out = AF.project_l1(delta, x, EPS_L1)
    assert (out.flatten(1).abs().sum(1) <= EPS_L1 + 1e-5).all()
    assert (x + out).min() >= 0 and (x + out).max() <= 1


def test_l1_random_start_is_uniform_in_the_ball():
    """In d = 2 the L1 ball is a square rotated by 45 degrees: P(||z||_1 <= eps / 2) = 1/4, and on each L1 sphere
    the first coordinate's magnitude over the radius is uniform on [0, 1] (mean 1/2)."""
    g = torch.Generator().manual_seed(2)
    z = AF.l1_random_start(torch.zeros(20000, 1, 1, 2), 3.0, generator=g, clip=False).flatten(1)
    radius = z.abs().sum(1)
    assert radius.max() <= 3.0 + 1e-5
    assert (radius <= 1.5).float().mean().item() == pytest.approx(0.25, abs=0.015)
    assert (z[:, 0].abs() / radius).mean().item() == pytest.approx(0.5, abs=0.01)


# --- the sparse L1 step ------------------------------------------------------------------------------------

def test_l1_step_moves_the_top_k_coordinates_by_the_step_in_l1():
    grad = torch.tensor([[0.1, -0.9, 0.5, 0.0, -0.3, 0.8, 0.2, -0.05]]).view(1, 1, 1, 8)
    x, delta = torch.full_like(grad, 0.5), torch.zeros_like(grad)
    out = AF.l1_ascent_step(delta, grad, x, 0.6, k=3).flatten()
    assert torch.allclose(out, torch.tensor([0, -0.2, 0, 0, 0, 0.2, 0, 0]) + torch.tensor([0, 0, 0.2, 0, 0, 0, 0, 0]))
    assert out.abs().sum().item() == pytest.approx(0.6)
    # a coordinate the box stops is left out and the next one takes its place
    x_blocked = x.clone().view(-1)
    x_blocked[5] = 1.0  # at the top with a positive gradient
    out = AF.l1_ascent_step(delta, grad, x_blocked.view_as(x), 0.6, k=3).flatten()
    assert (out != 0).nonzero().flatten().tolist() == [1, 2, 4] and out[5] == 0
    assert out.abs().sum().item() == pytest.approx(0.6)
    # gap: within 0.1 of the top (0.95) counts as there; skip_saturated: a pixel at 0 with a positive gradient
    x_gap = x.clone().view(-1)
    x_gap[5], x_gap[2] = 0.95, 0.0
    out = AF.l1_ascent_step(delta, grad, x_gap.view_as(x), 0.6, k=3, gap=0.1).flatten()
    assert out[5] == 0 and out[2] > 0
    out = AF.l1_ascent_step(delta, grad, x_gap.view_as(x), 0.6, k=3, gap=0.1, skip_saturated=True).flatten()
    assert out[5] == 0 and out[2] == 0 and (out != 0).sum() == 3
    # ties at the k-th magnitude share the step
    tied = torch.tensor([1.0, -1.0, 1.0, 0.5]).view(1, 1, 1, 4)
    out = AF.l1_ascent_step(torch.zeros_like(tied), tied, torch.full_like(tied, 0.5), 0.3, k=2).flatten()
    assert torch.allclose(out, torch.tensor([0.1, -0.1, 0.1, 0.0]))


def test_l1_step_k_per_example_on_the_device_and_drawn_from_the_range():
    g = torch.Generator().manual_seed(3)
    grad = torch.randn(3, 1, 8, 8, generator=g)
    x, delta = torch.full_like(grad, 0.5), torch.zeros_like(grad)
    out = AF.l1_ascent_step(delta, grad, x, 1.0, k=torch.tensor([1, 5, 64]))
    assert (out != 0).flatten(1).sum(1).tolist() == [1, 5, 64]
    assert torch.allclose(out.flatten(1).abs().sum(1), torch.ones(3))
    step = SparseL1Step(k=(5, 20), gap=0.0)
    torch.manual_seed(0)
    counts = {int((step(delta[:1], grad[:1], x[:1], 1.0, 10.0) != 0).sum()) for _ in range(200)}
    assert counts == set(range(5, 21))  # every k of the inclusive range, and no other
    assert (SparseL1Step(k=7)(delta, grad, x, 1.0, 10.0) != 0).flatten(1).sum(1).tolist() == [7, 7, 7]


@pytest.mark.parametrize("n", [64, 784, 3072])
@pytest.mark.parametrize("percentile", [80.0, 95.0, 99.0])
def test_slide_k_counts_the_coordinates_at_or_above_numpys_percentile(n, percentile):
    values = np.random.default_rng(0).permutation(n).astype(float)
    expected = int((values >= np.percentile(values, percentile)).sum())
    assert AF.slide_k(n, percentile) == expected
    step = SparseL1Step(percentile=percentile, gap=0.0)
    grad = torch.tensor(values, dtype=torch.float32).view(1, 1, 1, n) + 1
    moved = step(torch.zeros_like(grad), grad, torch.full_like(grad, 0.5), 1.0, 10.0)
    assert int((moved != 0).sum()) == expected


# --- MSD, max and avg --------------------------------------------------------------------------------------

class _RowLinear(nn.Module):
    """Example i's logits are [0, w_i . (x_i - 0.5)]: with label 0 its CE is softplus(w_i . delta_i)."""

    def __init__(self, weights: torch.Tensor) -> None:
        super().__init__()
        self.weights = nn.Parameter(weights)

    def forward(self, x):
        f = ((x.flatten(1) - 0.5) * self.weights).sum(1)
        return torch.stack([torch.zeros_like(f), f], 1)


def test_msd_takes_per_example_the_step_with_the_highest_loss():
    """One step from the clean image, d = 16, Linf step 0.1, L2 step 0.3, L1 step 0.5 (k = 1): a dense gradient
    gains most from the Linf step (1.6 vs 1.2 vs 0.5), four equal coordinates from the L2 step (0.4, 0.6, 0.5),
    a single coordinate from the L1 step (0.1, 0.3, 0.5)."""
    w = torch.zeros(3, 16)
    w[0] = 1.0
    w[1, :4] = 1.0
    w[2, 7] = 1.0
    model = _RowLinear(w)
    x, y = torch.full((3, 1, 4, 4), 0.5), torch.zeros(3, dtype=torch.long)
    msd = MSD(eps=0.1, eps_l2=5.0, eps_l1=5.0, steps=1, step_size=0.1, step_size_l2=0.3, step_size_l1=0.5,
              l1_k=1, l1_gap=0.0)
    result = msd.run(model, x, y)
    delta = (result.x_adv - x).flatten(1)
    gains = (delta * w).sum(1)
    assert gains.tolist() == pytest.approx([1.6, 0.6, 0.5], abs=1e-5)
    assert torch.allclose(delta[0], torch.full((16,), 0.1))  # the Linf step
    assert delta[1].norm().item() == pytest.approx(0.3) and (delta[1, 4:] == 0).all()  # the L2 step
    assert delta[2, 7].item() == pytest.approx(0.5) and (delta[2].abs().sum() - 0.5).abs() < 1e-6  # the L1 step
    # the same choice from the candidates scored one by one
    with torch.enable_grad():
        _, _, grad = AF.loss_and_input_grad(model, x, torch.zeros_like(x), y, msd.loss_fn)
    losses = torch.stack([msd.loss_fn(model(x + msd.candidate(n, torch.zeros_like(x), grad, x)), y)
                          for n in msd.norms])
    assert losses.argmax(0).tolist() == [0, 1, 2]
    assert torch.allclose(result.loss, losses.max(0).values)
    assert all(p.grad is None for p in model.parameters())


def test_msd_returns_each_examples_best_iterate_and_stays_in_the_union(tiny_cnn, batch):
    x, y = batch
    msd = MSD(eps=EPS, eps_l2=EPS_L2, eps_l1=EPS_L1, steps=4, step_size=0.05, step_size_l2=0.25, step_size_l1=0.5)
    torch.manual_seed(0)
    one = MSD(eps=EPS, eps_l2=EPS_L2, eps_l1=EPS_L1, steps=1, step_size=0.05, step_size_l2=0.25,
              step_size_l1=0.5).run(tiny_cnn.eval(), x, y)
    torch.manual_seed(0)
    four = msd.run(tiny_cnn, x, y)
    assert (four.loss >= one.loss - 1e-6).all()  # the first iterate is among those the best is taken from
    with torch.no_grad():
        assert torch.allclose(four.loss, msd.loss_fn(tiny_cnn(four.x_adv), y), atol=1e-5)
    assert in_union(four.x_adv - x, RADII).all()


class _Fixed(Attack):
    """An attack that returns ``x + shift`` and the given per-example losses."""

    def __init__(self, shift: float, losses: list) -> None:
        self.shift, self.losses = shift, torch.tensor(losses)

    def run(self, model, x, y):
        return AttackResult(x + self.shift, torch.zeros(len(x), 3), self.losses, torch.ones(len(x), dtype=torch.long))


def test_max_keeps_per_example_the_highest_loss(batch):
    x, y = batch[0][:4], batch[1][:4]
    attacks = [_Fixed(0.0, [1.0, 5.0, 2.0, 3.0]), _Fixed(0.1, [4.0, 1.0, 2.0, 0.5]), _Fixed(0.2, [0.0, 6.0, 1.0, 0.5])]
    result = WorstOfAttacks(attacks).run(None, x, y)
    assert result.loss.tolist() == [4.0, 6.0, 2.0, 3.0]
    shift = (result.x_adv - x).flatten(1).mean(1)
    assert shift.tolist() == pytest.approx([0.1, 0.2, 0.0, 0.0])  # the first of equal losses (example 2)
    assert highest_loss([r.run(None, x, y) for r in attacks]).loss.tolist() == result.loss.tolist()


def test_avg_is_the_mean_loss_over_the_norms_in_one_forward(tiny_cnn, batch):
    x, y = batch
    x_advs = [x, (x + 0.1).clamp(0, 1), (x - 0.1).clamp(0, 1)]
    tiny_cnn.eval()
    out = avg_objective(tiny_cnn, x_advs, y)
    each = torch.stack([nn.functional.cross_entropy(tiny_cnn(a), y, reduction="none") for a in x_advs])
    assert out.loss.item() == pytest.approx(each.mean().item(), rel=1e-5)
    worst = each.argmax(0)
    expected = torch.stack([tiny_cnn(x_advs[int(j)][i:i + 1])[0] for i, j in enumerate(worst)])
    assert torch.allclose(out.adv_logits, expected, atol=1e-5)
    smoothed = avg_objective(tiny_cnn, x_advs, y, label_smoothing=0.1).loss
    assert smoothed.item() == pytest.approx(np.mean([nn.functional.cross_entropy(tiny_cnn(a), y, label_smoothing=0.1)
                                                     .item() for a in x_advs]), rel=1e-5)
    # the defense's avg step is this loss on one attack per norm
    module = UnionAT(tiny_cnn, mode="avg", eps=EPS, eps_l2=EPS_L2, eps_l1=EPS_L1, steps=2, step_size=0.1)
    torch.manual_seed(0)
    loss = module.training_loss(x, y).loss
    torch.manual_seed(0)
    expected = avg_objective(tiny_cnn, [a(tiny_cnn, x, y) for a in module.attacks.values()], y).loss
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("name", ["L1PGD", "MSD", "MSD-random", "max", "avg-attacks"])
def test_attacks_stay_in_their_balls_and_the_box_and_leave_no_trace(tiny_cnn, batch, name):
    x, y = batch
    torch.manual_seed(0)
    attacks = union_attacks(EPS, EPS_L2, EPS_L1, steps=3)
    attack = {"L1PGD": L1PGD(EPS_L1, steps=3, restarts=2),
              "MSD": MSD(EPS, EPS_L2, EPS_L1, steps=3, step_size=0.1, step_size_l2=0.5, step_size_l1=1.0),
              "MSD-random": MSD(EPS, EPS_L2, EPS_L1, steps=2, random_start=True, restarts=2),
              "max": WorstOfAttacks(attacks), "avg-attacks": attacks["l2"]}[name]
    radii = {"L1PGD": {"l1": EPS_L1}, "avg-attacks": {"l2": EPS_L2}}.get(name, RADII)
    side = AttackSideEffects(tiny_cnn)
    result = attack.run(tiny_cnn, x, y)
    side.assert_untouched()
    assert result.x_adv.shape == x.shape and not result.x_adv.requires_grad
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    assert in_union(result.x_adv - x, radii).all()
    assert (attack(tiny_cnn, x, y) - x).abs().max() > 0
    side.assert_untouched()


def test_in_union_and_the_defenses_threat_model():
    delta = torch.zeros(4, 1, 8, 8)
    delta[0, 0, 0, 0] = 1.0  # L1 = L2 = Linf = 1: only in the L2 ball of 1.0 and the L1 ball of 2.0
    delta[1] = 0.2  # Linf 0.2, L2 1.6, L1 12.8: only in the Linf ball
    delta[2, 0, 0, :3] = 0.6  # Linf 0.6, L2 1.04, L1 1.8: only in the L1 ball
    delta[3, 0, 0, :3] = 0.7  # Linf 0.7, L2 1.21, L1 2.1: in none
    assert in_union(delta, RADII).tolist() == [True, True, True, False]
    assert in_union(delta, {"linf": EPS}).tolist() == [False, True, False, False]
    module = UnionAT(SmallCNN(width=4), eps=EPS, eps_l2=0.5, train_eps_l2=EPS_L2, eps_l1=EPS_L1)
    x = torch.zeros(4, 1, 8, 8)
    assert module.in_threat_model(x, x + delta).tolist() == [True, True, True, False]  # the training radii
    assert module.in_threat_model(x + 0.5, x + 0.5 + delta).tolist() == [False, True, False, False]  # above 1


@pytest.mark.parametrize("mode", ["msd", "max", "avg"])
def test_the_defenses_adversarial_batch_is_in_the_union_and_leaves_no_trace(digits_data, mode):
    module = UnionAT(SmallCNN(width=4), mode=mode, eps=EPS, eps_l2=EPS_L2, eps_l1=EPS_L1, steps=3, step_size=0.1,
                     step_size_l2=0.5, step_size_l1=1.0)
    digits_data.setup()
    x, y = next(iter(digits_data.train_dataloader()))
    module.train()
    x_adv = module.perturb(x, y)
    assert x_adv.shape == x.shape and not x_adv.requires_grad and module.in_threat_model(x, x_adv).all()
    assert all(p.grad is None for p in module.parameters()) and all(m.training for m in module.modules())


def test_msd_eps_schedules_scale_every_radius_and_step():
    msd = MSD(eps=0.2, eps_l2=1.0, eps_l1=2.0, step_size=0.05, step_size_l2=0.25, step_size_l1=0.5)
    msd.set_eps(0.0)
    msd.set_eps(0.1)
    assert (msd.eps, msd.eps_l2, msd.eps_l1) == pytest.approx((0.1, 0.5, 1.0))
    assert (msd.step_size, msd.step_size_l2, msd.step_size_l1) == pytest.approx((0.025, 0.125, 0.25))
    with pytest.raises(ValueError, match="FOSC"):
        msd.set_fosc_threshold(0.1)


def test_arguments_are_checked(digits_data):
    with pytest.raises(ValueError, match="mode"):
        UnionAT(SmallCNN(width=4), mode="sum")
    with pytest.raises(ValueError, match="norms"):
        UnionAT(SmallCNN(width=4), norms=("linf", "l0"))
    with pytest.raises(ValueError, match="norm must stay 'linf'"):
        UnionAT(SmallCNN(width=4), norm="l2")
    with pytest.raises(ValueError, match="l1 k"):
        L1PGD(1.0, k=(20, 5))
    with pytest.raises(ValueError, match="eps_l1"):
        MSD(eps_l1=0.0)
    with pytest.raises(TypeError, match="mode='msd'"):
        UnionAT(SmallCNN(width=4), mode="max").scheduled_attack()
    module = UnionAT(SmallCNN(width=4), eps=EPS, eps_l1=64.0, steps=1)
    with pytest.raises(ValueError, match="eps_l1=64 covers the whole"):
        quiet_trainer(None, fast_dev_run=1).fit(module, digits_data)


@pytest.fixture
def digits_data():
    return DigitsDataModule(batch_size=16, eval_batch_size=32)


# --- the defense: metrics, the L1 tiers, the recipe -----------------------------------------------------------

@pytest.mark.parametrize("mode", ["msd", "max", "avg"])
def test_each_mode_trains_and_reports_every_norm_and_the_union(tmp_path, digits_data, mode):
    module = UnionAT(SmallCNN(width=4), mode=mode, eps=EPS, eps_l2=EPS_L2, eps_l1=EPS_L1, steps=2, step_size=0.1,
                     step_size_l2=0.5, step_size_l1=1.0, val_attack_steps=2, test_attack_steps=2)
    trainer = quiet_trainer(tmp_path, fast_dev_run=2)
    trainer.fit(module, digits_data)
    assert torch.isfinite(trainer.callback_metrics["train/loss"]) and "train/adv_acc" in trainer.callback_metrics
    val = trainer.validate(module, digits_data, verbose=False)[0]
    test = trainer.test(module, digits_data, verbose=False)[0]
    for stage, metrics in (("val", val), ("test", test)):
        per_norm = [metrics[f"{stage}/robust_acc_{n}"] for n in ("linf", "l2", "l1")]
        assert metrics[f"{stage}/robust_acc"] <= min(per_norm) <= max(per_norm) <= metrics[f"{stage}/clean_acc"]


def test_the_union_is_the_per_example_worst_case(tiny_cnn, batch):
    x, y = batch
    tiny_cnn.eval()
    attacks = union_attacks(EPS, EPS_L2, EPS_L1, steps=2)
    torch.manual_seed(0)
    found = union_correct(tiny_cnn, x, y, attacks)
    assert torch.equal(found["union"], found["clean"] & found["linf"] & found["l2"] & found["l1"])
    torch.manual_seed(0)
    with torch.no_grad():
        clean = tiny_cnn(x).argmax(1) == y
    assert torch.equal(found["clean"], clean)
    assert torch.equal(found["linf"], clean & (attacks["linf"].run(tiny_cnn, x, y).predictions == y))


def test_l1_tiers_run_the_reference_l1_apgd(tiny_cnn, batch):
    x, y = batch[0][:6], batch[1][:6]
    tiny_cnn.eval()
    found = l1_attack_batch(tiny_cnn, x, y, EPS_L1, ("pgd", "apgd"), pgd_steps=3)
    assert set(found) == {"clean", "pgd", "apgd-ce", "apgd-t", "worst_case"}
    assert torch.equal(found["worst_case"], found["clean"] & found["pgd"] & found["apgd-ce"] & found["apgd-t"])
    assert all(not (mask & ~found["clean"]).any() for mask in found.values())
    assert all(p.grad is None and p.requires_grad for p in tiny_cnn.parameters())


def test_default_schedule_is_the_official_piecewise_linear_one():
    assert [piecewise_linear(t, MSD_LR_KNOTS) for t in (0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0, 1.2)] == pytest.approx(
        [0.0, 0.5, 1.0, 0.525, 0.05, 0.025, 0.0, 0.0])


def test_msd_config_is_the_official_cifar10_recipe(tmp_path):
    from pathlib import Path

    from lit_robust.cli import main

    config = Path(__file__).resolve().parents[1] / "configs" / "cifar10" / "msd.yaml"
    module = main(["--config", str(config), f"--trainer.default_root_dir={tmp_path}"], run=False).model
    assert isinstance(module, UnionAT) and module.mode == "msd" and isinstance(module.attack, MSD)
    assert module.radii == pytest.approx({"linf": 0.03, "l2": 0.5, "l1": 12.0})
    msd = module.attack
    assert (msd.eps, msd.eps_l2, msd.eps_l1, msd.steps) == (pytest.approx(0.03), 0.3, 12.0, 50)  # trained at L2 0.3
    assert (msd.step_size, msd.step_size_l2, msd.step_size_l1) == pytest.approx((0.003, 0.05, 1.0))
    assert msd.l1_step.k == (5, 20) and not msd.random_start and msd.restarts == 1
    assert module.model.normalize.mean.eq(0).all() and module.model.normalize.std.eq(1).all()


# --- the digits ----------------------------------------------------------------------------------------------

def _union_accuracy(model) -> dict:
    """Clean, per-norm and union accuracy on the 359 test digits: PGD-20 with 2 restarts from random starts per
    norm (L1: the sparse L1 PGD), the same evaluation for every model."""
    x, y = digits().splits["test"].tensors
    torch.manual_seed(0)
    found = union_correct(model.eval(), x, y, union_attacks(EPS, EPS_L2, EPS_L1, steps=20, restarts=2))
    return {key: mask.float().mean().item() for key, mask in found.items()}


def test_union_training_is_robust_to_the_union_where_standard_and_linf_training_are_not():
    """Measured (8 epochs, SmallCNN(width=16), MSD with 5 steps of 0.08 / 0.4 / 0.8): clean / Linf / L2 / L1 /
    union: standard 0.99 / 0.00 / 0.00 / 0.38 / 0.00; Linf PGD-AT 0.94 / 0.55 / 0.25 / 0.64 / 0.24;
    MSD 0.89 / 0.47 / 0.38 / 0.69 / 0.38 (the reference L1-APGD: standard 0.11, PGD-AT 0.17, MSD 0.47)."""
    union = fit_on_digits(UnionAT(SmallCNN(width=16), eps=EPS, eps_l2=EPS_L2, eps_l1=EPS_L1, steps=5, step_size=0.08,
                                  step_size_l2=0.4, step_size_l1=0.8, optimizer=sgd()))
    standard = fit_on_digits(StandardTraining(SmallCNN(width=16), eps=EPS, optimizer=sgd()))
    linf = fit_on_digits(PGDAT(SmallCNN(width=16), eps=EPS, steps=5, step_size=0.08, optimizer=sgd()))
    ours, base, pgd_at = (_union_accuracy(m.model) for m in (union, standard, linf))
    assert ours["clean"] > 0.8
    assert base["union"] < 0.05 and ours["union"] > base["union"] + 0.25
    # Linf PGD-AT buys Linf robustness, but less of the L2 ball and of the union
    assert pgd_at["linf"] > ours["linf"] and ours["l2"] > pgd_at["l2"] + 0.05 and ours["union"] > pgd_at["union"] + 0.05
