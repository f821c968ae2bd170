"""The GPU side of `fair-edge deploy`: run settings from the options, the variants timed as
pairs on GPU profiles, trtexec timings where the board has it, and the engine-build script.

Kept apart from deploy.py so the chain there reads as stages; everything here is called from
its measure and bundle stages.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from devices.errors import DeviceError
from devices.profile import DeviceProfile
from devices.runspec import RunSpec
from exporters.bundle import sha256_file
from fair_edge.config import PROVIDERS, Options


def run_spec(opts: Options, runtime: str = "auto", **overrides: Any) -> RunSpec:
    """The runner settings the options ask for: providers (strict when named), TensorRT
    precision, engine cache and workspace (None: the profile's)."""
    providers = PROVIDERS[opts.provider]
    fields: dict[str, Any] = {
        "warmup": opts.warmup,
        "runs": opts.runs,
        "runtime": runtime,
        "providers": providers,
        "strict_providers": providers is not None,
        "precision": opts.precision,
        "trt_cache": opts.trt_cache,
        "workspace_mb": opts.workspace_mb,
    }
    return RunSpec(**{**fields, **overrides})


def gpu_profile(profile: DeviceProfile) -> bool:
    """Whether the profile's ONNX Runtime lists a GPU provider (TensorRT or CUDA)."""
    ort = profile.runtime("onnxruntime")
    return bool(ort) and any("Tensorrt" in p or "CUDA" in p for p in ort.providers)


def variant_precision(kind: str) -> str:
    """The TensorRT precision a variant file is timed at: its own (int8 QDQ, fp16)."""
    return {"int8": "int8", "fp16": "fp16"}[kind]


def trtexec_pair(
    original: Path, pruned: Path, profile: DeviceProfile, where: str, spec: RunSpec
) -> tuple[Any | None, str | None]:
    """Original and pruned timed by trtexec on the board, or (None, why not)."""
    from devices.report import measure_pair

    ort = profile.runtime("onnxruntime")
    if where != "ssh" or not profile.tensorrt or ort is None or not ort.trtexec:
        return None, None
    try:
        pair = measure_pair(original, pruned, profile, where, replace(spec, runtime="trtexec"))
    except DeviceError as exc:
        if "(runtime_missing)" in str(exc):
            return None, f"trtexec timing skipped: {str(exc).split(': ', 2)[-1]}"
        raise
    return pair, None


def engine_bundle(
    profile: DeviceProfile, bundle_name: str, models: dict[str, tuple[Path, str]]
) -> tuple[str, dict[str, Any]]:
    """build_engine.sh and the manifest's `tensorrt` entry for the bundle's ONNX models.

    models: path inside the bundle -> (file, precision).
    """
    from devices.engine_script import EngineJob, build_command, build_engine_script

    jobs = [EngineJob(rel, prec, sha256_file(path)) for rel, (path, prec) in models.items()]
    script = build_engine_script(profile, bundle_name, jobs)
    ort = profile.runtime("onnxruntime")
    entry = {
        "build_script": "build_engine.sh",
        "run": "sh build_engine.sh",
        "why": "TensorRT engines are specific to the GPU and TensorRT release that built them, "
        "so the bundle carries the commands, not engines",
        "tensorrt_version": ort.trt_version if ort else "",
        "engines_folder": f"$HOME/.cache/fair-edge/trt/{bundle_name}",
        "trtexec_commands": {job.model: build_command(profile, job) for job in jobs},
    }
    return script, entry
