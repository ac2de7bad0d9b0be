"""Feature Purification's theory task: the sparse-coding DataModule, the symmetric-ReLU network, the purity metric,
FGM as the library's one-step L2 attack, and the paper's four claims on a small seeded instance through Lightning."""

import importlib.util
import logging
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lit_robust.attacks import FGSM
from lit_robust.attacks.functional import project
from lit_robust.checks import check_batch
from lit_robust.datamodules import SparseCodingDataModule
from lit_robust.models import LinearNet, SymmetricReLUNet, purity
from lit_robust.models.symmetric_relu import smoothed_relu

_spec = importlib.util.spec_from_file_location(
    "feature_purification_theory", Path(__file__).parents[1] / "scripts" / "feature_purification_theory.py")
theory = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = theory  # its dataclass looks its module up there
_spec.loader.exec_module(theory)


def small_data(**kwargs) -> SparseCodingDataModule:
    dm = SparseCodingDataModule(**{"dim": 20, "k": 3.0, "n_train": 300, "n_val": 50, "n_test": 200, **kwargs})
    dm.setup()
    return dm


# --- the data --------------------------------------------------------------------------------


def test_data_follow_the_sparse_coding_model():
    dm = small_data(noise=0.0)
    M, w = dm.dictionary, dm.w_star
    assert torch.allclose(M.T @ M, torch.eye(20), atol=1e-5)
    assert set(w.tolist()) == {-1.0, 1.0}
    for split, n in (("train", 300), ("val", 50), ("test", 200)):
        x, y = dm.tensors(split)
        z = dm.codes[split]
        assert x.shape == (n, 20) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert torch.allclose((x - 0.5) / dm.scale, z @ M.T, atol=1e-5)  # no noise: x = M z exactly
        margin = z @ w
        assert torch.equal(y, (margin > 0).long()) and (margin.abs() >= dm.min_margin).all()
        nonzero = z[z != 0].abs()
        assert ((nonzero >= dm.z_min) & (nonzero <= 1)).all()
    z = dm.codes["train"]
    assert 0.3 < dm.tensors("train")[1].float().mean() < 0.7
    assert 2.0 < (z != 0).sum(1).float().mean() < 5.0  # about k non-zeros (a little more: the margin rejection)


def test_noise_is_dense_with_the_given_std():
    clean, noisy = small_data(noise=0.0, n_train=2000), small_data(noise=0.05, n_train=2000)
    xi = (noisy.tensors("train")[0] - 0.5) / noisy.scale - noisy.codes["train"] @ noisy.dictionary.T
    assert torch.equal(clean.codes["train"], noisy.codes["train"])  # the same codes, noise drawn after them
    assert abs(xi.std().item() - 0.05) < 0.003 and (xi != 0).float().mean() > 0.99


def test_seeded_and_splits_independent():
    a, b, c = small_data(seed=3), small_data(seed=3), small_data(seed=4)
    assert all(torch.equal(a.tensors(s)[0], b.tensors(s)[0]) for s in ("train", "val", "test"))
    assert not torch.equal(a.dictionary, c.dictionary) and not torch.equal(a.tensors("test")[0], c.tensors("test")[0])
    bigger = small_data(seed=3, n_train=500)  # more training data: the task and the other splits stay
    assert torch.equal(bigger.dictionary, a.dictionary) and torch.equal(bigger.tensors("test")[0], a.tensors("test")[0])


def test_inputs_stay_inside_the_box_and_radius_conversion():
    dm = small_data()
    x, y = dm.tensors("test")
    slack = torch.minimum(x, 1 - x).min().item()
    assert math.isclose(dm.max_radius, slack / dm.scale, rel_tol=1e-5) and dm.max_radius > 1
    assert dm.pixel_radius(0.3) == pytest.approx(0.3 * dm.scale)
    with pytest.raises(ValueError, match="box"):
        dm.pixel_radius(dm.max_radius)
    # below max_radius the box never binds: an L2 ball of radius eps moves one coordinate by eps at most, and the
    # library's projection (ball, then box) leaves every eps-step as it is
    eps = dm.pixel_radius(1.0)
    assert (x - eps > 0).all() and (x + eps < 1).all()
    torch.manual_seed(0)
    net = SymmetricReLUNet(20, 40, init_scale=3.0, scale=dm.scale)
    check_batch(net, x, y)  # the library's input checks accept the batches
    step = FGSM(eps, norm="l2", loss="margin")(net, x, y) - x
    assert torch.allclose(step.norm(dim=1), torch.full((len(x),), eps), rtol=1e-4)
    assert torch.allclose(project(step, x, eps, "l2"), step, atol=1e-7)


def test_bad_arguments_are_named():
    for kwargs, name in (({"k": 0}, "k"), ({"noise": -1}, "noise"), ({"z_min": 2}, "z_min"),
                         ({"min_margin": 0}, "min_margin"), ({"n_train": 0}, "n_train"), ({"scale": 0}, "scale"),
                         ({"dim": 1}, "dim")):
        with pytest.raises(ValueError, match=name):
            SparseCodingDataModule(**kwargs)
    with pytest.raises(ValueError, match="scale"):
        small_data(scale=2.0)  # values outside (0, 1)
    with pytest.raises(ValueError, match="min_margin"):
        small_data(min_margin=50.0)  # no code reaches it


def test_loaders_serve_the_splits():
    dm = small_data(batch_size=64, eval_batch_size=100)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 20) and y.shape == (64,)
    assert next(iter(dm.test_dataloader()))[0].shape == (100, 20)


# --- the network and the metric --------------------------------------------------------------


def test_smoothed_relu_form():
    t = torch.tensor([-1.0, 0.0, 0.05, 0.1, 0.3])
    assert torch.allclose(smoothed_relu(t, 0.1), torch.tensor([0.0, 0.0, 0.0125, 0.05, 0.25]))
    assert torch.equal(smoothed_relu(t, 0.0), F.relu(t))
    grid = torch.linspace(-0.2, 0.4, 601, dtype=torch.float64, requires_grad=True)
    (slope,) = torch.autograd.grad(smoothed_relu(grid, 0.1).sum(), grid)
    assert slope.diff().abs().max() < 0.02  # continuous derivative: no jump at 0 or at rho


def test_network_is_odd_in_task_units_and_logits_give_the_logistic_loss():
    torch.manual_seed(0)
    net = SymmetricReLUNet(10, 30, bias=0.05, rho=0.05, init_scale=3.0, scale=0.05)
    x = 0.5 + 0.05 * torch.randn(16, 10)
    logits, mirrored = net(x), net(1 - x)  # 1 - x is -x in task units
    assert logits.shape == (16, 2) and (logits[:, 0] == 0).all()
    assert torch.allclose(mirrored[:, 1], -logits[:, 1], atol=1e-5) and logits[:, 1].abs().max() > 0.1
    u = (x - 0.5) / 0.05
    h = u @ net.weight.T
    relu = lambda t: smoothed_relu(t, 0.05)  # noqa: E731
    assert torch.allclose(logits[:, 1], (relu(h - 0.05) - relu(-h - 0.05)).sum(1), atol=1e-5)
    y = torch.randint(0, 2, (16,))
    signed = 2 * y - 1
    assert torch.allclose(F.cross_entropy(logits, y, reduction="none"), F.softplus(-signed * logits[:, 1]), atol=1e-5)
    assert list(dict(net.named_parameters())) == ["weight"]  # the bias is fixed (a buffer)
    with pytest.raises(ValueError, match="inputs"):
        net(torch.rand(4, 11))


def test_linear_net_in_task_units():
    net = LinearNet(5, scale=0.1)
    x = torch.rand(3, 5)
    assert torch.allclose(net(x)[:, 1], net.linear((x - 0.5) / 0.1).squeeze(1))


def test_purity_metric():
    g = torch.Generator().manual_seed(0)
    M = torch.linalg.qr(torch.randn(50, 50, generator=g))[0]
    pure = 2.0 * M[:, [3, 7]].T  # neurons equal to atoms
    assert purity(pure, M).item() < 1e-5
    coefficients = torch.zeros(2, 50)
    coefficients[:, 0], coefficients[0, 1:5], coefficients[1, 1:10] = 1.0, 0.5, 0.1  # one atom + a mixture
    expected = (math.sqrt(4 * 0.25) + math.sqrt(9 * 0.01)) / 2
    assert purity(coefficients @ M.T, M).item() == pytest.approx(expected, rel=1e-4)
    top5 = (0 + math.sqrt(5 * 0.01 / (1 + 4 * 0.01))) / 2  # the first neuron is all head with s = 5
    assert purity(coefficients @ M.T, M, s=5).item() == pytest.approx(top5, rel=1e-4)
    random = purity(torch.randn(500, 50, generator=g), M).item()
    assert 2 < random < math.sqrt(50)  # dense: about sqrt(d / (2 ln d)) = 2.5, the tail dominates
    with_dead = torch.cat([coefficients @ M.T, torch.zeros(1, 50)])
    assert purity(with_dead, M).item() == pytest.approx(expected, rel=1e-4)  # silent neurons left out
    with pytest.raises(ValueError, match="s must"):
        purity(pure, M, s=0)
    with pytest.raises(ValueError, match="weights"):
        purity(pure.T[:10], M)


# --- FGM is the library's one-step L2 attack ---------------------------------------------------


def test_fgm_is_fgsm_l2_without_random_start():
    dm = small_data()
    x, y = dm.tensors("test")
    torch.manual_seed(0)
    net = SymmetricReLUNet(20, 40, init_scale=1.0, scale=dm.scale)
    eps = dm.pixel_radius(0.3)
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(net(xr), y, reduction="sum"), xr)
    by_hand = x + eps * g / g.norm(dim=1, keepdim=True)
    assert torch.allclose(FGSM(eps, norm="l2")(net, x, y), by_hand, atol=1e-6)
    # the script's FGM steps along the margin's gradient: the same direction as the logistic loss's
    assert torch.allclose(theory.fgm_attack(eps)(net, x, y), by_hand, atol=1e-5)


# --- the four claims ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def claims():
    """Seed 0 of a small instance (ours): d = 60, k = 2, m = 120, r = 0.3, 2,000 training examples, 15 + 15 epochs;
    clean training, FGM-AT from the clean weights, and a linear classifier with the same FGM-AT, each through
    ``StandardTraining`` and a Trainer (the script's ``run``). Seeds 0, 1, 2 gave: clean 1.00 clean / 0.18-0.21
    PGD; FGM-AT 1.00 / 0.95-0.98; purity ratio x0.63-0.65 and |cos(w, M w*)| 0.61-0.62 -> 0.14-0.16; linear
    FGM-AT at the majority class (0.47-0.53)."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    config = theory.Config(dim=60, k=2.0, n_train=2000, n_val=0, n_test=500, width=120, clean_epochs=15,
                           at_epochs=15, attack_steps=30, attack_restarts=2, trace_steps=0, from_scratch=False,
                           references=False, radii=())
    return theory.run(config, seed=0, log=lambda text: None)


def test_a_clean_training_is_accurate_but_not_robust(claims):
    clean = claims["test"]["clean"]
    assert clean["clean"] > 0.95 and clean["pgd"] < 0.35


def test_b_fgm_adversarial_training_is_robust_to_pgd(claims):
    at = claims["test"]["at_from_clean"]
    assert at["clean"] > 0.95 and at["pgd"] > 0.8
    assert at["pgd"] > claims["test"]["clean"]["pgd"] + 0.45


def test_c_adversarial_training_purifies_the_neurons(claims):
    p = claims["purity"]
    assert p["at_from_clean"]["purity"] < 0.75 * p["clean"]["purity"]
    assert p["at_from_clean"]["mixture_cos"] < 0.5 * p["clean"]["mixture_cos"]  # the dense direction M w* is gone


def test_d_a_linear_classifier_stays_far_below(claims):
    linear = claims["test"]["linear_at"]["pgd"]
    assert linear < claims["test"]["at_from_clean"]["pgd"] - 0.25
    assert linear < claims["majority"] + 0.05  # no better than always answering the majority class
