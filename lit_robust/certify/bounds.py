"""Interval bound propagation (IBP) and CROWN-IBP for sequential Conv/Linear/BN/ReLU networks.

Own pure-PyTorch implementation (auto_LiRPA pins an old torch); the rules follow Gowal et al. 2018
(IBP, last-layer elision) and Zhang et al. 2020 (CROWN-IBP), as summarised in the design notes.

A network is an ``nn.Sequential`` (nested ones are flattened) of :class:`~lit_robust.models.Normalize`,
``nn.Conv2d``, ``nn.Linear``, ``nn.BatchNorm1d/2d``, ``nn.ReLU``, ``nn.Flatten`` and ``nn.AvgPool2d``
(treated as a depthwise convolution). Every layer but ReLU is affine; each is wrapped in an
:class:`_Affine` with its forward map, its ``|W|`` map (for interval radii) and its adjoint (for the
backward pass), so that IBP, elision and CROWN share one code path.

Margins: the specification ``C`` has rows ``e_y - e_j`` for ``j != y`` in increasing ``j``, so bound
columns line up with ``[j for j in range(K) if j != y]``. All bounds are lower bounds of ``z_y - z_j``
over the L-infinity ball of radius ``eps`` around ``x`` intersected with ``[0, 1]``.

BatchNorm: in train mode the bounds use the current batch statistics of the clean input (auto_LiRPA's
``bn mode = "forward"``, as in Shi et al. 2021), computed here without touching the running
statistics (the training step's own clean forward updates them); in eval mode the running statistics.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.utils import _pair

from lit_robust.models.normalize import Normalize

__all__ = ["certified", "check_network", "crown_ibp_margin_bounds", "ibp_margin_bounds", "input_box", "interval_bounds",
           "robust_cross_entropy"]

LOWER_SLOPES = ("adaptive", "zero", "one")


class _Affine(NamedTuple):
    forward: Callable[[Tensor], Tensor]  # v -> W v + b
    radius: Callable[[Tensor], Tensor]  # r -> |W| r
    backward: Callable[[Tensor], tuple[Tensor, Tensor]]  # A [B, S, *out] -> (A W [B, S, *in], A b [B, S])


def input_box(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """The L-infinity box ``[x - eps, x + eps]`` clipped to the pixel range ``[0, 1]``."""
    return (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)


def _layers(net: nn.Module) -> list[nn.Module]:
    if not isinstance(net, nn.Sequential):
        raise TypeError(f"bound propagation needs an nn.Sequential, got {type(net).__name__}")
    layers: list[nn.Module] = []
    for layer in net:
        if isinstance(layer, nn.Sequential):
            layers += _layers(layer)
        elif isinstance(layer, (Normalize, nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU,
                                nn.Flatten, nn.AvgPool2d)):
            layers.append(layer)
        else:
            raise TypeError(f"bound propagation does not support layer {type(layer).__name__} ({layer})")
    return layers


def check_network(net: nn.Module) -> None:
    """Raises ``TypeError`` naming the first layer of ``net`` that bound propagation does not support."""
    _layers(net)


def _sum_rest(t: Tensor) -> Tensor:
    return t.flatten(2).sum(-1)


def _channelwise(scale: Tensor, shift: Tensor) -> _Affine:
    """``v -> scale * v + shift`` with per-channel ``scale``/``shift`` shaped to broadcast over ``[B, C, ...]``."""
    return _Affine(lambda v: v * scale + shift, lambda r: r * scale.abs(),
                   lambda A: (A * scale, _sum_rest(A * shift)))


def _conv(z: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation, groups: int) -> _Affine:
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    # conv_transpose2d is the adjoint of conv2d; output_padding restores the input rows/columns the stride skipped
    output_padding = tuple((z.shape[2 + i] + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1) - 1) % stride[i]
                           for i in range(2))

    def backward(A: Tensor) -> tuple[Tensor, Tensor]:
        AW = F.conv_transpose2d(A.flatten(0, 1), weight, None, stride, padding, output_padding, groups, dilation)
        Ab = A.new_zeros(A.shape[:2]) if bias is None else A.sum((3, 4)) @ bias
        return AW.view(*A.shape[:2], *z.shape[1:]), Ab

    return _Affine(lambda v: F.conv2d(v, weight, bias, stride, padding, dilation, groups),
                   lambda r: F.conv2d(r, weight.abs(), None, stride, padding, dilation, groups), backward)


def _affine(layer: nn.Module, z: Tensor) -> _Affine:
    """``layer`` as an affine map; ``z`` is its clean input (BN batch statistics, shapes)."""
    if isinstance(layer, Normalize):
        return _channelwise(1 / layer.std, -layer.mean / layer.std)
    if isinstance(layer, _BatchNorm):
        if layer.training or layer.running_mean is None:
            dims = [0, *range(2, z.dim())]
            mean, var = z.mean(dims), z.var(dims, unbiased=False)
        else:
            mean, var = layer.running_mean, layer.running_var
        scale = (var + layer.eps).rsqrt() * (1 if layer.weight is None else layer.weight)
        shift = -mean * scale + (0 if layer.bias is None else layer.bias)
        shape = (1, -1) + (1,) * (z.dim() - 2)
        return _channelwise(scale.view(shape), shift.view(shape))
    if isinstance(layer, nn.Linear):
        W, b = layer.weight, layer.bias
        return _Affine(lambda v: F.linear(v, W, b), lambda r: F.linear(r, W.abs()),
                       lambda A: (A @ W, A.new_zeros(A.shape[:2]) if b is None else A @ b))
    if isinstance(layer, nn.Conv2d):
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise TypeError(f"bound propagation supports Conv2d with numeric zero padding only, got {layer}")
        return _conv(z, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    if isinstance(layer, nn.AvgPool2d):
        if layer.ceil_mode or layer.divisor_override or (not layer.count_include_pad and layer.padding):
            raise TypeError(f"bound propagation supports AvgPool2d as a plain linear average only, got {layer}")
        kh, kw = _pair(layer.kernel_size)
        channels = z.shape[1]
        weight = z.new_full((channels, 1, kh, kw), 1 / (kh * kw))
        return _conv(z, weight, None, layer.stride, layer.padding, 1, channels)
    if isinstance(layer, nn.Flatten):
        if layer.start_dim != 1 or layer.end_dim != -1:
            raise TypeError(f"bound propagation supports Flatten(1, -1) only, got {layer}")
        return _Affine(lambda v: v.flatten(1), lambda r: r.flatten(1),
                       lambda A: (A.reshape(*A.shape[:2], *z.shape[1:]), A.new_zeros(A.shape[:2])))
    raise TypeError(f"bound propagation does not support layer {type(layer).__name__}")


def _forward(layers: list[nn.Module], x: Tensor, eps: float):
    """IBP through ``layers``; returns the steps (an ``_Affine`` or the pre-ReLU ``(lower, upper)``),
    the output interval and the clean output."""
    lower, upper = input_box(x, eps)
    z, steps = x, []
    for layer in layers:
        if isinstance(layer, nn.ReLU):
            steps.append((lower, upper))
            lower, upper, z = lower.relu(), upper.relu(), z.relu()
        else:
            op = _affine(layer, z)
            steps.append(op)
            centre, radius = op.forward((upper + lower) / 2), op.radius((upper - lower) / 2)
            lower, upper, z = centre - radius, centre + radius, op.forward(z)
    return steps, lower, upper, z


def interval_bounds(net: nn.Sequential, x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Plain IBP bounds ``(lower, upper)`` of the logits (no specification)."""
    _, lower, upper, _ = _forward(_layers(net), x, eps)
    return lower, upper


def _specification(y: Tensor, num_classes: int, like: Tensor) -> Tensor:
    """``C [B, K-1, K]`` with rows ``e_y - e_j`` for ``j != y`` (increasing ``j``)."""
    eye = torch.eye(num_classes, dtype=like.dtype, device=like.device)
    # the j-th class other than y is j, or j + 1 from y on: no boolean mask, whose size the host would wait for
    j = torch.arange(num_classes - 1, device=y.device)
    others = j + (j >= y[:, None])
    return eye[y].unsqueeze(1) - eye[others]


def _concretize(A: Tensor, bias: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
    """Lower bound of ``A v + bias`` over the box ``lower <= v <= upper``."""
    centre, radius = ((upper + lower) / 2).unsqueeze(1), ((upper - lower) / 2).unsqueeze(1)
    return _sum_rest(A * centre) - _sum_rest(A.abs() * radius) + bias


def _setup(net: nn.Sequential, x: Tensor, y: Tensor, eps: float):
    """IBP up to the input of the last layer, and the specification folded into that layer when affine."""
    layers = _layers(net)
    body = layers if isinstance(layers[-1], nn.ReLU) else layers[:-1]
    steps, lower, upper, z = _forward(body, x, eps)
    last = _affine(layers[-1], z) if len(body) < len(layers) else None
    C = _specification(y, (z if last is None else last.forward(z)).shape[1], z)
    A, bias = (C, C.new_zeros(C.shape[:2])) if last is None else last.backward(C)
    return steps, lower, upper, A, bias


def ibp_margin_bounds(net: nn.Sequential, x: Tensor, y: Tensor, eps: float) -> Tensor:
    """IBP lower bounds ``[B, K-1]`` of ``z_y - z_j`` with the specification elided into the last layer."""
    _, lower, upper, A, bias = _setup(net, x, y, eps)
    return _concretize(A, bias, lower, upper)


def _relu_relaxation(lower: Tensor, upper: Tensor, lower_slope: str) -> tuple[Tensor, Tensor, Tensor]:
    """Upper line ``d v + t`` (the chord) and lower slope ``lam``, shaped ``[B, 1, ...]`` for ``A``."""
    l, u = lower.clamp(max=0), upper.clamp(min=0)
    u = torch.max(u, l + 1e-8)
    d = u / (u - l)
    if lower_slope == "adaptive":  # 1 if u > -l: the smaller-area triangle (CROWN-IBP / DeepPoly)
        lam = upper > -lower
    elif lower_slope == "zero":  # 0 unless stably active
        lam = lower >= 0
    else:  # "one": 1 unless stably inactive
        lam = upper > 0
    return d.unsqueeze(1), (-l * d).unsqueeze(1), lam.to(d.dtype).unsqueeze(1)


def crown_ibp_margin_bounds(net: nn.Sequential, x: Tensor, y: Tensor, eps: float,
                            lower_slope: str = "adaptive") -> Tensor:
    """CROWN-IBP lower bounds ``[B, K-1]`` of ``z_y - z_j``: IBP pre-ReLU bounds, then one backward
    linear-relaxation pass from the specification, concretised over the input box.

    ``lower_slope`` picks the ReLU lower line for unstable neurons: ``"adaptive"`` (1 if ``u > -l``
    else 0), ``"zero"`` or ``"one"``; all are sound.
    """
    if lower_slope not in LOWER_SLOPES:
        raise ValueError(f"lower_slope must be one of {LOWER_SLOPES}, got {lower_slope!r}")
    steps, _, _, A, bias = _setup(net, x, y, eps)
    for step in reversed(steps):
        if isinstance(step, _Affine):
            A, Ab = step.backward(A)
            bias = bias + Ab
        else:  # lower bound: positive coefficients take the lower line, negative ones the upper line
            d, t, lam = _relu_relaxation(*step, lower_slope)
            pos, neg = A.clamp(min=0), A.clamp(max=0)
            bias = bias + _sum_rest(neg * t)
            A = pos * lam + neg * d
    return _concretize(A, bias, *input_box(x, eps))


def robust_cross_entropy(margin_lower: Tensor) -> Tensor:
    """Mean cross-entropy of ``cat([0, -lb])`` against class 0 (= CE on logits with ``z_y = 0``, ``z_j = -lb_j``)."""
    logits = torch.cat([margin_lower.new_zeros(len(margin_lower), 1), -margin_lower], dim=1)
    return F.cross_entropy(logits, margin_lower.new_zeros(len(margin_lower), dtype=torch.long))


def certified(margin_lower: Tensor) -> Tensor:
    """``[B]`` bool: every margin lower bound is positive (so the label wins on the whole box)."""
    return (margin_lower > 0).all(dim=1)
