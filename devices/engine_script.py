"""The bundle's `build_engine.sh`: build TensorRT engines on the board, with trtexec.

A TensorRT engine is tied to the GPU and TensorRT release that built it, so a bundle never
carries one: it carries the exact trtexec command per model and this script, which checks each
model's SHA-256, builds into the board's engine folder (a `.part` file renamed only when
trtexec succeeds, so a failed build leaves nothing half-written) and times each engine.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from devices.board.runner import PRECISIONS, TRTEXEC_DEFAULT, trtexec_command
from devices.errors import DeviceError
from devices.profile import DeviceProfile

ENGINES_VAR = "$ENGINES"
DEFAULT_ENGINE_DIR = "$HOME/.cache/fair-edge/trt"


@dataclass
class EngineJob:
    """One model of the bundle to build an engine for."""

    model: str
    """Path inside the bundle, e.g. model.onnx or reference/original.onnx."""
    precision: str
    sha256: str

    @property
    def engine(self) -> str:
        stem = self.model.replace("/", "__").removesuffix(".onnx")
        if stem.endswith(f".{self.precision}"):  # model.int8.onnx -> model.int8.engine
            return f"{stem}.engine"
        return f"{stem}.{self.precision}.engine"


def _check(profile: DeviceProfile, jobs: list[EngineJob]) -> tuple[str, str, int]:
    ort = profile.runtime("onnxruntime")
    if not profile.tensorrt or ort is None:
        raise DeviceError(
            f"profile {profile.name} does not run TensorRT (its first ONNX Runtime provider is "
            "not TensorrtExecutionProvider): no engine script for it"
        )
    for job in jobs:
        if job.precision not in PRECISIONS:
            raise DeviceError(f"{job.model}: precision must be one of {', '.join(PRECISIONS)}")
    return ort.trtexec or TRTEXEC_DEFAULT, ort.trt_version, ort.workspace_mb


def build_command(profile: DeviceProfile, job: EngineJob) -> str:
    """The exact trtexec line build_engine.sh runs for `job` (engine folder in $ENGINES)."""
    trtexec, version, workspace = _check(profile, [job])
    cmd = trtexec_command(trtexec, job.model, job.precision, workspace, None, version)
    cmd.insert(2, f"--saveEngine={ENGINES_VAR}/{job.engine}.part")
    cmd.insert(3, f"--timingCacheFile={ENGINES_VAR}/trtexec.timing.cache")
    return " ".join(_quote(a) for a in cmd)


def _quote(arg: str) -> str:
    """shlex.quote, but $ENGINES stays expandable (double quotes)."""
    if ENGINES_VAR in arg:
        return '"' + arg.replace('"', '\\"') + '"'
    return shlex.quote(arg)


def build_engine_script(profile: DeviceProfile, bundle_name: str, jobs: list[EngineJob]) -> str:
    """A POSIX shell script that builds and times each job's engine on the board."""
    trtexec, version, workspace = _check(profile, jobs)
    if not jobs:
        raise DeviceError("no model to build an engine for")
    folder = f"{DEFAULT_ENGINE_DIR}/{bundle_name}"
    lines = [
        "#!/bin/sh",
        f"# Build TensorRT engines for the fair-edge bundle {bundle_name} on THIS board.",
        "# Engines are not portable between devices or TensorRT releases: build them where they run.",
        f"# Profile {profile.name}: TensorRT {version or 'unknown'}, workspace {workspace} MiB.",
        "# Each model's SHA-256 is checked first; an engine is written as .part and renamed only",
        "# when trtexec succeeds. Set ENGINES to build elsewhere.",
        "set -eu",
        'cd "$(dirname "$0")"',
        f'ENGINES="${{ENGINES:-{folder}}}"',
        f"TRTEXEC={shlex.quote(trtexec)}",
        'fail() { echo "build_engine.sh: error: $1" >&2; exit 2; }',
        '[ -x "$TRTEXEC" ] || fail "trtexec is not at $TRTEXEC: install TensorRT (JetPack has it '
        'under /usr/src/tensorrt/bin)"',
        'mkdir -p "$ENGINES" || fail "cannot create $ENGINES: set ENGINES to a writable folder"',
        "check() {",
        '  [ -f "$2" ] || fail "$2 is missing from the bundle: copy the whole bundle folder"',
        '  got=$(sha256sum "$2" | cut -d" " -f1)',
        '  [ "$got" = "$1" ] || fail "$2 does not match its SHA-256 in manifest.json: the bundle '
        'was changed or damaged; rebuild and resend it"',
        "}",
    ]
    for job in jobs:
        lines.append(f"check {job.sha256} {shlex.quote(job.model)}")
    for job in jobs:
        part = f"{ENGINES_VAR}/{job.engine}.part"
        lines += [
            f'echo "building {job.engine} ({job.precision}) from {job.model}"',
            f'rm -f "{part}"',
            f'if ! {build_command(profile, job)} > "{ENGINES_VAR}/{job.engine}.log" 2>&1; then',
            f'  rm -f "{part}"',
            f'  fail "trtexec could not build {job.engine}; its log is {ENGINES_VAR}/'
            f'{job.engine}.log"',
            "fi",
            f'mv "{part}" "{ENGINES_VAR}/{job.engine}"',
            f'grep -E "Latency: min|GPU Compute Time: min" "{ENGINES_VAR}/{job.engine}.log" || true',
        ]
    lines.append('echo "engines in $ENGINES"')
    return "\n".join(lines) + "\n"
