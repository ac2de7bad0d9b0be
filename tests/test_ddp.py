"""Real two-process CPU DDP (gloo): the logged robust accuracy is the global one, not rank 0's; the
ranks' weights stay identical through adversarial training; every defense synchronises gradients once
per optimizer step, like standard training, with no unused parameters.

The run lives in tests/helpers/ddp_fit.py because Lightning's ``ddp`` strategy re-launches the
calling script for rank 1; here it runs in a subprocess and we check the files it writes.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_robust.defenses import CERTIFIED_DEFENSES, DEFENSES

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "helpers" / "ddp_fit.py"
CHECKS = REPO / "tests" / "helpers" / "ddp_checks.py"


def _launch(script, out, *extra):
    env = dict(os.environ)
    for var in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
        env.pop(var, None)  # let Lightning pick a free port and launch rank 1 itself
    proc = subprocess.run(
        [sys.executable, str(script.relative_to(REPO)), str(out), *extra],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    # An abort at interpreter exit, after both ranks tore the process group down and wrote everything, is torch's
    # (gloo threads destroyed at exit), not the run's: its results stand. Any other failure fails the test.
    finished = all((out / f"rank{r}.done").exists() for r in (0, 1))
    exit_abort = finished and "terminate called without an active exception" in proc.stderr[-200:]
    assert proc.returncode == 0 or exit_abort, \
        f"DDP run failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert finished, "a rank did not finish"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def _run(out, *extra):
    ranks = _launch(SCRIPT, out, *extra)
    params = [torch.load(out / f"rank{r}_params.pt") for r in (0, 1)]
    return ranks, params


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("ddp"))


def test_ddp_with_awp_and_accumulation_keeps_ranks_identical(tmp_path):
    """Each rank perturbs weights with its own batch's gradient; the synced update keeps replicas equal."""
    ranks, params = _run(tmp_path, "awp")
    assert all(r["max_param_change"] > 1e-3 for r in ranks), ranks
    assert torch.isfinite(params[0]).all() and torch.equal(params[0], params[1])


def test_ddp_schedules_are_rank_consistent_and_ema_weights_identical(tmp_path):
    """FOSC threshold and eps ramp depend on the progress only; EMA of identical weights stays identical."""
    ranks, params = _run(tmp_path, "callbacks")
    settings = [r["attack_settings"] for r in ranks]
    assert settings[0] == settings[1] and len(settings[0]) == 60
    thresholds = sorted({(epoch, c) for epoch, _, c in settings[0]})
    assert [c for _, c in thresholds][:3] == pytest.approx([0.5, 0.25, 0.0])
    assert settings[0][0][1] == 0.0 and settings[0][-1][1] == pytest.approx(0.2)  # eps ramped over epoch 0
    assert all(r["max_param_change"] > 1e-3 for r in ranks), ranks
    assert torch.isfinite(params[0]).all() and torch.equal(params[0], params[1])


def test_ddp_logged_robust_acc_is_global_and_weights_agree(ddp_run):
    ranks, params = ddp_run
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    # Both ranks evaluated disjoint shards of the same size.
    assert ranks[0]["local_count"] == ranks[1]["local_count"] > 0
    assert all(r["global_count"] == 2 * r["local_count"] for r in ranks)

    # The check is only meaningful if the ranks disagree locally: rank 1's shard is mislabelled.
    assert abs(ranks[0]["local"] - ranks[1]["local"]) > 0.05, ranks

    for r in ranks:
        assert r["global"] == pytest.approx((ranks[0]["local"] + ranks[1]["local"]) / 2, abs=1e-12)
        assert r["logged"] == pytest.approx(r["global"], abs=1e-6), r
        assert r["logged"] != pytest.approx(r["local"], abs=1e-6), r

    # Training moved the weights (DDP kept them equal, not a no-op run) and left them finite.
    assert all(r["max_param_change"] > 1e-3 for r in ranks), ranks
    assert params[0].numel() > 0 and torch.isfinite(params[0]).all()
    assert torch.equal(params[0], params[1])


def test_every_defense_syncs_gradients_once_per_step_without_unused_parameters(tmp_path):
    """find_unused_parameters=False throughout; all-reduces per optimizer step equal standard training's;
    replicas identical after the steps (see tests/helpers/ddp_checks.py)."""
    ranks = _launch(CHECKS, tmp_path)
    expected = {*DEFENSES, "PGDAT+awp", *CERTIFIED_DEFENSES, "Foreign", "Foreign+AdversarialTraining"}
    assert ranks[0].keys() == ranks[1].keys() == expected  # every defense's run, a foreign module's two
    per_step = ranks[0]["StandardTraining"]["allreduces"] / ranks[0]["StandardTraining"]["optimizer_steps"]
    assert per_step >= 1
    for name, result in ranks[0].items():
        assert result["optimizer_steps"] >= 3, name
        assert result["allreduces"] == per_step * result["optimizer_steps"], (name, result)
        assert result["finite"] and result["checksum"] == ranks[1][name]["checksum"], name
    # ATAS's per-example state: each rank updated its own examples, the all-gather gave both ranks all updates
    state = [r["ATAS"]["state_checksum"] for r in ranks]
    assert state[0] == state[1] and state[0][1] > 0, state
    # the AdversarialTraining callback adds no collective to a module that is not ours
    assert ranks[0]["Foreign+AdversarialTraining"]["allreduces"] == ranks[0]["Foreign"]["allreduces"]


def test_eval_mode_attacks_make_no_collective_call_through_sync_batchnorm(tmp_path):
    """Why SyncBatchNorm + eval-mode attacks cannot deadlock (the mechanism; the full fit needs GPUs):
    with ranks taking 3 and 4 attack steps, no collective is called; a train-mode attack would sync."""
    proc = subprocess.run([sys.executable, "tests/helpers/syncbn_attack.py", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["recorder_sees_all_reduce"] and result["eval_modes_restored"]
        assert result["eval_collectives"] == []
        assert "SyncBatchNorm expected input tensor to be on GPU" in result["train_mode"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="SyncBatchNorm under DDP needs two GPUs (torch refuses CPU)")
def test_sync_batchnorm_with_eval_mode_attacks_on_two_gpus(tmp_path):
    ranks = _launch(CHECKS, tmp_path, "--gpus")
    assert all(result["sync_bn"] for result in ranks[0].values() if result["optimizer_steps"])
    assert all(ranks[0][n]["checksum"] == ranks[1][n]["checksum"] for n in ranks[0])
