"""Run an ONNX model (edgeship's int8 QDQ model, or a float one) with onnxruntime, behind the runtime's interface.

:class:`OrtModel` answers like :class:`~edgeship.runtime.interpreter.TFLiteModel`: tensor specs
(``inputs``/``outputs``, ``input``/``output``), ``run``, ``run_raw``, ``run_pixels``, ``input_from_pixels``
and ``describe``. It needs only numpy and onnxruntime (the ``python3-onnxruntime`` of Debian and Raspberry
Pi OS trixie is enough; no ``onnx`` package, no TensorFlow), and is imported only when an ``.onnx`` model
is loaded. The runtime sees images as NHWC; an NCHW model is fed transposed.

``describe()`` names what ran: ``onnxruntime``, its version, the execution provider and the kernels
onnxruntime ran, counted per op type from its own profile of the first run (after its graph
optimizations, so an int8 QDQ convolution shows as ``QLinearConv``, a float one as ``Conv``).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from edgeship.errors import InputError, MissingDependencyError
from edgeship.runtime.interpreter import IOSpec, TypedIO

#: The name a drift report and a bench row give this runtime.
RUNTIME = "onnxruntime"
#: The only execution provider used: every device's onnxruntime has it, and it is what the drift check ran.
PROVIDER = "CPUExecutionProvider"
#: Metadata keys of an int8 input/output written by :mod:`edgeship.quantize.onnx_qdq` (scale, zero point).
QUANT_KEYS = {
    "input": ("edgeship.input_scale", "edgeship.input_zero_point"),
    "output": ("edgeship.output_scale", "edgeship.output_zero_point"),
}
#: Kernels that compute on int8 (QDQ groups fused by onnxruntime, and its integer ops).
INT8_KERNEL_PREFIXES = ("QLinear", "ConvInteger", "MatMulInteger", "DynamicQuantize")
#: Kernels that only convert between float and int8.
CONVERT_KERNELS = ("QuantizeLinear", "DequantizeLinear")
_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(int16)": np.int16,
    "tensor(float16)": np.float16,
}


def import_onnxruntime() -> Any:
    """The ``onnxruntime`` module, or one line saying how to install it."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise MissingDependencyError(
            "onnxruntime is not installed, and .onnx models run on it: apt install python3-onnxruntime "
            "(Debian / Raspberry Pi OS trixie) or pip install onnxruntime"
        ) from exc
    return onnxruntime


def onnxruntime_version() -> str | None:
    try:
        return str(import_onnxruntime().__version__)
    except MissingDependencyError:
        return None


def is_onnx(model: str | os.PathLike[str] | bytes) -> bool:
    """Whether a model path names an ONNX file (by its suffix: ONNX files have no magic bytes)."""
    return not isinstance(model, (bytes, bytearray)) and Path(model).suffix.lower() == ".onnx"


def check_onnx_file(path: Path) -> None:
    """Refuse in one line a file that cannot be an ONNX model (empty, or not a protobuf ``ModelProto``)."""
    if not path.is_file():
        raise InputError(f"model {path} does not exist")
    with path.open("rb") as fh:
        head = fh.read(2)
    # A ModelProto starts with field 1 (ir_version, varint: 0x08) in every writer edgeship knows of;
    # field 8 (opset_import, 0x42) or 7 (graph, 0x3a) when ir_version is left out.
    if not head or head[0] not in (0x08, 0x3A, 0x42, 0x12, 0x1A):
        raise InputError(f"{path} is not an ONNX model (it does not start like an ONNX protobuf)")


class OrtModel(TypedIO):
    """A loaded ONNX model on onnxruntime's CPU provider: float in, float out, whatever its I/O dtypes are.

    Args:
        model: Path to a ``.onnx`` file (or its bytes).
        num_threads: Intra-op threads (None: onnxruntime's default, one per core).
        use_xnnpack: Ignored (onnxruntime's CPU provider has its own int8 kernels); accepted so the
            runtime opens every model the same way.
        backend: None or ``"onnxruntime"``.
        fuse: Let onnxruntime fuse QDQ groups into its int8 kernels (``QLinearConv``, ...), as a device
            runs the model. False: only its basic graph optimizations, so every QDQ group computes in
            float between QuantizeLinear and DequantizeLinear: the model's own arithmetic, free of any
            one CPU's int8 kernels (x86 without VNNI saturates in ``QLinearConv``; ARM's kernels do not).
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | bytes,
        *,
        num_threads: int | None = None,
        use_xnnpack: bool = True,
        backend: str | None = None,
        fuse: bool = True,
    ) -> None:
        if backend not in (None, RUNTIME):
            raise InputError(f"an ONNX model runs on onnxruntime, not {backend}")
        del use_xnnpack
        self.backend = RUNTIME
        self.delegate = "none"
        self.provider = PROVIDER
        self.path: Path | None = None if isinstance(model, (bytes, bytearray)) else Path(model)
        if self.path is not None:
            check_onnx_file(self.path)
        with tempfile.TemporaryDirectory(prefix="edgeship-ort-") as profile_dir:
            self.session = _session(model, num_threads, profile_dir, fuse)
            self.fused = fuse
            meta = self.session.get_modelmeta().custom_metadata_map
            self.layout = _layout(self.session.get_inputs()[0].shape)
            self.inputs = [_spec(t, i, meta, "input", self.layout) for i, t in enumerate(self.session.get_inputs())]
            self.outputs = [_spec(t, i, meta, "output", None) for i, t in enumerate(self.session.get_outputs())]
            if len(self.inputs) != 1 or not self.outputs:
                raise InputError(
                    f"ONNX model {self.path or '<bytes>'} has {len(self.inputs)} inputs and {len(self.outputs)} "
                    "outputs; an image classifier needs one of each"
                )
            self._pending = np.zeros(self.input.shape, self.input.dtype)
            self._raw: np.ndarray | None = None
            self.kernels = self._profiled_first_run()

    # ---------------------------------------------------------------- running
    def set_raw_input(self, x: np.ndarray) -> None:
        """Set the already-typed NHWC input (no conversion)."""
        if tuple(x.shape) != self.input.shape:
            raise InputError(f"input shape {tuple(x.shape)} does not match the model's {self.input.shape}")
        self._pending = x

    def invoke(self) -> None:
        x = self._pending.transpose(0, 3, 1, 2) if self.layout == "NCHW" else self._pending
        feed = {self.input.name: np.ascontiguousarray(x, dtype=self.input.dtype)}
        self._raw = self.session.run([self.output.name], feed)[0]

    def raw_output(self) -> np.ndarray:
        if self._raw is None:
            raise InputError("the model has not run yet")
        return self._raw

    # ---------------------------------------------------------------- description
    def describe(self) -> dict[str, Any]:
        """What ran: runtime, version, execution provider, kernels (op type -> count), the tensor specs."""
        return {
            "interpreter": self.backend,
            "interpreter_version": onnxruntime_version(),
            "delegate": self.delegate,
            "execution_provider": self.provider,
            "graph_optimization": "all" if self.fused else "basic (QDQ groups not fused)",
            "kernels": dict(sorted(self.kernels.items())),
            "kernel_kinds": kernel_kinds(self.kernels),
            "model_layout": self.layout,
            "input": _spec_dict(self.input),
            "output": _spec_dict(self.output),
        }

    def op_names(self) -> list[str]:
        """The kernels onnxruntime ran, one name per node (sorted by op type)."""
        return [op for op, n in sorted(self.kernels.items()) for _ in range(n)]

    def _profiled_first_run(self) -> Counter[str]:
        """Run once on zeros with onnxruntime's profiler on, then read which kernel ran for each node."""
        self.run_raw(np.zeros(self.input.shape, self.input.dtype))
        profile = Path(self.session.end_profiling())
        try:
            events = json.loads(profile.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return Counter()
        finally:
            profile.unlink(missing_ok=True)
        return kernels_of(events)


def kernels_of(events: list[dict[str, Any]]) -> Counter[str]:
    """Op type -> how many nodes ran it, from an onnxruntime profile (one ``*_kernel_time`` event per node)."""
    seen: dict[str, str] = {}
    for event in events:
        args = event.get("args") or {}
        if event.get("cat") == "Node" and str(event.get("name", "")).endswith("_kernel_time") and "op_name" in args:
            seen[str(event["name"])] = str(args["op_name"])
    return Counter(seen.values())


def kernel_kinds(kernels: Counter[str] | dict[str, int]) -> dict[str, int]:
    """Kernels by kind: ``int8`` (QLinear*, integer ops), ``convert`` (Quantize/DequantizeLinear), ``float``."""
    kinds = {"int8": 0, "convert": 0, "float": 0}
    for op, n in kernels.items():
        kind = "int8" if op.startswith(INT8_KERNEL_PREFIXES) else "convert" if op in CONVERT_KERNELS else "float"
        kinds[kind] += n
    return kinds


def _session(model: str | os.PathLike[str] | bytes, num_threads: int | None, profile_dir: str, fuse: bool) -> Any:
    ort = import_onnxruntime()
    opts = ort.SessionOptions()
    if not fuse:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.log_severity_level = 3
    opts.enable_profiling = True
    opts.profile_file_prefix = os.path.join(profile_dir, "ort")
    if num_threads is not None:
        opts.intra_op_num_threads = int(num_threads)
    source = bytes(model) if isinstance(model, (bytes, bytearray)) else str(model)
    try:
        return ort.InferenceSession(source, opts, providers=[PROVIDER])
    except Exception as exc:  # onnxruntime raises its own exception types
        where = "<bytes>" if isinstance(model, (bytes, bytearray)) else model
        first = " ".join(str(exc).split())[:300]
        raise InputError(f"onnxruntime {ort.__version__} cannot load {where}: {first}") from exc


def _layout(shape: list[Any]) -> str:
    """``NCHW`` or ``NHWC`` from the input shape (channels of 1 or 3 beside two larger sides)."""
    if len(shape) == 4 and shape[1] in (1, 3) and shape[3] not in (1, 3):
        return "NCHW"
    return "NHWC"


def _spec(tensor: Any, index: int, meta: dict[str, str], role: str, layout: str | None) -> IOSpec:
    if tensor.type not in _DTYPES:
        raise InputError(f"ONNX {role} {tensor.name} is {tensor.type}; edgeship's runtime reads float32 or int8")
    shape = tuple(d if isinstance(d, int) and d > 0 else 1 for d in tensor.shape)
    if layout == "NCHW":
        shape = (shape[0], shape[2], shape[3], shape[1])
    scale_key, zp_key = QUANT_KEYS[role]
    scale, zero_point = float(meta.get(scale_key, 0.0)), int(meta.get(zp_key, 0))
    return IOSpec(tensor.name, index, shape, np.dtype(_DTYPES[tensor.type]), scale, zero_point)


def _spec_dict(spec: IOSpec) -> dict[str, Any]:
    return {"shape": list(spec.shape), "dtype": spec.dtype.name, "scale": spec.scale, "zero_point": spec.zero_point}
