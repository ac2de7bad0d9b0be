"""CIFAR-style ResNet-18 (He et al. 2016), PreAct ResNet-18 (He et al. 2016b) and ResNet-110.

The 3x3 stem without max-pool is the CIFAR variant used by every adversarial-training
repository (kuangliu/pytorch-cifar, locuslab/robust_overfitting, AT-AWP). Parameter counts:
11.17M for both with 10 classes. ResNet-110 is He et al.'s CIFAR network (three stages of 18
basic blocks, widths 16/32/64), the base classifier of randomized smoothing (Cohen et al.,
SmoothMix: ``archs/cifar_resnet.py``, projection shortcuts), 1.73M parameters.
"""

from __future__ import annotations

from typing import Sequence, Type, Union

import torch.nn.functional as F
from torch import Tensor, nn

from lit_robust.models.normalize import CIFAR10_MEAN, CIFAR10_STD, Normalize


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN + shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = _shortcut(cin, cout, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class PreActBlock(nn.Module):
    """BN-ReLU-conv-BN-ReLU-conv + shortcut (taken from the pre-activated input when projecting)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        return self.conv2(F.relu(self.bn2(out))) + skip


class _CifarResNet(nn.Module):
    def __init__(
        self,
        block: Type[Union[BasicBlock, PreActBlock]],
        num_blocks: Sequence[int],
        num_classes: int,
        in_channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        widths: Sequence[int] = (64, 128, 256, 512),
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        preact = block is PreActBlock
        stem: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)]
        if not preact:
            stem += [nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
        layers, cin = [], widths[0]
        for i, (n, cout) in enumerate(zip(num_blocks, widths)):
            for j in range(n):
                layers.append(block(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
        tail = [nn.BatchNorm2d(cin), nn.ReLU(inplace=True)] if preact else []
        self.features = nn.Sequential(*stem, *layers, *tail, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.features(self.normalize(x)))


class ResNet18(_CifarResNet):
    """ResNet-18, CIFAR variant (3x3 stem, no max-pool)."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
    ) -> None:
        super().__init__(BasicBlock, (2, 2, 2, 2), num_classes, in_channels, mean, std)


class PreActResNet18(_CifarResNet):
    """PreAct ResNet-18 as in locuslab/robust_overfitting and fast_adversarial."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
    ) -> None:
        super().__init__(PreActBlock, (2, 2, 2, 2), num_classes, in_channels, mean, std)


class ResNet110(_CifarResNet):
    """ResNet-110 for CIFAR (He et al. 2016, section 4.2): 16-channel stem, 3 x 18 basic blocks of
    widths 16 / 32 / 64, global average pooling; Cohen et al.'s and SmoothMix's base classifier."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
    ) -> None:
        super().__init__(BasicBlock, (18, 18, 18), num_classes, in_channels, mean, std, widths=(16, 32, 64))
