"""ImageNetDataModule on fake ILSVRC-2012 trees: the three validation layouts (devkit, Kaggle CSV, class folders)."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy.io import loadmat, savemat
from test_image_folder import class_of, write_jpeg

from lit_robust.datamodules import ImageNetDataModule

WNIDS = ["n03000003", "n01000001", "n02000002"]  # ILSVRC2012_IDs 1, 2, 3: not the sorted (label) order
RED = {wnid: 40 + 80 * i for i, wnid in enumerate(WNIDS)}
VAL = ["n02000002", "n03000003", "n01000001", "n01000001", "n03000003", "n02000002"]  # image k's class
PARENT = (4, "n00000004", "thing", "a non-leaf synset", 2, 1, 0)  # meta.mat also holds inner synsets (ids > 1000)
FIELDS = ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "wordnet_height", "num_train_images")


def val_name(k: int) -> str:
    return f"ILSVRC2012_val_{k:08d}"


def write_train_and_flat_val(root: Path) -> Path:
    for c, wnid in enumerate(WNIDS):
        for k in range(4):
            write_jpeg(root / "train" / wnid / f"{wnid}_{k}.JPEG", RED[wnid], seed=10 * c + k)
    for k, wnid in enumerate(VAL, 1):
        write_jpeg(root / "val" / f"{val_name(k)}.JPEG", RED[wnid], seed=100 + k, size=(30, 40))
    return root


def write_devkit(root: Path, truth=None) -> Path:
    """``ILSVRC2012_devkit_t12/data/``: meta.mat's ``synsets`` struct array (the real fields, in the real order)
    and the ground truth, one 1-based ILSVRC2012_ID per validation image."""
    data = root / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    rows = [(i + 1, w, f"words {i}", f"gloss {i}", 0, 0, 4) for i, w in enumerate(WNIDS)] + [PARENT]
    synsets = np.empty((len(rows), 1), dtype=[(f, object) for f in FIELDS])  # 1860 x 1 in the real file
    for i, row in enumerate(rows):
        synsets[i, 0] = row
    savemat(str(data / "meta.mat"), {"synsets": synsets})
    ids = [WNIDS.index(w) + 1 for w in VAL] if truth is None else truth
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{i}\n" for i in ids))
    return data


def write_csv(path: Path, labels=None, header="ImageId,PredictionString") -> None:
    labels = VAL if labels is None else labels
    order = [4, 1, 6, 2, 5, 3]  # any row order
    lines = [f"{val_name(k)},{labels[k - 1]} 10 20 30 40 {labels[k - 1]} 1 2 3 4" for k in order if k <= len(labels)]
    path.write_text("\n".join([header, *lines]) + "\n")


def _dm(root, **kwargs) -> ImageNetDataModule:
    dm = ImageNetDataModule(str(root), **{"num_classes": 3, "resolution": 16, "batch_size": 6, "num_workers": 0,
                                          "val_size": 2, **kwargs})
    dm.prepare_data()
    dm.setup()
    return dm


def _check_test_split(dm) -> None:
    """Every test image's label is its wnid's index among the sorted wnids, and the pixels are that image's."""
    test = dm.splits["test"]
    assert len(test) == len(VAL)
    for i in range(len(test)):
        x, y = test[i]
        wnid = VAL[int(Path(test.samples[i][0]).stem.rsplit("_", 1)[1]) - 1]
        assert int(y) == sorted(WNIDS).index(wnid) and class_of(x, RED) == wnid
        assert x.shape == (3, 16, 16)
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (6, 3, 16, 16) and sorted(y.tolist()) == [0, 0, 1, 1, 2, 2]


@pytest.fixture
def root(tmp_path) -> Path:
    return write_train_and_flat_val(tmp_path / "imagenet")


def test_meta_mat_fake_parses_as_torchvision_does(root):
    meta_file = write_devkit(root) / "meta.mat"
    meta = loadmat(str(meta_file), squeeze_me=True)["synsets"]  # torchvision's parse_meta_mat, positionally
    leaves = [m for m, children in zip(meta, list(zip(*meta))[4]) if children == 0]
    assert {int(m[0]): m[1] for m in leaves} == {1: "n03000003", 2: "n01000001", 3: "n02000002"}


def test_training_labels_follow_sorted_wnids(root):
    write_devkit(root)
    dm = _dm(root)
    assert dm.classes == sorted(WNIDS)
    for split in ("train", "val"):
        for i, (path, label) in enumerate(dm.splits[split].samples):
            assert label == sorted(WNIDS).index(Path(path).parent.name)
            assert class_of(dm.splits[split][i][0], RED) == Path(path).parent.name


def test_flat_val_with_devkit(root):
    write_devkit(root)
    _check_test_split(_dm(root))


def test_flat_val_with_kaggle_csv_in_root_or_three_folders_up(root, tmp_path):
    write_csv(root / "LOC_val_solution.csv")
    _check_test_split(_dm(root))
    kaggle = tmp_path / "imagenet-object-localization-challenge"
    cls_loc = kaggle / "ILSVRC" / "Data" / "CLS-LOC"
    shutil.copytree(root, cls_loc)
    (cls_loc / "LOC_val_solution.csv").rename(kaggle / "LOC_val_solution.csv")
    _check_test_split(_dm(cls_loc))


def test_val_sorted_into_class_folders(root):
    for k, wnid in enumerate(VAL, 1):
        (root / "val" / wnid).mkdir(exist_ok=True)
        (root / "val" / f"{val_name(k)}.JPEG").rename(root / "val" / wnid / f"{val_name(k)}.JPEG")
    _check_test_split(_dm(root))


def test_order_of_preference_folders_then_devkit_then_csv(root):
    write_csv(root / "LOC_val_solution.csv", labels=[VAL[(i + 1) % 6] for i in range(6)])  # wrong labels
    write_devkit(root)
    _check_test_split(_dm(root))  # the devkit wins over the CSV
    _check_test_split(_dm(root, val_labels=str(root / "ILSVRC2012_devkit_t12")))
    wrong = _dm(root, val_labels=str(root / "LOC_val_solution.csv"))
    assert [y for _, y in wrong.splits["test"].samples] != [sorted(WNIDS).index(w) for w in VAL]


def test_flat_val_without_labels_names_what_was_looked_for(root):
    with pytest.raises(FileNotFoundError, match="labels are nowhere: looked for .*ILSVRC2012_devkit_t12, "
                                                ".*LOC_val_solution.csv"):
        _dm(root)
    with pytest.raises(FileNotFoundError, match="val_labels='.*gone.csv' is missing"):
        _dm(root, val_labels=str(root / "gone.csv"))


def test_devkit_and_csv_problems_name_the_file(root):
    data = write_devkit(root, truth=[3, 1, 2, 2, 1, 4])  # 4: an inner synset, not a class
    with pytest.raises(FileNotFoundError, match="ground_truth.txt line 6: '4' is not the ILSVRC2012_ID of a leaf"):
        _dm(root)
    shutil.rmtree(data.parent)
    write_devkit(root)
    (data / "meta.mat").write_bytes(b"not a MATLAB file")
    with pytest.raises(FileNotFoundError, match="meta.mat is corrupt"):
        _dm(root)
    shutil.rmtree(data.parent)
    write_csv(root / "LOC_val_solution.csv", header="id,label")
    with pytest.raises(FileNotFoundError, match="expected the header 'ImageId,PredictionString'"):
        _dm(root)


def test_missing_and_unlabelled_validation_images(root):
    write_csv(root / "LOC_val_solution.csv")
    (root / "val" / f"{val_name(6)}.JPEG").unlink()
    with pytest.raises(FileNotFoundError, match=f"{val_name(6)}.JPEG is missing \\(1 of the 6 images"):
        _dm(root)
    write_csv(root / "LOC_val_solution.csv", labels=VAL[:4])
    with pytest.raises(FileNotFoundError, match=f"{val_name(5)}.JPEG has no label in .*LOC_val_solution.csv"):
        _dm(root)


def test_classes_differing_between_train_and_val_are_named(root):
    write_csv(root / "LOC_val_solution.csv", labels=VAL[:5] + ["n09999999"])
    with pytest.raises(FileNotFoundError, match=r"only in .*train: none; only in .*LOC_val_solution.csv: n09999999"):
        _dm(root)
    write_csv(root / "LOC_val_solution.csv", labels=["n01000001"] * 6)
    with pytest.raises(FileNotFoundError, match=r"only in .*train: n02000002, n03000003; only in"):
        _dm(root)


def test_layout_errors_and_the_1000_class_default(root, tmp_path):
    write_csv(root / "LOC_val_solution.csv")
    with pytest.raises(ValueError, match=r"num_classes=1000, but .*train holds 3 class folders"):
        _dm(root, num_classes=1000)
    (root / "val" / "n01000001").mkdir()
    with pytest.raises(FileNotFoundError, match="holds both class folders and loose images"):
        _dm(root)
    (root / "val" / "n01000001").rmdir()
    assert _dm(root, num_classes=None).num_classes == 3
    with pytest.raises(FileNotFoundError, match=r"train is missing; expected the ILSVRC-2012 layout"):
        _dm(tmp_path / "empty")
    assert ImageNetDataModule().expected_classes == 1000 and ImageNetDataModule().val_size == 10000
