"""``edgeship matrix``: models x targets, convert + quantize once per model, drift check and bench per cell on
the devices of its target, scheduled by Ray (:mod:`edgeship.matrix_ray`); one report (:mod:`edgeship.matrix_report`).

OUT holds ``models/MODEL/`` (deploy folders: deploy's own convert and quantize stages and cache),
``cells/MODEL/TARGET/`` (``drift_report.json``, ``outputs.npz``, ``bench.json`` and ``cell.json`` last: a cell
is done when its ``cell.json`` key matches and every file it lists is unchanged), and the report. A cell is
written as soon as it completes, so a run that dies keeps every cell it reported; a rerun redoes only the rest.
"""

from __future__ import annotations

import collections
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeship._cache_keys import digest
from edgeship._io import atomic_write_json, sha256_file
from edgeship._lock import LOCK_FILE, folder_lock
from edgeship._paths import check_apart
from edgeship._progress import Progress, silent
from edgeship._version import __version__
from edgeship.convert.onnx_model import inspect_model, load_model
from edgeship.deploy import DeployOptions, code_fingerprint
from edgeship.errors import InputError, OutputExistsError
from edgeship.matrix_file import Matrix, MatrixDevice, load_matrix
from edgeship.matrix_ray import (
    JobLimit,
    ShardRun,
    bench_on_device,
    collect_shard,
    hung,
    live_devices,
    lost_reason,
    submit_device,
    submit_prepare,
)
from edgeship.matrix_ray import session as ray_session
from edgeship.matrix_report import write_reports
from edgeship.quantize.data import Split, split_images
from edgeship.quantize.options import QuantizeOptions
from edgeship.runtime.bench_report import RuntimeInfo
from edgeship.runtime.images import ImageSet
from edgeship.targets.devices import Collected
from edgeship.verify.drift import stage_candidate, verify

log = logging.getLogger(__name__)

MARKER = ".edgeship-matrix.json"
CELL_FILE = "cell.json"
BENCH_FILE = "bench.json"
#: How often (seconds) the driver looks for devices whose node died while nothing completes.
TICK_S = 1.0
#: Failures in a row (unreachable, its worker died) after which a device is lost; each failed job moves at once.
STRIKES = 2
#: Seconds past a job's limit after which the driver stops waiting for its task (the task ends its own job at
#: the limit; this covers a task that cannot, e.g. its worker is stuck): the device is lost, the job moves.
GRACE_S = 60.0


@dataclass
class Cell:
    """One model x target: its shards of images, what the devices returned, and its state."""

    model: str
    target: str
    folder: Path
    key: str = ""
    prepared: dict[str, Any] = field(default_factory=dict)
    shards: list[tuple[Path, ...]] = field(default_factory=list)
    runs: dict[int, ShardRun] = field(default_factory=dict)
    bench: dict[str, Any] | None = None
    bundle: dict[str, bytes] = field(default_factory=dict, repr=False)
    status: str = "pending"  # pending, done, reused, lost, error
    reason: str = ""
    ran_on: dict[int, str] = field(default_factory=dict)  # shard -> device name

    @property
    def complete(self) -> bool:
        return len(self.runs) == len(self.shards) and self.bench is not None


@dataclass(frozen=True)
class Job:
    cell: Cell
    kind: str  # "shard" or "bench"
    index: int = 0


@dataclass
class MatrixResult:
    out_dir: Path
    cells: list[dict[str, Any]]
    devices: dict[str, dict[str, Any]]
    wall_s: float

    @property
    def passed(self) -> bool:
        return all(c["status"] in ("done", "reused") and c["passed"] for c in self.cells)


def run_matrix(
    matrix_file: str | Path, out_dir: str | Path, *, ray_address: str | None = None, progress: Progress = silent
) -> MatrixResult:
    """Run the matrix into ``out_dir`` (see the module docstring); the folder is locked for the run."""
    matrix = load_matrix(matrix_file)
    out = Path(out_dir)
    check_apart(out, {"the calibration folder": matrix.calibration, "the evaluation folder": matrix.evaluation})
    _check_out(out)
    _check_contracts(matrix)
    with folder_lock(out):
        atomic_write_json(out / MARKER, {"edgeship": __version__, "matrix": str(matrix.path)})
        return _Run(matrix, out, progress).run(ray_address)


def _check_out(out: Path) -> None:
    present = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE) if out.is_dir() else []
    if present and not (out / MARKER).is_file():
        raise OutputExistsError(
            f"{out} is not empty and is not an edgeship matrix folder (it holds {', '.join(present[:5])}): "
            "pick another folder"
        )


def _check_contracts(matrix: Matrix) -> None:
    """A model's input_shape (its input contract) must be the ONNX model's own, before anything runs."""
    for m in matrix.models:
        if m.input_shape is None or not Path(m.source).is_file():
            continue
        shape = tuple(inspect_model(load_model(m.source), m.source).input_shape)
        if not _fits(shape, m.input_shape):
            raise InputError(f"model {m.name}: its input is {list(shape)}, the matrix file says {list(m.input_shape)}")


def _fits(shape: tuple[Any, ...], contract: tuple[int, ...]) -> bool:
    """A model's input shape meets the contract: same rank, every fixed size equal (a named size takes any)."""
    return len(shape) == len(contract) and all(not isinstance(d, int) or d == c for d, c in zip(shape, contract))


def _eval_set(matrix: Matrix) -> ImageSet:
    o = matrix.options
    _, eval_set = split_images(matrix.calibration, Split(o.num_calib, o.seed, max_eval=o.max_eval), matrix.evaluation)
    if not len(eval_set):
        raise InputError("no evaluation images: give an evaluation folder or more calibration images")
    return eval_set


def deploy_options(matrix: Matrix, labels: Path | None) -> DeployOptions:
    o = matrix.options
    given: dict[str, Any] = {"num_calib": o.num_calib, "seed": o.seed, "max_eval": o.max_eval}
    return DeployOptions(
        targets=tuple(t.given for t in matrix.targets),
        quantize=QuantizeOptions(**{k: v for k, v in given.items() if v is not None}),
        eval_dir=matrix.evaluation,
        labels=labels,
    )


class _Run:
    """One matrix run: prepares models on the host, schedules device jobs, writes each cell when it completes."""

    def __init__(self, matrix: Matrix, out: Path, progress: Progress) -> None:
        self.matrix, self.out, self.progress = matrix, out, progress
        self.eval_set = _eval_set(matrix)
        self.cells = {
            (m.name, t.name): Cell(m.name, t.name, out / "cells" / m.name / t.name)
            for m in matrix.models
            for t in matrix.targets
        }
        self.queues: dict[str, collections.deque[Job]] = {t.name: collections.deque() for t in matrix.targets}
        self.live = {d.name: d for d in matrix.devices}
        self.lost: dict[str, str] = {}
        self.strikes: collections.Counter[str] = collections.Counter()
        self.jobs_done: collections.Counter[str] = collections.Counter()
        self.busy: dict[Any, tuple[MatrixDevice, Job]] = {}
        self.started: dict[Any, float] = {}  # task -> when it was submitted (perf_counter)
        self.limits: dict[Any, JobLimit] = {}  # device task -> its time limit and what it waits for
        self.busy_s: dict[str, float] = collections.defaultdict(float)  # device -> seconds of its jobs
        self.prepare_s: dict[str, float] = {}
        self.device_span: list[float] = []  # first device job submitted, last one finished

    def run(self, address: str | None) -> MatrixResult:
        start = time.perf_counter()
        with ray_session(self.matrix, address) as ray:
            self.ray = ray
            prepares = {self._prepare(m.name): m.name for m in self.matrix.models}
            self.started.update({ref: time.perf_counter() for ref in prepares})
            while prepares or self.busy or any(self.queues.values()):
                waiting = [*prepares, *self.busy]
                ready = ray.wait(waiting, num_returns=1, timeout=TICK_S)[0] if waiting else []
                for ref in ready:
                    if ref in prepares:
                        self.prepare_s[prepares[ref]] = round(time.perf_counter() - self.started.pop(ref), 2)
                        self._prepared(prepares.pop(ref), ref)
                    else:
                        self._finished(ref)
                self._drop_dead_devices()
                self._drop_hung_tasks()
                self._dispatch()
        wall = round(time.perf_counter() - start, 2)
        return self._report(wall)

    # ------------------------------------------------------------------ host work

    def _prepare(self, name: str) -> Any:
        model = next(m for m in self.matrix.models if m.name == name)
        self.progress(f"convert + quantize {name} (host task)")
        files = [str(f) for f in self.eval_set.files]
        opts = deploy_options(self.matrix, model.labels)
        return submit_prepare(self.ray, model.source, str(self.matrix.calibration), str(self.out / "models" / name),
                              opts, files)  # fmt: skip

    def _prepared(self, model: str, ref: Any) -> None:
        try:
            found = self.ray.get(ref)
        except Exception as exc:  # the model cannot be prepared: every cell of it says why, none claims a result
            reason = _one_line(exc)
            for t in self.matrix.targets:
                self._give_up(self.cells[(model, t.name)], "error", f"convert/quantize failed: {reason}")
            return
        for t in self.matrix.targets:
            self._open_cell(self.cells[(model, t.name)], found[t.name])

    def _open_cell(self, cell: Cell, prepared: dict[str, Any]) -> None:
        cell.prepared = prepared
        cell.key = self._cell_key(cell)
        if _cell_intact(cell.folder, cell.key):
            cell.status = "reused"
            self.progress(f"{cell.model} x {cell.target}: reused (unchanged inputs)")
            return
        devices = [d for d in self.matrix.devices_of(cell.target) if d.name in self.live]
        if not devices:
            self._give_up(cell, "lost", "every device of the target was lost")
            return
        files = list(self.eval_set.files)
        cell.shards = [tuple(part) for part in np.array_split(np.array(files, dtype=object), len(devices)) if len(part)]
        with tempfile.TemporaryDirectory(prefix="edgeship-matrix-") as tmp:
            folder, _, _, _ = stage_candidate(Path(prepared["path"]), Path(tmp) / "bundle")
            cell.bundle = {f.name: f.read_bytes() for f in folder.iterdir()}
        queue = self.queues[cell.target]
        queue.extend(Job(cell, "shard", i) for i in range(len(cell.shards)))
        queue.append(Job(cell, "bench"))

    def _cell_key(self, cell: Cell) -> str:
        devices = sorted((d.name, d.spec.to_dict()) for d in self.matrix.devices_of(cell.target))
        target = next(t.profile for t in self.matrix.targets if t.name == cell.target)
        key = {
            "edgeship": __version__,
            "code": code_fingerprint(),
            "candidate_sha256": sha256_file(Path(cell.prepared["path"])),
            "target": target.to_dict(),
            "images": self.eval_set.digest(),
            "devices": devices,
            "bench_runs": self.matrix.options.bench_runs,
        }
        return digest(key)

    # ------------------------------------------------------------------ device work

    def _dispatch(self) -> None:
        busy = {d.name for d, _ in self.busy.values()}
        for device in [d for d in self.matrix.devices if d.name in self.live and d.name not in busy]:
            queue = self.queues[device.target]
            if queue:
                job = queue.popleft()
                ref = self._submit(device, job)
                self.busy[ref] = (device, job)
                self.started[ref] = time.perf_counter()
                self.device_span = self.device_span[:1] or [self.started[ref]]

    def _submit(self, device: MatrixDevice, job: Job) -> Any:
        cell = job.cell
        target = next(t.profile for t in self.matrix.targets if t.name == cell.target)
        self.progress(f"{cell.model} x {cell.target}: {job.kind} {job.index} on {device.name}")
        limit = JobLimit(self.matrix.options.job_timeout_s, _waited_for(device, job))
        if job.kind == "bench":
            model = Path(cell.prepared["path"])
            ref = submit_device(self.ray, device, limit, bench_on_device, device.spec, target, model.name,
                                model.read_bytes(), self.matrix.options.bench_runs)  # fmt: skip
        else:
            images = [(f"{i:06d}{f.suffix.lower()}", f.read_bytes()) for i, f in enumerate(cell.shards[job.index])]
            ref = submit_device(self.ray, device, limit, collect_shard, device.spec, target, cell.bundle, images)
        self.limits[ref] = limit
        return ref

    def _finished(self, ref: Any) -> None:
        device, job = self.busy.pop(ref)
        self.limits.pop(ref, None)
        now = time.perf_counter()
        self.busy_s[device.name] += now - self.started.pop(ref, now)
        self.device_span = [*self.device_span[:1], now]
        try:
            value = self.ray.get(ref)
        except Exception as exc:
            self._failed(device, job, exc)
            return
        self.jobs_done[device.name] += 1
        self.strikes[device.name] = 0
        if job.kind == "bench":
            job.cell.bench = value
        else:
            job.cell.runs[job.index] = value
            job.cell.ran_on[job.index] = device.name
        if job.cell.complete and job.cell.status == "pending":
            self._write_cell(job.cell)

    def _failed(self, device: MatrixDevice, job: Job, exc: BaseException) -> None:
        reason = lost_reason(self.ray, exc)
        if reason is None:  # the job itself is wrong (not the device): the cell says why, no other device retries
            self._give_up(job.cell, "error", f"{job.kind} on {device.name}: {_one_line(exc)}")
            return
        self.strikes[device.name] += 1
        if hung(exc) or self.strikes[device.name] >= STRIKES:  # a hung device gets no second job
            self._lose(device, reason)
        self._requeue(device, job)
        self._strand(device.target)

    def _requeue(self, device: MatrixDevice, job: Job) -> None:
        """The failed job goes first to another live device of its target, if one is idle or will be."""
        others = [d for d in self.matrix.devices_of(device.target) if d.name in self.live and d.name != device.name]
        queue = self.queues[device.target]
        if others:
            queue.appendleft(job)
        else:
            queue.append(job)  # the only device left: it tries again after its other work

    def _lose(self, device: MatrixDevice, reason: str) -> None:
        if self.live.pop(device.name, None) is not None:
            self.lost[device.name] = reason
            self.progress(f"device {device.name} lost: {reason}")

    def _drop_dead_devices(self) -> None:
        """Devices whose node died: lost; their running job moves to the target's other devices."""
        offered = live_devices(self.ray)
        for device in [d for d in self.live.values() if d.resource not in offered]:
            self._lose(device, "its Ray node is gone")
            for ref, (d, job) in list(self.busy.items()):
                if d.name == device.name:
                    self.busy.pop(ref)
                    self.limits.pop(ref, None)
                    _cancel(self.ray, ref)
                    self.queues[d.target].appendleft(job)
            self._strand(device.target)

    def _drop_hung_tasks(self) -> None:
        """Tasks still running well past their limit (their own watchdog could not end them): the device is
        lost, the task cancelled, its job moves to the target's other devices."""
        now = time.perf_counter()
        for ref, (device, job) in list(self.busy.items()):
            limit = self.limits[ref]
            if now - self.started[ref] > limit.seconds + GRACE_S:
                self.busy.pop(ref)
                self.limits.pop(ref)
                _cancel(self.ray, ref)
                self._lose(device, f"{limit.message()}; its task did not end either")
                self._requeue(device, job)
                self._strand(device.target)

    def _strand(self, target: str) -> None:
        """A target without live devices: its queued cells are reported lost (a rerun redoes them)."""
        if any(d.name in self.live for d in self.matrix.devices_of(target)):
            return
        queue = self.queues[target]
        while queue:
            self._give_up(queue.popleft().cell, "lost", "every device of the target was lost")

    def _give_up(self, cell: Cell, status: str, reason: str) -> None:
        if cell.status == "pending":
            cell.status, cell.reason = status, reason
        for queue in self.queues.values():
            for job in [j for j in queue if j.cell is cell]:
                queue.remove(job)

    # ------------------------------------------------------------------ results

    def _write_cell(self, cell: Cell) -> None:
        """The drift check of the merged shards (the same figures as one device), its bench, then cell.json."""
        target = next(t.profile for t in self.matrix.targets if t.name == cell.target)
        logits = np.concatenate([cell.runs[i].logits for i in range(len(cell.shards))])
        merged = _Merged(logits, [cell.runs[i] for i in range(len(cell.shards))])
        try:
            model = next(m for m in self.matrix.models if m.name == cell.model)
            from edgeship import zoo

            result = verify(zoo.resolve(model.source), Path(cell.prepared["path"]), self.eval_set, target=target,
                            device=merged, reference=cell.prepared["reference"])  # fmt: skip
        except Exception as exc:
            self._give_up(cell, "error", f"drift check: {_one_line(exc)}")
            return
        if cell.folder.exists():
            shutil.rmtree(cell.folder)  # an incomplete or outdated cell of this matrix folder
        result.save(cell.folder)
        atomic_write_json(cell.folder / BENCH_FILE, cell.bench)
        files = {f.name: [f.stat().st_size, sha256_file(f)] for f in sorted(cell.folder.iterdir()) if f.is_file()}
        shards = [{"device": cell.ran_on[i], "images": len(cell.shards[i])} for i in range(len(cell.shards))]
        atomic_write_json(cell.folder / CELL_FILE, {"key": cell.key, "files": files, "model": cell.model,
                          "target": cell.target, "candidate": _public(cell.prepared), "shards": shards})  # fmt: skip
        cell.status = "done"
        self.progress(f"{cell.model} x {cell.target}: {'PASS' if result.passed else 'FAIL'} (written)")

    def _report(self, wall: float) -> MatrixResult:
        devices = {
            d.name: {
                "target": d.target,
                "node": d.node,
                "resource": d.resource,
                "status": "lost" if d.name in self.lost else "ok",
                "reason": self.lost.get(d.name),
                "jobs_done": self.jobs_done[d.name],
                "busy_s": round(self.busy_s[d.name], 2),
            }
            for d in self.matrix.devices
        }
        span = self.device_span[1] - self.device_span[0] if len(self.device_span) == 2 else 0.0
        timings = {"prepare_s": self.prepare_s, "device_span_s": round(span, 2)}
        cells = write_reports(self.out, self.matrix, list(self.cells.values()), devices, wall, timings)
        return MatrixResult(self.out, cells, devices, wall)


class _Merged:
    """The drift check's device: the shards' outputs, merged in image order (verify computes the figures)."""

    def __init__(self, logits: np.ndarray, runs: list[ShardRun]) -> None:
        self.logits, self.runs = logits, runs

    def collect(self, bundle: Path, files: Any, **_: Any) -> Collected:
        if len(files) != len(self.logits):
            raise InputError(f"the shards hold {len(self.logits)} outputs for {len(files)} images")
        where = " + ".join(dict.fromkeys(r.where for r in self.runs))
        return Collected(self.logits, RuntimeInfo.from_dict(self.runs[0].runtime), where)


def cell_record(folder: Path) -> dict[str, Any]:
    try:
        record = json.loads((folder / CELL_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _cell_intact(folder: Path, key: str) -> bool:
    record = cell_record(folder)
    files = record.get("files")
    if record.get("key") != key or not isinstance(files, dict) or not files:
        return False
    try:
        return all((folder / n).stat().st_size == s and sha256_file(folder / n) == h for n, (s, h) in files.items())
    except (OSError, TypeError, ValueError):
        return False


def _waited_for(device: MatrixDevice, job: Job) -> str:
    """What a device job waits for, as its timeout names it."""
    cell = job.cell
    if job.kind == "bench":
        work = f"the benchmark of {cell.model} x {cell.target}"
    else:
        shard = f"{job.index + 1}/{len(cell.shards)}"
        work = f"drift-check shard {shard} of {cell.model} x {cell.target} ({len(cell.shards[job.index])} images)"
    return f"device {device.name} (ssh {device.spec.host}): {work}"


def _one_line(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"


def _public(prepared: dict[str, Any]) -> dict[str, Any]:
    """What cell.json records of the prepared model (not the reference outputs: outputs.npz holds them)."""
    return {k: v for k, v in prepared.items() if k != "reference"}


def _cancel(ray: Any, ref: Any) -> None:
    try:
        ray.cancel(ref, force=True)
    except Exception:  # its node is gone: nothing left to cancel
        log.debug("cancel of a task on a dead node", exc_info=True)
