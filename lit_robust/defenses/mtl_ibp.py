"""MTL-IBP (De Palma et al., ICLR 2024): a convex combination of the IBP loss and the adversarial loss."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from lit_robust.attacks.pgd import PGD
from lit_robust.defenses.base import positive_int
from lit_robust.defenses.certified import CertifiedTraining


class MTLIBP(CertifiedTraining):
    """De Palma, Bunel, Dvijotham, Kumar, Stanforth & Lomuscio, "Expressive Losses for Verified Robustness
    via Convex Combinations", ICLR 2024 (arXiv 2305.13991); official code
    github.com/alessandrodepalma/expressive-losses (``train.py``, ``--mtlibp --mtlibp_coeff``).

    Per batch::

        eps_t  = the eps ramp (as CertifiedTraining)
        x_adv  = PGD (CE, BN in eval mode) in [x - f eps_t, x + f eps_t] ∩ [0, 1], f = attack_eps_factor
        loss   = alpha * CE([0, -lb_IBP(eps_t)], 0) + (1 - alpha) * CE(f(x_adv), y)    (f(x_adv) in train mode)

    ``alpha = 1`` is IBP training (the attack is skipped), ``alpha = 0`` PGD-AT's cross-entropy at
    ``x_adv``. The paper's point: the loss is "expressive" (it spans adversarial to verified training), and
    small alphas give the best certified/clean trade-offs once a branch-and-bound verifier certifies.
    With ``method="crown-ibp"`` the robust term uses the CertifiedTraining beta mix (not in the paper).

    Official settings (CNN7 with BN, Shi et al.'s ramp and init, Adam 5e-4, L1 penalty): CIFAR-10 8/255
    ``alpha=0.5``, one attack step of size ``10 * eps`` (a corner of the ball), ``attack_eps_factor=1``;
    CIFAR-10 2/255 ``alpha=4e-3``, 8 steps of ``0.25 * eps``, ``attack_eps_factor=2.1``; MNIST 0.1
    ``alpha=1e-2``, 0.3 ``alpha=8e-2`` (one step of 10 eps, training at 2x / 1.334x eps). Reported certified
    accuracy (OVAL branch-and-bound): CIFAR-10 2/255 63.50% (clean 80.11%), 8/255 35.44% (clean 53.35%);
    MNIST 0.1 99.01%, 0.3 93.62%.

    Deviations: the attack starts from a uniform random point and takes fixed sign steps (the official
    ``pgd_attack`` also starts at random; their step schedule is ours only to first order); the L1
    penalty (``--l1_coeff``) is not implemented; in train mode the IBP bounds use the clean batch's
    BN statistics (the official code uses those of the last forward pass, the adversarial batch); the
    running statistics are updated by both the clean forward and the adversarial forward.

    Cost per step: ``attack_steps`` forward+backward passes, one adversarial forward+backward, plus
    CertifiedTraining's.

    Args:
        model, eps, method, ...: as :class:`CertifiedTraining`.
        alpha: the weight of the IBP loss, in [0, 1].
        attack_steps: PGD steps for the adversarial point.
        attack_step_size: PGD step relative to the attack radius.
        attack_eps_factor: the attack radius as a multiple of the current training eps.
    """

    def __init__(self, model: nn.Module, alpha: float = 0.5, attack_steps: int = 1, attack_step_size: float = 10.0,
                 attack_eps_factor: float = 1.0, **kwargs: Any) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if not attack_step_size > 0 or not attack_eps_factor > 0:
            raise ValueError(f"attack_step_size and attack_eps_factor must be > 0, got {attack_step_size}, "
                             f"{attack_eps_factor}")
        positive_int(attack_steps, "attack_steps")
        super().__init__(model, **kwargs)
        self.alpha, self.attack_steps = alpha, attack_steps
        self.attack_step_size, self.attack_eps_factor = attack_step_size, attack_eps_factor

    def adversarial_point(self, x: Tensor, y: Tensor) -> Tensor:
        """PGD at ``attack_eps_factor`` times the scheduled radius (``x`` itself while that radius is 0)."""
        eps = self.objective.eps * self.attack_eps_factor
        if eps == 0:
            return x
        return PGD(eps, steps=self.attack_steps, step_size=self.attack_step_size * eps, bn_mode="eval")(
            self.model, x, y).detach()

    def certified_loss(self, x: Tensor, y: Tensor) -> Tensor:
        """``alpha * IBP loss + (1 - alpha) * adversarial CE``."""
        terms = []
        if self.alpha > 0:
            terms.append(self.alpha * super().certified_loss(x, y))
        if self.alpha < 1:
            adv_loss = self.cross_entropy(self.model(self.adversarial_point(x, y)), y)
            self.log("train/adv_loss", adv_loss.detach(), on_step=False, on_epoch=True)
            terms.append((1 - self.alpha) * adv_loss)
        return terms[0] if len(terms) == 1 else terms[0] + terms[1]
