"""What a command reads, declared in one place: the write rule (:func:`edgeship._files.write_problem`) reads it.

Besides the paths the user names, a command reads files it finds on its own: the card
beside a model (``<stem>.card.json`` or the folder's ``model_card.json``), the labels file
a card names, and target profiles given as files. :func:`implicit_inputs` adds them, so no
output, ``--force`` or not, can replace what the run depends on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from edgeship._paths import name_problem

#: The folder card's name (runtime.card.CARD_FILE; repeated here: this module reads no numpy).
CARD_FILE = "model_card.json"
#: Keys of a command's arguments naming what it writes; every other path argument is read.
OUTPUT_KEYS = ("out", "report", "json")
#: Keys whose strings name a target, built in or a profile file (``--target``, ``targets show NAME``).
PROFILE_KEYS = ("target", "name")


def implicit_inputs(path: Path) -> list[Path]:
    """``path`` and the files a command reads because of it (a model's cards and their labels)."""
    found = [path]
    if path.is_dir() or not path.is_file():
        return found
    cards = [path.with_name(path.stem + ".card.json"), path.parent / CARD_FILE]
    for card in (c for c in cards if c.is_file() and c != path):
        found.append(card)
        found += _card_files(card)
    if path.suffix == ".json":  # a card given itself: its model and labels
        found += _card_files(path)
    return found


def _card_files(card: Path) -> list[Path]:
    """The labels and model files a card names (plain names in its folder only; a bad card is refused later)."""
    try:
        data = json.loads(card.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return []
    if not isinstance(data, dict):
        return []
    names = [data.get("labels_file"), data.get("model_file")]
    return [card.parent / n for n in names if isinstance(n, str) and name_problem(n) is None]


def command_inputs(args: Mapping[str, object], out: object = None) -> list[Path]:
    """Every file and folder a command with these arguments reads, implicit inputs included.

    Path values are inputs unless their key is an output (:data:`OUTPUT_KEYS`); ``target``
    strings naming files are profiles read. A folder equal to ``out`` is written, not only
    read (quantize into its convert folder), so it is left out.
    """
    found: list[Path] = []
    for key, value in args.items():
        values: Iterable[object] = value if isinstance(value, (list, tuple)) else [value]
        if key in PROFILE_KEYS:
            found += [Path(v) for v in values if isinstance(v, str) and _is_file(Path(v))]
        elif key not in OUTPUT_KEYS:
            found += [v for v in values if isinstance(v, Path)]
    expanded = [p for f in found for p in implicit_inputs(f)]
    if isinstance(out, (str, os.PathLike)):
        expanded = [p for p in expanded if not (_is_dir(p) and _same(p, Path(out)))]
    return list(dict.fromkeys(expanded))


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:
        return False


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except (OSError, RuntimeError):
        return False
