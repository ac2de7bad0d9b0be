"""One LightningModule per defense, all built on ``AdversarialModule``."""

from lit_robust.defenses.base import AdversarialModule, TrainingOutput, check_pixel_range
from lit_robust.defenses.pgd_at import PGDAT
from lit_robust.defenses.standard import StandardTraining

__all__ = ["AdversarialModule", "PGDAT", "StandardTraining", "TrainingOutput", "check_pixel_range"]
