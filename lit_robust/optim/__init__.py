"""Optimizers that are part of a defense's algorithm (usable by any defense through ``optimizer=``)."""

from lit_robust.optim.deat import DEATOptimizer

__all__ = ["DEATOptimizer"]
