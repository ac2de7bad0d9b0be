"""TinyImageNetDataModule on a small fake ``tiny-imagenet-200`` tree in the official layout (JPEGs, annotations)."""

import shutil
import zipfile
from pathlib import Path
from unittest.mock import Mock
from urllib.error import URLError

import lightning.pytorch as L
import numpy as np
import pytest
import torch
from PIL import Image
from fake_server import md5, serve

from lit_robust.datamodules.arrays import DeviceBatches
from lit_robust.datamodules.files import DownloadError
from lit_robust.datamodules.tiny_imagenet import TinyImageNetDataModule
from lit_robust.defenses import PGDAT
from lit_robust.models import SmallCNN
from lit_robust.models.normalize import CIFAR10_MEAN, CIFAR10_STD

WNIDS = ["n03000003", "n01000001", "n02000002"]  # line order differs from sorted order on purpose
PER_CLASS = 6
VAL = [("val_0.JPEG", "n02000002"), ("val_1.JPEG", "n03000003"), ("val_2.JPEG", "n01000001"),
       ("val_3.JPEG", "n01000001"), ("val_4.JPEG", "n03000003"), ("val_5.JPEG", "n02000002")]
GREY_TRAIN = "train/n02000002/images/n02000002_3.JPEG"
GREY_VAL = "val/images/val_4.JPEG"
N_TRAIN = len(WNIDS) * PER_CLASS


def _jpeg(path: Path, rng: np.random.RandomState, grey: bool = False, size: int = 64) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rng.randint(0, 256, (size // 8, size // 8, 1 if grey else 3), dtype=np.uint8)
    pixels = pixels.repeat(8, 0).repeat(8, 1)  # blocky, so JPEG keeps the images distinct
    Image.fromarray(pixels[..., 0] if grey else pixels, "L" if grey else "RGB").save(path, "JPEG")


def _write_fake_tiny_imagenet(data_dir: Path) -> Path:
    """wnids.txt, words.txt, train/<wnid>/{<wnid>_boxes.txt, images/}, val/{val_annotations.txt, images/}, test/."""
    rng = np.random.RandomState(0)
    root = data_dir / "tiny-imagenet-200"
    root.mkdir(parents=True)
    (root / "wnids.txt").write_text("".join(f"{w}\n" for w in WNIDS))
    (root / "words.txt").write_text("".join(f"{w}\tthing {i}\n" for i, w in enumerate(WNIDS)))
    for wnid in WNIDS:
        names = [f"{wnid}_{k}.JPEG" for k in range(PER_CLASS)]
        for name in names:
            _jpeg(root / "train" / wnid / "images" / name, rng, grey=f"train/{wnid}/images/{name}" == GREY_TRAIN)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("".join(f"{n}\t0\t1\t60\t62\n" for n in names))
    for name, _ in VAL:
        _jpeg(root / "val" / "images" / name, rng, grey=f"val/images/{name}" == GREY_VAL)
    (root / "val" / "val_annotations.txt").write_text("".join(f"{n}\t{w}\t2\t3\t50\t61\n" for n, w in VAL))
    _jpeg(root / "test" / "images" / "test_0.JPEG", rng)
    return root


def _pil(path: Path) -> torch.Tensor:
    """PIL's own decoding of the file, as uint8 [3, H, W]."""
    with Image.open(path) as image:
        return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)


def _expected_train(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted wnids give the labels, files sorted by name within a class: ImageFolder's order on train/."""
    paths, labels = [], []
    for label, wnid in enumerate(sorted(WNIDS)):
        for name in sorted(p.name for p in (root / "train" / wnid / "images").iterdir()):
            paths.append(root / "train" / wnid / "images" / name)
            labels.append(label)
    return torch.stack([_pil(p) for p in paths]), torch.tensor(labels)


@pytest.fixture
def fake(tmp_path):
    data_dir = tmp_path / "data"
    return data_dir, _write_fake_tiny_imagenet(data_dir)


def _dm(data_dir, **kwargs) -> TinyImageNetDataModule:
    return TinyImageNetDataModule(str(data_dir), **{"download": False, "batch_size": 4, "num_workers": 0, "val_size": 4,
                                                    "cache": False, **kwargs})


def test_labels_follow_sorted_wnids_and_pixels_match_pil(fake):
    data_dir, root = fake
    dm = _dm(data_dir)
    assert (dm.num_classes, dm.dims, dm.pad, dm.flip) == (200, (3, 64, 64), 4, True)
    images, labels = dm.load("train")
    expected_images, expected_labels = _expected_train(root)
    assert images.dtype == torch.uint8 and images.shape == (N_TRAIN, 3, 64, 64) and labels.dtype == torch.int64
    assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)
    assert labels[:PER_CLASS].tolist() == [0] * PER_CLASS  # n01000001, second line of wnids.txt, is class 0


def test_test_split_is_official_val_labelled_from_annotations_without_moving_files(fake):
    data_dir, root = fake
    before = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    images, labels = _dm(data_dir).load("test")
    label_of = {w: i for i, w in enumerate(sorted(WNIDS))}
    assert labels.tolist() == [label_of[w] for _, w in VAL]
    assert torch.equal(images, torch.stack([_pil(root / "val" / "images" / n) for n, _ in VAL]))
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == before  # nothing moved or created


def test_greyscale_jpegs_become_three_equal_channels(fake):
    data_dir, root = fake
    dm = _dm(data_dir)
    with Image.open(root / GREY_TRAIN) as image:
        assert image.mode == "L"
    train, _ = dm.load("train")
    index = sorted(WNIDS).index("n02000002") * PER_CLASS + 3  # class 1's image _3 (names sort as _0.._5 here)
    grey = train[index]
    assert torch.equal(grey, _pil(root / GREY_TRAIN))
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    test, _ = dm.load("test")
    assert torch.equal(test[4], _pil(root / GREY_VAL)) and torch.equal(test[4][0], test[4][2])


def test_splits_sizes_seeded_held_out_validation_and_batches(fake):
    data_dir, root = fake
    dm = _dm(data_dir)
    dm.prepare_data()
    dm.setup()
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": N_TRAIN - 4, "val": 4, "test": len(VAL)}
    images, labels = _expected_train(root)
    val_idx = np.random.RandomState(0).permutation(N_TRAIN)[:4]
    train_idx = np.setdiff1d(np.arange(N_TRAIN), val_idx)
    assert torch.equal(dm.arrays["val"][0], images[val_idx]) and torch.equal(dm.arrays["val"][1], labels[val_idx])
    assert torch.equal(dm.arrays["train"][0], images[train_idx])  # the rest, disjoint from validation
    again = _dm(data_dir)
    again.setup()
    assert torch.equal(again.arrays["val"][0], dm.arrays["val"][0])
    other = _dm(data_dir, seed=1)
    other.setup()
    assert not torch.equal(other.arrays["val"][0], dm.arrays["val"][0])
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 64, 64) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert y.dtype == torch.int64
    xt, _ = next(iter(dm.test_dataloader()))
    assert torch.allclose(xt[0], _pil(root / "val" / "images" / VAL[0][0]) / 255.0)  # test batches not augmented


def test_default_val_size_is_two_thousand(fake):
    assert TinyImageNetDataModule().val_size == 2000


def test_on_device_without_trainer_serves_cpu_batches(fake):
    data_dir, _ = fake
    dm = _dm(data_dir, on_device=True)
    dm.setup()
    loader = dm.train_dataloader()
    assert isinstance(loader, DeviceBatches) and dm.trainer is None
    x, y = next(iter(loader))
    assert x.device.type == "cpu" and x.shape == (4, 3, 64, 64) and 0 <= x.min() and x.max() <= 1
    assert sum(len(b[1]) for b in dm.test_dataloader()) == len(VAL)


def _remove_wnids(root):
    (root / "wnids.txt").unlink()
    return r"wnids\.txt is missing"


def _remove_class(root):
    shutil.rmtree(root / "train" / "n02000002")
    return r"n02000002.images is missing \(class n02000002 is in wnids\.txt\)"


def _remove_train_image(root):  # an extraction interrupted inside a class folder
    (root / "train" / "n01000001" / "images" / "n01000001_5.JPEG").unlink()
    return r"n01000001_5\.JPEG is missing \(1 of the 6 files that .*n01000001_boxes\.txt lists"


def _remove_val_image(root):
    (root / "val" / "images" / "val_2.JPEG").unlink()
    return r"val_2\.JPEG is missing \(1 of the 6 files that .*val_annotations\.txt lists"


def _unknown_wnid(root):
    path = root / "val" / "val_annotations.txt"
    path.write_text(path.read_text().replace("val_5.JPEG\tn02000002", "val_5.JPEG\tn09999999"))
    return r"val_annotations\.txt line 6: wnid 'n09999999' of val_5\.JPEG is not in wnids\.txt"


def _truncated_annotations(root):
    path = root / "val" / "val_annotations.txt"
    path.write_text(path.read_text()[:-8])
    return r"val_annotations\.txt is corrupt: line 6 has 4 tab-separated fields, expected 6"


@pytest.mark.parametrize("damage", [_remove_wnids, _remove_class, _remove_train_image, _remove_val_image,
                                    _unknown_wnid, _truncated_annotations])
def test_incomplete_or_wrong_folder_is_named(fake, damage):
    data_dir, root = fake
    pattern = damage(root)
    with pytest.raises(FileNotFoundError, match=pattern) as error:
        _dm(data_dir).prepare_data()
    assert "tiny-imagenet-200.zip (MD5 90528d7ca1a48142e341f4ef8d21d0de" in str(error.value)


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tiny-imagenet-200 is missing; pass download=True"):
        _dm(tmp_path / "nothing").setup()


def test_wrong_image_size_is_named(fake):
    data_dir, root = fake
    _jpeg(root / "val" / "images" / "val_1.JPEG", np.random.RandomState(1), size=32)
    with pytest.raises(ValueError, match=r"val_1\.JPEG is 32x32, expected 64x64"):
        _dm(data_dir).load("test")


def _zip_tree(source: Path, archive: Path, extra: dict = None) -> Path:
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(source.rglob("*")):
            z.write(path, path.relative_to(source.parent).as_posix())
        for name, text in (extra or {}).items():
            z.writestr(name, text)
    return archive


def _fake_server(monkeypatch, archive: Path) -> list:
    """Serves ``archive`` for any URL through torchvision's download, with its MD5 as the expected one."""
    monkeypatch.setattr(TinyImageNetDataModule, "md5", md5(archive))
    return serve(monkeypatch, archive)


def test_download_extracts_verifies_and_repairs_a_half_extracted_folder(tmp_path, monkeypatch):
    source = _write_fake_tiny_imagenet(tmp_path / "source")
    fetched = _fake_server(monkeypatch, _zip_tree(source, tmp_path / "upload.zip"))
    data_dir = tmp_path / "data"
    dm = _dm(data_dir, download=True)
    dm.prepare_data()
    dm.setup()
    assert fetched == [TinyImageNetDataModule.url]
    assert len(dm.splits["test"]) == len(VAL) and torch.equal(dm.load("train")[0], _expected_train(source)[0])
    assert sorted(p.name for p in data_dir.iterdir()) == ["tiny-imagenet-200", "tiny-imagenet-200.zip"]
    _dm(data_dir, download=True).prepare_data()  # complete: nothing fetched or extracted
    assert fetched == [TinyImageNetDataModule.url]
    shutil.rmtree(data_dir / "tiny-imagenet-200" / "train" / "n03000003")  # as an interrupted manual extraction
    with pytest.raises(FileNotFoundError, match="n03000003"):
        _dm(data_dir).prepare_data()
    _dm(data_dir, download=True).prepare_data()  # re-extracted from the archive already there, not fetched again
    assert fetched == [TinyImageNetDataModule.url]
    assert (data_dir / "tiny-imagenet-200" / "train" / "n03000003" / "images" / "n03000003_0.JPEG").is_file()


def test_download_refuses_an_archive_escaping_data_dir(tmp_path, monkeypatch):
    source = _write_fake_tiny_imagenet(tmp_path / "source")
    archive = _zip_tree(source, tmp_path / "upload.zip", {"../evil.txt": "escaped"})
    _fake_server(monkeypatch, archive)
    data_dir = tmp_path / "data"
    with pytest.raises(ValueError, match=r"'\.\./evil\.txt' would be written outside"):
        _dm(data_dir, download=True).prepare_data()
    assert not list(tmp_path.rglob("evil.txt"))
    assert sorted(p.name for p in data_dir.iterdir()) == ["tiny-imagenet-200.zip"]  # no dataset, no staging left


def test_cache_is_used_and_invalidated_when_files_change(fake, monkeypatch):
    data_dir, root = fake
    dm = _dm(data_dir, cache=True)
    dm.prepare_data()  # builds both caches
    cache = root / "lit_robust_cache"
    assert sorted(p.name for p in cache.iterdir()) == ["test.pt", "train.pt"]
    expected = dm.load("test")

    decoded = []
    original = TinyImageNetDataModule._decode
    monkeypatch.setattr(TinyImageNetDataModule, "_decode", lambda self, entries: decoded.append(len(entries))
                        or original(self, entries))
    warm = _dm(data_dir, cache=True)
    warm.setup()
    assert decoded == [] and torch.equal(warm.arrays["test"][0], expected[0])
    assert torch.equal(warm.arrays["test"][1], expected[1])

    _jpeg(root / "val" / "images" / "val_3.JPEG", np.random.RandomState(7))  # a file replaced: stale
    images, _ = _dm(data_dir, cache=True).load("test")
    assert decoded == [len(VAL)] and torch.equal(images[3], _pil(root / "val" / "images" / "val_3.JPEG"))
    assert not torch.equal(images[3], expected[0][3])
    _dm(data_dir, cache=True).load("test")
    assert decoded == [len(VAL)]  # the rebuilt cache is used again

    (cache / "test.pt").write_bytes(b"half a file")
    with pytest.warns(UserWarning, match="unreadable cache"):
        images, _ = _dm(data_dir, cache=True).load("test")
    assert decoded == [len(VAL)] * 2 and torch.equal(images[3], _pil(root / "val" / "images" / "val_3.JPEG"))
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]


def test_pgd_at_fits_and_tests_end_to_end(fake, tmp_path):
    data_dir, _ = fake
    dm = _dm(data_dir)
    model = SmallCNN(in_channels=3, num_classes=len(WNIDS), input_size=64, width=4, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    module = PGDAT(model, eps=8 / 255, steps=1, val_attack_steps=1, test_attack_steps=1)
    trainer = L.Trainer(accelerator="cpu", devices=1, fast_dev_run=True, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    (results,) = trainer.test(module, datamodule=dm)
    assert {"test/clean_acc", "test/robust_acc"} <= set(results)


def test_download_without_network_names_the_archive_the_url_and_where_to_put_it(tmp_path, monkeypatch):
    offline = URLError(OSError(-3, "Temporary failure in name resolution"))
    monkeypatch.setattr("torchvision.datasets.utils._get_redirect_url", Mock(side_effect=offline))
    with pytest.raises(DownloadError) as caught:
        _dm(tmp_path / "data", download=True).prepare_data()
    cls = TinyImageNetDataModule
    assert f"could not download {cls.filename} from {cls.url}" in str(caught.value)
    assert f"put it at {tmp_path / 'data' / cls.filename} (MD5 {cls.md5})" in str(caught.value)
    assert caught.value.__cause__ is offline
