"""The emulated board: the real runner on arm64 Debian bookworm's Python under qemu-aarch64."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from tiny_models import conv_onnx, fc_tflite

from devices.emulation import (
    LABEL,
    WHEELS,
    build_sysroot,
    debian_mirror,
    python_command,
    run_emulated,
    sysroot_info,
)
from devices.errors import DeviceError


@pytest.fixture(scope="session")
def sysroot() -> Path:
    """The cached sysroot (`make sysroot` builds it; built here on first use otherwise)."""
    return build_sysroot()


def test_sysroot_is_arm64_bookworm_with_the_board_wheels(sysroot: Path) -> None:
    info = sysroot_info(sysroot)
    assert info["suite"] == "bookworm" and info["arch"] == "arm64" and info["wheels"] == WHEELS
    python = sysroot / "root" / "usr" / "bin" / "python3.11"
    assert python.read_bytes()[:20][18] == 0xB7  # ELF e_machine = EM_AARCH64
    assert (sysroot / "root" / "usr" / "lib" / "python3" / "dist-packages" / "onnxruntime").is_dir()


def test_emulated_run_of_the_runner(sysroot: Path, tmp_path: Path) -> None:
    m = run_emulated(conv_onnx(tmp_path / "conv.onnx"), "rpi4", runs=3, warmup=1)
    assert (
        m.where == "emulated"
        and m.label == LABEL == "emulated aarch64 - latency not representative"
    )
    assert not m.representative
    assert m.system["machine"] == "aarch64" and m.system["python"].startswith("3.11")
    assert m.system["numpy"] == WHEELS["numpy"] and m.runtime["version"] == WHEELS["onnxruntime"]
    assert m.runs == 3 and m.threads == 4 and m.latency_ms["p50"] > 0
    assert m.memory_mb["peak_rss"] >= m.memory_mb["rss_after_load"] > 0
    t = run_emulated(fc_tflite(tmp_path / "fc.tflite")[0], "rpi5", runs=3, warmup=1)
    assert t.runtime["name"] == "tflite" and t.runtime["version"] == WHEELS["ai-edge-litert"]
    assert t.system["machine"] == "aarch64" and t.runs == 3 and not t.representative


def test_emulated_outputs_match_the_host(sysroot: Path, tmp_path: Path) -> None:
    """The arm64 stack computes what the host computes (ONNX: host ORT; TFLite: x W^T + b)."""
    conv = conv_onnx(tmp_path / "conv.onnx", seed=5)
    fc, w, b = fc_tflite(tmp_path / "fc.tflite", seed=6)
    x = np.random.default_rng(7).standard_normal((1, 3, 16, 16)).astype(np.float32)
    v = np.random.default_rng(8).standard_normal((1, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "v.npy", v)
    script = textwrap.dedent(
        f"""
        import json, platform, numpy as np, onnxruntime as ort
        from ai_edge_litert.interpreter import Interpreter
        s = ort.InferenceSession({str(conv)!r}, providers=["CPUExecutionProvider"])
        y = s.run(None, {{"x": np.load({str(tmp_path / "x.npy")!r})}})[0]
        it = Interpreter(model_path={str(fc)!r}); it.allocate_tensors()
        it.set_tensor(it.get_input_details()[0]["index"], np.load({str(tmp_path / "v.npy")!r}))
        it.invoke()
        z = it.get_tensor(it.get_output_details()[0]["index"])
        print(json.dumps({{"machine": platform.machine(), "y": y.ravel().tolist(), "z": z.ravel().tolist()}}))
        """
    )
    proc = subprocess.run(
        [*python_command(sysroot), "-c", script], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["machine"] == "aarch64"
    host = ort.InferenceSession(str(conv), providers=["CPUExecutionProvider"]).run(None, {"x": x})[
        0
    ]
    np.testing.assert_allclose(np.asarray(out["y"]).reshape(host.shape), host, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(out["z"]), (v @ w.T + b).ravel(), rtol=1e-4, atol=1e-4)


def test_host_profile_is_not_emulated(tmp_path: Path) -> None:
    with pytest.raises(DeviceError, match="no emulation target"):
        run_emulated(conv_onnx(tmp_path / "c.onnx"), "host")


def test_mirror_from_apt_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FAIR_EDGE_DEBIAN_MIRROR", raising=False)
    d = tmp_path / "sources.list.d"
    d.mkdir()
    (d / "a-node.sources").write_text(
        "Types: deb\nURIs: https://example.invalid/node_20.x\nSuites: nodistro\nComponents: main\n"
    )
    (d / "debian.sources").write_text(
        "Types: deb\n# a comment\nURIs: http://mirror.invalid/debian\nSuites: bookworm\n"
        "Components: main\n\nTypes: deb\nURIs: http://mirror.invalid/debian-security\n"
        "Suites: bookworm-security\n"
    )
    assert debian_mirror((tmp_path / "none.list", d)) == "http://mirror.invalid/debian"
    legacy = tmp_path / "sources.list"
    legacy.write_text("deb [arch=amd64] http://old.invalid/debian/ bookworm main\n")
    assert debian_mirror((legacy,)) == "http://old.invalid/debian/"
    legacy.write_text("deb https://example.invalid/apt stable main\n")
    with pytest.raises(DeviceError, match="FAIR_EDGE_DEBIAN_MIRROR"):
        debian_mirror((legacy,))
    monkeypatch.setenv("FAIR_EDGE_DEBIAN_MIRROR", "http://env.invalid/debian")
    assert debian_mirror((legacy,)) == "http://env.invalid/debian"
