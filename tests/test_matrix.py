"""``edgeship matrix`` with real parts: Ray on this machine, devices reached over a real OpenSSH server on
127.0.0.1 (x86 "devices": the host itself, over ssh), the tiny models, real images.

The node-kill test starts a two-node Ray cluster here (``ray start --head`` and a second ``ray start
--address`` with its own device resource), kills the second node while the matrix runs, and reruns.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeship.cli import main
from tests.conftest import save, tiny_classifier
from tests.sshd import sshd, sshd_available  # noqa: F401
from tests.test_ssh import PIP_ARGS, device_python

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[cluster]' (the dev extra has it)")

pytestmark = [
    pytest.mark.skipif(not sshd_available(), reason="OpenSSH server not installed (apt-get install openssh-server)"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]
ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")


def _target(folder: Path, name: str) -> Path:
    """x86-host as a target reached over ssh (the device is this machine, through the test sshd)."""
    text = (ROOT / "targets" / "x86-host.toml").read_text()
    path = folder / f"{name}.toml"
    path.write_text(text.replace('name = "x86-host"', f'name = "{name}"').replace('access = "local"', 'access = "ssh"'))
    return path


def _device(server, name: str, target: str, port: int | None = None) -> str:  # type: ignore[no-untyped-def]
    host = f"{server.user}@{server.host}:{port or server.port}"
    return (
        f'[[device]]\nname = "{name}"\ntarget = "{target}"\nssh = "{host}"\nidentity = "{server.identity}"\n'
        f'known_hosts = "{server.known_hosts}"\npython = "{device_python()}"\npip_args = {json.dumps(PIP_ARGS)}\n'
    )


def _matrix(folder: Path, calib: Path, images: Path, models: dict[str, Path], targets: list[str], devices: str) -> Path:
    text = f'calibration = "{calib}"\nevaluation = "{images}"\n[options]\nnum_calib = 20\nbench_runs = 5\n'
    for name, path in models.items():
        text += f'[[model]]\nname = "{name}"\npath = "{path}"\ninput_shape = [1, 3, 32, 32]\n'
    for t in targets:
        text += f'[[target]]\nname = "{t}"\nprofile = "{_target(folder, t)}"\n'
    path = folder / "matrix.toml"
    path.write_text(text + devices)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("matrix-models")
    return {
        "tiny-a": save(tiny_classifier(batch=1, seed=0), folder / "a.onnx"),
        "tiny-b": save(tiny_classifier(batch=1, seed=1), folder / "b.onnx"),
    }


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeship", *args], capture_output=True, text=True, timeout=900, env=env, cwd=ROOT
    )


# --------------------------------------------------------------------------- the matrix file


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("[[device]]", "[[devise]]", 1), "unknown key 'devise'"),
        (lambda t: t.replace('target = "lb"', 'target = "nope"', 1), "serves target 'nope', which no [[target]]"),
        (lambda t: t.replace('name = "d1"', 'name = "d 1"'), "name must be"),
        (lambda t: t.replace("input_shape = [1, 3, 32, 32]", "input_shape = [1, 3, 64, 64]", 1), "matrix file says"),
        (lambda t: t.replace("[[device]]", '[[device]]\nadb = "SERIAL"', 1), "adb devices are not run"),
        (lambda t: t + "[[model]]\nname = \"tiny-a\"\nzoo = \"mobilenetv2-7\"\n", "two models are named tiny-a"),
    ],
)
def test_bad_matrix_files_are_one_line(  # type: ignore[no-untyped-def]
    sshd, tmp_path: Path, models, calib_images: Path, tiny_images: Path, edit, message: str, capsys  # noqa: F811
) -> None:
    path = _matrix(tmp_path, calib_images, tiny_images, models, ["lb"], _device(sshd, "d1", "lb"))
    path.write_text(edit(path.read_text()))
    code = main(["matrix", str(path), "-o", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "\n" not in err and message in err, err
    assert not (tmp_path / "out").exists()


def test_refuses_a_folder_it_did_not_write(sshd, tmp_path: Path, models, calib_images, tiny_images) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    path = _matrix(tmp_path, calib_images, tiny_images, models, ["lb"], _device(sshd, "d1", "lb"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    proc = _run("matrix", str(path), "-o", str(tmp_path / "out"), "-q")
    assert proc.returncode == 1 and "not an edgeship matrix folder" in proc.stderr and proc.stderr.count("\n") == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["mine.txt"]


# --------------------------------------------------------------------------- runs on ssh devices


def test_matrix_on_ssh_devices(sshd, tmp_path: Path, models, calib_images: Path, tiny_images: Path) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    """2 models x 1 target on two devices (data-parallel) and one that never answers (lost, work moves)."""
    devices = _device(sshd, "d1", "lb") + _device(sshd, "d2", "lb") + _device(sshd, "dead", "lb", _closed_port())
    path = _matrix(tmp_path, calib_images, tiny_images, models, ["lb"], devices)
    out = tmp_path / "out"
    proc = _run("matrix", str(path), "-o", str(out), "--json", str(tmp_path / "m.json"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((out / "matrix.json").read_text())
    assert doc["devices"]["dead"]["status"] == "lost" and "refused" in doc["devices"]["dead"]["reason"].lower()
    for cell in doc["cells"]:
        assert cell["status"] == "done" and cell["passed"], cell
        folder = out / cell["folder"]
        assert all((folder / f).is_file() for f in cell["files"])
        assert sum(s["images"] for s in cell["shards"]) == cell["images"] == 12
        assert {s["device"] for s in cell["shards"]} <= {"d1", "d2"}
        assert (out / cell["deploy"] / "convert" / ".stage.json").is_file()
        assert cell["latency_p50_ms"] > 0 and cell["size_bytes"] > 0
    assert "report.html" in proc.stdout and (out / "report.html").is_file()
    html = (out / "report.html").read_text()
    assert html.count('href="cells/') == 2

    # The merged drift check gives the same figures as one device running every image (edgeship verify).
    cell = doc["cells"][0]
    candidate = json.loads((out / cell["folder"] / "cell.json").read_text())["candidate"]["path"]
    single = tmp_path / "single.json"
    code = main(
        ["verify", str(models[cell["model"]]), candidate, "--images", str(tiny_images), "--target",
         str(tmp_path / "lb.toml"), "-r", str(single), "-q", "--host", sshd.spec, "--identity", str(sshd.identity),
         "--known-hosts", str(sshd.known_hosts), "--remote-python", device_python(),
         "--pip-args", " ".join(PIP_ARGS)]  # fmt: skip
    )
    assert code == 0
    one = json.loads(single.read_text())["figures"]
    merged = json.loads((out / cell["folder"] / "drift_report.json").read_text())["figures"]
    assert merged == one

    # A rerun with nothing changed reuses every cell and both models' convert/quantize stages.
    before = {f: f.stat().st_mtime_ns for f in out.rglob("*.npz")}
    proc = _run("matrix", str(path), "-o", str(out), "-q")
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = json.loads((out / "matrix.json").read_text())
    assert [c["status"] for c in again["cells"]] == ["reused", "reused"]
    assert before == {f: f.stat().st_mtime_ns for f in out.rglob("*.npz")}


def test_deploy_reuses_the_matrix_models(sshd, tmp_path: Path, models, calib_images, tiny_images) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    """The model folders are deploy folders: deploy of the same inputs there reuses convert and quantize."""
    path = _matrix(tmp_path, calib_images, tiny_images, {"tiny-a": models["tiny-a"]}, ["lb"], _device(sshd, "d1", "lb"))
    out = tmp_path / "out"
    assert _run("matrix", str(path), "-o", str(out), "-q").returncode == 0
    proc = _run("deploy", str(models["tiny-a"]), "--calib", str(calib_images), "--eval", str(tiny_images),
                "--num-calib", "20", "--target", str(tmp_path / "lb.toml"), "-o", str(out / "models" / "tiny-a"),
                "--bench-runs", "5", "-q")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    stages = {s["name"]: s["reused"] for s in json.loads((out / "models" / "tiny-a" / "deploy.json").read_text())["stages"]}
    assert stages["convert"] and all(v for k, v in stages.items() if k.startswith("quantize/")), stages


# --------------------------------------------------------------------------- a two-node cluster, one node killed


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[dict[str, object]]:
    """``ray start --head`` holding device d1, a second node holding d2 (its own process group, to kill)."""
    env = {**os.environ, "RAY_TMPDIR": str(tmp_path / "ray")}
    port = _closed_port()
    head = [str(RAY), "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
            "--resources", '{"device:d1": 1}', f"--temp-dir={tmp_path / 'ray'}"]  # fmt: skip
    subprocess.run(head, check=True, capture_output=True, env=env, timeout=120)
    address = f"127.0.0.1:{port}"
    worker_cmd = [str(RAY), "start", f"--address={address}", "--num-cpus=1", "--resources", '{"device:d2": 1}',
                  "--node-name=rack-b", "--block"]  # fmt: skip
    state: dict[str, object] = {"address": address, "env": env, "cmd": worker_cmd}
    state["worker"] = _start_worker(worker_cmd, env, address)
    try:
        yield state
    finally:
        worker = state["worker"]
        if isinstance(worker, subprocess.Popen) and worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
        subprocess.run([str(RAY), "stop", "--force"], capture_output=True, env=env, timeout=120)


def _start_worker(cmd: list[str], env: dict[str, str], address: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    probe = ("import ray,sys; ray.init(address=sys.argv[1], log_to_driver=False); "
             "sys.exit(0 if ray.cluster_resources().get('device:d2') else 1)")  # fmt: skip
    for _ in range(60):
        if subprocess.run([sys.executable, "-c", probe, address], capture_output=True, env=env).returncode == 0:
            return proc
        time.sleep(1)
    raise AssertionError("the second Ray node did not join")


def test_node_killed_mid_run_loses_nothing_reported(  # type: ignore[no-untyped-def]
    sshd, tmp_path: Path, models, calib_images: Path, tiny_images: Path, cluster  # noqa: F811
) -> None:
    devices = _device(sshd, "d1", "lb-a") + _device(sshd, "d2", "lb-b").replace('name = "d2"', 'name = "d2"\nnode = "rack-b"')
    path = _matrix(tmp_path, calib_images, tiny_images, models, ["lb-a", "lb-b"], devices)
    out = tmp_path / "out"
    env = cluster["env"]
    run = subprocess.Popen(
        [sys.executable, "-m", "edgeship", "matrix", str(path), "-o", str(out), "--ray-address", str(cluster["address"]), "-q"],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 600
    while not list(out.glob("cells/*/*/cell.json")) and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.2)
    os.killpg(cluster["worker"].pid, signal.SIGKILL)  # type: ignore[union-attr]
    reported = {f: f.read_bytes() for f in out.glob("cells/*/*/*") if f.is_file() and (f.parent / "cell.json").is_file()}
    _, err = run.communicate(timeout=600)
    doc = json.loads((out / "matrix.json").read_text())
    status = {(c["model"], c["target"]): c["status"] for c in doc["cells"]}
    assert run.returncode == 1 and "not run" in err, err[-2000:]
    assert doc["devices"]["d2"]["status"] == "lost"
    assert "lost" in status.values() and "done" in status.values(), status
    for f, data in reported.items():  # nothing that was reported before the kill was lost or changed
        assert f.read_bytes() == data
    for c in doc["cells"]:
        assert (c["status"] == "done") == bool(c.get("folder")) and (c["status"] != "done" or (out / c["folder"]).is_dir())

    # The node comes back; the rerun redoes only the missing cells.
    cluster["worker"] = _start_worker(cluster["cmd"], env, str(cluster["address"]))  # type: ignore[arg-type]
    proc = _run("matrix", str(path), "-o", str(out), "--ray-address", str(cluster["address"]), "-q", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = {(c["model"], c["target"]): c["status"] for c in json.loads((out / "matrix.json").read_text())["cells"]}
    assert again == {k: ("reused" if v == "done" else "done") for k, v in status.items()}
    for f, data in reported.items():
        assert f.read_bytes() == data
