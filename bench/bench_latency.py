"""Does latency drop with the FLOPs? Rounding and latency-budget planning on the host (ORT CPU).

Part 1, per model (torchvision resnet18 / mobilenet_v2 at 224, and the Fashion-MNIST nets
SmallCNN / VGG-small / ResNet at 1x28x28; untrained weights: latency does not depend on them):
plan for 30% and 50% FLOPs reduction (FAIR scores on random labelled inputs, exact ONNX FLOPs),
prune for real (verified surgery), and measure the latency reduction without rounding and with
rounding to 4, 8 and 16 channels. All variants of one model are timed in interleaved rounds, side by
side, so load on the machine hits them alike. Ratio = latency reduction / FLOPs reduction of the
unrounded plan (target with rounding: >= 0.9).

Part 2: latency-model accuracy (predicted vs measured on held-out random rounded plans: MAPE).

Part 3: the latency-budget planner for three targets, on the trained default model
(pipeline.train.default_model, Fashion-MNIST test accuracy at each) and on resnet18.

    .venv/bin/python -m bench.bench_latency [--threads 1] [--quick] [--out bench/RESULTS-latency.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from calibration.fileio import atomic_write_text
from devices.latency_model import (
    LatencyModel,
    build_latency_model,
    calibrate,
    evaluate,
    profile_run,
    uniform_counts,
)
from devices.latency_plan import plan_for_latency
from devices.profile import load_profile
from exporters.costs import OnnxCostModel
from exporters.graph_groups import find_groups
from exporters.onnx_export import export_onnx
from exporters.random_plan import random_plan
from exporters.surgery import apply_plan
from pipeline.models import VGG, VGG_SMALL_CFG, ResNet, SmallCNN
from pipeline.plan import ModelFingerprint, Plan
from pipeline.planning import plan_for_budget
from pipeline.rounding import round_plan
from pipeline.scoring import score
from pipeline.zoo import torchvision_model

MULTIPLES = (4, 8, 16)
HOST_MULTIPLE = load_profile("host").channel_multiple  # detected from this CPU


def _export(model: torch.nn.Module, shape: tuple[int, ...]) -> onnx.ModelProto:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_onnx(model.eval(), torch.randn(*shape), None)


def interleaved(
    models: dict[str, onnx.ModelProto], threads: int, rounds: int, repeats: int
) -> dict[str, tuple[float, float]]:
    """(profiled latency, best wall-clock run) in ms of each model, round-robin over `rounds`.

    Profiled latency: ORT profiler, sum of each node's best kernel time + best per-run overhead
    (devices.latency_model.ProfiledRun), robust on a busy machine; both are bests over rounds.
    """
    best: dict[str, list[float]] = {k: [np.inf, np.inf] for k in models}
    data = {k: m.SerializeToString() for k, m in models.items()}
    for _ in range(rounds):
        for k, d in data.items():
            run = profile_run(d, threads, repeats)
            best[k][0] = min(best[k][0], run.latency_ms)
            best[k][1] = min(best[k][1], run.wall_min_ms)
    return {k: (v[0], v[1]) for k, v in best.items()}


def model_zoo(quick: bool) -> list[tuple[str, Callable[[], torch.nn.Module], tuple[int, ...]]]:
    zoo = [
        ("SmallCNN (1x28x28)", lambda: SmallCNN(in_channels=1, width=32), (1, 1, 28, 28)),
        ("VGG-small (1x28x28)", lambda: VGG(VGG_SMALL_CFG, in_channels=1), (1, 1, 28, 28)),
        ("ResNet (1x28x28)", lambda: ResNet(in_channels=1), (1, 1, 28, 28)),
    ]
    size = 128 if quick else 224
    zoo += [
        (
            f"resnet18 (3x{size}x{size})",
            lambda: torchvision_model("resnet18", 10),
            (1, 3, size, size),
        ),
        (
            f"mobilenet_v2 (3x{size}x{size})",
            lambda: torchvision_model("mobilenet_v2", 10),
            (1, 3, size, size),
        ),
    ]
    return zoo


def random_scores(model: torch.nn.Module, shape: tuple[int, ...], per_class: int):
    torch.manual_seed(0)
    n = 10 * per_class
    x = torch.randn(n, *shape[1:])
    y = torch.arange(n) % 10
    return score(
        model, (x, y), samples_per_class=per_class, projections=32, progress=False, batch_size=16
    )


def part1(args, lines: list[str], models_out: dict) -> None:
    lines += [
        "## 1. Latency reduction vs FLOPs reduction, with and without channel rounding",
        "",
        f"ORT CPU fp32, {args.threads} thread(s); all variants of a model timed round-robin in "
        f"{args.rounds} rounds (x3 for the 28x28 nets) of {args.repeats} runs. Latency: ORT-profiled (sum of every node's "
        "best kernel time + best per-run overhead: robust while other jobs share the 2 cores); "
        "wall: best wall-clock run of the same runs. Reduction = 1 - pruned/unpruned. Ratio = "
        "latency reduction / FLOPs reduction of the same variant (ratio vs plan: / FLOPs reduction "
        "of the unrounded plan). Rounding: 'nearest', units moved by the FAIR ranking.",
        "",
        "| model | FLOPs target | variant | FLOPs reduction | latency (ms) | latency reduction | ratio | ratio vs plan | wall (ms) | wall reduction |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    summary_rows: list[tuple[str, str, float, float, float]] = []
    for label, build, shape in model_zoo(args.quick):
        t0 = time.perf_counter()
        torch.manual_seed(0)
        model = build().eval()
        proto = _export(model, shape)
        groups = find_groups(proto)
        cost = OnnxCostModel(proto, groups)
        scores = random_scores(model, shape, 4 if shape[-1] > 100 else 8)
        variants: dict[str, onnx.ModelProto] = {"unpruned": proto}
        flops: dict[str, float] = {"unpruned": 0.0}
        plans: dict[str, Plan] = {}
        for target in (0.3, 0.5):
            p = plan_for_budget(
                scores, target, "flops", cost=cost, groups=groups, model=model, strict=False
            )
            key = f"{int(target * 100)}%"
            plans[key] = p
            variants[f"{key} unrounded"] = apply_plan(proto, p)[0]
            flops[f"{key} unrounded"] = 1 - cost.remaining(p)["flops"]
            for m in MULTIPLES:
                rp = round_plan(p, scores, m, "nearest", groups=groups)
                variants[f"{key} rounded x{m}"] = apply_plan(proto, rp)[0]
                flops[f"{key} rounded x{m}"] = 1 - cost.remaining(rp)["flops"]
        # sub-millisecond models: more rounds, so a busy moment does not decide a row
        rounds = args.rounds * (3 if shape[-1] < 100 else 1)
        lat = interleaved(variants, args.threads, rounds, args.repeats)
        full, full_wall = lat["unpruned"]
        rows = []
        for k in variants:
            if k == "unpruned":
                lines.append(
                    f"| {label} | - | unpruned | 0 | {full:.3f} | 0 | - | - | {full_wall:.3f} | 0 |"
                )
                continue
            tkey = k.split()[0]
            red = 1 - lat[k][0] / full
            wred = 1 - lat[k][1] / full_wall
            ratio = red / flops[k]
            ratio_plan = red / flops[f"{tkey} unrounded"]
            rows.append((k, red, ratio))
            summary_rows.append((label, k, flops[k], red, ratio))
            lines.append(
                f"| {label} | {tkey} | {k[len(tkey) + 1 :]} | {flops[k]:.1%} | {lat[k][0]:.3f} | "
                f"{red:.1%} | {ratio:.2f} | {ratio_plan:.2f} | {lat[k][1]:.3f} | {wred:.1%} |"
            )
        models_out[label] = {
            "model": model,
            "proto": proto,
            "groups": groups,
            "scores": scores,
            "shape": shape,
        }
        print(f"[part 1] {label}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        for k, red, ratio in rows:
            print(
                f"  {label:28s} {k:18s} FLOPs -{flops[k]:.1%}  latency -{red:.1%}  ratio {ratio:.2f}"
            )
    lines.append("")
    for m in ("unrounded", *[f"rounded x{m}" for m in MULTIPLES]):
        sel = [r for r in summary_rows if r[1].endswith(m)]
        ratios = [r[4] for r in sel]
        met = sum(r >= 0.9 for r in ratios)
        lines.append(
            f"- {m}: latency/FLOPs reduction ratio median {np.median(ratios):.2f}, min "
            f"{min(ratios):.2f}; >= 0.9 in {met} of {len(ratios)} model/target pairs"
        )
    lines.append("")


def part2(args, lines: list[str], models_out: dict, lms: dict[str, LatencyModel]) -> None:
    lines += [
        f"## 2. Latency-model accuracy (held-out random plans, rounded to {HOST_MULTIPLE})",
        "",
        "Tables: per Conv/Gemm, single-op ONNX models over a 4x4 grid of (input, output) channel "
        f"counts (25/50/75/100%, multiples of {HOST_MULTIPLE}), each the op's best kernel time over "
        f"{args.table_repeats} profiled runs. Held-out plans: random channel removal of 30-50% per "
        f"group (exporters.random_plan), rounded to {HOST_MULTIPLE}, pruned by the verified surgery and measured "
        f"whole (ORT-profiled latency, best of {args.rounds} sessions), right after the tables "
        "were built (no cache). Calibrated: offset and scale fitted on the unpruned model and two "
        "other (uniform 50% / 75%) plans, measured at the same time.",
        "",
        "| model | tables build (s) | unpruned (ms) | plans | MAPE raw | max err raw | MAPE calibrated | max err calibrated |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, d in models_out.items():
        proto, groups, model, scores = d["proto"], d["groups"], d["model"], d["scores"]
        lm = build_latency_model(
            proto, "host", threads=args.threads, multiple=HOST_MULTIPLE, repeats=args.table_repeats,
            cache=False,
        )  # fmt: skip
        lms[label] = lm
        fp = ModelFingerprint.from_model(model)
        heldout = [
            round_plan(
                random_plan(groups, 0.3 + 0.05 * s, 100 + s, fp),
                scores,
                HOST_MULTIPLE,
                "nearest",
                groups=groups,
            )
            for s in range(args.heldout)
        ]
        materialize = lambda p, proto=proto: apply_plan(proto, p)[0]  # noqa: E731
        raw = dict(evaluate(lm, heldout, materialize, repeats=args.repeats, rounds=args.rounds))
        cal_plans = [_uniform_plan(lm, scores, groups, f) for f in (0.5, 0.75)]
        calibrate(
            lm, cal_plans, materialize, repeats=args.repeats, rounds=args.rounds, full_model=proto
        )
        calibrated = evaluate(lm, heldout, materialize, repeats=args.repeats, rounds=args.rounds)
        lines.append(
            f"| {label} | {lm.build_s:.1f} | {lm.full_ms:.3f} | {raw['plans']} | {raw['mape_pct']:.1f}% | "
            f"{raw['max_err_pct']:.1f}% | {calibrated['mape_pct']:.1f}% | {calibrated['max_err_pct']:.1f}% |"
        )
        print(
            f"[part 2] {label}: MAPE raw {raw['mape_pct']:.1f}%  calibrated {calibrated['mape_pct']:.1f}%"
        )
    lines.append("")


def _uniform_plan(lm: LatencyModel, scores, groups, fraction: float) -> Plan:
    """A plan keeping `fraction` of every group (lowest summed U removed), as counts from the model."""
    counts = uniform_counts(lm, fraction)
    layers = {}
    from pipeline.plan import LayerPlan

    done: set[str] = set()
    for g in groups:
        members = [m for m in g.members if m in scores.layers]
        if g.frozen or len(members) != len(g.members) or not members:
            continue
        kept = min(counts.get(m, g.n_channels) for m in members)
        u = sum(scores.layers[m].U for m in members)
        pruned = sorted(int(i) for i in np.argsort(u, kind="stable")[: g.n_channels - kept])
        for m in members:
            layers[m] = LayerPlan(m, g.n_channels, pruned, group=g.name)
            done.add(m)
    return Plan(fingerprint=scores.fingerprint, layers=layers, groups=list(groups))


def _mode(r) -> str:
    return str(r.plan.method.get("rounding", {}).get("mode", "unrounded"))


def part3(args, lines: list[str], models_out: dict, lms: dict[str, LatencyModel]) -> None:
    from exporters.evaluate import accuracy
    from pipeline.train import default_data, default_model_info

    model, info = default_model_info(progress=False)
    train = default_data("train")
    test = default_data("test")
    from calibration.sampling import balanced_sample

    calib, _ = balanced_sample(train, 32, seed=0)
    scores = score(model, calib, samples_per_class=32, progress=False)
    proto = _export(model, (1, 1, 28, 28))
    groups = find_groups(proto)
    lm = build_latency_model(proto, "host", threads=args.threads, repeats=args.table_repeats)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "full.onnx"
        onnx.save(proto, path)
        base_acc = accuracy(path, test.inputs, test.labels)
    lines += [
        "## 3. Latency-budget planner (target within 10%, host)",
        "",
        f"Rounded to the host profile's channel multiple ({lm.multiple}; rounding mode 'auto': the "
        "least-pruning of nearest/up/down meeting the prediction, shown after alpha); the planner "
        "searches alpha "
        "with the latency model, prunes the candidate (verified surgery), measures it with the "
        "devices runner (run_local, 50 runs, ORT profiler on: measured = profiled latency; wall p50 "
        "of the same runs beside it) and corrects the model's target by measured/predicted (at "
        "most 3 attempts). Accuracy: Fashion-MNIST test set (10,000 images), pruned ONNX model.",
        "",
        f"Default model (SmallCNN width 16, trained; unpruned accuracy {base_acc:.2%}, "
        f"unpruned latency {lm.full_ms:.3f} ms; latency model uncalibrated):",
        "",
        "| target (ms) | alpha | predicted (ms) | measured (ms) | error vs target | within 10% | attempts | wall p50 (ms) | FLOPs kept | accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    cost = OnnxCostModel(proto, groups)
    fractions = (0.9, 0.8, 0.7)
    hits = 0
    for f in fractions:
        target = f * lm.full_ms
        try:
            r = plan_for_latency(
                scores, proto, "host", target, groups, latency_model=lm, model=model
            )
        except Exception as exc:  # report an unreachable target as a row, keep going
            lines.append(f"| {target:.3f} ({f:.0%}) | - | - | - | - | no: {exc} | - | - | - | - |")
            continue
        pruned = apply_plan(proto, r.plan)[0]
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "p.onnx"
            onnx.save(pruned, path)
            acc = accuracy(path, test.inputs, test.labels)
        hits += bool(r.within_tolerance)
        lines.append(
            f"| {target:.3f} ({f:.0%}) | {r.alpha:.4g} ({_mode(r)}) | {r.predicted_ms:.3f} | {r.measured_ms:.3f} | "
            f"{r.error_pct:+.1f}% | {'yes' if r.within_tolerance else 'no'} | {len(r.attempts)} | "
            f"{r.measured_p50_ms:.3f} | {cost.remaining(r.plan)['flops']:.1%} | {acc:.2%} |"
        )
        print(f"[part 3] default model: {r.summary()}  accuracy {acc:.2%}")
    lines.append("")
    lines.append(f"Targets within 10%: {hits} of {len(fractions)} (default model).")
    lines.append("")
    for label in [k for k in models_out if k.startswith(("resnet18", "mobilenet_v2"))]:
        d = models_out[label]
        lm = lms[label]
        lines += [
            f"{label} (untrained weights: latency only; unpruned {lm.full_ms:.3f} ms; the latency "
            "model of part 2, calibrated there):",
            "",
            "| target (ms) | alpha | predicted (ms) | measured (ms) | error vs target | within 10% | attempts | wall p50 (ms) | FLOPs kept |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        cost = OnnxCostModel(d["proto"], d["groups"])
        model_hits = 0
        for f in (0.85, 0.7, 0.55):
            target = f * lm.full_ms
            try:
                r = plan_for_latency(
                    d["scores"], d["proto"], "host", target, d["groups"], latency_model=lm,
                    rounding=True, model=d["model"],
                )  # fmt: skip
            except Exception as exc:  # report an unreachable target as a row, keep going
                lines.append(f"| {target:.3f} ({f:.0%}) | - | - | - | - | no: {exc} | - | - | - |")
                continue
            model_hits += bool(r.within_tolerance)
            lines.append(
                f"| {target:.3f} ({f:.0%}) | {r.alpha:.4g} ({_mode(r)}) | {r.predicted_ms:.3f} | {r.measured_ms:.3f} | "
                f"{r.error_pct:+.1f}% | {'yes' if r.within_tolerance else 'no'} | {len(r.attempts)} | "
                f"{r.measured_p50_ms:.3f} | {cost.remaining(r.plan)['flops']:.1%} |"
            )
            print(f"[part 3] {label}: {r.summary()}")
        lines += ["", f"Targets within 10%: {model_hits} of 3 ({label}).", ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--table-repeats", type=int, default=10)
    ap.add_argument("--heldout", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="torchvision models at 128x128")
    ap.add_argument("--skip-planner", action="store_true")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(max(1, args.threads))
    t0 = time.perf_counter()
    cmd = "python -m bench.bench_latency " + " ".join(sys.argv[1:])
    lines = [
        f"Command: `{cmd.strip()}`  ",
        f"Date: {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}  ",
        f"Machine: {platform.machine()} {os.cpu_count()} cores ({platform.processor() or 'cpu'}), "
        f"load average at start {os.getloadavg()[0]:.1f}; onnxruntime {ort.__version__}, torch {torch.__version__}",
        "",
    ]
    models_out: dict = {}
    lms: dict[str, LatencyModel] = {}
    part1(args, lines, models_out)
    part2(args, lines, models_out, lms)
    if not args.skip_planner:
        part3(args, lines, models_out, lms)
    lines.append(
        f"Total bench time {time.perf_counter() - t0:.0f} s; load average at end {os.getloadavg()[0]:.1f}."
    )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        atomic_write_text(args.out, text)


if __name__ == "__main__":
    main()
