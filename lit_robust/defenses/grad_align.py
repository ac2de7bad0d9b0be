"""GradAlign: FGSM training with a gradient-alignment regularizer (Andriushchenko & Flammarion, NeurIPS 2020)."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_robust.attacks import FGSM
from lit_robust.attacks import functional as AF
from lit_robust.attacks.pgd import module_mode
from lit_robust.defenses.base import TrainingOutput, linf_only
from lit_robust.defenses.fast_at import FastAT


def input_grad(model: nn.Module, x: Tensor, delta: Tensor, y: Tensor, create_graph: bool) -> Tensor:
    """d CE(f(x + delta), y) (batch mean, as the official ``get_input_grad``) / d delta; with ``create_graph`` the
    result stays differentiable in the weights (double backprop)."""
    delta = delta.detach().requires_grad_(True)
    loss = F.cross_entropy(model(x + delta).float(), y)
    (grad,) = torch.autograd.grad(loss, delta, create_graph=create_graph)
    return grad


def alignment_penalty(grad1: Tensor, grad2: Tensor) -> Tensor:
    """``1 - mean cos(grad1_i, grad2_i)`` over the examples where both gradients are nonzero (0 if none), in fp32."""
    g1, g2 = grad1.flatten(1).float(), grad2.flatten(1).float()
    n1, n2 = g1.norm(dim=1), g2.norm(dim=1)
    keep = (n1 > 0) & (n2 > 0)
    cos = (g1 * g2).sum(1) / (n1 * n2).clamp_min(1e-30)
    count = keep.sum()
    mean_cos = torch.where(keep, cos, torch.zeros_like(cos)).sum() / count.clamp_min(1)
    return torch.where(count > 0, 1.0 - mean_cos, torch.zeros_like(mean_cos))


class GradAlign(FastAT):
    """Andriushchenko & Flammarion, "Understanding and Improving Fast Adversarial Training", NeurIPS 2020.

    Official code: github.com/tml-epfl/understanding-fast-adv-training (``train.py``, ``utils.get_input_grad``;
    commands in ``sh/exps_diff_eps_cifar10.sh``).

    Algorithm, per batch (Linf)::

        g1    = grad_x CE(f(x), y)                                     # the FGSM gradient, detached
        delta = Proj(alpha * sign(g1))                                 # FGSM from zero, alpha = 1.25 eps -> eps
        eta   ~ U(-eps, eps)                                           # not box-clipped (as the official code)
        g2    = grad_eta CE(f(x + eta), y)                             # create_graph=True: double backprop
        R     = 1 - mean_i cos(g1_i, g2_i)                             # over examples with g1_i, g2_i != 0
        theta <- theta - lr_t * grad_theta [CE(f(x + delta), y) + lambda R]

    ``regularizer(x, y)`` returns ``(R, g1)``; ``train/grad_align_reg`` logs ``R``.

    Defaults (official, CIFAR-10, PreActResNet-18, eps 8/255): ``--attack_init=zero``, ``fgsm_alpha`` 1.25
    (``step_size=None`` means 1.25 eps, which the eps-ball clip makes eps from a zero start),
    ``grad_align_lambda`` 0.2, 30 epochs, batch 128, SGD momentum 0.9, weight decay 5e-4, cyclic lr
    0 -> 0.3 -> 0 (``--lr_max=0.30``; ``default_optimizer`` lr 0.3). Their script for other radii scales lambda
    (e.g. 2.0 at 16/255). No guard (``co_guard=False``). See ``configs/cifar10/grad_align.yaml``.

    Cost: 3 forward passes and 3 backward passes, one of them through a double-backward graph, so about
    3-4x a standard step and 1.5-2x FGSM-RS (the paper: about 3x FGSM-RS in wall time).

    Reported (paper, CIFAR-10, PreActResNet-18, eps 8/255, 30 epochs): about 81.0 clean / 47.6 PGD-50-10; it
    avoids catastrophic overfitting up to 16/255, where FGSM and FGSM-RS collapse (Figure 1). Quoted from the
    paper as we recall it, to be checked (the official README gives no table).

    Where it runs: the double backprop works under bf16 autocast (the cosine and the loss in fp32), with
    ``channels_last`` and under DDP (``torch.autograd.grad`` with respect to the input never fires DDP's
    reducer; the one ``backward`` of the total loss reduces the weights' gradients once). ``torch.compile``
    cannot take it: a compiled backbone's backward refuses ``create_graph=True`` ("compiled with non-empty
    donated buffers", pytorch #91469/#92348), so ``compile_model`` with ``grad_align_lambda > 0`` is refused.

    Deviations we chose: ``g1``, ``g2`` and the FGSM step are computed with BatchNorm in ``attack_bn_mode``
    (eval by default; the official code is in train mode throughout, ``attack_bn_mode="train"``); the lr
    cycle keeps momentum constant; bf16 autocast (official: apex O1 fp16 with batch norm forced to fp32).
    """

    def __init__(
        self,
        model: nn.Module,
        eps: float = 8 / 255,
        step_size: Optional[float] = None,
        grad_align_lambda: float = 0.2,
        co_guard: bool = False,
        **kwargs: Any,
    ) -> None:
        if not grad_align_lambda >= 0:
            raise ValueError(f"grad_align_lambda must be >= 0, got {grad_align_lambda}")
        if grad_align_lambda > 0 and kwargs.get("compile_model"):
            raise ValueError("GradAlign's double backprop cannot run through a torch.compile'd backbone "
                             "(create_graph=True is refused by compiled backward); use compile_model=False")
        linf_only(kwargs, "GradAlign")
        super().__init__(model, eps=eps, step_size=step_size, co_guard=co_guard, **kwargs)
        self.grad_align_lambda = float(grad_align_lambda)
        self.attack = FGSM(self.eps, self.step_size, "linf", random_start=False, bn_mode=self.attack_bn_mode)

    def default_optimizer(self, params: Any) -> torch.optim.Optimizer:
        """SGD with the cycle's peak lr 0.3 (the official ``--lr_max=0.30``), momentum 0.9, weight decay 5e-4."""
        return torch.optim.SGD(params, lr=0.3, momentum=0.9, weight_decay=5e-4)

    def regularizer(self, x: Tensor, y: Tensor, grad1: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """``(1 - mean cos(g(x), g(x + eta)), g(x))``, differentiable in the weights through ``g(x + eta)``."""
        with module_mode(self.model, self.attack_bn_mode), torch.enable_grad():
            if grad1 is None:
                grad1 = input_grad(self.model, x, torch.zeros_like(x), y, create_graph=False)
            eta = torch.empty_like(x).uniform_(-self.eps, self.eps)
            grad2 = input_grad(self.model, x, eta, y, create_graph=True)
        return alignment_penalty(grad1.detach(), grad2), grad1.detach()

    def training_loss(self, x: Tensor, y: Tensor) -> TrainingOutput:
        if self.grad_align_lambda == 0:
            return super().training_loss(x, y)
        x = x.detach()
        with module_mode(self.model, self.attack_bn_mode), torch.enable_grad():
            grad1 = input_grad(self.model, x, torch.zeros_like(x), y, create_graph=False)
        x_adv = (x + AF.project(AF.ascent_step(torch.zeros_like(x), grad1, self.step_size, "linf"), x, self.eps,
                                "linf")).detach()
        reg, _ = self.regularizer(x, y, grad1)
        out = self.outer_loss(x, x_adv, y)
        self.log("train/grad_align_reg", reg.detach(), batch_size=x.shape[0])
        return TrainingOutput(out.loss + self.grad_align_lambda * reg, out.adv_logits, out.clean_logits)
