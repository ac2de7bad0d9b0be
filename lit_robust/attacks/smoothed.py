"""The SmoothMix adversary: L2 ascent on the Gaussian-smoothed *soft* classifier.

Jeong, Park, Kim & Shin, "SmoothMix: Training Confidence-calibrated Smoothed Classifiers for
Certified Robustness", NeurIPS 2021. Official code: github.com/jh-jeong/smoothmix
(``code/train.py``, class ``SmoothMix_PGD``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_robust.attacks import functional as AF
from lit_robust.attacks.pgd import module_mode
from lit_robust.targets import is_probability_rows


def log_mean_softmax(logits: Tensor) -> Tensor:
    """``log((1/m) sum_i softmax(logits[i]))`` of logits ``[m, B, K]``: ``[B, K]``, in at least float32.

    The log of the soft smoothed classifier's m-sample estimate, computed in log space
    (``logsumexp`` of the log-softmaxes minus ``log m``), so no probability underflows to a
    ``log 0``. Gradients flow into every ``logits[i]``.
    """
    return torch.logsumexp(F.log_softmax(AF.upcast(logits), dim=-1), dim=0) - math.log(logits.shape[0])


def project_l2(z: Tensor, x: Tensor, radius: float) -> Tensor:
    """``z`` moved into the L2 ball of ``radius`` around ``x`` (per example), then clipped to [0, 1].

    Ball first, box second, as the official ``_project`` (``renorm`` then ``clamp``). One difference:
    ``torch.renorm`` scales a too-long ``delta`` by ``radius / (||delta|| + 1e-7)``, leaving it just inside
    the ball (relative shortfall ``1e-7 / ||delta||``, 2e-7 at ``||delta|| = 0.5``: float32 noise); here
    the factor is ``radius / ||delta||``, so the result lies on the sphere.
    """
    delta = z - x
    norm = delta.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))
    delta = delta * (radius / norm.clamp_min(1e-12)).clamp(max=1.0)
    return (x + delta).clamp(0.0, 1.0)


def smoothed_nll(model: nn.Module, x: Tensor, y: Tensor, noises: Tensor) -> Tensor:
    """Per-example ``-log((1/m) sum_i softmax(f(x + noises[i]))[y])`` ``[B]``: one forward of m*B images
    (probability rows ``y``: the expectation of that over each row's classes)."""
    m, b = noises.shape[:2]
    logits = model((x.unsqueeze(0) + noises).flatten(0, 1))
    log_p = log_mean_softmax(logits.view(m, b, -1))
    return -(y * log_p).sum(1) if is_probability_rows(y) else F.nll_loss(log_p, y, reduction="none")


def smoothmix_attack(model: nn.Module, x: Tensor, y: Tensor, noises: Tensor, steps: int, step_size: float,
                     mix_step: int = 0, max_norm: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """The SmoothMix adversary (Jeong et al., NeurIPS 2021; github.com/jh-jeong/smoothmix, ``code/train.py``).

    From ``x^0 = x``, ``steps`` (T) ascent steps on the NLL of the smoothed soft classifier,
    estimated with the given noises (the same ones the training loss then uses)::

        l(x^t)    = sum_b -log( (1/m) sum_i softmax(f(x^t_b + noises[i, b]))[y_b] )
        x^{t+1}   = clip_[0,1]( Proj_{||. - x||_2 <= max_norm}( x^t + step_size * g / ||g||_2 ) ),  g = grad l(x^t)

    The gradient is normalised per example (L2), the ball projection is skipped when
    ``max_norm`` is None (the official default: the adversary is unbounded, only the [0, 1]
    box holds it), and the loss is taken on the *averaged softmax*, not on each noisy copy.

    Returns ``(x_init, x_adv)``, both detached: ``x_init = x^mix_step`` (``mix_step=0``: the
    clean ``x`` itself; 1: the one-step adversary) and ``x_adv = x^T``. The warmed-up
    projection of ``x_init`` (the official ``maxnorm_s``) is the caller's, since it depends on
    the epoch (see :class:`~lit_robust.defenses.smoothing.SmoothMix`).

    The model runs in eval mode (every submodule's own flag is restored afterwards); only
    input gradients are taken (``torch.autograd.grad``), so no parameter ``.grad`` is touched.

    Args:
        model: maps [0, 1] images to logits.
        x, y: clean batch ``[B, ...]`` in [0, 1] and its labels ``[B]``.
        noises: ``[m, B, ...]`` Gaussian noises in pixel units (``sigma * N(0, I)``).
        steps: T >= 1 (4 in the CIFAR-10 recipe).
        step_size: alpha > 0, L2 (official CIFAR-10: ``2 * sigma``).
        mix_step: which iterate is ``x_init``, in ``[0, steps)``.
        max_norm: optional L2 radius around ``x`` for every iterate.

    Cost: T forward+input-backward passes over ``m * B`` images.

    Differences from the official code: the log of the averaged softmax is computed in log
    space (the official ``log(clamp(p, 1e-20))``; same value unless a probability is below
    1e-20), and the gradient norm is clamped at 1e-12 rather than offset by 1e-8.
    """
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps}")
    if not step_size > 0:
        raise ValueError(f"step_size must be > 0, got {step_size}")
    if int(mix_step) != mix_step or not 0 <= mix_step < steps:
        raise ValueError(f"mix_step must be an integer in [0, steps={steps}), got {mix_step}")
    if max_norm is not None and not max_norm > 0:
        raise ValueError(f"max_norm must be > 0 or None, got {max_norm}")
    if noises.dim() != x.dim() + 1 or noises.shape[1:] != x.shape:
        raise ValueError(f"noises must be [m, *x.shape] = [m, {', '.join(map(str, x.shape))}], "
                         f"got {list(noises.shape)}")
    x, noises = x.detach(), noises.detach()
    x_t, x_init = x, x
    with module_mode(model, "eval"), torch.enable_grad():
        for t in range(int(steps)):
            if t == mix_step:
                x_init = x_t
            x_t = x_t.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(smoothed_nll(model, x_t, y, noises).sum(), x_t)
            stepped = AF.ascent_step(x_t.detach(), grad, step_size, "l2")
            x_t = stepped.clamp(0.0, 1.0) if max_norm is None else project_l2(stepped, x, max_norm)
    return x_init.detach(), x_t.detach()
