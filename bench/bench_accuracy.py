"""Accuracy benchmark: one-shot FAIR pruning vs uniform L1, uniform random, ToD-ratio L1 and the
authors' network-pruner 2.16, on Fashion-MNIST (10,000 test images), plus fine-tuning.

    python -m bench.bench_accuracy [--models vgg,resnet] [--no-reference] [--no-effnet]

Networks (bench/accuracy_models.py) are trained once on the full training set and cached.
Calibration: 32 samples per class, drawn class-balanced (seed 0) from the training set. Every
method's plan is applied by physical surgery (exporters.torch_prune.prune_torch) and evaluated on
all 10,000 test images; FLOPs/params from the exact ONNX cost model (exporters.costs). The
reference runs in bench/.env (bench/reference_prune.py) on the same samples; its pruned models are
measured here the same way. Writes bench/results-accuracy.json, bench/plots/accuracy-*.png and the
tables of bench/RESULTS-accuracy.md (text after the notes marker is kept).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bench.accuracy_models import BUILDERS, FULL_EPOCH, VGG_FM_CFG, trained
from calibration.data import CalibrationSet
from calibration.fileio import atomic_write_bytes, atomic_write_text, cache_dir
from calibration.sampling import balanced_sample
from exporters.bn_recal import recalibrate_bn
from exporters.costs import OnnxCostModel, count_cost
from exporters.graph_groups import find_groups
from exporters.onnx_export import export_onnx
from exporters.torch_prune import prune_torch
from pipeline.baselines import (
    l1_importance,
    plan_counts,
    plan_from_importance,
    random_importance,
    uniform_counts,
    uniform_plan_for_budget,
)
from pipeline.plan import ModelFingerprint, Plan, PlanError
from pipeline.planning import plan as fair_plan
from pipeline.planning import plan_for_budget
from pipeline.scoring import score
from pipeline.train import default_data, evaluate, train

ROOT = Path(__file__).resolve().parent
PLOTS = ROOT / "plots"
RESULTS_MD = ROOT / "RESULTS-accuracy.md"
RESULTS_JSON = ROOT / "results-accuracy.json"
RESULTS_REF_JSON = ROOT / "results-accuracy-reference.json"  # --reference-only writes here
NOTES_MARK = "<!-- notes: kept across runs -->"
ALPHAS = (0.005, 0.02, 0.05, 0.1, 0.3)
ALPHAS_OTHER = (0.02, 0.3)  # where='bn'/'act': fewer sweep points (CPU time)
RATIOS = (0.1, 0.25, 0.4, 0.55)
TARGET = 0.5
SPC = 32
X1 = torch.zeros(1, 1, 28, 28)


class Context:
    """One trained network with its export, groups, exact cost model and test set."""

    def __init__(
        self, name: str, test: CalibrationSet, calib: CalibrationSet, seed: int = 0
    ) -> None:
        self.name = name
        self.model, self.meta = trained(name, progress=False, seed=seed)
        self.test, self.calib = test, calib
        self.onnx = export_onnx(self.model, X1, None)
        self.groups = find_groups(self.onnx)
        self.cost = OnnxCostModel(self.onnx)
        self.base = count_cost(self.onnx)
        self.fp = ModelFingerprint.from_model(self.model)

    def measure(
        self, plan: Plan, label: str, finetune: CalibrationSet | None = None
    ) -> dict[str, Any]:
        rem = self.cost.remaining(plan)
        pruned = prune_torch(self.model, plan, X1, self.onnx, verify=False)
        row = {
            "method": label,
            "flops_removed": 1 - rem["flops"],
            "params_removed": 1 - rem["params"],
            "top1": evaluate(pruned, self.test),
            "top1_bn_recal": evaluate(recalibrate(pruned, self.calib), self.test),
            "kept": {n: lp.kept for n, lp in plan.layers.items()},
            "units": {n: lp.n_units for n, lp in plan.layers.items()},
        }
        if finetune is not None:
            row["top1_finetuned"] = self.finetune(pruned, finetune)
        return row

    def finetune(self, pruned: nn.Module, data: CalibrationSet) -> float:
        train(pruned, data, epochs=1, batch_size=128, lr=1e-3, seed=0, progress=False)
        return evaluate(pruned, self.test)


def recalibrate(model: nn.Module, calib: CalibrationSet) -> nn.Module:
    """The model with BatchNorm statistics re-estimated on the calibration inputs (no training)."""
    return recalibrate_bn(model, calib.inputs)[0]


def _ref_count(d_order: list[int], re_order: list[int], level: float) -> int:
    """The reference's get_ratios rule on its own orders (largest k <= int(0.99 n) within level)."""
    n = len(d_order)
    top = int(0.99 * n)
    for k in range(top, 0, -1):
        if len(set(d_order[:k]) & set(re_order[n - k :])) / k <= level:
            return k
    return 0


def _resized(build: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Our architecture with every tensor (and layer attribute) shaped like a pruned state_dict."""
    for key, t in state.items():
        prefix, attr = key.rsplit(".", 1)
        mod = build.get_submodule(prefix)
        if attr in mod._parameters:
            mod._parameters[attr] = nn.Parameter(t.clone())
        else:
            mod._buffers[attr] = t.clone()
    for mod in build.modules():
        if isinstance(mod, nn.Conv2d):
            if mod.groups > 1 and mod.groups == mod.out_channels:  # depthwise stays depthwise
                mod.groups = mod.weight.shape[0]
            mod.out_channels = mod.weight.shape[0]
            mod.in_channels = mod.weight.shape[1] * mod.groups
        elif isinstance(mod, nn.BatchNorm2d):
            mod.num_features = mod.weight.shape[0]
        elif isinstance(mod, nn.Linear):
            mod.out_features, mod.in_features = mod.weight.shape
    return build.eval()


def reference_metrics(
    ctx: Context, layers: list[str], spc: int
) -> tuple[Path, list[str], float | None]:
    """Their get_metrics in bench/.env, cached per (weights, samples, layers): it is slow."""
    py = ROOT / ".env" / "bin" / "python"
    if not py.exists():
        raise PlanError("bench/.env missing: run bench/setup_reference_env.sh")
    buf = io.BytesIO()
    torch.save(ctx.model.state_dict(), buf)
    key = hashlib.sha256(buf.getvalue() + ctx.calib.inputs.tobytes() + ",".join(layers).encode())
    work = cache_dir("bench-accuracy", f"{ctx.name}-{key.hexdigest()[:12]}-spc{spc}")
    weights, calib = work / "weights.pt", work / "calib.npz"
    atomic_write_bytes(weights, buf.getvalue())
    if not calib.exists():
        np.savez(calib, x=ctx.calib.inputs, y=ctx.calib.labels)
    cmd = [str(py), "-m", "bench.reference_prune"]
    common = ["--model", ctx.name, "--weights", str(weights), "--calib", str(calib)]
    common += ["--layers", ",".join(layers), "--out", str(work), "--samples-per-class", str(spc)]
    seconds = None
    if not (work / "metrics.json").exists():
        t0 = time.perf_counter()
        proc = subprocess.run(
            cmd + ["metrics"] + common, cwd=ROOT.parent, capture_output=True, text=True
        )
        if proc.returncode:
            raise PlanError("get_metrics failed: " + proc.stderr.strip().splitlines()[-1])
        seconds = time.perf_counter() - t0
    return work, cmd + ["prune"] + common, seconds


def run_reference(ctx: Context, layers: list[str], spc: int, ft: CalibrationSet | None) -> dict:
    """network-pruner 2.16 end to end in bench/.env; its pruned models measured here."""
    try:
        work, prune_cmd, _ = reference_metrics(ctx, layers, spc)
    except PlanError as exc:
        return {"error": str(exc)}
    m = json.loads((work / "metrics.json").read_text())
    # the level whose plan (their orders, their ToD rule) first removes TARGET of the FLOPs
    levels = np.unique(np.concatenate([np.geomspace(1e-3, 0.5, 80), ALPHAS]))
    order = {n: np.asarray(m[n]["D_order"]) for n in layers}
    pick = None
    for lvl in levels:
        counts = {n: _ref_count(m[n]["D_order"], m[n]["RE_order"], lvl) for n in layers}
        imp = {n: np.argsort(order[n]).astype(float) for n in layers}  # rank in their D order
        p = plan_from_importance(imp, counts, ctx.fp, ctx.groups)
        if 1 - ctx.cost.remaining(p)["flops"] >= TARGET:
            pick = float(lvl)
            break
    want = sorted({*ALPHAS, *([pick] if pick is not None else [])})
    proc = subprocess.run(
        prune_cmd[:4] + ["--levels", ",".join(map(repr, want))] + prune_cmd[4:],
        cwd=ROOT.parent,
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        return {"error": "prune failed: " + proc.stderr.strip().splitlines()[-1]}
    rep = json.loads((work / "prune.json").read_text())
    rows = []
    for lvl in want:
        e = rep[repr(lvl)] if repr(lvl) in rep else rep.get(str(lvl), {})
        if "error" in e or not e:
            rows.append(
                {
                    "method": f"reference a={lvl:.4g}",
                    "level": lvl,
                    "error": e.get("error", "missing"),
                }
            )
            continue
        state = torch.load(work / e["weights"], map_location="cpu", weights_only=True)
        model = _resized(BUILDERS[ctx.name](), state)
        cost = count_cost(export_onnx(model, X1, None))
        row = {
            "method": "reference",
            "level": lvl,
            "flops_removed": 1 - cost.flops / ctx.base.flops,
            "params_removed": 1 - cost.params / ctx.base.params,
            "top1": evaluate(model, ctx.test),
            "top1_bn_recal": evaluate(recalibrate(model, ctx.calib), ctx.test),
            "kept": {n: int(model.get_submodule(n).weight.shape[0]) for n in layers},
            "units": {n: int(ctx.model.get_submodule(n).weight.shape[0]) for n in layers},
            "at_target": lvl == pick,
        }
        if ft is not None and lvl == pick:
            row["top1_finetuned"] = ctx.finetune(model, ft)
        rows.append(row)
    return {
        "metrics_seconds": m.get("seconds"),
        "samples_per_class": spc,
        "picked_level": pick,
        "rows": rows,
    }


def _finetune_set(train_set: CalibrationSet, n: int) -> CalibrationSet | None:
    """The images of the one fine-tuning epoch: a seeded subset of the training set (0: none)."""
    if not n:
        return None
    idx = np.random.default_rng(1).permutation(len(train_set))[:n]
    return train_set.subset(np.sort(idx))


def run_model(
    name: str,
    args: argparse.Namespace,
    train_set: CalibrationSet,
    test: CalibrationSet,
    on_row: Any = None,
) -> dict:
    """Every method on one network; `on_row(partial result)` after each measured row."""
    calib, report = balanced_sample(train_set, SPC, seed=0)
    ft = _finetune_set(train_set, args.finetune_samples)
    alphas, alphas_other, ratios = (
        (ALPHAS, ALPHAS_OTHER, RATIOS)
        if not args.small_sweep
        else ((0.02, 0.1, 0.3), (), (0.2, 0.4))
    )
    ctx = Context(name, test, calib)
    out: dict[str, Any] = {
        "model": name,
        "trained": ctx.meta,
        "base_top1": evaluate(ctx.model, test),
        "base_top1_bn_recal": evaluate(recalibrate(ctx.model, calib), test),
        "base_flops": ctx.base.flops,
        "base_params": ctx.base.params,
        "calibration": calib.to_json() | {"sampling": report.to_json()},
        "finetune_samples": args.finetune_samples,
    }
    print(f"[{name}] base top-1 {out['base_top1']:.4f}", flush=True)
    scores = {}
    for where in ("raw", "bn", "act"):
        t0 = time.perf_counter()
        scores[where] = score(
            ctx.model, calib, samples_per_class=SPC, where=where, seed=0, progress=False
        )
        out[f"score_seconds_{where}"] = round(time.perf_counter() - t0, 2)
    layers = scores["raw"].names()
    out["layers"] = layers
    rows: list[dict] = []
    out["rows"] = rows
    l1 = l1_importance(ctx.model, layers)
    at_target: list[tuple[dict, Plan]] = []

    def add(p: Plan, label: str, target: bool = False, **extra: Any) -> None:
        row = ctx.measure(p, label) | extra
        if target:
            row["at_target"] = True
            at_target.append((row, p))
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("kept", "units")}), flush=True)
        if on_row is not None:
            on_row(out)

    # 1) every method at the TARGET FLOPs reduction (smallest setting reaching it)
    fair_at: dict[str, Plan] = {}
    for where, sc in scores.items():
        try:
            p = plan_for_budget(sc, TARGET, "flops", ctx.cost, ctx.groups, ctx.model, strict=False)
        except PlanError as exc:
            out[f"fair_{where}_budget_error"] = str(exc)
            continue
        fair_at[where] = p
        add(p, f"fair-{where}", True, alpha=p.method["alpha"])
        if where == "raw":
            p = uniform_plan_for_budget(l1, TARGET, ctx.cost, ctx.fp, ctx.groups)
            add(p, "uniform-l1", True, ratio=p.method["ratio"])
            p = plan_from_importance(l1, plan_counts(fair_at[where]), ctx.fp, ctx.groups)
            add(p, f"tod-l1-{where}", True)
            rnd = random_importance(ctx.model, layers, seed=0)
            p = uniform_plan_for_budget(rnd, TARGET, ctx.cost, ctx.fp, ctx.groups)
            add(p, "uniform-random", True, ratio=p.method["ratio"], seed=0)
    # 2) sweeps (no fine-tuning)
    for a in alphas:
        p = fair_plan(scores["raw"], a, groups=ctx.groups, model=ctx.model)
        add(p, "fair-raw", alpha=a)
        add(plan_from_importance(l1, plan_counts(p), ctx.fp, ctx.groups), "tod-l1-raw", alpha=a)
    for r in ratios:
        add(
            plan_from_importance(l1, uniform_counts(l1, r), ctx.fp, ctx.groups),
            "uniform-l1",
            ratio=r,
        )
        rnd = random_importance(ctx.model, layers, seed=0)
        add(
            plan_from_importance(rnd, uniform_counts(rnd, r), ctx.fp, ctx.groups),
            "uniform-random",
            ratio=r,
        )
    for where in ("bn", "act"):
        for a in alphas_other:
            add(
                fair_plan(scores[where], a, groups=ctx.groups, model=ctx.model),
                f"fair-{where}",
                alpha=a,
            )
        if where in fair_at:
            p = plan_from_importance(l1, plan_counts(fair_at[where]), ctx.fp, ctx.groups)
            add(p, f"tod-l1-{where}", True)
    for seed in (1, 2):
        rnd = random_importance(ctx.model, layers, seed=seed)
        p = uniform_plan_for_budget(rnd, TARGET, ctx.cost, ctx.fp, ctx.groups)
        add(p, "uniform-random", True, ratio=p.method["ratio"], seed=seed)
    # 3) one fine-tuning epoch for every method at the target (random: seed 0)
    if ft is not None:
        for row, p in at_target:
            if row.get("seed", 0) == 0:
                pruned = prune_torch(ctx.model, p, X1, ctx.onnx, verify=False)
                row["top1_finetuned"] = ctx.finetune(pruned, ft)
                if on_row is not None:
                    on_row(out)
    if not args.no_reference:
        out["reference"] = run_reference(ctx, layers, args.ref_samples_per_class, ft)
    return out


# ---------- report ----------


def _plots(results: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    PLOTS.mkdir(parents=True, exist_ok=True)
    files = []
    fig, axes = plt.subplots(len(results), 2, figsize=(12, 4.5 * len(results)), squeeze=False)
    for row_axes, res in zip(axes, results, strict=True):
        for ax, key in zip(row_axes, ("top1", "top1_bn_recal"), strict=True):
            sweep = [r for r in res["rows"] if key in r]
            for method in sorted({r["method"] for r in sweep}):
                pts = sorted((r["flops_removed"], r[key]) for r in sweep if r["method"] == method)
                ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=method)
            ref = [r for r in res.get("reference", {}).get("rows", []) if key in r]
            if ref:
                pts = sorted((r["flops_removed"], r[key]) for r in ref)
                ax.plot(
                    *zip(*pts, strict=True),
                    marker="s",
                    ms=4,
                    color="black",
                    label="network-pruner 2.16",
                )
            ax.axhline(res["base_top1"], color="grey", ls=":", lw=1, label="unpruned")
            ax.axvline(TARGET, color="grey", ls="--", lw=0.8)
            what = (
                "no fine-tuning" if key == "top1" else "BN statistics re-estimated, no fine-tuning"
            )
            ax.set(
                title=f"{res['model']}: {what}",
                xlabel="FLOPs removed",
                ylabel="top-1 (10,000 test images)",
            )
            ax.set_ylim(0, 1)
            ax.legend(fontsize=6)
    fig.tight_layout()
    f = PLOTS / "accuracy-vs-flops.png"
    fig.savefig(f, dpi=80)
    plt.close(fig)
    files.append(f.name)
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, res in zip(axes[0], results, strict=True):
        at = {r["method"]: r for r in res["rows"] if r.get("at_target") and r.get("seed", 0) == 0}
        for r in res.get("reference", {}).get("rows", []):
            if r.get("at_target") and "kept" in r:
                at["reference"] = r
        layers = res["layers"]
        shown = [
            m for m in ("fair-raw", "fair-bn", "fair-act", "uniform-l1", "reference") if m in at
        ]
        w = 0.8 / max(1, len(shown))
        for i, m in enumerate(shown):
            ratios = [1 - at[m]["kept"][n] / at[m]["units"][n] for n in layers]
            ax.bar(np.arange(len(layers)) + i * w, ratios, w, label=m)
        ax.set_xticks(
            np.arange(len(layers)) + 0.4 - w / 2, layers, rotation=60, fontsize=6, ha="right"
        )
        ax.set(
            title=f"{res['model']}: per-layer pruning ratio at {TARGET:.0%} FLOPs removed",
            ylabel="units removed",
        )
        ax.legend(fontsize=6)
    fig.tight_layout()
    f = PLOTS / "accuracy-layer-ratios.png"
    fig.savefig(f, dpi=80)
    plt.close(fig)
    files.append(f.name)
    return files


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else ("-" if v is None else str(v))


def _markdown(results: list[dict], env: dict, plots: list[str]) -> str:
    lines = [
        "# Accuracy benchmark (Fashion-MNIST, one-shot structured pruning)",
        "",
        f"Report written {env['date']}; torch {env['torch']}; {env['threads']} threads; CPU only "
        "(a 2-core machine shared with other jobs: wall times are not speed measurements).",
        "",
        f"Networks trained once ({json.dumps(FULL_EPOCH)}) on all 60,000 training images; "
        f"VGG cfg {list(VGG_FM_CFG)} hidden 128, ResNet blocks (1,1,1) widths (16,32,64). "
        f"Calibration: {SPC} samples per class (class-balanced, seed 0) from the training set. "
        "Top-1 on all 10,000 test images after physical pruning (prune_torch); FLOPs and params "
        "from the ONNX cost model (exporters.costs).",
        "",
    ]
    for res in results:
        lines += [
            f"## {res['model']}",
            "",
            f"Command: `{res.get('command', '?')}` ({res.get('date', '?')}); fine-tuning: one epoch "
            f"(Adam, one-cycle LR 1e-3) on {res.get('finetune_samples', '?')} training images.",
            "",
            f"Unpruned top-1 {res['base_top1']:.4f} ({_fmt(res.get('base_top1_bn_recal'))} with BN "
            "re-estimated on the calibration samples); "
            f"{res['base_flops']:,} FLOPs; {res['base_params']:,} params; "
            f"training took {res['trained'].get('train_seconds', '?')} s. Scoring (one pass): "
            + ", ".join(f"{w} {res.get(f'score_seconds_{w}')} s" for w in ("raw", "bn", "act"))
            + ".",
            "",
            f"### At {TARGET:.0%} FLOPs reduction (smallest setting reaching it)",
            "",
            "| method | setting | FLOPs removed | params removed | top-1 | top-1, BN re-estimated | top-1 after 1 fine-tune epoch |",
            "|---|---|---|---|---|---|---|",
        ]
        at = [r for r in res["rows"] if r.get("at_target")]
        at += [r for r in res.get("reference", {}).get("rows", []) if r.get("at_target")]
        for r in at:
            setting = (
                f"alpha={r['alpha']:.4g}"
                if "alpha" in r
                else f"ratio={r['ratio']:.3f}"
                if "ratio" in r
                else f"level={r['level']:.4g}"
                if "level" in r
                else "FAIR counts"
            )
            if "seed" in r:
                setting += f" seed={r['seed']}"
            lines.append(
                f"| {r['method']} | {setting} | {_fmt(r.get('flops_removed'))} | {_fmt(r.get('params_removed'))} "
                f"| {_fmt(r.get('top1'))} | {_fmt(r.get('top1_bn_recal'))} | {_fmt(r.get('top1_finetuned'))} |"
            )
        ref = res.get("reference", {})
        if "error" in ref:
            lines += ["", f"Reference: {ref['error']}"]
        elif ref:
            lines += [
                "",
                f"Reference get_metrics took {ref['metrics_seconds']} s; level picked for {TARGET:.0%}: {ref['picked_level']}.",
            ]
        lines += [
            "",
            "### Sweep (no fine-tuning)",
            "",
            "| method | setting | FLOPs removed | params removed | top-1 | top-1, BN re-estimated |",
            "|---|---|---|---|---|---|",
        ]
        sweep = [r for r in res["rows"] if not r.get("at_target")]
        sweep += [r for r in ref.get("rows", []) if not r.get("at_target")]
        for r in sweep:
            setting = (
                f"alpha={r['alpha']}"
                if "alpha" in r
                else f"ratio={r['ratio']}"
                if "ratio" in r
                else f"level={r.get('level')}"
            )
            if "error" in r:
                lines.append(f"| {r['method']} | {setting} | - | - | error: {r['error']} |")
                continue
            lines.append(
                f"| {r['method']} | {setting} | {_fmt(r['flops_removed'])} | {_fmt(r['params_removed'])} "
                f"| {_fmt(r['top1'])} | {_fmt(r.get('top1_bn_recal'))} |"
            )
        lines.append("")
    lines += [f"![{p}](plots/{p})" for p in plots] + [""]
    return "\n".join(lines)


def _load_results() -> dict[str, dict]:
    if not RESULTS_JSON.exists():
        return {}
    return {r["model"]: r for r in json.loads(RESULTS_JSON.read_text()).get("results", [])}


def _write(results: dict[str, dict], env: dict) -> str:
    if RESULTS_REF_JSON.exists():
        for name, ref in json.loads(RESULTS_REF_JSON.read_text()).items():
            if name in results:
                results[name]["reference"] = ref
    ordered = [results[k] for k in sorted(results, key=lambda k: (k != "vgg", k))]
    atomic_write_text(RESULTS_JSON, json.dumps({"env": env, "results": ordered}, indent=1))
    plots = _plots(ordered)
    md = _markdown(ordered, env, plots)
    notes = ""
    if RESULTS_MD.exists() and NOTES_MARK in RESULTS_MD.read_text():
        notes = RESULTS_MD.read_text().split(NOTES_MARK, 1)[1]
    atomic_write_text(RESULTS_MD, md + "\n" + NOTES_MARK + notes)
    return md


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vgg,resnet")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--finetune-samples", type=int, default=60000, help="0: no fine-tuning")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ref-samples-per-class", type=int, default=SPC)
    ap.add_argument(
        "--reference-metrics-only",
        action="store_true",
        help="only run (and cache) the reference's get_metrics, e.g. in a parallel process",
    )
    ap.add_argument(
        "--reference-only",
        action="store_true",
        help="only (re)measure the reference and merge it into the existing results",
    )
    ap.add_argument("--small-sweep", action="store_true", help="fewer sweep points (CPU time)")
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from the JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    command = "python -m bench.bench_accuracy " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    results = _load_results()
    if args.report_only:
        print(_write(results, env))
        return 0
    train_set, test = default_data("train"), default_data("test")
    for name in args.models.split(","):
        t0 = time.perf_counter()
        calib, _ = balanced_sample(train_set, SPC, seed=0)
        if args.reference_metrics_only or args.reference_only:
            ctx = Context(name, test, calib)
            sc = score(ctx.model, calib, samples_per_class=SPC, where="raw", seed=0, progress=False)
            if args.reference_metrics_only:
                _, _, secs = reference_metrics(ctx, sc.names(), args.ref_samples_per_class)
                print(f"[{name}] reference get_metrics: {secs} s", flush=True)
                continue
            ft = _finetune_set(train_set, args.finetune_samples)
            ref = run_reference(ctx, sc.names(), args.ref_samples_per_class, ft)
            ref["command"] = command
            ref["date"] = env["date"]
            refs = json.loads(RESULTS_REF_JSON.read_text()) if RESULTS_REF_JSON.exists() else {}
            refs[name] = ref
            atomic_write_text(RESULTS_REF_JSON, json.dumps(refs, indent=1))
            print(json.dumps(ref)[:3000], flush=True)
            continue
        else:

            def partial(out: dict, name: str = name) -> None:
                results[name] = out | {"command": command, "date": env["date"], "partial": True}
                atomic_write_text(
                    RESULTS_JSON,
                    json.dumps({"env": env, "results": list(results.values())}, indent=1),
                )

            res = run_model(name, args, train_set, test, partial)
            res["command"] = command
            old = results.get(name, {})
            if "reference" not in res and "reference" in old:
                res["reference"] = old["reference"]
            res["bench_seconds"] = round(time.perf_counter() - t0, 1)
        res["date"] = env["date"]
        res.pop("partial", None)
        results[name] = res
        _write(results, env)
    if not (args.reference_metrics_only or args.reference_only):
        print(_write(results, env))
    return 0


if __name__ == "__main__":
    sys.exit(main())
