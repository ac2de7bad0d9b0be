"""CIFAR10CDataModule on a small fake CIFAR-10-C folder in the release's format (one uint8 .npy per corruption)."""

import io
import pickle
import tarfile
from pathlib import Path
from unittest.mock import Mock
from urllib.error import URLError

import lightning.pytorch as L
import numpy as np
import pytest
import torch
from fake_server import md5, serve

from lit_robust.datamodules.cifar_c import (BENCHMARK_CORRUPTIONS, CIFAR10CDataModule, CIFAR100CDataModule,
                                            CorruptedImages)
from lit_robust.datamodules.files import DownloadError
from lit_robust.defenses import PGDAT
from lit_robust.models import CIFAR10_MEAN, CIFAR10_STD, SmallCNN

N = 7  # images per severity (the release has 10,000: nothing may assume it)
FAKE = ("gaussian_noise", "fog", "saturate")  # two benchmark corruptions and an extra one


def _image(corruption: str, severity: int, row: int) -> np.ndarray:
    """A pattern that names its source: channel 0 the (corruption, severity), 1 the row, 2 the pixel position."""
    h, w = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    return np.stack([np.full((32, 32), 16 * FAKE.index(corruption) + severity), np.full((32, 32), 10 * row),
                     h * 7 + w], -1).astype(np.uint8)  # HWC, as in the release


def _label(severity: int, row: int) -> int:
    return (3 * row + severity) % 10  # differs between severities (the release repeats them) to check the rows


def _write_fake(folder: Path, corruptions=FAKE) -> None:
    folder.mkdir(parents=True)
    for name in corruptions:
        np.save(folder / f"{name}.npy", np.stack([_image(name, s, i) for s in range(1, 6) for i in range(N)]))
    np.save(folder / "labels.npy", np.array([_label(s, i) for s in range(1, 6) for i in range(N)], dtype=np.uint8))


def _expected(corruption: str, severity: int, row: int) -> torch.Tensor:
    return torch.from_numpy(_image(corruption, severity, row)).permute(2, 0, 1).float() / 255


@pytest.fixture
def data_dir(tmp_path) -> Path:
    _write_fake(tmp_path / "data" / "CIFAR-10-C")
    return tmp_path / "data"


def _module(data_dir, **kwargs) -> CIFAR10CDataModule:
    dm = CIFAR10CDataModule(str(data_dir), **{"download": False, "corruptions": FAKE, "batch_size": 8, "num_workers": 0, **kwargs})
    dm.prepare_data()
    dm.setup("test")
    return dm


def _check_images(x, names_rows):
    assert x.dtype == torch.float32 and x.shape == (len(names_rows), 3, 32, 32) and 0 <= x.min() and x.max() <= 1
    for image, (corruption, severity, row) in zip(x, names_rows):
        assert torch.equal(image, _expected(corruption, severity, row)), (corruption, severity, row)


def test_combined_loader_tags_every_image_with_its_corruption_and_severity(data_dir):
    dm = _module(data_dir, severities=[2, 5])
    loader = dm.test_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) == 6 and all(len(b) == 4 for b in batches)  # 3 x 2 x 7 = 42 images, 8 a batch
    x, y, c, s = (torch.cat(field) for field in zip(*batches))
    order = [(corruption, severity, row) for corruption in FAKE for severity in (2, 5) for row in range(N)]
    _check_images(x, order)
    assert y.dtype == c.dtype == s.dtype == torch.int64
    assert y.tolist() == [_label(severity, row) for _, severity, row in order]
    assert [dm.corruptions[i] for i in c.tolist()] == [corruption for corruption, _, _ in order]
    assert s.tolist() == [severity for _, severity, _ in order]
    assert dm.test_names == [f"{corruption}/{severity}" for corruption in FAKE for severity in (2, 5)]


def test_per_pair_loaders_follow_test_names_and_the_selection(data_dir):
    dm = _module(data_dir, corruptions=["fog", "gaussian_noise"], severities=[5, 1, 3], combined=False,
                 eval_batch_size=4)
    assert dm.corruptions == ("fog", "gaussian_noise") and dm.severities == (5, 1, 3)
    assert dm.test_names == ["fog/5", "fog/1", "fog/3", "gaussian_noise/5", "gaussian_noise/1", "gaussian_noise/3"]
    loaders = dm.test_dataloader()
    assert len(loaders) == len(dm.test_names)
    for name, loader in zip(dm.test_names, loaders):
        corruption, severity = name.split("/")
        batches = list(loader)
        assert [len(b[0]) for b in batches] == [4, 3] and all(len(b) == 2 for b in batches)
        x, y = (torch.cat(field) for field in zip(*batches))
        _check_images(x, [(corruption, int(severity), row) for row in range(N)])
        assert y.tolist() == [_label(int(severity), row) for row in range(N)]


def test_defaults_are_the_15_benchmark_corruptions_at_5_severities(data_dir):
    dm = CIFAR10CDataModule(str(data_dir), download=False)
    assert dm.corruptions == BENCHMARK_CORRUPTIONS and len(dm.corruptions) == 15 and dm.severities == (1, 2, 3, 4, 5)
    assert len(dm.test_names) == 75
    assert dm.test_names[0] == "gaussian_noise/1" and dm.test_names[-1] == "jpeg_compression/5"
    # The fake folder holds 2 of the 15: reported as an incomplete folder, the first missing file named.
    with pytest.raises(FileNotFoundError, match=r"shot_noise\.npy is missing.*incomplete.*missing shot_noise\.npy, "
                                                r"impulse_noise\.npy"):
        dm.prepare_data()


@pytest.mark.parametrize("kwargs, match", [
    ({"corruptions": ["gaussian_noise", "fogg"]}, r"corruptions must be .*unknown \['fogg'\]"),
    ({"corruptions": []}, r"corruptions must be .*empty"),
    ({"corruptions": ["fog", "fog"]}, r"corruptions must be .*repeated"),
    ({"severities": [1, 6]}, r"severities must be distinct values from \[1, 2, 3, 4, 5\].*unknown \[6\]"),
    ({"severities": [0]}, r"severities must be .*unknown \[0\]"),
    ({"severities": [True]}, r"severities must be .*unknown \[True\]"),
    ({"batch_size": 0}, r"batch_size must be >= 1"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CIFAR10CDataModule("unused", **kwargs)


def test_single_names_and_the_extra_corruptions_are_accepted(data_dir):
    dm = _module(data_dir, corruptions="saturate", severities=4)
    assert dm.corruptions == ("saturate",) and dm.test_names == ["saturate/4"]
    x, y, c, s = next(iter(dm.test_dataloader()))
    _check_images(x, [("saturate", 4, row) for row in range(N)])
    assert c.tolist() == [0] * N and s.tolist() == [4] * N


@pytest.mark.parametrize("name", ["fog.npy", "labels.npy"])
def test_a_missing_file_is_named(data_dir, name):
    (data_dir / "CIFAR-10-C" / name).unlink()
    with pytest.raises(FileNotFoundError, match=rf"CIFAR-10-C/{name} is missing.*incomplete.*download=True"):
        _module(data_dir)


@pytest.mark.parametrize("name", ["fog.npy", "labels.npy"])
@pytest.mark.parametrize("keep", [40, -100])  # cut inside the header, or a few rows short
def test_a_truncated_file_is_named_not_a_numpy_traceback(data_dir, name, keep):
    path = data_dir / "CIFAR-10-C" / name
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(FileNotFoundError, match=rf"{name} is corrupt: not a whole \.npy array, perhaps truncated"):
        _module(data_dir)


@pytest.mark.parametrize("name, array, match", [
    ("fog.npy", np.zeros((34, 32, 32, 3), np.uint8), r"fog\.npy is corrupt: expected uint8 \[35, 32, 32, 3\]"),
    ("fog.npy", np.zeros((30, 32, 32, 3), np.uint8), r"fog\.npy is corrupt: .*got uint8 \[30, 32, 32, 3\]"),
    ("fog.npy", np.zeros((35, 32, 32, 3), np.float32), r"fog\.npy is corrupt: .*got float32"),
    ("fog.npy", np.zeros((35, 3, 32, 32), np.uint8), r"fog\.npy is corrupt: .*got uint8 \[35, 3, 32, 32\]"),
    ("labels.npy", np.zeros(36, np.int64), r"labels\.npy is corrupt: expected integer labels \[5 \* N\]"),
    ("labels.npy", np.zeros(40, np.int64), r"gaussian_noise\.npy is corrupt: expected uint8 \[40, 32, 32, 3\] .*x 8 "),
    ("labels.npy", np.full(35, 10), r"labels\.npy is corrupt: labels in \[10, 10\], expected \[0, 10\)"),
])
def test_rows_must_be_5_severities_matching_the_labels(data_dir, name, array, match):
    np.save(data_dir / "CIFAR-10-C" / name, array)
    with pytest.raises(FileNotFoundError, match=match):
        _module(data_dir)


def test_cifar100c_reads_its_own_folder_with_100_classes(tmp_path):
    _write_fake(tmp_path / "CIFAR-100-C", corruptions=("fog",))
    np.save(tmp_path / "CIFAR-100-C" / "labels.npy", np.arange(5 * N) + 60)
    dm = CIFAR100CDataModule(str(tmp_path), download=False, corruptions=["fog"], num_workers=0)
    dm.setup()
    assert dm.num_classes == 100 and torch.cat([b[1] for b in dm.test_dataloader()]).tolist() == list(range(60, 95))
    (tmp_path / "CIFAR-100-C").rename(tmp_path / "CIFAR-10-C")  # the same files read as CIFAR-10-C: labels too large
    with pytest.raises(FileNotFoundError, match=r"labels in \[60, 94\], expected \[0, 10\)"):
        CIFAR10CDataModule(str(tmp_path), download=False, corruptions=["fog"]).verify()


def test_the_dataset_pickles_without_its_mapped_arrays(data_dir):
    dm = _module(data_dir)
    dataset = dm.splits["test"]
    assert isinstance(dataset, CorruptedImages) and len(dataset) == 3 * 5 * N
    first = dataset[0]
    assert dataset._arrays  # mapped on first use...
    copy = pickle.loads(pickle.dumps(dataset))
    assert not copy._arrays and len(pickle.dumps(dataset)) < 10_000  # ...but a worker gets paths, not pixels
    assert all(torch.equal(torch.as_tensor(a), torch.as_tensor(b)) for a, b in zip(copy[0], first))
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_workers_serve_the_same_batches(data_dir):
    plain = list(_module(data_dir).test_dataloader())
    workers = list(_module(data_dir, num_workers=2).test_dataloader())
    assert all(torch.equal(a, b) for p, w in zip(plain, workers) for a, b in zip(p, w))


@pytest.mark.parametrize("combined", [True, False])
def test_on_device_without_trainer_serves_cpu_tensors_like_the_loader(data_dir, combined):
    dm = _module(data_dir, severities=[3, 1], combined=combined)
    device = _module(data_dir, severities=[3, 1], combined=combined, on_device=True)
    loaders, device_loaders = ([dm.test_dataloader()], [device.test_dataloader()]) if combined else \
        (dm.test_dataloader(), device.test_dataloader())
    assert len(device_loaders) == len(loaders) == (1 if combined else 6)
    for loader, device_loader in zip(loaders, device_loaders):
        batches, device_batches = list(loader), list(device_loader)
        assert len(device_loader) == len(device_batches) == len(batches)
        for batch, device_batch in zip(batches, device_batches):
            assert len(device_batch) == len(batch) == (4 if combined else 2)
            for a, b in zip(batch, device_batch):
                assert b.device.type == "cpu" and b.dtype == a.dtype and torch.equal(a, b)


def test_there_is_no_train_or_validation_split(data_dir):
    dm = _module(data_dir)
    for method in (dm.train_dataloader, dm.val_dataloader):
        with pytest.raises(RuntimeError, match=r"test set only.*trainer\.test"):
            method()


def _archive(tmp_path, members: dict) -> Path:
    archive = tmp_path / "CIFAR-10-C.tar"
    with tarfile.open(archive, "w") as tar:
        for name, payload in members.items():
            if isinstance(payload, Path):
                tar.add(payload, arcname=name)
            else:
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return archive


def _fake_server(monkeypatch, archive: Path) -> list:
    """torchvision's download sees ``archive`` behind every URL, and our class its MD5."""
    monkeypatch.setattr(CIFAR10CDataModule, "md5", md5(archive))
    return serve(monkeypatch, archive)


def test_download_fetches_checks_and_extracts_once_and_repairs_a_damaged_folder(tmp_path, monkeypatch):
    _write_fake(tmp_path / "source" / "CIFAR-10-C")
    fetched = _fake_server(monkeypatch, _archive(tmp_path, {"CIFAR-10-C": tmp_path / "source" / "CIFAR-10-C"}))
    data = tmp_path / "data"
    dm = _module(data, download=True)
    assert fetched == [CIFAR10CDataModule.url] and len(dm.splits["test"]) == 3 * 5 * N
    _module(data, download=True)
    assert len(fetched) == 1  # complete: nothing fetched or extracted again
    fog = data / "CIFAR-10-C" / "fog.npy"
    fog.write_bytes(fog.read_bytes()[:-100])
    dm = _module(data, download=True)  # damaged: extracted again from the kept archive (its MD5 still matches)
    assert len(fetched) == 1 and fog.stat().st_size == (tmp_path / "source" / "CIFAR-10-C" / "fog.npy").stat().st_size
    x, _, _, _ = next(iter(dm.test_dataloader()))
    _check_images(x, [("gaussian_noise", 1, row) for row in range(N)] + [("gaussian_noise", 2, 0)])


def test_download_refuses_an_archive_writing_outside_data_dir(tmp_path, monkeypatch):
    _write_fake(tmp_path / "source" / "CIFAR-10-C")
    archive = _archive(tmp_path, {"CIFAR-10-C": tmp_path / "source" / "CIFAR-10-C", "../evil": b"gotcha"})
    _fake_server(monkeypatch, archive)
    data = tmp_path / "deep" / "data"
    with pytest.raises(ValueError, match=r"'\.\./evil' would be written outside"):
        _module(data, download=True)
    assert not (tmp_path / "deep" / "evil").exists() and not (data / "CIFAR-10-C").exists()
    assert sorted(p.name for p in data.iterdir()) == ["CIFAR-10-C.tar"]  # no staging folder left either


def _pgdat() -> PGDAT:
    model = SmallCNN(in_channels=3, num_classes=10, input_size=32, width=4, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    return PGDAT(model, eps=8 / 255, steps=1,
                 val_attack_steps=1, test_attack_steps=1)


def _trainer(tmp_path) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, fast_dev_run=True, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp_path)


@pytest.mark.parametrize("on_device", [False, True])
def test_pgdat_tests_on_the_combined_loader(data_dir, tmp_path, on_device):
    dm = CIFAR10CDataModule(str(data_dir), download=False, corruptions=FAKE, batch_size=8, num_workers=0,
                            on_device=on_device)
    results = _trainer(tmp_path).test(_pgdat(), datamodule=dm)
    assert len(results) == 1 and {"test/clean_acc", "test/robust_acc"} <= set(results[0])


def test_pgdat_tests_one_loader_per_corruption_and_severity(data_dir, tmp_path):
    dm = CIFAR10CDataModule(str(data_dir), download=False, corruptions=["fog", "saturate"], severities=[1, 5], batch_size=8,
                            num_workers=0, combined=False)
    results = _trainer(tmp_path).test(_pgdat(), datamodule=dm)
    assert len(results) == len(dm.test_names) == 4
    for i, metrics in enumerate(results):
        assert {f"test/clean_acc/dataloader_idx_{i}", f"test/robust_acc/dataloader_idx_{i}"} <= set(metrics)


@pytest.mark.parametrize("cls", [CIFAR10CDataModule, CIFAR100CDataModule])
def test_download_without_network_names_the_archive_the_url_and_where_to_put_it(tmp_path, monkeypatch, cls):
    offline = URLError(OSError(-3, "Temporary failure in name resolution"))
    monkeypatch.setattr("torchvision.datasets.utils._get_redirect_url", Mock(side_effect=offline))
    with pytest.raises(DownloadError) as caught:
        cls(str(tmp_path), download=True).prepare_data()
    assert f"could not download {cls.filename} from {cls.url}" in str(caught.value)
    assert f"put it at {tmp_path / cls.filename} (MD5 {cls.md5})" in str(caught.value)
    assert caught.value.__cause__ is offline
