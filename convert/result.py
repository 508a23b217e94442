"""What ``convert`` hands to the next stage: the float model and everything about it, as values."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgeship._io import atomic_write_bytes, atomic_write_json, staged_output
from edgeship.convert.report import ConvertReport
from edgeship.errors import InputError
from edgeship.runtime.card import CARD_FILE, ModelCard
from edgeship.runtime.images import Labels

FLOAT32_FILE = "model_float32.tflite"
FLOAT16_FILE = "model_float16.tflite"
FLOAT16_CARD = "model_float16.card.json"
REPORT_FILE = "convert_report.json"
SIMPLIFIED_FILE = "model_simplified.onnx"
SAVED_MODEL_DIR = "saved_model"
LABELS_FILE = "labels.txt"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_names(*, fp16: bool, labels: bool) -> list[str]:
    """The files of a saved conversion."""
    names = [FLOAT32_FILE, CARD_FILE, REPORT_FILE, SIMPLIFIED_FILE, SAVED_MODEL_DIR]
    names += [FLOAT16_FILE, FLOAT16_CARD] if fp16 else []
    return names + ([LABELS_FILE] if labels else [])


@dataclass(frozen=True)
class ConvertResult:
    """A converted model, in memory: nothing is written until :meth:`save`.

    Attributes:
        model: The verified float32 TFLite flatbuffer.
        card: Its model card (preprocessing, I/O, postprocessing, source).
        report: Conversion report (fixes, verification figures, delegation, timings); None for a saved
            folder without ``convert_report.json``.
        simplified_onnx: The simplified (and folded) ONNX that was converted.
        float16: The float16 TFLite, when asked for.
        saved_model: onnx2tf's SavedModel, file by file (for TensorFlow's own tools;
            edgeship calibrates the TFLite).
        labels: Contents of the labels file, when one was given.
        folder: Where the result was saved or loaded from (None: only in memory).
    """

    model: bytes = field(repr=False)
    card: ModelCard
    report: ConvertReport | None = field(repr=False)
    simplified_onnx: bytes = field(repr=False, default=b"")
    float16: bytes | None = field(repr=False, default=None)
    saved_model: Mapping[str, bytes] = field(repr=False, default_factory=dict)
    labels: bytes | None = field(repr=False, default=None)
    folder: Path | None = None

    @property
    def model_path(self) -> Path | None:
        """The saved float32 model (None until saved)."""
        return self.folder / FLOAT32_FILE if self.folder else None

    def saved_path(self) -> Path:
        """The saved float32 model; a result that was never saved has none."""
        if self.model_path is None:
            raise ValueError("the conversion result was not saved: call save(folder) first")
        return self.model_path

    def label_names(self) -> Labels | None:
        return Labels.from_bytes(self.labels, "the conversion's labels") if self.labels is not None else None

    def file_names(self) -> list[str]:
        """What :meth:`save` writes."""
        return file_names(fp16=self.float16 is not None, labels=self.labels is not None)

    def save(self, out_dir: str | os.PathLike[str], *, force: bool = False) -> ConvertResult:
        """Write the model, card, report (and float16, labels, SavedModel) into ``out_dir`` as one set.

        Raises:
            OutputExistsError: One of the files exists and ``force`` is false.
        """
        out = Path(out_dir)
        with staged_output(out, self.file_names(), force=force) as stage:
            atomic_write_bytes(stage / FLOAT32_FILE, self.model)
            atomic_write_json(stage / CARD_FILE, self.card.to_dict())
            if self.report is not None:
                atomic_write_json(stage / REPORT_FILE, self.report.to_dict())
            atomic_write_bytes(stage / SIMPLIFIED_FILE, self.simplified_onnx)
            for rel, data in self.saved_model.items():
                atomic_write_bytes(stage / SAVED_MODEL_DIR / rel, data)
            if self.float16 is not None:
                atomic_write_bytes(stage / FLOAT16_FILE, self.float16)
                atomic_write_json(
                    stage / FLOAT16_CARD, self.card.with_(model_file=FLOAT16_FILE, precision="float16").to_dict()
                )
            if self.labels is not None:
                atomic_write_bytes(stage / LABELS_FILE, self.labels)
        return replace(self, folder=out)

    @classmethod
    def load(cls, folder: str | os.PathLike[str], *, saved_model: bool = False) -> ConvertResult:
        """A saved convert folder (``edgeship convert -o FOLDER``) as a result (onnx2tf's SavedModel
        only when asked: quantize does not use it)."""
        folder = Path(folder)
        card_path = folder / CARD_FILE
        if not card_path.is_file():
            raise InputError(
                f"{folder} is not an edgeship convert folder (no {CARD_FILE}); pass the ONNX model "
                "or run `edgeship convert` first"
            )
        card = ModelCard.load(card_path)
        model, labels = card.model_path(folder), card.file(folder, "labels_file")
        if card.precision != "float32" or not model.is_file():
            raise InputError(
                f"{folder} holds no float32 model to quantize (its card names {card.model_file}, "
                f"{card.precision}); pass the ONNX model or a `edgeship convert` folder"
            )
        if card.input.shape and card.input.shape[0] != 1:
            raise InputError(
                f"{folder} holds a model of batch {card.input.shape[0]} (input {list(card.input.shape)}); "
                "edgeship quantizes batch 1: convert the model again with this version"
            )
        return cls(
            model=model.read_bytes(),
            card=card,
            report=_read_report(folder / REPORT_FILE),
            simplified_onnx=_read(folder / SIMPLIFIED_FILE) or b"",
            float16=_read(folder / FLOAT16_FILE),
            saved_model=_read_tree(folder / SAVED_MODEL_DIR) if saved_model else {},
            labels=_read(labels) if labels else None,
            folder=folder,
        )

    def to_dict(self) -> dict[str, Any]:
        """Everything but the bytes, which are named by their sha256 (what a cache key needs)."""
        return {
            "card": self.card.to_dict(),
            "report": self.report.to_dict() if self.report else None,
            "model_sha256": sha256(self.model),
            "simplified_onnx_sha256": sha256(self.simplified_onnx),
            "float16_sha256": sha256(self.float16) if self.float16 is not None else None,
            "labels_sha256": sha256(self.labels) if self.labels is not None else None,
            "folder": str(self.folder) if self.folder else None,
        }

    @classmethod
    def from_dict(
        cls,
        d: Mapping[str, Any],
        *,
        model: bytes,
        simplified_onnx: bytes = b"",
        float16: bytes | None = None,
        labels: bytes | None = None,
    ) -> ConvertResult:
        """The inverse of :meth:`to_dict`, given the bytes it names (checked against their sha256)."""
        for what, data in (("model", model), ("float16", float16), ("labels", labels)):
            want = d.get(f"{what}_sha256")
            if data is not None and want and sha256(data) != want:
                raise InputError(f"{what} bytes do not match the sha256 the result names")
        report = ConvertReport.from_dict(d["report"]) if d.get("report") else None
        return cls(
            model=model,
            card=ModelCard.from_dict(d["card"]),
            report=report,
            simplified_onnx=simplified_onnx,
            float16=float16,
            labels=labels,
            folder=Path(d["folder"]) if d.get("folder") else None,
        )


def _read(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


def _read_report(path: Path) -> ConvertReport | None:
    if not path.is_file():
        return None
    try:
        return ConvertReport.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(
            f"{path} is not a readable convert report ({type(exc).__name__}: {exc}); re-run `edgeship convert`"
        ) from exc


def _read_tree(root: Path) -> dict[str, bytes]:
    if not root.is_dir():
        return {}
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}
