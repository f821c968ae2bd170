"""Recovery benchmark: FAIR vs uniform L1 vs uniform random, one-shot, BN re-estimated, recovered.

    nice -n 10 .venv/bin/python -m bench.bench_recovery [--models vgg,resnet]
        [--levels 0.3,0.5,0.7] [--epochs 1] [--steps N] [--no-tp]

The Fashion-MNIST VGG and ResNet of the accuracy bench (bench/accuracy_models.py, trained once and
cached), its calibration draw (32 per class, seed 0) and its plan makers: FAIR via
pipeline.planning.plan_for_budget (strict=False, the share reached is reported), uniform L1 and
uniform random (seed 0) via pipeline.baselines.uniform_plan_for_budget. Every plan is applied by
exporters.torch_prune.prune_torch and evaluated on all 10,000 test images: one-shot, after
BatchNorm re-estimation on the 320 calibration images, and after pipeline.recovery.recover()
(started from the BN-re-estimated model) with one budget for every method: the same steps, data,
schedule and seed. Teacher: the unpruned network. Recovery data: the training set minus 1,000
held-out training images (seeded), which pick the best weights; the test set is never used there.

Also measured in the same run: recover() throughput over a plain training step of the unpruned
model (forward + backward + Adam at batch 128), and ONNX Runtime CPU latency (1 thread, batch 1,
warm-up 20, 200 interleaved runs, p50) of the unpruned vs the FAIR-pruned networks. With
bench/.env-tp present (see bench/tp_prune.py), Torch-Pruning 1.6.1's GroupNormImportance pruner
is a peer, pruned there to the same FLOPs share and recovered here the same way.

Writes bench/results-recovery.json (after every row), bench/RESULTS-recovery.md (text after the
notes marker is kept) and bench/plots/recovery.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from bench.accuracy_models import BUILDERS, FULL_EPOCH, trained
from bench.bench_accuracy import SPC, X1, Context, _resized, recalibrate
from calibration.data import CalibrationSet
from calibration.fileio import atomic_write_text, cache_dir
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
RESULTS_JSON = ROOT / "results-recovery.json"
RESULTS_MD = ROOT / "RESULTS-recovery.md"
PLOT = ROOT / "plots" / "recovery.png"
TP_PY = ROOT / ".env-tp" / "bin" / "python"
NOTES_MARK = "<!-- notes: kept across runs -->"
HELDOUT = 1000
LEVELS = (0.3, 0.5, 0.7)
METHODS = ("fair", "uniform-l1", "uniform-random", "torch-pruning")


# ---------- data and settings ----------


def split_train(train_set: CalibrationSet, n_heldout: int = HELDOUT) -> tuple[CalibrationSet, ...]:
    """(recovery data, held-out set): a seeded split of the training set (never the test set)."""
    order = np.random.default_rng(7).permutation(len(train_set))
    return train_set.subset(np.sort(order[n_heldout:])), train_set.subset(
        np.sort(order[:n_heldout])
    )


def recovery_config(args: argparse.Namespace) -> RecoveryConfig:
    """The one recovery budget every method gets (AdamW 1e-3, cosine, shift, frozen BN, seed 0)."""
    return RecoveryConfig(
        epochs=args.epochs, steps=args.steps, batch_size=128, optimizer="adamw", lr=1e-3,
        schedule="cosine", augment="shift", bn_mode="frozen", seed=0,
    ).validate()  # fmt: skip


# ---------- throughput and latency ----------


def plain_train_throughput(model: nn.Module, data: CalibrationSet, steps: int = 40) -> float:
    """Samples/s of plain training of a copy of `model`: forward, CE, backward, Adam, batch 128."""
    m = copy.deepcopy(model).train()
    opt = torch.optim.Adam(m.parameters(), lr=1e-4)
    x_all, y_all = torch.from_numpy(data.inputs), torch.from_numpy(data.require_labels())
    gen = torch.Generator().manual_seed(0)
    t0 = 0.0
    for i in range(steps + 5):
        if i == 5:  # first steps: warm-up
            t0 = time.perf_counter()
        idx = torch.randint(0, len(data), (128,), generator=gen)
        loss = nn.functional.cross_entropy(m(x_all[idx]), y_all[idx].long())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * 128 / (time.perf_counter() - t0)


def recover_throughput(model: nn.Module, data: CalibrationSet, steps: int = 40) -> float:
    """Samples/s of recover() on a copy of the unpruned network itself (no held-out evaluation)."""
    cfg = RecoveryConfig(steps=steps, optimizer="adamw", lr=1e-3, seed=0)
    res = recover(copy.deepcopy(model), copy.deepcopy(model), data, None, cfg, progress=False)
    return res.samples_per_second


def throughputs(model: nn.Module, data: CalibrationSet, rounds: int = 2) -> tuple[float, float]:
    """(plain training, recover()) samples/s of the unpruned model: best of alternating rounds,
    so a busy neighbour on the shared machine hits both alike."""
    plain, rec = 0.0, 0.0
    for _ in range(rounds):
        plain = max(plain, plain_train_throughput(model, data))
        rec = max(rec, recover_throughput(model, data))
    return plain, rec


def _session(m: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def ort_latency(models: dict[str, onnx.ModelProto], warmup: int = 20, runs: int = 200) -> dict:
    """p50 ms per model on ONNX Runtime CPU (1 thread, batch 1); runs interleaved across models."""
    sessions = {k: _session(m) for k, m in models.items()}
    x = np.random.default_rng(0).standard_normal((1, 1, 28, 28)).astype(np.float32)
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
    for k, s in sessions.items():
        for _ in range(warmup):
            s.run(None, feeds[k])
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(runs):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feeds[k])
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: {"p50_ms": float(np.median(v)), "p90_ms": float(np.percentile(v, 90))}
            for k, v in times.items()}  # fmt: skip


# ---------- plans ----------


def make_plans(
    ctx: Context, level: float, fair_scores: Any, l1: dict, rnd: dict
) -> list[tuple[str, Plan, dict[str, Any]]]:
    """FAIR at `level` (strict=False) and the uniform peers at the share FAIR actually reached
    when it falls short of `level` (so all remove about the same FLOPs), else at `level`."""
    fair = plan_for_budget(
        fair_scores, level, "flops", ctx.cost, ctx.groups, ctx.model, strict=False
    )
    reached = fair.method["budget"]["achieved"]
    peer_target = min(level, reached)
    out = [("fair", fair, {"alpha": fair.method["alpha"], "reached_target": reached >= level})]
    for name, imp in (("uniform-l1", l1), ("uniform-random", rnd)):
        p = uniform_plan_for_budget(imp, peer_target, ctx.cost, ctx.fp, ctx.groups)
        out.append((name, p, {"ratio": p.method["ratio"], "target": peer_target}))
    return out


def tp_pruned(ctx: Context, target: float) -> tuple[nn.Module | None, dict[str, Any]]:
    """Torch-Pruning 1.6.1 (GroupNormImportance) in bench/.env-tp; its weights loaded here."""
    if not TP_PY.exists():
        return None, {"error": "bench/.env-tp missing (see bench/tp_prune.py)"}
    work = cache_dir("bench-recovery", f"tp-{ctx.name}-{target:.4f}")
    weights_in, weights_out = work / "unpruned.pt", work / "pruned.pt"
    torch.save(ctx.model.state_dict(), weights_in)
    cmd = [str(TP_PY), "-m", "bench.tp_prune", "--model", ctx.name, "--weights", str(weights_in),
           "--target", repr(target), "--out", str(weights_out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT.parent, capture_output=True, text=True)
    if proc.returncode:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return None, {"error": f"tp_prune failed: {tail}"}
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    state = torch.load(weights_out, map_location="cpu", weights_only=True)
    return _resized(BUILDERS[ctx.name](), state), {"ratio": info["ratio"], "tp": info}


# ---------- one row ----------


def measure_row(
    ctx: Context,
    pruned: nn.Module,
    data: CalibrationSet,
    heldout: CalibrationSet,
    cfg: RecoveryConfig,
    plain_sps: float,
) -> dict[str, Any]:
    """One-shot, BN re-estimated and recovered top-1 of a physically pruned model."""
    cost = count_cost(export_onnx(pruned, X1, None))
    row: dict[str, Any] = {
        "flops_removed": 1 - cost.flops / ctx.base.flops,
        "params_removed": 1 - cost.params / ctx.base.params,
        "top1": evaluate(pruned, ctx.test),
    }
    student = recalibrate(pruned, ctx.calib)
    row["top1_bn"] = evaluate(student, ctx.test)
    teacher = copy.deepcopy(ctx.model).eval()
    res = recover(student, teacher, data, heldout, cfg, progress=False)
    row["top1_recovered"] = evaluate(res.model, ctx.test)
    row["recovery"] = {
        "steps": res.steps, "samples": res.steps * cfg.batch_size, "seconds": round(res.seconds, 1),
        "samples_per_second": res.samples_per_second, "heldout_before": res.heldout_before,
        "heldout_after": res.heldout_after, "best_step": res.best_step,
        "throughput_vs_plain_train": res.samples_per_second / plain_sps,
    }  # fmt: skip
    row["_model"] = res.model
    return row


# ---------- one network ----------


def run_model(
    name: str,
    args: argparse.Namespace,
    train_set: CalibrationSet,
    test: CalibrationSet,
    on_row: Any,
) -> dict[str, Any]:
    """Every method x level on one network, plus throughput and FAIR latency."""
    calib, _ = balanced_sample(train_set, SPC, seed=0)
    data, heldout = split_train(train_set)
    cfg = recovery_config(args)
    ctx = Context(name, test, calib)
    plain, rec = throughputs(ctx.model, data)
    out: dict[str, Any] = {
        "model": name,
        "trained": ctx.meta,
        "base_top1": evaluate(ctx.model, test),
        "base_flops": ctx.base.flops,
        "base_params": ctx.base.params,
        "recovery_config": cfg.to_json(),
        "recovery_data": len(data),
        "heldout": len(heldout),
        "plain_train_samples_per_second": plain,
        "recover_unpruned_samples_per_second": rec,
        "rows": [],
    }
    out["recover_unpruned_vs_plain"] = out["recover_unpruned_samples_per_second"] / plain
    print(f"[{name}] base {out['base_top1']:.4f}; plain train {plain:.0f} samples/s", flush=True)
    fair_scores = score(ctx.model, calib, samples_per_class=SPC, where="raw", seed=0,
                        progress=False)  # fmt: skip
    layers = fair_scores.names()
    l1, rnd = l1_importance(ctx.model, layers), random_importance(ctx.model, layers, seed=0)
    fair_models: dict[float, nn.Module] = {}
    for level in args.levels:
        try:
            plans = make_plans(ctx, level, fair_scores, l1, rnd)
        except PlanError as exc:
            out["rows"].append({"level": level, "error": str(exc)})
            continue
        todo: list[tuple[str, nn.Module | None, dict[str, Any]]] = [
            (m, prune_torch(ctx.model, p, X1, ctx.onnx, verify=False), extra)
            for m, p, extra in plans
        ]
        if not args.no_tp:
            todo.append(("torch-pruning", *tp_pruned(ctx, plans[1][2]["target"])))
        for method, pruned, extra in todo:
            row = {"method": method, "level": level, **extra}
            if pruned is not None:
                row |= measure_row(ctx, pruned, data, heldout, cfg, plain)
                model = row.pop("_model")
                if method == "fair":
                    fair_models[level] = model
            out["rows"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "tp"}), flush=True)
            on_row(out)
    models = {"unpruned": export_onnx(ctx.model, X1, None)}
    models |= {f"fair-{lv}": export_onnx(m, X1, None) for lv, m in fair_models.items()}
    lat = ort_latency(models)
    out["latency"] = lat
    for row in out["rows"]:
        if row.get("method") == "fair" and f"fair-{row['level']}" in lat:
            key = f"fair-{row['level']}"
            row["latency_ratio"] = lat[key]["p50_ms"] / lat["unpruned"]["p50_ms"]
    on_row(out)
    return out


# ---------- report ----------


def _f(v: Any, pct: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:.1%}" if pct else f"{v:.4f}"


def _table(res: dict[str, Any]) -> list[str]:
    lines = [
        "| level | method | setting | FLOPs removed | params removed | one-shot | BN re-est. "
        "| recovered | recovered - unpruned | recover samples/s (x plain train) "
        "| ORT p50 latency vs unpruned |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(
        res["rows"], key=lambda r: (r["level"], METHODS.index(r.get("method", "fair")))
    ):
        if "top1" not in r:
            lines.append(f"| {r['level']:.0%} | {r.get('method', '?')} | error: {r.get('error')} |")
            continue
        setting = f"alpha={r['alpha']:.4g}" if "alpha" in r else f"ratio={r.get('ratio', 0):.3f}"
        if r["method"] == "fair" and not r.get("reached_target", True):
            setting += " (short of level)"
        rec = r["recovery"]
        lat = r.get("latency_ratio")
        lines.append(
            f"| {r['level']:.0%} | {r['method']} | {setting} | {_f(r['flops_removed'], True)} "
            f"| {_f(r['params_removed'], True)} | {_f(r['top1'])} | {_f(r['top1_bn'])} "
            f"| **{_f(r['top1_recovered'])}** | {100 * (r['top1_recovered'] - res['base_top1']):+.2f} pt "
            f"| {rec['samples_per_second']:.0f} ({rec['throughput_vs_plain_train']:.2f}x) "
            f"| {'-' if lat is None else f'{lat:.2f}'} |"
        )
    return lines


def _verdicts(res: dict[str, Any]) -> list[str]:
    """Plain, computed sentences: FAIR vs each peer after recovery, and the 50% target."""
    out = []
    fifty = [r for r in res["rows"] if r.get("method") == "fair" and r["level"] == 0.5]
    if fifty and "top1_recovered" in fifty[0]:
        r = fifty[0]
        gap = 100 * (res["base_top1"] - r["top1_recovered"])
        epochs = r["recovery"]["samples"] / res["recovery_data"]
        ok = "met" if gap <= 1.0 else "not met"
        out.append(
            f"- Target (50% fewer FLOPs, FAIR + recovery within 1.0 pt of unpruned, <= 2 epochs): "
            f"**{ok}** here: {gap:.2f} pt below unpruned after {epochs:.2f} epoch of training images."
        )
    for level in sorted({r["level"] for r in res["rows"]}):
        rows = {r["method"]: r for r in res["rows"] if r["level"] == level and "top1" in r}
        fair = rows.get("fair")
        if fair is None:
            continue
        peers = {m: r for m, r in rows.items() if m != "fair"}
        beaten = [m for m, r in peers.items() if fair["top1_recovered"] >= r["top1_recovered"]]
        lost = [
            f"{m} ({r['top1_recovered']:.4f} vs {fair['top1_recovered']:.4f})"
            for m, r in peers.items()
            if fair["top1_recovered"] < r["top1_recovered"]
        ]
        gap = 100 * (res["base_top1"] - fair["top1_recovered"])
        s = (f"At {level:.0%}: FAIR recovered {fair['top1_recovered']:.4f} "
             f"({gap:.2f} pt below unpruned); at or above {', '.join(beaten) or 'no peer'}")  # fmt: skip
        s += f"; below {', '.join(lost)}." if lost else "."
        out.append("- " + s)
    return out


def _markdown(results: list[dict], env: dict) -> str:
    cfg = results[0]["recovery_config"] if results else {}
    lines = [
        "# Recovery benchmark (Fashion-MNIST; FAIR vs uniform peers; one-shot, BN, recovered)",
        "",
        f"Command: `{env['command']}`  ",
        f"Date: {env['date']}; machine: {env['cpu']} ({env['cores']} cores shared with other "
        f"jobs, run under nice); torch {env['torch']}, {env['threads']} threads; onnxruntime "
        f"{env['onnxruntime']}.",
        "",
        f"Networks of the accuracy bench, trained once ({json.dumps(FULL_EPOCH)}). Calibration: "
        f"{SPC} per class (320 images, class-balanced, seed 0) for FAIR scores and BN "
        "re-estimation. Every plan physically pruned (prune_torch); top-1 on all 10,000 test "
        "images. Recovery (pipeline.recovery.recover) starts from the BN-re-estimated model, "
        "teacher = the unpruned network, on the training set minus 1,000 held-out training "
        "images (best-weights pick); the same budget for every method: "
        f"`{json.dumps(cfg)}` = {results[0]['rows'][0].get('recovery', {}).get('steps', '?') if results and results[0]['rows'] else '?'} "
        "steps of 128 images"
        + (
            f" ({results[0]['rows'][0]['recovery']['samples'] / results[0]['recovery_data']:.2f} "
            "of one epoch)."
            if results and results[0]["rows"] and "recovery" in results[0]["rows"][0]
            else "."
        ),
        "",
        "FLOPs removed: exact ONNX cost model. Peers are planned at the level, or at the share "
        "FAIR reached when one FAIR round falls short of it. Latency: ONNX Runtime CPU, "
        "1 thread, batch 1, warm-up 20, 200 runs interleaved with the unpruned model, p50 "
        "(pruned / unpruned). Throughput: recover() samples/s (teacher forward, augmentation "
        "and held-out checks included) over samples/s of a plain training step of the unpruned "
        "model (forward + backward + Adam, batch 128), both measured in this run.",
        "",
    ]
    for res in results:
        lat = res.get("latency", {})
        lines += [
            f"## {res['model']}",
            "",
            f"Unpruned top-1 **{res['base_top1']:.4f}**; {res['base_flops']:,} FLOPs; "
            f"{res['base_params']:,} params. Plain training {res['plain_train_samples_per_second']:.0f} "
            f"samples/s; recover() on the unpruned network itself "
            f"{res['recover_unpruned_samples_per_second']:.0f} samples/s "
            f"(**{res['recover_unpruned_vs_plain']:.2f}x** plain training). ORT p50: "
            + ", ".join(f"{k} {v['p50_ms']:.3f} ms" for k, v in lat.items())
            + ".",
            "",
            *_table(res),
            "",
            *_verdicts(res),
            "",
        ]
    if PLOT.exists():
        lines += [f"![recovery](plots/{PLOT.name})", ""]
    return "\n".join(lines)


def _plot(results: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    for ax, res in zip(axes[0], results, strict=True):
        for i, method in enumerate(METHODS):
            rows = sorted((r for r in res["rows"] if r.get("method") == method and "top1" in r),
                          key=lambda r: r["flops_removed"])  # fmt: skip
            if not rows:
                continue
            x = [r["flops_removed"] for r in rows]
            c = f"C{i}"
            ax.plot(x, [r["top1_recovered"] for r in rows], "o-", c=c, label=f"{method} recovered")
            ax.plot(x, [r["top1_bn"] for r in rows], "s:", c=c, ms=3, label=f"{method} BN only")
        ax.axhline(res["base_top1"], color="grey", ls="--", lw=1, label="unpruned")
        ax.set(title=res["model"], xlabel="FLOPs removed", ylabel="top-1 (10,000 test images)")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=80)
    plt.close(fig)


def write(results: dict[str, dict], env: dict, final: bool) -> None:
    """JSON always; with `final`, the plot and the markdown (keeping the notes after the marker)."""
    ordered = [results[k] for k in sorted(results, key=lambda k: (k != "vgg", k))]
    atomic_write_text(RESULTS_JSON, json.dumps({"env": env, "results": ordered}, indent=1))
    if not final:
        return
    _plot(ordered)
    notes = ""
    if RESULTS_MD.exists() and NOTES_MARK in RESULTS_MD.read_text():
        notes = RESULTS_MD.read_text().split(NOTES_MARK, 1)[1]
    atomic_write_text(RESULTS_MD, _markdown(ordered, env) + "\n" + NOTES_MARK + notes)


def _env(argv: list[str]) -> dict[str, Any]:
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if "Model name" in ln), "")
    return {
        "command": "nice -n 10 .venv/bin/python -m bench.bench_recovery " + " ".join(argv),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": name or platform.processor(),
        "cores": len(__import__("os").sched_getaffinity(0)),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vgg,resnet")
    ap.add_argument("--levels", default=",".join(map(str, LEVELS)))
    ap.add_argument("--epochs", type=float, default=1.0, help="recovery passes over the data")
    ap.add_argument("--steps", type=int, default=None, help="recovery steps (overrides --epochs)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-tp", action="store_true", help="leave out the Torch-Pruning peer")
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from the JSON")
    args = ap.parse_args(argv)
    args.levels = [float(v) for v in args.levels.split(",")]
    torch.set_num_threads(args.threads)
    if args.report_only:
        saved = json.loads(RESULTS_JSON.read_text())
        write({r["model"]: r for r in saved["results"]}, saved["env"], final=True)
        return 0
    env = _env(argv)
    train_set, test = default_data("train"), default_data("test")
    for name in args.models.split(","):
        trained(name, progress=False)  # make sure the cache is filled before timing anything
    results: dict[str, dict] = {}
    for name in args.models.split(","):
        t0 = time.perf_counter()

        def partial(out: dict, name: str = name) -> None:
            results[name] = out
            write(results, env, final=False)

        res = run_model(name, args, train_set, test, partial)
        res["bench_seconds"] = round(time.perf_counter() - t0, 1)
        results[name] = res
        write(results, env, final=True)
    print(RESULTS_MD.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
