"""``python -m edgeship.runtime.bench``: latency, memory and size of TFLite (and ONNX) models.

Runs on the host and on devices (needs only the runtime; ``.onnx`` models additionally
need onnxruntime: pip's on a host, the OS's on a 32-bit trixie Pi). Each (model, threads) configuration lives in its own
worker process, so init time and peak memory are its own; the workers are driven
round-robin a few invocations at a time, so machine drift hits every model equally.
Timing is ``time.perf_counter_ns`` around ``invoke()`` only; the wrapper's own work
(preprocessing, input quantization, output dequantization, softmax) is timed
separately and reported as ``overhead``. With ``--image`` (a file or a folder, repeatable)
each TFLite model is also timed end to end: ``Classifier.predict`` on those images, the
same code a device runs, with decode, preprocess, invoke and postprocess shown
separately and a bare ``invoke()`` timed in the same rounds for the ratio.

    python -m edgeship.runtime.bench MODEL [MODEL ...] [--threads 1,2] [--runs 100 | --duration S]
        [--warmup 10] [--image PATH ...] [-o bench.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeship._deps import require
from edgeship._files import atomic_write_json
from edgeship.errors import EdgeshipError, InputError, NativeCrashError
from edgeship.runtime.bench_report import (
    BENCH_FILE,
    SCHEMA,
    BenchHost,
    BenchOptions,
    BenchReport,
    BenchRow,
    EndToEnd,
    EndToEndSteps,
    LatencyStats,
    RuntimeInfo,
    with_ratios,
)
from edgeship.runtime.card import Preprocessing
from edgeship.runtime.classifier import Classifier, card_from_model, find_card
from edgeship.runtime.images import list_images, normalize, open_image, resize_crop, synthetic_pixels
from edgeship.runtime.interpreter import TFLiteModel
from edgeship.runtime.metrics import softmax, topk
from edgeship.runtime.model_check import check_model_files

__all__ = ["SCHEMA", "BenchOptions", "BenchReport", "benchmark", "table"]


# ---------------------------------------------------------------- worker (one model, one thread count)
class _Runner:
    def __init__(self, model: str, threads: int, use_xnnpack: bool) -> None:
        self.model = model
        start = time.perf_counter_ns()
        if model.endswith(".onnx"):
            self._init_onnx(model, threads)
        else:
            self._init_tflite(model, threads, use_xnnpack)
        self.init_ms = (time.perf_counter_ns() - start) / 1e6

    def _init_tflite(self, model: str, threads: int, use_xnnpack: bool) -> None:
        tfl = TFLiteModel(model, num_threads=threads, use_xnnpack=use_xnnpack)
        self.tfl: TFLiteModel | None = tfl
        spec = tfl.input
        rng = np.random.default_rng(0)
        if spec.quantized:
            info = np.iinfo(spec.dtype)
            self.x = rng.integers(info.min, info.max + 1, size=spec.shape).astype(spec.dtype)
        else:
            self.x = rng.standard_normal(spec.shape).astype(spec.dtype)
        tfl.set_raw_input(self.x)
        self.describe = tfl.describe()
        self.invoke = tfl.invoke
        self.classifier: Any = None

    def _init_onnx(self, model: str, threads: int) -> None:
        ort = require("onnxruntime", purpose="benchmark .onnx models")

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0]
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
        ints: dict[str, type[np.integer[Any]]] = {"tensor(int8)": np.int8, "tensor(uint8)": np.uint8}
        rng = np.random.default_rng(0)
        if inp.type in ints:  # edgeship's int8 QDQ model takes the input its first QuantizeLinear wrote
            info = np.iinfo(ints[inp.type])
            x = rng.integers(info.min, info.max + 1, size=shape).astype(ints[inp.type])
        else:
            x = rng.standard_normal(shape).astype(np.float32)
        feed = {inp.name: x}
        out = [sess.get_outputs()[0].name]
        self.describe = {
            "interpreter": "onnxruntime",
            "interpreter_version": ort.__version__,
            "delegate": "CPUExecutionProvider",
            "input": {"shape": shape, "dtype": x.dtype.name},
        }
        self.invoke = lambda: sess.run(out, feed)
        self.tfl = None

    def overhead(self, n: int) -> dict[str, float]:
        """Mean ms of the wrapper's own steps around invoke (TFLite models only)."""
        if self.tfl is None:
            return {}
        from PIL import Image

        h, w = self.tfl.input.shape[1:3]
        prep = Preprocessing.imagenet(h, w)
        image = Image.fromarray(
            synthetic_pixels(1, Preprocessing(resize_shorter=None, crop=(h * 8 // 7, w * 8 // 7)))[0]
        )
        steps = {"preprocess_ms": 0.0, "quantize_input_ms": 0.0, "dequantize_softmax_topk_ms": 0.0}
        for _ in range(n):
            t0 = time.perf_counter_ns()
            x = normalize(resize_crop(image, prep), prep)[None]
            t1 = time.perf_counter_ns()
            q = self.tfl.quantize_input(x)
            t2 = time.perf_counter_ns()
            y = self.tfl.dequantize_output(self.tfl.raw_output())
            topk(softmax(y.reshape(1, -1)), 5)
            t3 = time.perf_counter_ns()
            steps["preprocess_ms"] += (t1 - t0) / 1e6
            steps["quantize_input_ms"] += (t2 - t1) / 1e6
            steps["dequantize_softmax_topk_ms"] += (t3 - t2) / 1e6
        del q
        return {k: round(v / n, 4) for k, v in steps.items()}

    def end_to_end(self, images: Sequence[str], start: int, n: int) -> dict[str, list[int]]:
        """``n`` rounds of ``Classifier.predict_timed`` on the images in turn, each followed by a bare invoke()."""
        clf = self._classifier()
        ns: dict[str, list[int]] = {
            k: [] for k in ("total", "decode", "preprocess", "invoke", "postprocess", "invoke_only")
        }
        for i in range(start, start + n):
            t0 = time.perf_counter_ns()
            _, steps = clf.predict_timed(images[i % len(images)])
            t1 = time.perf_counter_ns()
            self.invoke()
            ns["invoke_only"].append(time.perf_counter_ns() - t1)
            ns["total"].append(t1 - t0)
            for k, v in steps.items():
                ns[k].append(v)
        self._tflite().set_raw_input(self.x)  # the invoke-only runs keep their own input
        return ns

    def _classifier(self) -> Any:
        if self.classifier is None:
            card = find_card(Path(self.model))
            self.card_note = "" if card else "no model card beside the model: ImageNet preprocessing assumed"
            tfl = self._tflite()
            self.classifier = Classifier(tfl, card or card_from_model(tfl, Path(self.model).name), None)
        return self.classifier

    def _tflite(self) -> TFLiteModel:
        if self.tfl is None:
            raise InputError(f"{self.model}: image-path timings need a TFLite model")
        return self.tfl


def _worker() -> int:
    """JSON-lines loop on stdin/stdout (internal protocol of the benchmark)."""
    runner: _Runner | None = None
    sys.stdout.write(json.dumps({"ready": True}) + "\n")  # started: the parent loads models one at a time
    sys.stdout.flush()
    for line in sys.stdin:
        msg = json.loads(line)
        cmd = msg["cmd"]
        try:
            if cmd == "init":
                runner = _Runner(msg["model"], msg["threads"], msg.get("use_xnnpack", True))
                start = time.perf_counter_ns()
                runner.invoke()
                first = (time.perf_counter_ns() - start) / 1e6
                reply: dict[str, Any] = {
                    "init_ms": round(runner.init_ms, 3),
                    "first_ms": round(first, 3),
                    "runtime": runner.describe,
                }
            elif cmd == "run":
                assert runner is not None
                times = []
                for _ in range(msg["n"]):
                    start = time.perf_counter_ns()
                    runner.invoke()
                    times.append(time.perf_counter_ns() - start)
                reply = {"ns": times}
            elif cmd == "overhead":
                assert runner is not None
                reply = {"overhead": runner.overhead(msg["n"])}
            elif cmd == "e2e":
                assert runner is not None
                reply = {"ns": runner.end_to_end(msg["images"], msg["start"], msg["n"])}
                if msg.get("describe"):
                    reply["image_path"] = runner.classifier.image_path()
                    reply["note"] = runner.card_note
            elif cmd == "stats":
                reply = {"peak_rss_mb": round(peak_rss_mb(), 1)}
            else:
                reply = {"bye": True}
        except Exception as exc:  # report to the parent, which raises one clear error
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
        if cmd == "quit":
            break
    return 0


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB.

    ``VmHWM`` is per address space, so it starts afresh at exec; ``ru_maxrss`` would
    include the RSS of the parent at fork time on Linux.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    per_mb = 1024 * 1024 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / per_mb


class _Worker:
    def __init__(self, model: Path, threads: int, use_xnnpack: bool) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgeship.runtime.bench", "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
        )
        self.label = f"{model.name} x{threads}"
        self.init: dict[str, Any] = {}
        self.spec = {"cmd": "init", "model": str(model), "threads": threads, "use_xnnpack": use_xnnpack}

    def start(self) -> None:
        self._reply()  # the worker's "ready"
        self.init = self.ask(self.spec)

    def ask(self, msg: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def _reply(self) -> dict[str, Any]:
        assert self.proc.stdout
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
            raise NativeCrashError(f"benchmark worker for {self.label} died ({how})")
        reply = json.loads(line)
        if "error" in reply:
            raise InputError(f"benchmark of {self.label} failed: {reply['error']}")
        return reply

    def close(self) -> None:
        try:
            self.ask({"cmd": "quit"})
        except (EdgeshipError, BrokenPipeError, ValueError):
            pass
        self.proc.wait(timeout=30)


# ---------------------------------------------------------------- orchestration
def _check_loadable(paths: list[Path]) -> None:
    """The one-line verdict of the interpreter pre-check (a child process) before any timing worker loads a model.

    No TFLite model, no check: a device that runs only ``.onnx`` models (onnxruntime) may have no TFLite interpreter.
    """
    if not paths:
        return
    for path, problem in check_model_files(paths).items():
        if problem:
            raise InputError(f"cannot load TFLite model {path}: {problem}")


def summarize(ns: Sequence[int]) -> LatencyStats:
    """Latency statistics of ``ns`` (nanoseconds), in ms."""
    ms = np.asarray(ns, dtype=np.float64) / 1e6
    return LatencyStats(
        runs=int(ms.size),
        min_ms=float(ms.min()),
        mean_ms=float(ms.mean()),
        std_ms=float(ms.std()),
        p50_ms=float(np.percentile(ms, 50)),
        p90_ms=float(np.percentile(ms, 90)),
        p99_ms=float(np.percentile(ms, 99)),
        max_ms=float(ms.max()),
    )


def benchmark(
    models: Sequence[str | os.PathLike[str]],
    options: BenchOptions | None = None,
    *,
    progress: Callable[[str, int | None, int | None], None] | None = None,
) -> BenchReport:
    """Benchmark the models interleaved (``options``: default :class:`BenchOptions`); return what ``bench.json``
    holds."""
    options = options or BenchOptions()
    paths = [Path(m) for m in models]
    for p in paths:
        if not p.is_file():
            raise InputError(f"model {p} does not exist")
        if p.suffix not in (".tflite", ".onnx"):
            raise InputError(f"{p} is neither a .tflite nor an .onnx model")
    _check_loadable([p for p in paths if p.suffix == ".tflite"])
    images = image_files(options.images)
    configs = [(p, t) for t in options.threads for p in paths]
    workers: list[_Worker] = []
    try:
        for p, t in configs:  # the processes start side by side; each model loads alone (its load time counts)
            workers.append(_Worker(p, t, options.use_xnnpack))
        for i, w in enumerate(workers):
            if progress:
                progress("load models", i, len(configs))
            w.start()
        samples = _interleave(workers, options, progress)
        e2e = _end_to_end(workers, configs, images, options, progress) if images else {}
        rows = [_row(w, p, t, ns, options, e2e.get(id(w))) for w, (p, t), ns in zip(workers, configs, samples)]
    finally:
        for w in workers:
            w.close()
    host = _host()
    rows = [replace(r, emulated=EMULATED if host.emulated else None) for r in with_ratios(rows)]
    return BenchReport(host=host, results=tuple(rows), options=options)


def _row(w: _Worker, p: Path, t: int, ns: list[int], options: BenchOptions, e2e: EndToEnd | None) -> BenchRow:
    """One configuration's row (its ratio to the first model is set by :func:`with_ratios`)."""
    over = w.ask({"cmd": "overhead", "n": options.overhead_runs})["overhead"]
    stats = w.ask({"cmd": "stats"})
    return BenchRow(
        model=p.name,
        path=str(p),
        threads=t,
        size_bytes=p.stat().st_size,
        init_ms=w.init["init_ms"],
        first_ms=w.init["first_ms"],
        stats=summarize(ns),
        samples_ms=tuple(round(v / 1e6, 4) for v in ns),
        peak_rss_mb=stats["peak_rss_mb"],
        runtime=RuntimeInfo.from_dict(w.init["runtime"]),
        overhead=over,
        e2e=e2e,
        ratio_p50_to_first=1.0,
    )


def _interleave(
    workers: list[_Worker], options: BenchOptions, progress: Callable[[str, int | None, int | None], None] | None
) -> list[list[int]]:
    for w in workers:  # warm-up, not recorded
        if options.warmup:
            w.ask({"cmd": "run", "n": options.warmup})
    samples: list[list[int]] = [[] for _ in workers]
    start = time.perf_counter()
    target = options.runs
    while True:
        for i, w in enumerate(workers):
            n = options.chunk if options.duration_s else min(options.chunk, target - len(samples[i]))
            if n > 0:
                samples[i].extend(w.ask({"cmd": "run", "n": n})["ns"])
        elapsed = time.perf_counter() - start
        if options.duration_s:
            if progress:
                progress("measure", int(min(elapsed, options.duration_s)), int(options.duration_s))
            if elapsed >= options.duration_s:
                return samples
        else:
            done = min(len(s) for s in samples)
            if progress:
                progress("measure", done, target)
            if done >= target:
                return samples


def image_files(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """The image files of ``paths`` (files as given, folders listed and checked like everywhere else)."""

    files: list[str] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += [str(f) for f in list_images(p).files]
        else:
            open_image(p)  # one clear error for a missing or unreadable image, before any worker starts
            files.append(str(p))
    return files


def _end_to_end(
    workers: list[_Worker],
    configs: list[tuple[Path, int]],
    images: list[str],
    options: BenchOptions,
    progress: Callable[[str, int | None, int | None], None] | None,
) -> dict[int, EndToEnd]:
    """Time ``Classifier.predict`` on the images in every TFLite worker, round-robin like invoke()."""
    tfl = [w for w, (p, _) in zip(workers, configs) if p.suffix == ".tflite"]
    target = options.e2e_runs or options.runs
    ns: dict[int, dict[str, list[int]]] = {id(w): {} for w in tfl}
    meta: dict[int, dict[str, Any]] = {}
    for w in tfl:  # warm-up: a few images once, and the image path each worker runs
        reply = w.ask({"cmd": "e2e", "images": images, "start": 0, "n": min(3, len(images)), "describe": True})
        meta[id(w)] = {"image_path": reply["image_path"], "note": reply["note"]}
    done = 0
    while done < target:
        n = min(options.chunk, target - done)
        for w in tfl:
            for k, v in w.ask({"cmd": "e2e", "images": images, "start": done, "n": n})["ns"].items():
                ns[id(w)].setdefault(k, []).extend(v)
        done += n
        if progress:
            progress("measure end to end", done, target)
    return {key: _e2e_summary(d, images, meta[key]) for key, d in ns.items()}


def _e2e_summary(ns: dict[str, list[int]], images: list[str], meta: dict[str, Any]) -> EndToEnd:
    total, invoke_only = summarize(ns["total"]), summarize(ns["invoke_only"])
    return EndToEnd(
        images=len(images),
        image=images[0] if len(images) == 1 else str(Path(images[0]).parent),
        runs=total.runs or 0,
        min_ms=total.min_ms or 0.0,
        mean_ms=total.mean_ms,
        p50_ms=total.p50_ms,
        p90_ms=total.p90_ms,
        p99_ms=total.p99_ms,
        steps_p50_ms=EndToEndSteps(
            **{
                k: float(np.percentile(np.asarray(ns[k]) / 1e6, 50))
                for k in ("decode", "preprocess", "invoke", "postprocess")
            }
        ),
        invoke_only_p50_ms=invoke_only.p50_ms,
        ratio_p50_to_invoke=round(total.p50_ms / invoke_only.p50_ms, 3),
        image_path=meta["image_path"],
        note=meta.get("note") or None,
    )


def _host() -> BenchHost:
    return BenchHost(
        machine=platform.machine(),
        system=platform.system(),
        python=platform.python_version(),
        cpus=os.cpu_count(),
        node=platform.node(),
        emulated=emulation(),
    )


#: The label of every timing measured on an emulated CPU.
EMULATED = "emulated: not the speed of a Pi"
#: Written into the root of an emulated Pi by ``edgeship emulate`` (:mod:`edgeship.targets.emulated_pi`).
EMULATED_MARKER = "/etc/edgeship-emulated.json"


def emulation() -> str | None:
    """How this ARM CPU is emulated, or None on real hardware.

    qemu-user passes the host kernel's ``/proc/cpuinfo`` through, so an ARM process that
    reads x86 fields there is emulated; edgeship's emulated Pis also carry a marker file.
    """
    if not platform.machine().lower().startswith(("aarch64", "arm")):
        return None
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        cpuinfo = ""
    if Path(EMULATED_MARKER).is_file() or "vendor_id" in cpuinfo:
        return f"qemu-user ({os.environ.get('QEMU_CPU', 'default CPU')}): {EMULATED}"
    return None


def table(report: BenchReport) -> list[str]:
    """A short human table of a benchmark."""
    label = report.emulated
    lines = [f"timings measured under {label}"] if label else []
    lines += [
        f"{'model':<42}{'thr':>4}{'init':>8}{'first':>8}{'p50':>8}{'p90':>8}{'p99':>8}{'RSS MB':>8}"
        f"{'MB':>7}{'ratio':>7}  runtime"
    ]
    for r in report.results:
        rt, st = r.runtime, r.stats
        lines.append(
            f"{r.model[:41]:<42}{r.threads:>4}{r.init_ms:>8.1f}{r.first_ms:>8.2f}"
            f"{st.p50_ms:>8.2f}{st.p90_ms:>8.2f}{st.p99_ms:>8.2f}{r.peak_rss_mb:>8.0f}"
            f"{r.size_bytes / 1e6:>7.2f}{r.ratio_p50_to_first:>7.2f}  "
            f"{rt.interpreter} {rt.interpreter_version or ''} {rt.delegate}{rt.delegation_note()}"
        )
    return lines + _e2e_table([r for r in report.results if r.e2e is not None])


def _e2e_table(rows: list[BenchRow]) -> list[str]:
    if not rows or rows[0].e2e is None:
        return []
    first = rows[0].e2e
    what = first.image if first.images == 1 else f"{first.images} images in {first.image}"
    lines = [
        "",
        f"end to end, Classifier.predict on {what}:",
        f"{'model':<42}{'thr':>4}{'p50':>8}{'p90':>8}{'decode':>8}{'prep':>8}{'invoke':>8}{'post':>8}{'x invoke':>10}",
    ]
    for r in rows:
        if r.e2e is not None:
            e, s = r.e2e, r.e2e.steps_p50_ms
            lines.append(
                f"{r.model[:41]:<42}{r.threads:>4}{e.p50_ms:>8.2f}{e.p90_ms:>8.2f}"
                f"{s.decode:>8.2f}{s.preprocess:>8.2f}{s.invoke:>8.2f}{s.postprocess:>8.2f}"
                f"{e.ratio_p50_to_invoke:>10.2f}"
            )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["--worker"]:
        return _worker()
    ap = argparse.ArgumentParser(prog="python -m edgeship.runtime.bench", description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--threads", default="1", help="comma-separated thread counts (default 1)")
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--duration", type=float, help="measure for this many seconds instead of --runs")
    ap.add_argument("--no-xnnpack", action="store_true")
    ap.add_argument(
        "--image",
        action="append",
        default=[],
        help="image file or folder: also time Classifier.predict end to end (repeatable)",
    )
    ap.add_argument("--e2e-runs", type=int, help="end-to-end rounds per model (default: --runs)")
    ap.add_argument("-o", "--out", default=BENCH_FILE)
    args = ap.parse_args(argv)
    try:
        opts = BenchOptions(
            threads=tuple(int(t) for t in args.threads.split(",")),
            runs=args.runs,
            warmup=args.warmup,
            duration_s=args.duration,
            use_xnnpack=not args.no_xnnpack,
            images=tuple(args.image),
            e2e_runs=args.e2e_runs,
        )
        doc = benchmark(args.models, opts)
    except (EdgeshipError, ValueError) as exc:
        print(f"edgeship.runtime.bench: error: {exc}", file=sys.stderr)
        return 1

    atomic_write_json(args.out, doc.to_dict())
    print("\n".join(table(doc)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
