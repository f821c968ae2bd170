"""Accuracy-budget plans (`--max-drop P`): the plan removing the most FLOPs whose top-1 after the
chosen fix stays within P points of the unpruned model on held-out data.

Re-planning is free (scores are computed once), so the search bisects the share of FLOPs to remove
and pays only for the fix at each point tried: BatchNorm re-estimation (seconds), or recovery
(cached by content, so the deploy that follows re-uses the winner's). Accuracy is measured on the
held-out share of the recovery data, never on the evaluation data the report quotes, so the
choice is not fitted to the figure shown. Every point tried is recorded and plotted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
from torch import nn

from calibration.errors import FairEdgeError
from devices.profile import DeviceProfile
from fair_edge.config import Options
from fair_edge.stage_cache import StageCache
from pipeline.plan import Plan
from pipeline.scores import Scores

LOWEST, HIGHEST = 0.0, 0.9


class AccuracyBudgetError(FairEdgeError):
    """No plan tried keeps the accuracy within the budget."""


@dataclass
class AccuracyPlan:
    plan: Plan
    max_drop: float
    fix: str
    heldout: str
    baseline: float
    points: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"max_drop": self.max_drop, "fix": self.fix, "heldout": self.heldout,
                "baseline": self.baseline, "points": self.points}  # fmt: skip


def plan_for_accuracy(
    scores: Scores,
    proto: onnx.ModelProto,
    model: nn.Module,
    opts: Options,
    profile: DeviceProfile,
    recovery: Any,
    cache: StageCache,
    *,
    progress: bool,
    fixed: Plan | None = None,
) -> AccuracyPlan:
    """Bisect the FLOPs share to remove; keep the largest whose fixed accuracy is within budget.

    With `fixed` (the plan for a --latency-ms target: the least pruning that meets the latency,
    so the most accurate under it), only that plan is checked against the budget.
    """
    from exporters.bn_recal import batchnorm_layers, recalibrate_bn
    from exporters.costs import OnnxCostModel
    from exporters.graph_groups import find_groups
    from exporters.torch_prune import prune_torch
    from fair_edge.inputs import INT8_CALIBRATION, calibration_subset, example_input
    from fair_edge.plan_stage import channel_multiple, plan_controls
    from fair_edge.recovery_stage import recovery_config, run_recovery
    from pipeline.planning import plan_for_budget
    from pipeline.rounding import round_plan
    from pipeline.train import evaluate

    data = recovery.data()
    if data.heldout is None:
        raise AccuracyBudgetError(
            "--max-drop needs held-out samples to measure accuracy on; give more --recover-data "
            "or a larger --recover-heldout"
        )
    heldout = data.heldout
    groups, cost = find_groups(proto), OnnxCostModel(proto)
    x1 = example_input(recovery.inp.calibration)
    recal_x = calibration_subset(recovery.inp.calibration, INT8_CALIBRATION, opts.seed)
    use_bn = bool(batchnorm_layers(model)) and opts.recalibrate_bn is not False
    fix = "recovery" if recovery.enabled else ("BatchNorm re-estimation" if use_bn else "none")
    baseline = evaluate(model, heldout)
    points: list[dict[str, Any]] = []
    best: tuple[float, Plan] | None = None

    def attempt(target: float, given: Plan | None = None) -> bool:
        nonlocal best
        if given is not None:
            p = given
        else:
            p = plan_for_budget(scores, target, "flops", cost, groups, model, strict=False,
                                controls=plan_controls(opts),
                                allocation=opts.allocation)  # fmt: skip
            multiple = channel_multiple(opts, profile)
            if opts.round and multiple > 1:
                p = round_plan(p, scores, multiple, mode="nearest", groups=groups)
        removed = 1.0 - float(cost.remaining(p)["flops"])
        seen = next((q for q in points if q["plan"] == p.digest()), None)
        if seen is not None:  # rounding snapped this target onto a plan already tried
            points.append({**seen, "target": target, "repeat": True})
            return bool(seen["ok"])
        student = prune_torch(model, p, x1, proto, verify=False)
        if use_bn:
            student = recalibrate_bn(student, recal_x)[0]
        if recovery.enabled:
            student = run_recovery(model, student, p, data, recovery_config(opts), cache,
                                   checkpoint=None, progress=progress).model  # fmt: skip
        acc = evaluate(student, heldout)
        drop = 100.0 * (baseline - acc)
        ok = drop <= opts.max_drop
        points.append({"target": target, "flops_removed": removed, "accuracy": acc,
                       "drop_points": drop, "ok": ok, "plan": p.digest()})  # fmt: skip
        if ok and (best is None or removed > best[0]):
            best = (removed, p)
        return ok

    def chosen(plan: Plan) -> AccuracyPlan:
        plan.method["accuracy_budget"] = {"max_drop": opts.max_drop, "fix": fix,
                                          "heldout": data.heldout_source, "points": points}  # fmt: skip
        return AccuracyPlan(plan, opts.max_drop, fix, data.heldout_source, baseline, points)

    if fixed is not None:
        removed = 1.0 - float(cost.remaining(fixed)["flops"])
        if not attempt(removed, fixed):
            raise AccuracyBudgetError(
                f"the plan for {opts.latency_ms} ms ({removed:.1%} fewer FLOPs) loses "
                f"{points[-1]['drop_points']:.2f} points after {fix}, more than --max-drop "
                f"{opts.max_drop}; allow more latency or a larger --max-drop"
            )
        return chosen(fixed)
    lo, hi = LOWEST, HIGHEST
    target = 0.5
    for _ in range(opts.max_drop_tries):
        if attempt(target):
            lo = target
        else:
            hi = target
        target = round((lo + hi) / 2, 4)
    if best is None:
        worst = min(points, key=lambda q: q["target"])
        raise AccuracyBudgetError(
            f"no plan tried keeps top-1 within {opts.max_drop} points of the unpruned model "
            f"({worst['flops_removed']:.1%} fewer FLOPs lost {worst['drop_points']:.2f}); raise "
            "--max-drop, turn on --recover, or give more --max-drop-tries"
        )
    return chosen(best[1])


def plot_tradeoff(tradeoff: dict[str, Any], path: Path) -> Path:
    """Accuracy against FLOPs removed for every plan tried, with the budget line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted(tradeoff["points"], key=lambda p: p["flops_removed"])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p["flops_removed"] for p in pts], [p["accuracy"] for p in pts], "o-",
            label=f"after {tradeoff['fix']}")  # fmt: skip
    ax.axhline(tradeoff["baseline"] - tradeoff["max_drop"] / 100.0, color="red", ls="--",
               label=f"budget: -{tradeoff['max_drop']} points")  # fmt: skip
    ax.axhline(tradeoff["baseline"], color="gray", ls=":", label="unpruned")
    ax.set_xlabel("share of FLOPs removed")
    ax.set_ylabel("top-1 (held-out)")
    ax.set_title("Accuracy against FLOPs, every plan tried")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
