"""Gaussian Loss Smoothing (GLS): gradient estimators for a loss smoothed in weight space.

Balauca, Mueller, Mao, Baader, Fischer, Vechev, "Gaussian Loss Smoothing Enables Certified Training with
Tight Convex Relaxations", TMLR 2025 (arXiv 2403.07095); official code github.com/stefanrzv2000/GLS-Cert-Training
(not read; this is an own implementation of the standard formulas).

GLS trains on ``L_sigma(theta) = E_{e ~ N(0, sigma^2 I)} L(theta + e)``, where ``L`` is a certified loss. It
smooths the *weights*, not the inputs (the opposite of randomized smoothing). Two estimators of
``grad L_sigma``:

* **PGPE** (Sehnke et al. 2010, symmetric sampling, zeroth order):
  ``g = (1/n) sum_i e_i (L(theta + e_i) - L(theta - e_i)) / (2 sigma^2)``. Cost: ``2n`` forward bound
  evaluations, no backward. Unbiased even when ``L`` is discontinuous in ``theta``, but the variance grows
  with the parameter count, so it is practical only for small (CNN3-size) networks.
* **RGS** (randomized gradient smoothing, first order): ``g = (1/k) sum_i grad L(theta + e_i)``. Cost:
  ``k`` forward + backward passes. Biased when ``L`` is discontinuous in ``theta`` (e.g. CROWN-IBP's
  adaptive ReLU lower slope switching between 0 and 1): averaging almost-everywhere gradients misses the
  jumps. ``sigma = 0`` gives the plain gradient.

Choices: sigma is fixed (standard PGPE also adapts sigma; whether GLS does is unverified); no fitness
shaping; common random numbers, i.e. ``loss_fn`` must use the same batch for every evaluation of one step
(that is the caller's job). Noise is drawn per parameter tensor, per pair/sample, in dict order, with
``torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype) * sigma`` (so a generator must
live on the parameters' device). Gradients are accumulated one pair/sample at a time, so memory does not
grow with the population. :func:`smoothed_surrogate` turns an estimate into a scalar for ``backward()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from numbers import Integral, Real

import torch
from torch import Tensor

__all__ = ["ESTIMATORS", "pgpe_gradient", "rgs_gradient", "smoothed_surrogate"]

ESTIMATORS = ("rgs", "pgpe")
"""GLS's gradient estimators: randomized gradient smoothing and PGPE (antithetic parameter-exploring pairs)."""

LossFn = Callable[[dict[str, Tensor]], Tensor]


def _check(sigma, count, count_name: str, allow_zero_sigma: bool) -> None:
    if not isinstance(sigma, Real) or not math.isfinite(sigma) or sigma < 0 or (sigma == 0 and not allow_zero_sigma):
        raise ValueError(f"sigma must be a finite number {'>=' if allow_zero_sigma else '>'} 0, got {sigma!r}")
    if not isinstance(count, Integral) or isinstance(count, bool) or count < 1:
        raise ValueError(f"{count_name} must be an integer >= 1, got {count!r}")


def _noise(params: dict[str, Tensor], sigma: float, generator: torch.Generator | None) -> dict[str, Tensor]:
    return {k: torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype) * sigma
            for k, p in params.items()}


def _scalar(loss: Tensor) -> Tensor:
    if loss.numel() != 1:
        raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
    return loss.reshape(())


def pgpe_gradient(loss_fn: LossFn, params: dict[str, Tensor], sigma: float, pairs: int,
                  generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """PGPE with antithetic pairs and fixed sigma: ``(mean of the 2*pairs losses, gradient estimate)``."""
    _check(sigma, pairs, "pairs", allow_zero_sigma=False)
    theta = {k: p.detach() for k, p in params.items()}
    grads = {k: torch.zeros_like(p) for k, p in theta.items()}
    total = None
    with torch.no_grad():
        for _ in range(pairs):
            eps = _noise(theta, sigma, generator)
            plus = _scalar(loss_fn({k: p + eps[k] for k, p in theta.items()}))
            minus = _scalar(loss_fn({k: p - eps[k] for k, p in theta.items()}))
            diff = plus - minus
            for k, e in eps.items():
                grads[k] += e * diff
            total = plus + minus if total is None else total + plus + minus
    scale = 1.0 / (2.0 * sigma ** 2 * pairs)
    return total.detach() / (2 * pairs), {k: g * scale for k, g in grads.items()}


def rgs_gradient(loss_fn: LossFn, params: dict[str, Tensor], sigma: float, samples: int,
                 generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Randomized gradient smoothing: ``(mean loss over samples, mean of grad L(theta + e_i))``."""
    _check(sigma, samples, "samples", allow_zero_sigma=True)
    theta = {k: p.detach() for k, p in params.items()}
    grads = {k: torch.zeros_like(p) for k, p in theta.items()}
    total = None
    for _ in range(samples):
        eps = _noise(theta, sigma, generator) if sigma > 0 else None
        point = {k: (p + eps[k] if eps is not None else p.clone()).requires_grad_(True) for k, p in theta.items()}
        loss = _scalar(loss_fn(point))
        parts = torch.autograd.grad(loss, list(point.values()), allow_unused=True)
        for k, g in zip(point, parts):
            if g is not None:
                grads[k] += g
        total = loss.detach() if total is None else total + loss.detach()
    return total / samples, {k: g / samples for k, g in grads.items()}


def smoothed_surrogate(loss: Tensor, params: Mapping[str, Tensor] | Iterable[Tensor],
                       grads: Mapping[str, Tensor] | Iterable[Tensor]) -> Tensor:
    """A scalar equal to ``loss`` (detached) whose gradient w.r.t. each parameter is the given (detached) grad.

    ``params`` and ``grads`` are both dicts with the same keys, or sequences in the same order.
    """
    if isinstance(params, Mapping):
        if isinstance(grads, Mapping):
            if set(params) != set(grads):
                raise ValueError(f"params and grads have different keys: {sorted(set(params) ^ set(grads))}")
            grads = [grads[k] for k in params]
        params = list(params.values())
    params, grads = list(params), list(grads)
    if len(params) != len(grads):
        raise ValueError(f"got {len(params)} params but {len(grads)} grads")
    inner = sum(((p * g.detach()).sum() for p, g in zip(params, grads)), loss.new_zeros(()))
    return loss.detach() + (inner - inner.detach())
