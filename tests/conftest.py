"""Shared fixtures: tiny models and [0, 1] batches so every test runs in seconds on 2 CPU cores."""

import pytest
import torch
from torch import nn

from lit_robust.models import SmallCNN


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(2)


@pytest.fixture
def tiny_cnn() -> nn.Module:
    """A SmallCNN with BatchNorm, small enough for exact per-example checks."""
    return SmallCNN(in_channels=1, num_classes=10, input_size=8, width=4)


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(12, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (12,), generator=g)
    return x, y
