"""Run the board runner on this machine, in its own process, with a profile's thread count."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from devices.errors import DeviceError
from devices.measurement import Measurement
from devices.profile import DeviceProfile, load_profile
from devices.runspec import (
    RUNNER_PATH,
    RunSpec,
    merge_spec,
    parse_runner_output,
    resolve_threads,
    runner_args,
)


def local_label(profile: DeviceProfile) -> str:
    return "local" if profile.is_host else f"{profile.name} profile run locally on host"


def run_local(
    model_path: str | os.PathLike,
    profile: DeviceProfile | str = "host",
    spec: RunSpec | None = None,
    *,
    timeout_s: float = 600.0,
    python: str | None = None,
    **overrides,
) -> Measurement:
    """Time `model_path` in a fresh subprocess of this Python; RunSpec fields may be given as keywords."""
    profile = load_profile(profile) if isinstance(profile, str) else profile
    spec = merge_spec(spec, overrides)
    model = Path(model_path)
    if not model.is_file():
        raise DeviceError(f"model file {model} does not exist: export the model first")
    threads = resolve_threads(spec, profile)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads or 1))
    cmd = [
        python or sys.executable,
        str(RUNNER_PATH),
        *runner_args(spec, profile, str(model.resolve())),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        raise DeviceError(
            f"local run of {model.name} took longer than {timeout_s:.0f} s: lower runs/min_duration"
        ) from None
    label = local_label(profile)
    result = parse_runner_output(proc.stdout, proc.returncode, proc.stderr, label)
    return Measurement.from_runner(
        result, profile=profile.name, where="local", device=label, label=label, representative=True
    )
