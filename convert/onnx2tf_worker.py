"""Run onnx2tf in edgeship's worker process, offline and on a private copy of the model.

onnx2tf calls ``sys.exit`` from library code, writes back to its input path, calls
the ``onnxsim`` executable by name (PATH-dependent) and downloads a sample-data file
from the internet for fixed-batch image models. Running it here, in the worker process
of :class:`edgeship._child.ChildWorker` (one per conversion) with its own working folder,
keeps all of that away from the caller:

* the model is a copy in the work folder, so the user's file is never touched;
* onnx2tf's own onnxsim pass is off (edgeship has already simplified the model);
* the sample-data download is replaced by deterministic local data, and any HTTP
  request raises at once instead of hanging;
* an ``Erf`` left outside a GELU becomes onnx2tf's polynomial erf (builtin ops), not a
  TensorFlow Select op the on-device interpreters do not have.

Usage (internal): ``ChildWorker().call("onnx2tf", run, job)``.
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path
from typing import Any, NoReturn

from edgeship._child import one_line


def _offline_sample_data():  # type: ignore[no-untyped-def]
    import numpy as np

    rng = np.random.default_rng(0)
    return rng.random((20, 128, 128, 3), dtype=np.float32)


def _block_network() -> None:
    import requests

    def refuse(*args: object, **kwargs: object) -> NoReturn:
        raise requests.exceptions.ConnectionError("edgeship runs onnx2tf offline")

    requests.get = refuse
    requests.post = refuse


class _Float16NotNeeded(Exception):
    """Raised in place of onnx2tf's float16 conversion, which comes after the float32 model is written."""


def _without_float16() -> None:
    """Make TFLiteConverter refuse float16 conversions (onnx2tf always converts twice: float32, then float16;
    the second costs about as much as the first and nothing else in onnx2tf comes after it but options
    edgeship leaves off)."""
    import tensorflow as tf

    cls = tf.lite.TFLiteConverter
    for name in ("from_keras_model", "from_concrete_functions"):
        factory = getattr(cls, name)

        def make(*args: Any, _factory: Any = factory, **kwargs: Any) -> Any:
            converter = _factory(*args, **kwargs)
            real = converter.convert

            def convert() -> Any:
                if tf.float16 in converter.target_spec.supported_types:
                    raise _Float16NotNeeded
                return real()

            converter.convert = convert
            return converter

        setattr(cls, name, staticmethod(make))


def run(job: dict[str, Any]) -> dict[str, Any]:
    """Convert ``job["onnx"]`` into ``job["output"]``, working in ``job["workdir"]`` (in the worker process);
    ``job["float16"]`` false: the float32 model only.

    Returns:
        ``{"ok": True, "files": [...]}``, or ``{"ok": False, "error": one line, "traceback": ...}``.
    """
    os.chdir(job["workdir"])
    try:
        _block_network()
        import onnx2tf.onnx2tf as o2
        import onnx2tf.utils.common_functions as common

        o2.download_test_image_data = _offline_sample_data
        common.download_test_image_data = _offline_sample_data
        if not job.get("float16", True):
            _without_float16()
        o2.convert(
            input_onnx_file_path=job["onnx"],
            output_folder_path=job["output"],
            not_use_onnxsim=True,
            # An Erf outside a GELU (edgeship fuses those) as builtin ops, not a Select TF op (FlexErf)
            # that no on-device interpreter has; abs error about 1e-7 (Abramowitz & Stegun 7.1.26: 1.5e-7,
            # plus float32 rounding).
            replace_to_pseudo_operators=["erf"],
            output_signaturedefs=True,
            copy_onnx_input_output_names_to_tflite=True,
            non_verbose=True,
            verbosity="error",
        )
    except _Float16NotNeeded:
        pass  # the float32 model is written, and nothing after the float16 conversion is asked for
    except SystemExit as exc:  # onnx2tf exits from library code on failure
        return {"ok": False, "error": f"onnx2tf exited with status {exc.code}"}
    except Exception as exc:  # noqa: BLE001 - report every failure to the parent, one line
        return {
            "ok": False,
            "error": one_line(f"{type(exc).__name__}: {exc}"),
            "traceback": traceback.format_exc(limit=3),
        }
    return {"ok": True, "files": sorted(p.name for p in Path(job["output"]).iterdir())}
