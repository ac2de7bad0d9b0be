"""Interpolated Adversarial Training (Lamb, Verma, Kannala & Bengio, AISec 2019)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lit_robust.attacks import PGD
from lit_robust.defenses.base import AdversarialModule, TrainingOutput
from lit_robust.objectives import interpolated_at_objective, sample_mix


class InterpolatedAT(AdversarialModule):
    """Lamb, Verma, Kannala & Bengio, "Interpolated Adversarial Training: Achieving Robust
    Neural Networks without Sacrificing Too Much Accuracy", AISec 2019, arXiv 1906.06784
    (extended with Kawaguchi, Matyasko & Khosla in Neural Networks, 2022).

    Official code: none found. Reference re-implementation:
    github.com/ndb796/Pytorch-Adversarial-Training-CIFAR (``interpolated_adversarial_training.py``).

    Algorithm, per batch (x, y)::

        x_adv = PGD(f, x, y)                       # the attack sees the unmixed batch
        lam ~ Beta(alpha, alpha), pi = randperm(B)     # clean branch
        L_c = lam CE(f(lam x + (1-lam) x[pi]), y) + (1-lam) CE(same logits, y[pi])
        lam' ~ Beta(alpha, alpha), pi' = randperm(B)   # adversarial branch, drawn afresh
        L_a = lam' CE(f(lam' x_adv + (1-lam') x_adv[pi']), y) + (1-lam') CE(same logits, y[pi'])
        theta <- theta - lr * grad (L_c + L_a) / 2

    One lam per batch and branch, as in mixup. The draws come from torch's global RNG in
    the order lam, pi, lam', pi' (seeded runs repeat exactly). The two mixed batches go
    through the network in two separate forwards, so BatchNorm sees each on its own.

    Defaults (the reference code, CIFAR-10, ResNet-18): alpha 1.0; Linf eps 8/255, PGD-7
    with step 2/255 and random start (the code writes 0.0314 and 0.00784); SGD lr 0.1,
    momentum 0.9, weight decay 2e-4; batch 128; 200 epochs with lr /10 at epochs 100 and
    150 (the base schedule: 50% and 75% of the training steps).

    Logged: ``train/adv_acc`` is the accuracy of the mixed adversarial batch and
    ``train/clean_acc`` that of the mixed clean batch, each against the label that carries
    the larger weight (``y`` when lam >= 1/2, else ``y[pi]``); robust accuracy on unmixed
    adversarial inputs is ``val/robust_acc``.

    Deviations / scope:

    * input mixup only; the paper's Manifold Mixup variant (mixing hidden states at a
      random layer) is not implemented.
    * the attack runs with BatchNorm in eval mode by default; the reference code attacks
      the network in train mode (batch statistics, running statistics updated by each
      attack step): ``attack_bn_mode="train"`` matches it.

    Cost: K + 2 forward+backward passes per step (9 with PGD-7): K for the attack, one for
    each mixed branch.

    Reported (CIFAR-10, Linf 8/255): abstract, standard test error 4.43% (standard
    training) -> 12.32% (PGD adversarial training) -> 6.45% (IAT) while keeping
    robustness. The reference code's README quotes the paper as 89.88% clean / 44.57% PGD
    for its ResNet-18 setting and reproduces 91.86% / 44.76%.

    Args:
        model: maps [0, 1] images to logits.
        alpha: the Beta(alpha, alpha) concentration of the mixing coefficient (> 0).
        eps, steps, step_size: the training PGD (defaults of the reference code).
        **kwargs: AdversarialModule's (norm, optimizer, lr_scheduler, attack_bn_mode, ...).
    """

    def __init__(self, model: nn.Module, alpha: float = 1.0, eps: float = 8 / 255, steps: int = 7,
                 step_size: float = 2 / 255, **kwargs: Any) -> None:
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        super().__init__(model, eps=eps, steps=steps, step_size=step_size, **kwargs)
        self.alpha = float(alpha)
        self.attack = PGD(self.eps, self.steps, self.step_size, self.norm, random_start=True,
                          bn_mode=self.attack_bn_mode)

    def sample_mix(self, batch_size: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """lam ~ Beta(alpha, alpha) (a 0-d tensor on ``device``) and a random permutation of the batch."""
        return sample_mix(batch_size, device, self.alpha)

    def outer_loss(self, x: Tensor, x_adv: Tensor, y: Tensor) -> TrainingOutput:
        """:func:`lit_robust.objectives.interpolated_at_objective`; returned logits row ``i`` belongs to the
        mixed example whose heavier label is ``y[i]``."""
        return interpolated_at_objective(self.model, x, x_adv, y, self.alpha, self.label_smoothing, self.sample_mix)

    def default_optimizer(self, params: Any) -> torch.optim.Optimizer:
        """The reference code's SGD(lr=0.1, momentum=0.9, weight_decay=2e-4)."""
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=2e-4)
