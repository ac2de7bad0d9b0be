"""IBP / CROWN-IBP bounds (lit_robust.certify.bounds) and the certified-training CNNs.

Soundness is checked empirically: at thousands of points sampled in the input box (and at box
corners) the true margins z_y - z_j never fall below the bounds. Everything runs in float64.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lit_robust.certify import (
    certified,
    crown_ibp_margin_bounds,
    ibp_margin_bounds,
    input_box,
    interval_bounds,
    robust_cross_entropy,
)
from lit_robust.certify.bounds import _specification
from lit_robust.models import Normalize
from lit_robust.models.certified_cnns import CNN3, CNN5, CNN7, ibp_init

SLOPES = ("adaptive", "zero", "one")
BN_MODES = ("eval", "train")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def conv_net() -> nn.Sequential:
    """Normalize, strided/padded convs (one needing output_padding on 9x9 inputs), BN2d/1d, AvgPool."""
    return nn.Sequential(
        Normalize((0.4, 0.5), (0.2, 0.3)),
        nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 4, stride=2, padding=1), nn.ReLU(), nn.AvgPool2d(2, padding=1),
        nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 5),
    )


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(2 * 9 * 9, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(),
                         nn.Linear(12, 5))


def small_cnn3() -> nn.Sequential:
    return CNN3(in_channels=2, num_classes=5, input_size=9, mean=(0.4, 0.5), std=(0.2, 0.3), bn=True)


NETS = {"conv": conv_net, "mlp": mlp, "cnn3": small_cnn3}


def make(name: str, seed: int, mode: str) -> nn.Sequential:
    torch.manual_seed(seed)
    net = NETS[name]().double()
    for m in net.modules():  # non-trivial BN statistics and affine parameters
        if isinstance(m, _BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return net.train(mode == "train")


def batch(seed: int, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + seed)
    return torch.rand(n, 2, 9, 9, generator=g, dtype=torch.float64), torch.randint(0, 5, (n,), generator=g)


def margins(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y - z_j for j != y in increasing j (the column order of the bounds); logits [..., B, K]."""
    K = logits.shape[-1]
    keep = torch.arange(K) != y[:, None]  # [B, K]
    diff = logits.gather(-1, y[:, None].expand(*logits.shape[:-1], 1)) - logits
    return diff[..., keep].view(*logits.shape[:-2], len(y), K - 1)


def frozen(net: nn.Sequential, x: torch.Tensor) -> nn.Sequential:
    """An eval-mode copy whose BN layers use the statistics the bounds use (the clean batch's in train mode)."""
    twin = copy.deepcopy(net)
    if net.training:
        stats = []
        hooks = [m.register_forward_hook(lambda m, i, o: stats.append(i[0])) for m in net.modules()
                 if isinstance(m, _BatchNorm)]
        with torch.no_grad():
            net(x)
        for h in hooks:
            h.remove()
        for m, z in zip([m for m in twin.modules() if isinstance(m, _BatchNorm)], stats):
            dims = [0, *range(2, z.dim())]
            m.running_mean.copy_(z.mean(dims))
            m.running_var.copy_(z.var(dims, unbiased=False))
    return twin.eval()


def sampled_margins(net: nn.Sequential, x: torch.Tensor, y: torch.Tensor, eps: float, n: int = 1500):
    """True margins [2n, B, K-1] at n uniform points and n random corners of each example's box."""
    lower, upper = input_box(x, eps)
    g = torch.Generator().manual_seed(7)
    u = torch.rand(n, *x.shape, generator=g, dtype=x.dtype)
    corners = torch.randint(0, 2, (n, *x.shape), generator=g).to(x.dtype)
    points = lower + (upper - lower) * torch.cat([u, corners])
    with torch.no_grad():
        logits = frozen(net, x)(points.flatten(0, 1)).view(2 * n, len(x), -1)
    return margins(logits, y)


@pytest.mark.parametrize("name", list(NETS))
@pytest.mark.parametrize("mode", BN_MODES)
@pytest.mark.parametrize("seed", [0, 1])
def test_bounds_are_sound(name, mode, seed):
    net = make(name, seed, mode)
    x, y = batch(seed)
    for eps in (0.01, 0.05):
        true = sampled_margins(net, x, y, eps)
        with torch.no_grad():
            ibp = ibp_margin_bounds(net, x, y, eps)
            assert (true >= ibp - 1e-9).all()
            for slope in SLOPES:
                assert (true >= crown_ibp_margin_bounds(net, x, y, eps, slope) - 1e-9).all(), slope


@pytest.mark.parametrize("name", list(NETS))
@pytest.mark.parametrize("mode", BN_MODES)
def test_crown_ibp_is_tighter_than_ibp_on_average(name, mode):
    for seed in (0, 1, 2):
        net = make(name, seed, mode)
        x, y = batch(seed, n=8)
        with torch.no_grad():
            ibp = ibp_margin_bounds(net, x, y, 0.02)
            crown = crown_ibp_margin_bounds(net, x, y, 0.02)
        assert crown.mean() >= ibp.mean()
        assert (crown >= ibp).float().mean() >= 0.5


@pytest.mark.parametrize("name", list(NETS))
@pytest.mark.parametrize("mode", BN_MODES)
def test_bounds_are_exact_at_eps_zero(name, mode):
    net = make(name, 0, mode)
    x, y = batch(0)
    with torch.no_grad():
        exact = margins(net(x), y)
        assert torch.allclose(ibp_margin_bounds(net, x, y, 0.0), exact, atol=1e-10)
        for slope in SLOPES:
            assert torch.allclose(crown_ibp_margin_bounds(net, x, y, 0.0, slope), exact, atol=1e-10)


def test_running_statistics_untouched_and_modes_differ():
    net = make("conv", 0, "train")
    x, y = batch(0)
    before = [b.clone() for b in net.buffers()]
    train_bounds = ibp_margin_bounds(net, x, y, 0.01)
    assert all(torch.equal(a, b) for a, b in zip(before, net.buffers()))
    assert not torch.allclose(train_bounds, ibp_margin_bounds(net.eval(), x, y, 0.01))


@pytest.mark.parametrize("name", list(NETS))
def test_elision_is_at_least_as_tight_as_subtracting_logit_bounds(name):
    net = make(name, 0, "eval")
    x, y = batch(0)
    with torch.no_grad():
        lower, upper = interval_bounds(net, x, 0.02)
        naive = lower.gather(1, y[:, None]) - upper
        naive = naive[torch.arange(5) != y[:, None]].view(len(y), 4)
        elided = ibp_margin_bounds(net, x, y, 0.02)
    assert (elided >= naive - 1e-12).all()
    assert elided.mean() > naive.mean()


@pytest.mark.parametrize("bound", ["ibp", "adaptive", "zero", "one"])
def test_gradients_reach_every_weight(bound):
    net = make("conv", 0, "eval")
    x, y = batch(0)
    lb = ibp_margin_bounds(net, x, y, 0.02) if bound == "ibp" else crown_ibp_margin_bounds(net, x, y, 0.02, bound)
    robust_cross_entropy(lb).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_gradients_are_finite_with_batch_statistics():
    net = make("cnn3", 0, "train")
    x, y = batch(0)
    (robust_cross_entropy(ibp_margin_bounds(net, x, y, 0.02))
     + robust_cross_entropy(crown_ibp_margin_bounds(net, x, y, 0.02))).backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())
    assert net[1].weight.grad.abs().sum() > 0


def test_robust_cross_entropy_matches_hand_formula():
    lb = torch.randn(6, 9, dtype=torch.float64)
    expected = torch.log1p(torch.exp(-lb).sum(1)).mean()
    assert torch.allclose(robust_cross_entropy(lb), expected)
    # = CE on logits with 0 at the label and -lb elsewhere
    y = torch.randint(0, 10, (6,))
    logits = torch.zeros(6, 10, dtype=torch.float64)
    logits[torch.arange(10) != y[:, None]] = -lb.flatten()
    assert torch.allclose(robust_cross_entropy(lb), F.cross_entropy(logits, y))


def test_certified_needs_every_bound_positive():
    lb = torch.tensor([[0.1, 0.2], [0.1, 0.0], [-1.0, 2.0]])
    assert certified(lb).tolist() == [True, False, False]


def test_input_box_is_clipped():
    lower, upper = input_box(torch.tensor([0.0, 0.5, 0.99]), 0.1)
    assert torch.allclose(lower, torch.tensor([0.0, 0.4, 0.89]))
    assert torch.allclose(upper, torch.tensor([0.1, 0.6, 1.0]))


@pytest.mark.parametrize("layer", [nn.Tanh(), nn.MaxPool2d(2), nn.Dropout()])
def test_unsupported_layer_raises(layer):
    net = nn.Sequential(nn.Conv2d(2, 3, 3), layer, nn.Flatten(), nn.LazyLinear(4))
    with pytest.raises(TypeError, match=type(layer).__name__):
        ibp_margin_bounds(net, torch.rand(2, 2, 6, 6), torch.tensor([0, 1]), 0.1)
    with pytest.raises(TypeError, match=type(layer).__name__):
        crown_ibp_margin_bounds(net, torch.rand(2, 2, 6, 6), torch.tensor([0, 1]), 0.1)


def test_unknown_lower_slope_raises():
    with pytest.raises(ValueError, match="lower_slope"):
        crown_ibp_margin_bounds(mlp(), torch.rand(2, 2, 9, 9), torch.tensor([0, 1]), 0.1, "half")


@pytest.mark.parametrize("cls, kwargs, flat", [
    (CNN3, {}, 32 * 8 * 8),
    (CNN3, {"in_channels": 1, "input_size": 28, "mean": (0.5,), "std": (0.5,)}, 32 * 7 * 7),
    (CNN3, {"in_channels": 1, "input_size": 8, "mean": (0.5,), "std": (0.5,)}, 32 * 2 * 2),
    (CNN5, {"bn": True}, 32 * 8 * 8),
    (CNN5, {"in_channels": 1, "input_size": 28, "mean": (0.5,), "std": (0.5,)}, 32 * 7 * 7),
    (CNN7, {"width": 8, "linear_size": 32}, 16 * 16 * 16),
    (CNN7, {"in_channels": 1, "input_size": 8, "mean": (0.5,), "std": (0.5,), "width": 8}, 4 * 4 * 16),
])
def test_certified_cnn_shapes(cls, kwargs, flat):
    net = cls(num_classes=7, **kwargs).eval()
    size, channels = kwargs.get("input_size", 32), kwargs.get("in_channels", 3)
    assert isinstance(net[0], Normalize)
    assert [m for m in net if isinstance(m, nn.Linear)][0].in_features == flat
    x = torch.rand(2, channels, size, size)
    assert net(x).shape == (2, 7)
    assert ibp_margin_bounds(net, x, torch.tensor([0, 3]), 0.01).shape == (2, 6)


def test_cnn7_matches_shi_et_al_at_cifar_size():
    net = CNN7()
    convs = [m for m in net if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.stride[0]) for c in convs] == [(64, 1), (64, 1), (128, 2), (128, 1), (128, 1)]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net) == 5 and sum(isinstance(m, nn.BatchNorm1d) for m in net) == 1
    linears = [m for m in net if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16 * 16 * 128, 512), (512, 10)]


def test_ibp_init_std():
    torch.manual_seed(0)
    net = CNN5()
    last = net[-1].weight.clone()
    ibp_init(net)
    assert torch.equal(net[-1].weight, last)
    for layer in [m for m in net if isinstance(m, (nn.Conv2d, nn.Linear))][:-1]:
        fan_in = layer.weight[0].numel()
        assert layer.weight.std().item() == pytest.approx(math.sqrt(2 * math.pi) / fan_in, rel=0.1)


def test_specification_rows_are_e_y_minus_e_j_for_the_other_classes_in_order():
    y = torch.tensor([0, 3, 9, 5])
    C = _specification(y, 10, torch.zeros(1))
    for b, label in enumerate(y.tolist()):
        expected = torch.stack([torch.eye(10)[label] - torch.eye(10)[j] for j in range(10) if j != label])
        assert torch.equal(C[b], expected)
