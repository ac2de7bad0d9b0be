"""Each defense's outer loss as a function of the model and the clean and adversarial batches.

One implementation, two doors: the defenses call these same functions, so ``trades_loss(model, x,
x_adv, y, beta=6)`` in your own ``training_step`` is exactly what :class:`~lit_robust.defenses.TRADES`
minimises (tested bit for bit). torchmetrics' pattern: a function (``trades_loss``), an ``..._objective``
twin that also returns the logits it computed (a :class:`TrainingOutput`, for your accuracy metrics),
a ``..._from_logits`` form where the loss needs no forward of its own, and a module with the
hyperparameters bound (``TradesLoss(beta=6)(model, x, x_adv, y)``).

Targets ``y`` are class indices ``[B]`` or probability rows ``[B, num_classes]`` (CutMix, per-sample label
smoothing, generated data; :mod:`lit_robust.targets`): a cross-entropy against a row is the expectation of the
per-class ones, and MART's class-based terms are averaged over the row the same way.

The adversarial batch comes from an attack (:mod:`lit_robust.attacks`): ``PGD`` for PGD-AT, MART
and Interpolated AT, ``TradesKLAttack`` for TRADES, ``smoothmix_attack`` for SmoothMix. Run the model
as your training step does (train mode): these functions do not change modes, except the clean
forward of ``clean_bn_update=False``. Adversarial weight perturbation is
:class:`WeightPerturbation` (``apply`` before the loss, ``restore`` after the backward).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Beta

from lit_robust.attacks import functional as AF
from lit_robust.attacks.pgd import module_mode
from lit_robust.attacks.smoothed import log_mean_softmax
from lit_robust.objectives.awp import WeightPerturbation
from lit_robust.objectives.jacobian import jacobian_frobenius_sq, jacobian_frobenius_sq_from_logits, jacobian_penalty
from lit_robust.targets import class_labels, is_probability_rows, probability_rows

__all__ = ["InterpolatedATLoss", "MARTLoss", "PGDATLoss", "TradesLoss", "TrainingOutput", "WeightPerturbation",
           "gaussian_augmentation_objective", "interpolated_at_loss", "interpolated_at_objective",
           "jacobian_frobenius_sq", "jacobian_frobenius_sq_from_logits", "jacobian_penalty", "mart_loss",
           "mart_loss_from_logits", "mart_objective", "mixup_batch", "mixup_cross_entropy", "pgd_at_loss",
           "pgd_at_objective", "robust_mixup_objective", "sample_mix", "smoothmix_objective", "trades_loss", "trades_loss_from_logits", "trades_objective"]


@dataclass
class TrainingOutput:
    """A loss to minimise and the logits it saw (for accuracy metrics)."""

    loss: Tensor
    adv_logits: Optional[Tensor] = None  #: logits on the adversarial batch (``train/adv_acc``)
    clean_logits: Optional[Tensor] = None  #: logits on the clean batch, when the loss computed them


# --- PGD-AT (Madry et al., ICLR 2018) ---------------------------------------------------------------

def pgd_at_objective(model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor,
                     label_smoothing: float = 0.0) -> TrainingOutput:
    """``CE(f(x_adv), y)``: the clean batch is not used (one forward)."""
    logits = model(x_adv)
    return TrainingOutput(F.cross_entropy(logits, y, label_smoothing=label_smoothing), logits)


def pgd_at_loss(model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """PGD-AT's loss, ``CE(f(x_adv), y)`` (batch mean): :func:`pgd_at_objective`'s ``loss``."""
    return pgd_at_objective(model, x, x_adv, y, label_smoothing).loss


def _clean_then_adversarial(loss_from_logits: Callable[..., Tensor], model: nn.Module, x: Tensor, x_adv: Tensor,
                            y: Tensor, *hyperparameters: Any, clean_bn_update: bool = True) -> TrainingOutput:
    """Two train-mode forwards, ``f(x)`` then ``f(x_adv)`` (the order the official codes use: it decides the
    BatchNorm running statistics), and the loss of the two logits; nothing is detached. ``clean_bn_update=False``
    runs the clean forward on batch statistics without updating the running ones (DeepMind's TRADES)."""
    with nullcontext() if clean_bn_update else module_mode(model, "batch"):
        clean_logits = model(x)
    adv_logits = model(x_adv)
    return TrainingOutput(loss_from_logits(clean_logits, adv_logits, y, *hyperparameters), adv_logits, clean_logits)


# --- TRADES (Zhang et al., ICML 2019) ----------------------------------------------------------------

def trades_loss_from_logits(clean_logits: Tensor, adv_logits: Tensor, y: Tensor, beta: float = 6.0,
                            label_smoothing: float = 0.0) -> Tensor:
    """``CE(f(x), y) + beta * KL(softmax f(x) || softmax f(x_adv))`` (batch mean); the clean side keeps its
    graph, as in the official ``trades_loss`` (detaching it changes the method)."""
    kl = AF.kl_loss(adv_logits, clean_logits).mean()
    return F.cross_entropy(clean_logits, y, label_smoothing=label_smoothing) + beta * kl


def trades_objective(model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, beta: float = 6.0,
                     label_smoothing: float = 0.0, clean_bn_update: bool = True) -> TrainingOutput:
    """:func:`trades_loss_from_logits` on ``f(x)`` then ``f(x_adv)``. ``clean_bn_update=False``: the clean
    forward uses batch statistics without updating BatchNorm's running ones, so only the adversarial batch
    updates them (DeepMind's ``_trades_loss_fn``, Gowal et al. 2020/2021, Rebuffi et al. 2021)."""
    return _clean_then_adversarial(trades_loss_from_logits, model, x, x_adv, y, beta, label_smoothing,
                                   clean_bn_update=clean_bn_update)


def trades_loss(model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, beta: float = 6.0,
                label_smoothing: float = 0.0, clean_bn_update: bool = True) -> Tensor:
    """TRADES' loss, ``CE(f(x), y) + beta * KL(f(x) || f(x_adv))`` (batch mean): :func:`trades_objective`'s ``loss``."""
    return trades_objective(model, x, x_adv, y, beta, label_smoothing, clean_bn_update).loss


# --- MART (Wang et al., ICLR 2020) -------------------------------------------------------------------

def mart_loss_from_logits(clean_logits: Tensor, adv_logits: Tensor, y: Tensor, beta: float = 6.0,
                          label_smoothing: float = 0.0) -> Tensor:
    """``BCE(f(x_adv), y) + beta * mean(KL(p(x) || p(x_adv)) * (1 - p_y(x)))``, as the official ``mart_loss``.

    ``BCE = CE(f(x_adv), y) - mean log(1.0001 - p'_{y'})`` with ``y'`` the most likely wrong class.

    Probability-row targets ``t`` (:mod:`lit_robust.targets`): each per-example term is averaged over the
    true class ``c ~ t``, as the cross-entropy against a row averages the per-class ones:
    ``-sum_c t_c log(1.0001 - max_{j != c} p'_j)`` and the weight ``1 - sum_c t_c p_c(x)``. One-hot rows give
    the class-index loss (tested).
    """
    p_adv = F.softmax(AF.upcast(adv_logits), dim=1)
    p_clean = F.softmax(AF.upcast(clean_logits), dim=1)
    ce = F.cross_entropy(adv_logits, y, label_smoothing=label_smoothing)
    if is_probability_rows(y):
        t = AF.upcast(y)
        top2 = p_adv.topk(2, dim=1)
        best_class = F.one_hot(top2.indices[:, 0], p_adv.shape[1]).bool()
        # max over j != c of p'_j: the top probability, or the second one for c the top class
        p_adv_wrong = torch.where(best_class, top2.values[:, 1:2], top2.values[:, 0:1])
        bce = ce - (t * torch.log(1.0001 - p_adv_wrong + 1e-12)).sum(1).mean()
        p_clean_true = (t * p_clean).sum(1)
    else:
        is_true = F.one_hot(y, p_adv.shape[1]).bool()
        p_adv_wrong = p_adv.masked_fill(is_true, -1.0).amax(1)  # p'[y'] with y' the most likely wrong class
        bce = ce - torch.log(1.0001 - p_adv_wrong + 1e-12).mean()
        p_clean_true = p_clean.gather(1, y[:, None]).squeeze(1)
    weighted_kl = (AF.kl_loss(adv_logits, clean_logits) * (1.0000001 - p_clean_true)).mean()
    return bce + beta * weighted_kl


def mart_objective(model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, beta: float = 6.0,
                   label_smoothing: float = 0.0, clean_bn_update: bool = True) -> TrainingOutput:
    """:func:`mart_loss_from_logits` on ``f(x)`` then ``f(x_adv)`` (``clean_bn_update`` as in
    :func:`trades_objective`)."""
    return _clean_then_adversarial(mart_loss_from_logits, model, x, x_adv, y, beta, label_smoothing,
                                   clean_bn_update=clean_bn_update)


def mart_loss(model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, beta: float = 6.0,
              label_smoothing: float = 0.0) -> Tensor:
    """MART's loss (boosted CE on ``x_adv`` plus the misclassification-weighted KL): :func:`mart_objective`'s
    ``loss``."""
    return mart_objective(model, x, x_adv, y, beta, label_smoothing).loss


# --- Interpolated AT (Lamb et al., AISec 2019) ------------------------------------------------------------

def sample_mix(batch_size: int, device: torch.device, alpha: float = 1.0) -> tuple[Tensor, Tensor]:
    """``lam ~ Beta(alpha, alpha)`` (a 0-d tensor on ``device``) and a random permutation of the batch, drawn
    from torch's generator there (no host sync)."""
    concentration = torch.full((), float(alpha), device=device)
    lam = Beta(concentration, concentration, validate_args=False).sample()
    return lam, torch.randperm(batch_size, device=device)


def mixup_cross_entropy(model: nn.Module, x: Tensor, y: Tensor, lam: Tensor, perm: Tensor,
                        label_smoothing: float = 0.0) -> tuple[Tensor, Tensor]:
    """Input mixup of one branch: ``lam CE(f(x_mix), y) + (1 - lam) CE(f(x_mix), y[perm])`` with
    ``x_mix = lam x + (1 - lam) x[perm]``, and the logits with row ``i`` moved to the mixed example whose
    heavier label is ``y[i]`` (detached, for accuracy)."""
    logits = model(lam * x + (1 - lam) * x[perm])
    loss = (lam * F.cross_entropy(logits, y, label_smoothing=label_smoothing)
            + (1 - lam) * F.cross_entropy(logits, y[perm], label_smoothing=label_smoothing))
    by_heavier_label = torch.where(lam >= 0.5, logits, logits[torch.argsort(perm)])
    return loss, by_heavier_label.detach()


def interpolated_at_objective(model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, alpha: float = 1.0,
                              label_smoothing: float = 0.0,
                              mix: Optional[Callable[[int, torch.device], tuple[Tensor, Tensor]]] = None
                              ) -> TrainingOutput:
    """The mean of the clean and the adversarial branch's :func:`mixup_cross_entropy`, each with its own draw
    (``mix(batch_size, device)``, default :func:`sample_mix` with ``alpha``; the clean branch's first)."""
    mix = mix or (lambda batch_size, device: sample_mix(batch_size, device, alpha))
    clean_loss, clean_logits = mixup_cross_entropy(model, x, y, *mix(x.shape[0], x.device), label_smoothing)
    adv_loss, adv_logits = mixup_cross_entropy(model, x_adv, y, *mix(x_adv.shape[0], x_adv.device), label_smoothing)
    return TrainingOutput((clean_loss + adv_loss) / 2, adv_logits, clean_logits)


def interpolated_at_loss(model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, alpha: float = 1.0,
                         label_smoothing: float = 0.0) -> Tensor:
    """Interpolated AT's loss (mixup of clean and adversarial pairs): :func:`interpolated_at_objective`'s ``loss``."""
    return interpolated_at_objective(model, x, x_adv, y, alpha, label_smoothing).loss



# --- Robust Mixup (Lau et al., IJSAT, TPAMI 2023): mix, then attack ---------------------------------------

def mixup_batch(x: Tensor, y: Tensor, lam: Tensor, perm: Tensor,
                num_classes: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """The mixed batch and its targets: ``x_mix = lam x + (1 - lam) x[perm]`` and the probability rows
    ``y_mix = lam y + (1 - lam) y[perm]`` (class indices become one-hot rows of ``num_classes`` first; rows,
    e.g. CutMix's, are mixed as they are). ``x_mix`` stays in [0, 1] when ``x`` is."""
    rows = probability_rows(y, num_classes)
    return lam * x + (1 - lam) * x[perm], lam * rows + (1 - lam) * rows[perm]


def robust_mixup_objective(model: nn.Module, x_mix: Tensor, x_mix_adv: Tensor, y_mix: Tensor, lam: Tensor,
                           perm: Tensor, label_smoothing: float = 0.0) -> TrainingOutput:
    """``CE(f(x_mix_adv), y_mix)``, with ``x_mix_adv`` the attack on the mixed batch of :func:`mixup_batch`
    (against ``y_mix``). The logits are returned with row ``i`` moved to the mixed example whose heavier
    label is ``y[i]`` (detached, for accuracy against the unmixed labels)."""
    logits = model(x_mix_adv)
    loss = F.cross_entropy(logits, y_mix, label_smoothing=label_smoothing)
    return TrainingOutput(loss, torch.where(lam >= 0.5, logits, logits[torch.argsort(perm)]).detach())


# --- randomized smoothing (Cohen et al., ICML 2019) -------------------------------------------------------

def gaussian_augmentation_objective(model: nn.Module, x: Tensor, y: Tensor, sigma: float,
                                    label_smoothing: float = 0.0) -> TrainingOutput:
    """``CE(f(x + sigma N(0, I)), y)``, the noise not clipped (Cohen et al.); the logits on the noisy batch are
    returned as ``clean_logits``."""
    logits = model(x + sigma * torch.randn(x.shape, device=x.device, dtype=x.dtype))
    return TrainingOutput(F.cross_entropy(logits, y, label_smoothing=label_smoothing), clean_logits=logits)


def smoothmix_objective(model: nn.Module, x_init: Tensor, x_adv: Tensor, y: Tensor, noises: Tensor, lam: Tensor,
                        eta: float = 5.0, weight: float = 1.0, label_smoothing: float = 0.0) -> TrainingOutput:
    """SmoothMix (Jeong et al., NeurIPS 2021): ``L_CE + eta * weight * L_mix`` given the adversary's endpoints
    (:func:`lit_robust.attacks.smoothmix_attack`), the noises ``[m, B, ...]`` and the mixing weights ``lam [B]``.

    ``L_CE`` is the CE of the m*B noisy copies of ``x_init``; ``L_mix`` the KL from the mixed target
    ``(1 - lam) p_clean + lam * uniform`` to the prediction at ``(1 - lam) x_init + lam x_adv`` (plus the same
    noises), over the examples the smoothed classifier gets right. ``clean_logits`` of the result is
    ``log p_clean`` ``[B, K]``.
    """
    m, b = noises.shape[:2]
    clean_logits = model((x_init + noises).flatten(0, 1))
    ce = F.cross_entropy(clean_logits, y.repeat(m, *([1] * (y.dim() - 1))), label_smoothing=label_smoothing)
    log_p_clean = log_mean_softmax(clean_logits.view(m, b, -1))
    k = log_p_clean.shape[1]
    lam_x = lam.view(-1, *([1] * (x_init.dim() - 1)))
    x_mix = (1 - lam_x) * x_init + lam_x * x_adv
    y_mix = (1 - lam[:, None]) * log_p_clean.exp() + lam[:, None] / k
    log_q = F.log_softmax(AF.upcast(model((x_mix + noises).flatten(0, 1))), dim=1).view(m, b, k)
    # KL(y_mix || q) = sum y (log y - log q); the clamp keeps log y finite where y underflows to 0.
    kl = (y_mix * (y_mix.clamp_min(1e-30).log() - log_q)).sum(-1)
    correct = log_p_clean.argmax(1) == class_labels(y)
    mix = (kl * correct).mean()
    return TrainingOutput(ce + eta * weight * mix, clean_logits=log_p_clean)


# --- the class pattern ---------------------------------------------------------------------------------

class _Objective(nn.Module):
    """A loss of ``(model, x, x_adv, y)`` with its hyperparameters bound (holds no parameters)."""

    function: Callable[..., Tensor]

    def __init__(self, **hyperparameters: Any) -> None:
        super().__init__()
        self.hyperparameters = hyperparameters

    def forward(self, model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor) -> Tensor:
        return type(self).function(model, x, x_adv, y, **self.hyperparameters)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters.items())


class PGDATLoss(_Objective):
    """:func:`pgd_at_loss`."""

    function = staticmethod(pgd_at_loss)

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__(label_smoothing=label_smoothing)


class TradesLoss(_Objective):
    """:func:`trades_loss`."""

    function = staticmethod(trades_loss)

    def __init__(self, beta: float = 6.0, label_smoothing: float = 0.0, clean_bn_update: bool = True) -> None:
        super().__init__(beta=beta, label_smoothing=label_smoothing, clean_bn_update=clean_bn_update)


class MARTLoss(_Objective):
    """:func:`mart_loss`."""

    function = staticmethod(mart_loss)

    def __init__(self, beta: float = 6.0, label_smoothing: float = 0.0) -> None:
        super().__init__(beta=beta, label_smoothing=label_smoothing)


class InterpolatedATLoss(_Objective):
    """:func:`interpolated_at_loss`."""

    function = staticmethod(interpolated_at_loss)

    def __init__(self, alpha: float = 1.0, label_smoothing: float = 0.0) -> None:
        super().__init__(alpha=alpha, label_smoothing=label_smoothing)
