"""Image folders, labels and preprocessing (numpy + Pillow only).

A folder of images is read in sorted order; files that are not decodable images are
skipped and counted. Ground-truth labels come from ImageNet wnid file names
(``n01440764_tench.jpg``), a class-per-subfolder layout, or a ``labels.txt``
(``file<TAB>label`` lines) in the folder.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from edgeship.errors import InputError
from edgeship.runtime.card import ColorOrder, Interpolation, Layout, Preprocessing

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_PIL_FILTERS = {Interpolation.BILINEAR: 2, Interpolation.BICUBIC: 3, Interpolation.NEAREST: 0}


@dataclass(frozen=True)
class Labels:
    """Class names in model output order, with optional ids (ImageNet wnids)."""

    names: tuple[str, ...]
    ids: tuple[str, ...] = ()

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Labels":
        """Read ``wnid<TAB>names`` lines (ImageNet style) or one name per line."""
        path = Path(path)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError as exc:
            raise InputError(f"labels file {path} does not exist") from exc
        except UnicodeDecodeError as exc:
            raise InputError(f"labels file {path} is not UTF-8 text") from exc
        except OSError as exc:
            raise InputError(f"cannot read labels file {path}: {exc.strerror or exc}") from exc
        lines = [ln for ln in lines if ln.strip()]
        if not lines:
            raise InputError(f"labels file {path} is empty")
        if all("\t" in ln for ln in lines):
            ids, names = zip(*(ln.split("\t", 1) for ln in lines))
            return cls(tuple(n.split(",")[0].strip() for n in names), tuple(i.strip() for i in ids))
        return cls(tuple(ln.strip() for ln in lines))

    def __len__(self) -> int:
        return len(self.names)

    def name(self, index: int) -> str:
        return self.names[index] if 0 <= index < len(self.names) else str(index)

    def index_of(self, key: str) -> int | None:
        """Class index of a wnid or a class name, or None."""
        for table in (self.ids, self.names):
            if key in table:
                return table.index(key)
        return None


@dataclass(frozen=True)
class ImageSet:
    """A sorted list of usable images, with what was skipped and optional labels."""

    root: Path
    files: tuple[Path, ...]
    skipped: tuple[str, ...] = ()
    label_keys: tuple[str | None, ...] = field(default_factory=tuple)

    def __len__(self) -> int:
        return len(self.files)

    def digest(self) -> str:
        """sha256 over the relative names and sizes of the files, for reports and caches."""
        h = hashlib.sha256()
        for f in self.files:
            st = f.stat()
            h.update(f"{f.relative_to(self.root)}\0{st.st_size}\0{int(st.st_mtime)}\n".encode())
        return h.hexdigest()

    def subset(self, indices: Sequence[int]) -> "ImageSet":
        keys = self.label_keys or (None,) * len(self.files)
        return ImageSet(self.root, tuple(self.files[i] for i in indices), self.skipped,
                        tuple(keys[i] for i in indices))

    def split(self, first: int) -> tuple["ImageSet", "ImageSet"]:
        """The first ``first`` files and the rest (e.g. calibration vs evaluation)."""
        n = len(self.files)
        return self.subset(range(min(first, n))), self.subset(range(min(first, n), n))

    def sample(self, count: int, *, seed: int | None = None) -> "ImageSet":
        """``count`` files: the first ones in sorted order, or a seeded random choice."""
        if count >= len(self.files):
            return self
        if seed is None:
            return self.subset(range(count))
        picks = sorted(random.Random(seed).sample(range(len(self.files)), count))
        return self.subset(picks)

    def labels_for(self, labels: Labels | None) -> list[int | None]:
        """Ground-truth class index per file (None where unknown)."""
        if labels is None or not self.label_keys:
            return [None] * len(self.files)
        return [labels.index_of(k) if k else None for k in self.label_keys]


def list_images(folder: str | os.PathLike[str], *, minimum: int = 1, check: bool = True) -> ImageSet:
    """List the images of ``folder`` (recursively), sorted by relative path.

    Args:
        folder: Folder of images (JPEG, PNG, BMP, WebP), optionally one subfolder per class.
        minimum: Raise :class:`InputError` when fewer usable images are found.
        check: Open each file's header to skip files that are not images.
    """
    root = Path(folder)
    if not root.exists():
        raise InputError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise InputError(f"{root} is not a folder of images")
    files: list[Path] = []
    skipped: list[str] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        if path.name == "labels.txt":
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES and (not check or _is_image(path)):
            files.append(path)
        else:
            skipped.append(str(path.relative_to(root)))
    if len(files) < minimum:
        raise InputError(
            f"{root} has {len(files)} usable image(s) ({len(skipped)} other file(s) skipped); "
            f"at least {minimum} needed (JPEG, PNG, BMP or WebP)"
        )
    return ImageSet(root, tuple(files), tuple(skipped), tuple(_label_keys(root, files)))


def _is_image(path: Path) -> bool:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return False


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


def load_rgb(source: "str | os.PathLike[str] | object") -> "object":
    """Open an image path (or take a PIL image) and return it as 8-bit RGB.

    Grey, CMYK, palette and RGBA images are converted; transparency is composited on
    white so it does not turn black.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Image.Image):
        im = source
    else:
        try:
            im = Image.open(source)
            im.load()
        except FileNotFoundError as exc:
            raise InputError(f"image {source} does not exist") from exc
        except (UnidentifiedImageError, OSError) as exc:
            raise InputError(f"{source} is not a readable image: {exc}") from exc
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    return im.convert("RGB")


def resize_crop(image: "object", prep: Preprocessing) -> np.ndarray:
    """Resize the shorter side, center-crop, and return uint8 HWC pixels in model colour order."""
    im = load_rgb(image)
    w, h = im.size
    if prep.resize_shorter:
        s = prep.resize_shorter / min(w, h)
        size = (max(1, round(w * s)), max(1, round(h * s)))
        if size != (w, h):
            im = im.resize(size, _PIL_FILTERS[Interpolation(prep.interpolation)])
        w, h = im.size
    ch, cw = prep.crop
    if w < cw or h < ch:
        im = im.resize((max(w, cw), max(h, ch)), _PIL_FILTERS[Interpolation(prep.interpolation)])
        w, h = im.size
    left, top = (w - cw) // 2, (h - ch) // 2
    pixels = np.asarray(im.crop((left, top, left + cw, top + ch)), dtype=np.uint8)
    if prep.color_order == ColorOrder.BGR:
        pixels = pixels[..., ::-1]
    return np.ascontiguousarray(pixels)


def normalize(pixels: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """uint8 HWC pixels -> float32 HWC model input."""
    x = pixels.astype(np.float32) * np.float32(prep.pixel_scale)
    x -= np.asarray(prep.mean, dtype=np.float32)
    x /= np.asarray(prep.std, dtype=np.float32)
    return x


def preprocess(image: "object", prep: Preprocessing, layout: Layout | str = Layout.NHWC) -> np.ndarray:
    """Image (path or PIL) -> float32 array ``[1, ...]`` in the given layout."""
    x = normalize(resize_crop(image, prep), prep)
    if Layout(layout) == Layout.NCHW:
        x = x.transpose(2, 0, 1)
    return x[None, ...]


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
    """uint8 pixels -> the model's integer input, ``clip(pixel + offset)``."""
    info = np.iinfo(dtype)
    return np.clip(pixels.astype(np.int16) + offset, info.min, info.max).astype(dtype)
