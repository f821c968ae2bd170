"""The SSH path end to end against a real OpenSSH server on 127.0.0.1 with generated keys."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sshd import LoopbackSshd, start_sshd
from tiny_models import conv_onnx

from devices.errors import DeviceError
from devices.ssh import OWNER_FILE, RUN_PREFIX, run_ssh


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> LoopbackSshd:
    srv = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield srv
    srv.stop()


@pytest.fixture()
def reach(server: LoopbackSshd, tmp_path: Path) -> dict:
    """Keyword arguments that reach the loopback 'board'; its python is this interpreter."""
    return {
        "host": server.host,
        "port": server.port,
        "user": server.user,
        "key": str(server.key),
        "known_hosts": str(server.known_hosts),
        "python": sys.executable,
        "work_dir": str(tmp_path / "board"),
        "env": {},
    }


def _bundle(folder: Path) -> Path:
    """A real bundle (exporters.bundle): model, labels and a nested report, with its manifest."""
    from exporters.bundle import BundleSpec, write_bundle

    spec = BundleSpec(name="bundle")
    spec.add_file("model.onnx", conv_onnx(folder.parent / "src.onnx"), "model")
    spec.add_text("labels.txt", "a\nb\n", "labels")
    spec.add_text("reports/deep/plan.json", "{}", "plan")
    return write_bundle(folder.parent, spec)


def _board_is_clean(reach: dict) -> bool:
    board = Path(reach["work_dir"])
    return not board.exists() or not any(board.iterdir())


def test_bundle_runs_on_the_board(reach: dict, tmp_path: Path) -> None:
    bundle = _bundle(tmp_path / "bundle")
    m = run_ssh(
        bundle / "model.onnx",
        "rpi4",
        bundle_dir=bundle,
        runs=10,
        warmup=1,
        ort_profile=str(tmp_path / "ortprof"),
        **reach,
    )
    assert m.where == "ssh" and m.representative
    assert m.device == m.label == f"rpi4 at {reach['user']}@127.0.0.1:{reach['port']} over SSH"
    assert m.runs == 10 and m.threads == 4
    assert m.hashes_verified == 4 + 3  # transfer list (4 files) + bundle manifest (3 files)
    assert m.model["sha256"] == hashlib.sha256((bundle / "model.onnx").read_bytes()).hexdigest()
    assert m.extra["bundle_files"] == [
        "labels.txt",
        "manifest.json",
        "model.onnx",
        "reports/deep/plan.json",
    ]
    assert Path(m.ort_profile).is_file() and json.loads(Path(m.ort_profile).read_text())
    thermal = m.extra["thermal"]
    assert thermal["before"]["command"] == "vcgencmd get_throttled; vcgencmd measure_temp"
    assert thermal["after"]["exit_code"] == 127  # no vcgencmd on the loopback "board"
    assert _board_is_clean(reach)


def test_lone_model_and_environment_reach(
    server: LoopbackSshd, reach: dict, tmp_path: Path
) -> None:
    model = conv_onnx(tmp_path / "m.onnx", cout=4)
    env = {
        "FAIR_EDGE_RPI5_HOST": server.host,
        "FAIR_EDGE_SSH_PORT": str(server.port),
        "FAIR_EDGE_SSH_USER": server.user,
        "FAIR_EDGE_SSH_KEY": str(server.key),
        "FAIR_EDGE_SSH_KNOWN_HOSTS": str(server.known_hosts),
        "FAIR_EDGE_RPI5_PYTHON": sys.executable,
        "FAIR_EDGE_SSH_WORKDIR": reach["work_dir"],
    }
    m = run_ssh(model, "rpi5", runs=3, warmup=0, env=env)
    assert m.profile == "rpi5" and m.runs == 3 and m.hashes_verified == 1
    assert _board_is_clean(reach)


def test_wrong_key(server: LoopbackSshd, reach: dict, tmp_path: Path) -> None:
    with pytest.raises(DeviceError, match="authentication to .* failed.*authorized_keys"):
        run_ssh(conv_onnx(tmp_path / "m.onnx"), "rpi4", **{**reach, "key": str(server.other_key)})


def test_dead_port(reach: dict, tmp_path: Path) -> None:
    from sshd import free_port

    dead = free_port()
    with pytest.raises(DeviceError, match=f"cannot reach .*:{dead}: connection refused"):
        run_ssh(conv_onnx(tmp_path / "m.onnx"), "rpi4", **{**reach, "port": dead})


def test_silent_port_times_out(reach: dict, tmp_path: Path) -> None:
    """A port that accepts TCP but never speaks SSH (a hung board) fails within the timeout."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        port = silent.getsockname()[1]
        with pytest.raises(DeviceError, match="the SSH handshake did not complete within 1 s"):
            run_ssh(
                conv_onnx(tmp_path / "m.onnx"),
                "rpi4",
                **{**reach, "port": port, "connect_timeout_s": 1},
            )


def test_host_key_policy(server: LoopbackSshd, reach: dict, tmp_path: Path) -> None:
    model = conv_onnx(tmp_path / "m.onnx")
    fresh = tmp_path / "kh" / "known_hosts"
    with pytest.raises(DeviceError, match="host key of .* is unknown.*accept-new"):
        run_ssh(model, "rpi4", **{**reach, "known_hosts": str(fresh)})
    m = run_ssh(
        model,
        "rpi4",
        runs=2,
        warmup=0,
        **{**reach, "known_hosts": str(fresh), "host_key_policy": "accept-new"},
    )
    assert m.runs == 2 and server.host_pub.split()[1] in fresh.read_text()
    impostor = " ".join(Path(f"{server.other_key}.pub").read_text().split()[:2])
    fresh.write_text(f"[127.0.0.1]:{server.port} {impostor}\n")
    with pytest.raises(DeviceError, match="does not match known_hosts"):
        run_ssh(
            model, "rpi4", **{**reach, "known_hosts": str(fresh), "host_key_policy": "accept-new"}
        )


def test_board_side_crash(reach: dict, tmp_path: Path) -> None:
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"\x08\x07garbage that is not a protobuf model")
    with pytest.raises(
        DeviceError,
        match=r"over SSH: runner failed \(load_failed\): onnxruntime cannot load broken.onnx",
    ):
        run_ssh(bad, "rpi4", runs=2, **reach)
    assert _board_is_clean(reach)
    with pytest.raises(DeviceError, match=r"the runner crashed \(exit code 127\) without a result"):
        run_ssh(conv_onnx(tmp_path / "m.onnx"), "rpi4", **{**reach, "python": "/no/such/python3"})
    assert _board_is_clean(reach)


def test_tampered_bundle(reach: dict, tmp_path: Path) -> None:
    bundle = _bundle(tmp_path / "bundle")
    with (bundle / "model.onnx").open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(DeviceError, match=r"hash_mismatch.*model.onnx does not match its hash"):
        run_ssh(bundle / "model.onnx", "rpi4", bundle_dir=bundle, runs=2, **reach)
    assert _board_is_clean(reach)


def test_run_timeout_and_missing_host(reach: dict, tmp_path: Path) -> None:
    model = conv_onnx(tmp_path / "m.onnx")
    with pytest.raises(DeviceError, match="did not finish within 1 s"):
        run_ssh(model, "rpi4", runs=None, min_duration_s=30, run_timeout_s=1, **reach)
    with pytest.raises(DeviceError, match="no SSH host for profile rpi4: set FAIR_EDGE_RPI4_HOST"):
        run_ssh(model, "rpi4", env={})


def _fake_python(folder: Path, body: str) -> str:
    """An executable that stands in for the board's python: the runner it starts does `body`."""
    exe = folder / "python-standin"
    exe.write_text(f"#!/bin/sh\n{body}\n")
    exe.chmod(0o755)
    return str(exe)


@pytest.mark.parametrize(("number", "name"), [(9, "SIGKILL"), (15, "SIGTERM")])
def test_runner_killed_by_a_signal_names_it(
    reach: dict, tmp_path: Path, number: int, name: str
) -> None:
    """paramiko sees a killed process as exit status -1; the board's shell names the signal."""
    python = _fake_python(tmp_path, f"kill -{number} $$")
    with pytest.raises(DeviceError) as info:
        run_ssh(conv_onnx(tmp_path / "m.onnx"), "rpi4", runs=2, **{**reach, "python": python})
    message = str(info.value)
    assert (
        f"the runner was killed by signal {number} ({name}) before it printed a result" in message
    )
    assert ("out-of-memory killer" in message) == (number == 9)
    assert "\n" not in message and "exit code" not in message
    assert _board_is_clean(reach)


class Cable:
    """A loopback TCP relay in front of the board's sshd that the test can cut like a cable."""

    def __init__(self, port: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.to = port
        self.socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self.listener.accept()
            except OSError:
                return
            far = socket.create_connection(("127.0.0.1", self.to))
            self.socks += [near, far]
            for src, dst in ((near, far), (far, near)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)

    def cut(self) -> None:
        for sock in [self.listener, *self.socks]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _wait_for(check: Callable[[], bool], timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_lost_connection_is_reported_and_cleaned_up_next_time(
    server: LoopbackSshd, reach: dict, tmp_path: Path
) -> None:
    """Cut the network mid-measurement: one clear line; the next connection removes the folder
    the lost run left and stops its runner, which would otherwise load the board."""
    cable = Cable(server.port)
    known = tmp_path / "known_hosts_cable"
    known.write_text(f"[127.0.0.1]:{cable.port} {server.host_pub}\n")
    started = tmp_path / "runner.pid"
    python = _fake_python(
        tmp_path, f"echo $$ > {started}.tmp && mv {started}.tmp {started}\nexec sleep 60"
    )
    cutter = threading.Thread(
        target=lambda: _wait_for(started.exists, 60) and cable.cut(), daemon=True
    )
    cutter.start()
    via_cable = {**reach, "port": cable.port, "known_hosts": str(known), "python": python}
    runner_pid = None
    try:
        with pytest.raises(DeviceError) as info:
            run_ssh(conv_onnx(tmp_path / "m.onnx"), "rpi4", runs=2, **via_cable)
        assert str(info.value).startswith(
            f"connection to {reach['user']}@127.0.0.1:{cable.port} lost during the measurement; "
            "check the board/network and re-run"
        )
        runner_pid = int(started.read_text())
        stale = list(Path(reach["work_dir"]).glob(f"{RUN_PREFIX}*"))
        assert len(stale) == 1 and _alive(runner_pid), "the lost run left its folder and runner"
        owner = int((stale[0] / OWNER_FILE).read_text())
        assert _wait_for(lambda: not _alive(owner)), "sshd should end the lost connection"
        m = run_ssh(conv_onnx(tmp_path / "m2.onnx"), "rpi4", runs=2, warmup=0, **reach)
        assert m.runs == 2 and _board_is_clean(reach)
        assert _wait_for(lambda: not _alive(runner_pid), 10), "the orphaned runner was stopped"
    finally:
        cable.cut()
        if runner_pid is not None and _alive(runner_pid):
            os.kill(runner_pid, signal.SIGKILL)


def test_cleanup_keeps_folders_of_live_connections(reach: dict, tmp_path: Path) -> None:
    """Only run folders whose SSH server process is gone (or stray ones, old) are removed."""
    board = Path(reach["work_dir"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    folders = {
        "live": (f"{RUN_PREFIX}live", str(os.getpid()), 0),
        "dead": (f"{RUN_PREFIX}dead", str(dead.pid), 0),
        "fresh stray": (f"{RUN_PREFIX}fresh", None, 0),
        "old stray": (f"{RUN_PREFIX}old", None, 3600),
        "not ours": ("keep-me", str(dead.pid), 3600),
    }
    for name, owner, age in folders.values():
        (board / name).mkdir(parents=True)
        if owner:
            (board / name / OWNER_FILE).write_text(owner + "\n")
        then = time.time() - age
        os.utime(board / name, (then, then))
    run_ssh(conv_onnx(tmp_path / "m.onnx"), "rpi4", runs=2, warmup=0, **reach)
    left = {p.name for p in board.iterdir()}
    assert left == {folders[k][0] for k in ("live", "fresh stray", "not ours")}
