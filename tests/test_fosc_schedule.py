"""FOSCSchedule (Wang et al. 2019): the threshold each epoch, and its effect on the attack."""

import csv

import pytest
import torch
from digits_bench import EPS, RecordingPGDAT, digits_accuracy, fit_on_digits, sgd, training_only_trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from lit_robust.callbacks.fosc import FOSCSchedule
from lit_robust.defenses import PGDAT
from lit_robust.models import SmallCNN


def test_threshold_decays_linearly_to_zero_at_dynamic_epochs(tmp_path, digits):
    module = RecordingPGDAT()
    training_only_trainer(tmp_path, max_epochs=6, limit_train_batches=1,
                          callbacks=[FOSCSchedule(c_max=0.5, dynamic_epochs=4)]).fit(module, digits)
    # c_t = max(c_max - c_max * t / T', 0), t = 0-indexed epoch
    assert [seen[5] for seen in module.seen] == pytest.approx([0.5, 0.375, 0.25, 0.125, 0.0, 0.0])


def test_fewer_attack_steps_early_and_full_pgd_after_dynamic_epochs(tmp_path, digits):
    """Early in training FOSC is small, so most examples stop after the first step; with c_t = 0 none does."""
    module = RecordingPGDAT()
    logger = CSVLogger(tmp_path, name="")
    training_only_trainer(tmp_path, max_epochs=3, limit_train_batches=4, logger=logger, log_every_n_steps=1,
                          callbacks=[FOSCSchedule(c_max=0.5, dynamic_epochs=2)]).fit(module, digits)
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row.get("train/attack_steps")]
    steps = [float(row["train/attack_steps"]) for row in rows]
    assert len(steps) == 3
    assert steps[0] < 2.0 and steps[2] == 4.0  # module's K = 4
    assert all(float(row["train/fosc_mean"]) >= 0 for row in rows)
    assert [float(row["train/fosc_threshold"]) for row in rows] == pytest.approx([0.5, 0.25, 0.0])


def test_fosc_histogram_goes_to_tensorboard(tmp_path, digits):
    logger = TensorBoardLogger(tmp_path, name="tb")
    training_only_trainer(tmp_path, max_epochs=2, limit_train_batches=2, logger=logger,
                          callbacks=[FOSCSchedule(dynamic_epochs=2)]).fit(RecordingPGDAT(), digits)
    events = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0}).Reload()
    histograms = events.Histograms("train/fosc")
    assert len(histograms) == 2  # one per epoch
    assert histograms[0].histogram_value.num == 2 * 32  # every example of the epoch's two batches
    assert histograms[0].histogram_value.min >= 0


def test_train_mode_attack_with_sync_batchnorm_is_refused():
    model = nn.SyncBatchNorm.convert_sync_batchnorm(SmallCNN(width=4))
    module = PGDAT(model, eps=EPS, attack_bn_mode="train", optimizer=sgd())
    with pytest.raises(ValueError, match="attack_bn_mode='eval'"):
        FOSCSchedule().on_train_start(None, module)
    FOSCSchedule().on_train_start(None, PGDAT(model, eps=EPS, optimizer=sgd()))  # eval mode: fine


def test_threshold_freezes_exactly_the_examples_below_it(tiny_cnn, batch):
    """PGD with a threshold equals plain PGD on the examples that never freeze, and stops the others."""
    from lit_robust.attacks import PGD

    x, y = batch
    torch.manual_seed(0)
    plain = PGD(0.1, steps=3, track_fosc=True).run(tiny_cnn, x, y)
    threshold = float(plain.fosc.median())
    torch.manual_seed(0)
    frozen = PGD(0.1, steps=3, fosc_threshold=threshold).run(tiny_cnn, x, y)
    assert bool((frozen.steps < 3).any()) and bool((frozen.steps == 3).any())
    full = frozen.steps == 3
    assert torch.allclose(frozen.x_adv[full], plain.x_adv[full])


@pytest.mark.parametrize("reference,expected", [(None, "clean"), ("clean", "clean"), ("start", "start")])
def test_fosc_reference_reaches_the_training_attack(tmp_path, digits, reference, expected):
    """``fosc_reference="start"`` (official code) is set on the defense's PGD; None keeps the attack's own."""
    module = RecordingPGDAT()
    training_only_trainer(tmp_path, max_epochs=1, limit_train_batches=1,
                          callbacks=[FOSCSchedule(dynamic_epochs=2, fosc_reference=reference)]).fit(module, digits)
    assert module.scheduled_attack().fosc_reference == expected


def test_bad_c_max():
    with pytest.raises(ValueError, match="c_max"):
        FOSCSchedule(c_max=-1)
    with pytest.raises(ValueError, match="ramp_epochs"):
        FOSCSchedule(dynamic_epochs=0)
    with pytest.raises(ValueError, match="fosc_reference"):
        FOSCSchedule(fosc_reference="origin")


def test_dynamic_at_is_robust_on_digits(standard_digits_accuracy):
    """Dynamic AT (FOSC threshold 0.5 decaying to 0 at epoch 4 of 8) against standard training."""
    module = PGDAT(SmallCNN(width=16), eps=EPS, steps=10, step_size=EPS / 4, optimizer=sgd())
    acc = digits_accuracy(fit_on_digits(module, callbacks=[FOSCSchedule(c_max=0.5, dynamic_epochs=4)]).model)
    print(f"Dynamic AT on digits: {acc}")
    assert acc["clean"] > 0.85
    assert acc["pgd"] > standard_digits_accuracy["pgd"] + 0.3
