"""The matrix report: ``matrix.json``, ``report.md`` and ``report.html`` — a models x targets table whose every
result cell links to the files behind it (a cell whose files are missing says so and claims nothing)."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from edgeship._io import atomic_write_bytes, atomic_write_json
from edgeship._version import __version__
from edgeship.matrix_file import Matrix

CELL_FILE = "cell.json"
DRIFT_FILE = "drift_report.json"
BENCH_FILE = "bench.json"
SUMMARY = "matrix.json"


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion, in percent."""
    if n == 0:
        return (0.0, 100.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (round(100 * max(0.0, centre - half), 2), round(100 * min(1.0, centre + half), 2))


def write_reports(
    out: Path,
    matrix: Matrix,
    cells: list[Any],
    devices: dict[str, dict[str, Any]],
    wall: float,
    timings: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Read every cell back from its files and write the three reports; return the cells' rows."""
    rows = [_row(out, c) for c in cells]
    doc = {
        "edgeship_report": "matrix",
        "edgeship": __version__,
        "matrix": str(matrix.path),
        "models": [m.name for m in matrix.models],
        "targets": [t.name for t in matrix.targets],
        "devices": devices,
        "cells": rows,
        "wall_s": wall,
        "timings": timings or {},
    }
    atomic_write_json(out / SUMMARY, doc)
    atomic_write_bytes(out / "report.md", markdown(doc).encode())
    atomic_write_bytes(out / "report.html", page(doc).encode())
    return rows


def _row(out: Path, cell: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"model": cell.model, "target": cell.target, "status": cell.status, "reason": cell.reason}
    row["deploy"] = f"models/{cell.model}" if (out / "models" / cell.model / "convert").is_dir() else None
    if cell.status not in ("done", "reused"):
        return {**row, "passed": False}
    folder = cell.folder
    record = json.loads((folder / CELL_FILE).read_text()) if (folder / CELL_FILE).is_file() else {}
    files = [CELL_FILE, *record.get("files", {})]
    if not all((folder / f).is_file() for f in files):
        return {**row, "status": "missing", "reason": "files of the cell are gone", "passed": False}
    links = [f"{folder.relative_to(out).as_posix()}/{f}" for f in (DRIFT_FILE, BENCH_FILE)]
    variant = record.get("candidate", {}).get("variant")
    quant = f"models/{cell.model}/quantize/{variant}/quant_report.json"
    links += [quant] if variant and (out / quant).is_file() else []
    return {**row, **_figures(folder, record), "folder": folder.relative_to(out).as_posix(), "files": files,
            "links": links}  # fmt: skip


def _figures(folder: Path, record: dict[str, Any]) -> dict[str, Any]:
    drift = json.loads((folder / DRIFT_FILE).read_text())
    bench = json.loads((folder / BENCH_FILE).read_text())
    f = drift["figures"]
    agree = round(f["top1_agreement"] * f["count"])
    rows = bench.get("results", [])
    first = rows[0] if rows else {}
    return {
        "passed": bool(drift["passed"]),
        "agreement_pct": round(100 * f["top1_agreement"], 2),
        "agreement_ci95": wilson(agree, f["count"]),
        "images": f["count"],
        "sqnr_db": round(f["sqnr_db"], 2),
        "latency_p50_ms": first.get("p50_ms"),
        "latency_label": first.get("emulated"),
        "size_bytes": record.get("candidate", {}).get("size_bytes"),
        "ran_on": drift["candidate"].get("ran_on", ""),
        "shards": record.get("shards", []),
    }


def cell_text(c: dict[str, Any]) -> str:
    if c["status"] not in ("done", "reused"):
        return f"{c['status'].upper()}: {c['reason']}"
    lo, hi = c["agreement_ci95"]
    latency = f"{c['latency_p50_ms']:.2f} ms" if c["latency_p50_ms"] is not None else "no latency"
    label = " (emulated, not a device's speed)" if c["latency_label"] else ""
    return (
        f"{'PASS' if c['passed'] else 'FAIL'} agreement {c['agreement_pct']:.2f}% [{lo:.1f}, {hi:.1f}] "
        f"SQNR {c['sqnr_db']:.1f} dB, p50 {latency}{label}, {c['size_bytes'] / 1024:.1f} KiB"
    )


def _grid(doc: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(c["model"], c["target"]): c for c in doc["cells"]}


def markdown(doc: dict[str, Any]) -> str:
    grid = _grid(doc)
    lines = ["# edgeship matrix", "", f"{doc['matrix']}: wall {doc['wall_s']:.1f} s", ""]
    lines += ["| model | " + " | ".join(doc["targets"]) + " |", "|---" * (len(doc["targets"]) + 1) + "|"]
    for m in doc["models"]:
        cells = []
        for t in doc["targets"]:
            c = grid[(m, t)]
            link = " (" + ", ".join(f"[{Path(x).stem}]({x})" for x in c["links"]) + ")" if c.get("folder") else ""
            cells.append(cell_text(c).replace("|", "/") + link)
        deploy = f" ([deploy](models/{m}))" if grid[(m, doc["targets"][0])].get("deploy") else ""
        lines.append(f"| {m}{deploy} | " + " | ".join(cells) + " |")
    lines += ["", "| device | target | node | status | jobs |", "|---|---|---|---|---|"]
    for name, d in doc["devices"].items():
        status = d["status"] + (f" ({d['reason']})" if d["reason"] else "")
        lines.append(f"| {name} | {d['target']} | {d['node'] or '-'} | {status} | {d['jobs_done']} |")
    return "\n".join(lines) + "\n"


def page(doc: dict[str, Any]) -> str:
    grid = _grid(doc)
    head = "".join(f"<th>{html.escape(t)}</th>" for t in doc["targets"])
    body = []
    for m in doc["models"]:
        tds = []
        for t in doc["targets"]:
            c = grid[(m, t)]
            text = html.escape(cell_text(c))
            if c.get("folder"):
                refs = " ".join(
                    f'<a href="{html.escape(link)}">{html.escape(Path(link).stem)}</a>' for link in c["links"]
                )
                text = f'<a href="{html.escape(c["folder"])}/{DRIFT_FILE}">{text}</a><br>{refs}'
            tds.append(f'<td class="{html.escape(c["status"])}">{text}</td>')
        name = html.escape(m)
        head_cell = f'<a href="models/{name}/">{name}</a>' if grid[(m, doc["targets"][0])].get("deploy") else name
        body.append(f"<tr><th>{head_cell}</th>{''.join(tds)}</tr>")
    return (
        "<!doctype html><meta charset=utf-8><title>edgeship matrix</title>"
        f"<h1>edgeship matrix</h1><p>{html.escape(doc['matrix'])}: wall {doc['wall_s']:.1f} s</p>"
        f"<table border=1><tr><th>model</th>{head}</tr>{''.join(body)}</table>"
        f"<h2>devices</h2><table border=1><tr><th>device</th><th>target</th><th>node</th><th>status</th>"
        f"<th>jobs</th></tr>{''.join(_device_row(n, d) for n, d in doc['devices'].items())}</table>\n"
    )


def _device_row(name: str, d: dict[str, Any]) -> str:
    status = d["status"] + (f" ({d['reason']})" if d["reason"] else "")
    cells = (name, d["target"], d["node"] or "-", status, str(d["jobs_done"]))
    return "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>"
