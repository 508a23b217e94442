"""The ownership record of a deploy folder: what deploy wrote there, so it replaces nothing else.

``.edgeship-deploy.json`` lists every file deploy wrote in OUT_DIR. Only a record that is a JSON
object naming edgeship makes a folder deploy's: an empty or garbage file proves nothing, and the
folder is then treated as the user's (deploy needs ``--force`` to write beside its files, and
replaces none of them).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from edgeship._files import reads_path
from edgeship._io import atomic_write_json, private_name
from edgeship._lock import LOCK_FILE
from edgeship._version import __version__
from edgeship.errors import InputError, OutputExistsError

MARKER = ".edgeship-deploy.json"
STAGE_MARK = ".stage.json"
SUMMARY = "deploy.json"
#: What deploy writes at the top of OUT_DIR; anything else there is never touched.
ENTRIES = (
    "convert",
    "quantize",
    "verify",
    "bench",
    "bundles",
    "device-bench",
    "report",
    "report.md",
    "report.html",
    SUMMARY,
    MARKER,
)
STAGE_ENTRIES = ENTRIES[:6]


def read_record(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or {} when it is missing, unreadable or not an object."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return record if isinstance(record, dict) else {}


def _is_record(record: dict[str, Any]) -> bool:
    """Whether a marker's content is edgeship's: it names edgeship's version, and ``written`` if any is a list."""
    return isinstance(record.get("edgeship"), str) and isinstance(record.get("written", []), list)


class Ownership:
    """What deploy wrote in OUT_DIR, kept in its marker file: deploy removes or replaces nothing else."""

    def __init__(self, out: Path) -> None:
        self.out = out
        record = read_record(out / MARKER)
        self.deploy_folder = _is_record(record)
        files = record.get("written") if self.deploy_folder else None
        if isinstance(files, list):
            self.files = {f for f in files if isinstance(f, str)}
        else:
            self.files = _legacy_written(out) if self.deploy_folder else set()

    def foreign(self, *paths: Path) -> list[str]:
        """Files under ``paths`` (default: deploy's entries) that deploy did not write."""
        paths = paths or tuple(self.out / name for name in ENTRIES)
        return sorted(
            f
            for p in paths
            for f in files_under(self.out, p)
            if f not in self.files and not any(private_name(part) for part in f.split("/"))
        )

    def check_own(self, folder: Path) -> None:
        """Refuse to replace ``folder`` when it holds files deploy did not write."""
        foreign = self.foreign(folder)
        if foreign:
            raise OutputExistsError(
                f"{self.out} holds {some(foreign)}, which deploy did not write; move them, deploy would replace them"
            )

    def claim(self, *paths: Path, names: Iterable[str] = ()) -> None:
        """Record that deploy wrote every file under ``paths`` (and the relative ``names``)."""
        for p in paths:
            self.files |= set(files_under(self.out, p))
        self.files |= set(names)
        self._save()

    def forget(self, names: Iterable[str]) -> None:
        """Drop files deploy no longer has (a stage replaced by a new one)."""
        self.files -= set(names)
        self._save()

    def _save(self) -> None:
        atomic_write_json(self.out / MARKER, {"edgeship": __version__, "written": sorted(self.files | {MARKER})})
        self.deploy_folder = True


def files_under(out: Path, path: Path) -> list[str]:
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
    files = {MARKER, SUMMARY, "report.md", "report.html", *files_under(out, out / "report")}
    for mark in (f for name in STAGE_ENTRIES[:5] for f in (out / name).rglob(STAGE_MARK)):
        listed = read_record(mark).get("files")
        prefix = mark.parent.relative_to(out).as_posix()
        files |= {f"{prefix}/{STAGE_MARK}", *(f"{prefix}/{f}" for f in (listed if isinstance(listed, dict) else {}))}
    return files


def some(names: list[str], shown: int = 5) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def check_out_dir(out: Path, force: bool, inputs: Iterable[Path] = ()) -> Ownership:
    """What deploy wrote in ``out``; refuse a folder holding files of someone else where deploy writes.

    Without ``force`` the folder must be empty or a deploy folder; with it, deploy writes
    beside what is there. Either way, files deploy did not write are never removed, and no
    input of the run (``inputs``) may lie where deploy writes.
    """
    _check_inputs_apart(out, inputs)
    written = Ownership(out)
    foreign = written.foreign()
    if foreign:
        raise OutputExistsError(
            f"{out} holds {some(foreign)}, which deploy did not write but would replace or "
            f"delete; move them or pick another folder ({OutputExistsError.FORCE} never removes "
            "files edgeship did not write)"
        )
    present = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE) if out.is_dir() else []
    if present and not written.deploy_folder and not force:
        raise OutputExistsError(
            f"{out} is not empty and is not an edgeship deploy folder (it holds {some(present)}; "
            f"deploy would replace none of them): pass {OutputExistsError.FORCE} to write beside "
            "them, or pick another folder"
        )
    return written


def _check_inputs_apart(out: Path, inputs: Iterable[Path]) -> None:
    """Refuse an input (the model, a profile, labels) inside a folder deploy replaces (``OUT/convert/...``)."""
    for source in inputs:
        for entry in ENTRIES:
            if source.exists() and reads_path(out / entry, source):
                raise InputError(
                    f"{source} is inside {out / entry}, which deploy replaces: copy it out of {out} or "
                    "pick another output folder"
                )
