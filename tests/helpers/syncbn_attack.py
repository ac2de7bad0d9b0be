"""Two gloo processes, a SyncBatchNorm network in train mode: which attacks would communicate?

Usage: ``python tests/helpers/syncbn_attack.py OUT_DIR``, driven by tests/test_ddp.py. torch refuses
SyncBatchNorm under DDP with CPU modules, so a CPU test cannot run the full Lightning fit (that test
needs two GPUs); this one checks the mechanism instead. Each rank runs PGD with ``bn_mode="eval"`` and
``bn_mode="train"`` on a SyncBatchNorm-converted network while recording every ``torch.distributed``
collective. In eval mode SyncBatchNorm never synchronises, so the attack makes no collective call and
ranks may take different numbers of steps without deadlock. In train mode every forward asks to
synchronise: on CPU torch raises "SyncBatchNorm expected input tensor to be on GPU", the call a GPU
run would make. Each rank writes ``rank{r}.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lit_robust.attacks import PGD
from lit_robust.models import SmallCNN

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter_tensor")


def run(rank: int, out_dir: Path, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    calls = []
    for name in COLLECTIVES:
        original = getattr(dist, name)
        setattr(dist, name, lambda *a, _f=original, _n=name, **k: (calls.append(_n), _f(*a, **k))[1])
    torch.manual_seed(rank)
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(SmallCNN(width=4)).train()
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    steps = 3 + rank  # ranks take different numbers of attack steps
    PGD(0.2, steps=steps, step_size=0.1, bn_mode="eval")(model, x, y)
    result = {"eval_collectives": list(calls), "eval_modes_restored": all(m.training for m in model.modules())}
    dist.all_reduce(torch.zeros(1))  # the recorder's own check: a real collective is seen
    result["recorder_sees_all_reduce"] = calls == ["all_reduce"]
    try:
        PGD(0.2, steps=steps, step_size=0.1, bn_mode="train")(model, x, y)
        result["train_mode"] = "ran"
    except ValueError as error:
        result["train_mode"] = str(error)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: syncbn_attack.py OUT_DIR")
    out = Path(sys.argv[1]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    mp.spawn(run, args=(out, str(out / "init")), nprocs=2)
