"""The SSH path end to end against a real OpenSSH server on 127.0.0.1 with generated keys."""

from __future__ import annotations

import hashlib
import json
import socket
import sys
from pathlib import Path

import pytest
from sshd import LoopbackSshd, start_sshd
from tiny_models import conv_onnx

from devices.errors import DeviceError
from devices.ssh import run_ssh


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
