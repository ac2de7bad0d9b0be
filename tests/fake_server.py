"""A stand-in for the dataset servers: torchvision's download fetches local files instead of URLs."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path


def md5(path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def serve(monkeypatch, source: Path) -> list[str]:
    """Answers every URL torchvision's ``download_url`` fetches with ``source``: that file, or, for a
    folder, its file named like the URL's last part. Returns the list of URLs fetched, in order."""
    fetched = []

    def fake_urlretrieve(url, filename, *args, **kwargs):
        fetched.append(url)
        shutil.copyfile(source / url.rsplit("/", 1)[1] if source.is_dir() else source, filename)

    monkeypatch.setattr("torchvision.datasets.utils._get_redirect_url", lambda url, max_hops: url)
    monkeypatch.setattr("torchvision.datasets.utils._urlretrieve", fake_urlretrieve)
    return fetched
