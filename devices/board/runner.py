#!/usr/bin/env python3
"""fair-edge board runner: time one ONNX or TFLite model in this process and print one JSON result.

This file travels to the board on its own. It needs only the Python standard library, numpy and
the runtime (onnxruntime, or ai_edge_litert falling back to tflite_runtime), so it runs on a
Raspberry Pi's or Jetson's stock Python (3.6 on JetPack 4 included: no 3.7+ syntax here).

Exit codes: 0 ok, 2 bad arguments, 3 bundle hash mismatch, 4 runtime missing, 5 model load
failed, 6 inference failed. On failure the JSON result is {"ok": false, "error": {...}}.
"""

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time

SCHEMA = "fair-edge.runner/1"
EXIT_OK, EXIT_ARGS, EXIT_HASH, EXIT_RUNTIME, EXIT_LOAD, EXIT_INFER = 0, 2, 3, 4, 5, 6


class RunnerFailure(Exception):
    """A failure with its exit code and a short machine-readable code."""

    def __init__(self, exit_code, code, message):
        Exception.__init__(self, message)
        self.exit_code = exit_code
        self.code = code
        self.message = message


def first_line(exc):
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------- process memory (no psutil)


def proc_status_kb(field):
    """A VmRSS/VmHWM value from /proc/self/status in KiB, or None off Linux."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb():
    kb = proc_status_kb("VmRSS")
    return None if kb is None else kb / 1024.0


def peak_rss_mb():
    kb = proc_status_kb("VmHWM")
    return None if kb is None else kb / 1024.0


# ---------------------------------------------------------------- statistics


def percentile(sorted_values, q):
    """Linear-interpolated percentile (numpy's default method) of an ascending list."""
    if not sorted_values:
        raise ValueError("no samples")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(samples_s):
    """Latency statistics in milliseconds from per-inference durations in seconds."""
    ms = sorted(s * 1000.0 for s in samples_s)
    n = len(ms)
    mean = sum(ms) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in ms) / (n - 1)) if n > 1 else 0.0
    return {
        "mean": mean,
        "std": std,
        "min": ms[0],
        "max": ms[-1],
        "p50": percentile(ms, 50),
        "p90": percentile(ms, 90),
        "p99": percentile(ms, 99),
    }


def measure(infer, warmup=5, runs=None, min_duration_s=0.0, max_runs=100000, cpu_samples=None):
    """Call `infer()` `warmup` times untimed, then time it `runs` times or for `min_duration_s`.

    With both given, it stops when both are satisfied (at least `runs` calls and at least
    `min_duration_s` seconds), never beyond `max_runs` calls. Returns per-call wall seconds;
    a `cpu_samples` list receives the process CPU seconds of each call (all threads), which
    other processes competing for the cores do not inflate.
    """
    if runs is None and min_duration_s <= 0:
        raise ValueError("give a run count or a minimum duration")
    for _ in range(warmup):
        infer()
    target = runs or 1
    samples = []
    clock = time.perf_counter
    cpu = time.process_time
    start = clock()
    while True:
        c0 = cpu()
        t0 = clock()
        infer()
        samples.append(clock() - t0)
        if cpu_samples is not None:
            cpu_samples.append(cpu() - c0)
        if len(samples) >= max_runs:
            break
        if len(samples) >= target and clock() - start >= min_duration_s:
            break
    return samples


# ---------------------------------------------------------------- bundle hashes


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_hash_list(path):
    """{relative path: sha256} from a JSON manifest or a `sha256sum` style text file.

    JSON forms accepted: {"files": {"a.onnx": "<hex>"}}, {"files": [{"path": .., "sha256": ..}]},
    or a flat {"a.onnx": "<hex>"}.
    """
    with open(path) as fh:
        text = fh.read()
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    hashes = {}
    if isinstance(data, dict):
        files = data.get("files", data)
        if isinstance(files, dict):
            for name, value in files.items():
                digest = value.get("sha256") if isinstance(value, dict) else value
                if isinstance(digest, str):
                    hashes[name] = digest
        elif isinstance(files, list):
            for entry in files:
                name = entry.get("path", entry.get("name")) if isinstance(entry, dict) else None
                if name and isinstance(entry.get("sha256"), str):
                    hashes[name] = entry["sha256"]
    else:
        for line in text.splitlines():
            parts = line.strip().split(None, 1)
            if len(parts) == 2:
                hashes[parts[1].lstrip("*")] = parts[0]
    if not hashes:
        raise RunnerFailure(EXIT_HASH, "bad_manifest", f"hash list {path} names no files")
    return hashes


def bundle_file(hash_list_path, root, name):
    """The real path of the listed file `name` inside `root`; refused if it could lead elsewhere.

    A manifest travels with the bundle, so it is not trusted: an absolute path, a `..` part or
    a symlink out of the folder would make the runner read and fingerprint any file on the board.
    """
    where = os.path.basename(hash_list_path)
    fix = "a bundle manifest may name only files inside the bundle folder; rebuild the bundle"

    def refuse(why):
        return RunnerFailure(EXIT_HASH, "bad_manifest", f"hash list {where} {why}: {fix}")

    if not name or "\0" in name:
        raise refuse(f"names an empty or invalid path {name!r}")
    drive = len(name) > 1 and name[0].isalpha() and name[1] == ":"
    if os.path.isabs(name) or name[0] in "/\\" or drive:
        raise refuse(f"names an absolute path {name}")
    if ".." in name.replace("\\", "/").split("/"):
        raise refuse(f"names {name}, whose '..' could lead outside the bundle")
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, name))
    if not real.startswith(real_root.rstrip(os.sep) + os.sep):
        raise refuse(f"names {name}, which a symlink resolves outside the bundle (to {real})")
    return real


def verify_hashes(hash_list_path, root):
    """Check every listed file under `root`; raise on an unsafe path, a missing or changed file.

    All paths are checked before any file is opened, so a bad manifest reads nothing.
    """
    hashes = read_hash_list(hash_list_path)
    paths = {name: bundle_file(hash_list_path, root, name) for name in sorted(hashes)}
    for name in sorted(hashes):
        path = paths[name]
        if not os.path.isfile(path):
            raise RunnerFailure(
                EXIT_HASH, "missing_file", f"bundle file {name} is missing on the board"
            )
        got = sha256_file(path)
        if got.lower() != hashes[name].lower():
            raise RunnerFailure(
                EXIT_HASH,
                "hash_mismatch",
                f"bundle file {name} does not match its hash (sha256 {got[:12]}..., expected {hashes[name][:12]}...): "
                "the bundle was changed after it was built or damaged in transfer; rebuild and resend it",
            )
    return len(hashes)


# ---------------------------------------------------------------- runtimes

ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
}


def random_input(np, rng, shape, dtype):
    shape = [int(d) if isinstance(d, (int, np.integer)) and d > 0 else 1 for d in shape]
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -128), min(info.max, 127) + 1, size=shape).astype(dtype)


def open_onnxruntime(np, model_path, threads, providers, ort_profile, rng):
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise RunnerFailure(
            EXIT_RUNTIME, "runtime_missing", f"onnxruntime is not installed: {exc}"
        ) from None
    available = ort.get_available_providers()
    wanted = providers or ["CPUExecutionProvider"]
    chosen = [p for p in wanted if p in available]
    if not chosen:
        raise RunnerFailure(
            EXIT_RUNTIME,
            "no_provider",
            "none of the execution providers {} is available (this onnxruntime has {})".format(
                ", ".join(wanted), ", ".join(available)
            ),
        )
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if ort_profile:
        opts.enable_profiling = True
        opts.profile_file_prefix = ort_profile
    try:
        session = ort.InferenceSession(model_path, sess_options=opts, providers=chosen)
    except Exception as exc:
        raise RunnerFailure(
            EXIT_LOAD,
            "load_failed",
            f"onnxruntime cannot load {os.path.basename(model_path)}: {first_line(exc)}",
        ) from None
    feeds = {}
    for inp in session.get_inputs():
        dtype = ORT_DTYPES.get(inp.type)
        if dtype is None:
            raise RunnerFailure(
                EXIT_LOAD, "unsupported_input", f"input {inp.name} has unsupported type {inp.type}"
            )
        feeds[inp.name] = random_input(np, rng, inp.shape, dtype)

    def infer():
        return session.run(None, feeds)

    def finish():
        return session.end_profiling() if ort_profile else None

    info = {
        "name": "onnxruntime",
        "version": ort.__version__,
        "providers_requested": wanted,
        "providers_used": session.get_providers(),
        "inputs": {k: list(v.shape) for k, v in feeds.items()},
    }
    return infer, finish, info


def open_tflite(np, model_path, threads, rng):
    try:
        from ai_edge_litert.interpreter import Interpreter

        package = "ai-edge-litert"
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter

            package = "tflite-runtime"
        except ImportError:
            raise RunnerFailure(
                EXIT_RUNTIME,
                "runtime_missing",
                "neither ai_edge_litert nor tflite_runtime is installed (pip install ai-edge-litert)",
            ) from None
    try:
        interp = Interpreter(model_path=model_path, num_threads=threads or None)
        interp.allocate_tensors()
    except Exception as exc:
        raise RunnerFailure(
            EXIT_LOAD,
            "load_failed",
            f"the TFLite interpreter cannot load {os.path.basename(model_path)}: {first_line(exc)}",
        ) from None
    details = interp.get_input_details()
    feeds = [(d["index"], random_input(np, rng, list(d["shape"]), d["dtype"])) for d in details]

    def infer():
        for index, value in feeds:
            interp.set_tensor(index, value)
        interp.invoke()
        return [interp.get_tensor(d["index"]) for d in interp.get_output_details()]

    version = "unknown"
    try:
        from importlib import metadata

        version = metadata.version(package)
    except Exception:
        pass
    info = {
        "name": "tflite",
        "package": package,
        "version": version,
        "providers_requested": [],
        "providers_used": ["XNNPACK/builtin"],
        "inputs": {d["name"]: [int(x) for x in d["shape"]] for d in details},
    }
    return infer, (lambda: None), info


# ---------------------------------------------------------------- main


def run(args):
    t_start = time.perf_counter()
    model_path = os.path.abspath(args.model)
    result = {"schema": SCHEMA, "ok": True}
    verified = 0
    for hash_list in args.hashes:
        root = os.path.abspath(args.bundle_dir or os.path.dirname(os.path.abspath(hash_list)))
        verified += verify_hashes(hash_list, root)
    if args.hashes:
        result["hashes_verified"] = verified
    if not os.path.isfile(model_path):
        raise RunnerFailure(EXIT_ARGS, "no_model", f"model file {args.model} does not exist")
    runtime = args.runtime
    if runtime == "auto":
        runtime = "tflite" if model_path.endswith(".tflite") else "onnxruntime"

    import numpy as np

    rng = np.random.default_rng(args.seed)
    providers = [p for p in (args.providers or "").split(",") if p]
    pinned = pin_cpus(args.threads) if args.pin else None
    rss_before = rss_mb()
    t0 = time.perf_counter()
    if runtime == "onnxruntime":
        infer, finish, info = open_onnxruntime(
            np, model_path, args.threads, providers, args.ort_profile, rng
        )
    else:
        infer, finish, info = open_tflite(np, model_path, args.threads, rng)
    load_s = time.perf_counter() - t0
    rss_after = rss_mb()
    cpu_samples = []
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    try:
        samples = measure(
            infer,
            warmup=args.warmup,
            runs=args.runs,
            min_duration_s=args.min_duration,
            max_runs=args.max_runs,
            cpu_samples=cpu_samples,
        )
    except RunnerFailure:
        raise
    except Exception as exc:
        raise RunnerFailure(
            EXIT_INFER, "inference_failed", f"inference failed: {first_line(exc)}"
        ) from None
    profile_file = finish()
    total = sum(samples)
    result.update(
        {
            "model": {
                "path": args.model,
                "name": os.path.basename(model_path),
                "size_bytes": os.path.getsize(model_path),
                "sha256": sha256_file(model_path),
            },
            "runtime": info,
            "threads": args.threads,
            "pinned_cpus": pinned,
            "load_s": load_s,
            "warmup": args.warmup,
            "runs": len(samples),
            "duration_s": total,
            "latency_ms": summarize(samples),
            "samples_ms": [s * 1000.0 for s in samples],
            "cpu_ms": summarize(cpu_samples),
            "cpu_samples_ms": [s * 1000.0 for s in cpu_samples],
            "throughput_ips": len(samples) / total if total > 0 else None,
            "memory_mb": {
                "rss_before_load": rss_before,
                "rss_after_load": rss_after,
                "rss_growth_load": (rss_after - rss_before)
                if rss_before is not None and rss_after is not None
                else None,
                "peak_rss": peak_rss_mb(),
            },
            "ort_profile": os.path.abspath(profile_file) if profile_file else None,
            "system": {
                "machine": platform.machine(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "numpy": np.__version__,
                "cpu_count": os.cpu_count(),
                "loadavg_1m_before": load_before,
                "loadavg_1m_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            },
            "wall_s": time.perf_counter() - t_start,
        }
    )
    return result


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments as a JSON error instead of usage text."""

    def error(self, message):
        raise RunnerFailure(EXIT_ARGS, "bad_arguments", message)


def parse_args(argv):
    p = _Parser(description="time one ONNX/TFLite model and print a JSON result")
    p.add_argument("model", help="model file (.onnx or .tflite)")
    p.add_argument("--runtime", choices=("auto", "onnxruntime", "tflite"), default="auto")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0 = runtime default)")
    p.add_argument(
        "--providers", default="", help="comma-separated ORT execution providers, preferred first"
    )
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--runs", type=int, default=None, help="timed runs (at least)")
    p.add_argument(
        "--min-duration", type=float, default=0.0, help="time for at least this many seconds"
    )
    p.add_argument("--max-runs", type=int, default=100000)
    p.add_argument("--seed", type=int, default=0, help="seed of the random input")
    p.add_argument(
        "--ort-profile", default=None, help="write ONNX Runtime's profile with this prefix"
    )
    p.add_argument(
        "--hashes",
        action="append",
        default=[],
        help="manifest / hash list to verify before running (repeatable)",
    )
    p.add_argument(
        "--pin",
        action="store_true",
        help="pin the process to the last `threads` CPUs when that leaves others free "
        "(steadier timings: no migration between cores)",
    )
    p.add_argument("--bundle-dir", default=None, help="root the hash list is relative to")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    args = p.parse_args(argv)
    if args.runs is None and args.min_duration <= 0:
        args.runs = 50
    if (args.runs is not None and args.runs < 1) or args.warmup < 0 or args.threads < 0:
        raise RunnerFailure(
            EXIT_ARGS, "bad_arguments", "runs must be >= 1, warmup and threads >= 0"
        )
    return args


def pin_cpus(threads):
    """Pin this process to the last `threads` allowed CPUs (CPU 0 takes most interrupts).

    Only when `threads` is fewer than the allowed CPUs; returns the CPUs pinned to, or None
    when nothing was pinned (all CPUs wanted, or no affinity call on this system).
    """
    if not threads or not hasattr(os, "sched_setaffinity"):
        return None
    try:
        allowed = sorted(os.sched_getaffinity(0))
        if threads >= len(allowed):
            return None
        chosen = allowed[-threads:]
        os.sched_setaffinity(0, chosen)
        return sorted(os.sched_getaffinity(0))  # what the system now applies
    except OSError:
        return None


def emit(result, out):
    text = json.dumps(result, sort_keys=True)
    if out:
        tmp = out + ".tmp"
        with open(tmp, "w") as fh:
            fh.write(text)
        os.replace(tmp, out)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def main(argv=None):
    out = None
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        out = args.out
        result = run(args)
        code = EXIT_OK
    except RunnerFailure as exc:
        result = {
            "schema": SCHEMA,
            "ok": False,
            "error": {"code": exc.code, "message": exc.message, "exit_code": exc.exit_code},
        }
        code = exc.exit_code
    except MemoryError:
        result = {
            "schema": SCHEMA,
            "ok": False,
            "error": {
                "code": "out_of_memory",
                "message": "the board ran out of memory",
                "exit_code": EXIT_INFER,
            },
        }
        code = EXIT_INFER
    emit(result, out)
    return code


if __name__ == "__main__":
    sys.exit(main())
