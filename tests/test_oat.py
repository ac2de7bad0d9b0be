"""OAT (Lee et al., ICLR 2021): the OOD images with their uniform targets through the base defense's attack and
loss, the OODDataModule that brings them, the official recipe, and robustness on the digits."""

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from digits_bench import EPS, digits_accuracy, fit_on_digits, quiet_trainer, sgd
from test_host_sync import recorded
from test_trades import check_default_recipe
from torch.utils.data import TensorDataset

import digits_bench
from lit_robust.attacks import PGD
from lit_robust.datamodules import DigitsDataModule, OODDataModule
from lit_robust.defenses import PGDAT
from lit_robust.defenses.oat import OATPGDAT, OATTRADES, oat_targets
from lit_robust.models import SmallCNN
from lit_robust.objectives import trades_objective

K = 10


def shuffled_digits(n=None, seed=1):
    """OOD images: training digits with their 64 pixels shuffled (a digit's ink, no digit's shape)."""
    dm = DigitsDataModule()
    dm.setup()
    x = dm.splits["train"].tensors[0][:n]
    perm = torch.argsort(torch.rand(len(x), 64, generator=torch.Generator().manual_seed(seed)), dim=1)
    return x.flatten(1).gather(1, perm).view_as(x)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(3)
    return torch.rand(12, 1, 8, 8, generator=g), torch.randint(0, K, (12,), generator=g), \
        torch.rand(8, 1, 8, 8, generator=g)


def _fixed_perturbation(module):
    """Replaces the attack by a fixed shift, so that the loss can be recomputed by hand."""
    module.perturb = lambda x, y: (x + 0.05 * torch.sin(torch.arange(x.numel()).view_as(x))).clamp(0, 1)
    return module


def _loss_with_ood(module, x, y, x_ood):
    module.train()
    module._ood = x_ood
    return module.training_loss(x, y)


# --- the targets and the attack ----------------------------------------------------------------------------

def test_targets_are_one_hot_rows_then_uniform_rows():
    t = oat_targets(torch.tensor([2, 0]), 3, K)
    assert t.shape == (5, K) and torch.equal(t[:2], F.one_hot(torch.tensor([2, 0]), K).float())
    assert torch.allclose(t[2:], torch.full((3, K), 0.1))
    rows = torch.full((2, K), 0.1)
    assert torch.equal(oat_targets(rows, 1, K)[:2], rows)  # probability rows pass unchanged


def test_the_ood_attack_ascends_the_cross_entropy_to_the_uniform_target(batch, monkeypatch):
    """PGD-AT's attack runs once on [x; x_ood] with targets [onehot(y); uniform] (the official TF code's one
    batch), so on the OOD rows it maximises CE against the uniform distribution."""
    x, y, x_ood = batch
    module = OATPGDAT(SmallCNN(width=4), eps=EPS, steps=3, step_size=0.08)
    seen = []
    original = PGD.__call__

    def recording(attack, model, inputs, targets):
        x_adv = original(attack, model, inputs, targets)
        seen.append((inputs, targets, x_adv))
        return x_adv

    monkeypatch.setattr(PGD, "__call__", recording)
    _loss_with_ood(module, x, y, x_ood)
    (inputs, targets, x_adv), = seen
    assert torch.equal(inputs, torch.cat([x, x_ood])) and torch.equal(targets, oat_targets(y, 8, K))
    module.eval()
    with torch.no_grad():
        uniform = torch.full((8, K), 0.1)
        before = F.cross_entropy(module.model(x_ood), uniform, reduction="none")
        after = F.cross_entropy(module.model(x_adv[12:]), uniform, reduction="none")
    assert (after > before).all()


# --- the loss ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("weight", [1.0, 2.5])
def test_pgd_at_loss_is_the_weighted_batch_mean(batch, weight):
    """(n CE(f(x_adv), y) + w m CE(f(x_ood_adv), uniform)) / (n + m) from one train-mode forward of both, i.e.
    (n / (n + m)) (L_PGD-AT + w (m / n) CE_uniform); w = 1 is PGD-AT's loss on the concatenated batch."""
    x, y, x_ood = batch
    module = _fixed_perturbation(OATPGDAT(SmallCNN(width=4), eps=EPS, ood_weight=weight))
    reference = copy.deepcopy(module.model).train()
    out = _loss_with_ood(module, x, y, x_ood)
    x_adv = module.perturb(torch.cat([x, x_ood]), None)
    logits = reference(x_adv)
    ce_in, ce_ood = F.cross_entropy(logits[:12], y), F.cross_entropy(logits[12:], torch.full((8, K), 0.1))
    assert torch.allclose(out.loss, (12 * ce_in + weight * 8 * ce_ood) / 20)
    if weight == 1.0:
        assert torch.allclose(out.loss, F.cross_entropy(logits, oat_targets(y, 8, K)))
    assert torch.equal(out.adv_logits, logits[:12]) and out.clean_logits is None  # accuracy on the digits only
    assert all(torch.equal(a, b) for a, b in zip(module.model.buffers(), reference.buffers()))  # one BN update


def test_trades_loss_is_the_official_one_on_the_concatenated_batch(batch):
    """``train_oat``: trades_loss on torch.cat((data, data_aug)) with one-hot and 0.1 rows, batch means over
    all of them; the OOD part is CE(f(x_ood), uniform) + beta KL(f(x_ood) || f(x_ood_adv))."""
    x, y, x_ood = batch
    module = _fixed_perturbation(OATTRADES(SmallCNN(width=4), eps=EPS, beta=6.0))
    reference = copy.deepcopy(module.model).train()
    out = _loss_with_ood(module, x, y, x_ood)
    inputs = torch.cat([x, x_ood])
    expected = trades_objective(reference, inputs, module.perturb(inputs, None), oat_targets(y, 8, K), beta=6.0)
    assert torch.allclose(out.loss, expected.loss, rtol=1e-6)
    assert torch.equal(out.clean_logits, expected.clean_logits[:12])


def test_without_ood_images_it_trains_as_its_base(tmp_path):
    def run(cls):
        torch.manual_seed(0)
        module = cls(SmallCNN(width=4), eps=EPS, steps=2, step_size=0.1, optimizer=sgd())  # OAT: wd 2e-4 otherwise
        quiet_trainer(tmp_path, max_steps=3, limit_val_batches=0).fit(module, DigitsDataModule(batch_size=16))
        return torch.cat([p.detach().flatten() for p in module.parameters()])

    with pytest.warns(UserWarning, match="no OOD images"):
        oat = run(OATPGDAT)
    assert torch.equal(oat, run(PGDAT))


def test_fits_on_ood_batches_with_awp_and_bf16(tmp_path):
    module = OATTRADES(SmallCNN(width=4), eps=EPS, steps=2, step_size=0.1, val_attack_steps=1, awp_gamma=0.01)
    data = OODDataModule(DigitsDataModule(batch_size=16, cutmix=True), shuffled_digits(64), ood_batch_size=8)
    trainer = quiet_trainer(tmp_path, max_steps=3, limit_val_batches=1, precision="bf16-mixed")
    trainer.fit(module, data)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert trainer.callback_metrics["train/ood_loss"] > 0 and data.step == 3


def test_training_steps_with_ood_images_do_not_sync_with_the_host(tmp_path):
    module, seen = OATPGDAT(SmallCNN(width=4), eps=EPS, steps=2, step_size=0.1), []
    module.training_step = recorded(module.training_step, "cpu", seen)
    data = OODDataModule(DigitsDataModule(batch_size=16), shuffled_digits(64))
    quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=3, limit_val_batches=0).fit(module, data)
    assert seen == [[], []], seen


@pytest.mark.parametrize("kwargs,name", [({"ood_weight": -1.0}, "ood_weight"), ({"ood_inputs": 1.5}, "ood_inputs"),
                                         ({"num_classes": 1}, "num_classes")])
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        OATTRADES(SmallCNN(width=4), **kwargs)


def test_ood_items_that_are_not_images_are_refused(batch):
    x, y, x_ood = batch
    module = OATPGDAT(SmallCNN(width=4), eps=EPS)
    with pytest.raises(ValueError, match="OOD images"):
        module.read_ood((x, y, torch.zeros(12, dtype=torch.bool)))  # e.g. GeneratedDataModule's is_generated
    assert torch.equal(module.read_ood({"image": x, "ood": x_ood}), x_ood)
    assert OATPGDAT(SmallCNN(width=4), ood_inputs=0).read_ood((x_ood, y)) is x_ood
    with pytest.raises(ValueError, match="do not match"):
        _loss_with_ood(module, x, y, torch.rand(8, 1, 4, 4))


# --- OODDataModule -------------------------------------------------------------------------------------

def _wrapped(ood, training=True, **kwargs):
    dm = OODDataModule(DigitsDataModule(batch_size=16, **kwargs.pop("data", {})), ood, **kwargs)
    dm.trainer = SimpleNamespace(training=training, global_rank=0, world_size=1)
    dm.setup("fit")
    return dm


def test_the_datamodule_appends_ood_images_in_shuffled_passes():
    ood = torch.arange(40, dtype=torch.float32).view(40, 1, 1, 1).expand(40, 1, 8, 8) / 40  # image i holds i / 40
    dm = _wrapped(ood, ood_batch_size=16)
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, K, (16,))
    drawn = []
    for _ in range(3):
        out = dm.on_before_batch_transfer((x, y), 0)
        assert len(out) == 3 and out[0] is x and out[2].shape == (16, 1, 8, 8)
        drawn += (out[2][:, 0, 0, 0] * 40).round().long().tolist()
    assert sorted(drawn[:40]) == list(range(40))  # the first pass holds every image once
    assert set(dm.on_before_batch_transfer({"x": x}, 0)) == {"x", "ood"}
    resumed = _wrapped(ood, ood_batch_size=16)
    resumed.load_state_dict(dm.state_dict())
    assert torch.equal(resumed.next_ood_batch(), dm.next_ood_batch())  # the draws continue after a resume
    dm.trainer.training = False
    assert dm.on_before_batch_transfer((x, y), 0) == (x, y)  # validation and test batches unchanged


def test_the_data_modules_own_hook_runs_on_its_part():
    dm = _wrapped(shuffled_digits(32), ood_batch_size=4, data={"cutmix": True})
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, K, (16,))
    batch = dm.on_before_batch_transfer((x, y), 0)
    mixed = dm.on_after_batch_transfer(batch, 0)
    assert len(mixed) == 3 and mixed[1].shape == (16, K) and mixed[2] is batch[2]  # CutMix rows; OOD untouched


def test_ood_images_from_files_datasets_and_datamodules(tmp_path):
    images = (np.random.default_rng(0).random((20, 8, 8, 1)) * 255).astype(np.uint8)  # [N, H, W, C]
    np.save(tmp_path / "ood.npy", images)
    np.savez(tmp_path / "ood.npz", data=images.transpose(0, 3, 1, 2))  # [N, C, H, W], the official layout
    for source, key in ((str(tmp_path / "ood.npy"), "image"), (str(tmp_path / "ood.npz"), "data")):
        x = _wrapped(source, ood_batch_size=20, image_key=key).next_ood_batch()
        order = x.flatten(1).sum(1).argsort()
        expected = torch.from_numpy(images.transpose(0, 3, 1, 2)).float() / 255
        assert torch.allclose(x[order], expected[expected.flatten(1).sum(1).argsort()])
    assert _wrapped(TensorDataset(torch.rand(5, 1, 8, 8)), ood_batch_size=3).next_ood_batch().shape == (3, 1, 8, 8)
    digits = DigitsDataModule()
    x = _wrapped(digits, ood_batch_size=4).next_ood_batch()
    assert x.shape == (4, 1, 8, 8) and x.max() <= 1
    with pytest.raises(ValueError, match="do not match"):
        _wrapped(torch.rand(5, 3, 8, 8))
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        _wrapped(str(tmp_path / "missing.npy"))
    with pytest.raises(ValueError, match="no array 'image'"):
        _wrapped(str(tmp_path / "ood.npz"))


# --- the recipe and the behaviour ----------------------------------------------------------------------

def test_default_recipes_follow_the_official_scripts():
    def adjust_learning_rate(epoch, epochs=50):  # train_trades_cifar10.py, epochs counted from 1, EPS = 100 // 2
        lr = 0.1
        if epoch >= int(epochs * 0.75):
            lr = 0.1 * 0.1
        if epoch >= int(epochs) * 0.9:
            lr = 0.1 * 0.01
        return lr

    with pytest.warns(UserWarning, match="no OOD images"):
        check_default_recipe(OATTRADES(SmallCNN(width=4), steps=1), 5, 10,
                             [adjust_learning_rate(epoch) for epoch in range(1, 51)], weight_decay=2e-4)
        # AT/config.json: 80k steps, lr 0.1 -> 0.01 at 40k -> 0.001 at 60k; weight decay 2e-4
        check_default_recipe(OATPGDAT(SmallCNN(width=4), steps=1), 4, 10, [0.1] * 20 + [0.01] * 10 + [0.001] * 10,
                             weight_decay=2e-4)


def _max_probability(model, x):
    with torch.no_grad():
        return F.softmax(model(x), 1).amax(1).mean().item()


def test_oat_beats_standard_training_and_lowers_confidence_off_distribution(standard_digits_accuracy, monkeypatch):
    """OAT + PGD-AT with shuffled-pixel digits as the OOD set: robust where standard training is not, and less
    confident on unseen OOD images than PGD-AT. Measured (1 thread): 0.92 clean / 0.51 PGD-20 (PGD-AT alone
    0.94 / 0.55; standard 0.99 / 0.00)."""
    ood = shuffled_digits(seed=1)
    monkeypatch.setattr(digits_bench, "digits", lambda: OODDataModule(DigitsDataModule(batch_size=64), ood))
    module = fit_on_digits(OATPGDAT(SmallCNN(width=16), eps=EPS, steps=5, step_size=0.08, optimizer=sgd()))
    assert module.trainer.callback_metrics["train/ood_loss"] > 0
    monkeypatch.undo()
    acc = digits_accuracy(module.model)
    assert acc["clean"] > 0.85 and acc["pgd"] > standard_digits_accuracy["pgd"] + 0.35
    base = fit_on_digits(PGDAT(SmallCNN(width=16), eps=EPS, steps=5, step_size=0.08, optimizer=sgd()))
    unseen = shuffled_digits(seed=2)
    assert _max_probability(module.model, unseen) < _max_probability(base.model, unseen) - 0.1
