"""The Swish WideResNets of the generated-data recipes (Gowal et al. 2020/2021, Rebuffi et al. 2021, Wang et al. 2023).

Module layout and parameter names are those of DeepMind's PyTorch model zoo
(github.com/google-deepmind/deepmind-research, ``adversarial_robustness/pytorch/model_zoo.py``,
the network that loads their released checkpoints) and of DM-Improves-AT's copy of it
(github.com/wzekai99/DM-Improves-AT, ``core/models/wideresnetwithswish.py``)::

    init_conv.weight
    layer.{g}.block.{i}.batchnorm_0.*   conv_0.weight   batchnorm_1.*   conv_1.weight   [shortcut.weight]
    batchnorm.*   logits.weight   logits.bias

(``g`` in 0..2 the group, ``i`` the block; ``*`` = weight, bias, running_mean, running_var,
num_batches_tracked). The one addition is ``normalize.mean`` / ``normalize.std``, the buffers of
our :class:`~lit_robust.models.Normalize` (the official codes keep mean and std as plain tensors
outside the state_dict). :func:`official_state_dict` and :func:`load_official_state_dict` move
weights between the two key sets.

Architecture, as in both official PyTorch codes:

* pre-activation blocks BN-act-conv3x3(stride)-BN-act-conv3x3, widths 16, 16w, 32w, 64w,
  ``(depth - 4) / 6`` blocks per group, strides 1, 2, 2;
* a 1x1 projection shortcut where the block changes width (the first block of each group), fed by
  the block's pre-activation; otherwise the identity on the block's input;
* strided convolutions padded as TensorFlow's ``SAME``: one row and column of zeros at the bottom
  and right only (``F.pad(x, (0, 1, 0, 1))`` then an unpadded conv), so a checkpoint trained in
  JAX/Haiku computes the same function; stride-1 convolutions are padded by 1 on every side;
* BatchNorm with momentum 0.01 (Haiku's ``decay_rate=0.99``, DM-Improves-AT's ``momentum=0.01``)
  and eps 1e-5 (Haiku's and torch's default); every BatchNorm has a scale and an offset;
* Swish (``nn.SiLU``, the same function as DeepMind's custom ``_Swish``) or ReLU;
* global average pooling, a linear classifier.

Initialisation follows DM-Improves-AT (the PyTorch training code): convolutions
``N(0, 2 / (k * k * out_channels))``, BatchNorm scale 1 and offset 0, classifier bias 0 (the
classifier weight keeps torch's default). DeepMind's JAX code differs (fan-in truncated normal
convolutions, a zero classifier weight); weights loaded from a checkpoint are unaffected.

Differences from the official modules that do not change a loaded checkpoint's outputs: global
average pooling is a mean over the spatial dimensions (the official ``avg_pool2d(out, 8)`` only
fits 32x32 inputs), and stride-1 convolutions pad inside the conv (the official code pads with
``F.pad`` first; the same zeros).

Parameter counts (10 classes): WRN-28-10 36,479,194 (36.5M), WRN-70-16 266,796,506 (266.8M),
WRN-106-16 415,475,162 (415.5M); usually quoted as 36.5M and 267M.
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from typing import Any, Iterator, Literal, Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from lit_robust.models.normalize import CIFAR10_MEAN, CIFAR10_STD, Normalize

ACTIVATIONS = {"swish": nn.SiLU, "relu": nn.ReLU}
BN_MOMENTUM = 0.01  #: Haiku's decay_rate 0.99 in torch's convention
BN_EPS = 1e-5
NORMALIZE_KEYS = ("normalize.mean", "normalize.std")
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)  #: the model zoo's CIFAR-100 statistics
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def _batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class SwishBlock(nn.Module):
    """One pre-activation block; parameter names as the model zoo's ``_Block``."""

    def __init__(self, cin: int, cout: int, stride: int, activation: type[nn.Module]) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        self.batchnorm_0 = _batch_norm(cin)
        self.act_0 = activation()
        # stride 2: TF "SAME" puts the single padding row/column after the image (see forward)
        self.conv_0 = nn.Conv2d(cin, cout, 3, stride, padding=1 if stride == 1 else 0, bias=False)
        self.batchnorm_1 = _batch_norm(cout)
        self.act_1 = activation()
        self.conv_1 = nn.Conv2d(cout, cout, 3, 1, padding=1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if cin != cout else None
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        pre = self.act_0(self.batchnorm_0(x))
        skip = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv_0(pre if self.stride == 1 else F.pad(pre, (0, 1, 0, 1)))
        out = self.conv_1(self.act_1(self.batchnorm_1(out)))
        return skip + out


class SwishBlockGroup(nn.Module):
    """``num_blocks`` blocks, the first one changing width and stride; names as ``_BlockGroup``."""

    def __init__(self, num_blocks: int, cin: int, cout: int, stride: int, activation: type[nn.Module]) -> None:
        super().__init__()
        self.block = nn.Sequential(*[
            SwishBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, activation) for i in range(num_blocks)
        ])

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


class SwishWideResNet(nn.Module):
    """WRN-depth-width with Swish, as trained by the generated-data recipes; takes [0, 1] images.

    Args:
        depth: ``6n + 4`` (28, 34, 70, 106, ...).
        width: the widening factor (10 for WRN-28-10, 16 for WRN-70-16).
        num_classes: output logits.
        activation: ``"swish"`` (SiLU, the recipes') or ``"relu"``.
        mean, std: per-channel normalisation inside the model (CIFAR-10 statistics by default, the
            official codes' values; ``CIFAR100_MEAN`` / ``CIFAR100_STD`` in this module for CIFAR-100).
        in_channels: input channels (1 for DeepMind's MNIST checkpoints, with ``mean=(0.5,)``,
            ``std=(0.5,)``, ``padding=2``).
        padding: zero-pad the [0, 1] input by this many pixels on every side before normalising (the
            model zoo's ``padding``; 0 for CIFAR).
        bn_first_batch: the first training forward that updates BatchNorm statistics replaces the
            running mean and variance by its batch statistics (momentum 1.0 once, then 0.01).
            DM-Improves-AT does this (``set_bn_momentum(model, 1.0)`` at global step 0, "make BN
            running mean and variance init same as Haiku", whose moving averages are zero-debiased);
            without it the running statistics start at 0 / 1 and forget them at 1% per batch. Exact
            difference: DM-Improves-AT keeps momentum 1.0 for every forward of its first step (the
            statistics of the last one, the adversarial batch, remain); here only the first forward
            has it, and the later forwards of that step update at 0.01. A Python flag, so no host
            synchronisation; loading a state_dict whose statistics were already updated
            (``num_batches_tracked > 0``) clears it, so a resumed run does not reset them.

    Cost per 32x32 image forward: WRN-28-10 5.24 G multiply-adds, WRN-70-16 38.8 G.
    """

    def __init__(
        self,
        depth: int = 28,
        width: int = 10,
        num_classes: int = 10,
        activation: Literal["swish", "relu"] = "swish",
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
        in_channels: int = 3,
        padding: int = 0,
        bn_first_batch: bool = False,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"depth must be 6n + 4 with n >= 1 (e.g. 28, 70), got {depth}")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
        if len(mean) != in_channels:
            raise ValueError(f"mean/std need one value per input channel ({in_channels}), got {len(mean)}")
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        act = ACTIVATIONS[activation]
        n = (depth - 4) // 6
        channels = [16, 16 * width, 32 * width, 64 * width]
        self.depth, self.width, self.activation, self.padding = depth, width, activation, padding
        self.normalize = Normalize(mean, std)
        self.init_conv = nn.Conv2d(in_channels, channels[0], 3, 1, padding=1, bias=False)
        self.layer = nn.Sequential(*[
            SwishBlockGroup(n, channels[g], channels[g + 1], 1 if g == 0 else 2, act) for g in range(3)
        ])
        self.batchnorm = _batch_norm(channels[3])
        self.act = act()
        self.logits = nn.Linear(channels[3], num_classes)
        self.bn_first_batch = bn_first_batch
        self._bn_pending = bn_first_batch
        self.register_load_state_dict_post_hook(_statistics_loaded)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DM-Improves-AT's initialisation (see the module docstring)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                m.reset_parameters()
                nn.init.zeros_(m.bias)
        self._bn_pending = self.bn_first_batch

    def forward(self, x: Tensor) -> Tensor:
        if self._bn_pending and any(m.training and m.track_running_stats for m in self._norms()):
            self._bn_pending = False
            with _momentum(self._norms(), 1.0):
                return self._forward(x)
        return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        if self.padding:
            x = F.pad(x, (self.padding,) * 4)
        out = self.layer(self.init_conv(self.normalize(x)))
        out = self.act(self.batchnorm(out))
        return self.logits(out.mean(dim=(2, 3)))

    def _norms(self) -> list[nn.BatchNorm2d]:
        return [m for m in self.modules() if isinstance(m, nn.BatchNorm2d)]

    def extra_repr(self) -> str:
        return f"depth={self.depth}, width={self.width}, activation={self.activation!r}"


@contextmanager
def _momentum(norms: list[nn.BatchNorm2d], momentum: float) -> Iterator[None]:
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = momentum
    try:
        yield
    finally:
        for m, value in zip(norms, saved):
            m.momentum = value


def _statistics_loaded(module: SwishWideResNet, incompatible_keys: Any) -> None:
    """After ``load_state_dict``: statistics that were already updated are not reset by ``bn_first_batch``."""
    if module.bn_first_batch:
        module._bn_pending = all(int(m.num_batches_tracked) == 0 for m in module._norms())


_NAME = re.compile(r"wrn-(\d+)-(\d+)(?:-(swish|relu))?")


def swish_wide_resnet(name: str, **kwargs: Any) -> SwishWideResNet:
    """A model by DM-Improves-AT's name, ``"wrn-<depth>-<width>-swish"`` (or ``-relu``): ``wrn-28-10-swish``,
    ``wrn-70-16-swish``, ``wrn-34-20-swish``, ``wrn-106-16-swish``; ``kwargs`` go to :class:`SwishWideResNet`."""
    match = _NAME.fullmatch(name.strip().lower())
    if match is None:
        raise ValueError(f"name must look like 'wrn-28-10-swish' (wrn-<depth>-<width>[-swish|-relu]), got {name!r}")
    depth, width, activation = int(match[1]), int(match[2]), match[3] or "swish"
    return SwishWideResNet(depth=depth, width=width, activation=activation, **kwargs)


def wrn_28_10_swish(**kwargs: Any) -> SwishWideResNet:
    """WRN-28-10 with Swish (36.5M parameters): DeepMind's default, DM-Improves-AT's ``wrn-28-10-swish``.

    Usable as a config ``class_path`` (``lit_robust.models.wrn_28_10_swish``) with ``init_args`` of
    :class:`SwishWideResNet` other than depth and width."""
    return SwishWideResNet(depth=28, width=10, **kwargs)


def wrn_70_16_swish(**kwargs: Any) -> SwishWideResNet:
    """WRN-70-16 with Swish (266.8M parameters): the recipes' large model, ``wrn-70-16-swish``."""
    return SwishWideResNet(depth=70, width=16, **kwargs)


# --- official checkpoints --------------------------------------------------------------------

def official_keys(checkpoint: Mapping[str, Any]) -> dict[str, Tensor]:
    """The backbone's tensors under the model zoo's key names, from any of the official files.

    Accepts DeepMind's released PyTorch files (a bare state_dict, loaded by their ``eval.py``),
    DM-Improves-AT's (``{"model_state_dict": ..., "unaveraged_model_state_dict": ...}``, keys
    ``module.0.init_conv.weight`` ...: ``DataParallel(Sequential(backbone))``; ``module.1.`` when
    trained with ``--normalize``; the averaged weights, ``model_state_dict``, are taken), RobustBench's
    ``{"state_dict": ...}``, and our own state_dict (``normalize.*`` dropped). The prefix in front of
    ``init_conv.weight`` is removed from the backbone's keys; other entries are dropped.
    """
    for wrapper in ("model_state_dict", "state_dict"):
        if isinstance(checkpoint.get(wrapper), Mapping):
            checkpoint = checkpoint[wrapper]
            break
    anchors = [k for k in checkpoint if k.endswith("init_conv.weight")]
    if len(anchors) != 1:
        raise ValueError(f"expected exactly one '...init_conv.weight' key in the checkpoint, found {anchors or 'none'}"
                         f" among {len(checkpoint)} keys (first: {list(checkpoint)[:3]})")
    prefix = anchors[0][: -len("init_conv.weight")]
    return {k[len(prefix):]: v for k, v in checkpoint.items()
            if k.startswith(prefix) and k[len(prefix):] not in NORMALIZE_KEYS}


def load_official_state_dict(model: SwishWideResNet, checkpoint: Mapping[str, Any], strict: bool = True) -> Any:
    """Loads an official checkpoint (see :func:`official_keys`) into ``model``; returns ``load_state_dict``'s result.

    The normalisation is the model's own (``mean`` / ``std`` given when building it), as in the official
    codes, where it is not part of the file: build CIFAR-100 models with ``CIFAR100_MEAN`` /
    ``CIFAR100_STD``. Files converted from JAX may lack ``num_batches_tracked``; BatchNorm fills it in.
    """
    state = official_keys(checkpoint)
    own = model.state_dict()
    state.update({k: own[k] for k in NORMALIZE_KEYS})
    return model.load_state_dict(state, strict=strict)


def official_state_dict(model: SwishWideResNet) -> dict[str, Tensor]:
    """``model``'s weights under the model zoo's keys (no ``normalize.*``): loads into DeepMind's
    ``model_zoo.WideResNet`` / DM-Improves-AT's / RobustBench's ``DMWideResNet`` with
    ``activation_fn=Swish`` and the same mean and std."""
    return {k: v for k, v in model.state_dict().items() if k not in NORMALIZE_KEYS}


__all__ = ["ACTIVATIONS", "BN_EPS", "BN_MOMENTUM", "CIFAR100_MEAN", "CIFAR100_STD", "SwishWideResNet",
           "load_official_state_dict", "official_keys", "official_state_dict", "swish_wide_resnet",
           "wrn_28_10_swish", "wrn_70_16_swish"]
