"""corruption_accuracy on a fake CIFAR-10-C folder whose images tell a fixed model what to predict.

Each image carries a class in channel 0 (pixel value 20 * class); the model predicts that
class. The writer stores the true label there for the first ``CORRECT[corruption][severity - 1]``
of the ``N`` rows of each pair and a wrong one for the rest, so every per-pair accuracy is known
exactly beforehand.
"""

import json

import numpy as np
import pytest
import torch
from torch import nn

from lit_robust.datamodules.cifar_c import CIFAR10CDataModule
from lit_robust.evaluation.corruptions import CorruptionResult, corruption_accuracy

N = 4  # images per severity
CORRECT = {"gaussian_noise": (4, 3, 2, 1, 0), "fog": (1, 1, 1, 1, 0), "saturate": (4, 4, 2, 4, 4)}
EXPECTED = {name: {s: k / N for s, k in zip(range(1, 6), row)} for name, row in CORRECT.items()}


def _label(severity: int, row: int) -> int:
    return (3 * row + severity) % 10  # differs between severities, so a row read at the wrong severity scores wrong


def _write_fake(folder) -> None:
    folder.mkdir(parents=True)
    for name, correct in CORRECT.items():
        images = np.zeros((5 * N, 32, 32, 3), np.uint8)  # the release's layout: severities stacked, HWC
        for s in range(1, 6):
            for row in range(N):
                y = _label(s, row)
                images[(s - 1) * N + row, :, :, 0] = 20 * (y if row < correct[s - 1] else (y + 1) % 10)
        images[..., 1] = np.arange(32)[None, :, None] * 7  # some unrelated content
        np.save(folder / f"{name}.npy", images)
    np.save(folder / "labels.npy", np.array([_label(s, i) for s in range(1, 6) for i in range(N)], np.uint8))


@pytest.fixture
def data_dir(tmp_path):
    _write_fake(tmp_path / "CIFAR-10-C")
    return tmp_path


def _datamodule(data_dir, **kwargs) -> CIFAR10CDataModule:
    return CIFAR10CDataModule(str(data_dir), **{"download": False, "corruptions": tuple(CORRECT), "batch_size": 8,
                                                "num_workers": 0, **kwargs})


class EncodedClass(nn.Module):
    """Predicts the class written in channel 0, but only in eval mode: in train mode BatchNorm's batch
    statistics and dropout garble the pixel. Records the conditions of every call."""

    def __init__(self) -> None:
        super().__init__()
        self.bn, self.drop = nn.BatchNorm2d(3), nn.Dropout(0.5)
        self.calls = []

    def forward(self, x):
        self.calls.append({"training": [m.training for m in self.modules()], "grad": torch.is_grad_enabled(),
                           "autocast": torch.is_autocast_enabled("cpu"), "dtype": x.dtype})
        predicted = (self.drop(self.bn(x))[:, 0, 0, 0] * 255 / 20).round().long()
        return (predicted[:, None] == torch.arange(10)).float()


def _check(result: CorruptionResult, corruptions=tuple(CORRECT), severities=(1, 2, 3, 4, 5)) -> None:
    assert list(result.accuracy) == list(result.counts) == list(corruptions)
    for name in corruptions:
        assert list(result.accuracy[name]) == list(severities)
        assert result.accuracy[name] == {s: EXPECTED[name][s] for s in severities}
        assert result.counts[name] == {s: N for s in severities}


@pytest.mark.parametrize("kwargs", [{}, {"combined": False}, {"on_device": True},
                                    {"on_device": True, "combined": False}, {"batch_size": 7}])
def test_every_pair_scores_exactly_its_known_accuracy(data_dir, kwargs):
    result = corruption_accuracy(EncodedClass(), _datamodule(data_dir, **kwargs), clean_accuracy=0.95)
    _check(result)
    assert result.clean_accuracy == 0.95 and result.dataset == "CIFAR-10-C"
    # By hand from CORRECT: per corruption 10/20, 4/20, 18/20; per severity 9, 8, 5, 6, 4 of 12; 32 of 60 overall.
    assert result.per_corruption == pytest.approx({"gaussian_noise": 0.5, "fog": 0.2, "saturate": 0.9})
    assert result.per_severity == pytest.approx({1: 9 / 12, 2: 8 / 12, 3: 5 / 12, 4: 6 / 12, 5: 4 / 12})
    assert list(result.per_severity) == [1, 2, 3, 4, 5]
    assert result.mean == pytest.approx(32 / 60)


def test_a_selection_keeps_its_order(data_dir):
    dm = _datamodule(data_dir, corruptions=["saturate", "gaussian_noise"], severities=[5, 2, 3])
    result = corruption_accuracy(EncodedClass(), dm)
    _check(result, ("saturate", "gaussian_noise"), (5, 2, 3))
    assert list(result.per_severity) == [5, 2, 3] and result.clean_accuracy is None
    assert result.mean == pytest.approx((4 + 4 + 2 + 0 + 3 + 2) / 24)


def test_eval_mode_no_grad_fp32_and_every_flag_restored(data_dir):
    model = EncodedClass().train()
    model.bn.eval()  # frozen on purpose by the user: must stay frozen, and dropout must return to train
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = corruption_accuracy(model, _datamodule(data_dir))
    _check(result)
    assert len(model.calls) == 8  # 60 images in batches of 8
    assert all(call == {"training": [False, False, False], "grad": False, "autocast": False, "dtype": torch.float32}
               for call in model.calls)
    assert [m.training for m in model.modules()] == [True, False, True]


def test_the_datamodule_is_set_up_only_when_needed(data_dir, monkeypatch):
    dm = _datamodule(data_dir)
    calls = []
    for method in ("prepare_data", "setup"):
        original = getattr(dm, method)
        monkeypatch.setattr(dm, method, lambda *a, _m=method, _o=original: (calls.append(_m), _o(*a))[1])
    corruption_accuracy(EncodedClass(), dm)
    assert calls[:2] == ["prepare_data", "setup"]
    calls.clear()
    _check(corruption_accuracy(EncodedClass(), dm))
    assert "prepare_data" not in calls  # already set up: the files are not checked again


_SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__")


def _count_host_syncs(monkeypatch, run) -> int:
    count = [0]
    for name in _SYNCS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            count[0] += 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    try:
        run()
    finally:
        monkeypatch.undo()
    return count[0]


@pytest.mark.parametrize("on_device", [False, True])
def test_host_transfers_do_not_grow_with_the_number_of_batches(data_dir, monkeypatch, on_device):
    counts = [_count_host_syncs(monkeypatch, lambda: corruption_accuracy(
        EncodedClass(), _datamodule(data_dir, batch_size=size, on_device=on_device))) for size in (60, 4)]
    assert counts[0] == counts[1] <= 4  # 1 batch or 15: the same few transfers, at the end


class _Loader:
    """A stand-in for a corruption DataModule serving hand-made (x, y, corruption, severity) batches."""

    corruptions, severities, test_names, labels = ("fog", "snow"), (1, 2), ["fog/1", "fog/2", "snow/1", "snow/2"], 0

    def __init__(self, batches):
        self.batches = batches

    def test_dataloader(self):
        return iter(self.batches)


def _batch(classes, labels, corruption, severity):
    """Images showing ``classes`` with true ``labels``; corruption index and severity per image or for all."""
    n = len(classes)
    x = torch.zeros(n, 3, 32, 32)
    x[:, 0] = torch.tensor(classes, dtype=torch.float32)[:, None, None] * 20 / 255
    tag = (lambda v: torch.tensor(v if isinstance(v, list) else [v] * n))
    return x, torch.tensor(labels), tag(corruption), tag(severity)


def test_batches_may_mix_pairs_in_any_order():
    batches = [_batch([1, 2, 3], [1, 0, 3], [1, 0, 1], [2, 1, 1]), _batch([5, 5], [5, 5], [0, 1], 2),
               _batch([7], [6], 0, 1)]
    result = corruption_accuracy(EncodedClass(), _Loader(batches))
    # fog/1: class 2 for 0, 7 for 6 -> 0/2; fog/2: 5 -> 1/1; snow/1: 3 -> 1/1; snow/2: 1, 5 -> 2/2
    assert result.accuracy == {"fog": {1: 0.0, 2: 1.0}, "snow": {1: 1.0, 2: 1.0}}
    assert result.counts == {"fog": {1: 2, 2: 1}, "snow": {1: 1, 2: 2}}
    assert result.dataset is None


_EVERY_PAIR = _batch([1] * 4, [1] * 4, [0, 0, 1, 1], [1, 2, 1, 2])


@pytest.mark.parametrize("batches, match", [
    ([_batch([1, 1, 1], [1, 1, 1], [0, 0, 1], [1, 2, 1])], r"served no image for snow/2"),
    ([_EVERY_PAIR, _batch([1, 1], [1, 1], 0, [3, 7])], r"2 images whose corruption index or severity lies outside"),
    ([_EVERY_PAIR, _batch([1], [1], 2, 1)], r"outside its corruptions \['fog', 'snow'\] and severities \[1, 2\]"),
])
def test_images_outside_the_selection_or_pairs_without_images_are_errors(batches, match):
    with pytest.raises(ValueError, match=match):
        corruption_accuracy(EncodedClass(), _Loader(batches))


def test_bad_arguments_name_the_argument(data_dir):
    with pytest.raises(ValueError, match=r"clean_accuracy must be in \[0, 1\]"):
        corruption_accuracy(EncodedClass(), _datamodule(data_dir), clean_accuracy=90.0)
    with pytest.raises(ValueError, match=r"datamodule must be a corruption DataModule.*lacking corruptions"):
        corruption_accuracy(EncodedClass(), object())


def test_result_means_and_json_round_trip():
    result = CorruptionResult({"fog": {1: 1.0, 3: 0.5}, "snow": {1: 0.25}}, {"fog": {1: 4, 3: 4}, "snow": {1: 4}},
                              clean_accuracy=0.9, dataset="CIFAR-10-C")
    assert result.mean == pytest.approx(1.75 / 3)  # every pair counts once
    assert result.per_corruption == {"fog": 0.75, "snow": 0.25}
    assert result.per_severity == {1: 0.625, 3: 0.5}  # severity 3: fog only
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["accuracy"] == {"fog": {"1": 1.0, "3": 0.5}, "snow": {"1": 0.25}}
    assert data["mean"] == pytest.approx(1.75 / 3) and data["per_severity"] == {"1": 0.625, "3": 0.5}
    assert data["clean_accuracy"] == 0.9 and data["dataset"] == "CIFAR-10-C"
    assert CorruptionResult.from_dict(data) == result
