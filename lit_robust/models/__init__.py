"""CIFAR-style backbones that take [0, 1] images and normalise inside (a ``Normalize`` first layer)."""

from lit_robust.models.certified_cnns import CNN3, CNN5, CNN7, ibp_init
from lit_robust.models.normalize import CIFAR10_MEAN, CIFAR10_STD, DIGITS_MEAN, DIGITS_STD, Normalize
from lit_robust.models.resnet import PreActResNet18, ResNet18, ResNet110
from lit_robust.models.small_cnn import SmallCNN
from lit_robust.models.swish_wide_resnet import (
    SwishWideResNet, load_official_state_dict, official_state_dict, swish_wide_resnet, wrn_28_10_swish, wrn_70_16_swish,
)
from lit_robust.models.symmetric_relu import LinearNet, SymmetricReLUNet, purity
from lit_robust.models.timm_models import TimmClassifier, timm_model  # imports timm only when used
from lit_robust.models.wide_resnet import WideResNet

__all__ = [
    "CNN3", "CNN5", "CNN7", "ibp_init", "CIFAR10_MEAN", "CIFAR10_STD", "DIGITS_MEAN", "DIGITS_STD",
    "LinearNet", "Normalize", "PreActResNet18", "ResNet18", "ResNet110", "SmallCNN", "SymmetricReLUNet", "WideResNet",
    "SwishWideResNet", "load_official_state_dict", "official_state_dict", "swish_wide_resnet", "wrn_28_10_swish",
    "wrn_70_16_swish", "purity", "TimmClassifier", "timm_model",
]
