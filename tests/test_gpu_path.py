"""The GPU path on a CPU machine: provider options from profile and run settings, the engine-cache
folder, a missing provider, which provider ran each node, and trtexec's command and output.

Nothing here runs TensorRT or CUDA (this machine has neither); what needs a GPU is in
bench/gpu_check.py and bench/RESULTS-gpu.md, marked unmeasured until a GPU runs it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from tiny_models import conv_onnx

from devices.board import runner
from devices.errors import DeviceError
from devices.local import run_local
from devices.profile import load_profile
from devices.runspec import (
    RUNNER_PATH,
    RunSpec,
    gpu_settings,
    resolve_provider_options,
    runner_args,
)

DATA = Path(__file__).parent / "data"
TRT, CUDA, CPU = runner.TRT, runner.CUDA, "CPUExecutionProvider"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return conv_onnx(tmp_path_factory.mktemp("gpu") / "conv.onnx")


def _runner(*args: str, exe: str = sys.executable) -> tuple[int, dict, str]:
    proc = subprocess.run([exe, str(RUNNER_PATH), *args], capture_output=True, text=True)
    return proc.returncode, json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


# ---------------------------------------------------------------- provider options


def test_jetson_profile_gives_tensorrt_fp16_with_a_board_cache_and_workspace() -> None:
    profile = load_profile("jetson")  # the alias of `make deploy DEVICE=jetson`
    opts = dict(resolve_provider_options(RunSpec(), profile))
    assert list(opts) == [TRT, CUDA, CPU]
    trt = opts[TRT]
    assert trt["trt_fp16_enable"] == "True" and trt["trt_int8_enable"] == "False"
    assert trt["trt_engine_cache_enable"] == "True" == trt["trt_timing_cache_enable"]
    assert trt["trt_engine_cache_path"] == "~/.cache/fair-edge/trt" == trt["trt_timing_cache_path"]
    assert trt["trt_max_workspace_size"] == str(2048 * 1024 * 1024)
    assert opts[CUDA] == {"device_id": "0", "cudnn_conv_algo_search": "EXHAUSTIVE"}
    assert opts[CPU] == {}
    args = runner_args(RunSpec(), profile, "model.onnx")
    assert args[args.index("--precision") + 1] == "fp16"
    assert args[args.index("--trt-cache") + 1] == "~/.cache/fair-edge/trt"
    assert args[args.index("--workspace-mb") + 1] == "2048"
    assert "--strict-providers" not in args


def test_run_settings_override_the_profile() -> None:
    profile = load_profile("jetson-nano")
    spec = RunSpec(precision="int8", trt_cache="/data/trt", workspace_mb=512, strict_providers=True)
    trt = dict(resolve_provider_options(spec, profile))[TRT]
    assert trt["trt_int8_enable"] == "True" and trt["trt_fp16_enable"] == "True"
    assert trt["trt_engine_cache_path"] == "/data/trt"
    assert trt["trt_max_workspace_size"] == str(512 * 1024 * 1024)
    args = runner_args(spec, profile, "m.onnx")
    assert "--strict-providers" in args and args[args.index("--workspace-mb") + 1] == "512"
    # fp32 and no cache: TensorRT without half/int8 kernels and without any cache option
    plain = dict(resolve_provider_options(RunSpec(precision="fp32", trt_cache=""), profile))[TRT]
    assert plain["trt_fp16_enable"] == "False" and plain["trt_int8_enable"] == "False"
    assert not any("cache" in k for k in plain)
    # a CPU profile: no TensorRT options at all, fp32
    host = load_profile("host")
    assert resolve_provider_options(RunSpec(), host) == [(CPU, {})]
    assert gpu_settings(RunSpec(), host) == {
        "precision": "fp32",
        "trt_cache": None,
        "workspace_mb": 0,
    }
    with pytest.raises(DeviceError, match="precision must be one of fp32, fp16, int8"):
        runner_args(RunSpec(precision="int4"), profile, "m.onnx")
    with pytest.raises(DeviceError, match="workspace must be >= 0"):
        runner_args(RunSpec(workspace_mb=-1), profile, "m.onnx")


def test_options_an_old_onnxruntime_does_not_know_are_left_out() -> None:
    """JetPack 4.6's Jetson Zoo onnxruntime (1.11) has no timing-cache options; 1.16+ has both."""
    old = dict(runner.provider_options([TRT], "fp16", "/c", 0, "1.11.0"))[TRT]
    assert "trt_timing_cache_enable" not in old and "trt_timing_cache_path" not in old
    assert old["trt_engine_cache_path"] == "/c" and old["trt_fp16_enable"] == "True"
    mid = dict(runner.provider_options([TRT], "fp16", "/c", 0, "1.14.1"))[TRT]
    assert mid["trt_timing_cache_enable"] == "True" and "trt_timing_cache_path" not in mid
    new = dict(runner.provider_options([TRT], "fp16", "/c", 0, "1.20.1"))[TRT]
    assert new["trt_timing_cache_path"] == "/c"
    assert runner.version_tuple("1.16.3") == (1, 16) and runner.version_tuple("10.3") == (10, 3)
    assert runner.version_tuple("1.17.0+cu118") == (1, 17)


# ---------------------------------------------------------------- the engine-cache folder


def test_cache_folder_is_created_stamped_and_reused(tmp_path: Path) -> None:
    cache = tmp_path / "board-home" / ".cache" / "fair-edge" / "trt"
    first = runner.prepare_cache(str(cache), "1.20.1")
    assert cache.is_dir() and first == {"path": str(cache), "files_before": [], "reused": False}
    stamp = json.loads((cache / runner.CACHE_STAMP).read_text())
    assert stamp["onnxruntime"] == "1.20.1" and stamp["machine"]
    # what TensorRT leaves after the first run: the second run finds it and reuses the folder
    engine = "TensorrtExecutionProvider_TRTKernel_graph_main_123_0_0_sm87.engine"
    (cache / engine).write_bytes(b"engine")
    again = runner.prepare_cache(str(cache), "1.20.1")
    assert again["reused"] and again["files_before"] == [engine]
    assert runner.cache_files(str(cache)) == [engine]


def test_cache_of_another_device_is_refused_and_left_alone(tmp_path: Path) -> None:
    cache = tmp_path / "trt"
    runner.prepare_cache(str(cache), "1.20.1")
    other = {"board": "NVIDIA Jetson Nano Developer Kit", "machine": "aarch64", "tensorrt": "8.2.1"}
    (cache / runner.CACHE_STAMP).write_text(json.dumps({**other, "onnxruntime": "1.11.0"}))
    before = sorted(p.name for p in cache.iterdir())
    with pytest.raises(runner.RunnerFailure, match="not portable between devices") as info:
        runner.prepare_cache(str(cache), "1.20.1")
    assert info.value.code == "engine_other_device" and info.value.exit_code == runner.EXIT_LOAD
    assert "Jetson Nano" in info.value.message and "\n" not in info.value.message
    assert sorted(p.name for p in cache.iterdir()) == before
    # the same onnxruntime on this machine but a new release: also another engine format
    cache2 = tmp_path / "trt2"
    runner.prepare_cache(str(cache2), "1.20.1")
    with pytest.raises(runner.RunnerFailure, match="engine"):
        runner.prepare_cache(str(cache2), "1.22.0")
    (tmp_path / "file").write_text("x")
    with pytest.raises(runner.RunnerFailure, match="is a file, not a folder"):
        runner.prepare_cache(str(tmp_path / "file"), "1.20.1")


# ---------------------------------------------------------------- providers: missing, fallback, placement


def test_a_missing_provider_is_one_line_exit_code_through_the_real_runner(model: Path) -> None:
    """This CPU machine's onnxruntime has no TensorRT: asked for strictly, the runner refuses."""
    import onnxruntime as ort

    assert TRT not in ort.get_available_providers()
    code, out, err = _runner(
        str(model), "--providers", f"{TRT},{CPU}", "--strict-providers", "--runs", "2"
    )
    assert code == runner.EXIT_RUNTIME and not out["ok"] and not err.strip()
    msg = out["error"]["message"]
    assert out["error"]["code"] == "no_provider" and "\n" not in msg
    assert msg.startswith(f"execution provider {TRT} is not available") and "onnxruntime-gpu" in msg
    with pytest.raises(
        DeviceError, match=f"no_provider.*providers {TRT}, {CUDA} are not available"
    ):
        run_local(model, "jetson-orin-nano", runs=2, warmup=0, strict_providers=True)


def test_fallback_is_reported_with_the_provider_that_ran_each_node(model: Path) -> None:
    """Not strict (a board profile run on the host): the run falls back to the CPU and says so,
    node by node, from ONNX Runtime's own profile."""
    m = run_local(model, "jetson-orin-nano", runs=3, warmup=0)
    rt = m.runtime
    assert rt["providers_requested"] == [TRT, CUDA, CPU]
    assert rt["providers_missing"] == [TRT, CUDA] and rt["providers_used"] == [CPU]
    assert rt["precision"] == "fp16" and rt["engine_cache"] is None  # no TensorRT: no cache made
    assert list(rt["provider_options"]) == [CPU]
    placement = rt["placement"]
    assert placement["by_provider"] == {CPU: len(placement["nodes"])} and placement["nodes"]
    assert rt["first_run_s"] > 0


def test_placement_matches_the_timed_sessions_own_profile(model: Path, tmp_path: Path) -> None:
    """With a profile kept, placement is read from it (oracle: the profile file, parsed here)."""
    m = run_local(model, "host", runs=3, warmup=0, ort_profile=str(tmp_path / "prof"))
    events = json.loads(Path(m.ort_profile).read_text())
    kernels = {
        e["name"][: -len("_kernel_time")]: e["args"]["provider"]
        for e in events
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
    }
    assert kernels and m.runtime["placement"]["nodes"] == kernels
    graph_ops = {n.op_type for n in onnx.load(str(model)).graph.node}
    assert graph_ops == {"Conv", "Relu"}
    m2 = run_local(model, "host", runs=2, warmup=0, placement=False)
    assert m2.runtime["placement"] is None


# ---------------------------------------------------------------- trtexec


def test_trtexec_parser_on_recorded_tensorrt_10_output() -> None:
    got = runner.parse_trtexec((DATA / "trtexec-10.3-fp16.log").read_text())
    assert got["version"] == "10.3.0" and got["engine_build_s"] == pytest.approx(30.4127)
    assert got["throughput_qps"] == pytest.approx(412.345)
    lat = got["sections"]["Latency"]
    assert lat == {
        "min": 2.35742,
        "max": 2.91309,
        "mean": 2.41582,
        "median": 2.40234,
        "p90": 2.45117,
        "p95": 2.48535,
        "p99": 2.91309,
    }
    assert got["sections"]["GPU Compute Time"]["median"] == pytest.approx(2.30859)
    assert set(got["sections"]) == {
        "Latency",
        "Enqueue Time",
        "H2D Latency",
        "GPU Compute Time",
        "D2H Latency",
    }
    for stats in got["sections"].values():
        order = [stats[k] for k in ("min", "median", "p90", "p95", "p99", "max")]
        assert order == sorted(order), stats


def test_trtexec_parser_on_recorded_tensorrt_8_2_output_also_under_python_3_6() -> None:
    """JetPack 4.6's TensorRT 8.2 prints "Host Latency" and only the 99th percentile; the
    parser runs on the board, so it is also run by a Python 3.6 interpreter when one is here."""
    text = (DATA / "trtexec-8.2-fp16.log").read_text()
    got = runner.parse_trtexec(text)
    assert got["version"] == "8.2.1" and got["engine_build_s"] == pytest.approx(129.513)
    assert got["sections"]["Host Latency"] == {
        "min": 59.9,
        "max": 63.1,
        "mean": 60.25,
        "median": 60.1,
        "p99": 63.1,
    }
    assert "p90" not in got["sections"]["GPU Compute Time"]
    from test_runner_paths import _python36

    exe = _python36()
    if exe is None:
        pytest.skip("no Python 3.6 interpreter on this machine")
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import runner; "
        "print(json.dumps(runner.parse_trtexec(open(sys.argv[2]).read()), sort_keys=True))"
    )
    proc = subprocess.run(
        [exe, "-c", code, str(RUNNER_PATH.parent), str(DATA / "trtexec-8.2-fp16.log")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == json.loads(json.dumps(got, sort_keys=True))


def test_trtexec_engine_of_another_device_and_a_failed_run_are_one_line() -> None:
    with pytest.raises(runner.RunnerFailure, match="incompatible device") as info:
        runner.parse_trtexec((DATA / "trtexec-engine-other-device.log").read_text())
    assert info.value.code == "engine_other_device" and "build_engine.sh" in info.value.message
    assert "\n" not in info.value.message
    failed = "&&&& RUNNING TensorRT.trtexec [TensorRT v8201]\n[E] Could not open model.onnx\n"
    with pytest.raises(runner.RunnerFailure, match="no performance summary.*Could not open") as i2:
        runner.parse_trtexec(failed)
    assert i2.value.code == "inference_failed"


def test_trtexec_command_follows_the_tensorrt_release() -> None:
    old = runner.trtexec_command("trtexec", "model.onnx", "fp16", 1024, "/c", "8.2.1")
    assert old == [
        "trtexec",
        "--onnx=model.onnx",
        "--saveEngine=/c/model.fp16.engine",
        "--timingCacheFile=/c/trtexec.timing.cache",
        "--fp16",
        "--workspace=1024",
    ]
    new = runner.trtexec_command("trtexec", "m.int8.onnx", "int8", 2048, None, "10.3")
    assert new == [
        "trtexec",
        "--onnx=m.int8.onnx",
        "--fp16",
        "--int8",
        "--memPoolSize=workspace:2048M",
    ]
    assert runner.trtexec_command("t", "a.engine", "fp16", 64, "/c", "10.3") == [
        "t",
        "--loadEngine=a.engine",
    ]


def test_trtexec_missing_on_this_machine_is_one_line(model: Path, tmp_path: Path) -> None:
    absent = tmp_path / "no" / "trtexec"
    code, out, err = _runner(str(model), "--runtime", "trtexec", "--trtexec", str(absent))
    assert code == runner.EXIT_RUNTIME and out["error"]["code"] == "runtime_missing"
    assert str(absent) in out["error"]["message"] and not err.strip()
    if shutil.which("trtexec") is None:
        args = runner_args(RunSpec(runtime="trtexec"), load_profile("jetson-nano"), "m.onnx")
        assert args[args.index("--trtexec") + 1] == "/usr/src/tensorrt/bin/trtexec"
        assert args[args.index("--trt-version") + 1] == "8.2.1"
