"""Per-channel normalisation as the first layer, so models take [0, 1] images and eps stays in pixel units."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
"""CIFAR-10's per-channel mean (the values in locuslab/robust_overfitting)."""
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
"""CIFAR-10's per-channel standard deviation (the values in locuslab/robust_overfitting)."""
DIGITS_MEAN = (0.3053,)
"""The mean of scikit-learn's 8x8 digits scaled to [0, 1]."""
DIGITS_STD = (0.3760,)
"""The standard deviation of scikit-learn's 8x8 digits scaled to [0, 1]."""


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; mean and std are buffers (saved, moved, never trained)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean and std must have the same length, got {len(mean)} and {len(std)}")
        if min(std) <= 0:
            raise ValueError(f"std must be > 0, got {tuple(std)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"
