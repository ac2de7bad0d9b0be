"""Adversarial training against the union of Linf, L2 and L1 threat models: MSD and the max / avg baselines."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any, Literal, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from lit_robust.attacks.functional import UNION_NORMS
from lit_robust.attacks.pgd import PGD, module_mode
from lit_robust.attacks.union import (DEFAULT_L1_K, MSD, L1PGD, WorstOfAttacks, check_norms, in_union,
                                      union_attacks, union_correct)
from lit_robust.checks import inputs_checked
from lit_robust.defenses.base import _TEST_NAMES, AdversarialModule, TrainingOutput, finite_total
from lit_robust.evaluation.tiers import attack_batch, forked_rng, frozen_parameters
from lit_robust.objectives import pgd_at_objective

MODES = ("msd", "max", "avg")


class UnionAT(AdversarialModule):
    """Maini, Wong & Kolter, "Adversarial Robustness Against the Union of Multiple Perturbation Models",
    ICML 2020, and the two baselines it compares with (Tramer & Boneh, NeurIPS 2019).

    Official code: github.com/locuslab/robust_union (``CIFAR10/cifar_funcs.py``: ``msd_v0``, ``pgd_worst_dir``,
    ``triple_adv``, ``pgd_l1_topk``; ``CIFAR10/train.py``; ``MNIST/mnist_funcs.py``, ``MNIST/train.py``). The L1
    step is SLIDE's (github.com/ftramer/MultiRobustness ``pgd_attack.py``).

    Threat model: the union of the Linf ball of radius ``eps``, the L2 ball of ``eps_l2`` and the L1 ball of
    ``eps_l1`` (any subset through ``norms``), intersected with the [0, 1] box. Algorithm, per batch::

        msd: x_adv = MSD(x, y)   one search; per iteration and example the Linf, L2 or L1 step with the highest
                                 loss (lit_robust.attacks.MSD); loss = CE(f(x_adv), y)
        max: x_p = PGD_p(x, y) for each norm p; x_adv = per example the x_p with the highest loss;
             loss = CE(f(x_adv), y)                                   (official pgd_worst_dir, "worst-PGD")
        avg: loss = mean over p of CE(f(x_p), y)                      (official MNIST triple_adv, "PGD aug")

    The L1 step moves the top-k gradient coordinates (k drawn from 5..20 at every step, or SLIDE's percentile)
    by ``step_size_l1`` of L1 length in all, leaves out coordinates the box stops, then projects exactly onto
    the L1 ball (sort-based, Duchi et al. 2008) and clamps to the box.

    Defaults: the official CIFAR-10 code (PreActResNet-18; ``configs/cifar10/msd.yaml``): Linf eps 0.03, step
    0.003; L2 eps 0.5, step 0.05; L1 eps 12, step 1.0 (0.05 per coordinate times 20/k); 50 iterations from the
    clean image (no random start, no restarts); SGD lr 0.1, momentum 0.9, weight decay 5e-4, batch 128, 50
    epochs with the lr piecewise linear 0 -> 0.1 (epoch 20) -> 0.005 (epoch 40) -> 0 (epoch 50), per iteration.
    The official CIFAR-10 ``train.py`` trains all three modes with the L2 radius 0.3 and evaluates at 0.5:
    ``train_eps_l2=0.3`` (the config sets it), and its max mode uses the Linf step 0.005. MNIST (``MNIST/train.py``
    and README): Linf 0.3 / 0.01, L2 2.0 / 0.1, L1 10 / 1.0 (MSD 0.8; avg trains L1 at 12 and L2 step 0.2),
    100 iterations (max: 50 for Linf), Adam with lr 0 -> 1e-3 -> 0 over 15 epochs, batch 100, a 4-layer CNN.

    Args:
        model, eps, steps, step_size and the rest: as :class:`~lit_robust.defenses.AdversarialModule`; ``eps`` and
            ``step_size`` are the Linf radius and step, ``steps`` the iterations of every attack.
        mode: ``"msd"``, ``"max"`` or ``"avg"``.
        eps_l2, eps_l1: the L2 and L1 radii of the threat model (validation and test).
        train_eps_l2: the L2 radius of the training attack (None: ``eps_l2``).
        step_size_l2, step_size_l1: the L2 step and the L1 length of the L1 step.
        norms: the threat models of the union, any of ``("linf", "l2", "l1")``.
        l1_k, l1_percentile, l1_gap, l1_skip_saturated: the L1 step (:class:`~lit_robust.attacks.union.SparseL1Step`).
        random_start, restarts: of every training attack (MSD: U(-eps, eps) scaled into the L2 and L1 balls; the
            per-norm attacks: uniform in their ball).

    Evaluation, per norm and as the union (each example's worst case over the norms, clean included):
    ``val/robust_acc_linf``, ``val/robust_acc_l2``, ``val/robust_acc_l1`` (PGD-``val_attack_steps``; L1: the
    sparse L1 PGD, step ``2.5 * eps_l1 / steps``) and ``val/robust_acc`` = the union, which checkpoints and early
    stopping select on. ``test`` runs the tiers for each norm (Linf and L2: :func:`~lit_robust.evaluation.tiers.
    attack_batch`; L1: the L1 PGD, and with ``test_apgd`` / ``test_autoattack`` the reference L1-APGD-CE / -T and
    L1-AutoAttack of ``pyautoattack``, Croce & Hein 2021) and logs ``test/<name>_<norm>`` and the union
    ``test/<name>`` (``test/robust_acc``: PGD; ``test/worst_case_acc``: every attack that ran).

    Cost per optimizer step (F+B: forward+backward passes over the batch, 3 norms, K = ``steps``): msd K F+B
    + 3K forwards + 1 F+B (about 2K + 1 F+B: 101 with the defaults); max 3K F+B + 3 forwards + 1 F+B; avg 3K F+B
    + 3 F+B. The official code is 1 F+B + 3 forwards per MSD iteration too; its max and avg runs 40 Linf, 50 L2
    and 2 x 50 L1 iterations on CIFAR-10 (the L1 PGD restarts once from a random start).

    Reported (README of the official code; 1,000 test images, clean / Linf / L2 / L1 / union, the union over
    PGD with 10 restarts and foolbox's attacks: Linf FGSM, PGD, MIM; L2 PGD, Gaussian noise, boundary, DeepFool,
    pointwise, C&W, DDN; L1 salt-and-pepper, pointwise and the top-k PGD). CIFAR-10 at (0.03, 0.5, 12),
    PreActResNet-18: MSD 81.7 / 47.6 / 64.3 / 53.4 / 46.1 (the paper's abstract says 64.8 for L2); max 81.0 /
    44.9 / 61.7 / 39.4 / 34.9; avg 84.6 / 42.5 / 65.0 / 54.0 / 40.6. MNIST at (0.3, 2.0, 10): MSD 98.3 / 62.7 / 67.9
    / 65.0 / 58.4; max 98.6 / 51.0 / 61.9 / 52.6 / 42.1; avg 99.1 / 65.2 / 60.1 / 39.2 / 34.9. On the digits (tests/
    test_union.py, Linf 0.2, L2 1.0, L1 2.0, PGD-20 x 2 restarts per norm): MSD 0.89 / 0.47 / 0.38 / 0.69 / 0.38,
    Linf PGD-AT 0.94 / 0.55 / 0.25 / 0.64 / 0.24, standard 0.99 / 0.00 / 0.00 / 0.38 / 0.00.

    Deviations we chose: the L1 projection is exact per example (the official one, applied to the whole batch
    once any example is outside the ball, also moves the examples inside it; MNIST's rescales them onto the
    sphere); the L1 step leaves out only coordinates the gradient pushes out of the box (``l1_skip_saturated``
    restores the official exclusion of every coordinate at 0 or 1, which on MNIST leaves the background alone);
    ties at the k-th gradient magnitude share the step, so it always has L1 length ``step_size_l1``; the MNIST
    MSD's order (box, then L1 ball) and its per-example early stop (``smallest_adv``) are not reproduced; max and
    avg use one ``steps`` and one ``restarts`` for all norms; the CIFAR-10 avg (``triple_adv``) takes one optimizer
    step per norm on a fresh attack each, and ours takes one step on the mean loss, as the MNIST code does;
    the attack runs with BatchNorm in eval mode (``attack_bn_mode``; the official code attacks in train mode); the
    schedule ignores the official one-epoch offset (its lr is evaluated from epoch 1, so its last epoch runs at 0).
    ``scheduled_attack`` (eps and step schedules) exists for ``mode="msd"`` only; FOSC is not defined here.
    """

    def __init__(
        self,
        model: nn.Module,
        mode: Literal["msd", "max", "avg"] = "msd",
        eps: float = 0.03,
        steps: int = 50,
        step_size: float = 0.003,
        eps_l2: float = 0.5,
        eps_l1: float = 12.0,
        train_eps_l2: Optional[float] = None,
        step_size_l2: float = 0.05,
        step_size_l1: float = 1.0,
        norms: Sequence[str] = UNION_NORMS,
        l1_k: Union[int, tuple[int, int]] = DEFAULT_L1_K,
        l1_percentile: Optional[float] = None,
        l1_gap: Optional[float] = None,
        l1_skip_saturated: bool = False,
        random_start: bool = False,
        restarts: int = 1,
        **kwargs: Any,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if kwargs.get("norm", "linf") != "linf":
            raise ValueError("UnionAT: eps is the Linf radius and norm must stay 'linf'; choose the threat models "
                             f"with norms= (any of {UNION_NORMS}) and their radii with eps_l2= and eps_l1=")
        super().__init__(model, eps=eps, steps=steps, step_size=step_size, **kwargs)
        self.mode, self.norms = mode, check_norms(norms)
        train_eps_l2 = eps_l2 if train_eps_l2 is None else train_eps_l2
        self.radii = {"linf": self.eps, "l2": float(eps_l2), "l1": float(eps_l1)}  #: the threat model (evaluation)
        self.train_radii = {"linf": self.eps, "l2": float(train_eps_l2), "l1": float(eps_l1)}
        l1 = dict(l1_k=l1_k, l1_percentile=l1_percentile, l1_gap=l1_gap, l1_skip_saturated=l1_skip_saturated)
        common = dict(random_start=random_start, restarts=restarts, bn_mode=self.attack_bn_mode, norms=self.norms)
        train = dict(eps=self.eps, eps_l2=train_eps_l2, eps_l1=eps_l1, steps=steps, step_size=step_size,
                     step_size_l2=step_size_l2, step_size_l1=step_size_l1, **l1, **common)
        self.attacks = union_attacks(**train)  #: one training attack per norm (max, avg)
        self.attack = MSD(**train) if mode == "msd" else WorstOfAttacks(self.attacks)
        val_steps, val_loss = self.val_attack.steps, self.val_attack.loss
        self.val_attacks = {"linf": self.val_attack,
                            "l2": PGD(self.radii["l2"], val_steps, norm="l2", loss=val_loss),
                            "l1": L1PGD(self.radii["l1"], val_steps, loss=val_loss, k=l1_k, percentile=l1_percentile,
                                        gap=l1_gap, skip_saturated=l1_skip_saturated)}
        self.val_attacks = {norm: self.val_attacks[norm] for norm in self.norms}
        self._l1_eval = dict(k=l1_k, percentile=l1_percentile, gap=l1_gap, skip_saturated=l1_skip_saturated)

    # --- training ----------------------------------------------------------------------------

    def outer_loss(self, x: Tensor, x_adv: Tensor, y: Tensor) -> TrainingOutput:
        return pgd_at_objective(self.model, x, x_adv, y, self.label_smoothing)

    def training_loss(self, x: Tensor, y: Tensor) -> TrainingOutput:
        """msd / max: the base's (perturb, [AWP,] outer loss); avg: the mean loss over one attack per norm."""
        if self.mode != "avg":
            return super().training_loss(x, y)
        x_advs = [attack(self.model, x, y) for attack in self.attacks.values()]
        if self.awp is not None and self.current_epoch >= self.awp_warmup_epochs:
            self.awp.apply(self.model, lambda: avg_objective(self.model, x_advs, y, self.label_smoothing).loss)
        return avg_objective(self.model, x_advs, y, self.label_smoothing)

    def in_threat_model(self, x: Tensor, x_adv: Tensor) -> Tensor:
        """Per example: ``x_adv`` lies in the [0, 1] box and in the union of the training attack's balls around ``x``
        (an L1 or L2 example may leave the Linf ball of ``eps``)."""
        box = (x_adv.flatten(1).amin(1) >= 0) & (x_adv.flatten(1).amax(1) <= 1)
        return box & in_union(x_adv - x, {norm: self.train_radii[norm] for norm in self.norms})

    def scheduled_attack(self) -> PGD:
        """The MSD attack (``mode="msd"``); the max and avg modes run one attack per norm and have none."""
        if self.mode != "msd":
            raise TypeError(f"UnionAT(mode={self.mode!r}) runs one attack per norm, not one PGD a schedule can set; "
                            "schedules work with mode='msd'")
        return self.attack

    def read_batch(self, batch: Any, batch_idx: int) -> tuple[Tensor, Tensor]:
        """The base's, and on the first batch the L2 and L1 radii against the images' size (an L2 radius of the
        box's diameter ``sqrt(d)`` or an L1 radius of ``d`` lets any image become any other)."""
        x, y = super().read_batch(batch, batch_idx)
        if batch_idx == 0:
            d = x[0].numel()
            for norm, limit in (("l2", d ** 0.5), ("l1", float(d))):
                if norm in self.norms and self.radii[norm] >= limit:
                    raise ValueError(f"eps_{norm}={self.radii[norm]:g} covers the whole [0, 1] box of "
                                     f"{tuple(x.shape[1:])} images (diameter {limit:.4g} in {norm})")
        return x, y

    # --- evaluation ----------------------------------------------------------------------------

    def _evaluate(self, x: Tensor, y: Tensor, batch_idx: int, stage: str, dataloader_idx: int = 0) -> None:
        with torch.inference_mode(False), torch.enable_grad():  # see the base: attacks need normal tensors
            x, y = x.clone(), y.clone()
            correct = self._test_correct(x, y) if stage == "test" else self._val_correct(x, y)
        for name, value in correct.items():
            self._log_correct(name, value, dataloader_idx)

    def _val_correct(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        found = union_correct(self.model, x, y, self.val_attacks)
        correct = {"val/clean_acc": found["clean"], "val/robust_acc": found["union"]}
        correct.update({f"val/robust_acc_{norm}": found[norm] for norm in self.norms})
        return correct

    def _test_correct(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        tiers, steps, restarts = self.test_tiers(), self.test_attack.steps, self.test_attack.restarts
        found = {}
        for norm in self.norms:
            if norm == "l1":
                found[norm] = l1_attack_batch(self.model, x, y, self.radii["l1"], tiers, steps, restarts,
                                              autoattack_version=self.autoattack_version, **self._l1_eval)
            else:
                found[norm] = attack_batch(self.model, x, y, self.radii[norm], norm, tiers, steps, restarts,
                                           autoattack_version=self.autoattack_version)
        first = found[self.norms[0]]
        correct = {"test/clean_acc": first["clean"]}
        for key in first:
            if key == "clean" or (key == "worst_case" and len(tiers) == 1):
                continue
            name = _TEST_NAMES[key]
            correct[f"test/{name}"] = torch.stack([found[norm][key] for norm in self.norms]).all(0)
            correct.update({f"test/{name}_{norm}": found[norm][key] for norm in self.norms})
        return correct

    # --- optimisation ----------------------------------------------------------------------------

    def default_lr_scheduler(self, optimizer: torch.optim.Optimizer) -> tuple[Any, str]:
        """Piecewise linear 0 -> lr at 40% -> lr/20 at 80% -> 0 at the end, per step (official: epochs 20/40/50)."""
        total = finite_total(self.trainer.estimated_stepping_batches)
        return LambdaLR(optimizer, lambda step: piecewise_linear(step / max(total, 1), MSD_LR_KNOTS)), "step"


#: (fraction of training, lr factor): the official CIFAR-10 ``np.interp(t, [0, 20, 40, 50], [0, 0.1, 0.005, 0])``
MSD_LR_KNOTS = ((0.0, 0.0), (0.4, 1.0), (0.8, 0.05), (1.0, 0.0))


def piecewise_linear(t: float, knots: Sequence[tuple[float, float]]) -> float:
    """``np.interp(t, *zip(*knots))``: linear between the knots, constant beyond the first and the last."""
    if t <= knots[0][0]:
        return knots[0][1]
    for (t0, v0), (t1, v1) in zip(knots, knots[1:]):
        if t <= t1:
            return v0 + (v1 - v0) * (t - t0) / (t1 - t0)
    return knots[-1][1]


def avg_objective(model: nn.Module, x_advs: Sequence[Tensor], y: Tensor,
                  label_smoothing: float = 0.0) -> TrainingOutput:
    """The "avg" loss: the mean of ``CE(f(x_p), y)`` over the adversarial batches ``x_p`` (one per norm), in one
    forward of their concatenation (the official MNIST ``triple_adv``). ``adv_logits``: per example, the logits
    of the batch with the highest loss, so ``train/adv_acc`` is the training attacks' union accuracy."""
    n, b = len(x_advs), x_advs[0].shape[0]
    logits = model(torch.cat(list(x_advs)))
    targets = y.repeat(n, *([1] * (y.dim() - 1)))
    losses = F.cross_entropy(logits, targets, reduction="none", label_smoothing=label_smoothing)
    worst = losses.detach().view(n, b).argmax(0)
    adv_logits = logits.view(n, b, -1)[worst, torch.arange(b, device=logits.device)]
    return TrainingOutput(losses.mean(), adv_logits)


def l1_attack_batch(model: nn.Module, x: Tensor, y: Tensor, eps: float, tiers: Sequence[str] = ("pgd",),
                    pgd_steps: int = 20, pgd_restarts: int = 1, seed: int = 0,
                    autoattack_version: Literal["standard", "plus", "rand"] = "standard",
                    **l1_step: Any) -> dict[str, Tensor]:
    """:func:`~lit_robust.evaluation.tiers.attack_batch` for the L1 ball (the tiers there take Linf and L2).

    ``"pgd"``: :class:`~lit_robust.attacks.union.L1PGD` (``pgd_steps`` of ``2.5 * eps / steps``, random start,
    CE; ``l1_step``: its sparsity and box options); ``"apgd"``: the reference L1-APGD-CE (5 restarts) and
    L1-APGD-T (5 target classes), with standard L1-AutoAttack's settings (``use_largereps``; Croce & Hein,
    ICML 2021); ``"autoattack"``: the reference L1-AutoAttack. Same conditions and keys as ``attack_batch``:
    fp32, eval mode, frozen parameters, seeded inside a forked RNG; each mask is ANDed with ``"clean"``.
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError("robustness evaluation needs input gradients: call it outside torch.inference_mode")
    x, y = x.detach().float().clone(), y.detach().long().clone()
    with ExitStack() as stack:
        for context in (frozen_parameters(model), module_mode(model, "eval"),
                        torch.autocast(x.device.type, enabled=False), forked_rng(x.device), inputs_checked()):
            stack.enter_context(context)
        with torch.no_grad():
            logits = model(x)
        clean = logits.argmax(1) == y
        correct = {"clean": clean}
        for tier in tiers:
            torch.manual_seed(seed)
            with torch.enable_grad():
                found = _l1_tier(tier, model, x, y, eps, seed, logits.shape[1], pgd_steps, pgd_restarts,
                                 autoattack_version, l1_step)
            correct.update({key: mask & clean for key, mask in found.items()})
    correct["worst_case"] = torch.stack(list(correct.values())).all(0)
    return correct


def _l1_tier(tier, model, x, y, eps, seed, n_classes, steps, restarts, version, l1_step) -> dict[str, Tensor]:
    def correct_at(x_adv: Tensor) -> Tensor:
        with torch.no_grad():
            return model(x_adv.float()).argmax(1) == y

    if tier == "pgd":
        return {"pgd": L1PGD(eps, steps, restarts=restarts, **l1_step).run(model, x, y).predictions == y}
    if tier == "autoattack":
        from pyautoattack import AutoAttack

        adversary = AutoAttack(model, eps=float(eps), norm="L1", version=version, seed=seed, device=x.device)
        return {"autoattack": correct_at(adversary.run_standard_evaluation(x, y, batch_size=x.shape[0])[0])}
    from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

    common = dict(n_iter=100, norm="L1", eps=float(eps), seed=seed, device=x.device, use_largereps=True)
    out = {"apgd-ce": correct_at(APGDAttack(model, n_restarts=5, loss="ce", **common).perturb(x, y))}
    if n_classes >= 4:
        targeted = APGDAttack_targeted(model, n_target_classes=min(5, n_classes - 1), **common)
        out["apgd-t"] = correct_at(targeted.perturb(x, y))
    return out
