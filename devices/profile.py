"""Device profiles: one declarative TOML file per board, loaded into a validated dataclass.

A profile says what the board is (architecture, cores, memory, published compute and bandwidth
figures with their sources), what software it runs (runtimes and execution providers in order of
preference, Python version) and how to reach it over SSH. Reach settings never name a real host in
the repository: they come from the profile file a user writes or from environment variables
(`FAIR_EDGE_<PROFILE>_HOST`, then `FAIR_EDGE_SSH_HOST`, and likewise USER, PORT, KEY, WORKDIR,
PYTHON, KNOWN_HOSTS).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import platform
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devices.board.runner import PRECISIONS, TRT
from devices.errors import ProfileError

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
RUNTIMES = ("onnxruntime", "tflite")
ARCHES = ("x86_64", "aarch64", "native")
HOST_KEY_POLICIES = ("reject", "accept-new")


@dataclass
class Runtime:
    """One runtime the board can run, with its execution providers in order of preference."""

    name: str
    package: str
    version: str = ""
    providers: list[str] = field(default_factory=list)
    note: str = ""
    precision: str = ""
    """TensorRT precision on this board: fp32, fp16 or int8 (empty: fp32)."""
    trt_cache: str = ""
    """Folder on the board for TensorRT engines and timing caches, kept between runs."""
    workspace_mb: int = 0
    """TensorRT builder workspace in MiB (0: TensorRT's default)."""
    trt_version: str = ""
    """TensorRT release on the board (trtexec flags differ before 8.4)."""
    trtexec: str = ""
    """Where trtexec is on the board (empty: not used)."""


@dataclass
class Figure:
    """A published number (compute in GFLOP/s or bandwidth in GB/s) and where it comes from."""

    value: float
    kind: str
    source: str


@dataclass
class SshSettings:
    """How to reach the board; empty fields are filled from the environment at connect time."""

    host: str = ""
    user: str = ""
    port: int = 22
    key: str = ""
    work_dir: str = "/tmp/fair-edge"
    python: str = "python3"
    known_hosts: str = ""
    host_key_policy: str = "reject"
    connect_timeout_s: float = 10.0
    run_timeout_s: float = 600.0


@dataclass
class DeviceProfile:
    """Everything fair-edge knows about one target device."""

    name: str
    description: str
    arch: str
    cpu: str
    cores: int
    threads: int
    ram_gb: float
    python: str
    runtimes: list[Runtime]
    compute: Figure
    bandwidth: Figure
    channel_multiple: int
    channel_multiple_source: str = ""
    emulate: str | None = None
    clock_ghz: float | None = None
    isa_features: list[str] = field(default_factory=list)
    peak_compute: Figure | None = None
    power_mode: str = ""
    thermal_check: str = ""
    container_image: str = ""
    ssh: SshSettings = field(default_factory=SshSettings)
    path: str = ""

    @property
    def is_host(self) -> bool:
        return self.arch == "native"

    @property
    def tensorrt(self) -> bool:
        """Whether the board's ONNX Runtime prefers TensorRT (engines, trtexec, GPU precision)."""
        ort = self.runtime("onnxruntime")
        return bool(ort and ort.providers and ort.providers[0] == TRT)

    def runtime(self, name: str) -> Runtime | None:
        return next((r for r in self.runtimes if r.name == name), None)

    def ssh_settings(self, env: dict[str, str] | None = None) -> SshSettings:
        """The SSH settings with environment overrides applied (profile-specific first)."""
        env = dict(os.environ if env is None else env)
        prefix = "FAIR_EDGE_" + self.name.upper().replace("-", "_") + "_"
        values = dataclasses.asdict(self.ssh)
        for fld in dataclasses.fields(SshSettings):
            key = fld.name.upper() if fld.name != "work_dir" else "WORKDIR"
            raw = env.get(prefix + key) or env.get("FAIR_EDGE_SSH_" + key)
            if raw:
                values[fld.name] = raw
        return _build(SshSettings, values, f"{self.name} ssh settings (environment)", "ssh")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DeviceProfile:
        return _profile_from_dict(json.loads(text), "JSON profile")


def _check_type(value: Any, typ: Any, where: str, name: str) -> Any:
    """Coerce/check one scalar field; raise ProfileError naming the field on a mismatch."""
    if typ is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if typ is int and isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    if typ is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if (
        typ in (int, str, bool)
        and isinstance(value, typ)
        and not (typ is int and isinstance(value, bool))
    ):
        return value
    raise ProfileError(
        f"{where}: field '{name}' must be {typ.__name__}, got {type(value).__name__} {value!r}"
    )


def _build(cls: type, data: dict[str, Any], where: str, prefix: str = "") -> Any:
    """Build a dataclass from a dict, refusing unknown and missing fields by name."""
    if not isinstance(data, dict):
        raise ProfileError(f"{where}: field '{prefix}' must be a table, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean '{_join(prefix, close[0])}'?)" if close else ""
            raise ProfileError(f"{where}: unknown field '{_join(prefix, key)}'{hint}")
    kwargs: dict[str, Any] = {}
    for name, fld in fields.items():
        if name not in data:
            no_default = fld.default is dataclasses.MISSING
            if no_default and fld.default_factory is dataclasses.MISSING:
                raise ProfileError(f"{where}: missing required field '{_join(prefix, name)}'")
            continue
        kwargs[name] = _convert(data[name], fld.type, where, _join(prefix, name))
    return cls(**kwargs)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


_SCALARS = {"str": str, "int": int, "float": float, "bool": bool}


def _convert(value: Any, type_name: str, where: str, name: str) -> Any:
    type_name = type_name.replace(" ", "")
    optional = type_name.endswith("|None")
    base = type_name.removesuffix("|None")
    if value is None and optional:
        return None
    if base in _SCALARS:
        return _check_type(value, _SCALARS[base], where, name)
    if base == "list[str]":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ProfileError(f"{where}: field '{name}' must be a list of strings, got {value!r}")
        return list(value)
    if base == "list[Runtime]":
        if not isinstance(value, list) or not value:
            raise ProfileError(f"{where}: field '{name}' must be a non-empty list of tables")
        return [_build(Runtime, v, where, f"{name}[{i}]") for i, v in enumerate(value)]
    if base == "Figure":
        return _build(Figure, value, where, name)
    if base == "SshSettings":
        return _build(SshSettings, value, where, name)
    raise ProfileError(f"{where}: field '{name}' has an unsupported type {type_name}")


def native_channel_multiple(cpuinfo: str | None = None) -> tuple[int, str]:
    """The channel multiple of the CPU running this, from its SIMD flags, and why.

    ONNX Runtime's CPU convolutions work on blocks of as many output channels as one SIMD
    register holds fp32 values, so a layer costs what the next full block costs: measured 16 on
    an AVX-512 Xeon VM and 8 on an AVX2 EPYC VM (bench.bench_channel_multiple, see
    bench/RESULTS-latency.md); NEON holds 4.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            cpuinfo = ""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    if "avx512f" in flags:
        return 16, "detected on this machine: AVX-512 (16 fp32 lanes; measured blocks of 16)"
    if "avx2" in flags or "avx" in flags:
        return 8, "detected on this machine: AVX2 (8 fp32 lanes; measured blocks of 8)"
    if "asimd" in flags or platform.machine().lower() in ("aarch64", "arm64"):
        return 4, "detected on this machine: NEON (4 fp32 lanes)"
    return 4, "detected on this machine: no AVX or NEON flags found, 4 assumed"


def _validate(p: DeviceProfile, where: str) -> DeviceProfile:
    def bad(name: str, why: str) -> ProfileError:
        return ProfileError(f"{where}: field '{name}' {why}")

    if p.arch not in ARCHES:
        raise bad("arch", f"must be one of {', '.join(ARCHES)}, got {p.arch!r}")
    if p.emulate not in (None, "aarch64"):
        raise bad("emulate", f"must be 'aarch64' or absent, got {p.emulate!r}")
    if p.cores < 1:
        raise bad("cores", f"must be >= 1, got {p.cores}")
    if p.threads < 0:
        raise bad("threads", f"must be >= 0 (0 = all cores of the machine), got {p.threads}")
    if p.ram_gb <= 0:
        raise bad("ram_gb", f"must be > 0, got {p.ram_gb}")
    if p.channel_multiple == 0 and p.arch == "native":
        p.channel_multiple, p.channel_multiple_source = native_channel_multiple()
    elif p.channel_multiple == 0:
        raise bad("channel_multiple", "0 (detect on this machine) is only for arch 'native'")
    if p.channel_multiple < 1:
        raise bad("channel_multiple", f"must be >= 1, got {p.channel_multiple}")
    for i, r in enumerate(p.runtimes):
        if r.name not in RUNTIMES:
            raise bad(
                f"runtimes[{i}].name", f"must be one of {', '.join(RUNTIMES)}, got {r.name!r}"
            )
        if r.name == "onnxruntime" and not r.providers:
            raise bad(f"runtimes[{i}].providers", "must list at least one execution provider")
        if r.precision not in ("", *PRECISIONS):
            raise bad(f"runtimes[{i}].precision", f"must be one of {', '.join(PRECISIONS)}")
        if r.workspace_mb < 0:
            raise bad(f"runtimes[{i}].workspace_mb", f"must be >= 0, got {r.workspace_mb}")
    for name, fig in (("compute", p.compute), ("bandwidth", p.bandwidth)):
        if fig.value <= 0:
            raise bad(f"{name}.value", f"must be > 0, got {fig.value}")
        if not fig.source.strip():
            raise bad(f"{name}.source", "must say where the figure comes from")
    if p.ssh.host_key_policy not in HOST_KEY_POLICIES:
        raise bad(
            "ssh.host_key_policy",
            f"must be one of {', '.join(HOST_KEY_POLICIES)}, got {p.ssh.host_key_policy!r}",
        )
    if not 0 < p.ssh.port < 65536:
        raise bad("ssh.port", f"must be a TCP port 1..65535, got {p.ssh.port}")
    return p


def _profile_from_dict(data: dict[str, Any], where: str) -> DeviceProfile:
    profile = _build(DeviceProfile, data, where)
    return _validate(profile, where)


# Short names people type (`make deploy DEVICE=jetson`): the current board of each family.
ALIASES = {"jetson": "jetson-orin-nano", "rpi": "rpi5", "pi": "rpi5", "raspberry-pi": "rpi5"}


def list_profiles() -> list[str]:
    """Names of the profiles shipped with fair-edge."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def load_profile(name_or_path: str | os.PathLike) -> DeviceProfile:
    """Load a shipped profile by name, or a user's profile from a .toml path."""
    text = ALIASES.get(str(name_or_path), str(name_or_path))
    path = Path(text)
    if not (text.endswith(".toml") or os.sep in text or path.is_file()):
        path = PROFILE_DIR / f"{text}.toml"
        if not path.is_file():
            raise ProfileError(
                f"unknown device profile {text!r}: choose one of {', '.join(list_profiles())} "
                f"(or {', '.join(sorted(ALIASES))}), or give the path of a .toml profile"
            )
    if not path.is_file():
        raise ProfileError(f"profile file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"profile {path}: not valid TOML ({exc})") from None
    data.setdefault("name", path.stem)
    profile = _profile_from_dict(data, f"profile {path}")
    profile.path = str(path)
    return profile
