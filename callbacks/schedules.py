"""Attack-strength schedules: the training attack's eps or number of steps, ramped over training.

A schedule sets ``pl_module.scheduled_attack()`` (the defense's PGD-family training attack, or the
``AdversarialTraining`` callback's attack for a module that is not a defense)
at the start of every epoch, or of every batch with ``per_step=True``. The value is a pure
function of the training progress (``epoch + batch_idx / batches_per_epoch``), so it is
the same on every DDP rank and a resumed run continues the ramp exactly. Validation and
test attacks keep the module's own ``eps`` and steps: the model is judged at the target
threat model throughout.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import lightning.pytorch as L
import torch

from lit_robust.attacks import PGD

SHAPES = ("linear", "smoothed")


def attack_owner(pl_module: L.LightningModule, schedule: L.Callback) -> Any:
    """What holds the training attack: the module (a defense, or any module with ``scheduled_attack()``) or
    else the Trainer's ``AdversarialTraining`` callback; an error saying what a schedule needs otherwise."""
    if hasattr(pl_module, "scheduled_attack"):
        return pl_module
    trainer = pl_module._trainer
    owners = [c for c in (trainer.callbacks if trainer is not None else []) if hasattr(c, "scheduled_attack")]
    if len(owners) == 1:
        return owners[0]
    raise TypeError(f"{type(schedule).__name__} sets the training attack of a lit_robust defense "
                    f"(lit_robust.defenses, through its scheduled_attack()) or of the AdversarialTraining "
                    f"callback; {type(pl_module).__name__} has none and the Trainer has "
                    f"{len(owners)} such callbacks: train with a defense, add one AdversarialTraining callback, or "
                    "give your LightningModule a scheduled_attack() method returning the PGD its training_step runs")


def scheduled_attack(pl_module: L.LightningModule, schedule: L.Callback) -> PGD:
    """The training attack for ``schedule`` to set (:func:`attack_owner`'s)."""
    return attack_owner(pl_module, schedule).scheduled_attack()


def ramp(u: float, shape: str = "linear", mid: float = 0.25, beta: float = 4.0) -> float:
    """A ramp from 0 at ``u <= 0`` to 1 at ``u >= 1``.

    ``"linear"``: ``u``. ``"smoothed"`` (Shi et al., "Fast Certified Robust Training with
    Short Warmup", NeurIPS 2021; auto_LiRPA's ``SmoothedScheduler``): ``a * u**beta`` up to
    ``u = mid``, then the tangent line through that point, which reaches 1 at ``u = 1``;
    ``a = 1 / (mid**(beta - 1) * (mid + beta * (1 - mid)))`` makes the curve and its
    slope continuous. It grows slowly at first, where a fast ramp destabilises training.
    """
    u = min(max(u, 0.0), 1.0)
    if shape == "linear" or u == 1.0:
        return u
    a = 1.0 / (mid ** (beta - 1) * (mid + beta * (1 - mid)))
    if u < mid:
        return a * u**beta
    return a * mid**beta + a * beta * mid ** (beta - 1) * (u - mid)


class AttackSchedule(L.Callback):
    """A value that goes from ``start`` to ``final`` over ``ramp_epochs`` after ``warmup_epochs``.

    Subclasses say what the value is (``target`` gives the attack's own value, used when
    ``final`` is None) and how it is set (``apply``). The value is logged as ``train/<name>``
    (its mean over the epoch's batches).
    """

    name = "value"

    def __init__(
        self,
        ramp_epochs: float,
        start: float,
        final: Optional[float] = None,
        warmup_epochs: float = 0.0,
        shape: Literal["linear", "smoothed"] = "linear",
        per_step: bool = False,
        mid: float = 0.25,
        beta: float = 4.0,
    ) -> None:
        if not ramp_epochs > 0:
            raise ValueError(f"ramp_epochs must be > 0, got {ramp_epochs}")
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        if shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
        if not 0 < mid < 1 or not beta >= 1:
            raise ValueError(f"mid must be in (0, 1) and beta >= 1, got {mid}, {beta}")
        self.ramp_epochs, self.warmup_epochs = float(ramp_epochs), float(warmup_epochs)
        self.start, self.final = float(start), None if final is None else float(final)
        self.shape, self.per_step, self.mid, self.beta = shape, per_step, mid, beta

    def value(self, progress: float) -> float:
        """The scheduled value after ``progress`` epochs of training (fractional within an epoch)."""
        if self.final is None:
            raise RuntimeError(f"{type(self).__name__}: the final value is set when fitting starts")
        u = (progress - self.warmup_epochs) / self.ramp_epochs
        return self.start + (self.final - self.start) * ramp(u, self.shape, self.mid, self.beta)

    def target(self, attack: PGD) -> float:
        raise NotImplementedError

    def apply(self, attack: PGD, value: float) -> None:
        raise NotImplementedError

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.final is None:
            self.final = self.target(scheduled_attack(pl_module, self))

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.per_step:
            self._set(pl_module, float(trainer.current_epoch))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.per_step:
            self._set(pl_module, trainer.current_epoch + batch_idx / trainer.num_training_batches)

    def _set(self, pl_module: L.LightningModule, progress: float) -> None:
        value = self.value(progress)
        self.apply(scheduled_attack(pl_module, self), value)
        # a CPU tensor: Lightning would copy a Python number to the GPU, a blocking copy every step (per_step)
        pl_module.log(f"train/{self.name}", torch.tensor(value), on_step=False, on_epoch=True)

    def state_dict(self) -> dict[str, Any]:
        return {"final": self.final}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.final = state_dict["final"]


class EpsilonSchedule(AttackSchedule):
    """Ramps the training attack's radius: curriculum AT and the certified-training eps ramp.

    The step size is scaled with eps (:meth:`~lit_robust.attacks.PGD.set_eps`), so an attack
    configured as 2/255 steps at 8/255 takes 1/255 steps at 4/255. ``final_eps`` defaults to
    the attack's own eps. Certified training ramps eps per step after a warm-up at 0: linearly
    in Gowal et al. (2018) and most CROWN-IBP configs (Zhang et al., ICLR 2020), with the
    ``"smoothed"`` shape in CROWN-IBP's DM-large configs and Shi et al. (NeurIPS 2021). At eps 0 the attack returns the clean batch (its passes
    still run).
    """

    name = "attack_eps"

    def __init__(self, ramp_epochs: float, start_eps: float = 0.0, final_eps: Optional[float] = None,
                 warmup_epochs: float = 0.0, shape: Literal["linear", "smoothed"] = "linear",
                 per_step: bool = True, mid: float = 0.25, beta: float = 4.0) -> None:
        if start_eps < 0 or (final_eps is not None and final_eps < 0):
            raise ValueError(f"start_eps and final_eps must be >= 0, got {start_eps}, {final_eps}")
        super().__init__(ramp_epochs, start_eps, final_eps, warmup_epochs, shape, per_step, mid, beta)

    def target(self, attack: PGD) -> float:
        return attack.eps

    def apply(self, attack: PGD, value: float) -> None:
        attack.set_eps(value)


class AttackStepsSchedule(AttackSchedule):
    """An attack-steps curriculum: the training PGD's iterations grow from ``start_steps`` to ``final_steps``.

    In the spirit of Cai et al., "Curriculum Adversarial Training" (IJCAI 2018), whose attack
    strength is the number of PGD iterations. The step size stays as configured, so early,
    short attacks are also weaker in reach. ``final_steps`` defaults to the attack's own;
    the value is rounded to an integer and set once per epoch (``per_step=False``).
    """

    name = "attack_steps_scheduled"

    def __init__(self, ramp_epochs: float, start_steps: int = 1, final_steps: Optional[int] = None,
                 warmup_epochs: float = 0.0, shape: Literal["linear", "smoothed"] = "linear",
                 per_step: bool = False) -> None:
        if start_steps < 1 or (final_steps is not None and final_steps < 1):
            raise ValueError(f"start_steps and final_steps must be >= 1, got {start_steps}, {final_steps}")
        super().__init__(ramp_epochs, start_steps, final_steps, warmup_epochs, shape, per_step)

    def value(self, progress: float) -> float:
        return float(round(super().value(progress)))

    def target(self, attack: PGD) -> float:
        return attack.steps

    def apply(self, attack: PGD, value: float) -> None:
        attack.steps = int(value)
