"""TFLite Metadata for clients that read it (MediaPipe Tasks, LiteRT apps).

An Android app loads the ``.tflite`` with Google's libraries: MediaPipe Tasks'
``ImageClassifier`` reads the model's embedded metadata (input normalisation, colour
space, the labels file of the output) and preprocesses by itself. This module derives
that metadata from the model card (pure: :func:`classifier_metadata`), writes it with
MediaPipe's maintained writer (:func:`embed_metadata`) and reads it back
(:func:`read_metadata`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from edgeship._version import SCHEMA_VERSION
from edgeship.errors import MissingDependencyError, ModelTargetMismatchError
from edgeship.runtime.card import ModelCard, Postprocessing, Preprocessing, simple_value
from edgeship.runtime.images import pixel_offset

MODEL_NAME = "ImageClassifier"
METADATA_JSON = "model_metadata.json"

#: What the output is, by the card's postprocessing (what turns it into probabilities).
SCORES = {
    Postprocessing.SOFTMAX: "logits",
    Postprocessing.NONE: "probabilities",
    Postprocessing.EXP: "log-probabilities",
}
_SCORE_TEXT = {
    "logits": "logits (raw scores, not probabilities): softmax gives probabilities; the top-1 is the arg-max",
    "probabilities": "probabilities (the model ends in softmax)",
    "log-probabilities": "log-probabilities (the model ends in log-softmax): exp() gives probabilities",
}


@dataclass(frozen=True)
class ClassifierMetadata:
    """The image-classifier metadata of one model, as written and as read back.

    Attributes:
        norm_mean: Mean in 0..255 pixel units, one value for all channels.
        norm_std: Std in 0..255 pixel units, one value for all channels.
        color_space: ``RGB`` or ``BGR``.
        input_description: How an image becomes the input (resize, crop, normalisation).
        output_description: What the scores are (``score`` in words).
        score: ``logits``, ``probabilities`` or ``log-probabilities``.
        labels_file: Name of the labels file associated with the output (None: no labels).
        labels: Class names in output order.
    """

    name: str
    description: str
    norm_mean: tuple[float, ...]
    norm_std: tuple[float, ...]
    color_space: str
    input_description: str
    output_description: str
    score: str
    labels_file: str | None
    labels: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """What ``model_metadata.json`` holds (the labels as their count)."""
        d: dict[str, Any] = {"schema_version": SCHEMA_VERSION, **asdict(self)}
        d["norm_mean"], d["norm_std"], d["labels"] = list(self.norm_mean), list(self.norm_std), len(self.labels)
        return d


def client_normalization(prep: Preprocessing) -> tuple[float, float]:
    """``(mean, std)`` in pixel units that a per-tensor client applies as ``(pixel - mean) / std``.

    Raises:
        ModelTargetMismatchError: The normalisation differs per channel (no client expresses that).
    """
    means = {simple_value(m / prep.pixel_scale) for m in prep.mean}
    stds = {simple_value(s / prep.pixel_scale) for s in prep.std}
    if len(means) != 1 or len(stds) != 1:
        raise ModelTargetMismatchError(
            f"the model's normalisation is per channel (mean {list(prep.mean)}, std {list(prep.std)} after "
            f"pixel_scale {prep.pixel_scale:.6g}); MediaPipe Tasks and TFLite Metadata take one mean/std for "
            "all channels: convert with --pixels-in-graph (deploy does this for Android targets) so the model "
            "takes 0..255 pixels"
        )
    return means.pop(), stds.pop()


def classifier_metadata(card: ModelCard, labels: Sequence[str] | None) -> ClassifierMetadata:
    """The metadata a client needs, derived from the card (pure; no MediaPipe needed)."""
    prep = card.preprocessing
    mean, std = client_normalization(prep)
    h, w = prep.crop
    resize = (
        f"resize the shorter side to {prep.resize_shorter} px ({prep.interpolation.value}), center-crop {h}x{w}"
        if prep.resize_shorter
        else f"resize to {h}x{w}"
    )
    dtype = card.input.dtype
    feed = (
        "0..255 pixels as uint8 (the model's input quantization is the normalisation)"
        if dtype == "uint8"
        else f"float32 (pixel - {mean:g}) / {std:g}"
    )
    score = SCORES[card.postprocessing]
    out_dtype = card.output.dtype
    uint8 = "; uint8, dequantize with the tensor's scale/zero point" if out_dtype == "uint8" else ""
    out = _SCORE_TEXT[score] + uint8
    return ClassifierMetadata(
        name=MODEL_NAME,
        description=(
            f"{card.source_model or 'image classifier'} converted by edgeship ({card.precision}); "
            f"{card.num_classes} classes"
        ),
        norm_mean=(mean,),
        norm_std=(std,),
        color_space=prep.color_order.value,
        input_description=f"{prep.color_order.value} image {h}x{w}, NHWC; {feed}. Checked with this crop: {resize}.",
        output_description=f"Scores of {card.num_classes} classes: {out}.",
        score=score,
        labels_file=(card.labels_file or "labels.txt") if labels else None,
        labels=tuple(labels or ()),
    )


def _mediapipe_writer() -> Any:
    try:
        from mediapipe.tasks.python.metadata.metadata_writers import metadata_writer  # heavy optional: deferred
    except ImportError as exc:
        raise MissingDependencyError(
            f"mediapipe is not installed (needed to write TFLite Metadata for Android clients): "
            f"pip install 'edgeship[android]' ({exc})"
        ) from exc
    return metadata_writer


def embed_metadata(model: bytes, card: ModelCard, labels: Sequence[str] | None) -> tuple[bytes, ClassifierMetadata]:
    """The model with image-classifier TFLite Metadata embedded, and that metadata.

    Written with MediaPipe's ``metadata_writers`` (the maintained writer). The labels
    file is packed into the model and associated with the output tensor.
    """
    mw = _mediapipe_writer()
    meta = classifier_metadata(card, labels)
    writer = mw.MetadataWriter.create(bytearray(model))
    writer.add_general_info(meta.name, meta.description)
    spaces = mw.MetadataWriter.color_space_types
    space = spaces.BGR if meta.color_space == "BGR" else spaces.RGB
    writer.add_image_input(
        list(meta.norm_mean),
        list(meta.norm_std),
        color_space_type=space,
        name="image",
        description=meta.input_description,
    )
    mp_labels = mw.Labels().add(list(meta.labels), exported_filename=meta.labels_file) if meta.labels else None
    writer.add_classification_output(mp_labels, name="score", description=meta.output_description)
    written, _ = writer.populate()
    return bytes(written), meta


def read_metadata(model: bytes | str | os.PathLike[str]) -> ClassifierMetadata | None:
    """The image-classifier metadata embedded in a model (bytes or path), or None when it has none."""
    try:
        from mediapipe.tasks.python.metadata import metadata as md  # heavy optional dependency: deferred
    except ImportError as exc:
        raise MissingDependencyError(
            f"mediapipe is not installed (needed to read TFLite Metadata): pip install 'edgeship[android]' ({exc})"
        ) from exc
    if not isinstance(model, (bytes, bytearray)):
        with open(model, "rb") as fh:
            model = fh.read()
    try:
        shown = md.MetadataDisplayer.with_model_buffer(bytearray(model))
    except ValueError:
        return None
    doc = json.loads(shown.get_metadata_json())
    graph = doc["subgraph_metadata"][0]
    inp, out = graph["input_tensor_metadata"][0], graph["output_tensor_metadata"][0]
    norm = next(u["options"] for u in inp.get("process_units", []) if u.get("options_type") == "NormalizationOptions")
    files = [f for f in out.get("associated_files", []) if f.get("type") == "TENSOR_AXIS_LABELS"]
    labels_file = files[0]["name"] if files else None
    labels = tuple(shown.get_associated_file_buffer(labels_file).decode("utf-8").splitlines()) if labels_file else ()
    space = inp.get("content", {}).get("content_properties", {}).get("color_space", "RGB")
    text = out.get("description", "")
    word = text.split(": ", 1)[-1].split(" ", 1)[0]
    score = word if word in _SCORE_TEXT else "unknown"
    return ClassifierMetadata(
        name=doc.get("name", ""),
        description=doc.get("description", ""),
        norm_mean=tuple(float(v) for v in norm["mean"]),
        norm_std=tuple(float(v) for v in norm["std"]),
        color_space=space,
        input_description=inp.get("description", ""),
        output_description=text,
        score=score,
        labels_file=labels_file,
        labels=labels,
    )


def pixels_feed_exactly(card: ModelCard) -> bool:
    """Whether a client feeding raw 0..255 pixels to the uint8 input gives the card's normalisation.

    MediaPipe copies pixels into a uint8 input as they are; that is right when the input
    quantization maps pixel p to ``(p * pixel_scale - mean) / std`` within half a step.
    """
    spec, prep = card.input, card.preprocessing
    if spec.dtype != "uint8" or not spec.scale:
        return True
    mean = np.broadcast_to(np.asarray(prep.mean, dtype=np.float64), (3,))
    std = np.broadcast_to(np.asarray(prep.std, dtype=np.float64), (3,))
    slope = prep.pixel_scale / (std * spec.scale)
    offset = -mean / (std * spec.scale) + (spec.zero_point or 0)
    return bool(np.max(np.abs(slope - 1.0)) <= 2e-3 and np.max(np.abs(offset)) <= 0.5 + 1e-3)


def _norm_text(prep: Preprocessing) -> str:
    def vals(v: tuple[float, ...]) -> str:
        return f"{v[0]:g}" if len(set(v)) == 1 else "[" + ",".join(f"{x:g}" for x in v) + "]"

    scale = (
        "pixel"
        if prep.pixel_scale == 1
        else ("pixel/255" if abs(prep.pixel_scale * 255 - 1) < 1e-9 else f"pixel*{prep.pixel_scale:g}")
    )
    return f"({scale} - {vals(prep.mean)}) / {vals(prep.std)}"


def input_contract(card: ModelCard) -> str | None:
    """One line saying how the artifact's input differs from the source model's, or None when it does not.

    The source ONNX takes float32 NCHW with ``card.reference_preprocessing``; the artifact
    takes ``card.input`` with ``card.preprocessing`` (folded or in-graph normalisation,
    NHWC, a quantized dtype).
    """
    src, prep, spec = card.reference_preprocessing, card.preprocessing, card.input
    diffs = []
    if (spec.layout or "NHWC") != "NCHW":
        diffs.append(f"layout NCHW -> {spec.layout or 'NHWC'}")
    if spec.dtype != "float32":
        how = ""
        if spec.scale:
            k = pixel_offset(prep, spec.scale, spec.zero_point or 0)
            how = (
                " (feed pixels as they are)"
                if k == 0
                else f" (feed pixel {k:+d})"
                if k is not None
                else f" (scale {spec.scale:.6g}, zero point {spec.zero_point})"
            )
        diffs.append(f"dtype float32 -> {spec.dtype}{how}")
    if _norm_text(src) != _norm_text(prep):
        diffs.append(f"normalisation {_norm_text(src)} -> {_norm_text(prep)}")
    if not diffs:
        return None
    return (
        f"input differs from the source model ({card.source_model or 'ONNX'}): "
        + "; ".join(diffs)
        + " (feeding the source model's preprocessing gives wrong answers; see the model card)"
    )
