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


@pytest.mark.parametrize("seed, sizes, fractions", [(0, {}, (0.1, 0.2)), (1, {}, (0.1, 0.2)),
                                                    (0, {"test_size": 54}, (0.1, 0.03))])
def test_splits_are_bit_identical_to_the_former_fraction_split(seed, sizes, fractions):
    """The former val_fraction / test_fraction split (its code, below): same images in the same order."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test, n_val = round(len(y) * fractions[1]), round(len(y) * fractions[0])
    former = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
    dm = DigitsDataModule(seed=seed, **sizes)
    dm.setup()
    for name, index in former.items():
        images, labels = dm.splits[name].tensors
        assert torch.equal(images, x[index]) and torch.equal(labels, y[index])
        assert torch.equal(torch.stack([dm.splits[name][i][0] for i in range(len(index))]), x[index])


def test_augment_crops_the_padded_digit_without_flipping_and_on_device_serves_the_same_splits():
    dm = DigitsDataModule(augment=True)
    dm.setup()
    plain = dm.splits["train"].tensors[0][0]
    padded = torch.nn.functional.pad(plain[None], (1, 1, 1, 1), mode="reflect")[0]
    windows = [padded[:, i:i + 8, j:j + 8] for i in range(3) for j in range(3)]
    views = [dm.splits["train"][0][0] for _ in range(32)]
    assert all(any(torch.equal(v, w) for w in windows) for v in views)  # crops, never mirrored
    assert len({tuple(v.flatten().tolist()) for v in views}) > 3
    assert DigitsDataModule().augment is False  # off by default
    on_device = DigitsDataModule(on_device=True, eval_batch_size=1000)
    on_device.setup()
    (x, y), = list(on_device.test_dataloader())
    assert torch.equal(x, dm.splits["test"].tensors[0]) and torch.equal(y, dm.splits["test"].tensors[1])


def test_hyperparameters_rebuild_the_same_datamodule():
    """What a checkpoint stores (hparams) holds only this class's arguments."""
    dm = DigitsDataModule(batch_size=8, val_size=100, test_size=200, augment=True)
    assert dict(dm.hparams) == {"batch_size": 8, "eval_batch_size": None, "val_size": 100, "test_size": 200, "seed": 0,
                                "num_workers": 0, "augment": True, "on_device": False, "cutmix": False,
                                "with_index": False, "size": 8}
    assert DigitsDataModule(**dm.hparams).test_size == 200


@pytest.mark.parametrize("kwargs,name", [({"val_size": -1}, "val_size"), ({"test_size": 0}, "test_size"),
                                         ({"val_size": 900, "test_size": 897}, "val_size \\+ test_size"),
                                         ({"batch_size": 0}, "batch_size"),
                                         ({"eval_batch_size": 0}, "eval_batch_size")])
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DigitsDataModule(**kwargs)


def test_pgd_at_beats_standard_training_under_pgd(standard_digits_accuracy):
    robust = fit_on_digits(PGDAT(SmallCNN(width=16), eps=EPS, steps=5, step_size=0.08, optimizer=sgd()))
    acc = digits_accuracy(robust.model)
    assert standard_digits_accuracy["clean"] > 0.9 and acc["clean"] > 0.85
    assert standard_digits_accuracy["pgd"] < 0.1
    assert acc["pgd"] > standard_digits_accuracy["pgd"] + 0.35
