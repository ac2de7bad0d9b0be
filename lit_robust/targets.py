"""Targets are class indices ``[B]`` or probability rows ``[B, num_classes]``.

Probability rows come from CutMix, per-sample label smoothing and generated data
(:mod:`lit_robust.datamodules.mixing`, :class:`~lit_robust.datamodules.GeneratedDataModule`). Every
defense's loss and the training attacks take both forms: a cross-entropy against a row is the
expectation of the per-class cross-entropies under it (``F.cross_entropy`` computes it), and a loss
defined through one true class (MART's terms) is averaged over the row the same way. What needs one
class, a margin or DLR attack, an accuracy to report, a certificate, refuses rows with
:func:`require_class_labels`. Everything here reads shapes and dtypes only, never values (no host sync).
"""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor


def is_probability_rows(y: Tensor) -> bool:
    """True for floating-point ``[B, K]`` targets (probability rows), False for ``[B]`` class indices."""
    return y.dim() == 2 and y.is_floating_point()


def probability_rows(y: Tensor, num_classes: Optional[int] = None) -> Tensor:
    """``y`` as float rows ``[B, K]``: one-hot rows of class indices (``num_classes`` needed), rows unchanged."""
    if is_probability_rows(y):
        if num_classes is not None and y.shape[1] != num_classes:
            raise ValueError(f"probability rows of {y.shape[1]} classes given where {num_classes} are expected")
        return y
    if num_classes is None:
        raise ValueError("num_classes is needed to turn class indices into probability rows")
    return F.one_hot(y, num_classes).float()


def class_labels(y: Tensor) -> Tensor:
    """Class indices: ``y`` itself, or each row's most likely class (the heavier label of a CutMix pair, the
    smoothed label): what a training accuracy compares predictions with."""
    return y.argmax(1) if is_probability_rows(y) else y


def require_class_labels(y: Tensor, needed_by: str) -> Tensor:
    """``y`` when it holds class indices; a ``ValueError`` naming ``needed_by`` when it holds probability rows."""
    if is_probability_rows(y):
        raise ValueError(f"{needed_by} needs class labels [B], but the targets are probability rows "
                         f"{tuple(y.shape)} (CutMix, label smoothing or generated data give rows): use class "
                         "labels here, e.g. an evaluation split without batch transforms")
    return y
