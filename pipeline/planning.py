"""From FAIR scores to a pruning plan: per-layer ToD counts at a level alpha, or at a budget.

A ToD 'unit of planning' is one layer, or one non-frozen channel group (U and R summed over the
members per channel; the same channel indices are removed from every member). Members of a
frozen group, and groups with a member that was not scored (the output layer, a shared layer),
are not pruned. Re-planning never re-scores: every per-layer ToD curve is computed once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from pipeline.controls import PlanControls
from pipeline.cost import CostModel, ScoresCostModel
from pipeline.groups import ChannelGroup
from pipeline.plan import LayerPlan, ModelFingerprint, Plan, PlanError
from pipeline.scores import Scores
from pipeline.tod import count_from_curve, low_u_order, max_count, tod_curve

METRICS = ("flops", "params")


@dataclass
class _Target:
    """One ToD problem: a layer or a channel group."""

    name: str
    members: list[str]
    group: str | None
    order: np.ndarray  # low-U order
    curve: np.ndarray  # ToD(k), k = 1..n
    max_k: int | None = None  # a cap from PlanControls
    segments: list[np.ndarray] | None = None  # conv groups of a grouped convolution

    def count(self, alpha: float, scale: float = 1.0) -> int:
        """The ToD count at alpha, times `scale` (rounded down) for budgets below ToD's floor."""
        if self.curve.shape[0] <= 1:
            return 0
        k = count_from_curve(self.curve, alpha)
        k = k if self.max_k is None else min(k, self.max_k)
        return k if scale >= 1.0 else math.floor(scale * k + 1e-9)

    def pruned(self, alpha: float, scale: float = 1.0) -> list[int]:
        """The k lowest-U units; with conv groups, round(k / groups) lowest-U of each group
        (rounded down where a cap would otherwise be passed)."""
        k = self.count(alpha, scale)
        if self.segments is None:
            return sorted(int(i) for i in self.order[:k])
        out = segment_pick(self.order, self.segments, k)
        if self.max_k is not None and len(out) > self.max_k:
            g = len(self.segments)
            out = segment_pick(self.order, self.segments, g * (self.max_k // g))
        return out


def segment_pick(order: np.ndarray, segments: list[np.ndarray], k: int) -> list[int]:
    """About k units in all, the same number from every segment, each the segment's first in
    `order` (a grouped convolution keeps its group count only when every group loses as many)."""
    per = min(int(round(k / len(segments))), min(len(s) for s in segments) - 1)
    if per <= 0:
        return []
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    out: list[int] = []
    for seg in segments:
        seg = np.asarray(seg, dtype=np.int64)
        out += seg[np.argsort(rank[seg], kind="stable")[:per]].tolist()
    return sorted(out)


def _check_alpha(alpha: Any) -> float:
    try:
        a = float(alpha)
    except (TypeError, ValueError) as exc:
        raise PlanError(
            f"alpha={alpha!r} is not a number; use a level in (0, 1), e.g. 0.05"
        ) from exc
    if not (0.0 < a < 1.0) or math.isnan(a):
        raise PlanError(f"alpha={alpha!r} is outside (0, 1); the reference uses 0.005 to 0.05")
    return a


def _check_model(scores: Scores, model: nn.Module | None) -> None:
    if model is None:
        return
    problem = scores.fingerprint.diff(ModelFingerprint.from_model(model))
    if problem:
        raise PlanError(f"the scores are for another model: {problem}; re-score this model")


def _targets(
    scores: Scores, groups: list[ChannelGroup] | None, controls: PlanControls | None = None
) -> tuple[list[_Target], dict[str, str]]:
    """ToD problems (with their caps), plus {layer: why not pruned} for layers kept whole."""
    controls = controls or PlanControls()
    units = {n: ls.n_units for n, ls in scores.layers.items()}
    held, caps = controls.resolve(units, [*scores.graph, *scores.output_layers])
    grouped: dict[str, ChannelGroup] = {}
    live: list[ChannelGroup] = []
    for g in groups or []:
        for m in g.members:
            if m not in scores.layers and m not in scores.graph:
                raise PlanError(
                    f"group {g.name!r} names layer {m!r}, which the scored model does not have; "
                    "find the groups on this model's export"
                )
        unscored = [m for m in g.members if m not in scores.layers]
        if g.frozen or unscored:
            why = (
                f"frozen group {g.name!r}: {g.reason}"
                if g.frozen
                else (f"group {g.name!r} contains unprunable layer {unscored[0]!r}")
            )
            for m in g.members:
                held.setdefault(m, why)
            continue
        for m in g.members:
            n = scores.layers[m].n_units
            if n != g.n_channels:
                raise PlanError(
                    f"group {g.name!r} has {g.n_channels} channels but layer {m!r} has {n} units; "
                    "the groups belong to another model"
                )
        live.append(g)
    changed = True
    while changed:  # a group touching a held layer is held whole, transitively
        changed = False
        for g in live:
            if any(m in held for m in g.members) and not all(m in held for m in g.members):
                for m in g.members:
                    held.setdefault(m, f"group {g.name!r} shares a layer with a held group")
                changed = True
    targets: list[_Target] = []
    for g in live:
        if any(m in held for m in g.members):
            continue
        for m in g.members:
            if m in grouped:
                raise PlanError(
                    f"layer {m!r} is in two channel groups ({grouped[m].name!r}, {g.name!r})"
                )
            grouped[m] = g
        u = np.sum([scores.layers[m].U for m in g.members], axis=0)
        r = np.sum([scores.layers[m].R for m in g.members], axis=0)
        cap = min((caps[m] for m in g.members if m in caps), default=None)
        segs = g.extra.get("conv_groups")
        targets.append(
            _Target(
                g.name,
                list(g.members),
                g.name,
                low_u_order(u),
                tod_curve(u, r),
                max_k=cap,
                segments=[np.asarray(x, dtype=np.int64) for x in segs] if segs else None,
            )
        )
    for name, ls in scores.layers.items():
        if name in held or name in grouped:
            continue
        targets.append(
            _Target(
                name, [name], None, low_u_order(ls.U), tod_curve(ls.U, ls.R), max_k=caps.get(name)
            )
        )
    return targets, held


def _build(
    scores: Scores,
    targets: list[_Target],
    held: dict[str, str],
    alpha: float,
    groups: list[ChannelGroup] | None,
    extra: dict[str, Any] | None = None,
    scale: float = 1.0,
    controls: PlanControls | None = None,
) -> Plan:
    layers: dict[str, LayerPlan] = {}
    for t in targets:
        pruned = t.pruned(alpha, scale)
        for m in t.members:
            layers[m] = LayerPlan(
                name=m, n_units=scores.layers[m].n_units, pruned=list(pruned), group=t.group
            )
    for m, _ in held.items():
        if m in scores.layers:
            group = next((g.name for g in groups or [] if m in g.members), None)
            layers[m] = LayerPlan(name=m, n_units=scores.layers[m].n_units, pruned=[], group=group)
    ordered = {n: layers[n] for n in scores.layers if n in layers}
    for lp in ordered.values():
        lp.validate()
    method: dict[str, Any] = {
        "name": "fair-tod",
        "alpha": alpha,
        "where": scores.where,
        "seed": scores.seed,
        "projections": scores.projections,
        "samples_per_class": scores.samples_per_class,
        "classes": len(scores.classes),
        "mode": scores.mode,
        "held": {m: why for m, why in held.items() if m in scores.layers},
    }
    if controls is not None and not controls.empty:
        method["controls"] = {
            **controls.to_json(),
            "ignored": sorted(m for m, why in held.items() if why.startswith("ignored")),
            "max_pruned": {m: t.max_k for t in targets if t.max_k is not None for m in t.members},
        }
    method.update(extra or {})
    return Plan(
        fingerprint=scores.fingerprint, layers=ordered, method=method, groups=list(groups or [])
    )


def plan(
    scores: Scores,
    alpha: float,
    groups: list[ChannelGroup] | None = None,
    model: nn.Module | None = None,
    controls: PlanControls | None = None,
) -> Plan:
    """The FAIR plan at level alpha: per layer (or group) remove D_k, k from the ToD rule
    (capped, or not at all for ignored layers, by `controls`)."""
    a = _check_alpha(alpha)
    _check_model(scores, model)
    targets, held = _targets(scores, groups, controls)
    return _build(scores, targets, held, a, groups, controls=controls)


def alpha_breakpoints(targets: list[_Target]) -> np.ndarray:
    """Every alpha at which some count changes: the ToD values < 1 reachable by the rule.

    A ToD value of 0 is represented by half the smallest positive one (alpha must be > 0).
    """
    vals = [t.curve[: max_count(t.curve.shape[0])] for t in targets]
    allv = np.unique(np.concatenate(vals)) if vals else np.zeros(0)
    allv = allv[allv < 1.0]
    pos = allv[allv > 0]
    zero = (pos[0] / 2 if pos.size else 0.5) if (allv.size and allv[0] == 0) else None
    return np.concatenate([[zero], pos]) if zero is not None else pos


def plan_for_budget(
    scores: Scores,
    target: float,
    metric: str = "flops",
    cost: CostModel | None = None,
    groups: list[ChannelGroup] | None = None,
    model: nn.Module | None = None,
    strict: bool = True,
    max_alpha: float = 0.5,
    controls: PlanControls | None = None,
) -> Plan:
    """The plan with the smallest alpha that removes at least `target` of the metric.

    `target` is the share to remove (0.3 = remove 30% of FLOPs). Counts only grow with alpha, so
    bisection over the finite set of ToD breakpoints finds it without re-scoring. One round
    removes at most n / (2 - alpha) units of a layer; alphas above `max_alpha` are not searched
    (there more than half of the removed units would be ones the loss needs). When even the
    largest alpha falls short, raise PlanError (strict) or return that largest plan
    (strict=False); the method records the share reached either way.
    """
    try:
        t = float(target)
    except (TypeError, ValueError) as exc:
        raise PlanError(
            f"target={target!r} is not a number; give the share to remove, e.g. 0.3"
        ) from exc
    if not (0.0 < t < 1.0):
        raise PlanError(f"target={target!r} is outside (0, 1); give the share to remove, e.g. 0.3")
    if metric not in METRICS:
        raise PlanError(f"metric={metric!r} is not one of {', '.join(METRICS)}")
    _check_model(scores, model)
    cost = cost if cost is not None else ScoresCostModel(scores)
    targets, held = _targets(scores, groups, controls)
    top_alpha = _check_alpha(max_alpha)
    alphas = alpha_breakpoints(targets)
    alphas = alphas[alphas <= top_alpha]
    if alphas.size == 0:
        raise PlanError("no layer can be pruned by the ToD rule (all layers are one unit or held)")

    def removed(a: float) -> tuple[Plan, float]:
        p = _build(scores, targets, held, float(a), groups, controls=controls)
        return p, 1.0 - float(cost.remaining(p)[metric])

    top_plan, top = removed(alphas[-1])
    if top < t:
        if strict:
            raise PlanError(
                f"one FAIR round removes at most {top:.1%} of {metric} here at alpha <= "
                f"{top_alpha} (asked {t:.1%}); lower the target, or prune, re-score and plan "
                "again (another round)"
            )
        top_plan.method["budget"] = {"metric": metric, "target": t, "achieved": top}
        return top_plan
    floor = removed(alphas[0])[1]
    if floor > t:
        return _below_floor(scores, targets, held, float(alphas[0]), groups, cost, metric, t,
                            floor, controls=controls)  # fmt: skip
    best, got = removed(alphas[_first_meeting(alphas, lambda a: removed(a)[1], t)])
    best.method["budget"] = {"metric": metric, "target": t, "achieved": got}
    return best


def _first_meeting(values: np.ndarray, share: Callable[[float], float], target: float) -> int:
    """Index of the first of the ascending `values` whose removed share reaches `target`, by
    bisection (the share only grows along `values`; the last one is known to reach it)."""
    lo, hi = 0, values.size - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if share(float(values[mid])) >= target:
            hi = mid
        else:
            lo = mid + 1
    return hi


def scale_breakpoints(targets: list[_Target], alpha: float) -> np.ndarray:
    """Every scale in (0, 1] at which some floor(scale * k) changes: j / k for each ToD count k."""
    ks = {t.count(alpha) for t in targets} - {0}
    vals = {j / k for k in ks for j in range(1, k + 1)}
    return np.array(sorted(vals), dtype=np.float64)


def _below_floor(
    scores: Scores,
    targets: list[_Target],
    held: dict[str, str],
    alpha: float,
    groups: list[ChannelGroup] | None,
    cost: CostModel,
    metric: str,
    target: float,
    floor: float,
    controls: PlanControls | None = None,
) -> Plan:
    """Light pruning: the target is below what the smallest ToD level removes.

    On small layers ToD's smallest non-empty level already removes a coarse share (1 of 8 units
    is 12.5%), so a 5% budget would be overshot several times. Here every layer keeps the ToD
    allocation of the smallest level, scaled down by one common factor (counts rounded down),
    still removing each layer's lowest-U units; the smallest factor meeting the target is found by
    bisection over the finite set of factors where a count changes.
    """

    def removed(s: float) -> tuple[Plan, float]:
        p = _build(scores, targets, held, alpha, groups, scale=s, controls=controls)
        return p, 1.0 - float(cost.remaining(p)[metric])

    scales = scale_breakpoints(targets, alpha)  # removed(scales[-1] = 1.0) = floor > target
    hi = _first_meeting(scales, lambda x: removed(x)[1], target)
    best, got = removed(scales[hi])
    best.method["budget"] = {"metric": metric, "target": target, "achieved": got}
    best.method["light"] = {
        "scale": float(scales[hi]),
        "floor": floor,
        "why": f"the smallest ToD level removes {floor:.1%} of {metric}; its per-layer "
        f"allocation is scaled by {scales[hi]:.3g} to meet {target:.1%}",
    }
    return best
