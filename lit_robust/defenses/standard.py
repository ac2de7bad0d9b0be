"""Standard (non-adversarial) training: the baseline every defense is compared against."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from lit_robust.defenses.base import AdversarialModule, TrainingOutput


class StandardTraining(AdversarialModule):
    """Empirical risk minimisation on clean inputs, evaluated under the same attacks as the defenses.

    There is no inner maximization; ``eps``/``norm`` only set the threat model of the
    validation and test attacks, so the robust numbers are directly comparable with a
    defense's. Cost: 1 forward+backward per step.
    """

    def training_loss(self, x: Tensor, y: Tensor) -> TrainingOutput:
        logits = self.model(x)
        return TrainingOutput(F.cross_entropy(logits, y), clean_logits=logits)
