"""Training base classifiers for randomized smoothing: Gaussian augmentation (Cohen et al. 2019) and SmoothMix
(Jeong et al. 2021), with certified evaluation (Cohen et al.'s CERTIFY) at test time."""

from __future__ import annotations

from typing import Any, Literal, Optional, Sequence

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lit_robust.attacks.smoothed import project_l2, smoothmix_attack
from lit_robust.certify.randomized_smoothing import ABSTAIN, Smooth
from lit_robust.defenses.base import AdversarialModule, TrainingOutput, finite_total, positive_int
from lit_robust.defenses.trades import piecewise_by_epochs
from lit_robust.objectives import gaussian_augmentation_objective, smoothmix_objective

EVAL_SEED = 1234  #: noise of validation / test batch ``i`` comes from a generator seeded with ``EVAL_SEED + i``
_TEST_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
# Generic base arguments with no meaning for a smoothed classifier: rejected when set.
_UNSUPPORTED = {"awp_gamma": 0.0, "test_autoattack": False, "test_apgd": False, "attack_bn_mode": "eval"}


def warmup_weight(epoch: int, warmup_epochs: int) -> float:
    """SmoothMix's ``w_t = min(1, (epoch + 1) / warmup_epochs)`` (epochs counted from 0; 1 when warmup is 0)."""
    return 1.0 if warmup_epochs == 0 else min(1.0, (epoch + 1) / warmup_epochs)


class SmoothedClassifierModule(AdversarialModule):
    """Base of the defenses that train a base classifier ``f`` for Gaussian randomized smoothing.

    The deployed classifier is the smoothed ``g(x) = argmax_c P(f(x + N(0, sigma^2 I)) = c)``
    (Cohen, Rosenfeld & Kolter, ICML 2019), certified with CERTIFY at test time
    (:class:`~lit_robust.certify.randomized_smoothing.Smooth`). Noise is added in [0, 1] pixel
    space (normalisation is inside the model), so ``sigma`` and every radius are pixel-space L2.

    Evaluation (no PGD: an attack on the base classifier is not the smoothed classifier's
    threat model):

    - validation logs ``val/clean_acc`` (``f`` on clean x) and ``val/noisy_acc`` (``f`` on
      ``x + N(0, sigma^2)``, what training maximises; a checkpoint should monitor it);
    - test logs ``test/clean_acc``, ``test/noisy_acc`` and, from CERTIFY with ``test_n0``
      selection and ``test_n`` estimation draws at level ``test_alpha``:
      ``test/certified_acc`` (at radius ``eps``), ``test/certified_acc_r{r}`` for every ``r``
      in ``test_radii`` (e.g. ``test/certified_acc_r0.25``; an abstention counts as wrong,
      certified means correct with radius >= r), ``test/acr`` (average certified radius, the
      mean of ``correct * radius``) and ``test/abstain_rate``.

    The noise of evaluation batch ``i`` comes from a private generator seeded with
    ``EVAL_SEED + i``: results are reproducible and the global RNG (training noise, exact
    resume) is untouched. Certification costs ``test_n0 + test_n`` forwards per test image
    (Cohen et al. certify every 20th CIFAR-10 test image with N = 100,000), in fp32.

    ``perturb`` and ``scheduled_attack`` raise: there is no PGD training attack to schedule.

    Args:
        model: maps [0, 1] images to logits (normalisation inside it).
        sigma: noise level of the smoothing (and of training), > 0.
        eps: the L2 radius (pixels) reported as ``test/certified_acc``.
        optimizer, lr_scheduler: as in :class:`~lit_robust.defenses.AdversarialModule`;
            defaults SGD(0.1, 0.9, wd 1e-4) and x0.1 at 1/3 and 2/3 of the training steps.
        test_radii: radii of ``test/certified_acc_r{r}``.
        test_n0, test_n, test_alpha: CERTIFY's selection draws, estimation draws and level.
        test_batch_size: noisy images per forward during certification.
        norm: "l2" only (smoothing certifies L2 radii); there for the shared-argument contract.
        **kwargs: the remaining shared arguments of :class:`~lit_robust.defenses.AdversarialModule`
            (``lr_scheduler_interval``, ``label_smoothing``, ...);
            ``awp_gamma``, ``test_autoattack``, ``test_apgd`` and ``attack_bn_mode="train"`` are
            rejected (they have no meaning here).
    """

    def __init__(
        self,
        model: nn.Module,
        sigma: float = 0.5,
        eps: float = 0.5,
        optimizer: Optional[OptimizerCallable] = None,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        test_radii: Sequence[float] = _TEST_RADII,
        test_n0: int = 100,
        test_n: int = 100_000,
        test_alpha: float = 0.001,
        test_batch_size: int = 1000,
        norm: Literal["l2"] = "l2",
        **kwargs: Any,
    ) -> None:
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        if any(not r >= 0 for r in test_radii):
            raise ValueError(f"test_radii must all be >= 0, got {list(test_radii)}")
        for name, value in (("test_n0", test_n0), ("test_n", test_n), ("test_batch_size", test_batch_size)):
            positive_int(value, name)
        if not 0 < test_alpha < 1:
            raise ValueError(f"test_alpha must be in (0, 1), got {test_alpha}")
        if norm != "l2":
            raise ValueError("norm must be 'l2' for randomized smoothing (its certificates are L2 radii)")
        for name, default in _UNSUPPORTED.items():
            if kwargs.get(name, default) != default:
                raise ValueError(f"{name}={kwargs[name]!r} is not supported by {type(self).__name__}; "
                                 f"leave it at {default!r}")
        super().__init__(model, eps=eps, norm="l2", optimizer=optimizer, lr_scheduler=lr_scheduler, **kwargs)
        self.sigma = float(sigma)
        self.test_radii = tuple(float(r) for r in test_radii)
        self.test_n0, self.test_n, self.test_alpha = int(test_n0), int(test_n), float(test_alpha)
        self.test_batch_size = int(test_batch_size)

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        raise TypeError(f"{type(self).__name__} trains a base classifier for randomized smoothing; "
                        "it has no adversarial batch to return (see training_loss)")

    def noisy(self, x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """``x + N(0, sigma^2 I)`` in pixel space, not clipped (as Cohen et al. and SmoothMix train)."""
        return x + self.sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

    # --- evaluation ------------------------------------------------------------------------

    def _evaluate(self, x: Tensor, y: Tensor, batch_idx: int, stage: str, dataloader_idx: int = 0) -> None:
        # Forwards only: this runs as is under trainer.validate / trainer.test's inference mode.
        generator = torch.Generator(device=x.device)
        generator.manual_seed(EVAL_SEED + batch_idx + 1_000_003 * dataloader_idx)
        with torch.no_grad():
            logits = self.model(x)
            correct = {f"{stage}/clean_acc": logits.argmax(1) == y,
                       f"{stage}/noisy_acc": self.model(self.noisy(x, generator)).argmax(1) == y}
        for name, value in correct.items():
            self._log_correct(name, value, dataloader_idx)
        if stage != "test":
            return
        smooth = Smooth(self.model, self.sigma, num_classes=logits.shape[1], batch_size=self.test_batch_size)
        prediction, radius = smooth.certify(x, self.test_n0, self.test_n, self.test_alpha, generator=generator,
                                            progress=False)  # Lightning's bar shows the test's progress
        prediction, radius = prediction.to(y.device), radius.to(device=y.device, dtype=torch.float32)
        right = (prediction == y) & (prediction != ABSTAIN)
        self._log_correct("test/certified_acc", right & (radius >= self.eps), dataloader_idx)
        for r in self.test_radii:
            self._log_correct(f"test/certified_acc_r{r}", right & (radius >= r), dataloader_idx)
        self._log_mean("test/acr", right.float() * radius, dataloader_idx)
        self._log_correct("test/abstain_rate", prediction == ABSTAIN, dataloader_idx)

    # --- optimisation ----------------------------------------------------------------------

    def default_optimizer(self, params: Any) -> torch.optim.Optimizer:
        """SGD(lr=0.1, momentum=0.9, weight_decay=1e-4): Cohen et al.'s and SmoothMix's ``train.py``."""
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4)

    def default_lr_scheduler(self, optimizer: torch.optim.Optimizer) -> tuple[Any, str]:
        """x0.1 at 1/3 and 2/3 of the training steps (Cohen: every 30 of 90 epochs; SmoothMix: every 50 of 150)."""
        total = finite_total(self.trainer.estimated_stepping_batches)
        return piecewise_by_epochs(optimizer, total, [1, 2], 3), "step"


class GaussianAugmentation(SmoothedClassifierModule):
    """Cohen, Rosenfeld & Kolter, "Certified Adversarial Robustness via Randomized Smoothing", ICML 2019.

    Official code: github.com/locuslab/smoothing (``code/train.py``; certification in
    ``code/core.py``, ``code/certify.py``).

    Training is cross-entropy on Gaussian-augmented inputs, ``CE(f(x + N(0, sigma^2 I)), y)``,
    one fresh noise per image and step, added in [0, 1] pixel space (normalisation inside
    the model) and not clipped. Cost: 1 forward + 1 backward per step, as standard training.

    Recipe (CIFAR-10, ``experiments.MD``): ResNet-110, 90 epochs, batch 400, SGD lr 0.1
    (x0.1 every 30 epochs: the default schedule, at 1/3 and 2/3 of the steps), momentum 0.9,
    weight decay 1e-4; sigma in {0.12, 0.25, 0.5, 1.0}, trained and certified with the same
    sigma. Reported certified accuracy (sigma 0.5, N = 100,000, alpha 0.001, every 20th
    test image): 0.55 / 0.41 / 0.32 / 0.23 at r = 0.25 / 0.5 / 0.75 / 1.0.

    ``train/clean_acc`` is the base classifier's accuracy on the noisy training inputs (the
    accuracy of what is trained); evaluation is :class:`SmoothedClassifierModule`'s.

    Args: those of :class:`SmoothedClassifierModule`.
    """

    def training_loss(self, x: Tensor, y: Tensor) -> TrainingOutput:
        return gaussian_augmentation_objective(self.model, x, y, self.sigma, self.label_smoothing)


class SmoothMix(SmoothedClassifierModule):
    """Jeong, Park, Kim & Shin, "SmoothMix: Training Confidence-calibrated Smoothed Classifiers for
    Certified Robustness", NeurIPS 2021.

    Official code: github.com/jh-jeong/smoothmix (``code/train.py``; recipes in ``EXPERIMENTS.MD``).

    Algorithm, per batch of B images (x, y)::

        noises delta_1..delta_m ~ N(0, sigma^2 I), m x B, shared by the attack and the loss
        x_init, x_adv = smoothmix_attack(f, x, y, noises, T, alpha, mix_step, max_norm)   # eval mode
        x_init = clip_[0,1](Proj_{||. - x||_2 <= alpha * mix_step * w_t}(x_init))          # if mix_step > 0
        # train mode:
        p_clean = (1/m) sum_i softmax(f(x_init + delta_i))                 # not detached
        L_CE    = mean over the m*B noisy images of CE(f(x_init + delta_i), y)
        lambda  ~ U[0, 1/2] per example
        x_mix   = (1 - lambda) x_init + lambda x_adv
        y_mix   = (1 - lambda) p_clean + lambda * uniform(K)
        L_mix   = mean over the m*B pairs (i, b) of
                  1[argmax p_clean_b = y_b] * KL(y_mix_b || softmax f(x_mix_b + delta_i))
        loss    = L_CE + eta * w_t * L_mix,     w_t = min(1, (epoch + 1) / warmup_epochs)

    With the default ``mix_step = 0``, ``x_init = x``. With ``mix_step > 0`` the official code
    replaces the clean batch by ``x_init`` everywhere in the loss (its ``inputs`` is rebound to the
    attack's first output), the CE and ``p_clean`` included; so do we.

    The mask keeps the KL only for examples the m-sample smoothed soft classifier gets right,
    without a host sync; ``L_mix`` divides by all m*B pairs, not by the number of correct
    ones, exactly as the official ``(ind_correct * loss_mixup).mean()``. The gradient flows
    through ``p_clean`` into the target ``y_mix``, as in the official code. The clean and the
    mixed noisy batches are two separate train-mode forwards of m*B images (BatchNorm
    statistics as in the official code).

    Batching: the official script splits each loader batch (256 on CIFAR-10) into m chunks
    and takes one optimizer step per chunk, each chunk's images replicated with m noises.
    Here one optimizer step is taken per loader batch of B images, each with m noises: the
    same computation when the DataModule's batch size is the official batch / m (256 / 2 =
    128 on CIFAR-10; the config does so). ``max_epochs`` then counts the same epochs.

    Cost per step, over N = m * B noisy images: T attack steps (forward + input-backward
    over N), the clean forward over N, the mixed forward over N, and the backward over 2N:
    about (T + 2) F + (T + 2) B, i.e. 6 F + 6 B at the defaults.

    ``train/clean_acc`` is the accuracy of argmax ``p_clean`` (the m-sample smoothed soft
    classifier on the noisy clean batch), which is also the fraction of examples that the
    KL term covers; no ``train/adv_acc`` is logged.

    Defaults (CIFAR-10, ``EXPERIMENTS.MD``): ResNet-110, 150 epochs, SGD lr 0.1 (x0.1 every
    50 epochs: the default schedule), momentum 0.9, weight decay 1e-4, batch 256 (128 per
    step here), m = 2, T = 4, eta = 5, mix_step 0 (1: the "one-step adversary" variant),
    warm-up 10 epochs, step size ``2 * sigma`` (0.5 / 1.0 / 2.0 for sigma 0.25 / 0.5 / 1.0),
    no ``max_norm``. Reported (sigma 0.5, all 10,000 test images, N = 1e5): certified
    accuracy 64.4 / 57.2 / 49.5 / 42.3 / 35.0 % at r = 0 / 0.25 / 0.5 / 0.75 / 1.0, ACR 0.712.

    Args:
        num_noise_vec: m, noise samples per image (>= 1).
        steps: T, attack steps (>= 1).
        step_size: alpha, the attack's L2 step (official: 2 * sigma).
        eta: weight of the mixup KL term (>= 0).
        mix_step: which attack iterate is ``x_init`` (0 = clean), in [0, steps).
        warmup_epochs: epochs over which ``w_t`` rises linearly to 1 (0: no warm-up).
        max_norm: optional L2 ball around x for the attack's iterates (None: unbounded).
        **kwargs: those of :class:`SmoothedClassifierModule` (``sigma``, ``eps``, ...).
    """

    def __init__(
        self,
        model: nn.Module,
        num_noise_vec: int = 2,
        steps: int = 4,
        step_size: float = 1.0,
        eta: float = 5.0,
        mix_step: int = 0,
        warmup_epochs: int = 10,
        max_norm: Optional[float] = None,
        **kwargs: Any,
    ) -> None:
        positive_int(num_noise_vec, "num_noise_vec")
        positive_int(steps, "steps")
        if not eta >= 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        if int(mix_step) != mix_step or not 0 <= mix_step < steps:
            raise ValueError(f"mix_step must be an integer in [0, steps={steps}), got {mix_step}")
        if int(warmup_epochs) != warmup_epochs or warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be an integer >= 0, got {warmup_epochs}")
        if max_norm is not None and not max_norm > 0:
            raise ValueError(f"max_norm must be > 0 or None, got {max_norm}")
        super().__init__(model, steps=steps, step_size=step_size, **kwargs)
        self.num_noise_vec, self.eta, self.mix_step = int(num_noise_vec), float(eta), int(mix_step)
        self.warmup_epochs = int(warmup_epochs)
        self.max_norm = None if max_norm is None else float(max_norm)

    def training_loss(self, x: Tensor, y: Tensor) -> TrainingOutput:
        noises = self.sigma * torch.randn((self.num_noise_vec, *x.shape), device=x.device, dtype=x.dtype)
        weight = warmup_weight(self.current_epoch, self.warmup_epochs)
        x_init, x_adv = smoothmix_attack(self.model, x, y, noises, self.steps, self.step_size, self.mix_step,
                                         self.max_norm)
        if self.mix_step > 0:
            x_init = project_l2(x_init, x, self.step_size * self.mix_step * weight)
        lam = torch.rand(x.shape[0], device=x.device, dtype=x.dtype) / 2
        return self.smoothmix_loss(x_init, x_adv, y, noises, lam, weight)

    def smoothmix_loss(self, x_init: Tensor, x_adv: Tensor, y: Tensor, noises: Tensor, lam: Tensor,
                       weight: float) -> TrainingOutput:
        """:func:`lit_robust.objectives.smoothmix_objective` with this module's ``eta`` and label smoothing."""
        return smoothmix_objective(self.model, x_init, x_adv, y, noises, lam, self.eta, weight, self.label_smoothing)
