"""From FAIR scores to a pruning plan: per-layer ToD counts at a level alpha, or at a budget.

A ToD 'unit of planning' is one layer, or one non-frozen channel group (U and R summed over the
members per channel; the same channel indices are removed from every member). Members of a
frozen group, and groups with a member that was not scored (the output layer, a shared layer),
are not pruned. Re-planning never re-scores: every per-layer ToD curve is computed once.

For a global budget (`plan_for_budget`) the per-layer counts come from one of three allocations
(`allocation`, recorded in the plan's `method["allocation"]` when not the default):
`tod` (the method: one alpha for every layer, each layer's ToD count), `tod-capped:M` (ToD with
no layer losing more than min(0.9, M x the uniform ratio that meets the budget), alpha re-solved)
and `blend:W` (each layer's share W x its ToD share + (1 - W) x the uniform ratio, scaled by one
factor to meet the budget). The units removed within a layer are always the lowest-U ones.
How coupled members' scores are combined (`aggregate`): `sum` (the default), `max`, or `normsum`
(each member divided by its own mean first, so no member dominates by scale). ToD reads only the
orders of U and R, so a plain mean would plan exactly as the sum does.
"""

from __future__ import annotations

import dataclasses
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
ALLOCATIONS = ("tod", "tod-capped", "blend")
AGGREGATES = ("sum", "max", "normsum")
MAX_CAP = 0.9  # tod-capped: no layer loses more than this share, whatever the multiple


@dataclass(frozen=True)
class Allocation:
    """How a global budget is spread over layers: ToD's counts, capped, or blended with uniform.

    `param` is the cap multiple M (tod-capped) or the ToD weight W (blend); unused for tod.
    """

    name: str = "tod"
    param: float | None = None

    @classmethod
    def parse(cls, value: str | Allocation | None) -> Allocation:
        """From 'tod', 'tod-capped[:M]' (M defaults to 1.5) or 'blend[:W]' (W defaults to 0.5)."""
        if isinstance(value, Allocation):
            return value
        text = "tod" if value is None else str(value).strip()
        name, _, arg = text.partition(":")
        if name not in ALLOCATIONS:
            raise PlanError(
                f"allocation={value!r} is not one of {', '.join(ALLOCATIONS)}; "
                "use e.g. 'tod', 'tod-capped:1.5' or 'blend:0.5'"
            )
        if name == "tod":
            if arg:
                raise PlanError(f"allocation={value!r}: 'tod' takes no parameter; use 'tod'")
            return cls()
        default = 1.5 if name == "tod-capped" else 0.5
        try:
            x = float(arg) if arg else default
        except ValueError as exc:
            raise PlanError(f"allocation={value!r}: the parameter is not a number") from exc
        ok = x >= 1.0 if name == "tod-capped" else 0.0 <= x <= 1.0
        if not ok or math.isnan(x):
            want = "a cap multiple >= 1, e.g. 1.5" if name == "tod-capped" else "W in [0, 1]"
            raise PlanError(f"allocation={value!r}: give {want}")
        return cls(name, x)

    def to_json(self) -> dict[str, Any]:
        key = "cap_multiple" if self.name == "tod-capped" else "tod_weight"
        return {"name": self.name} if self.param is None else {"name": self.name, key: self.param}


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

    @property
    def n(self) -> int:
        return int(self.curve.shape[0])

    def pruned(self, alpha: float, scale: float = 1.0) -> list[int]:
        """The ToD count's lowest-U units (see `take`)."""
        return self.take(self.count(alpha, scale))

    def take(self, k: int) -> list[int]:
        """The k lowest-U units (k capped); with conv groups, round(k / groups) lowest-U of each
        group (rounded down where a cap would otherwise be passed)."""
        k = k if self.max_k is None else min(k, self.max_k)
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


def aggregate_members(values: list[np.ndarray], how: str = "sum") -> np.ndarray:
    """One score per channel from the coupled members' scores (see the module docstring)."""
    v = np.asarray(values, dtype=np.float64)
    if how == "sum":
        return v.sum(axis=0)
    if how == "max":
        return v.max(axis=0)
    if how == "normsum":
        scale = np.abs(v).mean(axis=1, keepdims=True)
        return (v / np.where(scale > 0, scale, 1.0)).sum(axis=0)
    raise PlanError(f"aggregate={how!r} is not one of {', '.join(AGGREGATES)}")


def _targets(
    scores: Scores,
    groups: list[ChannelGroup] | None,
    controls: PlanControls | None = None,
    aggregate: str = "sum",
) -> tuple[list[_Target], dict[str, str]]:
    """ToD problems (with their caps), plus {layer: why not pruned} for layers kept whole."""
    if aggregate not in AGGREGATES:
        raise PlanError(f"aggregate={aggregate!r} is not one of {', '.join(AGGREGATES)}")
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
        u = aggregate_members([scores.layers[m].U for m in g.members], aggregate)
        r = aggregate_members([scores.layers[m].R for m in g.members], aggregate)
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
    counts: dict[str, int] | None = None,
) -> Plan:
    """The plan of ToD counts at (alpha, scale), or of the given {target name: count}."""
    layers: dict[str, LayerPlan] = {}
    for t in targets:
        pruned = t.pruned(alpha, scale) if counts is None else t.take(counts[t.name])
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
    aggregate: str = "sum",
) -> Plan:
    """The FAIR plan at level alpha: per layer (or group) remove D_k, k from the ToD rule
    (capped, or not at all for ignored layers, by `controls`)."""
    a = _check_alpha(alpha)
    _check_model(scores, model)
    targets, held = _targets(scores, groups, controls, aggregate)
    extra = {} if aggregate == "sum" else {"aggregate": aggregate}
    return _build(scores, targets, held, a, groups, extra, controls=controls)


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
    allocation: str | Allocation = "tod",
    aggregate: str = "sum",
) -> Plan:
    """The plan with the smallest alpha that removes at least `target` of the metric.

    `target` is the share to remove (0.3 = remove 30% of FLOPs). Counts only grow with alpha, so
    bisection over the finite set of ToD breakpoints finds it without re-scoring. One round
    removes at most n / (2 - alpha) units of a layer; alphas above `max_alpha` are not searched
    (there more than half of the removed units would be ones the loss needs). When even the
    largest alpha falls short, raise PlanError (strict) or return that largest plan
    (strict=False); the method records the share reached either way. `allocation` and
    `aggregate` choose how counts are spread over layers and how group members combine (module
    docstring); the default is the method's ToD with summed members.
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
    alloc = Allocation.parse(allocation)
    _check_model(scores, model)
    cost = cost if cost is not None else ScoresCostModel(scores)
    targets, held = _targets(scores, groups, controls, aggregate)
    top_alpha = _check_alpha(max_alpha)
    extra: dict[str, Any] = {} if aggregate == "sum" else {"aggregate": aggregate}
    if alloc.name == "tod":
        return _tod_for_budget(scores, targets, held, groups, cost, metric, t, strict, top_alpha,
                               controls, extra)  # fmt: skip
    solve = _Solver(scores, targets, held, groups, cost, metric, controls, extra)
    ratio = solve.uniform_ratio(t)
    if alloc.name == "tod-capped":
        cap = min(MAX_CAP, float(alloc.param or 1.5) * ratio)
        capped = [dataclasses.replace(x, max_k=_min_cap(x, cap)) for x in targets]
        extra["allocation"] = {**alloc.to_json(), "uniform_ratio": ratio, "cap": cap}
        return _tod_for_budget(scores, capped, held, groups, cost, metric, t, strict, top_alpha,
                               controls, extra)  # fmt: skip
    tod = _tod_for_budget(scores, targets, held, groups, cost, metric, t, False, top_alpha,
                          controls, dict(extra))  # fmt: skip
    w = float(alloc.param if alloc.param is not None else 0.5)
    share = {x.name: w * len(tod.layers[x.members[0]].pruned) / x.n + (1 - w) * ratio
             for x in targets}  # fmt: skip
    scale, best, got = solve.scaled(share, t)
    best.method["alpha"] = tod.method["alpha"]
    best.method["budget"] = {"metric": metric, "target": t, "achieved": got}
    best.method["allocation"] = {**alloc.to_json(), "uniform_ratio": ratio, "scale": scale,
                                 "tod_achieved": tod.method["budget"]["achieved"]}  # fmt: skip
    if got < t and strict:
        raise PlanError(
            f"the blended allocation removes at most {got:.1%} of {metric} here (asked {t:.1%}); "
            "lower the target"
        )
    return best


def _min_cap(t: _Target, share: float) -> int:
    """The stricter of the target's cap and floor(share * n)."""
    k = int(math.floor(share * t.n + 1e-9))
    return k if t.max_k is None else min(k, t.max_k)


@dataclass
class _Solver:
    """Plans from explicit per-target counts: the uniform ratio, and a common scale of shares."""

    scores: Scores
    targets: list[_Target]
    held: dict[str, str]
    groups: list[ChannelGroup] | None
    cost: CostModel
    metric: str
    controls: PlanControls | None
    extra: dict[str, Any]

    def removed(self, counts: dict[str, int]) -> tuple[Plan, float]:
        p = _build(self.scores, self.targets, self.held, 0.0, self.groups, dict(self.extra),
                   controls=self.controls, counts=counts)  # fmt: skip
        return p, 1.0 - float(self.cost.remaining(p)[self.metric])

    def uniform_ratio(self, target: float, tol: float = 1e-4) -> float:
        """The smallest ratio r whose counts min(round(r n), n - 1) (lowest U, as the uniform
        baselines count) remove `target`; 0.99 when even that falls short."""

        def counts(r: float) -> dict[str, int]:
            return {x.name: min(int(round(r * x.n)), max(x.n - 1, 0)) for x in self.targets}

        if self.removed(counts(0.99))[1] < target:
            return 0.99
        return smallest_reaching(0.0, 0.99, lambda r: self.removed(counts(r))[1] >= target, tol)

    def scaled(self, share: dict[str, float], target: float) -> tuple[float, Plan, float]:
        """(scale, plan, share removed) for the smallest common scale s whose counts
        min(round(s * share * n), ToD's floor(0.99 n)) remove `target` (the largest when none do)."""

        def counts(s: float) -> dict[str, int]:
            return {x.name: min(int(round(s * share[x.name] * x.n)), max_count(x.n))
                    for x in self.targets}  # fmt: skip

        positive = [v for v in share.values() if v > 0]
        if not positive:
            raise PlanError("the blended allocation prunes no layer; raise the target")
        top = 1.0 / min(positive)  # every count at its ceiling
        lo, hi = 0.0, 1.0
        while hi < top and self.removed(counts(hi))[1] < target:
            lo, hi = hi, min(2 * hi, top)
        plan_hi, got = self.removed(counts(hi))
        if got < target:
            return hi, plan_hi, got
        reaches = lambda s: self.removed(counts(s))[1] >= target  # noqa: E731
        hi = smallest_reaching(lo, hi, reaches, 1e-4, relative=True)
        plan_hi, got = self.removed(counts(hi))
        return hi, plan_hi, got


def _tod_for_budget(
    scores: Scores,
    targets: list[_Target],
    held: dict[str, str],
    groups: list[ChannelGroup] | None,
    cost: CostModel,
    metric: str,
    t: float,
    strict: bool,
    top_alpha: float,
    controls: PlanControls | None,
    extra: dict[str, Any],
) -> Plan:
    """ToD counts (within the targets' caps) at the smallest alpha meeting the budget."""
    alphas = alpha_breakpoints(targets)
    alphas = alphas[alphas <= top_alpha]
    if alphas.size == 0:
        raise PlanError("no layer can be pruned by the ToD rule (all layers are one unit or held)")

    def removed(a: float) -> tuple[Plan, float]:
        p = _build(scores, targets, held, float(a), groups, dict(extra), controls=controls)
        return p, 1.0 - float(cost.remaining(p)[metric])

    top_plan, top = removed(alphas[-1])
    if top < t:
        if strict:
            capped = " with the allocation's per-layer cap" if "allocation" in extra else ""
            raise PlanError(
                f"one FAIR round removes at most {top:.1%} of {metric} here at alpha <= "
                f"{top_alpha}{capped} (asked {t:.1%}); lower the target, or prune, re-score and "
                "plan again (another round)"
            )
        top_plan.method["budget"] = {"metric": metric, "target": t, "achieved": top}
        return top_plan
    floor = removed(alphas[0])[1]
    if floor > t:
        return _below_floor(scores, targets, held, float(alphas[0]), groups, cost, metric, t,
                            floor, controls=controls, extra=extra)  # fmt: skip
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


def smallest_reaching(
    lo: float, hi: float, reaches: Callable[[float], bool], tol: float, relative: bool = False
) -> float:
    """The smallest x in (lo, hi] with reaches(x), to within tol (x tol when relative), by
    bisection: reaches only turns true as x grows, and reaches(hi) is known to be true."""
    while hi - lo > (tol * hi if relative else tol):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if reaches(mid) else (mid, hi)
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
    extra: dict[str, Any] | None = None,
) -> Plan:
    """Light pruning: the target is below what the smallest ToD level removes.

    On small layers ToD's smallest non-empty level already removes a coarse share (1 of 8 units
    is 12.5%), so a 5% budget would be overshot several times. Here every layer keeps the ToD
    allocation of the smallest level, scaled down by one common factor (counts rounded down),
    still removing each layer's lowest-U units; the smallest factor meeting the target is found by
    bisection over the finite set of factors where a count changes.
    """

    def removed(s: float) -> tuple[Plan, float]:
        p = _build(scores, targets, held, alpha, groups, dict(extra or {}), scale=s,
                   controls=controls)  # fmt: skip
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
