"""Where the time goes: per-op-type latency of TFLite models, float next to int8.

The Python interpreter has no per-op profiler once XNNPACK has taken the graph, so this
times prefixes: model k keeps the first k ops (its output is op k's output), and op k costs
the difference of the medians of prefixes k and k-1. Prefixes are timed interleaved, and
the per-op figures are summed by op type, which is what explains an int8/float ratio. Each
model's XNNPACK partitions and the ops left outside are printed first (issue 13).

    python benchmarks/op_profile.py FLOAT.tflite INT8.tflite [MORE.tflite ...] [--threads 1] [--runs 60] [--chunk 40]
"""

from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
#: Prefix models loaded at once.
CHUNK = 40  # flatbuffer_utils imports TensorFlow: keep its banner quiet


class Prefixes:
    """The model truncated after each op of its main subgraph, built on demand (they are big)."""

    def __init__(self, model: bytes) -> None:
        from tensorflow.lite.tools import flatbuffer_utils as fbu

        from edgeship.runtime.interpreter import TFLiteModel

        self.names = [d["op_name"] for d in TFLiteModel(model, use_xnnpack=False).interpreter._get_ops_details()]
        self._obj = fbu.read_model_from_bytearray(bytearray(model))
        sub = self._obj.subgraphs[0]
        self._ops, self._outputs = list(sub.operators), sub.outputs

    def __len__(self) -> int:
        return len(self.names)

    def blob(self, k: int) -> bytes:
        """The model keeping ops 0..k, with op k's output as its output."""
        from tensorflow.lite.tools import flatbuffer_utils as fbu

        sub = self._obj.subgraphs[0]
        sub.operators, sub.outputs = self._ops[: k + 1], [self._ops[k].outputs[0]]
        try:
            return bytes(fbu.convert_object_to_bytearray(self._obj))
        finally:
            sub.operators, sub.outputs = self._ops, self._outputs


def profile(model: bytes, *, threads: int, runs: int, chunk: int = CHUNK) -> dict[str, float]:
    """Milliseconds per op type (medians of prefix differences; small negatives are noise).

    At most ``chunk`` prefixes are loaded at a time (each interpreter holds its own copy of
    the weights: a 500-op ViT would not fit otherwise); each chunk is timed interleaved with
    the whole model, and its prefixes are scaled by the whole model's median in that chunk
    over its overall median, so drift between chunks cancels.
    """
    pre = Prefixes(model)
    med = np.zeros(len(pre))
    whole: list[float] = []
    for start in range(0, len(pre), chunk):
        part = list(range(start, min(start + chunk, len(pre))))
        models = [_loaded(pre.blob(k), threads) for k in part] + [_loaded(model, threads)]
        times = np.zeros((len(models), runs))
        for r in range(runs):
            for k, m in enumerate(models):
                t = time.perf_counter_ns()
                m.invoke()
                times[k, r] = (time.perf_counter_ns() - t) / 1e6
        chunk_med = np.median(times, axis=1)
        med[part] = chunk_med[:-1] / chunk_med[-1]  # in units of the whole model, rescaled below
        whole.append(float(chunk_med[-1]))
        del models
    med *= float(np.median(whole))
    per_type: dict[str, float] = defaultdict(float)
    prev = 0.0
    for name, total in zip(pre.names, med):
        per_type[name] += total - prev
        prev = total
    per_type["(whole model)"] = float(np.median(whole))
    return dict(per_type)


def _loaded(blob: bytes, threads: int):  # noqa: ANN202 - a TFLiteModel, warmed up
    from edgeship.runtime.interpreter import TFLiteModel

    m = TFLiteModel(blob, num_threads=threads)
    m.set_raw_input(np.zeros(m.input.shape, m.input.dtype))
    for _ in range(5):
        m.invoke()
    return m


def outside_delegate(model: bytes) -> str:
    """XNNPACK partitions and the ops it leaves to TFLite's kernels, one line."""
    from edgeship.runtime.delegation import of_interpreter
    from edgeship.runtime.interpreter import TFLiteModel

    return of_interpreter(TFLiteModel(model, num_threads=1).interpreter).summary()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", type=Path, help="first one is the reference for the ratios")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--chunk", type=int, default=CHUNK, help=f"prefix models loaded at once (default {CHUNK})")
    args = ap.parse_args()
    for p in args.models:
        print(f"{p.name}: {outside_delegate(p.read_bytes())}")
    results = [profile(p.read_bytes(), threads=args.threads, runs=args.runs, chunk=args.chunk) for p in args.models]
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
