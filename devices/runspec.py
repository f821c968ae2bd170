"""How to time a model: the runner's settings, turned into its command line and read back."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from devices.board.runner import PRECISIONS, TRTEXEC_DEFAULT, provider_options
from devices.errors import DeviceError
from devices.profile import DeviceProfile

RUNNER_PATH = Path(__file__).resolve().parent / "board" / "runner.py"


@dataclass
class RunSpec:
    """Runner settings; `threads=None` and `providers=None` take the profile's."""

    warmup: int = 5
    runs: int | None = 50
    min_duration_s: float = 0.0
    runtime: str = "auto"
    threads: int | None = None
    providers: list[str] | None = None
    ort_profile: str | None = None
    seed: int = 0
    pin: bool = True
    """Pin the runner to as many CPUs as it has threads when that leaves CPUs free: measured
    spread of resnet18 p50 over 5 runner processes on the 2-core VM fell from 6-31% to 3.5-4.5%."""
    precision: str | None = None
    """TensorRT precision (fp32, fp16, int8); None takes the profile's."""
    trt_cache: str | None = None
    """Engine/timing-cache folder on the board ('~' is the board's home); None: the profile's."""
    workspace_mb: int | None = None
    """TensorRT builder workspace in MiB; None: the profile's (0: TensorRT's default)."""
    strict_providers: bool = False
    """Fail when a listed provider is missing on the board instead of falling back silently."""
    placement: bool = True
    """Record which provider ran each node (one profiled run after timing)."""
    extra_args: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def merge_spec(spec: RunSpec | None, overrides: dict[str, Any]) -> RunSpec:
    """`spec` (or the defaults) with keyword overrides; an unknown keyword is an error."""
    spec = spec or RunSpec()
    if overrides:
        unknown = set(overrides) - set(spec.to_dict())
        if unknown:
            raise DeviceError(f"unknown run setting(s) {sorted(unknown)}: use RunSpec fields")
        spec = RunSpec(**{**spec.to_dict(), **overrides})
    return spec


def resolve_threads(spec: RunSpec, profile: DeviceProfile) -> int:
    threads = profile.threads if spec.threads is None else spec.threads
    return threads or (os.cpu_count() or 1) if profile.is_host else threads


def resolve_providers(spec: RunSpec, profile: DeviceProfile) -> list[str]:
    if spec.providers is not None:
        return list(spec.providers)
    ort = profile.runtime("onnxruntime")
    return list(ort.providers) if ort else ["CPUExecutionProvider"]


def gpu_settings(spec: RunSpec, profile: DeviceProfile) -> dict[str, Any]:
    """Precision, engine cache and workspace: the spec's where given, else the profile's."""
    ort = profile.runtime("onnxruntime")
    precision = spec.precision or (ort.precision if ort else "") or "fp32"
    if precision not in PRECISIONS:
        raise DeviceError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    cache = spec.trt_cache if spec.trt_cache is not None else (ort.trt_cache if ort else "")
    workspace = (
        spec.workspace_mb if spec.workspace_mb is not None else (ort.workspace_mb if ort else 0)
    )
    if workspace < 0:
        raise DeviceError(f"the TensorRT workspace must be >= 0 MiB, got {workspace}")
    return {"precision": precision, "trt_cache": cache or None, "workspace_mb": workspace}


def resolve_provider_options(
    spec: RunSpec, profile: DeviceProfile
) -> list[tuple[str, dict[str, str]]]:
    """The (provider, options) pairs the runner will ask ONNX Runtime for, before it drops the
    options its onnxruntime release does not know and the providers the board lacks."""
    gpu = gpu_settings(spec, profile)
    return provider_options(
        resolve_providers(spec, profile), gpu["precision"], gpu["trt_cache"], gpu["workspace_mb"]
    )


def runner_args(spec: RunSpec, profile: DeviceProfile, model: str) -> list[str]:
    """The runner's arguments (without the interpreter and script path)."""
    args = [
        model,
        "--runtime",
        spec.runtime,
        "--warmup",
        str(spec.warmup),
        "--seed",
        str(spec.seed),
    ]
    args += ["--threads", str(resolve_threads(spec, profile))]
    args += ["--providers", ",".join(resolve_providers(spec, profile))]
    if spec.runs is not None:
        args += ["--runs", str(spec.runs)]
    if spec.min_duration_s > 0:
        args += ["--min-duration", str(spec.min_duration_s)]
    if spec.ort_profile:
        args += ["--ort-profile", spec.ort_profile]
    if spec.pin:
        args.append("--pin")
    gpu = gpu_settings(spec, profile)
    args += ["--precision", gpu["precision"]]
    if gpu["trt_cache"]:
        args += ["--trt-cache", gpu["trt_cache"]]
    if gpu["workspace_mb"]:
        args += ["--workspace-mb", str(gpu["workspace_mb"])]
    if spec.strict_providers:
        args.append("--strict-providers")
    if not spec.placement:
        args.append("--no-placement")
    if spec.runtime == "trtexec":
        ort = profile.runtime("onnxruntime")
        args += ["--trtexec", (ort.trtexec if ort else "") or TRTEXEC_DEFAULT]
        if ort and ort.trt_version:
            args += ["--trt-version", ort.trt_version]
    return args + list(spec.extra_args)


def parse_runner_output(stdout: str, returncode: int, stderr: str, where: str) -> dict[str, Any]:
    """The runner's JSON result from its stdout; a crash without JSON raises DeviceError."""
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                break
    tail = " | ".join(stderr.strip().splitlines()[-3:]) or "no output"
    raise DeviceError(
        f"{where}: the runner crashed (exit code {returncode}) without a result: {tail}"
    )
