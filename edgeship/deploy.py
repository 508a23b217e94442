"""``deploy``: ONNX model + image folder -> verified, benchmarked bundle per target, and a report.

Stages (each cached under OUT_DIR by the hash of its inputs and options, so a re-run
with nothing changed reuses everything, and a changed calibration folder re-runs from
quantize on): convert -> quantize (one model per distinct precision/I/O need) -> verify
per target -> local benchmark -> bundle per target -> report.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgeship import zoo
from edgeship._cache_keys import code_fingerprint as code_fingerprint
from edgeship._cache_keys import image_set_digest
from edgeship._child import ChildWorker
from edgeship._files import reading
from edgeship._io import atomic_write_json, sha256_file
from edgeship._lock import folder_lock
from edgeship._ownership import ENTRIES as ENTRIES
from edgeship._ownership import MARKER as MARKER
from edgeship._ownership import SUMMARY, Ownership, check_out_dir
from edgeship._paths import check_apart
from edgeship._progress import Progress, silent
from edgeship._stages import StageRecord, Stages
from edgeship._version import __version__
from edgeship.convert import ConvertOptions, convert
from edgeship.convert.onnx_model import inspect_model, load_model, resolve_shape
from edgeship.convert.result import FLOAT16_FILE, SIMPLIFIED_FILE, ConvertResult
from edgeship.errors import InputError
from edgeship.quantize import quantize, tflite_quant
from edgeship.quantize.data import Split, split_images
from edgeship.quantize.interface import EXACT
from edgeship.quantize.onnx_qdq import QDQ_FILE, QDQ_REPORT_FILE, QdqOptions, quantize_qdq
from edgeship.quantize.options import QuantizeOptions
from edgeship.quantize.result import QuantizeResult
from edgeship.quantize.speed import SpeedTiming
from edgeship.report import ReportInputs, write_report
from edgeship.runtime.bench import BenchOptions, benchmark
from edgeship.runtime.bench_report import BENCH_FILE, BenchReport
from edgeship.runtime.card import IODtype, ModelCard, Preprocessing
from edgeship.runtime.classifier import find_card
from edgeship.runtime.images import Labels, cached_crops, list_images
from edgeship.runtime.metrics import DriftFigures
from edgeship.targets import load_target
from edgeship.targets.bundle import bundle
from edgeship.targets.devices import DeviceSpec, ssh_device
from edgeship.targets.install import verified_version
from edgeship.targets.profile import Access
from edgeship.targets.release_model import host_check, runs_onnx_qdq
from edgeship.targets.remote import device_bench, latency_probe, on_device
from edgeship.verify.drift import DriftResult, onnx_outputs, reference_outputs, verify
from edgeship.wheel import build_edgeship_wheel

log = logging.getLogger(__name__)

#: Memory for evaluation images decoded once per deploy (beyond it, images are decoded per check).
CROP_CACHE_BYTES = 512 * 2**20
_Stages = Stages  # the name tests and older code use
_Written = Ownership


@dataclass(frozen=True)
class DeployOptions:
    """Options of :func:`deploy` (the quantize options apply to every quantized model)."""

    targets: tuple[str, ...]
    #: Every quantized model's options, each fitted to its targets (:meth:`QuantizeOptions.fitted`).
    quantize: QuantizeOptions = field(default_factory=QuantizeOptions)
    eval_dir: Path | None = None
    labels: Path | None = None
    bench_threads: tuple[int, ...] = (1, 2)
    bench_runs: int = 100
    device: DeviceSpec | None = None  # where drift checks run (None: this machine)
    force: bool = False

    def __post_init__(self) -> None:
        if not self.targets:
            raise InputError("deploy needs at least one --target")


@dataclass(frozen=True)
class DeployedModel:
    """What a target deploys: the saved model file, and the quantize result when it is an int8 model."""

    path: Path
    variant: str
    card: ModelCard
    quantized: QuantizeResult | None = None  # None: a float model of the conversion, or the ONNX QDQ model
    #: The int8 ONNX QDQ model's own arithmetic against the float model on this machine (its host check).
    qdq_figures: DriftFigures | None = None


@dataclass
class DeployResult:
    out_dir: Path
    stages: list[StageRecord]
    targets: dict[str, dict[str, Any]]
    passed: bool
    summary: dict[str, Any] = field(repr=False, default_factory=dict)


def _check_names(targets: list[Any], given: tuple[str, ...]) -> None:
    """Refuse two targets with one name: the name is their folder (verify/NAME, bundles/NAME)."""
    seen: dict[str, str] = {}
    for target, source in zip(targets, given):
        if target.name in seen:
            raise InputError(
                f"two targets are named {target.name} ({seen[target.name]} and {source}); "
                "each target's results go to folders named after it: rename one"
            )
        seen[target.name] = source


def deploy(
    model: str, calibration: str | Path, out_dir: str | Path, options: DeployOptions, *, progress: Progress = silent
) -> DeployResult:
    """Run the whole pipeline for several targets; see the module docstring.

    The output folder is locked for the run (a second writer is refused), must not be
    inside the calibration or evaluation folder, and holds nothing of the user's where
    deploy writes (see :func:`edgeship._ownership.check_out_dir`). Its inputs are declared once
    (:func:`edgeship._files.reading`): no write of the run may replace one.
    """
    check_apart(out_dir, {"the calibration folder": calibration, "the evaluation folder": options.eval_dir})
    with folder_lock(out_dir), reading(_inputs(model, calibration, options)):
        return _deploy(model, calibration, out_dir, options, progress=progress)


def _inputs(model: str, calibration: str | Path, options: DeployOptions) -> list[Path]:
    """What a deploy reads: the model (unless a zoo name), the image folders, labels and profile files."""
    from edgeship._inputs import implicit_inputs

    given = [Path(model), Path(calibration), options.eval_dir, options.labels]
    given += [Path(t) for t in options.targets if Path(t).is_file()]
    return [p for g in given if g is not None and (g.exists() or g.is_symlink()) for p in implicit_inputs(g)]


def _deploy(
    model: str, calibration: str | Path, out_dir: str | Path, options: DeployOptions, *, progress: Progress = silent
) -> DeployResult:
    started = time.perf_counter()
    out = Path(out_dir)
    targets = [load_target(t) for t in options.targets]
    _check_names(targets, options.targets)
    model_path = zoo.resolve(model, progress=progress)
    if not model_path.is_file():
        raise InputError(f"model {model_path} does not exist")

    shape, _ = resolve_shape(inspect_model(load_model(model_path), str(model_path)), None)  # fails before OUT_DIR
    if options.labels is not None:
        Labels.load(options.labels)
    qopts = options.quantize
    calib_set, eval_set = split_images(
        Path(calibration), Split(qopts.num_calib, qopts.seed, max_eval=qopts.max_eval), options.eval_dir
    )
    folder_digest = image_set_digest(list_images(calibration, minimum=0, check=False))  # every file's bytes
    written = check_out_dir(out, options.force, _inputs(model, calibration, options))
    stages = Stages(out, progress, written)
    # The evaluation images are decoded once for the reference and every check; the wheel is built once.
    with cached_crops(CROP_CACHE_BYTES), tempfile.TemporaryDirectory(prefix="edgeship-wheel-") as wheel_dir:
        ships_wheel = any(t.access != Access.ADB for t in targets)
        early = _DuringConvert(
            model_path, eval_set, Preprocessing.imagenet(shape[2], shape[3]), _Wheel(Path(wheel_dir)), ships_wheel
        )
        with ChildWorker() as native:  # quantize's TensorFlow process, started while convert runs
            conv, conv_key = _convert_stage(stages, model_path, options, targets, native, early)
            models = _quantize_stages(
                stages, conv, conv_key, Path(calibration), folder_digest, options, targets, native
            )
        drifts, bundles = _verify_and_bundle(stages, model_path, models, eval_set, targets, options, progress, early)
    verify_results = {name: d.to_dict() for name, d in drifts.items()}
    bench_doc = _bench_stage(stages, model_path, conv, models, options, progress, eval_set)
    device_benches = _device_bench_stages(stages, conv, models, targets, options, progress)
    summary: dict[str, Any] = {
        "edgeship": __version__,
        "model": str(model_path),
        "calibration": {"folder": str(calibration), "count": len(calib_set)},
        "evaluation": {"count": len(eval_set), "held_apart": options.eval_dir is None},
        "stages": [asdict(r) for r in stages.records],
        "targets": {
            t.name: {
                "model": str(models[t.name].path),
                "model_sha256": sha256_file(models[t.name].path),  # the file the verdict below is for
                "bundle": str(bundles[t.name]),
                "passed": verify_results[t.name]["passed"],
                "figures": verify_results[t.name]["figures"],
                "ran_on": verify_results[t.name]["candidate"].get("ran_on", "?"),
                "budget": verify_results[t.name]["budget"],
                "client_check": verify_results[t.name].get("client_check"),
                **_host_check(models[t.name], t),
                **({"device_bench": device_benches[t.name]} if t.name in device_benches else {}),
                **(
                    {"speed_timing": q.report.speed_timing.to_dict() if q.report.speed_timing else None}
                    if (q := models[t.name].quantized)
                    else {}
                ),
            }
            for t in targets
        },
        "wall_s": round(time.perf_counter() - started, 2),
    }

    progress("report")
    labels = conv.label_names()
    write_report(
        out, ReportInputs(summary, bench_doc, drifts, list(labels.names) if labels else None, _layer_plots(models))
    )
    summary["wall_s"] = round(time.perf_counter() - started, 2)
    atomic_write_json(out / SUMMARY, summary)
    written.claim(out / "report", out / "report.md", out / "report.html", out / SUMMARY)
    passed = all(v["passed"] and v.get("host_check", {}).get("passed", True) for v in summary["targets"].values())
    return DeployResult(out, stages.records, summary["targets"], passed, summary)


def _convert_stage(
    stages: Stages,
    model: Path,
    options: DeployOptions,
    targets: list[Any],
    native: ChildWorker,
    early: _DuringConvert,
) -> tuple[ConvertResult, str]:
    """Convert (onnx2tf in its own process); when it is built, quantize's child starts TensorFlow and the
    float reference is computed meanwhile (both done before quantize times anything)."""

    fp16 = any(t.model.precision.value == "float16" for t in targets)
    pixels = any(t.runtime.client.reads_metadata for t in targets)  # per-channel normalisation goes in the graph
    labels = options.labels
    copts = ConvertOptions(fp16=fp16, labels=labels, pixels_in_graph=pixels)
    key = {
        "stage": "convert",
        "model_sha256": sha256_file(model),
        "options": copts.to_dict(),
        "labels_sha256": sha256_file(labels) if labels else None,
    }
    with ThreadPoolExecutor(3) as pool:
        if stages.will_build("convert", key):
            if any(t.model.precision.value == "int8" for t in targets):
                _start_tensorflow(native, pool)
            early.start(pool)
        folder, digest = stages.run(
            "convert", key, lambda d: convert(model, options=copts, progress=stages.progress).save(d, force=True)
        )
    return ConvertResult.load(folder), digest


class _DuringConvert:
    """Work done while onnx2tf runs (a second core is idle then): onnxruntime's outputs of the source model on
    the evaluation images, under the reference preprocessing deploy's conversion gives the card, and the
    edgeship wheel the bundles ship."""

    def __init__(self, model: Path, eval_set: Any, prep: Preprocessing, wheel: _Wheel, ships_wheel: bool) -> None:
        self.model, self.eval_set, self.prep = model, eval_set, prep
        self.wheel, self.ships_wheel = wheel, ships_wheel
        self.outputs: np.ndarray | None = None
        self.seconds = 0.0

    def start(self, pool: ThreadPoolExecutor) -> None:
        if self.eval_set is not None and len(self.eval_set.files):
            pool.submit(self._run)
        if self.ships_wheel:
            pool.submit(self.wheel.get)

    def _run(self) -> None:
        start = time.perf_counter()
        try:
            self.outputs = onnx_outputs(self.model, list(self.eval_set.files), self.prep)
        except Exception:  # the verify stage computes it again and reports the failure there
            log.debug("float reference during convert failed", exc_info=True)
        self.seconds = time.perf_counter() - start

    def get(self, card: ModelCard) -> np.ndarray | None:
        """The outputs, when they were computed under ``card``'s reference preprocessing."""
        return self.outputs if card.reference_preprocessing == self.prep else None


def _start_tensorflow(native: ChildWorker, pool: ThreadPoolExecutor) -> Future[Any]:
    """The child started from this thread (it dies with the thread that started it), TensorFlow imported
    in it on ``pool``'s thread."""

    native.call("start the native worker", os.getpid)
    return pool.submit(native.call, "start TensorFlow", tflite_quant.start)


def _variant(target: Any, io: str | None = None) -> str:
    """The folder name of the model a target deploys (``io``: another I/O dtype)."""
    m = target.model
    if m.precision.value != "int8":
        return m.precision.value
    return (
        f"int8-io-{io or m.io_dtype.value}-{'per-tensor' if m.per_tensor else 'per-channel'}"
        f"{'' if m.float_islands else '-full-integer'}"
    )


def _calibration(target: Any) -> str:
    """Targets with the same calibration share one quantized model: those whose models differ only in
    int8/uint8 I/O get it with the interface rewritten (exact), not calibrated and quantized again."""

    io = target.model.io_dtype.value
    return _variant(target, "int8" if io in EXACT else io)


def _quantize_stages(
    stages: Stages,
    conv: ConvertResult,
    conv_key: str,
    calib: Path,
    folder_digest: str,
    options: DeployOptions,
    targets: list[Any],
    native: ChildWorker,
) -> dict[str, DeployedModel]:
    """One calibrated, quantized model per distinct need, shared by the targets that need it.

    It is made for the strictest SQNR budget of its targets (mixed models keep float op groups to
    meet it); a model still over budget is kept as ``model_int8_OVER_BUDGET.tflite`` and its
    targets' drift checks say so. A target needing other I/O gets a copy with its interface rewritten.
    """
    models: dict[str, DeployedModel] = {}
    groups: dict[str, list[Any]] = {}
    for t in targets:
        if t.model.precision.value in ("float32", "float16"):
            card = (
                conv.card
                if t.model.precision.value == "float32"
                else conv.card.with_(model_file=FLOAT16_FILE, precision="float16")
            )
            models[t.name] = DeployedModel(Path(str(conv.folder)) / card.model_file, _variant(t), card)
        elif runs_onnx_qdq(options.device, t):  # its device's OS runs the int8 ONNX QDQ model on onnxruntime
            models[t.name] = _qdq_stage(stages, conv, conv_key, calib, folder_digest, options)
        else:
            groups.setdefault(_calibration(t), []).append(t)
    for variant, members in groups.items():
        base = _quantize_stage(stages, conv, conv_key, calib, folder_digest, options, variant, members, native)
        for t in members:
            models[t.name] = _interface_stage(stages, conv, base, t)
    return models


def _quantize_inputs(conv_key: str, folder_digest: str, options: DeployOptions) -> dict[str, Any]:
    """What every quantize stage's cache key holds of its inputs: the conversion and both image sets' bytes."""
    evaluation = list_images(options.eval_dir, minimum=0, check=False) if options.eval_dir else None
    return {
        "convert": conv_key,
        "calibration": folder_digest,
        "evaluation": image_set_digest(evaluation) if evaluation is not None else None,
    }


def _qdq_stage(
    stages: Stages, conv: ConvertResult, conv_key: str, calib: Path, folder_digest: str, options: DeployOptions
) -> DeployedModel:
    """The int8 ONNX QDQ model, calibrated and measured on the TFLite path's images (a cached stage)."""
    opts = QdqOptions.on_split(options.quantize.split)
    key = {"stage": "quantize-qdq", **_quantize_inputs(conv_key, folder_digest, options), "options": opts.to_dict()}
    folder, _ = stages.run(
        "quantize/int8-qdq",
        key,
        lambda d: quantize_qdq(conv, calib, evaluation=options.eval_dir, options=opts, progress=stages.progress).save(
            d, force=True
        ),
    )
    card = find_card(folder / QDQ_FILE)
    if card is None:
        raise InputError(f"no model card beside {folder / QDQ_FILE}: remove {folder} and deploy again")
    figures = DriftFigures.from_dict(json.loads((folder / QDQ_REPORT_FILE).read_text())["figures"])
    return DeployedModel(folder / QDQ_FILE, "int8-qdq", card, qdq_figures=figures)


def _host_check(model: DeployedModel, target: Any) -> dict[str, Any]:
    """The summary's ``host_check`` of an ONNX QDQ model (judged by the target's budget), else nothing."""
    if model.qdq_figures is None:
        return {}
    return {"host_check": host_check(model.qdq_figures, target, str(model.path))}


def _quantize_stage(
    stages: Stages,
    conv: ConvertResult,
    conv_key: str,
    calib: Path,
    folder_digest: str,
    options: DeployOptions,
    variant: str,
    members: list[Any],
    native: ChildWorker,
) -> tuple[DeployedModel, str]:
    timing = speed_timing(options.device, members[0], stages.progress)
    opts = options.quantize.fitted(members[0], on_device=timing.probe is not None)
    io = IODtype.INT8 if opts.io.value in EXACT else opts.io
    opts = replace(opts, io=io, min_sqnr_db=max(t.budget.min_sqnr_db for t in members))
    key = {
        "stage": "quantize",
        **_quantize_inputs(conv_key, folder_digest, options),
        "options": opts.to_dict(),
        "speed_timing": timing.to_dict(),
    }
    folder, digest = stages.run(
        f"quantize/{variant}",
        key,
        lambda d: quantize(
            conv,
            calib,
            evaluation=options.eval_dir,
            options=opts,
            progress=stages.progress,
            worker=native,
            timing=timing,
        ).save(d, force=True),
    )
    result = QuantizeResult.load(folder, source=conv)
    return DeployedModel(Path(str(result.model_path)), variant, result.card, result), digest


def speed_timing(device: DeviceSpec | None, target: Any, progress: Progress = silent) -> SpeedTiming:
    """Where quantize times ``target``'s speed decisions: its own ssh device (``--host``), else this machine.

    An emulated device times nothing: its speeds are an emulator's, not a Pi's (the report says so).
    """
    one = device.for_target(target.name) if device else None
    if one is None or one.kind != "ssh" or target.access.value != "ssh":
        return SpeedTiming()

    ssh = ssh_device(one)
    on_device(ssh, target)  # a device release the target refuses stops deploy here, in one line
    if ssh.probe().get("emulated"):
        # The note names the target, not the host: it is part of quantize's cache key, and an emulated device
        # decides nothing, so another emulated device of the target reuses the stage.
        return SpeedTiming(note=f"speed decisions skipped: the {target.name} device is emulated, not a Pi's speed")
    return SpeedTiming(latency_probe(ssh, target, pip_args=one.pip_args, progress=progress), where=f"ssh {one.host}")


def _interface_stage(
    stages: Stages, conv: ConvertResult, base: tuple[DeployedModel, str], target: Any
) -> DeployedModel:
    """The calibrated model as it is, or with its interface rewritten for the target's I/O dtype (own stage)."""
    model, base_key = base
    variant, io = _variant(target), target.model.io_dtype.value
    if variant == model.variant or model.quantized is None:
        return model
    calibrated = model.quantized
    folder, _ = stages.run(
        f"quantize/{variant}",
        {"stage": "interface", "quantize": base_key, "io": io},
        lambda d: calibrated.with_io(io).save(d, force=True),
    )
    result = QuantizeResult.load(folder, source=conv)
    return DeployedModel(Path(str(result.model_path)), variant, result.card, result)


def _verify_and_bundle(
    stages: Stages,
    model: Path,
    models: dict[str, DeployedModel],
    eval_set: Any,
    targets: list[Any],
    options: DeployOptions,
    progress: Progress,
    early: _DuringConvert,
) -> tuple[dict[str, Any], dict[str, Path]]:
    """Every target's drift check and bundle, two at a time (no benchmark runs meanwhile).

    The float reference is computed once per reference preprocessing (during convert when it can
    be), the edgeship wheel once.
    """
    keys = {t.name: _verify_key(models[t.name], t, eval_set, options) for t in targets}
    needed = [models[t.name].card for t in targets if stages.will_build(f"verify/{t.name}", keys[t.name])]
    start = time.perf_counter()
    reference, from_early = _references(model, needed, eval_set, progress, early)
    if from_early:
        stages.step("verify: float reference (onnxruntime, during convert)", early.seconds)
    if len(reference) > from_early:
        stages.step("verify: float reference (onnxruntime)", time.perf_counter() - start)
    slow_first = sorted(targets, key=lambda t: not t.runtime.client.reads_metadata)  # the app-client check is longest
    wheel = early.wheel
    with ThreadPoolExecutor(2) as pool:
        checks = {
            t.name: pool.submit(
                _verify_stage, stages, model, models[t.name], keys[t.name], eval_set, t, options, reference, progress
            )
            for t in slow_first
        }
        # A bundle pins the interpreter its target's check ran with, so it waits for that check (the checks
        # were submitted first, so a waiting bundle never holds a worker a check still needs).
        built = {t.name: pool.submit(_bundle_stage, stages, models[t.name], t, wheel, checks[t.name]) for t in targets}
        drifts = {t.name: checks[t.name].result() for t in targets}
        bundles = {t.name: built[t.name].result() for t in targets}
    if wheel.seconds is not None:
        stages.step("bundles: edgeship wheel", wheel.seconds)
    stages.order(
        [r.name for r in stages.records if not r.name.startswith(("verify/", "bundles/"))]
        + [f"verify/{t.name}" for t in targets]
        + [f"bundles/{t.name}" for t in targets]
        + ["bundles: edgeship wheel"]
    )
    return drifts, bundles


def _verify_key(cand: DeployedModel, target: Any, eval_set: Any, options: DeployOptions) -> dict[str, Any]:
    return {
        "stage": "verify",
        "candidate_sha256": sha256_file(cand.path),
        "target": target.to_dict(),
        "images": [str(f) for f in eval_set.files],
        "images_digest": image_set_digest(eval_set),
        "device": _device_of(options, target),
    }


def _device_of(options: DeployOptions, target: Any) -> dict[str, Any] | None:
    """The device a target's check and bench run on (``--host TARGET=...`` picks one per target)."""
    one = options.device.for_target(target.name) if options.device else None
    return one.to_dict() if one else None


def _references(
    model: Path, cards: list[ModelCard], eval_set: Any, progress: Progress, early: _DuringConvert
) -> tuple[dict[str, np.ndarray], int]:
    """onnxruntime's outputs of the source model on the evaluation images, per reference preprocessing,
    and how many of them were computed during convert."""

    found: dict[str, np.ndarray] = {}
    from_early = 0
    for card in cards:
        ref_key = _reference_key(card)
        if ref_key in found:
            continue
        computed = early.get(card)
        from_early += computed is not None
        found[ref_key] = (
            computed if computed is not None else reference_outputs(model, list(eval_set.files), card, progress)
        )
    return found, from_early


def _reference_key(card: ModelCard) -> str:
    return json.dumps(card.reference_preprocessing.to_dict(), sort_keys=True)


def _verify_stage(
    stages: Stages,
    model: Path,
    cand: DeployedModel,
    key: dict[str, Any],
    eval_set: Any,
    target: Any,
    options: DeployOptions,
    reference: dict[str, np.ndarray],
    progress: Progress,
) -> Any:
    def build(d: Path) -> None:
        verify(
            model,
            cand.quantized or cand.path,
            eval_set,
            target=target,
            device=options.device,
            reference=reference[_reference_key(cand.card)],
            progress=progress,
        ).save(d)

    folder, _ = stages.run(f"verify/{target.name}", key, build)
    return DriftResult.load(folder)


def _layer_plots(models: dict[str, DeployedModel]) -> dict[str, Path]:
    """The per-layer error plot of each quantization (not of its interface rewrites, which share it)."""
    plots = {}
    for m in models.values():
        q = m.quantized
        if q is not None and q.layer_plot_path is not None and q.report.interface is None:
            plots[m.variant] = q.layer_plot_path
    return plots


def _bench_stage(
    stages: Stages,
    model: Path,
    conv: ConvertResult,
    models: dict[str, DeployedModel],
    options: DeployOptions,
    progress: Progress,
    eval_set: Any = None,
) -> BenchReport:
    """ONNX through onnxruntime (the baseline), the float32 TFLite, then every deployed model.

    The TFLite models are also timed end to end (``Classifier.predict``) on up to 20 held-apart images, each once.
    """

    unique = [model, conv.saved_path()]
    for m in models.values():
        if m.path not in unique:
            unique.append(m.path)
    images = tuple(str(f) for f in eval_set.files[:20]) if eval_set is not None else ()
    key = {
        "stage": "bench",
        "models": {str(m): sha256_file(m) for m in unique},
        "threads": list(options.bench_threads),
        "runs": options.bench_runs,
        "e2e_images": list(images),
        "e2e_runs": "each image once",
    }

    def build(d: Path) -> None:
        # End to end, each held-apart image once per configuration: decoding dominates and varies little.
        doc = benchmark(
            unique,
            BenchOptions(
                threads=options.bench_threads,
                runs=options.bench_runs,
                images=images,
                e2e_runs=min(options.bench_runs, len(images)) or None,
            ),
            progress=progress,
        )
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_json(d / BENCH_FILE, doc.to_dict())

    folder, _ = stages.run("bench", key, build)
    return BenchReport.from_dict(json.loads((folder / BENCH_FILE).read_text()))


def _bundle_key(m: DeployedModel, target: Any, version: str | None = None, python: str | None = None) -> dict[str, Any]:
    return {
        "stage": "bundle",
        "model": sha256_file(m.path),
        "card": m.card.to_dict(),
        "target": target.to_dict(),
        "interpreter_version": version,
        **({"python": python} if python else {}),
    }


class _Wheel:
    """The edgeship wheel, built once into ``folder`` by the first bundle that ships one (thread-safe)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.seconds: float | None = None
        self._lock = threading.Lock()

    def get(self) -> Path:
        with self._lock:
            if self.seconds is None:
                start = time.perf_counter()
                build_edgeship_wheel(self.folder)
                self.seconds = time.perf_counter() - start
        return self.folder


def _bundle_stage(stages: Stages, m: DeployedModel, target: Any, wheel: _Wheel, check: Future[Any]) -> Path:
    """The target's bundle, pinning the interpreter version its drift check ran with (what was verified ships)."""

    ran = check.result().report.candidate.runtime
    version = verified_version(target, ran)
    python = ran.details.get("python") if ran.details.get("release") else None  # a device's Python: its release
    folder, _ = stages.run(
        f"bundles/{target.name}",
        _bundle_key(m, target, version, python),
        lambda d: bundle(
            m.path,
            target,
            d,
            force=True,
            wheel_dir=None if target.access == Access.ADB else wheel.get(),
            interpreter_version=version,
            python=python,
        ),
    )
    return folder


def _device_bench_stages(
    stages: Stages,
    conv: ConvertResult,
    models: dict[str, DeployedModel],
    targets: list[Any],
    options: DeployOptions,
    progress: Progress,
) -> dict[str, dict[str, Any]]:
    """float32 and the deployed model benchmarked on each target's own ssh device (``--host TARGET=...``)."""

    out: dict[str, dict[str, Any]] = {}
    for t in targets:
        one = options.device.for_target(t.name) if options.device else None
        if one is None or one.kind != "ssh" or t.access.value != "ssh":
            continue
        onnx = models[t.name].path.suffix == ".onnx"  # float and int8 in the form the device's runtime runs
        ms = list(
            dict.fromkeys(
                [Path(str(conv.folder)) / SIMPLIFIED_FILE if onnx else conv.saved_path(), models[t.name].path]
            )
        )
        key = {
            "stage": "device-bench",
            "target": t.to_dict(),
            "device": one.to_dict(),
            "runs": options.bench_runs,
            "models": {str(m): sha256_file(m) for m in ms},
        }

        def build(d: Path, t: Any = t, one: Any = one, ms: list[Path] = ms) -> None:
            doc = device_bench(
                ssh_device(one), t, ms, runs=options.bench_runs, pip_args=one.pip_args, progress=progress
            )
            d.mkdir(parents=True, exist_ok=True)
            atomic_write_json(d / BENCH_FILE, doc.to_dict())

        folder, _ = stages.run(f"device-bench/{t.name}", key, build)
        doc = BenchReport.from_dict(json.loads((folder / BENCH_FILE).read_text()))
        out[t.name] = {
            "bench": str(folder / BENCH_FILE),
            "device": doc.device.to_dict() if doc.device else None,
            "speed": doc.speed.to_dict() if doc.speed else None,
        }
    return out


def prepare(
    model: str, calibration: str | Path, out_dir: str | Path, options: DeployOptions, *, progress: Progress = silent
) -> dict[str, DeployedModel]:
    """Only deploy's convert and quantize stages, into a deploy folder and cached exactly as :func:`deploy`
    caches them (a later ``deploy`` of the same inputs there reuses them): each target's deployed model."""

    check_apart(out_dir, {"the calibration folder": calibration, "the evaluation folder": options.eval_dir})
    with folder_lock(out_dir), reading(_inputs(model, calibration, options)):
        targets = [load_target(t) for t in options.targets]
        _check_names(targets, options.targets)
        model_path = zoo.resolve(model, progress=progress)
        if not model_path.is_file():
            raise InputError(f"model {model_path} does not exist")
        folder_digest = image_set_digest(list_images(calibration, minimum=0, check=False))  # every file's bytes
        out = Path(out_dir)
        stages = Stages(out, progress, check_out_dir(out, options.force, _inputs(model, calibration, options)))
        early = _DuringConvert(model_path, None, Preprocessing.imagenet(1, 1), _Wheel(out), False)
        with ChildWorker() as native:
            conv, conv_key = _convert_stage(stages, model_path, options, targets, native, early)
            return _quantize_stages(stages, conv, conv_key, Path(calibration), folder_digest, options, targets, native)
