"""``edgeship matrix`` with real parts: Ray on this machine, devices reached over a real OpenSSH server on
127.0.0.1 (x86 "devices": the host itself, over ssh), the tiny models, real images.

The node-kill test starts a two-node Ray cluster here (``ray start --head`` and a second ``ray start
--address`` with its own device resource), kills the second node while the matrix runs, and reruns.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeship.cli import main
from tests.conftest import save, tiny_classifier
from tests.sshd import running_sshd, sshd, sshd_available  # noqa: F401
from tests.test_ssh import PIP_ARGS, device_python

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[cluster]' (the dev extra has it)")

pytestmark = [
    pytest.mark.skipif(not sshd_available(), reason="OpenSSH server not installed (apt-get install openssh-server)"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]
ROOT = Path(__file__).resolve().parents[1]
#: The ``ray`` command of this interpreter (a venv that reuses another's packages has no ``ray`` script of its own).
RAY = [sys.executable, "-m", "ray.scripts.scripts"]


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
        (lambda t: t + '[[model]]\nname = "tiny-a"\nzoo = "mobilenetv2-7"\n', "two models are named tiny-a"),
    ],
)
def test_bad_matrix_files_are_one_line(  # type: ignore[no-untyped-def]
    sshd,
    tmp_path: Path,
    models,
    calib_images: Path,
    tiny_images: Path,
    edit,
    message: str,
    capsys,  # noqa: F811
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


@pytest.fixture(scope="module")
def first_run(sshd, tmp_path_factory: pytest.TempPathFactory, models, calib_images: Path, tiny_images: Path):  # type: ignore[no-untyped-def]  # noqa: F811
    """2 models x 1 target on two devices (data-parallel) and one that never answers (lost, its work moves)."""
    folder = tmp_path_factory.mktemp("matrix")
    devices = _device(sshd, "d1", "lb") + _device(sshd, "d2", "lb") + _device(sshd, "dead", "lb", _closed_port())
    path = _matrix(folder, calib_images, tiny_images, models, ["lb"], devices)
    proc = _run("matrix", str(path), "-o", str(folder / "out"))
    return folder, path, proc


def test_matrix_on_ssh_devices(sshd, first_run, models, tiny_images: Path) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    folder, path, proc = first_run
    out = folder / "out"
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((out / "matrix.json").read_text())
    assert doc["devices"]["dead"]["status"] == "lost" and "refused" in doc["devices"]["dead"]["reason"].lower()
    jobs = doc["devices"]["d1"]["jobs_done"] + doc["devices"]["d2"]["jobs_done"]
    assert jobs == sum(len(c["shards"]) + 1 for c in doc["cells"])  # every shard and bench, done by d1 and d2
    for cell in doc["cells"]:
        assert cell["status"] == "done" and cell["passed"], cell
        cell_dir = out / cell["folder"]
        assert all((cell_dir / f).is_file() for f in cell["files"])
        assert sum(s["images"] for s in cell["shards"]) == cell["images"] == 12
        assert {s["device"] for s in cell["shards"]} <= {"d1", "d2"}
        assert (out / cell["deploy"] / "convert" / ".stage.json").is_file()
        assert cell["latency_p50_ms"] > 0 and cell["size_bytes"] > 0
    assert "report.html" in proc.stdout and "device dead lost" in proc.stdout
    links = re.findall(r'href="([^"]+)"', (out / "report.html").read_text())
    assert len(links) == 2 + 2 * 4 and all((out / link).exists() for link in links)  # models; 4 per cell

    # The merged drift check gives the same figures as one device running every image (edgeship verify).
    cell = doc["cells"][0]
    candidate = json.loads((out / cell["folder"] / "cell.json").read_text())["candidate"]["path"]
    single = folder / "single.json"
    code = main(
        [
            "verify",
            str(models[cell["model"]]),
            candidate,
            "--images",
            str(tiny_images),
            "--target",
            str(folder / "lb.toml"),
            "-r",
            str(single),
            "-q",
            "--host",
            sshd.spec,
            "--identity",
            str(sshd.identity),
            "--known-hosts",
            str(sshd.known_hosts),
            "--remote-python",
            device_python(),
            "--pip-args",
            " ".join(PIP_ARGS),
        ]  # fmt: skip
    )
    assert code == 0
    one = json.loads(single.read_text())["figures"]
    merged = json.loads((out / cell["folder"] / "drift_report.json").read_text())["figures"]
    assert merged == one


def test_deploy_reuses_the_matrix_models(first_run, tmp_path: Path, models, calib_images, tiny_images) -> None:  # type: ignore[no-untyped-def]
    """The model folders are deploy folders: deploy of the same inputs there reuses convert and quantize."""
    folder, _, _ = first_run
    shutil.copytree(folder / "out" / "models" / "tiny-a", tmp_path / "tiny-a")
    proc = _run("deploy", str(models["tiny-a"]), "--calib", str(calib_images), "--eval", str(tiny_images),
                "--num-calib", "20", "--target", str(folder / "lb.toml"), "-o", str(tmp_path / "tiny-a"),
                "--bench-runs", "5", "-q")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    stages = {s["name"]: s["reused"] for s in json.loads((tmp_path / "tiny-a" / "deploy.json").read_text())["stages"]}
    assert stages["convert"] and all(v for k, v in stages.items() if k.startswith("quantize/")), stages


# --------------------------------------------------------------------------- a device that hangs without failing

#: The forced command of the hung device's key: logins, copies and installs work; a model run never finishes
#: (it writes a dot a second to stderr, so it ends when its connection is gone, never by itself).
HANG = """#!/bin/sh
case "$SSH_ORIGINAL_COMMAND" in
  *edgeship.runtime.collect*|*edgeship.runtime.bench*)
    echo "$SSH_ORIGINAL_COMMAND" >> "$(dirname "$0")/hung.log"
    while printf . >&2; do sleep 1; done; exit 0 ;;
  sftp|internal-sftp) exec /usr/lib/openssh/sftp-server ;;
esac
exec sh -c "$SSH_ORIGINAL_COMMAND"
"""
#: The job limit in the hung-device test: a good device's job takes about 10 s here under load (its venv is built).
HANG_LIMIT_S = 40


@contextlib.contextmanager
def hung_sshd(root: Path) -> Iterator[Any]:
    """A second real sshd on 127.0.0.1 whose key runs :data:`HANG` (``command=`` in authorized_keys)."""
    with running_sshd(root) as server:
        script = root / "hang.sh"
        script.write_text(HANG)
        script.chmod(0o755)
        keys = root / "authorized_keys"
        keys.write_text(f'command="{script}" {keys.read_text()}')
        yield server


def _clients_of(port: int) -> list[str]:
    """Command lines of ssh/scp clients still talking to ``port`` on this machine."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            argv = cmdline.read_bytes().decode(errors="replace").split("\0")
            if Path(argv[0]).name in ("ssh", "scp") and str(port) in argv:
                found.append(" ".join(argv))
    return found


def test_hung_device_is_lost_and_its_work_moves(  # type: ignore[no-untyped-def]
    sshd,
    first_run,
    tmp_path: Path,
    models,
    calib_images: Path,
    tiny_images: Path,  # noqa: F811
) -> None:
    """One target, a good device and one whose model runs hang (it never fails, never answers): the hung
    job's limit names what it waited for, the device is lost, its shard runs on the good device."""
    with hung_sshd(tmp_path / "hung-sshd") as stuck:
        devices = _device(sshd, "d1", "lb") + _device(stuck, "stuck", "lb")
        path = _matrix(tmp_path, calib_images, tiny_images, {"tiny-a": models["tiny-a"]}, ["lb"], devices)
        path.write_text(path.read_text().replace("[options]\n", f"[options]\njob_timeout_s = {HANG_LIMIT_S}\n"))
        out = tmp_path / "out"
        shutil.copytree(first_run[0] / "out", out)  # convert and quantize are reused
        for gone in (out / "models" / "tiny-b", out / "cells" / "tiny-b"):
            shutil.rmtree(gone)
        proc = _run("matrix", str(path), "-o", str(out))
        left = _clients_of(stuck.port)
        hangs = (stuck.root / "hung.log").read_text().splitlines() if (stuck.root / "hung.log").is_file() else []
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(hangs) == 1 and "edgeship.runtime" in hangs[0], hangs  # it hung once, then got no other job
    doc = json.loads((out / "matrix.json").read_text())
    lost = doc["devices"]["stuck"]
    assert lost["status"] == "lost" and lost["jobs_done"] == 0, lost
    assert f"did not finish within {HANG_LIMIT_S} s" in lost["reason"] and "device stuck" in lost["reason"], lost
    assert re.search(r"drift-check shard \d/2 of tiny-a x lb \(6 images\)|the benchmark of tiny-a x lb", lost["reason"])
    [cell] = doc["cells"]
    assert cell["status"] == "done" and cell["passed"], cell
    assert [s["device"] for s in cell["shards"]] == ["d1", "d1"] and cell["images"] == 12
    assert all((out / cell["folder"] / f).is_file() for f in cell["files"])
    assert "device stuck lost" in proc.stdout
    assert not left, left  # the ssh client that waited on the hung device was ended, not left behind


# --------------------------------------------------------------------------- a two-node cluster, one node killed


@contextlib.contextmanager
def two_node_cluster(head_device: str, worker_device: str) -> Iterator[dict[str, Any]]:
    """``ray start --head`` holding one device, a second node (``rack-b``) holding another; each ``--block`` in its
    own process group, so the test ends exactly the processes it started (never ``ray stop``, which would end
    every Ray on the machine). The cluster has its own token (not ``~/.ray/auth_token``, shared by other Rays)."""
    temp = tempfile.mkdtemp(prefix="esray-")  # short: Ray's socket paths must fit in 107 bytes
    token = Path(temp) / "token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    address = f"127.0.0.1:{_closed_port()}"
    head_cmd = [*RAY, "start", "--head", f"--port={address.split(':')[1]}", "--num-cpus=2", "--block",
                "--include-dashboard=false", "--resources", json.dumps({head_device: 1}),
                f"--temp-dir={temp}"]  # fmt: skip
    quiet = {"start_new_session": True, "env": env, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    head = subprocess.Popen(head_cmd, **quiet)  # type: ignore[call-overload]
    worker_cmd = [*RAY, "start", f"--address={address}", "--num-cpus=1", "--resources",
                  json.dumps({worker_device: 1}), "--node-name=rack-b", "--block"]  # fmt: skip
    state: dict[str, Any] = {"address": address, "env": env, "cmd": worker_cmd, "device": worker_device}
    try:
        _wait_for(address, head_device, env)
        state["worker"] = _start_worker(state)
        yield state
    finally:
        for proc in (state.get("worker"), head):
            _end(proc)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def cluster() -> Iterator[dict[str, Any]]:
    with two_node_cluster("device:d1", "device:d2") as state:
        yield state


def _end(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, then SIGKILL, to the process group the test started (ray start --block and its services)."""
    if proc is None:
        return
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait)
            if sig == signal.SIGTERM:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # services left in the group
                return


def _wait_for(address: str, resource: str, env: dict[str, str]) -> None:
    probe = (
        "import ray,sys; ray.init(address=sys.argv[1], log_to_driver=False); "
        "sys.exit(0 if ray.available_resources().get(sys.argv[2]) else 1)"
    )
    for _ in range(90):
        if (
            subprocess.run([sys.executable, "-c", probe, address, resource], capture_output=True, env=env).returncode
            == 0
        ):
            return
        time.sleep(1)
    raise AssertionError(f"no Ray node offers {resource} at {address}")


def _start_worker(state: dict[str, Any]) -> subprocess.Popen[bytes]:
    """The second node (again, after a kill), once its device resource is offered."""
    quiet = {"start_new_session": True, "env": state["env"], "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    proc = subprocess.Popen(state["cmd"], **quiet)  # type: ignore[call-overload]
    _wait_for(state["address"], state["device"], state["env"])
    return proc


def test_node_killed_mid_run_loses_nothing_reported(  # type: ignore[no-untyped-def]
    sshd,
    first_run,
    tmp_path: Path,
    models,
    calib_images: Path,
    tiny_images: Path,
    cluster,  # noqa: F811
) -> None:
    """2 models x 2 targets, one device each on its own node; the second node is killed after the first cell
    is reported. The models come from the first run's folder (copied: its convert and quantize are reused)."""
    devices = _device(sshd, "d1", "lb-a") + _device(sshd, "d2", "lb-b").replace(
        'name = "d2"', 'name = "d2"\nnode = "rack-b"'
    )
    path = _matrix(tmp_path, calib_images, tiny_images, models, ["lb-a", "lb-b"], devices)
    out = tmp_path / "out"
    shutil.copytree(first_run[0] / "out", out)
    env = cluster["env"]
    run = subprocess.Popen(
        [sys.executable, "-m", "edgeship", "matrix", str(path), "-o", str(out), "--ray-address",
         str(cluster["address"]), "-q"],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 600
    while not list(out.glob("cells/*/lb-*/cell.json")) and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.2)
    os.killpg(cluster["worker"].pid, signal.SIGKILL)  # type: ignore[union-attr]
    reported = {
        f: f.read_bytes() for f in out.glob("cells/*/*/*") if f.is_file() and (f.parent / "cell.json").is_file()
    }
    _, err = run.communicate(timeout=600)
    doc = json.loads((out / "matrix.json").read_text())
    status = {(c["model"], c["target"]): c["status"] for c in doc["cells"]}
    assert run.returncode == 1 and "not run" in err, err[-2000:]
    assert doc["devices"]["d2"]["status"] == "lost"
    assert "lost" in status.values() and "done" in status.values(), status
    for f, data in reported.items():  # nothing that was reported before the kill was lost or changed
        assert f.read_bytes() == data
    for c in doc["cells"]:
        assert (c["status"] == "done") == bool(c.get("folder")) and (
            c["status"] != "done" or (out / c["folder"]).is_dir()
        )

    # The node comes back; the rerun redoes only the missing cells.
    cluster["worker"] = _start_worker(cluster)
    proc = _run("matrix", str(path), "-o", str(out), "--ray-address", str(cluster["address"]), "-q", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = {(c["model"], c["target"]): c["status"] for c in json.loads((out / "matrix.json").read_text())["cells"]}
    assert again == {k: ("reused" if v == "done" else "done") for k, v in status.items()}  # only the missing ran
    for f, data in reported.items():
        assert f.read_bytes() == data
