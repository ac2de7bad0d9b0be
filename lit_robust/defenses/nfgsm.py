"""N-FGSM: FGSM from a strong noise start, with no projection back to the eps-ball (de Jorge et al., NeurIPS 2022)."""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from torch import Tensor, nn

from lit_robust.attacks import FGSM
from lit_robust.attacks import functional as AF
from lit_robust.defenses.base import linf_only
from lit_robust.defenses.fast_at import FastAT


class NoisyFGSM(FGSM):
    """One FGSM step of ``step_size`` from a ``U(-noise * eps, noise * eps)`` start, box-projected only.

    ``clip=None`` (N-FGSM's default): ``x_adv = clamp(x + eta + step_size * sign(g(x + eta)), 0, 1)`` with
    ``eta`` the box-clipped noise, so ``|x_adv - x| <= noise * eps + step_size`` (3 eps by default), not eps.
    ``clip=c`` also clamps the perturbation to ``c * eps`` (the official ``--clip``; 1 gives FGSM-RS's
    projection). Linf only (the official code has no other norm). Cost: 1 forward+backward.
    """

    def __init__(self, eps: float, step_size: Optional[float] = None, noise: float = 2.0, clip: Optional[float] = None,
                 loss: Literal["ce", "margin", "dlr"] = "ce", bn_mode: Literal["eval", "train", "batch"] = "eval") -> None:
        if not noise >= 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        if clip is not None and not clip > 0:
            raise ValueError(f"clip must be > 0 or None, got {clip}")
        super().__init__(eps, eps if step_size is None else step_size, "linf", random_start=noise > 0, loss=loss,
                         bn_mode=bn_mode)
        self.noise, self.clip = float(noise), None if clip is None else float(clip)

    @property
    def reach(self) -> float:
        """The largest Linf perturbation this attack can return."""
        free = self.noise * self.eps + self.step_size
        return free if self.clip is None else min(free, self.clip * self.eps)

    def _start(self, x: Tensor) -> Tensor:
        if self.noise == 0:
            return torch.zeros_like(x)
        # the noise box-clipped before the gradient (official: clamp(eta, lower_limit - X, upper_limit - X))
        return (x + torch.empty_like(x).uniform_(-self.noise * self.eps, self.noise * self.eps)).clamp(0, 1) - x

    def _ascend(self, model: nn.Module, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        delta = self._start(x)
        _, _, grad = AF.loss_and_input_grad(model, x, delta, target, self.loss_fn)
        delta = AF.ascent_step(delta, grad, self.step_size, "linf")
        if self.clip is not None:
            delta = delta.clamp(-self.clip * self.eps, self.clip * self.eps)
        taken = torch.ones(x.shape[0], dtype=torch.long, device=x.device)
        return (x + delta).clamp(0.0, 1.0).detach(), taken, x

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(eps={self.eps:.4g}, step_size={self.step_size:.4g}, noise={self.noise:.4g}, "
                f"clip={self.clip}, loss={self.loss!r})")


class NFGSM(FastAT):
    """de Jorge, Bibi, Volpi, Sanyal, Torr, Rogez & Dokania, "Make Some Noise: Reliable and Efficient
    Single-Step Adversarial Training", NeurIPS 2022.

    Official code: github.com/pdejorge/N-FGSM (``train.py``; commands in ``experiments.sh``).

    Algorithm, per batch (Linf)::

        eta   ~ U(-k eps, k eps), box-clipped: x + eta in [0, 1]           # k = noise = 2
        delta <- eta + alpha * sign(grad_eta CE(f(x + eta), y))            # alpha = step_size = eps
        delta <- clamp(x + delta, 0, 1) - x                                # no clip to the eps-ball
        theta <- theta - lr_t * grad_theta CE(f(x + delta), y)             # lr_t cyclic, per iteration

    The point of the method: a strong noise and no projection keep single-step training away from
    catastrophic overfitting at radii where FGSM and FGSM-RS collapse, with no extra cost. The training
    perturbation therefore reaches ``k eps + alpha`` (3 eps by default): :meth:`in_threat_model` checks that
    ball (``attack.reach``), while validation and test attacks stay in the eps-ball. ``clip`` is the official
    ``--clip`` (a multiple of eps; default None: no clipping).

    Defaults (official ``train.py``, PreActResNet-18, CIFAR-10): eps 8/255, alpha 8/255 (``step_size=None``
    means eps, so it follows eps), ``--unif 2`` (``noise=2``), ``--clip -1`` (None), 30 epochs at batch 128,
    SGD momentum 0.9, weight decay 5e-4, cyclic lr 0 -> 0.2 -> 0 (``torch.optim.lr_scheduler.CyclicLR`` with
    equal halves; the inherited :func:`~lit_robust.defenses.fast_at.cyclic_lr`). No guard in the official code:
    ``co_guard`` defaults to False here (True attaches FastAT's monitor). See ``configs/cifar10/nfgsm.yaml``.

    Cost: 2 forward+backward passes per step (the FGSM gradient + the update), as FGSM-RS.

    Reported (paper, CIFAR-10, PreActResNet-18, eps 8/255, PGD-50-10): about 80.5 clean / 47.5 robust
    (Figure and appendix tables; the official README gives no numbers, so these are quoted from the paper
    as we recall them, to be checked); it keeps 20-30% PGD accuracy at 16/255 where FGSM-RS collapses.

    Deviations we chose: the FGSM gradient is taken with BatchNorm in eval mode (``attack_bn_mode="train"``
    matches the official code, which attacks in train mode); the lr cycle keeps momentum constant (torch's
    ``CyclicLR`` also cycles it between 0.8 and 0.9); bf16 autocast instead of fp32 in our config; the
    official noise is drawn per channel in normalised units (the same thing for unnormalised [0, 1] inputs);
    Linf only.
    """

    def __init__(
        self,
        model: nn.Module,
        eps: float = 8 / 255,
        step_size: Optional[float] = None,
        noise: float = 2.0,
        clip: Optional[float] = None,
        co_guard: bool = False,
        **kwargs: Any,
    ) -> None:
        linf_only(kwargs, "NFGSM")
        if step_size is None and eps > 0:
            step_size = eps
        super().__init__(model, eps=eps, step_size=step_size, co_guard=co_guard, **kwargs)
        self.attack = NoisyFGSM(self.eps, self.step_size, noise, clip, bn_mode=self.attack_bn_mode)

    def in_threat_model(self, x: Tensor, x_adv: Tensor) -> Tensor:
        """Per example: ``x_adv`` in [0, 1] and within the training attack's reach (``noise * eps + step_size``,
        or ``clip * eps``) of ``x``: N-FGSM trains outside the eps-ball on purpose."""
        d = (x_adv - x).detach().flatten(1).abs().amax(1)
        return (d <= self.attack.reach + 1e-6) & (x_adv.flatten(1).amin(1) >= 0) & (x_adv.flatten(1).amax(1) <= 1)
