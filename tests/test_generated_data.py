"""GeneratedDataModule: real and generated images mixed per batch, memory-mapped .npz parts, ranks, resume."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import RunningStage
from torch.utils.data import DataLoader, DistributedSampler

import lit_robust.datamodules.generated as generated_module
from lit_robust.datamodules import DigitsDataModule, GeneratedDataModule, ImageDataModule
from lit_robust.datamodules.generated import GeneratedParts, PermutationStream
from lit_robust.datamodules.npz import npz_members

REPO = Path(__file__).resolve().parents[1]


def write_parts(directory, sizes, hw=(8, 8), channels=1, max_value=16, seed=0, name="gen"):
    """``np.savez`` parts of random images and labels; returns the paths and the concatenated arrays."""
    rng = np.random.default_rng(seed)
    paths, images, labels = [], [], []
    for i, n in enumerate(sizes):
        x = rng.integers(0, max_value + 1, (n, *hw, channels), dtype=np.uint8)
        y = rng.integers(0, 10, n)
        path = str(Path(directory) / f"{name}{i}.npz")
        np.savez(path, image=x, label=y)
        paths.append(path)
        images.append(x)
        labels.append(y)
    return paths, np.concatenate(images), np.concatenate(labels)


def mixed(paths, batch_size=32, augment=False, **kwargs):
    dm = GeneratedDataModule(DigitsDataModule(batch_size=batch_size, augment=augment), paths, **kwargs)
    dm.setup()
    return dm


class TinyCIFAR(ImageDataModule):
    """CIFAR-shaped random images held in memory (32x32x3, 10 classes)."""

    num_classes, dims = 10, (3, 32, 32)

    def __init__(self, n: int = 600, **kwargs) -> None:
        super().__init__(download=False, val_size=100, **kwargs)
        self.n = n

    def verify(self) -> None:
        pass

    def load(self, split):
        g = torch.Generator().manual_seed(0 if split == "train" else 1)
        n = self.n if split == "train" else 100
        images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
        return images, torch.randint(0, 10, (n,), generator=g)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return write_parts(tmp_path_factory.mktemp("generated"), [300, 200, 100])


# --- batch composition -------------------------------------------------------------------------


@pytest.mark.parametrize("emulated_workers", [0, 4])
def test_every_batch_has_the_exact_real_count_on_every_rank_and_epoch(parts, emulated_workers):
    dm = mixed(parts[0], batch_size=40, emulated_workers=emulated_workers)
    real = 12 if emulated_workers else round(40 * 0.3)  # 4 workers: round(10 * 0.3) = 3 unique real, x 4
    assert (dm.real_count, dm.generated_count) == (real, 40 - real)
    lengths = set()
    for rank in (0, 1):
        loader = dm.loader(rank, world_size=2)
        for epoch in (0, 1):
            loader.sampler.set_epoch(epoch)
            batches = list(loader)
            lengths.add(len(batches))
            for x, y, is_generated in batches:
                assert x.shape == (40, 1, 8, 8) and y.shape == (40,) and y.dtype == torch.int64
                assert is_generated.dtype == torch.bool
                assert torch.equal(is_generated, torch.arange(40) >= real)
    assert lengths == {dm.num_batches(2)} == {math_ceil(1258, 80)}


def math_ceil(a, b):
    return -(-a // b)


def test_deepmind_and_dm_improves_at_batch_arithmetic(parts):
    real = DigitsDataModule(batch_size=1024)
    deepmind = GeneratedDataModule(real, parts[0], emulated_workers=4)  # jax/experiment.py: 77 x 4 + 716
    assert (deepmind.unique_real, deepmind.real_count, deepmind.generated_count) == (77, 308, 716)
    assert GeneratedDataModule(real, parts[0]).real_count == 307  # round(307.2)
    assert GeneratedDataModule(real, parts[0], batch_size=512).real_count == 154  # Wang et al.: 512 - int(358.4)


def test_epoch_length_in_samples(parts):
    dm = mixed(parts[0], batch_size=32, epoch_length=1000)
    assert dm.num_batches(1) == 32 and dm.num_batches(2) == 16 and len(dm.loader()) == 32
    assert mixed(parts[0], batch_size=32).num_batches(1) == math_ceil(1258, 32)  # "real": the training split


def test_real_images_are_disjoint_across_ranks_and_are_the_indexed_images(parts):
    dm = mixed(parts[0], batch_size=32)
    train_x, train_y = dm.real.arrays["train"]
    seen = []
    for rank in (0, 1):
        loader = dm.loader(rank, 2)
        for b, (x, y, _) in enumerate(loader):
            real, _ = loader.dataset.indices(0, b)
            assert torch.equal(x[:len(real)], train_x[real].float() / 16) and torch.equal(y[:len(real)], train_y[real])
            seen.append(real)
    seen = np.concatenate(seen)
    assert len(seen) == 2 * dm.num_batches(2) * dm.real_count <= len(train_y)
    assert len(np.unique(seen)) == len(seen)  # one pass of the permutation: no image on two ranks or twice


def test_emulated_workers_repeat_real_images_with_independent_augmentations(parts):
    plain = next(iter(mixed(parts[0], batch_size=40, emulated_workers=4).loader()))[0]
    real = plain[:12].view(3, 4, 1, 8, 8)
    assert (real == real[:, :1]).all()  # each unique real image 4 times in a row
    assert len(torch.unique(plain[12:].flatten(1), dim=0)) == 28  # generated images are not repeated
    augmented = next(iter(mixed(parts[0], batch_size=40, emulated_workers=4, augment=True).loader()))[0]
    copies = augmented[:12].view(3, 4, 1, 8, 8)
    assert not (copies == copies[:, :1]).all(dim=(2, 3, 4))[:, 1:].all()  # the copies are cropped differently


def test_permutation_stream_is_a_bijection_and_differs_between_passes():
    for n in (1, 2, 3, 7, 64, 1000, 1023, 4097):
        stream = PermutationStream(n, seed=5, salt=2)
        first, second = stream.take(0, n), stream.take(n, n)
        assert sorted(first) == list(range(n)) and sorted(second) == list(range(n))
        if n >= 64:
            assert not np.array_equal(first, second) and not np.array_equal(first, np.arange(n))
        if n >= 1000:  # a random permutation's correlation with the identity has sd 1 / sqrt(n)
            assert abs(np.corrcoef(first, np.arange(n))[0, 1]) < 0.1
    assert np.array_equal(PermutationStream(1000, 5, 2).take(10, 30), PermutationStream(1000, 5, 2).take(0, 40)[10:])


def test_generated_draws_with_and_without_replacement(parts):
    n = len(parts[2])  # 600 generated images in 3 parts
    without = mixed(parts[0], batch_size=40, real_fraction=0.5, replacement=False, epoch_length=2400)
    drawn = [without.loader(rank, 2).dataset.indices(0, b)[1] for b in range(without.num_batches(2)) for rank in (0, 1)]
    drawn = np.concatenate(drawn)  # 30 batches x 2 ranks x 20 = 1200 draws: two passes over the 600
    assert sorted(drawn[:n]) == list(range(n)) and sorted(drawn[n:]) == list(range(n))

    draws = 20_000
    withr = mixed(parts[0], batch_size=40, real_fraction=0.5, epoch_length=2 * draws)
    drawn = np.concatenate([withr.loader().dataset.indices(0, b)[1] for b in range(withr.num_batches())])
    assert len(drawn) == draws and drawn.min() >= 0 and drawn.max() < n
    counts = np.bincount(drawn, minlength=n)  # multinomial: mean 33.3, sd ~5.8 per image
    assert counts.min() > 5 and counts.max() < 70 and abs(counts.std() - np.sqrt(draws / n)) < 1.0
    first = drawn[:n]  # n draws with replacement repeat: about n / e distinct images are never drawn
    assert abs(n - len(np.unique(first)) - n / np.e) < 40
    other_rank = mixed(parts[0], batch_size=40, real_fraction=0.5).loader(1, 2).dataset.indices(0, 0)[1]
    assert not np.array_equal(other_rank, withr.loader(0, 2).dataset.indices(0, 0)[1])


def test_multi_part_indices_read_the_right_image(parts):
    paths, images, labels = parts
    generated = GeneratedParts.open(paths, "image", "label", (1, 8, 8), 10)
    index = np.array([0, 299, 300, 499, 500, 599, 450, 12, 450])  # part boundaries, repeats, any order
    x, y = generated.read(index)
    assert np.array_equal(x, images[index]) and np.array_equal(y, labels[index])

    dm = mixed(paths, batch_size=40, real_fraction=0.25)
    loader = dm.loader()
    x, y, _ = next(iter(loader))
    _, drawn = loader.dataset.indices(0, 0)
    assert np.array_equal((x[10:] * 16).round().byte().permute(0, 2, 3, 1).numpy(), images[drawn])
    assert np.array_equal(y[10:].numpy(), labels[drawn])


MEMORY_SCRIPT = """
import json, sys, tracemalloc
from pathlib import Path
import torch
sys.path.insert(0, sys.argv[1])
from test_generated_data import TinyCIFAR
from lit_robust.datamodules import GeneratedDataModule

def anon_kb():
    lines = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) for line in lines if line.startswith("RssAnon:"))

torch.set_num_threads(1)
dm = GeneratedDataModule(TinyCIFAR(batch_size=512, augment=True, num_workers=0), sys.argv[2:], epoch_length=80 * 512)
dm.setup()
before, read = anon_kb(), 0
tracemalloc.start()
for i, (x, y, is_generated) in enumerate(dm.loader()):
    read += int(is_generated.sum()) * 32 * 32 * 3
    if i == 2:
        warm = anon_kb()
print(json.dumps({"setup_kb": before, "warm_kb": warm, "end_kb": anon_kb(), "read": read,
                  "numpy_peak": tracemalloc.get_traced_memory()[1]}))
"""


def test_memory_stays_flat_over_a_large_memmapped_set(tmp_path):
    """Iterating batches that read 1.8 times the images of a 49 MB two-part set allocates nothing beyond a batch.

    What is measured, honestly: tracemalloc sees every NumPy allocation (the memmap reads, index
    arrays), RssAnon the private memory of the process. Pages of the memory-mapped files count in
    RssFile instead: page cache the kernel can drop, not memory the loader holds. glibc's dynamic
    mmap threshold would otherwise keep up to ~90 MB of freed batch buffers on its heap whatever the
    set's size, so the run fixes the threshold (MALLOC_MMAP_THRESHOLD_) to see live memory only."""
    per_part = 8_000
    rng = np.random.default_rng(0)
    paths = [str(tmp_path / f"big{i}.npz") for i in range(2)]
    for path in paths:
        np.savez(path, image=rng.integers(0, 256, (per_part, 32, 32, 3), dtype=np.uint8),
                 label=rng.integers(0, 10, per_part))
    set_bytes, batch_bytes = 2 * per_part * 32 * 32 * 3, 512 * 3 * 32 * 32 * 4
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(Path(__file__).parent), *paths], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    assert m["read"] > 1.5 * set_bytes  # 80 batches x 358 generated images: 1.8 times the set's 16,000
    assert m["numpy_peak"] < 3 * 512 * 32 * 32 * 3  # a few batches of uint8 images, whatever the set's size
    grown = (m["end_kb"] - m["warm_kb"]) * 1024
    assert grown < 2 * batch_bytes, f"private memory grew by {grown / 2**20:.0f} MB while reading the set 1.8 times"


# --- targets, CutMix -----------------------------------------------------------------------------


def test_label_smoothing_only_on_generated_samples(parts):
    dm = mixed(parts[0], batch_size=40, generated_label_smoothing=0.1)
    x, y, is_generated = next(iter(dm.loader()))
    hard = next(iter(mixed(parts[0], batch_size=40).loader()))[1]
    assert y.shape == (40, 10) and y.dtype == torch.float32
    onehot = F.one_hot(hard, 10).float()
    assert torch.equal(y[~is_generated], onehot[~is_generated])
    assert torch.allclose(y[is_generated], 0.9 * onehot[is_generated] + 0.01)  # DeepMind: 0.91 / 0.01
    assert torch.allclose(y.sum(1), torch.ones(40))


def test_cutmix_runs_in_training_only_per_emulated_worker(parts, monkeypatch):
    dm = mixed(parts[0], batch_size=40, emulated_workers=4, cutmix=True)
    batch = next(iter(dm.loader()))
    calls = []

    def spy(x, y, **kwargs):
        calls.append(kwargs)
        return x + 1, F.one_hot(y, 10).float()

    monkeypatch.setattr(generated_module, "cutmix", spy)
    dm.trainer = SimpleNamespace(training=False)
    assert dm.on_after_batch_transfer(batch, 0) is batch
    dm.trainer = SimpleNamespace(training=True)
    x, y, is_generated = dm.on_after_batch_transfer(batch, 0)
    assert calls == [{"num_classes": 10, "split": 4}]  # DeepMind: utils.cutmix(..., split=self._repeat_batch)
    assert torch.equal(x, batch[0] + 1) and y.shape == (40, 10) and is_generated is batch[2]
    dm.cutmix = False
    assert dm.on_after_batch_transfer(batch, 0) is batch


def test_validation_and_test_are_the_real_splits(parts):
    dm = mixed(parts[0], batch_size=32)
    for loader, split in ((dm.val_dataloader(), "val"), (dm.test_dataloader(), "test")):
        x, y = (torch.cat(t) for t in zip(*loader))
        images, labels = dm.real.arrays[split]
        assert torch.equal(x, images.float() / 16) and torch.equal(y, labels)
    assert len(dm.real.arrays["val"][1]) == 180


# --- workers, resume, Lightning ------------------------------------------------------------------


def test_two_workers_give_the_same_batches_as_none(parts):
    kwargs = dict(batch_size=40, augment=True, generated_label_smoothing=0.1, emulated_workers=2)
    loaders = [mixed(parts[0], num_workers=w, **kwargs).loader(1, 2) for w in (0, 2)]
    for epoch in (0, 1):
        batches = []
        for loader in loaders:
            loader.sampler.set_epoch(epoch)
            batches.append(list(loader))
        assert len(batches[0]) == len(batches[1]) > 0
        for a, b in zip(*batches):
            assert all(torch.equal(s, t) for s, t in zip(a, b))
    assert not torch.equal(batches[0][0][0], list(loaders[0])[0][0])  # epoch 2 differs from epoch 1


class Recorder(L.LightningModule):
    """Records a fingerprint of every training batch it gets (``record``)."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(64, 10)
        self.seen = []

    def record(self, batch, batch_idx):
        x, y, is_generated = batch
        return (self.current_epoch, batch_idx, float(x.double().sum()), float(y.double().sum()),
                int(is_generated.sum()))

    def training_step(self, batch, batch_idx):
        self.seen.append(self.record(batch, batch_idx))
        return F.cross_entropy(self.net(batch[0].flatten(1)), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(dm, root, ckpt=None, callbacks=(), limit=1.0):
    module = Recorder()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        limit_train_batches=limit, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, default_root_dir=root, callbacks=list(callbacks),
                        enable_checkpointing=bool(callbacks))
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
    return module.seen


def test_resume_mid_epoch_and_at_epoch_end_repeats_the_straight_run(parts, tmp_path):
    """Through Lightning's own checkpoint and restore (the loader's state_dict), three ways of stopping."""
    def data(workers):
        return GeneratedDataModule(DigitsDataModule(batch_size=32, augment=True), parts[0], epoch_length=320,
                                   generated_label_smoothing=0.1, num_workers=workers)

    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, filename="{step}")
    straight = _fit(data(2), tmp_path, callbacks=[saver])  # two workers prefetch ahead: must not count as trained
    assert len(straight) == 20 and [s[:2] for s in straight[8:12]] == [(0, 8), (0, 9), (1, 0), (1, 1)]
    assert len({s[2] for s in straight}) == 20  # every batch differs (epoch 1 is not epoch 0 again)
    # a checkpoint after step 13 (epoch 1, batch 3), resumed without workers: the same batches either way
    assert _fit(data(0), tmp_path, ckpt=str(tmp_path / "step=13.ckpt")) == straight[13:]
    # after the last batch of epoch 0: the resumed run starts epoch 1 at its first batch
    assert _fit(data(2), tmp_path, ckpt=str(tmp_path / "step=10.ckpt")) == straight[10:]
    # epochs cut short by limit_train_batches: after the 6th and last batch of epoch 0 comes epoch 1's first
    saver = ModelCheckpoint(dirpath=tmp_path / "short", every_n_train_steps=6, save_top_k=-1, filename="{step}")
    short = _fit(data(0), tmp_path / "short", callbacks=[saver], limit=6)
    assert [s[:2] for s in short] == [(e, b) for e in (0, 1) for b in range(6)] and short[:6] == straight[:6]
    assert _fit(data(0), tmp_path, ckpt=str(tmp_path / "short" / "step=6.ckpt"), limit=6) == short[6:]


def test_lightning_keeps_the_sampler_under_ddp(parts):
    """Lightning replaces the sampler of a training DataLoader under DDP unless it is a DistributedSampler."""
    trainer = L.Trainer(accelerator="cpu", strategy="ddp", devices=2, logger=False)
    assert trainer._accelerator_connector.is_distributed
    loader = mixed(parts[0]).loader(1, 2)
    prepared = trainer._data_connector._prepare_dataloader(loader, shuffle=True, mode=RunningStage.TRAINING)
    assert prepared is loader and isinstance(loader.sampler, DistributedSampler)
    plain = DataLoader(range(10), batch_size=2, shuffle=True)  # the control: a plain loader is rebuilt
    assert trainer._data_connector._prepare_dataloader(plain, shuffle=True, mode=RunningStage.TRAINING) is not plain


DDP_SCRIPT = """
import json, sys
import lightning.pytorch as L, torch
from test_generated_data import Recorder
from lit_robust.datamodules import DigitsDataModule, GeneratedDataModule

class Record(Recorder):
    def record(self, batch, batch_idx):
        x, y, g = batch
        data = self.trainer.train_dataloader.dataset
        real, gen = data.indices(self.current_epoch, batch_idx)
        return {"real": real.tolist(), "gen": gen.tolist(), "n_gen": int(g.sum()), "n": len(y), "rank": data.rank,
                "world": data.world_size, "same": bool(torch.equal(x, data[(self.current_epoch, batch_idx)][0]))}

torch.set_num_threads(1)
model = Record()
trainer = L.Trainer(accelerator="cpu", strategy="ddp", devices=2, max_epochs=1, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    limit_val_batches=0, num_sanity_val_steps=0)
trainer.fit(model, datamodule=GeneratedDataModule(DigitsDataModule(batch_size=32), sys.argv[2:], num_workers=0))
with open(f"{sys.argv[1]}/rank{trainer.global_rank}.json", "w") as f:
    json.dump(model.seen, f)
"""


def test_two_process_ddp_fit_gives_each_rank_its_own_real_images(parts, tmp_path):
    script = tmp_path / "ddp_generated.py"
    script.write_text(DDP_SCRIPT)
    path = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), *parts[0]], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == math_ceil(1258, 64)
    for r, rows in enumerate(ranks):
        assert all(row["rank"] == r and row["world"] == 2 and row["same"] for row in rows)
        assert all(row["n"] == 32 and row["n_gen"] == 22 for row in rows)
    real = [i for rows in ranks for row in rows for i in row["real"]]
    assert len(real) == len(set(real))
    assert {tuple(row["gen"]) for row in ranks[0]}.isdisjoint({tuple(row["gen"]) for row in ranks[1]})


def test_lightning_cli_builds_it_with_a_nested_real_module(parts, tmp_path):
    from lit_robust.cli import main

    data = {"class_path": "lit_robust.datamodules.GeneratedDataModule",
            "init_args": {"real": {"class_path": "lit_robust.datamodules.DigitsDataModule",
                                   "init_args": {"batch_size": 8, "val_size": 100}},
                          "generated": parts[0], "real_fraction": 0.5, "epoch_length": 640,
                          "generated_label_smoothing": 0.1, "batch_size": 16}}
    cli = main(["--config", str(REPO / "configs/quickstart.yaml"), f"--data={json.dumps(data)}",
                f"--trainer.default_root_dir={tmp_path}"], run=False)
    dm = cli.datamodule
    assert isinstance(dm, GeneratedDataModule) and isinstance(dm.real, DigitsDataModule)
    assert (dm.batch_size, dm.real.val_size, dm.real_count, dm.epoch_length, dm.paths) == (16, 100, 8, 640, parts[0])


# --- bad files and arguments ---------------------------------------------------------------------


def _bad(tmp_path, case):
    path = tmp_path / f"{case}.npz"
    x, y = np.zeros((10, 8, 8, 1), np.uint8), np.arange(10) % 10
    if case == "missing":
        return path, "not found"
    if case == "truncated":
        np.savez(path, image=x, label=y)
        path.write_bytes(path.read_bytes()[:-200])
        return path, "truncated"
    if case == "compressed":
        np.savez_compressed(path, image=x, label=y)
        return path, "np.savez"
    arrays = {"no_label": dict(image=x, target=y), "three_dims": dict(image=x[..., 0], label=y),
              "wrong_size": dict(image=np.zeros((10, 9, 8, 1), np.uint8), label=y),
              "channels_first": dict(image=np.zeros((10, 1, 8, 8), np.uint8), label=y),
              "float_images": dict(image=x.astype(np.float32), label=y),
              "float_labels": dict(image=x, label=y.astype(np.float32)),
              "label_too_big": dict(image=x, label=y + 1), "negative_label": dict(image=x, label=y - 1),
              "length": dict(image=x, label=y[:9])}[case]
    np.savez(path, **arrays)
    expected = {"no_label": "'label'", "three_dims": "[N, 8, 8, 1]", "wrong_size": "[N, 8, 8, 1]",
                "channels_first": "[N, 8, 8, 1]", "float_images": "uint8", "float_labels": "integer",
                "label_too_big": "[0, 10)", "negative_label": "[0, 10)", "length": "one label per image"}[case]
    return path, expected


@pytest.mark.parametrize("case", ["missing", "truncated", "compressed", "no_label", "three_dims", "wrong_size",
                                  "channels_first", "float_images", "float_labels", "label_too_big",
                                  "negative_label", "length"])
def test_each_bad_file_is_named_with_what_was_expected(parts, tmp_path, case):
    path, expected = _bad(tmp_path, case)
    dm = GeneratedDataModule(DigitsDataModule(batch_size=32), [parts[0][0], str(path)])
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        dm.setup()
    assert str(path) in str(error.value) and expected in str(error.value)


def test_a_member_shorter_than_its_header_says_is_refused(tmp_path):
    path = tmp_path / "short.npz"
    np.savez(path, image=np.zeros((10, 8, 8, 1), np.uint8), label=np.arange(10))
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("image.npy")
    image = npz_members(str(path))["image"]
    with open(path, "r+b") as f:  # the .npy header of the member now claims 20 images where 10 are stored
        f.seek(image.offset - 128)
        header = f.read(128)
        f.seek(image.offset - 128)
        f.write(header.replace(b"(10, 8, 8, 1)", b"(20, 8, 8, 1)"))
    assert info.compress_type == zipfile.ZIP_STORED
    with pytest.raises(ValueError, match="short.npz.*declares"):
        npz_members(str(path))


@pytest.mark.parametrize("kwargs, message", [
    (dict(real_fraction=1.5), "real_fraction"), (dict(generated_label_smoothing=1.0), "generated_label_smoothing"),
    (dict(epoch_length="all"), "epoch_length"), (dict(emulated_workers=3), "divisible"),
    (dict(real_fraction=0.01), "no real image"), (dict(real_fraction=0.99), "no generated image"),
    (dict(generated=[]), "at least one")])
def test_bad_arguments_name_the_argument(parts, kwargs, message):
    kwargs = {"generated": parts[0], **kwargs}
    with pytest.raises(ValueError, match=message):
        GeneratedDataModule(DigitsDataModule(batch_size=32), **kwargs)


def test_cutmix_belongs_to_the_mixing_module_not_the_real_one(parts):
    with pytest.raises(ValueError, match="cutmix"):
        GeneratedDataModule(DigitsDataModule(batch_size=32, cutmix=True), parts[0])
