"""Robust Mixup, the interpolation half of IJSAT (Lau, Liu, Souri, Lin, Feizi & Chellappa, TPAMI 2023)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from lit_robust.attacks import PGD
from lit_robust.attacks.pgd import module_mode
from lit_robust.defenses.base import AdversarialModule, TrainingOutput, positive_int
from lit_robust.objectives import mixup_batch, robust_mixup_objective, sample_mix
from lit_robust.targets import is_probability_rows


class RobustMixup(AdversarialModule):
    """Lau, Liu, Souri, Lin, Feizi & Chellappa, "Interpolated Joint Space Adversarial Training for Robust and
    Generalizable Defenses", IEEE TPAMI 45(11), 2023 (arXiv 2112.06323): its Robust Mixup strategy, which
    "maximizes the adversity of the interpolated images", without the paper's normalizing flow.

    Official code: none published (Papers with Code: "No code implementations yet").

    Algorithm, per batch (x, y)::

        lam ~ Beta(alpha, alpha), pi = randperm(B)            # one lam per batch, as in mixup
        x_mix = lam x + (1-lam) x[pi]                         # mix first ...
        y_mix = lam onehot(y) + (1-lam) onehot(y[pi])         # ... images and labels
        x_adv = PGD(f, x_mix, y_mix)                          # ... then attack: the ball is around x_mix,
                                                              #     the attack's CE is against the row y_mix
        theta <- theta - lr * grad CE(f(x_adv), y_mix)

    Interpolated AT (:class:`~lit_robust.defenses.InterpolatedAT`) attacks the unmixed batch and mixes
    the adversarial examples; Robust Mixup mixes and then attacks the interpolated images, so the
    network is trained on the worst case around each interpolation. ``perturb(x, y)`` is the attack on
    the batch it is given (PGD against ``y``, indices or rows): ``training_loss`` hands it the mixed batch
    and its rows, so every adversarial input is within ``eps`` of its mixed image and in [0, 1], which
    ``in_threat_model`` checks against the batch ``perturb`` was given. With lam = 1 a step is PGD-AT's.
    The draws come from torch's global RNG in the order lam, pi (seeded runs repeat exactly).

    Defaults (our choices; the paper's hyperparameters were not accessible to us): alpha 1.0 (mixup's and
    Interpolated AT's CIFAR value; Beta(1, 1) is uniform); Linf eps 8/255, PGD-10 with step 2/255 and a
    random start (Madry/Rice PGD-AT, which IJSAT compares with and builds on); SGD lr 0.1, momentum 0.9,
    weight decay 5e-4, lr /10 at 50% and 75% of training (the base schedule).

    Logged: ``train/adv_acc`` is the accuracy on the mixed adversarial batch, each mixed example
    judged by its heavier label (``y`` when lam >= 1/2, else ``y[pi]``); robust accuracy on unmixed
    inputs is ``val/robust_acc``. No clean forward is made (``train/clean_acc`` is not logged).

    Left out, and why:

    * the Joint Space Threat Model: the paper also perturbs the latent code of a normalizing flow
      (``G(G^-1(x) + delta_z) + delta_x``), which needs a pretrained invertible flow per dataset; neither
      code nor weights were published. Our threat model is the paper's with ``eps_z = 0``: the pixel
      Linf (or L2) ball, attacked by PGD.
    * mixing in the flow's latent space (if the paper does so) for the same reason; we mix pixels.
    * any extra clean or unmixed adversarial term in the paper's loss: we could not verify one, so the loss
      is the mixed adversarial cross-entropy alone. Combine with another defense's loss by subclassing.

    Cost: K + 1 forward+backward passes per step (11 with PGD-10), PGD-AT's: mixing is free, and the
    attack and the update each see one batch. The first step with class-index labels makes one extra
    no-grad forward of one image to read the number of classes, unless ``num_classes`` is given.

    Reported: the abstract gives no numbers, and we could not read the paper's tables (CIFAR-10/100,
    OM-ImageNet, CIFAR-10-C); none are quoted.

    Args:
        model: maps [0, 1] images to logits.
        alpha: the Beta(alpha, alpha) concentration of the mixing coefficient (> 0).
        num_classes: the length of the label rows; default read once from the model's output.
        eps, steps, step_size: the training PGD.
        **kwargs: AdversarialModule's (norm, optimizer, lr_scheduler, attack_bn_mode, ...).
    """

    def __init__(self, model: nn.Module, alpha: float = 1.0, num_classes: Optional[int] = None,
                 eps: float = 8 / 255, steps: int = 10, step_size: float = 2 / 255, **kwargs: Any) -> None:
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        num_classes = None if num_classes is None else positive_int(num_classes, "num_classes")
        super().__init__(model, eps=eps, steps=steps, step_size=step_size, **kwargs)
        self.alpha = float(alpha)
        self.num_classes = num_classes
        self.attack = PGD(self.eps, self.steps, self.step_size, self.norm, random_start=True,
                          bn_mode=self.attack_bn_mode)
        self._mix: Optional[tuple[Tensor, Tensor]] = None

    def sample_mix(self, batch_size: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """lam ~ Beta(alpha, alpha) (a 0-d tensor on ``device``) and a random permutation of the batch."""
        return sample_mix(batch_size, device, self.alpha)

    def label_rows(self, x: Tensor, y: Tensor) -> Optional[int]:
        """The number of classes for one-hot rows of ``y`` (None when ``y`` already holds rows)."""
        if is_probability_rows(y):
            return None
        if self.num_classes is None:  # once: one image, no grad, eval mode (BatchNorm untouched)
            with torch.no_grad(), module_mode(self.model, "eval"):
                self.num_classes = int(self.model(x[:1]).shape[1])
        return self.num_classes

    def training_loss(self, x: Tensor, y: Tensor) -> TrainingOutput:
        """Mixes the batch, then the base's min-max step on it: ``perturb(x_mix, y_mix)`` [, AWP], ``outer_loss``."""
        lam, perm = self._mix = self.sample_mix(x.shape[0], x.device)
        x_mix, y_mix = mixup_batch(x, y, lam, perm, self.label_rows(x, y))
        try:
            return super().training_loss(x_mix, y_mix)
        finally:
            self._mix = None

    def outer_loss(self, x: Tensor, x_adv: Tensor, y: Tensor) -> TrainingOutput:
        """:func:`lit_robust.objectives.robust_mixup_objective` on the mixed batch ``x``, its attack ``x_adv`` and
        rows ``y``, with this step's lam and permutation; without a mix drawn (a direct call), lam = 1."""
        lam, perm = self._mix if self._mix is not None else (x.new_ones(()), torch.arange(x.shape[0], device=x.device))
        return robust_mixup_objective(self.model, x, x_adv, y, lam, perm, self.label_smoothing)
