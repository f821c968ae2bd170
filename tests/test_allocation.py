"""Budget allocations (ToD, ToD capped, blended with uniform) and group aggregation of planning."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from score_data import data, small_resnet_scores

from pipeline.baselines import uniform_plan_for_budget
from pipeline.cost import ScoresCostModel
from pipeline.groups import ChannelGroup
from pipeline.models import VGG
from pipeline.plan import PlanError
from pipeline.planning import Allocation, aggregate_members, plan, plan_for_budget
from pipeline.scoring import score
from pipeline.tod import pruned_units


@pytest.fixture(scope="module")
def vgg_scores():
    torch.manual_seed(1)
    model = VGG(cfg=(16, "M", 24, "M", 32, 32), num_classes=4, hidden=40)
    x, y = data(4, 6, (3, 8, 8))
    return model, score(model, (x, y), samples_per_class=6, projections=8, progress=False)


@pytest.fixture(scope="module")
def resnet_scores():
    return small_resnet_scores()


def shares(p) -> dict[str, float]:
    return {n: len(lp.pruned) / lp.n_units for n, lp in p.layers.items()}


def lowest_u(s, p) -> None:
    """Every layer loses its lowest-U units (ties aside)."""
    for n, lp in p.layers.items():
        if lp.pruned and len(lp.pruned) < lp.n_units:
            assert s[n].U[lp.pruned].max() <= np.delete(s[n].U, lp.pruned).min()


def test_parse_and_bad_values() -> None:
    assert Allocation.parse(None) == Allocation.parse("tod") == Allocation()
    assert Allocation.parse("tod-capped") == Allocation("tod-capped", 1.5)
    assert Allocation.parse("blend:0.25").to_json() == {"name": "blend", "tod_weight": 0.25}
    for bad in ("uniform", "tod:2", "tod-capped:0.5", "tod-capped:x", "blend:1.5", "blend:nan"):
        with pytest.raises(PlanError, match="allocation"):
            Allocation.parse(bad)


def test_default_is_the_method_and_records_nothing_new(vgg_scores) -> None:
    model, s = vgg_scores
    a = plan_for_budget(s, 0.4, model=model)
    b = plan_for_budget(s, 0.4, model=model, allocation="tod", aggregate="sum")
    assert a.to_json() == b.to_json()
    assert "allocation" not in a.method and "aggregate" not in a.method


def test_tod_capped_meets_the_budget_under_the_cap(vgg_scores) -> None:
    model, s = vgg_scores
    cost = ScoresCostModel(s)
    tod = plan_for_budget(s, 0.5, model=model)
    p = plan_for_budget(s, 0.5, model=model, allocation="tod-capped:1.25")
    rec = p.method["allocation"]
    assert max(shares(tod).values()) > rec["cap"]  # ToD passes the cap here: it has work to do
    assert rec["name"] == "tod-capped" and rec["cap_multiple"] == 1.25
    assert rec["cap"] == pytest.approx(min(0.9, 1.25 * rec["uniform_ratio"]))
    # the uniform ratio is the one the uniform baseline needs for this budget
    imp = {n: s[n].U for n in s.names()}
    uni = uniform_plan_for_budget(imp, 0.5, cost, s.fingerprint)
    assert rec["uniform_ratio"] == pytest.approx(uni.method["ratio"], abs=2e-4)
    for n, lp in p.layers.items():
        assert len(lp.pruned) <= math.floor(rec["cap"] * lp.n_units + 1e-9), n
    got = 1 - cost.remaining(p)["flops"]
    assert got >= 0.5 and p.method["budget"]["achieved"] == pytest.approx(got)
    assert shares(p) != shares(tod)
    lowest_u(s, p)
    # within the cap, each layer's count is ToD's at the re-solved alpha
    for n, lp in p.layers.items():
        k = len(pruned_units(s[n].U, s[n].R, p.method["alpha"]))
        assert len(lp.pruned) == min(k, math.floor(rec["cap"] * lp.n_units + 1e-9))
    with pytest.raises(PlanError, match="cap"):  # a tight cap cannot meet a large budget
        plan_for_budget(s, 0.95, model=model, allocation="tod-capped:1", max_alpha=0.2)


def test_blend_ends_are_uniform_and_tod(vgg_scores) -> None:
    model, s = vgg_scores
    cost = ScoresCostModel(s)
    imp = {n: s[n].U for n in s.names()}
    uni = uniform_plan_for_budget(imp, 0.45, cost, s.fingerprint)
    b0 = plan_for_budget(s, 0.45, model=model, allocation="blend:0")
    # W = 0: FAIR's U with one uniform ratio, the U-alone baseline exactly
    assert {n: lp.pruned for n, lp in b0.layers.items()} == {
        n: lp.pruned for n, lp in uni.layers.items()
    }
    tod = plan_for_budget(s, 0.45, model=model)
    b1 = plan_for_budget(s, 0.45, model=model, allocation="blend:1")
    assert b1.method["allocation"]["scale"] <= 1.0 + 1e-3  # ToD's own counts meet it already
    for n in s.names():  # W = 1: ToD's shares, rescaled to the budget
        assert abs(len(b1.layers[n].pruned) - len(tod.layers[n].pruned)) <= 1
    half = plan_for_budget(s, 0.45, model=model, allocation="blend:0.5")
    rec = half.method["allocation"]
    for n, lp in half.layers.items():
        want = 0.5 * len(tod.layers[n].pruned) / lp.n_units + 0.5 * rec["uniform_ratio"]
        assert len(lp.pruned) == min(round(rec["scale"] * want * lp.n_units), lp.n_units - 1)
    got = 1 - cost.remaining(half)["flops"]
    assert got >= 0.45 and half.method["budget"]["achieved"] == pytest.approx(got)
    lowest_u(s, half)
    spread = [max(shares(q).values()) - min(shares(q).values()) for q in (b0, half, tod)]
    assert spread[0] <= spread[1] <= spread[2]


def test_aggregate_against_per_channel_oracle(resnet_scores) -> None:
    model, s = resnet_scores
    g1 = ChannelGroup("add1", ["stem.0", "layers.0.conv2"], 8)
    g2 = ChannelGroup("add2", ["layers.1.conv2", "layers.1.shortcut.0"], 16)
    for how, alpha in itertools.product(("sum", "max", "normsum"), (0.05, 0.3)):
        p = plan(s, alpha, groups=[g1, g2], aggregate=how)
        for g in (g1, g2):
            us = [s[m].U for m in g.members]
            rs = [s[m].R for m in g.members]
            if how == "sum":
                u, r = us[0] + us[1], rs[0] + rs[1]
            elif how == "max":
                u, r = np.maximum(*us), np.maximum(*rs)
            else:
                u = us[0] / np.abs(us[0]).mean() + us[1] / np.abs(us[1]).mean()
                r = rs[0] / np.abs(rs[0]).mean() + rs[1] / np.abs(rs[1]).mean()
            want = pruned_units(u, r, alpha).tolist()
            assert all(p.layers[m].pruned == want for m in g.members), (how, g.name)
        assert (p.method.get("aggregate") == how) != (how == "sum")
    diff = [plan(s, 0.3, groups=[g1, g2], aggregate=h).layers["stem.0"].pruned for h in
            ("sum", "max", "normsum")]  # fmt: skip
    assert len({tuple(d) for d in diff}) > 1  # the options do change the plan here
    p = plan_for_budget(s, 0.3, groups=[g1, g2], aggregate="max", model=model)
    assert p.method["aggregate"] == "max" and p.method["budget"]["achieved"] >= 0.3
    with pytest.raises(PlanError, match="aggregate"):
        plan(s, 0.3, groups=[g1], aggregate="mean")
    x = np.array([[1.0, 0.0, 2.0], [0.0, 0.0, 0.0]])  # an all-zero member is not divided by 0
    assert aggregate_members(list(x), "normsum").tolist() == [1.0, 0.0, 2.0]
