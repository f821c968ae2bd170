"""Ranking study (issue 11): FAIR variants vs simple baselines, one-shot, BN re-estimated, recovered.

    nice -n 5 .venv/bin/python -m bench.bench_study [--models vgg,resnet,mobilenet] [--seeds 0,1]
        [--levels 0.3,0.5,0.7] [--steps 60] [--recover-levels 0.5,0.7]
        [--recover-methods fair,uniform-l1,uniform-random,torch-pruning] [--recover-seeds 0]

Networks: the accuracy bench's plain VGG, residual ResNet and inverted-residual (depthwise)
MobileNet for Fashion-MNIST (bench/accuracy_models.py), each trained one epoch per training seed
and cached. Per network and seed, the calibration draw of bench_accuracy (32 per class, seed 0)
scores FAIR four ways: U on the raw output with R in eval mode (`fair`, the project default),
U after BatchNorm (`fair-bn`), U after the activation (`fair-act`), R in train mode
(`fair-R-train`, reference_compat=True). Each is planned by ToD for the FLOPs level
(plan_for_budget, strict=False; the share reached is recorded). Peers, planned with one uniform
per-layer ratio (pipeline.baselines.uniform_plan_for_budget) at the share the default FAIR
reached (or the level): FAIR's U alone (`U-alone`), FAIR's R alone (`Taylor-alone`), weight L1
(`uniform-l1`), seeded random (`uniform-random`), and Torch-Pruning 1.6.1's own pruner with its
GroupNormImportance (`torch-pruning`, bench/tp_prune.py in bench/.env-tp). Group members are
aggregated by summing (pipeline.baselines / planning), the same for every method.

Every plan is pruned physically (prune_torch) and evaluated on the 10,000 test images one-shot and
after BatchNorm re-estimation on the 320 calibration images; then, for the chosen levels, methods
and seeds, after pipeline.recovery.recover with one budget for all (bench_recovery's settings:
AdamW 1e-3, cosine, shift, frozen BN, teacher = unpruned net, the training set minus 1,000
held-out images). One-shot and BN rows for everything come first, recovery after, so a run cut
short still gives complete BN tables. Writes bench/results-study.json after every row and
bench/RESULTS-study.md (text after the notes marker is kept).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bench.bench_accuracy import SPC, X1, Context, recalibrate
from bench.bench_recovery import _env, make_plans, recovery_config, split_train, tp_pruned
from calibration.data import CalibrationSet
from calibration.fileio import atomic_write_text
from calibration.sampling import balanced_sample
from exporters.costs import count_cost
from exporters.onnx_export import export_onnx
from exporters.torch_prune import prune_torch
from pipeline.baselines import l1_importance, random_importance, uniform_plan_for_budget
from pipeline.plan import Plan, PlanError
from pipeline.planning import plan_for_budget
from pipeline.recovery import RecoveryConfig, recover
from pipeline.scoring import score
from pipeline.train import default_data, evaluate

ROOT = Path(__file__).resolve().parent
RESULTS_JSON = ROOT / "results-study.json"
RESULTS_MD = ROOT / "RESULTS-study.md"
NOTES_MARK = "<!-- notes: kept across runs -->"
DEFAULT = "fair"
VARIANTS = ("fair", "fair-bn", "fair-act", "fair-R-train")
BASELINES = ("U-alone", "Taylor-alone", "uniform-l1", "uniform-random", "torch-pruning")
METHODS = VARIANTS + BASELINES
# scoring options of each FAIR variant: (where U is measured, reference_compat = train-mode R)
SCORING = {"fair": ("raw", False), "fair-bn": ("bn", False), "fair-act": ("act", False),
           "fair-R-train": ("raw", True)}  # fmt: skip
STAGES = (("top1", "one-shot"), ("top1_bn", "BN re-est."), ("top1_recovered", "recovered"))


def plans_for_level(
    ctx: Context, level: float, scores: dict[str, Any], l1: dict, rnd: dict
) -> list[tuple[str, Plan, dict[str, Any]]]:
    """Every planned method at `level`; peers at the share the default FAIR reached."""
    out = make_plans(ctx, level, scores["fair"], l1, rnd)  # fair, uniform-l1, uniform-random
    target = out[1][2]["target"]
    for name in VARIANTS[1:]:
        p = plan_for_budget(scores[name], level, "flops", ctx.cost, ctx.groups, ctx.model,
                            strict=False)  # fmt: skip
        reached = p.method["budget"]["achieved"]
        out.append((name, p, {"alpha": p.method["alpha"], "reached_target": reached >= level}))
    fs = scores["fair"]
    for name, imp in (("U-alone", {n: fs[n].U for n in fs.names()}),
                      ("Taylor-alone", {n: fs[n].R for n in fs.names()})):  # fmt: skip
        p = uniform_plan_for_budget(imp, target, ctx.cost, ctx.fp, ctx.groups)
        out.append((name, p, {"ratio": p.method["ratio"], "target": target}))
    return out


def one_shot(ctx: Context, pruned: nn.Module) -> tuple[dict[str, Any], nn.Module]:
    """(one-shot and BN-re-estimated top-1 with the exact cost, the BN-re-estimated model)."""
    cost = count_cost(export_onnx(pruned, X1, None))
    row = {"flops_removed": 1 - cost.flops / ctx.base.flops,
           "params_removed": 1 - cost.params / ctx.base.params,
           "top1": evaluate(pruned, ctx.test)}  # fmt: skip
    student = recalibrate(pruned, ctx.calib)
    row["top1_bn"] = evaluate(student, ctx.test)
    return row, student


def recovered(
    ctx: Context,
    student: nn.Module,
    data: CalibrationSet,
    held: CalibrationSet,
    cfg: RecoveryConfig,
) -> dict[str, Any]:
    """Top-1 after recover() from the BN-re-estimated model, teacher = the unpruned network."""
    res = recover(student, copy.deepcopy(ctx.model).eval(), data, held, cfg, progress=False)
    return {"top1_recovered": evaluate(res.model, ctx.test),
            "recovery": {"steps": res.steps, "seconds": round(res.seconds, 1),
                         "heldout_before": res.heldout_before, "heldout_after": res.heldout_after,
                         "best_step": res.best_step}}  # fmt: skip


def run(args: argparse.Namespace, out: dict[str, Any], save: Any) -> None:
    """Phase 1: one-shot + BN for every net x seed x level x method; phase 2: the recoveries."""
    train_set, test = default_data("train"), default_data("test")
    calib, _ = balanced_sample(train_set, SPC, seed=0)
    data, held = split_train(train_set)
    cfg = recovery_config(args)
    out["recovery_config"] = cfg.to_json()
    students: dict[tuple[str, int, float, str], nn.Module] = {}
    contexts: dict[tuple[str, int], Context] = {}
    done = {tuple(r[k] for k in key_names()) for r in out["rows"] if "top1_bn" in r}
    for name in args.models:
        for seed in args.seeds:
            ctx = Context(name, test, calib, seed=seed)
            contexts[name, seed] = ctx
            resumed = all((name, seed, lv, m) in done for lv in args.levels for m in METHODS)
            if not any(n["model"] == name and n["seed"] == seed for n in out["nets"]):
                out["nets"].append({"model": name, "seed": seed, "trained": ctx.meta,
                                    "base_top1": evaluate(ctx.model, test),
                                    "base_flops": ctx.base.flops})  # fmt: skip
            print(f"[{name} seed {seed}] scoring (resumed: {resumed})", flush=True)
            if not resumed:  # measured again in full
                out["rows"] = [r for r in out["rows"] if (r["model"], r["seed"]) != (name, seed)]
            variants = ["fair"] if resumed else list(SCORING)
            scores = {v: score(ctx.model, calib, samples_per_class=SPC, where=SCORING[v][0], seed=0,
                               reference_compat=SCORING[v][1], progress=False)
                      for v in variants}  # fmt: skip
            layers = scores["fair"].names()
            l1, rnd = l1_importance(ctx.model, layers), random_importance(ctx.model, layers, seed=0)
            for level in args.levels:
                base = {"model": name, "seed": seed, "level": level}
                try:
                    if resumed:  # only the models recovery needs, rebuilt the same way
                        plans = make_plans(ctx, level, scores["fair"], l1, rnd)
                    else:
                        plans = plans_for_level(ctx, level, scores, l1, rnd)
                except PlanError as exc:
                    out["rows"].append({**base, "method": "?", "error": str(exc)})
                    continue
                todo = [(m, prune_torch(ctx.model, p, X1, ctx.onnx, verify=False), extra)
                        for m, p, extra in plans]  # fmt: skip
                todo.append(("torch-pruning", *tp_pruned(ctx, plans[1][2]["target"])))
                for method, pruned, extra in todo:
                    if resumed:
                        if pruned is not None and method in args.recover_methods:
                            students[name, seed, level, method] = recalibrate(pruned, calib)
                        continue
                    row = {
                        **base,
                        "method": method,
                        **{k: v for k, v in extra.items() if k != "tp"},
                    }
                    if pruned is not None:
                        try:
                            measured, students[name, seed, level, method] = one_shot(ctx, pruned)
                            row |= measured
                        except Exception as exc:  # one failing peer must not end the study
                            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                    out["rows"].append(row)
                    print(json.dumps(row), flush=True)
                    save()
    for level in args.recover_levels:  # level-major: a run cut short has whole levels
        for name in args.models:
            for seed in args.recover_seeds:
                for method in args.recover_methods:
                    key = (name, seed, level, method)
                    if key not in students:
                        continue
                    row = next(r for r in out["rows"] if (r["model"], r["seed"], r["level"],
                                                          r["method"]) == key)  # fmt: skip
                    row |= recovered(contexts[name, seed], students[key], data, held, cfg)
                    print(
                        json.dumps({k: row[k] for k in (*key_names(), "top1_recovered")}),
                        flush=True,
                    )
                    save()


def key_names() -> tuple[str, ...]:
    return ("model", "seed", "level", "method")


# ---------- report ----------


def _mean(rows: list[dict], stage: str) -> float | None:
    v = [r[stage] for r in rows if stage in r]
    return float(np.mean(v)) if v else None


def _cell(rows: list[dict], stage: str) -> str:
    """Mean over seeds, with the per-seed values when there are several."""
    vals = [(r["seed"], r[stage]) for r in rows if stage in r]
    if not vals:
        return "-"
    m = float(np.mean([v for _, v in vals]))
    if len(vals) == 1:
        return f"{m:.4f} (s{vals[0][0]})"
    return f"{m:.4f} (" + ", ".join(f"{v:.3f}" for _, v in vals) + ")"


def _verdict(by: dict[str, list[dict]], stage: str, label: str) -> str | None:
    """Default FAIR vs every baseline measured at this stage (means over the same seeds)."""
    fair_rows = by.get(DEFAULT, [])
    seeds = {r["seed"] for r in fair_rows if stage in r}
    if not seeds:
        return None

    def mean(m: str) -> float | None:
        return _mean([r for r in by.get(m, []) if r["seed"] in seeds], stage)

    f = mean(DEFAULT)
    peers = {m: mean(m) for m in BASELINES if mean(m) is not None}
    lost = {m: v for m, v in peers.items() if v > f}
    won = {m: v for m, v in peers.items() if v <= f}
    best_var = max(((m, mean(m)) for m in VARIANTS if mean(m) is not None), key=lambda t: t[1])
    best_all = max(((m, mean(m)) for m in METHODS if mean(m) is not None), key=lambda t: t[1])
    s = f"{label} (seeds {sorted(seeds)}): default FAIR {f:.4f}; "
    if not lost:
        margin = f - max(won.values()) if won else 0.0
        s += f"**at/above every baseline measured** ({len(won)}; margin {100 * margin:+.2f} pt)"
    else:
        s += "**below** " + ", ".join(f"{m} by {100 * (v - f):.2f} pt" for m, v in
                                      sorted(lost.items(), key=lambda t: -t[1]))  # fmt: skip
        if won:
            s += "; at/above " + ", ".join(sorted(won))
    n_var = sum(mean(m) is not None for m in VARIANTS)
    if n_var > 1:
        s += f". Best of {n_var} FAIR variants: {best_var[0]} {best_var[1]:.4f}"
    s += f"; best overall: {best_all[0]} "
    return s + f"{best_all[1]:.4f}."


def markdown(out: dict[str, Any]) -> str:
    env, cfg = out["env"], out.get("recovery_config", {})
    lines = [
        "# Ranking study (issue 11): FAIR variants vs baselines on three architectures",
        "",
        f"Command: `{env['command']}`  ",
        f"Date: {env['date']}; machine: {env['cpu']} ({env['cores']} cores shared, run under "
        f"nice); torch {env['torch']}, {env['threads']} threads.",
        "",
        "Fashion-MNIST nets of bench/accuracy_models.py (vgg: plain; resnet: residual; mobilenet: "
        "inverted residual with depthwise convs), each trained 1 epoch per training seed. "
        f"Calibration: {SPC} per class (320 images, seed 0) for scores and BN re-estimation. "
        "Top-1 on all 10,000 test images; cells are the mean over training seeds with the "
        "per-seed values in brackets. FLOPs removed: exact ONNX cost model (mean). Peers are "
        "planned at the level, or at the share the default FAIR reached when one FAIR round "
        "falls short (marked). Recovery (only where a cell is filled): pipeline.recovery.recover "
        f"from the BN-re-estimated model, one budget for all: `{json.dumps(cfg)}`; recovered "
        f"levels {out['recover_levels']}, methods {out['recover_methods']}, seeds "
        f"{out['recover_seeds']}.",
        "",
        "Methods: `fair` = default (U on the raw output, R in eval mode, ToD per layer, global "
        "FLOPs budget by one alpha); `fair-bn` / `fair-act` = U after BatchNorm / after the "
        "activation; `fair-R-train` = R in train mode (reference_compat); `U-alone` / "
        "`Taylor-alone` = FAIR's U / R ranking with one uniform per-layer ratio; `uniform-l1`, "
        "`uniform-random` (seed 0); `torch-pruning` = Torch-Pruning 1.6.1 MetaPruner with "
        "GroupNormImportance, uniform ratio. Coupled channels: member scores summed for every "
        "project method (not varied in this run).",
        "",
    ]
    for name in dict.fromkeys(n["model"] for n in out["nets"]):
        nets = [n for n in out["nets"] if n["model"] == name]
        lines += [f"## {name}", "", "Unpruned top-1: " + ", ".join(
            f"seed {n['seed']} {n['base_top1']:.4f}" for n in nets) + ".", ""]  # fmt: skip
        for level in sorted({r["level"] for r in out["rows"] if r["model"] == name}):
            rows = [r for r in out["rows"] if r["model"] == name and r["level"] == level]
            by: dict[str, list[dict]] = {}
            for r in rows:
                by.setdefault(r["method"], []).append(r)
            lines += [f"### {name}, {level:.0%} of FLOPs", "",
                      "| method | FLOPs removed | one-shot | BN re-est. | recovered |",
                      "|---|---|---|---|---|"]  # fmt: skip
            for m in METHODS:
                rs = by.get(m, [])
                if not rs:
                    continue
                if any("error" in r for r in rs):
                    err = next(r.get("error") for r in rs if "error" in r)
                    lines.append(f"| {m} | error: {err} | | | |")
                    continue
                short = " (short)" if any(r.get("reached_target") is False for r in rs) else ""
                fl = _mean(rs, "flops_removed")
                lines.append(
                    f"| {'**' + m + '**' if m == DEFAULT else m} | {fl:.1%}{short} "
                    f"| {_cell(rs, 'top1')} | {_cell(rs, 'top1_bn')} "
                    f"| {_cell(rs, 'top1_recovered')} |"
                )
            lines.append("")
            for stage, label in STAGES:
                v = _verdict(by, stage, label)
                if v:
                    lines.append("- " + v)
            lines.append("")
    return "\n".join(lines)


def write(out: dict[str, Any]) -> None:
    """JSON and Markdown (keeping the notes after the marker), atomically."""
    atomic_write_text(RESULTS_JSON, json.dumps(out, indent=1))
    notes = ""
    if RESULTS_MD.exists() and NOTES_MARK in RESULTS_MD.read_text():
        notes = RESULTS_MD.read_text().split(NOTES_MARK, 1)[1]
    atomic_write_text(RESULTS_MD, markdown(out) + "\n" + NOTES_MARK + notes)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vgg,resnet,mobilenet")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--levels", default="0.3,0.5,0.7")
    ap.add_argument("--steps", type=int, default=60, help="recovery steps of 128 (all methods)")
    ap.add_argument("--recover-levels", default="0.5,0.7")
    ap.add_argument("--recover-methods", default="fair,uniform-l1,uniform-random,torch-pruning")
    ap.add_argument("--recover-seeds", default="0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--resume", action="store_true", help="keep the measured rows of the JSON")
    ap.add_argument("--report-only", action="store_true", help="rewrite the page from the JSON")
    args = ap.parse_args(argv)
    if args.report_only:
        write(json.loads(RESULTS_JSON.read_text()))
        return 0
    args.models = args.models.split(",")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.recover_seeds = [int(s) for s in args.recover_seeds.split(",") if s]
    args.levels = [float(v) for v in args.levels.split(",")]
    args.recover_levels = [float(v) for v in args.recover_levels.split(",") if v]
    args.recover_methods = [m for m in args.recover_methods.split(",") if m]
    args.epochs = 1.0
    torch.set_num_threads(args.threads)
    env = _env(argv)
    env["command"] = "nice -n 5 .venv/bin/python -m bench.bench_study " + " ".join(argv)
    if args.resume and RESULTS_JSON.exists():
        prev = json.loads(RESULTS_JSON.read_text())
        keep = [r for r in prev["rows"] if "top1_bn" in r]  # errors are measured again
        env["command"] = prev["env"]["command"] + " ; then " + env["command"]
    else:
        prev, keep = {"nets": []}, []
    out: dict[str, Any] = {"env": env, "recover_levels": args.recover_levels,
                           "recover_methods": args.recover_methods,
                           "recover_seeds": args.recover_seeds, "nets": prev["nets"], "rows": keep}  # fmt: skip
    run(args, out, lambda: write(out))
    write(out)
    print(RESULTS_MD.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
