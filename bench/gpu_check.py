"""The GPU measurements of issue 15, prepared for a machine with an NVIDIA GPU (not run here).

1. Original vs pruned (50% FLOPs, channels rounded to 8) of the default model (SmallCNN on
   Fashion-MNIST), resnet50 and mobilenet_v2 (3x224x224), timed by the board runner through
   ONNX Runtime: TensorRT fp32 / fp16 / int8 (symmetric QDQ), CUDA fp32 / fp16; each pair in one
   run, strict providers (a missing one fails, never a silent CPU run), the provider of every
   node recorded, first TensorRT run (engine build) apart from the steady state, and a second
   TensorRT run that must reuse the engine cache. Where trtexec is found, it times the pair too.
2. The channel multiple where TensorRT's latency steps (fp16 and int8): bench_channel_multiple's
   sweep through the TensorRT provider.
3. Scoring on CUDA (float32 and half) against one forward+backward over the same data on the same
   GPU (target: at most 1.5x).

    .venv/bin/python -m bench.gpu_check [--quick] [--trtexec PATH] [--out bench/RESULTS-gpu.md]

Needs onnxruntime-gpu with TensorrtExecutionProvider and CUDAExecutionProvider, TensorRT, and
torch with CUDA; without them it stops with one line and writes nothing.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import platform
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F

from calibration.fileio import atomic_write_text
from devices.errors import DeviceError
from devices.report import measure_pair
from devices.runspec import RunSpec

TRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
# (label, provider list, precision, which file: fp32 / fp16 / int8)
CONFIGS = [
    ("TensorRT fp32", [TRT, CUDA, CPU], "fp32", "fp32"),
    ("TensorRT fp16", [TRT, CUDA, CPU], "fp16", "fp32"),
    ("TensorRT int8", [TRT, CUDA, CPU], "int8", "int8"),
    ("CUDA fp32", [CUDA, CPU], "fp32", "fp32"),
    ("CUDA fp16", [CUDA, CPU], "fp32", "fp16"),
]


def fail(msg: str) -> None:
    print(f"gpu_check: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def preflight() -> dict[str, Any]:
    have = ort.get_available_providers()
    missing = [p for p in (TRT, CUDA) if p not in have]
    if missing:
        fail(f"{', '.join(missing)} not in this onnxruntime ({', '.join(have)}): install "
             "onnxruntime-gpu built with TensorRT")  # fmt: skip
    if not torch.cuda.is_available():
        fail("torch sees no CUDA device: install a CUDA build of torch")
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(0),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def pruned_pair(name: str, folder: Path, quick: bool) -> tuple[Path, Path, np.ndarray]:
    """Original and pruned ONNX (50% FLOPs, rounded to 8 channels) plus calibration inputs."""
    from bench.bench_latency import _export, random_scores
    from exporters.costs import OnnxCostModel
    from exporters.graph_groups import find_groups
    from exporters.surgery import apply_plan, save_model
    from pipeline.planning import plan_for_budget
    from pipeline.rounding import round_plan

    if name == "default":
        from calibration.loaders import load_fashion_mnist
        from pipeline.train import default_model

        model, shape = default_model(progress=False), (1, 1, 28, 28)
        calib = load_fashion_mnist("train").inputs[:256]
    else:
        from pipeline.zoo import torchvision_model

        torch.manual_seed(0)
        size = 128 if quick else 224
        model, shape = torchvision_model(name, 1000).eval(), (1, 3, size, size)
        calib = np.random.default_rng(0).standard_normal((64, *shape[1:])).astype(np.float32)
    proto = _export(model, shape)
    groups = find_groups(proto)
    scores = random_scores(model, shape, 4 if shape[-1] > 100 else 8)
    plan = plan_for_budget(scores, 0.5, "flops", cost=OnnxCostModel(proto, groups), groups=groups,
                           model=model, strict=False)  # fmt: skip
    plan = round_plan(plan, scores, 8, "nearest", groups=groups)
    original, pruned = folder / f"{name}.onnx", folder / f"{name}.pruned.onnx"
    save_model(proto, original)
    save_model(apply_plan(proto, plan)[0], pruned)
    return original, pruned, calib


def variants(path: Path, calib: np.ndarray) -> dict[str, Path]:
    from exporters.quantize import convert_fp16_onnx, quantize_int8_onnx

    return {
        "fp32": path,
        "fp16": convert_fp16_onnx(path, path.with_suffix(".fp16.onnx")),
        "int8": quantize_int8_onnx(path, path.with_suffix(".int8.onnx"), calib, symmetric=True),
    }


def row(label: str, comp: Any) -> dict[str, Any]:
    a, b = comp.original, comp.pruned

    def side(m: Any) -> dict[str, Any]:
        rt = m.runtime
        return {
            "p50_ms": m.p50_ms,
            "first_run_s": rt.get("first_run_s"),
            "load_s": m.load_s,
            "placement": (rt.get("placement") or {}).get("by_provider"),
            "cache_reused": (rt.get("engine_cache") or {}).get("reused"),
        }

    return {"config": label, "original": side(a), "pruned": side(b),
            "speedup_p50": comp.ratios["speedup_p50"]}  # fmt: skip


def part1(args: argparse.Namespace, folder: Path) -> list[dict[str, Any]]:
    rows = []
    for name in ("default", "resnet50", "mobilenet_v2"):
        original, pruned, calib = pruned_pair(name, folder, args.quick)
        files = {"original": variants(original, calib), "pruned": variants(pruned, calib)}
        for label, providers, precision, kind in CONFIGS:
            cache = folder / "trt-cache" / name / label.replace(" ", "-")
            spec = RunSpec(warmup=10, runs=args.runs, providers=providers, strict_providers=True,
                           precision=precision, trt_cache=str(cache), workspace_mb=2048)  # fmt: skip
            passes = 2 if providers[0] == TRT else 1  # the second must reuse the cached engines
            for i in range(passes):
                try:
                    comp = measure_pair(files["original"][kind], files["pruned"][kind], "host",
                                        "local", spec)  # fmt: skip
                except DeviceError as exc:
                    rows.append({"model": name, "config": label, "error": str(exc)})
                    break
                rows.append({"model": name, "pass": i + 1, **row(label, comp)})
                print(json.dumps(rows[-1]), flush=True)
        if args.trtexec:
            spec = RunSpec(runtime="trtexec", runs=args.runs, precision="fp16",
                           trt_cache=str(folder / "trtexec" / name),
                           extra_args=["--trtexec", args.trtexec])  # fmt: skip
            try:
                comp = measure_pair(original, pruned, "host", "local", spec)
                rows.append({"model": name, **row("trtexec fp16", comp)})
            except DeviceError as exc:
                rows.append({"model": name, "config": "trtexec fp16", "error": str(exc)})
    return rows


def part2(args: argparse.Namespace) -> dict[str, Any]:
    from bench.bench_channel_multiple import step_ratios, sweep

    counts = list(range(48, 97, 2 if args.quick else 1))
    out = {}
    for precision in ("fp16", "int8"):
        lat = sweep(64, counts, 28, 0, 50, 2 if args.quick else 3, "tensorrt", precision)
        out[precision] = {"latency_ms": lat, "ratios": step_ratios(lat, (8, 16, 32))}
        print(precision, out[precision]["ratios"], flush=True)
    return out


def _cuda_time(fn: Any, repeats: int) -> float:
    best = np.inf
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return float(best)


def part3(args: argparse.Namespace) -> list[dict[str, Any]]:
    from pipeline.scoring import score
    from pipeline.train import default_model
    from pipeline.zoo import torchvision_model

    rows = []
    for name in ("default", "resnet50"):
        torch.manual_seed(0)
        if name == "default":
            model, shape = default_model(progress=False), (1, 28, 28)
        else:
            model, shape = (
                torchvision_model("resnet50", 10),
                (3, 224 if not args.quick else 128, 224 if not args.quick else 128),
            )
        x = torch.randn(10 * 32, *shape)
        y = torch.arange(10 * 32) % 10
        for dtype in (torch.float32, torch.float16):
            m = copy.deepcopy(model).eval().to("cuda", dtype)
            xd, yd = x.to("cuda", dtype), y.to("cuda")

            def fwd_bwd(
                m: torch.nn.Module = m, xd: torch.Tensor = xd, yd: torch.Tensor = yd
            ) -> None:
                for s in range(0, len(xd), 64):
                    F.cross_entropy(m(xd[s : s + 64]).float(), yd[s : s + 64]).backward()

            def scoring(
                m: torch.nn.Module = m, xd: torch.Tensor = xd, yd: torch.Tensor = yd
            ) -> None:
                score(m, (xd, yd), samples_per_class=32, device="cuda", progress=False)

            base = _cuda_time(fwd_bwd, 3)
            try:
                t = _cuda_time(scoring, 3)
                rows.append({"model": name, "dtype": str(dtype), "fwd_bwd_s": base, "score_s": t,
                             "ratio": t / base, "target_met": t / base <= 1.5})  # fmt: skip
            except Exception as exc:  # half precision may not be supported: record why
                rows.append({"model": name, "dtype": str(dtype), "fwd_bwd_s": base,
                             "error": f"{type(exc).__name__}: {exc}"})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(env: dict[str, Any], p1: list, p2: dict, p3: list, cmd: str) -> str:
    lines = [f"# GPU results (issue 15), measured {env['date']} on {env['gpu']} (sm {env['capability']})",
             "", f"Command: `{cmd}`", "", f"onnxruntime {env['onnxruntime']}, torch {env['torch']}", "",
             "## 1. Original vs pruned (50% FLOPs, rounded to 8)", "",
             "| model | config | pass | original p50 (ms) | pruned p50 (ms) | speedup | first run orig/pruned (s) | nodes by provider (pruned) | cache reused |",
             "|---|---|---|---:|---:|---:|---|---|---|"]  # fmt: skip
    for r in p1:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['config']} | - | failed: {r['error']} |||||")
            continue
        o, p = r["original"], r["pruned"]
        lines.append(
            f"| {r['model']} | {r['config']} | {r.get('pass', 1)} | {o['p50_ms']:.3f} | "
            f"{p['p50_ms']:.3f} | {r['speedup_p50']:.2f} | {o['first_run_s'] or 0:.2f} / "
            f"{p['first_run_s'] or 0:.2f} | {p['placement']} | {p['cache_reused']} |"
        )
    lines += ["", "## 2. TensorRT channel multiple (3x3 conv, cin 64, 28x28)", "",
              "| precision | per-channel cost at multiples of 8 / 16 / 32 vs elsewhere |", "|---|---|"]  # fmt: skip
    for prec, v in p2.items():
        cells = " / ".join(f"{v['ratios'][m]:.3f}" for m in (8, 16, 32))
        lines.append(f"| {prec} | {cells} |")
    lines += ["", "## 3. Scoring on CUDA vs one forward+backward (target <= 1.5x)", "",
              "| model | dtype | fwd+bwd (s) | scoring (s) | ratio |", "|---|---|---:|---:|---:|"]  # fmt: skip
    for r in p3:
        if "error" in r:
            lines.append(
                f"| {r['model']} | {r['dtype']} | {r['fwd_bwd_s']:.3f} | failed: {r['error']} | - |"
            )
        else:
            lines.append(
                f"| {r['model']} | {r['dtype']} | {r['fwd_bwd_s']:.3f} | {r['score_s']:.3f} | {r['ratio']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller inputs and sweeps")
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--trtexec", default=shutil.which("trtexec") or "")
    ap.add_argument("--out", default="bench/RESULTS-gpu-measured.md")
    args = ap.parse_args(argv)
    env = preflight()
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory(prefix="fair-edge-gpu-") as tmp:
        p1 = part1(args, Path(tmp))
    p2 = part2(args)
    p3 = part3(args)
    cmd = "python -m bench.gpu_check " + " ".join(argv if argv is not None else sys.argv[1:])
    atomic_write_text(args.out, markdown(env, p1, p2, p3, cmd))
    atomic_write_text(Path(args.out).with_suffix(".json"),
                      json.dumps({"env": env, "pairs": p1, "channel_multiple": p2, "scoring": p3},
                                 indent=1, default=str))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
