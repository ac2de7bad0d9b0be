"""Input-Jacobian regularisation (Hoffman, Roberts & Yaida, "Robust Learning with Jacobian Regularization",
arXiv 1908.02729, 2019; official code github.com/facebookresearch/jacobian_regularizer, ``jacobian/jacobian.py``),
the Jacobian half of J-SIGR (Liu et al., Pattern Recognition 145, 2024).

The penalty is the squared Frobenius norm of the Jacobian ``J(x) = d f(x) / d x`` of the logits with respect to
the [0, 1] pixels, estimated with random projections: for ``v`` uniform on the unit sphere of ``R^C``,
``E[v v^T] = I / C``, so ``C * ||v^T J||^2`` is an unbiased estimate of ``||J||_F^2`` and ``v^T J`` costs one
backward pass (a vector-Jacobian product), where the exact norm costs ``C`` of them. Taken with ``create_graph``,
the estimate is differentiable in the weights, so the training backward runs through it (double backpropagation).

Reading the batch: ``v`` is drawn per example (``[B, C]``) and one backward of ``sum_b v_b . f(x)_b`` gives every
example's ``v_b^T J_b`` at once, exact when the examples do not interact (eval mode, or no BatchNorm). Under
train-mode BatchNorm each example's output also depends on the others through the batch statistics, and the
product then includes that coupling (of order 1/B), as the official code's does.

Cost of :func:`jacobian_penalty`: one forward of its own plus ``num_projections`` backward passes that keep their
graph, and, in the training backward, one more pass back through each of those (double backpropagation).
Measured on a CPU, one projection costs 2.4 (PreActResNet-18, batch 32) to 3.1 (SmallCNN, batch 64)
forward+backward passes on top of the loss's own, each further projection 0.7 to 1.7 more.
:func:`jacobian_frobenius_sq_from_logits` reuses a forward that already ran.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from lit_robust.attacks.functional import upcast

__all__ = ["jacobian_frobenius_sq", "jacobian_frobenius_sq_from_logits", "jacobian_penalty"]


def _check_projections(num_projections: int) -> int:
    if int(num_projections) != num_projections or not (num_projections >= 1 or num_projections == -1):
        raise ValueError(f"num_projections must be an integer >= 1, or -1 for the exact norm, got {num_projections}")
    return int(num_projections)


def _unit_sphere(rows: int, dim: int, like: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """``rows`` vectors drawn uniformly on the unit sphere of ``R^dim`` (normalised Gaussians), in ``like``'s dtype
    and on its device."""
    v = torch.randn(rows, dim, device=like.device, generator=generator)
    return (v / v.norm(dim=1, keepdim=True)).to(like.dtype)


def jacobian_frobenius_sq_from_logits(logits: Tensor, x: Tensor, num_projections: int = 1, create_graph: bool = True,
                                      generator: Optional[torch.Generator] = None) -> Tensor:
    """Per-example estimates ``[B]`` of ``||d logits_b / d x_b||_F^2`` for ``logits [B, C]`` computed from ``x``
    (which must require gradients).

    ``num_projections`` vectors per example, each uniform on the unit sphere: the mean of ``C * ||v^T J||^2``
    (unbiased); ``-1`` takes the ``C`` basis vectors instead, the exact norm (``C`` backward passes).
    ``create_graph`` keeps the graph so that the result can be trained on. Only ``torch.autograd.grad`` is
    used: no parameter's ``.grad`` is touched.
    """
    num_projections = _check_projections(num_projections)
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, num_classes], got shape {tuple(logits.shape)}")
    if not x.requires_grad:
        raise ValueError("x must require gradients and the logits must be computed from it "
                         "(x = x.detach().requires_grad_(True); logits = model(x))")
    b, c = logits.shape
    exact = num_projections == -1
    total = torch.zeros(b, device=logits.device, dtype=upcast(logits).dtype)
    for k in range(c if exact else num_projections):
        if exact:
            v = torch.zeros_like(logits)
            v[:, k] = 1
        else:
            v = _unit_sphere(b, c, logits, generator)
        (vjp,) = torch.autograd.grad(logits, x, grad_outputs=v, retain_graph=True, create_graph=create_graph)
        total = total + upcast(vjp).flatten(1).pow(2).sum(1)
    return total if exact else total * (c / num_projections)


def jacobian_frobenius_sq(model: nn.Module, x: Tensor, num_projections: int = 1, create_graph: bool = True,
                          generator: Optional[torch.Generator] = None) -> Tensor:
    """:func:`jacobian_frobenius_sq_from_logits` on a forward of its own: ``model(x)`` with ``x`` detached and
    requiring gradients (the model in whatever mode it is in)."""
    x = x.detach().requires_grad_(True)
    return jacobian_frobenius_sq_from_logits(model(x), x, num_projections, create_graph, generator)


def jacobian_penalty(model: nn.Module, x: Tensor, num_projections: int = 1, create_graph: bool = True,
                     generator: Optional[torch.Generator] = None) -> Tensor:
    """Hoffman et al.'s regulariser ``R = (1/2) * mean_b ||J_b||_F^2``, estimated with ``num_projections`` random
    projections per example (1, the official default; -1 for the exact norm). The official ``JacobianReg``
    returns the same quantity, and its ``lambda_JR`` (0.01 in its README, 0.1 in its MNIST example) multiplies it.
    """
    return 0.5 * jacobian_frobenius_sq(model, x, num_projections, create_graph, generator).mean()
