"""`fair-edge deploy`: one call from a trained model to a measured, edge-ready bundle.

The chain is a list of stages (STAGES), each a function of the run so far (`Run`): it reads what
earlier stages built and sets what it builds. Inputs are resolved and checked first
(fair_edge.inputs), so bad input fails in one line before any stage runs.

| stage | reads | builds | cached by |
|---|---|---|---|
| scores | model, calibration draw | FAIR scores | weights, samples, scoring options |
| export | model (or the given ONNX) | the unsimplified ONNX export | - |
| plan | scores, export, options | the plan (ToD level, budget, rounds, accuracy budget) | - |
| surgery | export, plan | the pruned ONNX (verified), the pruned torch module | - |
| recover | pruned module | BN re-estimated / recovered weights written into the ONNX | teacher, student, data, settings |
| simplify | both ONNX graphs | BN-folded graphs (checked unchanged) | - |
| tflite | torch modules | original and pruned TFLite (verified against ONNX) | - |
| quantize | pruned model | int8 / fp16 variants | - |
| accuracy | every shipped file | top-1 on the evaluation data, data record, warnings | - |
| measure | original and pruned files | latency and memory, measured in one run, on the device | - |
| bundle | everything | report (JSON, Markdown, HTML), manifest, bundle written atomically | - |
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from tqdm.auto import tqdm

from calibration.fileio import atomic_write_bytes
from devices.profile import DeviceProfile
from exporters.bundle import BundleSpec, tool_versions, write_bundle
from exporters.errors import ExportError
from exporters.evaluate import model_outputs
from fair_edge.config import DEFAULT_TOD, Options
from fair_edge.inputs import (
    INT8_CALIBRATION,
    VERIFY_SAMPLES,
    DeployError,
    Inputs,
    accuracy_of,
    apply_model_defaults,
    calibration_subset,
    check_model_runs,
    example_input,
    resolve_inputs,
    show_progress,
    torch_accuracy,
)
from fair_edge.plan_stage import channel_multiple, compute_scores, make_plan, prune_torch_model
from fair_edge.recovery_stage import RecoveryPlan
from fair_edge.stage_cache import StageCache
from pipeline.plan import Plan
from pipeline.scores import Scores

REPORT_SCHEMA = "fair-edge/deploy-report"
REPORT_VERSION = 1
SIMPLIFY_ATOL = 1e-4
# Below this a latency ratio says more about per-run overhead than the model: a whole 2-conv
# graph runs in 0.026 ms on ONNX Runtime CPU here, so the overhead is at most that much.
TINY_MODEL_MS = 0.1


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


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return float(a) / float(b)


def _input_name(path: Path) -> str:
    model = onnx.load(os.fspath(path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    return next(i.name for i in model.graph.input if i.name not in inits)


@dataclass
class Run:
    """One deploy run: its fixed inputs, and what each stage has built so far (None until then)."""

    opts: Options
    inp: Inputs
    cache: StageCache
    runner_path: Path
    say: Callable[[str], None]
    work: Path
    verify_x: np.ndarray
    model: torch.nn.Module | None
    notes: list[str] = field(default_factory=list)
    hits: dict[str, bool] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    scores: Scores | None = None
    raw_original: Path | None = None
    original_proto: onnx.ModelProto | None = None
    recovery_plan: RecoveryPlan | None = None
    rounds: Any = None
    tradeoff: dict[str, Any] | None = None
    plan: Plan | None = None
    pruned_proto: onnx.ModelProto | None = None
    surgery: Any = None
    pruned_model: torch.nn.Module | None = None
    acc_stages: dict[str, float | None] = field(default_factory=dict)
    bn_recal: dict[str, Any] | None = None
    recovery: dict[str, Any] | None = None
    raw_pruned: Path | None = None
    original_onnx: Path | None = None
    pruned_onnx: Path | None = None
    simplify: dict[str, Any] = field(default_factory=dict)
    tflite_files: dict[str, Path] = field(default_factory=dict)
    tflite_reports: dict[str, Any] = field(default_factory=dict)
    variants: list[dict[str, Any]] = field(default_factory=list)
    variant_files: dict[str, Path] = field(default_factory=dict)
    acc_orig: float | None = None
    acc_pruned: float | None = None
    data_record: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    comparisons: list[Any] = field(default_factory=list)
    measured_why: str = ""
    report_dir: Path | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    bundle: Path | None = None

    @property
    def profile(self) -> DeviceProfile:
        return self.inp.profile


# ------------------------------------------------------------------------------ stages


def scores_stage(r: Run) -> None:
    """FAIR scores of the model on the calibration draw (none when a plan file is given)."""
    if r.opts.plan is not None:
        return
    r.model = r.inp.source.require_torch("scoring")
    if r.opts.scores is not None:
        r.scores, r.hits["scores"] = Scores.load(r.opts.scores), True
    else:
        r.scores, r.hits["scores"] = compute_scores(r.model, r.inp.calibration, r.opts, r.cache)


def export_stage(r: Run) -> None:
    """The unsimplified ONNX export (parameter names kept), or a copy of the given ONNX."""
    from exporters.onnx_export import export_onnx, load_onnx

    r.raw_original = r.work / "original.raw.onnx"
    if r.model is not None:
        r.original_proto = export_onnx(
            r.model, example_input(r.inp.calibration), r.raw_original, opset=r.opts.opset
        )
    else:
        source = r.inp.source
        r.original_proto = load_onnx(source.onnx_path)
        shutil.copyfile(source.onnx_path, r.raw_original)


def plan_stage(r: Run) -> None:
    """The plan: a given plan file, pruning rounds, an accuracy budget, or a level/budget."""
    opts, model, profile = r.opts, r.model, r.profile
    r.recovery_plan = RecoveryPlan.of(opts, r.inp.source, r.inp, model)
    if opts.plan is not None:
        r.plan = Plan.load(opts.plan)
        if model is not None:
            r.plan.check_model(model)
    elif opts.rounds > 1:
        from fair_edge.recovery_stage import prune_in_rounds

        r.rounds = prune_in_rounds(model, r.inp.calibration, r.recovery_plan.data(), opts, r.cache,
                                   channel_multiple(opts, profile),
                                   progress=show_progress(opts))  # fmt: skip
        r.plan = r.rounds.plan
    elif opts.max_drop is not None:
        from fair_edge.accuracy_plan import plan_for_accuracy

        fixed = None
        if opts.latency_ms is not None:  # the most accurate plan under the latency
            fixed = make_plan(r.scores, r.original_proto, model, opts, profile)
        found = plan_for_accuracy(r.scores, r.original_proto, model, opts, profile,
                                  r.recovery_plan, r.cache, progress=show_progress(opts),
                                  fixed=fixed)  # fmt: skip
        r.plan, r.tradeoff = found.plan, found.to_json()
    else:
        r.plan = make_plan(r.scores, r.original_proto, model, opts, profile)
    if r.plan.pruned_units() == 0:
        r.notes.append(
            f"the plan removes no unit at ToD {opts.tod or DEFAULT_TOD}; raise --tod or set "
            "--target"
        )
    if model is not None:
        r.plan.method.setdefault("input_shape", [1, *r.inp.calibration.sample_shape])


def surgery_stage(r: Run) -> None:
    """The pruned ONNX graph (verified against the masked original) and the pruned torch module."""
    from exporters.surgery import apply_plan

    r.pruned_proto, r.surgery = apply_plan(r.original_proto, r.plan, verify_inputs=r.verify_x)
    if r.model is not None:
        r.pruned_model = prune_torch_model(
            r.model, r.plan, example_input(r.inp.calibration), r.original_proto
        )
        r.acc_stages["one-shot"] = torch_accuracy(r.pruned_model, r.inp.evaluation)


def recover_stage(r: Run) -> None:
    """BatchNorm re-estimation and recovery training; the new values written into the ONNX."""
    from exporters.bn_recal import batchnorm_layers, recalibrate_onnx
    from exporters.surgery import save_model

    opts, model = r.opts, r.model
    recal = opts.recalibrate_bn
    if recal is None:  # auto: whenever it can be done
        recal = model is not None and bool(batchnorm_layers(model))
    if recal and model is None:
        raise DeployError(
            "--recalibrate-bn needs the PyTorch model; an ONNX input cannot be "
            "recalibrated (drop the flag or give --model as PyTorch)"
        )
    if r.rounds is not None:
        r.pruned_model = r.rounds.model
        r.recovery = {"rounds": r.rounds.rounds}
    elif recal:
        recal_x = calibration_subset(r.inp.calibration, INT8_CALIBRATION, opts.seed)
        r.pruned_model, r.pruned_proto, rep = recalibrate_onnx(
            r.pruned_model, r.pruned_proto, recal_x, r.verify_x
        )
        r.bn_recal = rep.to_json()
        r.acc_stages["BN re-estimated"] = torch_accuracy(r.pruned_model, r.inp.evaluation)
        r.notes.append(
            f"BatchNorm statistics of {rep.layers} layers re-estimated on {rep.samples} "
            "calibration samples (no training)"
        )
    if r.recovery_plan.enabled and r.rounds is None:
        from fair_edge.recovery_stage import recovery_config, run_recovery

        rec = run_recovery(model, r.pruned_model, r.plan, r.recovery_plan.data(),
                           recovery_config(opts), r.cache, checkpoint=opts.checkpoint,
                           progress=show_progress(opts))  # fmt: skip
        r.pruned_model, r.recovery = rec.model, {**rec.record, "cached": rec.cached}
        r.hits["recovery"] = rec.cached
    if r.recovery is not None:
        from exporters.weights import write_back

        r.pruned_proto, wb = write_back(r.pruned_model, r.pruned_proto, r.verify_x)
        r.recovery["onnx_write_back"] = wb.to_json()
        r.acc_stages["recovered"] = torch_accuracy(r.pruned_model, r.inp.evaluation)
    r.raw_pruned = r.work / "pruned.raw.onnx"
    save_model(r.pruned_proto, r.raw_pruned)


def simplify_stage(r: Run) -> None:
    """Both graphs BatchNorm-folded and constant-folded, their outputs checked unchanged."""
    r.original_onnx, r.pruned_onnx = r.work / "original.onnx", r.work / "model.onnx"
    r.simplify = {
        "original": simplify_file(r.raw_original, r.original_onnx, r.verify_x),
        "pruned": simplify_file(r.raw_pruned, r.pruned_onnx, r.verify_x),
    }


def tflite_stage(r: Run) -> None:
    """Original and pruned TFLite, for profiles that list TFLite (or --runtime tflite)."""
    from fair_edge.variants_stage import build_tflite

    opts = r.opts
    if opts.runtime == "tflite" or (
        opts.runtime == "auto" and r.profile.runtime("tflite") is not None
    ):
        r.pruned_model = build_tflite(opts, r.inp, r.model, r.pruned_model, r.original_proto,
                                      r.plan, r.pruned_onnx, r.original_onnx, r.work, r.verify_x,
                                      r.tflite_files, r.tflite_reports, r.notes)  # fmt: skip


def quantize_stage(r: Run) -> None:
    """--quantize int8|fp16 variants of the pruned model (and of the original on GPU profiles)."""
    from fair_edge.variants_stage import build_variants

    if r.opts.quantize != "none":
        build_variants(r.opts, r.inp, r.pruned_model, r.pruned_onnx, r.work, r.variants,
                       r.variant_files, r.tflite_files, r.tflite_reports, r.notes,
                       r.original_onnx)  # fmt: skip


def accuracy_stage(r: Run) -> None:
    """Top-1 of every shipped file on the evaluation data, the data record and its warnings."""
    from fair_edge.summary import data_record

    ev = r.inp.evaluation
    r.acc_orig = accuracy_of(r.original_onnx, ev)
    r.acc_pruned = accuracy_of(r.pruned_onnx, ev)
    r.acc_stages = {"unpruned": r.acc_orig, **r.acc_stages, "shipped (pruned ONNX)": r.acc_pruned}
    r.data_record, r.warnings = data_record(r.opts, r.inp, r.acc_orig, scored=r.scores is not None)
    for w in r.warnings:
        r.say(f"warning: {w}")
    for v in r.variants:
        v["accuracy"] = accuracy_of(r.variant_files[v["file"]], ev)
        v["accuracy_change_points"] = (
            None
            if v["accuracy"] is None or r.acc_pruned is None
            else 100 * (v["accuracy"] - r.acc_pruned)
        )


def measure_stage(r: Run) -> None:
    """Original and pruned timed in one run on the device, per runtime and variant; the report."""
    from devices.report import measure_pair, write_report
    from devices.runspec import RunSpec
    from fair_edge.gpu_stage import run_spec, trtexec_pair, variant_precision

    profile = r.profile
    where, r.measured_why = choose_where(profile, r.opts.run_on)
    r.say(f"measuring original and pruned on {profile.name} ({where})")
    spec = run_spec(r.opts, runtime="onnxruntime")
    r.comparisons = [measure_pair(r.original_onnx, r.pruned_onnx, profile, where, spec)]
    tfl = r.tflite_files
    if "model.tflite" in tfl and "reference/original.tflite" in tfl:
        tspec = RunSpec(warmup=r.opts.warmup, runs=r.opts.runs, runtime="tflite")
        r.comparisons.append(measure_pair(tfl["reference/original.tflite"], tfl["model.tflite"],
                                          profile, where, tspec))  # fmt: skip
    for v in r.variants:  # GPU profiles: each variant, original vs pruned, same run
        ref = v.get("original_file")
        if ref is not None:
            vspec = dataclasses.replace(spec, precision=variant_precision(v["kind_id"]))
            r.comparisons.append(measure_pair(r.variant_files[ref], r.variant_files[v["file"]],
                                              profile, where, vspec))  # fmt: skip
    trt_pair, why_not = trtexec_pair(r.original_onnx, r.pruned_onnx, profile, where, spec)
    if trt_pair is not None:
        r.comparisons.append(trt_pair)
    if why_not:
        r.notes.append(why_not)
    r.report_dir = r.work / "report"
    estimates = []
    if not r.comparisons[0].original.representative:
        from devices.estimate import estimate_onnx

        estimates = [estimate_onnx(r.original_onnx, profile), estimate_onnx(r.pruned_onnx, profile)]
        r.notes.append(
            f"roofline estimate for {profile.name} from its published compute and "
            f"bandwidth (an estimate, not a measurement): original "
            f"{estimates[0].latency_ms:.3f} ms, pruned {estimates[1].latency_ms:.3f} ms "
            f"({estimates[0].latency_ms / estimates[1].latency_ms:.2f}x)"
        )
    write_report(r.report_dir, r.comparisons, estimates)
    if r.tradeoff is not None:
        from fair_edge.accuracy_plan import plot_tradeoff

        plot_tradeoff(r.tradeoff, r.report_dir / "tradeoff.png")
    p50 = r.comparisons[0].original.p50_ms
    if p50 is not None and p50 < TINY_MODEL_MS:
        r.notes.append(
            f"the original runs in {p50:.3f} ms, where per-run overhead dominates: its "
            "latency ratio is within measurement noise (FLOPs and size ratios still hold)"
        )


def bundle_stage(r: Run) -> None:
    """The report in JSON, Markdown and HTML from one summary; the bundle, written atomically."""
    from devices.report import device_sections, render, report_context, runtime_label
    from fair_edge.summary import summary_sections, summary_title

    head = r.comparisons[0]
    costs = _costs(r)
    r.summary = build_summary(r, costs)
    report_json = {
        "schema": REPORT_SCHEMA,
        "version": REPORT_VERSION,
        "summary": r.summary,
        "surgery": r.surgery.to_json(),
        "simplify": r.simplify,
        "tflite": r.tflite_reports,
        "cache": r.hits,
        "timings": r.timings,
        "options": r.opts.to_json(),
        "device_report": json.loads((r.report_dir / "report.json").read_text()),
    }
    context = report_context(
        summary_title(r.summary),
        summary_sections(r.summary, runtime_label(head.original, full=False))
        + device_sections(r.comparisons, lead=False),
    )
    bundle = BundleSpec(name=r.opts.name or f"{r.inp.source.name}-{r.profile.name}")
    bundle.add_file("model.onnx", r.pruned_onnx, "model")
    bundle.add_file("reference/original.onnx", r.original_onnx, "reference")
    for rel, path in {**r.tflite_files, **r.variant_files}.items():
        bundle.add_file(rel, path, "reference" if rel.startswith("reference/") else "model")
    tensorrt = None
    if r.profile.tensorrt:
        from fair_edge.gpu_stage import engine_bundle
        from fair_edge.variants_stage import engine_models

        script, tensorrt = engine_bundle(r.profile, bundle.name, engine_models(
            r.opts, r.profile, r.pruned_onnx, r.original_onnx, r.variants, r.variant_files))  # fmt: skip
        bundle.add_text("build_engine.sh", script, "tensorrt")
    bundle.add_file("runner.py", r.runner_path, "runner")
    for png in ("latency.png", "bars.png"):
        if (r.report_dir / png).is_file():
            bundle.add_file(png, r.report_dir / png, "report")
    bundle.add_text("plan.json", json.dumps(r.plan.to_json(), indent=1) + "\n", "plan")
    if r.pruned_model is not None:
        from exporters.weights import save_pruned_weights

        weights = save_pruned_weights(r.pruned_model, r.plan, r.work / "weights.safetensors")
        bundle.add_file("weights.safetensors", weights, "weights")
    if r.tradeoff is not None and (r.report_dir / "tradeoff.png").is_file():
        bundle.add_file("tradeoff.png", r.report_dir / "tradeoff.png", "report")
    bundle.add_text("labels.txt", "\n".join(r.inp.calibration.class_names) + "\n", "labels")
    bundle.add_text("report.md", render(context, "md"), "report")
    bundle.add_text("report.html", render(context, "html"), "report")
    bundle.add_text("report.json", json.dumps(report_json, indent=1, default=str) + "\n", "report")
    bundle.manifest = build_manifest(r, costs)
    if tensorrt is not None:
        bundle.manifest["tensorrt"] = tensorrt
    r.bundle = write_bundle(r.opts.out, bundle)


STAGES: tuple[tuple[str, Callable[[Run], None]], ...] = (
    ("scores", scores_stage),
    ("export", export_stage),
    ("plan", plan_stage),
    ("surgery", surgery_stage),
    ("recover", recover_stage),
    ("simplify", simplify_stage),
    ("tflite", tflite_stage),
    ("quantize", quantize_stage),
    ("accuracy", accuracy_stage),
    ("measure", measure_stage),
    ("bundle", bundle_stage),
)


# ------------------------------------------------------------------------------ report data


def _costs(r: Run) -> tuple[Any, Any, int, int]:
    """(cost of the original, of the pruned, size of the original, of the pruned)."""
    from exporters.costs import count_cost

    cost_o = count_cost(onnx.load(os.fspath(r.original_onnx)))
    cost_p = count_cost(onnx.load(os.fspath(r.pruned_onnx)))
    return cost_o, cost_p, r.original_onnx.stat().st_size, r.pruned_onnx.stat().st_size


def build_summary(r: Run, costs: tuple[Any, Any, int, int]) -> dict[str, Any]:
    """The headline figures every report format is rendered from."""
    head = r.comparisons[0]
    cost_o, cost_p, size_o, size_p = costs
    acc_o, acc_p = r.acc_orig, r.acc_pruned
    summary: dict[str, Any] = {
        "model": r.inp.source.name,
        "device": r.profile.name,
        "measured_where": head.device,
        "measured_why": r.measured_why,
        "representative": head.original.representative,
        "accuracy_on": (
            "the calibration data (no separate evaluation data given)"
            if r.inp.eval_is_calibration
            else f"{r.inp.evaluation.source}, {len(r.inp.evaluation)} samples"
        ),
        "ratios": {
            "latency_speedup": head.ratios["speedup_p50"],
            "memory": head.ratios["peak_rss_ratio"],
            "size": ratio(size_p, size_o),
            "flops": ratio(cost_p.flops, cost_o.flops),
            "params": ratio(cost_p.params, cost_o.params),
            "accuracy_change_points": (
                None if acc_o is None or acc_p is None else 100 * (acc_p - acc_o)
            ),
        },
        "metrics": {
            "latency_p50_ms": [head.original.p50_ms, head.pruned.p50_ms],
            "peak_rss_mb": [head.original.peak_rss_mb, head.pruned.peak_rss_mb],
            "size_bytes": [size_o, size_p],
            "flops": [cost_o.flops, cost_p.flops],
            "params": [cost_o.params, cost_p.params],
            "accuracy": [acc_o, acc_p],
        },
        "variants": r.variants,
        "bn_recalibration": r.bn_recal,
        "accuracy_stages": r.acc_stages,
        "recovery": r.recovery,
        "tradeoff": r.tradeoff,
        "notes": r.notes,
        "data": r.data_record,
        "warnings": r.warnings,
    }
    for c in r.comparisons[1:]:
        if c.original.runtime.get("name") == "tflite":
            summary["tflite_latency_speedup"] = c.ratios["speedup_p50"]
        elif c.original.runtime.get("name") == "trtexec":
            summary["trtexec_latency_speedup"] = c.ratios["speedup_p50"]
        else:
            summary.setdefault("variant_latency_speedup", {})[c.pruned.model["name"]] = c.ratios[
                "speedup_p50"
            ]
    return summary


def build_manifest(r: Run, costs: tuple[Any, Any, int, int]) -> dict[str, Any]:
    """manifest.json: what the board needs to run the bundle, and what each file is."""
    cost_o, cost_p, size_o, size_p = costs
    cal = r.inp.calibration
    x0 = example_input(cal)
    return {
        "model": r.inp.source.to_json(),
        "device": {
            "profile": r.profile.name,
            "arch": r.profile.arch,
            "measured": r.comparisons[0].device,
        },  # fmt: skip
        "input": {
            "name": _input_name(r.pruned_onnx),
            "shape": ["batch", *list(x0.shape[1:])],
            "dtype": "float32",
            "layout": cal.preprocessing.layout,
        },
        "preprocessing": cal.preprocessing.to_json(),
        "preprocessing_steps": cal.preprocessing.steps(),
        "onnx_opset": r.opts.opset,
        "labels": list(cal.class_names),
        "data": {"calibration": cal.to_json(), "evaluation": r.inp.evaluation.to_json()},
        "plan": r.plan.to_json(),
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
                "before": r.acc_orig,
                "after": r.acc_pruned,
                "on": r.summary["accuracy_on"],
            },  # fmt: skip
            "size_bytes": {"before": size_o, "after": size_p},
            "variants": r.variants,
            "bn_recalibration": r.bn_recal,
        },
        "ratios": r.summary["ratios"],
        "tool_versions": tool_versions(),
        "pytorch": None
        if r.pruned_model is None
        else {
            "weights": "weights.safetensors",
            "plan": "plan.json",
            "load": "exporters.weights.load_pruned(your_model_factory, 'plan.json', "
            "'weights.safetensors')",
        },
        "run": {
            "command": "python " + str(r.runner_path.name) + " model.onnx --hashes manifest.json"
        },
    }


# ------------------------------------------------------------------------------ deploy


def deploy(
    opts: Options,
    *,
    cache: StageCache | None = None,
    runner: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
) -> DeployResult:
    """Run the whole chain for `opts` and return where the bundle and its report are."""
    from devices.runspec import RUNNER_PATH

    opts.validate()
    t0 = time.perf_counter()
    notes: list[str] = []
    inp = resolve_inputs(opts)  # bad input fails here, before any bar or file
    opts = apply_model_defaults(opts, inp.source, notes)
    if inp.source.model is not None:
        check_model_runs(inp.source.model, inp.calibration, inp.source, opts)
    timings = {"inputs": round(time.perf_counter() - t0, 3)}
    bar = tqdm(total=len(STAGES), disable=not show_progress(opts), unit="stage", leave=False)
    with tempfile.TemporaryDirectory(prefix="fair-edge-deploy-") as tmp_name, bar:
        r = Run(
            opts=opts,
            inp=inp,
            cache=cache or StageCache.default(enabled=opts.cache),
            runner_path=Path(runner) if runner is not None else RUNNER_PATH,
            say=log or (lambda _msg: None),
            work=Path(tmp_name),
            verify_x=calibration_subset(inp.calibration, VERIFY_SAMPLES, opts.seed),
            model=inp.source.model,
            notes=notes,
            timings=timings,
        )
        for name, stage in STAGES:
            bar.set_description(name)
            start = time.perf_counter()
            stage(r)
            timings[name] = round(time.perf_counter() - start, 3)
            bar.update(1)
    return DeployResult(
        bundle=r.bundle,
        report=r.bundle / "report.md",
        summary=r.summary,
        cache=r.hits,
        timings=timings,
        notes=r.notes,
    )
