"""Randomized-smoothing certification (L2), Lightning-free and GPU-batched.

Implements PREDICT and CERTIFY of Cohen, Rosenfeld, Kolter, "Certified Adversarial Robustness via
Randomized Smoothing", ICML 2019 (official code: github.com/locuslab/smoothing, ``code/core.py``);
this is an own implementation of the published algorithm. The smoothed classifier is
``g(x) = argmax_c P(f(x + eps) = c)``, ``eps ~ N(0, sigma^2 I)``.

- Noise is added in [0, 1] pixel space, so the base model must map [0, 1] images to logits with the
  normalisation inside the model; radii are then L2 distances in pixel space.
- CERTIFY picks the candidate class from ``n0`` selection draws and estimates its probability from
  ``n`` further, independent draws (the same generator, consumed in that order).
- With ``n = 1e5`` and ``alpha = 1e-3`` the largest certifiable radius is about ``3.81 * sigma``.
- Cost: ``n0 + n`` forward passes per example for CERTIFY (``n`` for PREDICT). ``progress``
  shows a bar over the noisy images (None: only when stderr is a terminal).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from scipy.stats import beta, binomtest, norm
from torch import Tensor, nn

from lit_robust.evaluation.progress import progress_bar

__all__ = ["ABSTAIN", "Smooth", "average_certified_radius", "certified_accuracy", "clopper_pearson_lower"]

ABSTAIN = -1
"""The class a smoothed classifier returns when its test cannot decide (Cohen et al.'s abstention)."""


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def clopper_pearson_lower(successes, trials: int, alpha: float) -> np.ndarray:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion (0 where k == 0)."""
    _check_alpha(alpha)
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    k = np.asarray(successes, dtype=np.float64)
    if np.any(k < 0) or np.any(k > trials):
        raise ValueError(f"successes must lie in [0, trials={trials}]")
    safe_k = np.where(k > 0, k, 1.0)  # beta.ppf is undefined for a = 0
    return np.where(k > 0, beta.ppf(alpha, safe_k, trials - safe_k + 1), 0.0).astype(np.float64)


class Smooth:
    """Gaussian-smoothed version of a base classifier ``model`` with noise level ``sigma``."""

    def __init__(self, model: nn.Module, sigma: float, num_classes: int | None = None, batch_size: int = 1000):
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.model, self.sigma, self.num_classes, self.batch_size = model, float(sigma), num_classes, batch_size

    @torch.no_grad()
    def sample_counts(self, x: Tensor, n: int, generator: torch.Generator | None = None, *,
                      progress: bool | None = None, desc: str = "sampling") -> Tensor:
        """Class counts of the base model's argmax over ``n`` noisy copies of each example: int64 ``[B, K]``.

        All ``B * n`` (draw, example) pairs are enumerated draw-major and forwarded in chunks of at most
        ``batch_size`` images, so each chunk holds about ``batch_size / B`` draws of every example.
        ``progress``: a bar named ``desc`` over the noisy images.
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        x = x.detach().to(torch.float32)
        b, device = x.shape[0], x.device
        flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        counts = None
        bar = progress_bar(progress, desc, b * n, "image")
        try:
            with torch.autocast(device_type=device.type, enabled=False), bar:
                for start in range(0, b * n, self.batch_size):
                    example = torch.arange(start, min(start + self.batch_size, b * n), device=device) % b
                    batch = x[example]
                    noise = torch.randn(batch.shape, generator=generator, device=device, dtype=torch.float32)
                    logits = self.model(batch + self.sigma * noise).float()
                    if self.num_classes is None:
                        self.num_classes = logits.shape[-1]
                    if logits.shape[-1] != self.num_classes:
                        raise ValueError(f"model returned {logits.shape[-1]} logits, expected {self.num_classes}")
                    flat = example * self.num_classes + logits.argmax(dim=-1)
                    chunk = torch.bincount(flat, minlength=b * self.num_classes).view(b, self.num_classes)
                    counts = chunk if counts is None else counts + chunk
                    bar.update(len(example))
        finally:
            for module, flag in flags:
                module.training = flag
        if counts is None:  # empty batch
            counts = torch.zeros(0, self.num_classes or 0, dtype=torch.int64, device=device)
        return counts

    def predict(self, x: Tensor, n: int = 100_000, alpha: float = 0.001,
                generator: torch.Generator | None = None, *, progress: bool | None = None) -> Tensor:
        """Cohen's PREDICT: top class, or ABSTAIN unless a two-sided binomial test of top-1 vs top-2 has p <= alpha."""
        _check_alpha(alpha)
        counts = self.sample_counts(x, n, generator, progress=progress, desc="smoothing: predict")
        top = counts.topk(min(2, counts.shape[1]), dim=1)
        values, classes = top.values.cpu().numpy(), top.indices[:, 0].cpu().numpy()
        out = []
        for row, cls in zip(values, classes):
            n1, n2 = int(row[0]), int(row[1]) if len(row) > 1 else 0
            out.append(int(cls) if binomtest(n1, n1 + n2, 0.5).pvalue <= alpha else ABSTAIN)
        return torch.tensor(out, dtype=torch.int64, device=x.device)

    def certify(self, x: Tensor, n0: int = 100, n: int = 100_000, alpha: float = 0.001,
                generator: torch.Generator | None = None, *, progress: bool | None = None) -> tuple[Tensor, Tensor]:
        """Cohen's CERTIFY: ``(prediction, L2 radius)``, ``(ABSTAIN, 0)`` where the lower bound on p_A is < 0.5."""
        if n0 < 1:
            raise ValueError(f"n0 must be >= 1, got {n0}")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        _check_alpha(alpha)
        c_hat = self.sample_counts(x, n0, generator, progress=progress, desc="certify: select class").argmax(dim=1)
        n_a = self.sample_counts(x, n, generator, progress=progress, desc="certify: estimate p_A")
        n_a = n_a.gather(1, c_hat[:, None])[:, 0]
        p_lower = clopper_pearson_lower(n_a.cpu().numpy(), n, alpha)
        certified = p_lower >= 0.5
        radius = np.where(certified, self.sigma * norm.ppf(np.maximum(p_lower, 0.5)), 0.0)
        prediction = torch.where(torch.from_numpy(certified).to(x.device), c_hat, torch.full_like(c_hat, ABSTAIN))
        return prediction, torch.from_numpy(radius).to(device=x.device, dtype=torch.float64)


def certified_accuracy(prediction: Tensor, radius: Tensor, y: Tensor, radii: Sequence[float]) -> Tensor:
    """Fraction of examples predicted correctly with radius >= r, for each r in ``radii``; ABSTAIN is wrong."""
    correct = (prediction == y) & (prediction != ABSTAIN)
    radius = radius if radius.is_floating_point() else radius.float()
    thresholds = torch.as_tensor(list(radii), dtype=radius.dtype, device=radius.device)
    return (correct[None, :] & (radius[None, :] >= thresholds[:, None])).to(radius.dtype).mean(dim=1)


def average_certified_radius(prediction: Tensor, radius: Tensor, y: Tensor) -> Tensor:
    """ACR = mean over examples of ``radius`` where correct, 0 otherwise (SmoothMix's ``analyze.py``)."""
    correct = (prediction == y) & (prediction != ABSTAIN)
    radius = radius if radius.is_floating_point() else radius.float()
    return (correct.to(radius.dtype) * radius).mean()
