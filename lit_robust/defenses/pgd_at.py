"""PGD adversarial training (Madry et al., ICLR 2018) with the Rice et al. (ICML 2020) recipe as defaults."""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor, nn

from lit_robust.attacks import PGD, APGDTrain
from lit_robust.defenses.base import AdversarialModule, TrainingOutput
from lit_robust.objectives import pgd_at_objective


class PGDAT(AdversarialModule):
    """Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018.

    Official code: github.com/MadryLab/cifar10_challenge (TF); the recipe used as defaults is
    github.com/locuslab/robust_overfitting (Rice, Wong & Kolter, ICML 2020).

    Algorithm, per batch::

        delta ~ U(-eps, eps); K times: delta <- Proj(delta + alpha * sign(grad_delta CE(f(x + delta), y)))
        theta <- theta - lr * grad_theta CE(f(x + delta), y)

    Defaults (Rice et al., PreActResNet-18 / WRN-34-10 on CIFAR-10): Linf eps 8/255, K = 10,
    alpha = 2/255, random start, SGD lr 0.1, momentum 0.9, weight decay 5e-4, batch 128,
    200 epochs with lr x0.1 at epochs 100 and 150 (the base class's default schedule).

    Deviation we chose: the attack runs with BatchNorm in eval mode (running statistics,
    not updated by attack iterates); Madry's and Rice's code attack in train mode. Set
    ``attack_bn_mode="train"`` to match them exactly.

    Cost: K + 1 forward+backward passes per step (11 with the defaults), times ``restarts``
    for the attack part.

    ``attack="apgd"`` trains on :class:`~lit_robust.attacks.APGDTrain` instead (Singh, Croce & Hein, NeurIPS 2023:
    ``steps`` iterations of Auto-PGD from the clean image, first step ``2 eps``, the highest-loss iterate; their
    ImageNet recipes use 2 iterations at 4/255, ``configs/imagenet/finetune_*.yaml``); ``step_size``, ``restarts``
    and the random start then do not apply. Cost: ``steps`` forward+backward passes and one forward, plus the
    update.

    Reported (CIFAR-10, Linf 8/255): Madry, WRN-34-10: 87.14 clean / 44.04 AutoAttack
    (RobustBench). Rice et al. training logs, PGD-10 on the test set: PreActResNet-18
    selected on a 1k validation split 81.80 / 53.11, final epoch 84.15 / 46.41 (robust
    overfitting); WRN-34-10 best epoch 86.07 / 56.80.
    """

    def __init__(self, model: nn.Module, restarts: int = 1, attack: Literal["pgd", "apgd"] = "pgd",
                 **kwargs: Any) -> None:
        if attack not in ("pgd", "apgd"):
            raise ValueError(f"attack must be 'pgd' or 'apgd', got {attack!r}")
        super().__init__(model, **kwargs)
        if attack == "apgd":
            self.attack = APGDTrain(self.eps, self.steps, self.norm, bn_mode=self.attack_bn_mode)
            self.step_size = self.attack.step_size  # 2 eps
        else:
            self.attack = PGD(self.eps, self.steps, self.step_size, self.norm, random_start=True,
                              restarts=restarts, bn_mode=self.attack_bn_mode)

    def outer_loss(self, x: Tensor, x_adv: Tensor, y: Tensor) -> TrainingOutput:
        return pgd_at_objective(self.model, x, x_adv, y, self.label_smoothing)
