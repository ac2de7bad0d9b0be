"""Attacks for the union of Linf, L2 and L1 threat models (Maini, Wong & Kolter, ICML 2020).

``L1PGD``: PGD inside the L1 ball with the sparse (top-k) steepest-ascent step. ``MSD``: multi steepest
descent, one search over the union that takes, per example and per iteration, whichever of the Linf, L2
and L1 steps raises the loss most. ``WorstOfAttacks``: the "max" (worst-PGD) baseline, separate attacks
and per example the highest loss. ``union_correct``: per-norm and union correctness for an evaluation.

Official code: github.com/locuslab/robust_union (``CIFAR10/cifar_funcs.py``, ``MNIST/mnist_funcs.py``);
the L1 step is SLIDE's (Tramer & Boneh, NeurIPS 2019; github.com/ftramer/MultiRobustness ``pgd_attack.py``).
"""

from __future__ import annotations

from typing import Literal, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from lit_robust.attacks import functional as AF
from lit_robust.attacks.functional import UNION_NORMS
from lit_robust.attacks.pgd import PGD, Attack, AttackResult, module_mode
from lit_robust.checks import check_attack_inputs, inputs_checked

#: k drawn uniformly from 5..20 at every step, as both official MSD codes (``random.randint(5, 20)``)
DEFAULT_L1_K = (5, 20)


def check_norms(norms: Sequence[str]) -> tuple[str, ...]:
    """A non-empty selection of :data:`~lit_robust.attacks.functional.UNION_NORMS` without repeats, as a tuple."""
    norms = (norms,) if isinstance(norms, str) else tuple(norms)
    if not norms or len(set(norms)) != len(norms) or any(n not in UNION_NORMS for n in norms):
        raise ValueError(f"norms must be a non-empty selection of {UNION_NORMS} without repeats, got {norms!r}")
    return norms


class SparseL1Step:
    """The L1 ascent step with its sparsity: top-k coordinates, k fixed (int), drawn at every step from an
    inclusive range ``(low, high)`` (one k for the batch, on the device), or set by SLIDE's ``percentile`` of
    the gradient magnitudes (99: the top 1%); then the projection onto the L1 ball and the [0, 1] box.

    ``gap``: coordinates within ``gap`` of the box side the gradient pushes them to are left out (see
    :func:`~lit_robust.attacks.functional.l1_ascent_step`); None: the per-coordinate step ``step_size / k``,
    as the official MSD code (its L1 PGD uses a fixed 0.05, SLIDE 0). ``skip_saturated``: also leave out
    every coordinate at 0 or 1 whatever the gradient's sign (the official ``l1_dir_topk``).
    """

    def __init__(self, k: Union[int, Sequence[int]] = DEFAULT_L1_K, percentile: Optional[float] = None,
                 gap: Optional[float] = None, skip_saturated: bool = False) -> None:
        bounds = [k] if isinstance(k, int) else list(k) if isinstance(k, Sequence) else []
        if len(bounds) == 1:
            bounds *= 2
        if len(bounds) != 2 or any(not isinstance(b, int) for b in bounds) or not 1 <= bounds[0] <= bounds[1]:
            raise ValueError(f"l1 k must be an integer >= 1 or a range (low, high) with 1 <= low <= high, got {k!r}")
        low, high = bounds
        if percentile is not None and not 0 <= percentile < 100:
            raise ValueError(f"l1 percentile must be in [0, 100) or None, got {percentile}")
        if gap is not None and not 0 <= gap < 0.5:
            raise ValueError(f"l1 gap must be in [0, 0.5) or None, got {gap}")
        self.k = low if low == high else (low, high)
        self.percentile, self.gap, self.skip_saturated = percentile, gap, skip_saturated

    def __repr__(self) -> str:
        sparsity = f"percentile={self.percentile:g}" if self.percentile is not None else f"k={self.k}"
        gap = "" if self.gap is None else f", gap={self.gap:g}"
        return f"{sparsity}{gap}{', skip_saturated=True' if self.skip_saturated else ''}"

    def draw_k(self, x: Tensor) -> Union[int, Tensor]:
        if self.percentile is not None:
            return AF.slide_k(x[0].numel(), self.percentile)
        if isinstance(self.k, int):
            return self.k
        return torch.randint(self.k[0], self.k[1] + 1, (), device=x.device)

    def __call__(self, delta: Tensor, grad: Tensor, x: Tensor, step_size: float, eps: float) -> Tensor:
        """``delta`` moved by one sparse step of L1 length ``step_size``, then projected (ball, then box)."""
        k = self.draw_k(x)
        gap = step_size / k if self.gap is None else self.gap
        moved = AF.l1_ascent_step(delta, grad, x, step_size, k, gap, self.skip_saturated)
        return AF.project_l1(moved, x, eps)


class _NoFOSC:
    """FOSC (Wang et al. 2019) is defined here for the Linf and L2 balls only."""

    def set_fosc_threshold(self, threshold: Optional[float]) -> None:
        if threshold is not None:
            raise ValueError(f"{type(self).__name__} does not track FOSC (defined for the Linf and L2 PGDs)")
        self.fosc_threshold, self.track_fosc = None, False


class L1PGD(_NoFOSC, PGD):
    """PGD inside the L1 ball of radius ``eps`` (and the [0, 1] box) with the sparse steepest-ascent step.

    Each step moves the top-k gradient coordinates by ``step_size`` of L1 length in all (SLIDE; the official
    ``pgd_l1_topk``, whose default ``step_size`` is 1.0 with k drawn from 5..20), then projects exactly onto the
    ball (:func:`~lit_robust.attacks.functional.project_l1_ball`) and clamps to the box.

    Args:
        eps: the L1 radius in [0, 1] pixel units (CIFAR-10: 12, MNIST: 10 in the MSD paper).
        steps, step_size: iterations and the L1 length of each step (default ``2.5 * eps / steps``, PGD's rule).
        k, percentile, gap, skip_saturated: the step's sparsity and box handling (:class:`SparseL1Step`).
        random_start: start from a uniform draw in the L1 ball (box-clamped) instead of the clean image.
        restarts, loss, bn_mode: as :class:`~lit_robust.attacks.PGD`.

    Cost: ``restarts * steps`` forward+backward passes (+ one forward per restart to score it in ``run``).
    """

    def __init__(self, eps: float, steps: int = 10, step_size: Optional[float] = None,
                 k: Union[int, Sequence[int]] = DEFAULT_L1_K, percentile: Optional[float] = None,
                 gap: Optional[float] = None, skip_saturated: bool = False, random_start: bool = True,
                 restarts: int = 1, loss: Literal["ce", "margin", "dlr"] = "ce",
                 bn_mode: Literal["eval", "train", "batch"] = "eval") -> None:
        super().__init__(eps, steps, step_size, "linf", random_start, restarts, loss, bn_mode)
        self.norm = "l1"
        self.l1_step = SparseL1Step(k, percentile, gap, skip_saturated)

    def __repr__(self) -> str:
        return (f"L1PGD(eps={self.eps:.4g}, steps={self.steps}, step_size={self.step_size:.4g}, {self.l1_step!r}, "
                f"random_start={self.random_start}, restarts={self.restarts}, loss={self.loss!r})")

    def _start(self, x: Tensor) -> Tensor:
        return AF.l1_random_start(x, self.eps) if self.random_start else torch.zeros_like(x)

    def _ascend(self, model: nn.Module, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        delta = self._start(x)
        for _ in range(self.steps):
            _, _, grad = AF.loss_and_input_grad(model, x, delta, target, self.loss_fn)
            delta = self.l1_step(delta, grad, x, self.step_size, self.eps)
        return (x + delta).detach(), torch.full((x.shape[0],), self.steps, device=x.device), x


class MSD(_NoFOSC, PGD):
    """Multi steepest descent (Maini, Wong & Kolter, ICML 2020, Algorithm 2): one search over the union of the
    Linf, L2 and L1 balls around ``x``.

    Per iteration, from the current ``delta`` and the gradient ``g`` of the loss there::

        linf: clip(delta + step * sign(g))              projected onto the Linf ball, then the [0, 1] box
        l2:   delta + step_l2 * g / ||g||_2             projected onto the L2 ball, then the box
        l1:   delta + step_l1 * (top-k signs of g) / k  projected onto the L1 ball, then the box
        delta <- per example, the candidate with the highest loss

    Every candidate lies in its own ball, so each iterate lies in the union. The result is, per example, the
    iterate with the highest loss over all iterations (the official ``max_max_delta``). Defaults: the official
    CIFAR-10 ``msd_v0`` (Linf 0.03 / step 0.003, L2 0.5 / step 0.05, L1 12 / L1 length 1.0 per step with k drawn
    from 5..20, 50 iterations, zero start); MNIST: Linf 0.3 / 0.01, L2 2.0 / 0.1, L1 10 / 1.0 (0.8 for MSD in its
    README), 100 iterations.

    Args:
        eps, step_size: the Linf radius and step. ``set_eps`` (eps schedules) scales every radius and step with it.
        eps_l2, step_size_l2, eps_l1, step_size_l1: the L2 and L1 radii and steps (L1: the step's L1 length).
        norms: the threat models searched, any of ``("linf", "l2", "l1")``.
        l1_k, l1_percentile, l1_gap, l1_skip_saturated: the L1 step (:class:`SparseL1Step`).
        random_start: start from U(-eps, eps) scaled into the L2 and then the L1 ball (a point of every ball,
            the official MNIST ``randomize``) instead of the clean image (the official default).
        restarts, loss, bn_mode: as :class:`~lit_robust.attacks.PGD` (the misclassifying restart wins per example).

    Cost per restart: ``steps`` forward+backward passes and ``steps * len(norms)`` forwards (each candidate is
    scored); the result needs no further pass.
    """

    def __init__(self, eps: float = 0.03, eps_l2: float = 0.5, eps_l1: float = 12.0, steps: int = 50,
                 step_size: float = 0.003, step_size_l2: float = 0.05, step_size_l1: float = 1.0,
                 norms: Sequence[str] = UNION_NORMS, l1_k: Union[int, Sequence[int]] = DEFAULT_L1_K,
                 l1_percentile: Optional[float] = None, l1_gap: Optional[float] = None,
                 l1_skip_saturated: bool = False, random_start: bool = False, restarts: int = 1,
                 loss: Literal["ce", "margin", "dlr"] = "ce", bn_mode: Literal["eval", "train", "batch"] = "eval"):
        super().__init__(eps, steps, step_size, "linf", random_start, restarts, loss, bn_mode)
        for name, value in (("eps_l2", eps_l2), ("eps_l1", eps_l1), ("step_size_l2", step_size_l2),
                            ("step_size_l1", step_size_l1)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        self.norms = check_norms(norms)
        self.norm = "+".join(self.norms)
        self.eps_l2, self.eps_l1 = float(eps_l2), float(eps_l1)
        self.step_size_l2, self.step_size_l1 = float(step_size_l2), float(step_size_l1)
        self._per_eps = {k: getattr(self, k) / self.eps for k in ("eps_l2", "eps_l1", "step_size_l2", "step_size_l1")}
        self.l1_step = SparseL1Step(l1_k, l1_percentile, l1_gap, l1_skip_saturated)

    def set_eps(self, eps: float) -> None:
        """Sets the Linf radius and scales the Linf step, both other radii and their steps by the same factor."""
        super().set_eps(eps)
        for name, ratio in self._per_eps.items():
            setattr(self, name, self.eps * ratio)

    def __repr__(self) -> str:
        return (f"MSD(norms={self.norms}, eps={self.eps:.4g}/{self.eps_l2:.4g}/{self.eps_l1:.4g}, "
                f"step_size={self.step_size:.4g}/{self.step_size_l2:.4g}/{self.step_size_l1:.4g}, steps={self.steps}, "
                f"{self.l1_step!r}, random_start={self.random_start}, restarts={self.restarts}, loss={self.loss!r})")

    def _start(self, x: Tensor) -> Tensor:
        if not self.random_start:
            return torch.zeros_like(x)
        delta = torch.empty_like(x).uniform_(-self.eps, self.eps)
        for p, radius in ((2, self.eps_l2), (1, self.eps_l1)):
            size = delta.flatten(1).norm(p=p, dim=1).view(-1, *([1] * (x.dim() - 1)))
            delta = delta * (radius / size.clamp_min(1e-12)).clamp(max=1.0)
        return (x + delta).clamp(0.0, 1.0) - x

    def candidate(self, norm: str, delta: Tensor, grad: Tensor, x: Tensor) -> Tensor:
        """The steepest-ascent step for ``norm`` from ``delta``, projected onto that norm's ball and the box."""
        if norm == "l1":
            return self.l1_step(delta, grad, x, self.step_size_l1, self.eps_l1)
        eps, step = (self.eps, self.step_size) if norm == "linf" else (self.eps_l2, self.step_size_l2)
        return AF.project(AF.ascent_step(delta, grad, step, norm), x, eps, norm)

    def search(self, model: nn.Module, x: Tensor, target: Tensor) -> AttackResult:
        """One MSD run (no restarts, the caller's module mode): the best iterate per example."""
        delta, best = self._start(x), None
        rows = torch.arange(x.shape[0], device=x.device)
        for _ in range(self.steps):
            _, _, grad = AF.loss_and_input_grad(model, x, delta, target, self.loss_fn)
            candidates = torch.stack([self.candidate(norm, delta, grad, x) for norm in self.norms])
            with torch.no_grad():
                logits = torch.stack([model(x + c) for c in candidates])
                losses = torch.stack([self.loss_fn(z, target) for z in logits])
            pick = losses.argmax(0)  # the first of equal losses
            delta = candidates[pick, rows]
            current = AttackResult((x + delta).detach(), logits[pick, rows], losses[pick, rows],
                                   torch.full_like(rows, self.steps))
            best = current if best is None else best.pick(current, current.loss > best.loss)
        return best

    def _single_run(self, model: nn.Module, x: Tensor, target: Tensor) -> AttackResult:
        return self.search(model, x, target)

    def _ascend(self, model: nn.Module, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        result = self.search(model, x, target)
        return result.x_adv, result.steps, x


class WorstOfAttacks(Attack):
    """The "max" (worst-PGD) baseline: every attack runs on its own, and per example the result with the highest
    loss is kept (the official ``pgd_worst_dir``), e.g. ``WorstOfAttacks(union_attacks(...))``.

    The attacks are run in their own module modes; each scores its result (one forward each). For accuracy
    under the union use :func:`union_correct`, which counts an example as fooled if any attack fools it.
    """

    def __init__(self, attacks: Union[Mapping[str, Attack], Sequence[Attack]]) -> None:
        self.attacks = dict(attacks) if isinstance(attacks, Mapping) else {str(i): a for i, a in enumerate(attacks)}
        if not self.attacks:
            raise ValueError("WorstOfAttacks needs at least one attack")

    def __repr__(self) -> str:
        return f"WorstOfAttacks({', '.join(map(repr, self.attacks.values()))})"

    def run(self, model: nn.Module, x: Tensor, y: Tensor) -> AttackResult:
        check_attack_inputs(x, y)
        with inputs_checked():
            results = [attack.run(model, x, y) for attack in self.attacks.values()]
        return highest_loss(results)


def highest_loss(results: Sequence[AttackResult]) -> AttackResult:
    """Per example, the result with the highest loss (the first of equal ones)."""
    best = results[0]
    for result in results[1:]:
        best = best.pick(result, result.loss > best.loss)
    return best


def union_attacks(eps: float = 0.03, eps_l2: float = 0.5, eps_l1: float = 12.0, steps: int = 50,
                  step_size: Optional[float] = None, step_size_l2: Optional[float] = None,
                  step_size_l1: Optional[float] = None, norms: Sequence[str] = UNION_NORMS,
                  l1_k: Union[int, Sequence[int]] = DEFAULT_L1_K, l1_percentile: Optional[float] = None,
                  l1_gap: Optional[float] = None, l1_skip_saturated: bool = False, random_start: bool = True,
                  restarts: int = 1, loss: Literal["ce", "margin", "dlr"] = "ce",
                  bn_mode: Literal["eval", "train", "batch"] = "eval") -> dict[str, PGD]:
    """One attack per threat model, keyed by norm: :class:`~lit_robust.attacks.PGD` for Linf and L2,
    :class:`L1PGD` for L1 (steps None: ``2.5 * radius / steps``), for :class:`WorstOfAttacks`, the "avg" loss or
    :func:`union_correct`."""
    make = {
        "linf": lambda: PGD(eps, steps, step_size, "linf", random_start, restarts, loss, bn_mode),
        "l2": lambda: PGD(eps_l2, steps, step_size_l2, "l2", random_start, restarts, loss, bn_mode),
        "l1": lambda: L1PGD(eps_l1, steps, step_size_l1, l1_k, l1_percentile, l1_gap, l1_skip_saturated,
                            random_start, restarts, loss, bn_mode),
    }
    return {norm: make[norm]() for norm in check_norms(norms)}


def in_union(delta: Tensor, radii: Mapping[str, float], tol: float = 1e-5) -> Tensor:
    """Per example: ``delta`` lies in at least one of the balls ``{norm: radius}`` (relative tolerance ``tol``)."""
    d = delta.detach().flatten(1)
    size = {"linf": lambda: d.abs().amax(1), "l2": lambda: d.norm(dim=1), "l1": lambda: d.abs().sum(1)}
    return torch.stack([size[n]() <= r * (1 + tol) + tol for n, r in radii.items()]).any(0)


def union_correct(model: nn.Module, x: Tensor, y: Tensor, attacks: Mapping[str, Attack]) -> dict[str, Tensor]:
    """Per-example correctness: ``"clean"`` (eval mode), each attack's key (clean and not fooled by it) and
    ``"union"`` (clean and fooled by none): the per-example worst case over the threat models, whose mean is
    the union accuracy (the mean of the minimum, not the minimum of the per-attack means)."""
    check_attack_inputs(x, y)
    with torch.no_grad(), module_mode(model, "eval"):
        clean = model(x).argmax(1) == y
    correct = {"clean": clean}
    union = clean.clone()
    with inputs_checked():
        for name, attack in attacks.items():
            correct[name] = clean & (attack.run(model, x, y).predictions == y)
            union &= correct[name]
    correct["union"] = union
    return correct
