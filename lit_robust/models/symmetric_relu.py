"""The learner of Feature Purification's theory task, a linear baseline, and the purity of a neuron.

Allen-Zhu & Li, "Feature Purification: How Adversarial Training Performs Robust Deep Learning",
FOCS 2021 (arXiv 2005.10190; no official code). The task is :class:`~lit_robust.datamodules.SparseCodingDataModule`:
``x = M z + xi`` with a unitary dictionary ``M`` and a sparse code ``z``, label ``sign(<w*, z>)``. The paper's learner
is the two-layer network

    f(x) = sum_i [ ReLU~(<w_i, x> - b) - ReLU~(-<w_i, x> - b) ]

(no output weights: each neuron is an odd, soft-thresholding function of its projection). Clean training
accumulates a small *dense mixture* in every ``w_i`` (the direction ``M w*`` that correlates with the label
everywhere), which an L2 perturbation of small radius exploits; adversarial training removes it and leaves each
neuron close to a few dictionary atoms ("purifies" it). :func:`purity` measures that on the dictionary
coefficients ``M^T w_i``.

Both networks take the DataModule's [0, 1] inputs ``0.5 + scale * x`` and undo that map first
(``(x - center) / scale``), so their weights, and radii, live in the task's own units. A 2-class logit row
``[0, f(x)]`` makes cross-entropy the logistic loss ``log(1 + exp(-y f(x)))`` with ``y = +-1`` (class 1 is
``y = +1``).

What is ours, not the paper's (its constants and exact forms were not retrieved):

* the smoothing: ``ReLU~(t) = 0`` for ``t <= 0``, ``t^2 / (2 rho)`` on ``(0, rho)``, ``t - rho / 2`` beyond
  (continuous with a continuous derivative; ``rho = 0`` gives the plain ReLU);
* one bias ``b``, the same for every neuron and fixed (a buffer, not trained). In our runs a trained bias grew
  under FGM adversarial training until every neuron was silent (a constant classifier, chance-level robust
  accuracy), so the threshold is a hyperparameter here;
* the initialisation ``w_i ~ N(0, init_scale^2 / d)`` (rows of norm about ``init_scale``), small by default so
  that training moves the weights far from it (the paper's feature-learning regime). With ``init_scale = 1``
  the clean network stayed close to its random initialisation and its purity ratio stayed the random one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def smoothed_relu(t: Tensor, rho: float) -> Tensor:
    """``0`` for ``t <= 0``, ``t^2 / (2 rho)`` on ``(0, rho)``, ``t - rho / 2`` from ``rho`` on; ``rho = 0``: ReLU."""
    if rho == 0:
        return F.relu(t)
    return torch.where(t < rho, F.relu(t).square() / (2 * rho), t - rho / 2)


class _TaskInputs(nn.Module):
    """Maps the DataModule's [0, 1] inputs ``center + scale * x`` back to the task's ``x`` (buffers, never trained).

    :class:`~lit_robust.models.Normalize` is per channel of 4-D images; these inputs are vectors ``[B, d]``.
    """

    def __init__(self, dim: int, scale: float, center: float) -> None:
        super().__init__()
        if int(dim) != dim or dim < 1:
            raise ValueError(f"dim must be an integer >= 1, got {dim}")
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.dim = int(dim)
        self.register_buffer("center", torch.tensor(float(center)))
        self.register_buffer("scale", torch.tensor(float(scale)))

    def task_inputs(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"inputs must be vectors [B, {self.dim}], got shape {tuple(x.shape)}")
        return (x - self.center) / self.scale

    @staticmethod
    def logits(f: Tensor) -> Tensor:
        """``[0, f]`` per example: class 1 (``y = +1``) wins when ``f > 0``."""
        return torch.stack([torch.zeros_like(f), f], dim=1)


class SymmetricReLUNet(_TaskInputs):
    """``f(x) = sum_i [ReLU~(<w_i, x> - b) - ReLU~(-<w_i, x> - b)]`` on the task's ``x``; returns logits ``[0, f]``.

    Args:
        dim: the input dimension ``d``.
        width: the number of neurons ``m``.
        bias: the threshold ``b`` (fixed, shared by all neurons).
        rho: the smoothing width of ``ReLU~`` (see :func:`smoothed_relu`).
        init_scale: each row ``w_i`` starts as ``N(0, init_scale^2 / d)`` per entry (norm about ``init_scale``).
        scale, center: the DataModule's map ``x01 = center + scale * x``.

    The first-layer weights ``weight`` [m, d] act on the task's ``x``; :func:`purity` reads them.
    """

    def __init__(self, dim: int, width: int = 200, bias: float = 0.05, rho: float = 0.05, init_scale: float = 0.1,
                 scale: float = 0.1, center: float = 0.5) -> None:
        super().__init__(dim, scale, center)
        if int(width) != width or width < 1:
            raise ValueError(f"width must be an integer >= 1, got {width}")
        if bias < 0:
            raise ValueError(f"bias must be >= 0, got {bias}")
        if rho < 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        if not init_scale > 0:
            raise ValueError(f"init_scale must be > 0, got {init_scale}")
        self.width, self.rho, self.init_scale = int(width), float(rho), float(init_scale)
        self.weight = nn.Parameter(torch.empty(self.width, self.dim))
        self.register_buffer("bias", torch.tensor(float(bias)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.init_scale / math.sqrt(self.dim))

    def forward(self, x: Tensor) -> Tensor:
        h = self.task_inputs(x) @ self.weight.T
        f = (smoothed_relu(h - self.bias, self.rho) - smoothed_relu(-h - self.bias, self.rho)).sum(1)
        return self.logits(f)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, width={self.width}, bias={self.bias.item():.4g}, rho={self.rho:.4g}, "
                f"scale={self.scale.item():.4g}")


class LinearNet(_TaskInputs):
    """The linear classifier ``f(x) = <u, x> + c`` on the task's ``x``, with logits ``[0, f]``: the low-complexity
    model that the paper proves cannot be robust at the radius the network reaches (``nn.Linear``'s init)."""

    def __init__(self, dim: int, scale: float = 0.1, center: float = 0.5) -> None:
        super().__init__(dim, scale, center)
        self.linear = nn.Linear(self.dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.logits(self.linear(self.task_inputs(x)).squeeze(1))


def purity(weights: Tensor, dictionary: Tensor, s: int = 1) -> Tensor:
    """The mean over neurons of ``||c_i outside its top-s||_2 / ||c_i top-s||_2`` with ``c_i = M^T w_i``.

    Args:
        weights: the first-layer weights ``[m, d]``, one neuron per row, acting on the task's ``x``
            (:attr:`SymmetricReLUNet.weight`; for ``nn.Linear`` layers, ``layer.weight``).
        dictionary: ``M`` [d, d], atoms in columns (``SparseCodingDataModule.dictionary``).
        s: how many coefficients (by magnitude) count as the neuron's features.

    0 for a neuron made of at most ``s`` atoms (pure); for a random direction and ``s = 1`` about
    ``sqrt(d / (2 ln d))`` (3.5 at ``d = 100``): the energy of the "dense mixture" relative to the features.
    Neurons with all-zero weights are left out (their ratio is undefined; NaN if all are). A tensor,
    differentiable, on the weights' device.
    """
    if weights.dim() != 2 or dictionary.dim() != 2 or dictionary.shape[0] != weights.shape[1]:
        raise ValueError(f"weights must be [m, d] and dictionary [d, atoms], got {tuple(weights.shape)} and "
                         f"{tuple(dictionary.shape)}")
    if int(s) != s or not 1 <= s < dictionary.shape[1]:
        raise ValueError(f"s must be an integer in [1, {dictionary.shape[1]}), got {s}")
    energy = (weights @ dictionary.to(weights)).square()
    head = energy.topk(int(s), dim=1).values.sum(1)
    tail = (energy.sum(1) - head).clamp_min(0)
    alive = head > 0
    return (tail[alive] / head[alive]).sqrt().mean()
