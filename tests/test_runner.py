"""The board runner: its timing core, statistics, real ONNX Runtime and TFLite runs, failures."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tiny_models import conv_onnx, fc_tflite

from devices.board import runner
from devices.errors import DeviceError
from devices.local import run_local
from devices.measurement import Measurement
from devices.profile import load_profile
from devices.runspec import RUNNER_PATH, RunSpec, runner_args


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    tfl, _, _ = fc_tflite(d / "fc.tflite")
    return {"onnx": conv_onnx(d / "conv.onnx"), "tflite": tfl}


def test_measure_core_times_a_known_sleep() -> None:
    """A 10 ms sleep must measure as 10 ms: p50 in [10, 14] ms (sleep only overshoots)."""
    calls = []
    samples = runner.measure(lambda: (calls.append(1), time.sleep(0.010)), warmup=2, runs=15)
    assert len(samples) == 15 and len(calls) == 17
    stats = runner.summarize(samples)
    assert 10.0 <= stats["p50"] <= 14.0, stats
    assert stats["min"] >= 10.0 and stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["max"]


def test_measure_core_cpu_time_is_not_wall_time() -> None:
    """Sleeping costs wall time but (almost) no CPU; a busy loop costs CPU up to its wall time."""
    cpu: list[float] = []
    wall = runner.measure(lambda: time.sleep(0.01), warmup=0, runs=5, cpu_samples=cpu)
    assert len(cpu) == 5 and max(cpu) < 0.005 and min(wall) >= 0.01

    def spin() -> None:
        t = time.process_time()
        while time.process_time() - t < 0.005:
            pass

    cpu.clear()
    wall = runner.measure(spin, warmup=0, runs=5, cpu_samples=cpu)
    assert all(0.005 <= c <= w + 2e-3 for c, w in zip(cpu, wall, strict=True))


def test_measure_core_minimum_duration() -> None:
    t0 = time.perf_counter()
    samples = runner.measure(lambda: time.sleep(0.005), warmup=0, runs=None, min_duration_s=0.2)
    elapsed = time.perf_counter() - t0
    assert elapsed >= 0.2 and sum(samples) >= 0.19
    assert 10 <= len(samples) <= 41  # 0.2 s / >= 5 ms each
    assert len(runner.measure(lambda: None, warmup=0, runs=3, min_duration_s=0.0)) == 3
    assert len(runner.measure(lambda: None, warmup=0, runs=1, min_duration_s=10, max_runs=7)) == 7


def test_summary_matches_numpy() -> None:
    rng = np.random.default_rng(1)
    samples = list(rng.gamma(2.0, 0.003, size=257))
    stats = runner.summarize(samples)
    ms = np.asarray(samples) * 1000
    for q in (50, 90, 99):
        assert stats[f"p{q}"] == pytest.approx(np.percentile(ms, q), rel=1e-12)
    assert stats["mean"] == pytest.approx(ms.mean(), rel=1e-12)
    assert stats["std"] == pytest.approx(ms.std(ddof=1), rel=1e-9)


def test_hash_lists(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"abc")
    digest = hashlib.sha256(b"abc").hexdigest()
    (tmp_path / "sums").write_text(f"{digest}  a.bin\n")
    (tmp_path / "m.json").write_text(
        json.dumps({"files": {"a.bin": {"sha256": digest, "role": "x"}}})
    )
    assert runner.verify_hashes(str(tmp_path / "sums"), str(tmp_path)) == 1
    assert runner.verify_hashes(str(tmp_path / "m.json"), str(tmp_path)) == 1
    (tmp_path / "a.bin").write_bytes(b"abd")
    with pytest.raises(runner.RunnerFailure, match="a.bin does not match its hash") as info:
        runner.verify_hashes(str(tmp_path / "sums"), str(tmp_path))
    assert info.value.exit_code == runner.EXIT_HASH
    (tmp_path / "evil.json").write_text(json.dumps({"files": {"../x": digest}}))
    with pytest.raises(runner.RunnerFailure, match="outside the bundle"):
        runner.verify_hashes(str(tmp_path / "evil.json"), str(tmp_path))


def test_run_local_onnx(models: dict[str, Path], tmp_path: Path) -> None:
    path = models["onnx"]
    m = run_local(path, "host", runs=20, warmup=2, threads=1, ort_profile=str(tmp_path / "prof"))
    assert m.label == "local" and m.where == "local" and m.representative
    assert m.runs == 20 == len(m.samples_ms) and m.threads == 1
    assert m.model["size_bytes"] == path.stat().st_size
    assert m.model["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert m.runtime["name"] == "onnxruntime" and m.runtime["providers_used"] == [
        "CPUExecutionProvider"
    ]
    assert m.runtime["inputs"] == {"x": [1, 3, 16, 16]}
    lat = m.latency_ms
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert lat["p50"] == pytest.approx(float(np.percentile(m.samples_ms, 50)))
    assert m.cpu_ms["p50"] > 0 and m.system["loadavg_1m_before"] >= 0
    assert m.throughput_ips == pytest.approx(m.runs / (sum(m.samples_ms) / 1000))
    mem = m.memory_mb
    assert mem["peak_rss"] >= mem["rss_after_load"] > mem["rss_before_load"] > 0
    assert mem["rss_growth_load"] == pytest.approx(mem["rss_after_load"] - mem["rss_before_load"])
    trace = json.loads(Path(m.ort_profile).read_text())
    assert any(e.get("name", "").startswith("model_run") for e in trace)
    assert Measurement.from_json(m.to_json()) == m


def test_board_profile_locally_with_its_threads_and_providers(models: dict[str, Path]) -> None:
    m = run_local(models["onnx"], "jetson-nano", runs=3, warmup=1)
    assert m.label == "jetson-nano profile run locally on host" and m.threads == 4
    assert m.runtime["providers_requested"][0] == "TensorrtExecutionProvider"
    assert m.runtime["providers_used"] == ["CPUExecutionProvider"]


def test_tflite_runner_output_is_real(models: dict[str, Path]) -> None:
    """The interpreter really computes x W^T + b (oracle), then the runner times it."""
    from ai_edge_litert.interpreter import Interpreter

    path, w, b = fc_tflite(models["tflite"].with_name("fc2.tflite"), seed=3)
    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    x = np.linspace(-1, 1, 16, dtype=np.float32)[None]
    it.set_tensor(it.get_input_details()[0]["index"], x)
    it.invoke()
    np.testing.assert_allclose(
        it.get_tensor(it.get_output_details()[0]["index"]), x @ w.T + b, atol=1e-5
    )
    m = run_local(path, "rpi4", runs=10, warmup=1)
    assert m.runtime["name"] == "tflite" and m.runtime["package"] == "ai-edge-litert"
    assert m.runtime["inputs"] == {"x": [1, 16]} and m.runs == 10


def _runner(*args: str) -> tuple[int, dict]:
    proc = subprocess.run([sys.executable, str(RUNNER_PATH), *args], capture_output=True, text=True)
    return proc.returncode, json.loads(proc.stdout.strip().splitlines()[-1])


def test_runner_failures_are_json_with_exit_codes(models: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    code, out = _runner(str(bad), "--runs", "2")
    assert code == runner.EXIT_LOAD and not out["ok"] and out["error"]["code"] == "load_failed"
    code, out = _runner(str(tmp_path / "missing.onnx"))
    assert code == runner.EXIT_ARGS and out["error"]["code"] == "no_model"
    code, out = _runner(str(models["onnx"]), "--runs", "zero")
    assert code == runner.EXIT_ARGS and out["error"]["code"] == "bad_arguments"
    code, out = _runner(str(models["onnx"]), "--providers", "CUDAExecutionProvider")
    assert code == runner.EXIT_RUNTIME and out["error"]["code"] == "no_provider"
    with pytest.raises(DeviceError, match="load_failed"):
        run_local(bad, "host", runs=2)
    with pytest.raises(DeviceError, match="does not exist"):
        run_local(tmp_path / "missing.onnx", "host")
    with pytest.raises(DeviceError, match="unknown run setting"):
        run_local(models["onnx"], "host", rnus=3)


def test_runner_pins_itself_only_when_cpus_are_left_free(models: dict[str, Path]) -> None:
    """`--pin` binds the runner to its last `threads` CPUs (read back from the OS)."""
    cpus = sorted(os.sched_getaffinity(0))
    code, res = _runner(str(models["onnx"]), "--threads", "1", "--runs", "3", "--pin")
    assert code == 0 and res["pinned_cpus"] == (cpus[-1:] if len(cpus) > 1 else None)
    code, res = _runner(str(models["onnx"]), "--threads", str(len(cpus)), "--runs", "3", "--pin")
    assert code == 0 and res["pinned_cpus"] is None
    code, res = _runner(str(models["onnx"]), "--threads", "1", "--runs", "3")
    assert code == 0 and res["pinned_cpus"] is None
    assert "--pin" in runner_args(RunSpec(), load_profile("host"), "m.onnx")
    assert "--pin" not in runner_args(RunSpec(pin=False), load_profile("host"), "m.onnx")
