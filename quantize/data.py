"""Calibration and evaluation images as values: a folder of files, or arrays in memory."""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
import random
from collections.abc import Iterable, Mapping, Sized
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Union, cast

import numpy as np

from edgeship._files import sha256_file
from edgeship._progress import Progress, silent
from edgeship.errors import CalibrationError, InputError
from edgeship.runtime.card import Preprocessing
from edgeship.runtime.images import ImageSet, Labels, frame_pixels, list_images, load_pixels, spread_indices

#: What ``quantize`` takes as images: a folder path, or HxWx3 uint8 RGB arrays (any size).
Images = Union[str, os.PathLike, Iterable[np.ndarray]]


@dataclass(frozen=True)
class ImagesUsed:
    """Calibration or evaluation images: a folder's files (named by a digest of their list) or arrays."""

    count: int
    selection: str
    folder: str | None = None
    skipped_files: int = 0
    classes: int = 0
    first: str | None = None
    last: str | None = None
    file_list_sha256: str | None = None
    #: ``"arrays"`` for images given as arrays (named by ``pixels_sha256``); None for a folder.
    source: str | None = None
    pixels_sha256: str | None = None
    #: Evaluation only: whether the images were held apart from the calibration ones by the split.
    held_apart_from_calibration: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.source == "arrays":
            d: dict[str, Any] = {
                "folder": None,
                "source": self.source,
                "count": self.count,
                "selection": self.selection,
                "pixels_sha256": self.pixels_sha256,
            }
        else:
            d = {
                "folder": self.folder,
                "count": self.count,
                "skipped_files": self.skipped_files,
                "selection": self.selection,
                "classes": self.classes,
                "first": self.first,
                "last": self.last,
                "file_list_sha256": self.file_list_sha256,
            }
        if self.held_apart_from_calibration is not None:
            d["held_apart_from_calibration"] = self.held_apart_from_calibration
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ImagesUsed:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Pixels:
    """Images ready for the model: uint8 ``[N, H, W, 3]`` crops, their labels, where they came from."""

    pixels: np.ndarray = field(repr=False)
    truth: tuple[int | None, ...]
    report: ImagesUsed

    def __len__(self) -> int:
        return len(self.pixels)


@dataclass(frozen=True)
class Split:
    """How many calibration images to use and how to hold images apart for evaluation."""

    num_calib: int = 200
    seed: int | None = None
    eval_split: float = 0.2
    max_eval: int | None = None
    min_calib: int = 10


def is_folder(images: Any) -> bool:
    return isinstance(images, (str, os.PathLike))


def split_images(folder: Path, split: Split, evaluation: Path | None = None) -> tuple[ImageSet, ImageSet]:
    """Calibration images and the evaluation images of a folder (never the same files)."""
    images = list_images(folder, minimum=0)
    if len(images) < split.min_calib:
        raise CalibrationError(
            f"{folder} has {len(images)} usable image(s) ({len(images.skipped)} other file(s) skipped); "
            f"calibration needs at least {split.min_calib}"
        )
    if evaluation is not None:
        evals = list_images(evaluation, minimum=1)
        calib = images.sample(split.num_calib, seed=split.seed)
        _check_apart(calib, evals)
    else:
        calib, evals = images.divide(_calib_count(len(images), split), seed=split.seed)
    _check_enough(len(calib), len(evals), split)
    return calib, evals.sample(split.max_eval) if split.max_eval else evals


def _check_apart(calib: ImageSet, evals: ImageSet) -> None:
    """Refuse evaluation images that are calibration images: the same files, or copies with the same bytes."""
    same = {f.resolve() for f in calib.files} & {f.resolve() for f in evals.files}
    if same:
        raise InputError(
            f"{len(same)} evaluation image(s) are also calibration images "
            f"(e.g. {sorted(same)[0]}); keep the two sets apart"
        )
    copies = _same_bytes(calib.files, evals.files)
    if copies:
        e, c = copies[0]
        raise InputError(
            f"{len(copies)} evaluation image(s) have the same bytes as calibration images (e.g. {e} is a copy "
            f"of {c}): the evaluation would measure the calibration set; keep the two sets apart"
        )


def _same_bytes(calib: Iterable[Path], evals: Iterable[Path]) -> list[tuple[Path, Path]]:
    """(evaluation file, calibration file) pairs with equal content; only files of equal size are hashed."""
    by_size: dict[int, list[Path]] = {}
    for f in calib:
        by_size.setdefault(f.stat().st_size, []).append(f)
    digest = functools.cache(sha256_file)  # each file hashed at most once
    pairs = []
    for e in evals:
        match = next((c for c in by_size.get(e.stat().st_size, []) if digest(c) == digest(e)), None)
        if match is not None:
            pairs.append((e, match))
    return pairs


def _calib_count(available: int, split: Split) -> int:
    """``num_calib``, or all but ``eval_split`` of them when there are no more images than that."""
    if available > split.num_calib:
        return split.num_calib
    return available - max(1, round(available * split.eval_split))


def _check_enough(calib: int, evals: int, split: Split) -> None:
    if calib < split.min_calib:
        raise CalibrationError(
            f"only {calib} calibration image(s) left after holding out {evals} for evaluation; "
            f"at least {split.min_calib} needed"
        )


def from_sets(
    calib: ImageSet,
    evals: ImageSet,
    held_apart: bool,
    prep: Preprocessing,
    labels: Labels | None,
    progress: Progress = silent,
) -> tuple[Pixels, Pixels]:
    """Decode listed calibration and evaluation images (see :func:`split_images`)."""
    return (
        Pixels(
            load_pixels(calib.files, prep, progress=progress), tuple(calib.labels_for(labels)), folder_report(calib)
        ),
        Pixels(
            load_pixels(evals.files, prep, progress=progress),
            tuple(evals.labels_for(labels)),
            replace(folder_report(evals), held_apart_from_calibration=held_apart),
        ),
    )


def from_folders(
    calibration: Path,
    evaluation: Path | None,
    split: Split,
    prep: Preprocessing,
    labels: Labels | None,
    progress: Progress = silent,
) -> tuple[Pixels, Pixels]:
    calib, evals = split_images(calibration, split, evaluation)
    return from_sets(calib, evals, evaluation is None, prep, labels, progress)


def from_arrays(
    calibration: Iterable[np.ndarray], evaluation: Iterable[np.ndarray] | None, split: Split, prep: Preprocessing
) -> tuple[Pixels, Pixels]:
    """Arrays (HxWx3 uint8 RGB frames of any size), resized and cropped like files.

    Chosen and held apart like a folder's images without labels: with more than ``num_calib``
    arrays, ``num_calib`` evenly spaced ones calibrate (a seeded random choice with
    ``seed``) and the rest are evaluated; with fewer, ``eval_split`` of them are held apart
    the same way. An iterable without a length (a generator, a stream) is read no further than needed:
    ``num_calib`` arrays when evaluation arrays are given, else ``num_calib`` plus ``max_eval`` (``num_calib``
    again when ``max_eval`` is not set); evaluation arrays up to ``max_eval`` (else ``num_calib``).
    """
    held_apart = split.max_eval or split.num_calib
    frames = _crops(
        _bounded(calibration, split.num_calib + (0 if evaluation is not None else held_apart)), prep, "calibration"
    )
    count = split.num_calib if evaluation is not None else _calib_count(len(frames), split)
    picks = _pick(len(frames), count, split.seed)
    calib = frames[picks]
    evals = (
        _crops(_bounded(evaluation, held_apart), prep, "evaluation")
        if evaluation is not None
        else np.delete(frames, picks, axis=0)
    )
    _check_enough(len(calib), len(evals), split)
    evals = evals[_pick(len(evals), split.max_eval, None)] if split.max_eval else evals
    how = _array_selection(len(frames), count, split.seed)
    return (
        Pixels(calib, (None,) * len(calib), array_report(calib, how)),
        Pixels(
            evals,
            (None,) * len(evals),
            replace(
                array_report(evals, "the arrays not chosen" if evaluation is None else "all arrays"),
                held_apart_from_calibration=evaluation is None,
            ),
        ),
    )


def _bounded(frames: Iterable[np.ndarray], limit: int) -> Iterable[np.ndarray]:
    """``frames`` itself when it has a length (all of it is chosen from), else its first ``limit`` items."""
    return frames if isinstance(frames, Sized) else itertools.islice(frames, limit)


def _pick(available: int, count: int, seed: int | None) -> list[int]:
    """Indices of ``count`` of ``available`` arrays: evenly spaced, or a seeded random choice."""
    if count >= available:
        return list(range(available))
    if seed is not None:
        return sorted(random.Random(seed).sample(range(available), count))
    return spread_indices((None,) * available, count)


def _array_selection(available: int, count: int, seed: int | None) -> str:
    if count >= available:
        return "all arrays"
    return f"seeded random choice (seed {seed})" if seed is not None else "evenly spaced"


def _crops(frames: Iterable[np.ndarray], prep: Preprocessing, what: str) -> np.ndarray:
    crops = []
    for i, frame in enumerate(frames):
        if (
            not isinstance(frame, np.ndarray)
            or frame.dtype != np.uint8
            or frame.ndim != 3
            or frame.shape[2] != 3
            or 0 in frame.shape
        ):
            got = f"{type(frame).__name__} {getattr(frame, 'dtype', '')} {getattr(frame, 'shape', '')}".strip()
            raise InputError(f"{what} image {i} must be an HxWx3 uint8 RGB array of at least 1x1 pixels, got {got}")
        crops.append(frame_pixels(frame, prep, "RGB"))
    if not crops:
        raise CalibrationError(f"no {what} images given")
    return np.stack(crops)


def folder_report(images: ImageSet) -> ImagesUsed:
    names = "\n".join(str(f.relative_to(images.root)) for f in images.files)
    return ImagesUsed(
        count=len(images),
        selection=images.selection or "all images",
        folder=str(images.root),
        skipped_files=len(images.skipped),
        classes=images.classes(),
        first=images.files[0].name if images.files else None,
        last=images.files[-1].name if images.files else None,
        file_list_sha256=hashlib.sha256(names.encode()).hexdigest(),
    )


def array_report(pixels: np.ndarray, selection: str = "all arrays") -> ImagesUsed:
    digest = hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()
    return ImagesUsed(count=len(pixels), selection=selection, source="arrays", pixels_sha256=digest)


def listed_sets(calibration: Images, evaluation: Images | None, split: Split) -> tuple[ImageSet, ImageSet] | None:
    """Calibration and evaluation folders listed and split (None for arrays)."""
    if evaluation is not None and is_folder(calibration) != is_folder(evaluation):
        raise InputError("give calibration and evaluation images the same way: both folders, or both arrays")
    if not is_folder(calibration):
        return None
    folder = cast("str | os.PathLike[str]", calibration)
    held_apart = cast("str | os.PathLike[str] | None", evaluation)
    return split_images(Path(folder), split, Path(held_apart) if held_apart is not None else None)


def pixels_of(
    listed: tuple[ImageSet, ImageSet] | None,
    calibration: Images,
    evaluation: Images | None,
    split: Split,
    prep: Preprocessing,
    labels: Labels | None,
    progress: Progress,
) -> tuple[Pixels, Pixels]:
    """Calibration and evaluation pixels, from the listed folders or from arrays."""
    if listed is not None:
        return from_sets(*listed, evaluation is None, prep, labels, progress)
    arrays = cast("Iterable[np.ndarray]", calibration)
    return from_arrays(arrays, cast("Iterable[np.ndarray] | None", evaluation), split, prep)
