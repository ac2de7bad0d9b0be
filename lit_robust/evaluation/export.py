"""Export a trained classifier as plain PyTorch, for evaluation without lit_robust (RobustBench-style).

Two files, both loadable with torch alone:

* ``model_state_dict.pt``: the classifier's ``state_dict`` (keys as in the ``nn.Module`` given
  to the defense, without Lightning's ``model.`` prefix), for whoever has the architecture;
* ``model.pt2``: a ``torch.export`` program of the classifier in eval mode, normalisation
  included, with a dynamic batch dimension: ``torch.export.load(path).module()`` maps [0, 1]
  images to logits and supports input gradients, so attacks (AutoAttack) run on it directly.

A checkpoint written with the ``EMA`` callback holds the averaged weights in ``state_dict``,
so exporting it exports the EMA model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import torch
from torch import Tensor, nn

from lit_robust.attacks.pgd import module_mode

PathLike = Union[str, Path]
PREFIX = "model."


def classifier_state_dict(checkpoint_path: PathLike) -> dict[str, Tensor]:
    """The classifier's weights from a defense's Lightning checkpoint (``weights_only`` load, no lit_robust code)."""
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    state = {k[len(PREFIX):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(PREFIX)}
    if not state:
        raise ValueError(f"{checkpoint_path} holds no '{PREFIX}*' weights: not a lit_robust defense checkpoint")
    return state


def export_classifier(model: nn.Module, example: Tensor, out_dir: PathLike) -> dict[str, Path]:
    """Writes ``model_state_dict.pt`` and ``model.pt2`` for ``model`` into ``out_dir``; returns their paths.

    ``example`` is a batch of [0, 1] inputs of the right shape (its batch size is left dynamic).
    The model is traced in eval mode; its own flags are restored afterwards.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"state_dict": out / "model_state_dict.pt", "program": out / "model.pt2"}
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, paths["state_dict"])
    example = example.detach().float().cpu()
    if example.shape[0] < 2:  # torch.export specialises a batch of one
        example = example.repeat(2, *([1] * (example.dim() - 1)))
    with module_mode(model, "eval"):
        program = torch.export.export(model.cpu(), (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, paths["program"])
    return paths


def export_checkpoint(checkpoint_path: PathLike, model: nn.Module, example: Tensor, out_dir: PathLike) -> dict[str, Path]:
    """Loads a defense checkpoint's weights into ``model`` (the architecture it was trained with) and exports it."""
    model.load_state_dict(classifier_state_dict(checkpoint_path))
    return export_classifier(model, example, out_dir)


def load_exported(path: PathLike) -> nn.Module:
    """The exported classifier (``model.pt2``) as a module: [0, 1] images to logits, eval-mode behaviour fixed."""
    return torch.export.load(str(path)).module()
