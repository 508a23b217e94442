"""Atomic file writes, the JSON writer and the cache folder: what the device runtime also writes with.

Every file is written to a temporary name in the same folder and renamed into place, so a crash
or Ctrl-C never leaves a half-written file that looks valid. Standard library only (numpy is
used when present), so the on-device runtime can use it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgeship._version import SCHEMA_VERSION

#: Errors of a write that the disk refused: reported naming the file being written.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publishable(tmp: str) -> None:
    """mkstemp creates 0600 files; give artifacts the usual umask-based mode."""
    os.chmod(tmp, 0o666 & ~_umask())


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[str]:
    """A temporary file beside ``path`` that replaces it when the block ends, removed if the block fails.

    A write the disk refuses (full, read-only) is reported naming ``path``: a full disk's
    error names no file, a copy's names its source.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            yield tmp
            _publishable(tmp)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        if exc.errno not in _WRITE_ERRNOS:
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from exc


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    with _replacing(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically; a JSON object gets ``schema_version`` when it has none."""
    if isinstance(obj, dict) and "schema_version" not in obj:
        obj = {"schema_version": SCHEMA_VERSION, **obj}
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def atomic_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Copy a file atomically."""
    dst = Path(dst)
    with _replacing(dst) as tmp:
        shutil.copyfile(src, tmp)
    return dst


def os_error_line(exc: OSError) -> str:
    """One line for an error of the file system: what it said and the file (the one written, for a full disk)."""
    name = exc.filename2 if exc.errno in _WRITE_ERRNOS and exc.filename2 else exc.filename
    if exc.errno in _WRITE_ERRNOS and name:
        return f"cannot write {name}: {exc.strerror or exc}"
    return f"{exc.strerror or exc}: {name}" if name else str(exc)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if isinstance(obj, Path):
        return str(obj)
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover - numpy is a hard dependency
        pass
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_dir(*parts: str) -> Path:
    """edgeship's cache: ``$EDGESHIP_CACHE``, else ``$XDG_CACHE_HOME/edgeship``, else ``~/.cache/edgeship``."""
    if os.environ.get("EDGESHIP_CACHE"):
        return Path(os.environ["EDGESHIP_CACHE"]).expanduser().joinpath(*parts)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base, "edgeship", *parts)
