"""Optimizers that are part of a defense's algorithm (usable by any defense through ``optimizer=``)."""

from lit_robust.optim.adamw import AdamWNoNormBiasDecay
from lit_robust.optim.deat import DEATOptimizer
from lit_robust.optim.param_groups import SGDNoNormBiasDecay, decay_groups_by_name, split_weight_decay
from lit_robust.optim.schedules import OneCycleCosineLR, WarmupCosineLR

__all__ = ["AdamWNoNormBiasDecay", "DEATOptimizer", "OneCycleCosineLR", "SGDNoNormBiasDecay", "WarmupCosineLR",
           "decay_groups_by_name", "split_weight_decay"]
