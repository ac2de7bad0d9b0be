"""Projected gradient attacks: PGD (Madry et al., ICLR 2018) and FGSM / FGSM-RS as its one-step case."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Iterator, Literal, Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lit_robust.attacks import functional as AF
from lit_robust.attacks.adam import AdamAscent
from lit_robust.checks import check_attack_inputs
from lit_robust.targets import class_labels

BN_MODES = ("eval", "train", "batch")
FOSC_REFERENCES = ("clean", "start")


@dataclass
class AttackResult:
    """What one attack run found, per example (first dimension B everywhere)."""

    x_adv: Tensor  #: the adversarial batch, detached, inside the eps-ball and [0, 1]
    logits: Tensor  #: the model's logits at ``x_adv`` (in the attack's module mode), detached
    loss: Tensor  #: the attack objective at ``x_adv``
    steps: Tensor  #: ascent steps taken (fewer than ``steps`` once FOSC froze the example)
    fosc: Optional[Tensor] = None  #: FOSC at ``x_adv`` when the attack tracks it

    @property
    def predictions(self) -> Tensor:
        return self.logits.argmax(1)

    def pick(self, other: "AttackResult", take_other: Tensor) -> "AttackResult":
        """Per example, this result or ``other`` where ``take_other`` is True."""
        merged = {}
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if mine is None:
                merged[f.name] = None
                continue
            mask = take_other.view(-1, *([1] * (mine.dim() - 1)))
            merged[f.name] = torch.where(mask, theirs, mine)
        return AttackResult(**merged)


@contextmanager
def module_mode(model: nn.Module, bn_mode: str) -> Iterator[None]:
    """Runs the block with every submodule in eval (``"eval"``) or train (``"train"``, ``"batch"``) mode.

    Each submodule's own ``training`` flag is saved and restored afterwards, so modules a
    user froze on purpose stay frozen after the attack (``model.train()`` would unfreeze them).
    ``"eval"`` uses BatchNorm running statistics and leaves them untouched; ``"train"`` uses
    batch statistics and updates the running ones, as the Madry and locuslab codes do;
    ``"batch"`` uses batch statistics and leaves the running ones (and ``num_batches_tracked``)
    untouched, as the generated-data recipes attack: DeepMind's ``is_training=False,
    test_local_stats=True``, DM-Improves-AT's ``track_bn_stats(model, False)``.
    """
    saved = [(m, m.training) for m in model.modules()]
    tracking = [(m, m.track_running_stats) for m in model.modules() if isinstance(m, _BatchNorm)]
    for m, _ in saved:
        m.training = bn_mode != "eval"
    if bn_mode == "batch":
        for m, _ in tracking:
            m.track_running_stats = False
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag
        for m, flag in tracking:
            m.track_running_stats = flag


class Attack:
    """An inner maximizer. Holds no model and no parameters: ``attack(model, x, y) -> x_adv``.

    The same object therefore serves the live model, an EMA copy, each DDP rank or a
    user's own module. ``run`` returns the richer :class:`AttackResult`. Attacks enable
    gradients themselves (they work under ``torch.no_grad``), but not inside
    ``torch.inference_mode``, whose tensors cannot join a graph: clone out of it first.

    PGD checks its batch (float images in [0, 1], finite, integer labels [B]: one host
    synchronisation per call) unless called inside :func:`lit_robust.checks.inputs_checked`,
    as the defenses' training steps do after checking each epoch's first batch.
    """

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return self.run(model, x, y).x_adv

    def run(self, model: nn.Module, x: Tensor, y: Tensor) -> AttackResult:
        raise NotImplementedError


class PGD(Attack):
    """Projected gradient ascent on a per-example loss inside an Linf or L2 ball.

    Args:
        eps: radius of the threat model, in [0, 1] pixel units (8/255 for CIFAR Linf).
        steps: ascent steps K (Madry et al. trained with 7, Rice et al. with 10).
        step_size: step per iteration; default ``2.5 * eps / steps`` (Madry et al.'s rule).
        norm: ``"linf"`` (sign steps) or ``"l2"`` (unit-gradient steps).
        random_start: start from a uniform draw in the ball instead of the clean image.
        clip_start: box-project that uniform start before the first gradient (default, as
            every official PGD code and the CIFAR-10 FGSM-RS script); ``False`` takes the first
            gradient at ``x + delta`` even where it leaves [0, 1], as the official MNIST FGSM-RS
            script does. Every later iterate and ``x_adv`` are projected either way.
        start_std: with ``random_start``, start from ``x + start_std * N(0, 1)`` instead
            (TRADES and MART use 0.001), not projected before the first step, as in their
            official code (see :func:`~lit_robust.attacks.functional.gaussian_start`).
        restarts: independent runs; per example the misclassifying run wins, ties broken by
            the higher loss.
        loss: ``"ce"``, ``"margin"`` (Carlini-Wagner) or ``"dlr"`` (Croce & Hein).
        bn_mode: module mode during the attack (see :func:`module_mode`).
        fosc_threshold: freeze an example once its FOSC at the current iterate (measured from
            ``fosc_reference``) is <= this value (Wang et al. 2019). As in the official code
            the first step is always taken, and FOSC is tracked in the result.
        track_fosc: report FOSC at ``x_adv`` without early stopping.
        fosc_reference: the point FOSC's ``<x_k - x_0, g>`` is measured from: ``"clean"``,
            the clean image (the paper's definition, default), or ``"start"``, the attack's
            starting point (the official ``pgd_attack.py``; the same point without a random start).
        ascent: ``None``, the signed (Linf) or normalised (L2) step of ``step_size``; or an
            :class:`~lit_robust.attacks.AdamAscent`, Adam on the perturbation as DeepMind's attacks
            (``step_size`` is then unused).

    Cost: ``restarts * steps`` forward+backward passes, plus one forward per restart to
    score ``x_adv`` (a forward+backward if FOSC is tracked). ``attack(model, x, y)`` with one
    restart and no FOSC skips that scoring pass.
    """

    def __init__(
        self,
        eps: float,
        steps: int = 10,
        step_size: Optional[float] = None,
        norm: Literal["linf", "l2"] = "linf",
        random_start: bool = True,
        restarts: int = 1,
        loss: Literal["ce", "margin", "dlr"] = "ce",
        bn_mode: Literal["eval", "train", "batch"] = "eval",
        fosc_threshold: Optional[float] = None,
        track_fosc: bool = False,
        start_std: Optional[float] = None,
        fosc_reference: Literal["clean", "start"] = "clean",
        clip_start: bool = True,
        ascent: Optional[AdamAscent] = None,
    ) -> None:
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if int(steps) != steps or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps}")
        if step_size is not None and not step_size > 0:
            raise ValueError(f"step_size must be > 0, got {step_size}")
        if int(restarts) != restarts or restarts < 1:
            raise ValueError(f"restarts must be an integer >= 1, got {restarts}")
        if bn_mode not in BN_MODES:
            raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
        if start_std is not None and not start_std > 0:
            raise ValueError(f"start_std must be > 0 or None, got {start_std}")
        if fosc_reference not in FOSC_REFERENCES:
            raise ValueError(f"fosc_reference must be one of {FOSC_REFERENCES}, got {fosc_reference!r}")
        self.loss_fn = AF.per_example_loss(loss)
        self.norm = AF.check_norm(norm)
        self.eps = float(eps)
        self.steps = int(steps)
        self.step_size = float(step_size) if step_size is not None else 2.5 * self.eps / self.steps
        self.random_start, self.clip_start = random_start, clip_start
        self.restarts = int(restarts)
        self.loss = loss
        self.bn_mode = bn_mode
        self._step_per_eps = self.step_size / self.eps
        self.track_fosc = track_fosc
        self.fosc_reference = fosc_reference
        self.set_fosc_threshold(fosc_threshold)
        self.start_std = None if start_std is None else float(start_std)
        self.ascent = ascent

    def set_eps(self, eps: float) -> None:
        """Changes the radius and scales the step size with it (schedules ramp eps this way).

        ``eps = 0`` is allowed here (a ramp's start): the attack then returns the clean batch.
        """
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if self.eps > 0:
            self._step_per_eps = self.step_size / self.eps
        self.eps, self.step_size = float(eps), float(eps) * self._step_per_eps

    def set_fosc_threshold(self, threshold: Optional[float]) -> None:
        """Freezes examples whose FOSC is <= ``threshold`` (None: plain PGD); FOSC is then tracked."""
        if threshold is not None and threshold < 0:
            raise ValueError(f"fosc_threshold must be >= 0 or None, got {threshold}")
        self.fosc_threshold = threshold
        self.track_fosc = self.track_fosc or threshold is not None

    def __repr__(self) -> str:
        start = "" if self.start_std is None else f", start_std={self.start_std:.4g}"
        start += "" if self.clip_start else ", clip_start=False"
        return (
            f"{type(self).__name__}(eps={self.eps:.4g}, steps={self.steps}, step_size={self.step_size:.4g}, "
            f"norm={self.norm!r}, random_start={self.random_start}{start}, restarts={self.restarts}, "
            f"loss={self.loss!r}{'' if self.ascent is None else ', ascent=' + repr(self.ascent)})"
        )

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        if self.restarts > 1 or self.track_fosc:
            return self.run(model, x, y).x_adv
        check_attack_inputs(x, y)
        with module_mode(model, self.bn_mode), torch.enable_grad():
            x = x.detach()
            return self._ascend(model, x, self.target(model, x, y))[0]

    def run(self, model: nn.Module, x: Tensor, y: Tensor) -> AttackResult:
        check_attack_inputs(x, y)
        best = None
        with module_mode(model, self.bn_mode), torch.enable_grad():
            x = x.detach()
            target = self.target(model, x, y)
            for _ in range(self.restarts):
                result = self._single_run(model, x, target)
                if best is None:
                    best = result
                    continue
                labels = class_labels(y)
                new_wrong, old_wrong = result.predictions != labels, best.predictions != labels
                better = (new_wrong & ~old_wrong) | ((new_wrong == old_wrong) & (result.loss > best.loss))
                best = best.pick(result, better)
        return best

    def target(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """The second argument of ``loss_fn`` (the first is the logits at the iterate).

        The labels here; a subclass whose objective compares with something else (the clean
        distribution, for :class:`~lit_robust.attacks.TradesKLAttack`) computes it once per
        attack, in the attack's module mode.
        """
        return y

    def _single_run(self, model: nn.Module, x: Tensor, target: Tensor) -> AttackResult:
        x_adv, taken, origin = self._ascend(model, x, target)
        if self.track_fosc:
            loss, logits, grad = AF.loss_and_input_grad(model, x, x_adv - x, target, self.loss_fn)
            return AttackResult(x_adv, logits, loss, taken, AF.fosc(x_adv, origin, grad, self.eps, self.norm))
        with torch.no_grad():
            logits = model(x_adv)
        return AttackResult(x_adv, logits, self.loss_fn(logits, target), taken)

    def _start(self, x: Tensor) -> Tensor:
        if not self.random_start:
            return torch.zeros_like(x)
        if self.start_std is not None:
            return AF.gaussian_start(x, self.start_std)
        return AF.random_start(x, self.eps, self.norm, clip=self.clip_start)

    def _ascend(self, model: nn.Module, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The K masked ascent steps on ``loss_fn(logits, target)``; returns x_adv, the steps each example
        took, and FOSC's reference point (``x``, or the starting point with ``fosc_reference="start"``)."""
        delta = self._start(x)
        origin = x if self.fosc_reference == "clean" else (x + delta).detach()
        active = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        taken = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        adam = None if self.ascent is None else self.ascent.run()
        for k in range(self.steps):
            _, _, grad = AF.loss_and_input_grad(model, x, delta, target, self.loss_fn)
            if self.fosc_threshold is not None and k > 0:
                active = active & (AF.fosc(x + delta, origin, grad, self.eps, self.norm) > self.fosc_threshold)
            moved = AF.ascent_step(delta, grad, self.step_size, self.norm) if adam is None else adam.step(delta, grad)
            stepped = AF.project(moved, x, self.eps, self.norm)
            delta = torch.where(active.view(-1, *([1] * (x.dim() - 1))), stepped, delta)
            taken += active
        return (x + delta).detach(), taken, origin


class FGSM(PGD):
    """FGSM (Goodfellow et al., ICLR 2015) and, with ``random_start=True``, FGSM-RS (Wong et al., ICLR 2020).

    One signed-gradient step of size ``step_size``: ``eps`` by default, ``1.25 * eps`` with
    a random start (the "Fast is better than free" recipe). Cost: 1 forward+backward.
    """

    def __init__(
        self,
        eps: float,
        step_size: Optional[float] = None,
        norm: Literal["linf", "l2"] = "linf",
        random_start: bool = False,
        loss: Literal["ce", "margin", "dlr"] = "ce",
        bn_mode: Literal["eval", "train", "batch"] = "eval",
        clip_start: bool = True,
    ) -> None:
        if step_size is None:
            step_size = 1.25 * eps if random_start else eps
        super().__init__(eps, 1, step_size, norm, random_start, 1, loss, bn_mode, clip_start=clip_start)
