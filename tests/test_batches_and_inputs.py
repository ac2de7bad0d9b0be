"""What a defense accepts as a batch (tuples, lists, dicts), and the clear errors for what it cannot use."""

import logging

import lightning.pytorch as L
import pytest
import torch
from digits_bench import EPS, quiet_trainer, tiny_defense
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lit_robust.attacks import PGD
from lit_robust.batches import split_batch
from lit_robust.callbacks import EpsilonSchedule, ExactResume
from lit_robust.defenses import PGDAT
from lit_robust.evaluation import evaluate_robustness
from lit_robust.models import SmallCNN


def images(n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


class DictImages(Dataset):
    """Yields ``{"image": x, "label": y, "id": i}``, so the default collate makes dict batches."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": self.y[i], "id": i}


def loader(*tensors, batch_size=16) -> DataLoader:
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size)


# --- the batch reader --------------------------------------------------------------------------

def test_split_batch_reads_tuples_lists_dicts_and_callables():
    x, y = images(4)
    assert all(a is x and b is y for a, b in (split_batch((x, y)), split_batch([x, y, "extra"]),
                                              split_batch({"img": x, "lbl": y}, "img", "lbl"),
                                              split_batch({"pair": (y, x)}, lambda b: b["pair"][1],
                                                          lambda b: b["pair"][0])))


@pytest.mark.parametrize("batch, keys, message", [
    ({"image": 0, "label": 1}, (0, 1), r"inputs=0 is not a key of the batch, whose keys are \['image', 'label'\]"),
    ((torch.zeros(1),), (0, 1), "targets=1 is out of range for a batch of 1 items"),
    ((torch.zeros(1), torch.zeros(1)), ("image", 1), "inputs='image' is a key, but the batch is a tuple"),
    (torch.zeros(2), (0, 1), "a batch must be a tuple or list .* or a dict, got Tensor"),
    (([1.0], torch.zeros(1)), (0, 1), r"the batch's images \(inputs=0\) must be a Tensor, got list"),
])
def test_a_batch_that_cannot_be_read_says_what_was_expected(batch, keys, message):
    with pytest.raises(ValueError, match=message):
        split_batch(batch, *keys)


# --- defenses and callbacks on dict batches ------------------------------------------------------

@pytest.mark.parametrize("name, extra", [("PGDAT", {}), ("FreeAT", {}), ("FastAT", {"co_guard": True})])
def test_defenses_train_validate_and_test_on_dict_batches(tmp_path, name, extra):
    """Equal to the same run on tuple batches: the dict is read, not unpacked by its keys."""
    x, y = images(48)
    results = []
    for data, keys in ((DataLoader(DictImages(x, y), batch_size=16), {"inputs": "image", "targets": "label"}),
                       (loader(x, y), {})):
        L.seed_everything(0)
        module = tiny_defense(name, **keys, **extra)
        trainer = quiet_trainer(tmp_path, max_epochs=2, num_sanity_val_steps=0)
        trainer.fit(module, data, data)
        results.append((dict(trainer.callback_metrics), trainer.test(module, data, verbose=False)[0],
                        [p.detach().clone() for p in module.parameters()]))
    (fit_dict, test_dict, weights_dict), (fit_tuple, test_tuple, weights_tuple) = results
    assert all(torch.equal(a, b) for a, b in zip(weights_dict, weights_tuple))
    assert test_dict == test_tuple and set(test_dict) >= {"test/clean_acc", "test/robust_acc"}
    assert fit_dict["val/robust_acc"] == fit_tuple["val/robust_acc"]


def test_a_dict_batch_without_keys_named_fails_with_the_keys_it_has(tmp_path):
    x, y = images(16)
    with pytest.raises(ValueError, match=r"inputs=0 is not a key of the batch, whose keys are \['id', 'image'"):
        quiet_trainer(tmp_path, max_steps=1).fit(tiny_defense("PGDAT"), DataLoader(DictImages(x, y), batch_size=8))


def test_bad_batch_keys_are_refused_when_built():
    with pytest.raises(ValueError, match="inputs must be an index"):
        tiny_defense("PGDAT", inputs=1.5)


def test_evaluation_reads_dict_batches_like_tuples():
    x, y = images(24)
    model = SmallCNN(width=4).eval()
    by_tuple = evaluate_robustness(model, loader(x, y, batch_size=10), EPS, tiers=("pgd",))
    by_dict = evaluate_robustness(model, DataLoader(DictImages(x, y), batch_size=10), EPS, tiers=("pgd",),
                                  inputs="image", targets="label")
    assert all(torch.equal(by_tuple.correct[k], by_dict.correct[k]) for k in by_tuple.correct)


# --- schedules need a training attack ------------------------------------------------------------

class PlainModule(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = SmallCNN(width=4)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_schedule_on_a_module_without_a_training_attack_says_what_it_needs(tmp_path):
    with pytest.raises(TypeError, match="EpsilonSchedule sets the training attack .* PlainModule has none"):
        quiet_trainer(tmp_path, max_steps=1, callbacks=[EpsilonSchedule(2)]).fit(PlainModule(), loader(*images(8)))


# --- inputs a defense refuses, with what was given and what is expected ------------------------------

class Probabilities(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = SmallCNN(width=4)

    def forward(self, x):
        return self.net(x).softmax(1)


class Pair(Probabilities):
    def forward(self, x):
        return self.net(x), x


def nan_images():
    x, y = images(8)
    x[3, 0, 2, 2] = float("nan")
    return x, y


@pytest.mark.parametrize("tensors, model, message", [
    (nan_images(), None, r"inputs hold 1 non-finite values \(NaN or inf\) in 1 of 8 images"),
    (((images(8)[0] * 255).to(torch.uint8), images(8)[1]), None, r"got dtype torch.uint8 \(convert uint8 images "
                                                                  r"with x.float\(\) / 255\)"),
    ((images(8)[0][:, 0], images(8)[1]), None, r"inputs of shape \(8, 8, 8\) are 3-D"),
    ((images(8)[0], images(8)[1].float()), None, "labels must be integer class indices .* got dtype torch.float32"),
    ((images(8)[0], images(8)[1] + 10), None, r"labels must be class indices in \[0, 10\) .* got labels in \[10, "),
    ((images(8)[0] * 2, images(8)[1]), None, r"inputs must be images in \[0, 1\], got values in \[0"),
    (images(8), Pair(), "the model returns a tuple of 2 items: it must return one logits tensor"),
    (images(8), Probabilities(), "the model returns probabilities"),
])
@pytest.mark.parametrize("stage", ["fit", "test"])
def test_bad_inputs_get_one_clear_message(tmp_path, tensors, model, message, stage):
    module = PGDAT(model or SmallCNN(width=4), eps=EPS, steps=2)
    trainer = quiet_trainer(tmp_path, max_steps=1)
    with pytest.raises(ValueError, match=message):
        getattr(trainer, stage)(module, loader(*tensors))


def test_the_attack_and_the_evaluation_check_their_inputs_too():
    x, y = nan_images()
    model = SmallCNN(width=4).eval()
    for run in (lambda: PGD(EPS, steps=1).run(model, x, y), lambda: PGD(EPS, steps=1)(model, x, y),
                lambda: evaluate_robustness(model, (x, y), EPS, tiers=("pgd",))):
        with pytest.raises(ValueError, match="non-finite"):
            run()


@pytest.mark.parametrize("kwargs, message", [
    (dict(eps=5.0), r"eps=5 with norm='linf' covers the whole \[0, 1\] pixel box.*eps=8/255 \(not 8\)"),
    (dict(eps=1.0), "covers the whole"),
])
def test_a_linf_eps_of_the_whole_box_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PGDAT(SmallCNN(width=4), **kwargs)
    with pytest.raises(ValueError, match=message):
        evaluate_robustness(SmallCNN(width=4), images(4), tiers=("pgd",), **kwargs)


def test_an_l2_eps_past_the_images_diameter_is_refused_at_the_first_batch(tmp_path):
    """8x8 grey images: the box's diameter is 8."""
    module = PGDAT(SmallCNN(width=4), norm="l2", eps=8.0, steps=1)
    with pytest.raises(ValueError, match=r"eps=8 with norm='l2' is at least the diameter 8 of the \[0, 1\] box"):
        quiet_trainer(tmp_path, max_steps=1).fit(module, loader(*images(8)))
    quiet_trainer(tmp_path, max_steps=1).fit(PGDAT(SmallCNN(width=4), norm="l2", eps=7.9, steps=1), loader(*images(8)))


# --- checkpoints: wrong files and another defense's ---------------------------------------------------

@pytest.fixture(scope="module")
def pgdat_checkpoint(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("pgdat_ckpt")
    trainer = quiet_trainer(tmp_path, max_steps=2)
    trainer.fit(tiny_defense("PGDAT"), loader(*images(16)))
    path = tmp_path / "pgdat.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.mark.parametrize("stage", ["fit", "test"])
def test_a_truncated_checkpoint_is_named(tmp_path, pgdat_checkpoint, stage):
    truncated = tmp_path / "cut.ckpt"
    truncated.write_bytes(pgdat_checkpoint.read_bytes()[:2000])
    trainer = quiet_trainer(tmp_path, max_steps=3)
    with pytest.raises(ValueError, match=f"checkpoint {truncated} is truncated"):
        getattr(trainer, stage)(tiny_defense("PGDAT"), loader(*images(16)), ckpt_path=truncated)


def test_resuming_another_defenses_checkpoint_is_refused_and_testing_it_warns(tmp_path, pgdat_checkpoint):
    data = loader(*images(16))
    with pytest.raises(ValueError, match="the checkpoint was written by PGDAT, and this module is FreeAT: resuming"):
        quiet_trainer(tmp_path, max_steps=4).fit(tiny_defense("FreeAT"), data, ckpt_path=pgdat_checkpoint)
    with pytest.warns(UserWarning, match="written by PGDAT, and this module is TRADES; its weights are evaluated"):
        quiet_trainer(tmp_path).test(tiny_defense("TRADES"), data, ckpt_path=pgdat_checkpoint, verbose=False)
    quiet_trainer(tmp_path, max_steps=4).fit(tiny_defense("PGDAT"), data, ckpt_path=pgdat_checkpoint)  # same: fine


# --- the defense's own callbacks are attached once --------------------------------------------------

def test_fit_then_test_in_one_trainer_keeps_the_defenses_callbacks_without_override_messages(tmp_path, caplog):
    data = loader(*images(16))
    module = tiny_defense("FastAT", co_guard=True)
    trainer = quiet_trainer(tmp_path, max_steps=2)
    with caplog.at_level(logging.INFO):
        trainer.fit(module, data)
        attached = [c for c in trainer.callbacks if isinstance(c, ExactResume)]
        trainer.test(module, data, verbose=False)
    assert "will override existing callbacks" not in caplog.text
    assert [c for c in trainer.callbacks if isinstance(c, ExactResume)] == attached and len(attached) == 1
    assert module.co_monitor in trainer.callbacks


def test_an_exact_resume_given_by_the_user_is_kept(tmp_path):
    mine = ExactResume()
    trainer = quiet_trainer(tmp_path, max_steps=1, callbacks=[mine])
    trainer.fit(tiny_defense("PGDAT"), loader(*images(8)))
    assert [c for c in trainer.callbacks if isinstance(c, ExactResume)] == [mine]


# --- the learning-rate schedule a run gets is said once ------------------------------------------------

def test_the_schedule_that_runs_is_logged(tmp_path, caplog):
    data = loader(*images(16))
    with caplog.at_level(logging.INFO):
        quiet_trainer(tmp_path, max_steps=1).fit(
            PGDAT(SmallCNN(width=4), eps=EPS, steps=1, optimizer=lambda p: torch.optim.Adam(p, 1e-3)), data)
    assert ("PGDAT: Adam, learning-rate schedule the paper's: x0.1 at 50% and 75% of the training steps "
            "(Rice et al.: epochs 100 and 150 of 200), stepped every step (an optimizer given without") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        quiet_trainer(tmp_path, max_steps=1).fit(
            tiny_defense("FastAT", lr_scheduler=lambda o: torch.optim.lr_scheduler.ConstantLR(o, factor=1.0)), data)
    assert "FastAT: SGD, learning-rate schedule the given ConstantLR, stepped every epoch" in caplog.text
