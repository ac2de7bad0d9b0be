"""Gradient-masking sanity checks: is a robustness number measured by gradient attacks believable?

The basic sanity tests of Carlini et al., "On Evaluating Adversarial Robustness" (arXiv
1902.06705, §5 and the checklist), and the symptoms of obfuscated gradients listed by
Athalye et al. (ICML 2018, §3.1): iterative attacks beat single-step ones; more iterations
and restarts do not raise accuracy; accuracy falls as eps grows and reaches 0 once the ball
holds the whole image box; a black-box attack (Square, Andriushchenko et al. ECCV 2020) does
not beat the white-box ones; and APGD on the scale-invariant DLR loss does not beat APGD on
cross-entropy by much (Croce & Hein, ICML 2020), which otherwise points at saturated logits.
A randomised model, or one evaluated in train mode, is flagged first: the other numbers mean
little then.

APGD and Square are the reference implementations (PyPI ``pyautoattack``), as in
:func:`~lit_robust.evaluation.autoattack`. Everything runs in fp32 with autocast disabled,
every submodule in eval mode (each flag restored afterwards), parameters' ``requires_grad``
switched off during the attacks and restored, the caller's RNG untouched (forked, then seeded
with ``seed``), and outside inference mode even when called from inside it (``trainer.test``).

Tolerance. All attacks run on the same ``n`` examples, so their accuracies are paired and
differ by far less than two independent estimates would. The default tolerance
``max(0.01, 1 / sqrt(n))`` (:func:`default_tolerance`) is the 95% confidence half-width of an
accuracy estimated on ``n`` examples at its widest (accuracy 50%: ``2 * 0.5 / sqrt(n)``): a
gap that the number itself could not resolve is not flagged. 0.10 for 100 examples, 0.05 for
400, 0.032 for 1,000, floored at 0.01 from 10,000 on.
"""

from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal, Optional, Sequence

import torch
from torch import Tensor, nn

from lit_robust.attacks.functional import check_norm
from lit_robust.attacks.pgd import FGSM, PGD, module_mode
from lit_robust.checks import check_inputs
from lit_robust.targets import require_class_labels
from lit_robust.evaluation.autoattack import _NORM_NAMES
from lit_robust.evaluation.progress import progress_bar, show_accuracy
from lit_robust.evaluation.tiers import forked_rng, frozen_parameters

#: Relative logit difference above which two eval-mode forward passes count as different.
DETERMINISM_RTOL = 1e-4
#: Square attack queries per example by default (AutoAttack's standard run uses 5,000).
SQUARE_QUERIES = 1000
#: APGD iterations by default (as in AutoAttack's standard run).
APGD_STEPS = 100
#: The eps-sweep of the monotonicity check and of the report's accuracy-vs-eps curve, as multiples of
#: eps (the check adds the unbounded eps).
EPS_GRID = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)

_AttackFn = Callable[[Tensor, Tensor], Tensor]  # (x, y) -> x_adv, the model bound in


@dataclass
class Check:
    """The outcome of one sanity check: the numbers it compared and what they suggest."""

    name: str
    passed: bool
    numbers: dict[str, float]
    message: str
    #: ``{eps: accuracy}`` where the check measured a curve (``accuracy_decreases_with_eps``); not in to_dict
    curve: Optional[dict[float, float]] = field(default=None, repr=False)

    @property
    def status(self) -> str:
        """``"pass"``, or ``"warn"`` where the numbers look like gradient masking."""
        return "pass" if self.passed else "warn"

    def to_dict(self) -> dict:
        """Plain JSON-serialisable values: name, status, passed, numbers, message."""
        return {"name": self.name, "status": self.status, "passed": bool(self.passed),
                "numbers": {str(k): float(v) for k, v in self.numbers.items()}, "message": self.message}


def default_tolerance(n: int) -> float:
    """``max(0.01, 1 / sqrt(n))``: the widest 95% half-width of an accuracy measured on ``n`` examples."""
    return max(0.01, 1.0 / math.sqrt(n))


def unbounded_eps(x: Tensor, norm: str) -> float:
    """The smallest radius whose ball around any [0, 1] image holds the whole box.

    Linf: 1. L2: ``sqrt(d)``, the box's diameter, with ``d`` the pixels of one example. Within
    it any image can be turned into any other, so every non-constant classifier's worst-case
    accuracy is 0 (Carlini et al.: unbounded attacks must reach 100% success).
    """
    return 1.0 if check_norm(norm) == "linf" else math.sqrt(x[0].numel())


def accuracy_vs_eps(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps_values: Sequence[float],
    norm: Literal["linf", "l2"] = "linf",
    steps: int = 20,
    restarts: int = 1,
    seed: int = 0,
    *,
    batch_size: int = 500,
    progress: Optional[bool] = None,
) -> dict[float, float]:
    """PGD-``steps`` accuracy (``restarts`` random starts) at each eps; eps 0 gives the clean accuracy.

    Runs under the same conditions as :func:`gradient_masking_checks` (eval mode, fp32, the
    caller's RNG untouched). Keys are the given eps values as floats, in the given order.
    ``progress``: a bar per eps (None: only when stderr is a terminal).
    """
    _check_arguments(x, y, norm, steps, restarts, batch_size)
    if any(not e >= 0 for e in eps_values):
        raise ValueError(f"eps_values must all be >= 0, got {list(eps_values)}")
    curve = {}
    with _evaluation_context(model, x, seed), progress_bar(progress, "accuracy vs eps", len(eps_values), "eps") as bar:
        x, y = _prepare(x, y)
        for e in eps_values:
            attack = _pgd(model, e, norm, steps, restarts)
            curve[float(e)] = _accuracy(_tracked(bar, f"PGD-{steps} eps {e:.4g}", model, x, y, attack, batch_size))
    return curve


def gradient_masking_checks(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    norm: Literal["linf", "l2"] = "linf",
    seed: int = 0,
    steps: int = 20,
    tolerance: Optional[float] = None,
    *,
    restarts: int = 5,
    apgd_steps: int = APGD_STEPS,
    square_queries: int = SQUARE_QUERIES,
    batch_size: int = 500,
    progress: Optional[bool] = None,
) -> list[Check]:
    """Runs the seven sanity checks on ``(x, y)`` at radius ``eps``; each returns a :class:`Check`.

    1. ``deterministic_eval``: two eval-mode forward passes agree, every module ran in eval
       mode, and the model was not handed over in train mode.
    2. ``iterative_beats_single_step``: PGD-``steps`` accuracy <= FGSM accuracy + tolerance.
    3. ``more_iterations_do_not_help_the_model``: PGD with 5x the steps, and PGD with
       ``restarts`` random restarts, are not more than tolerance above PGD-``steps``.
    4. ``accuracy_decreases_with_eps``: PGD-``steps`` accuracy over eps x :data:`EPS_GRID` and
       the unbounded eps (:func:`unbounded_eps`) never rises by more than tolerance, and is <=
       tolerance at the unbounded eps; the check's ``curve`` holds these points.
    5. ``black_box_does_not_beat_white_box``: the fraction of examples that survive every
       white-box attack (FGSM, the PGDs, APGD-CE, APGD-DLR) but fall to Square
       (``square_queries`` queries, margin loss, p_init 0.8) is <= tolerance; this is the
       reference AutoAttack's own Square check, per example.
    6. ``apgd_ce_vs_dlr``: APGD-CE accuracy is not above APGD-DLR accuracy by more than
       tolerance (``apgd_steps`` iterations each); needs >= 3 classes, else a warning that
       it could not run.
    7. ``reference_attacks_do_not_beat_pgd``: PGD-``steps`` accuracy is not above the best APGD's
       (CE or DLR) by more than tolerance. A large gap means PGD's fixed steps are misled by the
       loss surface, the classic sign of gradient masking after single-step training (FGSM-RS,
       FGSM-SDI); report the worst case over attacks, never PGD alone.

    ``tolerance`` defaults to :func:`default_tolerance` of ``len(x)``. Costs roughly
    ``steps * (11 + restarts) + 2 * apgd_steps`` forward+backward passes and
    ``square_queries`` forwards per example. A warning is a reason to look, not a verdict.
    ``progress``: a bar over the attacks, each named, with its accuracy (None: only when stderr
    is a terminal).
    """
    _check_arguments(x, y, norm, steps, restarts, batch_size)
    if x.dim() != 4:
        raise ValueError(f"x must be a batch of images [B, C, H, W] (Square needs them), got shape {tuple(x.shape)}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    for name, value in (("apgd_steps", apgd_steps), ("square_queries", square_queries)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value}")
    tol = default_tolerance(x.shape[0]) if tolerance is None else float(tolerance)
    if not 0 <= tol < 1:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance}")
    given_in_train = [name or type(model).__name__ for name, m in model.named_modules() if m.training]

    with _evaluation_context(model, x, seed):
        x, y = _prepare(x, y)
        determinism, logits = _determinism_check(model, x, batch_size, given_in_train)
        num_classes = logits.shape[1]
        clean = logits.argmax(1) == y
        big = unbounded_eps(x, norm)
        grid = sorted({m * eps for m in EPS_GRID if m * eps < big} | {big})
        extra = [e for e in grid if e not in (0, eps)]  # the curve's points no other check measures
        bar = progress_bar(progress, "sanity checks", 6 + (num_classes >= 3) + len(extra), "attack")

        def run(stage: str, attack: _AttackFn) -> Tensor:
            return _tracked(bar, f"sanity: {stage}", model, x, y, attack, batch_size)

        with bar:
            white = {
                "fgsm": run("FGSM", _bound(FGSM(eps, norm=norm), model)),
                "pgd": run(f"PGD-{steps}", _pgd(model, eps, norm, steps, 1)),
                "pgd_more_steps": run(f"PGD-{5 * steps}", _pgd(model, eps, norm, 5 * steps, 1)),
                "pgd_restarts": run(f"PGD-{steps} x {restarts}", _pgd(model, eps, norm, steps, restarts)),
                "apgd_ce": run("APGD-CE", _apgd(model, x, eps, norm, apgd_steps, "ce", seed)),
            }
            if num_classes >= 3:
                white["apgd_dlr"] = run("APGD-DLR", _apgd(model, x, eps, norm, apgd_steps, "dlr", seed))
            square = run("Square", _square(model, x, eps, norm, square_queries, seed))
            at = {0: clean, eps: white["pgd"]}
            at.update({e: run(f"PGD-{steps} eps {e:.4g}", _pgd(model, e, norm, steps, 1)) for e in extra})
        curve = {e: _accuracy(at[e]) for e in grid}

    acc = {name: _accuracy(c) for name, c in white.items()}
    return [
        determinism,
        _single_step_check(_accuracy(clean), acc, steps, tol),
        _iterations_check(acc, steps, restarts, tol),
        _eps_check(curve, big, steps, tol),
        _square_check(white, square, square_queries, tol),
        _dlr_check(acc, num_classes, apgd_steps, tol),
        _reference_check(acc, steps, apgd_steps, tol),
    ]


# --- the checks ----------------------------------------------------------------------------


def _determinism_check(model: nn.Module, x: Tensor, batch_size: int, given_in_train: list[str]) -> tuple[Check, Tensor]:
    ran_in_train: set[int] = set()

    def record(module: nn.Module, args: tuple) -> None:
        if module.training:
            ran_in_train.add(id(module))

    hooks = [m.register_forward_pre_hook(record) for m in model.modules()]
    try:
        first, second = _logits(model, x, batch_size), _logits(model, x, batch_size)
    finally:
        for hook in hooks:
            hook.remove()
    rel_diff = ((first - second).abs().max() / first.abs().max().clamp_min(1e-12)).item()
    disagree = _accuracy(first.argmax(1) != second.argmax(1))
    deterministic = rel_diff <= DETERMINISM_RTOL and disagree == 0
    problems = []
    if not deterministic:
        problems.append(
            f"two eval-mode forward passes differ (max relative logit difference {rel_diff:.3g}, "
            f"{disagree:.1%} of predictions): the model is randomised, so gradient attacks see a different "
            "model at every step and the other checks' numbers are unreliable; attack it with EOT "
            "(Athalye et al. 2018) or AutoAttack version='rand'")
    if ran_in_train:
        problems.append(f"{len(ran_in_train)} modules ran in train mode although the checks set eval mode: "
                        "the model switches its own mode inside forward")
    if given_in_train:
        shown = ", ".join(given_in_train[:3]) + (", ..." if len(given_in_train) > 3 else "")
        problems.append(
            f"the model was given with {len(given_in_train)} modules in train mode ({shown}): these checks ran "
            "it in eval mode and restored the flags, but an evaluation of the model as given runs BatchNorm "
            "and dropout in train mode; call model.eval() first")
    numbers = {"relative_logit_difference": rel_diff, "prediction_disagreement": disagree,
               "modules_in_train_mode_given": float(len(given_in_train)),
               "modules_in_train_mode_during_checks": float(len(ran_in_train))}
    message = "; ".join(problems) or "two eval-mode forward passes agree and every module ran in eval mode"
    return Check("deterministic_eval", not problems, numbers, message), first


def _single_step_check(clean: float, acc: dict[str, float], steps: int, tol: float) -> Check:
    fgsm, pgd = acc["fgsm"], acc["pgd"]
    passed = pgd <= fgsm + tol
    message = (f"PGD-{steps} ({pgd:.1%}) is at least as strong as FGSM ({fgsm:.1%})" if passed else
               f"PGD-{steps} accuracy {pgd:.1%} is above FGSM's {fgsm:.1%} by more than {tol:.1%}: the iterative "
               "attack is misled by the loss surface, a sign of gradient masking")
    return Check("iterative_beats_single_step", passed,
                 {"clean_acc": clean, "fgsm_acc": fgsm, "pgd_acc": pgd, "tolerance": tol}, message)


def _iterations_check(acc: dict[str, float], steps: int, restarts: int, tol: float) -> Check:
    pgd, longer, restarted = acc["pgd"], acc["pgd_more_steps"], acc["pgd_restarts"]
    passed = max(longer, restarted) <= pgd + tol
    if passed:
        message = (f"PGD-{5 * steps} ({longer:.1%}) and PGD-{steps} x {restarts} restarts ({restarted:.1%}) "
                   f"are not above PGD-{steps} ({pgd:.1%})")
        if pgd - min(longer, restarted) > tol:
            message += f"; PGD-{steps} is far from converged: report the stronger attack"
    else:
        message = (f"a stronger attack gives a higher accuracy (PGD-{steps}: {pgd:.1%}, PGD-{5 * steps}: "
                   f"{longer:.1%}, {restarts} restarts: {restarted:.1%}, tolerance {tol:.1%}): the attack does "
                   "not converge to better points, a sign of gradient masking")
    numbers = {"pgd_acc": pgd, "pgd_more_steps_acc": longer, "pgd_restarts_acc": restarted,
               "steps": float(steps), "more_steps": float(5 * steps), "restarts": float(restarts), "tolerance": tol}
    return Check("more_iterations_do_not_help_the_model", passed, numbers, message)


def _eps_check(curve: dict[float, float], big: float, steps: int, tol: float) -> Check:
    eps_values, accs = list(curve), list(curve.values())
    rises = [(eps_values[i], eps_values[i + 1], accs[i + 1] - accs[i]) for i in range(len(accs) - 1)]
    max_rise = max((r for _, _, r in rises), default=0.0)
    at_big = curve[big]
    problems = [f"accuracy rises from eps {a:.4g} to {b:.4g} by {r:.1%}" for a, b, r in rises if r > tol]
    if at_big > tol:
        problems.append(f"at eps {big:.4g}, where any image can be turned into any other, PGD leaves "
                        f"{at_big:.1%} accuracy instead of ~0")
    shown = ", ".join(f"{e:.4g}: {a:.1%}" for e, a in curve.items())
    message = (f"accuracy falls with eps and reaches ~0 ({shown})" if not problems else
               "; ".join(problems) + f" (curve {shown}; tolerance {tol:.1%}): a sign of gradient masking")
    numbers = {f"acc@{e:.4g}": a for e, a in curve.items()}
    numbers.update(max_increase=max_rise, unbounded_eps=big, unbounded_acc=at_big, steps=float(steps), tolerance=tol)
    return Check("accuracy_decreases_with_eps", not problems, numbers, message, curve)


def _square_check(white: dict[str, Tensor], square: Tensor, queries: int, tol: float) -> Check:
    survives_white = torch.stack(list(white.values())).all(0)
    square_only = _accuracy(survives_white & ~square)
    numbers = {"square_acc": _accuracy(square), "whitebox_acc": _accuracy(survives_white),
               "worst_case_acc": _accuracy(survives_white & square), "square_only_fraction": square_only,
               "square_queries": float(queries), "tolerance": tol}
    passed = square_only <= tol
    message = (f"Square ({queries} queries, {numbers['square_acc']:.1%}) breaks {square_only:.1%} of the examples "
               f"that survive every white-box attack (white-box accuracy {numbers['whitebox_acc']:.1%})")
    if not passed:
        message += f", more than {tol:.1%}: a black-box attack beating gradients is a sign of gradient masking"
    return Check("black_box_does_not_beat_white_box", passed, numbers, message)


def _dlr_check(acc: dict[str, float], num_classes: int, apgd_steps: int, tol: float) -> Check:
    if "apgd_dlr" not in acc:
        return Check("apgd_ce_vs_dlr", False, {"num_classes": float(num_classes), "apgd_ce_acc": acc["apgd_ce"]},
                     f"not run: the DLR loss needs >= 3 classes, the model has {num_classes}; "
                     "logit saturation is unchecked")
    ce, dlr = acc["apgd_ce"], acc["apgd_dlr"]
    passed = ce - dlr <= tol
    message = f"APGD-CE ({ce:.1%}) and APGD-DLR ({dlr:.1%}) agree within {tol:.1%}"
    if not passed:
        message = (f"APGD-CE accuracy {ce:.1%} is {ce - dlr:.1%} above APGD-DLR's {dlr:.1%}: cross-entropy "
                   "gradients vanish (saturated or rescaled logits), a sign of gradient masking")
    numbers = {"apgd_ce_acc": ce, "apgd_dlr_acc": dlr, "gap": ce - dlr, "num_classes": float(num_classes),
               "apgd_steps": float(apgd_steps), "tolerance": tol}
    return Check("apgd_ce_vs_dlr", passed, numbers, message)


def _reference_check(acc: dict[str, float], steps: int, apgd_steps: int, tol: float) -> Check:
    pgd = acc["pgd"]
    name, best = min(((k, v) for k, v in acc.items() if k.startswith("apgd")), key=lambda kv: kv[1])
    shown = name.replace("apgd_", "APGD-").upper()
    passed = pgd - best <= tol
    message = f"PGD-{steps} ({pgd:.1%}) is within {tol:.1%} of the best reference attack, {shown} ({best:.1%})"
    if not passed:
        message = (f"{shown} ({apgd_steps} iterations) finds {pgd - best:.1%} more than PGD-{steps} "
                   f"({best:.1%} vs {pgd:.1%}): PGD's fixed steps are misled by the loss surface, a sign of "
                   "gradient masking (typical after single-step training); report the worst case, not PGD")
    numbers = {"pgd_acc": pgd, "best_reference_acc": best, "gap": pgd - best, "steps": float(steps),
               "apgd_steps": float(apgd_steps), "tolerance": tol}
    return Check("reference_attacks_do_not_beat_pgd", passed, numbers, message)


# --- plumbing ------------------------------------------------------------------------------


def _check_arguments(x: Tensor, y: Tensor, norm: str, steps: int, restarts: int, batch_size: int) -> None:
    check_norm(norm)
    check_inputs(x, y)
    require_class_labels(y, "the sanity checks")
    if x.shape[0] == 0:
        raise ValueError("x must hold at least one example")
    for name, value in (("steps", steps), ("restarts", restarts), ("batch_size", batch_size)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value}")


@contextmanager
def _evaluation_context(model: nn.Module, x: Tensor, seed: int) -> Iterator[None]:
    """fp32 without autocast, eval mode, no parameter gradients, gradients on, a forked and seeded RNG."""
    with ExitStack() as stack:
        stack.enter_context(forked_rng(x.device))  # pyautoattack reseeds the generators
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(torch.autocast(x.device.type, enabled=False))
        stack.enter_context(module_mode(model, "eval"))
        stack.enter_context(frozen_parameters(model))
        torch.manual_seed(seed)
        yield


def _prepare(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Normal (not inference-mode) fp32 copies, so attacks can build graphs on them."""
    return x.detach().clone().float(), y.detach().clone().long()


def _accuracy(correct: Tensor) -> float:
    return correct.double().mean().item()  # float64: 6/20 prints 0.3, not 0.30000001192


def _logits(model: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    with torch.no_grad():
        return torch.cat([model(xb).float() for xb in x.split(batch_size)])


def _tracked(bar, stage: str, model: nn.Module, x: Tensor, y: Tensor, attack: Optional[_AttackFn],
             batch_size: int) -> Tensor:
    """:func:`_correct`, shown on the progress ``bar``: the stage's name while it runs, then its accuracy."""
    bar.set_description(stage)
    correct = _correct(model, x, y, attack, batch_size)
    bar.update()
    show_accuracy(bar, _accuracy(correct))
    return correct


def _correct(model: nn.Module, x: Tensor, y: Tensor, attack: Optional[_AttackFn], batch_size: int) -> Tensor:
    """Per example: is the model right at ``attack(x, y)`` (at ``x`` itself when there is no attack)."""
    out = []
    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        x_adv = xb if attack is None else attack(xb, yb).detach().float()
        out.append(_logits(model, x_adv, batch_size).argmax(1) == yb)
    return torch.cat(out)


def _bound(attack: PGD, model: nn.Module) -> _AttackFn:
    return lambda xb, yb: attack(model, xb, yb)


def _pgd(model: nn.Module, eps: float, norm: str, steps: int, restarts: int) -> Optional[_AttackFn]:
    return None if eps == 0 else _bound(PGD(eps, steps=steps, norm=norm, restarts=restarts), model)


def _apgd(model: nn.Module, x: Tensor, eps: float, norm: str, steps: int, loss: str, seed: int) -> _AttackFn:
    from pyautoattack.autopgd_base import APGDAttack  # lazy: the import is slow and only evaluation needs it

    return APGDAttack(model, n_iter=steps, norm=_NORM_NAMES[norm], n_restarts=1, eps=float(eps), seed=seed,
                      loss=loss, device=x.device).perturb


def _square(model: nn.Module, x: Tensor, eps: float, norm: str, queries: int, seed: int) -> _AttackFn:
    from pyautoattack.square import SquareAttack

    return SquareAttack(model, norm=_NORM_NAMES[norm], n_queries=queries, eps=float(eps), p_init=0.8,
                        n_restarts=1, seed=seed, loss="margin", device=x.device).perturb
