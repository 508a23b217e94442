"""Cache keys: what a cached stage was made from, as a digest of content, never of names and dates.

A stage is reused only when its key is unchanged: the bytes of every input file (model, images,
labels, profiles, through :func:`file_digest`), the options, edgeship's version and its own code.
Every file is read and hashed for every key: size and modification time are never trusted, so
a file rewritten in place with its size and mtime restored (``touch -r``) is still noticed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from edgeship._files import sha256_file
from edgeship._version import __version__


def digest(obj: Any) -> str:
    """A short stable digest of a JSON-able key."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_digest(key: dict[str, Any]) -> str:
    """A stage's key with edgeship's version and code fingerprint in it."""
    return digest({"edgeship": __version__, "code": code_fingerprint(), **key})


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """Hash of edgeship's own source files: a stage made by different code is not reused.

    The version alone is not enough for an editable install, where the code changes under
    one version number.
    """
    import edgeship
    import edgeship.convert
    import edgeship.quantize
    import edgeship.runtime
    import edgeship.targets
    import edgeship.verify

    h = hashlib.sha256()
    for pkg in (edgeship, edgeship.convert, edgeship.quantize, edgeship.runtime, edgeship.targets, edgeship.verify):
        root = Path(pkg.__path__[0])
        for f in sorted(root.glob("*.py")) + sorted(root.glob("*.toml")):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def file_digest(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes (always read: size and mtime never stand in for content)."""
    return sha256_file(path)


def image_set_digest(images: Any) -> str:
    """Content digest of an :class:`~edgeship.runtime.images.ImageSet`: relative names and every file's bytes."""
    h = hashlib.sha256()
    for f in images.files:
        rel = Path(f).relative_to(images.root) if images.root else Path(f).name
        h.update(os.fsencode(str(rel)) + b"\0" + sha256_file(f).encode() + b"\n")
    return h.hexdigest()
