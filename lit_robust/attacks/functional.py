"""Functional building blocks of the inner maximization.

Everything here works on a batch of [0, 1] images of shape [B, ...] and per-example tensors
of shape [B]. Nothing holds a model or parameters, nothing calls ``.backward()``, and
nothing synchronises with the host, so these pieces can sit inside a ``training_step``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_robust.targets import require_class_labels

NORMS = ("linf", "l2")
"""The threat models of PGD and of the defenses' attacks."""
LOSSES = ("ce", "margin", "dlr")
"""The attack objectives: cross-entropy, the Carlini-Wagner margin, Croce & Hein's DLR."""
_TINY = 1e-12


def check_norm(norm: str) -> str:
    """``norm`` if it is one of :data:`NORMS`, else a ``ValueError`` listing them."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    return norm


def _flat_norm(t: Tensor, p: float) -> Tensor:
    """Per-example p-norm of a batch, shaped [B, 1, ..., 1] to broadcast against it."""
    return t.flatten(1).norm(p=p, dim=1).view(-1, *([1] * (t.dim() - 1)))


def project(delta: Tensor, x: Tensor, eps: float, norm: str) -> Tensor:
    """Projects ``delta`` onto the eps-ball, then onto the [0, 1] box around ``x``.

    Ball first, box second, as in every official repository. The result lies in both sets:
    since ``x`` is in [0, 1], the box clamp only moves each coordinate of ``x + delta``
    towards ``x``, so it never leaves the ball it was projected onto.
    """
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / _flat_norm(delta, 2).clamp_min(_TINY)).clamp(max=1.0)
    return (x + delta).clamp(0.0, 1.0) - x


def random_start(x: Tensor, eps: float, norm: str, generator: torch.Generator | None = None,
                 clip: bool = True) -> Tensor:
    """A uniform draw from the eps-ball (Linf: U(-eps, eps) per pixel; L2: uniform in the ball), box-projected.

    ``clip=False`` skips the box: ``x + delta`` may leave [0, 1] on saturated pixels until the first
    ascent step's projection (the official MNIST FGSM-RS script, ``train_mnist.py``; its CIFAR-10
    script clips the start).
    """
    noise = torch.empty_like(x)
    if norm == "linf":
        noise.uniform_(-eps, eps, generator=generator)
    else:
        noise.normal_(generator=generator)
        direction = noise / _flat_norm(noise, 2).clamp_min(_TINY)
        # radius ~ eps * U^(1/d) makes the draw uniform in the d-dimensional ball
        d = x[0].numel()
        u = torch.rand(x.shape[0], device=x.device, dtype=x.dtype, generator=generator)
        noise = direction * (eps * u.pow(1.0 / d)).view(-1, *([1] * (x.dim() - 1)))
    return project(noise, x, eps, norm) if clip else noise


def gaussian_start(x: Tensor, std: float, generator: torch.Generator | None = None) -> Tensor:
    """``std * N(0, 1)`` per pixel: the TRADES / MART start (``x + 0.001 * randn``).

    Deliberately not projected, as in the official code: the first forward may see pixels a
    few ``std`` outside [0, 1], and the first ascent step's projection brings every iterate
    back into the eps-ball and the box. A zero start would not do for the TRADES KL: its
    gradient vanishes at ``x_adv = x``, where the KL has its minimum.
    """
    return std * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def ascent_step(delta: Tensor, grad: Tensor, step_size: float, norm: str) -> Tensor:
    """One steepest-ascent step: sign of the gradient for Linf, the unit gradient for L2."""
    if norm == "linf":
        return delta + step_size * grad.sign()
    return delta + step_size * grad / _flat_norm(grad, 2).clamp_min(_TINY)


def fosc(x_adv: Tensor, x: Tensor, grad: Tensor, eps: float, norm: str = "linf") -> Tensor:
    """First-order stationary condition (Wang et al., ICML 2019), one value per example.

    ``c(x_k) = max_{x' in ball(x, eps)} <x' - x_k, g> = eps * ||g||_* - <x_k - x, g>``, where
    ``||.||_*`` is the dual norm (L1 for Linf, L2 for L2) and ``g`` is the gradient of the
    *per-example* loss at ``x_k`` (sum, not mean, over the batch: a mean divides FOSC by B).
    The [0, 1] box is ignored, as in the official code. ``c >= 0``; 0 means stationary.

    Reference point: the paper measures from the clean image (pass it as ``x``); the official
    ``pgd_attack.py`` (``original_batch_x``, copied after the random start) measures from the
    attack's starting point; pass that as ``x`` for the official variant. Computed in the
    inputs' precision, at least float32 (bf16 / fp16 are cast up, float64 stays float64).
    """
    g = upcast(grad.flatten(1))
    dual = g.abs().sum(1) if check_norm(norm) == "linf" else g.norm(dim=1)
    return eps * dual - (upcast((x_adv - x).flatten(1)) * g).sum(1)


def margin_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Carlini-Wagner margin, per example: max_{j != y} z_j - z_y (positive once misclassified); needs class
    labels (probability rows have no single true class to take the margin from)."""
    require_class_labels(y, "the margin and DLR losses")
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return other - true


def dlr_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Difference of logits ratio (Croce & Hein, ICML 2020), per example, to be maximised.

    ``-(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3 + 1e-12)`` with ``z_pi`` the sorted logits;
    scale-invariant, so it does not saturate the way CE does. Needs at least 3 classes.
    """
    top = logits.sort(dim=1, descending=True).values
    return margin_loss(logits, y) / (top[:, 0] - top[:, 2] + _TINY)


def upcast(t: Tensor) -> Tensor:
    """``t`` in at least float32 (bf16 / fp16 logits are cast up, float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def kl_loss(logits: Tensor, clean_logits: Tensor) -> Tensor:
    """``KL(softmax(clean_logits) || softmax(logits))`` per example [B] (TRADES, Zhang et al. 2019).

    The sum over classes of ``p * (log p - log q)``; its sum over the batch is the official
    ``nn.KLDivLoss(size_average=False)``, its mean the ``batchmean`` of the outer loss. Both
    distributions are taken in log space, so a class probability that underflows to zero
    gives neither ``log 0`` nor a NaN gradient. Gradients flow into both arguments: detach
    ``clean_logits`` yourself if you want the clean distribution fixed.
    """
    log_q = F.log_softmax(upcast(logits), dim=1)
    log_p = F.log_softmax(upcast(clean_logits), dim=1)
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(1)


def distribution_kl(logits: Tensor, targets: Tensor) -> Tensor:
    """``KL(t || softmax(logits))`` per example [B] for a fixed target distribution ``t``: probability rows
    [B, K] (zeros allowed: ``0 log 0 = 0``), or class indices [B] taken as one-hot rows (the KL is then the
    cross-entropy). Its input gradient is that of the cross-entropy against ``t``."""
    log_q = F.log_softmax(upcast(logits), dim=1)
    if targets.dim() == 1:
        return -log_q.gather(1, targets[:, None]).squeeze(1)
    p = upcast(targets)
    return (torch.xlogy(p, p) - p * log_q).sum(1)


def per_example_loss(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The attack objective by name: logits, labels -> per-example loss [B] to maximise."""
    if name == "ce":  # labels or probability rows (then the expected CE under each row)
        return lambda logits, y: F.cross_entropy(logits, y, reduction="none")
    if name == "margin":
        return margin_loss
    if name == "dlr":
        return dlr_loss
    raise ValueError(f"loss must be one of {LOSSES}, got {name!r}")


def loss_and_input_grad(
    model: nn.Module, x: Tensor, delta: Tensor, y: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-example loss, logits and d(sum of losses)/d(delta) by ``torch.autograd.grad``.

    ``y`` is whatever ``loss_fn`` compares the logits with: labels for CE / margin / DLR,
    the clean logits for :func:`kl_loss`.

    Summing keeps each example's gradient at its own scale (what FOSC needs) and leaves
    every parameter's ``.grad`` untouched, so DDP's reducer never fires.
    """
    delta = delta.detach().requires_grad_(True)
    logits = model(x + delta)
    losses = loss_fn(logits, y)
    (grad,) = torch.autograd.grad(losses.sum(), delta)
    return losses.detach(), logits.detach(), grad


# --- the L1 threat model (Maini et al., ICML 2020; Tramer & Boneh, NeurIPS 2019) ---------------------------

UNION_NORMS = ("linf", "l2", "l1")
"""The threat models of multiple-norm training (``lit_robust.attacks.union``)."""


def project_l1_ball(delta: Tensor, eps: float) -> Tensor:
    """The Euclidean projection of each example of ``delta`` onto the L1 ball of radius ``eps``, exactly.

    Duchi et al.'s sort-based rule (ICML 2008): with ``mu`` the magnitudes sorted in decreasing order and
    ``rho`` the largest ``j`` with ``mu_j > (mu_1 + ... + mu_j - eps) / j``, the projection soft-thresholds
    every magnitude by ``theta = (mu_1 + ... + mu_rho - eps) / rho`` and keeps the signs. Examples already
    in the ball have ``theta <= 0`` and come back unchanged (the official MSD code, which projects the
    whole batch once one example is outside, moves them too). Computed in at least float32.
    """
    flat = upcast(delta.flatten(1))
    magnitude = flat.abs()
    ordered = magnitude.sort(dim=1, descending=True).values
    cumulative = ordered.cumsum(1)
    j = torch.arange(1, flat.shape[1] + 1, device=flat.device, dtype=flat.dtype)
    # the condition holds for j = 1 .. rho and fails after: rho is the largest j where it holds
    rho = ((ordered * j > cumulative - eps) * j).amax(1, keepdim=True).clamp_min(1)
    theta = ((cumulative.gather(1, rho.long() - 1) - eps) / rho).clamp_min(0)
    projected = flat.sign() * (magnitude - theta).clamp_min(0)
    return projected.view_as(delta).to(delta.dtype)


def project_l1(delta: Tensor, x: Tensor, eps: float) -> Tensor:
    """:func:`project` for the L1 ball: onto the ball (:func:`project_l1_ball`), then the [0, 1] box around ``x``.

    Ball first, box second, as the official CIFAR-10 MSD code, both official L1 PGDs and SLIDE do (the
    official MNIST MSD code clamps to the box first, then projects onto the ball). The clamp only
    moves coordinates towards ``x``, so the result lies in both sets; it is not the exact projection onto
    their intersection (Croce & Hein 2021 compute that), which ``l1_ascent_step`` makes matter less by not
    pushing coordinates that already sit at the box.
    """
    return (x + project_l1_ball(delta, eps)).clamp(0.0, 1.0) - x


def l1_random_start(x: Tensor, eps: float, generator: torch.Generator | None = None, clip: bool = True) -> Tensor:
    """A uniform draw from the L1 ball of radius ``eps`` around each example, box-projected (``clip``).

    A vector of i.i.d. Laplace draws divided by its L1 norm is uniform on the L1 sphere (Tramer & Boneh's
    start direction); the radius ``eps * U^(1/d)`` makes the draw uniform in the d-dimensional ball.
    """
    noise = torch.empty_like(x).exponential_(generator=generator)
    signs = torch.empty_like(x).bernoulli_(0.5, generator=generator) * 2 - 1
    direction = noise * signs / _flat_norm(noise, 1).clamp_min(_TINY)
    u = torch.rand(x.shape[0], device=x.device, dtype=x.dtype, generator=generator)
    noise = direction * (eps * u.pow(1.0 / x[0].numel())).view(-1, *([1] * (x.dim() - 1)))
    return project_l1(noise, x, eps) if clip else noise


def l1_ascent_step(delta: Tensor, grad: Tensor, x: Tensor, step_size: float, k: int | Tensor,
                   gap: float | Tensor = 0.0, skip_saturated: bool = False) -> Tensor:
    """One k-sparse steepest-ascent step for the L1 ball: ``step_size`` of L1 length spread evenly over the
    ``k`` coordinates with the largest ``|grad|`` (SLIDE, Tramer & Boneh 2019; the top-k step of MSD).

    The exact L1 steepest-ascent direction moves one coordinate; spreading the step over k of them makes
    progress in few iterations. Coordinates the step cannot move are left out first: those within ``gap``
    of the side of the [0, 1] box the gradient pushes them towards (``x + delta >= 1 - gap`` with a positive
    gradient, ``<= gap`` with a negative one). ``skip_saturated`` also leaves out every coordinate sitting
    at 0 or 1 whatever the gradient's sign, as the official MSD code's ``l1_dir_topk`` does (on MNIST or the
    digits, whose background is exactly 0, the step then never touches the background). Ties at the k-th
    magnitude are all taken; each chosen coordinate moves by ``step_size / (number chosen)``, so the step's L1
    norm is ``step_size`` unless no coordinate can move. ``k`` is an int, clipped to the number of
    coordinates, or an integer tensor (0-dim: one k for the batch; ``[B]``: one per example) read on the
    device, without a host synchronisation; ``gap`` may be a 0-dim tensor.
    """
    current = x + delta
    blocked = ((grad > 0) & (current >= 1 - gap)) | ((grad < 0) & (current <= gap))
    if skip_saturated:
        blocked = blocked | (current <= 0) | (current >= 1)
    g = grad.masked_fill(blocked, 0).flatten(1)
    magnitude = g.abs()
    n = g.shape[1]
    if isinstance(k, Tensor):
        position = (k.to(device=g.device, dtype=torch.long).clamp(1, n) - 1).reshape(-1, 1).expand(g.shape[0], 1)
        kth = magnitude.sort(dim=1, descending=True).values.gather(1, position)
    else:
        kth = magnitude.topk(min(int(k), n), dim=1).values[:, -1:]
    chosen = ((magnitude >= kth) & (magnitude > 0)).to(g.dtype)
    direction = g.sign() * chosen / chosen.sum(1, keepdim=True).clamp_min(1)
    return delta + step_size * direction.view_as(delta)


def slide_k(n: int, percentile: float) -> int:
    """How many of ``n`` coordinates lie at or above the ``percentile``-th percentile of their magnitudes (distinct
    values, numpy's linear interpolation): SLIDE's sparsity, e.g. 31 of CIFAR-10's 3,072 at the 99th."""
    if not 0 <= percentile < 100:
        raise ValueError(f"percentile must be in [0, 100), got {percentile}")
    return max(1, n - math.ceil((n - 1) * percentile / 100))
