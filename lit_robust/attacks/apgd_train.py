"""APGD as a training attack (Singh, Croce & Hein, NeurIPS 2023): Auto-PGD's momentum and step-size halving with
few iterations, returning the highest-loss iterate."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from lit_robust.attacks import functional as AF
from lit_robust.attacks.pgd import PGD


class APGDTrain(PGD):
    """Auto-PGD (Croce & Hein, ICML 2020) in the form Singh, Croce & Hein train with (github.com/nmndeep/revisiting-at
    ``autopgd_train_clean.py``: ``apgd_train``, Linf; ``run_train.sh``: ``--adv.attack apgd --adv.n_iter 2``).

    From the clean image (no random start), with per-example step ``eta = 2 eps``::

        g_0 = grad CE(f(x_0))
        for i in 0 .. steps - 1:
            z       = P(x_i + eta * sign(g_i))
            x_{i+1} = P(x_i + a (z - x_i) + (1 - a)(x_i - x_{i-1}))       a = 1 at i = 0, then 0.75
            keep the highest-loss point so far (the clean image counts: its loss is the first "best")
            every k iterations (k from 0.22 steps, shrinking by 0.03 steps to at least 0.06 steps):
                halve eta and go back to the best point where the loss rose in at most 75% of the last k
                iterations, or where it was not halved last time and the best loss has not improved since

    It returns the best point (the official ``x_best``), which is the clean image for an example whose loss
    never rose. The last iteration takes no gradient (the official code saves that backward pass).

    Linf only (the other norms of the official file are not used for training in the paper). Cost: ``steps``
    forward+backward passes plus one forward (2 iterations: 3 forwards and 2 backwards).
    ``step_size`` is ``2 eps`` and follows eps under an :class:`~lit_robust.callbacks.EpsilonSchedule`.
    """

    def __init__(self, eps: float, steps: int = 2, norm: Literal["linf"] = "linf",
                 loss: Literal["ce", "margin", "dlr"] = "ce", bn_mode: Literal["eval", "train", "batch"] = "eval"
                 ) -> None:
        if norm != "linf":
            raise ValueError(f"APGDTrain is Linf only (the official training attack), got norm={norm!r}")
        super().__init__(eps, steps, 2 * eps, norm, random_start=False, loss=loss, bn_mode=bn_mode)

    def _ascend(self, model: nn.Module, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        n, b, eps = self.steps, x.shape[0], self.eps
        per_example = (b,) + (1,) * (x.dim() - 1)
        period, shortest, shrink = max(int(0.22 * n), 1), max(int(0.06 * n), 1), max(int(0.03 * n), 1)
        step = torch.full(per_example, self.step_size, device=x.device, dtype=x.dtype)
        x_adv = x.clamp(0, 1)
        loss, _, grad = AF.loss_and_input_grad(model, x_adv, torch.zeros_like(x_adv), target, self.loss_fn)
        x_best, grad_best, loss_best = x_adv.clone(), grad.clone(), loss.clone()
        loss_steps = torch.zeros(n, b, device=x.device)
        best_at_check, halved_at_check = loss_best.clone(), torch.ones_like(loss_best)
        x_prev, since_check = x_adv, 0
        for i in range(n):
            momentum = x_adv - x_prev
            x_prev = x_adv
            a = 0.75 if i > 0 else 1.0
            z = torch.clamp(torch.min(torch.max(x_adv + step * torch.sign(grad), x - eps), x + eps), 0.0, 1.0)
            x_adv = torch.clamp(torch.min(torch.max(x_adv + (z - x_adv) * a + momentum * (1 - a), x - eps), x + eps),
                                0.0, 1.0)
            if i < n - 1:
                loss, _, grad = AF.loss_and_input_grad(model, x_adv, torch.zeros_like(x_adv), target, self.loss_fn)
            else:
                with torch.no_grad():
                    loss = self.loss_fn(model(x_adv), target)
            loss_steps[i] = loss
            better = loss > loss_best
            x_best[better], grad_best[better], loss_best[better] = x_adv[better], grad[better], loss[better]
            since_check += 1
            if since_check == period:
                rises = sum((loss_steps[i - c] > loss_steps[i - c - 1]).float() for c in range(period))
                halve = torch.maximum((rises <= period * 0.75).float(),
                                      (1.0 - halved_at_check) * (best_at_check >= loss_best).float())
                halved_at_check, best_at_check = halve.clone(), loss_best.clone()
                back = halve > 0
                step[back] /= 2.0
                x_adv, grad = torch.where(back.view(per_example), x_best, x_adv), torch.where(
                    back.view(per_example), grad_best, grad)
                since_check, period = 0, max(period - shrink, shortest)
        taken = torch.full((b,), n, dtype=torch.long, device=x.device)
        return x_best.detach(), taken, x
