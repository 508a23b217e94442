"""Time `edgeship convert` against the bare `onnx2tf` CLI on the same model, in one run.

Prints wall time and peak RSS of each, and the ratio. Both run as child processes so
their peak memory is measured the same way (getrusage of the finished child).

    python benchmarks/convert_vs_onnx2tf.py [MODEL.onnx] [--images DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edgeship._assets import shared_assets


def run(cmd: list[str], cwd: Path, env_path: str | None = None) -> tuple[float, float, int]:
    """Wall seconds, peak RSS MB and exit code of a child command (via os.wait4)."""
    env = dict(os.environ)
    if env_path:
        env["PATH"] = env_path + os.pathsep + env.get("PATH", "")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - start, usage.ru_maxrss / 1024, proc.returncode


def main() -> int:
    assets = shared_assets()
    default = assets / "models" / "mobilenetv2-1.0-tf-op13.onnx" if assets else None
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", type=Path, default=default)
    ap.add_argument("--images", type=Path, help="verification images for edgeship (default: generated inputs)")
    args = ap.parse_args()
    if args.model is None:
        ap.error("no model given and no shared assets found")
    onnx2tf_cli = shutil.which("onnx2tf") or str(Path(sys.executable).parent / "onnx2tf")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # onnx2tf rewrites its input and downloads sample data: give it a copy, and a local
        # sample file so that the comparison is offline too (it looks in the working folder).
        shutil.copy(args.model, work / "bare.onnx")
        _offline_sample(work)
        # Same job for both: the input shape fixed (bare onnx2tf cannot convert this model's
        # dynamic batch, and `-b 1` mis-transposes it), and the venv's bin/ on PATH, which bare
        # onnx2tf needs to find its `onnxsim` executable.
        shape = _static_shape(args.model)
        bare = run(
            [onnx2tf_cli, "-i", "bare.onnx", "-o", "bare_out", "-ois", shape, "-n"],
            work,
            env_path=str(Path(onnx2tf_cli).parent),
        )
        cmd = [sys.executable, "-m", "edgeship", "convert", str(args.model), "-o", str(work / "es_out"), "-q"]
        if args.images:
            cmd += ["--images", str(args.images)]
        ours = run(cmd, work)
    print(f"model: {args.model}")
    print(f"{'tool':<22}{'wall s':>9}{'peak RSS MB':>14}{'exit':>6}")
    print(f"{'onnx2tf (bare CLI)':<22}{bare[0]:>9.1f}{bare[1]:>14.0f}{bare[2]:>6}")
    label = "edgeship convert" + (" +verify" if args.images else "")
    print(f"{label:<22}{ours[0]:>9.1f}{ours[1]:>14.0f}{ours[2]:>6}")
    print(f"ratio edgeship/onnx2tf: wall {ours[0] / bare[0]:.2f}x, peak memory {ours[1] / bare[1]:.2f}x")
    return 0 if bare[2] == 0 and ours[2] == 0 else 1


def _static_shape(model: Path) -> str:
    """``name:1,C,H,W`` for onnx2tf's -ois, from the model's declared input."""
    from edgeship.convert import onnx_model

    info = onnx_model.inspect_model(onnx_model.load_model(model), str(model))
    shape, _ = onnx_model.resolve_shape(info, None)
    return f"{info.input_name}:{','.join(map(str, shape))}"


def _offline_sample(work: Path) -> None:
    import numpy as np

    data = np.random.default_rng(0).random((20, 128, 128, 3), dtype=np.float32)
    np.save(work / "calibration_image_sample_data_20x128x128x3_float32.npy", data)


if __name__ == "__main__":
    sys.exit(main())
