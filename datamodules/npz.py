"""Memory-mapped arrays inside uncompressed ``.npz`` archives (what ``np.savez`` writes).

``np.load(path, mmap_mode="r")`` memory-maps ``.npy`` files but not the members of an ``.npz``:
it reads each member whole into RAM, which is 61 GB for 20M CIFAR-sized images. An ``.npz`` is
a zip archive; ``np.savez`` stores its members uncompressed (``ZIP_STORED``), so each member's
bytes are an ordinary ``.npy`` file at a fixed offset of the archive. :func:`npz_members` finds
that offset (the member's local zip header, then the ``.npy`` header) without reading any data,
and :class:`NpyMember` maps it with ``np.memmap`` when first indexed, in the process that indexes
it (a DataLoader worker opens its own map; the object pickles without it).
"""

from __future__ import annotations

import os
import struct
import zipfile
from typing import Optional

import numpy as np

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, 22 bytes we skip, file name length, extra field length
_LOCAL_SIGNATURE = b"PK\x03\x04"


class NpyMember:
    """One array of an ``.npz``: where its data start in the file, its shape and dtype; mapped lazily.

    Indexing (``member[indices]``) reads only the rows asked for. The map is opened on first use and
    dropped when pickled, so DataLoader workers (forked or spawned) each open their own.
    """

    def __init__(self, path: str, name: str, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path, self.name, self.offset, self.shape, self.dtype = path, name, offset, shape, np.dtype(dtype)
        self._map: Optional[np.memmap] = None

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def array(self) -> np.ndarray:
        """The read-only memory map (opened on first access in this process)."""
        if self._map is None:
            if self.nbytes == 0:
                return np.empty(self.shape, self.dtype)
            self._map = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape)
        return self._map

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index):
        return self.array[index]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_map": None}

    def __repr__(self) -> str:
        return f"NpyMember({self.path!r}, {self.name!r}, shape={self.shape}, dtype={self.dtype})"


def npz_members(path: str) -> dict[str, NpyMember]:
    """The arrays of the ``.npz`` at ``path`` by name (``"image"`` for the member ``image.npy``), none read.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file for anything
    that cannot be memory-mapped: not a zip archive (a truncated download loses the zip directory at
    the end), a compressed member (``np.savez_compressed``), a Fortran-ordered or object array, or a
    member whose data run past the end of the file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"generated-data file {path} not found")
    size = os.path.getsize(path)
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as error:
        raise ValueError(f"{path} is not a readable .npz (zip) archive ({error}): truncated or damaged? Expected "
                         "the output of np.savez(path, image=..., label=...)") from None
    members = {}
    with archive, open(path, "rb") as raw:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                continue
            name = info.filename[:-4]
            if info.compress_type != zipfile.ZIP_STORED:
                raise ValueError(
                    f"{path}: member {info.filename!r} is compressed (np.savez_compressed), so it cannot be "
                    "memory-mapped. Convert it once without loading it whole: extract each member "
                    "(shutil.copyfileobj(zipfile.ZipFile(path).open('image.npy'), open('image.npy', 'wb')), same for "
                    "'label.npy'), then np.savez(new_path, image=np.load('image.npy', mmap_mode='r'), "
                    "label=np.load('label.npy')), which stores them uncompressed")
            raw.seek(info.header_offset)
            header = raw.read(_LOCAL_HEADER.size)
            if len(header) < _LOCAL_HEADER.size or header[:4] != _LOCAL_SIGNATURE:
                raise ValueError(f"{path}: damaged zip entry for {info.filename!r} (no local header at byte "
                                 f"{info.header_offset}); re-download or re-save the file")
            _, name_len, extra_len = _LOCAL_HEADER.unpack(header)
            data_start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
            raw.seek(data_start)
            try:
                version = np.lib.format.read_magic(raw)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(raw)
                else:
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(raw)
            except ValueError as error:
                raise ValueError(f"{path}: member {info.filename!r} is not a .npy array ({error})") from None
            if dtype.hasobject:
                raise ValueError(f"{path}: member {info.filename!r} holds Python objects ({dtype}); expected a "
                                 "numeric array")
            if fortran and len(shape) > 1:
                raise ValueError(f"{path}: member {info.filename!r} is stored in Fortran order; re-save it "
                                 "C-contiguous (np.ascontiguousarray) so that one image is one contiguous read")
            member = NpyMember(path, name, raw.tell(), shape, dtype)
            end = member.offset + member.nbytes
            if member.nbytes > info.file_size - (member.offset - data_start):
                raise ValueError(f"{path}: member {info.filename!r} declares {shape} {dtype} ({member.nbytes} bytes) "
                                 f"but its zip entry holds {info.file_size} bytes; the file is damaged")
            if end > size:
                raise ValueError(f"{path}: member {info.filename!r} needs bytes up to {end} for {shape} {dtype}, but "
                                 f"the file has {size}: truncated? Re-download or re-save it")
            members[name] = member
    return members
