"""Where the time goes: per-op-type latency of TFLite models, float next to int8.

The Python interpreter has no per-op profiler once XNNPACK has taken the graph, so this
times prefixes: model k keeps the first k ops (its output is op k's output), and op k costs
the difference of the medians of prefixes k and k-1. Prefixes are timed interleaved, and
the per-op figures are summed by op type, which is what explains an int8/float ratio.

    python benchmarks/op_profile.py FLOAT.tflite INT8.tflite [MORE.tflite ...] [--threads 1] [--runs 60]
"""

from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # flatbuffer_utils imports TensorFlow: keep its banner quiet


def prefixes(model: bytes) -> list[tuple[str, bytes]]:
    """(op name, model truncated after that op) for every op of the main subgraph."""
    from tensorflow.lite.tools import flatbuffer_utils as fbu

    from edgeship.runtime.interpreter import TFLiteModel

    names = [d["op_name"] for d in TFLiteModel(model, use_xnnpack=False).interpreter._get_ops_details()]
    out = []
    for k, name in enumerate(names):
        obj = fbu.read_model_from_bytearray(bytearray(model))
        sub = obj.subgraphs[0]
        last = sub.operators[k]
        sub.outputs = [last.outputs[0]]
        sub.operators = sub.operators[:k + 1]
        out.append((name, bytes(fbu.convert_object_to_bytearray(obj))))
    return out


def profile(model: bytes, *, threads: int, runs: int) -> dict[str, float]:
    """Milliseconds per op type (medians of prefix differences; small negatives are noise)."""
    from edgeship.runtime.interpreter import TFLiteModel

    models = []
    for name, blob in prefixes(model):
        m = TFLiteModel(blob, num_threads=threads)
        m.set_raw_input(np.zeros(m.input.shape, m.input.dtype))
        for _ in range(5):
            m.invoke()
        models.append((name, m))
    times = np.zeros((len(models), runs))
    for r in range(runs):
        for k, (_, m) in enumerate(models):
            t = time.perf_counter_ns()
            m.invoke()
            times[k, r] = (time.perf_counter_ns() - t) / 1e6
    med = np.median(times, axis=1)
    per_type: dict[str, float] = defaultdict(float)
    prev = 0.0
    for (name, _), total in zip(models, med):
        per_type[name] += total - prev
        prev = total
    per_type["(whole model)"] = float(med[-1])
    return dict(per_type)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", type=Path, help="first one is the reference for the ratios")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=60)
    args = ap.parse_args()
    results = [profile(p.read_bytes(), threads=args.threads, runs=args.runs) for p in args.models]
    types = sorted({t for r in results for t in r}, key=lambda t: -results[0].get(t, 0.0))
    head = f"{'op type':22s}" + "".join(f"{p.name[:26]:>28s}" for p in args.models)
    print(f"per-op-type median latency, ms ({args.threads} thread(s), {args.runs} runs, prefix differences)")
    print(head)
    for t in types:
        ref = results[0].get(t, 0.0)
        cells = []
        for r in results:
            v = r.get(t, 0.0)
            ratio = f"({ref / v:4.2f}x)" if r is not results[0] and v > 0.05 and ref > 0.05 else " " * 7
            cells.append(f"{v:8.3f} {ratio}".rjust(28))
        print(f"{t:22s}" + "".join(cells))
    print("(Nx) = the first model's time / this model's: how much faster this model runs that op type.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
