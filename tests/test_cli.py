"""The `fair-edge` command line: config files with flag overrides, one-line errors with exit
code 2 for bad input (and no traceback, no partial output), the console script itself."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import cli_error, run_cli

from devices.profile import list_profiles
from fair_edge.cli import SUBCOMMANDS, build_parser
from fair_edge.config import ConfigError, Options, load_config, resolve
from pipeline.models import SmallCNN
from pipeline.plan import Plan

MODEL_FILE = """
import torch
from pipeline.models import SmallCNN

def small(num_classes=10):
    return SmallCNN(in_channels=1, num_classes=num_classes, width=8)

def wide(num_classes=10):
    return SmallCNN(in_channels=1, num_classes=num_classes, width=48)


def broken():
    raise RuntimeError("factory exploded")

def not_a_module():
    return 42
"""


_run, _error = run_cli, cli_error


@pytest.fixture()
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "mymodels.py"
    path.write_text(MODEL_FILE)
    return path


def test_every_subcommand_has_the_shared_flags() -> None:
    parser = build_parser()
    for name in SUBCOMMANDS:
        args = parser.parse_args([name, *(["x"] if name in ("bench", "report") else [])])
        assert args.config is None and args.quiet is None and args.json is None
    assert set(SUBCOMMANDS) == {
        "score",
        "plan",
        "prune",
        "export",
        "bench",
        "deploy",
        "recover",
        "report",
        "devices",
    }


def test_config_file_holds_options_and_flags_override(tmp_path: Path) -> None:
    cfg = tmp_path / "fe.toml"
    cfg.write_text('device = "rpi4"\ntod = 0.02\nsamples-per-class = 8\nround = false\nruns = 7\n')
    opts = resolve(cfg, {"tod": 0.01, "runs": None, "quiet": True})
    assert (opts.device, opts.tod, opts.samples_per_class, opts.round, opts.runs) == (
        "rpi4",
        0.01,
        8,
        False,
        7,
    )
    assert opts.quiet is True and opts.model is None
    assert Options.from_json(opts.to_json()) == opts
    table = tmp_path / "table.toml"
    table.write_text('[fair-edge]\nmodel = "resnet18"\ninput-shape = [3, 32, 32]\n')
    assert load_config(table) == {"model": "resnet18", "input-shape": [3, 32, 32]}
    assert resolve(table, {}).input_shape == [3, 32, 32]


def test_config_errors_name_the_problem(tmp_path: Path) -> None:
    bad_key = tmp_path / "a.toml"
    bad_key.write_text("todd = 0.1\n")
    with pytest.raises(ConfigError, match="unknown option 'todd'"):
        resolve(bad_key, {})
    bad_type = tmp_path / "b.toml"
    bad_type.write_text('runs = "many"\n')
    with pytest.raises(ConfigError, match="option 'runs' .* must be int, got str"):
        resolve(bad_type, {})
    broken = tmp_path / "c.toml"
    broken.write_text("tod = = 1\n")
    assert "is not valid TOML" in _error(["deploy", "--config", str(broken)])
    assert "does not exist" in _error(["deploy", "--config", str(tmp_path / "none.toml")])


def test_devices_lists_the_profiles_as_json() -> None:
    code, out, _ = _run(["devices", "--json"])
    assert code == 0
    rows = json.loads(out)["profiles"]
    assert [r["name"] for r in rows] == list_profiles()
    assert {r["name"]: r["channel_multiple"] for r in rows}["rpi4"] == 4


def test_unknown_device() -> None:
    line = _error(["deploy", "--device", "toaster"])
    assert "unknown device profile 'toaster'" in line and "rpi4" in line


def test_tod_and_target_out_of_range() -> None:
    assert "--tod must be in (0, 1)" in _error(["deploy", "--tod", "1.5"])
    assert "--tod must be in (0, 1)" in _error(["plan", "--tod", "0"])
    assert "--target is the share to remove" in _error(["deploy", "--target", "1.2"])
    code, _, err = _run(["deploy", "--tod", "abc"])  # argparse's own type error
    assert code == 2 and "invalid float value" in err and "Traceback" not in err


def test_model_entry_point_that_fails(model_file: Path) -> None:
    line = _error(["score", "--model", f"{model_file}:broken", "--data", "digits"])
    assert "model entry point" in line and "RuntimeError: factory exploded" in line
    assert "returned int, not a torch.nn.Module" in _error(
        ["score", "--model", f"{model_file}:not_a_module"]
    )
    assert "has no callable 'missing'" in _error(["score", "--model", f"{model_file}:missing"])
    assert "No module named" in _error(["score", "--model", "no_such_module_xyz:build"])


def test_weights_that_do_not_fit(model_file: Path, tmp_path: Path) -> None:
    wrong = tmp_path / "wide.pt"
    torch.save(SmallCNN(in_channels=1, num_classes=10, width=16).state_dict(), wrong)
    line = _error(
        ["deploy", "--model", f"{model_file}:small", "--weights", str(wrong), "--data", "digits"]
    )
    assert (
        "do not fit the model" in line and "features.0.0.weight" in line and "(16, 1, 3, 3)" in line
    )
    pickled = tmp_path / "pickled.pt"
    torch.save({"model": SmallCNN(width=8)}, pickled)  # a whole module: refused by weights_only
    assert "weights_only=True" in _error(
        ["deploy", "--model", f"{model_file}:small", "--weights", str(pickled)]
    )
    assert "does not exist" in _error(
        ["deploy", "--model", f"{model_file}:small", "--weights", str(tmp_path / "x.pt")]
    )


def test_data_path_missing(model_file: Path, tmp_path: Path) -> None:
    line = _error(["deploy", "--model", f"{model_file}:small", "--data", str(tmp_path / "nowhere")])
    assert "no data at" in line
    line = _error(["deploy", "--model", f"{model_file}:small"])
    assert "needs calibration data: give --data" in line


def test_data_that_does_not_fit_the_model(model_file: Path) -> None:
    line = _error(
        ["deploy", "--model", f"{model_file}:small", "--data", "digits", "--out", "unused"]
    )
    assert "cannot run on the data's samples of shape [1, 8, 8]" in line
    assert not Path("unused").exists()
    line = _error(["deploy", "--input-shape", "3,32,32", "--out", "unused"])
    assert "--input-shape [3, 32, 32] does not match the data's samples [1, 28, 28]" in line


def test_onnx_model_needs_a_plan(tmp_path: Path) -> None:
    from exporters.onnx_export import export_onnx

    path = tmp_path / "m.onnx"
    export_onnx(SmallCNN(width=8).eval(), torch.zeros(1, 1, 28, 28), path)
    line = _error(["score", "--model", str(path), "--data", "fashion-mnist:test"])
    assert "scoring needs the PyTorch model" in line and "--plan" in line


def test_score_plan_prune_with_an_entry_point(model_file: Path, tmp_path: Path) -> None:
    """The stage commands chain on files: score -> plan -> prune (weights loaded weights_only)."""
    weights = tmp_path / "w.pt"
    torch.manual_seed(1)
    torch.save(SmallCNN(in_channels=1, num_classes=10, width=8).state_dict(), weights)
    common = ["--model", f"{model_file}:small", "--weights", str(weights), "--data", "fashion-mnist:test",
              "--samples-per-class", "4", "--projections", "8", "--out", str(tmp_path / "out"), "--json",
              "--quiet", "--no-cache"]  # fmt: skip
    code, out, err = _run(["score", *common])
    assert code == 0, err
    scores = json.loads(out)
    assert Path(scores["scores"]).is_file() and scores["cached"] is False
    code, out, err = _run(
        ["plan", *common, "--scores", scores["scores"], "--tod", "0.2", "--no-round"]
    )
    assert code == 0, err
    plan = json.loads(out)
    assert Path(plan["plan"]).is_file()
    code, out, err = _run(["prune", *common, "--plan", plan["plan"]])
    assert code == 0, err
    pruned = json.loads(out)
    rep = pruned["surgery"]
    assert Path(pruned["model"]).is_file()
    assert rep["params_after"] <= rep["params_before"]
    assert rep["params_after"] < rep["params_before"] or plan["pruned_units"] == 0


def test_plan_for_a_latency_on_the_host(model_file: Path, tmp_path: Path) -> None:
    """`plan --latency-ms` searches the ToD level with the host's latency model and measures it."""
    common = ["--model", f"{model_file}:wide", "--data", "fashion-mnist:test",
              "--samples-per-class", "4", "--projections", "8", "--out", str(tmp_path / "out"),
              "--json", "--quiet", "--device", "host"]  # fmt: skip
    results = []
    for target in (1000.0, None):
        if target is None:  # 80% of the unpruned model's predicted time: must prune
            target = 0.8 * results[0]["unpruned_predicted_ms"]
        code, out, err = _run(["plan", *common, "--latency-ms", str(target)])
        assert code == 0, err
        saved = Plan.load(json.loads(out)["plan"])
        lat = saved.method["latency"]
        assert lat["target_ms"] == pytest.approx(target) and lat["profile"] == "host"
        assert lat["measured_ms"] is not None and lat["attempts"]
        results.append({**lat, "pruned": saved.pruned_units()})
    loose, tight = results
    assert loose["predicted_ms"] <= 1000.0
    assert tight["pruned"] > 0
    for att in tight["attempts"]:  # each search met its goal; the goal follows the measurements
        assert att["predicted_ms"] <= att["model_target_ms"] * (1 + 1e-9)
        assert att["measured_ms"] > 0
    assert "--latency-ms must be a positive" in _error(["plan", "--latency-ms", "-1"])
    assert "not both" in _error(["plan", "--latency-ms", "5", "--target", "0.3"])


def test_console_script_prints_one_line_and_exits_2() -> None:
    exe = Path(sys.executable).with_name("fair-edge")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "fair_edge.cli"]
    proc = subprocess.run(
        [*cmd, "deploy", "--device", "toaster"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("fair-edge: error: unknown device profile 'toaster'")
    )
    assert "Traceback" not in proc.stderr
    assert shutil.which(cmd[0]) or Path(cmd[0]).is_file()


def test_prune_an_onnx_file_with_a_given_plan(model_file: Path, tmp_path: Path) -> None:
    """An ONNX model goes through surgery alone, driven by a plan made on its torch original."""
    from exporters.onnx_export import export_onnx

    weights = tmp_path / "w.pt"
    model = SmallCNN(in_channels=1, num_classes=10, width=8).eval()
    torch.save(model.state_dict(), weights)
    onnx_path = tmp_path / "m.onnx"
    export_onnx(model, torch.zeros(1, 1, 28, 28), onnx_path)
    common = [
        "--data",
        "fashion-mnist:test",
        "--out",
        str(tmp_path / "out"),
        "--json",
        "--quiet",
        "--no-cache",
    ]
    code, out, err = _run(
        ["plan", "--model", f"{model_file}:small", "--weights", str(weights), *common,
         "--samples-per-class", "4", "--projections", "8", "--tod", "0.3", "--no-round"]
    )  # fmt: skip
    assert code == 0, err
    plan_path = json.loads(out)["plan"]
    code, out, err = _run(["prune", "--model", str(onnx_path), "--plan", plan_path, *common])
    assert code == 0, err
    rep = json.loads(out)["surgery"]
    kept = {r["layer"]: r["channels_after"] for r in rep["layers"]}
    plan = json.loads(Path(plan_path).read_text())
    for name, lp in plan["layers"].items():
        assert kept[name] == lp["n_units"] - len(lp["pruned"])


def test_export_and_bench(tmp_path: Path) -> None:
    """export: ONNX + fp16 variant; bench: two files measured back to back on the host."""
    code, out, err = _run(
        ["export", "--data", "fashion-mnist:test", "--runtime", "onnx", "--quantize", "fp16",
         "--out", str(tmp_path), "--json", "--quiet"]
    )  # fmt: skip
    assert code == 0, err
    files = json.loads(out)
    assert Path(files["onnx"]).is_file() and files["fp16"]["kind"] == "fp16"
    assert files["fp16"]["top1_agreement"] >= 0.99
    code, out, err = _run(
        ["bench", files["onnx"], files["fp16"]["path"], "--runs", "3", "--warmup", "1", "--json"]
    )
    assert code == 0, err
    comp = json.loads(out)
    assert (
        comp["device"] == "local" and comp["original"]["runs"] == 3 and comp["pruned"]["runs"] == 3
    )
    sizes = [Path(files["onnx"]).stat().st_size, Path(files["fp16"]["path"]).stat().st_size]
    assert comp["ratios"]["size_ratio"] == pytest.approx(sizes[1] / sizes[0])
    assert "does not exist" in _error(["bench", str(tmp_path / "none.onnx")])
