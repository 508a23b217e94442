"""The package graph is one-way: runtime <- shared host pieces <- stages <- deploy / report / CLI.

Read from the source with ``ast`` (nothing is imported). ``python tests/test_package_graph.py`` lists every
import between edgeship modules (module level and inside functions) and the cycles between packages.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Source folder -> import package (pyproject's package-dir).
FOLDERS = {
    "edgeship": "edgeship",
    "convert": "edgeship.convert",
    "quantize": "edgeship.quantize",
    "runtime": "edgeship.runtime",
    "targets": "edgeship.targets",
    "verify": "edgeship.verify",
}
STAGES = ("convert", "quantize", "verify", "targets")

#: Layers, bottom first; a module imports only its own layer or lower ones.
LAYERS: dict[str, tuple[str, ...]] = {
    # On-device: numpy and a TFLite interpreter only (the root package imports only errors and the version).
    "runtime": (
        "edgeship",
        "edgeship.errors",
        "edgeship._version",
        "edgeship._paths",
        "edgeship._files",
        "edgeship._deps",
        "edgeship.runtime",
    ),
    # Host-side pieces the stages share: files, progress, optional dependencies, the child worker, TFLite graph
    # editing, the reference runners, the wheel builder, downloads.
    "shared": (
        "edgeship._io",
        "edgeship._lock",
        "edgeship._progress",
        "edgeship._child",
        "edgeship._worker",
        "edgeship._run",
        "edgeship._stage",
        "edgeship._assets",
        "edgeship.tflite_graph",
        "edgeship.reference",
        "edgeship.wheel",
        "edgeship.zoo",
        "edgeship.download",
        "edgeship.samples",
    ),
    "stages": tuple(f"edgeship.{s}" for s in STAGES),
    "top": ("edgeship.deploy", "edgeship.demo", "edgeship.report", "edgeship.cli", "edgeship.__main__"),
}
#: Stage -> the stages it may import (one way: quantize converts first; verify runs candidates on targets and
#: reads the reference ONNX model with convert's loader).
STAGE_USES = {"convert": set(), "targets": set(), "quantize": {"convert"}, "verify": {"convert", "targets"}}

#: Imports that break the rules on purpose: none. Heavy optional packages (tensorflow, onnx, onnxruntime,
#: mediapipe) are third-party and deferred inside functions; they are not edges of this graph.
ALLOWED: dict[tuple[str, str], str] = {}

#: (importer, imported, name or None for any) -> why it is still here, while an edge is being removed.
#: Empty: every edge obeys the layers (test_pending_edges_are_gone fails on a listed edge that is gone).
PENDING: dict[tuple[str, str, str | None], str] = {}


@dataclass(frozen=True)
class Edge:
    """One import of an edgeship module by another."""

    importer: str
    imported: str
    line: int
    in_function: bool
    names: tuple[str, ...] = ()


def modules() -> dict[str, Path]:
    """Import name -> source file of every edgeship module."""
    found = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
    return ".".join(parts + ([node.module] if node.module else []))


def _targets(node: ast.AST, module: str, is_package: bool, known: set[str]) -> list[tuple[str, tuple[str, ...]]]:
    if isinstance(node, ast.Import):
        return [(a.name, ()) for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = _absolute(module, is_package, node)
    subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]  # ``from pkg import module``
    names = tuple(a.name for a in node.names if f"{base}.{a.name}" not in known)
    return [(s, ()) for s in subs] + ([(base, names)] if names else [])


def edges() -> list[Edge]:
    """Every import of an edgeship module, with where it is and whether it sits inside a function."""
    known = modules()
    found = []
    for module, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        for node, in_function in _walk(tree, False):
            for target, names in _targets(node, module, path.stem == "__init__", set(known)):
                if target == "edgeship" or target.startswith("edgeship."):
                    found.append(Edge(module, target, node.lineno, in_function, names))
    return found


def _walk(node: ast.AST, in_function: bool):  # type: ignore[no-untyped-def]
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, in_function
        yield from _walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))


def layer_of(module: str) -> tuple[int, str]:
    """(layer index, unit): the unit is the stage package for stage modules, else the module itself."""
    best = None
    for index, (_, prefixes) in enumerate(LAYERS.items()):
        for prefix in prefixes:
            # The root package is a layer of its own name only: its modules are each listed.
            if module == prefix or (prefix != "edgeship" and module.startswith(prefix + ".")):
                if best is None or len(prefix) > len(best[2]):
                    best = (index, prefix, prefix)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}")
    return best[0], best[1]


def violation(edge: Edge) -> str | None:
    """Why an import breaks the layering (None: it is allowed)."""
    (mine, unit), (theirs, used) = layer_of(edge.importer), layer_of(edge.imported)
    if theirs > mine:
        return f"{edge.importer} ({list(LAYERS)[mine]}) imports {edge.imported} ({list(LAYERS)[theirs]})"
    if mine == theirs and list(LAYERS)[mine] == "stages" and unit != used:
        stage, other = unit.split(".")[1], used.split(".")[1]
        if other not in STAGE_USES[stage]:
            return f"stage {stage} imports stage {other} ({edge.importer} -> {edge.imported})"
    return None


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in FOLDERS else module


def cycles(found: list[Edge]) -> list[list[str]]:
    """Strongly connected groups of packages (stage packages, and top-level modules by name)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for e in found:
        a, b = package_of(e.importer), package_of(e.imported)
        if a != b and b != "edgeship":
            graph[a].add(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(list(graph)):
        if v not in index:
            visit(v)
    return groups


def pending(edge: Edge) -> bool:
    """Whether the edge is one of the :data:`PENDING` ones (all of its names, when names are listed)."""
    if (edge.importer, edge.imported, None) in PENDING:
        return True
    return bool(edge.names) and all((edge.importer, edge.imported, n) in PENDING for n in edge.names)


def private_names(edge: Edge) -> list[str]:
    """Another module's private names that the import takes (the pending ones left out)."""
    return [
        n
        for n in edge.names
        if n.startswith("_") and not n.startswith("__") and (edge.importer, edge.imported, n) not in PENDING
    ]


def test_every_module_has_a_layer() -> None:
    for module in modules():
        layer_of(module)


def test_imports_go_down_the_layers() -> None:
    bad = sorted(
        {
            f"{v} (line {e.line})"
            for e in edges()
            if (v := violation(e)) and (e.importer, e.imported) not in ALLOWED and not pending(e)
        }
    )
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_no_package_cycles_beyond_the_pending_edges() -> None:
    assert cycles([e for e in edges() if not pending(e)]) == []


def test_no_module_takes_another_modules_private_names() -> None:
    bad = sorted(
        {
            f"{e.importer}:{e.line} takes {', '.join(private_names(e))} from {e.imported}"
            for e in edges()
            if private_names(e)
        }
    )
    assert not bad, bad


def test_pending_edges_are_gone() -> None:
    found = edges()
    left = sorted(
        f"{a} -> {b}{f' ({n})' if n else ''}: {why}"
        for (a, b, n), why in PENDING.items()
        if any(e.importer == a and e.imported == b and (n is None or n in e.names) for e in found)
    )
    assert not left, "\n".join(left)


def test_runtime_imports_only_the_bottom_layer() -> None:
    bad = sorted(
        {
            f"{e.importer}:{e.line} -> {e.imported}"
            for e in edges()
            if e.importer.startswith("edgeship.runtime") and layer_of(e.imported)[0] > 0 and not pending(e)
        }
    )
    assert not bad, bad


def test_the_checker_sees_a_planted_upward_import() -> None:
    assert violation(Edge("edgeship.convert.converter", "edgeship.verify.drift", 1, False))
    assert violation(Edge("edgeship.runtime.card", "edgeship._io", 1, True))
    assert violation(Edge("edgeship.reference", "edgeship.convert.onnx_model", 1, False))
    assert violation(Edge("edgeship.quantize.pipeline", "edgeship.convert.result", 1, False)) is None
    assert cycles(
        [
            Edge("edgeship.convert.a", "edgeship.verify.b", 1, False),
            Edge("edgeship.verify.b", "edgeship.convert.c", 1, True),
        ]
    ) == [["convert", "verify"]]


def main() -> int:
    found = edges()
    by_pair: dict[tuple[str, str], list[Edge]] = defaultdict(list)
    for e in found:
        by_pair[(package_of(e.importer), package_of(e.imported))].append(e)
    for (a, b), group in sorted(by_pair.items()):
        if a != b:
            print(f"{a} -> {b}")
            for e in group:
                print(f"    {'function' if e.in_function else 'module  '} {e.importer}:{e.line} -> {e.imported}")
    statements = {(e.importer, e.line) for e in found}
    in_functions = {(e.importer, e.line) for e in found if e.in_function}
    print(f"import statements naming edgeship modules: {len(statements)} ({len(in_functions)} inside functions)")
    print("package cycles:", cycles(found) or "none")
    for e in found:
        if (v := violation(e) or (private_names(e) and f"{e.importer} takes {private_names(e)} of {e.imported}")) and (
            e.importer,
            e.imported,
        ) not in ALLOWED:
            print(f"{'pending' if pending(e) else 'VIOLATION'}: {v} (line {e.line})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
