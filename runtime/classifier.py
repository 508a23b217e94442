"""``Classifier``: the on-device image classifier (numpy, Pillow, one TFLite interpreter)."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np

from edgeship.errors import InputError
from edgeship.runtime.card import CARD_FILE, ColorOrder, Layout, ModelCard, Postprocessing, Preprocessing, TensorSpec
from edgeship.runtime.images import (
    ImageSet,
    Labels,
    frame_pixels,
    iter_pixels,
    list_images,
    normalize,
    open_image,
    pixel_offset,
    resize_crop,
)
from edgeship.runtime.interpreter import Model, open_model
from edgeship.runtime.metrics import accuracy, softmax, topk
from edgeship.runtime.model_check import check_model_file

log = logging.getLogger(__name__)


class Prediction(NamedTuple):
    """One ranked class: unpacks as ``(class_index, label, probability)``."""

    class_index: int
    label: str
    probability: float


@dataclass(frozen=True)
class Evaluation:
    """Batch evaluation of a folder: per-image top-k and accuracy where labels are known."""

    files: tuple[str, ...]
    logits: np.ndarray
    top1: float | None
    top5: float | None
    skipped: int

    def to_dict(self) -> dict[str, Any]:
        return {"count": len(self.files), "top1": self.top1, "top5": self.top5, "skipped_files": self.skipped}


class Classifier:
    """A deployed image classifier: preprocessing, (de)quantization, softmax and top-k.

    Use :meth:`load` with a bundle folder (``model_card.json`` + model + labels) or a
    ``.tflite`` or ``.onnx`` path (its folder's model card is used when present). A ``.tflite`` model
    runs on a TFLite interpreter, an ``.onnx`` one (edgeship's int8 QDQ model) on onnxruntime.
    """

    def __init__(self, model: Model, card: ModelCard, labels: Labels | None) -> None:
        self.model = model
        self.card = card
        self.labels = labels

    @classmethod
    def load(
        cls,
        bundle_or_model: str | os.PathLike[str],
        *,
        num_threads: int | None = None,
        use_xnnpack: bool = True,
        backend: str | None = None,
        preprocessing: Preprocessing | None = None,
    ) -> Classifier:
        """Load a bundle folder, a ``.tflite`` or an ``.onnx`` file.

        A TFLite model file is checked in a child process first (a corrupt one can crash the
        interpreter), once per file content; an ONNX file is checked by onnxruntime as it loads.

        Args:
            bundle_or_model: Folder with ``model_card.json``, or a ``.tflite`` or ``.onnx`` file.
            num_threads: Interpreter threads (None: the interpreter's default).
            use_xnnpack: Use the XNNPACK delegate (the fast CPU path).
            backend: Force ``ai_edge_litert``, ``tflite_runtime`` or ``tensorflow`` (for a ``.tflite``
                model); an ``.onnx`` model always runs on ``onnxruntime``.
            preprocessing: How images become input, for a model without a card (required
                then: guessing it gives wrong answers); with a card, it replaces the card's.
        """
        path = Path(bundle_or_model)
        if not path.exists():
            raise InputError(f"{path} does not exist (expected a bundle folder, a .tflite or an .onnx file)")
        if path.is_dir():
            card = ModelCard.load(path / CARD_FILE)
            model_path = card.model_path(path)
        else:
            model_path = path
            card = find_card(path)  # type: ignore[assignment]

        if model_path.suffix.lower() != ".onnx":
            check_model_file(model_path, backend=backend)
        if card is None and preprocessing is None:
            raise InputError(
                f"no model card beside {path} ({path.stem}.card.json or {CARD_FILE}): without it the "
                "preprocessing is unknown; use the bundle folder, put the card beside the model, or "
                "give the preprocessing explicitly (python -m edgeship.runtime --preprocess FILE.json, "
                "or Classifier.load(..., preprocessing=Preprocessing(...)))"
            )
        model = open_model(model_path, num_threads=num_threads, use_xnnpack=use_xnnpack, backend=backend)
        if card is None:
            card = card_from_model(model, path.name)
        if preprocessing is not None:
            card = card.with_(preprocessing=preprocessing)
        labels = None
        labels_path = card.file(model_path.parent, "labels_file")
        if labels_path is not None and labels_path.is_file():
            labels = Labels.load(labels_path)
        return cls(model, card, labels)

    # ---------------------------------------------------------------- inputs
    def pixels(self, image: Any, *, color: ColorOrder | str = ColorOrder.RGB) -> np.ndarray:
        """Resize/crop an image to uint8 HWC pixels in the model's colour order.

        Args:
            image: A path (JPEG files are DCT-scaled while decoding), a PIL image, or a camera
                frame: a uint8 ``HxWx3`` array (cropped as a view when it needs no resize).
            color: Channel order of a frame, ``"RGB"`` or ``"BGR"`` (OpenCV); arrays only.
        """
        if isinstance(image, np.ndarray):
            return frame_pixels(image, self.card.preprocessing, color)
        return resize_crop(image, self.card.preprocessing)

    def to_input(self, image: Any, *, color: ColorOrder | str = ColorOrder.RGB) -> np.ndarray:
        """Image -> float model input ``[1,H,W,C]``; float arrays of the input shape pass through."""
        if isinstance(image, np.ndarray) and image.dtype != np.uint8:
            x = image.astype(np.float32)
            want = self.model.input.shape
            if x.shape == want[1:]:
                x = x[None]
            if x.shape != want:
                raise InputError(
                    f"float input must have the model's shape {list(want)} (or without batch), got {list(x.shape)}"
                )
            return x
        return normalize(self.pixels(image, color=color), self.card.preprocessing)[None]

    def typed_input(self, image: Any, *, color: ColorOrder | str = ColorOrder.RGB) -> np.ndarray:
        """Image -> the model's own input ``[1,H,W,C]`` (int8/uint8 straight from pixels when it folds)."""
        if isinstance(image, np.ndarray) and image.dtype != np.uint8:
            return self.model.quantize_input(self.to_input(image))
        return self.model.input_from_pixels(self.pixels(image, color=color)[None], self.card.preprocessing)

    # ---------------------------------------------------------------- outputs
    def logits(self, image: Any, *, color: ColorOrder | str = ColorOrder.RGB) -> np.ndarray:
        """Dequantized raw scores ``[num_classes]`` for one image.

        Images go through the integer pixel path when the model allows it (no float
        preprocessing on the device); float arrays are taken as model input.
        """
        return self.model.run_raw(self.typed_input(image, color=color)).reshape(-1)

    def probabilities(self, scores: np.ndarray) -> np.ndarray:
        """Scores -> probabilities, as the card says the output is (no second softmax)."""
        kind = self.card.postprocessing
        if kind is Postprocessing.SOFTMAX:
            return softmax(scores[None])[0]
        if kind is Postprocessing.EXP:
            return np.exp(scores.astype(np.float32))
        return scores.astype(np.float32)

    def predict(self, image: Any, top_k: int = 5, *, color: ColorOrder | str = ColorOrder.RGB) -> list[Prediction]:
        """Top-k classes of one image (path, PIL image, uint8 HxWx3 frame in ``color`` order, or a float input)."""
        return self.top(self.logits(image, color=color), top_k)

    def top(self, scores: np.ndarray, top_k: int = 5) -> list[Prediction]:
        """Scores -> the top-k predictions."""
        probs = self.probabilities(scores)
        return [Prediction(int(i), self.label(int(i)), float(probs[i])) for i in topk(probs[None], top_k)[0]]

    def predict_timed(
        self, image: Any, top_k: int = 5, *, color: ColorOrder | str = ColorOrder.RGB
    ) -> tuple[list[Prediction], dict[str, int]]:
        """:meth:`predict` through the same steps, with nanoseconds per step (for ``bench``).

        Steps: ``decode`` (read and decode the file, EXIF, 8-bit RGB), ``preprocess``
        (resize/crop to the model's typed input), ``invoke`` (set input, invoke, read and
        dequantize the output), ``postprocess`` (probabilities, top-k).
        """

        prep = self.card.preprocessing
        t0 = time.perf_counter_ns()
        decoded = image if isinstance(image, np.ndarray) else open_image(image, prep)
        t1 = time.perf_counter_ns()
        x = self.typed_input(decoded, color=color)
        t2 = time.perf_counter_ns()
        scores = self.model.run_raw(x).reshape(-1)
        t3 = time.perf_counter_ns()
        preds = self.top(scores, top_k)
        t4 = time.perf_counter_ns()
        return preds, {"decode": t1 - t0, "preprocess": t2 - t1, "invoke": t3 - t2, "postprocess": t4 - t3}

    def label(self, index: int) -> str:
        return self.labels.name(index) if self.labels else str(index)

    def logits_many(
        self,
        files: Any,
        *,
        workers: int | None = None,
        progress: Callable[[str, int | None, int | None], None] | None = None,
    ) -> np.ndarray:
        """Scores ``[N, num_classes]`` of many images: decoded on ``workers`` threads (default one per
        core) while the interpreter runs, each through the same path as :meth:`logits`."""
        prep, files = self.card.preprocessing, list(files)
        rows = []
        for i, pixels in enumerate(iter_pixels(files, prep, workers=workers)):
            rows.append(self.model.run_raw(self.model.input_from_pixels(pixels[None], prep)).reshape(-1))
            if progress:
                progress("evaluate", i + 1, len(files))
        return np.stack(rows) if rows else np.zeros((0, int(np.prod(self.model.output.shape[1:]))), np.float32)

    def evaluate(
        self,
        folder: str | os.PathLike[str] | ImageSet,
        *,
        workers: int | None = None,
        progress: Callable[[str, int | None, int | None], None] | None = None,
    ) -> Evaluation:
        """Run every image of a folder (decoded in parallel); accuracy when ground-truth labels are known."""
        images = folder if isinstance(folder, ImageSet) else list_images(folder, workers=workers)
        logits = self.logits_many(images.files, workers=workers, progress=progress)
        truth = images.labels_for(self.labels)
        return Evaluation(
            tuple(str(f) for f in images.files),
            logits,
            accuracy(logits, truth, 1),
            accuracy(logits, truth, 5),
            len(images.skipped),
        )

    def describe(self) -> dict[str, Any]:
        return {
            **self.model.describe(),
            "model_file": self.card.model_file,
            "precision": self.card.precision,
            "image_path": self.image_path(),
        }

    def image_path(self) -> str:
        """Which image path runs, in words (drift reports say it: the reference saw the same pixels)."""
        prep, spec = self.card.preprocessing, self.model.input
        decode = "JPEG draft decode (DCT-scaled to cover the resize)" if prep.resize_shorter else "full decode"
        integer = spec.quantized and pixel_offset(prep, spec.scale, spec.zero_point) is not None
        feed = (
            f"integer input (pixel + k → {spec.dtype.name})"
            if integer
            else f"float normalize{' + quantize' if spec.quantized else ''}"
        )
        return f"{decode}, EXIF upright, uint8 {prep.interpolation.value} crop-box resize, {feed}"


def find_card(model_path: Path) -> ModelCard | None:
    """The card of a model file: ``<stem>.card.json`` beside it, else the folder's ``model_card.json``."""
    for candidate in (model_path.with_name(model_path.stem + ".card.json"), model_path.parent / CARD_FILE):
        if candidate.is_file():
            card = ModelCard.load(candidate)
            if card.model_file != model_path.name:
                card = card.with_(model_file=model_path.name)
            return card
    return None


def card_from_model(model: Model, file_name: str) -> ModelCard:
    shape = model.input.shape
    return ModelCard(
        model_file=file_name,
        precision="int8" if model.input.quantized or _int8_kernels(model) else "float32",
        input=TensorSpec.of(model.input, Layout.NHWC.value),
        output=TensorSpec.of(model.output),
        preprocessing=Preprocessing.imagenet(shape[1], shape[2]),
        num_classes=int(np.prod(model.output.shape[1:])),
    )


def _int8_kernels(model: Model) -> bool:
    """Whether the runtime ran int8 kernels (an ONNX QDQ model's I/O is float)."""
    return bool(model.describe().get("kernel_kinds", {}).get("int8"))
