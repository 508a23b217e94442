"""Ray for ``edgeship matrix``: the session (local or joined), and the tasks it runs.

Host work (convert + quantize + the float reference of one model) is a task sized by CPU and memory, placed on
the driver's node because it writes the output folder there. Device work (a shard of a drift check, a
benchmark) is a task holding the device's custom resource ``device:NAME`` (one unit), so a device runs one job
at a time, on the node that declared it. Ray is imported here only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeship._deps import require
from edgeship.errors import DeviceError, DeviceTimeoutError, InputError
from edgeship.matrix_file import Matrix, MatrixDevice

#: A prepare task's size: convert and quantize use about a core and TensorFlow's memory.
HOST_CPUS = 1.0
HOST_MEMORY = 2 * 2**30


@dataclass(frozen=True)
class ShardRun:
    """A device's outputs on one shard of a target's evaluation images."""

    logits: Any  # np.ndarray, one row per image, in the shard's order
    runtime: dict[str, Any]
    where: str


def ray_module() -> Any:
    return require("ray", purpose="run edgeship matrix")


@contextlib.contextmanager
def session(matrix: Matrix, address: str | None) -> Iterator[Any]:
    """Ray started here (every device a resource of this node) or joined at ``address`` (the nodes declare
    their devices with ``ray start --resources``); the devices are checked before any work."""
    ray = ray_module()
    if address is None:
        resources = {d.resource: 1.0 for d in matrix.devices}
        # "local": a new instance even when a `ray start` cluster runs on this machine (ray.init() alone would join it)
        ray.init("local", resources=resources, include_dashboard=False, log_to_driver=False, configure_logging=False)
    else:
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise InputError(f"cannot join the Ray cluster at {address}: {str(exc).splitlines()[0]}") from exc
    try:
        check_devices(ray, matrix.devices)
        yield ray
    finally:
        ray.shutdown()


def check_devices(ray: Any, devices: Sequence[MatrixDevice]) -> None:
    """Every device is a resource of a live node, of the node the matrix file names when it names one."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    for d in devices:
        holders = [n for n in nodes if n.get("Resources", {}).get(d.resource, 0) >= 1]
        if not holders:
            raise InputError(
                f"device {d.name}: no node of the Ray cluster offers the resource {d.resource}; start the node "
                f"that reaches it with ray start ... --resources '{{\"{d.resource}\": 1}}'"
            )
        if d.node and not any(d.node in (n.get("NodeName"), n.get("NodeManagerAddress")) for n in holders):
            raise InputError(f"device {d.name}: the matrix file attaches it to node {d.node}, but {d.resource} is "
                             f"offered by {', '.join(str(n.get('NodeName')) for n in holders)}")  # fmt: skip


def live_devices(ray: Any) -> set[str]:
    """The device resources live nodes offer now (a killed node's devices drop out)."""
    return {k for n in ray.nodes() if n.get("Alive") for k in n.get("Resources", {}) if k.startswith("device:")}


def driver_node(ray: Any) -> Any:
    """A scheduling strategy that keeps a task on this (the driver's) node."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)


def submit_prepare(ray: Any, *args: Any) -> Any:
    task = ray.remote(prepare_model).options(
        num_cpus=HOST_CPUS, memory=HOST_MEMORY, max_retries=1, scheduling_strategy=driver_node(ray)
    )
    return task.remote(*args)


def submit_device(ray: Any, device: MatrixDevice, limit: JobLimit, fn: Any, *args: Any) -> Any:
    """``fn(*args)`` as a task holding ``device``'s resource, ended after ``limit.seconds`` (:func:`within`);
    not retried by Ray (the matrix moves the work)."""
    task = ray.remote(within).options(num_cpus=0, resources={device.resource: 1.0}, max_retries=0)
    return task.remote(limit, fn, *args)


@dataclass(frozen=True)
class JobLimit:
    """How long a device job may take, and what it waits for (named in the error when the time runs out)."""

    seconds: float
    what: str

    def message(self) -> str:
        return f"{self.what} did not finish within {self.seconds:g} s (the device is taken as hung)"


def within(limit: JobLimit, fn: Any, *args: Any) -> Any:
    """``fn(*args)`` in this worker; once ``limit`` runs out, the worker's child processes (the ssh and scp
    clients waiting on the device, its clean-up included) are ended every second until ``fn`` returns, and
    :class:`DeviceTimeoutError` names what was waited for."""
    done, expired = threading.Event(), threading.Event()

    def watch() -> None:
        if done.wait(limit.seconds):
            return
        expired.set()
        while not done.is_set():
            end_children(os.getpid())
            done.wait(1.0)

    threading.Thread(target=watch, name="edgeship-job-limit", daemon=True).start()
    try:
        return fn(*args)
    except Exception as exc:
        if expired.is_set():
            raise DeviceTimeoutError(limit.message()) from exc
        raise
    finally:
        done.set()


def end_children(pid: int) -> None:
    """SIGKILL every descendant of ``pid`` (read from /proc; where there is no /proc, the ssh layer's own
    timeouts end them later)."""
    for child in _descendants(pid):
        with contextlib.suppress(OSError):
            os.kill(child, signal.SIGKILL)


def _descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            parents.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def hung(exc: BaseException) -> bool:
    """Whether a failed device task ran out of its time (:func:`within`)."""
    return isinstance(exc, DeviceTimeoutError) or isinstance(getattr(exc, "cause", None), DeviceTimeoutError)


def lost_reason(ray: Any, exc: BaseException) -> str | None:
    """Why a failed device task means its device is gone (unreachable, its node died), else None."""
    cause = getattr(exc, "cause", None)
    if isinstance(exc, DeviceError) or isinstance(cause, DeviceError):
        return str(cause or exc).splitlines()[0]
    if isinstance(exc, ray.exceptions.RayError) and not isinstance(exc, ray.exceptions.RayTaskError):
        return f"its Ray node or worker stopped ({type(exc).__name__})"  # a system failure, not the job's own error
    return None


# ------------------------------------------------------------------------------------- task bodies


def prepare_model(model: str, calibration: str, out: str, deploy_options: Any, files: Sequence[str]) -> dict[str, Any]:
    """Host task: convert + quantize (deploy's stages and cache), then the float reference per preprocessing."""
    import json

    from edgeship import zoo
    from edgeship.deploy import prepare
    from edgeship.verify.drift import reference_outputs

    models = prepare(model, calibration, out, deploy_options)
    source = zoo.resolve(model)
    references: dict[str, Any] = {}
    found: dict[str, Any] = {}
    for target, m in models.items():
        key = json.dumps(m.card.reference_preprocessing.to_dict(), sort_keys=True)
        if key not in references:
            references[key] = reference_outputs(source, [Path(f) for f in files], m.card)
        q = m.quantized
        found[target] = {
            "path": str(m.path),
            "variant": m.variant,
            "reference": references[key],
            "sqnr_db": q.report.figures.sqnr_db if q is not None else None,
            "size_bytes": m.path.stat().st_size,
        }
    return found


def collect_shard(spec: Any, target: Any, bundle: dict[str, bytes], images: Sequence[tuple[str, bytes]]) -> ShardRun:
    """Device task: the candidate on one shard of images, on the ssh device ``spec`` (from the node that
    reaches it; bundle and images travel as bytes, so the node needs no shared folder)."""
    from edgeship.targets.devices import StagedDevice, ssh_collector

    with tempfile.TemporaryDirectory(prefix="edgeship-shard-") as tmp:
        folder, files = _unpack(Path(tmp), bundle, images)
        device = StagedDevice(ssh_collector(spec, target), lambda rt: _where(spec, rt))
        ran = device.collect(folder, files, threads=target.execution.threads, use_xnnpack=target.execution.use_xnnpack)
    return ShardRun(ran.logits, ran.runtime.to_dict(), ran.where)


def bench_on_device(spec: Any, target: Any, name: str, model: bytes, runs: int) -> dict[str, Any]:
    """Device task: the deployed model benchmarked on the device with the target's settings (bench.json)."""
    from edgeship.targets.devices import ssh_device
    from edgeship.targets.remote import device_bench

    with tempfile.TemporaryDirectory(prefix="edgeship-bench-") as tmp:
        path = Path(tmp) / name
        path.write_bytes(model)
        doc = device_bench(ssh_device(spec), target, [path], runs=runs, pip_args=spec.pip_args)
    return doc.to_dict()


def _unpack(tmp: Path, bundle: dict[str, bytes], images: Sequence[tuple[str, bytes]]) -> tuple[Path, list[Path]]:
    folder = tmp / "bundle"
    folder.mkdir()
    for name, data in bundle.items():
        (folder / name).write_bytes(data)
    (tmp / "images").mkdir()
    files = []
    for name, data in images:
        files.append(tmp / "images" / name)
        files[-1].write_bytes(data)
    return folder, files


def _where(spec: Any, runtime: dict[str, Any]) -> str:
    machine = f"{runtime.get('machine', '?')}{' emulated' if runtime.get('emulated') else ''}"
    return f"ssh {spec.host} ({machine})" if runtime else f"ssh {spec.host}"
