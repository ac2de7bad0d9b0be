"""Weight decay on weights only: the optimizer of the generated-data recipes (Gowal, Rebuffi, Wang et al.).

Which parameters the official codes decay (5e-4, coupled L2, SGD Nesterov momentum 0.9):

* DeepMind (``adversarial_robustness/jax/utils.py`` ``weight_decay``, added to the loss as
  ``5e-4 * 0.5 * sum w**2``): Haiku parameter names matching ``.*w$`` or ``.*b$`` and not
  ``.*batchnorm.*``, i.e. every convolution kernel, the classifier's weight and its bias;
  BatchNorm scales and offsets (Haiku's ``scale`` / ``offset``) are not decayed. The gradient of
  that term is ``5e-4 * w``, the same update as torch SGD's ``weight_decay=5e-4``; optax's
  ``trace(nesterov=True)`` is torch's Nesterov SGD with ``dampening=0``.
* DM-Improves-AT (``gowal21uncovering/utils/watrain.py`` ``init_optimizer``): two groups,
  parameters whose name contains ``"batchnorm"`` without decay, every other one (convolutions,
  ``logits.weight``, ``logits.bias``) with it.

Both therefore exempt exactly the BatchNorm scales and offsets. The optimizers here receive
parameters without names (the defenses call ``optimizer(self.model.parameters())``, LightningCLI's
``OptimizerCallable`` convention), so they exempt by shape: tensors with ``ndim <= 1`` (norm scales
and offsets of any normalisation layer, and every bias) get no decay, tensors with ``ndim >= 2``
(convolution kernels, linear weights) do. On the Swish WideResNets this differs from both
official codes by the classifier bias only (``num_classes`` values, decayed there, not here).
:func:`decay_groups_by_name` reproduces the official rule exactly where names are at hand.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence, Union

import torch
from torch import Tensor

Params = Union[Iterable[Tensor], Iterable[dict[str, Any]]]


def split_weight_decay(params: Params) -> list[dict[str, Any]]:
    """Parameter groups with ``weight_decay=0`` for every tensor of ``ndim <= 1``.

    ``params`` is what an optimizer takes: tensors, or groups (dicts with ``"params"``). Each input
    group becomes up to two: its ``ndim >= 2`` tensors with the group's own options (decayed by the
    optimizer's or the group's ``weight_decay``), then its ``ndim <= 1`` tensors with the same
    options and ``weight_decay=0``. Empty groups are left out. Works with any torch optimizer.
    """
    items = list(params)
    groups = [{"params": items}] if not items or not isinstance(items[0], dict) else items
    out: list[dict[str, Any]] = []
    for group in groups:
        tensors = group["params"]
        tensors = [tensors] if isinstance(tensors, Tensor) else list(tensors)
        decayed = [p for p in tensors if p.ndim > 1]
        exempt = [p for p in tensors if p.ndim <= 1]
        if decayed:
            out.append({**group, "params": decayed})
        if exempt:
            out.append({**group, "params": exempt, "weight_decay": 0.0})
    if not out:
        raise ValueError("params is empty: the optimizer got no parameters")
    return out


def decay_groups_by_name(named_parameters: Iterable[tuple[str, Tensor]],
                         exclude: Sequence[str] = ("batchnorm",)) -> list[dict[str, Any]]:
    """The official rule: no decay for parameters whose name contains any of ``exclude``.

    ``("batchnorm",)`` with :class:`~lit_robust.models.SwishWideResNet`'s names is DM-Improves-AT's
    ``group_weight`` (and, in effect, DeepMind's ``weight_decay``). Returns ``[decayed, exempt]``
    groups for any optimizer, e.g. in Python::

        optimizer=lambda params: torch.optim.SGD(decay_groups_by_name(model.named_parameters()),
                                                 lr=0.4, momentum=0.9, nesterov=True, weight_decay=5e-4)
    """
    decayed, exempt = [], []
    for name, p in named_parameters:
        (exempt if any(word in name for word in exclude) else decayed).append(p)
    return [g for g in ({"params": decayed}, {"params": exempt, "weight_decay": 0.0}) if g["params"]]


class SGDNoNormBiasDecay(torch.optim.SGD):
    """SGD (Nesterov momentum 0.9 by default) whose weight decay skips norm scales/offsets and biases.

    The parameters are split by :func:`split_weight_decay` (``ndim <= 1``: no decay); see the module
    docstring for how this compares with the official codes (only the classifier bias differs).
    ``param_groups[0]`` holds the decayed tensors and ``param_groups[1]`` the exempt ones (for each
    group given, in order). Schedulers act on every group alike.

    In a config (the defense's ``optimizer``)::

        optimizer:
          class_path: lit_robust.optim.SGDNoNormBiasDecay
          init_args: {lr: 0.4, momentum: 0.9, nesterov: true, weight_decay: 5.0e-4}

    Args as :class:`torch.optim.SGD`; defaults are the recipes' momentum 0.9, Nesterov, 5e-4.
    """

    def __init__(
        self,
        params: Params,
        lr: float = 0.1,
        momentum: float = 0.9,
        dampening: float = 0.0,
        weight_decay: float = 5e-4,
        nesterov: bool = True,
        foreach: Optional[bool] = None,
    ) -> None:
        super().__init__(split_weight_decay(params), lr=lr, momentum=momentum, dampening=dampening,
                         weight_decay=weight_decay, nesterov=nesterov, foreach=foreach)


__all__ = ["SGDNoNormBiasDecay", "decay_groups_by_name", "split_weight_decay"]
