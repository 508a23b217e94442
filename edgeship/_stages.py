"""Cached stages, published by swapping: a stage folder is always a whole stage, old or new.

A stage is built in a private folder beside its place (``.<name>.staging-<owner>-*``), its record
(``.stage.json``: key, seconds, every file's size and sha256) written last, and only then swapped
with the old stage in one ``renameat2(RENAME_EXCHANGE)`` (two renames where the system has no
exchange: a killed run's moved-aside stage is put back by the next run). The old stage is deleted
only after the new one is in place, so a run killed at any moment leaves every stage folder
complete and matching its record.

The report (``deploy.json``, ``report.html``, ``report.md``, ``report/``) describes the stages it was
written with, so it is retracted before the first stage of a run is swapped and written again at the
run's end: a run killed in between leaves no report rather than one whose verdict is for other files.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeship._cache_keys import stage_digest
from edgeship._files import sha256_file
from edgeship._io import atomic_write_json, owner_tag, pid_alive, remove_entry
from edgeship._ownership import STAGE_ENTRIES, STAGE_MARK, SUMMARY, Ownership, files_under, read_record
from edgeship._paths import relative
from edgeship._progress import Progress
from edgeship.errors import InputError

log = logging.getLogger(__name__)

_PRIVATE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>staging|old)-(?P<pid>\d+)\.(?P<host>[0-9a-f]{8})-[0-9a-f]{8}$")
#: What describes the stages as a whole, retracted before a stage changes (deploy.json first: it names the files).
REPORT_ENTRIES = (SUMMARY, "report.html", "report.md", "report")
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


@dataclass
class StageRecord:
    name: str
    reused: bool
    seconds: float  # this run
    key: str
    built_seconds: float = 0.0  # when the stage's outputs were made


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); False where the system cannot."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: no exchange on this file system
        return False
    raise OSError(err, os.strerror(err), str(b))


def swap_in(new: Path, place: Path) -> None:
    """Put the folder ``new`` at ``place``; the old one there is deleted only once the new one is in."""
    if not place.exists() and not place.is_symlink():
        os.rename(new, place)
        return
    if _exchange(new, place):
        remove_entry(new)  # now the old stage
        return
    aside = place.parent / f".{place.name}.old-{owner_tag()}-{uuid.uuid4().hex[:8]}"
    os.rename(place, aside)
    try:
        os.rename(new, place)
    except OSError:
        os.rename(aside, place)
        raise
    remove_entry(aside)


def sweep(folder: Path) -> None:
    """Finish what killed runs left in ``folder``: put a moved-aside stage back where its place is empty,
    delete staging folders (only those of processes that are gone, on this host)."""
    host = owner_tag().split(".", 1)[1]
    with contextlib.suppress(OSError):
        for path in list(folder.iterdir()):
            m = _PRIVATE.match(path.name)
            if not m or m["host"] != host or pid_alive(int(m["pid"])):
                continue
            with contextlib.suppress(OSError):
                if m["kind"] == "old" and not (folder / m["name"]).exists():
                    os.rename(path, folder / m["name"])
                else:
                    remove_entry(path)


class Stages:
    """Runs named stages into subfolders of OUT_DIR, reusing those whose key is unchanged."""

    def __init__(self, out: Path, progress: Progress, written: Ownership | None = None) -> None:
        self.out = out
        self.progress = progress
        self.records: list[StageRecord] = []
        self.written = written
        self._written_lock = threading.Lock()  # stages run two at a time share the record of what deploy wrote
        self._retracted = False
        for entry in (out, *(out / e for e in STAGE_ENTRIES)):
            if entry.is_dir():
                sweep(entry)  # what killed runs left: also beside stages this run reuses

    def will_build(self, name: str, key: dict[str, Any]) -> bool:
        """Whether :meth:`run` would build this stage (its outputs are missing, changed or made from other inputs)."""
        folder = relative(self.out, name, "stage")
        previous = read_record(folder / STAGE_MARK)
        return not (previous.get("key") == stage_digest(key) and intact(folder, previous.get("files")))

    def step(self, name: str, seconds: float) -> None:
        """Record work done for several stages and kept by none (shown in the table, never reused)."""
        self.records.append(StageRecord(name, False, round(seconds, 2), "", round(seconds, 2)))

    def order(self, names: list[str]) -> None:
        """Records of stages run side by side, put in this order (the order they were asked for)."""
        rank = {n: i for i, n in enumerate(names)}
        self.records.sort(key=lambda r: rank.get(r.name, -1))

    def run(self, name: str, key: dict[str, Any], build: Callable[[Path], object]) -> tuple[Path, str]:
        folder = relative(self.out, name, "stage")
        digest = stage_digest(key)
        start = time.perf_counter()
        previous = read_record(folder / STAGE_MARK)
        if previous.get("key") == digest and intact(folder, previous.get("files")):
            self.records.append(StageRecord(name, True, 0.0, digest, float(previous.get("seconds", 0.0))))
            self.progress(f"{name}: reused (unchanged inputs)")
            return folder, digest
        self.progress(name)
        if folder.exists() and self.written is not None:
            with self._written_lock:
                self.written.check_own(folder)  # refuses files deploy did not write, before any work
        self._publish(folder, key, digest, start, build)
        seconds = round(time.perf_counter() - start, 2)
        self.records.append(StageRecord(name, False, seconds, digest, seconds))
        return folder, digest

    def _publish(
        self, folder: Path, key: dict[str, Any], digest: str, start: float, build: Callable[[Path], object]
    ) -> None:
        """Build beside ``folder``, record it, swap it in; the old stage stays whole until then."""
        folder.parent.mkdir(parents=True, exist_ok=True)
        sweep(folder.parent)
        staging = folder.parent / f".{folder.name}.staging-{owner_tag()}-{uuid.uuid4().hex[:8]}"
        try:
            build(staging)
            if not staging.is_dir():
                raise InputError(f"stage {folder.name} wrote nothing")
            seconds = round(time.perf_counter() - start, 2)
            atomic_write_json(
                staging / STAGE_MARK, {"key": digest, "seconds": seconds, "inputs": key, "files": manifest(staging)}
            )
            self._swap(staging, folder)
        finally:
            if staging.exists():
                remove_entry(staging)

    def _swap(self, staging: Path, folder: Path) -> None:
        prefix = folder.relative_to(self.out).as_posix()
        new = {f"{prefix}/{f.split('/', 1)[1]}" for f in files_under(folder.parent, staging)}
        old = set(files_under(self.out, folder)) if folder.exists() else set()
        with self._written_lock:
            self._retract_report()
            if self.written is not None:
                self.written.claim(names=new)  # recorded before they arrive: a killed run leaves a superset
        swap_in(staging, folder)
        if self.written is not None:
            with self._written_lock:
                self.written.forget(old - new)

    def _retract_report(self) -> None:
        """Before the run's first swap: remove the report deploy wrote (it describes the stages being replaced)."""
        if self._retracted:
            return
        for name in REPORT_ENTRIES:
            path = self.out / name
            if not (path.exists() or path.is_symlink()):
                continue
            owned = files_under(self.out, path)
            if self.written is not None and not set(owned) <= self.written.files:
                continue  # not deploy's (check_out_dir refused such a folder; kept all the same)
            remove_entry(path)
            if self.written is not None:
                self.written.forget(owned)
        self._retracted = True


def manifest(folder: Path) -> dict[str, list[Any]]:
    """Every file of a stage folder with its size and sha256, to notice deleted or damaged outputs."""
    return {
        f.relative_to(folder).as_posix(): [f.stat().st_size, sha256_file(f)]
        for f in sorted(folder.rglob("*"))
        if f.is_file() and f.name != STAGE_MARK
    }


def intact(folder: Path, files: Any) -> bool:
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
