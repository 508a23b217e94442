"""`edgeship demo` and its checked downloads, against a real HTTP server on 127.0.0.1 (never the internet).

The server serves copies of the shared sample photos under the manifest's file names; each test
writes a manifest of what it serves (``# base-url:`` pointing at the server) and runs the real
download code: checksum mismatch, truncated transfer, offline, cache reuse, and the whole demo as
a user runs it (``edgeship demo -o OUT`` in a subprocess).
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeship import samples, zoo
from edgeship.download import Checked, FetchError, fetch
from edgeship.errors import InputError


class _Server(http.server.ThreadingHTTPServer):
    requests: list[str]
    cut: dict[str, int]  # file name -> bytes sent before the connection is dropped


class _Handler(http.server.SimpleHTTPRequestHandler):
    server: _Server

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        name = self.path.rsplit("/", 1)[-1]
        self.server.requests.append(name)
        if name in self.server.cut:
            data = (Path(self.directory) / name).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: self.server.cut[name]])
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[tuple[_Server, Path]]:
    root = tmp_path / "served"
    root.mkdir()
    srv = _Server(("127.0.0.1", 0), lambda *a: _Handler(*a, directory=str(root)))
    srv.requests, srv.cut = [], {}
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv, root
    srv.shutdown()
    srv.server_close()


def _serve_photos(assets: Path, root: Path, count: int) -> list[str]:
    """Copy ``count`` shared photos into the served folder as ``<wnid>_<name>.JPEG``; manifest lines."""
    lines = []
    for src in sorted((assets / "data" / "imagenet-sample").glob("*.jpg"))[:count]:
        dst = root / (src.stem + ".JPEG")
        shutil.copyfile(src, dst)
        lines.append(f"{hashlib.sha256(dst.read_bytes()).hexdigest()}  {dst.stat().st_size}  {dst.name}")
    return lines


def _manifest(tmp_path: Path, srv: _Server, lines: list[str]) -> Path:
    path = tmp_path / "samples.manifest"
    base = f"http://127.0.0.1:{srv.server_address[1]}/"
    path.write_text("# a local mirror\n# base-url: " + base + "\n" + "\n".join(lines) + "\n")
    return path


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EDGESHIP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_shipped_manifest_is_the_pinned_set_in_class_order() -> None:
    sset = samples.load_manifest()
    assert len(sset.photos) == 1000
    assert "bc69043e2862758a1906c6a24a792bb28c6bb2ff" in sset.base_url
    wnids = [p.wnid for p in sset.photos]
    assert wnids == sorted(wnids) and len(set(wnids)) == 1000
    assert sset.photos[0].label == "tench" and sset.photos[2].label == "great white shark"
    chosen = sset.spread(samples.DEMO_COUNT)
    assert len(chosen.photos) == samples.DEMO_COUNT and sum(p.size for p in chosen.photos) < 40e6


def test_shipped_manifest_matches_the_shared_one(assets: Path) -> None:
    shared = (assets / "data" / "imagenet-sample-images.manifest").read_text().split()
    ours = samples.load_manifest()
    assert [(p.sha256, str(p.size), p.name) for p in ours.photos] == [
        tuple(shared[i : i + 3]) for i in range(0, len(shared), 3)
    ]


def test_fetch_then_reuse_the_cache(assets: Path, server: tuple[_Server, Path], cache: Path, tmp_path: Path) -> None:
    srv, root = server
    sset = samples.load_manifest(_manifest(tmp_path, srv, _serve_photos(assets, root, 12)))
    folder = samples.fetch_samples(sset)
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in sset.photos)
    assert len(srv.requests) == 12
    assert samples.fetch_samples(sset) == folder and len(srv.requests) == 12  # nothing fetched again


def test_a_cached_photo_changed_in_place_is_fetched_again(
    assets: Path, server: tuple[_Server, Path], cache: Path, tmp_path: Path
) -> None:
    srv, root = server
    sset = samples.load_manifest(_manifest(tmp_path, srv, _serve_photos(assets, root, 3)))
    folder = samples.fetch_samples(sset)
    victim = folder / sset.photos[1].name
    stat = victim.stat()
    victim.write_bytes(b"\0" * stat.st_size)  # same size, same mtime: only the bytes tell
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    samples.fetch_samples(sset)
    assert srv.requests[-1] == victim.name and victim.read_bytes() == (root / victim.name).read_bytes()


def test_checksum_mismatch_is_refused_and_nothing_kept(
    assets: Path, server: tuple[_Server, Path], cache: Path, tmp_path: Path
) -> None:
    srv, root = server
    lines = _serve_photos(assets, root, 2)
    (root / lines[1].split()[2]).write_bytes(b"x" * int(lines[1].split()[1]))  # same size, other bytes
    sset = samples.load_manifest(_manifest(tmp_path, srv, lines))
    with pytest.raises(FetchError, match=r"does not match its sha256"):
        samples.fetch_samples(sset)
    folder = cache / "samples" / sset.key()
    assert [p.name for p in folder.iterdir()] == [lines[0].split()[2]]  # the good one, no part file


@pytest.mark.parametrize("sent", [1000, 0])
def test_truncated_transfer_is_refused(
    assets: Path, server: tuple[_Server, Path], cache: Path, tmp_path: Path, sent: int
) -> None:
    srv, root = server
    lines = _serve_photos(assets, root, 1)
    srv.cut[lines[0].split()[2]] = sent
    sset = samples.load_manifest(_manifest(tmp_path, srv, lines))
    with pytest.raises(FetchError, match=r"truncated|could not fetch"):
        samples.fetch_samples(sset)
    assert not any((cache / "samples" / sset.key()).iterdir())


def test_more_bytes_than_expected_stop_the_download(server: tuple[_Server, Path], tmp_path: Path) -> None:
    srv, root = server
    (root / "big.bin").write_bytes(b"y" * 300_000)
    item = Checked(f"http://127.0.0.1:{srv.server_address[1]}/big.bin", 1000, "0" * 64)
    with pytest.raises(FetchError, match="more than the expected 1000 bytes"):
        fetch(item, tmp_path / "big.bin")
    assert list(tmp_path.glob("*big*")) == []


def test_zoo_download_is_checked(server: tuple[_Server, Path], cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    srv, root = server
    data = b"not really an onnx model, but the bytes the entry names"
    (root / "m.onnx").write_bytes(data)
    url = f"http://127.0.0.1:{srv.server_address[1]}/m.onnx"
    good = zoo.ZooModel("m", "m.onnx", url, len(data), hashlib.sha256(data).hexdigest())
    monkeypatch.setitem(zoo.ZOO, "m", good)
    path = zoo.resolve("m")
    assert path == cache / "models" / "m.onnx" and path.read_bytes() == data
    assert zoo.resolve("m") == path and srv.requests == ["m.onnx"]  # cached, checked, not fetched again
    monkeypatch.setitem(zoo.ZOO, "bad", zoo.ZooModel("bad", "bad.onnx", url, len(data), "1" * 64))
    with pytest.raises(InputError, match=r"download of bad failed: .*does not match its sha256"):
        zoo.resolve("bad")
    assert not (cache / "models" / "bad.onnx").exists()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _demo(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "edgeship", "demo", *args]
    return subprocess.run(cmd, env={**os.environ, **env}, cwd=cwd, capture_output=True, text=True, timeout=1800)


def test_demo_offline_fails_in_one_line(assets: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "m.manifest"
    manifest.write_text(f"# base-url: http://127.0.0.1:{_closed_port()}/\n" + "0" * 64 + "  10  n01440764_tench.JPEG\n")
    env = {"EDGESHIP_CACHE": str(tmp_path / "cache"), "EDGESHIP_SAMPLES_MANIFEST": str(manifest)}
    model = str(assets / "models" / "mobilenetv2-1.0-tf-op13.onnx")
    run = _demo(["-o", "out", "--model", model, "-q"], env, tmp_path)
    assert run.returncode == 1, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "n01440764_tench.JPEG" in lines[0], run.stderr
    assert "--images DIR" in lines[0] and "EDGESHIP_MODELS" in lines[0]
    assert not (tmp_path / "out").exists()


def test_demo_zoo_model_offline_names_it(tmp_path: Path) -> None:
    proxy = f"http://127.0.0.1:{_closed_port()}"  # no network, whatever the machine has
    env = {"EDGESHIP_CACHE": str(tmp_path / "cache"), "EDGESHIP_MODELS": str(tmp_path / "none")}
    env |= {"https_proxy": proxy, "HTTPS_PROXY": proxy, "no_proxy": "", "NO_PROXY": ""}
    run = _demo(["-o", "out", "-q", "--images", str(tmp_path)], env, tmp_path)
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "mobilenetv2-7" in lines[0] and "--images DIR" in lines[0], run.stderr


@pytest.mark.slow
def test_demo_end_to_end_then_cached(assets: Path, server: tuple[_Server, Path], tmp_path: Path) -> None:
    """The README's main job as a user runs it (photos from the local server), then a re-run that reuses all."""
    srv, root = server
    manifest = _manifest(tmp_path, srv, _serve_photos(assets, root, 300))
    env = {"EDGESHIP_CACHE": str(tmp_path / "cache"), "EDGESHIP_SAMPLES_MANIFEST": str(manifest)}
    model = str(assets / "models" / "mobilenetv2-1.0-tf-op13.onnx")
    start = time.perf_counter()
    run = _demo(["-o", "out", "--model", model, "-q"], env, tmp_path)
    first = time.perf_counter() - start
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert len(srv.requests) == 300
    assert "research and education" in run.stdout and "the same as: edgeship deploy" in run.stdout
    summary = json.loads((tmp_path / "out" / "deploy.json").read_text())
    for name in ("x86-host", "rpi4-aarch64", "android-arm64-cpu"):
        assert summary["targets"][name]["passed"] and summary["targets"][name]["figures"]["count"] == 200
        assert (tmp_path / "out" / "bundles" / name / "model_int8.tflite").is_file()
    assert (tmp_path / "out" / "report.html").stat().st_size > 50_000
    start = time.perf_counter()
    again = _demo(["-o", "out", "--model", model, "-q"], env, tmp_path)
    second = time.perf_counter() - start
    assert again.returncode == 0 and len(srv.requests) == 300  # nothing fetched again
    summary = json.loads((tmp_path / "out" / "deploy.json").read_text())
    assert all(s["reused"] for s in summary["stages"]) and second < first / 4, (first, second)
