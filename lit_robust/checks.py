"""Input checks with messages that say what was given and what is expected (DESIGN principle 10).

Type, dtype and shape checks read no tensor values. The value checks (pixels in [0, 1] and
finite, labels in range, logits that are not probabilities) are gathered into one small
tensor and read once: one host synchronisation per check, which the defenses spend on the
first batch of each epoch and stage, never per step.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from lit_robust.targets import is_probability_rows

_CHECKED: ContextVar[bool] = ContextVar("lit_robust_inputs_checked", default=False)


@contextmanager
def inputs_checked() -> Iterator[None]:
    """Within the block attacks skip their own input check (:func:`check_attack_inputs`).

    For a training step whose batches are checked another way: a defense checks the first batch
    of each epoch, and a check in every attack call would be a host synchronisation per step.
    """
    token = _CHECKED.set(True)
    try:
        yield
    finally:
        _CHECKED.reset(token)


def check_attack_inputs(x: Tensor, y: Tensor) -> None:
    """:func:`check_inputs` on an attack's batch, unless inside :func:`inputs_checked`."""
    if not _CHECKED.get():
        check_inputs(x, y)


def check_eps(eps: float, norm: str, x: Optional[Tensor] = None) -> None:
    """Refuses a radius that covers the whole pixel box: Linf eps >= 1, or L2 eps >= the images' diameter.

    Such a ball lets any image become any other, so training or reporting at it is meaningless;
    it is nearly always ``eps=8`` written for ``8/255``. The L2 diameter ``sqrt(C * H * W)``
    needs a batch ``x``.
    """
    if norm == "linf" and eps >= 1:
        raise ValueError(f"eps={eps:g} with norm='linf' covers the whole [0, 1] pixel box: eps is in [0, 1] pixel "
                         f"units, e.g. eps=8/255 (not 8) for CIFAR-10")
    if norm == "l2" and x is not None and x.dim() > 1 and eps >= math.sqrt(x[0].numel()):
        raise ValueError(f"eps={eps:g} with norm='l2' is at least the diameter {math.sqrt(x[0].numel()):.4g} of the "
                         f"[0, 1] box of {tuple(x.shape[1:])} images: eps is in [0, 1] pixel units (e.g. 0.5 for "
                         "CIFAR-10)")


def check_input_types(x: Tensor, y: Optional[Tensor] = None) -> None:
    """Dtype and shape of a batch of images ``x`` [B, C, H, W] and labels ``y`` [B]; reads no values."""
    if not isinstance(x, Tensor):
        raise ValueError(f"inputs must be a Tensor of images [B, C, H, W], got {type(x).__name__}")
    if not x.is_floating_point():
        hint = " (convert uint8 images with x.float() / 255)" if x.dtype == torch.uint8 else ""
        raise ValueError(f"inputs must be floating-point images in [0, 1], got dtype {x.dtype}{hint}; the model "
                         "normalises inside itself (lit_robust.models.Normalize)")
    if x.dim() == 3:
        raise ValueError(f"inputs of shape {tuple(x.shape)} are 3-D: a batch of images is [B, C, H, W]; add the "
                         "channel dimension of grey-scale images (x.unsqueeze(1)) or the batch dimension of a "
                         "single image (x.unsqueeze(0))")
    if x.dim() < 2:
        raise ValueError(f"inputs must be a batch [B, C, H, W], got shape {tuple(x.shape)}")
    if y is None:
        return
    if not isinstance(y, Tensor):
        raise ValueError(f"labels must be a Tensor of class indices [B], got {type(y).__name__}")
    if is_probability_rows(y):
        if y.shape[0] != x.shape[0] or y.shape[1] < 2:
            raise ValueError(f"probability-row targets must be [B, num_classes] = [{x.shape[0]}, C >= 2], got "
                             f"{tuple(y.shape)}")
        return
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices (int64) of shape [B] or float probability rows "
                         f"[B, num_classes], got dtype {y.dtype} and shape {tuple(y.shape)}; convert class indices "
                         "with y.long()")
    if y.shape != (x.shape[0],):
        raise ValueError(f"labels must be one class index per image, shape ({x.shape[0]},), or probability rows "
                         f"[{x.shape[0]}, num_classes], got {tuple(y.shape)}")


def check_inputs(x: Tensor, y: Optional[Tensor] = None, logits: Optional[Tensor] = None) -> None:
    """Checks images ``x`` (finite, in [0, 1]), labels ``y`` (in ``[0, num_classes)``; or probability rows: finite,
    >= 0, each summing to 1, one column per class) and the model's ``logits`` on ``x`` (a [B, num_classes] tensor,
    not probabilities), with one host synchronisation."""
    check_input_types(x, y)
    if logits is not None:
        _check_logits_type(logits, x)
    x = x.detach()
    finite = torch.isfinite(x)
    values = [(~finite).flatten(1).any(1).sum(), (~finite).sum(), torch.where(finite, x, 0.5).amin(),
              torch.where(finite, x, 0.5).amax()]
    rows = y is not None and is_probability_rows(y)
    if y is not None and not y.numel():
        values += [torch.zeros(()), torch.zeros(())]
    elif rows:  # the smallest entry (NaN counts as negative) and the largest distance of a row sum from 1
        y64 = y.detach().double()
        values += [torch.nan_to_num(y64, nan=-1.0).amin(), (y64.sum(1) - 1).abs().amax()]
    elif y is not None:
        values += [y.min(), y.max()]
    if logits is not None:
        z = logits.detach().float()
        values.append(((z >= 0).all() & (z <= 1).all() & ((z.sum(1) - 1).abs() < 1e-3).all()))
    stats = torch.stack([v.double().to(x.device) for v in values]).tolist()
    bad_images, bad_values, lo, hi = stats[:4]
    if bad_values:
        raise ValueError(f"inputs hold {int(bad_values)} non-finite values (NaN or inf) in {int(bad_images)} of "
                         f"{x.shape[0]} images: check the data pipeline (images must be finite, in [0, 1])")
    if lo < 0 or hi > 1:
        raise ValueError(f"inputs must be images in [0, 1], got values in [{lo:.4g}, {hi:.4g}]; normalise inside the "
                         "model (lit_robust.models.Normalize), not in the data pipeline")
    if rows:
        _check_rows(y, stats[4], stats[5], logits)
    elif y is not None and logits is not None and (stats[4] < 0 or stats[5] >= logits.shape[1]):
        raise ValueError(f"labels must be class indices in [0, {logits.shape[1]}) for a model with "
                         f"{logits.shape[1]} outputs, got labels in [{int(stats[4])}, {int(stats[5])}]")
    if y is not None and not rows and stats[4] < 0:
        raise ValueError(f"labels must be class indices >= 0, got a label {int(stats[4])}")
    if logits is not None and stats[-1]:
        raise ValueError("the model returns probabilities (each row in [0, 1], summing to 1): it must return "
                         "logits; drop its final softmax (attacks on probabilities have vanishing gradients)")


def check_batch(model: nn.Module, x: Tensor, y: Tensor) -> None:
    """:func:`check_inputs` with the logits of one forward of ``model`` in eval mode (no gradients, no running
    statistics updated, every submodule's flag restored): what a defense checks on an epoch's first batch."""
    from lit_robust.attacks.pgd import module_mode  # here: the attacks import this module

    check_input_types(x, y)
    with torch.no_grad(), module_mode(model, "eval"):
        logits = model(x)
    check_inputs(x, y, logits)


def _check_rows(y: Tensor, smallest: float, off_by: float, logits: Optional[Tensor]) -> None:
    if not smallest >= 0:
        raise ValueError(f"probability-row targets must be finite and >= 0, got an entry {smallest:.4g}")
    if off_by > 1e-3:
        raise ValueError(f"probability-row targets must each sum to 1, got a row summing to 1 +- {off_by:.4g}")
    if logits is not None and y.shape[1] != logits.shape[1]:
        raise ValueError(f"probability-row targets have {y.shape[1]} columns for a model with {logits.shape[1]} "
                         "outputs: one column per class")


def _check_logits_type(logits: object, x: Tensor) -> None:
    if isinstance(logits, (tuple, list)):
        raise ValueError(f"the model returns a {type(logits).__name__} of {len(logits)} items: it must return one "
                         f"logits tensor [B, num_classes]; wrap it (e.g. a module returning outputs[0])")
    if not isinstance(logits, Tensor):
        raise ValueError(f"the model must return a logits tensor [B, num_classes], got {type(logits).__name__}")
    if logits.dim() != 2 or logits.shape[0] != x.shape[0]:
        raise ValueError(f"the model must return logits of shape [B, num_classes] = [{x.shape[0]}, C], got "
                         f"{tuple(logits.shape)}")
