"""Drift through the client's own path: MediaPipe Tasks' ``ImageClassifier`` as the runtime.

An Android app does not run edgeship's runtime: MediaPipe Tasks reads the model's TFLite
Metadata and preprocesses by itself. The ``mediapipe`` Python package runs the same C++
task graph, so the host can check that path for real. What it does to an image (read
in ``mediapipe/tasks/cc/components/processors/image_preprocessing_graph.cc`` and
``mediapipe/calculators/tensor/image_to_tensor_converter_opencv.cc``, and measured:
:data:`PREPROCESSING`): the whole image (or the region of interest the app passes) is
stretched to the model's input size, no crop and no kept aspect ratio, with OpenCV's
``warpPerspective`` and ``INTER_LINEAR`` (bilinear from the 2x2 nearest source pixels,
no antialiasing when downscaling); a uint8 input gets those pixels as they are, a
float input gets ``(pixel - mean) / std`` with the metadata's one mean and std.

Two agreements with the float reference are reported: under the client's
preprocessing (full images, MediaPipe's default path) and under the card's (images
resized and center-cropped as the card says, so MediaPipe's resize is the identity),
plus agreement with edgeship's own runtime on those same pixels.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeship.errors import InputError, MissingDependencyError
from edgeship.runtime.card import ModelCard
from edgeship.runtime.classifier import Classifier, find_card
from edgeship.runtime.images import Labels, load_rgb, resize_crop
from edgeship.runtime.metrics import DriftFigures, compare
from edgeship.runtime.native_stderr import native_stderr_to_log
from edgeship.targets.metadata import embed_metadata, read_metadata

log = logging.getLogger(__name__)

#: What MediaPipe Tasks' ImageClassifier does to an image (source read, then measured here).
PREPROCESSING = (
    "MediaPipe ImageClassifier: the whole image (or the app's region of interest) stretched to the "
    "model input with OpenCV warpPerspective INTER_LINEAR: no center crop, aspect ratio not kept, "
    "no antialiasing; uint8 input: pixels as they are; float input: (pixel - mean) / std from the "
    "metadata (one value for all channels)"
)
#: Same-pixel agreement with edgeship's runtime below which the client path is reported as broken.
MIN_RUNTIME_AGREEMENT = 0.99

Progress = Callable[[str, "int | None", "int | None"], None]


@dataclass(frozen=True)
class ClientDrift:
    """Top-1 agreement of MediaPipe's answers with the float reference and with edgeship's runtime."""

    client: str
    images: int
    client_preprocessing: DriftFigures  # full images, MediaPipe's own resize
    card_preprocessing: DriftFigures  # the card's resize+crop, MediaPipe's resize is the identity
    roi_preprocessing: DriftFigures  # full images with the card's crop as region of interest (the README's Kotlin)
    runtime_agreement: float | None  # MediaPipe vs edgeship's runtime on the card's pixels
    metadata: dict[str, Any] = field(default_factory=dict)
    embedded_here: bool = False

    @property
    def ok(self) -> bool:
        return self.runtime_agreement is None or self.runtime_agreement >= MIN_RUNTIME_AGREEMENT

    def to_dict(self) -> dict[str, Any]:
        return {
            "client": self.client,
            "preprocessing": PREPROCESSING,
            "images": self.images,
            "client_preprocessing": self.client_preprocessing.to_dict(),
            "card_preprocessing": self.card_preprocessing.to_dict(),
            "roi_preprocessing": self.roi_preprocessing.to_dict(),
            "runtime_agreement": self.runtime_agreement,
            "min_runtime_agreement": MIN_RUNTIME_AGREEMENT,
            "ok": self.ok,
            "metadata": self.metadata,
            "metadata_source": "embedded by this check (the model had none)" if self.embedded_here else "model",
            "summary": summary_line(self),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClientDrift:
        """The inverse of :meth:`to_dict` (derived entries such as ``ok`` and ``summary`` are recomputed)."""
        return cls(
            str(d["client"]),
            int(d["images"]),
            DriftFigures.from_dict(d["client_preprocessing"]),
            DriftFigures.from_dict(d["card_preprocessing"]),
            DriftFigures.from_dict(d["roi_preprocessing"]),
            d.get("runtime_agreement"),
            dict(d.get("metadata") or {}),
            d.get("metadata_source") != "model",
        )


def _mediapipe() -> Any:
    try:
        import mediapipe as mp
        from mediapipe.tasks import python as mp_tasks
        from mediapipe.tasks.python import vision
    except ImportError as exc:
        raise MissingDependencyError(
            f"mediapipe is not installed (needed to check the MediaPipe Tasks path): "
            f"pip install 'edgeship[android]' ({exc})"
        ) from exc
    return mp, mp_tasks, vision


def client_name() -> str:
    from importlib import metadata

    try:
        return f"mediapipe {metadata.version('mediapipe')} ImageClassifier (CPU)"
    except metadata.PackageNotFoundError:
        return "mediapipe ImageClassifier"


class MediaPipeClassifier:
    """MediaPipe Tasks' ImageClassifier on one model file (which must carry TFLite Metadata)."""

    def __init__(self, model_path: str | os.PathLike[str]) -> None:
        with native_stderr_to_log(logging.DEBUG):  # absl/glog start-up lines (no EGL, no GPU) say nothing wrong
            mp, mp_tasks, vision = _mediapipe()
        self._mp = mp
        opts = vision.ImageClassifierOptions(
            base_options=mp_tasks.BaseOptions(model_asset_path=str(model_path)), max_results=-1
        )
        try:
            with native_stderr_to_log(logging.DEBUG):
                self._clf = vision.ImageClassifier.create_from_options(opts)
        except (RuntimeError, ValueError) as exc:
            raise InputError(
                f"MediaPipe ImageClassifier refuses {Path(model_path).name}: {str(exc).splitlines()[0][:300]}"
            ) from exc

    def scores(
        self, pixels: np.ndarray, num_classes: int, roi: tuple[float, float, float, float] | None = None
    ) -> np.ndarray:
        """Scores by class index for one uint8 RGB ``HxWx3`` image (``roi``: normalized x, y, w, h)."""
        image = self._mp.Image(image_format=self._mp.ImageFormat.SRGB, data=np.ascontiguousarray(pixels))
        opts = None
        if roi is not None:
            from mediapipe.tasks.python.components.containers.rect import Rect
            from mediapipe.tasks.python.vision.core.image_processing_options import ImageProcessingOptions

            x, y, w, h = roi
            opts = ImageProcessingOptions(region_of_interest=Rect(left=x, top=y, right=x + w, bottom=y + h))

        with native_stderr_to_log(logging.DEBUG):
            result = self._clf.classify(image, opts)
        out = np.full(num_classes, -np.inf, dtype=np.float32)
        for c in result.classifications[0].categories:
            out[c.index] = c.score
        return out

    def close(self) -> None:
        self._clf.close()

    def __enter__(self) -> MediaPipeClassifier:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def with_metadata(model_path: Path, card: ModelCard, folder: Path, dest: Path) -> tuple[Path, dict[str, Any], bool]:
    """``model_path`` if it carries metadata, else a copy in ``dest`` with metadata embedded from the card."""
    data = model_path.read_bytes()
    found = read_metadata(data)
    if found is not None:
        return model_path, found.to_dict(), False
    labels = None
    labels_path = card.file(folder, "labels_file")
    if labels_path is not None and labels_path.is_file():
        labels = Labels.load(labels_path).names
    written, meta = embed_metadata(data, card, labels)
    out = dest / model_path.name
    out.write_bytes(written)
    return out, meta.to_dict(), True


@dataclass(frozen=True)
class ClientScores:
    """MediaPipe's scores on each image under the three preprocessings, and the metadata it read."""

    full: np.ndarray  # full images, MediaPipe's own resize
    cropped: np.ndarray  # the card's resize+crop
    roi: np.ndarray  # full images, the card's crop as region of interest
    metadata: dict[str, Any]
    embedded_here: bool


#: MediaPipe classifiers run side by side in a check (each on its share of the images; the answers are the
#: same as one classifier's: each image is classified on its own).
CLIENT_WORKERS = 2


def mediapipe_scores(
    model: str | os.PathLike[str],
    files: Sequence[Path],
    num_classes: int,
    *,
    card: ModelCard | None = None,
    progress: Progress | None = None,
    workers: int = CLIENT_WORKERS,
) -> ClientScores:
    """Run the model through MediaPipe's ImageClassifier on each file, three ways (see :class:`ClientDrift`).

    Without embedded metadata, a temporary copy of the model gets it from the card (as the bundle writes it).
    ``workers`` classifiers share the images.
    """
    model = Path(model)
    card = card or find_card(model)
    if card is None:
        raise InputError(f"no model card beside {model}")
    scores = tuple(np.zeros((len(files), num_classes), np.float32) for _ in range(3))
    done = [0]
    with tempfile.TemporaryDirectory(prefix="edgeship-mediapipe-") as tmp:
        path, meta, embedded = with_metadata(model, card, model.parent, Path(tmp))

        def classify(rows: range) -> None:
            with MediaPipeClassifier(path) as clf:
                for i in rows:
                    _classify_one(clf, files[i], card, num_classes, [s[i] for s in scores])
                    done[0] += 1
                    if progress:
                        progress("run MediaPipe ImageClassifier", done[0], len(files))

        shares = [range(a, b) for a, b in _shares(len(files), workers)]
        with ThreadPoolExecutor(len(shares), thread_name_prefix="edgeship-mediapipe") as pool:
            for f in [pool.submit(classify, rows) for rows in shares]:
                f.result()
    full, cropped, roi = scores
    return ClientScores(full, cropped, roi, meta, embedded)


def _shares(n: int, workers: int) -> list[tuple[int, int]]:
    edges = np.linspace(0, n, max(1, min(workers, n)) + 1).astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def _classify_one(
    clf: MediaPipeClassifier, file: Path, card: ModelCard, num_classes: int, rows: list[np.ndarray]
) -> None:
    """One image's scores into ``rows`` (full image, card's crop, crop as region of interest)."""
    image = np.asarray(load_rgb(file))
    full, cropped, roi = rows
    full[:] = clf.scores(image, num_classes)
    roi[:] = clf.scores(image, num_classes, model_crop(image.shape[1], image.shape[0], card))
    cropped[:] = clf.scores(resize_crop(file, card.preprocessing), num_classes)


def client_drift(
    scores: ClientScores,
    reference: np.ndarray,
    runtime_outputs: np.ndarray,
    truth: Sequence[int | None] | None = None,
) -> ClientDrift:
    """MediaPipe's scores compared with the float reference and with edgeship's runtime on the same pixels."""
    n = len(scores.cropped)
    same = float(np.mean(np.argmax(scores.cropped, 1) == np.argmax(runtime_outputs, 1))) if n else None
    return ClientDrift(
        client_name(),
        n,
        compare(reference, scores.full, truth),
        compare(reference, scores.cropped, truth),
        compare(reference, scores.roi, truth),
        same,
        scores.metadata,
        scores.embedded_here,
    )


def mediapipe_drift(
    model: str | os.PathLike[str],
    files: Sequence[Path],
    reference: np.ndarray,
    *,
    card: ModelCard | None = None,
    runtime_outputs: np.ndarray | None = None,
    truth: Sequence[int | None] | None = None,
    progress: Progress | None = None,
) -> ClientDrift:
    """Run the model through MediaPipe's ImageClassifier and compare with the float reference.

    Args:
        model: The deployed ``.tflite`` (its card beside it, or ``card``). Without embedded
            metadata, a temporary copy gets it from the card (as the bundle writes it).
        files: The images the reference was computed on.
        reference: Float reference outputs (the source ONNX under the card's reference
            preprocessing), one row per file.
        runtime_outputs: edgeship's runtime outputs on the same files (computed when None).
        truth: Class indices for accuracy (optional).
    """
    scores = mediapipe_scores(model, files, int(reference.shape[1]), card=card, progress=progress)
    if runtime_outputs is None:
        runtime_outputs = np.stack([Classifier.load(model).logits(f) for f in files])
    return client_drift(scores, reference, runtime_outputs, truth)


def model_crop(width: int, height: int, card: ModelCard) -> tuple[float, float, float, float]:
    """The card's resize-and-center-crop as a normalized region of interest ``(x, y, w, h)`` of the full image."""
    prep = card.preprocessing
    ch, cw = prep.crop
    s = prep.resize_shorter / min(width, height) if prep.resize_shorter else 1.0
    # The card resizes to (round(w*s), round(h*s)) and crops at whole pixels of that image; in
    # normalized coordinates the crop is the same fractions of the full image (pixel-aligned,
    # so an image already at the resize size is copied, not resampled by half a pixel).
    sw, sh = max(cw, round(width * s)), max(ch, round(height * s))
    return ((sw - cw) // 2 / sw, (sh - ch) // 2 / sh, cw / sw, ch / sh)


def summary_line(drift: ClientDrift) -> str:
    """One line for the terminal."""
    same = "n/a" if drift.runtime_agreement is None else f"{100 * drift.runtime_agreement:.2f}%"
    return (
        f"{drift.client}: top-1 agreement with the float reference {drift.card_preprocessing.agreement_pct:.2f}% "
        f"on the card's crop, {drift.client_preprocessing.agreement_pct:.2f}% on full images (its own resize, "
        f"no crop), {drift.roi_preprocessing.agreement_pct:.2f}% with the crop as region of interest; "
        f"with edgeship's runtime on the same pixels {same} ({drift.images} images)"
    )


def client_problems(drift: ClientDrift) -> list[str]:
    """Why the client path fails the check: MediaPipe answering differently from edgeship's runtime on the same
    pixels (empty when it agrees)."""
    if drift.ok or drift.runtime_agreement is None:
        return []
    return [
        f"MediaPipe ImageClassifier agrees with edgeship's runtime on only {100 * drift.runtime_agreement:.2f}% "
        f"of the same pixels (needs >= {100 * MIN_RUNTIME_AGREEMENT:.0f}%): the app would not see these answers"
    ]
