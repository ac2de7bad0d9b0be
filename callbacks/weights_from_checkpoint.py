"""Start ``fit`` from another run's weights: a clean model fine-tuned adversarially, one defense continued by another.

Resuming with ``ckpt_path`` continues a run (optimizer, scheduler, loops, the same defense:
``AdversarialModule`` refuses another defense's checkpoint for ``fit``). Starting a *new* run from
a checkpoint's weights is this callback: the backbone's weights only, before the optimizer exists,
so the new run has its own optimizer, schedule and step count. It is what the clean-then-adversarial
experiment of Allen-Zhu & Li (Feature Purification, FOCS 2021) needs: adversarial training that
starts from the clean model (``configs/feature_purification_digits.yaml``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lit_robust.checkpoints import check_checkpoint_file

PathLike = Union[str, Path]
PREFIX = "model."  #: where an ``AdversarialModule`` keeps its backbone in ``state_dict``


def backbone(pl_module: nn.Module) -> tuple[nn.Module, str]:
    """The classifier inside a LightningModule and its ``state_dict`` prefix: ``pl_module.model`` and ``"model."``
    for every ``AdversarialModule``, else the module itself and ``""``."""
    model = getattr(pl_module, "model", None)
    return (model, PREFIX) if isinstance(model, nn.Module) else (pl_module, "")


def read_checkpoint(path: PathLike) -> dict[str, Any]:
    """A checkpoint file as a dict (``torch.load`` with ``weights_only=True`` on the CPU); a missing, empty,
    truncated or foreign file raises an error naming it (:func:`lit_robust.checkpoints.check_checkpoint_file`)."""
    loaded = torch.load(check_checkpoint_file(path), map_location="cpu", weights_only=True)
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} holds a {type(loaded).__name__}, not a checkpoint or a state dict")
    return loaded


def checkpoint_weights(source: Union[PathLike, dict[str, Any]], prefix: str = PREFIX) -> dict[str, Tensor]:
    """The classifier's weights from ``source``: a file or an already loaded dict.

    A Lightning checkpoint (a dict with ``state_dict``) gives its entries under ``prefix``, with the prefix
    removed (``""`` keeps them all); a plain state dict (``model_state_dict.pt`` of
    :func:`lit_robust.evaluation.export.export_classifier`, ``torch.save(model.state_dict())``) is taken as it is.
    """
    checkpoint = read_checkpoint(source) if isinstance(source, (str, Path)) else source
    name = source if isinstance(source, (str, Path)) else "the checkpoint"
    state = checkpoint.get("state_dict")
    if isinstance(state, dict):
        weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not weights:
            raise ValueError(f"{name} holds no '{prefix}*' weights in its state_dict")
        return weights
    if checkpoint and all(isinstance(v, Tensor) for v in checkpoint.values()):
        return dict(checkpoint)
    raise ValueError(f"{name} is neither a Lightning checkpoint (no 'state_dict') nor a state dict of tensors")


class WeightsFromCheckpoint(Callback):
    """Loads the backbone's weights from a checkpoint when ``fit`` starts a new run.

    At the start of fit (``on_fit_start``, before the first step and before the module's own ``on_fit_start``)
    the weights of ``checkpoint`` (:func:`checkpoint_weights`: a lit_robust / Lightning checkpoint's ``model.*``
    entries, or a plain state dict) are copied into ``pl_module.model`` (the whole module when it has no ``model``)
    in place, on every rank, so the optimizer and a DDP wrapper keep the same parameters and all ranks hold the
    same weights. BatchNorm running statistics are buffers of the backbone and come along. A checkpoint written
    with the ``EMA`` callback holds the averaged weights in ``state_dict``: those are loaded.

    Resuming (``fit(..., ckpt_path=...)``) does not read ``checkpoint``: the resumed checkpoint's weights are the
    run's. Each callback object loads once: a second ``fit`` of the same Trainer continues from the weights it has,
    and ``validate`` / ``test`` never load. Callbacks that keep the weights at the start of fit
    (``FeaturePurificationProbe``) take them when training starts, after this load.

    Args:
        checkpoint: path of the checkpoint (or state dict file) to start from.
        strict: ``load_state_dict``'s ``strict``: every backbone weight must be in the file and nothing else.
    """

    def __init__(self, checkpoint: str, strict: bool = True) -> None:
        if not isinstance(checkpoint, (str, Path)) or not str(checkpoint):
            raise ValueError(f"checkpoint must be a path, got {checkpoint!r}")
        self.checkpoint, self.strict = str(checkpoint), strict
        self._loaded = False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._loaded:
            return
        self._loaded = True
        if trainer.ckpt_path is not None:  # resuming: Lightning has restored (or will restore) that checkpoint
            return
        model, prefix = backbone(pl_module)
        with torch.no_grad():
            result = model.load_state_dict(checkpoint_weights(self.checkpoint, prefix), strict=self.strict)
        skipped = [*result.missing_keys, *result.unexpected_keys]
        rank_zero_info(f"WeightsFromCheckpoint: {type(model).__name__} starts from the weights of {self.checkpoint}"
                       + (f" (not matched: {', '.join(skipped)})" if skipped else ""))
