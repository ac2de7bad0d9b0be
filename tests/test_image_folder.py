"""ImageFolderDataModule and ResolutionSchedule on a small fake class-folder tree of real JPEGs, read lazily."""

from pathlib import Path

import lightning.pytorch as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import functional as TF

from lit_robust.callbacks import ResolutionSchedule
from lit_robust.datamodules import ImageFolderDataModule

CLASSES = ["tulip", "apple", "moss"]  # written in this order; labels follow the sorted names
PER_CLASS = 5
RED = {name: 40 + 80 * i for i, name in enumerate(CLASSES)}  # each class's image has its own red channel


def write_jpeg(path: Path, red: int, seed: int, size=(40, 30)) -> None:
    """A ``size`` (width, height) JPEG: red channel constant (it names the class), green/blue random 5-px blocks."""
    rng = np.random.RandomState(seed)
    w, h = size
    pixels = np.empty((h, w, 3), dtype=np.uint8)
    pixels[..., 0] = red
    pixels[..., 1:] = rng.randint(0, 256, (h // 5 + 1, w // 5 + 1, 2)).repeat(5, 0).repeat(5, 1)[:h, :w]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, "JPEG", quality=95)


def class_of(x: torch.Tensor, reds: dict) -> str:
    """The class whose red value is nearest the image's mean red (JPEG keeps a flat channel within a few levels)."""
    red = float(x[0].mean()) * 255
    return min(reds, key=lambda name: abs(reds[name] - red))


def write_tree(root: Path, splits=("train", "val"), per_class=PER_CLASS, classes=CLASSES) -> Path:
    for s, split in enumerate(splits):
        for c, name in enumerate(classes):
            for k in range(per_class if split == "train" else 2):
                write_jpeg(root / split / name / f"{name}_{k}.JPEG", RED.get(name, 0), seed=100 * s + 10 * c + k)
    (root / "train" / "apple" / "notes.txt").write_text("not an image: ignored, as ImageFolder does")
    return root


@pytest.fixture
def root(tmp_path) -> Path:
    return write_tree(tmp_path / "flowers")


def _dm(root, **kwargs) -> ImageFolderDataModule:
    dm = ImageFolderDataModule(str(root), **{"resolution": 16, "batch_size": 4, "num_workers": 0, "val_size": 3,
                                             **kwargs})
    dm.prepare_data()
    dm.setup()
    return dm


def test_labels_are_sorted_class_indices_and_every_file_is_served_once(root):
    dm = _dm(root)
    assert dm.classes == sorted(CLASSES) and dm.num_classes == 3
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 3 * PER_CLASS - 3, "val": 3, "test": 6}
    for split in ("train", "val", "test"):
        for i in range(len(dm.splits[split])):
            x, y = dm.splits[split][i]
            path = Path(dm.splits[split].samples[i][0])
            assert y.dtype == torch.int64 and int(y) == sorted(CLASSES).index(path.parent.name)
            assert class_of(x, RED) == path.parent.name  # the pixels of that very file
    served = [p for split in ("train", "val") for p, _ in dm.splits[split].samples]
    assert sorted(served) == sorted(str(p) for p in (root / "train").rglob("*.JPEG"))  # notes.txt skipped


def test_shapes_range_and_random_training_crops(root):
    dm = _dm(root, eval_resolution=20)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1 and y.shape == (4,)
    assert next(iter(dm.val_dataloader()))[0].shape == (3, 3, 20, 20)
    assert next(iter(dm.test_dataloader()))[0].shape == (4, 3, 20, 20)
    torch.manual_seed(0)
    crops = [dm.splits["train"][0][0] for _ in range(4)]
    assert any(not torch.equal(crops[0], c) for c in crops[1:])  # RandomResizedCrop + flip draw anew


def test_eval_transform_is_resize_by_crop_ratio_then_centre_crop_and_deterministic(root):
    dm = _dm(root, eval_resolution=16, crop_ratio=0.8)
    path, _ = dm.splits["test"].samples[0]
    x = dm.splits["test"][0][0]
    assert torch.equal(x, dm.splits["test"][0][0])
    with Image.open(path) as image:  # shorter side 30 -> round(16 / 0.8) = 20, then the central 16 x 16
        expected = TF.to_tensor(TF.center_crop(TF.resize(image.convert("RGB"), 20), 16))
    assert torch.equal(x, expected)
    no_augment = _dm(root, augment=False)
    assert torch.equal(no_augment.splits["train"][0][0], no_augment.splits["train"][0][0])


def test_held_out_split_is_disjoint_seeded_and_reproducible(root):
    dm = _dm(root, val_size=4)
    train = {p for p, _ in dm.splits["train"].samples}
    val = {p for p, _ in dm.splits["val"].samples}
    assert len(val) == 4 and not train & val and len(train | val) == 3 * PER_CLASS
    assert [p for p, _ in _dm(root, val_size=4).splits["val"].samples] == [p for p, _ in dm.splits["val"].samples]
    assert {p for p, _ in _dm(root, val_size=4, seed=1).splits["val"].samples} != val
    with pytest.raises(ValueError, match="val_size must be smaller than the 15 training images"):
        _dm(root, val_size=15)


def test_set_resolution_changes_training_crops_only(root):
    dm = _dm(root, eval_resolution=20)
    dm.set_resolution(24)
    assert dm.splits["train"][0][0].shape == (3, 24, 24) and dm.splits["val"][0][0].shape == (3, 20, 20)
    with pytest.raises(ValueError, match="resolution must be an integer >= 1"):
        dm.set_resolution(0)


def test_missing_folders_and_empty_class_name_the_folder_and_layout(root, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere[/\\]train is missing; expected .*train/<class>/<image>"):
        _dm(tmp_path / "nowhere")
    (root / "val").rename(tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match=r"flowers[/\\]val is missing; expected"):
        _dm(root)
    (root / "val").mkdir()
    with pytest.raises(FileNotFoundError, match=r"flowers[/\\]val holds no class folders"):
        _dm(root)
    (root / "val" / "apple").mkdir()
    with pytest.raises(FileNotFoundError, match=r"val[/\\]apple holds no image files"):
        _dm(root)


def test_class_mismatch_names_the_classes_that_differ(root):
    (root / "val" / "moss").rename(root / "val" / "fern")
    with pytest.raises(FileNotFoundError, match=r"only in .*train: moss; only in .*val: fern"):
        _dm(root)


def test_num_classes_argument_is_checked(root):
    with pytest.raises(ValueError, match=r"num_classes=4, but .*train holds 3 class folders \(apple, moss, tulip\)"):
        _dm(root, num_classes=4)
    assert _dm(root, num_classes=3).num_classes == 3


def test_corrupt_image_raises_at_read_time_naming_the_file(root):
    bad = root / "val" / "moss" / "moss_1.JPEG"
    bad.write_bytes(bad.read_bytes()[:300])  # truncated
    dm = _dm(root)  # indexing does not decode
    index = [p for p, _ in dm.splits["test"].samples].index(str(bad))
    with pytest.raises(FileNotFoundError, match=f"{bad.name} cannot be read as an image"):
        dm.splits["test"][index]
    loader = DataLoader(dm.splits["test"], batch_size=6, num_workers=1)  # re-raised from the worker
    with pytest.raises(FileNotFoundError, match=f"{bad.name} cannot be read as an image"):
        next(iter(loader))


def test_bad_arguments_name_the_argument(root):
    for kwargs, name in (({"resolution": 0}, "resolution"), ({"crop_ratio": 1.5}, "crop_ratio"),
                         ({"val_size": -1}, "val_size"), ({"num_classes": 0}, "num_classes")):
        with pytest.raises(ValueError, match=name):
            ImageFolderDataModule(str(root), **kwargs)
    with pytest.raises(ValueError, match="resolutions must map first epochs"):
        ResolutionSchedule({0: 0})
    schedule = ResolutionSchedule({"2": 24, 0: 16}, {3: 2})
    assert [schedule.at(e) for e in range(4)] == [(16, None), (16, None), (24, None), (24, 2)]
    assert ResolutionSchedule.fast_at().at(5) == (128, 512) and ResolutionSchedule.fast_at().at(14) == (288, 128)


# --- progressive resizing through Trainer.fit -----------------------------------------------


class ShapeRecorder(L.LightningModule):
    """Conv + global pooling (any input size); records the shape of every training and validation batch."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
        self.train_shapes: dict[int, set] = {}
        self.val_shapes: set = set()

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.train_shapes.setdefault(self.current_epoch, set()).add(tuple(x.shape))
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        self.val_shapes.add(tuple(batch[0].shape[1:]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _trainer(max_epochs, reload=1, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_epochs=max_epochs, reload_dataloaders_every_n_epochs=reload,
                     limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, **kwargs)


SCHEDULE = {0: 16, 2: 24, 3: 32}
BATCHES = {0: 4, 2: 2}
EXPECTED = {0: {(4, 3, 16, 16)}, 1: {(4, 3, 16, 16)}, 2: {(2, 3, 24, 24)}, 3: {(2, 3, 32, 32)}}


def test_progressive_resizing_in_fit_reaches_the_workers_at_the_right_epochs(root):
    dm = ImageFolderDataModule(str(root), resolution=8, eval_resolution=20, batch_size=8, num_workers=1, val_size=3)
    model = ShapeRecorder()
    trainer = _trainer(4, callbacks=[ResolutionSchedule(SCHEDULE, BATCHES)], enable_checkpointing=False)
    trainer.fit(model, datamodule=dm)
    assert model.train_shapes == EXPECTED
    assert model.val_shapes == {(3, 20, 20)}  # validation keeps eval_resolution
    assert trainer.callback_metrics["train/resolution"] == 32
    assert dm.resolution_schedule is None  # detached after fit


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_resumed_fit_continues_the_schedule(root, tmp_path):
    def run(max_epochs, ckpt_path=None):
        dm = ImageFolderDataModule(str(root), resolution=8, eval_resolution=20, batch_size=8, num_workers=0,
                                   val_size=3)
        model = ShapeRecorder()
        checkpoint = ModelCheckpoint(dirpath=tmp_path / f"ckpt{max_epochs}", save_last=True)
        _trainer(max_epochs, callbacks=[ResolutionSchedule(SCHEDULE, BATCHES), checkpoint]).fit(
            model, datamodule=dm, ckpt_path=ckpt_path)
        return model

    assert run(2).train_shapes == {e: EXPECTED[e] for e in (0, 1)}
    resumed = run(4, ckpt_path=str(tmp_path / "ckpt2" / "last.ckpt"))
    assert resumed.train_shapes == {e: EXPECTED[e] for e in (2, 3)}


def test_schedule_refuses_a_trainer_that_does_not_reload_loaders(root):
    dm = ImageFolderDataModule(str(root), resolution=8, batch_size=8, num_workers=0, val_size=3)
    with pytest.raises(ValueError, match="reload_dataloaders_every_n_epochs=1"):
        _trainer(1, reload=0, callbacks=[ResolutionSchedule(SCHEDULE)], enable_checkpointing=False).fit(
            ShapeRecorder(), datamodule=dm)
