"""``deploy``: ONNX model + image folder -> verified, benchmarked bundle per target, and a report.

Stages (each cached under OUT_DIR by the hash of its inputs and options, so a re-run
with nothing changed reuses everything, and a changed calibration folder re-runs from
quantize on): convert -> quantize (one model per distinct precision/I/O need) -> verify
per target -> local benchmark -> bundle per target -> report.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeship._io import atomic_write_json, sha256_file
from edgeship._progress import Progress, silent
from edgeship._version import __version__
from edgeship.errors import InputError, OutputExistsError
from edgeship.targets.devices import DeviceSpec

log = logging.getLogger(__name__)

MARKER = ".edgeship-deploy.json"
STAGE_MARK = ".stage.json"
SUMMARY = "deploy.json"


@dataclass(frozen=True)
class DeployOptions:
    """Options of :func:`deploy` (the quantize options apply to every quantized model)."""

    targets: tuple[str, ...]
    num_calib: int = 200
    seed: int | None = None
    method: str | None = None  # None: quantize's default
    eval_dir: Path | None = None
    max_eval: int | None = None
    labels: Path | None = None
    bench_threads: tuple[int, ...] = (1, 2)
    bench_runs: int = 100
    device: DeviceSpec | None = None  # where drift checks run (None: this machine)
    force: bool = False

    def __post_init__(self) -> None:
        if not self.targets:
            raise InputError("deploy needs at least one --target")


@dataclass
class StageRecord:
    name: str
    reused: bool
    seconds: float  # this run
    key: str
    built_seconds: float = 0.0  # when the stage's outputs were made


@dataclass
class DeployResult:
    out_dir: Path
    stages: list[StageRecord]
    targets: dict[str, dict[str, Any]]
    passed: bool
    summary: dict[str, Any] = field(repr=False, default_factory=dict)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """Hash of edgeship's own source files: a stage made by different code is not reused.

    The version alone is not enough for an editable install, where the code changes under
    one version number.
    """
    import edgeship
    import edgeship.convert
    import edgeship.quantize
    import edgeship.runtime
    import edgeship.targets
    import edgeship.verify

    h = hashlib.sha256()
    for pkg in (edgeship, edgeship.convert, edgeship.quantize, edgeship.runtime, edgeship.targets, edgeship.verify):
        root = Path(pkg.__file__).parent
        for f in sorted(root.glob("*.py")) + sorted(root.glob("*.toml")):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


class _Stages:
    """Runs named stages into subfolders of OUT_DIR, reusing those whose key is unchanged."""

    def __init__(self, out: Path, progress: Progress) -> None:
        self.out = out
        self.progress = progress
        self.records: list[StageRecord] = []

    def run(self, name: str, key: dict[str, Any], build: Callable[[Path], None]) -> tuple[Path, str]:
        folder = self.out / name
        digest = _digest({"edgeship": __version__, "code": code_fingerprint(), **key})
        marker = folder / STAGE_MARK
        start = time.perf_counter()
        previous = _read_marker(marker)
        if previous.get("key") == digest and _intact(folder, previous.get("files")):
            self.records.append(StageRecord(name, True, 0.0, digest, float(previous.get("seconds", 0.0))))
            self.progress(f"{name}: reused (unchanged inputs)")
            return folder, digest
        self.progress(name)
        if folder.exists():
            shutil.rmtree(folder)
        build(folder)
        seconds = round(time.perf_counter() - start, 2)
        atomic_write_json(marker, {"key": digest, "seconds": seconds, "inputs": key, "files": _manifest(folder)})
        self.records.append(StageRecord(name, False, seconds, digest, seconds))
        return folder, digest


def _read_marker(marker: Path) -> dict[str, Any]:
    """A stage's record, or {} when it is missing or unreadable (the stage is then rebuilt)."""
    try:
        record = json.loads(marker.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _manifest(folder: Path) -> dict[str, list[Any]]:
    """Every file of a stage folder with its size and sha256, to notice deleted or damaged outputs."""
    return {str(f.relative_to(folder)): [f.stat().st_size, sha256_file(f)]
            for f in sorted(folder.rglob("*")) if f.is_file() and f.name != STAGE_MARK}


def _intact(folder: Path, files: Any) -> bool:
    """Whether a stage's outputs are all still there, unchanged (else it is rebuilt, not reused)."""
    if not isinstance(files, dict) or not files:
        return False
    try:
        for rel, (size, digest) in files.items():
            f = folder / rel
            if f.stat().st_size != size or sha256_file(f) != digest:
                log.warning("%s changed or was deleted since the stage was built: rebuilding it", f)
                return False
    except (OSError, ValueError, TypeError):
        log.warning("an output of %s is missing or unreadable: rebuilding the stage", folder)
        return False
    return True


def _check_out_dir(out: Path, force: bool) -> None:
    from edgeship._io import check_writable_dir

    check_writable_dir(out)
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file() and not force:
        raise OutputExistsError(f"{out} is not empty and is not an edgeship deploy folder; pass {OutputExistsError.FORCE} or pick "
                                "another folder")


def deploy(model: str, calibration: str | Path, out_dir: str | Path, options: DeployOptions, *,
           progress: Progress = silent) -> DeployResult:
    """Run the whole pipeline for several targets; see the module docstring."""
    from edgeship import zoo
    from edgeship.quantize.data import Split, split_images
    from edgeship.runtime.images import list_images
    from edgeship.targets import load_target

    started = time.perf_counter()
    out = Path(out_dir)
    targets = [load_target(t) for t in options.targets]
    model_path = zoo.resolve(model, progress=progress)
    if not model_path.is_file():
        raise InputError(f"model {model_path} does not exist")
    from edgeship.convert.onnx_model import inspect_model, load_model
    from edgeship.runtime.images import Labels

    inspect_model(load_model(model_path), str(model_path))  # bad models fail before OUT_DIR is touched
    if options.labels is not None:
        Labels.load(options.labels)
    calib_set, eval_set = split_images(Path(calibration), Split(options.num_calib, options.seed,
                                                                max_eval=options.max_eval), options.eval_dir)
    folder_digest = list_images(calibration, minimum=0, check=False).digest()  # names, sizes, times: no decode
    _check_out_dir(out, options.force)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / MARKER, {"edgeship": __version__})
    stages = _Stages(out, progress)
    conv_dir, conv_key = _convert_stage(stages, model_path, options, targets)
    models = _quantize_stages(stages, conv_dir, conv_key, Path(calibration), folder_digest, options, targets)
    drifts = _verify_stages(stages, model_path, models, eval_set, targets, options, progress)
    verify_results = {name: d.report for name, d in drifts.items()}
    bench_doc = _bench_stage(stages, model_path, conv_dir, models, options, progress, eval_set)
    device_benches = _device_bench_stages(stages, conv_dir, models, targets, options, progress)
    bundles = _bundle_stages(stages, models, targets, options, drifts)
    summary = {
        "edgeship": __version__, "model": str(model_path), "calibration": {"folder": str(calibration),
                                                                          "count": len(calib_set)},
        "evaluation": {"count": len(eval_set), "held_apart": options.eval_dir is None},
        "stages": [asdict(r) for r in stages.records],
        "targets": {t.name: {"model": str(models[t.name]), "bundle": str(bundles[t.name]),
                             "passed": verify_results[t.name]["passed"], "figures": verify_results[t.name]["figures"],
                             "ran_on": verify_results[t.name]["candidate"].get("ran_on", "?"),
                             "budget": verify_results[t.name]["budget"],
                             "client_check": verify_results[t.name].get("client_check"),
                             **({"device_bench": device_benches[t.name]} if t.name in device_benches else {})}
                    for t in targets},
        "wall_s": round(time.perf_counter() - started, 2),
    }
    from edgeship.report import ReportInputs, write_report

    progress("report")
    write_report(out, ReportInputs(summary, bench_doc, drifts, _labels(conv_dir), _layer_plots(out, models)))
    summary["wall_s"] = round(time.perf_counter() - started, 2)
    atomic_write_json(out / SUMMARY, summary)
    passed = all(v["passed"] for v in summary["targets"].values())
    return DeployResult(out, stages.records, summary["targets"], passed, summary)


def _convert_stage(stages: _Stages, model: Path, options: DeployOptions, targets: list[Any]) -> tuple[Path, str]:
    from edgeship.convert import ConvertOptions, convert

    fp16 = any(t.model.precision.value == "float16" for t in targets)
    pixels = any(t.runtime.client.reads_metadata for t in targets)  # per-channel normalisation goes in the graph
    labels = options.labels
    copts = ConvertOptions(fp16=fp16, labels=labels, pixels_in_graph=pixels)
    key = {"stage": "convert", "model_sha256": sha256_file(model), "options": copts.to_dict(),
           "labels_sha256": sha256_file(labels) if labels else None}
    return stages.run("convert", key,
                      lambda d: convert(model, options=copts, progress=stages.progress).save(d, force=True))


def _variant(target: Any) -> str:
    m = target.model
    if m.precision.value != "int8":
        return m.precision.value
    return (f"int8-io-{m.io_dtype.value}-{'per-tensor' if m.per_tensor else 'per-channel'}"
            f"{'' if m.float_islands else '-full-integer'}")


def _quantize_stages(stages: _Stages, conv_dir: Path, conv_key: str, calib: Path, folder_digest: str,
                     options: DeployOptions, targets: list[Any]) -> dict[str, Path]:
    """One quantized model per distinct need, shared by the targets that need it.

    Each is made for its target's budget (mixed models keep float op groups to meet it);
    a model still over budget is kept as ``model_int8_OVER_BUDGET.tflite`` and its targets'
    drift checks say so.
    """
    from edgeship.convert.result import FLOAT16_FILE, FLOAT32_FILE
    from edgeship.quantize import QuantizeOptions, quantize
    from edgeship.quantize.pipeline import INT8_FILE, OVER_BUDGET_FILE

    from dataclasses import replace

    models: dict[str, Path] = {}
    built: dict[str, Path] = {}
    strictest: dict[str, float] = {}  # targets sharing a model: the highest SQNR budget among them
    for t in targets:
        strictest[_variant(t)] = max(strictest.get(_variant(t), t.budget.min_sqnr_db), t.budget.min_sqnr_db)
    for t in targets:
        variant = _variant(t)
        if variant in ("float32", "float16"):
            models[t.name] = conv_dir / (FLOAT32_FILE if variant == "float32" else FLOAT16_FILE)
            continue
        if variant not in built:
            opts = QuantizeOptions.for_target(t, num_calib=options.num_calib, seed=options.seed, method=options.method,
                                              max_eval=options.max_eval)
            opts = replace(opts, min_sqnr_db=strictest[variant])
            key = {"stage": "quantize", "convert": conv_key, "calibration": folder_digest,
                   "evaluation": str(options.eval_dir) if options.eval_dir else None, "options": opts.to_dict()}
            folder, _ = stages.run(f"quantize/{variant}", key,
                                   lambda d, o=opts: quantize(conv_dir, calib, evaluation=options.eval_dir, options=o,
                                                              progress=stages.progress).save(d, force=True))
            built[variant] = folder / (INT8_FILE if (folder / INT8_FILE).is_file() else OVER_BUDGET_FILE)
        models[t.name] = built[variant]
    return models


def _verify_stages(stages: _Stages, model: Path, models: dict[str, Path], eval_set: Any, targets: list[Any],
                   options: DeployOptions, progress: Progress) -> dict[str, Any]:
    from edgeship.runtime.classifier import find_card
    from edgeship.verify.drift import DriftResult, reference_outputs, verify

    results: dict[str, DriftResult] = {}
    reference: dict[str, np.ndarray] = {}
    for t in targets:
        cand = models[t.name]
        key = {"stage": "verify", "candidate_sha256": sha256_file(cand), "target": t.to_dict(),
               "images": [str(f) for f in eval_set.files], "images_digest": eval_set.digest(),
               "device": options.device.for_target(t.name).to_dict() if options.device else None}

        def build(d: Path, t: Any = t, cand: Path = cand) -> None:
            card = find_card(cand)
            ref_key = json.dumps(card.reference_preprocessing.to_dict(), sort_keys=True)
            if ref_key not in reference:
                reference[ref_key] = reference_outputs(model, list(eval_set.files), card, progress)
            verify(model, cand, eval_set, target=t, device=options.device, reference=reference[ref_key],
                   progress=progress).save(d)

        folder, _ = stages.run(f"verify/{t.name}", key, build)
        results[t.name] = DriftResult.load(folder)
    return results


def _labels(conv_dir: Path) -> list[str] | None:
    from edgeship.convert.result import LABELS_FILE
    from edgeship.runtime.images import Labels

    path = conv_dir / LABELS_FILE
    return list(Labels.load(path).names) if path.is_file() else None


def _layer_plots(out: Path, models: dict[str, Path]) -> dict[str, Path]:
    from edgeship.quantize.pipeline import LAYER_PLOT

    plots = {m.parent.name: m.parent / LAYER_PLOT for m in models.values() if m.parent.parent == out / "quantize"}
    return {variant: p for variant, p in plots.items() if p.is_file()}


def _bench_stage(stages: _Stages, model: Path, conv_dir: Path, models: dict[str, Path], options: DeployOptions,
                 progress: Progress, eval_set: Any = None) -> dict[str, Any]:
    """ONNX through onnxruntime (the baseline), the float32 TFLite, then every deployed model.

    The TFLite models are also timed end to end (``Classifier.predict``) on up to 20 held-apart images.
    """
    from edgeship.convert.result import FLOAT32_FILE
    from edgeship.runtime.bench import BenchOptions, benchmark

    unique = [model, conv_dir / FLOAT32_FILE]
    for m in models.values():
        if m not in unique:
            unique.append(m)
    images = tuple(str(f) for f in eval_set.files[:20]) if eval_set is not None else ()
    key = {"stage": "bench", "models": {str(m): sha256_file(m) for m in unique},
           "threads": list(options.bench_threads), "runs": options.bench_runs, "e2e_images": list(images)}

    def build(d: Path) -> None:
        doc = benchmark(unique, BenchOptions(threads=options.bench_threads, runs=options.bench_runs, images=images),
                        progress=progress)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_json(d / "bench.json", doc)

    folder, _ = stages.run("bench", key, build)
    return json.loads((folder / "bench.json").read_text())


def _device_bench_stages(stages: _Stages, conv_dir: Path, models: dict[str, Path], targets: list[Any],
                         options: DeployOptions, progress: Progress) -> dict[str, dict[str, Any]]:
    """float32 and the deployed model benchmarked on each target's own ssh device (``--host TARGET=...``)."""
    from edgeship.convert.result import FLOAT32_FILE
    from edgeship.targets.devices import ssh_device
    from edgeship.targets.remote import device_bench

    out: dict[str, dict[str, Any]] = {}
    for t in targets:
        one = options.device.for_target(t.name) if options.device else None
        if one is None or one.kind != "ssh" or t.access.value != "ssh":
            continue
        ms = list(dict.fromkeys([conv_dir / FLOAT32_FILE, models[t.name]]))
        key = {"stage": "device-bench", "target": t.to_dict(), "device": one.to_dict(), "runs": options.bench_runs,
               "models": {str(m): sha256_file(m) for m in ms}}

        def build(d: Path, t: Any = t, one: Any = one, ms: list[Path] = ms) -> None:
            doc = device_bench(ssh_device(one), t, ms, runs=options.bench_runs, pip_args=one.pip_args,
                               progress=progress)
            d.mkdir(parents=True, exist_ok=True)
            atomic_write_json(d / "bench.json", doc)

        folder, _ = stages.run(f"device-bench/{t.name}", key, build)
        doc = json.loads((folder / "bench.json").read_text())
        out[t.name] = {"bench": str(folder / "bench.json"), "device": doc.get("device"), "speed": doc.get("speed")}
    return out


def _bundle_stages(stages: _Stages, models: dict[str, Path], targets: list[Any],
                   options: DeployOptions, drifts: dict[str, Any]) -> dict[str, Path]:
    from edgeship.targets.bundle import bundle
    from edgeship.targets.install import verified_version

    out: dict[str, Path] = {}
    for t in targets:
        m = models[t.name]
        card = m.with_name(m.stem + ".card.json")
        version = verified_version(t, drifts[t.name].report["candidate"]["runtime"])  # what was verified ships
        key = {"stage": "bundle", "model": sha256_file(m), "card": sha256_file(card) if card.is_file() else None,
               "target": t.to_dict(), "interpreter_version": version}
        folder, _ = stages.run(f"bundles/{t.name}", key,
                               lambda d, t=t, m=m, v=version: bundle(m, t, d, force=True, interpreter_version=v))
        out[t.name] = folder
    return out
