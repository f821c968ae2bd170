"""`fair-edge deploy DEVICE=jetson` on a CPU machine: the TensorRT bundle (symmetric int8 pair,
build_engine.sh with the exact trtexec commands), the fallback stated node by node, and the
GPU flags' bad input. TensorRT itself never runs here; its timings are bench/RESULTS-gpu.md's
unmeasured rows."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from cli_helpers import cli_error, run_cli
from onnx import numpy_helper
from tiny_models import conv_onnx

from devices.engine_script import EngineJob, build_command, build_engine_script
from devices.errors import DeviceError
from devices.profile import load_profile

BASH = shutil.which("bash")


@pytest.fixture(scope="module")
def jetson(tmp_path_factory) -> dict:
    """One real deploy of the default model for the Jetson Orin Nano profile, measured here."""
    dist = tmp_path_factory.mktemp("dist")
    code, out, err = run_cli(
        ["deploy", "--device", "jetson", "--run-on", "local", "--runtime", "onnx",
         "--quantize", "int8", "--no-recover", "--runs", "3", "--warmup", "1",
         "--eval-samples", "300", "--out", str(dist), "--json", "--quiet"]
    )  # fmt: skip
    assert code == 0, err
    bundle = Path(json.loads(out)["bundle"])
    return {
        "bundle": bundle,
        "manifest": json.loads((bundle / "manifest.json").read_text()),
        "report": json.loads((bundle / "report.json").read_text()),
    }


def _zero_points(path: Path) -> list[np.ndarray]:
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return [
        inits[n.input[2]] if len(n.input) > 2 and n.input[2] else np.zeros(1)
        for n in model.graph.node
        if n.op_type == "QuantizeLinear"
    ]


def test_int8_pair_is_symmetric_for_tensorrt(jetson: dict) -> None:
    b, m = jetson["bundle"], jetson["manifest"]
    (variant,) = m["metrics"]["variants"]
    assert variant["file"] == "model.int8.onnx" and "zero points 0 (TensorRT)" in variant["kind"]
    assert variant["original_file"] == "reference/original.int8.onnx"
    for rel in ("model.int8.onnx", "reference/original.int8.onnx"):
        zps = _zero_points(b / rel)
        assert zps and all(np.all(z == 0) for z in zps), rel
        assert m["files"][rel]["sha256"] == hashlib.sha256((b / rel).read_bytes()).hexdigest()


def test_variants_are_timed_original_vs_pruned_and_the_fallback_is_stated(jetson: dict) -> None:
    comps = jetson["report"]["device_report"]["comparisons"]
    assert len(comps) == 2  # fp32 pair, int8 pair (no TFLite: --runtime onnx; no SSH: no trtexec)
    names = [(c["original"]["model"]["name"], c["pruned"]["model"]["name"]) for c in comps]
    assert names == [("original.onnx", "model.onnx"), ("original.int8.onnx", "model.int8.onnx")]
    int8 = comps[1]["pruned"]["runtime"]
    assert int8["precision"] == "int8" and comps[0]["pruned"]["runtime"]["precision"] == "fp16"
    for c in comps:
        for side in ("original", "pruned"):
            rt = c[side]["runtime"]
            assert rt["providers_requested"][0] == "TensorrtExecutionProvider"
            assert rt["providers_used"] == ["CPUExecutionProvider"]
            assert set(rt["placement"]["by_provider"]) == {"CPUExecutionProvider"}
    md = (jetson["bundle"] / "report.md").read_text()
    assert md.count("nodes run by provider: CPUExecutionProvider") == 4
    assert "missing here (fell back): TensorrtExecutionProvider, CUDAExecutionProvider" in md
    assert "model.int8.onnx, jetson-orin-nano" in md  # the int8 section is told apart
    speedups = jetson["report"]["summary"]["variant_latency_speedup"]
    assert set(speedups) == {"model.int8.onnx"}


@pytest.mark.skipif(BASH is None, reason="no bash here")
def test_bundle_engine_script_carries_the_exact_trtexec_commands(jetson: dict) -> None:
    b, m = jetson["bundle"], jetson["manifest"]
    script = (b / "build_engine.sh").read_text()
    assert m["files"]["build_engine.sh"]["role"] == "tensorrt"
    assert subprocess.run([BASH, "-n", str(b / "build_engine.sh")]).returncode == 0
    cmds = m["tensorrt"]["trtexec_commands"]
    assert set(cmds) == {
        "model.onnx",
        "reference/original.onnx",
        "model.int8.onnx",
        "reference/original.int8.onnx",
    }
    for rel, cmd in cmds.items():
        assert f"if ! {cmd} > " in script, rel  # the manifest's command is the one run
        assert f"check {m['files'][rel]['sha256']} {rel}" in script
    assert "--fp16 --memPoolSize=workspace:2048M" in cmds["model.onnx"]  # TensorRT 10.3
    assert "--fp16 --int8" in cmds["model.int8.onnx"]


@pytest.mark.skipif(BASH is None, reason="no bash here")
def test_engine_script_without_trtexec_is_one_line_and_writes_nothing(
    jetson: dict, tmp_path: Path
) -> None:
    assert not Path("/usr/src/tensorrt/bin/trtexec").exists()
    engines = tmp_path / "engines"
    proc = subprocess.run(
        ["sh", str(jetson["bundle"] / "build_engine.sh")],
        capture_output=True,
        text=True,
        env={**os.environ, "ENGINES": str(engines)},
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("build_engine.sh: error: trtexec is not at ")
    assert not engines.exists()


def _stand_in_trtexec(folder: Path, fail_on: str) -> Path:
    """A stand-in for trtexec (NOT TensorRT): writes the --saveEngine file and prints a summary
    line, or fails for models named `fail_on`. It exercises the script's own logic only."""
    exe = folder / "trtexec"
    exe.write_text(
        "#!/bin/sh\n"
        'for a in "$@"; do case $a in\n'
        f"  --onnx=*{fail_on}*) echo '[E] stand-in failure'; exit 1;;\n"
        "  --saveEngine=*) out=${a#--saveEngine=};;\n"
        "esac; done\n"
        'printf "engine" > "$out"\n'
        "echo '[I] Latency: min = 1 ms, max = 2 ms, mean = 1.5 ms, median = 1.5 ms'\n"
    )
    exe.chmod(0o755)
    return exe


def test_engine_script_checks_hashes_and_renames_only_finished_engines(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    (bundle / "reference").mkdir(parents=True)
    a = conv_onnx(bundle / "model.onnx")
    o = conv_onnx(bundle / "reference" / "original.onnx", cout=16)
    profile = load_profile("jetson-nano")
    ort = profile.runtime("onnxruntime")
    stand_in = _stand_in_trtexec(tmp_path, fail_on="nothing")
    runtimes = [dataclasses.replace(ort, trtexec=str(stand_in))] + profile.runtimes[1:]
    profile = dataclasses.replace(profile, runtimes=runtimes)
    digest = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (a, o)}
    jobs = [
        EngineJob("model.onnx", "fp16", digest[a]),
        EngineJob("reference/original.onnx", "fp16", digest[o]),
    ]
    script = bundle / "build_engine.sh"
    script.write_text(build_engine_script(profile, "b", jobs))
    assert "--workspace=1024" in build_command(profile, jobs[0])  # TensorRT 8.2 on JetPack 4.6
    engines = tmp_path / "engines"
    env = {**os.environ, "ENGINES": str(engines)}
    proc = subprocess.run(["sh", str(script)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in engines.glob("*.engine")) == [
        "model.fp16.engine",
        "reference__original.fp16.engine",
    ]
    assert not list(engines.glob("*.part")) and "Latency: min" in proc.stdout
    # a changed model: refused before anything is built
    shutil.rmtree(engines)
    a.write_bytes(a.read_bytes() + b"\0")
    proc = subprocess.run(["sh", str(script)], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "model.onnx does not match its SHA-256" in proc.stderr
    assert not list(engines.glob("*.engine"))
    # trtexec fails on the second model: the first engine stays, no half-written second one
    a.write_bytes(a.read_bytes()[:-1])
    _stand_in_trtexec(tmp_path, fail_on="original")
    proc = subprocess.run(["sh", str(script)], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "could not build reference__original.fp16.engine" in proc.stderr
    assert sorted(p.name for p in engines.iterdir() if not p.name.endswith(".log")) == [
        "model.fp16.engine"
    ]
    with pytest.raises(DeviceError, match="does not run TensorRT"):
        build_engine_script(load_profile("rpi5"), "b", jobs)


def test_gpu_flags_bad_input_is_one_line(tmp_path: Path) -> None:
    model = conv_onnx(tmp_path / "m.onnx")
    line = cli_error(["bench", str(model), "--provider", "tensorrt", "--run-on", "local"])
    assert "TensorrtExecutionProvider, CUDAExecutionProvider are not available" in line
    assert "install the onnxruntime build with them" in line
    line = cli_error(["bench", str(model), "--precision", "int4"])
    assert "--precision" in line and "int4" in line
    line = cli_error(["bench", str(model), "--workspace-mb", "-5", "--device", "jetson"])
    assert "--workspace-mb must be >= 0" in line
    cache = tmp_path / "trt"
    code, out, err = run_cli(
        ["bench", str(model), "--provider", "cpu", "--run-on", "local", "--runs", "2",
         "--trt-cache", str(cache), "--json", "--quiet"]
    )  # fmt: skip
    assert code == 0, err
    rt = json.loads(out)["runtime"]
    assert rt["providers_used"] == ["CPUExecutionProvider"] and rt["engine_cache"] is None
    assert not cache.exists()  # no TensorRT ran: no cache folder made


def test_export_for_a_tensorrt_profile_writes_symmetric_int8(tmp_path: Path) -> None:
    code, out, err = run_cli(
        ["export", "--device", "jetson", "--data", "fashion-mnist:test", "--runtime", "onnx",
         "--quantize", "int8", "--out", str(tmp_path), "--json", "--quiet"]
    )  # fmt: skip
    assert code == 0, err
    path = Path(json.loads(out)["int8"]["path"])
    zps = _zero_points(path)
    assert zps and all(np.all(z == 0) for z in zps)
