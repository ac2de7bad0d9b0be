"""MART (Wang et al., ICLR 2020): boosted CE on adversarial examples plus a misclassification-weighted KL."""

from __future__ import annotations

from typing import Any

import torch

from lit_robust.attacks import PGD
from lit_robust.defenses.trades import CleanAdversarialKL, piecewise_by_epochs
from lit_robust.objectives import mart_objective


class MART(CleanAdversarialKL):
    """Wang, Zou, Yi, Bailey, Ma & Gu, "Improving Adversarial Robustness Requires Revisiting
    Misclassified Examples", ICLR 2020.

    Official code: github.com/YisenWang/MART (``mart.py::mart_loss``, ``train_wideresnet.py``,
    ``train_resnet.py``).

    Algorithm, per batch::

        model.eval(); x' = x + 0.001 * N(0, 1)
        K times: x' <- Proj_{ball(x, eps) and [0,1]}(x' + alpha * sign(grad_x' CE(f(x'), y)))
        model.train(); p = softmax f(x), p' = softmax f(x')
        y'_i = argmax_{k != y_i} p'_i[k]                          (most likely wrong class)
        BCE  = CE(f(x'), y) - mean_i log(1.0001 - p'_i[y'_i] + 1e-12)
        loss = BCE + beta * (1/B) sum_i KL(p_i || p'_i) * (1.0000001 - p_i[y_i])

    Nothing is detached: gradients flow through both the clean distribution in the KL and
    the weight ``1 - p_i[y_i]``, which emphasises misclassified clean examples.

    Defaults (official ``train_wideresnet.py``, WRN-34-10 on CIFAR-10): beta = 6, eps = 0.031,
    step 0.007 (0.031 is slightly below 8/255 = 0.03137), K = 10, attack in eval mode, SGD
    lr 0.1, momentum 0.9, weight decay 7e-4, batch 128, 90 epochs with lr x0.1 from epoch 75
    and x0.01 in the last epoch (epoch 90). The schedule is expressed as fractions of the
    training steps (74/90 and 89/90), so it keeps its shape for any ``max_epochs``.
    ``train_resnet.py`` (ResNet-18) uses lr 0.01, weight decay 3.5e-3, beta = 5 and 120 epochs
    with the same epoch milestones (x0.1 at 75, x0.01 at 90, x0.001 at 100): pass
    ``beta=5``, an ``optimizer`` and an ``lr_scheduler``. Evaluation in the official scripts:
    PGD-20 with a uniform random start, step eps/10 (WRN) or 0.003 (ResNet-18).

    Cost: K + 2 forward+backward passes per step (12 for K = 10): K for the attack, then the
    clean and the adversarial forwards of the outer loss, both backpropagated.

    Reported (CIFAR-10, eps 8/255 or 0.031): paper, recalled and not checked against the
    PDF: ResNet-18 83.07 clean / 55.57 PGD-20 / 54.87 C&W; WRN-34-10 84.17 / 58.56 / 54.58.
    RobustBench: MART with 500k extra unlabeled images, WRN-28-10, 87.50 clean / 56.29
    AutoAttack. AWP README: MART-AWP, WRN-34-10, 84.43 / 54.23 AutoAttack.

    Deviations we chose: the KL takes ``log_softmax`` of the adversarial logits where the
    official code takes ``log(softmax + 1e-12)``. The two differ by ``log(1 + 1e-12 / p)``, about
    ``1e-12 / p`` for each class probability ``p``: below float32 noise (~1e-7) while ``p`` is above
    about 1e-5, 2e-4 at ``p = 5e-9``, and without bound as ``p -> 0``, where the official term
    saturates at ``log(1e-12)`` (and its gradient vanishes) while ``log_softmax`` keeps going. Such
    classes carry almost no weight in the KL (it sums ``p_clean * log p_adv``), so the losses agree to
    float noise on ordinary batches; the most likely wrong class is a masked argmax instead of an argsort (same class
    up to ties). ``label_smoothing`` applies to the CE term of BCE. The attack loss is the
    per-example CE summed over the batch (the official: batch mean); sign steps make the two
    identical.

    Args:
        model: maps [0, 1] images to logits.
        beta: weight of the misclassification-aware KL term, >= 0.
        eps, steps, step_size: the training attack (official values by default).
        **kwargs: the shared arguments of :class:`~lit_robust.defenses.AdversarialModule`.
    """

    def training_attack(self) -> PGD:
        return PGD(self.eps, self.steps, self.step_size, self.norm, random_start=True, start_std=0.001,
                   bn_mode=self.attack_bn_mode)

    objective = staticmethod(mart_objective)  # BCE + beta * KL weighted by (1 - p_y(x))

    def default_optimizer(self, params: Any) -> torch.optim.Optimizer:
        """SGD(lr=0.1, momentum=0.9, weight_decay=7e-4), the official WRN-34-10 recipe."""
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=7e-4)

    def default_lr_scheduler(self, optimizer: torch.optim.Optimizer) -> tuple[Any, str]:
        """x0.1 after 74/90 and again after 89/90 of the training steps (official WRN: epochs 75 and 90 of 90)."""
        return piecewise_by_epochs(optimizer, self.trainer.estimated_stepping_batches, [74, 89], 90), "step"
