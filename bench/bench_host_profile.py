"""Measure the host profile's figures: float32 compute (GFLOP/s) and memory bandwidth (GB/s).

Compute: best of N numpy float32 1024x1024 matmuls (2 n^3 FLOPs) on one BLAS thread.
Bandwidth: best of N copies of a 256 MiB float32 array (bytes read + bytes written).
Timed with the process CPU clock, best of N: on a shared machine the wall clock also counts
the time other processes hold the core; the CPU clock does not.
The numbers go into devices/profiles/host.toml ([compute], [bandwidth]) with this command.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.bench_host_profile [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
from threadpoolctl import threadpool_limits


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((1024, 1024)).astype(np.float32)
    b = rng.standard_normal((1024, 1024)).astype(np.float32)
    with threadpool_limits(1):
        a @ b
        t = best_of(lambda: a @ b, args.repeats)
    gflops = 2 * 1024**3 / t / 1e9
    x = np.ones(64 * 2**20, np.float32)
    y = np.empty_like(x)
    np.copyto(y, x)
    t = best_of(lambda: np.copyto(y, x), args.repeats)
    gbps = 2 * x.nbytes / t / 1e9
    steps = channel_steps(args.repeats)
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    print(
        f"compute: {gflops:.1f} GFLOP/s (float32 matmul 1024^3, 1 thread, CPU time, best of {args.repeats})"
    )
    print(
        f"bandwidth: {gbps:.1f} GB/s (256 MiB float32 copy, read+write, CPU time, best of {args.repeats})"
    )
    print("ORT CPU 3x3 conv, 64 -> C channels, 28x28, 1 thread, CPU time median (ms):")
    print("  " + "  ".join(f"{c}:{v:.3f}" for c, v in steps.items()))
    for m in (4, 8, 16):
        on = [v / c for c, v in steps.items() if c % m == 0]
        off = [v / c for c, v in steps.items() if c % m]
        print(
            f"  per-channel cost at multiples of {m} / elsewhere: {np.mean(on) / np.mean(off):.3f}"
        )
    return 0


def channel_steps(repeats: int, counts: range = range(48, 81)) -> dict[int, float]:
    """Median CPU ms of a 3x3 conv (64 -> C channels, 28x28) per output channel count C."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 64, 28, 28)).astype(np.float32)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    out = {}
    for c in counts:
        w = numpy_helper.from_array(rng.standard_normal((c, 64, 3, 3)).astype(np.float32), "w")
        node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1] * 4, kernel_shape=[3, 3])
        graph = helper.make_graph(
            [node],
            "c",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 28, 28])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 28, 28])],
            [w],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        sess = ort.InferenceSession(
            model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
        )
        sess.run(None, {"x": x})
        times = []
        for _ in range(repeats * 3):
            t0 = time.process_time()
            sess.run(None, {"x": x})
            times.append(time.process_time() - t0)
        out[c] = float(np.median(times) * 1e3)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
