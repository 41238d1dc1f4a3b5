"""The shared download helper: fetch a URL through a ``.partial`` file, and the MD5 sum of a file."""

from __future__ import annotations

import hashlib
import http.client
import pathlib
import shutil
import urllib.error
import urllib.request

from dibjax import errors

__all__ = ["fetch", "md5"]


def fetch(url: str, destination: pathlib.Path, *, timeout: float, instead: str) -> pathlib.Path:
    """Downloads ``url`` to ``destination`` + ``.partial`` and returns that path.

    On failure the partial file is removed and an :class:`~dibjax.errors.DownloadError` (a ``ConnectionError``)
    names the URL, the reason and ``instead``, what to do without network access.
    """
    partial = destination.with_name(destination.name + ".partial")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as f:
            shutil.copyfileobj(response, f, length=1 << 20)
    except (OSError, http.client.HTTPException) as e:
        partial.unlink(missing_ok=True)
        reason = e.reason if isinstance(e, urllib.error.URLError) else e
        raise errors.DownloadError(
            f"downloading {url} failed ({reason}). Without network access here, {instead}"
        ) from e
    return partial


def md5(path: pathlib.Path) -> str:
    """The hex MD5 digest of the file at ``path``."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
