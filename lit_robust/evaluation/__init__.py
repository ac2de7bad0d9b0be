"""Robustness evaluation: the reference AutoAttack and helpers for publishable numbers."""

from lit_robust.evaluation.autoattack import autoattack

__all__ = ["autoattack"]
