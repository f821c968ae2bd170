"""The plan file: round trip, fingerprint checks and malformed input."""

from __future__ import annotations

import json

import pytest
from torch import nn

from pipeline.groups import ChannelGroup
from pipeline.models import MLP, SmallCNN
from pipeline.plan import LayerPlan, ModelFingerprint, Plan, PlanError


def _plan(model: nn.Module) -> Plan:
    layers = {
        "features.0.0": LayerPlan("features.0.0", 32, [1, 5, 7], group="g0", unrounded_pruned=2),
    }
    group = ChannelGroup("g0", ["features.0.0"], 32, extra={"kind": "plain"})
    return Plan(ModelFingerprint.from_model(model), layers, {"alpha": 0.01}, [group])


def test_round_trip_keeps_everything(tmp_path) -> None:
    model = SmallCNN()
    plan = _plan(model)
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = Plan.load(path)
    assert loaded.to_json() == plan.to_json()
    assert loaded.layers["features.0.0"].kept == 29
    assert loaded.layers["features.0.0"].keep_mask().sum() == 29
    assert loaded.groups[0].extra == {"kind": "plain"}
    loaded.check_model(SmallCNN())
    assert not list(tmp_path.glob(".*.tmp")), "atomic write left a temp file"


def test_plan_for_another_model_names_the_difference() -> None:
    plan = _plan(SmallCNN())
    with pytest.raises(PlanError, match="does not match the model: parameter"):
        plan.check_model(SmallCNN(width=16))
    with pytest.raises(PlanError, match="does not match"):
        plan.check_model(MLP())


def test_fingerprint_is_order_independent() -> None:
    a = ModelFingerprint.from_shapes({"a.weight": (3, 2), "b.weight": [4]})
    b = ModelFingerprint.from_shapes({"b.weight": [4], "a.weight": [3, 2]})
    assert a.digest == b.digest and a.diff(b) is None
    c = ModelFingerprint.from_shapes({"a.weight": (3, 3), "b.weight": [4]})
    assert "a.weight" in (a.diff(c) or "")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(schema="x"), "not a fair-edge plan"),
        (lambda d: d.update(version=99), "version 99 is not supported"),
        (lambda d: d["layers"]["features.0.0"].update(pruned=[40]), "outside 0..31"),
        (lambda d: d["layers"]["features.0.0"].update(pruned=[1, 1]), "lists a unit twice"),
        (
            lambda d: d["layers"]["features.0.0"].update(pruned=list(range(32))),
            "at least one must stay",
        ),
        (lambda d: d.pop("fingerprint"), "malformed"),
    ],
)
def test_bad_plan_files_raise_one_clear_error(tmp_path, mutate, message) -> None:
    data = _plan(SmallCNN()).to_json()
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PlanError, match=message):
        Plan.load(path)


def test_missing_and_non_json_files(tmp_path) -> None:
    with pytest.raises(PlanError, match="does not exist"):
        Plan.load(tmp_path / "nope.json")
    (tmp_path / "x.json").write_bytes(b"\x00\x01 not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.load(tmp_path / "x.json")
