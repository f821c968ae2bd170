"""--quiet / --json keep stderr empty: third-party chatter (C++ included) is captured, errors are not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from calibration.errors import FairEdgeError
from fair_edge.quiet import QUIET_ENV, silenced

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ["deploy", "--runs", "2", "--warmup", "0", "--eval-samples", "200",
          "--recover-steps", "5"]  # fmt: skip


def _cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """Run `python -m fair_edge.cli` as a user would, without log-level variables of our own."""
    env = {k: v for k, v in os.environ.items() if k not in QUIET_ENV}
    return subprocess.run(
        [sys.executable, "-m", "fair_edge.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_silenced_captures_descriptor_2_and_sys_stderr(capfd, monkeypatch) -> None:
    for k in QUIET_ENV:
        monkeypatch.delenv(k, raising=False)
    with silenced():
        os.write(2, b"I0000 flatbuffer_export.cc] from C++\n")
        print("Failed to load torchao/_C.so", file=sys.stderr)
        assert all(os.environ[k] == v for k, v in QUIET_ENV.items())
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "after\n"
    assert not any(k in os.environ for k in QUIET_ENV)  # put back as they were
    with silenced(enabled=False):
        os.write(2, b"not quiet\n")
    assert capfd.readouterr().err == "not quiet\n"


def test_silenced_replays_chatter_on_unexpected_errors_only(capfd) -> None:
    with pytest.raises(FairEdgeError), silenced(expected=(FairEdgeError,)):
        os.write(2, b"noise before a bad-input error\n")
        raise FairEdgeError("bad input")
    assert capfd.readouterr().err == ""
    with pytest.raises(RuntimeError), silenced(expected=(FairEdgeError,)):
        os.write(2, b"context of a crash\n")
        raise RuntimeError("bug")
    assert capfd.readouterr().err == "context of a crash\n"


def test_bad_input_under_json_is_the_one_error_line(tmp_path) -> None:
    r = _cli("report", "--json", str(tmp_path / "missing-bundle"), timeout=300)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fair-edge: error: "), r.stderr


@pytest.mark.slow
@pytest.mark.timeout(960)
def test_deploy_quiet_prints_only_the_bundle_path(tmp_path) -> None:
    r = _cli(*DEPLOY, "--quiet", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    bundle = Path(r.stdout.strip())
    assert r.stdout == f"{bundle}\n" and bundle.parent == tmp_path and bundle.is_dir()


@pytest.mark.slow
@pytest.mark.timeout(960)
def test_deploy_json_prints_one_json_object_and_no_stderr(tmp_path) -> None:
    r = _cli(*DEPLOY, "--json", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    payload = json.loads(r.stdout)
    assert isinstance(payload, dict) and Path(payload["bundle"]).parent == tmp_path
