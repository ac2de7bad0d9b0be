"""FeaturePurificationProbe and WeightsFromCheckpoint: the statistics against hand-computed values, what a real
fit logs, no per-step host sync, exact resume, references and initializations read from checkpoints, rank 0 only."""

import math

import lightning.pytorch as L
import pytest
import torch
from digits_bench import EPS, quiet_trainer, sgd
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import IMAGES, SCALARS, EventAccumulator
from test_host_sync import _loop_syncs

from lit_robust.callbacks import FeaturePurificationProbe, WeightsFromCheckpoint
from lit_robust.callbacks.feature_purification import (decompose, filter_grid, neuron_statistics, purification_metrics,
                                                       update_statistics)
from lit_robust.defenses import PGDAT, StandardTraining
from lit_robust.models import SmallCNN

SQRT2, SQRT5, SQRT10 = math.sqrt(2), math.sqrt(5), math.sqrt(10)
LAYERS = ["features.0", "features.3", "features.7", "features.10", "head.1", "head.3"]  # SmallCNN's conv/linear
STATS = ["cos_init", "cos_ref", "feature_share", "residual_ratio", "stable_rank", "energy_top1", "energy_top5",
         "update_norm"]

# Three neurons, reference_i = beta_i w_i + v_i by hand:
#   w = (1,0,0), ref = (2,1,0): beta 2,   v = (0,1,0), ||beta w|| 2, ||v|| 1, ratio 1/2  (feature dominates)
#   w = (0,2,0), ref = (0,1,1): beta 1/2, v = (0,0,1), ||beta w|| 1, ||v|| 1, ratio 1    (a tie: not ">")
#   w = (0,0,1), ref = (3,0,1): beta 1,   v = (3,0,0), ||beta w|| 1, ||v|| 3, ratio 3    (remainder dominates)
W = torch.tensor([[1.0, 0, 0], [0, 2, 0], [0, 0, 1]])
REF = torch.tensor([[2.0, 1, 0], [0, 1, 1], [3, 0, 1]])
INIT = torch.tensor([[1.0, 1, 0], [0, 3, 0], [0, 0, -2]])  # cosines with W: 1/sqrt(2), 1, -1


def test_decomposition_by_hand():
    beta, v = decompose(REF, W)
    assert beta.tolist() == [2.0, 0.5, 1.0]
    assert v.tolist() == [[0, 1, 0], [0, 0, 1], [3, 0, 0]]
    n = neuron_statistics(W, INIT, REF)
    assert n["feature"].tolist() == [2, 1, 1] and n["residual"].tolist() == [1, 1, 3]
    assert n["ratio"].tolist() == [0.5, 1, 3]
    assert n["cos_init"].tolist() == pytest.approx([1 / SQRT2, 1, -1])
    assert n["cos_ref"].tolist() == pytest.approx([2 / SQRT5, 1 / SQRT2, 1 / SQRT10])
    # a 4-D (conv) weight is read as [out, fan_in] rows
    assert torch.equal(decompose(REF.view(3, 1, 3, 1), W.view(3, 3, 1, 1))[0], beta)


def test_layer_statistics_by_hand():
    m = purification_metrics({"conv": W}, {"conv": INIT}, {"conv": REF}, top_r=(1, 5))
    assert m["purification/conv/cos_init"] == pytest.approx((1 / SQRT2 + 1 - 1) / 3)
    assert m["purification/conv/cos_ref"] == pytest.approx((2 / SQRT5 + 1 / SQRT2 + 1 / SQRT10) / 3)
    assert m["purification/conv/feature_share"] == pytest.approx(1 / 3)  # the tie does not count
    assert m["purification/conv/residual_ratio"] == 1.0  # median of 1/2, 1, 3
    assert set(m) == {f"purification/{layer}/{s}" for layer in ("conv", "all") for s in STATS}


def test_update_statistics_by_hand():
    """dW = [[3,0,0],[0,4,0]]: singular values 4 and 3, ||dW||_F^2 = 25, ||W_ref||_F = sqrt(5)."""
    ref = torch.tensor([[1.0, 0, 0], [0, 0, 2]])
    stats = update_statistics(ref + torch.tensor([[3.0, 0, 0], [0, 4, 0]]), ref, top_r=(1, 2, 5))
    assert stats == pytest.approx({"stable_rank": 25 / 16, "energy_top1": 16 / 25, "energy_top2": 1.0,
                                   "energy_top5": 1.0, "update_norm": 5 / SQRT5})
    rank_one = torch.outer(torch.tensor([1.0, -2.0, 0.5]), torch.tensor([3.0, 1.0, 0.0, 2.0]))  # u v^T
    ref = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    stats = update_statistics(ref + rank_one, ref, top_r=(1,))
    assert stats["stable_rank"] == pytest.approx(1.0) and stats["energy_top1"] == pytest.approx(1.0)
    # the tall case (out > fan_in) takes the other Gram matrix: same values as the transpose
    tall = update_statistics((ref + rank_one).T.contiguous(), ref.T.contiguous(), top_r=(1,))
    assert tall == pytest.approx(stats)


def test_network_summary_pools_neurons_and_averages_layers():
    """Layer a: the three neurons above; layer b: the update [[3,0,0],[0,4,0]] of test_update_statistics_by_hand,
    its initialization its reference. Neurons are pooled (5 of them), update statistics averaged over layers."""
    ref_b = torch.tensor([[1.0, 0, 0], [0, 0, 2]])
    w_b = ref_b + torch.tensor([[3.0, 0, 0], [0, 4, 0]])  # rows (4,0,0) and (0,4,2)
    m = purification_metrics({"a": W, "b": w_b}, {"a": INIT, "b": ref_b}, {"a": REF, "b": ref_b}, top_r=(1,),
                             per_layer=False)
    # b's rows: ref (1,0,0) on w (4,0,0): beta 1/4, v 0 (ratio 0, dominant, cos 1);
    # ref (0,0,2) on w (0,4,2): beta 4/20, ||beta w|| = 0.2 sqrt(20), v = (0,-0.8,1.6), ||v|| = 0.8 sqrt(5)
    ratio_b = 0.8 * SQRT5 / (0.2 * math.sqrt(20))  # = 2
    cos_b = [1.0, 2 / math.sqrt(20)]
    assert m["purification/all/cos_init"] == pytest.approx((1 / SQRT2 + 1 - 1 + sum(cos_b)) / 5)
    assert m["purification/all/cos_ref"] == pytest.approx((2 / SQRT5 + 1 / SQRT2 + 1 / SQRT10 + sum(cos_b)) / 5)
    assert m["purification/all/feature_share"] == pytest.approx(2 / 5)
    assert m["purification/all/residual_ratio"] == pytest.approx(1.0)  # median of 0, 1/2, 1, 2, 3
    assert ratio_b == pytest.approx(2.0)
    stats_a = update_statistics(W, REF, (1,))
    assert m["purification/all/stable_rank"] == pytest.approx((stats_a["stable_rank"] + 25 / 16) / 2)
    assert m["purification/all/energy_top1"] == pytest.approx((stats_a["energy_top1"] + 16 / 25) / 2)
    dw_a_sq, ref_a_sq = float((W - REF).square().sum()), float(REF.square().sum())
    assert m["purification/all/update_norm"] == pytest.approx(math.sqrt((dw_a_sq + 25) / (ref_a_sq + 5)))
    assert not any(k.startswith(("purification/a/", "purification/b/")) for k in m)  # per_layer=False


def test_zero_rows_and_a_zero_update():
    """A zero live row: beta 0, v = ref, ratio inf, not dominant, cosines 0. A zero reference row: left out of
    feature_share and residual_ratio. A zero update: stable rank and energy undefined (NaN)."""
    w = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0]])
    ref = torch.tensor([[1.0, 1, 0], [0, 0, 0], [0, 2, 0]])
    beta, v = decompose(ref, w)
    assert beta.tolist() == [0, 0, 2] and v.tolist() == [[1, 1, 0], [0, 0, 0], [0, 0, 0]]
    n = neuron_statistics(w, ref, ref)
    assert n["ratio"][0] == math.inf and math.isnan(n["ratio"][1]) and n["ratio"][2] == 0
    assert n["cos_ref"].tolist() == [0, 0, 1] and n["valid"].tolist() == [True, False, True]
    m = purification_metrics({"l": w}, {"l": ref}, {"l": ref})
    assert m["purification/l/feature_share"] == 0.5  # of the two rows with a reference
    assert m["purification/l/residual_ratio"] == math.inf  # median of 0 and inf
    nothing = purification_metrics({"l": w}, {"l": w}, {"l": torch.zeros(3, 3)})
    assert math.isnan(nothing["purification/l/feature_share"]) and math.isnan(nothing["purification/l/residual_ratio"])
    same = purification_metrics({"l": w}, {"l": w}, {"l": w.clone()}, top_r=(1,))
    assert math.isnan(same["purification/l/stable_rank"]) and math.isnan(same["purification/l/energy_top1"])
    assert same["purification/l/update_norm"] == 0 and math.isnan(same["purification/all/stable_rank"])


def test_filter_grid_normalises_each_filter():
    weight = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    weight[3] = 0.7  # constant: mid-grey
    grid = filter_grid(weight * torch.tensor([1.0, 10, -5, 1]).view(4, 1, 1, 1))
    assert grid.shape == (3, 54, 54)  # 2 x 2 cells of 24 (3 x 8) pixels, padding 2
    for k in range(4):
        top, left = 2 + (k // 2) * 26, 2 + (k % 2) * 26
        cell = grid[0, top:top + 24, left:left + 24]
        assert torch.equal(cell, cell[::8, ::8].repeat_interleave(8, 0).repeat_interleave(8, 1))
        if k < 3:
            assert cell.min() == 0 and cell.max() == 1  # each filter spans black to white, whatever its scale
            expected = (weight[k, 0] - weight[k, 0].min()) / (weight[k, 0].max() - weight[k, 0].min())
            assert torch.allclose(cell[::8, ::8], expected if k != 2 else 1 - expected, atol=1e-6)
        else:
            assert (cell == 0.5).all()
    linear = torch.randn(5, 64)
    assert filter_grid(linear, (8, 8)).shape == (3, 54, 80)  # 2 rows of 3 cells of 24 (8 x 3) pixels
    assert filter_grid(linear, (1, 8, 8)).shape == (3, 54, 80)
    assert filter_grid(linear, (7, 9)) is None and filter_grid(linear) is None
    assert filter_grid(torch.randn(4, 16, 3, 3)) is None  # not a first layer over images


def _module(seed=0, cls=StandardTraining):
    """A tiny defense whose learning-rate schedule does not depend on the run's length (as in tests/test_resume.py)."""
    L.seed_everything(seed)
    return cls(SmallCNN(width=4), eps=EPS, steps=2, step_size=EPS / 2, optimizer=sgd(), val_attack_steps=2,
               lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, 0.5))


def _events(log_dir):
    acc = EventAccumulator(str(log_dir), size_guidance={SCALARS: 0, IMAGES: 0})
    acc.Reload()
    return acc


def test_a_fit_logs_every_layer_and_the_filters(tmp_path, digits):
    logger = TensorBoardLogger(tmp_path, name="tb")
    probe = FeaturePurificationProbe()
    quiet_trainer(tmp_path, logger=logger, callbacks=[probe], max_epochs=2, limit_train_batches=3,
                  limit_val_batches=0).fit(_module(), digits)
    acc = _events(logger.log_dir)
    expected = {f"purification/{layer}/{s}" for layer in [*LAYERS, "all"] for s in STATS}
    logged = {t for t in acc.Tags()["scalars"] if t.startswith("purification/")}
    assert logged == expected
    assert [e.step for e in acc.Scalars("purification/all/cos_init")] == [0, 3, 6]  # fit start, two epoch ends
    assert acc.Scalars("purification/all/cos_init")[0].value == 1.0  # nothing moved yet
    assert 0 < acc.Scalars("purification/features.0/cos_init")[-1].value < 1
    assert [h["epoch"] for h in probe.history] == [0, 1, 2]
    assert probe.history[-1]["purification/head.3/cos_ref"] == pytest.approx(
        acc.Scalars("purification/head.3/cos_ref")[-1].value)
    images = acc.Images("purification/filters")
    assert [e.step for e in images] == [0, 3, 6] and (images[0].height, images[0].width) == (54, 54)  # 4 filters


def test_no_per_step_host_sync(tmp_path):
    """The whole loop (tests/test_host_sync.py): 30 steps sync as often as 10 with the probe on, and the probe did
    measure (more syncs than without it, all at fit start and the epoch's end)."""
    probes = [FeaturePurificationProbe(), FeaturePurificationProbe()]
    with_30, with_10 = _loop_syncs(tmp_path / "a", 30, [probes[0]]), _loop_syncs(tmp_path / "b", 10, [probes[1]])
    assert with_30 == with_10 > _loop_syncs(tmp_path / "c", 10)
    assert [len(p.history) for p in probes] == [2, 2]


def test_a_per_batch_probe_would_be_caught(tmp_path):
    """The check above can fail: the same measurement at every batch end syncs more in 30 steps than in 10."""
    class PerBatch(FeaturePurificationProbe):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.metrics(pl_module)

    assert _loop_syncs(tmp_path / "a", 30, [PerBatch()]) > _loop_syncs(tmp_path / "b", 10, [PerBatch()])


def test_the_probe_has_no_per_batch_hook():
    per_batch = [name for name in dir(L.Callback) if "batch" in name and name.startswith("on_")]
    overridden = [n for n in per_batch if getattr(FeaturePurificationProbe, n) is not getattr(L.Callback, n)]
    assert per_batch and not overridden


RUN = dict(limit_train_batches=3, limit_val_batches=1, num_sanity_val_steps=1)


def _straight_and_resumed(tmp_path, digits):
    straight = FeaturePurificationProbe()
    quiet_trainer(tmp_path / "a", max_epochs=2, callbacks=[straight], **RUN).fit(_module(cls=PGDAT), digits)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    quiet_trainer(tmp_path / "b", max_epochs=1, enable_checkpointing=True, callbacks=[ckpt, FeaturePurificationProbe()],
                  **RUN).fit(_module(cls=PGDAT), digits)
    resumed = FeaturePurificationProbe()
    quiet_trainer(tmp_path / "c", max_epochs=2, callbacks=[resumed], **RUN).fit(
        _module(seed=1, cls=PGDAT), digits, ckpt_path=ckpt.last_model_path)
    return straight, resumed, ckpt.last_model_path


def test_resume_keeps_the_initialization(tmp_path, digits):
    """The resumed run's second epoch logs what the straight run's did (its own fit start, seed 1, is not the
    initialization); the checkpoint holds one CPU copy (reference = initialization) and loads weights-only."""
    straight, resumed, path = _straight_and_resumed(tmp_path, digits)
    assert [h["epoch"] for h in resumed.history] == [2]  # a resumed run does not log a fit start
    assert resumed.history[-1] == pytest.approx(straight.history[-1], rel=1e-9)
    assert straight.history[-1]["purification/all/cos_init"] < 1
    state = torch.load(path, weights_only=True)["callbacks"]["FeaturePurificationProbe"]
    assert state["reference"] == "init" and set(state["init"]) == set(LAYERS)
    assert all(t.device.type == "cpu" for t in state["init"].values())
    assert torch.equal(state["init"]["features.0"], straight.init_weights["features.0"])


def test_without_its_state_the_resumed_probe_drifts(tmp_path, digits, monkeypatch):
    """The resume check is not vacuous: the restored state is what makes it pass."""
    monkeypatch.setattr(FeaturePurificationProbe, "load_state_dict", lambda self, state_dict: None)
    straight, resumed, _ = _straight_and_resumed(tmp_path, digits)
    assert resumed.history[-1]["purification/all/cos_init"] != pytest.approx(
        straight.history[-1]["purification/all/cos_init"], rel=1e-6)


@pytest.fixture
def clean_run(tmp_path, digits):
    """One epoch of clean training with the probe; its checkpoint, probe and final backbone weights."""
    probe, ckpt = FeaturePurificationProbe(), ModelCheckpoint(dirpath=tmp_path / "clean", filename="clean")
    module = _module()
    quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=3, limit_val_batches=0, enable_checkpointing=True,
                  callbacks=[ckpt, probe]).fit(module, digits)
    return {"path": ckpt.best_model_path, "probe": probe, "weights": {k: v.clone() for k, v in
                                                                       module.model.state_dict().items()}}


def _adversarial_start(tmp_path, digits, callbacks, seed=1):
    module = _module(seed=seed, cls=PGDAT)
    quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0, callbacks=callbacks).fit(
        module, digits)
    return module


def test_the_adversarial_stage_starts_from_the_clean_checkpoint(tmp_path, digits, clean_run):
    """WeightsFromCheckpoint loads the clean backbone; the probe's reference is that checkpoint's weights and its
    initialization the clean run's, so at fit start cos_ref is 1 and cos_init is where the clean run ended."""
    probe = FeaturePurificationProbe(reference=clean_run["path"])
    _adversarial_start(tmp_path / "adv", digits, [WeightsFromCheckpoint(clean_run["path"]), probe])
    clean = clean_run["probe"]
    for layer in LAYERS:
        assert torch.equal(probe.reference_weights[layer], clean_run["weights"][f"{layer}.weight"])
        assert torch.equal(probe.init_weights[layer], clean.init_weights[layer])
    start, end_of_clean = probe.history[0], clean.history[-1]
    assert start["purification/all/cos_ref"] == pytest.approx(1.0) and start["purification/all/update_norm"] == 0
    for layer in [*LAYERS, "all"]:
        assert start[f"purification/{layer}/cos_init"] == pytest.approx(end_of_clean[f"purification/{layer}/cos_init"])


def test_references_from_plain_state_dicts_and_fit_start(tmp_path, digits, clean_run):
    """A plain state dict file as the reference (no probe state: a warning, the initialization is the start of
    fit); ``init`` as a checkpoint path; reference ``fit_start`` is the clean model WeightsFromCheckpoint loaded,
    whichever callback comes first."""
    plain = tmp_path / "plain.pt"
    torch.save(clean_run["weights"], plain)
    probe = FeaturePurificationProbe(reference=str(plain))
    with pytest.warns(UserWarning, match="holds no probe state"):
        module = _adversarial_start(tmp_path / "a", digits, [probe], seed=3)
    assert torch.equal(probe.reference_weights["head.3"], clean_run["weights"]["head.3.weight"])
    assert not torch.equal(probe.init_weights["head.3"], probe.reference_weights["head.3"])  # seed 3's start
    assert not torch.equal(module.model.head[3].weight, clean_run["weights"]["head.3.weight"])  # nothing loaded

    probe = FeaturePurificationProbe(reference="fit_start", init=clean_run["path"])  # listed first: order-free
    _adversarial_start(tmp_path / "b", digits, [probe, WeightsFromCheckpoint(clean_run["path"])])
    assert torch.equal(probe.reference_weights["head.3"], clean_run["weights"]["head.3.weight"])
    assert torch.equal(probe.init_weights["head.3"], clean_run["probe"].init_weights["head.3"])


def test_a_reference_of_another_architecture_is_refused(tmp_path, digits, clean_run):
    module = StandardTraining(SmallCNN(width=8), eps=EPS, optimizer=sgd())
    with pytest.raises(ValueError, match="does not match the model's layers"):
        quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0,
                      callbacks=[FeaturePurificationProbe(reference=clean_run["path"])]).fit(module, digits)


def test_weights_from_checkpoint_is_not_read_when_resuming(tmp_path, digits, clean_run):
    """A missing file is named on a new run; a resumed run takes its own checkpoint's weights and never reads it."""
    missing = str(tmp_path / "gone.ckpt")
    with pytest.raises(FileNotFoundError, match="gone.ckpt"):
        _adversarial_start(tmp_path / "a", digits, [WeightsFromCheckpoint(missing)])
    module = StandardTraining(SmallCNN(width=4), eps=EPS, optimizer=sgd())
    quiet_trainer(tmp_path / "b", max_epochs=1, limit_train_batches=3, limit_val_batches=0,
                  callbacks=[WeightsFromCheckpoint(missing)]).fit(module, digits, ckpt_path=clean_run["path"])
    assert torch.equal(module.model.head[3].weight, clean_run["weights"]["head.3.weight"])  # already 1 epoch: no step


def test_only_global_rank_zero_keeps_copies_and_measures(tmp_path, digits, monkeypatch):
    """Another rank (``is_global_zero`` False) holds no weights, computes nothing and logs nothing; the probe has no
    collective call at all, so DDP ranks never wait for it."""
    monkeypatch.setattr(L.Trainer, "is_global_zero", property(lambda self: False))
    probe = FeaturePurificationProbe()
    logger = TensorBoardLogger(tmp_path, name="tb")
    quiet_trainer(tmp_path, logger=logger, max_epochs=1, limit_train_batches=2, limit_val_batches=0,
                  callbacks=[probe]).fit(_module(), digits)
    assert probe.history == [] and probe.init_weights is None and probe.state_dict() == {}
    assert not [t for t in _events(logger.log_dir).Tags()["scalars"] if t.startswith("purification/")]


@pytest.mark.parametrize("kwargs, match", [
    ({"every_n_epochs": 0}, "every_n_epochs"), ({"top_r": [0]}, "top_r"), ({"top_r": []}, "top_r"),
    ({"image_shape": (8,)}, "image_shape"), ({"reference": ""}, "reference"), ({"init": None}, "init"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FeaturePurificationProbe(**kwargs)
