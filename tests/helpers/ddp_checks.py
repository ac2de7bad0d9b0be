"""Two-process CPU DDP (gloo) checks for every defense, driven by tests/test_ddp.py.

Usage: ``python tests/helpers/ddp_checks.py OUT_DIR [--gpus]``. Lightning's ``ddp`` strategy re-launches this
script for rank 1, so it must run standalone, never inside pytest. For each defense it fits a few
steps with

- ``find_unused_parameters=False`` (Lightning's default): a defense whose step left a parameter
  without gradient would fail DDP's reduction check on the next step;
- a communication hook that counts DDP's gradient all-reduces, and a callback that counts optimizer
  steps: every defense must do as many all-reduces per optimizer step as standard training (one per
  bucket), i.e. neither its attack (input gradients, inner module) nor AWP's weight perturbation,
  GLS's estimators or SmoothMix's extra passes add a gradient synchronisation;
- with ``--gpus``, on two GPUs, ``sync_batchnorm=True`` with the attack in eval mode (torch refuses
  SyncBatchNorm in DDP on CPU modules, so the CPU run cannot include it).

Each rank writes ``rank{r}.json``: per defense, all-reduces per optimizer step, optimizer steps, and a
checksum of the final parameters (equal across ranks if DDP kept the replicas in sync).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as L
import torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from ddp_fit import shut_down
from foreign_module import DictDigits, ForeignClassifier
from lit_robust.attacks import PGD
from lit_robust.callbacks import AdversarialTraining
from lit_robust.datamodules import DigitsDataModule
from lit_robust.defenses import CERTIFIED_DEFENSES, DEFENSES, CertifiedTraining
from lit_robust.models import CNN3, DIGITS_MEAN, DIGITS_STD, SmallCNN

#: a module that is not ours, plain and through the AdversarialTraining callback (PGD with FOSC stopping, so
#: ranks stop examples at different steps)
FOREIGN = ("Foreign", "Foreign+AdversarialTraining")

ALLREDUCES = [0]


def counting_allreduce(state, bucket):
    ALLREDUCES[0] += 1
    return allreduce_hook(state, bucket)


class OptimizerSteps(L.Callback):
    """Counts optimizer steps, and registers the counting hook on the DDP wrapper (Lightning does so on CUDA only)."""

    def __init__(self) -> None:
        self.count = 0

    def on_fit_start(self, trainer, pl_module) -> None:
        trainer.strategy.model.register_comm_hook(None, counting_allreduce)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.count += 1


def make(name: str) -> L.LightningModule:
    if name in FOREIGN:
        return ForeignClassifier(width=4)
    if name == "PGDAT+awp":
        return DEFENSES["PGDAT"](SmallCNN(width=4), eps=0.2, steps=2, step_size=0.1, val_attack_steps=1, awp_gamma=0.01)
    if issubclass(CERTIFIED_DEFENSES.get(name, object), CertifiedTraining):  # bound propagation: a CNN3
        net = CNN3(in_channels=1, input_size=8, mean=DIGITS_MEAN, std=DIGITS_STD, bn=True)
        extra = {"estimator": "pgpe", "pairs": 2} if name == "GaussianLossSmoothing" else {}
        return CERTIFIED_DEFENSES[name](net, eps=0.1, eps_ramp_epochs=1, val_attack_steps=1, **extra)
    if name in CERTIFIED_DEFENSES:
        return CERTIFIED_DEFENSES[name](SmallCNN(width=4), sigma=0.25)
    extra = {"warmup_epochs": 0} if name == "ATAS" else {}  # its adaptive steps (and their synced state) at once
    return DEFENSES[name](SmallCNN(width=4), eps=0.2, steps=2, step_size=0.1, val_attack_steps=1, **extra)


def main(out_dir: Path, gpus: bool) -> None:
    torch.set_num_threads(1)
    results, rank = {}, 0
    for name in [*DEFENSES, "PGDAT+awp", *CERTIFIED_DEFENSES, *FOREIGN]:
        L.seed_everything(0)
        module, steps = make(name), OptimizerSteps()
        callbacks = [steps]
        if name == "Foreign+AdversarialTraining":
            callbacks.append(AdversarialTraining(PGD(0.2, 3, 0.1, fosc_threshold=0.05), inputs="image", targets="label"))
        indexed = getattr(DEFENSES.get(name), "needs_example_index", False)
        data = DictDigits(batch_size=16) if name in FOREIGN else DigitsDataModule(batch_size=16, eval_batch_size=16,
                                                                                 with_index=indexed)
        ALLREDUCES[0] = 0
        trainer = L.Trainer(accelerator="gpu" if gpus else "cpu", devices=2, sync_batchnorm=gpus,
                            strategy="ddp", max_steps=3, limit_val_batches=1, num_sanity_val_steps=0,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=callbacks)
        trainer.fit(module, datamodule=data)
        rank = trainer.global_rank
        params = torch.cat([p.detach().flatten() for p in module.parameters()])
        results[name] = {"allreduces": ALLREDUCES[0], "optimizer_steps": steps.count,
                         "sync_bn": any(isinstance(m, torch.nn.SyncBatchNorm) for m in module.modules()),
                         "checksum": float(params.double().sum()), "finite": bool(torch.isfinite(params).all())}
        if getattr(module, "delta", None) is not None:  # per-example state (ATAS): the same on every rank
            results[name]["state_checksum"] = [float(module.delta.double().sum()),
                                               float(module.grad_norm_ema.double().sum())]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results, indent=2))
    shut_down(out_dir, rank)


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3) or sys.argv[2:] not in ([], ["--gpus"]):
        sys.exit("usage: ddp_checks.py OUT_DIR [--gpus]")
    main(Path(sys.argv[1]).resolve(), gpus=sys.argv[2:] == ["--gpus"])
