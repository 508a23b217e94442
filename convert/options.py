"""Options of :func:`edgeship.convert.convert`: :class:`ConvertOptions`, the files they make it write, and the
preprocessing a model gets from its input size."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeship.convert import onnx_model
from edgeship.convert.result import file_names
from edgeship.errors import InputError
from edgeship.runtime.card import Preprocessing, known_keys


@dataclass(frozen=True)
class ConvertOptions:
    """Options of :func:`edgeship.convert.convert`.

    Attributes:
        input_shape: Static ``N,C,H,W`` to convert with (default: dynamic batch -> 1).
        fp16: Also write and verify a float16 TFLite.
        images: Folder of real images to verify on (default: generated inputs).
        max_images: Verify on at most this many images (None: all).
        labels: Labels file (``wnid<TAB>names`` or one name per line) copied into the output.
        preprocessing: Image preprocessing (default: ImageNet recipe for the input size).
        synthetic_count: Number of generated inputs when no images are given.
        fold_input_affine: Fold leading Mul/Add/Sub/Div-by-constant ops on the input into
            the preprocessing (exact; fewer ops, and int8 input quantized once).
        pixels_in_graph: Put a per-channel normalisation (which clients such as MediaPipe
            Tasks cannot express) inside the graph, so the model takes 0..255 pixels.
    """

    input_shape: tuple[int, ...] | None = None
    fp16: bool = False
    images: Path | None = None
    max_images: int | None = None
    labels: Path | None = None
    preprocessing: Preprocessing | None = None
    synthetic_count: int = 16
    fold_input_affine: bool = True
    pixels_in_graph: bool = False

    def __post_init__(self) -> None:
        if self.max_images is not None and self.max_images < 1:
            raise InputError(f"max_images must be >= 1, got {self.max_images}")
        if self.synthetic_count < 1:
            raise InputError(f"synthetic_count must be >= 1, got {self.synthetic_count}")

    def to_dict(self) -> dict[str, Any]:
        d = {f: getattr(self, f) for f in self.__dataclass_fields__}
        d["input_shape"] = list(self.input_shape) if self.input_shape else None
        d["images"] = str(self.images) if self.images else None
        d["labels"] = str(self.labels) if self.labels else None
        d["preprocessing"] = self.preprocessing.to_dict() if self.preprocessing else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConvertOptions:
        d = known_keys(cls, d, "convert option")
        for key in ("images", "labels"):
            d[key] = Path(d[key]) if d.get(key) else None
        d["input_shape"] = tuple(d["input_shape"]) if d.get("input_shape") else None
        d["preprocessing"] = Preprocessing.from_dict(d["preprocessing"]) if d.get("preprocessing") else None
        return cls(**d)


def output_names(options: ConvertOptions) -> list[str]:
    """What :meth:`ConvertResult.save` writes for these options (checked before the work starts)."""
    return file_names(fp16=options.fp16, labels=options.labels is not None)


def preprocessing_for(
    model: str | os.PathLike[str], input_shape: tuple[int, ...] | None, given: dict[str, Any]
) -> Preprocessing:
    """Preprocessing from ``given`` keys, sized for the input the model will be converted with
    (crop = input H x W, resize 256/224 of it unless given)."""
    info = onnx_model.inspect_model(onnx_model.load_model(model), str(model))
    shape, _ = onnx_model.resolve_shape(info, input_shape)
    height, width = shape[2], shape[3]
    sized = {"crop": [height, width], "resize_shorter": round(min(height, width) * 256 / 224), **given}
    return Preprocessing.from_dict(sized)
