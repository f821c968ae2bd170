"""`fair-edge deploy` end to end on the built-in default: for `host` (local) and for the emulated
aarch64 board reached over a real OpenSSH server on 127.0.0.1. Every number in the bundle's
manifest and report is recomputed here from the shipped files."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from cli_helpers import run_cli
from onnx import numpy_helper
from sshd import LoopbackSshd, start_sshd

from calibration.loaders import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_PREPROCESSING,
    load_fashion_mnist,
)
from devices.profile import load_profile
from exporters.bundle import verify_bundle
from exporters.costs import count_cost
from exporters.evaluate import onnx_outputs, tflite_outputs, top1
from fair_edge.config import Options
from fair_edge.plan_stage import compute_scores
from fair_edge.stage_cache import StageCache
from pipeline.plan import Plan
from pipeline.train import default_model, evaluate

EVAL_SAMPLES = 1000


_run = run_cli


@pytest.fixture(scope="module")
def host(tmp_path_factory) -> dict:
    """One real `fair-edge deploy` on the default model for the host profile."""
    dist = tmp_path_factory.mktemp("dist")
    code, out, err = _run(
        ["deploy", "--out", str(dist), "--runs", "10", "--warmup", "2",
         "--eval-samples", str(EVAL_SAMPLES), "--json", "--quiet"]
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    bundle = Path(result["bundle"])
    return {
        "result": result,
        "bundle": bundle,
        "manifest": json.loads((bundle / "manifest.json").read_text()),
        "report": json.loads((bundle / "report.json").read_text()),
    }


@pytest.fixture(scope="module")
def eval_set():
    """The evaluation draw deploy makes: seed 0, EVAL_SAMPLES of the Fashion-MNIST test split."""
    test = load_fashion_mnist("test")
    idx = np.sort(np.random.default_rng(0).permutation(len(test))[:EVAL_SAMPLES])
    return test.subset(idx)


def test_bundle_layout_and_hashes(host: dict) -> None:
    bundle, manifest = host["bundle"], host["manifest"]
    assert bundle.name == "smallcnn-host"
    assert set(manifest["files"]) == {
        "model.onnx", "model.tflite", "reference/original.onnx", "reference/original.tflite",
        "runner.py", "plan.json", "labels.txt", "report.md", "report.html", "report.json",
        "latency.png", "bars.png", "weights.safetensors",
    }  # fmt: skip
    for rel, entry in manifest["files"].items():
        assert hashlib.sha256((bundle / rel).read_bytes()).hexdigest() == entry["sha256"]
    verify_bundle(bundle)
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".")]  # no temp folders


def test_manifest_describes_input_data_plan_and_tools(host: dict) -> None:
    m = host["manifest"]
    assert "plan.json does not apply" in m["graphs"]["reference/original.onnx"]
    assert set(m["graphs"]) == {"model.onnx", "reference/original.onnx", "plan.json"}
    assert m["schema"] == "fair-edge/bundle" and m["version"] == 1
    assert m["input"] == {
        "name": "input",
        "shape": ["batch", 1, 28, 28],
        "dtype": "float32",
        "layout": "NCHW",
    }
    sess_input = onnx.load(str(host["bundle"] / "model.onnx")).graph.input[0]
    assert sess_input.name == "input"
    assert m["preprocessing"] == FASHION_MNIST_PREPROCESSING.to_json()
    assert m["labels"] == list(FASHION_MNIST_CLASSES)
    assert (host["bundle"] / "labels.txt").read_text().split("\n")[:10] == list(
        FASHION_MNIST_CLASSES
    )
    plan = Plan.from_json(m["plan"])
    assert plan.to_json() == json.loads((host["bundle"] / "plan.json").read_text())
    plan.check_model(default_model(progress=False))
    assert plan.pruned_units() > 0
    # Rounded to the host profile's channel_multiple (detected: 8 or 16) for every pruned layer.
    multiple = load_profile("host").channel_multiple
    for lp in plan.layers.values():
        if lp.pruned and lp.unrounded_pruned is not None:
            assert lp.kept % multiple == 0, (lp.name, lp.kept)
    assert m["tool_versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert m["tool_versions"]["onnxruntime"] and m["tool_versions"]["litert-torch"]


def test_params_and_flops_recompute_from_the_shipped_files(host: dict) -> None:
    b, m = host["bundle"], host["manifest"]
    orig, pruned = onnx.load(str(b / "reference/original.onnx")), onnx.load(str(b / "model.onnx"))
    co, cp = count_cost(orig), count_cost(pruned)
    assert m["metrics"]["flops"] == {"before": co.flops, "after": cp.flops}
    assert m["metrics"]["params"] == {"before": co.params, "after": cp.params}
    assert cp.flops < co.flops and cp.params < co.params
    # Independent of the counter: parameters are the float initializers' element counts.
    for model, counted in ((orig, co.params), (pruned, cp.params)):
        total = sum(
            numpy_helper.to_array(t).size
            for t in model.graph.initializer
            if t.data_type == 1 and len(t.dims) > 0
        )
        assert total == counted
    s = host["report"]["summary"]
    assert s["ratios"]["flops"] == pytest.approx(cp.flops / co.flops)
    assert s["ratios"]["params"] == pytest.approx(cp.params / co.params)
    sizes = [(b / "reference/original.onnx").stat().st_size, (b / "model.onnx").stat().st_size]
    assert m["metrics"]["size_bytes"] == {"before": sizes[0], "after": sizes[1]}
    assert s["ratios"]["size"] == pytest.approx(sizes[1] / sizes[0])


def test_accuracy_recomputes(host: dict, eval_set) -> None:
    b, acc = host["bundle"], host["manifest"]["metrics"]["accuracy"]
    before = top1(onnx_outputs(b / "reference/original.onnx", eval_set.inputs), eval_set.labels)
    after = top1(onnx_outputs(b / "model.onnx", eval_set.inputs), eval_set.labels)
    assert acc["before"] == before and acc["after"] == after
    assert acc["on"] == f"fashion-mnist:test, {EVAL_SAMPLES} samples"
    # Oracle: the torch model itself on the same samples (ONNX Runtime may flip a borderline one).
    assert abs(evaluate(default_model(progress=False), eval_set) - before) <= 0.002
    change = host["report"]["summary"]["ratios"]["accuracy_change_points"]
    assert change == pytest.approx(100 * (after - before))
    assert before > 0.8 and after > before - 0.05


def test_report_leads_with_ratios_measured_in_one_run(host: dict) -> None:
    s, rep = host["report"]["summary"], host["report"]
    comps = rep["device_report"]["comparisons"]
    assert len(comps) == 2  # ONNX Runtime pair and TFLite pair
    onnx_pair = comps[0]
    o, p = onnx_pair["original"], onnx_pair["pruned"]
    assert o["device"] == p["device"] == s["measured_where"] == "local"
    assert (
        o["runtime"]["name"] == "onnxruntime"
        and comps[1]["original"]["runtime"]["name"] == "tflite"
    )
    for meas in (o, p):
        assert meas["runs"] == 10 and len(meas["samples_ms"]) == 10
        assert meas["latency_ms"]["p50"] == pytest.approx(np.percentile(meas["samples_ms"], 50))
    assert s["ratios"]["latency_speedup"] == pytest.approx(
        o["latency_ms"]["p50"] / p["latency_ms"]["p50"]
    )
    assert s["ratios"]["memory"] == pytest.approx(
        p["memory_mb"]["peak_rss"] / o["memory_mb"]["peak_rss"]
    )
    assert o["model"]["sha256"] == host["manifest"]["files"]["reference/original.onnx"]["sha256"]
    assert p["model"]["sha256"] == host["manifest"]["files"]["model.onnx"]["sha256"]
    md = (host["bundle"] / "report.md").read_text()
    first_table = md.split("\n\n")[2]
    for word in ("latency", "memory", "size", "FLOPs", "accuracy"):
        assert word in first_table
    assert f"{s['ratios']['latency_speedup']:.2f}x" in first_table
    assert "<table class='ratios'>" in (host["bundle"] / "report.html").read_text()


def test_tflite_in_the_bundle_matches_the_pruned_onnx(host: dict, eval_set) -> None:
    b = host["bundle"]
    x = eval_set.inputs[:64]
    np.testing.assert_allclose(
        tflite_outputs(b / "model.tflite", x), onnx_outputs(b / "model.onnx", x), atol=1e-3
    )
    rep = host["report"]["tflite"]["pruned"]
    assert rep["max_abs_diff"] <= 1e-3 and rep["top1_agreement"] == 1.0


def test_the_bundled_runner_verifies_and_runs_the_bundle(host: dict) -> None:
    b = host["bundle"]
    proc = subprocess.run(
        [sys.executable, str(b / "runner.py"), str(b / "model.tflite"), "--runs", "3", "--warmup", "1",
         "--hashes", str(b / "manifest.json"), "--bundle-dir", str(b)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0 and result["ok"], proc.stderr
    assert result["hashes_verified"] == len(host["manifest"]["files"])


def test_cli_report_verifies_the_bundle(host: dict, tmp_path: Path) -> None:
    code, out, _ = _run(["report", str(host["bundle"]), "--json"])
    assert code == 0
    data = json.loads(out)
    assert data["files_verified"] == len(host["manifest"]["files"])
    assert data["summary"] == host["report"]["summary"]
    code, out, _ = _run(["report", str(host["bundle"])])
    assert code == 0 and out.startswith("# fair-edge deploy: smallcnn on host")
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(host["bundle"], copy)
    (copy / "plan.json").write_text("{}")
    code, out, err = _run(["report", str(copy)])
    assert code == 2 and out == ""
    assert (
        err.strip()
        == "fair-edge: error: bundle file 'plan.json' does not match its SHA-256; rebuild the bundle"
    )


def test_scores_are_cached_by_content(tmp_path: Path) -> None:
    """Same weights, data and options: a hit with identical scores; changed weights: a miss."""
    cache = StageCache(tmp_path / "stages")
    model = default_model(progress=False)
    cs = load_fashion_mnist("test")
    opts = Options(samples_per_class=8, projections=16, quiet=True)
    first, hit1 = compute_scores(model, cs, opts, cache)
    second, hit2 = compute_scores(model, cs, opts, cache)
    assert (hit1, hit2) == (False, True)
    for name in first.names():
        np.testing.assert_array_equal(first[name].U, second[name].U)
        np.testing.assert_array_equal(first[name].R, second[name].R)
    _, hit3 = compute_scores(
        model, cs, Options(samples_per_class=8, projections=16, seed=1, quiet=True), cache
    )
    assert hit3 is False
    with torch.no_grad():
        model.features[0][0].weight[0, 0, 0, 0] += 1.0
    _, hit4 = compute_scores(model, cs, opts, cache)
    assert hit4 is False


# ------------------------------------------------------------------ the emulated board over SSH


@pytest.fixture(scope="module")
def board(tmp_path_factory, host: dict):
    """rpi4 reached over a loopback sshd whose 'python' is the arm64 sysroot under qemu."""
    from devices.emulation import build_sysroot, python_command

    sysroot = build_sysroot()
    server: LoopbackSshd = start_sshd(tmp_path_factory.mktemp("sshd"))
    env = {
        "HOST": server.host, "PORT": str(server.port), "USER": server.user, "KEY": str(server.key),
        "KNOWN_HOSTS": str(server.known_hosts), "PYTHON": " ".join(python_command(sysroot)),
        "WORKDIR": str(tmp_path_factory.mktemp("board") / "work"),
    }  # fmt: skip
    dist = host["bundle"].parent
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setenv(f"FAIR_EDGE_RPI4_{key}", value)
            code, out, err = _run(
                ["deploy", "--device", "rpi4", "--runtime", "onnx", "--quantize", "int8", "--out", str(dist), "--runs", "3",
                 "--warmup", "1", "--recover-steps", "60", "--eval-samples", str(EVAL_SAMPLES), "--json", "--quiet"]
            )  # fmt: skip
    finally:
        server.stop()
    assert code == 0, err
    result = json.loads(out)
    bundle = Path(result["bundle"])
    return {"result": result, "bundle": bundle, "port": server.port,
            "manifest": json.loads((bundle / "manifest.json").read_text()),
            "report": json.loads((bundle / "report.json").read_text())}  # fmt: skip


def test_int8_variant_in_the_board_bundle(board: dict, eval_set) -> None:
    """--quantize int8: the QDQ model ships beside the fp32 one; its accuracy recomputes."""
    b, m = board["bundle"], board["manifest"]
    (variant,) = m["metrics"]["variants"]
    assert variant["file"] == "model.int8.onnx" and 200 <= variant["calibration_samples"] <= 256
    ops = {n.op_type for n in onnx.load(str(b / "model.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    acc = top1(onnx_outputs(b / "model.int8.onnx", eval_set.inputs), eval_set.labels)
    assert variant["accuracy"] == acc
    after = m["metrics"]["accuracy"]["after"]
    assert variant["accuracy_change_points"] == pytest.approx(100 * (acc - after))
    assert abs(acc - after) <= 0.02
    assert (
        variant["size_bytes"]
        == (b / "model.int8.onnx").stat().st_size
        < 0.5 * (b / "model.onnx").stat().st_size
    )


def test_emulated_board_over_ssh(board: dict, host: dict) -> None:
    m, rep = board["manifest"], board["report"]
    assert board["bundle"].name == "smallcnn-rpi4"
    verify_bundle(board["bundle"])
    assert set(m["files"]) >= {
        "model.onnx",
        "model.int8.onnx",
        "reference/original.onnx",
        "runner.py",
    }
    assert "model.tflite" not in m["files"]
    comp = rep["device_report"]["comparisons"][0]
    for meas in (comp["original"], comp["pruned"]):
        assert meas["where"] == "ssh" and meas["system"]["machine"] == "aarch64"
        assert meas["runtime"]["version"].startswith("1.27")  # the board's ORT, not the host's
    assert rep["summary"]["measured_where"].endswith(f"127.0.0.1:{board['port']} over SSH")
    assert comp["original"]["model"]["sha256"] == m["files"]["reference/original.onnx"]["sha256"]
    # Another device re-uses the host run's scores; the plan is rounded to the Pi's multiple of 4.
    assert board["result"]["cache"]["scores"] is True and "recovery" in board["result"]["cache"]
    plan = Plan.from_json(m["plan"])
    for lp in plan.layers.values():
        if lp.pruned and lp.unrounded_pruned is not None:
            assert lp.kept % 4 == 0, (lp.name, lp.kept)
    # Same original model: identical original file and accuracy as the host bundle.
    assert (
        m["files"]["reference/original.onnx"]["sha256"]
        == host["manifest"]["files"]["reference/original.onnx"]["sha256"]
    )
    assert m["metrics"]["accuracy"]["before"] == host["manifest"]["metrics"]["accuracy"]["before"]
    assert m["metrics"]["flops"]["after"] < m["metrics"]["flops"]["before"]
    assert rep["device_report"]["estimates"] == []  # a board measured: no estimate needed


def test_disk_full_while_writing_the_bundle(
    host: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC injected into the bundle's file copies mid-way: one error line, exit 2, no bundle
    folder and no temporary folder left in --out."""
    import errno

    from exporters import bundle as bundle_mod

    real_copy = bundle_mod.shutil.copyfile
    calls = {"n": 0}

    def full_disk(src, dst, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real_copy(src, dst, *args, **kwargs)

    monkeypatch.setattr(bundle_mod.shutil, "copyfile", full_disk)
    out = tmp_path / "dist"
    code, stdout, err = _run(
        ["deploy", "--runtime", "onnx", "--runs", "2", "--warmup", "0", "--eval-samples", "200",
         "--out", str(out), "--quiet"]
    )  # fmt: skip
    assert code == 2 and stdout == "" and calls["n"] == 3
    assert (
        err.strip().startswith("fair-edge: error: writing bundle")
        and "No space left on device" in err
    )
    assert len(err.strip().splitlines()) == 1
    assert not out.exists() or list(out.iterdir()) == []


def test_tiny_model_latency_is_flagged_as_noise(host: dict) -> None:
    """An original under TINY_MODEL_MS gets a note that its latency ratio is within noise."""
    from fair_edge.deploy import TINY_MODEL_MS

    summary = host["result"]["summary"]
    p50 = summary["metrics"]["latency_p50_ms"][0]
    flagged = any("within measurement noise" in n for n in summary["notes"])
    assert flagged == (p50 < TINY_MODEL_MS), (p50, summary["notes"])


def test_default_deploy_recovers_and_ships_pytorch_weights(host: dict, eval_set) -> None:
    """The built-in default halves the FLOPs and recovers; every step's accuracy is reported;
    the shipped weights load back into SmallCNN and compute what model.onnx computes."""
    import onnxruntime as ort

    from exporters.weights import load_pruned
    from pipeline.models import SmallCNN
    from pipeline.train import DEFAULT_WIDTH

    summary = host["result"]["summary"]
    stages = summary["accuracy_stages"]
    assert list(stages) == ["unpruned", "one-shot", "BN re-estimated", "recovered",
                            "shipped (pruned ONNX)"]  # fmt: skip
    assert stages["recovered"] > stages["BN re-estimated"] > stages["one-shot"]
    assert summary["ratios"]["flops"] <= 0.55
    assert summary["ratios"]["accuracy_change_points"] >= -2.0  # 1000 images; 10,000 in bench
    assert summary["recovery"]["data"]["train"].startswith("fashion-mnist")
    assert "test" not in summary["recovery"]["data"]["heldout"]
    assert any("built-in default settings: --target 0.5" in n for n in summary["notes"])
    m = host["manifest"]
    assert m["pytorch"]["weights"] == "weights.safetensors" and "weights.safetensors" in m["files"]
    model = load_pruned(lambda: SmallCNN(1, 10, DEFAULT_WIDTH), host["bundle"] / "plan.json",
                        host["bundle"] / "weights.safetensors")  # fmt: skip
    x = eval_set.inputs[:64]
    sess = ort.InferenceSession(
        str(host["bundle"] / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4 * max(1.0, float(np.abs(ref).max())))


def test_emulated_timing_shows_the_roofline_estimate(tmp_path: Path) -> None:
    """Emulated timing is not the board's: the report puts the profile's roofline estimate
    beside it, labelled as an estimate, in JSON, Markdown and the summary notes."""
    from fair_edge.deploy import choose_where

    code, out, err = _run(
        ["deploy", "--device", "rpi4", "--run-on", "emulated", "--runtime", "onnx", "--runs", "2",
         "--warmup", "0", "--recover-steps", "60", "--eval-samples", "200", "--out",
         str(tmp_path), "--json", "--quiet"]
    )  # fmt: skip
    assert code == 0, err
    assert choose_where(load_profile("rpi4"), "emulated")[0] == "emulated"
    bundle = Path(json.loads(out)["bundle"])
    rep = json.loads((bundle / "report.json").read_text())
    est = rep["device_report"]["estimates"]
    assert [e["kind"] for e in est] == ["estimate", "estimate"] and est[0]["profile"] == "rpi4"
    assert est[1]["latency_ms"] < est[0]["latency_ms"]
    assert any("roofline estimate for rpi4" in n for n in rep["summary"]["notes"])
    assert "estimate" in (bundle / "report.md").read_text().lower()
    assert rep["summary"]["representative"] is False
