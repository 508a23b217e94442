"""``Classifier``: the on-device image classifier (numpy, Pillow, one TFLite interpreter)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np

from edgeship.errors import InputError
from edgeship.runtime.card import CARD_FILE, Layout, ModelCard, Preprocessing, TensorSpec
from edgeship.runtime.images import ImageSet, Labels, list_images, normalize, resize_crop
from edgeship.runtime.interpreter import TFLiteModel
from edgeship.runtime.metrics import accuracy, softmax, topk

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
    ``.tflite`` path (its folder's model card is used when present).
    """

    def __init__(self, model: TFLiteModel, card: ModelCard, labels: Labels | None) -> None:
        self.model = model
        self.card = card
        self.labels = labels

    @classmethod
    def load(cls, bundle_or_model: str | os.PathLike[str], *, num_threads: int | None = None,
             use_xnnpack: bool = True, backend: str | None = None) -> "Classifier":
        """Load a bundle folder or a ``.tflite`` file.

        Args:
            bundle_or_model: Folder with ``model_card.json``, or a ``.tflite`` file.
            num_threads: Interpreter threads (None: the interpreter's default).
            use_xnnpack: Use the XNNPACK delegate (the fast CPU path).
            backend: Force ``ai_edge_litert``, ``tflite_runtime`` or ``tensorflow``.
        """
        path = Path(bundle_or_model)
        if not path.exists():
            raise InputError(f"{path} does not exist (expected a bundle folder or a .tflite file)")
        if path.is_dir():
            card = ModelCard.load(path / CARD_FILE)
            model_path = path / card.model_file
        else:
            model_path = path
            card = find_card(path)  # type: ignore[assignment]
        model = TFLiteModel(model_path, num_threads=num_threads, use_xnnpack=use_xnnpack, backend=backend)
        if card is None:
            card = _card_from_model(model, path.name)
            log.warning("no %s beside %s: assuming ImageNet preprocessing for %s input", CARD_FILE, path,
                        "x".join(map(str, model.input.shape)))
        labels = None
        if card.labels_file and (model_path.parent / card.labels_file).is_file():
            labels = Labels.load(model_path.parent / card.labels_file)
        return cls(model, card, labels)

    # ---------------------------------------------------------------- inputs
    def pixels(self, image: Any) -> np.ndarray:
        """Resize/crop an image (path, PIL image or uint8 HWC array) to uint8 HWC pixels."""
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3:
                raise InputError(f"pixel arrays must be uint8 HxWx3, got {image.dtype} {image.shape}")
            from PIL import Image

            image = Image.fromarray(image)
        return resize_crop(image, self.card.preprocessing)

    def to_input(self, image: Any) -> np.ndarray:
        """Image -> float model input ``[1,H,W,C]``; float arrays of the input shape pass through."""
        if isinstance(image, np.ndarray) and image.dtype != np.uint8:
            x = image.astype(np.float32)
            want = self.model.input.shape
            if x.shape == want[1:]:
                x = x[None]
            if x.shape != want:
                raise InputError(f"float input must have the model's shape {list(want)} (or without batch), "
                                 f"got {list(x.shape)}")
            return x
        return normalize(self.pixels(image), self.card.preprocessing)[None]

    # ---------------------------------------------------------------- outputs
    def logits(self, image: Any) -> np.ndarray:
        """Dequantized raw scores ``[num_classes]`` for one image.

        Images go through the integer pixel path when the model allows it (no float
        preprocessing on the device); float arrays are taken as model input.
        """
        if isinstance(image, np.ndarray) and image.dtype != np.uint8:
            return self.model.run(self.to_input(image)).reshape(-1)
        pixels = self.pixels(image)[None]
        return self.model.run_raw(self.model.input_from_pixels(pixels, self.card.preprocessing)).reshape(-1)

    def probabilities(self, scores: np.ndarray) -> np.ndarray:
        if self.card.postprocessing == "softmax":
            return softmax(scores[None])[0]
        return scores.astype(np.float32)

    def predict(self, image: Any, top_k: int = 5) -> list[Prediction]:
        """Top-k classes of one image (path, PIL image, uint8 HWC pixels or a float input array)."""
        probs = self.probabilities(self.logits(image))
        return [Prediction(int(i), self.label(int(i)), float(probs[i])) for i in topk(probs[None], top_k)[0]]

    def label(self, index: int) -> str:
        return self.labels.name(index) if self.labels else str(index)

    def evaluate(self, folder: str | os.PathLike[str] | ImageSet, *,
                 progress: Callable[[str, int | None, int | None], None] | None = None) -> Evaluation:
        """Run every image of a folder; accuracy when ground-truth labels are known."""
        images = folder if isinstance(folder, ImageSet) else list_images(folder)
        rows = []
        for i, f in enumerate(images.files):
            rows.append(self.logits(f))
            if progress:
                progress("evaluate", i + 1, len(images))
        logits = np.stack(rows)
        truth = images.labels_for(self.labels)
        return Evaluation(tuple(str(f) for f in images.files), logits, accuracy(logits, truth, 1),
                          accuracy(logits, truth, 5), len(images.skipped))

    def describe(self) -> dict[str, Any]:
        return {**self.model.describe(), "model_file": self.card.model_file, "precision": self.card.precision}


def find_card(model_path: Path) -> ModelCard | None:
    """The card of a model file: ``<stem>.card.json`` beside it, else the folder's ``model_card.json``."""
    for candidate in (model_path.with_name(model_path.stem + ".card.json"), model_path.parent / CARD_FILE):
        if candidate.is_file():
            card = ModelCard.load(candidate)
            if card.model_file != model_path.name:
                card = card.with_(model_file=model_path.name)
            return card
    return None


def _card_from_model(model: TFLiteModel, file_name: str) -> ModelCard:
    shape = model.input.shape
    return ModelCard(
        model_file=file_name,
        precision="int8" if model.input.quantized else "float32",
        input=TensorSpec(model.input.name, shape, model.input.dtype.name, Layout.NHWC.value),
        output=TensorSpec(model.output.name, model.output.shape, model.output.dtype.name),
        preprocessing=Preprocessing.imagenet(shape[1], shape[2]),
        num_classes=int(np.prod(model.output.shape[1:])),
    )

