"""Shared fixtures: tiny models and [0, 1] batches so every test runs in seconds on 2 CPU cores."""

import os

import pytest
import torch
from torch import nn

from lit_robust.models import SmallCNN


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    # TORCH_TEST_THREADS=1 when two test processes share the 2 cores (two 2-thread torch processes spin-wait)
    torch.set_num_threads(int(os.environ.get("TORCH_TEST_THREADS", "2")))


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """DataModules download by default; a test that would reach a server fails instead (tests fake it)."""
    def refuse(url, *args, **kwargs):
        raise RuntimeError(f"tests must not use the network (tried {url}); pass download=False or fake the server")

    monkeypatch.setattr("torchvision.datasets.utils._urlretrieve", refuse)
    monkeypatch.setattr("torchvision.datasets.utils._get_redirect_url", lambda url, max_hops=3: refuse(url))


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


@pytest.fixture(scope="session")
def standard_digits_accuracy() -> dict:
    """Clean / PGD-20 accuracy of a standard-trained SmallCNN(width=16) on the digits test split."""
    from digits_bench import EPS, digits_accuracy, fit_on_digits, sgd

    from lit_robust.defenses import StandardTraining

    module = fit_on_digits(StandardTraining(SmallCNN(width=16), eps=EPS, optimizer=sgd()))
    return digits_accuracy(module.model)


@pytest.fixture
def digits():
    """The digits DataModule, set up, with small training batches."""
    from lit_robust.datamodules import DigitsDataModule

    dm = DigitsDataModule(batch_size=32, eval_batch_size=64)
    dm.setup()
    return dm
