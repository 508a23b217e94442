"""The deploy report: ``report.md`` and a self-contained ``report.html`` with PNG plots."""

from __future__ import annotations

import base64
import hashlib
import html
import io
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, cast

import numpy as np
from PIL import Image

from edgeship._deps import require
from edgeship._io import atomic_write_bytes, atomic_write_text
from edgeship.runtime.bench_report import BenchReport, RuntimeInfo, SpeedVerdict
from edgeship.runtime.images import load_rgb
from edgeship.runtime.metrics import cosine_per_sample, softmax, topk
from edgeship.targets.mediapipe_check import PREPROCESSING as CLIENT_PREPROCESSING
from edgeship.targets.remote import device_speed_lines
from edgeship.verify.drift import DriftResult

ASSETS = "report"


def _plt() -> Any:
    require("matplotlib", purpose="draw report plots")
    import matplotlib  # heavy optional dependency: deferred

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg")

    return plt


def _save(fig: Any, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _plt().close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def latency_plot(bench: BenchReport, path: Path) -> Path:
    """Box plot of invoke() latency per model and thread count."""
    plt = _plt()
    results = bench.results
    fig, ax = plt.subplots(figsize=(10, 0.5 * len(results) + 1.8))
    data = [list(r.samples_ms or ()) or [r.stats.p50_ms] for r in results]
    labels = [f"{r.model} ×{r.threads}" for r in results]
    ax.boxplot(data, orientation="horizontal", showfliers=True, flierprops={"markersize": 2})
    ax.set_yticks(range(1, len(labels) + 1), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("invoke() latency (ms), lower is better")
    ax.set_title(f"Latency distribution on {bench.host.machine or '?'} ({results[0].stats.runs} runs each)")
    fig.tight_layout()
    return _save(fig, path)


def size_plot(sizes: dict[str, int], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(sizes) + 1.5))
    names = list(sizes)
    ax.barh(names, [sizes[n] / 1e6 for n in names], color="#4f81bd")
    for i, n in enumerate(names):
        ax.text(sizes[n] / 1e6, i, f" {sizes[n] / 1e6:.2f} MB", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("size (MB)")
    ax.set_title("Model sizes")
    fig.tight_layout()
    return _save(fig, path)


@dataclass(frozen=True)
class ReportInputs:
    """What the report shows, as values: deploy's summary and bench document, each target's
    drift check (with its outputs), the labels, and the per-layer error plots by model variant."""

    summary: dict[str, Any]
    bench: BenchReport
    drifts: dict[str, DriftResult]  # target name -> its drift check
    labels: list[str] | None = None
    layer_plots: dict[str, Path] = field(default_factory=dict)


class Disagreement(NamedTuple):
    """One image where the float reference and the deployed model disagree, with both top-3."""

    file: str
    cosine: float
    reference: list[tuple[str, float]]
    deployed: list[tuple[str, float]]
    thumbnail: bytes  # JPEG


def disagreements(drift: DriftResult, labels: list[str] | None, *, count: int = 6) -> list[Disagreement]:
    """The images where reference and candidate disagree most (lowest cosine among top-1 changes)."""
    if drift.reference is None or drift.candidate is None:
        return []
    ref, cand, files = drift.reference, drift.candidate, [str(f) for f in drift.files]
    differ = np.nonzero(np.argmax(ref, 1) != np.argmax(cand, 1))[0]
    order = (
        differ[np.argsort(cosine_per_sample(ref[differ], cand[differ]))]
        if len(differ)
        else np.argsort(cosine_per_sample(ref, cand))[:3]
    )
    cos = cosine_per_sample(ref, cand)

    def name(i: int) -> str:
        return labels[i] if labels and i < len(labels) else str(i)

    picks = []
    for i in order[:count]:
        pr, pc = softmax(ref[i : i + 1])[0], softmax(cand[i : i + 1])[0]
        picks.append(
            Disagreement(
                files[i],
                float(cos[i]),
                [(name(int(k)), float(pr[k])) for k in topk(ref[i : i + 1], 3)[0]],
                [(name(int(k)), float(pc[k])) for k in topk(cand[i : i + 1], 3)[0]],
                _thumbnail(files[i]),
            )
        )
    return picks


def _thumbnail(path: str, size: int = 224) -> bytes:
    """A JPEG thumbnail, read the way the runtime reads images (upright, any mode)."""
    try:
        im = cast(Image.Image, load_rgb(path))  # load_rgb is annotated as object
    except Exception:  # noqa: BLE001 - a vanished image must not cost the whole report
        im = Image.new("RGB", (size, size), (235, 235, 235))
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def disagreement_groups(inputs: ReportInputs) -> list[tuple[list[str], DriftResult]]:
    """Targets whose drift checks gave identical outputs (same model, same machine), with one drift check each."""
    groups: dict[tuple[str, str, str], list[str]] = {}
    for name, t in inputs.summary["targets"].items():
        drift = inputs.drifts.get(name)
        cand = drift.candidate if drift else None
        digest = hashlib.sha256(np.ascontiguousarray(cand).tobytes()).hexdigest() if cand is not None else name
        groups.setdefault((t["model"], _ran_on(name, inputs), digest), []).append(name)
    return [(names, inputs.drifts[names[0]]) for names in groups.values() if names[0] in inputs.drifts]


_MACHINES = {"x86_64": ("x86_64", "amd64"), "aarch64": ("aarch64", "arm64"), "armv7l": ("armv7l", "armv7")}


def isa_check(ran_on: str, arch: str) -> tuple[bool, str]:
    """(was the drift check run on the target's own ISA?, how, in a few words)."""
    if ran_on.startswith("qemu-user"):
        return True, f"{arch} emulated under qemu-user, --emulate"
    if ran_on.startswith("ssh"):
        return True, f"on the device over ssh, --host: {ran_on}"
    machine = ran_on.rsplit("(", 1)[-1].rstrip(")") if "(" in ran_on else "?"
    if machine in _MACHINES.get(arch, (arch,)):
        return True, f"natively, {arch}"
    return False, arch


def _target_arch(name: str, inputs: ReportInputs) -> str:
    drift = inputs.drifts.get(name)
    return drift.report.target.arch if drift else "?"


def _ran_on(name: str, inputs: ReportInputs) -> str:
    drift = inputs.drifts.get(name)
    return drift.report.candidate.ran_on if drift else "?"


def _pct(v: Any) -> str:
    return "–" if v is None else f"{100 * v:.2f}%"


def _num(v: Any, fmt: str = ".3f") -> str:
    return "–" if v is None else format(v, fmt)


def _with_interval(text: str, interval: tuple[float, float] | None) -> str:
    """A figure with its 95 % interval (percent), e.g. ``98.2% [97.0–99.0]``."""
    return f"{text} [{interval[0]:.1f}–{interval[1]:.1f}]" if interval is not None and text != "–" else text


def _tables(inputs: ReportInputs) -> dict[str, list[list[str]]]:
    summary, bench = inputs.summary, inputs.bench
    # The key names the build of each stage the report describes (its .stage.json holds the same key).
    stages = [["stage", "reused", "seconds this run", "seconds when built", "stage key"]] + [
        [
            s["name"],
            "yes" if s["reused"] else "no",
            f"{s['seconds']:.1f}",
            f"{s.get('built_seconds', 0.0):.1f}",
            s.get("key", "")[:12] or "–",
        ]
        for s in summary["stages"]
    ]
    drift = [
        [
            "target",
            "model",
            "ran on",
            "own ISA?",
            "OS release, Python, runtime",
            "agreement [95% CI]",
            "float top-1",
            "deployed top-1 [95% CI]",
            "mean cos",
            "SQNR dB",
            "budget (agree / drop / SQNR)",
            "result",
        ]
    ]
    for name, t in summary["targets"].items():
        if name not in inputs.drifts:
            continue
        r = inputs.drifts[name].report
        f, b = r.figures, {c.metric: c.limit for c in r.budget}
        own, _ = isa_check(r.candidate.ran_on, r.target.arch)
        drift.append(
            [
                name,
                Path(t["model"]).name,
                r.candidate.ran_on,
                "yes" if own else "NO",
                _release_cell(r.candidate.runtime),
                _with_interval(_pct(f.top1_agreement), f.agreement_interval),
                _pct(f.ref_top1),
                _with_interval(_pct(f.cand_top1), f.cand_top1_interval),
                _num(f.mean_cosine, ".4f"),
                _num(f.sqnr_db, ".1f"),
                f"≥{b['top1_agreement_pct']}% / ≤{b['top1_drop_points']} pt / ≥{b['sqnr_db']} dB",
                r.verdict,
            ]
        )
    return {"stages": stages, "drift": drift, "latency": _latency_rows(bench), "client": _client_rows(inputs)}


def _release_cell(runtime: RuntimeInfo) -> str:
    """The device's OS release and Python and the runtime that ran, with its backend (``-`` where none said)."""
    d = runtime.details
    ran = f"{runtime.interpreter} {runtime.interpreter_version or ''} {_backend(runtime)}".strip()
    if not d.get("release") and not d.get("python"):
        return ran or "-"
    return f"{d.get('release') or '?'}, Python {d.get('python') or '?'}, {ran}"


def _backend(runtime: RuntimeInfo) -> str:
    """Which kernels ran: XNNPACK's partitions, onnxruntime's provider and int8 kernels, or the builtin ones."""
    d = runtime.details
    if runtime.xnnpack is not None and runtime.xnnpack.partitions:
        return f"(XNNPACK, {runtime.xnnpack.partitions} partition(s))"
    if d.get("execution_provider"):
        kernels = d.get("kernels") or {}
        top = ", ".join(f"{op} ×{n}" for op, n in sorted(kernels.items(), key=lambda kv: -kv[1])[:3])
        return f"({d['execution_provider']}{': ' + top if top else ''})"
    return "(builtin kernels)" if runtime.interpreter else ""


def _latency_rows(bench: BenchReport) -> list[list[str]]:
    """The latency table: one row per model and thread count."""
    lat = [
        [
            "model",
            "threads",
            "init ms",
            "first ms",
            "invoke p50 / p90 ms",
            "end-to-end p50 / p90 ms",
            "decode / preprocess ms",
            "end-to-end × invoke",
            "p99 ms",
            "peak RSS MB",
            "size MB",
            "× first",
            "runtime",
        ]
    ]
    for r in bench.results:
        rt, e, st = r.runtime, r.e2e, r.stats
        model = r.model
        if len({x.path for x in bench.results if x.model == model}) > 1:
            model = f"{Path(r.path).parent.name}/{model}"  # two different files of the same name
        lat.append(
            [
                model,
                str(r.threads),
                f"{r.init_ms:.1f}",
                f"{r.first_ms:.2f}",
                f"{st.p50_ms:.2f} / {st.p90_ms:.2f}",
                f"{e.p50_ms:.2f} / {e.p90_ms:.2f}" if e else "–",
                f"{e.steps_p50_ms.decode:.2f} / {e.steps_p50_ms.preprocess:.2f}" if e else "–",
                f"{e.ratio_p50_to_invoke:.2f} (of {e.invoke_only_p50_ms:.2f})" if e else "–",
                f"{st.p99_ms:.2f}",
                f"{r.peak_rss_mb:.0f}",
                f"{r.size_bytes / 1e6:.2f}",
                f"{r.ratio_p50_to_first:.2f}",
                f"{rt.interpreter} {rt.delegate or ''}{rt.delegation_note()}",
            ]
        )
    return lat


def _client_rows(inputs: ReportInputs) -> list[list[str]]:
    """Drift through the app's own library (MediaPipe Tasks), for targets whose client reads metadata."""
    rows = [
        [
            "target",
            "client",
            "images",
            "agreement, card's crop",
            "full image (client's resize)",
            "card's crop as region of interest",
            "same pixels as edgeship's runtime",
            "result",
        ]
    ]
    for name, drift in inputs.drifts.items():
        c = drift.client_check
        if c:
            rows.append(
                [
                    name,
                    c.client,
                    str(c.images),
                    _pct(c.card_preprocessing.top1_agreement),
                    _pct(c.client_preprocessing.top1_agreement),
                    _pct(c.roi_preprocessing.top1_agreement),
                    _pct(c.runtime_agreement),
                    "PASS" if c.ok else "FAIL",
                ]
            )
    return rows


def device_speeds(summary: Mapping[str, Any]) -> dict[str, SpeedVerdict]:
    """Each target's verdict from its own device's benchmark, read from deploy's summary (target name -> verdict)."""
    speeds = {}
    for name, t in summary.get("targets", {}).items():
        speed = (t.get("device_bench") or {}).get("speed")
        if speed:
            speeds[name] = SpeedVerdict.from_dict(speed)
    return speeds


def _client_note() -> str:
    return (
        f"Agreement with the float reference; {CLIENT_PREPROCESSING}. The bundle's README shows the region of interest."
    )


def _e2e_note(bench: BenchReport) -> str:
    e = next((r.e2e for r in bench.results if r.e2e), None)
    if e is None:
        return "End to end: not measured (no images given to the benchmark)."
    what = "one image" if e.images == 1 else f"{e.images} held-apart images in turn"
    paths: dict[str, list[str]] = {}
    for r in bench.results:
        if r.e2e and r.model not in paths.setdefault(r.e2e.image_path, []):
            paths[r.e2e.image_path].append(r.model)
    how = "; ".join(f"{', '.join(models)}: {path}" for path, models in paths.items())
    return (
        f"End to end = `Classifier.predict` on {what}: decode + preprocess + invoke + postprocess, the code a "
        f"device runs; × invoke is its p50 over the p50 of a bare invoke() timed in the same rounds (in brackets; "
        f"the invoke column was timed in separate rounds). .onnx: invoke only. "
        f"Image path — {how}."
    )


def _image_path_line(inputs: ReportInputs) -> list[str]:
    """The image path each drift check ran (the float reference saw the same decoded pixels)."""
    paths: dict[str, list[str]] = {}
    for name, drift in inputs.drifts.items():
        path = drift.report.candidate.image_path
        if path is not None:
            paths.setdefault(str(path), []).append(name)
    return [
        f"Image path ({', '.join(names)}): {path}; the float reference was fed the same decoded pixels."
        for path, names in paths.items()
    ]


def speed_decision_lines(summary: Mapping[str, Any]) -> list[str]:
    """Where quantize timed each target's speed decisions (placement, speed floor, speed check), from deploy's
    summary; a device that was not used for them (emulated) says why."""
    lines = []
    for name, t in summary["targets"].items():
        timed = t.get("speed_timing")
        if not timed or not timed.get("measurements"):
            continue
        runtime = f"{timed.get('interpreter', '?')} {timed.get('interpreter_version') or ''}".strip()
        note = f" ({timed['note']})" if timed.get("note") else ""
        lines.append(
            f"{name}: quantize's speed decisions timed on {timed.get('where') or 'this machine'} "
            f"({timed.get('machine', '?')}, {runtime}){note}."
        )
    return lines


def _isa_summary(inputs: ReportInputs) -> list[str]:
    """Which targets' drift checks ran on their own ISA, and which only on this machine, said plainly."""
    own: list[str] = []
    host_only: list[str] = []
    for name in inputs.summary["targets"]:
        ok, words = isa_check(_ran_on(name, inputs), _target_arch(name, inputs))
        (own if ok else host_only).append(f"{name} ({words})")
    lines = []
    if own:
        lines.append("Checked on their own ISA: " + ", ".join(own) + ".")
    if host_only:
        lines.append(
            f"Checked only on this machine ({platform.machine()}), not on their own ISA: "
            + ", ".join(host_only)
            + ". Their figures say nothing about their own kernels: re-run with "
            "--emulate (aarch64 under qemu) or --host user@device."
        )
    return lines


def _md_table(rows: list[list[str]]) -> str:
    head = "| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]) + "\n"
    return head + "".join("| " + " | ".join(r) + " |\n" for r in rows[1:])


def _html_table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join(
        "<tr>"
        + "".join(
            f"<td class='{'pass' if c == 'PASS' else 'fail' if c in ('FAIL', 'NO') else ''}'>{html.escape(c)}</td>"
            for c in r
        )
        + "</tr>"
        for r in rows[1:]
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _group_title(names: list[str], inputs: ReportInputs) -> str:
    if len(names) == 1:
        return f"Worst disagreements on {names[0]}"
    ran_on = {_ran_on(n, inputs) for n in names}
    models = {inputs.summary["targets"][n]["model"] for n in names}
    why = (
        f"the same model ran on the same machine ({ran_on.pop()})"
        if len(models) == 1 and len(ran_on) == 1
        else "they found the same images with the same top-3"
    )
    return f"Worst disagreements, shared by {', '.join(names)}: {why}, so they are shown once"


def _disagreement_sections(inputs: ReportInputs, assets: Path) -> list[tuple[str, list[Disagreement], list[Path]]]:
    """(title, picks, thumbnail files) per set of targets with the same worst disagreements."""
    merged: dict[tuple[Any, ...], tuple[list[str], list[Disagreement]]] = {}
    for names, drift in disagreement_groups(inputs):
        picks = disagreements(drift, inputs.labels)
        if picks:
            key = tuple((d.file, tuple(n for n, _ in d.reference), tuple(n for n, _ in d.deployed)) for d in picks)
            merged.setdefault(key, ([], picks))[0].extend(names)
    sections = []
    for g, (names, picks) in enumerate(merged.values()):
        thumbs = [atomic_write_bytes(assets / f"disagreement-{g}-{k}.jpg", d.thumbnail) for k, d in enumerate(picks)]
        sections.append((_group_title(names, inputs), picks, thumbs))
    return sections


def write_report(out: Path, inputs: ReportInputs) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` into ``out`` (plots and thumbnails in ``report/``,
    embedded in the HTML)."""
    summary, bench = inputs.summary, inputs.bench
    assets = out / ASSETS
    assets.mkdir(parents=True, exist_ok=True)
    plots: list[tuple[str, Path]] = [("Latency", latency_plot(bench, assets / "latency.png"))]
    sizes = {r.model: r.size_bytes for r in bench.results}
    plots.append(("Sizes", size_plot(sizes, assets / "sizes.png")))
    plots += [(f"Per-layer error, {variant}", path) for variant, path in sorted(inputs.layer_plots.items())]
    for old in assets.glob("disagreement-*.jpg"):  # a previous run may have had more groups
        old.unlink()
    groups = _disagreement_sections(inputs, assets)
    tables = _tables(inputs)
    verdict = (
        "all targets inside their drift budgets"
        if all(d.passed for d in inputs.drifts.values())
        else "some targets are OVER their drift budget"
    )

    isa = _isa_summary(inputs) + _image_path_line(inputs) + device_speed_lines(device_speeds(summary))
    isa += speed_decision_lines(summary)
    md = [
        f"# edgeship deploy report\n\nModel `{summary['model']}`; calibrated on {summary['calibration']['count']} "
        f"images, evaluated on {summary['evaluation']['count']} other images: **{verdict}**.\n",
        "## Pipeline\n",
        _md_table(tables["stages"]),
        f"\nTotal wall time {summary['wall_s']:.1f} s.\n",
        "## Accuracy drift per target\n",
        _md_table(tables["drift"]),
        "\n\n".join(isa) + "\n",
        *(
            ["## Through the app's own library\n", _md_table(tables["client"]), _client_note() + "\n"]
            if len(tables["client"]) > 1
            else []
        ),
        "## Latency and size\n",
        _md_table(tables["latency"]),
        _e2e_note(bench) + "\n",
    ]
    md += [f"\n### {title}\n\n![{title}]({p.relative_to(out)})\n" for title, p in plots]
    for title, picks, thumbs in groups:
        md += [
            f"\n### {title}\n",
            _md_table(
                [["image", "float reference top-3", "deployed top-3"]]
                + [
                    [
                        f"![{Path(d.file).name}]({t.relative_to(out)}) {Path(d.file).name}",
                        "<br>".join(f"{n} {p:.2f}" for n, p in d.reference),
                        "<br>".join(f"{n} {p:.2f}" for n, p in d.deployed),
                    ]
                    for d, t in zip(picks, thumbs)
                ]
            ),
        ]
    md_path = atomic_write_text(out / "report.md", "\n".join(md))
    html_path = atomic_write_text(
        out / "report.html",
        _html(summary, tables, plots, verdict, isa, _e2e_note(bench), [(t, p) for t, p, _ in groups]),
    )
    return md_path, html_path


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f3f3f3}td.pass{color:#060;font-weight:bold}td.fail{color:#b00;font-weight:bold}
img{max-width:100%;border:1px solid #ddd;margin:0.5em 0}
.cards{display:flex;flex-wrap:wrap;gap:16px}.card{width:340px;margin:0;font-size:14px}
.card img{width:224px;display:block}.card table{margin:0.3em 0;font-size:14px;width:100%}
.card td.p{text-align:right;font-variant-numeric:tabular-nums}
.card figcaption{font-weight:600;overflow-wrap:anywhere}"""

_CHECK = """window.addEventListener('load',function(){var imgs=document.images,ok=0;
for(var i=0;i<imgs.length;i++){if(imgs[i].complete&&imgs[i].naturalWidth>0)ok++;}
document.body.setAttribute('data-images-loaded',ok+'/'+imgs.length);});"""


def _card_html(d: Disagreement) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(rn)}</td><td class='p'>{rp:.2f}</td>"
        f"<td>{html.escape(dn)}</td><td class='p'>{dp:.2f}</td></tr>"
        for (rn, rp), (dn, dp) in zip(d.reference, d.deployed)
    )
    return (
        f"<figure class='card'><img alt='{html.escape(Path(d.file).name)}' src='data:image/jpeg;base64,"
        f"{base64.b64encode(d.thumbnail).decode()}'><figcaption>{html.escape(Path(d.file).name)} "
        f"(cosine {d.cosine:.3f})</figcaption><table><thead><tr><th colspan='2'>float reference</th>"
        f"<th colspan='2'>deployed</th></tr></thead><tbody>{rows}</tbody></table></figure>"
    )


def _html(
    summary: dict[str, Any],
    tables: dict[str, list[list[str]]],
    plots: list[tuple[str, Path]],
    verdict: str,
    isa: list[str],
    e2e_note: str,
    groups: list[tuple[str, list[Disagreement]]],
) -> str:
    figs = "".join(
        f"<h3>{html.escape(t)}</h3><img alt='{html.escape(t)}' src='data:image/png;base64,"
        f"{base64.b64encode(p.read_bytes()).decode()}'>"
        for t, p in plots
    )
    cards = "".join(
        f"<h3>{html.escape(t)}</h3><div class='cards'>{''.join(_card_html(d) for d in picks)}</div>"
        for t, picks in groups
    )
    note = html.escape(e2e_note).replace("`Classifier.predict`", "<code>Classifier.predict</code>")
    return (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>edgeship deploy report</title>"
        f"<style>{_CSS}</style></head><body><h1>edgeship deploy report</h1>"
        f"<p>Model <code>{html.escape(summary['model'])}</code>; calibrated on "
        f"{summary['calibration']['count']} images, evaluated on {summary['evaluation']['count']} other images: "
        f"<b>{html.escape(verdict)}</b>.</p>"
        f"<h2>Pipeline</h2>{_html_table(tables['stages'])}<p>Total wall time {summary['wall_s']:.1f} s.</p>"
        f"<h2>Accuracy drift per target</h2>{_html_table(tables['drift'])}"
        + "".join(f"<p>{html.escape(line)}</p>" for line in isa)
        + (
            f"<h2>Through the app's own library</h2>{_html_table(tables['client'])}<p>{html.escape(_client_note())}</p>"
            if len(tables["client"]) > 1
            else ""
        )
        + f"<h2>Latency and size</h2>{_html_table(tables['latency'])}<p>{note}</p>{figs}{cards}"
        f"<script>{_CHECK}</script></body></html>"
    )
