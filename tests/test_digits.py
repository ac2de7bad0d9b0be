"""The offline digits DataModule, and the one real-data behavioural test: PGD-AT beats standard training under attack."""

import pytest
import torch
from digits_bench import EPS, digits_accuracy, fit_on_digits, sgd

from lit_robust.datamodules import DigitsDataModule
from lit_robust.defenses import PGDAT
from lit_robust.models import SmallCNN


def test_splits_are_disjoint_seeded_and_in_unit_range():
    a, b, c = DigitsDataModule(seed=0), DigitsDataModule(seed=0), DigitsDataModule(seed=1)
    for dm in (a, b, c):
        dm.setup()
    sizes = {name: len(ds) for name, ds in a.splits.items()}
    assert sizes == {"train": 1258, "val": 180, "test": 359}  # 1,797 images: 70 / 10 / 20 %
    # the 1,797 images are pairwise distinct, so disjoint splits share no image at all
    rows = {name: {tuple(r.tolist()) for r in ds.tensors[0].flatten(1)} for name, ds in a.splits.items()}
    assert sum(len(r) for r in rows.values()) == 1797
    assert not (rows["test"] & rows["train"]) and not (rows["val"] & rows["train"]) and not (rows["val"] & rows["test"])
    assert torch.equal(a.splits["test"].tensors[0], b.splits["test"].tensors[0])
    assert not torch.equal(a.splits["test"].tensors[0], c.splits["test"].tensors[0])
    x, y = next(iter(a.train_dataloader()))
    assert x.shape == (64, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.long
    assert x.min() >= 0 and x.max() <= 1 and x.max() == 1
    assert set(torch.cat([ds.tensors[1] for ds in a.splits.values()]).tolist()) == set(range(10))


def test_eval_batch_size_only_affects_val_and_test():
    dm = DigitsDataModule(batch_size=16, eval_batch_size=100)
    dm.setup()
    assert dm.train_dataloader().batch_size == 16
    assert dm.val_dataloader().batch_size == dm.test_dataloader().batch_size == 100


@pytest.mark.parametrize("kwargs,name", [({"val_fraction": 0.0}, "val_fraction"), ({"test_fraction": 0.95}, "test_fraction"),
                                         ({"batch_size": 0}, "batch_size"), ({"eval_batch_size": 0}, "eval_batch_size")])
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DigitsDataModule(**kwargs)


def test_pgd_at_beats_standard_training_under_pgd(standard_digits_accuracy):
    robust = fit_on_digits(PGDAT(SmallCNN(width=16), eps=EPS, steps=5, step_size=0.08, optimizer=sgd()))
    acc = digits_accuracy(robust.model)
    assert standard_digits_accuracy["clean"] > 0.9 and acc["clean"] > 0.85
    assert standard_digits_accuracy["pgd"] < 0.1
    assert acc["pgd"] > standard_digits_accuracy["pgd"] + 0.35
