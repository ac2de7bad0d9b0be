"""Any timm backbone as a lit_robust classifier: [0, 1] images in, normalisation inside, local pretrained weights.

``TimmClassifier("convnext_base", num_classes=1000, pretrained_path="convnext_base.safetensors")`` builds the
timm model with ``timm.create_model(name, pretrained=False, ...)`` (nothing is downloaded, ever), puts a
:class:`~lit_robust.models.Normalize` in front of it with the model's own ``pretrained_cfg`` mean and std (or
the given ones), so eps stays in pixel units as everywhere in lit_robust, and loads weights from a local file.

Loading (:func:`load_pretrained`): a ``.safetensors`` file, or a ``torch.save`` file (``.pth``, ``.pt``,
``.bin``, read with ``weights_only=True``) holding a state dict, possibly wrapped in ``"state_dict"``,
``"model"``, ``"model_state_dict"`` or ``"state_dict_ema"`` (the first present, or the ``checkpoint_key``
asked for) with ``module.`` / ``_orig_mod.`` prefixes (DataParallel, DDP, ``torch.compile``). A
``TimmClassifier``'s own state dict and a lit_robust (Lightning) checkpoint of a defense around one load too.
Every key must match, except: the classifier head, which is
left at its fresh initialisation (and said so in a warning) when its shape differs from the checkpoint's
(another ``num_classes``); BatchNorm's ``num_batches_tracked``; and, for ViTs built with another patch or image
size, the patch embedding and position embedding, resampled as timm does (FlexiViT's ``resample_patch_embed``,
bicubic position-embedding interpolation as in DeiT). Anything else missing or unexpected raises a
``ValueError`` that lists the keys.

Small inputs (``small_input_stem=True``, 32x32 images such as CIFAR), only where a paper's code did it:

* ResNets (``timm.models.resnet``): the 7x7 stride-2 stem convolution becomes a 3x3 stride-1 one and the
  max-pool is removed, so the first stage sees 32x32 features. Debenedetti, Sehwag & Mittal (SaTML 2023),
  ``resnet50_32`` in github.com/dedeswim/vits-robustness-torch ``src/models/models.py``; the CIFAR ResNet stem
  of He et al. (2016). A deep stem (``stem_type="deep"``) keeps its convolutions with the first one at stride 1.
  The new stem convolution is freshly initialised (its pretrained 7x7 weights do not fit).
* XCiT (``timm.models.xcit``): the convolutional patch embedding keeps its weights and runs its first
  convolutions at stride 1, patch 16 -> 4 (``xcit_*_p4_32``): Debenedetti et al., ``adapt_model_patches`` in
  ``src/utils.py``. XCiT's Fourier position encoding needs no resampling.
* ViT (``timm.models.vision_transformer``): built with ``img_size=32, patch_size=4`` (64 tokens); pretrained
  patch and position embeddings are resampled on loading. The same token count idea as XCiT's p4_32; there
  the embedding's convolutions are reused, here timm's FlexiViT resampling (Beyer et al., CVPR 2023) does it.

Other architectures (ConvNeXt included: no robustness paper's code adapts its stem to 32x32 that we know of)
raise a ``ValueError``; pass your own timm arguments instead (e.g. ``patch_size`` for ConvNeXt's stem).

timm is optional: ``import lit_robust`` works without it; building a ``TimmClassifier`` raises an ImportError
saying ``pip install lit_robust[timm]``.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from lit_robust.models.normalize import Normalize

PathLike = Union[str, Path]
WRAPPERS = ("state_dict", "model", "model_state_dict", "state_dict_ema")  #: checked in this order
PREFIXES = ("module.", "_orig_mod.")
SMALL_INPUT_FAMILIES = ("resnet", "xcit", "vision_transformer")  #: timm module names with a 32x32 adaptation
SMALL_PATCH = 4


def import_timm() -> Any:
    """``timm``, or an ImportError saying how to install it (it is an optional dependency)."""
    try:
        import timm
    except ImportError as err:  # pragma: no cover - exercised only where timm is missing
        raise ImportError("TimmClassifier needs timm, an optional dependency: pip install lit_robust[timm]") from err
    return timm


def model_family(name: str) -> str:
    """The timm module that defines ``name`` (``"resnet"``, ``"vision_transformer"``, ``"convnext"``, ...)."""
    timm = import_timm()
    if not timm.models.is_model(name):
        raise ValueError(f"name: timm has no model {name!r} (timm.list_models() lists them)")
    return timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1]


class TimmClassifier(nn.Sequential):
    """``Normalize`` then a timm model: maps [0, 1] images to logits. Children ``normalize`` and ``model``.

    Args:
        name: a timm model name (``timm.list_models()``), e.g. ``"resnet50"``, ``"convnext_base"``,
            ``"vit_base_patch16_224"``, or the tiny ``"test_vit"``.
        num_classes: logits.
        pretrained_path: a local checkpoint to load (see the module docstring); None: random initialisation.
        in_chans: input channels.
        img_size: the input size for models that fix it at construction (ViTs); None: the model's default.
        small_input_stem: adapt the stem to 32x32 inputs (see the module docstring; ResNet, XCiT, ViT only).
        mean, std: the normalisation; None: the model's ``pretrained_cfg`` values (ImageNet's for most). Give
            them when ``in_chans`` differs from the number of values there.
        checkpoint_key: the wrapper entry to load from a checkpoint that has several (e.g. ``"state_dict_ema"``).
        fused_attn: keep timm's fused attention (``F.scaled_dot_product_attention``). ``False`` switches every
            attention module to the explicit softmax(QK^T)V, which has second derivatives: defenses that
            differentiate input gradients (GradAlign, the Jacobian regularisers) need it, since PyTorch's fused
            attention kernels have no double backward (a RuntimeError "derivative for
            aten::_scaled_dot_product_..._backward is not implemented"). Slower; same function.
        timm_kwargs: more ``timm.create_model`` arguments (``drop_path_rate``, ``zero_init_last``, ...), the way to
            give them in a config (jsonargparse does not take ``**kwargs``).
        **kwargs: the same, in Python.
    """

    def __init__(
        self,
        name: str,
        num_classes: int = 1000,
        pretrained_path: Optional[str] = None,
        in_chans: int = 3,
        img_size: Optional[int] = None,
        small_input_stem: bool = False,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        checkpoint_key: Optional[str] = None,
        fused_attn: bool = True,
        timm_kwargs: Optional[dict[str, Any]] = None,
        **kwargs: Any,
    ) -> None:
        timm = import_timm()
        kwargs = {**(timm_kwargs or {}), **kwargs}
        family = model_family(name)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if small_input_stem and family not in SMALL_INPUT_FAMILIES:
            raise ValueError(
                f"small_input_stem: no published 32x32 adaptation for {name!r} (timm.models.{family}); supported: "
                f"ResNets, XCiT and ViTs. Pass timm arguments for your own stem instead (e.g. patch_size=...)")
        if img_size is not None:
            kwargs["img_size"] = img_size
        if small_input_stem and family == "vision_transformer":
            kwargs = {"img_size": 32, "patch_size": SMALL_PATCH, **kwargs}
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
        if small_input_stem:
            adapt_stem(model, family)
        if not fused_attn:
            for module in model.modules():
                if hasattr(module, "fused_attn"):
                    module.fused_attn = False
        cfg = model.pretrained_cfg
        mean = tuple(cfg.get("mean", ())) if mean is None else tuple(mean)
        std = tuple(cfg.get("std", ())) if std is None else tuple(std)
        if len(mean) != in_chans or len(std) != in_chans:
            raise ValueError(f"mean/std: {name!r} was built for {len(mean)} channels; give mean and std for "
                             f"in_chans={in_chans}")
        super().__init__(OrderedDict(normalize=Normalize(mean, std), model=model))
        self.name, self.family = name, family
        if pretrained_path is not None:
            load_pretrained(model, pretrained_path, checkpoint_key)

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


def adapt_stem(model: nn.Module, family: str) -> None:
    """The 32x32 adaptation of ``model`` in place (ViTs get theirs at construction, see the module docstring)."""
    if family == "resnet":
        if isinstance(model.conv1, nn.Sequential):  # deep stem: the first convolution at stride 1
            model.conv1[0].stride = (1, 1)
        else:
            conv = model.conv1
            model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    elif family == "xcit":
        ratio = model.patch_embed.patch_size // SMALL_PATCH
        for index in range(0, ratio, 2):  # ConvPatchEmbed: conv3x3 stride 2 at every other position
            model.patch_embed.proj[index][0].stride = (1, 1)
        model.patch_embed.patch_size = SMALL_PATCH


# --- local checkpoints -----------------------------------------------------------------------

def read_state_dict(path: PathLike, checkpoint_key: Optional[str] = None) -> dict[str, Tensor]:
    """The tensors of a local checkpoint, unwrapped and without ``module.`` / ``_orig_mod.`` prefixes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained_path: no file {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Mapping[str, Any] = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    keys = (checkpoint_key,) if checkpoint_key else WRAPPERS
    for key in keys:
        if isinstance(state.get(key), Mapping):
            state = state[key]
            break
    else:
        if checkpoint_key:
            raise ValueError(f"checkpoint_key: {path} has no {checkpoint_key!r} entry (entries: {list(state)[:10]})")
    out = {}
    for key, value in state.items():
        if not isinstance(value, Tensor):
            continue
        while key.startswith(PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    anchors = [k for k in out if k.endswith("normalize.mean")]
    if len(anchors) == 1:  # a TimmClassifier's state dict ("" prefix) or a lit_robust checkpoint's ("model.")
        backbone = anchors[0][: -len("normalize.mean")] + "model."
        out = {k[len(backbone):]: v for k, v in out.items() if k.startswith(backbone)}
    return out


def classifier_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the classifier head (timm's ``pretrained_cfg["classifier"]``)."""
    heads = model.pretrained_cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    return [k for k in model.state_dict() if any(k.startswith(h + ".") for h in heads)]


def load_pretrained(model: nn.Module, path: PathLike, checkpoint_key: Optional[str] = None) -> None:
    """Loads a local checkpoint into the timm ``model`` (see the module docstring); a ``ValueError`` lists what
    does not match."""
    state = read_state_dict(path, checkpoint_key)
    own = model.state_dict()
    _resample_vit(model, state)
    head = classifier_keys(model)
    mismatched_head = [k for k in head if k in state and state[k].shape != own[k].shape]
    if mismatched_head:
        warnings.warn(f"{path}: the classifier head ({', '.join(mismatched_head)}) has another shape than the "
                      f"model's ({num_outputs(own, head)} classes): it is re-initialised, not loaded", stacklevel=2)
        state = {k: v for k, v in state.items() if k not in head}
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and v.shape != own[k].shape]
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")
               and not (mismatched_head and k in head)]
    unexpected = [k for k in state if k not in own]
    if wrong or missing or unexpected:
        raise ValueError(f"{path} does not fit {type(model).__name__} ({model.pretrained_cfg.get('architecture')}): "
                         f"missing keys {missing}, unexpected keys {unexpected}, other shapes {wrong}")
    model.load_state_dict(state, strict=False)


def num_outputs(state: Mapping[str, Tensor], head: Sequence[str]) -> Optional[int]:
    biases = [state[k] for k in head if k.endswith("bias")]
    return int(biases[-1].shape[0]) if biases else None


def _resample_vit(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Resizes a ViT checkpoint's patch and position embeddings to ``model``'s patch and image size, in place."""
    from timm.layers import resample_abs_pos_embed, resample_patch_embed
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        return
    key = "patch_embed.proj.weight"
    own = model.state_dict()
    if key in state and state[key].shape[-2:] != own[key].shape[-2:]:
        state[key] = resample_patch_embed(state[key], list(own[key].shape[-2:]))
    if "pos_embed" in state and state["pos_embed"].shape != own["pos_embed"].shape:
        prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], list(model.patch_embed.grid_size),
                                                    num_prefix_tokens=prefix)


def timm_model(name: str, num_classes: int = 1000, pretrained_path: Optional[str] = None, **kwargs: Any
               ) -> TimmClassifier:
    """:class:`TimmClassifier` (the same arguments): a function for Python users."""
    return TimmClassifier(name, num_classes, pretrained_path, **kwargs)


__all__ = ["TimmClassifier", "adapt_stem", "classifier_keys", "import_timm", "load_pretrained", "model_family",
           "read_state_dict", "timm_model"]
