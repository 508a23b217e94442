"""Labelled sample photos for the demo: a commit-pinned public set, each photo checked by size and sha256.

The manifest shipped with edgeship (``edgeship/data/imagenet-sample-images.manifest``) lists the
1000 photos of ``EliSchwartz/imagenet-sample-images`` at one commit, one per ImageNet class in
class-index order (``<wnid>_<name>.JPEG``): it gives the photos, their digests and the labels.
``$EDGESHIP_SAMPLES_MANIFEST`` names another manifest of the same form (a mirror; the tests' local
server). The photos are cached in ``<cache>/samples/<key>/``, one folder per chosen set, holding
exactly that set; a cached photo is used only after its digest is confirmed.
ImageNet's terms of use apply to the photos: research and education only.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from edgeship._files import atomic_write_text, cache_dir
from edgeship._progress import ProgressFn, silent
from edgeship.download import Checked, FetchError, fetch
from edgeship.errors import InputError

#: How many photos the demo uses (100 calibrate, the rest are evaluated).
DEMO_COUNT = 300
#: Parallel downloads.
WORKERS = 8
TERMS = "ImageNet sample photos: ImageNet terms of use, research and education only"
_BASE_URL = "# base-url:"


@dataclass(frozen=True)
class Photo:
    """One photo of the set: its digest, size and file name (``<wnid>_<name>.JPEG``)."""

    sha256: str
    size: int
    name: str

    @property
    def wnid(self) -> str:
        return self.name.split("_", 1)[0]

    @property
    def label(self) -> str:
        return Path(self.name.split("_", 1)[-1]).stem.replace("_", " ")


@dataclass(frozen=True)
class SampleSet:
    """Photos of one class each, in class-index order, and where they are downloaded from."""

    base_url: str
    photos: tuple[Photo, ...]
    source: str

    def spread(self, count: int) -> SampleSet:
        """``count`` photos spread evenly over the classes (all of them when there are fewer)."""
        n = len(self.photos)
        picks = sorted({i * n // count for i in range(count)}) if count < n else range(n)
        return SampleSet(self.base_url, tuple(self.photos[i] for i in picks), self.source)

    def key(self) -> str:
        """A name for the cache folder of exactly these photos from this place."""
        text = self.base_url + "".join(f"{p.sha256}{p.name}" for p in self.photos)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def labels_text(self) -> str:
        """``wnid<TAB>name`` lines, one per photo (for the shipped manifest: the 1000 classes in index order)."""
        return "".join(f"{p.wnid}\t{p.label}\n" for p in self.photos)

    def checked(self, photo: Photo) -> Checked:
        return Checked(self.base_url + photo.name, photo.size, photo.sha256)


def load_manifest(path: str | os.PathLike[str] | None = None) -> SampleSet:
    """The sample set of ``path``, else ``$EDGESHIP_SAMPLES_MANIFEST``, else the one edgeship ships."""
    path = path or os.environ.get("EDGESHIP_SAMPLES_MANIFEST") or SHIPPED
    if path != SHIPPED:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read the sample manifest {path}: {exc}") from exc
        return parse_manifest(text, str(path))
    shipped = resources.files("edgeship") / "data" / "imagenet-sample-images.manifest"
    return parse_manifest(shipped.read_text(encoding="utf-8"), "edgeship's sample manifest")


#: ``load_manifest(SHIPPED)``: the manifest edgeship ships, whatever the environment says (its 1000 photos
#: give the ImageNet class names in class-index order).
SHIPPED = "<shipped>"


def parse_manifest(text: str, where: str) -> SampleSet:
    """``sha256 size name`` lines, ``#`` comments, and one ``# base-url: URL`` line."""
    base = [line[len(_BASE_URL) :].strip() for line in text.splitlines() if line.startswith(_BASE_URL)]
    if len(base) != 1 or not base[0].endswith("/"):
        raise InputError(f"{where} needs one '{_BASE_URL} URL/' line (ending in /)")
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return SampleSet(base[0], tuple(_photo(line, where) for line in lines), where)


def _photo(line: str, where: str) -> Photo:
    parts = line.split()
    if len(parts) != 3 or len(parts[0]) != 64 or not parts[1].isdigit() or "/" in parts[2]:
        raise InputError(f"{where}: not a 'sha256 size name' line: {line[:80]!r}")
    return Photo(parts[0].lower(), int(parts[1]), parts[2])


def fetch_samples(sset: SampleSet, *, progress: ProgressFn = silent) -> Path:
    """The cache folder holding exactly ``sset``'s photos, each checked; missing ones are downloaded.

    Raises :class:`FetchError` naming the first photo that could not be had; the photos that did
    arrive stay in the cache (checked), so a re-run fetches only the rest.
    """
    folder = cache_dir() / "samples" / sset.key()
    todo = [p for p in sset.photos if not sset.checked(p).matches(folder / p.name)]
    done = len(sset.photos) - len(todo)
    progress("sample photos", done, len(sset.photos))
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        jobs = [pool.submit(fetch, sset.checked(p), folder / p.name) for p in todo]
        for job in concurrent.futures.as_completed(jobs):
            _raise_first(jobs, job)
            done += 1
            progress("sample photos", done, len(sset.photos))
    return folder


def _raise_first(jobs: list[concurrent.futures.Future[Path]], job: concurrent.futures.Future[Path]) -> None:
    """Re-raise a failed download after cancelling the downloads not yet started."""
    if job.exception() is None:
        return
    for other in jobs:
        other.cancel()
    exc = job.exception()
    assert isinstance(exc, BaseException)
    raise exc


def write_labels(sset: SampleSet) -> Path:
    """The set's class names as a labels file beside (not in) the photo folders."""
    path = cache_dir() / "samples" / f"{hashlib.sha256(sset.labels_text().encode()).hexdigest()[:16]}.labels.txt"
    if not path.is_file() or path.read_text(encoding="utf-8") != sset.labels_text():
        atomic_write_text(path, sset.labels_text())
    return path


__all__ = ["DEMO_COUNT", "FetchError", "Photo", "SampleSet", "fetch_samples", "load_manifest", "write_labels"]
