"""Does ONNX Runtime CPU (fp32) on this host run a conv faster at channel multiples of 4/8/16?

Sweeps the output channel count C of a 3x3 conv (input channels fixed, and both equal) and
records the best kernel time per C (ORT profiler). A step pattern shows as counts just above a multiple costing
about as much as the next multiple (or more), and exact multiples sitting below the trend line.
The ratio printed per multiple m is: mean latency per output channel at counts that are
multiples of m, divided by the same at the other counts (below 1: multiples are cheaper).

    .venv/bin/python -m bench.bench_channel_multiple [--threads 1] [--hw 28] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from devices.latency_model import kernel_ms


def conv_model(cin: int, cout: int, hw: int, k: int = 3) -> bytes:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((cout, cin, k, k)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), "b")
    node = helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[k // 2] * 4, kernel_shape=[k, k])
    relu = helper.make_node("Relu", ["c"], ["y"])
    graph = helper.make_graph(
        [node, relu],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, hw, hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cout, hw, hw])],
        [w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def best_kernel_ms(model: bytes, cin: int, hw: int, threads: int, repeats: int) -> float:
    """The conv's best kernel time over `repeats` runs, from ONNX Runtime's profiler (the layout
    reorders at the one-op model's borders left out): robust while other jobs share the CPU."""
    x = np.random.default_rng(1).standard_normal((1, cin, hw, hw)).astype(np.float32)
    return kernel_ms(model, {"x": x}, threads, repeats)


def sweep(
    cin_fixed: int | None, counts: list[int], hw: int, threads: int, repeats: int, rounds: int
) -> dict[int, float]:
    """Best over `rounds` interleaved passes of each count's best kernel time."""
    models = {c: conv_model(cin_fixed or c, c, hw) for c in counts}
    per: dict[int, list[float]] = {c: [] for c in counts}
    for _ in range(rounds):
        for c in counts:
            per[c].append(best_kernel_ms(models[c], cin_fixed or c, hw, threads, repeats))
    return {c: float(np.min(v)) for c, v in per.items()}


def step_ratios(lat: dict[int, float]) -> dict[int, float]:
    out = {}
    for m in (4, 8, 16):
        on = [lat[c] / c for c in lat if c % m == 0]
        off = [lat[c] / c for c in lat if c % m != 0]
        out[m] = float(np.mean(on) / np.mean(off))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--hw", type=int, default=28)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    result = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": platform.processor() or platform.machine(),
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "threads": args.threads,
        "hw": args.hw,
        "sweeps": {},
    }
    for label, cin, counts in (
        ("cout sweep, cin=64", 64, list(range(48, 81))),
        ("cin=cout sweep", None, list(range(48, 81))),
        ("cout sweep, cin=128", 128, list(range(112, 145))),
    ):
        lat = sweep(cin, counts, args.hw, args.threads, args.repeats, args.rounds)
        ratios = step_ratios(lat)
        result["sweeps"][label] = {
            "latency_ms": lat,
            "per_channel_ratio_on_vs_off_multiple": ratios,
        }
        print(f"\n== {label} (3x3 conv + ReLU, {args.hw}x{args.hw}, {args.threads} thread)")
        for c, v in lat.items():
            mark = "".join(s for m, s in ((4, "4"), (8, "8"), (16, "G")) if c % m == 0)
            print(f"  C={c:4d}  {v:7.3f} ms  {v / c * 1e3:7.2f} us/ch  {mark}")
        print(
            "  per-channel cost at multiples / elsewhere:",
            {m: round(r, 3) for m, r in ratios.items()},
        )
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
