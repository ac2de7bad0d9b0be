"""OAT, out-of-distribution augmented training (Lee et al., ICLR 2021), on top of PGD-AT or TRADES."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lit_robust.attacks.pgd import module_mode
from lit_robust.checks import check_inputs
from lit_robust.defenses.base import AdversarialModule, TrainingOutput
from lit_robust.defenses.pgd_at import PGDAT
from lit_robust.defenses.trades import TRADES, piecewise_by_epochs
from lit_robust.objectives import trades_loss_from_logits
from lit_robust.targets import probability_rows

__all__ = ["OATPGDAT", "OATTRADES", "OODAugmentedTraining", "oat_targets", "ood_weighted_loss"]


def oat_targets(y: Tensor, num_ood: int, num_classes: int) -> Tensor:
    """The targets of the concatenated batch ``[x; x_ood]``: ``y`` as probability rows (one-hot for class
    indices), then ``num_ood`` uniform rows ``1 / num_classes``."""
    rows = probability_rows(y, num_classes)
    return torch.cat([rows, rows.new_full((num_ood, num_classes), 1.0 / num_classes)])


def ood_weighted_loss(loss_from_logits: Callable[[Optional[Tensor], Tensor, Tensor], Tensor],
                      clean_logits: Optional[Tensor], adv_logits: Tensor, y: Tensor, ood_targets: Tensor,
                      ood_weight: float = 1.0) -> tuple[Tensor, Tensor]:
    """OAT's loss from the logits of the concatenated batch (in-distribution rows first, ``len(y)`` of them):
    ``(n * L(in) + ood_weight * m * L(ood)) / (n + m)`` with ``L = loss_from_logits(clean, adv, targets)`` a
    batch-mean loss, i.e. the batch mean over all ``n + m`` examples with the OOD ones weighted by ``ood_weight``
    (the official ``scaler``); returns it and ``L(ood)``.

    ``clean_logits`` is None for losses that use only the adversarial logits (PGD-AT).
    """
    n, m = y.shape[0], ood_targets.shape[0]

    def part(rows: slice, targets: Tensor) -> Tensor:
        return loss_from_logits(None if clean_logits is None else clean_logits[rows], adv_logits[rows], targets)

    loss_in, loss_ood = part(slice(0, n), y), part(slice(n, n + m), ood_targets)
    return (n * loss_in + ood_weight * m * loss_ood) / (n + m), loss_ood


class OODAugmentedTraining(AdversarialModule):
    """OAT: adds an out-of-distribution batch with uniform targets to the defense it is mixed into (put it
    first among the bases: ``class OATMART(OODAugmentedTraining, MART)`` with a ``loss_from_logits``).

    Lee, Park, Lee, Yi, Lee & Yoon, "Removing Undesirable Feature Contributions Using Out-of-Distribution Data",
    ICLR 2021. Official code: github.com/Saehyung-Lee/OAT (``TRADES/train_trades_cifar10.py::train_oat`` and
    ``TRADES/trades.py``: OAT + TRADES, PyTorch; ``AT/train.py``, ``AT/model.py``: OAT + PGD-AT, TensorFlow).

    Algorithm, per batch of n in-distribution images ``x`` (labels ``y``) and m OOD images ``x_ood``::

        X = [x; x_ood],  T = [onehot(y); 1/K ... 1/K]          # one batch, OOD rows uniform
        X_adv = base_attack(X, T)                              # PGD-AT: PGD on CE(f(X_adv), T), so the OOD
                                                               # examples ascend CE against the uniform target;
                                                               # TRADES: the KL attack (needs no target)
        loss = (n * L_base(in rows) + w * m * L_base(OOD rows)) / (n + m)   # w = ood_weight

    with ``L_base`` the base defense's loss from the logits of one forward of ``X`` (and ``X_adv``): BatchNorm
    sees both sources in one batch, as in the official code. For PGD-AT the OOD part is
    ``CE(f(x_ood_adv), uniform)``; for TRADES it is ``CE(f(x_ood), uniform) + beta * KL(f(x_ood) || f(x_ood_adv))``.
    With w = 1 this is the base loss on the concatenated batch, the official TRADES code exactly; the official
    PGD-AT code weights the OOD examples' CE by ``--alpha`` (its default, fixed in the last commit, 1.0).

    The OOD images come with the training batches (:class:`~lit_robust.datamodules.OODDataModule` appends them:
    last item of a tuple batch, ``"ood"`` of a dict batch); a batch without them (a plain ``(x, y)`` batch)
    trains as the base defense, with a warning once per fit. Accuracies (``train/adv_acc``) are over the
    in-distribution examples; ``train/ood_loss`` logs ``L_base`` on the OOD rows.

    Cost: the base defense's on ``n + m`` images per step (the official recipe halves the in-distribution batch
    and the epochs, so the total is that of the base run), plus, once, an eval-mode forward of one image to learn
    the number of classes (unless ``num_classes`` is given or the targets are probability rows).

    Args:
        ood_weight: ``w`` above, >= 0: the OOD examples' weight in the batch mean (official ``--alpha``, 1.0).
        ood_inputs: where the OOD images are in a training batch: ``None`` (default) where
            :class:`~lit_robust.datamodules.OODDataModule` puts them (the last item of a tuple or list of more
            than two items, key ``"ood"`` of a dict); or an index / key.
        num_classes: K; default: the model's output width.
        **kwargs: the base defense's arguments.
    """

    def __init__(self, model: nn.Module, ood_weight: float = 1.0, ood_inputs: Optional[Union[int, str]] = None,
                 num_classes: Optional[int] = None, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        if not ood_weight >= 0:
            raise ValueError(f"ood_weight must be >= 0, got {ood_weight}")
        if ood_inputs is not None and (isinstance(ood_inputs, bool) or not isinstance(ood_inputs, (int, str))):
            raise ValueError(f"ood_inputs must be None, an index (int) or a dict key (str), got {ood_inputs!r}")
        if num_classes is not None and (int(num_classes) != num_classes or num_classes < 2):
            raise ValueError(f"num_classes must be an integer >= 2 or None, got {num_classes}")
        self.ood_weight, self.ood_inputs, self.num_classes = float(ood_weight), ood_inputs, num_classes
        self._ood: Optional[Tensor] = None  # this step's OOD images
        self._in_targets: Optional[Tensor] = None  # this step's in-distribution targets, while the loss runs
        self._ood_loss: Optional[Tensor] = None
        self._warned_no_ood = False

    def loss_from_logits(self, clean_logits: Optional[Tensor], adv_logits: Tensor, y: Tensor) -> Tensor:
        """The base defense's batch-mean loss from its logits (``clean_logits`` None where it has none)."""
        raise NotImplementedError

    # --- reading the batch ------------------------------------------------------------------------

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self._ood = self.read_ood(batch)
        if self._ood is not None and batch_idx == 0:
            check_inputs(self._ood)  # floats in [0, 1], finite: one host sync per epoch, as the base's check
        try:
            return super().training_step(batch, batch_idx)
        finally:
            self._ood = None

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self._warned_no_ood = False

    def read_ood(self, batch: Any) -> Optional[Tensor]:
        """The batch's OOD images, or None where it has none (then a warning, once per fit)."""
        key = self.ood_inputs
        if isinstance(batch, Mapping):
            key = "ood" if key is None else key
            found = batch.get(key)
        elif isinstance(batch, (tuple, list)):
            key = -1 if key is None else key
            if not isinstance(key, int):
                raise ValueError(f"ood_inputs={key!r} is a key, but the batch is a {type(batch).__name__}: give an "
                                 "index (ood_inputs=-1: the last item, where OODDataModule puts the OOD images)")
            has = len(batch) > 2 if self.ood_inputs is None else -len(batch) <= key < len(batch)
            found = batch[key] if has else None
        else:
            found = getattr(batch, key, None) if isinstance(key, str) else None
        if found is None:
            if not self._warned_no_ood:
                rank_zero_warn(f"{type(self).__name__}: the training batches carry no OOD images (ood_inputs="
                               f"{self.ood_inputs!r}); training as its base defense. Wrap the DataModule in "
                               "lit_robust.datamodules.OODDataModule to give them")
                self._warned_no_ood = True
            return None
        if not isinstance(found, Tensor) or not found.is_floating_point() or found.dim() < 2:
            raise ValueError(f"the batch's OOD images (ood_inputs={key!r}) must be a float tensor [B_ood, C, H, W], "
                             f"got {getattr(found, 'dtype', type(found).__name__)} "
                             f"{tuple(getattr(found, 'shape', ()))}; set ood_inputs to where they are")
        return found

    # --- the loss -----------------------------------------------------------------------------------

    def training_loss(self, x: Tensor, y: Tensor) -> TrainingOutput:
        x_ood = self._ood
        if x_ood is None:
            return super().training_loss(x, y)
        if x_ood.shape[1:] != x.shape[1:]:
            raise ValueError(f"OOD images {tuple(x_ood.shape[1:])} do not match the in-distribution images "
                             f"{tuple(x.shape[1:])}")
        targets = oat_targets(y, x_ood.shape[0], self._classes(x_ood, y))
        self._in_targets, self._ood_loss = y, None
        try:
            out = super().training_loss(torch.cat([x, x_ood.to(x.dtype)]), targets)
        finally:
            self._in_targets = None
        self._log_mean("train/ood_loss", self._ood_loss[None])
        return out

    def outer_loss(self, x: Tensor, x_adv: Tensor, y: Tensor) -> TrainingOutput:
        out = super().outer_loss(x, x_adv, y)
        y_in = self._in_targets
        if y_in is None:  # no OOD images in this batch
            return out
        n = y_in.shape[0]
        loss, ood_loss = ood_weighted_loss(self.loss_from_logits, out.clean_logits, out.adv_logits, y_in, y[n:],
                                           self.ood_weight)
        self._ood_loss = ood_loss.detach()
        clean = None if out.clean_logits is None else out.clean_logits[:n]
        return TrainingOutput(loss, out.adv_logits[:n], clean)

    def _classes(self, x_ood: Tensor, y: Tensor) -> int:
        if self.num_classes is None:
            if y.dim() == 2:
                return y.shape[1]
            with torch.no_grad(), module_mode(self.model, "eval"):  # once; eval mode leaves BatchNorm alone
                self.num_classes = int(self.model(x_ood[:1]).shape[1])
        return self.num_classes


class OATPGDAT(OODAugmentedTraining, PGDAT):
    """OAT + PGD-AT (``AT/train.py`` of the official code, TensorFlow), on :class:`~lit_robust.defenses.PGDAT`.

    Per step: PGD (random start, K sign steps of CE against each example's target) on ``[x; x_ood]`` with
    uniform targets on the OOD half, then ``(n CE(f(x_adv), y) + w m CE(f(x_ood_adv), uniform)) / (n + m)``.

    Defaults (official ``config.json``, WRN-34-10, CIFAR-10): Linf eps 8/255, 10 steps of 2/255, random start,
    batch 128 = 64 CIFAR-10 + 64 OOD (``OODDataModule(CIFAR10DataModule(batch_size=64), ood)``), SGD lr 0.1,
    momentum 0.9, weight decay 2e-4, 80k steps with lr x0.1 at 40k and 60k (the base's schedule: x0.1 at 50%
    and 75% of the steps), ``ood_weight`` 1.0.

    Deviations: the attack runs with BatchNorm in eval mode, as :class:`~lit_robust.defenses.PGDAT` does (the
    official TF code attacks in train mode: ``attack_bn_mode="train"``); the official model standardises each
    image (``per_image_standardization``), ours normalise with fixed statistics.

    Reported (official README, CIFAR-10, WRN-34-10, PGD-10 at 8/255): PGD-AT 87.48 clean / 51.93 robust,
    OAT + PGD-AT 86.63 / 58.89 (OOD: 1M low-confidence 80M-TinyImages images).

    Cost: K + 1 forward+backward passes of the 2n-image batch per step (11 for K = 10).
    """

    def loss_from_logits(self, clean_logits: Optional[Tensor], adv_logits: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(adv_logits, y, label_smoothing=self.label_smoothing)

    def default_optimizer(self, params: Any) -> torch.optim.Optimizer:
        """SGD(lr=0.1, momentum=0.9, weight_decay=2e-4), the official ``AT/config.json``."""
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=2e-4)


class OATTRADES(OODAugmentedTraining, TRADES):
    """OAT + TRADES (``TRADES/train_trades_cifar10.py --oat`` of the official code), on
    :class:`~lit_robust.defenses.TRADES`.

    Per step: the TRADES KL attack on ``[x; x_ood]`` (eval mode, start ``x + 0.001 N(0, 1)``), then the TRADES
    loss on the concatenated batch with soft targets: ``CE(f(X), T) + beta * KL(f(X) || f(X_adv))``, batch
    means over all 2n examples (``ood_weight`` 1, the official code; other values weight the OOD examples).

    Defaults (official script with ``--oat``, WRN-34-10, CIFAR-10): eps 0.031, 10 steps of 0.007, beta 6,
    batch 64 CIFAR-10 + 64 OOD, SGD lr 0.1, momentum 0.9, weight decay 2e-4, 50 epochs (the script's 100
    halved) with lr x0.1 from epoch 37 and x0.01 from epoch 45 (counted from 1: ``epoch >= int(0.75 * 50)``,
    ``epoch >= 0.9 * 50``), expressed as fractions of the training steps (36/50 and 44/50).

    Deviations: TRADES's (one clean forward in the outer loss, clean logits computed once for the attack; see
    :class:`~lit_robust.defenses.TRADES`); the official CIFAR crop pads with zeros, lit_robust's CIFAR
    modules by reflection.

    Reported: the official README gives no TRADES number; the paper's tables (OAT + TRADES on CIFAR-10,
    WRN-34-10) were not retrieved here.

    Cost: about 12.3 forward+backward passes of the 2n-image batch per step (TRADES, K = 10).
    """

    def loss_from_logits(self, clean_logits: Optional[Tensor], adv_logits: Tensor, y: Tensor) -> Tensor:
        return trades_loss_from_logits(clean_logits, adv_logits, y, self.beta, self.label_smoothing)

    def default_lr_scheduler(self, optimizer: torch.optim.Optimizer) -> tuple[Any, str]:
        """x0.1 after 36/50 and x0.01 after 44/50 of the training steps (official OAT: epochs 37 and 45 of 50)."""
        return piecewise_by_epochs(optimizer, self.trainer.estimated_stepping_batches, [36, 44], 50), "step"
