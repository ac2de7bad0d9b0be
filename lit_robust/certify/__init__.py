"""Certification: bound propagation (IBP, CROWN-IBP), the certified-training objective, weight-space
Gaussian loss smoothing estimators, and the randomized-smoothing certifier."""

from lit_robust.certify.bounds import (
    certified,
    check_network,
    crown_ibp_margin_bounds,
    ibp_margin_bounds,
    input_box,
    interval_bounds,
    robust_cross_entropy,
)
from lit_robust.certify.gls import ESTIMATORS, pgpe_gradient, rgs_gradient, smoothed_surrogate
from lit_robust.certify.objective import CertifiedObjective
from lit_robust.certify.randomized_smoothing import (
    ABSTAIN,
    Smooth,
    average_certified_radius,
    certified_accuracy,
    clopper_pearson_lower,
)

__all__ = [
    "ABSTAIN", "CertifiedObjective", "Smooth", "average_certified_radius", "certified", "certified_accuracy",
    "check_network", "clopper_pearson_lower", "crown_ibp_margin_bounds", "ibp_margin_bounds", "input_box",
    "interval_bounds", "pgpe_gradient", "rgs_gradient", "robust_cross_entropy", "smoothed_surrogate", "ESTIMATORS",
]
