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
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeship._io import atomic_write_json, private_name, sha256_file
from edgeship._lock import LOCK_FILE, folder_lock
from edgeship._paths import check_apart, relative
from edgeship._progress import Progress, silent
from edgeship._version import __version__
from edgeship.errors import InputError, OutputExistsError
from edgeship.targets.devices import DeviceSpec

log = logging.getLogger(__name__)

MARKER = ".edgeship-deploy.json"
STAGE_MARK = ".stage.json"
SUMMARY = "deploy.json"
#: What deploy writes at the top of OUT_DIR; anything else there is never touched.
ENTRIES = ("convert", "quantize", "verify", "bench", "bundles", "report", "report.md", "report.html", SUMMARY, MARKER)


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

    def __init__(self, out: Path, progress: Progress, written: _Written | None = None) -> None:
        self.out = out
        self.progress = progress
        self.records: list[StageRecord] = []
        self.written = written

    def run(self, name: str, key: dict[str, Any], build: Callable[[Path], None]) -> tuple[Path, str]:
        folder = relative(self.out, name, "stage")
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
            if self.written is not None:
                self.written.drop(folder)  # refuses files deploy did not write
            shutil.rmtree(folder)
        build(folder)
        seconds = round(time.perf_counter() - start, 2)
        atomic_write_json(marker, {"key": digest, "seconds": seconds, "inputs": key, "files": _manifest(folder)})
        if self.written is not None:
            self.written.claim(folder)
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
            f = relative(folder, rel, "manifest path")
            if f.stat().st_size != size or sha256_file(f) != digest:
                log.warning("%s changed or was deleted since the stage was built: rebuilding it", f)
                return False
    except (OSError, ValueError, TypeError, InputError):
        log.warning("an output of %s is missing or unreadable: rebuilding the stage", folder)
        return False
    return True


class _Written:
    """What deploy wrote in OUT_DIR, kept in its marker file: deploy removes or replaces nothing else."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.deploy_folder = (out / MARKER).is_file()
        record = _read_marker(out / MARKER)
        files = record.get("written")
        if isinstance(files, list):
            self.files = {f for f in files if isinstance(f, str)}
        else:
            self.files = _legacy_written(out) if self.deploy_folder else set()

    def foreign(self, *paths: Path) -> list[str]:
        """Files under ``paths`` (default: deploy's entries) that deploy did not write."""
        paths = paths or tuple(self.out / name for name in ENTRIES)
        return sorted(f for p in paths for f in _files_under(self.out, p)
                      if f not in self.files and not any(private_name(part) for part in f.split("/")))

    def drop(self, folder: Path) -> None:
        """Forget ``folder``'s files before it is deleted; refuse when deploy did not write them all."""
        foreign = self.foreign(folder)
        if foreign:
            raise OutputExistsError(f"{self.out} holds {_some(foreign)}, which deploy did not write; move them, "
                                    "deploy would delete them")
        self.files -= set(_files_under(self.out, folder))
        self._save()

    def claim(self, *paths: Path) -> None:
        """Record that deploy wrote every file under ``paths``."""
        for p in paths:
            self.files |= set(_files_under(self.out, p))
        self._save()

    def _save(self) -> None:
        atomic_write_json(self.out / MARKER, {"edgeship": __version__, "written": sorted(self.files | {MARKER})})
        self.deploy_folder = True


def _files_under(out: Path, path: Path) -> list[str]:
    """``path`` (a file or a link) or the files and links under it, relative to ``out`` with ``/``."""
    if path.is_symlink() or path.is_file():
        return [path.relative_to(out).as_posix()]
    found: list[str] = []
    for root, dirs, files in os.walk(path):
        links = [d for d in dirs if os.path.islink(os.path.join(root, d))]
        found += [Path(root, f).relative_to(out).as_posix() for f in [*files, *links]]
    return found


def _legacy_written(out: Path) -> set[str]:
    """A deploy folder from before the record: its stages' manifests and its report say what it wrote."""
    files = {MARKER, SUMMARY, "report.md", "report.html", *_files_under(out, out / "report")}
    for mark in (f for name in ENTRIES[:5] for f in (out / name).rglob(STAGE_MARK)):
        listed = _read_marker(mark).get("files")
        prefix = mark.parent.relative_to(out).as_posix()
        files |= {f"{prefix}/{STAGE_MARK}", *(f"{prefix}/{f}" for f in (listed if isinstance(listed, dict) else {}))}
    return files


def _some(names: list[str], shown: int = 5) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _check_out_dir(out: Path, force: bool) -> _Written:
    """What deploy wrote in ``out``; refuse a folder holding files of someone else where deploy writes.

    Without ``force`` the folder must be empty or a deploy folder; with it, deploy writes
    beside what is there. Either way, files deploy did not write are never removed.
    """
    written = _Written(out)
    foreign = written.foreign()
    if foreign:
        raise OutputExistsError(f"{out} holds {_some(foreign)}, which deploy did not write but would replace or "
                                f"delete; move them or pick another folder ({OutputExistsError.FORCE} never removes "
                                "files edgeship did not write)")
    present = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE) if out.is_dir() else []
    if present and not written.deploy_folder and not force:
        raise OutputExistsError(f"{out} is not empty and is not an edgeship deploy folder (it holds {_some(present)}; "
                                f"deploy would replace none of them): pass {OutputExistsError.FORCE} to write beside "
                                "them, or pick another folder")
    return written


def _check_names(targets: list[Any], given: tuple[str, ...]) -> None:
    """Refuse two targets with one name: the name is their folder (verify/NAME, bundles/NAME)."""
    seen: dict[str, str] = {}
    for target, source in zip(targets, given):
        if target.name in seen:
            raise InputError(f"two targets are named {target.name} ({seen[target.name]} and {source}); "
                             "each target's results go to folders named after it: rename one")
        seen[target.name] = source


def deploy(model: str, calibration: str | Path, out_dir: str | Path, options: DeployOptions, *,
           progress: Progress = silent) -> DeployResult:
    """Run the whole pipeline for several targets; see the module docstring.

    The output folder is locked for the run (a second writer is refused), must not be
    inside the calibration or evaluation folder, and holds nothing of the user's where
    deploy writes (see :func:`_check_out_dir`).
    """
    check_apart(out_dir, {"the calibration folder": calibration, "the evaluation folder": options.eval_dir})
    with folder_lock(out_dir):
        return _deploy(model, calibration, out_dir, options, progress=progress)


def _deploy(model: str, calibration: str | Path, out_dir: str | Path, options: DeployOptions, *,
            progress: Progress = silent) -> DeployResult:
    from edgeship import zoo
    from edgeship.quantize.data import Split, split_images
    from edgeship.runtime.images import list_images
    from edgeship.targets import load_target

    started = time.perf_counter()
    out = Path(out_dir)
    targets = [load_target(t) for t in options.targets]
    _check_names(targets, options.targets)
    model_path = zoo.resolve(model, progress=progress)
    if not model_path.is_file():
        raise InputError(f"model {model_path} does not exist")
    from edgeship.convert.onnx_model import inspect_model, load_model, resolve_shape
    from edgeship.runtime.images import Labels

    resolve_shape(inspect_model(load_model(model_path), str(model_path)), None)  # bad models fail before OUT_DIR
    if options.labels is not None:
        Labels.load(options.labels)
    calib_set, eval_set = split_images(Path(calibration), Split(options.num_calib, options.seed,
                                                                max_eval=options.max_eval), options.eval_dir)
    folder_digest = list_images(calibration, minimum=0, check=False).digest()  # names, sizes, times: no decode
    written = _check_out_dir(out, options.force)
    stages = _Stages(out, progress, written)
    conv_dir, conv_key = _convert_stage(stages, model_path, options, targets)
    models = _quantize_stages(stages, conv_dir, conv_key, Path(calibration), folder_digest, options, targets)
    drifts = _verify_stages(stages, model_path, models, eval_set, targets, options, progress)
    verify_results = {name: d.to_dict() for name, d in drifts.items()}
    bench_doc = _bench_stage(stages, model_path, conv_dir, models, options, progress, eval_set)
    bundles = _bundle_stages(stages, models, targets, options)
    summary = {
        "edgeship": __version__, "model": str(model_path), "calibration": {"folder": str(calibration),
                                                                          "count": len(calib_set)},
        "evaluation": {"count": len(eval_set), "held_apart": options.eval_dir is None},
        "stages": [asdict(r) for r in stages.records],
        "targets": {t.name: {"model": str(models[t.name]), "bundle": str(bundles[t.name]),
                             "passed": verify_results[t.name]["passed"], "figures": verify_results[t.name]["figures"],
                             "ran_on": verify_results[t.name]["candidate"].get("ran_on", "?"),
                             "budget": verify_results[t.name]["budget"],
                             "client_check": verify_results[t.name].get("client_check")} for t in targets},
        "wall_s": round(time.perf_counter() - started, 2),
    }
    from edgeship.report import ReportInputs, write_report

    progress("report")
    write_report(out, ReportInputs(summary, bench_doc, drifts, _labels(conv_dir), _layer_plots(out, models)))
    summary["wall_s"] = round(time.perf_counter() - started, 2)
    atomic_write_json(out / SUMMARY, summary)
    written.claim(out / "report", out / "report.md", out / "report.html", out / SUMMARY)
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
               "device": options.device.to_dict() if options.device else None}

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


def _bundle_stages(stages: _Stages, models: dict[str, Path], targets: list[Any],
                   options: DeployOptions) -> dict[str, Path]:
    from edgeship.targets.bundle import bundle

    out: dict[str, Path] = {}
    for t in targets:
        m = models[t.name]
        card = m.with_name(m.stem + ".card.json")
        key = {"stage": "bundle", "model": sha256_file(m), "card": sha256_file(card) if card.is_file() else None,
               "target": t.to_dict()}
        folder, _ = stages.run(f"bundles/{t.name}", key, lambda d, t=t, m=m: bundle(m, t, d, force=True))
        out[t.name] = folder
    return out
