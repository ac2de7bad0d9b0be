"""Jacobian regularisation added to any defense's outer loss (Hoffman et al. 2019; the Jacobian half of J-SIGR)."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Optional

from torch import Tensor, nn

from lit_robust.attacks.pgd import module_mode
from lit_robust.defenses.base import AdversarialModule, TrainingOutput
from lit_robust.defenses.pgd_at import PGDAT
from lit_robust.defenses.trades import TRADES
from lit_robust.objectives.jacobian import jacobian_penalty

JACOBIAN_INPUTS = ("clean", "adversarial")


class JacobianRegularized(AdversarialModule):
    """Adds ``jacobian_weight * R`` to the outer loss of the defense it is mixed into, with ``R`` Hoffman et al.'s
    ``(1/2) mean_b ||d f(x_b) / d x_b||_F^2`` (:func:`~lit_robust.objectives.jacobian_penalty`).

    Put it first among the bases: ``class JacobianMART(JacobianRegularized, MART): pass`` regularises MART.
    Every defense whose weight update minimises ``outer_loss`` takes it (the automatic-optimization ones, and
    Free AT, whose replays call ``outer_loss``); adversarial weight perturbation (``awp_gamma``) then perturbs
    the weights along the regularised loss.

    Papers and code: Hoffman, Roberts & Yaida, "Robust Learning with Jacobian Regularization", arXiv 1908.02729
    (github.com/facebookresearch/jacobian_regularizer, ``jacobian/jacobian.py``); J-SIGR, Liu et al., "Jacobian
    norm with Selective Input Gradient Regularization for interpretable adversarial defense", Pattern Recognition
    145, 2024 (arXiv 2207.13036; its code, announced at github.com/Lywu-github/jJ-SIGR, could not be read).

    Algorithm, per batch, after the base defense's inner maximization::

        loss = base_outer_loss(x, x_adv, y)
        x_J = x (clean) or x_adv;  v_b ~ uniform on the unit sphere of R^C, per example
        R = (1/2) mean_b C ||v_b^T d f(x_J)_b / d x_J||^2          # E[R] = (1/2) mean_b ||J_b||_F^2
        loss = loss + jacobian_weight * R                           # backpropagated through the VJP

    The penalty's forward runs on batch statistics without updating BatchNorm's running ones (``"batch"``
    mode of :func:`~lit_robust.attacks.module_mode`): the function the outer loss trains, its statistics
    updated once per step by the base's own forward, as when the official code takes the Jacobian of the
    training forward itself.

    Defaults: ``jacobian_weight=0.01`` (the official README's ``lambda_JR``; its MNIST example uses 0.1), one
    projection (official ``n=1``; ``-1`` computes the exact norm with C backward passes), at the clean inputs
    (Hoffman et al. regularise the training inputs; J-SIGR's choice of point and weight were not retrieved, so
    ``jacobian_inputs`` and the weight used with adversarial training are ours).

    Cost: the base defense's, plus one forward, ``jacobian_projections`` backward passes that keep their graph,
    and the training backward through them (double backpropagation): with one projection 2.4 (PreActResNet-18,
    batch 32) to 3.1 (SmallCNN, batch 64) forward+backward passes more per step, measured on a CPU. Not with
    ``compile_model``: compiled graphs do not support double backward.

    Reported: J-SIGR reports accuracy under transferred attacks only (not retrieved); Hoffman et al. report
    Jacobian regularisation without adversarial training. No published number applies to this combination.

    Args:
        jacobian_weight: the weight of ``R``, >= 0 (0 turns the regulariser off).
        jacobian_projections: random projections per example, >= 1, or -1 for the exact norm.
        jacobian_inputs: where the Jacobian is taken: ``"clean"`` (the training images) or ``"adversarial"``.
        **kwargs: the base defense's arguments.

    Logs ``train/jacobian_penalty`` (the epoch mean of ``R``'s estimate).
    """

    def __init__(self, model: nn.Module, jacobian_weight: float = 0.01, jacobian_projections: int = 1,
                 jacobian_inputs: Literal["clean", "adversarial"] = "clean", **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        if not jacobian_weight >= 0:
            raise ValueError(f"jacobian_weight must be >= 0, got {jacobian_weight}")
        if int(jacobian_projections) != jacobian_projections or not (
                jacobian_projections >= 1 or jacobian_projections == -1):
            raise ValueError(f"jacobian_projections must be an integer >= 1, or -1 for the exact norm, got "
                             f"{jacobian_projections}")
        if jacobian_inputs not in JACOBIAN_INPUTS:
            raise ValueError(f"jacobian_inputs must be one of {JACOBIAN_INPUTS}, got {jacobian_inputs!r}")
        if self.compile_model:
            raise ValueError("the Jacobian regulariser needs double backward, which torch.compile does not "
                             "support: set compile_model=False")
        self.jacobian_weight, self.jacobian_projections = float(jacobian_weight), int(jacobian_projections)
        self.jacobian_inputs = jacobian_inputs
        self._last_penalty: Optional[Tensor] = None

    def outer_loss(self, x: Tensor, x_adv: Tensor, y: Tensor) -> TrainingOutput:
        out = super().outer_loss(x, x_adv, y)
        if self.jacobian_weight == 0:
            return out
        with module_mode(self.model, "batch"):
            penalty = jacobian_penalty(self.model, x if self.jacobian_inputs == "clean" else x_adv,
                                       self.jacobian_projections)
        self._last_penalty = penalty.detach()
        return dataclasses.replace(out, loss=out.loss + self.jacobian_weight * penalty)

    def training_loss(self, x: Tensor, y: Tensor) -> TrainingOutput:
        self._last_penalty = None
        out = super().training_loss(x, y)
        if self._last_penalty is not None:  # the outer loss's (AWP's extra call, if any, came before it)
            self._log_mean("train/jacobian_penalty", self._last_penalty[None])
        return out


class JacobianPGDAT(JacobianRegularized, PGDAT):
    """PGD adversarial training (:class:`~lit_robust.defenses.PGDAT`, Rice et al.'s recipe) with the Jacobian
    regulariser of :class:`JacobianRegularized` on its outer loss. Cost: K + 1 F+B (PGD-AT) plus about 2.5 to 3."""


class JacobianTRADES(JacobianRegularized, TRADES):
    """TRADES (:class:`~lit_robust.defenses.TRADES`, the official recipe) with the Jacobian regulariser of
    :class:`JacobianRegularized` on its outer loss. Cost: about 12.3 F+B (TRADES, K = 10) plus about 2.5 to 3."""
