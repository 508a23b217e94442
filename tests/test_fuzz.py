"""Fuzz: cut and flip bytes of real models; every mutation gives a result or one error line, never a crash.

Mutations are seeded (``SEED``), at least 200 per format: Google's uint8 MobileNetV2
``.tflite``, the tiny float ``.tflite`` made by ``convert``, and the real MobileNetV2
``.onnx``. Each format's mutations run in one child process (the runtime's
``python -m edgeship.runtime`` entry point, or the ONNX load/inspect step of
``convert``), which prints ``start i`` before and ``done i ...`` after each one; when the
child dies, the mutation it started is the culprit, and a new child goes on with the
rest. So a crash is always pinned on one mutation, and the whole test stays within about
a minute.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.test_faults import GOOGLE, GOOGLE_CARD

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SEED = 15
MUTATIONS = 200
#: Mutants written to disk at once (their checks share one checking child).
BATCH = 25

# The child: mutations as JSON on stdin; per mutation "start i" and "done i [code, stderr]".
_RUNNER = r"""
import contextlib, gc, io, json, sys, traceback
from pathlib import Path

spec = json.loads(sys.stdin.read())
source = Path(spec["source"]).read_bytes()
work = Path(spec["work"])


def mutate(m):
    data = bytearray(source)
    if m["kind"] == "cut":
        return bytes(data[: m["at"]])
    for at, xor in m["flips"]:
        data[at] ^= xor
    return bytes(data)


def run_tflite(path):
    from edgeship.runtime.__main__ import main
    return main([str(path), spec["image"], "-q"])


def run_onnx(path):
    from edgeship.convert.onnx_model import inspect_model, load_model
    from edgeship.errors import EdgeshipError
    try:
        inspect_model(load_model(path), str(path))
    except EdgeshipError as exc:
        print(f"edgeship convert: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


run = run_tflite if spec["format"] == "tflite" else run_onnx
todo = spec["mutations"]
for start in range(0, len(todo), spec["batch"]):
    batch = todo[start:start + spec["batch"]]
    paths = []
    for m in batch:
        p = work / f"m{m['i']}{spec['suffix']}"
        p.write_bytes(mutate(m))
        paths.append(p)
    if spec["format"] == "tflite":
        from edgeship.runtime.model_check import check_model_files
        check_model_files(paths)  # one checking child for the batch (it survives crashes itself)
    for m, p in zip(batch, paths):
        print("start", m["i"], flush=True)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = run(p)
            except SystemExit as exc:
                code = exc.code
            except BaseException:
                code = "traceback"
                traceback.print_exc(file=err)
            gc.collect()  # the interpreter is freed now, so a crash there is this mutation's
        print("done", m["i"], json.dumps([code, err.getvalue()]), flush=True)
        p.unlink()
"""


def mutations(size: int, rng: np.random.Generator, count: int = MUTATIONS) -> list[dict[str, Any]]:
    """Half cuts, half flips of 1-8 bytes; a third of each near the start or end, where the tables are."""
    out: list[dict[str, Any]] = []
    edge = min(size // 2, 65536)

    def offset(k: int) -> int:
        where = k % 3
        if where == 0:
            return int(rng.integers(0, edge))
        if where == 1:
            return int(rng.integers(size - edge, size))
        return int(rng.integers(0, size))

    for i in range(count):
        if i % 2 == 0:
            out.append({"i": i, "kind": "cut", "at": offset(i // 2)})
        else:
            flips = [[offset(i // 2), int(rng.integers(1, 256))] for _ in range(int(rng.integers(1, 9)))]
            out.append({"i": i, "kind": "flip", "flips": flips})
    return out


def fuzz(fmt: str, source: Path, work: Path, image: str = "") -> dict[int, tuple[Any, str]]:
    """Run every mutation in as few children as crashes allow; return ``{i: (exit code, stderr)}``."""
    rng = np.random.default_rng([SEED, len(fmt), source.stat().st_size])
    todo = mutations(source.stat().st_size, rng)
    results: dict[int, tuple[Any, str]] = {}
    env = {**os.environ, "EDGESHIP_CACHE": str(work / "cache")}
    while todo:
        spec = {
            "format": fmt,
            "source": str(source),
            "work": str(work),
            "image": image,
            "batch": BATCH,
            "suffix": source.suffix,
            "mutations": todo,
        }
        proc = subprocess.run(
            [sys.executable, "-c", _RUNNER],
            input=json.dumps(spec),
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
            check=False,
        )
        started = None
        for line in proc.stdout.splitlines():
            word, _, rest = line.partition(" ")
            if word == "start":
                started = int(rest)
            elif word == "done":
                i, _, payload = rest.partition(" ")
                results[int(i)] = tuple(json.loads(payload))  # type: ignore[assignment]
                started = None
        if proc.returncode != 0:
            if started is None:
                pytest.fail(
                    f"the {fmt} fuzz child failed outside any mutation (exit {proc.returncode}): {proc.stderr[-2000:]}"
                )
            results[started] = (proc.returncode, f"child died (exit {proc.returncode}): {proc.stderr[-500:]}")
        todo = [m for m in todo if m["i"] not in results]
    return results


def check(results: dict[int, tuple[Any, str]], prefix: str) -> dict[str, int]:
    """Every mutation: exit 0, or exit 1 with exactly one ``prefix: error:`` line. Returns counts."""
    bad = []
    for i, (code, err) in sorted(results.items()):
        lines = err.strip().splitlines()
        ok = code == 0 or (code == 1 and len(lines) == 1 and lines[0].startswith(f"{prefix}: error: "))
        if not ok:
            bad.append(f"mutation {i}: exit {code}: {err.strip()[-600:]}")
    assert not bad, f"{len(bad)} of {len(results)} mutations misbehaved:\n" + "\n".join(bad[:10])
    return {"ran": sum(c == 0 for c, _ in results.values()), "refused": sum(c == 1 for c, _ in results.values())}


@pytest.fixture(scope="module")
def photo(assets: Path) -> str:
    return str(assets / "data" / "images" / "parrot.jpg")


def test_fuzz_google_int8_tflite(assets: Path, photo: str, tmp_path: Path) -> None:
    shutil.copyfile(assets / "models" / GOOGLE, tmp_path / GOOGLE)
    (tmp_path / "model_card.json").write_text(json.dumps(GOOGLE_CARD))
    results = fuzz("tflite", tmp_path / GOOGLE, tmp_path, photo)
    counts = check(results, "edgeship.runtime")
    assert len(results) == MUTATIONS and counts["refused"] >= MUTATIONS // 2 and counts["ran"] > 0, counts


def test_fuzz_small_float_tflite(tiny_bundle: Path, tiny_images: Path, tmp_path: Path) -> None:
    shutil.copyfile(tiny_bundle / "model_float32.tflite", tmp_path / "model_float32.tflite")
    shutil.copyfile(tiny_bundle / "model_card.json", tmp_path / "model_card.json")
    image = str(sorted(tiny_images.iterdir())[0])
    results = fuzz("tflite", tmp_path / "model_float32.tflite", tmp_path, image)
    counts = check(results, "edgeship.runtime")
    assert len(results) == MUTATIONS and counts["refused"] >= MUTATIONS // 2 and counts["ran"] > 0, counts


def test_fuzz_real_onnx(assets: Path, tmp_path: Path) -> None:
    results = fuzz("onnx", assets / "models" / "mobilenetv2-1.0-tf-op13.onnx", tmp_path)
    counts = check(results, "edgeship convert")
    assert len(results) == MUTATIONS and counts["refused"] >= MUTATIONS // 2 and counts["ran"] > 0, counts
