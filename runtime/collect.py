"""``python -m edgeship.runtime.collect``: run a deployed model over images, save its outputs.

The device side of a remote or emulated drift check: it needs only the runtime
(numpy, Pillow, a TFLite interpreter). The host compares the saved outputs with the
float reference.

    python -m edgeship.runtime.collect MODEL_OR_BUNDLE IMAGE_DIR -o outputs.npz [--threads N] [--no-xnnpack]

The ``.npz`` holds ``logits`` (float32 ``[N, classes]``), ``files`` (paths relative to
IMAGE_DIR, in the order run) and ``runtime`` (JSON: interpreter, version, delegate, I/O).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from collections.abc import Sequence

import numpy as np

from edgeship._files import atomic_write_bytes
from edgeship.errors import EdgeshipError
from edgeship.runtime.candidate import candidate_outputs
from edgeship.runtime.images import list_images


def collect(
    model: str | os.PathLike[str],
    image_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    num_threads: int | None = None,
    use_xnnpack: bool = True,
) -> dict[str, object]:
    """Run ``model`` on every image of ``image_dir`` (sorted) and write ``out`` (.npz) atomically."""

    images = list_images(image_dir, minimum=1)
    start = time.perf_counter()
    logits, describe = candidate_outputs(model, images.files, num_threads=num_threads, use_xnnpack=use_xnnpack)
    describe = {**describe, "seconds": round(time.perf_counter() - start, 3), "machine": os.uname().machine}
    files = np.array([str(f.relative_to(images.root)) for f in images.files])
    buf = io.BytesIO()
    np.savez(buf, logits=logits.astype(np.float32), files=files, runtime=np.array(json.dumps(describe)))

    atomic_write_bytes(out, buf.getvalue())
    return {"count": int(len(files)), **describe}


def load_collected(path: str | os.PathLike[str]) -> tuple[np.ndarray, list[str], dict[str, object]]:
    """(logits, relative file names, runtime description) from a collect ``.npz``."""
    with np.load(path, allow_pickle=False) as data:
        return data["logits"], [str(f) for f in data["files"]], json.loads(str(data["runtime"]))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edgeship.runtime.collect", description=__doc__.splitlines()[0])
    ap.add_argument("model", help="bundle folder or .tflite file")
    ap.add_argument("images", help="folder of images")
    ap.add_argument("-o", "--out", required=True, help="output .npz")
    ap.add_argument("-t", "--threads", type=int)
    ap.add_argument("--no-xnnpack", action="store_true")
    args = ap.parse_args(argv)
    try:
        summary = collect(args.model, args.images, args.out, num_threads=args.threads, use_xnnpack=not args.no_xnnpack)
    except EdgeshipError as exc:
        print(f"edgeship.runtime.collect: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
