"""Baseline pruning criteria to measure FAIR against: L1 norm and random, uniform or with given counts.

Each criterion gives a per-unit importance for each layer (low = remove first); a `Plan` then
removes a given number of the least important units per layer (`plan_from_importance`). The count
can come from a uniform ratio (`uniform_counts`, `uniform_plan_for_budget`), or from another plan
(`plan_counts`), e.g. FAIR's ToD counts applied to L1 (the paper's "ToD ratios help other
criteria" claim). Coupled channel groups are scored by the sum over their members and the same
channels are removed from every member, as in FAIR's planning.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from torch import nn

from pipeline.cost import CostModel
from pipeline.groups import ChannelGroup
from pipeline.plan import LayerPlan, ModelFingerprint, Plan, PlanError
from pipeline.planning import segment_pick, smallest_reaching


def _weight(model: nn.Module, name: str) -> np.ndarray:
    try:
        mod = model.get_submodule(name)
    except AttributeError as exc:
        raise PlanError(f"the model has no layer {name!r}") from exc
    w = getattr(mod, "weight", None)
    if w is None:
        raise PlanError(f"layer {name!r} has no weight to rank units by")
    return w.detach().float().cpu().numpy()


def l1_importance(model: nn.Module, layers: Iterable[str]) -> dict[str, np.ndarray]:
    """Per output unit, the L1 norm of the weights that produce it (Li et al., 2017)."""
    out = {}
    for name in layers:
        w = _weight(model, name)
        out[name] = np.abs(w.reshape(w.shape[0], -1)).sum(axis=1)
    return out


def random_importance(
    model: nn.Module, layers: Iterable[str], seed: int = 0
) -> dict[str, np.ndarray]:
    """A seeded random ranking per layer (uniform random pruning)."""
    rng = np.random.default_rng(seed)
    return {name: rng.random(_weight(model, name).shape[0]) for name in layers}


def plan_counts(plan: Plan) -> dict[str, int]:
    """How many units each layer of a plan removes."""
    return {name: len(lp.pruned) for name, lp in plan.layers.items()}


def uniform_counts(importance: Mapping[str, np.ndarray], ratio: float) -> dict[str, int]:
    """round(ratio * n) per layer, keeping at least one unit."""
    if not 0.0 <= ratio < 1.0:
        raise PlanError(f"ratio={ratio} is outside [0, 1)")
    return {name: min(int(round(ratio * len(v))), len(v) - 1) for name, v in importance.items()}


def _targets(
    importance: Mapping[str, np.ndarray], groups: list[ChannelGroup] | None
) -> list[tuple[str | None, list[str], dict[str, np.ndarray], np.ndarray]]:
    """(group name, members, member index maps, summed importance) per unit of planning.

    Members of frozen groups, and of groups with a member that has no importance, are held.
    """
    out = []
    seen: set[str] = set()
    for g in groups or []:
        members = list(g.members)
        seen.update(members)
        if g.frozen or any(m not in importance for m in members):
            continue
        maps = {
            m: np.asarray(g.extra.get("index_maps", {}).get(m, np.arange(g.n_channels)))
            for m in members
        }
        total = np.zeros(g.n_channels)
        for m in members:
            if len(importance[m]) != len(maps[m]):
                raise PlanError(
                    f"group {g.name!r} has {len(maps[m])} channels but layer {m!r} has "
                    f"{len(importance[m])} units; the groups belong to another model"
                )
            total += np.asarray(importance[m], dtype=np.float64)[maps[m]]
        out.append((g.name, members, maps, total))
    for name, imp in importance.items():
        if name not in seen:
            out.append((None, [name], {name: np.arange(len(imp))}, np.asarray(imp, np.float64)))
    return out


def plan_from_importance(
    importance: Mapping[str, np.ndarray],
    counts: Mapping[str, int],
    fingerprint: ModelFingerprint,
    groups: list[ChannelGroup] | None = None,
    method: dict[str, Any] | None = None,
) -> Plan:
    """Remove the `counts[layer]` least important units of each layer (group: of its first member).

    Ties break by unit index (stable sort). A layer keeps at least one unit.
    """
    layers: dict[str, LayerPlan] = {}
    by_name = {g.name: g for g in groups or []}
    for gname, members, maps, imp in _targets(importance, groups):
        n = len(imp)
        k = max(int(counts.get(m, 0)) for m in members)
        k = min(max(k, 0), n - 1)
        order = np.argsort(imp, kind="stable")
        segs = by_name[gname].extra.get("conv_groups") if gname in by_name else None
        if segs:  # a grouped convolution: as many from every conv group
            chans = np.asarray(segment_pick(order, [np.asarray(x) for x in segs], k), np.int64)
        else:
            chans = order[:k]
        for m in members:
            mp = maps[m]
            layers[m] = LayerPlan(
                name=m, n_units=len(mp), pruned=sorted(int(mp[c]) for c in chans), group=gname
            )
    for name, imp in importance.items():
        layers.setdefault(name, LayerPlan(name=name, n_units=len(imp), pruned=[]))
    ordered = {n: layers[n] for n in importance}
    for lp in ordered.values():
        lp.validate()
    return Plan(
        fingerprint=fingerprint,
        layers=ordered,
        method=dict(method or {}),
        groups=list(groups or []),
    )


def uniform_plan_for_budget(
    importance: Mapping[str, np.ndarray],
    target: float,
    cost: CostModel,
    fingerprint: ModelFingerprint,
    groups: list[ChannelGroup] | None = None,
    metric: str = "flops",
    method: dict[str, Any] | None = None,
    tol: float = 1e-4,
) -> Plan:
    """The uniform-ratio plan with the smallest ratio that removes at least `target` of `metric`."""
    if not 0.0 < target < 1.0:
        raise PlanError(f"target={target} is outside (0, 1)")

    def build(r: float) -> tuple[Plan, float]:
        p = plan_from_importance(
            importance,
            uniform_counts(importance, r),
            fingerprint,
            groups,
            {**(method or {}), "ratio": r},
        )
        return p, 1.0 - float(cost.remaining(p)[metric])

    removed = build(0.99)[1]
    if removed < target:
        raise PlanError(
            f"uniform pruning removes at most {removed:.1%} of {metric} here (asked {target:.1%})"
        )
    best, got = build(smallest_reaching(0.0, 0.99, lambda r: build(r)[1] >= target, tol))
    best.method["budget"] = {"metric": metric, "target": target, "achieved": got}
    return best
