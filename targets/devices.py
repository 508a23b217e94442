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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from edgeship._progress import Progress
from edgeship.errors import DeviceError, InputError
from edgeship.targets.profile import Arch, Target

#: Why drift checks refuse adb (verify and deploy parse --adb and explain with this).
NO_ADB_DRIFT_CHECKS = ("drift checks over adb need Python on the phone, which Android does not have; use --emulate "
                       "for android-arm64-cpu (same XNNPACK aarch64 kernels) and `edgeship bench --adb` for phone "
                       "latency")


@dataclass(frozen=True)
class Collected:
    """A device's outputs on the images (one row each, in the order given) and how it ran."""

    logits: np.ndarray
    runtime: dict[str, Any]
    where: str


class Device(Protocol):
    """Runs a staged bundle on image files."""

    def collect(self, bundle: Path, files: Sequence[Path], *, threads: int | None, use_xnnpack: bool,
                progress: Progress | None = None) -> Collected: ...


class LocalDevice:
    """This machine, in-process."""

    def collect(self, bundle: Path, files: Sequence[Path], *, threads: int | None, use_xnnpack: bool,
                progress: Progress | None = None) -> Collected:
        from edgeship.runtime.candidate import candidate_outputs

        logits, runtime = candidate_outputs(bundle, files, num_threads=threads, use_xnnpack=use_xnnpack,
                                            progress=progress)
        return Collected(logits, runtime, f"this machine ({platform.machine()})")


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

    def collect(self, bundle: Path, files: Sequence[Path], *, threads: int | None, use_xnnpack: bool,
                progress: Progress | None = None) -> Collected:
        with tempfile.TemporaryDirectory(prefix="edgeship-images-") as tmp:
            expected = stage_images(files, Path(tmp))
            if progress:
                progress(f"run candidate on {self.describe_where({})}", None, None)
            logits, names, runtime = self.runner.collect_outputs(bundle, Path(tmp), threads=threads,
                                                                 use_xnnpack=use_xnnpack)
        if list(names) != expected:
            raise DeviceError(f"the device ran {len(names)} of {len(expected)} images or in another order; "
                              "its image reader differs from this machine's")
        return Collected(logits, runtime, self.describe_where(runtime))


def stage_images(files: Sequence[Path], dest: Path) -> list[str]:
    """Copy ``files`` into ``dest`` as ``000000.jpg``...; return the names in order."""
    names = [f"{i:06d}{f.suffix.lower()}" for i, f in enumerate(files)]
    for f, name in zip(files, names):
        shutil.copyfile(f, dest / name)
    return names


@dataclass(frozen=True)
class DeviceSpec:
    """Where drift checks run, as options (what the CLI parses and deploy keys its cache on).

    ``kind``: ``local`` (this machine), ``ssh`` (``host`` = user@host[:port]), ``emulate``
    (qemu-aarch64) or ``adb`` (refused for drift checks).
    """

    kind: str = "local"
    host: str | None = None
    identity: Path | None = None
    known_hosts: Path | None = None
    accept_new_host_key: bool = False
    python: str = "python3"
    pip_args: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.kind not in ("local", "ssh", "emulate", "adb"):
            raise InputError(f"device kind must be local, ssh, emulate or adb, got {self.kind!r}")
        if self.kind == "ssh" and not self.host:
            raise InputError("an ssh device needs a host (user@host[:port])")
        object.__setattr__(self, "pip_args", tuple(self.pip_args))

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeviceSpec:
        d = dict(d)
        for key in ("identity", "known_hosts"):
            d[key] = Path(d[key]) if d.get(key) else None
        return cls(**d)


def make_device(spec: DeviceSpec | None, target: Target) -> tuple[Device, str | None]:
    """The device a drift check for ``target`` runs on, and a note when it is not the one asked for.

    One rule for every command: emulation runs aarch64 targets; any other target runs on
    this machine, said in the note (deploy's several targets share one ``--emulate``).
    An ssh device serves the targets reached over ssh; others run here, noted likewise.
    """
    spec = spec or DeviceSpec()
    if spec.kind == "adb":
        raise InputError(NO_ADB_DRIFT_CHECKS)
    if spec.kind == "emulate":
        if target.arch != Arch.AARCH64:
            return LocalDevice(), f"--emulate runs aarch64 only: {target.name} ({target.arch.value}) ran on this machine"
        from edgeship.targets.emulate import EmulatedDevice

        return StagedDevice(EmulatedDevice(), _emulated_where), None
    if spec.kind == "ssh":
        if target.access.value != "ssh":
            return LocalDevice(), f"{target.name} is not reached over ssh: it ran on this machine"
        return StagedDevice(ssh_collector(spec, target), lambda rt: f"ssh {spec.host} ({rt.get('machine', '?')})"), None
    return LocalDevice(), None


def _emulated_where(runtime: dict[str, Any]) -> str:
    return f"qemu-user {runtime.get('machine', 'aarch64')} ({runtime.get('cpu', 'emulated')})"


def ssh_device(spec: DeviceSpec) -> Any:
    """The :class:`~edgeship.targets.ssh.SshDevice` of an ssh spec."""
    from edgeship.targets.ssh import SshDevice, SshTarget

    return SshDevice(SshTarget.parse(str(spec.host), identity=spec.identity, known_hosts=spec.known_hosts,
                                     accept_new_host_key=spec.accept_new_host_key, python=spec.python))


def ssh_collector(spec: DeviceSpec, target: Target) -> Any:
    from edgeship.targets.remote import SshCollector

    return SshCollector(ssh_device(spec), target, pip_args=spec.pip_args)
