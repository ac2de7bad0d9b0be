"""AdversarialCoresetSelection (Dolatabadi et al. 2022): gradients, greedy selection, schedule, loaders, resume."""

import torch
from digits_bench import EPS, sgd, training_only_trainer
from torch import nn
from torch.nn import functional as F

from lit_robust.callbacks.coreset import (AdversarialCoresetSelection, CoresetSampler, craig, gradmatch,
                                          last_layer_gradients, select_per_class)
from lit_robust.defenses import PGDAT, TRADES
from lit_robust.models import SmallCNN

import pytest


def small(defense=PGDAT):
    return defense(model=SmallCNN(width=4), eps=EPS, steps=2,
                   step_size=EPS / 2, optimizer=sgd())


class Recorder(AdversarialCoresetSelection):
    """Records, per epoch, the training indices the loader served (via the sampler) and the selections made."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.served, self.selected_epochs, self.subsets = [], [], []

    @property
    def state_key(self):
        return "AdversarialCoresetSelection"  # resumes the plain callback's checkpoint state

    def on_train_epoch_start(self, trainer, pl_module):
        loader = trainer.train_dataloader
        sampler = getattr(loader, "sampler", None)
        self.served.append(list(sampler) if isinstance(sampler, CoresetSampler) else None)

    def select(self, trainer, pl_module, dataset, batch_size):
        self.selected_epochs.append(trainer.current_epoch)
        super().select(trainer, pl_module, dataset, batch_size)
        self.subsets.append(set(self.indices.tolist()))


def test_closed_form_equals_autograd_per_example_gradient():
    torch.manual_seed(0)
    h = torch.randn(5, 7)
    layer = nn.Linear(7, 4)
    y = torch.tensor([0, 3, 1, 1, 2])
    got = last_layer_gradients(layer(h), h, y)
    for i in range(5):
        gw, gb = torch.autograd.grad(F.cross_entropy(layer(h[i:i + 1]), y[i:i + 1]), [layer.weight, layer.bias])
        torch.testing.assert_close(got[i], torch.cat([gb, gw.flatten()]))
    torch.testing.assert_close(last_layer_gradients(layer(h), None, y), got[:, :4])


def clusters():
    """Three tight clusters of sizes 5, 3, 2 in 2-D."""
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    sizes = [5, 3, 2]
    points = torch.cat([c + 0.01 * torch.randn(s, 2, generator=torch.Generator().manual_seed(i))
                        for i, (c, s) in enumerate(zip(centres, sizes))])
    return points, sizes


def test_craig_picks_one_per_cluster_weighted_by_cluster_size():
    points, sizes = clusters()
    idx, w = craig(points, 3)
    owner = torch.tensor([0] * 5 + [1] * 3 + [2] * 2)
    assert sorted(owner[idx].tolist()) == [0, 1, 2]
    assert {int(owner[i]): float(wi) for i, wi in zip(idx, w)} == {0: 5.0, 1: 3.0, 2: 2.0}


def test_gradmatch_matches_the_sum_with_nonnegative_weights():
    dup = torch.tensor([[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 2)  # exact duplicates: sum = (4, 2)
    idx, w = gradmatch(dup, 3)
    assert len(idx) == 2 and (w >= 0).all()
    torch.testing.assert_close(w @ dup[idx], dup.sum(0))


@pytest.mark.parametrize("method", ["craig", "gradmatch"])
def test_per_class_budget(method):
    torch.manual_seed(0)
    labels = torch.tensor([0] * 40 + [1] * 20 + [2] * 10)
    grads = torch.randn(70, 3 * (1 + 4))
    idx, w = select_per_class(grads, labels, 0.3, method, num_features=4 if method == "gradmatch" else None)
    counts = torch.bincount(labels[idx], minlength=3).tolist()
    expected = [12, 6, 3]  # ceil(int(0.3 * 70) * n_c / 70), int(0.3 * 70) = 20 in floating point
    if method == "craig":
        assert counts == expected and w.sum() == 70
    else:
        assert all(0 < c <= e for c, e in zip(counts, expected)) and (w >= 0).all()
    assert len(set(idx.tolist())) == len(idx)


def test_sampler_draws_in_proportion_to_weights_and_is_seeded():
    s = CoresetSampler(torch.tensor([3, 7]), torch.tensor([3.0, 1.0]), seed=0, epoch=0)
    draws = [i for e in range(200) for i in CoresetSampler(s.indices, s.weights, 0, e)]
    assert set(draws) == {3, 7} and abs(draws.count(3) / len(draws) - 0.75) < 0.05
    assert list(s) == list(CoresetSampler(s.indices, s.weights, 0, 0))


def test_schedule_warmup_then_subset_every_r_epochs(tmp_path, digits):
    cb = Recorder(fraction=0.25, every_n_epochs=2, warmup_fraction=1.0)  # T_w = round(0.25 * 4) = 1
    training_only_trainer(tmp_path, max_epochs=4, callbacks=[cb]).fit(small(), digits)
    n = len(digits.splits["train"])
    assert cb.served[0] is None  # warm-up: the full shuffled loader
    assert cb.selected_epochs == [1, 3]
    budget = sum(min(-(-int(0.25 * n) * c // n), c) for c in torch.bincount(digits.splits["train"].tensors[1]).tolist())
    for epoch, subset in ((1, 0), (2, 0), (3, 1)):
        assert len(cb.served[epoch]) == budget == len(cb.subsets[subset])
        assert set(cb.served[epoch]) <= cb.subsets[subset]
    assert cb.subsets[0] != cb.subsets[1]  # reselected with the epoch-3 model
    assert cb.weights.sum() == n  # CRAIG: every pool point counted once


def test_trades_and_steps_counted(tmp_path, digits):
    cb = AdversarialCoresetSelection(fraction=0.5, every_n_epochs=1, warmup_epochs=1, method="gradmatch")
    trainer = training_only_trainer(tmp_path, max_epochs=2, callbacks=[cb])
    trainer.fit(small(TRADES), digits)
    n = len(digits.splits["train"])
    assert 0 < len(cb.indices) <= -(-n // 2) + 10
    assert trainer.global_step == -(-n // 32) + -(-len(cb.indices) // 32)
    assert digits.train_dataloader.__func__ is type(digits).train_dataloader  # unwrapped after fit


def test_resume_keeps_the_selection(tmp_path, digits):
    cb = AdversarialCoresetSelection(fraction=0.25, every_n_epochs=5, warmup_epochs=1)
    trainer = training_only_trainer(tmp_path, max_epochs=2, callbacks=[cb], enable_checkpointing=True)
    trainer.fit(small(), digits)
    ckpt = trainer.checkpoint_callback.best_model_path or trainer.checkpoint_callback.last_model_path
    state = torch.load(ckpt, weights_only=True)["callbacks"]
    saved = next(v for k, v in state.items() if "AdversarialCoresetSelection" in k)
    assert torch.equal(saved["indices"], cb.indices) and saved["selected_at"] == 1
    resumed = Recorder(fraction=0.25, every_n_epochs=5, warmup_epochs=1)
    training_only_trainer(tmp_path, max_epochs=3, callbacks=[resumed]).fit(small(), digits, ckpt_path=ckpt)
    assert resumed.selected_epochs == [] and torch.equal(resumed.indices, cb.indices)
    assert set(resumed.served[0]) <= set(cb.indices.tolist())


def test_bad_arguments():
    for kwargs in ({"fraction": 0}, {"every_n_epochs": 0}, {"method": "glister"}, {"weighting": "x"}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            AdversarialCoresetSelection(**kwargs)
