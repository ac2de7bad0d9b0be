"""SVHNDataModule on small .mat files in SVHN's real format (MATLAB v5; X [32, 32, 3, N] uint8, y [N, 1], 10 = digit 0)."""

from pathlib import Path
from unittest.mock import Mock
from urllib.error import URLError

import lightning.pytorch as L
import numpy as np
import pytest
import scipy.io
import torch
from torchvision import datasets
from fake_server import md5, serve

from lit_robust.cli import main
from lit_robust.datamodules.arrays import CropFlip
from lit_robust.datamodules.files import DownloadError
from lit_robust.datamodules.svhn import SVHNDataModule
from lit_robust.defenses import PGDAT
from lit_robust.models import CIFAR10_MEAN, CIFAR10_STD, SmallCNN

SIZES = {"train": 60, "test": 30, "extra": 40}


def _write_fake_svhn(folder: Path) -> dict:
    """train/test/extra_32x32.mat as the originals hold them; returns each split's ([N, 3, 32, 32], labels 0-9)."""
    rng = np.random.RandomState(0)
    folder.mkdir(parents=True, exist_ok=True)
    raw = {}
    for split, n in SIZES.items():
        x = rng.randint(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = rng.randint(1, 11, (n, 1)).astype(np.uint8)
        y[0] = 10  # the digit 0, as SVHN labels it
        scipy.io.savemat(folder / datasets.SVHN.split_list[split][1], {"X": x, "y": y})
        raw[split] = (x.transpose(3, 2, 0, 1), np.where(y[:, 0] == 10, 0, y[:, 0]).astype(np.int64))
    return raw


def _point_md5s_at(folder: Path, monkeypatch):
    """torchvision's checksums replaced by the fake files' (the real ones cannot match)."""
    table = {split: [url, name, md5(folder / name)] for split, (url, name, _) in datasets.SVHN.split_list.items()}
    monkeypatch.setattr(datasets.SVHN, "split_list", table)


@pytest.fixture
def fake_svhn(tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    raw = _write_fake_svhn(data_dir)
    _point_md5s_at(data_dir, monkeypatch)
    return data_dir, raw


def _svhn(data_dir, **kwargs):
    dm = SVHNDataModule(str(data_dir), **{"download": False, "val_size": 10, "num_workers": 0, "batch_size": 16, **kwargs})
    dm.prepare_data()
    dm.setup()
    return dm


def _keys(images) -> list:
    """Each uint8 image as bytes, to compare sets of images."""
    return [image.numpy().tobytes() for image in images]


def test_splits_raw_pixels_and_labels_with_ten_mapped_to_zero(fake_svhn):
    data_dir, raw = fake_svhn
    dm = _svhn(data_dir)
    assert (dm.num_classes, dm.dims, dm.pad, dm.flip) == (10, (3, 32, 32), 4, False)
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 50, "val": 10, "test": 30}
    x, y = dm.splits["test"][0]  # test label 0 was written as 10
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32)
    assert torch.equal(x, torch.from_numpy(raw["test"][0][0].astype(np.float32) / 255))
    assert y == 0 and torch.equal(dm.arrays["test"][1], torch.from_numpy(raw["test"][1]))
    val_idx = np.random.RandomState(0).permutation(60)[:10]  # ImageDataModule's seeded hold-out
    assert torch.equal(dm.arrays["val"][0], torch.from_numpy(raw["train"][0][val_idx]))
    assert torch.equal(dm.arrays["val"][1], torch.from_numpy(raw["train"][1][val_idx]))
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        xb, yb = next(iter(loader))
        assert xb.dtype == torch.float32 and xb.shape[1:] == (3, 32, 32) and 0 <= xb.min() and xb.max() <= 1
        assert yb.dtype == torch.int64 and 0 <= yb.min() and yb.max() <= 9
    assert 0 in dm.arrays["train"][1] or 0 in dm.arrays["val"][1]  # the train file's 10 arrived as 0


def test_validation_split_is_seeded_and_disjoint_from_training(fake_svhn):
    data_dir, raw = fake_svhn
    a, b, other = _svhn(data_dir, seed=0), _svhn(data_dir, seed=0), _svhn(data_dir, seed=1)
    assert torch.equal(a.arrays["val"][0], b.arrays["val"][0])
    assert not torch.equal(a.arrays["val"][0], other.arrays["val"][0])
    for dm in (a, other):
        train, val = _keys(dm.arrays["train"][0]), _keys(dm.arrays["val"][0])
        assert set(train).isdisjoint(val)
        assert sorted(train + val) == sorted(_keys(torch.from_numpy(raw["train"][0])))


def test_use_extra_adds_extra_images_to_the_training_pool_only(fake_svhn):
    data_dir, raw = fake_svhn
    plain, extra = _svhn(data_dir), _svhn(data_dir, use_extra=True)
    assert extra.hparams.use_extra is True and plain.hparams.use_extra is False
    assert {k: len(v) for k, v in extra.splits.items()} == {"train": 90, "val": 10, "test": 30}
    pool = {**dict(zip(_keys(torch.from_numpy(raw["train"][0])), raw["train"][1])),
            **dict(zip(_keys(torch.from_numpy(raw["extra"][0])), raw["extra"][1]))}
    seen = {}
    for split in ("train", "val"):
        images, labels = extra.arrays[split]
        seen.update(zip(_keys(images), labels.tolist()))
    assert seen == pool  # every train and extra image, each with its (10 -> 0 mapped) label
    extra_keys = set(_keys(torch.from_numpy(raw["extra"][0])))
    plain_keys = _keys(plain.arrays["train"][0]) + _keys(plain.arrays["val"][0])
    assert extra_keys.isdisjoint(plain_keys) and extra_keys.isdisjoint(_keys(extra.arrays["test"][0]))


def test_augmentation_crops_the_reflect_padded_image_and_never_mirrors(fake_svhn):
    data_dir, _ = fake_svhn
    dm = _svhn(data_dir)
    plain = dm.arrays["train"][0][0].float() / 255
    assert not torch.equal(plain, plain.flip(-1))
    padded = torch.nn.functional.pad(plain[None], (4, 4, 4, 4), mode="reflect")[0]
    windows = torch.stack([padded[:, i:i + 32, j:j + 32] for i in range(9) for j in range(9)])

    def is_window(view):
        return bool((view == windows).flatten(1).all(1).any())

    torch.manual_seed(0)
    views = [dm.splits["train"][0][0] for _ in range(48)]
    assert any(not torch.equal(v, plain) for v in views)  # it does crop
    assert all(is_window(v) for v in views)  # ... and never flips
    # the check can tell: with flips (CIFAR's augmentation) about half the views are mirrored
    flipped = CropFlip(4, flip=True)(plain[None].expand(48, -1, -1, -1))
    assert not all(is_window(v) for v in flipped)
    assert is_window(plain) and not is_window(plain.flip(-1))


def test_on_device_batches_are_unit_floats_and_reshuffled_each_epoch(fake_svhn, monkeypatch):
    data_dir, raw = fake_svhn
    dm = _svhn(data_dir, on_device=True, augment=False, eval_batch_size=8)
    assert dm.trainer is None  # so the arrays stay on the CPU
    epoch = {"now": 0}
    monkeypatch.setattr(dm, "_epoch", lambda: epoch["now"])  # what the fit loop's progress would report

    def one_epoch(loader):
        batches = list(loader)
        assert len(batches) == len(loader)
        for x, y in batches:
            assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1 and y.dtype == torch.int64
        return torch.cat([x for x, _ in batches]), [len(y) for _, y in batches]

    first, sizes = one_epoch(dm.train_dataloader())
    assert sizes == [16, 16, 16, 2]
    again, _ = one_epoch(dm.train_dataloader())
    epoch["now"] = 1
    second, _ = one_epoch(dm.train_dataloader())
    train = dm.arrays["train"][0].float() / 255
    assert torch.equal(first, again) and not torch.equal(first, second) and not torch.equal(first, train)
    assert sorted(_keys((first * 255).round().to(torch.uint8))) == sorted(_keys(dm.arrays["train"][0]))
    val, val_sizes = one_epoch(dm.val_dataloader())
    assert val_sizes == [8, 2] and torch.equal(val, dm.arrays["val"][0].float() / 255)  # in order, unaugmented


@pytest.mark.parametrize("split", ["train", "test", "extra"])
@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_bad_files_are_named_with_their_checksum(fake_svhn, split, damage):
    data_dir, _ = fake_svhn
    _, filename, md5 = datasets.SVHN.split_list[split]
    path = data_dir / filename
    if damage == "corrupt":
        path.write_bytes(path.read_bytes()[:-10])
    else:
        path.unlink()
    with pytest.raises(FileNotFoundError) as error:
        SVHNDataModule(str(data_dir), download=False, use_extra=True).prepare_data()
    message = str(error.value)
    expected = f"expected MD5 {md5}" if damage == "missing" else f"expected {md5}"
    assert f"{path} is {damage}" in message and expected in message and "download=True" in message
    if split == "extra":  # only needed with use_extra
        SVHNDataModule(str(data_dir), download=False, use_extra=False).prepare_data()


def test_download_fetches_the_needed_files_through_torchvision(tmp_path, monkeypatch):
    """download=True: torchvision's download_url (MD5-checked) per file; here the 'server' is a local folder."""
    source = tmp_path / "server"
    raw = _write_fake_svhn(source)
    _point_md5s_at(source, monkeypatch)
    fetched = serve(monkeypatch, source)
    urls = {split: url for split, (url, _, _) in datasets.SVHN.split_list.items()}
    data_dir = tmp_path / "data"
    dm = _svhn(data_dir, download=True)
    assert fetched == [urls["train"], urls["test"]] and not (data_dir / "extra_32x32.mat").exists()
    dm = _svhn(data_dir, download=True, use_extra=True)
    assert fetched == [urls["train"], urls["test"], urls["extra"]]  # files already in place are not fetched again
    assert len(dm.splits["train"]) + len(dm.splits["val"]) == SIZES["train"] + SIZES["extra"]
    assert torch.equal(dm.arrays["test"][0], torch.from_numpy(raw["test"][0]))


def test_cli_instantiates_it_with_use_extra(fake_svhn, tmp_path, monkeypatch):
    data_dir, _ = fake_svhn
    monkeypatch.setattr("sys.argv", ["lit-robust"])  # only args= is parsed
    cli = main([f"--trainer.default_root_dir={tmp_path}", "--model=lit_robust.defenses.PGDAT",
                "--model.model=lit_robust.models.SmallCNN", "--data=lit_robust.datamodules.svhn.SVHNDataModule",
                f"--data.data_dir={data_dir}", "--data.use_extra=true", "--data.val_size=7"], run=False)
    assert isinstance(cli.datamodule, SVHNDataModule)
    assert cli.datamodule.use_extra is True and cli.datamodule.val_size == 7
    assert cli.datamodule.hparams.data_dir == str(data_dir)


@pytest.mark.parametrize("on_device", [False, True])
def test_pgd_at_fits_and_tests_end_to_end(fake_svhn, tmp_path, on_device):
    data_dir, _ = fake_svhn
    model = SmallCNN(in_channels=3, num_classes=10, input_size=32, width=4, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    module = PGDAT(model, eps=8 / 255, steps=1, val_attack_steps=1, test_attack_steps=1)
    dm = SVHNDataModule(str(data_dir), download=False, val_size=10, batch_size=8, num_workers=0,
                        on_device=on_device)
    trainer = L.Trainer(fast_dev_run=True, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, dm)
    assert trainer.state.finished and "train/adv_acc" in trainer.callback_metrics
    results = trainer.test(module, dm, verbose=False)[0]
    assert 0 <= results["test/clean_acc"] <= 1 and 0 <= results["test/robust_acc"] <= 1


def test_download_without_network_names_the_file_the_url_and_where_to_put_it(tmp_path, monkeypatch):
    offline = URLError(OSError(-3, "Temporary failure in name resolution"))
    monkeypatch.setattr("torchvision.datasets.utils._get_redirect_url", Mock(side_effect=offline))
    url, filename, expected_md5 = datasets.SVHN.split_list["train"]
    with pytest.raises(DownloadError) as caught:
        SVHNDataModule(str(tmp_path / "data"), download=True).prepare_data()
    assert f"could not download {filename} from {url}" in str(caught.value) and "name resolution" in str(caught.value)
    assert f"put it at {tmp_path / 'data' / filename} (MD5 {expected_md5})" in str(caught.value)
    assert caught.value.__cause__ is offline
