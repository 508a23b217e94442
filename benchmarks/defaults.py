"""The decision protocol for quantize's defaults (issue 33): choose on one split, confirm on another.

    python benchmarks/defaults.py --work DIR                 # the whole protocol (resumable: DIR caches every cell)
    python benchmarks/defaults.py --work DIR --models mobilenetv2 --draws 2   # part of it; later runs add up
    python benchmarks/defaults.py --work DIR --table          # only the tables of what DIR holds
    python benchmarks/defaults.py --quick --work DIR          # a minute-scale smoke run (the test's)

Protocol. The 500 images of ``../shared/data/imagenet-sample`` are one per class; sorted by name, the
even positions are the *choosing* split and the odd ones the *confirming* split: no class in both.
Each calibration *draw* (seed 0..4) is 100 images picked at random from the choosing split, as a user
calibrates on their own images; the confirming split never enters calibration or choice. Each image is
seen through 12 *views* (centre crops at 100 %, 87.5 % and 70 % of the short side, three 80 % off-centre
crops, each also mirrored), so a comparison pools 1,800 (choosing: the 150 images a draw did not
calibrate on) or 3,000 (confirming) inputs per draw. Every option quantizes the same draw; every peer too
(TensorFlow PTQ, onnxruntime static QDQ with its default MinMax calibration, ai-edge-quantizer when it is
installed apart, see ``arch_matrix.aeq_path``), and a peer is scored on the confirming split only.
Every edgeship cell quantizes with timed placement off (every op int8, as the peers): on a host, timed
placement keeps large depthwise convolutions float where they time faster (EfficientNet-Lite's 12 on x86,
none in MobileNetV2), a speed decision that flips with the machine's load and is not a device's.

Statistics, per model, pooled over draws: top-1 agreement with the float model; exact McNemar test on
the inputs where exactly one of two quantized models agrees with float; SQNR of the logits with a 95 %
bootstrap interval of the difference, resampling source images (their views move together).

Decision per axis (bias correction none / depthwise / all; scores float / int8; range method auto /
minmax): the options are ordered by cost. On the choosing split, the contender is the costliest option
that beats the cheapest beyond noise (McNemar p < 0.05, pooled over models) — else the cheapest. On
the confirming split the contender is the decision only if it beats the cheapest there beyond noise on
the pooled models and is not significantly worse on any model; otherwise the cheaper option is the
decision. Until every cell of the protocol's plan exists (every trained model, five draws, every
option) the tables say so and decide nothing; a smaller plan (``--draws 2``) shows contenders only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import arch_matrix as am  # noqa: E402

from edgeship._assets import shared_assets  # noqa: E402
from edgeship.runtime.card import ModelCard, Preprocessing  # noqa: E402
from edgeship.runtime.images import list_images, normalize  # noqa: E402

NUM_CALIB = 100
DRAWS = 5
#: (side fraction of the short side, centre x, centre y, mirrored)
VIEWS = tuple(
    (side, cx, cy, flip)
    for side, cx, cy in (
        (1.0, 0.5, 0.5),
        (0.875, 0.5, 0.5),
        (0.7, 0.5, 0.5),
        (0.8, 0.3, 0.3),
        (0.8, 0.7, 0.7),
        (0.8, 0.3, 0.7),
    )
    for flip in (False, True)
)
#: name -> QuantizeOptions fields that differ from the current defaults
OPTIONS: dict[str, dict[str, Any]] = {
    "default": {},
    "bc_none": {"bias_correction": False},
    "bc_all": {"bias_correction": True},
    "int8_logits": {"float_logits": False},
    "minmax": {"method": "minmax"},
}
#: axis -> (option, what it is) cheapest first; "default" is the current default's place on the axis.
AXES: dict[str, tuple[tuple[str, str], ...]] = {
    "bias correction": (("bc_none", "none"), ("default", "depthwise"), ("bc_all", "every conv")),
    "scores": (("int8_logits", "int8 grid"), ("default", "float logits")),
    "range method": (("minmax", "min-max"), ("default", "auto (cross-fitted)")),
}
PEERS = ("tf_ptq", "ort_qdq", "aeq")
ALPHA = 0.05


@dataclass(frozen=True)
class Plan:
    models: tuple[tuple[str, str], ...]
    draws: int
    options: tuple[str, ...]
    peers: tuple[str, ...]
    views: int = len(VIEWS)
    per_split: int | None = None  # images per split (None: all 250)
    num_calib: int = NUM_CALIB

    def covers_protocol(self) -> bool:
        """Whether this plan is at least the protocol's: every trained model, five draws, every option."""
        return (
            set(FULL.models) <= set(self.models)
            and self.draws >= DRAWS
            and set(OPTIONS) <= set(self.options)
            and (self.views, self.per_split, self.num_calib) == (FULL.views, FULL.per_split, FULL.num_calib)
        )


QUICK = Plan(
    (("mobilenetv2", "tf2onnx"),), 1, ("default", "bc_none"), ("ort_qdq",), views=2, per_split=24, num_calib=16
)
FULL = Plan(tuple(am.TRAINED), DRAWS, tuple(OPTIONS), PEERS)


# ----------------------------------------------------------------------------- splits and views
def splits(folder: Path, per_split: int | None) -> dict[str, list[Path]]:
    """Choosing (even positions by name) and confirming (odd) images: one class each, no class in both."""
    files = sorted(list_images(folder).files, key=lambda f: f.name)
    out = {"choose": files[0::2], "confirm": files[1::2]}
    return {k: v[:per_split] if per_split else v for k, v in out.items()}


def draw(choose: list[Path], seed: int, count: int) -> tuple[list[Path], list[Path]]:
    """A seeded calibration draw from the choosing split, and the choosing images left for choosing."""
    picks = set(np.random.default_rng(seed).choice(len(choose), size=min(count, len(choose)), replace=False).tolist())
    return [f for i, f in enumerate(choose) if i in picks], [f for i, f in enumerate(choose) if i not in picks]


def view(path: Path, size: int, spec: tuple[float, float, float, bool]) -> np.ndarray:
    """One augmented view: a square crop (side fraction, centre) resized to ``size``, maybe mirrored."""
    from PIL import Image, ImageOps

    side, cx, cy, flip = spec
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        w, h = im.size
        s = side * min(w, h)
        x0 = min(max(cx * w - s / 2, 0), w - s)
        y0 = min(max(cy * h - s / 2, 0), h - s)
        crop = im.resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + s, y0 + s))
        if flip:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        return np.asarray(crop, dtype=np.uint8)


def views_of(files: list[Path], size: int, n_views: int) -> np.ndarray:
    return np.stack([view(f, size, spec) for f in files for spec in VIEWS[:n_views]])


def raw(files: list[Path]) -> list[np.ndarray]:
    """Decoded images as a user's arrays (quantize resizes and crops them like files)."""
    from PIL import Image

    out = []
    for f in files:
        with Image.open(f) as im:
            out.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
    return out


# ----------------------------------------------------------------------------- cells (cached)
def cached(path: Path, make: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """A cell's arrays: read from ``path`` when a run made it before, else made and written atomically."""
    if path.is_file():
        with np.load(path) as d:
            return {k: d[k] for k in d.files}
    arrays = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return arrays


def cell_file(folder: Path, d: int, name: str) -> Path:
    """A cell's file: an option's (quantized with every op int8, see the module's notes) or a peer's."""
    return folder / f"draw{d}" / (f"{name}.int8.npz" if name in OPTIONS else f"peer-{name}.npz")


def per_input(ref: np.ndarray, out: np.ndarray) -> dict[str, np.ndarray]:
    """What the statistics need per input: the candidate's top-1, signal and noise energy against float."""
    ref, out = ref.reshape(len(ref), -1).astype(np.float64), out.reshape(len(out), -1).astype(np.float64)
    return {"top1": out.argmax(1), "signal": (ref**2).sum(1), "noise": ((ref - out) ** 2).sum(1)}


@dataclass
class Model:
    """One trained model: its ONNX, conversion and preprocessing, with the views of both splits."""

    name: str
    exporter: str
    onnx: Path
    convert_dir: Path
    prep: Preprocessing  # the ONNX model's
    card_prep: Preprocessing  # the converted model's
    views: dict[str, np.ndarray]
    float_logits: dict[str, np.ndarray]


def load_model(case: tuple[str, str], plan: Plan, work: Path, files: dict[str, list[Path]]) -> Model:
    from edgeship.reference import run_onnx

    name, exporter = case
    arch = am.SHARED[name][2] if name in am.SHARED else am.archs.ARCHS[name]
    assets = shared_assets()
    onnx = assets / "models" / am.SHARED[name][0] if name in am.SHARED else am.archs.build(name, exporter)
    proto = am.Protocol(assets, work)
    conv = work / f"{name}-{exporter}" / "convert"
    am.convert_model(onnx, arch, conv, proto)
    card = ModelCard.load(conv / "model_card.json").preprocessing
    size = card.crop[0]
    views = {s: views_of(f, size, plan.views) for s, f in files.items()}
    logits = {
        s: cached(
            _float_file(work, case, s, plan, len(f)), lambda s=s: {"logits": run_onnx(str(onnx), views[s], arch.prep)}
        )[  # type: ignore[misc]
            "logits"
        ]
        for s, f in files.items()
    }
    return Model(name, exporter, onnx, conv, arch.prep, card, views, logits)


def edgeship_cell(m: Model, option: str, calib: list[np.ndarray], plan: Plan) -> dict[str, np.ndarray]:
    from edgeship.quantize import QuantizeOptions, quantize
    from edgeship.reference import run_tflite

    opts = QuantizeOptions(num_calib=plan.num_calib, timed_placement=False, **OPTIONS[option])
    t0 = time.perf_counter()
    result = quantize(str(m.convert_dir), calib, evaluation=calib[:4], options=opts)
    seconds = time.perf_counter() - t0
    out = {"seconds": np.array(seconds)}
    for split, px in m.views.items():
        got = run_tflite(result.model, px, m.card_prep)
        out |= {f"{split}_{k}": v for k, v in per_input(m.float_logits[split], got).items()}
    return out


def peer_cell(m: Model, peer: str, calib_files: list[Path], work: Path) -> dict[str, np.ndarray]:
    from edgeship.reference import load_pixels, run_onnx, run_tflite
    from edgeship.runtime.images import ImageSet

    calib_set = ImageSet(calib_files[0].parent, tuple(calib_files), ())
    work.mkdir(parents=True, exist_ok=True)
    if peer == "ort_qdq":
        x = np.stack([normalize(p, m.prep) for p in load_pixels(calib_set, m.prep)]).transpose(0, 3, 1, 2)
        np.save(work / "ort.calib.npy", np.ascontiguousarray(x))
        out = work / "ort_minmax.onnx"
        subprocess.run(
            [sys.executable, am.__file__, "--child-ort", "MinMax", str(m.onnx), str(work / "ort.calib.npy"), str(out)],
            capture_output=True,
            check=True,
        )
        return _scored(m, lambda px: run_onnx(str(out), px, m.prep))
    calib = np.stack([normalize(p, m.card_prep) for p in load_pixels(calib_set, m.card_prep)])
    if peer == "tf_ptq":
        path = am.tf_ptq(m.convert_dir, calib, work / "tf_ptq.tflite")
    else:
        path = am.aeq_int8(m.convert_dir / "model_float32.tflite", calib, work / "aeq_int8.tflite")
    return _scored(m, lambda px: run_tflite(path, px, m.card_prep))


def _scored(m: Model, run: Callable[[np.ndarray], np.ndarray]) -> dict[str, np.ndarray]:
    """A peer's figures on the confirming split: the only split a peer is compared on."""
    got = run(m.views["confirm"])
    return {f"confirm_{k}": v for k, v in per_input(m.float_logits["confirm"], got).items()}


def run_plan(plan: Plan, work: Path, log: Callable[[str], None]) -> None:
    """Every cell of the plan not yet in ``work``: draws outermost, so a partial run covers every model."""
    files = splits(shared_assets() / "data" / "imagenet-sample", plan.per_split)
    models: dict[tuple[str, str], Model] = {}
    for d in range(plan.draws):
        calib_files, _ = draw(files["choose"], d, plan.num_calib)
        for case in plan.models:
            try:
                if case not in models:
                    models[case] = load_model(case, plan, work, files)
            except Exception as exc:  # noqa: BLE001 - one model's failure must not end the protocol
                log(f"{case}: {am.one_line(exc)}")
                continue
            _draw_cells(models[case], d, calib_files, plan, work, log)


def _draw_cells(m: Model, d: int, calib_files: list[Path], plan: Plan, work: Path, log: Callable[[str], None]) -> None:
    folder = work / f"{m.name}-{m.exporter}"
    raw_calib = raw(calib_files)
    jobs: list[tuple[str, Callable[[], dict[str, np.ndarray]]]] = [
        (o, partial(edgeship_cell, m, o, raw_calib, plan)) for o in plan.options
    ]
    jobs += [(p, partial(peer_cell, m, p, calib_files, folder / f"draw{d}" / f"peer-{p}")) for p in plan.peers]
    for name, job in jobs:
        path = cell_file(folder, d, name)
        label = name if name in OPTIONS else f"peer-{name}"
        if path.is_file():
            continue
        t0 = time.perf_counter()
        try:
            cached(path, job)
            log(f"{m.name}:{m.exporter} draw {d} {label}: {time.perf_counter() - t0:.0f} s")
        except Exception as exc:  # noqa: BLE001 - a cell that fails is reported and left missing
            log(f"{m.name}:{m.exporter} draw {d} {label}: FAILED {am.one_line(exc)}")


# ----------------------------------------------------------------------------- statistics
def mcnemar(a_right: np.ndarray, b_right: np.ndarray) -> tuple[int, int, float]:
    """(inputs only A agrees on, inputs only B agrees on, exact two-sided McNemar p)."""
    from scipy.stats import binomtest

    only_a, only_b = int(np.sum(a_right & ~b_right)), int(np.sum(~a_right & b_right))
    n = only_a + only_b
    return only_a, only_b, 1.0 if n == 0 else float(binomtest(min(only_a, only_b), n, 0.5).pvalue)


def sqnr_db(signal: np.ndarray, noise: np.ndarray) -> float:
    return float(10 * np.log10(signal.sum() / max(noise.sum(), 1e-300)))


def bootstrap_sqnr_diff(
    sig: np.ndarray, noise_a: np.ndarray, noise_b: np.ndarray, clusters: np.ndarray, reps: int = 1000
) -> tuple[float, float]:
    """95 % percentile bootstrap interval of SQNR(B) - SQNR(A), resampling clusters (source images)."""
    ids, inv = np.unique(clusters, return_inverse=True)
    na, nb = (np.bincount(inv, weights=v) for v in (noise_a, noise_b))
    rng = np.random.default_rng(0)
    picks = rng.integers(0, len(ids), size=(reps, len(ids)))
    diffs = 10 * np.log10(na[picks].sum(1) / nb[picks].sum(1))  # the signal cancels in the difference
    return float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))


@dataclass
class Pooled:
    """One model's cells on one split, pooled over the draws every compared cell has."""

    right: dict[str, np.ndarray]  # option/peer -> agrees with float, per input
    signal: np.ndarray
    noise: dict[str, np.ndarray]
    clusters: np.ndarray
    draws: int


def pooled(
    work: Path, case: tuple[str, str], split: str, names: list[str], plan: Plan, truth_float: np.ndarray
) -> Pooled | None:
    """The draws in which every named cell exists, concatenated (None: no such draw)."""
    folder = work / f"{case[0]}-{case[1]}"
    right: dict[str, list[np.ndarray]] = {n: [] for n in names}
    noise: dict[str, list[np.ndarray]] = {n: [] for n in names}
    signal, clusters, used = [], [], 0
    for d in range(plan.draws):
        paths = {n: cell_file(folder, d, n) for n in names}
        if not all(p.is_file() for p in paths.values()):
            continue
        used += 1
        keep = _scored_inputs(split, d, plan, len(truth_float))
        for n, p in paths.items():
            with np.load(p) as z:
                right[n].append((z[f"{split}_top1"] == truth_float)[keep])
                noise[n].append(z[f"{split}_noise"][keep])
                sig = z[f"{split}_signal"][keep]
        signal.append(sig)
        clusters.append(d * 100000 + (np.arange(len(truth_float)) // plan.views)[keep])
    if not used:
        return None
    return Pooled(
        {n: np.concatenate(v) for n, v in right.items()},
        np.concatenate(signal),
        {n: np.concatenate(v) for n, v in noise.items()},
        np.concatenate(clusters),
        used,
    )


def _float_file(work: Path, case: tuple[str, str], split: str, plan: Plan, images: int) -> Path:
    return work / f"{case[0]}-{case[1]}" / f"float-{split}-{plan.views}views-{images}.npz"


def _scored_inputs(split: str, d: int, plan: Plan, inputs: int) -> np.ndarray:
    """Which inputs of a split a draw is scored on: on the choosing split, not the draw's calibration images."""
    images = inputs // plan.views
    if split != "choose":
        return np.ones(inputs, dtype=bool)
    picks = np.random.default_rng(d).choice(images, size=min(plan.num_calib, images), replace=False)
    scored = np.ones(images, dtype=bool)
    scored[picks] = False
    return np.repeat(scored, plan.views)


def float_top1(work: Path, case: tuple[str, str], split: str, plan: Plan, images: int) -> np.ndarray | None:
    path = _float_file(work, case, split, plan, images)
    if not path.is_file():
        return None
    with np.load(path) as z:
        return np.asarray(z["logits"].argmax(1))


def compare_pair(p: Pooled, a: str, b: str) -> dict[str, Any]:
    only_a, only_b, pv = mcnemar(p.right[a], p.right[b])
    lo, hi = bootstrap_sqnr_diff(p.signal, p.noise[a], p.noise[b], p.clusters)
    return {
        "agree_a": float(p.right[a].mean()),
        "agree_b": float(p.right[b].mean()),
        "only_a": only_a,
        "only_b": only_b,
        "p": pv,
        "sqnr_a": sqnr_db(p.signal, p.noise[a]),
        "sqnr_b": sqnr_db(p.signal, p.noise[b]),
        "sqnr_diff_ci": (lo, hi),
        "inputs": int(len(p.signal)),
        "draws": p.draws,
    }


def pooled_over_models(rows: list[dict[str, Any]]) -> tuple[int, int, float]:
    """McNemar over every model's discordant inputs together."""
    from scipy.stats import binomtest

    a, b = sum(r["only_a"] for r in rows), sum(r["only_b"] for r in rows)
    return a, b, 1.0 if a + b == 0 else float(binomtest(min(a, b), a + b, 0.5).pvalue)


def beats(rows: list[dict[str, Any]]) -> bool:
    """B beats A beyond noise: pooled McNemar p < ALPHA in B's favour and B significantly worse on no model."""
    a, b, p = pooled_over_models(rows)
    worse = any(r["p"] < ALPHA and r["only_a"] > r["only_b"] for r in rows)
    return b > a and p < ALPHA and not worse


# ----------------------------------------------------------------------------- tables
def analyse(work: Path, plan: Plan) -> dict[str, Any]:
    files = splits(shared_assets() / "data" / "imagenet-sample", plan.per_split)
    counts = {s: len(f) for s, f in files.items()}
    expected = len(plan.models) * plan.draws * (len(plan.options) + len(plan.peers))
    present = sum(
        cell_file(work / f"{m}-{e}", d, n).is_file()
        for m, e in plan.models
        for d in range(plan.draws)
        for n in (*plan.options, *plan.peers)
    )
    out: dict[str, Any] = {
        "cells": present,
        "planned": expected,
        "complete": present == expected,
        "protocol": plan.covers_protocol(),
        "axes": {},
        "peers": {},
    }
    for axis, opts in AXES.items():
        names = [o for o, _ in opts if o in plan.options]
        if len(names) < 2:
            continue
        out["axes"][axis] = _axis(work, plan, counts, names, dict(opts), out["complete"] and out["protocol"])
    out["peers"] = _peers(work, plan, counts)
    return out


def _axis(
    work: Path, plan: Plan, counts: dict[str, int], names: list[str], label: dict[str, str], complete: bool
) -> dict[str, Any]:
    cheapest = names[0]
    res: dict[str, Any] = {"options": {n: label[n] for n in names}, "splits": {}}
    for split in ("choose", "confirm"):
        per_model: dict[str, dict[str, Any]] = {}
        for case in plan.models:
            truth = float_top1(work, case, split, plan, counts[split])
            have = [n for n in names if _made(work, case, n, plan)]  # a partial run: the options it has
            p = pooled(work, case, split, have, plan, truth) if truth is not None and cheapest in have else None
            if p is None or len(have) < 2:
                continue
            per_model[f"{case[0]}:{case[1]}"] = {n: compare_pair(p, cheapest, n) for n in have[1:]} | {
                "_agree": {n: float(p.right[n].mean()) for n in have},
                "_sqnr": {n: sqnr_db(p.signal, p.noise[n]) for n in have},
                "_draws": p.draws,
                "_inputs": int(len(p.signal)),
            }
        res["splits"][split] = per_model
    contender = cheapest
    for n in names[1:]:
        rows = [m[n] for m in res["splits"]["choose"].values() if n in m]
        if rows and beats(rows):
            contender = n
    confirmed = cheapest
    rows = [m[contender] for m in res["splits"]["confirm"].values() if contender in m] if contender != cheapest else []
    if rows and beats(rows):
        confirmed = contender
    res["contender_on_choosing"] = contender if res["splits"]["choose"] else None  # None: nothing measured
    res["decision"] = confirmed if complete else None
    return res


def _made(work: Path, case: tuple[str, str], name: str, plan: Plan) -> bool:
    """Whether any draw has this option's cell (a partial run compares the options it has)."""
    folder = work / f"{case[0]}-{case[1]}"
    return any(cell_file(folder, d, name).is_file() for d in range(plan.draws))


def _peers(work: Path, plan: Plan, counts: dict[str, int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for case in plan.models:
        truth = float_top1(work, case, "confirm", plan, counts["confirm"])
        if truth is None:
            continue
        row: dict[str, Any] = {}
        for peer in plan.peers:
            p = pooled(work, case, "confirm", ["default", peer], plan, truth)
            if p is not None:
                row[peer] = compare_pair(p, peer, "default")
        out[f"{case[0]}:{case[1]}"] = row
    return out


def _pair_cell(c: dict[str, Any]) -> str:
    lo, hi = c["sqnr_diff_ci"]
    return f"{c['only_a']}/{c['only_b']}, p={c['p']:.3g}, [{lo:+.2f}, {hi:+.2f}] dB"


def _undecided(res: dict[str, Any]) -> str:
    if not res["complete"]:
        return " — incomplete: no default is decided"
    if not res["protocol"]:
        plan = f"{DRAWS} draws, every trained model and option"
        return f" — a plan smaller than the protocol's ({plan}): no default is decided"
    return ""


def markdown(res: dict[str, Any]) -> list[str]:
    lines = [f"Cells: {res['cells']} of {res['planned']} planned" + _undecided(res)]
    for axis, a in res["axes"].items():
        names = list(a["options"])
        lines += ["", f"**{axis}** (cheapest first: {', '.join(a['options'].values())})", ""]
        head = "| split | model | draws × inputs | " + " | ".join(f"{a['options'][n]} agree / SQNR" for n in names)
        head += (
            " | "
            + " | ".join(
                f"{a['options'][n]} vs {a['options'][names[0]]}: only-first/only-it, McNemar p, ΔSQNR 95% CI"
                for n in names[1:]
            )
            + " |"
        )
        lines += [head, "|" + "---|" * (3 + 2 * len(names) - 1)]
        for split, models in a["splits"].items():
            for model, m in models.items():
                cells = [
                    f"{100 * m['_agree'][n]:.2f} % / {m['_sqnr'][n]:.2f} dB" if n in m["_agree"] else "not run"
                    for n in names
                ]
                cells += [_pair_cell(m[n]) if n in m else "not run" for n in names[1:]]
                lines.append(
                    f"| {split} | {model} | {m['_draws']} × {m['_inputs'] // max(m['_draws'], 1)} | "
                    + " | ".join(cells)
                    + " |"
                )
        decided = a["decision"]
        lines += [
            "",
            f"contender on the choosing split: {a['options'].get(a['contender_on_choosing'], 'no data')}; decision: "
            + (a["options"][decided] if decided else "none (the protocol's plan is not complete)"),
        ]
    if res["peers"]:
        lines += [
            "",
            "**peers, confirming split** (edgeship's defaults vs each peer, same draws and inputs)",
            "",
            "| model | peer | draws | peer agree / SQNR | edgeship agree / SQNR | only-peer/only-edgeship, McNemar p |",
            "|---|---|---|---|---|---|",
        ]
        for model, row in res["peers"].items():
            for peer, c in row.items():
                lines.append(
                    f"| {model} | {peer} | {c['draws']} | {100 * c['agree_a']:.2f} % / {c['sqnr_a']:.2f} dB | "
                    f"{100 * c['agree_b']:.2f} % / {c['sqnr_b']:.2f} dB | {c['only_a']}/{c['only_b']}, p={c['p']:.3g} |"
                )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="cache folder: every finished cell is kept and reused")
    ap.add_argument(
        "--quick", action="store_true", help="one model, one draw, two options, 24 images per split, 2 views"
    )
    ap.add_argument("--models", help="comma-separated name:exporter (default: every trained model)")
    ap.add_argument("--draws", type=int, help=f"calibration draws (default {DRAWS})")
    ap.add_argument("--options", help=f"comma-separated, of {', '.join(OPTIONS)}")
    ap.add_argument("--peers", help=f"comma-separated, of {', '.join(PEERS)} ('' for none)")
    ap.add_argument("--table", action="store_true", help="only print the tables of what --work holds")
    ap.add_argument("--json", type=Path, help="write the analysis here")
    args = ap.parse_args(argv)
    plan = _plan(args)
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "plan.json").write_text(json.dumps(plan.__dict__, default=list, indent=1))
    if not args.table:
        run_plan(plan, args.work, lambda s: print(s, file=sys.stderr, flush=True))
    res = analyse(args.work, plan)
    print("\n".join(markdown(res)))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=str))
    return 0


def _plan(args: argparse.Namespace) -> Plan:
    base = QUICK if args.quick else FULL
    models = base.models
    if args.models:
        models = tuple(
            (n, e or (am.SHARED[n][1] if n in am.SHARED else "dynamo"))
            for n, _, e in (s.partition(":") for s in args.models.split(","))
        )
    options = tuple(args.options.split(",")) if args.options else base.options
    if "default" not in options or any(o not in OPTIONS for o in options):
        raise SystemExit(f"--options must include default and be among {', '.join(OPTIONS)}")
    peers = tuple(p for p in args.peers.split(",") if p) if args.peers is not None else base.peers
    return Plan(models, args.draws or base.draws, options, peers, base.views, base.per_split, base.num_calib)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("--child-"):
        sys.exit(am.main(sys.argv[1:]))
    sys.exit(main())
