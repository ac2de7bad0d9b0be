"""Where the images and the labels are in a batch: one reader for the defenses, the callbacks and the evaluation.

A batch is a tuple or list (``(x, y, *extra)``: the images at index 0 and the labels at 1 by
default), a dict (``{"image": x, "label": y, ...}``: name the keys) or a dataclass (name the fields). ``inputs`` and
``targets`` are each an index, a key, or a callable ``batch -> Tensor`` for anything else
(a dataclass, a nested structure).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable, Union

from torch import Tensor

BatchKey = Union[int, str, Callable[[Any], Tensor]]


def check_batch_key(key: BatchKey, name: str) -> BatchKey:
    """``key`` if it is an index, a dict key or a callable, else a ``ValueError`` naming the argument."""
    if isinstance(key, bool) or not (isinstance(key, (int, str)) or callable(key)):
        raise ValueError(f"{name} must be an index (int), a dict key (str) or a callable batch -> Tensor, got {key!r}")
    return key


def batch_part(batch: Any, key: BatchKey, name: str = "inputs") -> Tensor:
    """The tensor at ``key`` in ``batch``; a ``ValueError`` saying what was expected when it is not there."""
    if callable(key):
        part = key(batch)
    elif dataclasses.is_dataclass(batch) and not isinstance(batch, type) and isinstance(key, str):
        if not hasattr(batch, key):
            raise ValueError(f"{name}={key!r} is not a field of the {type(batch).__name__} batch")
        part = getattr(batch, key)
    elif isinstance(batch, Mapping):
        if key not in batch:
            raise ValueError(f"{name}={key!r} is not a key of the batch, whose keys are {sorted(map(str, batch))}; "
                             f"name the batch's {_ROLE[name]} key with {name}=")
        part = batch[key]
    elif isinstance(batch, (tuple, list)):
        if not isinstance(key, int):
            raise ValueError(f"{name}={key!r} is a key, but the batch is a {type(batch).__name__} of {len(batch)} "
                             f"items: give an index ({name}=0, 1, ...)")
        if not -len(batch) <= key < len(batch):
            raise ValueError(f"{name}={key} is out of range for a batch of {len(batch)} items; a batch is "
                             "(images, labels, ...) by default, or a dict with inputs= and targets= naming the keys")
        part = batch[key]
    else:
        raise ValueError(f"a batch must be a tuple or list (images, labels, ...) or a dict, got "
                         f"{type(batch).__name__}; pass inputs= and targets= as callables to read other batches")
    if not isinstance(part, Tensor):
        raise ValueError(f"the batch's {_ROLE[name]} ({name}={key!r}) must be a Tensor, got {type(part).__name__}")
    return part


def split_batch(batch: Any, inputs: BatchKey = 0, targets: BatchKey = 1) -> tuple[Tensor, Tensor]:
    """``(x, y)``: the images and the labels of ``batch``."""
    return batch_part(batch, inputs, "inputs"), batch_part(batch, targets, "targets")


def replace_part(batch: Any, key: BatchKey, value: Tensor, name: str = "inputs") -> Any:
    """A copy of ``batch`` with ``value`` at ``key`` (the container is new, the other items are shared).

    For a tuple, a list, a dict or a dataclass (``key`` a field name); a callable ``key`` only reads, so it
    cannot say where to write: then a ``ValueError``.
    """
    if callable(key):
        raise ValueError(f"{name} must be an index or a key here (the batch is rewritten); a callable only reads it")
    batch_part(batch, key, name)  # the same checks and messages as reading
    if isinstance(batch, Mapping):
        return {**batch, key: value}
    if isinstance(batch, list):
        return [value if i == key % len(batch) else item for i, item in enumerate(batch)]
    if isinstance(batch, tuple):
        items = [value if i == key % len(batch) else item for i, item in enumerate(batch)]
        return type(batch)(*items) if hasattr(batch, "_fields") else tuple(items)  # namedtuples too
    return dataclasses.replace(batch, **{key: value})


def module_batch(pl_module: Any, batch: Any) -> tuple[Tensor, Tensor]:
    """``(x, y)`` of a batch of ``pl_module``'s, read with its ``batch_keys`` (a defense's ``inputs`` and
    ``targets``; ``(0, 1)`` for a module without them): how callbacks read the batches they see."""
    return split_batch(batch, *getattr(pl_module, "batch_keys", (0, 1)))


_ROLE = {"inputs": "images", "targets": "labels"}
