"""Randomized smoothing (Cohen et al. 2019): bounds, radii and decisions checked against closed forms."""

import numpy as np
import pytest
import torch
from scipy.stats import beta, binom, binomtest, norm
from torch import nn

from lit_robust.certify.randomized_smoothing import (
    ABSTAIN,
    Smooth,
    average_certified_radius,
    certified_accuracy,
    clopper_pearson_lower,
)

T = 0.4  # decision threshold of the one-pixel models


def threshold_model(thresholds=(T,)) -> nn.Module:
    """One pixel z -> K = len(thresholds) + 1 classes; class k wins iff z lies between thresholds k-1 and k.

    The logits are lines with slopes 0, 1, 2, ... whose upper envelope switches at the given thresholds:
    l_k = k z - (t_0 + ... + t_{k-1}), so l_k > l_{k-1} iff z > t_{k-1}.
    """
    k = len(thresholds) + 1
    linear = nn.Linear(1, k)
    with torch.no_grad():
        linear.weight.copy_(torch.arange(k, dtype=torch.float32)[:, None])
        linear.bias.copy_(-torch.cumsum(torch.tensor([0.0, *thresholds]), 0))
    return nn.Sequential(nn.Flatten(), linear)


def pixels(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# 1. Clopper-Pearson lower bound ---------------------------------------------------------------------

def test_clopper_pearson_matches_beta_quantile_and_closed_forms():
    for k, n, alpha in [(1, 10, 0.05), (7, 10, 0.001), (500, 1000, 0.01), (99_000, 100_000, 0.001)]:
        assert clopper_pearson_lower(k, n, alpha) == pytest.approx(beta.ppf(alpha, k, n - k + 1), rel=1e-12)
    ks = np.array([[0, 3], [10, 0]])
    out = clopper_pearson_lower(ks, 10, 0.05)
    assert out.shape == (2, 2) and out.dtype == np.float64
    assert out[0, 0] == 0.0 and out[1, 1] == 0.0
    # k = n: P(Bin(n, p) >= n) = p^n = alpha  =>  bound = alpha^(1/n); with n = 1e5, alpha = 1e-3 -> ~3.81 sigma.
    assert clopper_pearson_lower(20, 20, 0.01) == pytest.approx(0.01 ** (1 / 20), rel=1e-10)
    assert norm.ppf(clopper_pearson_lower(100_000, 100_000, 0.001)) == pytest.approx(3.81, abs=0.01)
    # Monotone in k.
    assert np.all(np.diff(clopper_pearson_lower(np.arange(51), 50, 0.01)) > 0)


def test_clopper_pearson_is_one_sided_and_covers():
    n, alpha = 40, 0.05
    bounds = clopper_pearson_lower(np.arange(n + 1), n, alpha)
    # Exact coverage: P_p(lower bound > p) <= alpha for every p, and close to alpha somewhere (one-sided, not 2*alpha).
    grid = np.linspace(0.01, 0.99, 197)
    miss = np.array([binom.pmf(np.arange(n + 1), n, p)[bounds > p].sum() for p in grid])
    assert miss.max() <= alpha + 1e-12
    assert miss.max() > 0.6 * alpha
    # Simulated coverage.
    rng, draws, p = np.random.default_rng(0), 20_000, 0.3
    k = rng.binomial(n, p, size=draws)
    frac = np.mean(clopper_pearson_lower(k, n, alpha) > p)
    assert frac <= alpha + 4 * np.sqrt(alpha * (1 - alpha) / draws)


# 2. Radius formula and abstention on a closed-form classifier -----------------------------------------

def test_sample_counts_frequency_matches_gaussian_cdf():
    sigma, n = 0.25, 20_000
    d = np.array([-1.0, 0.0, 0.3, 1.5])  # distance to the threshold in units of sigma
    smooth = Smooth(threshold_model(), sigma, batch_size=7_000)
    counts = smooth.sample_counts(pixels(T + d * sigma), n, generator=gen(0))
    assert counts.dtype == torch.int64 and counts.shape == (4, 2)
    p_true = norm.cdf(d)  # P(z + sigma eps > T) with z = T + d sigma
    freq = counts[:, 1].numpy() / n
    assert np.all(np.abs(freq - p_true) <= 5 * np.sqrt(p_true * (1 - p_true) / n) + 1e-12)


def test_certify_radius_formula_and_boundary_abstains():
    sigma, n0, n, alpha = 0.5, 100, 20_000, 0.001
    d = np.array([0.5, -1.0, 2.0, 0.0])
    x = pixels(T + d * sigma)
    smooth = Smooth(threshold_model(), sigma, batch_size=10_000)
    prediction, radius = smooth.certify(x, n0=n0, n=n, alpha=alpha, generator=gen(3))
    assert prediction.dtype == torch.int64 and radius.shape == (4,)

    # Redo CERTIFY by hand from identically seeded draws (selection draws first, then estimation draws).
    g = gen(3)
    c_hat = smooth.sample_counts(x, n0, generator=g).argmax(1)
    n_a = smooth.sample_counts(x, n, generator=g).gather(1, c_hat[:, None])[:, 0].numpy()
    p_lower = np.array([beta.ppf(alpha, k, n - k + 1) if k > 0 else 0.0 for k in n_a])

    assert prediction[:3].tolist() == [1, 0, 1]
    expected = sigma * norm.ppf(p_lower[:3])
    np.testing.assert_allclose(radius[:3].numpy(), expected, rtol=1e-6)
    # The true smoothed radius is sigma * Phi^-1(Phi(|d|)) = |x - T|; the certified one is a lower bound of it.
    assert np.all(radius[:3].numpy() < np.abs(d[:3]) * sigma)
    assert np.all(radius[:3].numpy() > 0.8 * np.abs(d[:3]) * sigma)
    # At the boundary p = 0.5: abstain with radius 0 (certify) and abstain in predict.
    assert p_lower[3] < 0.5
    assert prediction[3].item() == ABSTAIN and radius[3].item() == 0.0
    assert smooth.predict(x[3:], n=n, alpha=alpha, generator=gen(4)).item() == ABSTAIN


# 3. PREDICT ------------------------------------------------------------------------------------------

def test_predict_dominant_class_and_tie():
    sigma = 0.25
    smooth = Smooth(threshold_model((0.3, 0.7)), sigma)
    # z = 0.5: classes 0 and 2 are each 2.3% likely, class 1 dominates; z = 0.3: classes 0 and 1 tie.
    out = smooth.predict(pixels([0.5, 0.3, 0.7, 0.0, 1.0]), n=2_000, alpha=0.001, generator=gen(5))
    assert out.tolist() == [1, ABSTAIN, ABSTAIN, 0, 2]


def test_predict_follows_binomtest_on_top_two_counts():
    sigma, n, alpha = 0.5, 300, 0.01
    smooth = Smooth(threshold_model((0.3, 0.7)), sigma, batch_size=512)
    x = pixels(np.linspace(0.1, 0.9, 33))  # many near-ties, so both branches of the rule are exercised
    out = smooth.predict(x, n=n, alpha=alpha, generator=gen(6)).tolist()
    counts = smooth.sample_counts(x, n, generator=gen(6)).numpy()
    expected = []
    for row in counts:
        order = np.argsort(-row, kind="stable")
        n1, n2 = row[order[0]], row[order[1]]
        expected.append(int(order[0]) if binomtest(int(n1), int(n1 + n2), 0.5).pvalue <= alpha else ABSTAIN)
    assert out == expected
    assert ABSTAIN in out and len(set(out)) > 2


# 4. Metrics ------------------------------------------------------------------------------------------

def test_certified_accuracy_and_acr():
    prediction = torch.tensor([0, 1, ABSTAIN, 2, 1, ABSTAIN])
    radius = torch.tensor([0.5, 0.25, 0.0, 1.0, 0.75, 0.0])
    y = torch.tensor([0, 1, 1, 0, 1, ABSTAIN])  # last: an abstention never counts as correct
    acc = certified_accuracy(prediction, radius, y, [0.0, 0.25, 0.5, 0.75, 1.0])
    # correct examples: radii 0.5, 0.25, 0.75 (threshold inclusive)
    torch.testing.assert_close(acc, torch.tensor([3, 3, 2, 1, 0]) / 6.0)
    assert average_certified_radius(prediction, radius, y).item() == pytest.approx((0.5 + 0.25 + 0.75) / 6)


# 5. Model state, seeding, chunking -------------------------------------------------------------------

class Recorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x):
        self.calls.append((x.shape[0], self.training, torch.is_grad_enabled(), x.dtype))
        return x


def test_model_flags_and_buffers_restored():
    recorder = Recorder()
    model = nn.Sequential(recorder, nn.Flatten(), nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5),
                          nn.Linear(8, 3))
    model.train()
    model[5].eval()  # a mixed state must survive too
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    smooth = Smooth(model, 0.1, batch_size=16)
    x = torch.rand(2, 1, 2, 2, dtype=torch.float64)
    smooth.certify(x, n0=5, n=20, generator=gen(0))
    smooth.predict(x, n=20, generator=gen(0))
    assert [m.training for m in model.modules()] == flags
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(not training and not grad and dtype == torch.float32 for _, training, grad, dtype in recorder.calls)
    assert smooth.num_classes == 3


def test_seeded_generator_reproduces_counts():
    smooth = Smooth(threshold_model(), 0.5, batch_size=100)
    x = pixels([T, T + 0.1])
    a = smooth.sample_counts(x, 500, generator=gen(11))
    b = smooth.sample_counts(x, 500, generator=gen(11))
    c = smooth.sample_counts(x, 500, generator=gen(12))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("batch_size", [1, 2, 3, 5, 21, 1000])
def test_chunking_shapes_and_totals(batch_size):
    recorder = Recorder()
    model = nn.Sequential(recorder, threshold_model((0.3, 0.7)))
    b, n = 3, 7
    smooth = Smooth(model, 0.2, num_classes=3, batch_size=batch_size)
    counts = smooth.sample_counts(pixels([0.3, 0.5, 0.7]), n, generator=gen(0))
    assert counts.shape == (b, 3) and counts.dtype == torch.int64 and counts.device.type == "cpu"
    assert counts.sum(1).tolist() == [n] * b
    sizes = [size for size, *_ in recorder.calls]
    assert sum(sizes) == b * n and max(sizes) <= batch_size
    # Far from every threshold the count is deterministic whatever the chunking.
    far = Smooth(threshold_model((0.3, 0.7)), 1e-3, batch_size=batch_size)
    assert far.sample_counts(pixels([0.0, 0.5, 1.0]), n).tolist() == [[n, 0, 0], [0, n, 0], [0, 0, n]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_counts_stay_on_device():
    smooth = Smooth(threshold_model().cuda(), 0.25, batch_size=4096)
    x = pixels([T, T + 0.25]).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    counts = smooth.sample_counts(x, 10_000, generator=g)
    assert counts.is_cuda and counts.sum(1).tolist() == [10_000, 10_000]
    prediction, radius = smooth.certify(x, n0=100, n=10_000, generator=g)
    assert prediction.is_cuda and radius.is_cuda and prediction.tolist() == [ABSTAIN, 1]


def test_progress_bar_names_the_stage_and_leaves_the_result_alone(capsys):
    smooth = Smooth(threshold_model(), 0.25, batch_size=50)
    x = pixels([0.1, 0.9])
    quiet = smooth.certify(x, n0=10, n=200, generator=gen(0))  # progress=None and stderr no terminal: no bar
    assert capsys.readouterr().err == ""
    shown = smooth.certify(x, n0=10, n=200, generator=gen(0), progress=True)
    assert all(torch.equal(a, b) for a, b in zip(quiet, shown))  # the same draws
    smooth.predict(x, n=200, generator=gen(0), progress=True)
    bars = capsys.readouterr().err
    for text in ("certify: select class", "/20 ", "certify: estimate p_A", "/400 ", "smoothing: predict"):
        assert text in bars, text


# 6. Validation ---------------------------------------------------------------------------------------

def test_argument_validation():
    model = threshold_model()
    x = pixels([0.5])
    with pytest.raises(ValueError, match="sigma"):
        Smooth(model, 0.0)
    with pytest.raises(ValueError, match="batch_size"):
        Smooth(model, 0.1, batch_size=0)
    smooth = Smooth(model, 0.1)
    with pytest.raises(ValueError, match="n0"):
        smooth.certify(x, n0=0, n=10)
    with pytest.raises(ValueError, match="n "):
        smooth.certify(x, n0=10, n=0)
    with pytest.raises(ValueError, match="n "):
        smooth.predict(x, n=0)
    with pytest.raises(ValueError, match="n "):
        smooth.sample_counts(x, 0)
    for alpha in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="alpha"):
            smooth.certify(x, n0=10, n=10, alpha=alpha)
        with pytest.raises(ValueError, match="alpha"):
            smooth.predict(x, n=10, alpha=alpha)
        with pytest.raises(ValueError, match="alpha"):
            clopper_pearson_lower(3, 10, alpha)
    with pytest.raises(ValueError, match="logits"):
        Smooth(model, 0.1, num_classes=5).sample_counts(x, 3)
