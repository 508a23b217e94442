"""The model card: the contract between the host pipeline and the device.

It says how to turn an image into the model's input (resize, crop, colour order,
scaling, mean/std, layout), what the input and output tensors are, and where the
labels are. ``convert`` writes it; ``quantize`` updates it; the runtime reads it.
Only the standard library is used here so the card loads on any device.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass, field, fields, replace
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from edgeship._paths import inside, safe_name
from edgeship._version import SCHEMA_VERSION
from edgeship.errors import InputError

CARD_FILE = "model_card.json"
CARD_SCHEMA = 1
#: The largest image side a card may ask for (crop, resize): more is a mistake, not an image classifier.
MAX_SIDE = 8192


class IODtype(str, Enum):
    """Input/output tensor dtype of a model (what a target needs, what quantize writes)."""

    INT8 = "int8"
    UINT8 = "uint8"
    FLOAT32 = "float32"


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


class Postprocessing(str, Enum):
    """What turns the model's output into probabilities; it says what the output is.

    ``softmax``: the output is logits. ``none``: the model already ends in Softmax (the
    output is probabilities). ``exp``: the model ends in LogSoftmax (log-probabilities).
    """

    SOFTMAX = "softmax"
    NONE = "none"
    EXP = "exp"


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
        _need(
            self.resize_shorter is None or _is_int(self.resize_shorter),
            "preprocessing.resize_shorter",
            "an integer or null",
            self.resize_shorter,
        )
        _need_ints("preprocessing.crop", self.crop)
        _need(_is_number(self.pixel_scale), "preprocessing.pixel_scale", "a number", self.pixel_scale)
        _need_numbers("preprocessing.mean", self.mean)
        _need_numbers("preprocessing.std", self.std)
        for key, enum in (("interpolation", Interpolation), ("color_order", ColorOrder)):
            value = getattr(self, key)
            _need(
                isinstance(value, str) and value in [e.value for e in enum],
                f"preprocessing.{key}",
                f"one of {[e.value for e in enum]}",
                value,
            )
        object.__setattr__(self, "interpolation", Interpolation(self.interpolation))
        object.__setattr__(self, "color_order", ColorOrder(self.color_order))
        object.__setattr__(self, "crop", tuple(int(v) for v in self.crop))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.crop) != 2 or min(self.crop) <= 0 or max(self.crop) > MAX_SIDE:
            raise InputError(f"preprocessing crop must be two sizes from 1 to {MAX_SIDE}, got {list(self.crop)}")
        if self.resize_shorter is not None and not 0 < int(self.resize_shorter) <= MAX_SIDE:
            raise InputError(f"preprocessing resize_shorter must be from 1 to {MAX_SIDE}, got {self.resize_shorter}")
        for key in ("mean", "std"):
            if not all(math.isfinite(v) for v in getattr(self, key)):
                raise InputError(f"preprocessing {key} must be finite numbers, got {list(getattr(self, key))}")
        if len(self.mean) != len(self.std) or len(self.mean) not in (1, 3):
            raise InputError(f"preprocessing mean/std need 1 or 3 values each, got mean={self.mean} std={self.std}")
        if any(s == 0 for s in self.std):
            raise InputError(f"preprocessing std must not contain 0, got {self.std}")
        if not 0 < self.pixel_scale < math.inf:
            raise InputError(f"preprocessing pixel_scale must be a finite number > 0, got {self.pixel_scale}")

    @classmethod
    def imagenet(cls, height: int = 224, width: int = 224) -> Preprocessing:
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
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        try:
            return cls(**known_keys(cls, d, "preprocessing"))
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
        _need_str("name", self.name)
        _need_ints("shape", self.shape)
        _need_str("dtype", self.dtype)
        _need_str("layout", self.layout, optional=True)
        _need(self.scale is None or _is_number(self.scale), "scale", "a number or null", self.scale)
        _need(self.zero_point is None or _is_int(self.zero_point), "zero_point", "an integer or null", self.zero_point)
        object.__setattr__(self, "shape", tuple(int(v) for v in self.shape))

    @classmethod
    def of(cls, tensor: Any, layout: str | None = None) -> TensorSpec:
        """The spec of an interpreter tensor (:class:`~edgeship.runtime.interpreter.IOSpec`)."""
        return cls(
            tensor.name,
            tensor.shape,
            tensor.dtype.name,
            layout,
            tensor.scale or None,
            tensor.zero_point if tensor.quantized else None,
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], what: str = "tensor") -> TensorSpec:
        try:
            return cls(**known_keys(cls, d, what))
        except InputError as exc:
            raise InputError(
                f"{what}.{exc}" if str(exc).split(" ", 1)[0] in {f.name for f in fields(cls)} else str(exc)
            ) from exc
        except TypeError as exc:
            raise InputError(f"{what}: {exc}") from exc


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
    postprocessing: Postprocessing = Postprocessing.SOFTMAX
    notes: tuple[str, ...] = field(default_factory=tuple)
    #: Preprocessing the *source* ONNX model expects, when it differs (input ops folded).
    source_preprocessing: Preprocessing | None = None
    schema: int = CARD_SCHEMA

    def __post_init__(self) -> None:
        for key in ("model_file", "precision", "source_model", "source_sha256"):
            _need_str(key, getattr(self, key))
        _need_str("labels_file", self.labels_file, optional=True)
        for key in ("model_file", "labels_file"):  # names of files inside the card's folder, never paths
            if getattr(self, key) is not None:
                safe_name(getattr(self, key), key)
        _need(
            _is_int(self.num_classes) and self.num_classes >= 0,
            "num_classes",
            "a non-negative integer",
            self.num_classes,
        )
        _need(_is_int(self.schema), "schema", "an integer", self.schema)
        _need(
            isinstance(self.notes, (list, tuple)) and all(isinstance(n, str) for n in self.notes),
            "notes",
            "a list of strings",
            self.notes,
        )
        try:
            object.__setattr__(self, "postprocessing", Postprocessing(self.postprocessing))
        except ValueError as exc:
            raise InputError(
                f"postprocessing must be one of {[p.value for p in Postprocessing]}, got {self.postprocessing!r}"
            ) from exc

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["input"] = self.input.to_dict()
        d["output"] = self.output.to_dict()
        d["preprocessing"] = self.preprocessing.to_dict()
        d["notes"] = list(self.notes)
        d["postprocessing"] = self.postprocessing.value
        d["source_preprocessing"] = self.source_preprocessing.to_dict() if self.source_preprocessing else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelCard:
        d = known_keys(cls, d, "model card")
        missing = [k for k in ("model_file", "precision", "input", "output", "preprocessing") if k not in d]
        if missing:
            raise InputError(f"missing key(s) {', '.join(missing)}")
        d["input"] = TensorSpec.from_dict(d["input"], "input")
        d["output"] = TensorSpec.from_dict(d["output"], "output")
        d["preprocessing"] = Preprocessing.from_dict(d["preprocessing"])
        _need(isinstance(d.get("notes", []), list), "notes", "a list of strings", d.get("notes"))
        d["notes"] = tuple(d.get("notes", ()))
        if d.get("source_preprocessing"):
            d["source_preprocessing"] = Preprocessing.from_dict(d["source_preprocessing"])
        return cls(**d)

    @property
    def runtime(self) -> str:
        """What runs the model file: ``onnxruntime`` for an ``.onnx`` model (int8 QDQ), else ``tflite``."""
        return "onnxruntime" if self.model_file.lower().endswith(".onnx") else "tflite"

    @property
    def reference_preprocessing(self) -> Preprocessing:
        """Preprocessing for the source ONNX model (differs when input ops were folded)."""
        return self.source_preprocessing or self.preprocessing

    @classmethod
    def load(cls, path: str | Path) -> ModelCard:
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
        except ValueError as exc:  # Python refuses integers of over 4300 digits
            raise InputError(f"model card {path} is not a model card: it holds a number too long to read") from exc
        except RecursionError as exc:
            raise InputError(f"model card {path} is not a model card: its JSON nests too deep to read") from exc
        try:
            return cls.from_dict(data)
        except (InputError, KeyError, TypeError, ValueError) as exc:
            raise InputError(f"model card {path} is invalid: {exc}") from exc

    def file(self, folder: str | Path, key: str = "model_file") -> Path | None:
        """Where the card's ``model_file`` or ``labels_file`` is: inside ``folder``, links resolved.

        Returns None when the card names no such file (no labels).

        Raises:
            InputError: The file leads outside ``folder`` (a symbolic link pointing elsewhere).
        """
        name = getattr(self, key)
        return None if name is None else _a_file(inside(folder, name, f"{key} of the model card"), key)

    def model_path(self, folder: str | Path) -> Path:
        """Where the card's ``model_file`` is: inside ``folder``, links resolved (see :meth:`file`)."""
        return _a_file(inside(folder, self.model_file, "model_file of the model card"), "model_file")

    def with_(self, **changes: Any) -> ModelCard:
        """A copy with some fields replaced."""
        return replace(self, **changes)


def _a_file(path: Path, key: str) -> Path:
    """``path``, unless it is a folder (then the card is wrong, not the file missing)."""
    if path.is_dir():
        raise InputError(f"{key} of the model card names {path}, a folder: it must name a file beside the card")
    return path


def known_keys(cls: type, d: dict[str, Any], what: str) -> dict[str, Any]:
    """A copy of ``d`` (without ``schema_version``) after checking it is an object holding only ``cls``'s
    dataclass fields and was not written by a newer edgeship."""
    if not isinstance(d, dict):
        raise InputError(f"{what} must be a JSON object, got {type(d).__name__} {d!r:.60}")
    d = dict(d)
    version = d.pop("schema_version", SCHEMA_VERSION)
    if not _is_int(version) or version > SCHEMA_VERSION:
        raise InputError(
            f"{what} has schema_version {version!r:.20}; this edgeship reads up to {SCHEMA_VERSION}: upgrade edgeship"
        )
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise InputError(f"unknown {what} key(s): {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
    return dict(d)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _need(ok: bool, key: str, want: str, value: Any) -> None:
    """One line naming the key when a value has the wrong type (cards are edited by hand)."""
    if not ok:
        raise InputError(f"{key} must be {want}, got {type(value).__name__} {value!r:.60}")


def _need_ints(key: str, value: Any) -> None:
    _need(isinstance(value, (list, tuple)) and all(_is_int(v) for v in value), key, "a list of integers", value)


def _need_numbers(key: str, value: Any) -> None:
    _need(isinstance(value, (list, tuple)) and all(_is_number(v) for v in value), key, "a list of numbers", value)


def _need_str(key: str, value: Any, *, optional: bool = False) -> None:
    _need(
        isinstance(value, str) or (optional and value is None),
        key,
        "a string" + (" or null" if optional else ""),
        value,
    )


def simple_value(value: float, *, rel: float = 2 * float(np.finfo(np.float32).eps)) -> float:
    """``value``, or the shortest decimal within float32 precision of it.

    Folding float32 constants leaves values such as 0.49999998555 where the model means
    0.5; clients compare normalisation values exactly (MediaPipe treats
    ``[0.49999998, 0.5, 0.50000001]`` as per-channel), so the card says 0.5.
    """
    v = float(value)
    if v == 0 or not np.isfinite(v):
        return v
    for digits in range(1, 6):
        r = float(f"{v:.{digits}g}")
        if abs(r - v) <= rel * abs(v):
            return r
    return v
