"""Checked downloads: a file is fetched whole, checked against its size and sha256, then moved into place.

The only code that reaches the network. It streams into a hidden ``.part`` file beside the
destination, stops as soon as more bytes arrive than expected, and renames the file into
place only when its size and digest are the expected ones; on any failure the part file is
removed, so a cache never holds a file that was not checked.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from edgeship._files import sha256_file
from edgeship._progress import ProgressFn
from edgeship.errors import InputError

#: Seconds without a byte before a download is given up.
TIMEOUT_S = 30.0
_CHUNK = 1 << 16


class FetchError(InputError):
    """A file could not be fetched, or what arrived is not the expected file."""


@dataclass(frozen=True)
class Checked:
    """A file to fetch: where it is, and the size and sha256 it must have."""

    url: str
    size: int
    sha256: str

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    def matches(self, path: Path) -> bool:
        """Whether ``path`` is this file (size first, then the digest of its bytes)."""
        return path.is_file() and path.stat().st_size == self.size and sha256_file(path) == self.sha256


def fetch(item: Checked, dest: Path, *, progress: ProgressFn | None = None) -> Path:
    """Download ``item`` to ``dest`` (checked; raises :class:`FetchError`); return ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    try:
        digest = _stream(item, part, progress)
        _check_arrived(item, part, digest)
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)
    return dest


def _stream(item: Checked, part: Path, progress: ProgressFn | None) -> str:
    """Write the response body to ``part``; return its sha256 (raises on network errors and excess bytes)."""
    digest, done = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(item.url, timeout=TIMEOUT_S) as resp, open(part, "wb") as out:
            while chunk := resp.read(_CHUNK):
                done += len(chunk)
                if done > item.size:
                    raise FetchError(f"{item.url} sent more than the expected {item.size} bytes; not used")
                out.write(chunk)
                digest.update(chunk)
                if progress:
                    progress(f"download {item.name}", done, item.size)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise FetchError(f"could not fetch {item.url} ({_reason(exc)})") from exc
    return digest.hexdigest()


def _check_arrived(item: Checked, part: Path, digest: str) -> None:
    size = part.stat().st_size
    if size != item.size:
        raise FetchError(f"{item.url} arrived truncated ({size} of {item.size} bytes); not used")
    if digest != item.sha256:
        raise FetchError(f"{item.url} does not match its sha256 {item.sha256[:12]}… ({digest[:12]}…); not used")


def _reason(exc: BaseException) -> str:
    """The network error in a few words (urllib nests the socket error in ``reason``)."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    reason = getattr(exc, "reason", None) or exc
    return str(getattr(reason, "strerror", None) or reason).replace("\n", " ")
