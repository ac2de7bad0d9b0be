"""Learning-rate schedules of the generated-data recipes, told the training length by the defense.

Both take ``total_steps=None`` by default. :meth:`AdversarialModule.configure_optimizers
<lit_robust.defenses.AdversarialModule.configure_optimizers>` then calls ``set_total_steps(n)``
right after building the scheduler, before the first training step: ``n`` is the number of
optimizer steps of the whole fit (``trainer.estimated_stepping_batches``, which accounts for
``accumulate_grad_batches``, devices and ``max_steps``) when the defense's
``lr_scheduler_interval="step"``, or ``trainer.max_epochs`` when ``"epoch"``. ``set_total_steps``
builds the torch scheduler, which puts the learning rate of step 0 in the optimizer. An explicit
``total_steps`` builds it at once (and the defense leaves it alone). Until the length is known the
optimizer's learning rate is untouched and ``step()`` raises.

Checkpoints: ``state_dict`` / ``load_state_dict`` are torch's (every attribute but the optimizer:
step count, length, warm-up, phases); a resumed fit rebuilds the scheduler from the config, sets the
length again, then Lightning loads the saved state and the optimizer's, so the schedule continues
where it stopped. The saved length wins over the new fit's: resuming with another ``max_epochs`` continues
the saved schedule (to train longer on another schedule, load the weights and start a new fit).
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


class _LengthLater:
    """Defers building the torch scheduler until ``total_steps`` is known (mixed in before the torch class)."""

    total_steps: Optional[int]

    def _defer(self, optimizer: Optimizer, total_steps: Optional[int]) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(optimizer).__name__} is not an Optimizer")
        self.optimizer = optimizer
        self.total_steps = None
        if total_steps is not None:
            self.set_total_steps(total_steps)

    def set_total_steps(self, total_steps: int) -> None:
        """Fixes the schedule's length (in scheduler steps) and puts step 0's learning rate in the optimizer."""
        if self.total_steps is not None:
            raise ValueError(f"{type(self).__name__} already has total_steps={self.total_steps}")
        self._build(_positive_int(total_steps, "total_steps"))

    def _build(self, total_steps: int) -> None:
        raise NotImplementedError

    def step(self, epoch: Optional[int] = None) -> None:
        if self.total_steps is None:
            raise RuntimeError(
                f"{type(self).__name__} does not know the training length: pass total_steps=..., or let a lit_robust "
                "defense set it (lr_scheduler=...), or call set_total_steps(n) before training")
        super().step(epoch)  # type: ignore[misc]


class WarmupCosineLR(_LengthLater, LRScheduler):
    r"""Linear warm-up from 0, then cosine decay to 0: DeepMind's ``get_cosine_schedule``.

    Gowal et al. 2020/2021 and Rebuffi et al. 2021 (``adversarial_robustness/jax/utils.py``,
    ``experiment.py``): optax ``linear_schedule(0 -> lr, warmup_steps)`` joined at ``warmup_steps``
    with ``cosine_decay_schedule(lr, total_steps - warmup_steps)`` (alpha 0), evaluated at the optimizer
    step count, 10 warm-up epochs of 400 at batch 1024 (488 of 19,531 steps), stepped every optimizer
    step. With :math:`t` the number of optimizer steps already taken (the update number, from 0),
    :math:`W` the warm-up and :math:`T` the total, the learning rate used by update :math:`t` is

    .. math::

        \text{lr}_t = \text{lr} \cdot t / W \quad (t < W), \qquad
        \text{lr}_t = \text{lr} \cdot \tfrac12 \bigl(1 + \cos(\pi \min(t - W, T - W) / (T - W))\bigr) \quad (t \ge W).

    So the first update has learning rate 0 (as optax's count starts at 0: only the momentum buffer
    takes the first gradient), the peak ``lr`` is reached at update :math:`W`, and the learning rate
    after the last update (``t = T``) is 0. ``lr`` is each group's learning rate when the schedule is
    built (the optimizer's ``lr``; DeepMind: ``0.1 * batch / 256``).

    Use with the defense's ``lr_scheduler_interval: step`` (DeepMind steps it every optimizer step)::

        lr_scheduler:
          class_path: lit_robust.optim.WarmupCosineLR
          init_args: {warmup_fraction: 0.025}
        lr_scheduler_interval: step

    Args:
        optimizer: the optimizer whose groups' ``lr`` are the peaks.
        total_steps: :math:`T` in scheduler steps; ``None``: set by the defense (see the module docstring).
        warmup_fraction: :math:`W = \lfloor\text{warmup\_fraction} \cdot T\rfloor` (DeepMind: 10 / 400 epochs =
            0.025, 488 of 19,531 steps at batch 1024, which this rule reproduces).
        warmup_steps: :math:`W` in scheduler steps instead of a fraction (overrides ``warmup_fraction``).
        last_epoch: torch's convention; leave at -1 (resuming goes through ``load_state_dict``).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: Optional[int] = None,
        warmup_fraction: float = 0.025,
        warmup_steps: Optional[int] = None,
        last_epoch: int = -1,
    ) -> None:
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}")
        if warmup_steps is not None and (isinstance(warmup_steps, bool) or int(warmup_steps) != warmup_steps
                                         or warmup_steps < 0):
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        self.warmup_fraction = float(warmup_fraction)
        self.warmup_steps = None if warmup_steps is None else int(warmup_steps)
        self._last_epoch_given = last_epoch
        self._defer(optimizer, total_steps)

    def _build(self, total_steps: int) -> None:
        warmup = int(self.warmup_fraction * total_steps) if self.warmup_steps is None else self.warmup_steps
        if warmup >= total_steps:
            raise ValueError(f"the warm-up ({warmup} steps) must be shorter than total_steps ({total_steps})")
        self.total_steps, self.warmup_steps = total_steps, warmup
        LRScheduler.__init__(self, self.optimizer, self._last_epoch_given)

    def get_lr(self) -> list[float]:
        return [self.lr_at(self.last_epoch, base) for base in self.base_lrs]

    def lr_at(self, step: int, peak: float) -> float:
        """The learning rate of update ``step`` (0-based) for a group whose peak is ``peak``."""
        total, warmup = self.total_steps, self.warmup_steps
        if step < warmup:
            return peak * step / warmup
        progress = min(step - warmup, total - warmup) / (total - warmup)
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


class OneCycleCosineLR(_LengthLater, torch.optim.lr_scheduler.OneCycleLR):
    """DM-Improves-AT's ``--scheduler cosinew``: torch's ``OneCycleLR`` with ``pct_start=0.025``, over the whole fit.

    Wang et al. 2023 (``core/utils/train.py`` ``init_scheduler``):
    ``OneCycleLR(optimizer, max_lr=lr, pct_start=0.025, total_steps=num_epochs)``, stepped once per
    epoch (``lr_scheduler_interval: epoch``; the defense then passes ``max_epochs``). This class *is*
    torch's ``OneCycleLR`` with those arguments (same formulas, same ``state_dict``), built once the
    length is known; ``max_lr`` defaults to the optimizer's ``lr``, as the official code passes it.
    torch's defaults, kept by the official code, shape the schedule:

    * the first epoch runs at ``max_lr / div_factor`` = ``lr / 25``, rising to ``lr`` at step
      ``pct_start * total_steps - 1`` (epoch 9 of 400, 0-based) along a *cosine* (``anneal_strategy="cos"``
      anneals both phases), then falls along a cosine to ``min_lr = max_lr / 25 / final_div_factor`` =
      ``lr / 2.5e5`` at step ``total_steps - 1``; Lightning steps it once more after the last epoch,
      as the official loop does, which is past the end and harmless;
    * ``cycle_momentum=True``: the momentum of every group is *overwritten*: 0.95 at step 0, down to
      0.85 at the peak, back up to 0.95 at the end (``max_momentum`` / ``base_momentum``), whatever
      momentum the optimizer was given (the official 0.9 never applies). ``cycle_momentum: false``
      keeps the optimizer's momentum.

    In a config, with :class:`~lit_robust.optim.SGDNoNormBiasDecay` at ``lr: 0.2`` (the README's 1M run)::

        lr_scheduler:
          class_path: lit_robust.optim.OneCycleCosineLR
        lr_scheduler_interval: epoch

    Lightning then warns "A `OneCycleLR` scheduler is using 'interval': 'epoch'" (it checks
    ``isinstance(scheduler, OneCycleLR)``): per epoch is the official recipe. ``interval: step`` gives the
    same shape over optimizer steps (the warm-up is then 2.5% of the steps rather than of the epochs,
    and the learning rate changes within an epoch), which is not what the official code ran.

    Args: as :class:`torch.optim.lr_scheduler.OneCycleLR` (``epochs`` / ``steps_per_epoch`` are
    replaced by ``total_steps`` or the defense's length), with ``pct_start=0.025`` and ``max_lr=None``
    (each group's ``lr`` when the schedule is built) as defaults.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        max_lr: Optional[float] = None,
        total_steps: Optional[int] = None,
        pct_start: float = 0.025,
        anneal_strategy: Literal["cos", "linear"] = "cos",
        cycle_momentum: bool = True,
        base_momentum: float = 0.85,
        max_momentum: float = 0.95,
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
        three_phase: bool = False,
        last_epoch: int = -1,
    ) -> None:
        if not 0.0 <= pct_start <= 1.0:
            raise ValueError(f"pct_start must be in [0, 1], got {pct_start}")
        if max_lr is not None and max_lr <= 0:
            raise ValueError(f"max_lr must be > 0, got {max_lr}")
        self._one_cycle_args = dict(
            max_lr=max_lr, pct_start=float(pct_start), anneal_strategy=anneal_strategy, cycle_momentum=cycle_momentum,
            base_momentum=base_momentum, max_momentum=max_momentum, div_factor=div_factor,
            final_div_factor=final_div_factor, three_phase=three_phase, last_epoch=last_epoch)
        self._defer(optimizer, total_steps)

    def _build(self, total_steps: int) -> None:
        args = dict(self._one_cycle_args)
        if float(args["pct_start"] * total_steps) == 1.0:  # torch's warm-up phase then spans 0 steps and divides by 0
            raise ValueError(f"pct_start * total_steps must not be exactly 1 (torch's OneCycleLR divides by zero), got "
                             f"{args['pct_start']} * {total_steps}")
        if args["max_lr"] is None:
            args["max_lr"] = [group["lr"] for group in self.optimizer.param_groups]
        torch.optim.lr_scheduler.OneCycleLR.__init__(self, self.optimizer, total_steps=total_steps, **args)


__all__ = ["OneCycleCosineLR", "WarmupCosineLR"]
