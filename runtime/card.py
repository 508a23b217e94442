"""The model card: the contract between the host pipeline and the device.

It says how to turn an image into the model's input (resize, crop, colour order,
scaling, mean/std, layout), what the input and output tensors are, and where the
labels are. ``convert`` writes it; ``quantize`` updates it; the runtime reads it.
Only the standard library is used here so the card loads on any device.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from enum import Enum
from pathlib import Path
from typing import Any

from edgeship.errors import InputError

CARD_FILE = "model_card.json"
CARD_SCHEMA = 1


class Interpolation(str, Enum):
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    NEAREST = "nearest"


class ColorOrder(str, Enum):
    RGB = "RGB"
    BGR = "BGR"


class Layout(str, Enum):
    NCHW = "NCHW"
    NHWC = "NHWC"


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes a float input: ``((pixel * pixel_scale) - mean) / std``.

    Attributes:
        resize_shorter: Resize so the shorter side has this many pixels (None: no resize).
        crop: Center-crop size ``(height, width)``.
        interpolation: Resampling filter for the resize.
        color_order: Channel order the model expects.
        pixel_scale: Multiplier applied to 0..255 pixels before normalisation.
        mean: Per-channel mean, subtracted after scaling.
        std: Per-channel standard deviation, divided after subtracting the mean.
    """

    resize_shorter: int | None = 256
    crop: tuple[int, int] = (224, 224)
    interpolation: Interpolation = Interpolation.BILINEAR
    color_order: ColorOrder = ColorOrder.RGB
    pixel_scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        object.__setattr__(self, "interpolation", Interpolation(self.interpolation))
        object.__setattr__(self, "color_order", ColorOrder(self.color_order))
        object.__setattr__(self, "crop", tuple(int(v) for v in self.crop))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.crop) != 2 or min(self.crop) <= 0:
            raise InputError(f"preprocessing crop must be two positive sizes, got {self.crop}")
        if self.resize_shorter is not None and int(self.resize_shorter) <= 0:
            raise InputError(f"preprocessing resize_shorter must be positive, got {self.resize_shorter}")
        if len(self.mean) != len(self.std) or len(self.mean) not in (1, 3):
            raise InputError(
                f"preprocessing mean/std need 1 or 3 values each, got mean={self.mean} std={self.std}"
            )
        if any(s == 0 for s in self.std):
            raise InputError(f"preprocessing std must not contain 0, got {self.std}")
        if not self.pixel_scale > 0:
            raise InputError(f"preprocessing pixel_scale must be > 0, got {self.pixel_scale}")

    @classmethod
    def imagenet(cls, height: int = 224, width: int = 224) -> "Preprocessing":
        """The torchvision/ONNX-zoo ImageNet recipe scaled to the model's input size."""
        return cls(resize_shorter=round(min(height, width) * 256 / 224), crop=(height, width))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["interpolation"] = self.interpolation.value
        d["color_order"] = self.color_order.value
        d["crop"] = list(self.crop)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocessing":
        try:
            return cls(**_known(cls, d, "preprocessing"))
        except (TypeError, ValueError) as exc:
            raise InputError(f"invalid preprocessing {d}: {exc}") from exc


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output as the deployed model sees it."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    layout: str | None = None
    scale: float | None = None
    zero_point: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(v) for v in self.shape))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TensorSpec":
        return cls(**_known(cls, d, "tensor"))


@dataclass(frozen=True)
class ModelCard:
    """Everything a runtime needs besides the model file itself."""

    model_file: str
    precision: str
    input: TensorSpec
    output: TensorSpec
    preprocessing: Preprocessing
    source_model: str = ""
    source_sha256: str = ""
    labels_file: str | None = None
    num_classes: int = 0
    postprocessing: str = "softmax"
    notes: tuple[str, ...] = field(default_factory=tuple)
    #: Preprocessing the *source* ONNX model expects, when it differs (input ops folded).
    source_preprocessing: Preprocessing | None = None
    schema: int = CARD_SCHEMA

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["input"] = self.input.to_dict()
        d["output"] = self.output.to_dict()
        d["preprocessing"] = self.preprocessing.to_dict()
        d["notes"] = list(self.notes)
        d["source_preprocessing"] = self.source_preprocessing.to_dict() if self.source_preprocessing else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelCard":
        d = _known(cls, d, "model card")
        d["input"] = TensorSpec.from_dict(d["input"])
        d["output"] = TensorSpec.from_dict(d["output"])
        d["preprocessing"] = Preprocessing.from_dict(d["preprocessing"])
        d["notes"] = tuple(d.get("notes", ()))
        if d.get("source_preprocessing"):
            d["source_preprocessing"] = Preprocessing.from_dict(d["source_preprocessing"])
        return cls(**d)

    @property
    def reference_preprocessing(self) -> Preprocessing:
        """Preprocessing for the source ONNX model (differs when input ops were folded)."""
        return self.source_preprocessing or self.preprocessing

    @classmethod
    def load(cls, path: str | Path) -> "ModelCard":
        """Read a card from ``path`` (the JSON file or the folder holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / CARD_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise InputError(f"no model card at {path}") from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"model card {path} is not valid JSON: {exc}") from exc
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"model card {path} is invalid: {exc}") from exc

    def with_(self, **changes: Any) -> "ModelCard":
        """A copy with some fields replaced."""
        return replace(self, **changes)


def _known(cls: type, d: dict[str, Any], what: str) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise InputError(f"unknown {what} key(s): {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
    return dict(d)
