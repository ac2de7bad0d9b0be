"""CIFAR10DataModule on small files written in CIFAR-10's real on-disk format (python pickles + tar.gz)."""

import pickle
import shutil
import tarfile
from pathlib import Path
from unittest.mock import Mock
from urllib.error import URLError

import lightning.pytorch as L
import numpy as np
import pytest
import torch
from torchvision import datasets
from fake_server import md5, serve

from lit_robust.cli import main
from lit_robust.datamodules import CIFAR10DataModule, CIFAR100DataModule
from lit_robust.datamodules.files import DownloadError
from lit_robust.defenses import PGDAT
from lit_robust.models import CIFAR10_MEAN, CIFAR10_STD, SmallCNN

ROOT = Path(__file__).resolve().parents[1]
PER_BATCH, N_TEST = 40, 50


def _write_fake_cifar(folder: Path):
    """Five training pickles, one test pickle and batches.meta, as the original archive holds them."""
    rng = np.random.RandomState(0)
    folder.mkdir(parents=True)
    raw = {}
    for name, n in [*((f"data_batch_{i}", PER_BATCH) for i in range(1, 6)), ("test_batch", N_TEST)]:
        entry = {"batch_label": name, "data": rng.randint(0, 256, (n, 3072), dtype=np.uint8),
                 "labels": rng.randint(0, 10, n).tolist(), "filenames": [f"{name}_{i}.png" for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(entry))
        raw[name] = entry
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"class{i}" for i in range(10)]}))
    return raw


@pytest.fixture
def fake_cifar(tmp_path, monkeypatch):
    """Fake files in data_dir, and torchvision's checksums pointed at them (the real ones cannot match)."""
    folder = tmp_path / "data" / datasets.CIFAR10.base_folder
    raw = _write_fake_cifar(folder)
    cls = datasets.CIFAR10
    monkeypatch.setattr(cls, "train_list", [[n, md5(folder / n)] for n, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[n, md5(folder / n)] for n, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5(folder / "batches.meta")})
    return tmp_path / "data", raw


def test_splits_follow_rice_validation_split_and_raw_pixels(fake_cifar):
    data_dir, raw = fake_cifar
    dm = CIFAR10DataModule(str(data_dir), batch_size=8, val_size=20, num_workers=0)
    dm.prepare_data()
    dm.setup()
    n_train = 5 * PER_BATCH
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": n_train - 20, "val": 20, "test": N_TEST}
    train_pixels = np.concatenate([raw[f"data_batch_{i}"]["data"] for i in range(1, 6)])
    train_labels = np.array(sum((raw[f"data_batch_{i}"]["labels"] for i in range(1, 6)), []))
    order = np.random.RandomState(0).permutation(n_train)  # generate_validation.py's recipe
    val_idx, train_idx = order[:20], np.sort(order[20:])
    x, y = dm.splits["val"][3]
    assert torch.allclose(x, torch.tensor(train_pixels[val_idx[3]].reshape(3, 32, 32) / 255.0, dtype=torch.float32))
    assert y == train_labels[val_idx[3]]
    images, labels = dm.arrays["train"]
    assert torch.equal(images, torch.from_numpy(train_pixels[train_idx].reshape(-1, 3, 32, 32)))
    assert torch.equal(labels, torch.from_numpy(train_labels[train_idx]))
    xt, yt = dm.splits["test"][0]
    assert torch.allclose(xt, torch.tensor(raw["test_batch"]["data"][0].reshape(3, 32, 32) / 255.0, dtype=torch.float32))
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (8, 3, 32, 32) and xb.dtype == torch.float32 and xb.min() >= 0 and xb.max() <= 1
    assert yb.dtype == torch.long


def test_training_augmentation_is_reflect_pad_crop_and_flip(fake_cifar):
    data_dir, _ = fake_cifar
    dm = CIFAR10DataModule(str(data_dir), val_size=20, num_workers=0)
    dm.setup()
    plain = dm.arrays["train"][0][0].float() / 255
    torch.manual_seed(0)
    views = [dm.splits["train"][0][0] for _ in range(16)]
    assert any(not torch.equal(v, plain) for v in views)
    padded = torch.nn.functional.pad(plain[None], (4, 4, 4, 4), mode="reflect")[0]
    for v in views:  # every view is a 32x32 window of the reflect-padded image, possibly mirrored
        windows = [padded[:, i:i + 32, j:j + 32] for i in range(9) for j in range(9)]
        assert any(torch.allclose(v, w) or torch.allclose(v, w.flip(-1)) for w in windows)
    unaugmented = CIFAR10DataModule(str(data_dir), val_size=20, augment=False)
    unaugmented.setup()
    assert torch.equal(unaugmented.splits["train"][0][0], plain)


def _write_fake_cifar100(folder: Path):
    """CIFAR-100's archive: ``train`` and ``test`` pickles with fine and coarse labels, and ``meta``."""
    rng = np.random.RandomState(1)
    folder.mkdir(parents=True)
    raw = {}
    for name, n in [("train", 60), ("test", 30)]:
        entry = {"data": rng.randint(0, 256, (n, 3072), dtype=np.uint8), "fine_labels": rng.randint(0, 100, n).tolist(),
                 "coarse_labels": rng.randint(0, 20, n).tolist(), "filenames": [f"{name}_{i}.png" for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(entry))
        raw[name] = entry
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)],
                                                "coarse_label_names": [f"s{i}" for i in range(20)]}))
    return raw


def test_cifar100_fine_labels(tmp_path, monkeypatch):
    cls = datasets.CIFAR100
    folder = tmp_path / cls.base_folder
    raw = _write_fake_cifar100(folder)
    monkeypatch.setattr(cls, "train_list", [["train", md5(folder / "train")]])
    monkeypatch.setattr(cls, "test_list", [["test", md5(folder / "test")]])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5(folder / "meta")})
    dm = CIFAR100DataModule(str(tmp_path), val_size=10, num_workers=0)
    dm.prepare_data()
    dm.setup()
    assert dm.num_classes == 100 and {k: len(v) for k, v in dm.splits.items()} == {"train": 50, "val": 10, "test": 30}
    x, y = dm.splits["test"][5]
    assert y == raw["test"]["fine_labels"][5]
    assert torch.allclose(x, torch.tensor(raw["test"]["data"][5].reshape(3, 32, 32) / 255.0, dtype=torch.float32))
    module = PGDAT(SmallCNN(3, 100, 32, 4, CIFAR10_MEAN, CIFAR10_STD), steps=1, val_attack_steps=1, test_attack_steps=1)
    trainer = L.Trainer(accelerator="cpu", fast_dev_run=True, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, dm)
    assert 0 <= trainer.test(module, dm, verbose=False)[0]["test/robust_acc"] <= 1


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_bad_files_are_named_with_their_checksum(fake_cifar, damage):
    data_dir, _ = fake_cifar
    path = data_dir / datasets.CIFAR10.base_folder / "data_batch_3"
    expected_md5 = dict(datasets.CIFAR10.train_list)["data_batch_3"]
    if damage == "corrupt":
        path.write_bytes(path.read_bytes()[:-10])
    else:
        path.unlink()
    message = rf"data_batch_3 is corrupt: MD5 \w+, expected {expected_md5}" if damage == "corrupt" else \
        rf"data_batch_3 is missing \(expected MD5 {expected_md5}\)"
    with pytest.raises(FileNotFoundError, match=message):
        CIFAR10DataModule(str(data_dir), download=False).prepare_data()


@pytest.fixture
def fake_archive(tmp_path, monkeypatch) -> Path:
    """A fake ``cifar-10-python.tar.gz`` (outside data_dir), and torchvision's checksums pointed at it."""
    source = tmp_path / "source"
    _write_fake_cifar(source / datasets.CIFAR10.base_folder)
    archive = tmp_path / datasets.CIFAR10.filename
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source / datasets.CIFAR10.base_folder, arcname=datasets.CIFAR10.base_folder)
    folder = source / datasets.CIFAR10.base_folder
    cls = datasets.CIFAR10
    monkeypatch.setattr(cls, "train_list", [[n, md5(folder / n)] for n, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[n, md5(folder / n)] for n, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5(folder / "batches.meta")})
    monkeypatch.setattr(cls, "tgz_md5", md5(archive))
    return archive


def test_download_goes_through_torchvision_archive_check(tmp_path, monkeypatch, fake_archive):
    """download=True fetches the archive, verifies its MD5, extracts it; here the 'server' is a local file."""
    fetched = serve(monkeypatch, fake_archive)
    dm = CIFAR10DataModule(str(tmp_path / "data"), download=True, val_size=20, num_workers=0)
    dm.prepare_data()
    dm.setup()
    assert fetched == [datasets.CIFAR10.url]  # downloaded once
    assert len(dm.splits["test"]) == N_TEST
    CIFAR10DataModule(str(tmp_path / "data"), download=True).prepare_data()  # complete: nothing fetched
    assert len(fetched) == 1


def test_download_without_network_says_where_to_put_the_archive_and_uses_it_from_there(tmp_path, monkeypatch,
                                                                                       fake_archive):
    offline = URLError(OSError(-3, "Temporary failure in name resolution"))
    monkeypatch.setattr("torchvision.datasets.utils._get_redirect_url", Mock(side_effect=offline))
    cls, data_dir = datasets.CIFAR10, tmp_path / "data"
    with pytest.raises(DownloadError) as caught:
        CIFAR10DataModule(str(data_dir), download=True).prepare_data()
    destination = data_dir / cls.filename
    assert f"could not download {cls.filename} from {cls.url}" in str(caught.value)
    assert f"put it at {destination} (MD5 {cls.tgz_md5})" in str(caught.value)
    assert caught.value.__cause__ is offline
    shutil.copyfile(fake_archive, destination)  # fetched by hand, still offline: checked and extracted
    dm = CIFAR10DataModule(str(data_dir), download=True, val_size=20, num_workers=0)
    dm.prepare_data()
    dm.setup()
    assert len(dm.splits["test"]) == N_TEST


def test_cifar10_recipe_config_runs_end_to_end(fake_cifar, tmp_path, capsys):
    data_dir, _ = fake_cifar
    main(["fit", "--config", str(ROOT / "configs/cifar10/pgd_at.yaml"), f"--trainer.default_root_dir={tmp_path}",
          "--trainer.precision=32", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
          "--trainer.limit_test_batches=1", f"--data.init_args.data_dir={data_dir}", "--data.init_args.batch_size=4",
          "--data.init_args.eval_batch_size=4", "--data.init_args.val_size=20", "--data.init_args.num_workers=0",
          "--model.init_args.steps=1", "--model.init_args.val_attack_steps=1", "--model.init_args.test_attack_steps=1",
          "--model.init_args.test_autoattack=false"])
    out = capsys.readouterr().out
    assert "lit_robust summary: test/clean_acc=" in out
    checkpoints = list(tmp_path.rglob("epoch*-robust*.ckpt"))
    assert checkpoints, "the ModelCheckpoint monitoring val/robust_acc should have saved a best checkpoint"
