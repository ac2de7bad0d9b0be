"""Certified training with IBP or CROWN-IBP bounds (Gowal et al. 2018; Zhang et al. 2020; Shi et al. 2021)."""

from __future__ import annotations

from typing import Any, Literal, Optional, Sequence

import lightning.pytorch as L
import torch
from torch import Tensor, nn

from lit_robust.callbacks.schedules import EpsilonSchedule
from lit_robust.certify.bounds import certified, check_network, crown_ibp_margin_bounds, ibp_margin_bounds
from lit_robust.certify.objective import METHODS, CertifiedObjective
from lit_robust.defenses.base import AdversarialModule, TrainingOutput, finite_total
from lit_robust.models.certified_cnns import ibp_init as apply_ibp_init


class CertifiedTraining(AdversarialModule):
    """Minimises the robust cross-entropy of margin lower bounds, so the network becomes *verifiably* robust.

    Papers: Gowal et al., "On the Effectiveness of Interval Bound Propagation for Training Verifiably
    Robust Models", 2018 (IBP, last-layer elision); Zhang et al., "Towards Stable and Efficient Training
    of Verifiably Robust Neural Networks", ICLR 2020 (CROWN-IBP, github.com/huanzhang12/CROWN-IBP);
    Shi et al., "Fast Certified Robust Training with Short Warmup", NeurIPS 2021
    (github.com/shizhouxing/Fast-Certified-Robust-Training: IBP initialisation, smoothed eps ramp,
    gradient clipping).

    Algorithm, per batch::

        eps_t  = the smoothed ramp 0 -> train_eps (EpsilonSchedule, per step; Shi et al.'s schedule)
        lb     = margin lower bounds of z_y - z_j over {|x' - x|_inf <= eps_t} ∩ [0, 1]
                 (IBP, or beta * CROWN-IBP + (1 - beta) * IBP with beta = 1 - eps_t (1 - final_beta) / train_eps)
        loss   = CE([0, -lb], 0)           (= clean CE while eps_t = 0: the bounds are then exact)
        [loss  = (1 - kappa) loss + kappa CE(f(x), y), kappa = 1 - eps_t (1 - final_kappa) / train_eps]

    ``val/certified_acc`` and ``test/certified_acc`` (fraction of examples whose every margin bound is
    positive at the module's ``eps``, with running BN statistics) are logged beside clean and PGD accuracy;
    an example counts when any relaxation of ``eval_bounds`` certifies it. These are IBP/CROWN-IBP
    certificates: the ETH line (SABR, TAPS, GLS) reports certified accuracy from a complete verifier
    (MN-BaB), which is higher for the same network.

    Defaults follow Shi et al.'s CIFAR-10 recipe (CNN7 with BN, 160 epochs): Adam(5e-4), lr x0.2 at 75% and
    87.5% of training (epochs 120 and 140), one epoch at eps 0 then an 80-epoch smoothed ramp, gradient
    norm clipped at 10, IBP initialisation; their warm-up regularisers (tightness, ReLU balance) are not
    implemented. CROWN-IBP's own recipe (DM-large, no BN): ``method="crown-ibp"``, ``train_eps_factor=1.1``,
    no IBP init, the smoothed ramp (``"schedule_type": "smoothed"`` in the official DM-large configs) over
    half of training, Adam 5e-4 (see ``configs/cifar10/crown_ibp.yaml``).
    CROWN-IBP's MNIST recipe (``config/mnist_dm-large_0.4.json``; ``0.2.json`` alike with 100 epochs): DM-large,
    the ``robust_natural`` loss with ``final_kappa=0.5`` (the official default), ``method="crown-ibp"``,
    ``final_beta=0``, train at 0.4 to certify 0.3 (``train_eps_factor=4/3``), a linear ramp of 51 epochs after
    10 at eps 0, Adam 5e-4, batch 256, 200 epochs with lr x0.1 at epochs 130 and 190, no IBP init, no clipping.
    With BN in train mode the bounds use the clean batch's statistics (auto_LiRPA's ``bn mode="forward"``).

    Cost per step (F/B = a forward/backward of the plain network): IBP about 4F + 3B (a clean forward for
    the BN running statistics and ``train/clean_acc``, the interval pass with its own clean forward, the
    backward through them); CROWN-IBP adds a backward linear pass with K-1 specifications per layer while
    beta > 0.

    Args:
        model: an ``nn.Sequential`` of layers bound propagation supports (``lit_robust.models.CNN3/5/7``).
        eps: the L-inf radius certified at validation and test (and attacked by PGD there).
        method: training relaxation, ``"ibp"`` or ``"crown-ibp"``.
        final_beta: CROWN-IBP's weight at the end of the ramp (0: the paper's 8/255 setting; 1: its 2/255).
        final_kappa: mix the clean cross-entropy in with weight kappa, ramped from 1 at eps 0 to
            ``final_kappa`` at the training radius (CROWN-IBP's ``robust_natural`` method; its MNIST
            configs use 0.5); None (default): the robust CE alone (its ``robust`` method, the CIFAR configs).
        lower_slope: CROWN's ReLU lower line, ``"adaptive"``, ``"zero"`` or ``"one"``.
        train_eps_factor: training radius = ``eps * train_eps_factor`` (CROWN-IBP trains at 1.1x).
        eval_bounds: relaxations tried at evaluation; certified if any certifies.
        eps_ramp_epochs, eps_warmup_epochs, eps_ramp_shape: the eps ramp (added as an ``EpsilonSchedule``);
            ``eps_ramp_epochs=0`` trains at the full radius from the start (or bring your own schedule).
        ibp_init: re-initialise ``model`` with Shi et al.'s IBP initialisation on construction.
        grad_clip_norm: gradient-norm clipping unless the Trainer sets ``gradient_clip_val``; 0 disables.
        **kwargs: the shared arguments of :class:`AdversarialModule` (optimizer, lr_scheduler, val/test attacks).

    Training targets must be class indices: the margin bounds are taken against one true class.
    """

    class_labels_only = "its bounds certify the margin of one true class per example"

    def __init__(
        self,
        model: nn.Module,
        eps: float = 8 / 255,
        method: Literal["ibp", "crown-ibp"] = "ibp",
        final_beta: float = 0.0,
        lower_slope: Literal["adaptive", "zero", "one"] = "adaptive",
        train_eps_factor: float = 1.0,
        eval_bounds: Sequence[str] = ("ibp", "crown-ibp"),
        eps_ramp_epochs: float = 80.0,
        eps_warmup_epochs: float = 1.0,
        eps_ramp_shape: Literal["linear", "smoothed"] = "smoothed",
        ibp_init: bool = True,
        grad_clip_norm: float = 10.0,
        final_kappa: Optional[float] = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("awp_gamma", 0) or kwargs.get("norm", "linf") != "linf":
            raise ValueError("certified training bounds L-inf balls and does not take awp_gamma")
        if not train_eps_factor > 0 or eps_ramp_epochs < 0 or eps_warmup_epochs < 0 or grad_clip_norm < 0:
            raise ValueError("train_eps_factor must be > 0; eps_ramp_epochs, eps_warmup_epochs and grad_clip_norm "
                             f">= 0; got {train_eps_factor}, {eps_ramp_epochs}, {eps_warmup_epochs}, {grad_clip_norm}")
        if not eval_bounds or any(b not in METHODS for b in eval_bounds):
            raise ValueError(f"eval_bounds must be a non-empty subset of {METHODS}, got {eval_bounds!r}")
        check_network(model)
        super().__init__(model, eps=eps, **kwargs)
        self.objective = CertifiedObjective(eps * train_eps_factor, method, final_beta, lower_slope, final_kappa)
        self.eval_bounds = tuple(eval_bounds)
        self.eps_ramp = (eps_ramp_epochs, eps_warmup_epochs, eps_ramp_shape)
        self.grad_clip_norm = grad_clip_norm
        if ibp_init:
            apply_ibp_init(model)

    def scheduled_attack(self) -> CertifiedObjective:
        """What eps schedules ramp: the training objective's radius."""
        return self.objective

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        raise TypeError(f"{type(self).__name__} trains on bounds, not on adversarial examples")

    def training_loss(self, x: Tensor, y: Tensor) -> TrainingOutput:
        kappa = self.objective.kappa
        with torch.set_grad_enabled(kappa > 0):  # BN running statistics, train/clean_acc and the natural CE
            clean_logits = self.model(x)
        loss = self.certified_loss(x, y)
        if kappa > 0:
            loss = (1 - kappa) * loss + kappa * self.cross_entropy(clean_logits, y)
        # a CPU tensor: Lightning would copy a Python number to the GPU, a blocking copy every step
        self.log("train/crown_beta", torch.tensor(self.objective.beta), on_step=False, on_epoch=True)
        if self.objective.final_kappa is not None:
            self.log("train/natural_kappa", torch.tensor(kappa), on_step=False, on_epoch=True)
        return TrainingOutput(loss, clean_logits=clean_logits)

    def certified_loss(self, x: Tensor, y: Tensor) -> Tensor:
        """The loss whose gradient the optimizer follows: the robust CE at the scheduled radius."""
        loss, lower = self.objective.loss(self.model, x, y)
        self._log_correct("train/certified_acc", certified(lower.detach()))
        return loss

    @torch.no_grad()
    def certify(self, x: Tensor, y: Tensor, eps: Optional[float] = None) -> Tensor:
        """``[B]`` bool: certified at ``eps`` (default the module's) by any relaxation of ``eval_bounds``.

        Always in float32 with autocast off: a certificate computed in bf16 would not be sound."""
        eps, x = self.eps if eps is None else eps, x.float()
        bounds = {"ibp": lambda: ibp_margin_bounds(self.model, x, y, eps),
                  "crown-ibp": lambda: crown_ibp_margin_bounds(self.model, x, y, eps, self.objective.lower_slope)}
        result = torch.zeros(len(y), dtype=torch.bool, device=y.device)
        with torch.autocast(x.device.type, enabled=False):
            for name in self.eval_bounds:
                result |= certified(bounds[name]())
        return result

    def _evaluate(self, x: Tensor, y: Tensor, batch_idx: int, stage: str, dataloader_idx: int = 0) -> None:
        super()._evaluate(x, y, batch_idx, stage, dataloader_idx)
        self._log_correct(f"{stage}/certified_acc", self.certify(x, y), dataloader_idx)

    def defense_callbacks(self) -> list[L.Callback]:
        """The base's, plus the eps ramp (unless ``eps_ramp_epochs=0``)."""
        ramp_epochs, warmup_epochs, shape = self.eps_ramp
        if not ramp_epochs:
            return super().defense_callbacks()
        return super().defense_callbacks() + [EpsilonSchedule(ramp_epochs, warmup_epochs=warmup_epochs,
                                                                shape=shape, per_step=True)]

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: Any = None,
                                    gradient_clip_algorithm: Optional[str] = None) -> None:
        if gradient_clip_val is None and self.grad_clip_norm > 0:
            gradient_clip_val, gradient_clip_algorithm = self.grad_clip_norm, "norm"
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def default_optimizer(self, params: Any) -> torch.optim.Optimizer:
        """Adam(lr=5e-4), as CROWN-IBP and Shi et al."""
        return torch.optim.Adam(params, lr=5e-4)

    def default_lr_scheduler(self, optimizer: torch.optim.Optimizer) -> tuple[Any, str]:
        """x0.2 at 75% and 87.5% of the training steps (Shi et al.: epochs 120 and 140 of 160)."""
        total = finite_total(self.trainer.estimated_stepping_batches)
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, [int(total * 0.75), int(total * 0.875)], 0.2), "step"
