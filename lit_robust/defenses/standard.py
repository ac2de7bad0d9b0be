"""Standard (non-adversarial) training: the baseline every defense is compared against."""

from __future__ import annotations

from torch import Tensor

from lit_robust.defenses.base import AdversarialModule, TrainingOutput


class StandardTraining(AdversarialModule):
    """Empirical risk minimisation on clean inputs, evaluated under the same attacks as the defenses.

    There is no inner maximization; ``eps``/``norm`` only set the threat model of the
    validation and test attacks, so the robust numbers are directly comparable with a
    defense's. Cost: 1 forward+backward per step.
    """

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        return x

    def outer_loss(self, x: Tensor, x_adv: Tensor, y: Tensor) -> TrainingOutput:
        logits = self.model(x)
        return TrainingOutput(self.cross_entropy(logits, y), clean_logits=logits)
