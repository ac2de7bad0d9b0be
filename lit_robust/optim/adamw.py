"""AdamW without weight decay on norms and biases, the optimizer of the ImageNet ViT/ConvNeXt recipes.

:class:`AdamWNoNormBiasDecay`: AdamW whose weight decay skips every tensor with ``ndim <= 1`` (norm scales and
  offsets, biases, ConvNeXt's layer scales, ...), the rule of Singh, Croce & Hein's code
  (github.com/nmndeep/revisiting-at ``main.py`` ``create_optimizer``: ``param.ndim <= 1 or
  name.endswith(".bias")``, used for ViTs; for ConvNeXts it excludes names containing ``"bn"`` or ``".bias"``,
  so LayerNorm scales and layer-scale ``gamma`` are decayed there, not here) and of timm's
  ``param_groups_weight_decay``.
"""

from __future__ import annotations

import torch

from lit_robust.optim.param_groups import Params, split_weight_decay


class AdamWNoNormBiasDecay(torch.optim.AdamW):
    """``torch.optim.AdamW`` with ``weight_decay=0`` for tensors of ``ndim <= 1`` (:func:`split_weight_decay`).

    In a config (the defense's ``optimizer``)::

        optimizer:
          class_path: lit_robust.optim.adamw.AdamWNoNormBiasDecay
          init_args: {lr: 1.0e-3, betas: [0.9, 0.95], weight_decay: 0.05}
    """

    def __init__(self, params: Params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.05) -> None:
        super().__init__(split_weight_decay(params), lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


__all__ = ["AdamWNoNormBiasDecay"]
