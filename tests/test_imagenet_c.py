"""ImageNetCDataModule on a fake ImageNet-C tree (<corruption>/<severity>/<wnid>/*.JPEG) via corruption_accuracy."""

import shutil
from pathlib import Path

import pytest
import torch
from test_image_folder import class_of, write_jpeg
from torch import nn

from lit_robust.datamodules import ImageNetCDataModule
from lit_robust.datamodules.cifar_c import BENCHMARK_CORRUPTIONS
from lit_robust.evaluation import corruption_accuracy

WNIDS = ["n03000003", "n01000001", "n02000002"]
RED = {wnid: 40 + 80 * i for i, wnid in enumerate(WNIDS)}
FAKE = ("gaussian_noise", "fog", "saturate")  # two benchmark corruptions and an extra one
PER_CLASS = 2
BROKEN = ("fog", 4)  # its images are painted with the next class's colour: a colour-reading model fails there


def write_imagenet_c(root: Path, corruptions=FAKE) -> Path:
    for c, corruption in enumerate(corruptions):
        for severity in range(1, 6):
            for w, wnid in enumerate(WNIDS):
                shown = WNIDS[(w + 1) % 3] if (corruption, severity) == BROKEN else wnid
                for k in range(PER_CLASS):
                    path = root / corruption / str(severity) / wnid / f"ILSVRC2012_val_{100 * w + k:08d}.JPEG"
                    write_jpeg(path, RED[shown], seed=1000 * c + 100 * severity + 10 * w + k, size=(24, 24))
    return root


class RedReader(nn.Module):
    """Logits peaked at the class whose red value (in sorted-wnid label order) is nearest the image's mean red."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("reds", torch.tensor([RED[w] / 255 for w in sorted(WNIDS)]))

    def forward(self, x):
        return -(x[:, 0].mean((1, 2))[:, None] - self.reds).abs()


@pytest.fixture
def root(tmp_path) -> Path:
    return write_imagenet_c(tmp_path / "ImageNet-C")


def _dm(root, **kwargs) -> ImageNetCDataModule:
    return ImageNetCDataModule(str(root), **{"corruptions": FAKE, "num_classes": 3, "batch_size": 4, "num_workers": 0,
                                             **kwargs})


@pytest.mark.parametrize("combined", [True, False])
def test_corruption_tier_over_imagenet_c(root, combined):
    dm = _dm(root, severities=(1, 4, 5), combined=combined)
    result = corruption_accuracy(RedReader(), dm)
    assert result.dataset == "ImageNet-C"
    expected = {c: {s: 0.0 if (c, s) == BROKEN else 1.0 for s in (1, 4, 5)} for c in FAKE}
    assert result.accuracy == expected
    assert result.counts == {c: {s: 3 * PER_CLASS for s in (1, 4, 5)} for c in FAKE}
    assert dm.test_names == [f"{c}/{s}" for c in FAKE for s in (1, 4, 5)]


def test_items_labels_and_tags(root):
    dm = _dm(root, corruptions=("saturate", "fog"), severities=(4,))
    dm.setup("test")
    assert dm.classes == sorted(WNIDS) and len(dm.labels) == 2 * 3 * PER_CLASS
    test = dm.splits["test"]
    for i in range(len(test)):
        x, y, c, s = test[i]
        path = Path(test.samples[i][0])
        assert x.shape == (3, 24, 24) and 0 <= x.min() and x.max() <= 1
        assert int(y) == sorted(WNIDS).index(path.parent.name)
        assert (dm.corruptions[int(c)], int(s)) == (path.parts[-4], int(path.parts[-3]))
        if (path.parts[-4], int(s)) != BROKEN:
            assert class_of(x, RED) == path.parent.name
    resized = _dm(root, severities=(1,), resolution=16)
    resized.setup("test")
    assert resized.splits["test"][0][0].shape == (3, 16, 16)


def test_default_selection_and_test_only(root):
    dm = ImageNetCDataModule(str(root))
    assert dm.corruptions == BENCHMARK_CORRUPTIONS and dm.severities == (1, 2, 3, 4, 5) and len(dm.test_names) == 75
    with pytest.raises(FileNotFoundError, match=r"shot_noise[/\\]1 is missing; expected the ImageNet-C release"):
        dm.setup("test")  # the fake holds two of the 15 benchmark corruptions
    with pytest.raises(RuntimeError, match="no train_dataloader: ImageNet-C is a test set only"):
        _dm(root).train_dataloader()
    with pytest.raises(ValueError, match="corruptions must be distinct values"):
        _dm(root, corruptions=("rain",))


def test_folder_problems_name_the_folder(root):
    shutil.rmtree(root / "fog" / "3")
    with pytest.raises(FileNotFoundError, match=r"fog[/\\]3 is missing"):
        _dm(root).setup("test")
    (root / "saturate" / "2" / "n01000001").rename(root / "saturate" / "2" / "n09999999")
    differ = r"only in .*gaussian_noise[/\\]1: n01000001; only in .*saturate[/\\]2: n09999999"
    with pytest.raises(FileNotFoundError, match=differ):
        _dm(root, severities=(1, 2)).setup("test")
    with pytest.raises(ValueError, match=r"num_classes=1000, but .*gaussian_noise[/\\]1 holds 3 class folders"):
        _dm(root, num_classes=1000, severities=(1,)).setup("test")
