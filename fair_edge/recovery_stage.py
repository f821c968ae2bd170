"""The recovery stage of the chain: which data it trains on, its cache, repeated prune/recover
rounds, and accuracy-budget plans (`--max-drop`).

Data: `--recover-data` (any `--data` form, labelled or not), else the training split the model
came with (the built-in default), else the calibration data. A seeded share of it is held out
for the early stop and the best-weights pick, so the held-out figures never come from the samples
trained on, and the report's accuracy comes from the evaluation data, never from these.

Rounds (`--rounds K`): the target's kept share is reached geometrically, (1 - target)^(i/K) of the
original FLOPs after round i; each round scores the recovered model of the round before, plans,
prunes, re-estimates BatchNorm and recovers (teacher: always the unpruned model). The rounds'
plans are composed into one plan over the original model, so the graph that ships is still one
surgery of the original ONNX export; the last round's weights go into it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from calibration.data import CalibrationSet
from calibration.errors import FairEdgeError
from calibration.fileio import cache_dir
from fair_edge.config import Options
from fair_edge.inputs import DeployError, Inputs
from fair_edge.model_source import ModelSource
from fair_edge.stage_cache import StageCache, hash_arrays, hash_model
from pipeline.plan import LayerPlan, Plan
from pipeline.recovery import RecoveryConfig, RecoveryResult, recover


class RecoveryStageError(FairEdgeError):
    """Recovery options or data that do not fit the model."""


@dataclass
class RecoveryData:
    """What recovery trains on and checks against, and where each came from."""

    train: CalibrationSet
    heldout: CalibrationSet | None
    source: str
    heldout_source: str


@dataclass
class Recovered:
    """A recovered pruned model and the record that goes into the report."""

    model: nn.Module
    record: dict[str, Any]
    cached: bool


@dataclass
class RoundsResult:
    plan: Plan
    model: nn.Module
    rounds: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class RecoveryPlan:
    """Whether this run recovers the pruned model, and its data (resolved on first use)."""

    enabled: bool
    opts: Options
    inp: Inputs
    teacher: torch.nn.Module | None
    _data: Any = None

    @classmethod
    def of(
        cls, opts: Options, source: ModelSource, inp: Inputs, model: torch.nn.Module | None
    ) -> RecoveryPlan:
        auto = inp.source.kind == "default" or opts.rounds > 1  # it comes with training data
        enabled = opts.recover if opts.recover is not None else auto
        if enabled and model is None:
            raise DeployError(
                "recovery trains the PyTorch model; an ONNX input cannot be recovered (give "
                "--model as PyTorch, or drop --recover/--rounds)"
            )
        return cls(bool(enabled), opts, inp, model)

    def data(self) -> Any:
        if self._data is None:
            self._data = recovery_data(self.opts, self.inp.source.calibration_data,
                                       self.inp.calibration, self.teacher)  # fmt: skip
        return self._data


def recovery_config(opts: Options) -> RecoveryConfig:
    lr = opts.recover_lr
    if lr is None:
        lr = 1e-2 if opts.recover_optimizer == "sgd" else 1e-3
    return RecoveryConfig(
        epochs=opts.recover_epochs,
        steps=opts.recover_steps,
        batch_size=opts.recover_batch_size,
        lr=lr,
        optimizer=opts.recover_optimizer,
        schedule=opts.recover_schedule,
        augment=opts.recover_augment,
        patience=opts.recover_patience,
        seed=opts.seed,
    ).validate()


def recovery_data(
    opts: Options, default_train: CalibrationSet | None, calibration: CalibrationSet,
    teacher: nn.Module,
) -> RecoveryData:  # fmt: skip
    """Training samples and a disjoint held-out share (labelled by the teacher when unlabelled)."""
    from fair_edge.data_source import load_user_data

    if opts.recover_data is not None:
        data = load_user_data(opts.recover_data, opts, teacher)
        source = f"--recover-data {opts.recover_data}"
    elif default_train is not None:
        data, source = default_train, f"{default_train.source} (the model's training data)"
    else:
        data, source = calibration, f"{calibration.source} (the calibration data)"
    n_held = min(opts.recover_heldout, len(data) // 5)
    if len(data) - n_held < 2:
        raise RecoveryStageError(
            f"recovery needs more training samples than {len(data)} in {source}; give "
            "--recover-data with unlabelled or labelled images of the model's input"
        )
    order = np.random.default_rng(opts.seed).permutation(len(data))
    train = data.subset(np.sort(order[n_held:]))
    if n_held == 0:
        return RecoveryData(train, None, source, "none (too few samples)")
    held = data.subset(np.sort(order[:n_held]))
    held_source = f"{n_held} samples held out of {source}"
    if held.labels is None:
        from pipeline.train import predict

        labels = predict(teacher, held.inputs).argmax(1).astype(np.int64)
        held = held.with_labels(labels, label_source="pseudo")
        held_source += ", labelled by the unpruned model (agreement)"
    return RecoveryData(train, held, source, held_source)


def run_recovery(
    teacher: nn.Module,
    student: nn.Module,
    plan: Plan,
    data: RecoveryData,
    config: RecoveryConfig,
    cache: StageCache,
    *,
    checkpoint: str | None,
    progress: bool,
) -> Recovered:
    """Recover `student` (cached by content: teacher, student, data, settings)."""
    from safetensors.torch import load_file, save_file

    key = StageCache.key(
        "recovery/1",
        hash_model(teacher),
        hash_model(student),
        hash_arrays(data.train.inputs, data.train.labels),
        hash_arrays(*(() if data.heldout is None else (data.heldout.inputs, data.heldout.labels))),
        config.digest(),
    )
    ckpt = Path(checkpoint) if checkpoint else cache_dir("recovery") / f"{key}.ckpt.safetensors"

    def compute(folder: Path) -> dict[str, Any]:
        r = recover(student, teacher, data.train, data.heldout, config,
                    plan_digest=plan.digest(), checkpoint=ckpt, progress=progress)  # fmt: skip
        state = {k: v.detach().contiguous() for k, v in r.model.state_dict().items()}
        save_file(state, str(folder / "weights.safetensors"))
        return {"record": _record(r, data)}

    folder, hit = cache.fetch("recovery", key, compute)
    if not hit and not checkpoint:
        ckpt.unlink(missing_ok=True)  # the cache entry now holds the result
    record = json.loads((folder / "stage.json").read_text())["record"]
    if hit:
        student.load_state_dict(load_file(str(folder / "weights.safetensors")))
        student.eval()
    return Recovered(student, record, hit)


def _record(r: RecoveryResult, data: RecoveryData) -> dict[str, Any]:
    d = r.to_json()
    d["data"] = {"train": data.source, "train_samples": len(data.train),
                 "heldout": data.heldout_source}  # fmt: skip
    return d


# ------------------------------------------------------------------------------ rounds


def compose(first: Plan, later: Plan) -> Plan:
    """`later` (a plan over the model pruned by `first`) as a plan over `first`'s model."""
    layers: dict[str, LayerPlan] = {}
    for name, lp in first.layers.items():
        kept = np.flatnonzero(lp.keep_mask())
        nxt = later.layers.get(name)
        if nxt is not None:
            if nxt.n_units != kept.size:
                raise RecoveryStageError(
                    f"round plans do not chain at layer {name!r} ({nxt.n_units} vs {kept.size})"
                )
            kept = kept[nxt.keep_mask()]
        mask = np.ones(lp.n_units, dtype=bool)
        mask[kept] = False
        layers[name] = LayerPlan(name, lp.n_units, [int(i) for i in np.flatnonzero(mask)],
                                 group=lp.group)  # fmt: skip
    return Plan(first.fingerprint, layers, method=dict(first.method), groups=list(first.groups))


def prune_in_rounds(
    model: nn.Module,
    calibration: CalibrationSet,
    data: RecoveryData,
    opts: Options,
    cache: StageCache,
    channel_multiple: int,
    *,
    progress: bool,
) -> RoundsResult:
    """K rounds of score -> plan -> prune -> BN re-estimate -> recover toward `opts.target`."""
    from calibration.sampling import balanced_sample
    from exporters.bn_recal import batchnorm_layers, recalibrate_bn
    from exporters.costs import OnnxCostModel
    from exporters.graph_groups import find_groups
    from exporters.onnx_export import export_onnx
    from exporters.torch_prune import prune_torch
    from fair_edge.plan_stage import plan_controls
    from pipeline.planning import plan_for_budget
    from pipeline.rounding import round_plan
    from pipeline.scoring import score

    if opts.target is None:
        raise RecoveryStageError("--rounds needs --target (the share of FLOPs to remove in all)")
    x1 = torch.from_numpy(np.ascontiguousarray(calibration.inputs[:1]))
    sample = balanced_sample(calibration, opts.samples_per_class, opts.seed)[0]
    config = recovery_config(opts)
    current, composed, now = model, None, 1.0  # now: FLOPs of `current` / the original's
    rounds: list[dict[str, Any]] = []
    for i in range(1, opts.rounds + 1):
        proto = export_onnx(current, x1, None, opset=opts.opset)
        groups = find_groups(proto)
        cost = OnnxCostModel(proto)
        want = (1.0 - opts.target) ** (i / opts.rounds)
        rel = 1.0 - want / now
        if rel <= 0.0:
            continue
        scores = score(current, sample, samples_per_class=opts.samples_per_class,
                       projections=opts.projections, seed=opts.seed, where=opts.where,
                       progress=False, max_memory=opts.max_memory)  # fmt: skip
        p = plan_for_budget(scores, min(rel, 0.95), "flops", cost, groups, current, strict=False,
                            controls=plan_controls(opts),
                            allocation=opts.allocation)  # fmt: skip
        if opts.round and channel_multiple > 1:
            p = round_plan(p, scores, channel_multiple, mode="nearest", groups=groups)
        student = prune_torch(current, p, x1, proto)
        if batchnorm_layers(student):
            student = recalibrate_bn(student, sample.inputs)[0]
        composed = p if composed is None else compose(composed, p)
        rec = run_recovery(model, student, composed, data, config, cache,
                           checkpoint=None, progress=progress)  # fmt: skip
        current, now = rec.model, now * float(cost.remaining(p)["flops"])
        rounds.append({
            "round": i, "flops_kept_target": want, "flops_kept": now,
            "pruned_units": p.pruned_units(),
            "heldout_after": rec.record.get("heldout_after"),
            "heldout_before": rec.record.get("heldout_before"),
            "heldout_source": data.heldout_source,
            "recovery_cached": rec.cached,
        })  # fmt: skip
    if composed is None:
        raise RecoveryStageError(
            f"--rounds {opts.rounds} with --target {opts.target} pruned nothing"
        )
    composed.method = {**composed.method, "rounds": rounds, "input_shape": list(x1.shape)}
    return RoundsResult(composed, current, rounds)
