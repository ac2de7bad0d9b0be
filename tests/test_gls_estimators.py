"""Gaussian Loss Smoothing estimators: PGPE and RGS against closed-form smoothed gradients, the bias of RGS
on a loss with a jump, the surrogate for backward(), a real network through functional_call, bad arguments."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lit_robust.certify.gls import ESTIMATORS, pgpe_gradient, rgs_gradient, smoothed_surrogate


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # conftest sets 2 per test; this module's loops are Python-bound anyway


SIGMA = 1.0


def _theta() -> dict[str, torch.Tensor]:
    return {"w": torch.linspace(-1, 1, 6, dtype=torch.float64).reshape(2, 3),
            "b": torch.tensor([0.3, -0.8, 0.5, 0.0], dtype=torch.float64)}


def _smooth_loss(params):
    """L(theta) = sum(sin theta) + 0.5 |theta|^2 over all tensors."""
    return sum(torch.sin(t).sum() + 0.5 * (t ** 2).sum() for t in params.values())


def _smoothed_grad(theta, sigma):
    """grad E[L(theta + e)] = cos(theta) exp(-sigma^2 / 2) + theta, since E[sin(t + e)] = sin(t) exp(-sigma^2 / 2)."""
    return {k: torch.cos(t) * math.exp(-sigma ** 2 / 2) + t for k, t in theta.items()}


def _rel_err(g, ref) -> float:
    num = sum(((g[k] - ref[k]) ** 2).sum() for k in ref)
    return (num / sum((r ** 2).sum() for r in ref.values())).sqrt().item()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_pgpe_converges_to_smoothed_gradient():
    theta, true = _theta(), _smoothed_grad(_theta(), SIGMA)
    assert _rel_err(_smoothed_grad(theta, 0.0), true) > 0.35  # smoothing visibly changes the gradient
    # For a near-linear loss E|g_hat - g|^2 ~ (d + 1)|g|^2 / n: d = 10, n = 4000 gives rms relative error 0.052.
    loss, g = pgpe_gradient(_smooth_loss, theta, SIGMA, pairs=4000, generator=_gen(0))
    assert set(g) == set(theta) and all(g[k].shape == theta[k].shape for k in theta)
    assert _rel_err(g, true) < 0.12
    assert _rel_err(g, _smoothed_grad(theta, 0.0)) > 0.25  # it estimates the smoothed, not the plain, gradient
    # E[L(theta + e)] = sum(sin(theta)) exp(-sigma^2/2) + 0.5 |theta|^2 + 0.5 d sigma^2
    expected = sum(torch.sin(t).sum() * math.exp(-0.5) + 0.5 * (t ** 2).sum() + 0.5 * t.numel() for t in theta.values())
    assert loss.item() == pytest.approx(expected.item(), rel=0.05)
    # The error falls like 1/sqrt(pairs): 100x the population should cut it by ~10x.
    small = sum(_rel_err(pgpe_gradient(_smooth_loss, theta, SIGMA, 10, _gen(s))[1], true) for s in range(8)) / 8
    large = sum(_rel_err(pgpe_gradient(_smooth_loss, theta, SIGMA, 1000, _gen(s))[1], true) for s in range(8)) / 8
    assert small / large > 4


def test_pgpe_antithetic_pairs_on_linear_loss():
    theta = {"u": torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64), "v": torch.ones(2, 2, dtype=torch.float64)}
    a = {"u": torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), "v": torch.tensor([[3.0, 0.0], [-1.0, 0.25]],
                                                                                         dtype=torch.float64)}
    c, sigma, pairs = 1.7, 0.3, 4000
    seen = []

    def linear(params):
        value = sum((a[k] * p).sum() for k, p in params.items()) + c
        seen.append(value)
        return value

    loss, g = pgpe_gradient(linear, theta, sigma, pairs, generator=_gen(3))
    assert len(seen) == 2 * pairs
    assert loss.item() == pytest.approx(torch.stack(seen).mean().item(), abs=1e-12)
    assert loss.item() == pytest.approx(linear(theta).item(), abs=1e-9)  # L+ + L- = 2 L(theta) exactly
    # Each pair contributes e (2 <a, e>) / (2 sigma^2): replay the noise (per pair, per tensor, in dict order).
    gen, expected = _gen(3), {k: torch.zeros_like(p) for k, p in theta.items()}
    for _ in range(pairs):
        eps = {k: torch.randn(p.shape, generator=gen, dtype=p.dtype) * sigma for k, p in theta.items()}
        dot = sum((a[k] * e).sum() for k, e in eps.items())
        for k, e in eps.items():
            expected[k] += e * 2 * dot / (2 * sigma ** 2) / pairs
    for k in theta:
        torch.testing.assert_close(g[k], expected[k])
    # Unbiased: E[e e^T] a / sigma^2 = a; rms relative error sqrt((d + 1) / n) = 0.045 for d = 7.
    assert _rel_err(g, a) < 0.12


def test_rgs_converges_to_smoothed_gradient_and_is_plain_at_sigma_zero():
    theta = _theta()
    loss, g = rgs_gradient(_smooth_loss, theta, SIGMA, samples=2000, generator=_gen(1))
    assert _rel_err(g, _smoothed_grad(theta, SIGMA)) < 0.05  # per-sample std ~1, so rms error ~0.02
    assert _rel_err(g, _smoothed_grad(theta, 0.0)) > 0.3
    loss0, g0 = rgs_gradient(_smooth_loss, theta, 0.0, samples=3)
    point = {k: t.clone().requires_grad_(True) for k, t in theta.items()}
    plain = torch.autograd.grad(_smooth_loss(point), list(point.values()))
    for (k, _), p in zip(point.items(), plain):
        torch.testing.assert_close(g0[k], p)
    assert loss0.item() == pytest.approx(_smooth_loss(theta).item())


def _jump_loss(params):
    w = params["w"]
    return w.abs().sum() + 3 * (w[0] > 0).to(w.dtype)


def test_rgs_misses_a_jump_that_pgpe_captures():
    """L = |theta|_1 + 3 * 1[theta_0 > 0]: the jump adds 3 phi(theta_0 / sigma) / sigma to d L_sigma / d theta_0."""
    sigma = 0.1
    theta = torch.randn(50, generator=_gen(7), dtype=torch.float64) * 0.1
    theta[0] = 0.02
    z = theta[0].item() / sigma
    sign_part = math.erf(z / math.sqrt(2))  # E[sign(theta_0 + e)] = 2 Phi(z) - 1
    true0 = sign_part + 3 * math.exp(-z * z / 2) / math.sqrt(2 * math.pi) / sigma
    assert true0 == pytest.approx(11.89, abs=0.01)
    # PGPE per-pair std of coordinate 0 is ~14 here, so 3000 pairs give std ~0.26 (10% is ~4.5 std).
    _, g_pgpe = pgpe_gradient(_jump_loss, {"w": theta}, sigma, pairs=3000, generator=_gen(0))
    assert g_pgpe["w"][0].item() == pytest.approx(true0, rel=0.1)
    # RGS averages a.e. gradients: coordinate 0 is E[sign] only (std of the mean ~0.022), the jump is missing.
    _, g_rgs = rgs_gradient(_jump_loss, {"w": theta}, sigma, samples=2000, generator=_gen(0))
    assert g_rgs["w"][0].item() == pytest.approx(sign_part, abs=0.1)
    assert g_rgs["w"][0].item() < 0.1 * true0


def test_smoothed_surrogate_value_and_gradient():
    params = {"a": torch.randn(3, 2, requires_grad=True), "b": torch.randn(4, requires_grad=True)}
    grads = {"a": torch.randn(3, 2), "b": torch.randn(4)}
    loss = torch.tensor(2.5, requires_grad=True) * 1.3
    surrogate = smoothed_surrogate(loss, params, grads)
    assert surrogate.item() == loss.item() and surrogate.shape == ()
    got = torch.autograd.grad(surrogate, list(params.values()))
    for k, g in zip(params, got):
        torch.testing.assert_close(g, grads[k])
    # Also with sequences; backward() fills .grad with exactly the given estimate.
    smoothed_surrogate(loss, list(params.values()), list(grads.values())).backward()
    for k, p in params.items():
        torch.testing.assert_close(p.grad, grads[k])
    with pytest.raises(ValueError, match="keys"):
        smoothed_surrogate(loss, params, {"a": grads["a"]})


def test_estimators_on_a_network_via_functional_call():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    params = dict(model.named_parameters())
    before = {k: p.detach().clone() for k, p in params.items()}

    def loss_fn(p):
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    plain = torch.autograd.grad(F.cross_entropy(model(x), y), list(params.values()))
    loss0, g0 = rgs_gradient(loss_fn, params, 0.0, samples=2)
    for k, p in zip(params, plain):
        torch.testing.assert_close(g0[k], p)
    assert loss0.item() == pytest.approx(F.cross_entropy(model(x), y).item())

    _, g_rgs = rgs_gradient(loss_fn, params, 0.05, samples=3, generator=_gen(2))
    loss_p, g_pgpe = pgpe_gradient(loss_fn, params, 0.01, pairs=1500, generator=_gen(2))
    for g in (g_rgs, g_pgpe):
        assert all(not t.requires_grad and t.shape == params[k].shape for k, t in g.items())
    assert not loss_p.requires_grad and not loss0.requires_grad
    # d = 67, 1500 pairs: relative error ~0.2, so the direction is close to the true gradient.
    flat = torch.cat([g_pgpe[k].flatten() for k in params])
    cos = F.cosine_similarity(flat, torch.cat([p.flatten() for p in plain]), dim=0)
    assert cos > 0.9

    for k, p in params.items():
        assert torch.equal(p.detach(), before[k]) and p.grad is None
    for estimator, kwargs in ((rgs_gradient, {"samples": 3}), (pgpe_gradient, {"pairs": 5})):
        first = estimator(loss_fn, params, 0.05, generator=_gen(9), **kwargs)
        again = estimator(loss_fn, params, 0.05, generator=_gen(9), **kwargs)
        assert torch.equal(first[0], again[0])
        assert all(torch.equal(first[1][k], again[1][k]) for k in params)
        other = estimator(loss_fn, params, 0.05, generator=_gen(10), **kwargs)
        assert not torch.equal(first[1]["0.weight"], other[1]["0.weight"])


def test_argument_validation():
    assert ESTIMATORS == ("rgs", "pgpe")
    theta = {"w": torch.zeros(3)}
    for sigma in (0.0, -0.1, float("nan"), float("inf"), "1"):
        with pytest.raises(ValueError, match="sigma"):
            pgpe_gradient(_smooth_loss, theta, sigma, 2)
    for sigma in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="sigma"):
            rgs_gradient(_smooth_loss, theta, sigma, 2)
    for count in (0, -1, 1.5, True, None):
        with pytest.raises(ValueError, match="pairs"):
            pgpe_gradient(_smooth_loss, theta, 0.1, count)
        with pytest.raises(ValueError, match="samples"):
            rgs_gradient(_smooth_loss, theta, 0.1, count)
    with pytest.raises(ValueError, match="scalar"):
        pgpe_gradient(lambda p: p["w"] * 2, theta, 0.1, 1)
    rgs_gradient(_smooth_loss, theta, 0.0, 1)  # sigma = 0 is the plain gradient, allowed for RGS
