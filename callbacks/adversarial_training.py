"""Adversarial training for a LightningModule we did not write: its training inputs become adversarial.

The callback wraps the module's ``training_step`` for the duration of ``fit``: each batch's images
are replaced by ``attack(model, x, y)`` and the module's own ``training_step`` runs on that batch,
with its own loss, metrics, optimizers and logging. That is PGD-AT (Madry et al., ICLR 2018) with
``PGD``, Fast AT (Wong et al., ICLR 2020) with ``FGSM(random_start=True)``, Dynamic AT (Wang et al.,
ICML 2019) with ``FOSCSchedule``, and, with ``fraction < 1``, the clean + adversarial mixture of
Goodfellow et al. (ICLR 2015; ART's ``ratio``). Objectives that need the clean batch too (TRADES,
MART, AWP) cannot be expressed by swapping inputs: call :mod:`lit_robust.objectives` in your step.
"""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as L
import torch
from torch import Tensor, nn

from lit_robust.attacks import PGD, AttackResult
from lit_robust.batches import BatchKey, check_batch_key, replace_part, split_batch
from lit_robust.callbacks.exact_resume import ExactResume
from lit_robust.checks import check_batch, inputs_checked


def classifier_of(pl_module: L.LightningModule, model: Optional[str]) -> nn.Module:
    """The submodule named ``model`` (a dotted path, e.g. ``"net"``), or the LightningModule (its ``forward``)."""
    if model is None:
        return pl_module
    try:
        return pl_module.get_submodule(model)
    except AttributeError:
        names = [name for name, _ in pl_module.named_children()]
        raise ValueError(f"model={model!r} is not a submodule of {type(pl_module).__name__}; its children are "
                         f"{names}") from None


class AdversarialTraining(ExactResume):
    """Replaces the training inputs of any LightningModule by adversarial ones before its ``training_step``.

    Args:
        attack: the inner maximization, e.g. ``PGD(8/255, steps=10, step_size=2/255)`` (PGD-AT) or
            ``FGSM(8/255, random_start=True)`` (Fast AT); its ``bn_mode`` is the BatchNorm mode during
            the attack (``"eval"`` by default: running statistics, untouched).
        inputs, targets: where the images and the labels are in the module's batches (index or dict key;
            ``targets`` may also be a callable), as in :mod:`lit_robust.batches`.
        fraction: the share of each batch replaced, in (0, 1]; ``round(fraction * B)`` examples chosen by a
            generator seeded from ``seed``, the epoch and the batch index (the same on resume), the rest
            stay clean. Only the chosen examples are attacked.
        model: the submodule mapping [0, 1] images to logits, by attribute path (``"net"``,
            ``"backbone.classifier"``); default the LightningModule's own ``forward``.
        seed: of the ``fraction`` selection.

    The same guarantees as the defenses: the attack takes input gradients only (no parameter ``.grad``,
    no DDP all-reduce: it calls the inner module, not the DDP wrapper), runs inside the Trainer's
    precision context (bf16 autocast under ``precision="bf16-mixed"``), restores every submodule's
    mode, syncs with the host once per epoch (the first batch's input check: images in [0, 1] and
    finite, integer labels in range, a model returning logits), never per step. Exact resume: it saves
    the random generators in checkpoints (it is an :class:`ExactResume`). ``FOSCSchedule``,
    ``EpsilonSchedule`` and ``AttackStepsSchedule`` find and drive its attack (``scheduled_attack``);
    with FOSC tracked, ``train/fosc_mean`` and ``train/attack_steps`` are logged (epoch means).

    What the module sees: the batch in its own container type with the images replaced (a new tuple,
    list, dict or dataclass; the other items are the same objects). Only ``fit``'s training steps are
    affected; validation and test batches are untouched (see :class:`RobustEvaluation`).
    Cost: the attack's (``steps`` forward+backward passes for PGD-k, times ``fraction``) per step.
    """

    def __init__(self, attack: PGD, inputs: BatchKey = 0, targets: BatchKey = 1, fraction: float = 1.0,
                 model: Optional[str] = None, seed: int = 0) -> None:
        super().__init__()
        if not isinstance(attack, PGD):
            raise ValueError(f"attack must be a lit_robust.attacks.PGD (or FGSM), got {type(attack).__name__}")
        if callable(inputs):
            raise ValueError("inputs must be an index or a key: the callback writes the adversarial images back")
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        self.attack = attack
        self.inputs, self.targets = check_batch_key(inputs, "inputs"), check_batch_key(targets, "targets")
        self.fraction, self.model, self.seed = float(fraction), model, int(seed)
        self.last_attack_result: Optional[AttackResult] = None  #: the last step's, when the attack tracks FOSC
        self._wrapped: Optional[L.LightningModule] = None

    def scheduled_attack(self) -> PGD:
        """The attack schedules (``lit_robust.callbacks``) adjust."""
        return self.attack

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._unwrap()
        classifier = classifier_of(pl_module, self.model)
        own_step = pl_module.training_step

        def training_step(batch: Any, batch_idx: int, *args: Any, **kwargs: Any) -> Any:
            adversarial = self.adversarial_batch(pl_module.trainer, classifier, batch, batch_idx)
            return own_step(adversarial, batch_idx, *args, **kwargs)

        pl_module.training_step = training_step  # an instance attribute: Lightning (and DDP's redirection) call it
        self._wrapped = pl_module

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._unwrap()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._unwrap()

    def _unwrap(self) -> None:
        """Gives the module its own ``training_step`` back."""
        if self._wrapped is not None:
            self._wrapped.__dict__.pop("training_step", None)
            self._wrapped = None

    def adversarial_batch(self, trainer: L.Trainer, model: nn.Module, batch: Any, batch_idx: int) -> Any:
        """``batch`` with its images replaced by adversarial ones (``fraction`` of them)."""
        x, y = split_batch(batch, self.inputs, self.targets)
        if batch_idx == 0:
            check_batch(model, x, y)
        with inputs_checked():
            chosen = self._chosen(x, trainer.current_epoch, batch_idx)
            if chosen is None:
                x_adv = self._perturb(model, x, y)
            else:
                x_adv = x.index_copy(0, chosen, self._perturb(model, x[chosen], y[chosen]).to(x.dtype))
        self._log_fosc(trainer)
        return replace_part(batch, self.inputs, x_adv)

    def _chosen(self, x: Tensor, epoch: int, batch_idx: int) -> Optional[Tensor]:
        """The positions to attack (None: all), from a device generator seeded by (seed, epoch, batch index)."""
        if self.fraction == 1.0:
            return None
        generator = torch.Generator(device=x.device)
        generator.manual_seed(self.seed * 1_000_003 + epoch * 10_007 + batch_idx)
        count = round(self.fraction * x.shape[0])
        return torch.randperm(x.shape[0], generator=generator, device=x.device)[:count]

    def _perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        if not self.attack.track_fosc:
            self.last_attack_result = None
            return self.attack(model, x, y)
        self.last_attack_result = self.attack.run(model, x, y)
        return self.last_attack_result.x_adv

    def _log_fosc(self, trainer: L.Trainer) -> None:
        result, module = self.last_attack_result, trainer.lightning_module
        if result is None or result.fosc is None:
            return
        # epoch means, synchronised across ranks once at the epoch's end (no per-step collective)
        for name, values in (("train/fosc_mean", result.fosc), ("train/attack_steps", result.steps.float())):
            module.log(name, values.detach().float().mean(), on_step=False, on_epoch=True, sync_dist=True,
                       batch_size=values.shape[0])
