"""Checkpoint files checked before torch reads them, so a bad one is named instead of failing deep inside torch.

``torch.load`` on a truncated, empty or foreign file raises ``RuntimeError: PytorchStreamReader
failed ... central directory``, ``EOFError`` or ``OSError: [Errno 22]`` without the file's name.
A checkpoint written by ``torch.save`` (and Lightning) is a zip archive whose end record is its
last bytes, so an interrupted save or copy is found by reading only the end and the directory.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Union

from lightning.fabric.plugins import CheckpointIO

#: How ``torch.save(..., _use_new_zipfile_serialization=False)`` (torch < 1.6) files start: the
#: pickled magic number 0x1950a86a20f9469cfc6c.
LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def check_checkpoint_file(path: Union[str, Path]) -> Path:
    """``path`` as a ``Path`` if it looks like a whole torch checkpoint; otherwise an error naming it.

    Raises ``FileNotFoundError`` when nothing is there and ``ValueError`` when the file is empty,
    truncated (a zip archive without its end) or not a torch checkpoint at all. Legacy (pre-zip)
    torch files are accepted as they are: their format has no cheap completeness check.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} is missing: no file there")
    if not path.is_file():
        raise ValueError(f"checkpoint {path} is not a file")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"checkpoint {path} is empty (0 bytes): an interrupted save or copy?")
    with path.open("rb") as f:
        head = f.read(len(LEGACY_MAGIC))
    if head == LEGACY_MAGIC:
        return path
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile as error:
            raise ValueError(f"checkpoint {path} is a damaged zip archive ({error})") from error
        if not any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
            raise ValueError(f"checkpoint {path} is a zip archive but not a torch checkpoint (no data.pkl)")
        return path
    if head.startswith(b"PK\x03\x04"):
        raise ValueError(f"checkpoint {path} is truncated ({size} bytes, the end of its zip archive is missing): "
                         f"an interrupted save or copy? Save or copy it again")
    raise ValueError(f"checkpoint {path} is not a torch checkpoint (neither a zip archive nor a legacy torch file)")


class CheckedCheckpointIO(CheckpointIO):
    """A Trainer's checkpoint IO that checks a local file (:func:`check_checkpoint_file`) before reading it.

    Lightning reads ``ckpt_path`` before any hook sees it, so the defenses wrap the Trainer's own
    IO in ``setup`` (:func:`check_checkpoints_read_by`); saving, removing and remote paths are
    passed through unchanged.
    """

    def __init__(self, inner: CheckpointIO) -> None:
        self.inner = inner

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if "://" not in str(path):
            check_checkpoint_file(path)
        return self.inner.load_checkpoint(path, *args, **kwargs)

    def save_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        self.inner.save_checkpoint(*args, **kwargs)

    def remove_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        self.inner.remove_checkpoint(*args, **kwargs)

    def teardown(self) -> None:
        self.inner.teardown()


def check_checkpoints_read_by(trainer: Any) -> None:
    """Makes ``trainer`` check every local checkpoint file it reads (once; idempotent)."""
    strategy = trainer.strategy
    if not isinstance(strategy.checkpoint_io, CheckedCheckpointIO):
        strategy.checkpoint_io = CheckedCheckpointIO(strategy.checkpoint_io)
