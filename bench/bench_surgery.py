"""Surgery + verification time, and ONNX Runtime CPU latency of pruned vs original models.

Run: .venv/bin/python -m bench.bench_surgery [--models resnet50 vgg16_bn] [--runs 20]
Prints a Markdown table; latency is measured side by side (interleaved runs, median) in one run.
surgery s = channel analysis + graph edits + shape inference + checker; verify s = building the
masked original and comparing both in ONNX Runtime on one random batch of 2. Plans are random
(the structure, not the choice of channels, sets the cost); 'kept multiple of 8' rounds each
group's kept width to a multiple of 8.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import numpy as np
import onnxruntime as ort
import torch

from exporters.graph_groups import ChannelGraph
from exporters.onnx_export import export_onnx
from exporters.random_plan import random_plan
from exporters.surgery import apply_plan
from pipeline.plan import ModelFingerprint
from pipeline.zoo import torchvision_model


def _session(model) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _latency(sessions: list[ort.InferenceSession], feed: np.ndarray, runs: int) -> list[float]:
    """Median seconds per session, runs interleaved so load changes hit all alike."""
    times: list[list[float]] = [[] for _ in sessions]
    for s in sessions:
        s.run(None, {"input": feed})
    for _ in range(runs):
        for k, s in enumerate(sessions):
            t = time.perf_counter()
            s.run(None, {"input": feed})
            times[k].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="+", default=["resnet50", "vgg16_bn"])
    ap.add_argument("--fractions", nargs="+", type=float, default=[0.3, 0.5])
    ap.add_argument("--multiples", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    print(
        f"# bench_surgery {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
        f"onnxruntime {ort.__version__}, input 1x3x{args.size}x{args.size}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start\n"
    )
    print(
        "| model | removed/group | kept multiple of | surgery s | verify s | FLOPs kept | latency orig ms "
        "| latency pruned ms | latency gain / FLOPs gain |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    feed = np.random.default_rng(0).standard_normal((1, 3, args.size, args.size)).astype(np.float32)
    for name in args.models:
        torch.manual_seed(0)
        model = torchvision_model(name).eval()
        proto = export_onnx(model, torch.randn(1, 3, args.size, args.size), None)
        fp = ModelFingerprint.from_model(model)
        results = []
        groups = ChannelGraph(proto).channel_groups
        for frac in args.fractions:
            for mult in args.multiples:
                plan = random_plan(groups, frac, seed=0, fingerprint=fp, multiple=mult)
                # apply_plan re-runs the channel analysis: surgery_s includes it
                pruned, report = apply_plan(proto, plan)
                results.append((frac, mult, pruned, report))
        sessions = [_session(proto)] + [_session(r[2]) for r in results]
        lat = _latency(sessions, feed, args.runs)
        print(f"<!-- {name}: load average {os.getloadavg()[0]:.1f} after timing -->", flush=True)
        for k, (frac, mult, _, report) in enumerate(results):
            flops_kept = report.flops_after / report.flops_before
            lat_kept = lat[k + 1] / lat[0]
            ratio = (1 - lat_kept) / (1 - flops_kept) if flops_kept < 1 else float("nan")
            print(
                f"| {name} | {frac:.0%} | {mult} | {report.timings['surgery_s']:.2f} | "
                f"{report.timings['verify_s']:.2f} | "
                f"{flops_kept:.3f} | {lat[0] * 1e3:.1f} | {lat[k + 1] * 1e3:.1f} | {ratio:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
