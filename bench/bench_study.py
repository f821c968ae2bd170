"""Ranking study (issue 11): FAIR variants vs simple baselines, one-shot, BN re-estimated, recovered.

    nice -n 5 .venv/bin/python -m bench.bench_study [--models vgg,resnet,mobilenet] [--seeds 0,1]
        [--levels 0.3,0.5,0.7] [--steps 60] [--recover-levels 0.5,0.7]
        [--recover-methods fair,uniform-l1,uniform-random,torch-pruning] [--recover-seeds 0]
        [--methods fair,fair+cap1.5,fair-bn+blend0.5,fair+max,...] [--candidates fair+cap1.5]

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

FAIR variants of allocation and aggregation are named `<scoring variant>+<modifier>...`:
`+capM` = plan_for_budget(allocation='tod-capped:M'), `+blendW` = allocation='blend:W',
`+max` / `+normsum` = aggregate='max' / 'normsum' (e.g. `fair-bn+cap1.5+max`). `--methods`
picks what is measured; `--resume` keeps every measured row and measures only what is missing
(recovered values are kept only when the recovery budget is unchanged). `--candidates` get their
own verdict lines next to the default's, and the scoreboard shows every FAIR method's margin
over the best baseline per cell.

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
from bench.bench_recovery import _env, recovery_config, split_train, tp_pruned
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


def spec(method: str) -> tuple[str, str, str]:
    """(scoring variant, allocation, aggregate) of a FAIR method name such as 'fair-bn+cap1.5'."""
    base, *mods = method.split("+")
    if base not in SCORING:
        raise ValueError(f"{method!r} is not a FAIR method (scoring variants: {list(SCORING)})")
    alloc, agg = "tod", "sum"
    for m in mods:
        if m.startswith("cap"):
            alloc = f"tod-capped:{m[3:]}"
        elif m.startswith("blend"):
            alloc = f"blend:{m[5:]}"
        elif m in ("max", "normsum"):
            agg = m
        else:
            raise ValueError(f"{method!r}: unknown modifier {m!r} (capM, blendW, max, normsum)")
    return base, alloc, agg


def is_fair(method: str) -> bool:
    return method.split("+")[0] in SCORING


def max_layer_share(plan: Plan) -> float:
    """The largest share of units any one layer loses (ToD may take up to 99%)."""
    return max((len(lp.pruned) / lp.n_units for lp in plan.layers.values()), default=0.0)


def plans_for_level(
    ctx: Context, level: float, scores: dict[str, Any], l1: dict, rnd: dict, methods: list[str]
) -> tuple[float, list[tuple[str, Plan, dict[str, Any]]]]:
    """(peer target, the planned `methods` at `level`); peers at the share the default FAIR
    reached when it falls short of `level`, else at `level`. Torch-Pruning is planned apart."""
    fair = plan_for_budget(scores["fair"], level, "flops", ctx.cost, ctx.groups, ctx.model,
                           strict=False)  # fmt: skip
    target = min(level, fair.method["budget"]["achieved"])
    fs = scores["fair"]
    peers = {"uniform-l1": l1, "uniform-random": rnd,
             "U-alone": {n: fs[n].U for n in fs.names()},
             "Taylor-alone": {n: fs[n].R for n in fs.names()}}  # fmt: skip
    out = []
    for m in methods:
        if m in peers:
            p = uniform_plan_for_budget(peers[m], target, ctx.cost, ctx.fp, ctx.groups)
            extra = {"ratio": p.method["ratio"], "target": target}
        elif is_fair(m):
            base, alloc, agg = spec(m)
            p = fair if m == DEFAULT else plan_for_budget(
                scores[base], level, "flops", ctx.cost, ctx.groups, ctx.model, strict=False,
                allocation=alloc, aggregate=agg)  # fmt: skip
            reached = p.method["budget"]["achieved"]
            extra = {"alpha": p.method["alpha"], "reached_target": reached >= level}
            if "allocation" in p.method:
                extra["allocation"] = p.method["allocation"]
        else:
            continue
        out.append((m, p, {**extra, "max_layer_share": max_layer_share(p)}))
    return target, out


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
    """Phase 1: one-shot + BN for every missing net x seed x level x method; phase 2: the
    recoveries not yet measured."""
    train_set, test = default_data("train"), default_data("test")
    calib, _ = balanced_sample(train_set, SPC, seed=0)
    data, held = split_train(train_set)
    cfg = recovery_config(args)
    if out.get("recovery_config") not in (None, cfg.to_json()):  # another budget: measure again
        for r in out["rows"]:
            r.pop("top1_recovered", None)
            r.pop("recovery", None)
    out["recovery_config"] = cfg.to_json()
    students: dict[tuple[str, int, float, str], nn.Module] = {}
    contexts: dict[tuple[str, int], Context] = {}
    rows = {tuple(r[k] for k in key_names()): r for r in out["rows"] if "top1_bn" in r}
    out["rows"] = list(rows.values())

    def recover_wanted(key: tuple[str, int, float, str]) -> bool:
        _, seed, level, method = key
        return (seed in args.recover_seeds and level in args.recover_levels
                and method in args.recover_methods
                and "top1_recovered" not in rows.get(key, {}))  # fmt: skip

    for name in args.models:
        for seed in args.seeds:
            keys = [(name, seed, lv, m) for lv in args.levels
                    for m in dict.fromkeys([*args.methods, *args.recover_methods])]  # fmt: skip
            todo_keys = [k for k in keys if k not in rows or recover_wanted(k)]
            if not todo_keys:
                continue
            ctx = Context(name, test, calib, seed=seed)
            contexts[name, seed] = ctx
            if not any(n["model"] == name and n["seed"] == seed for n in out["nets"]):
                out["nets"].append({"model": name, "seed": seed, "trained": ctx.meta,
                                    "base_top1": evaluate(ctx.model, test),
                                    "base_flops": ctx.base.flops})  # fmt: skip
            needed = list(dict.fromkeys(k[3] for k in todo_keys))
            variants = list(dict.fromkeys(["fair", *(spec(m)[0] for m in needed if is_fair(m))]))
            print(f"[{name} seed {seed}] scoring {variants} for {needed}", flush=True)
            scores = {v: score(ctx.model, calib, samples_per_class=SPC, where=SCORING[v][0], seed=0,
                               reference_compat=SCORING[v][1], progress=False)
                      for v in variants}  # fmt: skip
            layers = scores["fair"].names()
            l1, rnd = l1_importance(ctx.model, layers), random_importance(ctx.model, layers, seed=0)
            for level in args.levels:
                base = {"model": name, "seed": seed, "level": level}
                here = [m for (_, _, lv, m) in todo_keys if lv == level]
                if not here:
                    continue
                try:
                    target, plans = plans_for_level(ctx, level, scores, l1, rnd, here)
                except PlanError as exc:
                    out["rows"].append({**base, "method": "?", "error": str(exc)})
                    continue
                todo = [(m, prune_torch(ctx.model, p, X1, ctx.onnx, verify=False), extra)
                        for m, p, extra in plans]  # fmt: skip
                if "torch-pruning" in here:
                    todo.append(("torch-pruning", *tp_pruned(ctx, target)))
                for method, pruned, extra in todo:
                    key = (name, seed, level, method)
                    if key in rows:  # measured: only its recovery is wanted
                        if pruned is not None and recover_wanted(key):
                            students[key] = recalibrate(pruned, calib)
                        continue
                    row = {
                        **base,
                        "method": method,
                        **{k: v for k, v in extra.items() if k != "tp"},
                    }
                    if pruned is not None:
                        try:
                            measured, student = one_shot(ctx, pruned)
                            row |= measured
                            if recover_wanted(key):
                                students[key] = student
                        except Exception as exc:  # one failing peer must not end the study
                            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                    out["rows"] = [r for r in out["rows"]
                                   if tuple(r.get(k) for k in key_names()) != key] + [row]  # fmt: skip
                    if "top1_bn" in row:
                        rows[key] = row
                    print(json.dumps(row), flush=True)
                    save()
    for level in args.recover_levels:  # level-major: a run cut short has whole levels
        for seed in args.recover_seeds:  # seed-major within a level: whole seeds first
            for name in args.models:
                for method in args.recover_methods:
                    key = (name, seed, level, method)
                    if key not in students:
                        continue
                    row = rows[key]
                    row |= recovered(contexts[name, seed], students.pop(key), data, held, cfg)
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


def methods_of(out: dict[str, Any]) -> list[str]:
    """The four scoring variants, the other FAIR methods measured (first seen first), baselines."""
    seen = dict.fromkeys(r["method"] for r in out["rows"])
    extra = [m for m in seen if is_fair(m) and m not in VARIANTS]
    return [*VARIANTS, *extra, *BASELINES]


def _verdict(
    by: dict[str, list[dict]], stage: str, label: str, methods: list[str], who: str = DEFAULT
) -> str | None:
    """FAIR method `who` vs every baseline measured at this stage (means over the same seeds)."""
    fair_rows = by.get(who, [])
    seeds = {r["seed"] for r in fair_rows if stage in r}
    if not seeds:
        return None

    def mean(m: str) -> float | None:
        return _mean([r for r in by.get(m, []) if r["seed"] in seeds], stage)

    f = mean(who)
    peers = {m: mean(m) for m in BASELINES if mean(m) is not None}
    lost = {m: v for m, v in peers.items() if v > f}
    won = {m: v for m, v in peers.items() if v <= f}
    fair_methods = [m for m in methods if is_fair(m) and mean(m) is not None]
    best_var = max(((m, mean(m)) for m in fair_methods), key=lambda t: t[1])
    best_all = max(((m, mean(m)) for m in methods if mean(m) is not None), key=lambda t: t[1])
    what = "default FAIR" if who == DEFAULT else f"candidate {who}"
    s = f"{label} (seeds {sorted(seeds)}): {what} {f:.4f}; "
    if not lost:
        margin = f - max(won.values()) if won else 0.0
        s += f"**at/above every baseline measured** ({len(won)}; margin {100 * margin:+.2f} pt)"
    else:
        s += "**below** " + ", ".join(f"{m} by {100 * (v - f):.2f} pt" for m, v in
                                      sorted(lost.items(), key=lambda t: -t[1]))  # fmt: skip
        if won:
            s += "; at/above " + ", ".join(sorted(won))
    if who == DEFAULT and len(fair_methods) > 1:
        s += f". Best of {len(fair_methods)} FAIR methods: {best_var[0]} {best_var[1]:.4f}"
    s += f"; best overall: {best_all[0]} "
    return s + f"{best_all[1]:.4f}."


def scoreboard(out: dict[str, Any], methods: list[str], stage: str) -> list[str]:
    """Per FAIR method and cell: its mean minus the best baseline's mean (pt), over the seeds
    both have; a row's last column counts the cells at or above the best baseline."""
    cells = sorted({(r["model"], r["level"]) for r in out["rows"]},
                   key=lambda c: (MODELS_ORDER.get(c[0], 9), c[1]))  # fmt: skip
    head = "| FAIR method | " + " | ".join(f"{m} {lv:.0%}" for m, lv in cells) + " | wins | seeds |"
    lines = [head, "|---" * (len(cells) + 3) + "|"]
    for m in methods:
        if not is_fair(m):
            continue
        vals, wins, n, used = [], 0, 0, set()
        for model, level in cells:
            rs = [r for r in out["rows"] if r["model"] == model and r["level"] == level]
            mine = {r["seed"]: r[stage] for r in rs if r["method"] == m and stage in r}
            best = None
            for b in BASELINES:
                theirs = {r["seed"]: r[stage] for r in rs if r["method"] == b and stage in r}
                common = sorted(set(mine) & set(theirs))
                if common:
                    used.update(common)
                    d = float(np.mean([mine[x] - theirs[x] for x in common]))
                    best = d if best is None else min(best, d)
            if best is None:
                vals.append("-")
                continue
            n += 1
            wins += best >= 0
            vals.append(f"{100 * best:+.1f}")
        if n:
            seeds = ",".join(str(x) for x in sorted(used))
            lines.append(f"| {m} | " + " | ".join(vals) + f" | {wins}/{n} | {seeds} |")
    return lines


MODELS_ORDER = {"vgg": 0, "resnet": 1, "mobilenet": 2}


def markdown(out: dict[str, Any]) -> str:
    env, cfg = out["env"], out.get("recovery_config", {})
    methods = methods_of(out)
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
        "activation; `fair-R-train` = R in train mode (reference_compat); `+capM` = ToD with no "
        "layer losing more than min(0.9, M x the uniform ratio meeting the budget), alpha "
        "re-solved; `+blendW` = per-layer share W x ToD's + (1-W) x the uniform ratio, scaled "
        "to the budget; `+max` / `+normsum` = coupled members' scores combined by max / by the "
        "sum of each member's scores over its mean (default: sum); `U-alone` / "
        "`Taylor-alone` = FAIR's U / R ranking with one uniform per-layer ratio; `uniform-l1`, "
        "`uniform-random` (seed 0); `torch-pruning` = Torch-Pruning 1.6.1 MetaPruner with "
        "GroupNormImportance, uniform ratio. Max share = the largest share of units one layer "
        "loses.",
        "",
        "## Scoreboard: FAIR method minus the best baseline (pt; >= 0 = at or above every "
        "baseline)",
        "",
    ]
    for stage, label in STAGES[1:]:
        lines += [f"**{label}**", "", *scoreboard(out, methods, stage), ""]
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
                      "| method | FLOPs removed | max share | one-shot | BN re-est. | recovered |",
                      "|---|---|---|---|---|---|"]  # fmt: skip
            for m in methods:
                rs = by.get(m, [])
                if not rs:
                    continue
                if any("error" in r for r in rs):
                    err = next(r.get("error") for r in rs if "error" in r)
                    lines.append(f"| {m} | error: {err} | | | | |")
                    continue
                short = " (short)" if any(r.get("reached_target") is False for r in rs) else ""
                fl = _mean(rs, "flops_removed")
                ms = _mean(rs, "max_layer_share")
                lines.append(
                    f"| {'**' + m + '**' if m == DEFAULT else m} | {fl:.1%}{short} "
                    f"| {'-' if ms is None else f'{ms:.0%}'} "
                    f"| {_cell(rs, 'top1')} | {_cell(rs, 'top1_bn')} "
                    f"| {_cell(rs, 'top1_recovered')} |"
                )
            lines.append("")
            for who in [DEFAULT, *out.get("candidates", [])]:
                for stage, label in STAGES:
                    v = _verdict(by, stage, label, methods, who)
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
    ap.add_argument("--methods", default=",".join(METHODS), help="what to measure (see above)")
    ap.add_argument("--candidates", default="", help="FAIR methods with their own verdicts")
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
    args.methods = [m for m in args.methods.split(",") if m]
    for m in [*args.methods, *args.recover_methods]:
        if m not in BASELINES:
            spec(m)  # a misspelt method fails here, before any work
    args.epochs = 1.0
    torch.set_num_threads(args.threads)
    env = _env(argv)
    env["command"] = "nice -n 10 .venv/bin/python -m bench.bench_study " + " ".join(argv)
    if args.resume and RESULTS_JSON.exists():
        prev = json.loads(RESULTS_JSON.read_text())
        keep = [r for r in prev["rows"] if "top1_bn" in r]  # errors are measured again
        env["command"] = prev["env"]["command"] + " ; then " + env["command"]
    else:
        prev, keep = {"nets": []}, []
    out: dict[str, Any] = {"env": env, "recover_levels": args.recover_levels,
                           "recover_methods": args.recover_methods,
                           "recover_seeds": args.recover_seeds, "nets": prev["nets"], "rows": keep,
                           "recovery_config": prev.get("recovery_config"),
                           "candidates": [c for c in args.candidates.split(",") if c]}  # fmt: skip
    run(args, out, lambda: write(out))
    write(out)
    print(RESULTS_MD.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
