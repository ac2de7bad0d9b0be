"""Reference AutoAttack (Croce & Hein, ICML 2020) through the authors' code (PyPI ``pyautoattack``).

We call the reference implementation rather than re-implementing it, so numbers are
comparable with RobustBench: APGD-CE, APGD-T (9 targets), FAB-T (9 targets) and Square
(5000 queries), 100 iterations each, in fp32 with the model in eval mode.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from lit_robust.attacks.functional import check_norm
from lit_robust.attacks.pgd import module_mode

_NORM_NAMES = {"linf": "Linf", "l2": "L2"}


def autoattack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    norm: Literal["linf", "l2"] = "linf",
    version: Literal["standard", "plus", "rand"] = "standard",
    seed: int = 0,
    batch_size: int = 500,
) -> Tensor:
    """Adversarial examples from the reference AutoAttack; robust accuracy is ``model(x_adv).argmax(1) == y``.

    Runs with autocast disabled and every submodule in eval mode (each flag restored
    afterwards). Needs gradients, so call it outside ``torch.inference_mode``. The reference
    code's own sanity checks (randomised or dynamic defences, Square beating the white-box
    attacks) are logged as warnings by its ``auto-attack`` logger.
    """
    from pyautoattack import AutoAttack  # imported lazily: the import is slow and only evaluation needs it

    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    adversary = AutoAttack(model, eps=float(eps), norm=_NORM_NAMES[check_norm(norm)], version=version,
                           seed=seed, device=x.device)
    with module_mode(model, "eval"), torch.autocast(x.device.type, enabled=False):
        x_adv, _ = adversary.run_standard_evaluation(x.detach().float(), y.detach(), batch_size=batch_size)
    return x_adv.to(x.dtype)
