"""Where a drift check runs: one :class:`Device` protocol, built in one place from options.

A device runs a staged bundle (model, card, labels under fixed names) on image files
and returns the dequantized outputs and how it ran. This machine runs in-process; an
ssh device and a qemu-emulated aarch64 get the images copied under fixed names (the
user's file names never reach a device). Android has no Python for drift checks: adb
is for ``bench`` only (:mod:`edgeship.targets.adb`).
"""

from __future__ import annotations

import platform
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from edgeship._progress import Progress
from edgeship.errors import DeviceError, InputError
from edgeship.runtime import candidate as device_side  # looked up at call time: tests stand in for it
from edgeship.runtime.bench_report import RuntimeInfo
from edgeship.targets.emulate import EmulatedDevice, cpu_for
from edgeship.targets.profile import Arch, Target
from edgeship.targets.remote import SshCollector
from edgeship.targets.ssh import SshDevice, SshTarget

#: Why drift checks refuse adb (verify and deploy parse --adb and explain with this).
NO_ADB_DRIFT_CHECKS = (
    "drift checks over adb need Python on the phone, which Android does not have; use --emulate "
    "for android-arm64-cpu (same XNNPACK aarch64 kernels) and `edgeship bench --adb` for phone "
    "latency"
)


@dataclass(frozen=True)
class Collected:
    """A device's outputs on the images (one row each, in the order given) and how it ran."""

    logits: np.ndarray
    runtime: RuntimeInfo
    where: str


class Device(Protocol):
    """Runs a staged bundle on image files."""

    def collect(
        self,
        bundle: Path,
        files: Sequence[Path],
        *,
        threads: int | None,
        use_xnnpack: bool,
        progress: Progress | None = None,
    ) -> Collected: ...


class LocalDevice:
    """This machine, in-process."""

    def collect(
        self,
        bundle: Path,
        files: Sequence[Path],
        *,
        threads: int | None,
        use_xnnpack: bool,
        progress: Progress | None = None,
    ) -> Collected:
        logits, runtime = device_side.candidate_outputs(
            bundle, files, num_threads=threads, use_xnnpack=use_xnnpack, progress=progress
        )
        return Collected(logits, RuntimeInfo.from_dict(runtime), f"this machine ({platform.machine()})")


class StagedDevice:
    """A device that needs the images copied to it (ssh, emulated): they go under fixed names.

    Args:
        runner: An object with ``collect_outputs(bundle, image_dir, threads=, use_xnnpack=)``
            returning ``(logits, names, runtime)`` (:class:`~edgeship.targets.remote.SshCollector`,
            :class:`~edgeship.targets.emulate.EmulatedDevice`).
        where: How reports name it, given the runtime it reported.
    """

    def __init__(self, runner: Any, where: Callable[[dict[str, Any]], str]) -> None:
        self.runner = runner
        self.describe_where = where

    def collect(
        self,
        bundle: Path,
        files: Sequence[Path],
        *,
        threads: int | None,
        use_xnnpack: bool,
        progress: Progress | None = None,
    ) -> Collected:
        with tempfile.TemporaryDirectory(prefix="edgeship-images-") as tmp:
            expected = stage_images(files, Path(tmp))
            if progress:
                progress(f"run candidate on {self.describe_where({})}", None, None)
            logits, names, runtime = self.runner.collect_outputs(
                bundle, Path(tmp), threads=threads, use_xnnpack=use_xnnpack
            )
        if list(names) != expected:
            raise DeviceError(
                f"the device ran {len(names)} of {len(expected)} images or in another order; "
                "its image reader differs from this machine's"
            )
        return Collected(logits, RuntimeInfo.from_dict(runtime), self.describe_where(runtime))


def stage_images(files: Sequence[Path], dest: Path) -> list[str]:
    """Copy ``files`` into ``dest`` as ``000000.jpg``...; return the names in order."""
    names = [f"{i:06d}{f.suffix.lower()}" for i, f in enumerate(files)]
    for f, name in zip(files, names):
        shutil.copyfile(f, dest / name)
    return names


@dataclass(frozen=True)
class DeviceSpec:
    """Where drift checks run, as options (what the CLI parses and deploy keys its cache on).

    ``kind``: ``local`` (this machine), ``ssh`` (``host`` = user@host[:port], and/or ``hosts``
    naming one device per target), ``emulate`` (qemu-aarch64) or ``adb`` (refused for drift checks).
    ``host`` serves every ssh target that ``hosts`` does not name.
    """

    kind: str = "local"
    host: str | None = None
    identity: Path | None = None
    known_hosts: Path | None = None
    accept_new_host_key: bool = False
    python: str = "python3"
    pip_args: tuple[str, ...] = field(default=())
    #: (target name, user@host[:port]) pairs: a device per target.
    hosts: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        if self.kind not in ("local", "ssh", "emulate", "adb"):
            raise InputError(f"device kind must be local, ssh, emulate or adb, got {self.kind!r}")
        object.__setattr__(self, "hosts", tuple((str(t), str(h)) for t, h in self.hosts))
        if self.kind == "ssh" and not self.host and not self.hosts:
            raise InputError("an ssh device needs a host (user@host[:port], or TARGET=user@host[:port])")
        names = [t for t, _ in self.hosts]
        if len(set(names)) != len(names):
            twice = sorted({t for t in names if names.count(t) > 1})
            raise InputError(f"--host names a target twice: {', '.join(twice)}")
        object.__setattr__(self, "pip_args", tuple(self.pip_args))

    def host_for(self, target: str) -> str | None:
        """The device of ``target``: its own ``hosts`` entry, else ``host``."""
        return dict(self.hosts).get(target, self.host)

    def for_target(self, target: str) -> DeviceSpec:
        """This spec with ``host`` resolved for ``target`` and no per-target table (what one drift check uses)."""
        if self.kind != "ssh":
            return self
        host = self.host_for(target)
        return replace(self, kind="ssh" if host else "local", host=host, hosts=())

    def to_dict(self) -> dict[str, Any]:
        return {
            k: (
                str(v)
                if isinstance(v, Path)
                else [list(x) if isinstance(x, tuple) else x for x in v]
                if isinstance(v, tuple)
                else v
            )
            for k, v in self.__dict__.items()
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeviceSpec:
        d = dict(d)
        for key in ("identity", "known_hosts"):
            d[key] = Path(d[key]) if d.get(key) else None
        d["hosts"] = tuple(tuple(pair) for pair in d.get("hosts", ()))
        return cls(**d)


def parse_hosts(values: Sequence[str]) -> tuple[str | None, tuple[tuple[str, str], ...]]:
    """``--host`` values: ``user@host[:port]`` (at most one) and ``TARGET=user@host[:port]`` (one per target)."""
    bare = [v for v in values if "=" not in v]
    if len(bare) > 1:
        raise InputError(
            f"--host given {len(bare)} times without a target: name the target of each device "
            "(--host rpi4-aarch64=pi@host1 --host rpi-armv7=pi@host2)"
        )
    pairs = []
    for value in values:
        if "=" in value:
            target, _, host = value.partition("=")
            if not target or not host:
                raise InputError(f"--host {value!r}: expected TARGET=user@host[:port]")
            pairs.append((target, host))
    return (bare[0] if bare else None), tuple(pairs)


def make_device(spec: DeviceSpec | None, target: Target) -> tuple[Device, str | None]:
    """The device a drift check for ``target`` runs on, and a note when it is not the one asked for.

    One rule for every command: emulation runs aarch64 targets; any other target runs on
    this machine, said in the note (deploy's several targets share one ``--emulate``).
    An ssh device serves the targets reached over ssh (its own ``TARGET=`` device first);
    others run here, noted likewise.
    """
    spec = spec or DeviceSpec()
    if spec.kind == "adb":
        raise InputError(NO_ADB_DRIFT_CHECKS)
    if spec.kind == "emulate":
        if target.arch != Arch.AARCH64:
            return LocalDevice(), (
                f"--emulate runs aarch64 only: {target.name} ({target.arch.value}) ran on this machine"
            )

        return StagedDevice(EmulatedDevice(cpu=cpu_for(target.name)), _emulated_where), None
    if spec.kind == "ssh":
        if target.access.value != "ssh":
            return LocalDevice(), f"{target.name} is not reached over ssh: it ran on this machine"
        one = spec.for_target(target.name)
        if one.kind != "ssh":
            return LocalDevice(), f"no --host for {target.name}: it ran on this machine"
        return StagedDevice(ssh_collector(one, target), lambda rt: _ssh_where(one, rt)), None
    return LocalDevice(), None


def _ssh_where(spec: DeviceSpec, runtime: dict[str, Any]) -> str:
    """``ssh pi@host:2222 (aarch64 emulated, Python 3.11.2, ai_edge_litert 2.1.0)``: what reports name."""
    parts = [f"{runtime.get('machine', '?')}{' emulated' if runtime.get('emulated') else ''}"]
    if runtime.get("python"):
        parts.append(f"Python {runtime['python']}")
    if runtime.get("interpreter"):
        parts.append(f"{runtime['interpreter']} {runtime.get('interpreter_version') or ''}".strip())
    return f"ssh {spec.host} ({', '.join(parts)})" if runtime else f"ssh {spec.host}"


def _emulated_where(runtime: dict[str, Any]) -> str:
    return f"qemu-user {runtime.get('machine', 'aarch64')} ({runtime.get('cpu', 'emulated')})"


def ssh_device(spec: DeviceSpec, target: str | None = None) -> Any:
    """The :class:`~edgeship.targets.ssh.SshDevice` of an ssh spec (for ``target``'s own host when named)."""

    host = spec.host_for(target) if target else spec.host
    if not host:
        raise InputError(f"no --host for {target}: pass --host {target}=user@host[:port]")
    return SshDevice(
        SshTarget.parse(
            host,
            identity=spec.identity,
            known_hosts=spec.known_hosts,
            accept_new_host_key=spec.accept_new_host_key,
            python=spec.python,
        )
    )


def ssh_collector(spec: DeviceSpec, target: Target) -> Any:
    return SshCollector(ssh_device(spec), target, pip_args=spec.pip_args)
