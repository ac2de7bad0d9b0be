"""TRADES (Zhang et al., ICML 2019): clean cross-entropy plus beta times the KL to the adversarial prediction."""

from __future__ import annotations

from typing import Any, Callable, Literal, Optional

import torch
from torch import Tensor, nn

from lit_robust.attacks import PGD, AdamAscent, TradesKLAttack
from lit_robust.defenses.base import AdversarialModule, TrainingOutput
from lit_robust.objectives import trades_objective


class CleanAdversarialKL(AdversarialModule):
    """What TRADES and MART share: a weight ``beta`` >= 0 on a KL term, the official threat model
    (eps 0.031, step 0.007, K = 10) as defaults, and an outer loss computed from the clean and
    the adversarial logits, two separate train-mode forwards as in both official codes.

    A subclass gives ``training_attack()`` (built once, after the shared arguments are set) and
    ``objective``, its :mod:`lit_robust.objectives` function (``trades_objective``, ``mart_objective``),
    which the outer loss calls; nothing is detached between the two forwards. ``clean_bn_update=False`` runs
    the clean forward on batch statistics without updating BatchNorm's running ones, so only the adversarial
    batch updates them (DeepMind's TRADES, ``jax/experiment.py``; with ``attack_bn_mode="batch"`` its attack
    too); True (default) as the official TRADES and MART codes and DM-Improves-AT.
    """

    objective: Callable[..., TrainingOutput]

    def __init__(
        self, model: nn.Module, beta: float = 6.0, eps: float = 0.031, steps: int = 10, step_size: float = 0.007,
        clean_bn_update: bool = True, **kwargs: Any,
    ) -> None:
        super().__init__(model, eps=eps, steps=steps, step_size=step_size, **kwargs)
        if not beta >= 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.beta, self.clean_bn_update = float(beta), clean_bn_update
        self.attack = self.training_attack()

    def training_attack(self) -> PGD:
        """The inner maximizer ``perturb`` runs (``self.attack``)."""
        raise NotImplementedError

    def outer_loss(self, x: Tensor, x_adv: Tensor, y: Tensor) -> TrainingOutput:
        return type(self).objective(self.model, x, x_adv, y, self.beta, self.label_smoothing,
                                    clean_bn_update=self.clean_bn_update)


class TRADES(CleanAdversarialKL):
    """Zhang, Yu, Jiao, Xing, El Ghaoui & Jordan, "Theoretically Principled Trade-off between
    Robustness and Accuracy", ICML 2019.

    Official code: github.com/yaodongyu/TRADES (``trades.py::trades_loss``,
    ``train_trades_cifar10.py``).

    Algorithm, per batch::

        model.eval(); x' = x + 0.001 * N(0, 1)
        K times: x' <- Proj_{ball(x, eps) and [0,1]}(x' + alpha * sign(grad_x' KL_sum(softmax f(x) || softmax f(x'))))
        model.train()
        loss = CE(f(x), y) + beta * (1/B) * KL_sum(softmax f(x) || softmax f(x'))

    The clean softmax in the KL is *not* detached (gradients flow into it, as in the
    official code); many re-implementations detach it, which changes the method.

    Defaults (official code, WRN-34-10 on CIFAR-10): beta = 6 (1/lambda), eps = 0.031 and
    step 0.007 in [0, 1] pixels (0.031 is slightly below 8/255 = 0.03137; RobustBench flags
    this; pass ``eps=8/255, step_size=2/255`` for the usual threat model, as TRADES-AWP
    does), K = 10, attack in eval mode (``attack_bn_mode="eval"``), SGD lr 0.1, momentum 0.9,
    weight decay 2e-4, batch 128, 76 epochs with lr x0.1 from epoch 75 on. The schedule is
    expressed as a fraction of the training steps (x0.1 after 74/76 of them), so it keeps its
    shape for any ``max_epochs``. The official script is evaluated with PGD-20, step 0.003.

    Cost: K + 2 forward+backward passes plus 1 forward per step (about 12.3 F+B for K = 10):
    K F+B for the attack, one forward for the clean logits the attack reuses at every step,
    and the outer loss's clean and adversarial forwards, both backpropagated. The official
    code costs about 16.3 F+B: it recomputes f(x) at each attack step (K forwards) and
    runs the clean input twice in the outer loss.

    Reported (CIFAR-10, WRN-34-10; README / RobustBench): 84.92 clean, 56.61 PGD-20,
    56.43 PGD-1000, 53.08 AutoAttack (eps 8/255).

    Deviations we chose: the clean input goes through the model once in the outer loss (the
    official code does it twice, identical logits in train mode, but its BatchNorm running
    statistics take one more clean update per step), and the attack computes the clean
    logits once instead of at every step (same values in eval mode). The KL is computed from
    log-softmax of both logits (same value, no ``log 0``). ``label_smoothing`` applies to the
    clean CE term. With ``norm="l2"`` the attack takes normalised-gradient steps (see
    :class:`~lit_robust.attacks.TradesKLAttack`).

    Args:
        model: maps [0, 1] images to logits.
        beta: weight of the KL (robustness) term, >= 0.
        attack_reference: what the KL attack moves away from: ``"clean"``, the clean prediction (TRADES), or
            ``"targets"``, the batch's target distribution, DeepMind's rule under CutMix (Rebuffi et al. 2021,
            ``jax/experiment.py``: "regress the attack away from mixed labels"; see
            :class:`~lit_robust.attacks.TradesKLAttack`).
        clean_bn_update: see :class:`CleanAdversarialKL` (False: DeepMind's BatchNorm handling).
        attack_start_std: the attack's Gaussian start (0.001, the official code); None starts from a uniform
            draw in the ball, projected (DeepMind's ``linf_initialize_fn``).
        attack_ascent: None (sign steps of ``step_size``, the official code) or
            :class:`~lit_robust.attacks.AdamAscent` (DeepMind's Adam on the input: ``AdamAscent(0.1, (5,), 0.1)``).
        eps, steps, step_size: the training attack (official values by default).
        **kwargs: the shared arguments of :class:`~lit_robust.defenses.AdversarialModule`.
    """

    def __init__(self, model: nn.Module, attack_reference: Literal["clean", "targets"] = "clean",
                 attack_start_std: Optional[float] = 0.001, attack_ascent: Optional[AdamAscent] = None,
                 **kwargs: Any) -> None:
        self.attack_reference = attack_reference
        self.attack_start_std, self.attack_ascent = attack_start_std, attack_ascent
        super().__init__(model, **kwargs)

    objective = staticmethod(trades_objective)  # CE(f(x), y) + beta * batchmean KL; the clean side keeps its graph

    def training_attack(self) -> PGD:
        return TradesKLAttack(self.eps, self.steps, self.step_size, self.norm, bn_mode=self.attack_bn_mode,
                              reference=self.attack_reference, start_std=self.attack_start_std,
                              ascent=self.attack_ascent)


    def default_optimizer(self, params: Any) -> torch.optim.Optimizer:
        """SGD(lr=0.1, momentum=0.9, weight_decay=2e-4), the official ``train_trades_cifar10.py``."""
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=2e-4)

    def default_lr_scheduler(self, optimizer: torch.optim.Optimizer) -> tuple[Any, str]:
        """x0.1 after 74/76 of the training steps (official: lr 0.01 in epochs 75 and 76 of 76)."""
        return piecewise_by_epochs(optimizer, self.trainer.estimated_stepping_batches, [74], 76), "step"


def piecewise_by_epochs(optimizer: torch.optim.Optimizer, total_steps: int, milestones: list[int],
                        epochs: int) -> torch.optim.lr_scheduler.MultiStepLR:
    """x0.1 at each milestone of an ``epochs``-epoch recipe, rescaled to ``total_steps`` steps.

    Integer arithmetic, so with ``max_epochs == epochs`` each decay falls exactly on the
    first step of the recipe's epoch (``milestone + 1``, counted from 1).
    """
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, [int(total_steps) * m // epochs for m in milestones], 0.1)
