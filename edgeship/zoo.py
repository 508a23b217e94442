"""Named models from the ONNX model zoo: local folder, cache, or a checked download.

A name is resolved in this order: ``$EDGESHIP_MODELS/<file>``, the cache
(``$EDGESHIP_CACHE`` or ``~/.cache/edgeship``)/``models/<file>``, then a download from
the ``onnx/models`` repository, checked against the known size and sha256 before it is
moved into the cache. Nothing is downloaded unless a zoo name is asked for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgeship._io import cache_dir as edgeship_cache
from edgeship._io import sha256_file
from edgeship.download import Checked, FetchError, fetch
from edgeship.errors import InputError


@dataclass(frozen=True)
class ZooModel:
    name: str
    file: str
    url: str
    size: int
    sha256: str
    labels: str = "ImageNet-1k (1000 classes, standard index order)"


ZOO = {
    "mobilenetv2-7": ZooModel(
        name="mobilenetv2-7",
        file="mobilenetv2-7.onnx",
        url="https://github.com/onnx/models/raw/main/validated/vision/classification/mobilenet/model/mobilenetv2-7.onnx",
        size=14_246_826,
        sha256="c1c513582d56afceff8516c73804e484c81c6a830712ab6d682253f4a3cd042f",
    ),
}


def cache_dir() -> Path:
    return edgeship_cache()


def is_zoo_name(spec: str) -> bool:
    return spec in ZOO


def resolve(
    spec: str | os.PathLike[str],
    *,
    download: bool = True,
    progress: Callable[[str, int | None, int | None], None] | None = None,
) -> Path:
    """A model path for a path or a zoo name (downloaded and checked when needed)."""
    if str(spec) not in ZOO:
        return Path(spec)
    entry = ZOO[str(spec)]
    folder = os.environ.get("EDGESHIP_MODELS")
    candidates = ([Path(folder) / entry.file] if folder else []) + [cache_dir() / "models" / entry.file]
    for path in candidates:
        if path.is_file():
            _check(path, entry)
            return path
    target = candidates[-1]
    if not download:
        raise InputError(_place_hint(entry, candidates))
    return _download(entry, target, candidates, progress)


def _check(path: Path, entry: ZooModel) -> None:
    size = path.stat().st_size
    if size != entry.size or sha256_file(path) != entry.sha256:
        raise InputError(
            f"{path} is not {entry.file} (size {size}, expected {entry.size} bytes with sha256 "
            f"{entry.sha256[:12]}…); delete it or replace it with the model zoo file"
        )


def _place_hint(entry: ZooModel, candidates: list[Path]) -> str:
    return (
        f"{entry.name} is not available offline: download {entry.url} ({entry.size} bytes, sha256 "
        f"{entry.sha256}) and place it at {candidates[-1]}"
        + (f" or {candidates[0]}" if len(candidates) > 1 else " (or set EDGESHIP_MODELS to its folder)")
    )


def _download(
    entry: ZooModel,
    target: Path,
    candidates: list[Path],
    progress: Callable[[str, int | None, int | None], None] | None,
) -> Path:
    try:
        return fetch(Checked(entry.url, entry.size, entry.sha256), target, progress=progress)
    except FetchError as exc:
        raise InputError(f"download of {entry.name} failed: {exc}; " + _place_hint(entry, candidates)) from None
