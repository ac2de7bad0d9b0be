"""Batch transforms whose targets are probability rows: per-sample label smoothing and CutMix.

Targets in lit_robust are class indices ``[B]`` or probability rows ``[B, num_classes]``
(:mod:`lit_robust.targets`); these transforms produce the second form, which every defense's
loss and the training attacks accept.

Both follow DeepMind's adversarial-robustness code (Gowal et al. 2021, Rebuffi et al. 2021;
github.com/google-deepmind/deepmind-research/tree/master/adversarial_robustness, ``jax/utils.py``
``cutmix`` and ``jax/experiment.py`` ``concatenate``). They run on the batch's device and never
read a tensor value on the host.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor
from torch.distributions import Beta

from lit_robust.targets import probability_rows


def smooth_labels(y: Tensor, num_classes: int, smoothing: Union[float, Tensor]) -> Tensor:
    """``(1 - s) * onehot(y) + s / num_classes`` per row, ``s`` a float or one value per sample ``[B]``.

    ``y`` holds class indices or probability rows. DeepMind smooths the generated samples only
    (``extra_label_smoothing=0.1``: 0.91 on the label, 0.01 elsewhere for CIFAR-10): pass
    ``smoothing = 0.1 * is_generated``.
    """
    rows = probability_rows(y, num_classes)
    s = torch.as_tensor(smoothing, dtype=rows.dtype, device=rows.device)
    if s.dim() == 1:
        s = s[:, None]
    return (1 - s) * rows + s / num_classes


def cutmix(x: Tensor, y: Tensor, alpha: float = 1.0, beta: float = 1.0, num_classes: Optional[int] = None,
           split: int = 1) -> tuple[Tensor, Tensor]:
    """CutMix (Yun et al., ICCV 2019) as DeepMind's ``utils.cutmix``: images ``x [B, C, H, W]`` and targets ``y``
    (indices, with ``num_classes``, or probability rows) to mixed images and probability rows.

    One draw for the batch: ``lam ~ Beta(alpha, beta)``, a box of ``int(sqrt(1 - lam) * H)`` by
    ``int(sqrt(1 - lam) * W)`` pixels centred at a uniform pixel and clipped to the image, a random
    permutation of the partners. Inside the box each image shows its partner; ``lam`` is then recomputed
    as ``1 - box area / (H W)`` and the targets become ``lam * y + (1 - lam) * y[perm]``.

    ``split > 1`` mixes within ``split`` sub-batches (sample ``i`` in sub-batch ``i % split``), with the
    same box and permutation in each, as DeepMind does over its emulated workers: a real image repeated
    ``split`` times in a row is then never mixed with its own copy. Draws come from torch's generator on
    ``x``'s device (no host synchronisation).
    """
    if alpha <= 0 or beta <= 0:
        raise ValueError(f"alpha and beta must be > 0, got {alpha}, {beta}")
    if split < 1 or x.shape[0] % split:
        raise ValueError(f"split must be >= 1 and divide the batch of {x.shape[0]}, got {split}")
    rows = probability_rows(y, num_classes)
    if rows.shape[0] != x.shape[0]:
        raise ValueError(f"one target per image: {x.shape[0]} images, {rows.shape[0]} targets")
    device, (h, w) = x.device, x.shape[-2:]
    lam = Beta(torch.tensor(float(alpha), device=device), torch.tensor(float(beta), device=device),
               validate_args=False).sample()
    cut = (1 - lam).sqrt()
    cut_h, cut_w = (h * cut).to(torch.int64), (w * cut).to(torch.int64)
    centre_y = torch.randint(0, h, (), device=device)
    centre_x = torch.randint(0, w, (), device=device)
    top, bottom = (centre_y - cut_h // 2).clamp(0, h), (centre_y + cut_h // 2).clamp(0, h)
    left, right = (centre_x - cut_w // 2).clamp(0, w), (centre_x + cut_w // 2).clamp(0, w)
    rows_in = (torch.arange(h, device=device) >= top) & (torch.arange(h, device=device) < bottom)
    cols_in = (torch.arange(w, device=device) >= left) & (torch.arange(w, device=device) < right)
    box = rows_in[:, None] & cols_in[None, :]
    lam = 1 - box.sum().to(rows.dtype) / (h * w)
    sub = x.shape[0] // split
    # sample i = b * split + j sits in sub-batch j; its partner is sample perm[b] * split + j
    perm = torch.randperm(sub, device=device)
    partner = (perm[:, None] * split + torch.arange(split, device=device)).flatten()
    mixed = torch.where(box, x[partner], x)
    return mixed, lam * rows + (1 - lam) * rows[partner]
