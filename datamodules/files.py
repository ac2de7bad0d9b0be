"""Downloaded files: checksums with errors that say what is wrong, and archives extracted safely.

Archives are unpacked into a temporary folder beside the destination and moved into place
only once complete, so an interrupted extraction never leaves a half-filled dataset folder
that a later run would take for the real one. Members that would land outside the
destination (absolute paths, ``..``, links pointing out) are refused before anything is
written.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Optional, Union

from torchvision.datasets.utils import calculate_md5, download_url

PathLike = Union[str, os.PathLike]


def check_file(path: PathLike, md5: Optional[str], hint: str) -> None:
    """Raises ``FileNotFoundError`` naming ``path``, whether it is missing or corrupt, and the expected MD5.

    ``hint`` says how to get the file (e.g. "pass download=True"). ``md5=None`` only checks
    that the file exists.
    """
    path = Path(path)
    if not path.is_file():
        expected = f" (expected MD5 {md5})" if md5 else ""
        raise FileNotFoundError(f"{path} is missing{expected}; {hint}")
    if md5 is not None:
        actual = calculate_md5(str(path))
        if actual != md5:
            raise FileNotFoundError(f"{path} is corrupt: MD5 {actual}, expected {md5}; {hint}")


class DownloadError(OSError):
    """A dataset file could not be downloaded; the message says where to put it by hand."""


def download(url: str, folder: PathLike, filename: str, md5: Optional[str]) -> Path:
    """torchvision's download (skipped when a file with the right MD5 is there), then the checksum.

    Every DataModule downloads through here. A failure (no network, a server error, a wrong
    MD5) raises :class:`DownloadError` naming the file, the URL and the path where a copy
    fetched by hand is picked up, chained to the original error.
    """
    path = Path(folder) / filename
    try:
        download_url(url, str(folder), filename, md5)
    except (OSError, RuntimeError) as error:  # URLError is an OSError; torchvision's MD5 check raises RuntimeError
        checksum = f" (MD5 {md5})" if md5 else ""
        raise DownloadError(f"could not download {filename} from {url}: {error}. Without network access, fetch it "
                            f"elsewhere and put it at {path}{checksum}; with download=True it is then checked and "
                            f"used instead of downloaded") from error
    check_file(path, md5, f"the download from {url} did not match; delete it and retry")
    return path


def download_unless_complete(verify: Callable[[], None], url: str, folder: PathLike, filename: str,
                             md5: Optional[str]) -> None:
    """Does nothing when ``verify()`` passes; otherwise downloads the archive (kept, MD5-checked) and
    extracts it into ``folder`` with :func:`safe_extract`, replacing a missing, incomplete or damaged copy."""
    try:
        verify()
        return
    except FileNotFoundError:
        pass
    safe_extract(download(url, folder, filename, md5), folder)


class ArchiveDataset:
    """Mixin for a DataModule whose files come in one archive (class attributes ``url``, ``filename``,
    ``md5`` and ``base_folder``, the folder it unpacks to) and that checks them in ``verify()``."""

    url: str
    filename: str
    md5: Optional[str]
    base_folder: str
    data_dir: str

    @property
    def root(self) -> Path:
        return Path(self.data_dir) / self.base_folder

    def _hint(self) -> str:
        return f"pass download=True, or extract {self.filename} (MD5 {self.md5}, from {self.url}) into {self.data_dir}"

    def download(self) -> None:
        download_unless_complete(self.verify, self.url, self.data_dir, self.filename, self.md5)


def safe_extract(archive: PathLike, destination: PathLike) -> None:
    """Extracts a .zip, .tar, .tar.gz or .tgz into ``destination``, refusing members that escape it.

    Everything is first unpacked into a temporary sibling of ``destination``, then each
    top-level entry is moved into ``destination``, so an interrupted run leaves no partial
    entries there (only the temporary folder, which the next attempt ignores).
    """
    archive, destination = Path(archive), Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".extracting-", dir=destination))
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                for name in z.namelist():
                    _inside(staging, name, archive)
                z.extractall(staging)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as t:
                for member in t.getmembers():
                    _inside(staging, member.name, archive)
                    if member.issym() or member.islnk():
                        _inside(staging, os.path.join(os.path.dirname(member.name), member.linkname), archive)
                    elif not (member.isfile() or member.isdir()):
                        raise ValueError(f"{archive}: member {member.name!r} is not a file or folder; refusing to extract")
                t.extractall(staging)
        else:
            raise ValueError(f"{archive} is not a zip or tar archive")
        for entry in staging.iterdir():
            target = destination / entry.name
            if target.exists():
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            entry.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _inside(root: Path, name: str, archive: Path) -> None:
    target = (root / name).resolve()
    if os.path.isabs(name) or not target.is_relative_to(root.resolve()):
        raise ValueError(f"{archive}: member {name!r} would be written outside {root}; refusing to extract")
