"""Robust validation and test metrics for a LightningModule we did not write, under the defenses' names.

``val/robust_acc`` (PGD on the validation batches) lets ``RobustEarlyStopping`` and
``robust_checkpoint`` select on robustness (Rice et al., ICML 2020); at test the evaluation tiers
(PGD, the reference APGD and AutoAttack, per-example worst case) give ``test/robust_acc``,
``test/apgd_ce_acc``, ``test/apgd_t_acc``, ``test/autoattack_acc`` and ``test/worst_case_acc``.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Sequence

import lightning.pytorch as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

from lit_robust.attacks import PGD
from lit_robust.attacks.functional import check_norm
from lit_robust.batches import BatchKey, check_batch_key, split_batch
from lit_robust.callbacks.adversarial_training import classifier_of
from lit_robust.checks import check_batch, check_eps, inputs_checked
from lit_robust.evaluation.tiers import TIERS, attack_batch
from lit_robust.targets import require_class_labels

#: per-example correctness key (``lit_robust.evaluation.tiers``) -> logged name at test
TEST_NAMES = {"pgd": "test/robust_acc", "apgd-ce": "test/apgd_ce_acc", "apgd-t": "test/apgd_t_acc",
              "autoattack": "test/autoattack_acc", "worst_case": "test/worst_case_acc"}


class RobustEvaluation(L.Callback):
    """Adds robust accuracy to the validation and test of any LightningModule (``inference_mode=True`` too).

    Args:
        eps, norm: the threat model, in [0, 1] pixel units.
        tiers: the test-time attacks (:data:`lit_robust.evaluation.tiers.TIERS`: ``"pgd"``, ``"apgd"``,
            ``"autoattack"``); ``test/worst_case_acc`` is logged when more than one runs.
        inputs, targets: where the images and the labels are in the batches (:mod:`lit_robust.batches`).
        model: the submodule mapping [0, 1] images to logits, by attribute path; default the module's
            ``forward``.
        every_n_epochs: during ``fit``, validate robustness every n-th epoch (epochs ``n - 1``, ``2n - 1``,
            ...: give a ``robust_checkpoint`` the same ``every_n_epochs``); ``trainer.validate`` always does.
        val_steps, test_steps: PGD iterations at validation (step ``2.5 * eps / steps``, random start) and in
            the test's pgd tier, as the defenses' ``val_attack_steps`` / ``test_attack_steps``.
        autoattack_version: ``"standard"``, or ``"rand"`` for randomised models.

    Validation attacks run in fp32 (autocast off), eval mode, outside inference mode on clones of the
    batch, after the module's own ``validation_step``; the test tiers as in the defenses (fp32, eval mode,
    frozen weights, per-example worst case). Counts are kept per dataloader on the device and summed
    over DDP ranks once per epoch (exact when the split divides evenly among ranks), so the metrics are
    global; the names get Lightning's ``/dataloader_idx_N`` suffix beyond the first dataloader. The
    module's own metrics are left alone; ``val/clean_acc`` is not added (the module's own accuracy is).
    Cost: ``val_steps + 1`` forward+backward passes per validation example.
    """

    def __init__(
        self,
        eps: float,
        norm: Literal["linf", "l2"] = "linf",
        tiers: Sequence[str] = ("pgd",),
        inputs: BatchKey = 0,
        targets: BatchKey = 1,
        model: Optional[str] = None,
        every_n_epochs: int = 1,
        val_steps: int = 10,
        test_steps: int = 20,
        autoattack_version: Literal["standard", "plus", "rand"] = "standard",
    ) -> None:
        check_norm(norm)
        check_eps(eps, norm)
        tiers = (tiers,) if isinstance(tiers, str) else tuple(tiers)
        if not tiers or any(t not in TIERS for t in tiers):
            raise ValueError(f"tiers must be a non-empty selection of {TIERS}, got {tiers!r}")
        if int(every_n_epochs) != every_n_epochs or every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be an integer >= 1, got {every_n_epochs}")
        self.val_attack = PGD(eps, val_steps, norm=norm)  # validates eps and steps with named messages
        PGD(eps, test_steps, norm=norm)
        self.eps, self.norm, self.tiers = float(eps), norm, tuple(t for t in TIERS if t in tiers)
        self.inputs, self.targets = check_batch_key(inputs, "inputs"), check_batch_key(targets, "targets")
        self.model, self.every_n_epochs = model, int(every_n_epochs)
        self.test_steps, self.autoattack_version = int(test_steps), autoattack_version
        self._counts: dict[tuple[str, int], Tensor] = {}  # (logged name, dataloader) -> [correct, total]

    # --- validation --------------------------------------------------------------------------------

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self._validating(trainer):
            return
        x, y, model = self._read(pl_module, batch, batch_idx)
        with torch.inference_mode(False), torch.enable_grad(), inputs_checked(), \
                torch.autocast(x.device.type, enabled=False):
            x, y = x.clone(), y.clone()  # out of inference mode: attacks build graphs
            correct = self.val_attack.run(model, x.float(), y).predictions == y
        self._count("val/robust_acc", dataloader_idx, correct)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module)

    def _validating(self, trainer: L.Trainer) -> bool:
        fitting = trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
        return not fitting or (trainer.current_epoch + 1) % self.every_n_epochs == 0

    # --- test --------------------------------------------------------------------------------------

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y, model = self._read(pl_module, batch, batch_idx)
        with torch.inference_mode(False), torch.enable_grad():
            found = attack_batch(model, x.clone(), y.clone(), self.eps, self.norm, self.tiers, self.test_steps,
                                 autoattack_version=self.autoattack_version)
        for key, name in TEST_NAMES.items():
            if key in found and (key != "worst_case" or len(self.tiers) > 1):
                self._count(name, dataloader_idx, found[key])

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module)

    # --- plumbing ----------------------------------------------------------------------------------

    def _read(self, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> tuple[Tensor, Tensor, Any]:
        x, y = split_batch(batch, self.inputs, self.targets)
        require_class_labels(y, "RobustEvaluation (accuracy against one class)")
        model = classifier_of(pl_module, self.model)
        if batch_idx == 0:
            check_eps(self.eps, self.norm, x)
            check_batch(model, x, y)
        return x, y, model

    def _count(self, name: str, dataloader_idx: int, correct: Tensor) -> None:
        """Adds a batch's per-example correctness to the running [correct, total] (on the device, no sync)."""
        batch = torch.stack([correct.sum(), torch.ones_like(correct).sum()]).double()
        key = (name, dataloader_idx)
        self._counts[key] = batch if key not in self._counts else self._counts[key] + batch

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Logs each accuracy, summed over ranks, then starts the next epoch's counts afresh."""
        counts, self._counts = self._counts, {}
        several = len({idx for _, idx in counts}) > 1
        for (name, idx), value in sorted(counts.items()):
            correct, total = trainer.strategy.reduce(value, reduce_op="sum")
            logged = f"{name}/dataloader_idx_{idx}" if several else name
            pl_module.log(logged, correct / total.clamp_min(1), add_dataloader_idx=False, sync_dist=False)
