"""The ``edgeship`` command: a thin layer over the library.

Exit codes: 0 ok, 1 error, 2 usage, 3 accuracy drift over budget, 4 model/target mismatch,
5 target delegate not applied on the device, 70 internal error (traceback in a log file).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from edgeship._files import reading
from edgeship._files import write_problem as check_written
from edgeship._io import atomic_write_json, check_output_file, check_outputs_free, os_error_line
from edgeship._lock import folder_lock
from edgeship._paths import check_apart, utf8_path
from edgeship._run import Terminated, run_temp_dir, signals_as_interrupt
from edgeship._version import SCHEMA_VERSION, __version__
from edgeship.errors import EXIT_CODES, EdgeshipError, InputError

if TYPE_CHECKING:  # the stage packages are imported by the commands that use them: `edgeship --help` stays light
    from edgeship.quantize.report import QuantizeReport, RunsOn
    from edgeship.quantize.search_report import MixedPrecision, Placement, TimedOn

log = logging.getLogger("edgeship")


class ConsoleProgress:
    """Progress on stderr: a redrawn line on a terminal, stage changes otherwise."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        # A private copy of stderr: TensorFlow's C++ logs are silenced by redirecting fd 2
        # during conversion and calibration, and progress must still get through.
        self.out = os.fdopen(os.dup(2), "w", buffering=1) if enabled else sys.stderr
        self.tty = self.out.isatty()
        self.stage: str | None = None
        self.started = time.perf_counter()
        self.last_draw = 0.0

    def __call__(self, stage: str, done: int | None = None, total: int | None = None) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.started
        if stage != self.stage:
            if self.tty and self.stage is not None:
                self.out.write("\n")
            self.stage = stage
            if not self.tty:
                self.out.write(f"[{elapsed:7.1f}s] {stage}\n")
        if self.tty and (time.perf_counter() - self.last_draw > 0.1 or done == total):
            self.last_draw = time.perf_counter()
            bar = ""
            if done is not None and total:
                filled = int(30 * done / total)
                bar = f" [{'#' * filled}{'.' * (30 - filled)}] {done}/{total}"
            self.out.write(f"\r[{elapsed:7.1f}s] {stage}{bar}\033[K")
        self.out.flush()

    def close(self) -> None:
        if self.enabled and self.tty and self.stage is not None:
            self.out.write("\n")
        if self.enabled and not self.out.closed:
            self.out.close()
        self.enabled = False  # closed once: a second close does nothing


def _csv_floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


def _csv_ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


#: Thread counts the command line accepts (runtime.interpreter.MAX_THREADS, not imported: CLI start-up).
MAX_THREADS = 64


def _thread_counts(text: str) -> tuple[int, ...]:
    """``--threads``, ``--bench-threads``: comma-separated counts from 1 to :data:`MAX_THREADS`, else refused."""
    counts = _csv_ints(text)
    if not counts or any(not 1 <= c <= MAX_THREADS for c in counts):
        raise argparse.ArgumentTypeError(f"thread counts must be 1 to {MAX_THREADS}, got {text!r}")
    return counts


def _seconds(text: str) -> float:
    """A duration: a finite number of seconds above 0 (``nan`` and ``inf`` refused)."""
    import math

    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from exc
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds above 0, got {text!r}")
    return value


class _Once(argparse.Action):
    """An option given at most once: a second value is refused, not silently kept instead of the first."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: Any = None
    ) -> None:
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option} given twice; this command takes one (deploy takes several)")
        setattr(namespace, self.dest, values)


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--json", metavar="FILE", type=Path, help="also write the result as JSON to FILE ('-' for stdout)")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    g.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")


def _add_preprocessing(p: argparse.ArgumentParser) -> None:
    from edgeship.runtime.card import Interpolation  # deferred: CLI start-up

    g = p.add_argument_group(
        "preprocessing (default: resize shorter side 256/224 x input, center crop, RGB, /255, ImageNet mean/std)"
    )
    g.add_argument(
        "--preprocess",
        metavar="JSON",
        type=Path,
        help="preprocessing as a JSON file "
        "(keys: resize_shorter, crop, interpolation, color_order, pixel_scale, mean, std)",
    )
    g.add_argument("--mean", type=_csv_floats, help="per-channel mean after /255, e.g. 0.485,0.456,0.406")
    g.add_argument("--std", type=_csv_floats, help="per-channel std, e.g. 0.229,0.224,0.225")
    g.add_argument("--resize", type=int, metavar="PX", help="resize shorter side to PX before cropping (0: none)")
    g.add_argument("--interpolation", choices=[i.value for i in Interpolation])
    g.add_argument("--bgr", action="store_true", help="the model expects BGR channel order")
    g.add_argument("--pixel-scale", type=float, help="multiplier for 0..255 pixels (default 1/255)")


def _preprocessing_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The preprocessing the flags give (keys of :class:`~edgeship.runtime.card.Preprocessing`)."""
    base: dict[str, Any] = {}
    if args.preprocess:
        try:
            base = json.loads(Path(args.preprocess).read_bytes().decode("utf-8"))
        except (OSError, ValueError) as exc:  # ValueError: not UTF-8, not JSON
            raise InputError(f"cannot read preprocessing JSON {args.preprocess}: {exc}") from exc
        if not isinstance(base, dict):
            raise InputError(f"preprocessing JSON {args.preprocess} must hold an object")
    overrides = {
        "mean": args.mean,
        "std": args.std,
        "interpolation": args.interpolation,
        "pixel_scale": args.pixel_scale,
    }
    base.update({k: v for k, v in overrides.items() if v is not None})
    if args.resize is not None:
        base["resize_shorter"] = args.resize or None
    if args.bgr:
        base["color_order"] = "BGR"
    return base


# ---------------------------------------------------------------- convert
def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="ONNX -> verified float TFLite",
        description="Convert an ONNX image classifier to a float TFLite model and verify it against onnxruntime.",
    )
    p.add_argument("model", type=Path, help="ONNX model (never modified)")
    p.add_argument("-o", "--out", type=Path, required=True, help="output folder")
    g = p.add_argument_group("conversion")
    g.add_argument("--input-shape", type=_csv_ints, metavar="N,C,H,W", help="static input shape (default: batch 1)")
    g.add_argument("--fp16", action="store_true", help="also write and verify model_float16.tflite")
    g.add_argument(
        "--pixels-in-graph",
        action="store_true",
        help="put a per-channel normalisation inside the graph (the model takes 0..255 pixels), "
        "for clients such as MediaPipe Tasks that express one mean/std only",
    )
    g.add_argument("--force", action="store_true", help="overwrite existing outputs in the folder")
    v = p.add_argument_group("verification")
    v.add_argument("--images", type=Path, help="verify on these real images (default: generated inputs)")
    v.add_argument("--max-images", type=int, help="verify on at most this many images")
    v.add_argument("--labels", type=Path, help="labels file (wnid<TAB>names or one per line), copied to the output")
    _add_preprocessing(p)
    _add_common(p)
    p.set_defaults(func=_cmd_convert)


def _cmd_convert(args: argparse.Namespace, progress: Callable[..., None]) -> tuple[int, dict[str, Any]]:
    from edgeship.convert import ConvertOptions, convert  # deferred: CLI start-up
    from edgeship.convert.converter import output_names, preprocessing_for  # deferred: CLI start-up

    prep = (
        preprocessing_for(args.model, args.input_shape, _preprocessing_flags(args)) if _has_prep_flags(args) else None
    )
    options = ConvertOptions(
        input_shape=args.input_shape,
        fp16=args.fp16,
        images=args.images,
        max_images=args.max_images,
        labels=args.labels,
        preprocessing=prep,
        pixels_in_graph=args.pixels_in_graph,
    )
    check_apart(args.out, {"--images": args.images})
    check_outputs_free(args.out, output_names(options), force=args.force, reads=_inputs(args))  # before the work
    result = convert(args.model, options=options, progress=progress).save(args.out, force=args.force)
    report = result.report
    assert report is not None  # a fresh conversion always has one
    lines = [f"wrote {result.model_path} ({len(result.model) / 1e6:.1f} MB) in {report.timings_s['total']:.1f} s"]
    for name, check in report.verification.items():
        f = check.figures
        lines.append(
            f"  {name}: top-1 agreement {100 * f.top1_agreement:.2f}%  mean cosine {f.mean_cosine:.6f}  "
            f"max-abs {f.max_abs_error:.2e}  on {f.count} "
            f"{'real images' if check.agreement_enforced else 'generated inputs'}"
        )
    lines += _input_contract(result.card)
    return 0, {"summary": lines, "result": {"out_dir": str(result.folder), "report": report.to_dict()}}


def _input_contract(card: Any) -> list[str]:
    """The one line saying how the artifact's input differs from the source model's (if it does)."""
    from edgeship.targets.metadata import input_contract  # deferred: CLI start-up

    line = input_contract(card)
    return [f"  {line}"] if line else []


def _has_prep_flags(args: argparse.Namespace) -> bool:
    return (
        any(
            getattr(args, k) is not None
            for k in ("preprocess", "mean", "std", "resize", "interpolation", "pixel_scale")
        )
        or args.bgr
    )


# ---------------------------------------------------------------- quantize
def _add_quantize(sub: argparse._SubParsersAction) -> None:
    from edgeship.quantize.options import CalibrationMethod, IODtype  # deferred: CLI start-up

    p = sub.add_parser(
        "quantize",
        help="int8 post-training quantization from calibration images",
        description="Quantize to a full-integer int8 TFLite, measure drift against the float "
        "model and explain it per layer.",
    )
    p.add_argument("model", type=Path, help="ONNX model, or the output folder of `edgeship convert`")
    p.add_argument("--calib", type=Path, required=True, help="folder of calibration images")
    p.add_argument("-o", "--out", type=Path, required=True, help="output folder (may be the convert folder)")
    g = p.add_argument_group("calibration")
    g.add_argument("--num-calib", type=int, default=200, help="calibration images (default 200; all when fewer)")
    g.add_argument(
        "--seed",
        type=int,
        help="pick calibration images at random with this seed (default: spread over the data, "
        "round-robin over classes when labels are known)",
    )
    g.add_argument(
        "--method",
        choices=[m.value for m in CalibrationMethod],
        help="activation range method (default auto: percentile 99.9999 or 99.99, min-max, or min-max "
        "with a 10%% margin, chosen per model by cross-fitted SQNR on the calibration images)",
    )
    g.add_argument(
        "--percentile", type=float, default=99.999, help="kept mass for --method percentile (default 99.999)"
    )
    bc = g.add_mutually_exclusive_group()
    bc.add_argument(
        "--bias-correction",
        action="store_true",
        default=None,
        help="layer-by-layer empirical bias correction of every convolution (default: the depthwise "
        "convolutions; every convolution with --per-tensor)",
    )
    bc.add_argument("--no-bias-correction", action="store_false", dest="bias_correction", help="no bias correction")
    q = p.add_argument_group("model")
    q.add_argument(
        "--io", choices=[d.value for d in IODtype], help="input/output dtype (default: the target's, else int8)"
    )
    q.add_argument("--per-tensor", action="store_true", help="per-tensor weights (accelerators that need them)")
    eq = q.add_mutually_exclusive_group()
    eq.add_argument(
        "--equalize",
        action="store_true",
        default=None,
        help="equalize the weights' channel ranges before calibration (default: with --per-tensor; re-runs onnx2tf)",
    )
    eq.add_argument("--no-equalize", action="store_false", dest="equalize", help="never equalize")
    q.add_argument(
        "--full-integer",
        action="store_true",
        help="every op int8 (NNAPI, DSPs); default: ops XNNPACK "
        "has no int8 kernel for stay float inside its partition, when the target allows mixed models",
    )
    q.add_argument(
        "--int8-logits",
        action="store_true",
        help="scores on the int8 output grid; default with mixed models: the last layer writes float "
        "scores from its int8 input and weights (float32 output)",
    )
    q.add_argument(
        "--target", action=_Once, help="target profile: default I/O dtype, per-tensor and mixed models from it"
    )
    e = p.add_argument_group("evaluation")
    e.add_argument(
        "--eval",
        type=Path,
        dest="eval_dir",
        help="evaluation images (default: the calibration folder's images not used for calibration)",
    )
    e.add_argument("--max-eval", type=int, help="evaluate on at most this many images")
    e.add_argument(
        "--max-drop",
        type=float,
        help="accuracy-aware: keep layers in float until the top-1 "
        "agreement drop is at most this many points (exit 3 if impossible)",
    )
    e.add_argument(
        "--max-float-layers",
        type=int,
        default=8,
        help="at most this many layers kept in float by --max-drop (default 8)",
    )
    e.add_argument(
        "--min-sqnr",
        type=float,
        dest="min_sqnr_db",
        help="SQNR budget in dB (default: the --target's): "
        "mixed models keep the cheapest op groups float to meet it; full-integer ones exit 3 when under",
    )
    e.add_argument(
        "--min-speedup",
        type=float,
        help="speed floor of mixed models: the budget search keeps nothing "
        "float that makes the model slower than this many times float32's speed at 1 thread on "
        "XNNPACK (default 1.3; 0: no floor)",
    )
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    _add_device_options(p, adb=False, emulate=False, purpose="time the speed decisions on the --target's device")
    _add_common(p)
    p.set_defaults(func=_cmd_quantize)


def _cmd_quantize(args: argparse.Namespace, progress: Callable[..., None]) -> tuple[int, dict[str, Any]]:
    from edgeship.convert import ConvertOptions  # deferred: CLI start-up
    from edgeship.convert.converter import output_names as convert_outputs  # deferred: CLI start-up
    from edgeship.quantize import QuantizeOptions, quantize  # deferred: CLI start-up
    from edgeship.quantize.pipeline import output_names  # deferred: CLI start-up
    from edgeship.quantize.source import conversion_for  # deferred: CLI start-up

    given = dict(
        num_calib=args.num_calib,
        seed=args.seed,
        method=args.method,
        percentile=args.percentile,
        io=args.io,
        per_tensor=args.per_tensor or None,
        float_islands=False if args.full_integer else None,
        float_logits=False if args.int8_logits else None,
        bias_correction=args.bias_correction,
        equalize=args.equalize,
        max_eval=args.max_eval,
        max_drop=args.max_drop,
        max_float_layers=args.max_float_layers,
        min_sqnr_db=args.min_sqnr_db,
        min_speedup=args.min_speedup,
    )
    timing = _speed_timing(args, progress)
    if args.target:
        from edgeship.targets import load_target  # deferred: CLI start-up

        options = QuantizeOptions.for_target(load_target(args.target), on_device=timing.probe is not None, **given)
    else:
        options = QuantizeOptions(**{k: v for k, v in given.items() if v is not None})
    model = conversion_for(args.model, args.out, force=args.force)
    new_files = output_names() + (
        convert_outputs(ConvertOptions()) if isinstance(model, Path) and model.is_file() else []
    )
    check_apart(args.out, {"--calib": args.calib, "--eval": args.eval_dir})
    check_outputs_free(args.out, new_files, force=args.force, reads=_inputs(args))  # before minutes of work
    result = quantize(model, args.calib, evaluation=args.eval_dir, options=options, progress=progress, timing=timing)
    result = result.save_with_source(args.out, force=args.force)
    payload: dict[str, Any] = {
        "summary": _quant_summary(result.report)
        + _speed_note(args.target, result.report)
        + _input_contract(result.card),
        "result": {"out_dir": str(result.folder), "report": result.report.to_dict()},
    }
    try:
        result.raise_for_budget()
    except EdgeshipError as exc:
        payload["result"]["error"] = {"type": type(exc).__name__, "message": exc.cli_message()}
        return exc.exit_code, {**payload, "error": exc.cli_message()}
    return 0, payload


def _speed_note(target_name: str | None, report: QuantizeReport) -> list[str]:
    from edgeship.targets import load_target  # deferred: CLI start-up

    target = load_target(target_name) if target_name else None
    return [f"  {line}" for line in _arch_note(target, report.speed_timing)]


def _speed_timing(args: argparse.Namespace, progress: Callable[..., None]) -> Any:
    """Where quantize times its speed decisions: the --target's ssh device with --host, else this machine."""
    from edgeship.deploy import speed_timing  # deferred: CLI start-up
    from edgeship.quantize.speed import SpeedTiming  # deferred: CLI start-up

    if args.adb or args.emulate:
        raise InputError("quantize times its speed decisions on a device over ssh (--host); not over adb or emulated")
    if not args.host:
        return SpeedTiming()
    if not args.target:
        raise InputError("--host needs --target (which runtime to install on the device, and its architecture)")
    from edgeship.targets import load_target  # deferred: CLI start-up

    target = load_target(args.target)
    if target.access.value != "ssh":
        raise InputError(f"--host: {target.name} is not reached over ssh (its access is {target.access.value})")
    return speed_timing(_device_spec(args), target, progress)


def _noise_line(check: dict[str, Any]) -> str:
    """``top1_agreement_pct 96.8, 95 % interval [93.8, 98.4] holds the limit 95.0`` for a deploy summary."""
    lo, hi = check.get("interval") or (None, None)
    interval = f", 95 % interval [{lo:.1f}, {hi:.1f}]" if lo is not None else ""
    return f"{check['metric']} {check['value']:.1f}{interval} holds the limit {check['limit']:.1f}"


def _arch_note(target: Any | None, timed: TimedOn | None) -> list[str]:
    """Where the speed floor and kernel placement were timed (``speed_timing`` of a quantize report): the
    target's device, or this machine, said when the target is another architecture or its device is emulated."""
    from edgeship.quantize.options import host_arch  # deferred: CLI start-up

    if timed is not None and timed.where != "this machine":
        return [
            f"speed floor and kernel placement: timed on {timed.where} ({timed.machine}, Python "
            f"{timed.python}, {timed.interpreter} {timed.interpreter_version})"
        ]
    lines = [timed.note] if timed is not None and timed.note else []
    if target is None or target.arch.value == host_arch():
        return lines
    return lines + [
        f"speed floor and kernel placement: measured on this machine ({host_arch()}) only, not on "
        f"{target.name} ({target.arch.value}): placement skipped, speed figures are {host_arch()}'s; "
        "measure on the device with --host"
    ]


def _ci(interval: tuple[float, float] | None) -> str:
    """A 95 % interval in percent or points, e.g. ``97.1..99.0``."""
    return "-" if interval is None else f"{interval[0]:g}..{interval[1]:g}"


def _quant_summary(report: QuantizeReport) -> list[str]:
    f, s, acc = report.figures, report.sizes, report.accuracy
    lines = [
        f"wrote {report.output} ({s.int8 / 1e6:.2f} MB, {s.ratio:.1f}x smaller than float32) "
        f"in {report.timings_s['total']:.1f} s",
        f"  calibrated on {report.calibration.count} images ({report.options.method.value}), "
        f"evaluated on {report.evaluation.count} others",
    ]
    if acc.labelled:
        lines.append(
            f"  top-1 against labels ({acc.labelled} images): float {100 * (acc.float_top1 or 0):.2f}% -> "
            f"int8 {100 * (acc.int8_top1 or 0):.2f}% (drop {acc.top1_drop_points or 0:+.2f} points, "
            f"95% CI {_ci(f.top1_drop_interval)})  "
            f"top-5 {100 * (acc.float_top5 or 0):.1f}% -> {100 * (acc.int8_top5 or 0):.1f}%"
        )
    lines.append(
        f"  top-1 agreement with float {100 * f.top1_agreement:.2f}% (95% CI {_ci(f.agreement_interval)})  "
        f"mean cosine {f.mean_cosine:.4f}  "
        f"min cosine {f.min_cosine:.4f}  SQNR {f.sqnr_db:.1f} dB"
    )
    worst = report.worst_layers[:3]
    if worst:
        lines.append(
            "  worst layers: " + "; ".join(f"{w.op} {w.name.split(';')[0][-40:]} {w.sqnr_db:.1f} dB" for w in worst)
        )
    lines.append("  " + _xnnpack_line(report.runs_on))
    return lines + _placement_lines(report.placement) + _speed_lines(report) + _mixed_lines(report.mixed_precision)


def _placement_lines(placed: Placement) -> list[str]:
    if not placed.candidates or placed.ms is None:
        return []
    ms = placed.ms
    return [
        f"  placement: {placed.candidates} large depthwise conv(s) "
        f"{'kept float' if placed.kept_float else 'left int8'} (1 thread: all-int8 {ms['int8']:.2f} ms, "
        f"with them float {ms['placed']:.2f} ms)"
    ]


def _speed_lines(report: QuantizeReport) -> list[str]:
    speed = report.speed
    if not speed.measured:
        return []
    ms = speed.ms
    lines = [
        f"  1 thread, XNNPACK: float32 {ms['float32']:.2f} ms, {report.output} {ms['int8']:.2f} ms "
        f"({speed.speedup_vs_float32 or 0:.2f}x)"
    ]
    return lines + ([f"  NOT FAST ENOUGH: {speed.verdict}"] if speed.verdict else [])


def _mixed_lines(mixed: MixedPrecision | None) -> list[str]:
    if mixed is None or not mixed.kept_float:
        return []
    lat = mixed.latency_ms_1_thread or {}
    return [
        f"  SQNR budget {mixed.budget_sqnr_db} dB: kept float "
        + ", ".join(f"{k.name} ({len(k.nodes)})" for k in mixed.kept_float)
        + f"; SQNR {mixed.eval_sqnr_db_all_int8 or 0:.1f} -> {mixed.eval_sqnr_db or 0:.1f} dB; 1-thread ms "
        + ", ".join(f"{k} {v:.2f}" for k, v in lat.items())
    ]


def _xnnpack_line(runs: RunsOn) -> str:
    from edgeship.runtime.delegation import op_counts  # deferred: CLI start-up

    d = runs.delegation
    outside = op_counts(d.outside) or "none"
    line = f"XNNPACK: {d.partitions} partition(s); ops outside: {outside}"
    if runs.float_islands:
        all_int8 = runs.all_int8_delegation.partitions if runs.all_int8_delegation else "?"
        line += (
            f"; {len(runs.float_islands)} op(s) kept float inside XNNPACK (no int8 kernel; all-int8 had "
            f"{all_int8} partitions)"
        )
    if runs.float_logits:
        line += "; scores float (the last layer reads int8 and writes float32: --int8-logits for the int8 grid)"
    return line


# ---------------------------------------------------------------- verify
def _add_device_options(
    p: argparse.ArgumentParser, *, adb: bool = True, emulate: bool = True, purpose: str = "run on a device"
) -> None:
    g = p.add_argument_group("device (default: run on this machine)")
    where = g.add_mutually_exclusive_group()
    where.add_argument(
        "--host",
        action="append",
        metavar="[TARGET=]USER@HOST[:PORT]",
        help=f"{purpose} over ssh; repeat as TARGET=user@host[:port] for a device per target "
        "(edgeship emulate start TARGET gives an emulated Pi)",
    )
    # Where --adb cannot work (drift checks need Python on the device) it stays out of --help
    # but is still parsed, so that using it gets the explanation rather than "unrecognized".
    where.add_argument(
        "--adb", metavar="SERIAL", help="run on an Android device over adb" if adb else argparse.SUPPRESS
    )
    where.add_argument(
        "--emulate",
        action="store_true",
        help="run under qemu-aarch64 emulation (aarch64 targets)" if emulate else argparse.SUPPRESS,
    )
    g.add_argument("--identity", type=Path, help="ssh private key")
    g.add_argument("--known-hosts", type=Path, help="ssh known_hosts file")
    g.add_argument("--accept-new-host-key", action="store_true", help="trust a first-time ssh host key")
    g.add_argument("--remote-python", default="python3", help="Python on the ssh device (default python3)")
    g.add_argument(
        "--pip-args", default="", help="extra pip options for the device's venv, e.g. '--no-index --find-links /wheels'"
    )


def _device_spec(args: argparse.Namespace) -> Any:
    """Where the command runs, as a :class:`~edgeship.targets.devices.DeviceSpec` (None: this machine)."""
    from edgeship.targets.devices import DeviceSpec  # deferred: CLI start-up

    if getattr(args, "emulate", False):
        return DeviceSpec("emulate")
    if getattr(args, "host", None):
        from edgeship.targets.devices import parse_hosts  # deferred: CLI start-up

        host, hosts = parse_hosts(args.host)
        hosts = _host_targets(hosts, [args.target] if isinstance(args.target, str) else list(args.target or []))
        return DeviceSpec(
            "ssh",
            host=host,
            hosts=hosts,
            identity=args.identity,
            known_hosts=args.known_hosts,
            accept_new_host_key=args.accept_new_host_key,
            python=args.remote_python,
            pip_args=tuple(shlex.split(args.pip_args)),
        )
    if getattr(args, "adb", None):
        return DeviceSpec("adb", host=args.adb)
    return None


def _host_targets(hosts: tuple[tuple[str, str], ...], targets: list[str]) -> tuple[tuple[str, str], ...]:
    """Every ``--host TARGET=...`` names a target of this command, as given (a built-in name or a profile file's
    path) or by its profile's name; returned keyed by the profile's name, which is how devices are looked up."""
    if not hosts:
        return hosts
    from edgeship.targets import load_target  # deferred: CLI start-up

    names = {given: load_target(given).name for given in targets}
    unknown = [t for t, _ in hosts if t not in names and t not in names.values()]
    if unknown:
        raise InputError(
            f"--host names {', '.join(unknown)}, which is not a --target of this command "
            f"({', '.join(targets) or 'none'})"
        )
    return tuple((names.get(t, t), host) for t, host in hosts)


def _add_verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify",
        help="accuracy-drift check of a deployed model against its float reference",
        description="Run CANDIDATE with TARGET's threads, delegate and I/O dtype (on the device "
        "with --host/--emulate) and REFERENCE with onnxruntime; compare with the target's budget. "
        "Exit 3 when over budget.",
    )
    p.add_argument("reference", type=Path, help="source float ONNX model")
    p.add_argument("candidate", type=Path, help=".tflite (card beside it) or bundle folder")
    p.add_argument("--images", type=Path, required=True, help="folder of real images")
    p.add_argument("--target", action=_Once, required=True, help="target name or .toml profile")
    p.add_argument("--max-images", type=int, help="use at most this many images")
    p.add_argument(
        "-r", "--report", type=Path, default=Path("drift_report.json"), help="report path (default ./drift_report.json)"
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing report")
    _add_device_options(p, adb=False)
    _add_common(p)
    p.set_defaults(func=_cmd_verify)


def _cmd_verify(args: argparse.Namespace, progress: Callable[..., None]) -> tuple[int, dict[str, Any]]:
    from edgeship.targets import load_target  # deferred: CLI start-up
    from edgeship.targets.mediapipe_check import summary_line  # deferred: CLI start-up
    from edgeship.verify import drift  # deferred: CLI start-up

    target = load_target(args.target)
    _check_report_path(args, args.report, "-r")
    result = drift.verify(
        args.reference,
        args.candidate,
        args.images,
        target=target,
        device=_device_spec(args),
        max_images=args.max_images,
        progress=progress,
    )
    doc = result.to_dict()
    atomic_write_json(args.report, doc)
    f = result.figures
    lines = [
        f"{target.name}: top-1 agreement {100 * f.top1_agreement:.2f}%  mean cosine {f.mean_cosine:.4f}  "
        f"SQNR {f.sqnr_db:.1f} dB  on {f.count} images  ->  {result.report.verdict}"
    ]
    lines += [
        f"  {c.metric}: {c.value if c.value is None else round(c.value, 3)}"
        f"{f' (95% CI {c.interval[0]:g}..{c.interval[1]:g})' if c.interval else ''} (limit {c.limit}) "
        f"{'ok' if c.passed else 'OVER BUDGET'}{f' ({c.note})' if c.note else ''}"
        for c in result.checks
    ]
    if result.client_check:
        lines.append(f"  {summary_line(result.client_check)}")
    lines += [f"  note: {n}" for n in result.report.notes]
    lines.append(f"  report: {args.report}")
    try:
        result.raise_for_budget()
    except EdgeshipError as exc:
        return exc.exit_code, {"summary": lines, "result": doc, "error": str(exc)}
    return 0, {"summary": lines, "result": doc}


def _check_report_path(args: argparse.Namespace, path: Path, flag: str) -> None:
    """Before running: the report file can be written where asked, under the one overwrite rule."""

    json_file = args.json if args.json is not None and str(args.json) != "-" else None
    check_output_file(path, flag, force=args.force, reads=_inputs(args), writes=[json_file])


def _inputs(args: argparse.Namespace) -> list[Path]:
    """Every file and folder the command reads, implicit ones included (:func:`edgeship._inputs.command_inputs`)."""
    from edgeship._inputs import command_inputs  # deferred: CLI start-up

    return command_inputs(vars(args), getattr(args, "out", None))


def _written_folder(args: argparse.Namespace) -> tuple[Path, str] | None:
    """The folder a command writes (locked while it runs), and what messages call it."""
    if args.command in ("convert", "quantize", "bundle", "deploy", "demo"):
        return args.out, "output folder"
    if args.command == "verify":
        return args.report.parent, "report folder"
    if args.command == "bench":
        return args.out.parent, "bench.json folder"
    return None


# ---------------------------------------------------------------- bench
def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="latency, memory and size of models, locally or on a device",
        description="Benchmark several models interleaved (TFLite through the runtime, ONNX "
        "through onnxruntime as a baseline): init, first run, p50/p90/p99, peak RSS.",
    )
    p.add_argument("models", nargs="+", type=Path, help=".tflite or .onnx models (ratios are to the first)")
    p.add_argument("--target", action=_Once, help="target profile: threads and delegate from it")
    p.add_argument("-o", "--out", type=Path, default=Path("bench.json"), help="bench.json path")
    p.add_argument("--force", action="store_true", help="overwrite an existing bench.json")
    g = p.add_argument_group("measurement")
    g.add_argument("--threads", type=_thread_counts, help="thread counts, e.g. 1,2,4 (default: the target's, else 1)")
    g.add_argument("--runs", type=int, default=100, help="timed runs per model and thread count")
    g.add_argument("--warmup", type=int, default=10, help="untimed runs first")
    g.add_argument("--duration", type=_seconds, help="measure for this many seconds instead of --runs")
    g.add_argument(
        "--image",
        type=Path,
        action="append",
        default=[],
        metavar="PATH",
        help="image file or folder: also time Classifier.predict end to end, decode and preprocess "
        "shown separately (repeatable)",
    )
    g.add_argument("--e2e-runs", type=int, help="end-to-end rounds per model and thread count (default: --runs)")
    g.add_argument("--benchmark-binary", type=Path, help="TensorFlow Lite benchmark_model for --adb")
    _add_device_options(p, emulate=False)  # accepted, refused with a reason: emulated timings are no speed
    _add_common(p)
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace, progress: Callable[..., None]) -> tuple[int, dict[str, Any]]:
    from edgeship.runtime.bench import BenchOptions, benchmark, image_files, table  # deferred: CLI start-up

    target = None
    if args.target:
        from edgeship.targets import load_target  # deferred: CLI start-up

        target = load_target(args.target)
    _check_report_path(args, args.out, "-o")
    for m in args.models:
        if not m.is_file():
            raise InputError(f"model {m} does not exist")
    threads = args.threads or ((target.execution.threads,) if target else (1,))
    use_xnnpack = target is None or target.execution.use_xnnpack
    if args.image and args.adb:
        raise InputError(
            "--image needs Python on the device (end to end runs Classifier.predict); --adb runs "
            "benchmark_model, invoke() only: use --host for a Pi"
        )
    if args.adb:
        from edgeship.targets.adb import adb_benchmark  # deferred: CLI start-up

        if args.duration:
            raise InputError("--duration is not supported with --adb; use --runs (benchmark_model --num_runs)")
        doc = adb_benchmark(
            args.adb, args.benchmark_binary, target, args.models, threads=threads, runs=args.runs, warmup=args.warmup
        )
    elif args.host:
        if target is None:
            raise InputError("--host needs --target (which runtime package to install on the device)")
        from edgeship.targets.devices import ssh_device  # deferred: CLI start-up
        from edgeship.targets.remote import ssh_benchmark  # deferred: CLI start-up

        bench_args = ["--threads", ",".join(map(str, threads)), "--runs", str(args.runs), "--warmup", str(args.warmup)]
        bench_args += ["--duration", str(args.duration)] if args.duration else []
        bench_args += [] if use_xnnpack else ["--no-xnnpack"]
        bench_args += ["--e2e-runs", str(args.e2e_runs)] if args.e2e_runs else []
        # The images go to the device too: the same runtime code times them there.
        extra = {"images": [Path(f) for f in image_files(args.image)]} if args.image else {}
        spec = _device_spec(args)
        doc = ssh_benchmark(
            ssh_device(spec, target.name),
            target,
            args.models,
            bench_args,
            pip_args=spec.pip_args,
            progress=progress,
            **extra,
        )
    else:
        if args.emulate:
            raise InputError("--emulate is for drift checks; emulated timings say nothing about a device")
        options = BenchOptions(
            threads=tuple(threads),
            runs=args.runs,
            warmup=args.warmup,
            duration_s=args.duration,
            use_xnnpack=use_xnnpack,
            images=tuple(str(i) for i in args.image),
            e2e_runs=args.e2e_runs,
        )
        doc = benchmark(args.models, options, progress=progress)
    doc = replace(doc, target=target.name if target else None)
    atomic_write_json(args.out, doc.to_dict())
    return 0, {"summary": table(doc) + [f"wrote {args.out}"], "result": doc.to_dict()}


# ---------------------------------------------------------------- bundle
def _add_bundle(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bundle", help="model + card + labels + pinned requirements + README for one target")
    p.add_argument("model", type=Path, help=".tflite model (its card beside it)")
    p.add_argument("--target", action=_Once, required=True, help="target name or .toml profile")
    p.add_argument("-o", "--out", type=Path, required=True, help="bundle folder")
    p.add_argument("--force", action="store_true", help="overwrite an existing bundle")
    _add_common(p)
    p.set_defaults(func=_cmd_bundle)


def _cmd_bundle(args: argparse.Namespace, progress: Callable[..., None]) -> tuple[int, dict[str, Any]]:
    from edgeship.targets import load_target  # deferred: CLI start-up
    from edgeship.targets.bundle import bundle  # deferred: CLI start-up

    result = bundle(args.model, load_target(args.target), args.out, force=args.force)
    return 0, {
        "summary": [f"wrote bundle for {result.target} in {result.out_dir}: {', '.join(result.files)}"],
        "result": {"out_dir": str(result.out_dir), "files": list(result.files), "target": result.target},
    }


# ---------------------------------------------------------------- deploy
def _add_deploy(sub: argparse._SubParsersAction) -> None:
    from edgeship.quantize.options import CalibrationMethod  # deferred: CLI start-up

    p = sub.add_parser(
        "deploy",
        help="convert -> quantize -> verify -> bench -> bundle -> report, per target",
        description="One command from an ONNX model and a folder of images to a verified, "
        "benchmarked bundle per target and a report. Stages are cached in OUT_DIR.",
    )
    p.add_argument("model", help="ONNX model path, or the zoo name 'mobilenetv2-7' (cached, or downloaded and checked)")
    p.add_argument("--calib", type=Path, required=True, help="folder of calibration images")
    p.add_argument("--target", action="append", required=True, help="target name or .toml (repeat for several)")
    p.add_argument("-o", "--out", type=Path, required=True, help="output folder (re-runs reuse unchanged stages)")
    p.add_argument("--labels", type=Path, help="labels file (wnid<TAB>names or one per line)")
    g = p.add_argument_group("quantization and evaluation")
    g.add_argument("--num-calib", type=int, default=200, help="calibration images (the rest are evaluated)")
    g.add_argument(
        "--seed",
        type=int,
        help="random calibration choice (default: spread over the data, round-robin over classes if labels are known)",
    )
    g.add_argument(
        "--method",
        choices=[m.value for m in CalibrationMethod],
        help="activation range method (default auto, as for quantize)",
    )
    g.add_argument("--eval", type=Path, dest="eval_dir", help="evaluation images (default: held-out split)")
    g.add_argument("--max-eval", type=int, help="evaluate on at most this many images")
    b = p.add_argument_group("benchmark")
    b.add_argument("--bench-threads", type=_thread_counts, default=(1, 2), help="thread counts (default 1,2)")
    b.add_argument("--bench-runs", type=int, default=100)
    p.add_argument(
        "--force",
        action="store_true",
        help="write beside the files of a non-empty folder that is not a "
        "deploy folder (deploy never removes or replaces files it did not write)",
    )
    _add_device_options(p, adb=False)
    _add_common(p)
    p.set_defaults(func=_cmd_deploy)


def _cmd_deploy(args: argparse.Namespace, progress: Callable[..., None]) -> tuple[int, dict[str, Any]]:
    from edgeship.deploy import DeployOptions, deploy  # deferred: CLI start-up
    from edgeship.targets.devices import NO_ADB_DRIFT_CHECKS  # deferred: CLI start-up

    device = _device_spec(args)
    if device is not None and device.kind == "adb":
        raise InputError(NO_ADB_DRIFT_CHECKS)
    from edgeship.quantize import QuantizeOptions  # deferred: CLI start-up

    given = dict(num_calib=args.num_calib, seed=args.seed, method=args.method, max_eval=args.max_eval)
    options = DeployOptions(
        targets=tuple(args.target),
        quantize=QuantizeOptions(**{k: v for k, v in given.items() if v is not None}),
        eval_dir=args.eval_dir,
        labels=args.labels,
        bench_threads=tuple(args.bench_threads),
        bench_runs=args.bench_runs,
        device=device,
        force=args.force,
    )
    result = deploy(args.model, args.calib, args.out, options, progress=progress)
    from edgeship.quantize.search_report import TimedOn  # deferred: CLI start-up
    from edgeship.targets import load_target  # deferred: CLI start-up

    targets = {t.name: t for t in map(load_target, args.target)}
    width = max([40] + [len(r.name) + 2 for r in result.stages])
    lines = [f"{'stage':<{width}}{'reused':<8}seconds"]
    lines += [f"{r.name:<{width}}{'yes' if r.reused else 'no':<8}{r.seconds:.1f}" for r in result.stages]
    for name, t in result.targets.items():
        f = t["figures"]
        lines.append(
            f"{name:<20} {'PASS' if t['passed'] else 'FAIL':<5} agreement {100 * f['top1_agreement']:.2f}%  "
            f"cos {f['mean_cosine']:.4f}  SQNR {f['sqnr_db']:.1f} dB  bundle {t['bundle']}"
        )
        noisy = [c for c in t.get("budget", []) if c.get("within_noise")]
        lines += [f"{'':<20} within noise of its budget: {_noise_line(c)}" for c in noisy]
        lines.append(f"{'':<20} ran on {t.get('ran_on', '?')}")
        if "speed_timing" in t:
            timed = TimedOn.from_dict(t["speed_timing"]) if t["speed_timing"] else None
            lines += [f"{'':<20} {line}" for line in _arch_note(targets.get(name), timed)]
    from edgeship.report import device_speeds  # deferred: CLI start-up
    from edgeship.targets.remote import device_speed_lines  # deferred: CLI start-up

    lines += device_speed_lines(device_speeds(result.summary))
    lines.append(f"report: {result.out_dir / 'report.html'}  (wall {result.summary['wall_s']:.1f} s)")
    code = 0 if result.passed else 3
    payload: dict[str, Any] = {"summary": lines, "result": result.summary}
    if not result.passed:
        failing = [n for n, t in result.targets.items() if not t["passed"]]
        payload["error"] = f"over the drift budget: {', '.join(failing)} (report written)"
    return code, payload


# ---------------------------------------------------------------- demo
def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the main job with nothing but edgeship: MobileNetV2 and sample photos fetched, then deployed",
        description="Fetch (once, size and sha256 checked, cached) the ONNX model zoo's MobileNetV2 and "
        "300 labelled ImageNet sample photos (ImageNet terms: research and education only), then run "
        "`edgeship deploy` on them to x86-host, rpi4-aarch64 and android-arm64-cpu (100 calibration "
        "images, the rest evaluated). Offline, point it at local copies.",
    )
    p.add_argument("-o", "--out", type=Path, required=True, help="output folder (as for deploy)")
    p.add_argument("--model", default="mobilenetv2-7", help="ONNX model or zoo name (default mobilenetv2-7)")
    p.add_argument("--images", type=Path, help="a local folder of labelled photos instead of the download")
    p.add_argument("--force", action="store_true", help="as for deploy")
    _add_common(p)
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace, progress: Callable[..., None]) -> tuple[int, dict[str, Any]]:
    from edgeship import demo  # deferred: CLI start-up

    inputs = demo.demo_inputs(args.model, args.images, progress=progress)
    argv = ["deploy", str(inputs.model), "--calib", str(inputs.images), "--labels", str(inputs.labels)]
    argv += ["--num-calib", str(demo.DEMO_NUM_CALIB), "-o", str(args.out), *(["--force"] if args.force else [])]
    argv += [flag for t in demo.DEMO_TARGETS for flag in ("--target", t)]
    code, payload = _cmd_deploy(build_parser().parse_args(argv), progress)
    head = [f"demo inputs: {inputs.model}; {inputs.source}", "the same as: edgeship " + shlex.join(argv)]
    return code, {**payload, "summary": head + payload.get("summary", [])}


# ---------------------------------------------------------------- matrix
def _add_matrix(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "matrix",
        help="models x targets on a bench of devices, scheduled by Ray",
        description="Convert and quantize each model once (deploy's stages and cache), drift-check and benchmark "
        "it per target on that target's devices (Ray tasks holding device:NAME), and write one report "
        "(matrix.json, report.md, report.html). Needs pip install 'edgeship[cluster]'.",
    )
    p.add_argument("matrix", type=Path, help="the matrix file (TOML: models, images, targets, devices)")
    p.add_argument("-o", "--out", type=Path, required=True, help="output folder (a rerun redoes only what is missing)")
    p.add_argument("--ray-address", help="join this Ray cluster (default: start Ray on this machine)")
    _add_common(p)
    p.set_defaults(func=_cmd_matrix, force=False)


def _cmd_matrix(args: argparse.Namespace, progress: Callable[..., None]) -> tuple[int, dict[str, Any]]:
    from edgeship.matrix import run_matrix  # deferred: CLI start-up

    result = run_matrix(args.matrix, args.out, ray_address=args.ray_address, progress=progress)
    from edgeship.matrix_report import cell_text  # deferred: CLI start-up

    lines = [f"{c['model']} x {c['target']}: " + cell_text(c) for c in result.cells]
    lost = [f"device {n} lost: {d['reason']}" for n, d in result.devices.items() if d["status"] == "lost"]
    lines += lost + [f"report: {result.out_dir / 'report.html'}  (wall {result.wall_s:.1f} s)"]
    payload: dict[str, Any] = {"summary": lines, "result": {"cells": result.cells, "devices": result.devices}}
    not_run = [c for c in result.cells if c["status"] not in ("done", "reused")]
    if not_run:
        payload["error"] = f"{len(not_run)} cell(s) not run (report written; a rerun redoes only them)"
        return 1, payload
    if not result.passed:
        payload["error"] = "over the drift budget: " + ", ".join(
            f"{c['model']} x {c['target']}" for c in result.cells if not c["passed"]
        )
    return (0 if result.passed else 3), payload


# ---------------------------------------------------------------- targets
def _add_targets(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("targets", help="list or show target profiles")
    tsub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = tsub.add_parser("list", help="built-in targets, one line each")
    show = tsub.add_parser("show", help="one target's profile")
    show.add_argument("name", help="target name or path to a .toml profile")
    for q in (listing, show):
        q.add_argument("--force", action="store_true", help="overwrite an existing --json file")
        _add_common(q)
    p.set_defaults(func=_cmd_targets)


def _cmd_targets(args: argparse.Namespace, progress: Callable[..., None]) -> tuple[int, dict[str, Any]]:
    from edgeship.targets import list_targets, load_target  # deferred: CLI start-up

    if args.action == "list":
        targets = [load_target(n) for n in list_targets()]
        w = max([20] + [len(t.name) + 2 for t in targets])  # android-nnapi-pertensor is 23 characters
        lines = [f"{'name':<{w}}{'arch':<9}{'model':<9}{'I/O':<9}{'delegate':<9}{'access':<7}description"]
        lines += [
            f"{t.name:<{w}}{t.arch.value:<9}{t.model.precision.value:<9}{t.model.io_dtype.value:<9}"
            f"{t.execution.delegate.value:<9}{t.access.value:<7}{t.description}"
            for t in targets
        ]
        return 0, {"summary": lines, "result": {"targets": [t.to_dict() for t in targets]}}
    t = load_target(args.name)
    d = t.to_dict()
    lines = [f"{t.name}: {t.description}", f"  source: {t.source}", f"  arch: {t.arch.value}  access: {t.access.value}"]
    for section in ("runtime", "model", "execution", "budget"):
        lines.append(f"  [{section}] " + "  ".join(f"{k}={v}" for k, v in d[section].items()))
    lines += [f"  [release {r.name}] {r.describe(t.runtime)}" for r in t.releases]
    return 0, {"summary": lines, "result": {"target": d}}


# ---------------------------------------------------------------- emulate
def _add_emulate(sub: argparse._SubParsersAction) -> None:
    from edgeship.targets.emulated_pi import DEFAULT_RELEASE, PROFILES, RELEASES  # deferred: CLI start-up

    p = sub.add_parser(
        "emulate",
        help="start or stop an emulated Raspberry Pi reachable over ssh (needs root)",
        description="A Debian root of the Pi's OS release (bookworm or trixie; arm64 or armhf, built once "
        "with mmdebstrap and cached) running its own sshd under qemu-user on 127.0.0.1, to try the Pi "
        "path with --host before owning a Pi. Its timings are an emulator's, not a Pi's.",
    )
    esub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    start = esub.add_parser("start", help="build (once) and start one; prints the --host to use")
    start.add_argument("name", choices=sorted(PROFILES), help="the target it stands in for")
    start.add_argument(
        "--release",
        choices=list(RELEASES),
        default=DEFAULT_RELEASE,
        help=f"Raspberry Pi OS release it runs (Debian root; default {DEFAULT_RELEASE}, Python "
        f"{RELEASES[DEFAULT_RELEASE]}: what a Pi flashed today runs)",
    )
    start.add_argument("--port", type=int, help="sshd port on 127.0.0.1 (default: a free one)")
    start.add_argument(
        "--ca-bundle",
        type=Path,
        help="CA bundle the device's pip trusts, for networks that re-sign "
        "TLS (e.g. /etc/ssl/certs/ca-certificates.crt); default: pip's own",
    )
    stop = esub.add_parser("stop", help="stop one (default: every running one) and unmount its root")
    stop.add_argument("name", nargs="?", choices=sorted(PROFILES))
    status = esub.add_parser("status", help="the running ones")
    for q in (start, stop, status):
        _add_common(q)
    p.set_defaults(func=_cmd_emulate)


def _cmd_emulate(args: argparse.Namespace, progress: Callable[..., None]) -> tuple[int, dict[str, Any]]:
    from edgeship.targets import emulated_pi  # deferred: CLI start-up

    if args.action == "start":
        pi = emulated_pi.start(args.name, args.release, port=args.port, ca_bundle=args.ca_bundle, progress=progress)
        return 0, {"summary": _emulated_lines([pi]), "result": pi.to_dict()}
    if args.action == "stop":
        stopped = emulated_pi.stop(args.name)
        return 0, {
            "summary": [f"stopped {', '.join(stopped) or 'nothing (none running)'}"],
            "result": {"stopped": stopped},
        }
    pis = emulated_pi.running()
    return 0, {
        "summary": _emulated_lines(pis) or ["no emulated Pi running"],
        "result": {"running": [p.to_dict() for p in pis]},
    }


def _emulated_lines(pis: Sequence[Any]) -> list[str]:
    lines = []
    for pi in pis:
        lines += [
            f"{pi.name}: {pi.host} ({pi.release} {pi.machine}, qemu-user {pi.qemu_cpu}; "
            "emulated: not the speed of a Pi)",
            f"  --host {pi.name}={pi.host} --identity {pi.identity} --known-hosts {pi.known_hosts}",
        ]
    return lines


# ---------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeship",
        description="ONNX image classifier -> fast, small, verified int8 TFLite for Android and Raspberry Pi.",
        epilog="exit codes: 0 ok, 1 error, 2 usage, 3 accuracy drift over budget, 4 model/target mismatch, "
        "5 target delegate not applied on the device, 70 internal error",
    )
    parser.add_argument("--version", action="version", version=f"edgeship {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    return parser


_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_convert,
    _add_quantize,
    _add_verify,
    _add_bench,
    _add_bundle,
    _add_deploy,
    _add_demo,
    _add_matrix,
    _add_targets,
    _add_emulate,
]


#: Exit code of an unexpected failure (a bug or a case edgeship did not foresee): distinct from every other.
INTERNAL_EXIT = 70


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``edgeship`` command; return its exit code.

    The outermost layer: no traceback reaches the user. An unexpected exception becomes one line
    naming a log file that holds the traceback, and exit code :data:`INTERNAL_EXIT`; a closed
    stdout (``| head``) ends the command quietly.
    """
    command = "?"
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        command = getattr(args, "command", None) or "?"
        return _main(parser, args)
    except BrokenPipeError:
        return _closed_stdout()
    except (RecursionError, MemoryError, Exception) as exc:  # noqa: BLE001 - the outermost layer, on purpose
        return _internal_error(command, exc)


def _main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_CODES["usage"]
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    json_problem = _undecodable_path(args) or _json_path_problem(args)
    if json_problem:
        _error_line(args.command, json_problem)
        return EXIT_CODES["usage"]
    progress = ConsoleProgress(enabled=not args.quiet)
    try:
        with signals_as_interrupt(), run_temp_dir(), _lock(args), reading(_inputs(args)):
            code, payload = args.func(args, progress)
    except (EdgeshipError, OSError) as exc:
        progress.close()
        if isinstance(exc, OSError):  # the file system refused something unforeseen: still one line
            exc = EdgeshipError(os_error_line(exc))
        _error_line(args.command, exc.cli_message())
        payload = {"error": {"type": type(exc).__name__, "message": exc.cli_message()}}
        return _write_json(args, payload, exc.exit_code)
    except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM, SIGHUP: temporary and staging folders are gone by now
        progress.close()
        signum = exc.signum if isinstance(exc, Terminated) else 2
        print(
            f"edgeship {args.command}: interrupted" + (f" ({exc})" if isinstance(exc, Terminated) else ""),
            file=sys.stderr,
        )
        return 128 + signum
    finally:
        progress.close()
    if args.json is None or str(args.json) != "-":
        for line in payload.get("summary", []):
            print(line)
    if payload.get("error"):
        _error_line(args.command, str(payload["error"]))
    return _write_json(args, payload.get("result", {}), code)


def one_line(text: str) -> str:
    """``text`` on one line: control characters (a newline in a path) shown escaped, never acted on."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


def _error_line(command: str, message: str) -> None:
    print(f"edgeship {command}: error: {one_line(message)}", file=sys.stderr)


def _closed_stdout() -> int:
    """The reader of stdout went away (``| head``): stop quietly, as other command-line tools do."""
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's final flush must not fail again
    return EXIT_CODES["error"]


def _internal_error(command: str, exc: BaseException) -> int:
    """One line, the traceback in a log file, exit :data:`INTERNAL_EXIT`."""
    import tempfile
    import traceback

    from edgeship._run import lasting_temp_dir  # deferred: only on failure

    where = "(no log: the temporary folder cannot be written)"
    with contextlib.suppress(OSError):
        fd, name = tempfile.mkstemp(prefix="edgeship-crash-", suffix=".log", dir=lasting_temp_dir())
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(f"edgeship {__version__} {command}\n")
            fh.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        where = f"details in {name}"
    text = one_line(f"{type(exc).__name__}: {exc}")[:300]
    with contextlib.suppress(OSError):
        print(
            f"edgeship {command}: internal error (exit {INTERNAL_EXIT}): {text}; {where}; please report it",
            file=sys.stderr,
        )
    return INTERNAL_EXIT


def _lock(args: argparse.Namespace) -> Any:
    """The write lock of the folder the command writes (nothing for commands that write none)."""

    written = _written_folder(args)
    return folder_lock(*written) if written else contextlib.nullcontext()


def _undecodable_path(args: argparse.Namespace) -> str | None:
    """The folder a command writes, named by bytes that are not UTF-8 (None: fine). onnxruntime and TensorFlow
    open files only by UTF-8 paths, so such a folder would fail minutes in, at the first model opened in it."""
    written = _written_folder(args)
    if written is None:
        return None
    folder, what = written
    if utf8_path(folder) is not None:
        return None
    why = "the native tools edgeship runs open files only by UTF-8 paths"
    return f"the {what} {ascii(str(folder))} is not named in UTF-8 ({why}): rename it"


def _json_path_problem(args: argparse.Namespace) -> str | None:
    """Why ``--json FILE`` cannot be written, found before anything runs (None: fine).

    The one overwrite rule: an existing file only with ``--force``, never a file the command reads.
    """
    path = getattr(args, "json", None)
    if path is None or str(path) == "-":
        return None

    other = {"verify": getattr(args, "report", None), "bench": getattr(args, "out", None)}.get(args.command)
    try:
        check_output_file(path, "--json", force=getattr(args, "force", False), reads=_inputs(args), writes=[other])
    except EdgeshipError as exc:
        return exc.cli_message()
    except OSError as exc:  # a name too long, a loop of links: the file system's one line
        return f"cannot write --json: {os_error_line(exc)}"
    return None


def _write_json(args: argparse.Namespace, payload: dict[str, Any], code: int) -> int:
    """Write the ``--json`` document (if asked); return the exit code (1 when it cannot be written)."""
    if not getattr(args, "json", None):
        return code
    doc = {"schema_version": SCHEMA_VERSION, "command": args.command, "exit_code": code, **payload}
    if str(args.json) == "-":
        print(json.dumps(doc, indent=2, default=str))
        return code
    problem = check_written(args.json)
    if problem:
        _error_line(args.command, f"cannot write --json {args.json}: {problem}")
        return code or EXIT_CODES["error"]

    try:
        atomic_write_json(args.json, doc)
    except OSError as exc:
        _error_line(args.command, f"cannot write --json {args.json}: {exc.strerror or exc}")
        return code or EXIT_CODES["error"]
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
