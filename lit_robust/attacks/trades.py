"""The TRADES inner maximization (Zhang et al., ICML 2019): PGD on the KL divergence from the clean prediction."""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor, nn

from lit_robust.attacks import functional as AF
from lit_robust.attacks.adam import AdamAscent
from lit_robust.attacks.pgd import PGD

REFERENCES = ("clean", "targets")


class TradesKLAttack(PGD):
    """Ascends ``KL(softmax(f(x)) || softmax(f(x_adv)))`` per example, summed over the batch.

    The TRADES attack of github.com/yaodongyu/TRADES (``trades.py::trades_loss``), also used
    by TRADES-AWP: start at ``x + start_std * N(0, 1)`` (not projected first), then ``steps``
    sign steps (Linf), each followed by the projection onto the eps-ball and [0, 1]. It needs
    no labels: ``y`` is accepted for the ``attack(model, x, y)`` contract and ignored.

    It is :class:`~lit_robust.attacks.PGD` with another objective: the loop, the projection
    and the input-only gradients (``torch.autograd.grad`` on the perturbation, never
    ``.backward()``) are PGD's. The clean logits are computed once, with no graph, in the
    attack's module mode, and reused at every step; the official code recomputes ``f(x)`` at
    each of the K steps, which in eval mode (its setting) gives the same value, so this saves
    K - 1 forward passes. (In ``bn_mode="train"`` with dropout the official recomputation
    would draw new dropout masks each step; here the clean distribution stays fixed.)

    Args:
        eps: Linf (or L2) radius in [0, 1] pixel units; the paper's 0.031 is just under 8/255.
        steps: ascent steps K (10 in the paper).
        step_size: per step; default ``2.5 * eps / steps`` (the paper: 0.007 for eps 0.031).
        norm: ``"linf"`` (sign steps, the paper) or ``"l2"`` (unit-gradient steps; the
            official L2 variant takes the same normalised step through an SGD optimizer and
            projects onto the box before the ball).
        start_std: std of the Gaussian start (0.001 in the official code); ``None`` starts
            from a uniform draw in the ball instead. There is no zero start: the KL and its
            gradient vanish at ``x_adv = x``.
        bn_mode: module mode during the attack, ``"eval"`` (the official code) or ``"train"``.

        reference: the distribution the attack moves away from: ``"clean"``, the prediction on the clean
            batch (TRADES), or ``"targets"``, the batch's targets (DeepMind's rule with CutMix, Rebuffi et al.
            2021: "regress the attack away from mixed labels"; ``jax/experiment.py``). Class indices are
            taken as one-hot rows, where the KL equals the cross-entropy.
        ascent: ``None`` (sign steps, the TRADES code) or :class:`~lit_robust.attacks.AdamAscent` (DeepMind's
            Adam steps; use ``start_std=None`` for its uniform start).

    ``run`` returns an :class:`~lit_robust.attacks.AttackResult` whose ``loss`` is the
    per-example KL at ``x_adv``. Cost: ``steps`` forward+backward passes plus one forward
    (the clean logits); ``run`` adds one forward to score ``x_adv``.
    """

    def __init__(self, eps: float, steps: int = 10, step_size: Optional[float] = None,
                 norm: Literal["linf", "l2"] = "linf", start_std: Optional[float] = 0.001,
                 bn_mode: Literal["eval", "train", "batch"] = "eval",
                 reference: Literal["clean", "targets"] = "clean", ascent: Optional[AdamAscent] = None) -> None:
        super().__init__(eps, steps, step_size, norm, random_start=True, bn_mode=bn_mode, start_std=start_std,
                         ascent=ascent)
        if reference not in REFERENCES:
            raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
        self.reference = reference
        self.loss, self.loss_fn = "kl", AF.kl_loss if reference == "clean" else AF.distribution_kl

    def target(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """The clean logits, once per attack, without a graph (the KL's fixed first argument); with
        ``reference="targets"`` the batch's target distribution (class indices as one-hot rows)."""
        if self.reference == "targets":
            return y
        with torch.no_grad():
            return model(x)
