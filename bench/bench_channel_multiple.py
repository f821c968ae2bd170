"""Does ONNX Runtime CPU (fp32) on this host run a conv faster at channel multiples of 4/8/16?

Sweeps the output channel count C of a 3x3 conv (input channels fixed, and both equal) and
records the best kernel time per C (ORT profiler). A step pattern shows as counts just above a multiple costing
about as much as the next multiple (or more), and exact multiples sitting below the trend line.
The ratio printed per multiple m is: mean latency per output channel at counts that are
multiples of m, divided by the same at the other counts (below 1: multiples are cheaper).

    .venv/bin/python -m bench.bench_channel_multiple [--threads 1] [--hw 28] [--out FILE]

On a GPU (onnxruntime-gpu): `--provider tensorrt --precision fp16|int8` (or `--provider cuda`)
times each count's conv through that execution provider instead (best wall-clock run of a
session with the runner's provider options; int8 runs the symmetric QDQ conv TensorRT takes),
to find where TensorRT's latency steps: the GPU profiles' channel_multiple.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import time

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


GPU_PROVIDERS = {
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider"],
    "cuda": ["CUDAExecutionProvider"],
}


def int8_conv_model(model: bytes, cin: int, hw: int) -> bytes:
    """The conv as symmetric int8 QDQ (zero points 0: what TensorRT accepts), calibrated on
    random inputs (latency does not depend on the values)."""
    import tempfile
    from pathlib import Path

    from exporters.quantize import quantize_int8_onnx

    x = np.random.default_rng(2).standard_normal((16, cin, hw, hw)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp, "c.onnx"), Path(tmp, "c.int8.onnx")
        src.write_bytes(model)
        quantize_int8_onnx(src, out, x, symmetric=True)
        return out.read_bytes()


def gpu_ms(model: bytes, cin: int, hw: int, provider: str, precision: str, repeats: int) -> float:
    """Best wall-clock run (ms) of the conv through a GPU execution provider, with the board
    runner's provider options (no engine cache: each count builds its own engine)."""
    from devices.board.runner import provider_options

    wanted = GPU_PROVIDERS[provider]
    missing = set(wanted) - set(ort.get_available_providers())
    if missing:
        raise SystemExit(
            f"bench_channel_multiple: error: {', '.join(sorted(missing))} not available in this "
            "onnxruntime; install onnxruntime-gpu (with TensorRT for --provider tensorrt)"
        )
    opts = provider_options(wanted, precision, None, 0, ort.__version__)
    sess = ort.InferenceSession(
        model, providers=[n for n, _ in opts], provider_options=[o for _, o in opts]
    )
    x = np.random.default_rng(1).standard_normal((1, cin, hw, hw)).astype(np.float32)
    for _ in range(5):  # the first run builds the engine
        sess.run(None, {"x": x})
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, {"x": x})
        best = min(best, time.perf_counter() - t0)
    return float(best * 1e3)


def sweep(
    cin_fixed: int | None,
    counts: list[int],
    hw: int,
    threads: int,
    repeats: int,
    rounds: int,
    provider: str = "cpu",
    precision: str = "fp32",
) -> dict[int, float]:
    """Best over `rounds` interleaved passes of each count's best kernel (CPU) or wall (GPU) time."""
    models = {c: conv_model(cin_fixed or c, c, hw) for c in counts}
    if provider != "cpu" and precision == "int8":
        models = {c: int8_conv_model(m, cin_fixed or c, hw) for c, m in models.items()}
    per: dict[int, list[float]] = {c: [] for c in counts}
    for _ in range(rounds):
        for c in counts:
            if provider == "cpu":
                per[c].append(best_kernel_ms(models[c], cin_fixed or c, hw, threads, repeats))
            else:
                per[c].append(gpu_ms(models[c], cin_fixed or c, hw, provider, precision, repeats))
    return {c: float(np.min(v)) for c, v in per.items()}


def step_ratios(lat: dict[int, float], multiples: tuple[int, ...] = (4, 8, 16)) -> dict[int, float]:
    out = {}
    for m in multiples:
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
    ap.add_argument("--provider", choices=("cpu", *GPU_PROVIDERS), default="cpu")
    ap.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32")
    args = ap.parse_args()
    result = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": platform.processor() or platform.machine(),
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "threads": args.threads,
        "provider": args.provider,
        "precision": args.precision,
        "hw": args.hw,
        "sweeps": {},
    }
    for label, cin, counts in (
        ("cout sweep, cin=64", 64, list(range(48, 81))),
        ("cin=cout sweep", None, list(range(48, 81))),
        ("cout sweep, cin=128", 128, list(range(112, 145))),
    ):
        lat = sweep(cin, counts, args.hw, args.threads, args.repeats, args.rounds,
                    args.provider, args.precision)  # fmt: skip
        ratios = step_ratios(lat, (4, 8, 16) if args.provider == "cpu" else (8, 16, 32))
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
