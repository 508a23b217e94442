"""The one rule that turns a name into a path, and checks that keep folders apart.

A name that comes from data (a target's name, a model card's ``model_file`` or
``labels_file``, a path in a manifest) becomes a path only through :func:`child` or
:func:`inside`: it must be a plain file name, never a separator, ``..``, an absolute path,
an empty string or a control character. :func:`inside` also resolves symbolic links and
refuses a file that lands outside its folder (the rule tar and zip extractors learned).
Only the standard library is used: the on-device runtime reads bundles through it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from edgeship.errors import InputError

_SEPARATORS = {"/", "\\", os.sep, os.altsep or "/"}


def name_problem(name: object) -> str | None:
    """Why ``name`` is not a plain file name (None: it is one)."""
    if not isinstance(name, str):
        return f"must be a string, got {type(name).__name__}"
    if not name:
        return "must not be empty"
    if name in (".", ".."):
        return f"must be a file name, not {name!r}"
    if any(sep in name for sep in _SEPARATORS):
        return f"must be a file name without path separators, got {name!r}"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return f"must not contain control characters, got {name!r}"
    return None


def safe_name(name: object, what: str) -> str:
    """``name`` when it is a plain file name.

    Raises:
        InputError: Separators, ``..``, an absolute path, an empty name or control characters.
    """
    problem = name_problem(name)
    if problem:
        raise InputError(f"{what} {problem}")
    return str(name)


def child(folder: str | os.PathLike[str], *names: str, what: str = "name") -> Path:
    """``folder / name / ...`` where every part is a plain file name (see :func:`safe_name`)."""
    path = Path(folder)
    for name in names:
        path = path / safe_name(name, what)
    return path


def relative(folder: str | os.PathLike[str], rel: str, what: str = "path") -> Path:
    """A ``/``-separated relative path from a manifest, as a path under ``folder`` (each part checked)."""
    if not isinstance(rel, str):
        raise InputError(f"{what} must be a string, got {type(rel).__name__}")
    return child(folder, *rel.split("/"), what=f"{what} {rel!r}:")


def is_inside(path: str | os.PathLike[str], folder: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is ``folder`` or lies under it, both with symbolic links resolved."""
    try:
        resolved, root = Path(path).resolve(), Path(folder).resolve()
    except (OSError, RuntimeError):  # a loop of symbolic links leads nowhere, so not inside
        return False
    return resolved == root or root in resolved.parents


def inside(folder: str | os.PathLike[str], name: str, what: str = "file") -> Path:
    """``folder / name`` after checking the name and that it resolves inside ``folder``.

    Raises:
        InputError: ``name`` is not a plain file name, or it is a symbolic link (or sits in a
            linked folder) that leads outside ``folder``.
    """
    path = child(folder, name, what=what)
    if not is_inside(path, folder):
        raise InputError(
            f"{what} {name!r} in {folder} leads outside the folder (to {path.resolve()}); "
            "a bundle's files must be inside it"
        )
    return path


def check_apart(
    out: str | os.PathLike[str], inputs: Mapping[str, str | os.PathLike[str] | None], out_what: str = "output folder"
) -> None:
    """Refuse an output folder inside (or equal to) a folder of images the same run reads.

    Args:
        out: The output folder.
        inputs: What each input folder is called in messages (e.g. ``"--calib"``) -> the folder.
        out_what: What the output folder is called in messages.

    Raises:
        InputError: Its outputs would be read as images by this run or the next one.
    """
    for what, folder in inputs.items():
        if folder is not None and Path(folder).is_dir() and (is_inside(out, folder) or _same_folder_above(out, folder)):
            raise InputError(
                f"{out_what} {out} is inside {what} {folder}: edgeship would read its own outputs "
                f"as images; pick an output folder outside {folder}"
            )


def _same_folder_above(path: str | os.PathLike[str], folder: str | os.PathLike[str]) -> bool:
    """Whether ``path`` or an existing folder above it is ``folder`` by identity (device and inode): a bind
    mount or a hard-to-see alias of ``folder`` that its name does not show."""
    try:
        want = os.stat(folder)
        here = Path(os.path.abspath(path))
        for above in (here, *here.parents):
            if above.exists():
                st = above.stat()
                if (st.st_dev, st.st_ino) == (want.st_dev, want.st_ino):
                    return True
    except (OSError, RuntimeError):
        return False
    return False


def writable_dir_problem(out_dir: str | os.PathLike[str]) -> str | None:
    """Why ``out_dir`` cannot be created or written (None: it can).

    Nothing is created: a probe file is written and removed in ``out_dir`` or, when it
    does not exist yet, in its nearest existing ancestor.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        return "it is a file, not a folder"
    probe_in = out_dir
    while not probe_in.exists():
        if probe_in.is_symlink():
            return f"{probe_in} is a dangling symbolic link"
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        return f"{probe_in} is a file, not a folder"
    try:
        fd, tmp = tempfile.mkstemp(prefix=".edgeship-write-probe-", dir=probe_in)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        return f"{exc.strerror or exc}" + ("" if probe_in == out_dir else f" (in {probe_in})")
    return None


def check_writable_dir(out_dir: str | os.PathLike[str], what: str = "output folder") -> Path:
    """Fail early, with one line, when ``out_dir`` cannot be created or written.

    Called before any work starts, so a run does not spend minutes and then fail at
    publishing (see :func:`writable_dir_problem`).

    Raises:
        InputError: A path component is a file, or the folder (or where it would be
            created) is not writable.
    """
    problem = writable_dir_problem(out_dir)
    if problem:
        raise InputError(f"cannot write {what} {out_dir}: {problem}")
    return Path(out_dir)


def utf8_path(path: str | os.PathLike[str]) -> str | None:
    """``path`` as text when its bytes are UTF-8, else None (native tools take paths only as UTF-8 text)."""
    text = os.fsdecode(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return text
