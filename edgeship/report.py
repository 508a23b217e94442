"""The deploy report: ``report.md`` and a self-contained ``report.html`` with PNG plots."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np

from edgeship._io import atomic_write_bytes, atomic_write_text

ASSETS = "report"


def _plt() -> Any:
    from edgeship._deps import require

    require("matplotlib", purpose="draw report plots")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _plt().close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def latency_plot(bench: dict[str, Any], path: Path) -> Path:
    """Box plot of invoke() latency per model and thread count."""
    plt = _plt()
    results = bench["results"]
    fig, ax = plt.subplots(figsize=(10, 0.5 * len(results) + 1.8))
    data = [r.get("samples_ms") or [r["p50_ms"]] for r in results]
    labels = [f"{r['model']} ×{r['threads']}" for r in results]
    ax.boxplot(data, orientation="horizontal", showfliers=True, flierprops={"markersize": 2})
    ax.set_yticks(range(1, len(labels) + 1), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("invoke() latency (ms), lower is better")
    ax.set_title(f"Latency distribution on {bench['host'].get('machine', '?')} ({results[0]['runs']} runs each)")
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


def _labels(out: Path) -> list[str] | None:
    path = out / "convert" / "labels.txt"
    if not path.is_file():
        return None
    from edgeship.runtime.images import Labels

    return list(Labels.load(path).names)


def disagreement_plot(verify_dir: Path, labels: list[str] | None, path: Path, *, count: int = 6) -> Path | None:
    """Thumbnails of the images where reference and candidate disagree most, with both top-3."""
    npz = verify_dir / "outputs.npz"
    if not npz.is_file():
        return None
    with np.load(npz) as data:
        ref, cand, files = data["reference"], data["candidate"], [str(f) for f in data["files"]]
    from edgeship.runtime.metrics import cosine_per_sample, softmax, topk

    differ = np.nonzero(np.argmax(ref, 1) != np.argmax(cand, 1))[0]
    order = differ[np.argsort(cosine_per_sample(ref[differ], cand[differ]))] if len(differ) else \
        np.argsort(cosine_per_sample(ref, cand))[:3]
    picks = list(order[:count])
    if not picks:
        return None
    from PIL import Image

    plt = _plt()
    fig, axes = plt.subplots(1, len(picks), figsize=(2.6 * len(picks), 3.6), squeeze=False)
    name = (lambda i: labels[i] if labels and i < len(labels) else str(i))
    for ax, i in zip(axes[0], picks):
        with Image.open(files[i]) as im:
            im = im.convert("RGB")
            im.thumbnail((160, 160))
            ax.imshow(np.asarray(im))
        ax.axis("off")
        pr, pc = softmax(ref[i:i + 1])[0], softmax(cand[i:i + 1])[0]
        tr, tc = topk(ref[i:i + 1], 3)[0], topk(cand[i:i + 1], 3)[0]
        text = "float:\n" + "\n".join(f"{name(k)[:18]} {pr[k]:.2f}" for k in tr)
        text += "\ndeployed:\n" + "\n".join(f"{name(k)[:18]} {pc[k]:.2f}" for k in tc)
        ax.set_title(Path(files[i]).name[:22], fontsize=7)
        ax.text(0, -0.04, text, transform=ax.transAxes, fontsize=6.5, va="top", family="monospace")
    fig.suptitle("Largest disagreements (float reference vs deployed)", fontsize=9)
    fig.subplots_adjust(bottom=0.38, top=0.86, wspace=0.1)
    return _save(fig, path)


def _pct(v: Any) -> str:
    return "–" if v is None else f"{100 * v:.2f}%"


def _num(v: Any, fmt: str = ".3f") -> str:
    return "–" if v is None else format(v, fmt)


def _tables(out: Path, summary: dict[str, Any], bench: dict[str, Any]) -> dict[str, list[list[str]]]:
    stages = [["stage", "reused", "seconds this run", "seconds when built"]] + [
        [s["name"], "yes" if s["reused"] else "no", f"{s['seconds']:.1f}", f"{s.get('built_seconds', 0.0):.1f}"]
        for s in summary["stages"]]
    drift = [["target", "model", "ran on", "agreement", "float top-1", "deployed top-1", "mean cos", "SQNR dB",
              "budget (agree / drop / SQNR)", "result"]]
    for name, t in summary["targets"].items():
        f, b = t["figures"], {c["metric"]: c for c in t["budget"]}
        drift.append([name, Path(t["model"]).name, t.get("ran_on", "?"), _pct(f["top1_agreement"]), _pct(f.get("ref_top1")),
                      _pct(f.get("cand_top1")), _num(f["mean_cosine"], ".4f"), _num(f["sqnr_db"], ".1f"),
                      f"≥{b['top1_agreement_pct']['limit']}% / ≤{b['top1_drop_points']['limit']} pt / "
                      f"≥{b['sqnr_db']['limit']} dB", "PASS" if t["passed"] else "FAIL"])
    lat = [["model", "threads", "init ms", "first ms", "p50 ms", "p90 ms", "p99 ms", "peak RSS MB", "size MB",
            "× first", "runtime"]]
    for r in bench["results"]:
        rt = r["runtime"]
        lat.append([r["model"], str(r["threads"]), f"{r['init_ms']:.1f}", f"{r['first_ms']:.2f}", f"{r['p50_ms']:.2f}",
                    f"{r['p90_ms']:.2f}", f"{r['p99_ms']:.2f}", f"{r['peak_rss_mb']:.0f}", f"{r['size_bytes'] / 1e6:.2f}",
                    f"{r['ratio_p50_to_first']:.2f}", f"{rt['interpreter']} {rt.get('delegate', '')}"])
    return {"stages": stages, "drift": drift, "latency": lat}


def _md_table(rows: list[list[str]]) -> str:
    head = "| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]) + "\n"
    return head + "".join("| " + " | ".join(r) + " |\n" for r in rows[1:])


def _html_table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td class='{'pass' if c == 'PASS' else 'fail' if c == 'FAIL' else ''}'>"
                                    f"{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(out: Path, summary: dict[str, Any], bench: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` (plots in ``report/``, embedded in the HTML)."""
    assets = out / ASSETS
    assets.mkdir(exist_ok=True)
    labels = _labels(out)
    plots: list[tuple[str, Path]] = [("Latency", latency_plot(bench, assets / "latency.png"))]
    sizes = {r["model"]: r["size_bytes"] for r in bench["results"]}
    plots.append(("Sizes", size_plot(sizes, assets / "sizes.png")))
    for q in sorted((out / "quantize").glob("*/layer_errors.png")):
        plots.append((f"Per-layer error, {q.parent.name}", q))
    for name in summary["targets"]:
        p = disagreement_plot(out / "verify" / name, labels, assets / f"disagreements-{name}.png")
        if p:
            plots.append((f"Worst disagreements on {name}", p))
    tables = _tables(out, summary, bench)
    verdict = "all targets inside their drift budgets" if all(t["passed"] for t in summary["targets"].values()) \
        else "some targets are OVER their drift budget"
    md = [f"# edgeship deploy report\n\nModel `{summary['model']}`; calibrated on {summary['calibration']['count']} "
          f"images, evaluated on {summary['evaluation']['count']} other images: **{verdict}**.\n",
          "## Pipeline\n", _md_table(tables["stages"]), f"\nTotal wall time {summary['wall_s']:.1f} s.\n",
          "## Accuracy drift per target\n", _md_table(tables["drift"]),
          "## Latency and size\n", _md_table(tables["latency"])]
    md += [f"\n### {title}\n\n![{title}]({p.relative_to(out)})\n" for title, p in plots]
    md_path = atomic_write_text(out / "report.md", "\n".join(md))
    html_path = atomic_write_text(out / "report.html", _html(summary, tables, plots, verdict))
    return md_path, html_path


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f3f3f3}td.pass{color:#060;font-weight:bold}td.fail{color:#b00;font-weight:bold}
img{max-width:100%;border:1px solid #ddd;margin:0.5em 0}"""

_CHECK = """window.addEventListener('load',function(){var imgs=document.images,ok=0;
for(var i=0;i<imgs.length;i++){if(imgs[i].complete&&imgs[i].naturalWidth>0)ok++;}
document.body.setAttribute('data-images-loaded',ok+'/'+imgs.length);});"""


def _html(summary: dict[str, Any], tables: dict[str, list[list[str]]], plots: list[tuple[str, Path]],
          verdict: str) -> str:
    figs = "".join(f"<h3>{html.escape(t)}</h3><img alt='{html.escape(t)}' src='data:image/png;base64,"
                   f"{base64.b64encode(p.read_bytes()).decode()}'>" for t, p in plots)
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>edgeship deploy report</title>"
            f"<style>{_CSS}</style></head><body><h1>edgeship deploy report</h1>"
            f"<p>Model <code>{html.escape(summary['model'])}</code>; calibrated on "
            f"{summary['calibration']['count']} images, evaluated on {summary['evaluation']['count']} other images: "
            f"<b>{html.escape(verdict)}</b>.</p>"
            f"<h2>Pipeline</h2>{_html_table(tables['stages'])}<p>Total wall time {summary['wall_s']:.1f} s.</p>"
            f"<h2>Accuracy drift per target</h2>{_html_table(tables['drift'])}"
            f"<h2>Latency and size</h2>{_html_table(tables['latency'])}{figs}"
            f"<script>{_CHECK}</script></body></html>")

