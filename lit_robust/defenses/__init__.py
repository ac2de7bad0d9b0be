"""One LightningModule per defense, all built on ``AdversarialModule``.

``DEFENSES`` maps each public defense name to its class (the contract tests run over it).
"""

from lit_robust.defenses.awp import WeightPerturbation
from lit_robust.defenses.base import AdversarialModule, TrainingOutput, check_pixel_range
from lit_robust.defenses.pgd_at import PGDAT
from lit_robust.defenses.standard import StandardTraining

DEFENSES: dict[str, type[AdversarialModule]] = {
    "PGDAT": PGDAT,
    "StandardTraining": StandardTraining,
}

__all__ = ["DEFENSES", "AdversarialModule", "TrainingOutput", "WeightPerturbation", "check_pixel_range", *DEFENSES]
