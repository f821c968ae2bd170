"""How repeatable is a host measurement? Time one model 5 times with the board runner.

Each repeat is a fresh runner process (`devices.local.run_local`, host profile), as a user's
`fair-edge` run would be. The spread is (max p50 - min p50) / median p50 over the repeats; the
target is within 5%. Also prints the roofline estimate next to it, labelled, for scale.

    .venv/bin/python -m bench.bench_runner_spread [--model resnet18] [--repeats 5] [--runs 100]
        [--threads 1] [--out bench/out/runner_spread.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

from calibration.fileio import atomic_write_text, cache_dir
from devices.estimate import estimate_onnx
from devices.local import run_local
from pipeline.zoo import torchvision_model


def export(name: str) -> Path:
    """The model with its random init (seed 0) exported once to ONNX in the cache."""
    path = cache_dir("bench", "onnx") / f"{name}-seed0.onnx"
    if not path.is_file():
        torch.manual_seed(0)
        model = torchvision_model(name, num_classes=1000).eval()
        tmp = path.with_suffix(".tmp.onnx")
        torch.onnx.export(
            model, torch.randn(1, 3, 224, 224), str(tmp), dynamo=False, do_constant_folding=False
        )
        tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--target", type=float, default=0.05)
    p.add_argument("--out", default="bench/out/runner_spread.json")
    args = p.parse_args(argv)

    path = export(args.model)
    rows = []
    for i in range(args.repeats):
        m = run_local(path, "host", runs=args.runs, warmup=args.warmup, threads=args.threads)
        rows.append(m)
        print(
            f"repeat {i + 1}: p50 {m.latency_ms['p50']:.3f} ms  mean {m.latency_ms['mean']:.3f}  "
            f"p90 {m.latency_ms['p90']:.3f}  peak RSS {m.memory_mb['peak_rss']:.0f} MB  "
            f"load {m.load_s * 1e3:.0f} ms  cpu p50 {m.cpu_ms['p50']:.3f} ms",
            flush=True,
        )
    p50 = [m.latency_ms["p50"] for m in rows]
    mean = [m.latency_ms["mean"] for m in rows]
    cpu = [m.cpu_ms["p50"] for m in rows]
    spread = (max(p50) - min(p50)) / statistics.median(p50)
    cpu_spread = (max(cpu) - min(cpu)) / statistics.median(cpu)
    load = [m.system.get("loadavg_1m_before") for m in rows]
    mean_spread = (max(mean) - min(mean)) / statistics.median(mean)
    est = estimate_onnx(path, "host")
    print(
        f"{args.model}, {args.threads} thread(s), {args.repeats} x {args.runs} runs: "
        f"p50 median {statistics.median(p50):.3f} ms, spread (max-min)/median {spread * 100:.2f}% "
        f"(target <= {args.target * 100:.0f}%), mean spread {mean_spread * 100:.2f}%"
    )
    print(
        f"process CPU time per inference: p50 median {statistics.median(cpu):.3f} ms, spread "
        f"{cpu_spread * 100:.2f}%; 1-min load average before each repeat: {load}"
    )
    print(f"estimate (not a measurement): {est.latency_ms:.3f} ms, {est.bound}-bound; {est.basis}")
    result = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python -m bench.bench_runner_spread " + " ".join(argv or sys.argv[1:]),
        "machine": platform.platform(),
        "model": args.model,
        "threads": args.threads,
        "runs": args.runs,
        "p50_ms": p50,
        "mean_ms": mean,
        "p50_spread": spread,
        "mean_spread": mean_spread,
        "cpu_p50_ms": cpu,
        "cpu_p50_spread": cpu_spread,
        "loadavg_1m": load,
        "within_target": spread <= args.target,
        "estimate": est.to_dict(),
        "measurements": [m.to_dict() for m in rows],
    }
    atomic_write_text(args.out, json.dumps(result, indent=1))
    return 0 if spread <= args.target else 1


if __name__ == "__main__":
    sys.exit(main())
