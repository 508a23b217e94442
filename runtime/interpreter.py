"""Find a TFLite interpreter and run a model with I/O (de)quantization.

Preference order: ``ai_edge_litert`` (XNNPACK for float and int8), then
``tflite_runtime`` (no XNNPACK for int8 models in 2.14: much slower), then
TensorFlow's ``tf.lite`` (host only). Nothing here imports TensorFlow unless the
first two are missing.
"""

from __future__ import annotations

import importlib
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from edgeship._paths import utf8_path
from edgeship.errors import InputError, MissingDependencyError
from edgeship.runtime.delegation import flex_refusal, of_interpreter
from edgeship.runtime.images import normalize, pixel_offset, quantize_pixels
from edgeship.runtime.native_stderr import native_stderr_to_log

if TYPE_CHECKING:
    from edgeship.runtime.ort_model import OrtModel

log = logging.getLogger(__name__)

#: Interpreter packages, fastest first.
BACKENDS = ("ai_edge_litert", "tflite_runtime", "tensorflow")
#: Interpreter package -> the module that holds its ``Interpreter``.
BACKEND_MODULES = {
    "ai_edge_litert": "ai_edge_litert.interpreter",
    "tflite_runtime": "tflite_runtime.interpreter",
    "tensorflow": "tensorflow.lite",
}


def _import_backend(name: str) -> Any:
    return importlib.import_module(BACKEND_MODULES[name]).Interpreter


def backend_version(name: str) -> str | None:
    from importlib import metadata

    dist = {"ai_edge_litert": "ai-edge-litert", "tflite_runtime": "tflite-runtime"}.get(name, name)
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class IOSpec:
    """One model tensor as the interpreter reports it."""

    name: str
    index: int
    shape: tuple[int, ...]
    dtype: np.dtype
    scale: float
    zero_point: int

    @property
    def quantized(self) -> bool:
        return self.dtype in (np.int8, np.uint8, np.int16) and self.scale > 0


#: Interpreter threads edgeship runs a model with, at most (beyond it a runtime hangs starting threads).
MAX_THREADS = 64


def check_threads(count: object, what: str = "threads") -> int:
    """``count`` when it is a whole number of threads from 1 to :data:`MAX_THREADS`.

    Raises:
        InputError: Anything else, naming the limit.
    """
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_THREADS:
        raise InputError(f"{what} must be a whole number from 1 to {MAX_THREADS}, got {count!r}")
    return count


class TypedIO:
    """What every runtime model shares: float or pixels in, the model's typed tensors, float out.

    A backend (:class:`TFLiteModel`, :class:`~edgeship.runtime.ort_model.OrtModel`) gives ``inputs``,
    ``outputs``, ``set_raw_input``, ``invoke`` and ``raw_output``; the I/O (de)quantization and the
    batching are here, once.
    """

    inputs: list[IOSpec]
    outputs: list[IOSpec]

    def set_raw_input(self, x: np.ndarray) -> None:
        raise NotImplementedError

    def invoke(self) -> None:
        raise NotImplementedError

    def raw_output(self) -> np.ndarray:
        raise NotImplementedError

    @property
    def input(self) -> IOSpec:
        return self.inputs[0]

    @property
    def output(self) -> IOSpec:
        return self.outputs[0]

    def input_from_pixels(self, pixels: np.ndarray, prep: Any) -> np.ndarray:
        """uint8 ``[N,H,W,3]`` pixels (already resized/cropped) -> the model's typed input.

        Uses the integer path (``pixel + k``, no float math) when the preprocessing folds
        into the input quantization, else normalises and quantizes.
        """

        spec = self.input
        if spec.quantized:
            k = pixel_offset(prep, spec.scale, spec.zero_point)
            if k is not None:
                return quantize_pixels(pixels, k, spec.dtype)
        return self.quantize_input(normalize(pixels, prep))

    def quantize_input(self, x: np.ndarray) -> np.ndarray:
        """Float input -> the model's input dtype (quantized with its scale/zero point)."""
        spec = self.input
        if not spec.quantized:
            return x.astype(spec.dtype, copy=False)
        info = np.iinfo(spec.dtype)
        q = np.round(x / np.float32(spec.scale)) + spec.zero_point
        return np.clip(q, info.min, info.max).astype(spec.dtype)

    def dequantize_output(self, y: np.ndarray, spec: IOSpec | None = None) -> np.ndarray:
        spec = spec or self.output
        if not spec.quantized:
            return y.astype(np.float32, copy=False)
        return (y.astype(np.float32) - spec.zero_point) * np.float32(spec.scale)

    def run(self, x: np.ndarray) -> np.ndarray:
        """Float input in the runtime's layout and shape -> float output."""
        return self.run_raw(self.quantize_input(np.asarray(x, dtype=np.float32)))

    def run_raw(self, x: np.ndarray) -> np.ndarray:
        """Typed input (the model's own dtype) -> float output."""
        self.set_raw_input(x)
        self.invoke()
        return self.dequantize_output(self.raw_output())

    def run_pixels(self, pixels: np.ndarray, prep: Any) -> np.ndarray:
        """uint8 pixels (any count; the model's batch is filled and padded) -> float outputs."""
        return in_fixed_batches(
            pixels, self.input.shape[0], lambda chunk: self.run_raw(self.input_from_pixels(chunk, prep))
        )


def _model_source(path: Path) -> dict[str, Any]:
    """How LiteRT is given the model at ``path``: by its path, or by its bytes when the path is not UTF-8
    (LiteRT takes paths only as UTF-8 text; a folder named in another encoding is still the user's)."""
    text = utf8_path(path)
    return {"model_path": text} if text is not None else {"model_content": path.read_bytes()}


class TFLiteModel(TypedIO):
    """A loaded TFLite model: float in, float out, whatever its I/O dtypes are.

    Args:
        model: Path to a ``.tflite`` file (or its bytes).
        num_threads: Interpreter threads (None: the interpreter's default).
        use_xnnpack: Apply the XNNPACK delegate (the default CPU fast path).
        backend: Force one of :data:`BACKENDS`; default picks the fastest installed.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | bytes,
        *,
        num_threads: int | None = None,
        use_xnnpack: bool = True,
        backend: str | None = None,
    ) -> None:
        self.backend = backend or pick_backend()
        Interpreter = _import_backend(self.backend)
        kwargs: dict[str, Any] = {}
        if isinstance(model, (bytes, bytearray)):
            kwargs["model_content"] = bytes(model)
            self.path: Path | None = None
        else:
            self.path = Path(model)
            if not self.path.is_file():
                what = "is a folder, not a model file" if self.path.is_dir() else "does not exist"
                raise InputError(f"model {self.path} {what}")
            kwargs.update(_model_source(self.path))
        if num_threads is not None:
            kwargs["num_threads"] = check_threads(num_threads, "num_threads")
        self.delegate = "xnnpack" if use_xnnpack else "none"
        if not use_xnnpack:
            kwargs["experimental_op_resolver_type"] = _resolver(self.backend, "BUILTIN_WITHOUT_DEFAULT_DELEGATES")
        try:
            with native_stderr_to_log():
                self.interpreter = Interpreter(**kwargs)
                self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise InputError(f"cannot load TFLite model {self.path or '<bytes>'}: {exc}") from exc
        self._refuse_flex()
        self.inputs = [self._spec(d) for d in self.interpreter.get_input_details()]
        self.outputs = [self._spec(d) for d in self.interpreter.get_output_details()]
        if not self.inputs or not self.outputs:
            raise InputError(
                f"TFLite model {self.path or '<bytes>'} has {len(self.inputs)} inputs and "
                f"{len(self.outputs)} outputs; an image classifier needs one of each"
            )
        if self.backend == "tflite_runtime" and self.inputs and self.inputs[0].quantized:
            log.warning("tflite-runtime does not use XNNPACK for int8 models; install ai-edge-litert for the fast path")
            self.delegate = "none (tflite-runtime int8: reference kernels)"

    def _refuse_flex(self) -> None:
        """Refuse TensorFlow Select ops, which only load here because TensorFlow is in this process.

        With TensorFlow imported, every TFLite interpreter picks up its Flex delegate and
        runs ``Flex*`` ops; no on-device interpreter can. Refusing them keeps a host run
        (a conversion's verification, a benchmark) honest about what the device will do.
        """
        from collections import Counter

        refusal = flex_refusal(Counter(self.op_names()))
        if refusal:
            raise InputError(f"cannot load TFLite model {self.path or '<bytes>'}: it {refusal}")

    @staticmethod
    def _spec(d: dict[str, Any]) -> IOSpec:
        scale, zp = d.get("quantization", (0.0, 0))
        return IOSpec(
            d["name"], d["index"], tuple(int(v) for v in d["shape"]), np.dtype(d["dtype"]), float(scale), int(zp)
        )

    def set_raw_input(self, x: np.ndarray) -> None:
        """Set the already-typed input tensor (no conversion)."""
        if tuple(x.shape) != self.input.shape:
            raise InputError(f"input shape {tuple(x.shape)} does not match the model's {self.input.shape}")
        self.interpreter.set_tensor(self.input.index, x)

    def invoke(self) -> None:
        self.interpreter.invoke()

    def raw_output(self) -> np.ndarray:
        return self.interpreter.get_tensor(self.output.index)

    def describe(self) -> dict[str, Any]:
        return {
            "interpreter": self.backend,
            "interpreter_version": backend_version(self.backend),
            "delegate": self.delegate,
            "input": {
                "shape": list(self.input.shape),
                "dtype": self.input.dtype.name,
                "scale": self.input.scale,
                "zero_point": self.input.zero_point,
            },
            "output": {
                "shape": list(self.output.shape),
                "dtype": self.output.dtype.name,
                "scale": self.output.scale,
                "zero_point": self.output.zero_point,
            },
            # how much of the graph the delegate took (partitions, ops left outside)
            **({"xnnpack": of_interpreter(self.interpreter).to_dict()} if self.delegate == "xnnpack" else {}),
        }

    def op_names(self) -> list[str]:
        """Builtin op names in execution order (for reports and tests)."""
        return [d["op_name"] for d in self.interpreter._get_ops_details()]  # noqa: SLF001


#: A loaded model of either runtime: a ``.tflite`` on a TFLite interpreter, a ``.onnx`` on onnxruntime.
Model = Union[TFLiteModel, "OrtModel"]


def open_model(
    model: str | os.PathLike[str] | bytes,
    *,
    num_threads: int | None = None,
    use_xnnpack: bool = True,
    backend: str | None = None,
) -> Model:
    """Load a model on the runtime its file needs: ``.onnx`` (or ``backend="onnxruntime"``) on onnxruntime
    (:class:`~edgeship.runtime.ort_model.OrtModel`, imported only then), anything else on a TFLite interpreter."""
    from edgeship.runtime import ort_model  # numpy only until an ONNX model is opened

    if backend == ort_model.RUNTIME or (backend is None and ort_model.is_onnx(model)):
        return ort_model.OrtModel(model, num_threads=num_threads, use_xnnpack=use_xnnpack, backend=backend)
    return TFLiteModel(model, num_threads=num_threads, use_xnnpack=use_xnnpack, backend=backend)


def in_fixed_batches(x: np.ndarray, step: int, fn: Any) -> np.ndarray:
    """Apply ``fn`` to groups of exactly ``step`` samples (the last padded by repetition), join the results."""
    outs = []
    for start in range(0, len(x), step):
        chunk = x[start : start + step]
        pad = step - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        outs.append(fn(chunk)[: step - pad])
    return np.concatenate(outs, axis=0)


def debug_interpreter(model: bytes) -> Any:
    """A raw interpreter with every intermediate tensor kept and no delegate.

    Delegates (XNNPACK) compute inside their own buffers, so intermediate tensors are
    only meaningful without them.
    """
    backend = pick_backend()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "preserve_all_tensors is for debugging": it is
        interp = _import_backend(backend)(
            model_content=model,
            experimental_preserve_all_tensors=True,
            experimental_op_resolver_type=_resolver(backend, "BUILTIN_WITHOUT_DEFAULT_DELEGATES"),
        )
    interp.allocate_tensors()
    return interp


def _resolver(backend: str, name: str) -> Any:
    module = importlib.import_module(
        BACKEND_MODULES[backend].rsplit(".", 1)[0] + ".interpreter"
        if backend != "tensorflow"
        else "tensorflow.lite.experimental"
    )
    return getattr(module.OpResolverType, name)


def pick_backend() -> str:
    """The first interpreter package of :data:`BACKENDS` that imports here."""
    for name in BACKENDS:
        try:
            _import_backend(name)
            return name
        except ImportError:
            continue
    raise MissingDependencyError(
        "no TFLite interpreter found: pip install ai-edge-litert (or tflite-runtime on 32-bit ARM)"
    )


def run_many(model: TFLiteModel, inputs: Sequence[np.ndarray]) -> np.ndarray:
    """Run each ``[1, ...]`` input and stack the float outputs."""
    return np.concatenate([model.run(x) for x in inputs], axis=0)
