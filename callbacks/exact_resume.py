"""Exact resume: the random-generator state that Lightning's checkpoints do not hold.

Attacks draw their random starts, and the training DataLoader its shuffling seed, from the
global generators. A run resumed from a checkpoint repeats the straight run only if those
generators continue from where they were when the checkpoint was written; Lightning restores
weights, optimizer, schedulers, loops and callback states, but not the generators.
"""

from __future__ import annotations

import random
from typing import Any, Optional

import lightning.pytorch as L
import numpy as np
import torch


class ExactResume(L.Callback):
    """Saves the generators in each checkpoint and puts them back on resume.

    Every :class:`~lit_robust.defenses.AdversarialModule` adds it (``configure_callbacks``).
    It also makes the sanity check neutral: the generators are put back after it, since the
    resumed run checks again where the straight run did not. The data loader draws its
    first shuffling seed right after the sanity check, so that is when the restored state
    must be in place.

    Under DDP only rank 0's checkpoint is written, so every rank resumes with rank 0's
    generators, as ``seed_everything`` starts them all alike. Saved: Python's, NumPy's,
    torch's CPU and the current CUDA device's generator.
    """

    def __init__(self) -> None:
        self._before_sanity_check: Optional[dict[str, Any]] = None

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._before_sanity_check = capture_rng_state()

    def on_sanity_check_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        restore_rng_state(self._before_sanity_check)

    def state_dict(self) -> dict[str, Any]:
        return capture_rng_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        restore_rng_state(state_dict)


def capture_rng_state() -> dict[str, Any]:
    """The state of Python's, NumPy's, torch's CPU and (if in use) the current CUDA device's generator."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # NumPy's key array as a tensor: checkpoints must load with torch.load(weights_only=True).
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Puts back what :func:`capture_rng_state` returned."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
