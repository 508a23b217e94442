"""Image folders, labels and preprocessing (numpy + Pillow only).

A folder of images is read in sorted order; every file is fully decoded when listed, and
files that are not decodable images (not an image, truncated or corrupt, over Pillow's
decompression-bomb limit, an unsupported mode) are skipped and counted by reason.
Ground-truth labels come from ImageNet wnid file names (``n01440764_tench.jpg``), a
class-per-subfolder layout, or a ``labels.txt`` (``file<TAB>label`` lines) in the folder.

Every image the runtime, the calibration and the drift check read goes through one
function, :func:`open_image` (EXIF orientation applied, any mode and bit depth scaled to
8-bit RGB), and one resize, :func:`resize_crop`. The deployed fast path is part of them,
so the float reference of a drift check sees exactly the deployed pixels: a JPEG path is
decoded with DCT scaling (``Image.draft``: 1/2, 1/4 or 1/8) to the smallest size that
still covers the resize target, and only the center-crop box is resized, in uint8.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import warnings
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np

from edgeship.errors import InputError
from edgeship.runtime.card import ColorOrder, Interpolation, Layout, Preprocessing

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_PIL_FILTERS = {Interpolation.BILINEAR: 2, Interpolation.BICUBIC: 3, Interpolation.NEAREST: 0}
#: Pillow's ``reduce()`` before resampling once the scale is >= 2x this (big PNG/BMP/WebP
#: only; a JPEG is already DCT-scaled). Pillow's docs call 3.0 indistinguishable from fair.
_REDUCING_GAP = 3.0
#: EXIF orientations that swap width and height.
_SWAPS_SIDES = (5, 6, 7, 8)

#: Why a listed file was skipped (``ImageSet.skip_reasons``).
NOT_AN_IMAGE = "not an image"
CORRUPT = "truncated or corrupt"
UNREADABLE = "unreadable (permission denied)"
TOO_LARGE = "over the decompression-bomb limit"
UNSUPPORTED_MODE = "unsupported image mode"
#: A labels file larger than this is not one (21k ImageNet classes take about 1 MiB).
MAX_LABELS_BYTES = 16 * 2**20


@dataclass(frozen=True)
class Labels:
    """Class names in model output order, with optional ids (ImageNet wnids)."""

    names: tuple[str, ...]
    ids: tuple[str, ...] = ()

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Labels:
        """Read ``wnid<TAB>names`` lines (ImageNet style) or one name per line (at most ``MAX_LABELS_BYTES``)."""
        path = Path(path)
        try:
            with open(path, "rb") as fh:
                data = fh.read(MAX_LABELS_BYTES + 1)
        except FileNotFoundError as exc:
            raise InputError(f"labels file {path} does not exist") from exc
        except OSError as exc:
            raise InputError(f"cannot read labels file {path}: {exc.strerror or exc}") from exc
        if len(data) > MAX_LABELS_BYTES:
            raise InputError(
                f"labels file {path} is larger than {MAX_LABELS_BYTES // 2**20} MiB; give a text file of class names"
            )
        return cls.from_bytes(data, f"labels file {path}")

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "labels") -> Labels:
        """Labels from a labels file's contents (UTF-8; a byte-order mark is dropped)."""
        try:
            return cls.parse(data.decode("utf-8-sig").splitlines(), where)
        except UnicodeDecodeError as exc:
            raise InputError(f"{where} is not UTF-8 text") from exc

    @classmethod
    def parse(cls, lines: Sequence[str], where: str = "labels") -> Labels:
        """Labels from the lines of a labels file (``wnid<TAB>names`` or one name per line)."""
        lines = [ln for ln in lines if ln.strip()]
        if not lines:
            raise InputError(f"{where} is empty")
        if all("\t" in ln for ln in lines):
            ids, names = zip(*(ln.split("\t", 1) for ln in lines))
            return cls(tuple(n.split(",")[0].strip() for n in names), tuple(i.strip() for i in ids))
        return cls(tuple(ln.strip() for ln in lines))

    def __len__(self) -> int:
        return len(self.names)

    def name(self, index: int) -> str:
        return self.names[index] if 0 <= index < len(self.names) else str(index)

    def check_count(self, num_classes: int, where: str) -> Labels:
        """These labels when there is one per class of the model, else :class:`InputError` naming both counts."""
        if len(self.names) != num_classes:
            raise InputError(
                f"{where} has {len(self.names)} label(s) but the model has {num_classes} classes: "
                "names would be wrong; give the labels of this model, one per class"
            )
        return self

    @classmethod
    def of_card(cls, path: Path | None, num_classes: int, where: str) -> Labels | None:
        """The labels file a card names (None: it names none): it must exist and hold one label per class."""
        if path is None:
            return None
        if not path.is_file():
            raise InputError(f"{where} names labels file {path.name}, which is not in {path.parent}")
        labels = cls.load(path)
        return labels.check_count(num_classes, f"labels file {path}") if num_classes else labels

    def index_of(self, key: str) -> int | None:
        """Class index of a wnid or a class name, or None."""
        for table in (self.ids, self.names):
            if key in table:
                return table.index(key)
        return None


def check_top_k(top_k: object) -> int:
    """``top_k`` when it is a whole number of classes above 0."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise InputError(f"top_k must be a whole number of classes, 1 or more, got {top_k!r}")
    return top_k


@dataclass(frozen=True)
class ImageSet:
    """A sorted list of usable images, with what was skipped and optional labels."""

    root: Path
    files: tuple[Path, ...]
    skipped: tuple[str, ...] = ()
    label_keys: tuple[str | None, ...] = field(default_factory=tuple)
    #: Why each skipped file was skipped (same order as ``skipped``).
    skip_reasons: tuple[str, ...] = ()
    #: How these files were chosen from a larger set ('' when they are the whole folder).
    selection: str = ""

    def __len__(self) -> int:
        return len(self.files)

    def digest(self) -> str:
        """sha256 over the relative names and sizes of the files, for reports and caches."""
        h = hashlib.sha256()
        for f in self.files:
            st = f.stat()
            h.update(f"{f.relative_to(self.root)}\0{st.st_size}\0{int(st.st_mtime)}\n".encode())
        return h.hexdigest()

    def subset(self, indices: Sequence[int]) -> ImageSet:
        keys = self.label_keys or (None,) * len(self.files)
        return ImageSet(
            self.root,
            tuple(self.files[i] for i in indices),
            self.skipped,
            tuple(keys[i] for i in indices),
            self.skip_reasons,
        )

    def split(self, first: int) -> tuple[ImageSet, ImageSet]:
        """The first ``first`` files and the rest, in sorted order."""
        n = len(self.files)
        return self.subset(range(min(first, n))), self.subset(range(min(first, n), n))

    def sample(self, count: int, *, seed: int | None = None) -> ImageSet:
        """``count`` files spread over the data (see :func:`spread_indices`), or a seeded random choice."""
        return self.divide(count, seed=seed)[0]

    def divide(self, count: int, *, seed: int | None = None) -> tuple[ImageSet, ImageSet]:
        """``count`` files chosen as :meth:`sample` does, and the rest (both in sorted order)."""
        n = len(self.files)
        if count >= n:
            return self, self.subset(())
        if seed is None:
            picks = spread_indices(self.label_keys or (None,) * n, count)
        else:
            picks = sorted(random.Random(seed).sample(range(n), count))
        chosen = set(picks)
        rest = self.subset([i for i in range(n) if i not in chosen])
        return (
            replace(self.subset(picks), selection=selection_method(self, count, seed)),
            replace(rest, selection="the images not chosen"),
        )

    def classes(self) -> int:
        """How many distinct labels (class subfolders, wnids, ``labels.txt`` entries) the files have."""
        return len({k for k in self.label_keys if k is not None})

    def skipped_by_reason(self) -> dict[str, int]:
        """How many files were skipped, per reason (``{"truncated or corrupt": 1, ...}``)."""
        return dict(Counter(self.skip_reasons or (NOT_AN_IMAGE,) * len(self.skipped)))

    def labels_for(self, labels: Labels | None) -> list[int | None]:
        """Ground-truth class index per file (None where unknown)."""
        if labels is None or not self.label_keys:
            return [None] * len(self.files)
        return [labels.index_of(k) if k else None for k in self.label_keys]


def selection_method(images: ImageSet, count: int, seed: int | None) -> str:
    """How :meth:`ImageSet.sample` chooses ``count`` of ``images``, in words (for reports)."""
    if count >= len(images):
        return "all images"
    if seed is not None:
        return f"seeded random choice (seed {seed})"
    classes = images.classes()
    return f"round-robin over {classes} classes" if classes > 1 else "evenly spaced over the sorted list"


def spread_indices(keys: Sequence[str | None], count: int) -> list[int]:
    """``count`` indices spread over the data, deterministically, in sorted order.

    Files are grouped by label key (one group when there are none). Every group gives one
    file per round (round-robin) while a whole round fits; the last, partial round takes
    groups evenly spaced over the sorted group names. Within a group the files taken are
    evenly spaced over its sorted list, so a folder without labels gets evenly spaced files.
    """
    groups: dict[str | None, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    members = [groups[k] for k in sorted(groups, key=lambda k: (k is None, k or ""))]
    quota = _round_robin_quota([len(m) for m in members], count)
    return sorted(m[j] for m, q in zip(members, quota) for j in evenly_spaced(len(m), q))


def _round_robin_quota(sizes: Sequence[int], count: int) -> list[int]:
    """How many files each group gives: one per round while a round fits, then groups evenly spaced."""
    quota, left = [0] * len(sizes), min(count, sum(sizes))
    while left:
        active = [g for g, size in enumerate(sizes) if size > quota[g]]
        take = active if len(active) <= left else [active[j] for j in evenly_spaced(len(active), left)]
        for g in take:
            quota[g] += 1
        left -= len(take)
    return quota


def evenly_spaced(n: int, k: int) -> list[int]:
    """``k`` distinct indices of ``range(n)`` evenly spaced (the middle of each of ``k`` equal parts)."""
    return [(2 * i + 1) * n // (2 * k) for i in range(min(k, n))]


class ImageReadError(InputError):
    """An image file that cannot be used; ``reason`` says why (one of the skip reasons)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class Decoded(NamedTuple):
    """An image as :func:`open_image` returns it: 8-bit RGB, upright (EXIF orientation applied)."""

    image: Any
    #: (width, height) of the upright image at full resolution (before any DCT scaling).
    full_size: tuple[int, int]
    #: JPEG DCT-scaling denominator used while decoding (1: full resolution).
    scale: int = 1


def list_images(
    folder: str | os.PathLike[str], *, minimum: int = 1, check: bool = True, workers: int | None = None
) -> ImageSet:
    """List the images of ``folder`` (recursively), sorted by relative path.

    Args:
        folder: Folder of images (JPEG, PNG, BMP, WebP), optionally one subfolder per class.
        minimum: Raise :class:`InputError` when fewer usable images are found.
        check: Decode every file fully (in parallel) and skip, counting by reason, files
            that are not images, truncated or corrupt, over Pillow's decompression-bomb
            limit or in a mode that has no RGB conversion.
        workers: Decoding threads (default: one per core).
    """
    root = Path(folder)
    if not root.exists():
        raise InputError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise InputError(f"{root} is not a folder of images")
    _check_readable(root)
    candidates: list[Path] = []
    skipped: list[tuple[str, str]] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        _check_name(root, path)
        if path.name == "labels.txt":
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES:
            candidates.append(path)
        else:
            skipped.append((str(path.relative_to(root)), NOT_AN_IMAGE))
    verdicts = check_images(candidates, workers=workers) if check else [None] * len(candidates)
    files = [p for p, why in zip(candidates, verdicts) if why is None]
    skipped += [(str(p.relative_to(root)), why) for p, why in zip(candidates, verdicts) if why is not None]
    skipped.sort()
    images = ImageSet(
        root,
        tuple(files),
        tuple(s for s, _ in skipped),
        tuple(_label_keys(root, files)),
        tuple(why for _, why in skipped),
    )
    counts = ", ".join(f"{n} {why}" for why, n in images.skipped_by_reason().items())
    if any(why is not None for why in verdicts):
        log.warning("%s: skipped %d file(s) (%s)", root, len(skipped), counts)
    if len(files) < minimum:
        raise InputError(
            f"{root} has {len(files)} usable image(s) ({len(skipped)} other file(s) skipped"
            f"{': ' + counts if skipped else ''}); at least {minimum} needed (JPEG, PNG, BMP or WebP)"
        )
    return images


def _check_readable(root: Path) -> None:
    """Refuse a folder whose list (read) or files (search) this user may not reach: its images are not missing."""
    try:
        with os.scandir(root):
            pass
        os.stat(os.path.join(root, "."))  # not root / ".": pathlib drops the "."
    except PermissionError:
        raise InputError(f"image folder {root} cannot be read: permission denied") from None


def _check_name(root: Path, path: Path) -> None:
    """Refuse a file name that is not UTF-8: reports, caches and cards are UTF-8 text."""
    rel = str(path.relative_to(root))
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(rel).decode("utf-8", errors="backslashreplace")
        raise InputError(
            f"{root}: file name {shown!r} is not valid UTF-8; rename it or move it out of the folder"
        ) from None


def check_images(paths: Sequence[Path], *, workers: int | None = None) -> list[str | None]:
    """Decode each file fully, in parallel: None when usable, else the reason to skip it.

    A JPEG is decoded at 1/8 scale: every entropy-coded byte is still read (a truncated
    or corrupt file fails), only the inverse DCT is cheaper.
    """
    from PIL import Image

    with warnings.catch_warnings():  # over the limit is our own skip reason, not a warning per file
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return list(map_ordered(_verdict, paths, workers=workers))


def _verdict(path: Path) -> str | None:
    try:
        open_image(path, Preprocessing(resize_shorter=1, crop=(1, 1)))
    except ImageReadError as exc:
        return exc.reason
    except InputError:
        return CORRUPT
    return None


def _label_keys(root: Path, files: list[Path]) -> list[str | None]:
    table: dict[str, str] = {}
    labels_txt = root / "labels.txt"
    if labels_txt.is_file():
        try:
            text = labels_txt.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read {labels_txt} as UTF-8 text: {exc}") from exc
        for line in text.splitlines():
            if "\t" in line:
                name, label = line.split("\t", 1)
                table[name.strip()] = label.strip()
    keys: list[str | None] = []
    for f in files:
        rel = f.relative_to(root)
        if str(rel) in table or f.name in table:
            keys.append(table.get(str(rel), table.get(f.name)))
        elif len(rel.parts) > 1:
            keys.append(rel.parts[0])
        elif f.name[:1] == "n" and f.name[1:9].isdigit() and len(f.name) > 9 and f.name[9] in "_.":
            keys.append(f.name[:9])
        else:
            keys.append(None)
    return keys


# ---------------------------------------------------------------- reading one image
def open_image(
    source: str | os.PathLike[str] | Any, prep: Preprocessing | None = None, *, draft: bool = True
) -> Decoded:
    """Read an image the one way every stage reads it (runtime, calibration, drift check).

    Args:
        source: A path (or binary file object), or a PIL image (used as given: never
            DCT-scaled, never changed in place).
        prep: The preprocessing the pixels are for. With a resize, a JPEG file is decoded
            with DCT scaling to the smallest size that still covers the resize target.
        draft: Allow that DCT scaling.

    Returns:
        The upright 8-bit RGB image and its full-resolution size.

    Raises:
        ImageReadError: Not an image, truncated or corrupt, over Pillow's decompression-bomb
            limit (``PIL.Image.MAX_IMAGE_PIXELS``), or a mode with no RGB conversion.
    """
    from PIL import Image, UnidentifiedImageError

    _quiet_bomb_warning()
    if isinstance(source, Image.Image):
        orientation = _orientation(source)
        return Decoded(_upright_rgb8(source, orientation, source), _upright(source.size, orientation))
    try:
        im = Image.open(source)
    except FileNotFoundError as exc:
        raise InputError(f"image {source} does not exist") from exc
    except PermissionError as exc:  # the file is there and may be fine: say so, not "corrupt"
        raise ImageReadError(f"{source} cannot be read: permission denied", UNREADABLE) from exc
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"{source} is over Pillow's decompression-bomb limit: {exc}", TOO_LARGE) from exc
    except UnidentifiedImageError as exc:
        raise ImageReadError(f"{source} is not an image Pillow can read", NOT_AN_IMAGE) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{source} is not a readable image: {exc}", CORRUPT) from exc
    try:
        limit = Image.MAX_IMAGE_PIXELS
        if limit and im.width * im.height > limit:  # Pillow only warns between 1x and 2x the limit
            raise ImageReadError(
                f"{source} has {im.width}x{im.height} pixels, over Pillow's decompression-bomb "
                f"limit of {limit} (PIL.Image.MAX_IMAGE_PIXELS)",
                TOO_LARGE,
            )
        orientation = _orientation(im)
        full = _upright(im.size, orientation)
        scale = _draft(im, full, orientation, prep) if draft and prep is not None and im.format == "JPEG" else 1
        try:
            im.load()
        except (OSError, SyntaxError, ValueError, IndexError) as exc:  # truncated, corrupt
            raise ImageReadError(f"{source} is truncated or corrupt: {exc}", CORRUPT) from exc
        return Decoded(_upright_rgb8(im, orientation, source), full, scale)  # load() closed the file
    except BaseException:
        im.close()
        raise


def _quiet_bomb_warning() -> None:
    """Pillow warns between 1x and 2x its pixel limit; open_image refuses all of those itself, in one message."""
    from PIL import Image

    bomb = Image.DecompressionBombWarning
    if not any(f[0] == "ignore" and f[2] is bomb for f in warnings.filters):  # once, unless a caller reset them
        warnings.filterwarnings("ignore", category=bomb)


def _orientation(im: Any) -> int:
    """The EXIF orientation (1-8; 1 when absent or unreadable)."""
    try:
        value = int(im.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block must not make the image unreadable
        return 1
    return value if 1 <= value <= 8 else 1


def _upright(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    return (size[1], size[0]) if orientation in _SWAPS_SIDES else (size[0], size[1])


def _draft(im: Any, full: tuple[int, int], orientation: int, prep: Preprocessing) -> int:
    """DCT-scale a JPEG (1/2, 1/4, 1/8) to the smallest size covering the resize target; the scale used."""
    if not prep.resize_shorter:
        return 1  # crop at native resolution: every pixel counts
    need = _upright(target_size(full, prep), orientation)  # back in the file's orientation
    width = im.width
    im.draft(None, need)
    return max(1, round(width / im.width))


def _upright_rgb8(im: Any, orientation: int, source: Any) -> Any:
    if orientation != 1:
        from PIL import ImageOps

        im = ImageOps.exif_transpose(im)
    return to_rgb8(im, source)


def to_rgb8(im: Any, source: Any = "image") -> Any:
    """Any Pillow mode -> 8-bit RGB.

    16-bit and 32-bit greyscale (``I;16*``, ``I``) and float (``F``) are scaled to 8 bits
    (Pillow's own conversion clips them, so a 16-bit PNG turns almost white); alpha
    (RGBA, LA, PA, palette transparency) is composited on white so it does not turn black;
    grey, palette, CMYK and YCbCr are converted.
    """
    from PIL import Image

    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I") or mode == "F":
        im = Image.fromarray(_scale_to_8bit(np.asarray(im), mode, im.format))
    elif mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    try:
        return im.convert("RGB")
    except ValueError as exc:
        raise ImageReadError(f"{source}: image mode {mode} has no RGB conversion", UNSUPPORTED_MODE) from exc


def _scale_to_8bit(a: np.ndarray, mode: str, fmt: str | None) -> np.ndarray:
    """High-bit-depth grey -> uint8 by the range its mode implies (16-bit: /257, exact for 8-bit copies)."""
    x = np.nan_to_num(a.astype(np.float64))
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if mode.startswith("I;16") or (mode == "I" and fmt == "PNG") or (mode == "I" and lo >= 0 and 255 < hi <= 65535):
        x = x / 257.0
    elif mode == "F" and lo >= 0 and hi <= 1.0:
        x = x * 255.0
    elif lo < 0 or hi > 255:  # 32-bit or float data of no fixed range: stretch it
        x = (x - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(x)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def load_rgb(source: str | os.PathLike[str] | object) -> object:
    """Open an image path (or take a PIL image) and return it upright as 8-bit RGB, at full resolution."""
    return open_image(source).image


def frame_image(frame: np.ndarray, color: ColorOrder | str = ColorOrder.RGB) -> Decoded:
    """A camera frame (uint8 ``HxWx3``, RGB or BGR as stated) as a Pillow RGB image.

    The one copy is Pillow's own unpacking, which also swaps BGR to RGB.
    """
    order = _check_frame(frame, color)
    from PIL import Image

    h, w = frame.shape[:2]
    im = Image.frombuffer("RGB", (w, h), np.ascontiguousarray(frame), "raw", order.value, 0, 1)
    return Decoded(im, (w, h))


def frame_pixels(frame: np.ndarray, prep: Preprocessing, color: ColorOrder | str = ColorOrder.RGB) -> np.ndarray:
    """A camera frame -> uint8 ``HxWx3`` crop in the model's colour order.

    A frame that needs no resize is cropped as a view (no copy, a BGR frame for an RGB
    model is a reversed view); others are resized like files.
    """
    order = _check_frame(frame, color)
    h, w = frame.shape[:2]
    if target_size((w, h), prep) == (w, h):
        ch, cw = prep.crop
        left, top = (w - cw) // 2, (h - ch) // 2
        pixels = frame[top : top + ch, left : left + cw]
        return pixels if order == prep.color_order else pixels[..., ::-1]
    return resize_crop(frame_image(frame, order), prep)


def _check_frame(frame: np.ndarray, color: ColorOrder | str) -> ColorOrder:
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3 or 0 in frame.shape:
        raise InputError(f"pixel arrays must be non-empty uint8 HxWx3, got {frame.dtype} {frame.shape}")
    try:
        return ColorOrder(color)
    except ValueError as exc:
        raise InputError(f"color must be one of {[c.value for c in ColorOrder]}, got {color!r}") from exc


# ---------------------------------------------------------------- preprocessing
def target_size(size: tuple[int, int], prep: Preprocessing) -> tuple[int, int]:
    """(width, height) an image of ``size`` is resized to before the center crop."""
    w, h = size
    if prep.resize_shorter:
        s = prep.resize_shorter / min(w, h)
        w, h = max(1, round(w * s)), max(1, round(h * s))
    ch, cw = prep.crop
    return max(w, cw), max(h, ch)


class CropCache:
    """Crop pixels of image files kept in memory while a :func:`cached_crops` block runs.

    One deploy reads the same evaluation images for the float reference and every target's
    check; with this, each file is decoded once. Keyed by the file (path, size, modification
    time) and the preprocessing fields that shape the crop; the arrays are read-only.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.used = max_bytes, 0
        self._pixels: dict[tuple[Any, ...], np.ndarray] = {}

    @staticmethod
    def key(path: str | os.PathLike[str], prep: Preprocessing) -> tuple[Any, ...]:
        st = os.stat(path)
        return (
            os.fspath(path),
            st.st_size,
            st.st_mtime_ns,
            prep.resize_shorter,
            tuple(prep.crop),
            prep.interpolation,
            prep.color_order,
        )

    def get(self, key: tuple[Any, ...]) -> np.ndarray | None:
        return self._pixels.get(key)

    def put(self, key: tuple[Any, ...], pixels: np.ndarray) -> np.ndarray:
        if self.used + pixels.nbytes <= self.max_bytes:
            pixels.flags.writeable = False
            self._pixels[key] = pixels
            self.used += pixels.nbytes
        return pixels


_crops: CropCache | None = None


@contextmanager
def cached_crops(max_bytes: int = 1 << 30) -> Iterator[CropCache]:
    """Within the block, :func:`resize_crop` of an image file decodes it once per preprocessing.

    For host work that reads one image set several times (a deploy's checks); memory is bounded
    by ``max_bytes`` (files beyond it are decoded each time). The cache ends with the block.
    """
    global _crops
    outer, _crops = _crops, CropCache(max_bytes)
    try:
        yield _crops
    finally:
        _crops = outer


def resize_crop(image: object, prep: Preprocessing) -> np.ndarray:
    """Resize the shorter side, center-crop, and return uint8 HWC pixels in model colour order.

    ``image`` is a path, a PIL image or a :class:`Decoded`. Only the crop box is resampled
    (the same filter taps as resizing the whole image, then cropping), in uint8. Inside
    :func:`cached_crops`, a file's pixels come from memory after its first read (read-only).
    """
    cache = _crops
    if cache is None or not isinstance(image, (str, os.PathLike)):
        return _resize_crop(image, prep)
    key = CropCache.key(image, prep)
    found = cache.get(key)
    return found if found is not None else cache.put(key, _resize_crop(image, prep))


def _resize_crop(image: object, prep: Preprocessing) -> np.ndarray:
    decoded = image if isinstance(image, Decoded) else open_image(image, prep)
    im = decoded.image
    tw, th = target_size(decoded.full_size, prep)
    ch, cw = prep.crop
    left, top = (tw - cw) // 2, (th - ch) // 2
    if im.size == (tw, th):
        im = im.crop((left, top, left + cw, top + ch))
    else:
        sx, sy = im.width / tw, im.height / th
        im = im.resize(
            (cw, ch),
            _PIL_FILTERS[Interpolation(prep.interpolation)],
            box=(left * sx, top * sy, (left + cw) * sx, (top + ch) * sy),
            reducing_gap=_REDUCING_GAP,
        )
    pixels = np.asarray(im, dtype=np.uint8)
    if prep.color_order == ColorOrder.BGR:
        pixels = np.ascontiguousarray(pixels[..., ::-1])
    return pixels


def normalize(pixels: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """uint8 HWC pixels -> float32 HWC model input."""
    x = pixels.astype(np.float32) * np.float32(prep.pixel_scale)
    x -= np.asarray(prep.mean, dtype=np.float32)
    x /= np.asarray(prep.std, dtype=np.float32)
    return x


def preprocess(image: object, prep: Preprocessing, layout: Layout | str = Layout.NHWC) -> np.ndarray:
    """Image (path or PIL) -> float32 array ``[1, ...]`` in the given layout."""
    x = normalize(resize_crop(image, prep), prep)
    if Layout(layout) == Layout.NCHW:
        x = x.transpose(2, 0, 1)
    return x[None, ...]


# ---------------------------------------------------------------- many images
def decode_workers(workers: int | None = None) -> int:
    """Decoding threads: ``workers``, else one per core this process may use."""
    if workers:
        return max(1, int(workers))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def map_ordered(fn: Callable[[Any], Any], items: Sequence[Any], *, workers: int | None = None) -> Iterator[Any]:
    """``map(fn, items)`` on threads (Pillow releases the GIL while decoding), in order, a few items ahead."""
    n = min(decode_workers(workers), len(items))
    if n <= 1:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(n, thread_name_prefix="edgeship-decode")
    pending: deque[Future[Any]] = deque()
    try:
        ahead = iter(items)
        for item in ahead:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 4 * n:
                break
        while pending:
            result = pending.popleft().result()
            for item in ahead:
                pending.append(pool.submit(fn, item))
                break
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def iter_pixels(files: Sequence[Any], prep: Preprocessing, *, workers: int | None = None) -> Iterator[np.ndarray]:
    """uint8 crop pixels of each image, in order, decoded in parallel (the same path as one image)."""
    return map_ordered(lambda f: resize_crop(f, prep), files, workers=workers)


def load_pixels(
    files: Sequence[Any],
    prep: Preprocessing,
    *,
    workers: int | None = None,
    progress: Callable[[str, int | None, int | None], None] | None = None,
) -> np.ndarray:
    """uint8 ``[N, H, W, 3]`` crop pixels of every image, decoded in parallel."""
    out = np.empty((len(files), prep.crop[0], prep.crop[1], 3), dtype=np.uint8)
    for i, pixels in enumerate(iter_pixels(files, prep, workers=workers)):
        out[i] = pixels
        if progress:
            progress("load images", i + 1, len(files))
    return out


def synthetic_pixels(count: int, prep: Preprocessing, *, seed: int = 0) -> np.ndarray:
    """Deterministic, image-like uint8 inputs (smooth gradients plus noise) for checks without images."""
    rng = np.random.default_rng(seed)
    h, w = prep.crop
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.empty((count, h, w, 3), dtype=np.uint8)
    for i in range(count):
        fx, fy, ph = rng.uniform(0.005, 0.05, size=3)
        base = 127.5 + 100 * np.sin(xx * fx + yy * fy + ph * 100)[..., None] * rng.uniform(0.3, 1.0, size=3)
        noise = rng.normal(0, 20, size=(h, w, 3))
        out[i] = np.clip(base + noise, 0, 255).astype(np.uint8)
    return out


def pixel_offset(prep: Preprocessing, scale: float, zero_point: int) -> int | None:
    """The integer ``k`` with ``q = pixel + k`` when the preprocessing folds into the input quantization.

    When ``(pixel * pixel_scale - mean) / std`` quantized with ``scale``/``zero_point`` is
    ``pixel * 1 + b`` with the same ``b`` for every channel, the device can skip float
    preprocessing and feed shifted pixels. Exact when ``b`` is an integer; when ``b`` is
    half-way (``x.5``, as for mean 0.5 / std 0.5), rounding half up keeps every pixel
    value distinct (half-to-even would merge neighbours) at a constant half-step offset.
    Returns None when the mapping is not of that form.
    """
    if not scale or prep.color_order == ColorOrder.BGR and len(set(prep.mean)) > 1:
        return None
    mean = np.broadcast_to(np.asarray(prep.mean, dtype=np.float64), (3,))
    std = np.broadcast_to(np.asarray(prep.std, dtype=np.float64), (3,))
    slope = prep.pixel_scale / (std * scale)
    offset = -mean / (std * scale) + zero_point
    if np.max(np.abs(slope - 1.0)) > 2e-3 or np.ptp(offset) > 1e-3:
        return None
    return int(np.floor(float(offset[0]) + 0.5 + 1e-6))


def quantize_pixels(pixels: np.ndarray, offset: int, dtype: np.dtype) -> np.ndarray:
    """uint8 pixels -> the model's integer input, ``clip(pixel + offset)``.

    The common cases stay in 8 bits: ``pixel - 128`` into int8 is flipping the top bit,
    ``pixel + 0`` into uint8 is the pixels themselves.
    """
    dtype = np.dtype(dtype)
    if pixels.dtype == np.uint8 and dtype == np.int8 and offset == -128:
        return (pixels ^ np.uint8(0x80)).view(np.int8)
    if pixels.dtype == np.uint8 and dtype == np.uint8 and offset == 0:
        return np.ascontiguousarray(pixels)
    info = np.iinfo(dtype)
    return np.clip(pixels.astype(np.int16) + offset, info.min, info.max).astype(dtype)
