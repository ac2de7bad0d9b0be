"""Start ``fit`` from a local timm checkpoint (ImageNet weights, a clean model to fine-tune adversarially).

:class:`~lit_robust.models.TimmClassifier` loads ``pretrained_path`` when it is built; a recipe (a YAML config)
names the file here instead, so the config can be read, checked and instantiated where the file is not (tests,
another machine), and the weights are read once, when training starts. Same rules as
:class:`~lit_robust.callbacks.WeightsFromCheckpoint`: a resumed run (``ckpt_path``) keeps its own weights, each
callback object loads once, ``validate`` / ``test`` never load.
"""

from __future__ import annotations

from typing import Optional

import lightning.pytorch as L
from lightning.pytorch.utilities import rank_zero_info

from lit_robust.callbacks.weights_from_checkpoint import backbone


class TimmPretrainedWeights(L.Callback):
    """Loads ``pretrained_path`` into the module's ``TimmClassifier`` at the start of a new ``fit``.

    Args:
        pretrained_path: a ``.safetensors`` / ``.pth`` / ``.bin`` file (see :func:`~lit_robust.models.timm_models.
            load_pretrained`: wrappers, prefixes, a re-initialised head for another number of classes).
        checkpoint_key: the wrapper entry to take (``"state_dict_ema"`` for the EMA weights of a timm/revisiting-at
            training checkpoint); None: the first of ``state_dict``, ``model``, ``model_state_dict``,
            ``state_dict_ema``.
    """

    def __init__(self, pretrained_path: str, checkpoint_key: Optional[str] = None) -> None:
        if not isinstance(pretrained_path, str) or not pretrained_path:
            raise ValueError(f"pretrained_path must be a path, got {pretrained_path!r}")
        self.pretrained_path, self.checkpoint_key = pretrained_path, checkpoint_key
        self._loaded = False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lit_robust.models.timm_models import TimmClassifier, load_pretrained

        if self._loaded:
            return
        self._loaded = True
        if trainer.ckpt_path is not None:
            return
        model, _ = backbone(pl_module)
        if not isinstance(model, TimmClassifier):
            raise TypeError(f"TimmPretrainedWeights loads into a TimmClassifier, got {type(model).__name__}")
        load_pretrained(model.model, self.pretrained_path, self.checkpoint_key)  # in place: optimizer, DDP unchanged
        rank_zero_info(f"TimmPretrainedWeights: {model.name} starts from the weights of {self.pretrained_path}")


__all__ = ["TimmPretrainedWeights"]
