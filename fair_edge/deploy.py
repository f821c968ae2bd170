"""`fair-edge deploy`: one call from a trained model to a measured, edge-ready bundle.

score -> plan -> export -> surgery (verified) -> simplify (BN fold) -> TFLite (profiles that
list it) -> optional int8/fp16 -> accuracy of every shipped file -> original and pruned measured
on the device in one run -> report -> bundle (written atomically). Scores are cached by the
content hash of the weights, data and scoring options, so a re-run with another ToD level or
device skips the slow stage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from tqdm.auto import tqdm

from calibration.data import CalibrationSet
from calibration.errors import FairEdgeError
from calibration.fileio import atomic_write_bytes
from devices.profile import DeviceProfile, load_profile
from exporters.bundle import BundleSpec, tool_versions, write_bundle
from exporters.errors import ExportError
from exporters.evaluate import model_outputs, top1
from fair_edge.config import DEFAULT_TOD, Options
from fair_edge.model_source import ModelSource, resolve_model
from fair_edge.stage_cache import StageCache, hash_arrays, hash_model
from pipeline.controls import PlanControls
from pipeline.plan import Plan
from pipeline.scores import Scores

REPORT_SCHEMA = "fair-edge/deploy-report"
REPORT_VERSION = 1
SIMPLIFY_ATOL = 1e-4
VERIFY_SAMPLES = 64
# Below this a latency ratio says more about per-run overhead than the model: a whole 2-conv
# graph runs in 0.026 ms on ONNX Runtime CPU here, so the overhead is at most that much.
TINY_MODEL_MS = 0.1
INT8_CALIBRATION = 256


class DeployError(FairEdgeError):
    """A deploy that cannot go on (missing data for a model, an unusable option combination)."""


@dataclass
class DeployResult:
    """Where the bundle went and the headline numbers (also in its report.json)."""

    bundle: Path
    report: Path
    summary: dict[str, Any]
    cache: dict[str, bool] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["bundle"], d["report"] = str(self.bundle), str(self.report)
        return d


@dataclass
class Inputs:
    """The resolved model, profile and data a deploy (or a single stage) works on."""

    source: ModelSource
    profile: DeviceProfile
    calibration: CalibrationSet
    evaluation: CalibrationSet
    eval_is_calibration: bool


# ------------------------------------------------------------------------------ inputs


def show_progress(opts: Options) -> bool:
    """Progress bars only for a person watching: not with --quiet/--json, not into a pipe or log."""
    return not (opts.quiet or opts.json) and sys.stderr.isatty()


def resolve_profile(name: str) -> DeviceProfile:
    return load_profile(name)


def resolve_inputs(opts: Options) -> Inputs:
    """Profile first (cheapest to get wrong), then model, then data."""
    from fair_edge.data_source import load_user_data

    profile = resolve_profile(opts.device)
    source = resolve_model(
        opts.model,
        weights=opts.weights,
        num_classes=opts.num_classes,
        progress=show_progress(opts),
        task=opts.task,
    )
    if opts.data is not None:
        calib = load_user_data(opts.data, opts, source.model)
        if opts.task != "classification":  # dense targets are read by compute_scores
            calib = dataclasses.replace(calib, labels=None, label_source="none", class_names=[])
    elif source.calibration_data is not None:
        calib = source.calibration_data
    else:
        raise DeployError(
            f"model {source.spec!r} needs calibration data: give --data (a class folder, .npz/.npy, "
            "an IDX file, 'fashion-mnist' or 'digits')"
        )
    if opts.eval_data is not None:
        evaluation, same = load_user_data(opts.eval_data, opts, source.model), False
    elif opts.data is None and source.eval_data is not None:
        evaluation, same = source.eval_data, False
    elif calib.labels is not None and len(calib) >= MIN_SPLIT:
        calib, evaluation = split_heldout(calib, opts.eval_samples, opts.seed)
        same = False
    else:
        evaluation, same = calib, True
    if opts.input_shape is not None and list(calib.sample_shape) != list(opts.input_shape):
        raise DeployError(
            f"--input-shape {opts.input_shape} does not match the data's samples "
            f"{list(calib.sample_shape)}; fix the preprocessing (--image-size/--channels, for "
            "image folders and raw arrays) or the shape"
        )
    if evaluation.sample_shape != calib.sample_shape:
        raise DeployError(
            f"evaluation data samples are {list(evaluation.sample_shape)} but calibration samples "
            f"are {list(calib.sample_shape)}; use data with the same preprocessing"
        )
    if len(evaluation) > opts.eval_samples:
        idx = np.sort(
            np.random.default_rng(opts.seed).permutation(len(evaluation))[: opts.eval_samples]
        )
        evaluation = evaluation.subset(idx)
    return Inputs(source, profile, calib, evaluation, same)


MIN_SPLIT = 50  # below this a labelled set is too small to hold a share out for evaluation


def split_heldout(
    cs: CalibrationSet, n_eval: int, seed: int
) -> tuple[CalibrationSet, CalibrationSet]:
    """(the rest, a seeded held-out share): accuracy never comes from samples calibrated on."""
    n = min(n_eval, max(1, len(cs) // 5))
    order = np.random.default_rng(seed + 7919).permutation(len(cs))
    held = cs.subset(np.sort(order[:n]))
    held = dataclasses.replace(held, source=f"{n} samples held out of {cs.source} (never "
                               "used for calibration or recovery)")  # fmt: skip
    return cs.subset(np.sort(order[n:])), held


def example_input(cs: CalibrationSet) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(cs.inputs[:1]))


def calibration_subset(cs: CalibrationSet, n: int, seed: int) -> np.ndarray:
    """`n` calibration inputs, seeded, class-balanced when labelled (int8 ranges, verification)."""
    if len(cs) <= n:
        return cs.inputs
    if cs.labels is not None and cs.num_classes > 1:
        from calibration.sampling import balanced_sample

        per_class = max(2, n // max(1, cs.num_classes))
        try:
            return balanced_sample(cs, per_class, seed)[0].inputs[:n]
        except FairEdgeError:
            pass
    idx = np.sort(np.random.default_rng(seed).permutation(len(cs))[:n])
    return cs.inputs[idx]


def _check_model_runs(
    model: torch.nn.Module, cs: CalibrationSet, source: ModelSource, opts: Options | None = None
) -> None:
    """One forward pass on a data sample, so a model/data mismatch is one clear line."""
    try:
        with torch.no_grad():
            out = model(example_input(cs))
    except Exception as exc:
        from fair_edge.data_source import first_layer_hint

        hint = first_layer_hint(model)
        raise DeployError(
            f"model {source.spec!r} cannot run on the data's samples of shape "
            f"{list(cs.sample_shape)} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            + (
                f"{hint} (or give data with the model's input shape)"
                if hint
                else "give data with the model's input shape and preprocessing"
            )
        ) from exc
    if opts is not None and opts.task != "classification":
        return _check_dense(out, cs, source, opts)
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise DeployError(
            f"model {source.spec!r} must return N x classes logits, got "
            f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}"
        )
    if cs.labels is not None and out.shape[1] < cs.num_classes:
        raise DeployError(
            f"model {source.spec!r} has {out.shape[1]} outputs but the data has {cs.num_classes} "
            "classes; set --num-classes or use matching data"
        )


def _check_dense(out: Any, cs: CalibrationSet, source: ModelSource, opts: Options) -> None:
    """A dense task's model output and targets, checked before anything is written."""
    from calibration.dense_targets import load_dense_targets
    from exporters.onnx_export import output_names
    from pipeline.dense_scoring import dense_logits

    if opts.task == "segmentation" and opts.loss is None:
        try:
            dense_logits(out)
        except FairEdgeError as exc:
            raise DeployError(f"model {source.spec!r}: {exc}") from exc
    output_names(source.model, example_input(cs))  # a flat tensor/dict/tuple, or one line
    if cs.inputs.ndim != 4:
        raise DeployError(
            f"--task {opts.task} needs image inputs N x C x H x W, the data's samples are "
            f"{list(cs.sample_shape)}"
        )
    targets = load_dense_targets(opts.data, opts.task, len(cs), cs.inputs.shape[-2:])
    if opts.task == "detection" and (opts.loss is None or targets is None):
        raise DeployError(
            "--task detection needs --loss module:function (raw head outputs, targets) -> loss "
            "and box targets in --data (a .npz with 'boxes' N x M x 4 and 'box_labels' N x M)"
        )


# The built-in default shows the product working: half the FLOPs removed, then recovered.
DEFAULT_MODEL_SETTINGS = {"target": 0.5}


def apply_model_defaults(opts: Options, source: ModelSource, notes: list[str]) -> Options:
    """The built-in default model's own settings, where the user chose no plan of their own."""
    chose = any(v is not None for v in (opts.tod, opts.target, opts.latency_ms, opts.max_drop,
                                        opts.plan))  # fmt: skip
    if source.kind != "default" or chose:
        return opts
    changes = {k: v for k, v in DEFAULT_MODEL_SETTINGS.items() if getattr(opts, k) is None}
    if changes:
        notes.append(
            "built-in default settings: "
            + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in changes.items())
        )
    return dataclasses.replace(opts, **changes)


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
            from fair_edge.recovery_stage import recovery_data

            self._data = recovery_data(self.opts, self.inp.source.calibration_data,
                                       self.inp.calibration, self.teacher)  # fmt: skip
        return self._data


def torch_accuracy(model: torch.nn.Module, cs: CalibrationSet) -> float | None:
    """Top-1 of a torch module on the evaluation data (None when it has no labels)."""
    if cs.labels is None:
        return None
    from pipeline.train import evaluate

    return evaluate(model, cs)


# ------------------------------------------------------------------------------ stages


def compute_scores(
    model: torch.nn.Module, cs: CalibrationSet, opts: Options, cache: StageCache
) -> tuple[Scores, bool]:
    """FAIR scores of `model` on a seeded, class-balanced calibration draw; cached by content."""
    from pipeline.scoring import score

    if opts.task != "classification":
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

    def run(folder: Path) -> dict[str, Any]:
        scores = score(
            model,
            data,
            samples_per_class=opts.samples_per_class,
            projections=opts.projections,
            seed=opts.seed,
            where=opts.where,
            progress=show_progress(opts),
            max_memory=opts.max_memory,
        )
        scores.save(folder / "scores.npz")
        return {"layers": len(scores.layers)}

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


def simplify_file(src: Path, dst: Path, inputs: np.ndarray) -> dict[str, Any]:
    """Fold constants and BatchNorm into the convolutions (onnxslim); outputs must not change."""
    import onnxslim

    model = onnx.load(os.fspath(src))
    try:
        slim = onnxslim.slim(model)
    except Exception as exc:
        raise ExportError(f"simplifying {src.name} failed: {type(exc).__name__}: {exc}") from exc
    atomic_write_bytes(dst, slim.SerializeToString())
    before, after = model_outputs(src, inputs), model_outputs(dst, inputs)
    diff = float(np.max(np.abs(before - after)))
    if not diff <= SIMPLIFY_ATOL * max(1.0, float(np.max(np.abs(before)))):
        raise ExportError(
            f"simplified {src.name} differs from the unsimplified graph by {diff:.3g}; "
            "report this model to fair-edge"
        )
    ops = lambda m: sum(1 for _ in m.graph.node)  # noqa: E731
    return {"nodes_before": ops(model), "nodes_after": ops(slim), "max_abs_diff": diff}


def prune_torch_model(
    model: torch.nn.Module, plan: Plan, example: torch.Tensor, onnx_model: onnx.ModelProto
) -> torch.nn.Module:
    """The physically smaller torch module for `plan`, verified against the masked ONNX original."""
    from exporters.torch_prune import prune_torch

    return prune_torch(model, plan, example_input=example, onnx_model=onnx_model)


def choose_where(profile: DeviceProfile, run_on: str) -> tuple[str, str]:
    """(where, why): ssh when the profile can reach its board, else emulated, else local."""
    if run_on != "auto":
        return run_on, f"--run-on {run_on}"
    if profile.is_host:
        return "local", "the host profile runs here"
    host = profile.ssh_settings().host
    if host:
        return "ssh", f"profile {profile.name} reaches its board at {host}"
    if profile.emulate:
        from devices.emulation import sysroot_path

        if (sysroot_path() / "sysroot.json").is_file():
            return "emulated", "no board host set; the emulated aarch64 sysroot is built"
        return "local", (
            f"no board host set (FAIR_EDGE_{profile.name.upper().replace('-', '_')}_HOST) and no "
            "emulated sysroot (python -m devices.emulation build): measured locally on the host"
        )
    return "local", "no board host set: measured locally on the host"


def accuracy_of(path: Path, cs: CalibrationSet) -> float | None:
    if cs.labels is None:
        return None
    return top1(model_outputs(path, cs.inputs), cs.labels)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return float(a) / float(b)


# ------------------------------------------------------------------------------ report


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def summary_title(summary: dict[str, Any]) -> str:
    return f"fair-edge deploy: {summary['model']} on {summary['device']}"


def summary_sections(summary: dict[str, Any], runtime: str | None = None) -> list[dict[str, Any]]:
    """The report's lead as sections (both report.md and report.html render them): ratios first
    (latency, memory, size, FLOPs, accuracy), then accuracy at each step, recovery, the accuracy
    budget, variants and notes. runtime: what the latency ratio was measured with."""
    from devices.report import bullets, image, para, section, table

    r = summary["ratios"]
    m = summary["metrics"]
    on = f", {runtime}" if runtime else ""
    speed = f"{_fmt(r['latency_speedup'], '.2f')}x" + (
        " (a slowdown)" if (r["latency_speedup"] or 1.0) < 1.0 else ""
    )
    ratio_rows = [
        (f"latency speed-up (p50, original / pruned{on})", speed),
        ("peak memory (pruned / original)", _fmt(r["memory"], ".3f")),
        ("model file size (pruned / original)", _fmt(r["size"], ".3f")),
        ("FLOPs (pruned / original)", _fmt(r["flops"], ".3f")),
        ("parameters (pruned / original)", _fmt(r["params"], ".3f")),
        ("top-1 accuracy change (points)", _fmt(r["accuracy_change_points"], "+.2f")),
    ]
    metric_rows = [
        (f"latency p50 (ms{on})", _fmt(m["latency_p50_ms"][0]), _fmt(m["latency_p50_ms"][1])),
        ("peak RSS (MB)", _fmt(m["peak_rss_mb"][0], ".1f"), _fmt(m["peak_rss_mb"][1], ".1f")),
        ("file size (bytes)", f"{m['size_bytes'][0]:,}", f"{m['size_bytes'][1]:,}"),
        ("FLOPs", f"{m['flops'][0]:,}", f"{m['flops'][1]:,}"),
        ("parameters", f"{m['params'][0]:,}", f"{m['params'][1]:,}"),
        (
            f"top-1 accuracy ({summary['accuracy_on']})",
            _fmt(m["accuracy"][0], ".4f"),
            _fmt(m["accuracy"][1], ".4f"),
        ),
    ]
    warnings = summary.get("warnings") or []
    out = [section("Warnings", bullets(warnings, strong=True), cls="warnings")] if warnings else []
    out += [
        section(
            None,
            para(
                f"Measured {summary['measured_where']} ({summary['measured_why']}); original and "
                "pruned timed back to back in one run."
                + (
                    ""
                    if summary.get("representative", True)
                    else " Latency under emulation is NOT representative of the board; sizes, "
                    "FLOPs and accuracy are."
                )
            ),
            table(["ratio (pruned vs original)", "value"], ratio_rows, "ratios", "lr"),
            table(["", "original", "pruned"], metric_rows, "metrics"),
            cls="lead",
        )
    ]
    stages = summary.get("accuracy_stages") or {}
    if stages:
        out.append(
            section(
                f"Top-1 accuracy at each step, on {summary['accuracy_on']}",
                table(
                    ["model", "top-1"], [(k, _fmt(v, ".4f")) for k, v in stages.items()], "accuracy"
                ),  # fmt: skip
                cls="accuracy",
            )
        )
    rec = summary.get("recovery")
    if rec and "rounds" not in rec:
        out.append(
            section(
                "Recovery",
                para(
                    f"Recovery: {rec['steps']} steps ({rec['config']['optimizer']}, lr "
                    f"{rec['config']['lr']:g}, batch {rec['config']['batch_size']}) on "
                    f"{rec['data']['train']} ({rec['data']['train_samples']} samples); held-out: "
                    f"{rec['data']['heldout']}; {rec['samples_per_second']:.0f} samples/s"
                    + (" (cached)" if rec.get("cached") else "")
                ),
                cls="recovery",
            )
        )
    elif rec:
        out.append(
            section(
                "Recovery rounds",
                bullets(
                    [
                        f"round {x['round']}: FLOPs kept {x['flops_kept']:.3f} (target "
                        f"{x['flops_kept_target']:.3f}), held-out top-1 "
                        f"{_fmt(x['heldout_after'], '.4f')}"
                        for x in rec["rounds"]
                    ]
                ),
                cls="recovery",
            )
        )
    trade = summary.get("tradeoff")
    if trade:
        out.append(
            section(
                "Accuracy budget",
                para(
                    f"Accuracy budget: at most {trade['max_drop']} points lost ({trade['fix']}, "
                    f"on {trade['heldout']}); every plan tried:"
                ),
                table(
                    ["target", "FLOPs removed", "top-1", "points lost", "within budget"],
                    [
                        (
                            f"{p['target']:.3f}",
                            f"{p['flops_removed']:.3f}",
                            _fmt(p["accuracy"], ".4f"),
                            f"{p['drop_points']:.2f}",
                            "yes" if p["ok"] else "no",
                        )
                        for p in trade["points"]
                    ],
                    "tradeoff",
                ),
                image("tradeoff.png", "accuracy against FLOPs"),
                cls="tradeoff",
            )
        )
    variants = summary.get("variants") or []
    if variants:
        out.append(
            section(
                "Variants",
                bullets(
                    [
                        f"{v['file']}: {v['kind']}, top-1 {_fmt(v.get('accuracy'), '.4f')} "
                        f"(change vs pruned fp32 {_fmt(v.get('accuracy_change_points'), '+.2f')} "
                        f"points), {v['size_bytes']:,} bytes"
                        for v in variants
                    ]
                ),
                cls="variants",
            )
        )
    data = summary.get("data")
    if data:
        out.append(section("Data", bullets(data_lines(data)), cls="data"))
    notes = summary.get("notes") or []
    if notes:
        out.append(section("Notes", bullets([str(n) for n in notes]), cls="notes"))
    return out


# ------------------------------------------------------------------------------ deploy


@contextmanager
def _stage(name: str, timings: dict[str, float], bar: Any) -> Iterator[None]:
    bar.set_description(name)
    t0 = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - t0, 3)
    bar.update(1)


def deploy(
    opts: Options,
    *,
    cache: StageCache | None = None,
    runner: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
) -> DeployResult:
    """Run the whole chain for `opts` and return where the bundle and its report are."""
    from devices.report import measure_pair, write_report
    from devices.runspec import RUNNER_PATH, RunSpec
    from exporters.onnx_export import export_onnx, load_onnx
    from exporters.surgery import apply_plan, save_model

    opts.validate()
    cache = cache or StageCache.default(enabled=opts.cache)
    runner_path = Path(runner) if runner is not None else RUNNER_PATH
    say = log or (lambda _msg: None)
    timings: dict[str, float] = {}
    hits: dict[str, bool] = {}
    notes: list[str] = []
    stages = ["scores", "export", "plan", "surgery", "recover", "simplify", "tflite", "quantize", "accuracy",
              "measure", "bundle"]  # fmt: skip
    t0 = time.perf_counter()
    inp = resolve_inputs(opts)  # bad input fails here, before any bar or file
    opts = apply_model_defaults(opts, inp.source, notes)
    source, profile = inp.source, inp.profile
    verify_x = calibration_subset(inp.calibration, VERIFY_SAMPLES, opts.seed)
    if source.model is not None:
        _check_model_runs(source.model, inp.calibration, source, opts)
    timings["inputs"] = round(time.perf_counter() - t0, 3)
    bar = tqdm(total=len(stages), disable=not show_progress(opts), unit="stage", leave=False)
    with tempfile.TemporaryDirectory(prefix="fair-edge-deploy-") as tmp_name, bar:
        work = Path(tmp_name)
        model = source.model
        with _stage("scores", timings, bar):
            scores = None
            if opts.plan is None:
                model = source.require_torch("scoring")
                if opts.scores is not None:
                    scores, hits["scores"] = Scores.load(opts.scores), True
                else:
                    scores, hits["scores"] = compute_scores(model, inp.calibration, opts, cache)
        with _stage("export", timings, bar):
            raw_original = work / "original.raw.onnx"
            if model is not None:
                original_proto = export_onnx(
                    model, example_input(inp.calibration), raw_original, opset=opts.opset
                )
            else:
                original_proto = load_onnx(source.onnx_path)
                shutil.copyfile(source.onnx_path, raw_original)
        rec_stage = RecoveryPlan.of(opts, source, inp, model)
        rounds = None
        tradeoff: dict[str, Any] | None = None
        with _stage("plan", timings, bar):
            if opts.plan is not None:
                the_plan = Plan.load(opts.plan)
                if model is not None:
                    the_plan.check_model(model)
            elif opts.rounds > 1:
                from fair_edge.recovery_stage import prune_in_rounds

                rounds = prune_in_rounds(model, inp.calibration, rec_stage.data(), opts, cache,
                                         channel_multiple(opts, profile),
                                         progress=show_progress(opts))  # fmt: skip
                the_plan = rounds.plan
            elif opts.max_drop is not None:
                from fair_edge.accuracy_plan import plan_for_accuracy

                fixed = None
                if opts.latency_ms is not None:  # the most accurate plan under the latency
                    fixed = make_plan(scores, original_proto, model, opts, profile)
                found = plan_for_accuracy(scores, original_proto, model, opts, profile, rec_stage,
                                          cache, progress=show_progress(opts), fixed=fixed)  # fmt: skip
                the_plan, tradeoff = found.plan, found.to_json()
            else:
                the_plan = make_plan(scores, original_proto, model, opts, profile)
            if the_plan.pruned_units() == 0:
                notes.append(
                    f"the plan removes no unit at ToD {opts.tod or DEFAULT_TOD}; raise --tod or set "
                    "--target"
                )
            if model is not None:
                the_plan.method.setdefault("input_shape", [1, *inp.calibration.sample_shape])
        pruned_model = None
        bn_recal: dict[str, Any] | None = None
        recovery: dict[str, Any] | None = None
        acc_stages: dict[str, float | None] = {}
        with _stage("surgery", timings, bar):
            pruned_proto, surgery = apply_plan(original_proto, the_plan, verify_inputs=verify_x)
            if model is not None:
                pruned_model = prune_torch_model(
                    model, the_plan, example_input(inp.calibration), original_proto
                )
                acc_stages["one-shot"] = torch_accuracy(pruned_model, inp.evaluation)
        with _stage("recover", timings, bar):
            from exporters.bn_recal import batchnorm_layers, recalibrate_onnx

            recal = opts.recalibrate_bn
            if recal is None:  # auto: whenever it can be done
                recal = model is not None and bool(batchnorm_layers(model))
            if recal and model is None:
                raise DeployError(
                    "--recalibrate-bn needs the PyTorch model; an ONNX input cannot be "
                    "recalibrated (drop the flag or give --model as PyTorch)"
                )
            if rounds is not None:
                pruned_model = rounds.model
                recovery = {"rounds": rounds.rounds}
            elif recal:
                recal_x = calibration_subset(inp.calibration, INT8_CALIBRATION, opts.seed)
                pruned_model, pruned_proto, rep = recalibrate_onnx(
                    pruned_model, pruned_proto, recal_x, verify_x
                )
                bn_recal = rep.to_json()
                acc_stages["BN re-estimated"] = torch_accuracy(pruned_model, inp.evaluation)
                notes.append(
                    f"BatchNorm statistics of {rep.layers} layers re-estimated on {rep.samples} "
                    "calibration samples (no training)"
                )
            if rec_stage.enabled and rounds is None:
                from fair_edge.recovery_stage import recovery_config, run_recovery

                rec = run_recovery(model, pruned_model, the_plan, rec_stage.data(),
                                   recovery_config(opts), cache, checkpoint=opts.checkpoint,
                                   progress=show_progress(opts))  # fmt: skip
                pruned_model, recovery = rec.model, {**rec.record, "cached": rec.cached}
                hits["recovery"] = rec.cached
            if recovery is not None:
                from exporters.weights import write_back

                pruned_proto, wb = write_back(pruned_model, pruned_proto, verify_x)
                recovery["onnx_write_back"] = wb.to_json()
                acc_stages["recovered"] = torch_accuracy(pruned_model, inp.evaluation)
            raw_pruned = work / "pruned.raw.onnx"
            save_model(pruned_proto, raw_pruned)
        with _stage("simplify", timings, bar):
            original_onnx, pruned_onnx = work / "original.onnx", work / "model.onnx"
            simplify = {
                "original": simplify_file(raw_original, original_onnx, verify_x),
                "pruned": simplify_file(raw_pruned, pruned_onnx, verify_x),
            }
        tflite_files: dict[str, Path] = {}
        tflite_reports: dict[str, Any] = {}
        want_tflite = opts.runtime == "tflite" or (
            opts.runtime == "auto" and profile.runtime("tflite") is not None
        )
        with _stage("tflite", timings, bar):
            if want_tflite:
                pruned_model = _tflite(opts, inp, model, pruned_model, original_proto, the_plan, pruned_onnx, original_onnx,
                        work, verify_x, tflite_files, tflite_reports, notes)  # fmt: skip
        variants: list[dict[str, Any]] = []
        variant_files: dict[str, Path] = {}
        with _stage("quantize", timings, bar):
            if opts.quantize != "none":
                _quantize(opts, inp, pruned_model, pruned_onnx, work, variants, variant_files,
                          tflite_files, tflite_reports, notes, original_onnx)  # fmt: skip
        with _stage("accuracy", timings, bar):
            acc_orig = accuracy_of(original_onnx, inp.evaluation)
            acc_pruned = accuracy_of(pruned_onnx, inp.evaluation)
            acc_stages = {"unpruned": acc_orig, **acc_stages, "shipped (pruned ONNX)": acc_pruned}
            data_record, warnings = _data_record(opts, inp, acc_orig, scored=scores is not None)
            for w in warnings:
                say(f"warning: {w}")
            for v in variants:
                v["accuracy"] = accuracy_of(variant_files[v["file"]], inp.evaluation)
                v["accuracy_change_points"] = (
                    None
                    if v["accuracy"] is None or acc_pruned is None
                    else 100 * (v["accuracy"] - acc_pruned)
                )
        with _stage("measure", timings, bar):
            from fair_edge.gpu_stage import run_spec, trtexec_pair, variant_precision

            where, why = choose_where(profile, opts.run_on)
            say(f"measuring original and pruned on {profile.name} ({where})")
            spec = run_spec(opts, runtime="onnxruntime")
            comparisons = [measure_pair(original_onnx, pruned_onnx, profile, where, spec)]
            if "model.tflite" in tflite_files and "reference/original.tflite" in tflite_files:
                tspec = RunSpec(warmup=opts.warmup, runs=opts.runs, runtime="tflite")
                comparisons.append(
                    measure_pair(
                        tflite_files["reference/original.tflite"],
                        tflite_files["model.tflite"],
                        profile,
                        where,
                        tspec,
                    )
                )
            for v in variants:  # GPU profiles: each variant, original vs pruned, same run
                ref = v.get("original_file")
                if ref is not None:
                    vspec = dataclasses.replace(spec, precision=variant_precision(v["kind_id"]))
                    comparisons.append(measure_pair(variant_files[ref], variant_files[v["file"]],
                                                    profile, where, vspec))  # fmt: skip
            trt_pair, why_not = trtexec_pair(original_onnx, pruned_onnx, profile, where, spec)
            if trt_pair is not None:
                comparisons.append(trt_pair)
            if why_not:
                notes.append(why_not)
            report_dir = work / "report"
            estimates = []
            if not comparisons[0].original.representative:
                from devices.estimate import estimate_onnx

                estimates = [
                    estimate_onnx(original_onnx, profile),
                    estimate_onnx(pruned_onnx, profile),
                ]
                notes.append(
                    f"roofline estimate for {profile.name} from its published compute and "
                    f"bandwidth (an estimate, not a measurement): original "
                    f"{estimates[0].latency_ms:.3f} ms, pruned {estimates[1].latency_ms:.3f} ms "
                    f"({estimates[0].latency_ms / estimates[1].latency_ms:.2f}x)"
                )
            write_report(report_dir, comparisons, estimates)
            if tradeoff is not None:
                from fair_edge.accuracy_plan import plot_tradeoff

                plot_tradeoff(tradeoff, report_dir / "tradeoff.png")
            p50 = comparisons[0].original.p50_ms
            if p50 is not None and p50 < TINY_MODEL_MS:
                notes.append(
                    f"the original runs in {p50:.3f} ms, where per-run overhead dominates: its "
                    "latency ratio is within measurement noise (FLOPs and size ratios still hold)"
                )
        with _stage("bundle", timings, bar):
            from exporters.costs import count_cost

            head = comparisons[0]
            size_o, size_p = original_onnx.stat().st_size, pruned_onnx.stat().st_size
            cost_o = count_cost(onnx.load(os.fspath(original_onnx)))
            cost_p = count_cost(onnx.load(os.fspath(pruned_onnx)))
            summary = {
                "model": source.name,
                "device": profile.name,
                "measured_where": head.device,
                "measured_why": why,
                "representative": head.original.representative,
                "accuracy_on": (
                    "the calibration data (no separate evaluation data given)"
                    if inp.eval_is_calibration
                    else f"{inp.evaluation.source}, {len(inp.evaluation)} samples"
                ),
                "ratios": {
                    "latency_speedup": head.ratios["speedup_p50"],
                    "memory": head.ratios["peak_rss_ratio"],
                    "size": _ratio(size_p, size_o),
                    "flops": _ratio(cost_p.flops, cost_o.flops),
                    "params": _ratio(cost_p.params, cost_o.params),
                    "accuracy_change_points": (
                        None
                        if acc_orig is None or acc_pruned is None
                        else 100 * (acc_pruned - acc_orig)
                    ),
                },
                "metrics": {
                    "latency_p50_ms": [head.original.p50_ms, head.pruned.p50_ms],
                    "peak_rss_mb": [head.original.peak_rss_mb, head.pruned.peak_rss_mb],
                    "size_bytes": [size_o, size_p],
                    "flops": [cost_o.flops, cost_p.flops],
                    "params": [cost_o.params, cost_p.params],
                    "accuracy": [acc_orig, acc_pruned],
                },
                "variants": variants,
                "bn_recalibration": bn_recal,
                "accuracy_stages": acc_stages,
                "recovery": recovery,
                "tradeoff": tradeoff,
                "notes": notes,
                "data": data_record,
                "warnings": warnings,
            }
            for c in comparisons[1:]:
                if c.original.runtime.get("name") == "tflite":
                    summary["tflite_latency_speedup"] = c.ratios["speedup_p50"]
                elif c.original.runtime.get("name") == "trtexec":
                    summary["trtexec_latency_speedup"] = c.ratios["speedup_p50"]
                else:
                    summary.setdefault("variant_latency_speedup", {})[c.pruned.model["name"]] = (
                        c.ratios["speedup_p50"]
                    )
            device_report = json.loads((report_dir / "report.json").read_text())
            report_json = {
                "schema": REPORT_SCHEMA,
                "version": REPORT_VERSION,
                "summary": summary,
                "surgery": surgery.to_json(),
                "simplify": simplify,
                "tflite": tflite_reports,
                "cache": hits,
                "timings": timings,
                "options": opts.to_json(),
                "device_report": device_report,
            }
            from devices.report import device_sections, render, report_context, runtime_label

            context = report_context(
                summary_title(summary),
                summary_sections(summary, runtime_label(head.original, full=False))
                + device_sections(comparisons, lead=False),
            )
            md, page = render(context, "md"), render(context, "html")
            bundle = BundleSpec(name=opts.name or f"{source.name}-{profile.name}")
            bundle.add_file("model.onnx", pruned_onnx, "model")
            bundle.add_file("reference/original.onnx", original_onnx, "reference")
            for rel, path in tflite_files.items():
                bundle.add_file(rel, path, "reference" if rel.startswith("reference/") else "model")
            for rel, path in variant_files.items():
                bundle.add_file(rel, path, "reference" if rel.startswith("reference/") else "model")
            tensorrt = None
            if profile.tensorrt:
                from fair_edge.gpu_stage import engine_bundle

                script, tensorrt = engine_bundle(profile, bundle.name, _engine_models(
                    opts, profile, pruned_onnx, original_onnx, variants, variant_files))  # fmt: skip
                bundle.add_text("build_engine.sh", script, "tensorrt")
            bundle.add_file("runner.py", runner_path, "runner")
            for png in ("latency.png", "bars.png"):
                if (report_dir / png).is_file():
                    bundle.add_file(png, report_dir / png, "report")
            bundle.add_text("plan.json", json.dumps(the_plan.to_json(), indent=1) + "\n", "plan")
            if pruned_model is not None:
                from exporters.weights import save_pruned_weights

                weights = save_pruned_weights(pruned_model, the_plan, work / "weights.safetensors")
                bundle.add_file("weights.safetensors", weights, "weights")
            if tradeoff is not None and (report_dir / "tradeoff.png").is_file():
                bundle.add_file("tradeoff.png", report_dir / "tradeoff.png", "report")
            bundle.add_text("labels.txt", "\n".join(inp.calibration.class_names) + "\n", "labels")
            bundle.add_text("report.md", md, "report")
            bundle.add_text("report.html", page, "report")
            bundle.add_text(
                "report.json", json.dumps(report_json, indent=1, default=str) + "\n", "report"
            )
            x0 = example_input(inp.calibration)
            bundle.manifest = {
                "model": source.to_json(),
                "device": {"profile": profile.name, "arch": profile.arch, "measured": head.device},
                "input": {
                    "name": _input_name(pruned_onnx),
                    "shape": ["batch", *list(x0.shape[1:])],
                    "dtype": "float32",
                    "layout": inp.calibration.preprocessing.layout,
                },
                "preprocessing": inp.calibration.preprocessing.to_json(),
                "preprocessing_steps": inp.calibration.preprocessing.steps(),
                "onnx_opset": opts.opset,
                "labels": list(inp.calibration.class_names),
                "data": {
                    "calibration": inp.calibration.to_json(),
                    "evaluation": inp.evaluation.to_json(),
                },
                "plan": the_plan.to_json(),
                "graphs": {
                    "model.onnx": "the pruned model: surgery of the unsimplified export by "
                    "plan.json, re-estimated/recovered values written in by name, then simplified "
                    "(BatchNorm folded, constants folded)",
                    "reference/original.onnx": "the unpruned model simplified the same way: what "
                    "model.onnx is timed and compared against; plan.json does not apply to it "
                    "(BatchNorm is folded)",
                    "plan.json": "applies to the PyTorch model (exporters.weights.load_pruned) and "
                    "to its unsimplified ONNX export (exporters.onnx_export.export_onnx, then "
                    "exporters.surgery.apply_plan)",
                },
                "metrics": {
                    "params": {"before": cost_o.params, "after": cost_p.params},
                    "flops": {"before": cost_o.flops, "after": cost_p.flops},
                    "accuracy": {
                        "before": acc_orig,
                        "after": acc_pruned,
                        "on": summary["accuracy_on"],
                    },
                    "size_bytes": {"before": size_o, "after": size_p},
                    "variants": variants,
                    "bn_recalibration": bn_recal,
                },
                "ratios": summary["ratios"],
                "tool_versions": tool_versions(),
                "pytorch": None
                if pruned_model is None
                else {
                    "weights": "weights.safetensors",
                    "plan": "plan.json",
                    "load": "exporters.weights.load_pruned(your_model_factory, 'plan.json', "
                    "'weights.safetensors')",
                },
                "run": {
                    "command": "python "
                    + str(runner_path.name)
                    + " model.onnx --hashes manifest.json"
                },
            }
            if tensorrt is not None:
                bundle.manifest["tensorrt"] = tensorrt
            out = write_bundle(opts.out, bundle)
    return DeployResult(
        bundle=out,
        report=out / "report.md",
        summary=summary,
        cache=hits,
        timings=timings,
        notes=notes,
    )


def _data_record(
    opts: Options, inp: Inputs, acc_orig: float | None, scored: bool
) -> tuple[dict[str, Any], list[str]]:
    """Which data every figure came from, and the warnings about it (short classes, chance)."""
    from fair_edge.data_checks import chance_level, chance_warning, scoring_sample, short_warning

    ev = inp.evaluation
    record: dict[str, Any] = {
        "calibration": {"source": inp.calibration.source, "samples": len(inp.calibration),
                        "labels": inp.calibration.label_source},
        "scoring": scoring_sample(inp.calibration, opts.samples_per_class, opts.seed)
        if scored else None,
        "evaluation": {"source": ev.source, "samples": len(ev), "labels": ev.label_source,
                       "chance": chance_level(ev), "is_calibration": inp.eval_is_calibration},
        "preprocessing": inp.calibration.preprocessing.to_json(),
    }  # fmt: skip
    warnings = [w for w in (short_warning(record["scoring"]) if scored else None,
                            chance_warning(acc_orig, ev)) if w]  # fmt: skip
    if inp.eval_is_calibration and ev.labels is not None:
        warnings.append(
            f"accuracy is measured on the {len(ev)} calibration samples themselves (too few to hold "
            f"{MIN_SPLIT // 5} out): give --eval-data, or more labelled data"
        )
    return record, warnings


def data_lines(data: dict[str, Any]) -> list[str]:
    """The report's Data section: what each figure was measured on."""
    cal, ev, sc, pre = (
        data["calibration"],
        data["evaluation"],
        data["scoring"],
        data["preprocessing"],
    )
    lines = [
        f"calibration data: {cal['source']}, {cal['samples']} samples (labels: {cal['labels']})"
    ]
    if sc is not None:
        short = f"; short classes: {', '.join(f'{k}={v}' for k, v in sc['short'].items())}" if sc[
            "short"] else ""  # fmt: skip
        lines.append(
            f"scoring used {sc['samples']} of them ({sc['per_class']} per class asked, labels: "
            f"{sc['labels']}){short}"
        )
    chance = "n/a" if ev["chance"] is None else format(ev["chance"], ".4f")
    lines.append(
        f"every top-1 figure: {ev['source']}, {ev['samples']} samples (labels: {ev['labels']}; "
        f"chance {chance})"
    )
    size = "x".join(map(str, pre["resize"])) if pre.get("resize") else "as stored"
    lines.append(
        f"preprocessing (also in manifest.json): size {size} ({pre.get('resize_mode', 'stretch')}), "
        f"channels {pre.get('channels') or 'as stored'}, scale {pre['scale']:.6g}, mean "
        f"{pre['mean']}, std {pre['std']}, layout {pre['layout']}"
    )
    return lines


def _input_name(path: Path) -> str:
    model = onnx.load(os.fspath(path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    return next(i.name for i in model.graph.input if i.name not in inits)


def _tflite(
    opts: Options,
    inp: Inputs,
    model: torch.nn.Module | None,
    pruned_model: torch.nn.Module | None,
    original_proto: onnx.ModelProto,
    the_plan: Plan,
    pruned_onnx: Path,
    original_onnx: Path,
    work: Path,
    verify_x: np.ndarray,
    files: dict[str, Path],
    reports: dict[str, Any],
    notes: list[str],
) -> torch.nn.Module | None:
    """Convert original and pruned torch models to TFLite; verify the pruned one against ONNX."""
    from exporters.tflite import convert_tflite, verify_tflite

    if model is None:
        if opts.runtime == "tflite":
            raise DeployError("TFLite needs the PyTorch model; an ONNX input can only go to ONNX")
        notes.append("TFLite skipped: the model came as ONNX (TFLite converts from PyTorch)")
        return None
    x0 = example_input(inp.calibration)
    if pruned_model is None:
        pruned_model = prune_torch_model(model, the_plan, x0, original_proto)
    pruned_tfl = convert_tflite(pruned_model, x0, work / "model.tflite")
    labels = None
    reports["pruned"] = verify_tflite(pruned_tfl, pruned_onnx, verify_x, labels).to_json()
    files["model.tflite"] = pruned_tfl
    original_tfl = convert_tflite(model, x0, work / "original.tflite")
    reports["original"] = verify_tflite(original_tfl, original_onnx, verify_x, labels).to_json()
    files["reference/original.tflite"] = original_tfl
    return pruned_model


def _quantize(
    opts: Options,
    inp: Inputs,
    pruned_model: torch.nn.Module | None,
    pruned_onnx: Path,
    work: Path,
    variants: list[dict[str, Any]],
    files: dict[str, Path],
    tflite_files: dict[str, Path],
    tflite_reports: dict[str, Any],
    notes: list[str],
    original_onnx: Path,
) -> None:
    """int8 (ONNX QDQ, and TFLite full-integer when TFLite is built) or fp16 (ONNX).

    On a TensorRT profile the int8 QDQ model is symmetric (zero points 0, what TensorRT takes);
    on a GPU profile the original gets the same variant, so the two are timed as a pair.
    """
    from exporters.quantize import convert_fp16_onnx, quantize_int8_onnx
    from fair_edge.gpu_stage import gpu_profile

    calib = calibration_subset(inp.calibration, INT8_CALIBRATION, opts.seed)
    trt = inp.profile.tensorrt
    pair = gpu_profile(inp.profile)
    if opts.quantize == "int8":
        path = quantize_int8_onnx(pruned_onnx, work / "model.int8.onnx", calib, symmetric=trt)
        files["model.int8.onnx"] = path
        kind = ("int8 QDQ symmetric per-channel, zero points 0 (TensorRT)" if trt
                else "int8 QDQ per-channel (ONNX Runtime)")  # fmt: skip
        variants.append(
            {"file": "model.int8.onnx", "kind": kind, "kind_id": "int8",
             "calibration_samples": len(calib), "size_bytes": path.stat().st_size}
        )  # fmt: skip
        if pair:
            ref = quantize_int8_onnx(original_onnx, work / "original.int8.onnx", calib,
                                     symmetric=trt)  # fmt: skip
            files["reference/original.int8.onnx"] = ref
            variants[-1]["original_file"] = "reference/original.int8.onnx"
        if "model.tflite" in tflite_files and pruned_model is not None:
            from exporters.tflite import convert_tflite, verify_tflite

            tpath = convert_tflite(
                pruned_model, example_input(inp.calibration), work / "model.int8.tflite",
                quantization="int8", calibration_inputs=calib,
            )  # fmt: skip
            tflite_reports["pruned_int8"] = verify_tflite(
                tpath, pruned_onnx, calib[:VERIFY_SAMPLES], None, quantization="int8"
            ).to_json()
            files["model.int8.tflite"] = tpath
            variants.append(
                {"file": "model.int8.tflite", "kind": "int8 PT2E static (litert-torch)",
                 "calibration_samples": len(calib), "size_bytes": tpath.stat().st_size}
            )  # fmt: skip
    elif opts.quantize == "fp16":
        if not any(
            "CUDA" in p or "Tensorrt" in p for r in inp.profile.runtimes for p in r.providers
        ):
            notes.append(
                f"fp16 requested for {inp.profile.name}, whose runtimes list no GPU provider; "
                "CPU fp16 is usually slower"
            )
        path = convert_fp16_onnx(pruned_onnx, work / "model.fp16.onnx")
        files["model.fp16.onnx"] = path
        variants.append(
            {"file": "model.fp16.onnx", "kind": "fp16 (float32 inputs/outputs)", "kind_id": "fp16",
             "calibration_samples": 0, "size_bytes": path.stat().st_size}
        )  # fmt: skip
        if pair:
            ref = convert_fp16_onnx(original_onnx, work / "original.fp16.onnx")
            files["reference/original.fp16.onnx"] = ref
            variants[-1]["original_file"] = "reference/original.fp16.onnx"


def _engine_models(
    opts: Options,
    profile: DeviceProfile,
    pruned_onnx: Path,
    original_onnx: Path,
    variants: list[dict[str, Any]],
    files: dict[str, Path],
) -> dict[str, tuple[Path, str]]:
    """The bundle's ONNX models build_engine.sh builds, each at the precision it is timed at."""
    from devices.runspec import gpu_settings
    from fair_edge.gpu_stage import run_spec, variant_precision

    base = gpu_settings(run_spec(opts), profile)["precision"]
    models = {"model.onnx": (pruned_onnx, base), "reference/original.onnx": (original_onnx, base)}
    for v in variants:
        if v["file"].endswith(".onnx"):
            prec = variant_precision(v["kind_id"])
            models[v["file"]] = (files[v["file"]], prec)
            if v.get("original_file"):
                models[v["original_file"]] = (files[v["original_file"]], prec)
    return models
