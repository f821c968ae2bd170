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


# ---------------------------------------------------------------- GPU providers and TensorRT

PRECISIONS = ("fp32", "fp16", "int8")
TRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CACHE_STAMP = "fair-edge-device.json"
# ONNX Runtime release that first accepts each TensorRT option; an older onnxruntime (the
# Jetson Zoo's 1.10/1.11 wheels for JetPack 4.6) rejects unknown keys, so they are left out there.
TRT_OPTION_SINCE = {
    "trt_timing_cache_enable": (1, 12),
    "trt_timing_cache_path": (1, 16),
    "trt_engine_cache_prefix": (1, 17),
}


def version_tuple(text):
    """(major, minor) of a version string such as '1.16.3' or '8.2.1.8'; (0, 0) if unreadable."""
    parts = []
    for piece in str(text).split(".")[:2]:
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        parts.append(int(digits) if digits else 0)
    while len(parts) < 2:
        parts.append(0)
    return tuple(parts)


def provider_options(providers, precision="fp32", cache_dir=None, workspace_mb=0, ort_version=None):
    """The options of each requested provider, in the order given, as ONNX Runtime takes them.

    TensorRT: fp16 / int8 from `precision` (int8 expects a QDQ model: TensorRT takes its scales
    from the graph, no calibration table), engine and timing caches in `cache_dir` so an engine
    is built once per board and reused, the builder workspace in MiB. CUDA: device 0 with
    cuDNN's exhaustive convolution search (timed once per session). Values are strings, the
    form every onnxruntime release accepts. With `ort_version`, options that release does not
    know are left out.
    """
    if precision not in PRECISIONS:
        raise RunnerFailure(
            EXIT_ARGS,
            "bad_arguments",
            "precision must be one of {}, got {}".format(", ".join(PRECISIONS), precision),
        )
    out = []
    for name in providers:
        opts = {}
        if name == TRT:
            opts["device_id"] = "0"
            opts["trt_fp16_enable"] = "True" if precision in ("fp16", "int8") else "False"
            opts["trt_int8_enable"] = "True" if precision == "int8" else "False"
            if workspace_mb:
                opts["trt_max_workspace_size"] = str(int(workspace_mb) * 1024 * 1024)
            if cache_dir:
                opts["trt_engine_cache_enable"] = "True"
                opts["trt_engine_cache_path"] = cache_dir
                opts["trt_timing_cache_enable"] = "True"
                opts["trt_timing_cache_path"] = cache_dir
            if ort_version is not None:
                have = version_tuple(ort_version)
                opts = dict(
                    (k, v) for k, v in opts.items() if have >= TRT_OPTION_SINCE.get(k, (0, 0))
                )
        elif name == CUDA:
            opts = {"device_id": "0", "cudnn_conv_algo_search": "EXHAUSTIVE"}
        out.append((name, opts))
    return out


def device_identity():
    """What an engine is tied to: the board model, its machine type and the runtime versions.

    TensorRT engines are specific to the GPU and the TensorRT release that built them.
    """
    model = ""
    for path in ("/proc/device-tree/model", "/sys/firmware/devicetree/base/model"):
        try:
            with open(path, "rb") as fh:
                model = fh.read().decode("utf-8", "replace").strip("\0 \n")
            break
        except OSError:
            continue
    trt_version = None
    try:
        import tensorrt

        trt_version = tensorrt.__version__
    except Exception:
        pass
    return {
        "board": model or platform.node(),
        "machine": platform.machine(),
        "tensorrt": trt_version,
    }


def prepare_cache(cache_dir, runtime_version):
    """Create (or reuse) the engine-cache folder; refuse one whose engines another device built.

    The folder carries a stamp naming the device and runtime that filled it. Nothing is written
    before the check passes, and the stamp is written atomically.
    """
    path = os.path.abspath(os.path.expanduser(cache_dir))
    here = device_identity()
    here["onnxruntime"] = runtime_version
    stamp = os.path.join(path, CACHE_STAMP)
    before = sorted(f for f in os.listdir(path) if f != CACHE_STAMP) if os.path.isdir(path) else []
    if os.path.isfile(stamp):
        try:
            with open(stamp) as fh:
                built = json.load(fh)
        except ValueError:
            built = {}
        if built != here:
            raise RunnerFailure(
                EXIT_LOAD,
                "engine_other_device",
                f"engine cache {path} holds TensorRT engines built for {describe(built)} and cannot serve {describe(here)}: "
                "engines are not portable between devices or runtime versions; remove the folder "
                "or give another --trt-cache",
            )
    elif os.path.isfile(path):
        raise RunnerFailure(
            EXIT_ARGS, "bad_arguments", f"--trt-cache {path} is a file, not a folder"
        )
    try:
        if not os.path.isdir(path):
            os.makedirs(path)
        if not os.path.isfile(stamp):
            tmp = stamp + ".tmp"
            with open(tmp, "w") as fh:
                json.dump(here, fh, sort_keys=True)
            os.replace(tmp, stamp)
    except OSError as exc:
        raise RunnerFailure(
            EXIT_ARGS,
            "bad_arguments",
            f"cannot create the engine cache {path}: {exc.strerror or exc}; give a writable --trt-cache",
        ) from None
    return {"path": path, "files_before": before, "reused": bool(before)}


def describe(identity):
    if not identity:
        return "an unknown device (unreadable stamp)"
    return ", ".join(f"{k} {identity[k]}" for k in sorted(identity) if identity[k])


def cache_files(path):
    return sorted(f for f in os.listdir(path) if f != CACHE_STAMP) if os.path.isdir(path) else []


def node_placement(profile_path):
    """{"by_provider": {provider: kernel count}, "nodes": {node: provider}} from an ORT profile.

    Every kernel ONNX Runtime ran is a "Node" event whose args name its provider; a subgraph
    TensorRT took appears as one fused node. This is what ran, not what was asked for.
    """
    with open(profile_path) as fh:
        events = json.load(fh)
    nodes = {}
    for ev in events:
        args = ev.get("args") or {}
        name = ev.get("name", "")
        if ev.get("cat") != "Node" or "provider" not in args or not name.endswith("_kernel_time"):
            continue
        nodes[name[: -len("_kernel_time")]] = args["provider"]
    counts = {}
    for provider in nodes.values():
        counts[provider] = counts.get(provider, 0) + 1
    return {"by_provider": counts, "nodes": nodes}


# ---------------------------------------------------------------- trtexec

TRTEXEC_DEFAULT = "/usr/src/tensorrt/bin/trtexec"
_TRTEXEC_STATS = ("min", "max", "mean", "median")


def trtexec_command(trtexec, model, precision, workspace_mb, cache_dir, trt_version, extra=()):
    """The trtexec command that builds (or loads) `model`'s engine and times it.

    A .onnx model is built into `<cache>/<model stem>.<precision>.engine`; an .engine or .plan is
    loaded. TensorRT before 8.4 takes the workspace as --workspace=MiB, later ones as
    --memPoolSize=workspace:<MiB>M. int8 on a QDQ model uses the graph's scales (--int8 with
    --fp16 so layers without scales run in half precision).
    """
    cmd = [trtexec]
    if model.endswith((".engine", ".plan")):
        cmd.append("--loadEngine=" + model)
    else:
        cmd.append("--onnx=" + model)
        if cache_dir:
            stem = os.path.splitext(os.path.basename(model))[0]
            cmd.append(
                "--saveEngine=" + os.path.join(cache_dir, stem + "." + precision + ".engine")
            )
            cmd.append("--timingCacheFile=" + os.path.join(cache_dir, "trtexec.timing.cache"))
        if precision in ("fp16", "int8"):
            cmd.append("--fp16")
        if precision == "int8":
            cmd.append("--int8")
        if workspace_mb:
            if version_tuple(trt_version) >= (8, 4):
                cmd.append(f"--memPoolSize=workspace:{int(workspace_mb)}M")
            else:
                cmd.append(f"--workspace={int(workspace_mb)}")
    return cmd + list(extra)


def _ms_value(text):
    value = text.strip().split()[0]
    return float(value)


def parse_trtexec(text):
    """The performance summary trtexec prints, as {section: {stat: ms}} plus throughput.

    Sections are the summary lines such as "Latency", "Host Latency", "GPU Compute Time",
    "Enqueue Time"; stats are min, max, mean, median and "p<q>" for each percentile(q%)
    printed (TensorRT 8.2 prints only the 99th; 8.4+ also the 90th and 95th). A log that shows
    an engine another device or TensorRT release built raises RunnerFailure.
    """
    out = {"sections": {}, "throughput_qps": None, "engine_build_s": None, "version": None}
    for raw in text.splitlines():
        line = raw.strip()
        low = line.lower()
        if "incompatible device" in low or "version tag does not match" in low:
            raise RunnerFailure(
                EXIT_LOAD,
                "engine_other_device",
                "trtexec refused the engine: {}; engines are not portable between devices or "
                "TensorRT releases - rebuild it on this board (sh build_engine.sh)".format(
                    line.split("] ", 2)[-1][:200]
                ),
            )
        if "TensorRT.trtexec [TensorRT v" in line:
            out["version"] = trt_banner_version(line.split("[TensorRT v", 1)[1].split("]", 1)[0])
        body = line
        while body.startswith("["):
            body = body.split("]", 1)[1].strip() if "]" in body else ""
        if body.startswith("Throughput:"):
            out["throughput_qps"] = float(body.split(":", 1)[1].split()[0])
            continue
        if body.startswith("Engine built in"):
            out["engine_build_s"] = float(body[len("Engine built in") :].split()[0])
            continue
        if ": min = " not in body:
            continue
        section, rest = body.split(":", 1)
        stats = {}
        for item in rest.split(","):
            if "=" not in item:
                continue
            key, value = item.split("=", 1)
            key = key.strip()
            if key.startswith("percentile(") and key.endswith("%)"):
                q = key[len("percentile(") : -2]
                key = "p" + (q[:-2] if q.endswith(".0") else q)
            elif key not in _TRTEXEC_STATS:
                continue
            stats[key] = _ms_value(value)
        out["sections"][section.strip()] = stats
    if not out["sections"]:
        raise RunnerFailure(
            EXIT_INFER,
            "inference_failed",
            f"trtexec printed no performance summary: {last_error_line(text)}",
        )
    return out


def trt_banner_version(code):
    """'8.2.1' from trtexec's banner code 8201, '10.3.0' from 100300 (TensorRT 10 widened it)."""
    if not code.isdigit():
        return code
    n = int(code)
    if n >= 100000:
        return f"{n // 10000}.{(n // 100) % 100}.{n % 100}"
    return f"{n // 1000}.{(n // 100) % 10}.{n % 100}"


def last_error_line(text):
    errors = [ln.strip() for ln in text.splitlines() if "[E]" in ln or "FAILED" in ln]
    lines = errors or [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:200] if lines else "no output"


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


def open_onnxruntime(np, model_path, args, rng):
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise RunnerFailure(
            EXIT_RUNTIME, "runtime_missing", f"onnxruntime is not installed: {exc}"
        ) from None
    available = ort.get_available_providers()
    wanted = [p for p in (args.providers or "").split(",") if p] or ["CPUExecutionProvider"]
    missing = [p for p in wanted if p not in available]
    chosen = [p for p in wanted if p in available]
    if not chosen or (args.strict_providers and missing):
        raise RunnerFailure(
            EXIT_RUNTIME,
            "no_provider",
            "execution provider{} {} {} not available in this onnxruntime {} (it has {}): "
            "install the onnxruntime build with {} (onnxruntime-gpu for CUDA/TensorRT) or ask "
            "for another provider".format(
                "s" if len(missing or wanted) > 1 else "",
                ", ".join(missing or wanted),
                "are" if len(missing or wanted) > 1 else "is",
                ort.__version__,
                ", ".join(available),
                "them" if len(missing or wanted) > 1 else "it",
            ),
        )
    cache = None
    if TRT in chosen and args.trt_cache:
        cache = prepare_cache(args.trt_cache, ort.__version__)
    options = provider_options(
        chosen, args.precision, cache["path"] if cache else None, args.workspace_mb, ort.__version__
    )

    def make_session(profile_prefix):
        opts = ort.SessionOptions()
        if args.threads:
            opts.intra_op_num_threads = args.threads
            opts.inter_op_num_threads = 1
        if profile_prefix:
            opts.enable_profiling = True
            opts.profile_file_prefix = profile_prefix
        return ort.InferenceSession(
            model_path,
            sess_options=opts,
            providers=[name for name, _ in options],
            provider_options=[o for _, o in options],
        )

    try:
        session = make_session(args.ort_profile)
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
        """End the run: the profile file, which provider ran each node, the engine cache."""
        profile_file = session.end_profiling() if args.ort_profile else None
        placement = None
        if args.placement:
            placement = placement_of(make_session, feeds, profile_file)
        if cache is not None:
            cache["files_after"] = cache_files(cache["path"])
        return profile_file, placement

    info = {
        "name": "onnxruntime",
        "version": ort.__version__,
        "providers_requested": wanted,
        "providers_missing": missing,
        "providers_used": session.get_providers(),
        "provider_options": dict(options),
        "precision": args.precision,
        "engine_cache": cache,
        "inputs": {k: list(v.shape) for k, v in feeds.items()},
    }
    return infer, finish, info


def placement_of(make_session, feeds, profile_file):
    """Which provider ran each node: from the timed session's profile when it kept one, else
    from one profiled run of a second session (after timing, so it costs the timing nothing)."""
    import tempfile

    if profile_file:
        return node_placement(profile_file)
    folder = tempfile.mkdtemp(prefix="fair-edge-placement-")
    try:
        session = make_session(os.path.join(folder, "p"))
        session.run(None, feeds)
        return node_placement(session.end_profiling())
    finally:
        for name in os.listdir(folder):
            os.remove(os.path.join(folder, name))
        os.rmdir(folder)


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
    return infer, (lambda: (None, None)), info


def run_trtexec(model_path, args):
    """Time `model_path` with TensorRT's own trtexec; per-inference times from --exportTimes.

    Returns (samples in seconds, build/load seconds, runtime info, peak RSS of trtexec in MiB).
    """
    import resource
    import subprocess
    import tempfile

    exe = args.trtexec or TRTEXEC_DEFAULT
    if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
        raise RunnerFailure(
            EXIT_RUNTIME,
            "runtime_missing",
            f"trtexec is not at {exe} (JetPack puts it in /usr/src/tensorrt/bin): install TensorRT "
            "or give --trtexec PATH",
        )
    cache = prepare_cache(args.trt_cache, None) if args.trt_cache else None
    folder = tempfile.mkdtemp(prefix="fair-edge-trtexec-")
    times = os.path.join(folder, "times.json")
    extra = [
        f"--iterations={args.runs or 1}",
        f"--duration={int(math.ceil(args.min_duration))}",
        f"--warmUp={max(args.warmup, 1) * 10}",
        "--exportTimes=" + times,
    ]
    cmd = trtexec_command(
        exe,
        model_path,
        args.precision,
        args.workspace_mb,
        cache["path"] if cache else None,
        args.trt_version,
        extra,
    )
    t0 = time.perf_counter()
    try:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True
        )
        log = proc.communicate()[0]
        wall = time.perf_counter() - t0
        parsed = parse_trtexec(log)
        if proc.returncode != 0:
            raise RunnerFailure(
                EXIT_INFER,
                "inference_failed",
                f"trtexec failed (exit {proc.returncode}): {last_error_line(log)}",
            )
        try:
            with open(times) as fh:
                records = json.load(fh)
        except (OSError, ValueError):
            raise RunnerFailure(
                EXIT_INFER, "inference_failed", "trtexec wrote no per-inference times"
            ) from None
    finally:
        for name in os.listdir(folder):
            os.remove(os.path.join(folder, name))
        os.rmdir(folder)
    samples = [float(r["latencyMs"]) / 1000.0 for r in records if "latencyMs" in r]
    if not samples:
        raise RunnerFailure(EXIT_INFER, "inference_failed", "trtexec timed no inference")
    if cache is not None:
        cache["files_after"] = cache_files(cache["path"])
    info = {
        "name": "trtexec",
        "version": parsed["version"] or args.trt_version or "unknown",
        "providers_requested": ["TensorRT"],
        "providers_used": ["TensorRT"],
        "precision": args.precision,
        "engine_cache": cache,
        "command": cmd[:-1],
        "summary": parsed,
        "inputs": {},
    }
    build = parsed["engine_build_s"]
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    return samples, (build if build is not None else wall - sum(samples)), info, peak


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
        if model_path.endswith((".engine", ".plan")):
            runtime = "trtexec"

    import numpy as np

    if runtime == "trtexec":
        samples, load_s, info, child_peak = run_trtexec(model_path, args)
        return finish_result(
            result, args, model_path, np, info, samples, [], load_s, None, t_start,
            {"rss_before_load": None, "rss_after_load": None, "rss_growth_load": None,
             "peak_rss": child_peak},
        )  # fmt: skip
    rng = np.random.default_rng(args.seed)
    pinned = pin_cpus(args.threads) if args.pin else None
    rss_before = rss_mb()
    t0 = time.perf_counter()
    if runtime == "onnxruntime":
        infer, finish, info = open_onnxruntime(np, model_path, args, rng)
    else:
        infer, finish, info = open_tflite(np, model_path, args.threads, rng)
    load_s = time.perf_counter() - t0
    rss_after = rss_mb()
    cpu_samples = []
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    try:
        t1 = time.perf_counter()
        infer()  # the first run: where TensorRT builds (or loads) its engine, timed on its own
        info["first_run_s"] = time.perf_counter() - t1
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
    memory = {
        "rss_before_load": rss_before,
        "rss_after_load": rss_after,
        "rss_growth_load": (rss_after - rss_before)
        if rss_before is not None and rss_after is not None
        else None,
        "peak_rss": peak_rss_mb(),
    }
    profile_file, placement = finish()
    info["placement"] = placement
    result["ort_profile"] = os.path.abspath(profile_file) if profile_file else None
    result["system_load"] = (load_before, os.getloadavg()[0] if hasattr(os, "getloadavg") else None)
    return finish_result(
        result, args, model_path, np, info, samples, cpu_samples, load_s, pinned, t_start, memory
    )


def finish_result(
    result, args, model_path, np, info, samples, cpu_samples, load_s, pinned, t_start, memory
):
    """The runner's JSON result from the timed samples (seconds) and what the run recorded."""
    load_before, load_after = result.pop("system_load", (None, None))
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
            "cpu_ms": summarize(cpu_samples) if cpu_samples else {},
            "cpu_samples_ms": [s * 1000.0 for s in cpu_samples],
            "throughput_ips": len(samples) / total if total > 0 else None,
            "memory_mb": memory,
            "ort_profile": result.get("ort_profile"),
            "system": {
                "machine": platform.machine(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "numpy": np.__version__,
                "cpu_count": os.cpu_count(),
                "loadavg_1m_before": load_before,
                "loadavg_1m_after": load_after,
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
    p.add_argument(
        "--runtime", choices=("auto", "onnxruntime", "tflite", "trtexec"), default="auto"
    )
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0 = runtime default)")
    p.add_argument(
        "--providers", default="", help="comma-separated ORT execution providers, preferred first"
    )
    p.add_argument(
        "--strict-providers",
        action="store_true",
        help="fail when any listed provider is missing instead of falling back to the others",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="TensorRT precision (fp16/int8 enable those kernels; int8 wants a QDQ model)",
    )
    p.add_argument(
        "--trt-cache",
        default=None,
        help="folder on this board for TensorRT engines and timing caches, kept between runs",
    )
    p.add_argument("--workspace-mb", type=int, default=0, help="TensorRT builder workspace")
    p.add_argument("--trtexec", default=None, help="trtexec path (runtime trtexec)")
    p.add_argument("--trt-version", default="", help="TensorRT version (trtexec workspace flag)")
    p.add_argument(
        "--no-placement",
        dest="placement",
        action="store_false",
        help="skip recording which provider ran each node (one extra profiled run)",
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
    if (
        (args.runs is not None and args.runs < 1)
        or args.warmup < 0
        or args.threads < 0
        or args.workspace_mb < 0
    ):
        raise RunnerFailure(
            EXIT_ARGS, "bad_arguments", "runs must be >= 1, warmup, threads and workspace >= 0"
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
