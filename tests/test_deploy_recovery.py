"""Recovery through the command line: `fair-edge recover`, `deploy --rounds`, `deploy --max-drop`,
the default deploy's accuracy at each step, the shipped PyTorch weights, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from cli_helpers import run_cli
from recovery_setup import Prepared, digits_net, prepare

from exporters.bundle import verify_bundle
from exporters.weights import load_pruned
from pipeline.plan import Plan

MODEL = str(Path(__file__).with_name("recovery_setup.py")) + ":digits_net"


_run = run_cli


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Prepared, list[str]]:
    folder = tmp_path_factory.mktemp("cli-recovery")
    prep = prepare(folder)
    np.savez(folder / "train.npz", x=prep.train.inputs, y=prep.train.labels)
    np.savez(folder / "test.npz", x=prep.test.inputs, y=prep.test.labels)
    common = ["--model", MODEL, "--weights", str(folder / "teacher.pt"),
              "--data", str(folder / "train.npz"), "--eval-data", str(folder / "test.npz"),
              "--recover-steps", "40", "--quiet"]  # fmt: skip
    return prep, common


def _onnx(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_recover_command_writes_recovered_onnx_weights_and_plan(setup, tmp_path: Path) -> None:
    prep, common = setup
    code, out, err = _run(["recover", *common, "--target", "0.6", "--out", str(tmp_path), "--json"])
    assert code == 0, err
    res = json.loads(out)
    acc = res["accuracy"]
    assert acc["recovered"] > acc["one-shot"] + 0.03, acc  # measured: 0.84 -> 0.97
    assert res["accuracy_on"].endswith("test.npz") and res["recovery"]["steps"] == 40
    plan = Plan.load(res["plan"])
    model = load_pruned(digits_net, plan, res["weights"])
    x = prep.test.inputs[:64]
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_onnx(Path(res["onnx"]), x), ref, atol=1e-4 * max(1, abs(ref).max()))


def test_deploy_in_rounds_ships_one_composed_plan(setup, tmp_path: Path) -> None:
    prep, common = setup
    code, out, err = _run(["deploy", *common, "--target", "0.7", "--rounds", "2", "--runtime",
                           "onnx", "--runs", "3", "--warmup", "1", "--out", str(tmp_path),
                           "--json"])  # fmt: skip
    assert code == 0, err
    summary = json.loads(out)["summary"]
    bundle = Path(json.loads(out)["bundle"])
    verify_bundle(bundle)
    plan = Plan.load(bundle / "plan.json")
    rounds = plan.method["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["flops_kept"] > rounds[1]["flops_kept"]
    assert summary["ratios"]["flops"] == pytest.approx(
        rounds[1]["flops_kept"], abs=0.01
    )  # BN folded
    stages = summary["accuracy_stages"]
    assert stages["recovered"] == pytest.approx(stages["shipped (pruned ONNX)"], abs=0.01)
    from fair_edge.deploy import TINY_MODEL_MS  # this 0.03 ms model is flagged, the default is not

    tiny = summary["metrics"]["latency_p50_ms"][0] < TINY_MODEL_MS
    assert tiny == any("within measurement noise" in n for n in summary["notes"])
    model = load_pruned(digits_net, plan, bundle / "weights.safetensors")
    x = prep.test.inputs[:64]
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(
        _onnx(bundle / "model.onnx", x), ref, atol=1e-4 * max(1, abs(ref).max())
    )


def test_deploy_with_an_accuracy_budget(setup, tmp_path: Path) -> None:
    prep, common = setup
    code, out, err = _run(["deploy", *common, "--max-drop", "1.0", "--recover", "--runtime",
                           "onnx", "--runs", "3", "--warmup", "1", "--out", str(tmp_path),
                           "--json"])  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    trade = result["summary"]["tradeoff"]
    bundle = Path(result["bundle"])
    assert len(trade["points"]) == 6 and trade["fix"] == "recovery"
    assert "held out" in trade["heldout"]
    ok = [p for p in trade["points"] if p["ok"]]
    fails = [p for p in trade["points"] if not p["ok"]]
    assert ok and all(p["drop_points"] <= 1.0 for p in ok)
    assert all(p["drop_points"] > 1.0 for p in fails)
    chosen = 1.0 - result["summary"]["ratios"]["flops"]
    assert chosen == pytest.approx(max(p["flops_removed"] for p in ok), abs=0.01)  # BN folded
    assert (bundle / "tradeoff.png").stat().st_size > 1000
    assert "Accuracy budget" in (bundle / "report.md").read_text()


@pytest.mark.parametrize(
    "extra, expect",
    [
        (["--rounds", "2"], "--rounds needs --target"),
        (["--max-drop", "1", "--target", "0.5"], "either --target or --max-drop"),
        (["--max-drop", "150"], "--max-drop is in top-1 points"),
        (["--recover-lr", "0"], "--recover-lr must be > 0"),
        (["--recover-optimizer", "rmsprop"], "invalid choice"),
    ],
)
def test_bad_recovery_options_are_one_line(setup, tmp_path: Path, extra, expect) -> None:
    _, common = setup
    code, out, err = _run(["deploy", *common, *extra, "--out", str(tmp_path)])
    assert code == 2 and out == "" and expect in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("fair-edge: error:")
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_for_another_plan_through_the_cli(setup, tmp_path: Path) -> None:
    _, common = setup
    ckpt = tmp_path / "ckpt.safetensors"
    base = ["recover", *common, "--checkpoint", str(ckpt), "--no-cache", "--out", str(tmp_path)]
    assert _run([*base, "--target", "0.3"])[0] == 0 and ckpt.is_file()
    before = ckpt.read_bytes()
    code, _, err = _run([*base, "--target", "0.6"])
    assert code == 2 and "another plan" in err and len(err.strip().splitlines()) == 1
    assert ckpt.read_bytes() == before


def test_recovery_of_an_onnx_model_is_refused(setup, tmp_path: Path) -> None:
    prep, common = setup
    code, out, err = _run(["recover", *common, "--target", "0.5", "--out", str(tmp_path),
                           "--json"])  # fmt: skip
    assert code == 0, err
    onnx_file = Path(json.loads(out)["onnx"])
    code, _, err = _run(["deploy", "--model", str(onnx_file), "--plan", json.loads(out)["plan"],
                         "--data", common[5], "--recover", "--out", str(tmp_path / "x")])  # fmt: skip
    assert code == 2 and "an ONNX input cannot be recovered" in err


def test_accuracy_budget_under_a_latency(setup, tmp_path: Path) -> None:
    """--latency-ms with --max-drop: the latency's plan is checked against the budget (one point)."""
    _, common = setup
    base = ["deploy", *common, "--latency-ms", "0.072", "--recover", "--runtime", "onnx",
            "--runs", "3", "--warmup", "1"]  # fmt: skip
    code, out, err = _run([*base, "--max-drop", "5", "--out", str(tmp_path / "ok"), "--json"])
    assert code == 0, err
    trade = json.loads(out)["summary"]["tradeoff"]
    assert len(trade["points"]) == 1 and trade["points"][0]["ok"]
    assert "latency" in Plan.load(Path(json.loads(out)["bundle"]) / "plan.json").method


def test_label_free_recovery_through_the_cli(setup, tmp_path: Path) -> None:
    """Unlabelled --recover-data: distillation alone; the held-out share is labelled by the
    unpruned model (agreement), and the report says so."""
    prep, common = setup
    unlabelled = tmp_path / "unlabelled.npy"
    np.save(unlabelled, prep.train.inputs)
    code, out, err = _run(["recover", *common, "--recover-data", str(unlabelled), "--target",
                           "0.6", "--out", str(tmp_path), "--json"])  # fmt: skip
    assert code == 0, err
    res = json.loads(out)
    assert res["recovery"]["label_free"] is True
    assert "labelled by the unpruned model" in res["recovery"]["data"]["heldout"]
    assert res["accuracy"]["recovered"] > res["accuracy"]["one-shot"] + 0.03
    empty = tmp_path / "none.npy"
    np.save(empty, prep.train.inputs[:1])
    code, _, err = _run(["recover", *common, "--recover-data", str(empty), "--target", "0.6",
                         "--out", str(tmp_path / "x")])  # fmt: skip
    assert code == 2 and "recovery needs" in err and len(err.strip().splitlines()) == 1


def test_an_accuracy_budget_no_plan_meets_is_one_line(setup, tmp_path: Path) -> None:
    """Only the 50% plan is tried and no fix runs: it loses more than 0 points, so no plan fits."""
    _, common = setup
    out = tmp_path / "dist"
    code, stdout, err = _run(["deploy", *common, "--max-drop", "0", "--max-drop-tries", "1",
                              "--no-recover", "--no-recalibrate-bn", "--runtime", "onnx",
                              "--out", str(out)])  # fmt: skip
    assert code == 2 and stdout == "" and "no plan tried keeps top-1 within 0.0 points" in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("fair-edge: error:")
    assert not out.exists() or list(out.iterdir()) == []
