"""Tiered robustness evaluation: PGD to look quickly, APGD to monitor, reference AutoAttack to report.

Three tiers of growing cost, all in fp32 with the model in eval mode:

``"pgd"``
    Our PGD-k (CE loss, random start, step ``2.5 * eps / k``; k = 20 and one restart by
    default). About ``k * restarts`` forward+backward passes per example: a quick look
    during development, not a number to publish.
``"apgd"``
    APGD-CE (100 iterations) and APGD-T (100 iterations on each of 9 target classes) from
    the AutoAttack authors' code (PyPI ``pyautoattack``), with the settings of standard
    AutoAttack (Croce & Hein, ICML 2020); ``n_classes - 1`` targets for models with fewer
    than 10 classes, APGD-CE alone below 4 (with a warning). Each runs on its own, so a large gap between the
    two flags logit-scale gradient masking. Up to 1,000 forward+backward passes per
    correctly classified example; in published AutoAttack logs FAB-T and Square rarely
    flip a point that these two left, so this tier is the one to monitor training and
    ablations with.
``"autoattack"``
    The reference standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square with 5,000 queries)
    through :func:`lit_robust.evaluation.autoattack.autoattack`: the number RobustBench
    (Croce et al., NeurIPS 2021 Datasets and Benchmarks) reports. Roughly 3-4 times the
    apgd tier on robust models (14.7 h for a WRN-34-10 on the 10,000 CIFAR-10 test
    images on a 2020 GPU).

Robustness is merged per example: an example counts as robust (``"worst_case"``) only if
it is classified correctly and no attack that ran fooled it, the mean over examples of the
minimum over attacks (Carlini et al. 2019's checklist). The minimum of per-attack
accuracies would overstate robustness whenever different attacks fool different examples.
"""

from __future__ import annotations

import logging
import math
import numbers
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from importlib.metadata import version as _package_version
from typing import Any, Callable, Iterable, Iterator, Literal, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from lit_robust.attacks.functional import check_norm
from lit_robust.attacks.pgd import PGD, module_mode
from lit_robust.batches import BatchKey, check_batch_key, split_batch
from lit_robust.checks import check_eps, check_input_types, check_inputs, inputs_checked
from lit_robust.targets import require_class_labels
from lit_robust.evaluation.autoattack import autoattack
from lit_robust.evaluation.progress import progress_bar, show_accuracy

TIERS = ("pgd", "apgd", "autoattack")
"""The evaluation tiers, cheapest first: PGD, the reference APGD-CE + APGD-T, the reference AutoAttack."""
#: the keys each tier adds to the per-example correctness (besides "clean" and "worst_case")
TIER_KEYS = {"pgd": ("pgd",), "apgd": ("apgd-ce", "apgd-t"), "autoattack": ("autoattack",)}
DEFAULT_EPS = {"linf": 8 / 255, "l2": 0.5}  # RobustBench's CIFAR-10 threat models
AUTOATTACK_VERSIONS = ("standard", "plus", "rand")
APGD_ITERATIONS = 100  # standard AutoAttack's APGD-CE and APGD-T
APGD_TARGET_CLASSES = 9  # standard AutoAttack's APGD-T (fewer when the model has fewer classes)

_AA_NORMS = {"linf": "Linf", "l2": "L2"}
_AA_MIN_CLASSES = {"standard": 10, "plus": 10, "rand": 3}  # 9 targets (APGD-T, FAB-T); the DLR loss

Data = Union[tuple[Tensor, Tensor], Iterable[Sequence[Any]]]


@dataclass
class RobustnessResult:
    """Per-example outcome of :func:`evaluate_robustness`.

    ``correct`` maps ``"clean"``, every attack that ran (``"pgd"``, ``"apgd-ce"``,
    ``"apgd-t"``, ``"autoattack"``) and ``"worst_case"`` to a CPU bool tensor over all
    evaluated examples, in the order of ``indices`` (positions in the data).
    """

    correct: dict[str, Tensor]
    eps: float
    norm: str
    tiers: tuple[str, ...]
    seed: int
    settings: dict = field(default_factory=dict)
    indices: Optional[Tensor] = None

    @property
    def n_examples(self) -> int:
        return len(self.correct["clean"])

    @property
    def accuracy(self) -> dict[str, float]:
        # float64: 6/20 prints 0.3, not 0.30000001192
        return {key: mask.double().mean().item() for key, mask in self.correct.items()}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable summary (no per-example tensors)."""
        return {"eps": self.eps, "norm": self.norm, "n_examples": self.n_examples, "seed": self.seed,
                "tiers": list(self.tiers), "settings": self.settings, "accuracy": self.accuracy}


def attack_batch(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    norm: Literal["linf", "l2"] = "linf",
    tiers: Sequence[str] = ("pgd",),
    pgd_steps: int = 20,
    pgd_restarts: int = 1,
    seed: int = 0,
    autoattack_version: Literal["standard", "plus", "rand"] = "standard",
) -> dict[str, Tensor]:
    """Per-example correctness (bool, on ``x.device``) on the clean batch, under each attack, and worst case.

    Keys: ``"clean"``, those of the tiers run (:data:`TIER_KEYS`) and ``"worst_case"``
    (clean and no attack succeeded). Examples misclassified clean count as not robust under
    every attack. Runs in fp32 (autocast disabled) with every submodule in eval mode and
    every parameter frozen; training flags and ``requires_grad`` are restored afterwards and
    no parameter ``.grad`` is created. Each attack is seeded from ``seed`` inside a forked
    RNG, so the caller's random state is untouched. Needs gradients: not inside
    ``torch.inference_mode``.
    """
    tiers = _check_args(eps, norm, tiers, pgd_steps, pgd_restarts, seed, autoattack_version)
    return _attack_batch(model, x, y, float(eps), norm, tiers, pgd_steps, pgd_restarts, seed, autoattack_version)[0]


def evaluate_robustness(
    model: nn.Module,
    data: Data,
    eps: Optional[float] = None,
    norm: Literal["linf", "l2"] = "linf",
    tiers: Sequence[str] = TIERS,
    n_examples: Optional[int] = None,
    subset_seed: Optional[int] = None,
    seed: int = 0,
    batch_size: int = 500,
    device: Optional[Union[torch.device, str]] = None,
    pgd_steps: int = 20,
    pgd_restarts: int = 1,
    autoattack_version: Literal["standard", "plus", "rand"] = "standard",
    inputs: BatchKey = 0,
    targets: BatchKey = 1,
    progress: Optional[bool] = None,
) -> RobustnessResult:
    """Clean, per-attack and worst-case robust accuracy of ``model`` on ``data``, per example.

    Args:
        model: maps [0, 1] images to logits (normalisation inside it).
        data: an ``(x, y)`` pair of tensors, or an iterable of batches ``(x, y, *extra)`` (a
            DataLoader, e.g. a DataModule's ``test_dataloader()``; do not shuffle it) or dicts.
        eps: the radius; RobustBench's 8/255 (``"linf"``) or 0.5 (``"l2"``) when None.
        tiers: any of :data:`TIERS`, run in that order whatever the order given.
        n_examples: evaluate the first ``n_examples`` (RobustBench's convention) or, with
            ``subset_seed``, a seeded random subset of that size (an iterable is then read
            whole). None: all of ``data``.
        seed: seeds every attack (each batch the same way, as AutoAttack does).
        batch_size: examples per attack call; the data are re-batched to it, so results do
            not depend on how ``data`` was batched.
        device: where to run; the model's parameters' device by default.
        pgd_steps, pgd_restarts: the pgd tier's PGD-k.
        autoattack_version: the reference AutoAttack's version (``"rand"`` for randomised
            defences).
        inputs, targets: where the images and labels are in each batch (indices, dict keys or
            callables; :mod:`lit_robust.batches`).
        progress: a bar over the examples naming the tier that runs, with the worst-case
            accuracy so far (None: only when stderr is a terminal).
    """
    norm = check_norm(norm)
    eps = DEFAULT_EPS[norm] if eps is None else eps
    tiers = _check_args(eps, norm, tiers, pgd_steps, pgd_restarts, seed, autoattack_version)
    if n_examples is not None and (int(n_examples) != n_examples or n_examples < 1):
        raise ValueError(f"n_examples must be an integer >= 1 or None, got {n_examples}")
    if subset_seed is not None and n_examples is None:
        raise ValueError("subset_seed picks a random subset of n_examples: give n_examples too")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size}")
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = torch.device(device)

    keys = (check_batch_key(inputs, "inputs"), check_batch_key(targets, "targets"))
    batches, indices = _select(data, n_examples, subset_seed, int(batch_size), keys)
    chunks: dict[str, list[Tensor]] = {}
    n_classes = 0
    with progress_bar(progress, "robustness", _size(data, n_examples), "example") as bar:
        for x, y in batches:
            correct, n_classes = _attack_batch(model, x.to(device), y.to(device), float(eps), norm, tiers,
                                               pgd_steps, pgd_restarts, seed, autoattack_version, bar)
            for key, mask in correct.items():
                chunks.setdefault(key, []).append(mask.cpu())
            bar.update(len(y))
            show_accuracy(bar, torch.cat(chunks["worst_case"]).double().mean().item(), "worst-case acc")
    if not chunks:
        raise ValueError("data holds no examples")
    correct = {key: torch.cat(masks) for key, masks in chunks.items()}
    if indices is None:
        indices = torch.arange(len(correct["clean"]))
    if n_examples is not None and len(indices) < n_examples:
        warnings.warn(f"n_examples={n_examples} but data holds only {len(indices)}; evaluated all of them")
    settings = _settings(tiers, float(eps), norm, n_classes, pgd_steps, pgd_restarts, autoattack_version)
    settings.update(n_examples_requested=n_examples, subset_seed=subset_seed, batch_size=int(batch_size),
                    precision="fp32", module_mode="eval")
    return RobustnessResult(correct, float(eps), norm, tiers, seed, settings, indices)


# --------------------------------------------------------------------------------------------- internals


def _check_args(eps, norm, tiers, pgd_steps, pgd_restarts, seed, autoattack_version) -> tuple[str, ...]:
    """Validates the shared arguments; returns the tiers in canonical (cheapest first) order."""
    check_norm(norm)
    try:
        valid = math.isfinite(float(eps)) and float(eps) > 0
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    check_eps(float(eps), norm)
    if isinstance(tiers, str):
        tiers = (tiers,)
    unknown = [t for t in tiers if t not in TIERS]
    if unknown or not tiers:
        raise ValueError(f"tiers must be a non-empty selection of {TIERS}, got {tuple(tiers)!r}")
    for name, value in (("pgd_steps", pgd_steps), ("pgd_restarts", pgd_restarts)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if autoattack_version not in AUTOATTACK_VERSIONS:
        raise ValueError(f"autoattack_version must be one of {AUTOATTACK_VERSIONS}, got {autoattack_version!r}")
    return tuple(t for t in TIERS if t in tiers)


def _attack_batch(model, x, y, eps, norm, tiers, pgd_steps, pgd_restarts, seed, autoattack_version, bar=None):
    """:func:`attack_batch` without argument checks; also returns the number of classes.

    ``bar``: a progress bar to name each tier on (AutoAttack then shows its own); None in a Trainer.
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError("robustness evaluation needs input gradients: call it outside torch.inference_mode "
                           "(Lightning: Trainer(inference_mode=False))")
    check_input_types(x, y)
    require_class_labels(y, "the robustness evaluation")
    check_eps(eps, norm, x)
    low = sorted({str(p.dtype) for p in model.parameters() if p.dtype in (torch.float16, torch.bfloat16)})
    if low:
        raise ValueError(f"model: the evaluation runs in fp32, but parameters are {', '.join(low)}; "
                         "pass model.float() (a copy, if you train on)")
    # fp32 copies outside inference mode (clone also detaches an inference tensor from it)
    x, y = x.detach().float().clone(), y.detach().long().clone()
    with ExitStack() as stack:
        stack.enter_context(frozen_parameters(model))
        stack.enter_context(module_mode(model, "eval"))
        stack.enter_context(torch.autocast(x.device.type, enabled=False))
        stack.enter_context(forked_rng(x.device))
        stack.enter_context(inputs_checked())  # checked here, once per batch, not again by each attack
        with torch.no_grad():
            logits = model(x)
        check_inputs(x, y, logits)
        n_classes = logits.shape[1]
        clean = logits.argmax(1) == y
        correct = {"clean": clean}
        for tier in tiers:
            if bar is not None:
                bar.set_description(f"robustness: {tier}")
            with torch.enable_grad():
                found = _TIER_RUNNERS[tier](model, x, y, clean, eps, norm, seed, n_classes,
                                            pgd_steps=pgd_steps, pgd_restarts=pgd_restarts,
                                            autoattack_version=autoattack_version,
                                            progress=bar is not None and not bar.disable)
            correct.update({key: mask & clean for key, mask in found.items()})
    worst = clean.clone()
    for key, mask in correct.items():
        worst &= mask
    correct["worst_case"] = worst
    return correct, n_classes


def _correct_at(model: nn.Module, x_adv: Tensor, y: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x_adv.float()).argmax(1) == y


def _run_pgd(model, x, y, clean, eps, norm, seed, n_classes, *, pgd_steps, pgd_restarts, **_) -> dict[str, Tensor]:
    """PGD-k on the examples classified correctly (the others count as fooled)."""
    correct = torch.zeros_like(clean)
    idx = clean.nonzero().squeeze(1)
    if len(idx):
        torch.manual_seed(seed)
        attack = PGD(eps, steps=pgd_steps, norm=norm, random_start=True, restarts=pgd_restarts, loss="ce")
        correct[idx] = attack.run(model, x[idx], y[idx]).predictions == y[idx]
    return {"pgd": correct}


def _apgd_settings(n_classes: int) -> dict[str, dict]:
    common = {"n_iter": APGD_ITERATIONS, "n_restarts": 1, "eot_iter": 1, "rho": 0.75}
    out = {"apgd-ce": {**common, "loss": "ce"}}
    if n_classes >= 4:  # the targeted DLR loss reads the 4th largest logit
        out["apgd-t"] = {**common, "loss": "dlr-targeted", "n_target_classes": min(APGD_TARGET_CLASSES, n_classes - 1)}
    return out


def _run_apgd(model, x, y, clean, eps, norm, seed, n_classes, **_) -> dict[str, Tensor]:
    """APGD-CE and APGD-T of the reference code, each on its own (they skip misclassified examples)."""
    from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

    settings = _apgd_settings(n_classes)
    if "apgd-t" not in settings:
        warnings.warn(f"APGD-T needs at least 4 classes, the model has {n_classes}: the apgd tier runs APGD-CE only")
    out = {}
    for key, kwargs in settings.items():
        kwargs = dict(kwargs, eps=eps, norm=_AA_NORMS[norm], seed=seed, device=x.device,
                      logger=logging.getLogger("auto-attack"))
        if kwargs.pop("loss") == "ce":
            attack = APGDAttack(model, loss="ce", **kwargs)
        else:  # the targeted DLR loss is the only one APGDAttack_targeted takes
            attack = APGDAttack_targeted(model, **kwargs)
        out[key] = _correct_at(model, attack.perturb(x, y), y)
    return out


def _run_autoattack(model, x, y, clean, eps, norm, seed, n_classes, *, autoattack_version, progress,
                    **_) -> dict[str, Tensor]:
    """The reference AutoAttack on the whole batch (it skips misclassified examples itself)."""
    needed = _AA_MIN_CLASSES[autoattack_version]
    if n_classes < needed:
        raise ValueError(f"tiers: AutoAttack version {autoattack_version!r} needs a model with at least {needed} "
                         f"classes, this one has {n_classes}; evaluate with tiers=('pgd', 'apgd') instead")
    x_adv = autoattack(model, x, y, eps, norm, autoattack_version, seed=seed, batch_size=x.shape[0], progress=progress)
    return {"autoattack": _correct_at(model, x_adv, y)}


#: tier -> runner(model, x, y, clean, eps, norm, seed, n_classes, **options) -> {key: bool mask}
_TIER_RUNNERS: dict[str, Callable[..., dict[str, Tensor]]] = {
    "pgd": _run_pgd, "apgd": _run_apgd, "autoattack": _run_autoattack,
}


def _settings(tiers, eps, norm, n_classes, pgd_steps, pgd_restarts, autoattack_version) -> dict[str, Any]:
    """The attack parameters of a run, for the record."""
    settings: dict[str, Any] = {}
    reference = f"pyautoattack {_package_version('pyautoattack')}"
    if "pgd" in tiers:
        settings["pgd"] = {"steps": int(pgd_steps), "restarts": int(pgd_restarts), "step_size": 2.5 * eps / pgd_steps,
                           "random_start": True, "loss": "ce"}
    if "apgd" in tiers:
        for key, kwargs in _apgd_settings(n_classes).items():
            settings[key] = {**kwargs, "implementation": reference}
    if "autoattack" in tiers:
        settings["autoattack"] = {"version": autoattack_version, "implementation": reference}
    return settings


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Parameters with ``requires_grad`` off for the block (no ``.grad`` created, cheaper FAB); restored after."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


def forked_rng(device: torch.device):
    """Forks the CPU RNG and every initialised accelerator RNG the reference code may reseed."""
    if device.type not in ("cpu", "cuda"):
        return torch.random.fork_rng(devices=[device.index or 0], device_type=device.type)
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return torch.random.fork_rng(devices=cuda)


def _select(data: Data, n_examples, subset_seed, batch_size, keys) -> tuple[Iterator[tuple[Tensor, Tensor]],
                                                                             Optional[Tensor]]:
    """Batches of ``batch_size`` over the chosen examples, and their positions (None: the first ones, in order)."""
    if _is_pair(data):
        stream: Iterable[tuple[Tensor, Tensor]] = [tuple(data)]
    else:
        _warn_if_shuffled(data)
        stream = (split_batch(b, *keys) for b in data)
    if subset_seed is None:
        return _rebatch(stream, batch_size, n_examples), None
    parts = list(stream)
    if not parts:
        raise ValueError("data holds no examples")
    x, y = (torch.cat(column) for column in zip(*parts))
    generator = torch.Generator().manual_seed(int(subset_seed))
    indices = torch.randperm(len(y), generator=generator)[:n_examples].sort().values
    picked = indices.to(x.device)
    return _rebatch([(x[picked], y[picked])], batch_size, None), indices


def _size(data: Data, n_examples: Optional[int]) -> Optional[int]:
    """How many examples will be evaluated, where the data's length says so up front (for the progress bar)."""
    try:
        held = len(data[1]) if _is_pair(data) else len(data.dataset)
    except (AttributeError, TypeError):
        return n_examples
    return held if n_examples is None else min(held, n_examples)


def _is_pair(data) -> bool:
    return isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data)


def _rebatch(stream, batch_size: int, limit: Optional[int]) -> Iterator[tuple[Tensor, Tensor]]:
    """Re-chunks a stream of (x, y) batches into ``batch_size`` ones, stopping after ``limit`` examples."""
    xs, ys, held, seen = [], [], 0, 0
    for x, y in stream:
        if limit is not None:
            x, y = x[: limit - seen], y[: limit - seen]
        xs.append(x)
        ys.append(y)
        held, seen = held + len(y), seen + len(y)
        while held >= batch_size:
            x_all, y_all = torch.cat(xs), torch.cat(ys)
            yield x_all[:batch_size], y_all[:batch_size]
            xs, ys, held = [x_all[batch_size:]], [y_all[batch_size:]], held - batch_size
        if limit is not None and seen >= limit:
            break
    if held:
        yield torch.cat(xs), torch.cat(ys)


def _warn_if_shuffled(data) -> None:
    from torch.utils.data import DataLoader, RandomSampler

    if isinstance(data, DataLoader) and isinstance(data.sampler, RandomSampler):
        warnings.warn("evaluate_robustness got a shuffling DataLoader: which examples are evaluated and in which "
                      "batches changes from run to run; pass the test_dataloader (shuffle=False)")
