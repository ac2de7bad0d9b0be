"""Reference AutoAttack (Croce & Hein, ICML 2020) through the authors' code (PyPI ``pyautoattack``).

We call the reference implementation rather than re-implementing it, so numbers are
comparable with RobustBench: APGD-CE, APGD-T (9 targets), FAB-T (9 targets) and Square
(5000 queries), 100 iterations each, in fp32 with the model in eval mode.
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from typing import Iterator, Literal, Optional

import torch
from torch import Tensor, nn

from lit_robust.attacks.functional import check_norm
from lit_robust.attacks.pgd import module_mode
from lit_robust.evaluation.progress import progress_bar, progress_enabled, show_accuracy

_NORM_NAMES = {"linf": "Linf", "l2": "L2"}
# The reference code's debug log lines that mark its progress (pyautoattack's autoattack.py).
_RUNNING = re.compile(r"running (\S+)")
_ACCURACY = re.compile(r"(?:initial accuracy|robust accuracy after \S+): ([\d.]+)%")


def autoattack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    norm: Literal["linf", "l2"] = "linf",
    version: Literal["standard", "plus", "rand"] = "standard",
    seed: int = 0,
    batch_size: int = 500,
    progress: Optional[bool] = None,
) -> Tensor:
    """Adversarial examples from the reference AutoAttack; robust accuracy is ``model(x_adv).argmax(1) == y``.

    Runs with autocast disabled and every submodule in eval mode (each flag restored
    afterwards). Needs gradients, so call it outside ``torch.inference_mode``. The reference
    code's own sanity checks (randomised or dynamic defences, Square beating the white-box
    attacks) are logged as warnings by its ``auto-attack`` logger. ``progress``: a bar over the
    attacks with the robust accuracy so far (None: only when stderr is a terminal;
    :mod:`~lit_robust.evaluation.progress`).
    """
    from pyautoattack import AutoAttack  # imported lazily: the import is slow and only evaluation needs it

    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    adversary = AutoAttack(model, eps=float(eps), norm=_NORM_NAMES[check_norm(norm)], version=version,
                           seed=seed, device=x.device)
    with module_mode(model, "eval"), torch.autocast(x.device.type, enabled=False), \
            _reported(adversary, progress_enabled(progress)):
        x_adv, _ = adversary.run_standard_evaluation(x.detach().float(), y.detach(), batch_size=batch_size)
    return x_adv.to(x.dtype)


@contextmanager
def _reported(adversary, enabled: bool) -> Iterator[None]:
    """A bar fed by the reference code's own debug log (attack started, robust accuracy after it).

    The logger is lowered to DEBUG for the run, and a filter reads every record but passes on only
    those the logger would have passed anyway, so its handlers see exactly what they saw before.
    """
    if not enabled:
        yield
        return
    logger = adversary.logger
    passed_before = logger.getEffectiveLevel()
    bar = progress_bar(True, "autoattack", total=len(adversary.attacks_to_run), unit="attack")

    def read(record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if (running := _RUNNING.match(text)) is not None:
            bar.set_description(f"autoattack {running[1]}")
        elif (accuracy := _ACCURACY.match(text)) is not None:
            show_accuracy(bar, float(accuracy[1]) / 100)
            if text.startswith("robust"):
                bar.update()
        return record.levelno >= passed_before

    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addFilter(read)
    try:
        yield
    finally:
        logger.removeFilter(read)
        logger.setLevel(level)
        bar.close()
