"""Find a TFLite interpreter and run a model with I/O (de)quantization.

Preference order: ``ai_edge_litert`` (XNNPACK for float and int8), then
``tflite_runtime`` (no XNNPACK for int8 models in 2.14: much slower), then
TensorFlow's ``tf.lite`` (host only). Nothing here imports TensorFlow unless the
first two are missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from edgeship.errors import InputError, MissingDependencyError

log = logging.getLogger(__name__)

#: Interpreter packages, fastest first.
BACKENDS = ("ai_edge_litert", "tflite_runtime", "tensorflow")
_MODULES = {
    "ai_edge_litert": "ai_edge_litert.interpreter",
    "tflite_runtime": "tflite_runtime.interpreter",
    "tensorflow": "tensorflow.lite",
}


def _import_backend(name: str) -> Any:
    return importlib.import_module(_MODULES[name]).Interpreter


def backend_version(name: str) -> str | None:
    from importlib import metadata

    dist = {"ai_edge_litert": "ai-edge-litert", "tflite_runtime": "tflite-runtime"}.get(name, name)
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


#: Seconds one model may take to load, allocate and run once in the checking child.
CHECK_TIMEOUT = 300.0
#: Bumped when the check changes, so cached verdicts of an older check are not trusted.
_CHECK_VERSION = 4
#: Exit code of the checking child when it cannot import the interpreter (no verdict).
_NO_INTERPRETER = 4
# The checking child: one model per line of stdin, one verdict per line of stdout, flushed
# before the next model, so a crash is pinned on the model it happened in. It loads,
# allocates and runs each model once on zeros, as the runtime would, with the same
# interpreter package; it imports nothing but that package and numpy.
_CHECK_SCRIPT = r"""
import gc, importlib, sys
try:  # a corrupt model can ask for any amount of memory: cap the child, not the machine
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
except (ImportError, ValueError, OSError):
    pass
try:
    import numpy as np
    Interpreter = importlib.import_module(sys.argv[1]).Interpreter
except Exception as exc:
    sys.stderr.write("cannot import %s: %s\n" % (sys.argv[1], exc))
    sys.exit(4)
sys.stdout.write("ready\n")
sys.stdout.flush()
for line in sys.stdin:
    path = line.rstrip("\n")
    try:
        it = Interpreter(model_path=path)
        it.allocate_tensors()
        for d in it.get_input_details():
            it.set_tensor(d["index"], np.zeros(d["shape"], d["dtype"]))
        it.invoke()
        for d in it.get_output_details():
            it.get_tensor(d["index"])
        del it
        gc.collect()  # a crash while freeing the interpreter belongs to this model too
        verdict = "ok"
    except Exception as exc:
        verdict = "bad " + (" ".join(str(exc).split())[:300] or type(exc).__name__)
    sys.stdout.write(verdict + "\n")
    sys.stdout.flush()
"""


def _check_cache_dir() -> Path:
    from edgeship._io import cache_dir

    return cache_dir("model-checks")


def _header_problem(path: Path) -> str | None:
    """Why ``path`` cannot be a TFLite flatbuffer, judged from its size and first bytes (None: plausible)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        return f"cannot read it ({exc.strerror or exc})"
    if size < 16:
        return f"it is {size} bytes, too small to be a model"
    if head[4:8] != b"TFL3":
        return "it is not a TFLite flatbuffer (no TFL3 identifier at byte 4)"
    root = int.from_bytes(head[:4], "little")
    if root < 8 or root + 4 > size:
        return f"its root table offset {root} lies outside the {size}-byte file (truncated or corrupt)"
    return None


def _structure_problem(path: Path) -> str | None:
    """What is out of bounds in the flatbuffer (see :mod:`edgeship.runtime.flatbuffer`), or None."""
    import struct

    from edgeship.runtime.flatbuffer import FlatbufferError, verify_tflite

    try:
        verify_tflite(path.read_bytes())
    except FlatbufferError as exc:
        return str(exc)
    except (struct.error, IndexError, OverflowError) as exc:  # a bound the walk missed: still refuse
        return f"malformed flatbuffer ({exc})"
    except OSError as exc:
        return f"cannot read it ({exc.strerror or exc})"
    return None


def _cache_key(path: Path, backend: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    h.update(json.dumps([_CHECK_VERSION, backend, backend_version(backend), platform.machine()]).encode())
    return h.hexdigest()


def _read_verdict(cache: Path, key: str) -> str | None:
    try:
        return json.loads((cache / f"{key}.json").read_text())["verdict"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _store_verdict(cache: Path, key: str, verdict: str) -> None:
    """Best effort: a read-only or full cache only costs the next run another check."""
    try:
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache, prefix=f".{key}.", suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump({"verdict": verdict}, fh)
        os.replace(tmp, cache / f"{key}.json")
    except OSError as exc:
        log.debug("cannot cache the model check in %s: %s", cache, exc)


def _run_checker(paths: list[Path], backend: str) -> dict[int, str] | None:
    """Verdicts (``ok``/``bad ...``/``crash ...``) by index; None when no child can check here."""
    verdicts: dict[int, str] = {}
    start = 0
    while start < len(paths):
        todo = paths[start:]
        try:
            proc = subprocess.run([sys.executable, "-c", _CHECK_SCRIPT, _MODULES[backend]],
                                  input="".join(f"{p}\n" for p in todo), capture_output=True, text=True,
                                  timeout=CHECK_TIMEOUT * len(todo), check=False)
        except OSError as exc:  # e.g. an emulated guest that cannot start a second interpreter
            log.debug("cannot start the model-checking child: %s", exc)
            return None
        except subprocess.TimeoutExpired:
            verdicts[start] = f"crash: loading and running it once took over {CHECK_TIMEOUT:g} s"
            start += 1
            continue
        if proc.returncode == _NO_INTERPRETER or "ready" not in proc.stdout.splitlines():
            # No interpreter, or the child never started (an emulated guest whose executable only runs
            # under its emulator's root): no verdict, rather than blaming the model or the interpreter.
            log.debug("model-checking child could not check (exit %s): %s", proc.returncode, proc.stderr.strip())
            return None
        done = [line for line in proc.stdout.splitlines() if line.startswith(("ok", "bad"))]
        for i, line in enumerate(done):
            verdicts[start + i] = line
        start += len(done)
        if proc.returncode != 0 and start < len(paths):
            how = (signal.Signals(-proc.returncode).name if -proc.returncode in signal.valid_signals()
                   else f"exit {proc.returncode}") if proc.returncode < 0 else f"exit {proc.returncode}"
            verdicts[start] = f"crash: the interpreter crashed on it ({how})"
            start += 1
        elif len(done) < len(todo):  # the child stopped early without a crash: should not happen
            verdicts[start] = f"crash: the checking child stopped (exit {proc.returncode})"
            start += 1
    return verdicts


def check_model_files(paths: Sequence[str | os.PathLike[str]], *, backend: str | None = None) -> dict[Path, str | None]:
    """Check TFLite files before any interpreter opens them in this process.

    A truncated or corrupt flatbuffer can crash the interpreter (a segfault, which no
    ``try`` catches). So every offset and index of the file's flatbuffer is bounds-checked
    here (:mod:`edgeship.runtime.flatbuffer`; an out-of-bounds read may or may not crash,
    so a child alone cannot be trusted with it), then the file is loaded, allocated, run
    once on zeros and freed in a child process with the same interpreter package; a
    crash there only kills the child. Verdicts are cached by content
    (``~/.cache/edgeship/model-checks``), so a model is checked once per interpreter.
    Where no child can run the interpreter (an emulated guest), the in-process checks stand alone.

    Returns:
        For each path, None when it is usable, else one line saying what is wrong.
    """
    backend = backend or _pick_backend()
    cache = _check_cache_dir()
    result: dict[Path, str | None] = {}
    pending: list[tuple[Path, str]] = []
    for p in map(Path, paths):
        if not p.is_file():
            result[p] = "it does not exist"
            continue
        problem = _header_problem(p) or _structure_problem(p)
        if problem:
            result[p] = problem
            continue
        key = _cache_key(p, backend)
        verdict = _read_verdict(cache, key)
        if verdict is None:
            pending.append((p, key))
        else:
            result[p] = _problem(verdict, backend)
    if pending:
        verdicts = _run_checker([p for p, _ in pending], backend)
        for i, (p, key) in enumerate(pending):
            verdict = verdicts.get(i, "ok") if verdicts is not None else "ok"
            if verdicts is not None:
                _store_verdict(cache, key, verdict)
            result[p] = _problem(verdict, backend)
    return result


def _problem(verdict: str, backend: str) -> str | None:
    """One line for a verdict. A crash comes after the structural check passed: the interpreter failed, not the file."""
    if verdict == "ok":
        return None
    kind, _, detail = verdict.partition(" ")
    if kind == "crash:":
        who = f"{backend} {backend_version(backend) or '(version unknown)'} on {platform.machine()}"
        detail = detail.replace("the interpreter crashed", f"the interpreter ({who}) crashed")
        if who not in detail:
            detail = f"{detail} ({who})"
        return (f"{detail}; the file passed the structural check, so the interpreter failed, not the file: "
                "try another version of the interpreter package")
    return detail or "the interpreter rejected it"


def check_model_file(path: str | os.PathLike[str], *, backend: str | None = None) -> None:
    """Raise :class:`InputError` (one line) unless ``path`` is a TFLite model the interpreter can run."""
    problem = check_model_files([path], backend=backend)[Path(path)]
    if problem:
        raise InputError(f"cannot load TFLite model {path}: {problem}")


@contextlib.contextmanager
def native_stderr_to_log(level: int | None = None) -> Iterator[None]:
    """Send what native code writes to fd 2 (LiteRT's "INFO: Created ... delegate") to the log.

    The interpreter prints with C stdio, not Python, so only redirecting the file
    descriptor catches it. INFO lines go to DEBUG, anything else to WARNING, or every
    line to ``level`` when given (TensorFlow's start-up chatter, which says nothing wrong).
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no fd 2 (embedded, closed): nothing to redirect
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            for line in sink.read().decode("utf-8", "replace").splitlines():
                if line.strip():
                    line_level = level if level is not None else \
                        logging.DEBUG if line.startswith("INFO:") else logging.WARNING
                    log.log(line_level, "%s", line)


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


class TFLiteModel:
    """A loaded TFLite model: float in, float out, whatever its I/O dtypes are.

    Args:
        model: Path to a ``.tflite`` file (or its bytes).
        num_threads: Interpreter threads (None: the interpreter's default).
        use_xnnpack: Apply the XNNPACK delegate (the default CPU fast path).
        backend: Force one of :data:`BACKENDS`; default picks the fastest installed.
    """

    def __init__(self, model: str | os.PathLike[str] | bytes, *, num_threads: int | None = None,
                 use_xnnpack: bool = True, backend: str | None = None) -> None:
        self.backend = backend or _pick_backend()
        Interpreter = _import_backend(self.backend)
        kwargs: dict[str, Any] = {}
        if isinstance(model, (bytes, bytearray)):
            kwargs["model_content"] = bytes(model)
            self.path: Path | None = None
        else:
            self.path = Path(model)
            if not self.path.is_file():
                raise InputError(f"model {self.path} does not exist")
            kwargs["model_path"] = str(self.path)
        if num_threads is not None:
            kwargs["num_threads"] = int(num_threads)
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
            raise InputError(f"TFLite model {self.path or '<bytes>'} has {len(self.inputs)} inputs and "
                             f"{len(self.outputs)} outputs; an image classifier needs one of each")
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

        from edgeship.runtime.delegation import flex_refusal

        refusal = flex_refusal(Counter(self.op_names()))
        if refusal:
            raise InputError(f"cannot load TFLite model {self.path or '<bytes>'}: it {refusal}")

    @staticmethod
    def _spec(d: dict[str, Any]) -> IOSpec:
        scale, zp = d.get("quantization", (0.0, 0))
        return IOSpec(d["name"], d["index"], tuple(int(v) for v in d["shape"]), np.dtype(d["dtype"]),
                      float(scale), int(zp))

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
        from edgeship.runtime.images import normalize, pixel_offset, quantize_pixels

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

    def set_raw_input(self, x: np.ndarray) -> None:
        """Set the already-typed input tensor (no conversion)."""
        if tuple(x.shape) != self.input.shape:
            raise InputError(f"input shape {tuple(x.shape)} does not match the model's {self.input.shape}")
        self.interpreter.set_tensor(self.input.index, x)

    def invoke(self) -> None:
        self.interpreter.invoke()

    def raw_output(self) -> np.ndarray:
        return self.interpreter.get_tensor(self.output.index)

    def run(self, x: np.ndarray) -> np.ndarray:
        """Float input in the model's layout and shape -> float output."""
        return self.run_raw(self.quantize_input(np.asarray(x, dtype=np.float32)))

    def run_raw(self, x: np.ndarray) -> np.ndarray:
        """Typed input (the model's own dtype) -> float output."""
        self.set_raw_input(x)
        self.invoke()
        return self.dequantize_output(self.raw_output())

    def run_pixels(self, pixels: np.ndarray, prep: Any) -> np.ndarray:
        """uint8 pixels (any count; the model's batch is filled and padded) -> float outputs."""
        return in_fixed_batches(pixels, self.input.shape[0],
                                lambda chunk: self.run_raw(self.input_from_pixels(chunk, prep)))

    def describe(self) -> dict[str, Any]:
        from edgeship.runtime.delegation import of_interpreter

        return {
            "interpreter": self.backend,
            "interpreter_version": backend_version(self.backend),
            "delegate": self.delegate,
            "input": {"shape": list(self.input.shape), "dtype": self.input.dtype.name,
                      "scale": self.input.scale, "zero_point": self.input.zero_point},
            "output": {"shape": list(self.output.shape), "dtype": self.output.dtype.name,
                       "scale": self.output.scale, "zero_point": self.output.zero_point},
            # how much of the graph the delegate took (partitions, ops left outside)
            **({"xnnpack": of_interpreter(self.interpreter).to_dict()} if self.delegate == "xnnpack" else {}),
        }

    def op_names(self) -> list[str]:
        """Builtin op names in execution order (for reports and tests)."""
        return [d["op_name"] for d in self.interpreter._get_ops_details()]  # noqa: SLF001


def in_fixed_batches(x: np.ndarray, step: int, fn: Any) -> np.ndarray:
    """Apply ``fn`` to groups of exactly ``step`` samples (the last padded by repetition), join the results."""
    outs = []
    for start in range(0, len(x), step):
        chunk = x[start:start + step]
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
    backend = _pick_backend()
    interp = _import_backend(backend)(
        model_content=model, experimental_preserve_all_tensors=True,
        experimental_op_resolver_type=_resolver(backend, "BUILTIN_WITHOUT_DEFAULT_DELEGATES"))
    interp.allocate_tensors()
    return interp


def _resolver(backend: str, name: str) -> Any:
    module = importlib.import_module(_MODULES[backend].rsplit(".", 1)[0] + ".interpreter"
                                     if backend != "tensorflow" else "tensorflow.lite.experimental")
    return getattr(module.OpResolverType, name)


def _pick_backend() -> str:
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
