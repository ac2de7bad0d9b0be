"""The certified-training objective at a radius: IBP / CROWN-IBP margin lower bounds and the robust CE.

One object holds what the loss depends on besides the weights (the current radius and the relaxation),
so that :class:`~lit_robust.callbacks.EpsilonSchedule` can ramp it (``eps``, ``set_eps``) exactly as it
ramps a PGD attack, and so that certified training and Gaussian loss smoothing share one loss.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from lit_robust.certify.bounds import LOWER_SLOPES, crown_ibp_margin_bounds, ibp_margin_bounds, robust_cross_entropy

METHODS = ("ibp", "crown-ibp")
_SKIP_CROWN_BELOW = 1e-5  # CROWN-IBP's train.py skips the backward pass once beta is this small


class CertifiedObjective:
    """Robust cross-entropy on lower bounds of the margins ``z_y - z_j`` over the L-inf ball of radius ``eps``.

    ``method="ibp"``: IBP bounds (Gowal et al. 2018). ``method="crown-ibp"`` (Zhang et al., ICLR 2020,
    github.com/huanzhang12/CROWN-IBP ``train.py``): ``lb = beta * lb_CROWN-IBP + (1 - beta) * lb_IBP`` with
    ``beta = (max_eps - eps * (1 - final_beta)) / max_eps``, so beta falls from 1 at the start of the eps ramp
    to ``final_beta`` at ``max_eps``; the CROWN pass is skipped while ``beta < 1e-5``. ``final_beta=0`` is
    the paper's 8/255 setting, ``final_beta=1`` (always CROWN-IBP) its 2/255 one.

    ``final_kappa`` (the official ``robust_natural`` method, used by its MNIST DM-large configs with the
    default 0.5): the loss becomes ``(1 - kappa) * robust CE + kappa * natural CE`` with
    ``kappa = (max_eps - eps * (1 - final_kappa)) / max_eps``, 1 (natural training) at ``eps = 0`` down to
    ``final_kappa`` at ``max_eps``: the same ramp as beta. None: the ``robust`` method (robust CE only).

    Args:
        max_eps: the radius training ramps up to; ``eps`` starts there and a schedule lowers it.
        method: ``"ibp"`` or ``"crown-ibp"``.
        final_beta: beta at ``eps = max_eps`` (CROWN-IBP only), in [0, 1].
        lower_slope: the CROWN ReLU lower line for unstable neurons (see ``crown_ibp_margin_bounds``).
        final_kappa: the natural CE's weight at ``eps = max_eps``, in [0, 1]; None: not mixed in.
    """

    def __init__(self, max_eps: float, method: str = "crown-ibp", final_beta: float = 0.0,
                 lower_slope: str = "adaptive", final_kappa: Optional[float] = None) -> None:
        if not max_eps > 0:
            raise ValueError(f"eps must be > 0, got {max_eps}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if not 0.0 <= final_beta <= 1.0:
            raise ValueError(f"final_beta must be in [0, 1], got {final_beta}")
        if final_kappa is not None and not 0.0 <= final_kappa <= 1.0:
            raise ValueError(f"final_kappa must be in [0, 1] or None, got {final_kappa}")
        if lower_slope not in LOWER_SLOPES:
            raise ValueError(f"lower_slope must be one of {LOWER_SLOPES}, got {lower_slope!r}")
        self.max_eps, self.eps = float(max_eps), float(max_eps)
        self.method, self.final_beta, self.lower_slope = method, float(final_beta), lower_slope
        self.final_kappa = None if final_kappa is None else float(final_kappa)

    def set_eps(self, eps: float) -> None:
        """The radius of the next steps (what :class:`~lit_robust.callbacks.EpsilonSchedule` sets)."""
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.eps = float(eps)

    @property
    def beta(self) -> float:
        """The weight of the CROWN-IBP bound at the current radius (0 for ``"ibp"``)."""
        return 0.0 if self.method == "ibp" else self._ramped(self.final_beta)

    @property
    def kappa(self) -> float:
        """The weight of the natural CE at the current radius (0 without ``final_kappa``)."""
        return 0.0 if self.final_kappa is None else self._ramped(self.final_kappa)

    def _ramped(self, final: float) -> float:
        """1 at eps = 0, ``final`` at ``max_eps``, linear in eps in between (CROWN-IBP's beta and kappa)."""
        return min(max((self.max_eps - self.eps * (1 - final)) / self.max_eps, 0.0), 1.0)

    def margin_lower(self, net: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """``[B, K-1]`` lower bounds of ``z_y - z_j`` at the current radius, mixed by ``beta``."""
        ibp = ibp_margin_bounds(net, x, y, self.eps)
        beta = self.beta
        if beta < _SKIP_CROWN_BELOW:
            return ibp
        crown = crown_ibp_margin_bounds(net, x, y, self.eps, self.lower_slope)
        return crown if beta == 1.0 else beta * crown + (1 - beta) * ibp

    def loss(self, net: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(robust cross-entropy, margin lower bounds)``; at ``eps = 0`` the bounds are the exact margins,
        so the loss is the clean cross-entropy (what certified training uses during its warm-up)."""
        lower = self.margin_lower(net, x, y)
        return robust_cross_entropy(lower), lower
