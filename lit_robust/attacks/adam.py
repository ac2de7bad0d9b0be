"""Adam on the input: the ascent rule of DeepMind's attacks (Gowal et al. 2020/2021, Rebuffi et al. 2021)."""

from __future__ import annotations

import torch
from torch import Tensor


class AdamAscent:
    """Replaces PGD's signed step by an Adam step on the perturbation, as DeepMind's ``attacks.Adam``.

    github.com/google-deepmind/deepmind-research/tree/master/adversarial_robustness, ``jax/attacks.py`` and
    ``jax/experiment.py``: the training attack is 10 steps of Adam (betas 0.9, 0.999, eps 1e-9) with lr 0.1
    for steps 0-4 and 0.01 from step 5 (``piecewise_constant_schedule(0.1, {5: 0.1})``), each followed by
    the projection onto the Linf ball and [0, 1]; the evaluation attack is 40 steps, lr x0.1 at 20 and
    x0.01 at 30. With step ``t`` counted from 1 and ``g`` the gradient of the summed per-example loss::

        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
        delta <- Proj(delta + lr_t * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps))

    The lr is in pixel units, per coordinate: the early steps of 0.1 reach the ball's faces, like a
    sign step larger than eps. Pass it as ``PGD(..., ascent=AdamAscent())`` (also
    :class:`~lit_robust.attacks.TradesKLAttack`); the moments live for one attack run only.

    Args:
        lr: the learning rate of the first steps.
        milestones: steps (counted from 0) from which the lr is multiplied by ``gamma`` once more.
        gamma: the factor at each milestone.
        betas, eps: Adam's.
    """

    def __init__(self, lr: float = 0.1, milestones: tuple[int, ...] = (5,), gamma: float = 0.1,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-9) -> None:
        if not lr > 0 or not gamma > 0 or not eps > 0:
            raise ValueError(f"lr, gamma and eps must be > 0, got {lr}, {gamma}, {eps}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if any(m < 0 for m in milestones):
            raise ValueError(f"milestones must be steps >= 0, got {milestones}")
        self.lr, self.milestones, self.gamma = float(lr), tuple(int(m) for m in milestones), float(gamma)
        self.betas, self.eps = (float(betas[0]), float(betas[1])), float(eps)

    def lr_at(self, step: int) -> float:
        """The learning rate of step ``step`` (counted from 0)."""
        return self.lr * self.gamma ** sum(step >= m for m in self.milestones)

    def run(self) -> "_AdamRun":
        """Fresh moments for one attack run."""
        return _AdamRun(self)

    def __repr__(self) -> str:
        return f"AdamAscent(lr={self.lr:g}, milestones={self.milestones}, gamma={self.gamma:g})"


class _AdamRun:
    def __init__(self, rule: AdamAscent) -> None:
        self.rule, self.t = rule, 0
        self.m = self.v = 0.0  # broadcast as zero tensors at the first step

    def step(self, delta: Tensor, grad: Tensor) -> Tensor:
        """``delta`` moved by one Adam ascent step on ``grad`` (before the projection)."""
        b1, b2 = self.rule.betas
        lr = self.rule.lr_at(self.t)
        self.t += 1
        self.m = b1 * self.m + (1 - b1) * grad
        self.v = b2 * self.v + (1 - b2) * grad * grad
        m_hat, v_hat = self.m / (1 - b1 ** self.t), self.v / (1 - b2 ** self.t)
        return delta + lr * m_hat / (v_hat.sqrt() + self.rule.eps)


# A defense keeps its AdamAscent in its hyperparameters: checkpoints must still load with weights_only=True.
torch.serialization.add_safe_globals([AdamAscent])
