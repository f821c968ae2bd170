"""How to time a model: the runner's settings, turned into its command line and read back."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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
