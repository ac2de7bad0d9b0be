"""Certification: bound propagation (IBP, CROWN-IBP) for sequential ReLU networks."""

from lit_robust.certify.bounds import (
    certified,
    crown_ibp_margin_bounds,
    ibp_margin_bounds,
    input_box,
    interval_bounds,
    robust_cross_entropy,
)

__all__ = [
    "certified", "crown_ibp_margin_bounds", "ibp_margin_bounds", "input_box", "interval_bounds",
    "robust_cross_entropy",
]
