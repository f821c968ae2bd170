"""Plan controls through the command line: --ignore-layers (names or patterns), --max-layer-ratio,
per-layer caps from the config, --round-to N and --opset, all recorded in the plan; a pattern that
matches nothing is one error line with nothing written. Rounding never rounds past a cap."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from cli_helpers import cli_error, run_cli

from pipeline.controls import PlanControls, matches
from pipeline.plan import Plan, PlanError

MODEL_FILE = """
from pipeline.models import SmallCNN

def small(num_classes=10):
    return SmallCNN(in_channels=1, num_classes=num_classes, width=16)
"""


@pytest.fixture()
def common(tmp_path: Path) -> list[str]:
    (tmp_path / "mm.py").write_text(MODEL_FILE)
    return ["--model", f"{tmp_path / 'mm.py'}:small", "--data", "fashion-mnist:test",
            "--samples-per-class", "8", "--projections", "8", "--json", "--quiet",
            "--out", str(tmp_path / "out")]  # fmt: skip


def _plan(args: list[str]) -> Plan:
    code, out, err = run_cli(["plan", *args])
    assert code == 0, err
    return Plan.load(json.loads(out)["plan"])


def test_ignore_max_ratio_round_to_and_opset_in_the_plan(common: list[str]) -> None:
    free = _plan([*common, "--tod", "0.4", "--no-round"])
    # what the controls must change: the free plan prunes the ignored layers and beyond the cap
    assert free.layers["features.3.0"].pruned and free.layers["features.0.0"].pruned
    assert any(len(lp.pruned) > int(0.3 * lp.n_units) for lp in free.layers.values())
    p = _plan([*common, "--tod", "0.4", "--ignore-layers", "features.0.*,features.3",
               "--max-layer-ratio", "0.3", "--round-to", "4", "--opset", "18"])  # fmt: skip
    for name, lp in p.layers.items():
        if name in ("features.0.0", "features.3.0"):
            assert lp.pruned == [], name
        assert len(lp.pruned) <= int(0.3 * lp.n_units), name
        assert lp.kept % 4 == 0 or lp.kept == lp.n_units, name
    c = p.method["controls"]
    assert c["ignore_layers"] == ["features.0.*", "features.3"] and c["max_layer_ratio"] == 0.3
    assert c["ignored"] == ["features.0.0", "features.3.0"]
    assert p.method["rounding"]["multiple"] == 4 and p.method["rounding"]["from"] == "--round-to"
    assert p.method["export"] == {"opset": 18}


def test_nearest_rounding_and_config_caps(common: list[str], tmp_path: Path) -> None:
    free = _plan([*common, "--target", "0.3", "--round-to", "8", "--round-mode", "nearest"])
    assert len(free.layers["features.4.0"].pruned) > int(0.1 * 32)
    cfg = tmp_path / "caps.toml"
    cfg.write_text('[layer_ratio_caps]\n"features.4.*" = 0.1\n"classifier" = 0.2\n')
    p = _plan([*common, "--config", str(cfg), "--target", "0.3", "--round-to", "8",
               "--round-mode", "nearest"])  # fmt: skip
    assert len(p.layers["features.4.0"].pruned) <= int(0.1 * 32)
    assert len(p.layers["classifier.1"].pruned) <= int(0.2 * 128)
    assert p.method["controls"]["layer_ratio_caps"] == {"features.4.*": 0.1, "classifier": 0.2}
    for lp in p.layers.values():
        assert lp.kept % 8 == 0 or lp.kept == lp.n_units


def test_bad_pattern_is_one_line_and_writes_nothing(common: list[str], tmp_path: Path) -> None:
    line = cli_error(["plan", *common, "--ignore-layers", "features.9*"])
    assert "--ignore-layers pattern 'features.9*' matches no layer" in line
    assert "features.0.0" in line  # names real layers to choose from
    assert not (tmp_path / "out").exists()
    assert "--max-layer-ratio" in cli_error(["plan", *common, "--max-layer-ratio", "1.5"])
    assert "--opset must be 17 to 20" in cli_error(["plan", *common, "--opset", "13"])
    assert "--round-to" in cli_error(["plan", *common, "--round-to", "0"])
    line = cli_error(["deploy", *common, "--rounds", "2", "--target", "0.5",
                      "--max-layer-ratio", "0.3"])  # fmt: skip
    assert "apply to one-round plans" in line


def test_export_writes_the_asked_opset(common: list[str], tmp_path: Path) -> None:
    args = [a for a in common if a not in ("--samples-per-class", "--projections", "8")]
    code, out, err = run_cli(["export", *args, "--opset", "19", "--runtime", "onnx"])
    assert code == 0, err
    model = onnx.load(json.loads(out)["onnx"])
    assert {o.domain: o.version for o in model.opset_import}[""] == 19


def test_patterns_and_caps_resolve() -> None:
    assert matches("layer1.0.conv1", "layer1") and matches("layer1.0.conv1", "*.conv1")
    assert not matches("layer10.conv", "layer1")
    ctl = PlanControls.of("layer1", 0.5, {"*.conv2": 0.25})
    ignored, caps = ctl.resolve({"layer1.0.conv1": 10, "layer2.conv2": 8, "fc1": 7}, ["fc"])
    assert set(ignored) == {"layer1.0.conv1"}
    assert caps == {"layer1.0.conv1": 5, "layer2.conv2": 2, "fc1": 3}
    with pytest.raises(PlanError, match="in \\[0, 1\\)"):
        PlanControls(max_ratio=1.0)
    with pytest.raises(PlanError, match="'x\\*' matches no layer"):
        PlanControls.of(ratio_caps={"x*": 0.2}).resolve({"fc1": 7})


def test_rounding_never_passes_a_cap() -> None:
    import numpy as np

    from pipeline.plan import LayerPlan, ModelFingerprint
    from pipeline.rounding import round_plan

    u = {"a": np.arange(32, dtype=float)}
    layers = {"a": LayerPlan("a", 32, list(range(7)))}
    fp = ModelFingerprint.from_shapes({"a.weight": [32, 3]})
    capped = Plan(fp, layers, method={"controls": {"max_pruned": {"a": 7}}})
    free = Plan(fp, {"a": LayerPlan("a", 32, list(range(7)))})
    assert round_plan(free, u, 8, mode="down").layers["a"].kept == 24  # would prune 8 > 7
    assert round_plan(capped, u, 8, mode="down").layers["a"].kept == 32
    assert round_plan(capped, u, 8, mode="nearest").layers["a"].kept == 32


def test_allocation_option_caps_every_layer_and_is_recorded(common: list[str]) -> None:
    free = _plan([*common, "--target", "0.3", "--no-round"])
    p = _plan([*common, "--target", "0.3", "--no-round", "--allocation", "tod-capped:1.25"])
    alloc = p.method["allocation"]
    assert alloc["name"] == "tod-capped" and alloc["cap_multiple"] == 1.25
    cap = alloc["cap"]
    # binding caps against the same scores: tests/test_allocation.py; here: the CLI passes it on
    for name, lp in p.layers.items():
        assert len(lp.pruned) <= cap * lp.n_units + 1e-9, name
    assert "allocation" not in free.method
    fresh = [*common[:-1], str(Path(common[-1]).with_name("out-bad"))]
    line = cli_error(["deploy", *fresh, "--target", "0.5", "--allocation", "even"])
    assert line.startswith("fair-edge: error: --allocation") and "tod-capped:1.5" in line
    assert not Path(fresh[-1]).exists()  # nothing written
