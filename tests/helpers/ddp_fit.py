"""Two-process CPU DDP run of PGDAT, driven by tests/test_ddp.py.

Usage: ``python tests/helpers/ddp_fit.py OUT_DIR [awp|callbacks]``; with ``awp`` the run adds
adversarial weight perturbation (gamma 0.01) and gradient accumulation over 2 batches; with
``callbacks`` it trains under FOSCSchedule, EpsilonSchedule and EMA, and records the attack
settings each rank used at every step. Lightning's ``ddp`` strategy re-launches
this very script (same argv, rank in the environment) for rank 1, so it must run as a
standalone program, never inside pytest.

The validation split has every odd index relabelled ``(y + 1) % 10``. With the
DistributedSampler's shuffle=False sharding (rank r gets r, r + 2, ...), rank 1 sees almost
only wrong labels, so the two ranks' local robust accuracies differ a lot and a logged value
that was not synchronised across ranks would be caught.

Each rank writes ``rank{r}.json`` (logged, global, local robust accuracy and counts) and
``rank{r}_params.pt`` (all parameters, flattened and concatenated) into OUT_DIR.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import lightning.pytorch as L
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import TensorDataset

from lit_robust.callbacks import EMA, EpsilonSchedule, FOSCSchedule
from lit_robust.datamodules import DigitsDataModule
from lit_robust.defenses.pgd_at import PGDAT
from lit_robust.models import SmallCNN

METRIC = "val/robust_acc"


class HalfMislabelledDigits(DigitsDataModule):
    """Digits whose validation labels at odd indices are shifted by one class."""

    def setup(self, stage: Optional[str] = None) -> None:
        already = bool(self.splits)
        super().setup(stage)
        if already:  # setup runs again for validate(); relabel only once
            return
        x, y = self.splits["val"].tensors
        y = y.clone()
        y[1::2] = (y[1::2] + 1) % 10
        self.splits["val"] = TensorDataset(x, y)


class CountingPGDAT(PGDAT):
    """PGDAT that also keeps this rank's own (sum of correct, count) for the robust accuracy."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.local_correct, self.local_count = 0, 0
        self.attack_settings: list[tuple] = []

    def training_step(self, batch, batch_idx):
        self.attack_settings.append((self.current_epoch, self.attack.eps, self.attack.fosc_threshold))
        return super().training_step(batch, batch_idx)

    def on_validation_epoch_start(self) -> None:
        self.local_correct, self.local_count = 0, 0

    def _log_correct(self, name: str, correct: Tensor, dataloader_idx: int = 0) -> None:
        if name == METRIC:
            self.local_correct += int(correct.sum())
            self.local_count += int(correct.numel())
        super()._log_correct(name, correct, dataloader_idx)


def main(out_dir: Path, mode: str) -> None:
    awp = mode == "awp"
    callbacks = [FOSCSchedule(c_max=0.5, dynamic_epochs=2), EpsilonSchedule(ramp_epochs=1), EMA(decay=0.9)]
    torch.set_num_threads(1)  # two ranks on a small machine
    L.seed_everything(0, workers=True)
    model = CountingPGDAT(SmallCNN(width=8), eps=0.2, steps=3, step_size=0.1, val_attack_steps=3,
                          awp_gamma=0.01 if awp else 0.0)
    data = HalfMislabelledDigits(batch_size=64, eval_batch_size=32)
    initial = torch.cat([p.detach().flatten() for p in model.parameters()]).clone()
    trainer = L.Trainer(
        accelerator="cpu",
        strategy="ddp",
        devices=2,
        # 6 steps leave robust accuracy at eps=0.2 near 0 on both ranks (gap ~0.03); 60 give ~0.42 vs 0.
        max_steps=30 if awp else 60,
        accumulate_grad_batches=2 if awp else 1,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks if mode == "callbacks" else None,
    )
    trainer.fit(model, datamodule=data)
    trainer.validate(model, datamodule=data, verbose=False)

    rank = trainer.global_rank
    logged = float(trainer.callback_metrics[METRIC])
    pair = torch.tensor([model.local_correct, model.local_count], dtype=torch.float64)
    local = float(pair[0] / pair[1])
    total = pair.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    result = {
        "rank": rank,
        "world_size": trainer.world_size,
        "logged": logged,
        "global": float(total[0] / total[1]),
        "local": local,
        "local_count": int(pair[1]),
        "global_count": int(total[1]),
    }
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    result["max_param_change"] = float((params - initial).abs().max())
    result["attack_settings"] = model.attack_settings
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result, indent=2))
    torch.save(params, out_dir / f"rank{rank}_params.pt")
    shut_down(out_dir, rank)


def shut_down(out_dir: Path, rank: int) -> None:
    """Both ranks done, then the process group torn down before the interpreter exits (left to exit-time
    destruction, gloo's threads sometimes abort the process: "terminate called without an active exception"),
    then ``rank{rank}.done``: this rank finished everything it was asked to."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    (out_dir / f"rank{rank}.done").touch()


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3) or sys.argv[2:] not in ([], ["awp"], ["callbacks"]):
        sys.exit("usage: ddp_fit.py OUT_DIR [awp|callbacks]")
    main(Path(sys.argv[1]).resolve(), mode=(sys.argv[2:] or ["plain"])[0])
