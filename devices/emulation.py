"""Run the board runner on the boards' software stack without a board: arm64 Debian under qemu.

`build_sysroot()` makes an arm64 Debian bookworm root (the base of Raspberry Pi OS): debootstrap's
first stage (`--foreign --variant=minbase --include=python3`) downloads and unpacks the packages,
the rest of the downloaded packages are unpacked with `dpkg-deb -x` (no second stage, so no
binfmt or chroot is needed), and the aarch64 wheels of numpy, onnxruntime and ai-edge-litert
are installed into its dist-packages by the host's pip (`--platform manylinux..._aarch64`). The
result is cached in cache_dir("sysroot", <versions>). `run_emulated()` runs the unchanged runner
with the sysroot's python3.11 under `qemu-aarch64-static -L <sysroot>`.

Latency under emulation is not representative of the board and is labelled so; what the run
proves is that the bundle loads and runs on the board's Python, numpy and runtime builds.

Entry point: `python -m devices.emulation build` (the Makefile's `sysroot` target).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from calibration.fileio import atomic_directory, atomic_write_text, cache_dir
from devices.errors import DeviceError
from devices.measurement import WHERE_LABELS, Measurement
from devices.profile import DeviceProfile, load_profile
from devices.runspec import (
    RUNNER_PATH,
    RunSpec,
    merge_spec,
    parse_runner_output,
    resolve_threads,
    runner_args,
)

SUITE = "bookworm"
PYTHON = "3.11"
# Newest releases that run under qemu-aarch64 (newer ones crash in emulation).
WHEELS = {"numpy": "2.2.6", "onnxruntime": "1.27.0", "ai-edge-litert": "2.1.2"}
PLATFORMS = (
    "manylinux2014_aarch64",
    "manylinux_2_17_aarch64",
    "manylinux_2_27_aarch64",
    "manylinux_2_28_aarch64",
)
QEMU = "qemu-aarch64-static"
LABEL = WHERE_LABELS["emulated"]
SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))


def sysroot_key() -> str:
    wheels = "-".join(f"{k}{v}" for k, v in sorted(WHEELS.items()))
    return f"debian-{SUITE}-arm64-py{PYTHON}-{wheels}"


def sysroot_path() -> Path:
    """Where the cached sysroot for the pinned versions lives (it may not exist yet).

    $FAIR_EDGE_SYSROOT names the folder itself; else it is <versions key> under
    $FAIR_EDGE_SYSROOT_CACHE (the Makefile sets it, so `make sysroot` and `make test` share one
    build whatever FAIR_EDGE_CACHE the tests use), else under cache_dir("sysroot").
    """
    env = os.environ.get("FAIR_EDGE_SYSROOT")
    if env:
        return Path(env)
    parent = os.environ.get("FAIR_EDGE_SYSROOT_CACHE")
    root = Path(parent) if parent else cache_dir("sysroot")
    root.mkdir(parents=True, exist_ok=True)
    return root / sysroot_key()


def debian_mirror(sources: tuple[Path, ...] = SOURCES) -> str:
    """The Debian archive URI from this machine's apt sources ($FAIR_EDGE_DEBIAN_MIRROR wins)."""
    env = os.environ.get("FAIR_EDGE_DEBIAN_MIRROR")
    if env:
        return env
    texts: list[str] = []
    for src in sources:
        files = (
            sorted(src.glob("*.list")) + sorted(src.glob("*.sources")) if src.is_dir() else [src]
        )
        texts += [f.read_text(errors="replace") for f in files if f.is_file()]
    uris: list[str] = []
    for text in texts:
        for stanza in re.split(r"\n\s*\n", text):
            fields = dict(
                (m.group(1).lower(), m.group(2).strip())
                for m in re.finditer(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.M)
            )
            if "deb" in fields.get("types", "").split():
                uris += fields.get("uris", "").split()
        for line in text.splitlines():
            m = re.match(r"^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+\S+", line)
            if m:
                uris.append(m.group(1))
    for uri in uris:
        if uri.rstrip("/").endswith("/debian"):
            return uri
    raise DeviceError(
        "no Debian archive found in /etc/apt/sources.list(.d): set FAIR_EDGE_DEBIAN_MIRROR to a "
        "Debian mirror URI to build the arm64 sysroot"
    )


def _need(tool: str) -> str:
    path = shutil.which(tool) or (
        f"/usr/sbin/{tool}" if Path(f"/usr/sbin/{tool}").exists() else None
    )
    if not path:
        raise DeviceError(
            f"{tool} is not installed: run `make setup` (Debian packages qemu-user-static, debootstrap)"
        )
    return path


def _run(cmd: list[str], what: str, timeout_s: float) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise DeviceError(f"{what} took longer than {timeout_s:.0f} s") from None
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise DeviceError(f"{what} failed (exit code {proc.returncode}): {tail}")


def _du(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            p = os.path.join(root, name)
            if not os.path.islink(p):
                total += os.path.getsize(p)
    return total


def python_command(sysroot: Path) -> list[str]:
    """The command line that starts the sysroot's Python under qemu user emulation."""
    root = sysroot / "root"
    return [_need(QEMU), "-L", str(root), str(root / "usr" / "bin" / f"python{PYTHON}")]


def build_sysroot(force: bool = False, log=print) -> Path:
    """Build (or reuse) the cached arm64 sysroot and return its folder."""
    path = sysroot_path()
    if (path / "sysroot.json").is_file() and not force:
        return path
    debootstrap = _need("debootstrap")
    qemu = _need(QEMU)
    dpkg_deb = _need("dpkg-deb")
    prefix: list[str] = []
    if os.geteuid() != 0:
        fakeroot = shutil.which("fakeroot")
        if not fakeroot:
            raise DeviceError(
                "building the arm64 sysroot needs root or fakeroot (apt-get install fakeroot)"
            )
        prefix = [fakeroot]
    mirror = debian_mirror()
    t0 = time.monotonic()
    with atomic_directory(path) as tmp:
        root = tmp / "root"
        log(f"debootstrap {SUITE} arm64 (first stage) from {mirror}")
        _run(
            [
                *prefix,
                debootstrap,
                "--foreign",
                "--arch=arm64",
                "--variant=minbase",
                "--include=python3",
                SUITE,
                str(root),
                mirror,
            ],
            "debootstrap",
            900,
        )
        debs = sorted((root / "var" / "cache" / "apt" / "archives").glob("*.deb"))
        log(f"unpacking {len(debs)} packages")
        for deb in debs:
            _run([dpkg_deb, "-x", str(deb), str(root)], f"dpkg-deb -x {deb.name}", 120)
            deb.unlink()
        site = root / "usr" / "lib" / "python3" / "dist-packages"
        log(f"installing aarch64 wheels {WHEELS} into {site}")
        pip = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "--no-compile",
            "--target",
            str(site),
            "--only-binary=:all:",
            "--python-version",
            PYTHON,
            "--implementation",
            "cp",
        ]
        for plat in PLATFORMS:
            pip += ["--platform", plat]
        _run(
            pip + [f"{k}=={v}" for k, v in WHEELS.items()], "pip install of the aarch64 wheels", 900
        )
        check = [
            qemu,
            "-L",
            str(root),
            str(root / "usr/bin" / f"python{PYTHON}"),
            "-c",
            "import numpy, onnxruntime, platform; print(platform.machine())",
        ]
        _run(check, "smoke test of the sysroot's python under qemu", 300)
        info = {
            "key": sysroot_key(),
            "suite": SUITE,
            "arch": "arm64",
            "python": PYTHON,
            "wheels": WHEELS,
            "mirror": mirror,
            "build_s": round(time.monotonic() - t0, 1),
            "size_bytes": _du(tmp),
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        atomic_write_text(tmp / "sysroot.json", json.dumps(info, indent=2, sort_keys=True))
    log(f"sysroot ready in {info['build_s']} s, {info['size_bytes'] / 2**20:.0f} MiB: {path}")
    return path


def sysroot_info(path: Path | None = None) -> dict:
    path = path or sysroot_path()
    return json.loads((path / "sysroot.json").read_text())


def run_emulated(
    model_path: str | os.PathLike,
    profile: DeviceProfile | str,
    spec: RunSpec | None = None,
    *,
    timeout_s: float = 900.0,
    build: bool = True,
    **overrides,
) -> Measurement:
    """Time `model_path` with the board-side stack under qemu-aarch64; labelled not representative."""
    profile = load_profile(profile) if isinstance(profile, str) else profile
    if profile.emulate != "aarch64":
        raise DeviceError(
            f'profile {profile.name} has no emulation target (emulate = "aarch64" is for the arm64 boards)'
        )
    spec = merge_spec(spec, overrides)
    model = Path(model_path).resolve()
    if not model.is_file():
        raise DeviceError(f"model file {model} does not exist: export the model first")
    path = sysroot_path()
    if not (path / "sysroot.json").is_file():
        if not build:
            raise DeviceError(
                "the arm64 sysroot is not built: run `python -m devices.emulation build`"
            )
        path = build_sysroot()
    threads = resolve_threads(spec, profile)
    cmd = [*python_command(path), str(RUNNER_PATH), *runner_args(spec, profile, str(model))]
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": str(threads or 1), "LANG": "C.UTF-8"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        raise DeviceError(
            f"emulated run of {model.name} took longer than {timeout_s:.0f} s: lower runs"
        ) from None
    device = f"{profile.name} software stack, emulated aarch64 on host"
    result = parse_runner_output(proc.stdout, proc.returncode, proc.stderr, device)
    return Measurement.from_runner(
        result,
        profile=profile.name,
        where="emulated",
        device=device,
        label=LABEL,
        representative=False,
        extra={"sysroot": sysroot_info(path)["key"]},
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devices.emulation")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or reuse) the cached arm64 sysroot")
    b.add_argument("--force", action="store_true", help="rebuild even when cached")
    sub.add_parser("path", help="print the sysroot folder")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "build":
            path = build_sysroot(force=args.force)
            info = sysroot_info(path)
            print(f"{path} ({info['size_bytes'] / 2**20:.0f} MiB, built in {info['build_s']} s)")
        else:
            print(sysroot_path())
    except DeviceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
