"""Plan for a latency instead of a ratio: "p50 <= 20 ms on rpi5".

The ToD level alpha is searched with the device's latency model (devices.latency_model): per-layer
counts only grow with alpha, and rounding to the channel multiple keeps that order, so the
predicted latency falls with alpha and bisection finds the smallest alpha (the least pruning)
whose prediction meets the target. Where the device can be reached (the host; an SSH board with
reach settings) the candidate is then pruned for real (exporters.surgery.apply_plan) and measured;
when the measurement misses the target by more than the tolerance, the target given to the model
is corrected by the measured/predicted ratio and the search runs again (a few attempts). The
result records predicted and measured latency of every attempt.

Rounding mode 'auto' (the default) searches with nearest, up and down rounding and keeps the
least pruning that meets the prediction, which fills some of the gaps channel quantisation
leaves between plans. Latencies are the model's time without competition for the CPU (best
kernels from ORT's profiler on the host, best run on a board); the runner's wall-clock p50 of
the same runs is reported beside it (on a dedicated board the two are close).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from calibration.errors import FairEdgeError
from calibration.fileio import atomic_write_text
from devices.latency_model import (
    LatencyModel,
    build_latency_model,
    resolve_profile,
    statistic,
    summarize_profile,
)
from pipeline.groups import ChannelGroup
from pipeline.plan import Plan
from pipeline.rounding import round_plan

ALPHA_LO = 1e-6
ALPHA_HI = 0.999


class LatencyPlanError(FairEdgeError):
    """A latency target that cannot be planned for (unreachable, or bad input)."""


@dataclass
class LatencyPlanResult:
    """The chosen plan for a latency target, with predicted and (where measured) real latency."""

    target_ms: float
    profile: str
    stat: str
    alpha: float
    multiple: int | None
    predicted_ms: float
    unpruned_predicted_ms: float
    measured_ms: float | None
    measured_p50_ms: float | None
    measured_where: str | None
    within_tolerance: bool | None
    tolerance: float
    not_measured_reason: str
    attempts: list[dict[str, Any]]
    latency_model: dict[str, Any]
    plan: Plan
    measured_how: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def error_pct(self) -> float | None:
        """Measured vs target, in percent (positive: slower than the target)."""
        if self.measured_ms is None:
            return None
        return (self.measured_ms / self.target_ms - 1.0) * 100.0

    def to_json(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "plan"}
        data["plan"] = self.plan.to_json()
        data["schema"] = "fair-edge/latency-plan"
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LatencyPlanResult:
        if not isinstance(data, dict) or data.get("schema") != "fair-edge/latency-plan":
            raise LatencyPlanError("not a fair-edge latency-plan result (missing schema)")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in fields and k != "plan"}
        return cls(plan=Plan.from_json(data["plan"]), **kwargs)

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, json.dumps(self.to_json(), indent=1) + "\n")

    def summary(self) -> str:
        meas = (
            f"measured {self.measured_ms:.3f} ms ({self.error_pct:+.1f}% vs target, {self.measured_where})"
            if self.measured_ms is not None
            else f"not measured ({self.not_measured_reason})"
        )
        return (
            f"target {self.target_ms:.3f} ms on {self.profile}: alpha={self.alpha:.4g}, predicted "
            f"{self.predicted_ms:.3f} ms (unpruned {self.unpruned_predicted_ms:.3f}), {meas}"
        )


def _plan_at(
    planner: Callable[[float], Plan],
    scores: Any,
    alpha: float,
    multiple: int | None,
    mode: str,
    groups: Any,
) -> Plan:
    p = planner(alpha)
    if multiple and multiple > 1:
        p = round_plan(p, scores, multiple, mode, groups=groups)
    return p


def search_alpha(
    lm: LatencyModel,
    make_plan: Callable[[float], Plan],
    target_ms: float,
    *,
    iterations: int = 40,
) -> tuple[float, Plan, float]:
    """Smallest alpha (by bisection on a log scale) whose plan's predicted latency <= target_ms.

    Raises LatencyPlanError when even the largest alpha cannot reach the target.
    """
    hi_plan = make_plan(ALPHA_HI)
    hi_pred = lm.predict(hi_plan)
    if hi_pred > target_ms:
        raise LatencyPlanError(
            f"target {target_ms:.3f} ms is out of reach in one FAIR round: the most pruning predicts "
            f"{hi_pred:.3f} ms (unpruned {lm.predict({}):.3f} ms); raise the target, or prune, "
            "re-score and plan again"
        )
    lo_plan = make_plan(ALPHA_LO)
    lo_pred = lm.predict(lo_plan)
    if lo_pred <= target_ms:
        return ALPHA_LO, lo_plan, lo_pred
    lo, hi = math.log(ALPHA_LO), math.log(ALPHA_HI)
    best = (ALPHA_HI, hi_plan, hi_pred)
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        p = make_plan(math.exp(mid))
        pred = lm.predict(p)
        if pred <= target_ms:
            hi, best = mid, (math.exp(mid), p, pred)
        else:
            lo = mid
    return best


def default_materialize(onnx_model: onnx.ModelProto) -> Callable[[Plan], onnx.ModelProto]:
    """Prune the ONNX model by a plan with the verified graph surgery."""
    from exporters.surgery import apply_plan

    def run(plan: Plan) -> onnx.ModelProto:
        return apply_plan(onnx_model, plan)[0]

    return run


def measure_candidate(
    model: onnx.ModelProto,
    profile: Any,
    lm: LatencyModel,
    runs: int = 50,
) -> dict[str, Any]:
    """Run the pruned model with the devices runner on the profile's device and summarise it.

    The host runs it locally (run_local) with ONNX Runtime's profiler on, so the latency compares
    like with like to kernel-timed tables (devices.latency_model.ProfiledRun: robust on a busy
    machine); a board with SSH reach settings runs it over SSH (run_ssh) and its best wall-clock
    run is used (a board is assumed to be dedicated). Also returns the runner's wall-clock min
    and p50. Raises DeviceError when the device cannot be reached.
    """
    from devices.local import run_local
    from devices.profile import load_profile
    from devices.runspec import RunSpec

    prof = load_profile(profile) if isinstance(profile, str | os.PathLike) else profile
    profiled = prof.is_host and lm.timing == "kernel"
    warmup = 5
    with tempfile.TemporaryDirectory(prefix="fair-edge-latency-") as tmp:
        path = Path(tmp) / "candidate.onnx"
        onnx.save(model, path)
        spec = RunSpec(
            warmup=warmup, runs=runs, threads=lm.threads,
            ort_profile=str(Path(tmp) / "ort") if profiled else None,
        )  # fmt: skip
        if prof.is_host:
            m = run_local(path, prof, spec)
        else:
            from devices.ssh import run_ssh

            m = run_ssh(path, prof, spec)
        samples = np.asarray(m.samples_ms, dtype=np.float64)
        out = {
            "where": m.where,
            "wall_min_ms": float(samples.min()),
            "wall_p50_ms": float(np.median(samples)),
        }
        if profiled and m.ort_profile:
            with open(m.ort_profile, encoding="utf-8") as fh:
                run = summarize_profile(json.load(fh), skip_runs=warmup)
            out.update(measured_ms=run.latency_ms, how="runner + ORT profile (best kernels)")
        else:
            out.update(
                measured_ms=statistic(samples, lm.stat), how=f"runner wall clock ({lm.stat})"
            )
    return out


def plan_for_latency(
    scores: Any,
    onnx_model: onnx.ModelProto,
    profile: Any,
    target_ms: float,
    groups: list[ChannelGroup] | None = None,
    *,
    latency_model: LatencyModel | None = None,
    rounding: bool | int = True,
    mode: str = "auto",
    confirm: bool = True,
    tolerance: float = 0.10,
    max_attempts: int = 3,
    planner: Callable[[float], Plan] | None = None,
    materialize: Callable[[Plan], onnx.ModelProto] | None = None,
    measure: Callable[[onnx.ModelProto], dict[str, Any]] | None = None,
    model: Any = None,
) -> LatencyPlanResult:
    """The least-pruning FAIR plan whose latency on `profile` meets `target_ms` (see module doc).

    `rounding`: True rounds kept counts to the profile's channel multiple, an int to that
    multiple, False not at all; `mode` is the rounding mode, or 'auto' (the least-pruning plan
    meeting the prediction among 'nearest', 'up' and 'down' rounding). `planner(alpha) -> Plan` defaults to pipeline.planning.plan on
    `scores` and `groups`; `materialize(plan) -> ONNX` to the verified surgery; `measure(onnx) -> dict`
    (measured_ms, wall_min_ms, wall_p50_ms, where, how) to `measure_candidate`. `latency_model` defaults to
    the tables measured on this machine (host profiles only).
    """
    try:
        target = float(target_ms)
    except (TypeError, ValueError) as exc:
        raise LatencyPlanError(f"target={target_ms!r} is not a number of milliseconds") from exc
    if not (target > 0 and math.isfinite(target)):
        raise LatencyPlanError(f"target={target_ms!r} must be a positive number of milliseconds")
    if mode not in ("auto", "nearest", "up", "down"):
        raise LatencyPlanError(f"mode={mode!r} must be one of auto, nearest, up, down")
    if not 0 < tolerance < 1:
        raise LatencyPlanError(f"tolerance={tolerance!r} must be a fraction in (0, 1), e.g. 0.1")
    name, _, p_multiple, is_host = resolve_profile(profile)
    lm = latency_model or build_latency_model(onnx_model, profile)
    if lm.profile != name:
        raise LatencyPlanError(
            f"the latency model was measured on {lm.profile!r}, not on {name!r}: build it on that "
            "device (devices.latency_model.build_latency_model there) and pass it in"
        )
    multiple = (p_multiple if rounding is True else int(rounding)) if rounding else None
    if planner is None:
        from pipeline.planning import plan as fair_plan

        def planner(alpha: float) -> Plan:
            return fair_plan(scores, alpha, groups=groups, model=model)

    modes = (mode,) if not multiple or mode != "auto" else ("nearest", "up", "down")

    def search(goal_ms: float) -> tuple[float, Plan, float]:
        """Per rounding mode the smallest alpha meeting the goal; of those, the least pruning
        (highest predicted latency), which fills gaps the channel quantisation leaves."""
        found, last_exc = [], None
        for md in modes:
            try:
                found.append(
                    search_alpha(
                        lm,
                        lambda a, md=md: _plan_at(planner, scores, a, multiple, md, groups),
                        goal_ms,
                    )
                )
            except LatencyPlanError as exc:
                last_exc = exc
        if not found:
            raise last_exc
        return max(found, key=lambda f: f[2])

    attempts: list[dict[str, Any]] = []
    reason = ""
    can_measure = confirm and (is_host or measure is not None or _has_ssh(profile))
    if not confirm:
        reason = "confirmation switched off"
    elif not can_measure:
        reason = f"profile {name!r} has no SSH reach settings (host/user); set them to measure on the board"
    materialize = materialize or default_materialize(onnx_model)
    measure = measure or (lambda m: measure_candidate(m, profile, lm))
    goal = target
    chosen: dict[str, Any] | None = None
    for i in range(max_attempts if can_measure else 1):
        try:
            alpha, p, pred = search(goal)
        except LatencyPlanError:
            if chosen is None:
                raise
            break  # the corrected target is out of reach: keep the closest measured attempt
        att: dict[str, Any] = {
            "attempt": i + 1,
            "model_target_ms": goal,
            "alpha": alpha,
            "predicted_ms": pred,
        }
        att["_plan"] = p
        if can_measure:
            try:
                got = measure(materialize(p))
            except FairEdgeError as exc:
                reason = f"measurement failed: {exc}"
                attempts.append(att)
                chosen = chosen or att
                break
            att.update(got)
        attempts.append(att)
        if not can_measure:
            chosen = att
            break
        err = abs(att["measured_ms"] - target) / target
        if chosen is None or err < abs(chosen["measured_ms"] - target) / target:
            chosen = att
        if err <= tolerance:
            break
        goal = goal * target / att["measured_ms"]
    assert chosen is not None
    measured = chosen.get("measured_ms")
    return LatencyPlanResult(
        target_ms=target,
        profile=name,
        stat=lm.stat,
        alpha=float(chosen["alpha"]),
        multiple=multiple,
        predicted_ms=float(chosen["predicted_ms"]),
        unpruned_predicted_ms=lm.predict({}),
        measured_ms=measured,
        measured_p50_ms=chosen.get("wall_p50_ms"),
        measured_where=chosen.get("where"),
        within_tolerance=None if measured is None else abs(measured - target) / target <= tolerance,
        tolerance=tolerance,
        not_measured_reason="" if measured is not None else reason,
        attempts=[{k: v for k, v in a.items() if k != "_plan"} for a in attempts],
        latency_model={
            "full_ms": lm.full_ms,
            "threads": lm.threads,
            "runtime_version": lm.runtime_version,
            "accuracy": lm.accuracy,
            "calibration": lm.calibration,
        },
        plan=chosen["_plan"],
        measured_how=chosen.get("how"),
    )


def _has_ssh(profile: Any) -> bool:
    try:
        from devices.profile import load_profile

        prof = load_profile(profile) if isinstance(profile, str | os.PathLike) else profile
        return bool(prof.ssh_settings().host)
    except FairEdgeError:
        return False
