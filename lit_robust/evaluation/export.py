"""Export a trained classifier as plain PyTorch, for evaluation without lit_robust (RobustBench-style).

Two files, both loadable with torch alone:

* ``model_state_dict.pt``: the classifier's ``state_dict`` (keys as in the ``nn.Module`` given
  to the defense, without Lightning's ``model.`` prefix), for whoever has the architecture;
* ``model.pt2``: a ``torch.export`` program of the classifier in eval mode, normalisation
  included, with a dynamic batch dimension: ``torch.export.load(path).module()`` maps [0, 1]
  images to logits and supports input gradients, so attacks (AutoAttack) run on it directly.
  That module refuses ``.eval()`` and ``.train()`` (torch raises ``NotImplementedError``);
  :func:`load_exported` gives one that accepts both.

A checkpoint written with the ``EMA`` callback holds the averaged weights in ``state_dict``,
so exporting it exports the EMA model.
"""

from __future__ import annotations

import copy
import types
from pathlib import Path
from typing import Union

import torch
from torch import Tensor, nn

from lit_robust.checkpoints import check_checkpoint_file

PathLike = Union[str, Path]
PREFIX = "model."


def classifier_state_dict(checkpoint_path: PathLike) -> dict[str, Tensor]:
    """The classifier's weights from a defense's Lightning checkpoint (``weights_only`` load, no lit_robust code).

    A missing, empty, truncated or foreign file raises an error naming it (:func:`check_checkpoint_file`).
    """
    checkpoint = torch.load(check_checkpoint_file(checkpoint_path), map_location="cpu", weights_only=True)
    state = {k[len(PREFIX):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(PREFIX)}
    if not state:
        raise ValueError(f"{checkpoint_path} holds no '{PREFIX}*' weights: not a lit_robust defense checkpoint")
    return state


def export_classifier(model: nn.Module, example: Tensor, out_dir: PathLike) -> dict[str, Path]:
    """Writes ``model_state_dict.pt`` and ``model.pt2`` for ``model`` into ``out_dir``; returns their paths.

    ``example`` is a batch of [0, 1] inputs of the right shape (its batch size is left dynamic).
    An eval-mode copy on the CPU is traced, so ``model`` keeps its device, parameters and flags.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"state_dict": out / "model_state_dict.pt", "program": out / "model.pt2"}
    cpu_copy = copy.deepcopy(model).cpu().eval()
    torch.save(cpu_copy.state_dict(), paths["state_dict"])
    example = example.detach().float().cpu()
    if example.shape[0] < 2:  # torch.export specialises a batch of one
        example = example.repeat(2, *([1] * (example.dim() - 1)))
    program = torch.export.export(cpu_copy, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, paths["program"])
    return paths


def export_checkpoint(checkpoint_path: PathLike, model: nn.Module, example: Tensor, out_dir: PathLike) -> dict[str, Path]:
    """Loads a defense checkpoint's weights into ``model`` (the architecture it was trained with) and exports it."""
    model.load_state_dict(classifier_state_dict(checkpoint_path))
    return export_classifier(model, example, out_dir)


def load_exported(path: PathLike) -> nn.Module:
    """The exported classifier (``model.pt2``) as a module: [0, 1] images to logits, eval-mode behaviour fixed.

    ``ExportedProgram.module()`` makes ``.eval()`` and ``.train()`` raise, which breaks attack and
    evaluation code that sets (and restores) the mode. Here they are ``nn.Module``'s own, which only
    set the ``training`` flags: the traced graph computes eval mode (BatchNorm running statistics,
    no dropout) whatever the flag says. Fine-tune from ``model_state_dict.pt`` instead.
    """
    module = torch.export.load(str(path)).module()
    module.train = types.MethodType(nn.Module.train, module)
    module.eval = types.MethodType(nn.Module.eval, module)
    return module
