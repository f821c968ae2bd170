"""Channel rounding: checked against a brute-force search over unit subsets on random plans."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pipeline.groups import ChannelGroup
from pipeline.plan import LayerPlan, ModelFingerprint, Plan, PlanError
from pipeline.rounding import allowed_counts, round_plan, rounded_count, rounding_summary


def _plan(
    layers: dict[str, tuple[int, list[int]]], groups: list[ChannelGroup] | None = None
) -> Plan:
    group_of = {m: g.name for g in groups or [] for m in g.members}
    return Plan(
        fingerprint=ModelFingerprint.from_shapes(
            {f"{k}.weight": [n, 1] for k, (n, _) in layers.items()}
        ),
        layers={k: LayerPlan(k, n, sorted(p), group_of.get(k)) for k, (n, p) in layers.items()},
        groups=list(groups or []),
    )


def _brute_count(kept: int, n: int, m: int, mode: str) -> int:
    """Kept count by the definition: every c in 1..n that is a multiple of m (>= m) or all n."""
    ok = [c for c in range(1, n + 1) if (c % m == 0) or c == n]
    if kept in ok:
        return kept
    if mode == "up":
        return min(c for c in ok if c > kept)
    if mode == "down":
        below = [c for c in ok if c < kept]
        return max(below) if below else min(ok)
    # nearest; ties go up
    return min(ok, key=lambda c: (abs(c - kept), -c))


def _brute_pruned(pruned: list[int], u: np.ndarray, target_kept: int) -> set[int]:
    """Among all pruned sets of the right size that only move units in the rounding direction
    (a subset of the old set when un-pruning, a superset when pruning more), the one that keeps
    the most U: exhaustive over subsets."""
    n = u.size
    size = n - target_kept
    old = set(pruned)
    best, best_key = None, None
    for cand in itertools.combinations(range(n), size):
        s = set(cand)
        if not (s <= old or s >= old):
            continue
        key = (u[sorted(s)].sum(), sorted(s))  # least pruned U; ties: lowest indices
        if best_key is None or key < best_key:
            best, best_key = s, key
    return best


@pytest.mark.parametrize("mode", ["nearest", "up", "down"])
def test_random_plans_match_brute_force(mode: str) -> None:
    rng = np.random.default_rng(7)
    for trial in range(60):
        m = int(rng.choice([2, 3, 4, 8]))
        layers, scores = {}, {}
        for i in range(3):
            n = int(rng.integers(1, 13))
            k = int(rng.integers(0, n))  # prune k units (always at least one kept)
            u = rng.random(n)
            scores[f"l{i}"] = u
            # FAIR prunes the lowest-U units; sometimes hand in an arbitrary set as well
            pruned = list(np.argsort(u)[:k]) if trial % 2 else list(rng.choice(n, k, replace=False))
            layers[f"l{i}"] = (n, [int(x) for x in pruned])
        plan = _plan(layers)
        out = round_plan(plan, scores, m, mode)
        for name, (n, pruned) in layers.items():
            lp = out.layers[name]
            want = _brute_count(n - len(pruned), n, m, mode)
            assert lp.kept == want, (trial, name, n, len(pruned), m, mode)
            assert set(lp.pruned) == _brute_pruned(pruned, scores[name], want)
            assert lp.unrounded_pruned == len(pruned)
            assert lp.kept >= min(m, n) and (lp.kept % m == 0 or lp.kept == n)
        # the input plan is left as it was
        assert all(plan.layers[k].pruned == sorted(p) for k, (_, p) in layers.items())
        assert all(lp.unrounded_pruned is None for lp in plan.layers.values())


def test_ranking_order_up_and_down() -> None:
    u = np.array([0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 0.05])
    # FAIR pruned the 3 lowest-U units (9, 1, 5): 7 kept; multiple 4
    plan = _plan({"a": (10, [9, 1, 5])})
    up = round_plan(plan, {"a": u}, 4, "up").layers["a"]
    assert up.kept == 8 and up.pruned == [1, 9]  # 5 (U=0.2, the best pruned) comes back
    down = round_plan(plan, {"a": u}, 4, "down").layers["a"]
    assert down.kept == 4 and down.pruned == [1, 2, 3, 5, 7, 9]  # adds 3, 7, 2: the next-lowest U
    assert round_plan(plan, {"a": u}, 4, "nearest").layers["a"].kept == 8  # 7 -> 8 is closer


def test_never_empties_and_small_layers_stay_whole() -> None:
    u = np.arange(6, dtype=float)
    plan = _plan({"small": (3, [0, 1]), "mid": (6, [0, 1, 2, 3, 4])})
    out = round_plan(plan, {"small": u[:3], "mid": u}, 8, "down")
    assert out.layers["small"].kept == 3 and out.layers["small"].pruned == []
    assert out.layers["mid"].kept == 6  # n < multiple: all units kept
    out4 = round_plan(plan, {"small": u[:3], "mid": u}, 4, "down")
    assert out4.layers["mid"].kept == 4 and out4.layers["mid"].pruned == [0, 1]


def test_n_not_multiple_rounds_up_to_whole_layer() -> None:
    # n = 10, multiple 4: allowed kept counts 4, 8, 10
    assert allowed_counts(10, 4) == [4, 8, 10]
    assert rounded_count(9, 10, 4, "up") == 10
    assert rounded_count(9, 10, 4, "nearest") == 10  # 9 is 1 from 10 and 8: tie goes up
    assert rounded_count(9, 10, 4, "down") == 8
    assert rounded_count(6, 10, 4, "nearest") == 8  # tie between 4 and 8 goes up


def test_groups_use_summed_u_and_move_together() -> None:
    g = ChannelGroup("res", ["a", "b"], 6)
    ua = np.array([0.0, 0.9, 0.1, 0.8, 0.2, 0.3])
    ub = np.array([0.0, 0.0, 0.6, 0.0, 0.0, 0.05])
    # summed U: [0, .9, .7, .8, .2, .35]; pruned {0, 4, 5, 2} (4 pruned, 2 kept)
    plan = _plan({"a": (6, [0, 2, 4, 5]), "b": (6, [0, 2, 4, 5]), "c": (6, [])}, [g])
    out = round_plan(plan, {"a": ua, "b": ub, "c": np.ones(6)}, 4, "up")
    # un-prune the two best pruned channels by summed U: 2 (0.7) and 5 (0.35); a alone would pick 5, 4
    assert out.layers["a"].pruned == out.layers["b"].pruned == [0, 4]
    assert out.layers["c"].pruned == [] and out.layers["c"].kept == 6
    assert out.method["rounding"] == {"multiple": 4, "mode": "up", "layers_changed": 2}
    summary = rounding_summary(out)
    assert summary["a"] == {"n_units": 6, "kept_unrounded": 2, "kept": 4}
    # a frozen group is left alone
    frozen = ChannelGroup("res", ["a", "b"], 6, frozen=True, reason="test")
    out_f = round_plan(plan, {"a": ua, "b": ub, "c": np.ones(6)}, 4, "up", groups=[frozen])
    assert out_f.layers["a"].pruned == [0, 2, 4, 5] and out_f.layers["a"].unrounded_pruned is None
    # a frozen group whose members differ in width (a residual on one half of a C2f split)
    mixed = _plan({"cv1": (8, []), "m": (4, []), "c": (6, [1, 2, 3])})
    split = ChannelGroup("cv1+1", ["cv1", "m"], 8, frozen=True, reason="layouts")
    out_m = round_plan(mixed, {"c": np.arange(6.0)}, 4, "up", groups=[split])
    assert out_m.layers["cv1"].pruned == out_m.layers["m"].pruned == []
    assert out_m.layers["c"].kept == 4


def test_json_round_trip_keeps_unrounded_counts(tmp_path) -> None:
    plan = _plan({"a": (10, [0, 1, 2])})
    out = round_plan(plan, {"a": np.arange(10.0)}, 4, "up")
    out.save(tmp_path / "p.json")
    back = Plan.load(tmp_path / "p.json")
    assert back.layers["a"].unrounded_pruned == 3 and back.layers["a"].kept == 8
    # rounding again keeps the first unrounded count
    again = round_plan(back, {"a": np.arange(10.0)}, 8, "down")
    assert again.layers["a"].unrounded_pruned == 3 and again.layers["a"].kept == 8


def test_scores_object_forms() -> None:
    class ByAttr:
        U = {"a": np.arange(8.0)}

    class Entry:
        def __init__(self, u):
            self.U = u

    class ByLayers:
        layers = {"a": Entry(np.arange(8.0))}

    plan = _plan({"a": (8, [0, 1, 2, 3, 4, 5])})
    for s in (ByAttr(), ByLayers(), {"a": np.arange(8.0)}):
        assert round_plan(plan, s, 4, "up").layers["a"].pruned == [0, 1, 2, 3]


def test_bad_input_is_one_line_error() -> None:
    plan = _plan({"a": (8, [0])})
    with pytest.raises(PlanError, match="positive integer"):
        round_plan(plan, {"a": np.ones(8)}, 0)
    with pytest.raises(PlanError, match="rounding mode"):
        round_plan(plan, {"a": np.ones(8)}, 4, "sideways")
    with pytest.raises(PlanError, match="no Utilization"):
        round_plan(plan, {"b": np.ones(8)}, 4)
    with pytest.raises(PlanError, match="8 units"):
        round_plan(plan, {"a": np.ones(5)}, 4)
    g = ChannelGroup("g", ["a", "b"], 8)
    mixed = _plan({"a": (8, [0]), "b": (8, [1])}, [g])
    with pytest.raises(PlanError, match="different channels"):
        round_plan(mixed, {"a": np.ones(8), "b": np.ones(8)}, 4)


class _UnitShare:
    """Share of units kept: a stand-in cost model with a figure easy to check by hand."""

    def remaining(self, p: Plan) -> dict[str, float]:
        kept = sum(lp.kept for lp in p.layers.values()) / sum(
            lp.n_units for lp in p.layers.values()
        )
        return {"params": kept, "flops": kept}


def test_budget_records_the_share_removed_after_rounding() -> None:
    plan = _plan({"a": (10, [0, 1, 2]), "b": (10, [0, 1, 2, 3])})  # 7 of 20 removed
    plan.method["budget"] = {"metric": "flops", "target": 0.3, "achieved": 0.35}
    u = {"a": np.arange(10.0), "b": np.arange(10.0)}
    out = round_plan(plan, u, 4, "up", cost=_UnitShare())  # kept 8 and 8: 4 of 20 removed
    assert out.method["budget"] == {
        "metric": "flops",
        "target": 0.3,
        "achieved": pytest.approx(0.2),
        "achieved_before_rounding": 0.35,
    }
    assert plan.method["budget"]["achieved"] == 0.35  # the input plan is left as it was
    # rounding again keeps the first figure from before rounding
    again = round_plan(out, u, 8, "down", cost=_UnitShare())
    assert again.method["budget"]["achieved_before_rounding"] == 0.35
    assert again.method["budget"]["achieved"] == pytest.approx(0.2)
    # without a cost model, or without a budget, nothing is claimed about the budget
    assert round_plan(plan, u, 4, "up").method["budget"] == plan.method["budget"]
    assert "budget" not in round_plan(_plan({"a": (10, [0])}), u, 4, cost=_UnitShare()).method


def test_budget_metric_the_cost_model_lacks_is_an_error() -> None:
    plan = _plan({"a": (10, [0, 1, 2])})
    plan.method["budget"] = {"metric": "latency", "target": 0.3, "achieved": 0.3}
    with pytest.raises(PlanError, match="budget counts 'latency'"):
        round_plan(plan, {"a": np.arange(10.0)}, 4, cost=_UnitShare())


def test_deploy_plan_for_a_target_records_flops_after_rounding() -> None:
    import torch

    from devices.profile import load_profile
    from exporters.costs import OnnxCostModel
    from exporters.onnx_export import export_onnx
    from fair_edge.config import Options
    from fair_edge.plan_stage import make_plan
    from pipeline.models import ResNet
    from pipeline.scoring import score

    torch.manual_seed(0)
    model = ResNet(blocks=(1, 1), widths=(8, 16), num_classes=4).eval()
    g = torch.Generator().manual_seed(0)
    y = torch.arange(24) % 4
    x = torch.randn(24, 3, 8, 8, generator=g) + 0.3 * y.float().view(-1, 1, 1, 1)
    scores = score(model, (x, y), samples_per_class=6, projections=8, progress=False)
    proto = export_onnx(model, x[:1], None)
    profile = load_profile("rpi5")  # channel multiple 8
    result = make_plan(scores, proto, model, Options(target=0.3, metric="flops"), profile)
    budget = result.method["budget"]
    assert result.method["rounding"]["layers_changed"] > 0
    assert budget["achieved"] == pytest.approx(1 - OnnxCostModel(proto).remaining(result)["flops"])
    assert budget["achieved_before_rounding"] >= 0.3
    assert budget["achieved"] != pytest.approx(budget["achieved_before_rounding"])
