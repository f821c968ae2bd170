"""Baseline criteria (L1, random) -> plans, checked against brute force and the ONNX cost model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from exporters.costs import OnnxCostModel
from exporters.graph_groups import find_groups
from exporters.onnx_export import export_onnx
from pipeline.baselines import (
    l1_importance,
    plan_counts,
    plan_from_importance,
    random_importance,
    uniform_counts,
    uniform_plan_for_budget,
)
from pipeline.groups import ChannelGroup
from pipeline.models import ResNet, SmallCNN
from pipeline.plan import ModelFingerprint, PlanError

LAYERS = ["features.0.0", "features.1.0", "features.3.0", "features.4.0", "classifier.1"]


def test_l1_importance_matches_a_loop() -> None:
    model = SmallCNN(width=8)
    imp = l1_importance(model, LAYERS)
    for name in LAYERS:
        w = model.get_submodule(name).weight.detach()
        expect = [float(w[u].abs().sum()) for u in range(w.shape[0])]
        np.testing.assert_allclose(imp[name], expect, rtol=1e-6)
    a, b = random_importance(model, LAYERS, 1), random_importance(model, LAYERS, 1)
    assert all(np.array_equal(a[n], b[n]) for n in LAYERS)
    assert not np.array_equal(
        a["features.1.0"], random_importance(model, LAYERS, 2)["features.1.0"]
    )
    with pytest.raises(PlanError, match="no layer"):
        l1_importance(model, ["nope"])


def test_plan_removes_lowest_units_with_groups_and_caps() -> None:
    imp = {
        "a": np.array([5.0, 1.0, 3.0, 2.0]),
        "b": np.array([0.0, 9.0, 9.0, 0.5]),
        "c": np.array([1.0, 2.0]),
    }
    fp = ModelFingerprint.from_shapes({"a": [4], "b": [4], "c": [2]})
    plan = plan_from_importance(imp, {"a": 2, "b": 2, "c": 5}, fp)
    assert plan.layers["a"].pruned == [1, 3] and plan.layers["b"].pruned == [0, 3]
    assert plan.layers["c"].pruned == [0]  # capped: one unit always kept
    # a coupled group: importance summed over members (a+b = [5, 10, 12, 2.5]), same channels
    g = ChannelGroup(name="ab", members=["a", "b"], n_channels=4)
    gp = plan_from_importance(imp, {"a": 1, "b": 1}, fp, groups=[g])
    assert gp.layers["a"].pruned == gp.layers["b"].pruned == [3] and gp.layers["a"].group == "ab"
    frozen = ChannelGroup(name="ab", members=["a", "b"], n_channels=4, frozen=True, reason="output")
    fz = plan_from_importance(imp, {"a": 2, "b": 2}, fp, groups=[frozen])
    assert fz.layers["a"].pruned == [] and fz.layers["b"].pruned == []
    assert plan_counts(plan) == {"a": 2, "b": 2, "c": 1}
    assert uniform_counts(imp, 0.5) == {"a": 2, "b": 2, "c": 1}
    with pytest.raises(PlanError):
        uniform_counts(imp, 1.0)


def test_uniform_budget_reaches_flops_target_on_a_resnet() -> None:
    model = ResNet(blocks=(1, 1), widths=(8, 16), in_channels=1).eval()
    onnx_model = export_onnx(model, torch.randn(1, 1, 16, 16), None)
    groups = find_groups(onnx_model)
    cost = OnnxCostModel(onnx_model)
    layers = [g for grp in groups if not grp.frozen for g in grp.members]
    imp = l1_importance(model, layers)
    fp = ModelFingerprint.from_model(model)
    plan = uniform_plan_for_budget(imp, 0.4, cost, fp, groups, metric="flops")
    got = 1 - cost.remaining(plan)["flops"]
    assert got >= 0.4 and plan.method["budget"]["achieved"] == pytest.approx(got)
    # the smallest ratio: a slightly smaller one falls short of the target
    r = plan.method["ratio"]
    smaller = plan_from_importance(imp, uniform_counts(imp, r - 0.02), fp, groups)
    assert 1 - cost.remaining(smaller)["flops"] < 0.4
    # residual groups keep the same channels in every member
    for grp in groups:
        if len(grp.members) > 1 and not grp.frozen:
            pruned = {tuple(plan.layers[m].pruned) for m in grp.members}
            assert len(pruned) == 1 and len(next(iter(pruned))) > 0
    with pytest.raises(PlanError, match="at most"):
        uniform_plan_for_budget(imp, 0.999, cost, fp, groups)
