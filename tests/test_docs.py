"""The documentation tells the truth: its Python snippets run, its ``edgeship`` flags exist.

Convention (also in docs/development.md):

- Every fenced ``python`` block of README.md and docs/*.md runs, unless the line just before its fence is
  ``<!-- docs-test: skip (reason) -->``. A page's runnable blocks are joined in order into one plain
  script, run with ``python script.py`` in a subprocess from a scratch folder with ``../shared`` (the
  shared assets) beside it. Pages share that folder, README first, then docs/*.md by name, so a page
  may read what an earlier page wrote.
- Every ``--flag`` given for an ``edgeship`` subcommand must be in that subcommand's ``--help``: on an
  ``edgeship SUB ...`` command line (code block or inline code), in inline code starting with a
  subcommand name (``quantize --target``), or anywhere in a section whose heading names ``edgeship SUB``.
  Other flags must be in at least one subcommand's help. Command lines of other tools are not checked.
- Every ``toml`` block with a ``[runtime]`` section loads as a target profile.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP_MARK = re.compile(r"<!--\s*docs-test:\s*skip\b")
FENCE = re.compile(r"^```(\S*)\s*$")
FLAG = re.compile(r"^--[a-z0-9][a-z0-9-]*")
PROSE_FLAG = re.compile(r"(?<![\w\-/.])--[a-z][a-z0-9-]*")
SPAN = re.compile(r"`([^`\n]+(?:\n[^`\n]+)*)`")
RUNTIME = "runtime"  # python -m edgeship.runtime
#: First words of command lines that are not edgeship's (their flags are theirs).
OTHER_TOOLS = (
    "pip",
    "pip3",
    "onnx2tf",
    "benchmark_model",
    "bazel",
    "adb",
    "ssh",
    "scp",
    "tf2onnx",
    "git",
    "apt-get",
    "apt",
    "sudo",
    "mmdebstrap",
    "qemu-aarch64-static",
    "chromium",
    "pytest",
    "ruff",
    "mypy",
    "unshare",
    "ray",
)
SNIPPET_TIMEOUT_S = 1800


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    line: int
    lang: str
    code: str
    skipped: bool


@dataclass(frozen=True)
class Mention:
    """A flag a page gives, and the ``edgeship`` subcommand it is given for (None: any)."""

    page: str
    line: int
    flag: str
    command: str | None


def blocks(text: str) -> list[Block]:
    """Fenced code blocks, with whether a ``docs-test: skip`` comment precedes the fence."""
    found, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        before = next((ln for ln in reversed(lines[:i]) if ln.strip()), "")
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), len(lines))
        found.append(Block(i + 1, m.group(1).lower(), "\n".join(lines[i + 1 : end]), bool(SKIP_MARK.search(before))))
        i = end + 1
    return found


def script_of(text: str) -> str:
    """The page's runnable Python blocks joined into one script ('' when it has none)."""
    return "\n\n".join(b.code for b in blocks(text) if b.lang == "python" and not b.skipped)


def _tokens(command: str) -> list[str]:
    try:
        return shlex.split(command)
    except ValueError:
        return command.split()


def command_of(tokens: list[str]) -> str | None:
    """The edgeship subcommand a command line runs, ``"other"`` for another tool, None for neither."""
    while tokens and (tokens[0] == "$" or re.match(r"^[A-Z_][A-Z0-9_]*=", tokens[0])):
        tokens = tokens[1:]
    if not tokens:
        return None
    first = tokens[0]
    if first == "edgeship":
        return tokens[1] if len(tokens) > 1 and tokens[1] in subcommands() else "edgeship"
    if Path(first).name.startswith("python"):
        return RUNTIME if tokens[1:3] == ["-m", "edgeship.runtime"] else "other"
    if first in subcommands() and len(tokens) > 1:
        return first
    if Path(first).name in OTHER_TOOLS:
        return "other"
    return None


def _flags(tokens: list[str]) -> list[str]:
    """The ``--flag`` tokens (``--x=1`` gives ``--x``; ``--mean/--std`` gives both)."""
    parts = [p for t in tokens for p in t.split("/")]
    return [m.group(0) for p in parts if (m := FLAG.match(p)) and p[len(m.group(0)) : len(m.group(0)) + 1] in ("", "=")]


def _section_commands(text: str) -> list[tuple[int, str | None]]:
    """(first line, subcommand) of every section: a heading naming ``edgeship SUB`` sets it."""
    sections: list[tuple[int, str | None]] = [(1, None)]
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("#"):
            m = re.search(r"edgeship (\w+)", line)
            sub = m.group(1) if m and m.group(1) in subcommands() else RUNTIME if "edgeship.runtime" in line else None
            sections.append((n, sub))
    return sections


def _section_at(sections: list[tuple[int, str | None]], line: int) -> str | None:
    return [sub for start, sub in sections if start <= line][-1]


def mentions(page: str, text: str) -> list[Mention]:
    """Every flag the page gives, with the subcommand it belongs to."""
    found: list[Mention] = []
    sections = _section_commands(text)
    prose = text.splitlines()
    for b in blocks(text):
        for k in range(b.line - 1, min(b.line + b.code.count("\n") + 2, len(prose))):
            prose[k] = ""  # code blocks are not prose
        if b.lang not in ("", "bash", "sh", "shell", "console"):
            continue
        for n, line in enumerate(b.code.replace("\\\n", " ").splitlines(), b.line + 1):
            for command in re.split(r"&&|\|\||;|\|", line):
                tokens = _tokens(command)
                sub = command_of(tokens)
                if sub not in (None, "other"):
                    found += [Mention(page, n, f, None if sub == "edgeship" else sub) for f in _flags(tokens)]
    body = "\n".join(prose)
    for m in SPAN.finditer(body):
        n = body.count("\n", 0, m.start()) + 1
        tokens = _tokens(m.group(1))
        sub = command_of(tokens) or _section_at(sections, n)
        if sub != "other":
            found += [Mention(page, n, f, None if sub == "edgeship" else sub) for f in _flags(tokens)]
    bare = SPAN.sub(lambda m: " " * len(m.group(0)), body)
    for m in PROSE_FLAG.finditer(bare):
        n = bare.count("\n", 0, m.start()) + 1
        found.append(Mention(page, n, m.group(0), _section_at(sections, n)))
    return found


@cache
def help_text(*argv: str) -> str:
    """``--help`` of ``edgeship ARGV...`` (``runtime``: of ``python -m edgeship.runtime``)."""
    command = ["edgeship.runtime"] if argv == (RUNTIME,) else ["edgeship", *argv]
    return subprocess.run(
        [sys.executable, "-m", *command, "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        check=True,
    ).stdout


def _actions(help_out: str) -> list[str]:
    """The subcommands a help text lists (argparse indents them by four spaces)."""
    return re.findall(r"^    ([a-z][\w-]*)(?:\s{2,}|$)", help_out, re.MULTILINE)


@cache
def subcommands() -> tuple[str, ...]:
    """The ``edgeship`` subcommands, as ``edgeship --help`` lists them."""
    return tuple(_actions(help_text()))


def _option_flags(help_out: str) -> set[str]:
    flags: set[str] = set()
    for line in help_out.splitlines():
        if line.lstrip().startswith("-"):  # an option line: the flags come before the help text
            flags.update(_flags(re.split(r"\s{2,}", line.strip())[0].replace(",", " ").split()))
    return flags


@cache
def help_flags(command: str) -> frozenset[str]:
    """The flags ``--help`` lists for an edgeship subcommand and its actions (``targets list``), for the
    top level (``edgeship``), or for the on-device runtime."""
    if command == "edgeship":
        return frozenset(_option_flags(help_text()))
    out = help_text(command)
    flags = _option_flags(out)
    for action in _actions(out) if command != RUNTIME else []:
        flags |= _option_flags(help_text(command, action))
    return frozenset(flags)


def unknown_flags(found: list[Mention]) -> list[str]:
    """Every mention whose flag is not in its subcommand's help (or in no subcommand's, when unnamed)."""
    every = frozenset().union(*(help_flags(c) for c in ("edgeship", *subcommands(), RUNTIME)))
    bad = []
    for m in found:
        known = every if m.command is None else help_flags(m.command)
        if m.flag not in known:
            where = (
                f"edgeship {m.command}"
                if m.command and m.command != RUNTIME
                else "python -m edgeship.runtime"
                if m.command
                else "any edgeship command"
            )
            bad.append(f"{m.page}:{m.line}: {m.flag} is not an option of {where}")
    return bad


def _page_name(page: Path) -> str:
    return str(page.relative_to(ROOT))


# ------------------------------------------------------------------------------------------ tests
def test_every_edgeship_flag_in_the_docs_exists() -> None:
    found = [m for p in PAGES for m in mentions(_page_name(p), p.read_text(encoding="utf-8"))]
    assert len(found) > 100, f"only {len(found)} flags found: the extraction is broken"
    assert {"quantize", "deploy", "verify", "bench", "convert"} <= {m.command for m in found}
    bad = unknown_flags(found)
    assert not bad, "flags the docs give that --help does not list:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "```bash\nedgeship quantize m.onnx --calib c -o o --made-up-flag\n```\n",
            "--made-up-flag is not an option of edgeship quantize",
        ),
        ("Run `edgeship bundle m.tflite --calib imgs`.\n", "--calib is not an option of edgeship bundle"),
        ("Then `deploy --per-tensor` does it.\n", "--per-tensor is not an option of edgeship deploy"),
        ("## `edgeship verify REF CAND`\n\nPass `--threads 4`.\n", "--threads is not an option of edgeship verify"),
        ("Any command takes --no-such-thing.\n", "--no-such-thing is not an option of any edgeship command"),
        (
            "```\n.venv/bin/python -m edgeship.runtime . a.jpg --top5\n```\n",
            "--top5 is not an option of python -m edgeship.runtime",
        ),
    ],
)
def test_a_made_up_or_misplaced_flag_is_caught(text: str, expected: str) -> None:
    bad = unknown_flags(mentions("page.md", text))
    assert any(expected in b for b in bad), bad


@pytest.mark.parametrize(
    "text",
    [
        "```bash\npython3 -m venv .venv && .venv/bin/pip install --no-index -r requirements.txt\n```\n",
        "the bare CLI needs `onnx2tf --not-ours 1` and `bazel build --config=android_arm64 //x`\n",
        '`python benchmarks/arch_matrix.py --full`, and `--pip-args "--no-index --find-links /w"`\n',
        "```bash\nedgeship deploy m.onnx --calib c --target x86-host -o out --num-calib=100\n```\n",
    ],
)
def test_other_tools_flags_and_real_flags_pass(text: str) -> None:
    assert unknown_flags(mentions("page.md", text)) == []


def test_subcommands_and_their_flags_come_from_help() -> None:
    assert {"convert", "quantize", "verify", "bench", "bundle", "deploy", "targets"} <= set(subcommands())
    assert {"--calib", "--num-calib", "--min-sqnr", "--json"} <= help_flags("quantize")
    assert "--json" in help_flags("targets") and "--no-xnnpack" in help_flags(RUNTIME)
    assert "--calib" not in help_flags("bundle")


def test_skip_marks_and_script_assembly() -> None:
    text = (
        "```python\na = 1\n```\n\n<!-- docs-test: skip (needs a Pi) -->\n```python\nraise SystemExit(1)\n```\n"
        "```python\nassert a == 1\n```\n"
    )
    assert script_of(text) == "a = 1\n\nassert a == 1"


def test_toml_target_profiles_in_the_docs_load() -> None:
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        import tomli as tomllib  # type: ignore[no-redef]

    from edgeship.targets.profile import parse_target

    checked = 0
    for page in PAGES:
        for b in blocks(page.read_text(encoding="utf-8")):
            data = tomllib.loads(b.code) if b.lang == "toml" else {}
            if "runtime" in data:
                parse_target(data, f"{_page_name(page)}:{b.line}")
                checked += 1
    assert checked >= 2


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lstrip("#").strip().lower())
    return text.replace(" ", "-")


def test_relative_links_and_anchors_resolve() -> None:
    bad = []
    for page in [*PAGES, ROOT / "CHANGELOG.md"]:
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):
                continue  # an external address
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                bad.append(f"{_page_name(page)}: {target}: no such file")
            elif anchor and dest.suffix == ".md":
                anchors = {slug(ln) for ln in dest.read_text(encoding="utf-8").splitlines() if ln.startswith("#")}
                if anchor not in anchors:
                    bad.append(f"{_page_name(page)}: {target}: no such heading")
    assert not bad, "\n".join(bad)


@pytest.mark.slow
def test_python_snippets_run_as_plain_scripts(assets: Path, tmp_path: Path) -> None:
    (tmp_path / "shared").symlink_to(assets.resolve(), target_is_directory=True)
    work = tmp_path / "work"
    work.mkdir()
    ran, failures = [], []
    for page in PAGES:
        code = script_of(page.read_text(encoding="utf-8"))
        if not code:
            continue
        script = work / f"snippets_{page.stem}.py"
        script.write_text(code + "\n", encoding="utf-8")
        proc = subprocess.run(
            [sys.executable, script.name],
            check=False,
            cwd=work,
            capture_output=True,
            text=True,
            timeout=SNIPPET_TIMEOUT_S,
        )
        ran.append(_page_name(page))
        if proc.returncode != 0:
            failures.append(f"{_page_name(page)}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    assert "README.md" in ran and "docs/python-api.md" in ran, ran
    assert not failures, "\n\n".join(failures)
