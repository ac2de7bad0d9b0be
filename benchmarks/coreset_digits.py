"""Adversarial coreset selection on digits: full-data PGD-AT vs the same PGD-AT on a CRAIG coreset.

Same defense, model, seed and epochs; counts optimizer steps and example forward+backward passes
(training: (K + 1) per example, K attack steps + the update; selection: K + 1 per pool example),
wall time (CPU, possibly shared: a rough figure), clean and PGD-20 test accuracy.
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/coreset_digits.py
"""

import json
import time
from pathlib import Path

import lightning.pytorch as L
import torch

from lit_robust.attacks import PGD
from lit_robust.callbacks.coreset import AdversarialCoresetSelection
from lit_robust.datamodules import DigitsDataModule
from lit_robust.defenses import PGDAT
from lit_robust.models import SmallCNN

EPS, STEPS, EPOCHS = 0.2, 5, 30


class CountingPGDAT(PGDAT):
    examples = 0

    def training_step(self, batch, batch_idx):
        self.examples += batch[0].shape[0]
        return super().training_step(batch, batch_idx)


def run(coreset: bool) -> dict:
    L.seed_everything(0)
    module = CountingPGDAT(SmallCNN(width=16), eps=EPS, steps=STEPS, step_size=EPS / 4,
                           optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4))
    cb = [AdversarialCoresetSelection(fraction=0.5, every_n_epochs=5, warmup_fraction=0.5)] if coreset else []
    dm = DigitsDataModule(batch_size=32)
    trainer = L.Trainer(accelerator="cpu", max_epochs=EPOCHS, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=cb)
    start = time.perf_counter()
    trainer.fit(module, dm)
    wall = time.perf_counter() - start
    x, y = dm.splits["test"].tensors
    model = module.model.eval()
    torch.manual_seed(0)
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    pgd = (PGD(EPS, steps=20, restarts=2).run(model, x, y).predictions == y).float().mean().item()
    selection = cb[0].selection_examples if coreset else 0
    return {"optimizer_steps": trainer.global_step, "train_examples": module.examples,
            "selection_examples": selection, "selections": cb[0].selections if coreset else 0,
            "fb_passes": (module.examples + selection) * (STEPS + 1), "wall_s": round(wall, 2),
            "clean_acc": round(clean, 4), "pgd20_acc": round(pgd, 4)}


if __name__ == "__main__":
    torch.set_num_threads(1)
    full, core = run(False), run(True)
    out = {"device": "cpu (2 cores shared with other jobs: wall time is rough)",
           "setup": f"digits, SmallCNN(width=16), PGD-AT Linf {EPS} {STEPS} steps, {EPOCHS} epochs, batch 32; "
                    "coreset: CRAIG c=0.5, R=5, kappa=0.5 (T_w=round(0.5*int(0.5*30))=8)",
           "full": full, "coreset": core,
           "speedup_fb": round(full["fb_passes"] / core["fb_passes"], 3),
           "speedup_steps": round(full["optimizer_steps"] / core["optimizer_steps"], 3),
           "speedup_wall": round(full["wall_s"] / core["wall_s"], 3)}
    path = Path(__file__).parent / "results" / "cpu_coreset_digits.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
