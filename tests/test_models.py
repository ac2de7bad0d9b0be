"""Backbones: published parameter counts, normalisation inside, [0, 1] inputs, argument checks."""

import pytest
import torch

from lit_robust.models import (
    CIFAR10_MEAN, CIFAR10_STD, CNN3, CNN5, CNN7, Normalize, PreActResNet18, ResNet18, ResNet110, SmallCNN,
    WideResNet,
)


def _params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("make,count", [
    (ResNet18, 11_173_962),
    (PreActResNet18, 11_172_170),
    (lambda: WideResNet(34, 10), 46_160_474),
    (lambda: WideResNet(28, 10), 36_479_194),
    (ResNet110, 1_730_714),  # He et al.: 1.7M
])
def test_cifar_backbones_have_the_published_sizes(make, count):
    model = make()
    assert _params(model) == count
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_normalize_is_the_first_layer_and_uses_dataset_statistics():
    model = PreActResNet18()
    x = torch.rand(2, 3, 32, 32)
    expected = (x - torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    assert torch.allclose(model.normalize(x), expected)
    # buffers, not parameters: saved with the model, never trained, never attacked
    assert "normalize.mean" in model.state_dict()
    assert not any(n.startswith("normalize") for n, _ in model.named_parameters())


def test_custom_statistics_change_the_output():
    x = torch.rand(2, 1, 8, 8)
    torch.manual_seed(0)
    a = SmallCNN(width=4).eval()(x)
    torch.manual_seed(0)
    b = SmallCNN(width=4, mean=(0.0,), std=(1.0,)).eval()(x)
    assert not torch.allclose(a, b)


def test_small_cnn_other_input_sizes():
    model = SmallCNN(in_channels=3, num_classes=7, input_size=32, width=4, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize("make,name", [
    (lambda: WideResNet(depth=30), "depth"),
    (lambda: WideResNet(widen_factor=0), "widen_factor"),
    (lambda: SmallCNN(input_size=10), "input_size"),
    (lambda: SmallCNN(in_channels=3), "mean"),
    (lambda: Normalize((0.5,), (0.0,)), "std"),
])
def test_bad_arguments_are_rejected(make, name):
    with pytest.raises(ValueError, match=name):
        make()


@pytest.mark.parametrize("make", [PreActResNet18, SmallCNN, lambda: CNN3(bn=True), lambda: CNN5(bn=True),
                                  lambda: CNN7(width=4, linear_size=8)], ids=["preact", "small", "cnn3", "cnn5", "cnn7"])
def test_models_are_built_in_train_mode_with_fresh_bn_statistics(make):
    # a shape probe in eval mode once left CNN3/5/7 in eval mode: BN would have trained on running statistics
    model = make()
    assert all(m.training for m in model.modules())
    assert all(int(m.num_batches_tracked) == 0 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
