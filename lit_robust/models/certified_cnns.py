"""CNN3 / CNN5 / CNN7: the small networks of the certified-training literature, as ``nn.Sequential``.

They start with a :class:`Normalize` layer, so they map [0, 1] images to logits and can be handed
straight to :mod:`lit_robust.certify.bounds`. Definitions:

- ``CNN3`` = ``cnn_3layer`` and ``CNN5`` = ``cnn_5layer`` (``bn=True``: ``cnn_5layer_bn``) follow
  ``eth-sri/TAPS:PARC_networks.py``; that GLS (and the wider ETH line) uses exactly these is [UNVERIFIED].
- ``CNN7`` = ``cnn_7layer_bn2`` of Shi et al. 2021 (``shizhouxing/Fast-Certified-Robust-Training``,
  ``models/feedforward.py``), the CNN7-with-BN of their CIFAR-10 results.

``input_size`` only changes the first Linear layer's input size (computed from a dummy forward).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from lit_robust.models.normalize import CIFAR10_MEAN, CIFAR10_STD, Normalize


class _CertifiedCNN(nn.Sequential):
    def __init__(self, mean: Sequence[float], std: Sequence[float], in_channels: int, input_size: int,
                 features: list[nn.Module], head: Sequence[int], bn_head: bool, num_classes: int) -> None:
        if len(mean) != in_channels:
            raise ValueError(f"mean/std need one value per input channel ({in_channels}), got {len(mean)}")
        layers = [Normalize(mean, std), *features, nn.Flatten()]
        probe = nn.Sequential(*layers).eval()  # eval: the probe must not touch BN running statistics
        with torch.no_grad():
            width = probe(torch.zeros(1, in_channels, input_size, input_size)).shape[1]
        probe.train()
        for hidden in head:
            layers += [nn.Linear(width, hidden), *([nn.BatchNorm1d(hidden)] if bn_head else []), nn.ReLU()]
            width = hidden
        super().__init__(*layers, nn.Linear(width, num_classes))


def _conv(cin: int, cout: int, kernel: int, stride: int, padding: int, bn: bool) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, padding), *([nn.BatchNorm2d(cout)] if bn else []), nn.ReLU()]


class CNN3(_CertifiedCNN):
    """Conv(c→16, k5, s2, p2)–ReLU–Conv(16→32, k4, s2, p1)–ReLU–Flatten–Linear(32·8·8 → K) at 32x32."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, input_size: int = 32,
                 mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD,
                 bn: bool = False) -> None:
        features = [*_conv(in_channels, 16, 5, 2, 2, bn), *_conv(16, 32, 4, 2, 1, bn)]
        super().__init__(mean, std, in_channels, input_size, features, (), bn, num_classes)


class CNN5(_CertifiedCNN):
    """Conv(c→16, k3, s1, p1)–ReLU–Conv(16→16, k4, s2, p1)–ReLU–Conv(16→32, k4, s2, p1)–ReLU–Flatten–
    Linear(→512)–ReLU–Linear(→K); ``bn=True`` adds BatchNorm after every conv and the hidden linear."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, input_size: int = 32,
                 mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD,
                 bn: bool = False) -> None:
        features = [*_conv(in_channels, 16, 3, 1, 1, bn), *_conv(16, 16, 4, 2, 1, bn),
                    *_conv(16, 32, 4, 2, 1, bn)]
        super().__init__(mean, std, in_channels, input_size, features, (512,), bn, num_classes)


class CNN7(_CertifiedCNN):
    """Shi et al.'s ``cnn_7layer_bn2``: five 3x3 convs (widths w, w, 2w with stride 2, 2w, 2w), each followed
    by BN–ReLU, then Flatten–Linear(→linear_size)–BN1d–ReLU–Linear(→K); Linear(16·16·128 → 512) at 32x32."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, input_size: int = 32,
                 mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD,
                 width: int = 64, linear_size: int = 512) -> None:
        w = width
        features = [*_conv(in_channels, w, 3, 1, 1, True), *_conv(w, w, 3, 1, 1, True),
                    *_conv(w, 2 * w, 3, 2, 1, True), *_conv(2 * w, 2 * w, 3, 1, 1, True),
                    *_conv(2 * w, 2 * w, 3, 1, 1, True)]
        super().__init__(mean, std, in_channels, input_size, features, (linear_size,), True, num_classes)


def ibp_init(net: nn.Module) -> nn.Module:
    """Shi et al. 2021's IBP initialisation (``manual_init.py``), in place: every Conv2d/Linear weight but
    the last layer's ~ N(0, std²) with std = sqrt(2π) / fan_in. Biases and BN parameters are left as they
    are, as in the reference code. Returns ``net``."""
    layers = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        for layer in layers[:-1]:
            fan_in = layer.weight[0].numel()
            layer.weight.normal_(0, math.sqrt(2 * math.pi) / fan_in)
    return net
