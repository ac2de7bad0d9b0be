"""check_checkpoint_file: a bad checkpoint is named with what is wrong, before torch reads it."""

import re
import zipfile

import pytest
import torch

from lit_robust.checkpoints import check_checkpoint_file


def _checkpoint(path):
    torch.save({"state_dict": {"model.weight": torch.randn(64, 64)}, "epoch": 3}, path)
    return path


@pytest.mark.parametrize("keep", [lambda n: n // 2, lambda n: n - 1, lambda n: 40], ids=["half", "all-but-1", "40"])
def test_a_truncated_checkpoint_is_named(tmp_path, keep):
    path = _checkpoint(tmp_path / "last.ckpt")
    data = path.read_bytes()
    path.write_bytes(data[:keep(len(data))])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} is truncated"):
        check_checkpoint_file(path)


@pytest.mark.parametrize("content, problem", [(b"", "is empty"), (b"epoch=3 loss=0.1\n", "is not a torch checkpoint"),
                                              (None, "is a zip archive but not a torch checkpoint")])
def test_an_empty_text_or_other_zip_file_is_named(tmp_path, content, problem):
    path = tmp_path / "model.ckpt"
    if content is None:
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("notes.txt", "hello")
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} {problem}"):
        check_checkpoint_file(path)


def test_a_missing_checkpoint_or_a_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(str(tmp_path / 'gone.ckpt'))} is missing"):
        check_checkpoint_file(tmp_path / "gone.ckpt")
    with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path))} is not a file"):
        check_checkpoint_file(tmp_path)


def test_whole_checkpoints_pass_in_both_torch_formats(tmp_path):
    path = _checkpoint(tmp_path / "zip.ckpt")
    assert check_checkpoint_file(str(path)) == path
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    assert check_checkpoint_file(legacy) == legacy
    assert torch.equal(torch.load(legacy, weights_only=True)["w"], torch.ones(2))
