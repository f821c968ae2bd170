"""Round a plan's kept channel counts to a hardware multiple, moving units by the FAIR ranking.

Fast kernels (NEON/XNNPACK, ORT's NCHWc blocks, TensorRT, int8 tensor cores) work on channel
blocks; a layer left with 61 channels runs at the speed of 64 or worse. Rounding fixes the kept
count of every layer (or coupled group) to a multiple of the device's channel multiple:

- rounding the kept count UP un-prunes the pruned units with the highest Utilization U (the
  best of what FAIR removed comes back first);
- rounding it DOWN prunes the kept units with the lowest U (the next FAIR would have removed);
- a coupled group ranks its channels by the U summed over its members, as planning does, and
  every member gets the same pruned channels;
- the channels of a grouped convolution (ChannelGroup.extra["conv_groups"]) keep the same count
  in every conv group: that count is rounded to a multiple of m / gcd(groups, m), within each
  conv group by U.
- an attention group's units are heads of head_dim channels each (ChannelGroup.extra
  ["attention"]): its kept head count is rounded to a multiple of m / gcd(head_dim, m), so the
  kept channels are a multiple of m (any head count when head_dim is a multiple of m).

Allowed kept counts for a layer of n units and multiple m are the multiples of m in [m, n], plus
n itself (the layer untouched: its original shape, whatever n is). So a layer never empties, a
layer with n <= m is kept whole, and a layer whose n is not a multiple of m either keeps a
multiple of m or all n units (rounding up past the last multiple restores the full layer).
Frozen groups and layers with no pruned units and n kept are left as they are. A layer capped by
the plan's controls (`method['controls']['max_pruned']`, see pipeline.controls) is never rounded
below the kept count its cap allows: rounding goes up from there instead.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any, Literal, Protocol

import numpy as np

from pipeline.groups import ChannelGroup
from pipeline.plan import LayerPlan, Plan, PlanError

RoundMode = Literal["nearest", "up", "down"]
MODES: tuple[str, ...] = ("nearest", "up", "down")


class RemainingCost(Protocol):
    """What rounding needs of a cost model (exporters.costs.OnnxCostModel fits; pipeline does not
    import exporters, so it is taken by shape)."""

    def remaining(self, plan: Plan) -> Mapping[str, float]: ...


def allowed_counts(n: int, multiple: int) -> list[int]:
    """Kept counts a layer of `n` units may have under `multiple` (ascending)."""
    counts = list(range(multiple, n + 1, multiple))
    if not counts or counts[-1] != n:
        counts.append(n)
    return counts


def rounded_count(kept: int, n: int, multiple: int, mode: str = "nearest") -> int:
    """The kept count after rounding `kept` (of `n` units) to `multiple` in `mode`.

    'nearest' breaks ties upwards (the safer side for accuracy).
    """
    allowed = allowed_counts(n, multiple)
    if kept in allowed:
        return kept
    ups = [c for c in allowed if c > kept]
    downs = [c for c in allowed if c < kept]
    if mode == "up":
        return ups[0]
    if mode == "down":
        return downs[-1] if downs else ups[0]
    if not downs:
        return ups[0]
    return ups[0] if ups[0] - kept <= kept - downs[-1] else downs[-1]


def layer_utilization(scores: Any, name: str) -> np.ndarray:
    """Per-unit Utilization U of layer `name` from a Scores-like object.

    Accepts a mapping name -> U array, or an object whose `U`/`u`/`utilization` attribute is such
    a mapping, or whose `layers[name]` has a `U`/`u` attribute.
    """
    table = scores if isinstance(scores, Mapping) else None
    if table is None:
        for attr in ("U", "u", "utilization"):
            cand = getattr(scores, attr, None)
            if isinstance(cand, Mapping):
                table = cand
                break
    if table is not None and name in table:
        return np.asarray(table[name], dtype=np.float64).reshape(-1)
    layers = getattr(scores, "layers", None)
    if isinstance(layers, Mapping) and name in layers:
        entry = layers[name]
        for attr in ("U", "u", "utilization"):
            if getattr(entry, attr, None) is not None:
                return np.asarray(getattr(entry, attr), dtype=np.float64).reshape(-1)
    raise PlanError(
        f"the scores have no Utilization for layer {name!r}; score the model this plan was made for"
    )


def _moved(pruned: list[int], u: np.ndarray, target_kept: int) -> list[int]:
    """New pruned list with `target_kept` units kept, moving units by U (ties: lower index first)."""
    n = u.size
    pruned_set = set(pruned)
    target_pruned = n - target_kept
    if target_pruned == len(pruned):
        return sorted(pruned)
    # Stable ascending-U order: np.lexsort sorts by the last key first.
    order = [int(i) for i in np.lexsort((np.arange(n), u))]
    if target_pruned < len(pruned):
        # Un-prune the highest-U pruned units: keep pruned only the lowest-U ones.
        ranked = [i for i in order if i in pruned_set]
        return sorted(ranked[:target_pruned])
    ranked = [i for i in order if i not in pruned_set]
    return sorted(pruned_set | set(ranked[: target_pruned - len(pruned)]))


def _moved_by_segment(
    pruned: list[int], u: np.ndarray, segments: list[list[int]], multiple: int, mode: str
) -> list[int]:
    """Rounding for a grouped convolution's channels: every conv group keeps the same count, so
    the per-group kept count is rounded to a multiple of multiple / gcd(groups, multiple)."""
    g, size = len(segments), len(segments[0])
    step = multiple // math.gcd(g, multiple)
    pruned_set = set(pruned)
    kept_per = size - len(pruned_set.intersection(segments[0]))
    target = rounded_count(kept_per, size, step, mode)
    out: list[int] = []
    for seg in segments:
        local = [i for i, c in enumerate(seg) if c in pruned_set]
        moved = _moved(local, np.asarray(u)[np.asarray(seg)], target)
        out += [int(seg[i]) for i in moved]
    return sorted(out)


def _units(
    plan: Plan, groups: list[ChannelGroup] | None
) -> list[tuple[list[str], bool, list[list[int]] | None, int]]:
    """Rounding units: (member layer names, frozen, conv groups, channels per unit) for each
    group with members in the plan, then each remaining layer on its own."""
    units: list[tuple[list[str], bool, list[list[int]] | None, int]] = []
    grouped: set[str] = set()
    by_name = {g.name: g for g in (groups if groups is not None else plan.groups)}
    for g in by_name.values():
        members = [m for m in g.members if m in plan.layers]
        if members:
            per = int((g.extra.get("attention") or {}).get("head_dim", 1))
            units.append((members, g.frozen, g.extra.get("conv_groups"), per))
            grouped.update(members)
    # Layers that name a group the caller did not pass still move together.
    tagged: dict[str, list[str]] = {}
    for name, lp in plan.layers.items():
        if name not in grouped and lp.group is not None:
            tagged.setdefault(lp.group, []).append(name)
    for members in tagged.values():
        units.append((members, False, None, 1))
        grouped.update(members)
    units += [([name], False, None, 1) for name in plan.layers if name not in grouped]
    return units


def round_plan(
    plan: Plan,
    scores: Any,
    multiple: int,
    mode: str = "nearest",
    groups: list[ChannelGroup] | None = None,
    cost: RemainingCost | None = None,
) -> Plan:
    """A copy of `plan` whose every layer/group keeps a multiple of `multiple` units (see module doc).

    `scores` gives each layer's Utilization U (see `layer_utilization`); `groups` defaults to the
    plan's own groups. Every rounded layer records its pruned count before rounding in
    `unrounded_pruned` (the first rounding's, if the plan was rounded before; frozen groups are
    not rounded and record nothing); `method['rounding']` records the multiple and mode.
    Rounding moves the share a budget plan removes, so with a `cost` model a plan made for a
    budget gets `method['budget']['achieved']` re-measured after rounding, the figure from
    before kept as `achieved_before_rounding` (without `cost` the budget record is left alone).
    """
    if isinstance(multiple, bool) or not isinstance(multiple, int | np.integer) or multiple < 1:
        raise PlanError(f"channel multiple must be a positive integer, got {multiple!r}")
    if mode not in MODES:
        raise PlanError(f"rounding mode must be one of {', '.join(MODES)}, got {mode!r}")
    multiple = int(multiple)
    out = copy.deepcopy(plan)
    changed = 0
    controls = out.method.get("controls")
    max_pruned = dict(controls.get("max_pruned") or {}) if isinstance(controls, Mapping) else {}
    for members, frozen, segments, per in _units(out, groups):
        if frozen:  # held as they are (members may differ in width, e.g. a residual on a split)
            continue
        lps: list[LayerPlan] = [out.layers[m] for m in members]
        n = lps[0].n_units
        if any(lp.n_units != n for lp in lps):
            raise PlanError(
                f"layers {', '.join(members)} are one channel group but have different unit counts "
                f"({', '.join(str(lp.n_units) for lp in lps)}); re-create the groups for this model"
            )
        if any(sorted(lp.pruned) != sorted(lps[0].pruned) for lp in lps):
            raise PlanError(
                f"layers {', '.join(members)} are one channel group but prune different channels; "
                "re-plan with the groups"
            )
        u = sum(_checked_u(scores, m, n) for m in members)
        kept = lps[0].kept
        for lp in lps:
            if lp.unrounded_pruned is None:
                lp.unrounded_pruned = len(lp.pruned)
        if segments:
            new_pruned = _moved_by_segment(lps[0].pruned, u, segments, multiple, mode)
            if sorted(new_pruned) == sorted(lps[0].pruned):
                continue
        else:
            step = multiple // math.gcd(per, multiple)  # an attention head is `per` channels
            target = rounded_count(kept, n, step, mode)
            caps = [int(max_pruned[m]) for m in members if m in max_pruned]
            if caps and n - target > min(caps):
                target = rounded_count(n - min(caps), n, step, "up")
            if target == kept:
                continue
            new_pruned = _moved(lps[0].pruned, u, target)
        for lp in lps:
            lp.pruned = list(new_pruned)
            lp.validate()
        changed += len(lps)
    out.method = dict(out.method)
    out.method["rounding"] = {"multiple": multiple, "mode": mode, "layers_changed": changed}
    if cost is not None and isinstance(out.method.get("budget"), Mapping):
        out.method["budget"] = _rounded_budget(out, dict(out.method["budget"]), cost)
    return out


def _rounded_budget(plan: Plan, budget: dict[str, Any], cost: RemainingCost) -> dict[str, Any]:
    """The budget record with `achieved` measured on the rounded plan (the share it removes)."""
    metric = budget.get("metric")
    shares = cost.remaining(plan)
    if metric not in shares:
        raise PlanError(
            f"the plan's budget counts {metric!r} but the cost model gives only "
            f"{', '.join(sorted(shares))}; re-plan with one of those metrics"
        )
    budget.setdefault("achieved_before_rounding", budget.get("achieved"))
    budget["achieved"] = 1.0 - float(shares[metric])
    return budget


def _checked_u(scores: Any, name: str, n: int) -> np.ndarray:
    u = layer_utilization(scores, name)
    if u.size != n:
        raise PlanError(
            f"scores give {u.size} Utilization values for layer {name!r} but the plan has {n} units; "
            "score the model this plan was made for"
        )
    return u


def rounding_summary(plan: Plan) -> dict[str, dict[str, int]]:
    """Per rounded layer: units, kept before rounding and kept after."""
    return {
        name: {
            "n_units": lp.n_units,
            "kept_unrounded": lp.n_units - lp.unrounded_pruned,
            "kept": lp.kept,
        }
        for name, lp in plan.layers.items()
        if lp.unrounded_pruned is not None
    }
