"""The score and plan stages of the chain: FAIR scores (cached by content), the plan for the
user's level or budget (rounded to the device's channel multiple), and the plan applied to torch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from calibration.data import CalibrationSet
from devices.profile import DeviceProfile
from fair_edge.config import DEFAULT_TOD, Options
from fair_edge.inputs import show_progress
from fair_edge.stage_cache import StageCache, hash_arrays, hash_model
from pipeline.controls import PlanControls
from pipeline.plan import Plan
from pipeline.recovery import Dist
from pipeline.scores import Scores, ScoringError


def compute_scores(
    model: torch.nn.Module,
    cs: CalibrationSet,
    opts: Options,
    cache: StageCache,
    dist: Dist | None = None,
) -> tuple[Scores, bool]:
    """FAIR scores of `model` on a seeded, class-balanced calibration draw; cached by content.
    Under torchrun (dist.world > 1) every process scores its share (score() shares rank 0's
    weights and checks the data), none reads the cache (one process's hit would leave the
    others waiting in a collective), and process 0 stores the result for later runs."""
    from pipeline.scoring import score

    dist = dist or Dist()
    if opts.task != "classification":
        if dist.world > 1:
            raise ScoringError(
                f"scoring under torchrun covers classification, not --task {opts.task}; "
                "run it as one process"
            )
        return _dense_scores(model, cs, opts, cache)
    if cs.labels is not None:
        from calibration.sampling import balanced_sample

        sample = balanced_sample(cs, opts.samples_per_class, opts.seed)[0]
        data: Any = sample
        x, y = sample.inputs, sample.labels
    else:
        x = cs.inputs[: opts.samples_per_class * 100]
        data, y = (torch.from_numpy(x), None), None
    key = StageCache.key(
        "scores/1",
        hash_model(model),
        hash_arrays(x, y),
        opts.cache_key("samples_per_class", "projections", "seed", "where"),
    )

    def compute() -> Scores:
        return score(
            model,
            data,
            samples_per_class=opts.samples_per_class,
            projections=opts.projections,
            seed=opts.seed,
            where=opts.where,
            progress=show_progress(opts),
            max_memory=opts.max_memory,
        )

    def run(folder: Path, scores: Scores | None = None) -> dict[str, Any]:
        scores = scores or compute()
        scores.save(folder / "scores.npz")
        return {"layers": len(scores.layers)}

    if dist.world > 1:
        scores = compute()
        if dist.rank == 0:
            cache.fetch("scores", key, lambda folder: run(folder, scores))
        return scores, False
    folder, hit = cache.fetch("scores", key, run)
    return Scores.load(folder / "scores.npz"), hit


def plan_controls(opts: Options) -> PlanControls:
    """--ignore-layers, --max-layer-ratio and the config's layer_ratio_caps, for the planner."""
    return PlanControls.of(opts.ignore_layers, opts.max_layer_ratio, opts.layer_ratio_caps)


def channel_multiple(opts: Options, profile: DeviceProfile) -> int:
    """The multiple kept channel counts are rounded to: --round-to, else the profile's."""
    return opts.round_to if opts.round_to is not None else profile.channel_multiple


DENSE_IMAGES = 32  # images scored for dense tasks (each gives many positions)


def _loss_and_key(opts: Options) -> tuple[Callable[..., Any] | None, str | None]:
    """The --loss function wrapped to fail in one line, and a cache key part for it."""
    if opts.loss is None:
        return None, None
    from fair_edge.model_source import load_loss
    from pipeline.dense_scoring import checked_loss

    path = Path(opts.loss.rpartition(":")[0])
    key = opts.loss + (
        ":" + hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
    )
    return checked_loss(load_loss(opts.loss), f"--loss {opts.loss!r}"), key


def _dense_scores(
    model: torch.nn.Module, cs: CalibrationSet, opts: Options, cache: StageCache
) -> tuple[Scores, bool]:
    """Dense-task scores on a seeded draw of up to DENSE_IMAGES images and their targets."""
    from calibration.dense_targets import load_dense_targets
    from pipeline.scoring import score

    if opts.max_memory is not None:
        raise ScoringError(
            f"--max-memory covers classification scoring, not --task {opts.task} (which keeps at "
            "most --samples-per-class positions per class and layer); leave it out"
        )
    targets = load_dense_targets(opts.data, opts.task, len(cs), cs.inputs.shape[-2:])
    idx = np.sort(np.random.default_rng(opts.seed).permutation(len(cs))[:DENSE_IMAGES])
    x = cs.inputs[idx]
    if isinstance(targets, list):
        t: Any = [targets[i] for i in idx]
        parts = [a for d in t for a in (d["boxes"], d["labels"])]
    else:
        t = None if targets is None else targets[idx]
        parts = [t]
    loss, loss_key = _loss_and_key(opts)
    key = StageCache.key(
        "scores-dense/1",
        hash_model(model),
        hash_arrays(x, *parts),
        opts.cache_key("samples_per_class", "seed", "where", "task"),
        loss_key,
    )

    def run(folder: Path) -> dict[str, Any]:
        scores = score(
            model,
            (torch.from_numpy(np.ascontiguousarray(x)), t),
            task=opts.task,
            loss=loss,
            samples_per_class=opts.samples_per_class,
            seed=opts.seed,
            where=opts.where,
            progress=show_progress(opts),
            batch_size=8,
        )
        scores.save(folder / "scores.npz")
        return {"layers": len(scores.layers)}

    folder, hit = cache.fetch("scores", key, run)
    return Scores.load(folder / "scores.npz"), hit


def make_plan(
    scores: Scores,
    onnx_model: onnx.ModelProto,
    model: torch.nn.Module,
    opts: Options,
    profile: DeviceProfile,
) -> Plan:
    """The FAIR plan at --tod (or the smallest ToD reaching --target or --latency-ms), rounded."""
    from exporters.costs import OnnxCostModel
    from exporters.graph_groups import find_groups
    from pipeline.planning import plan, plan_for_budget

    groups = find_groups(onnx_model)
    controls = plan_controls(opts)
    multiple = channel_multiple(opts, profile)
    if opts.latency_ms is not None:
        from devices.latency_plan import plan_for_latency

        def planner(alpha: float) -> Plan:
            return plan(scores, alpha, groups=groups, model=model, controls=controls)

        found = plan_for_latency(
            scores,
            onnx_model,
            profile,
            opts.latency_ms,
            groups,
            rounding=multiple if opts.round else False,
            mode=opts.round_mode,
            model=model,
            planner=planner,
        )
        result = found.plan
        summary = {k: v for k, v in found.to_json().items() if k not in ("plan", "latency_model")}
        result.method["latency"] = json.loads(json.dumps(summary, default=float))
        return result
    if opts.target is not None:
        result = plan_for_budget(
            scores,
            opts.target,
            opts.metric,
            cost=OnnxCostModel(onnx_model),
            groups=groups,
            model=model,
            controls=controls,
            allocation=opts.allocation,
        )
    else:
        result = plan(
            scores, opts.tod or DEFAULT_TOD, groups=groups, model=model, controls=controls
        )
    if opts.round and multiple > 1:
        from pipeline.rounding import round_plan

        mode = opts.round_mode
        if mode == "auto":
            mode = "nearest" if opts.target is not None else "up"
        result = round_plan(
            result,
            scores,
            multiple,
            mode=mode,
            groups=groups,
            cost=OnnxCostModel(onnx_model),
        )
        result.method["rounding"]["from"] = (
            "--round-to" if opts.round_to is not None else f"profile {profile.name}"
        )
    result.method["export"] = {"opset": opts.opset}
    return result


def prune_torch_model(
    model: torch.nn.Module, plan: Plan, example: torch.Tensor, onnx_model: onnx.ModelProto
) -> torch.nn.Module:
    """The physically smaller torch module for `plan`, verified against the masked ONNX original."""
    from exporters.torch_prune import prune_torch

    return prune_torch(model, plan, example_input=example, onnx_model=onnx_model)
