"""Device profiles (shipped and user-written), their validation, and roofline estimates."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from tiny_models import conv_onnx

from devices.errors import DeviceError, ProfileError
from devices.estimate import Estimate, estimate, estimate_onnx, onnx_cost
from devices.profile import PROFILE_DIR, DeviceProfile, list_profiles, load_profile
from devices.report import Comparison

BOARDS = ["rpi4", "rpi5", "jetson-nano", "jetson-orin-nano"]


def test_shipped_profiles_load_and_round_trip() -> None:
    assert list_profiles() == sorted(["host", *BOARDS])
    for name in list_profiles():
        p = load_profile(name)
        assert p.name == name
        assert DeviceProfile.from_json(p.to_json()) == p
        assert p.compute.value > 0 and p.compute.source.strip()
        assert p.bandwidth.value > 0 and p.bandwidth.source.strip()
        assert p.channel_multiple >= 1 and p.channel_multiple_source
        assert (
            p.runtimes[0].name == "onnxruntime"
            and p.runtimes[0].providers[-1] == "CPUExecutionProvider"
        )
    for name in BOARDS:
        p = load_profile(name)
        assert p.arch == "aarch64" and p.emulate == "aarch64" and p.threads >= 1
    assert load_profile("jetson-nano").runtimes[0].providers[:2] == [
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
    ]
    assert load_profile("rpi4").python == "3.11" and load_profile("jetson-nano").python == "3.6"
    assert load_profile("host").is_host and load_profile("host").emulate is None


def test_profiles_name_no_real_host() -> None:
    """Reach settings come from the environment; the only literal host is the loopback address."""
    for path in PROFILE_DIR.glob("*.toml"):
        hosts = re.findall(r'^\s*host\s*=\s*"([^"]*)"', path.read_text(), re.M)
        assert all(h in ("", "127.0.0.1") for h in hosts), (path, hosts)
        assert load_profile(path.stem).ssh.key == ""


def test_profiles_cite_public_sources_only() -> None:
    """A figure's source must be one a reader can open: no file outside the repository."""
    paths = sorted(PROFILE_DIR.glob("*.toml"))
    assert paths
    for path in paths:
        text = path.read_text(encoding="utf-8")
        assert "DEVICE_FACTS" not in text and "shared/" not in text, path.name
    for name in BOARDS:  # every board's own figures name a public page or document
        p = load_profile(name)
        for source in (p.compute.source, p.bandwidth.source, p.channel_multiple_source):
            assert re.search(r"https?://", source), (name, source)


def test_ssh_settings_from_environment() -> None:
    p = load_profile("rpi4")
    env = {
        "FAIR_EDGE_SSH_HOST": "generic.invalid",
        "FAIR_EDGE_RPI4_HOST": "pi.invalid",
        "FAIR_EDGE_SSH_PORT": "2222",
        "FAIR_EDGE_RPI4_KEY": "/keys/pi",
        "FAIR_EDGE_SSH_WORKDIR": "/srv/fe",
    }
    s = p.ssh_settings(env)
    assert (s.host, s.port, s.key, s.work_dir, s.user) == (
        "pi.invalid",
        2222,
        "/keys/pi",
        "/srv/fe",
        "pi",
    )
    assert load_profile("rpi5").ssh_settings(env).host == "generic.invalid"
    with pytest.raises(ProfileError, match="'ssh.port' must be int"):
        p.ssh_settings({"FAIR_EDGE_SSH_PORT": "twenty-two"})


def _write(tmp_path: Path, text: str, name: str = "myboard.toml") -> Path:
    base = (PROFILE_DIR / "rpi4.toml").read_text()
    path = tmp_path / name
    path.write_text(text(base) if callable(text) else text)
    return path


def test_user_profile_from_path(tmp_path: Path) -> None:
    path = _write(tmp_path, lambda b: b.replace("threads = 4", "threads = 2"))
    p = load_profile(path)
    assert p.name == "myboard" and p.threads == 2 and p.path == str(path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda b: b.replace("threads = 4", 'threads = "four"'), r"field 'threads' must be int"),
        (
            lambda b: b.replace("threads = 4", "thread = 4"),
            r"unknown field 'thread' \(did you mean 'threads'\?\)",
        ),
        (lambda b: b.replace('arch = "aarch64"', ""), r"missing required field 'arch'"),
        (lambda b: b.replace('arch = "aarch64"', 'arch = "riscv"'), r"field 'arch' must be one of"),
        (
            lambda b: b.replace("channel_multiple = 4", "channel_multiple = 0"),
            r"field 'channel_multiple'",
        ),
        (
            lambda b: b.replace('name = "onnxruntime"', 'name = "tensorflow"'),
            r"field 'runtimes\[0\]\.name'",
        ),
        (
            lambda b: b.replace('providers = ["CPUExecutionProvider"]', "providers = []"),
            r"'runtimes\[0\]\.providers'",
        ),
        (lambda b: b.replace("value = 5.5", "value = -1"), r"field 'bandwidth\.value' must be > 0"),
        (lambda b: b.replace("port = 22", "port = 70000"), r"field 'ssh\.port'"),
        (lambda b: b + '\nhost_key_policy = "yes"\n', r"field 'ssh\.host_key_policy'"),
        (
            lambda b: b.replace("[compute]", "[compute]\nunits = 1"),
            r"unknown field 'compute\.units'",
        ),
        (lambda b: b + "\n[broken\n", r"not valid TOML"),
    ],
)
def test_bad_profile_names_the_field(tmp_path: Path, edit, message: str) -> None:
    with pytest.raises(ProfileError, match=message) as info:
        load_profile(_write(tmp_path, edit))
    assert "\n" not in str(info.value) and "myboard.toml" in str(info.value)


def test_unknown_profile_name() -> None:
    with pytest.raises(ProfileError, match="unknown device profile 'rpi9'.*rpi4"):
        load_profile("rpi9")
    assert issubclass(ProfileError, DeviceError)


def test_roofline_estimate_by_hand() -> None:
    p = load_profile("rpi4")
    e = estimate(24e9, 1.1e9, p, model="m")
    assert e.kind == "estimate" and e.label == "estimate"
    assert e.compute_ms == pytest.approx(24e9 / 12e9 * 1e3)
    assert e.memory_ms == pytest.approx(1.1e9 / 5.5e9 * 1e3)
    assert e.latency_ms == pytest.approx(2000.0) and e.bound == "compute"
    assert "roofline" in e.basis and "12 GFLOP/s" in e.basis and "5.5 GB/s" in e.basis
    assert estimate(1.0, 5.5e9, p).bound == "memory"
    assert Estimate.from_json(e.to_json()) == e
    with pytest.raises(DeviceError):
        estimate(-1, 0, p)


def test_onnx_cost_matches_hand_count(tmp_path: Path) -> None:
    cin, cout, hw, k = 3, 8, 16, 3
    path = conv_onnx(tmp_path / "conv.onnx", cin, cout, hw, k)
    flops, nbytes = onnx_cost(path)
    out = cout * hw * hw
    assert flops == 2 * out * cin * k * k + out  # conv MACs x 2, plus one per Relu output
    weights = (cout * cin * k * k + cout) * 4
    activations = 2 * (out + out) * 4  # conv output and relu output, each written and read
    assert nbytes == weights + activations
    e = estimate_onnx(path, "rpi5")
    assert e.latency_ms == pytest.approx(max(flops / 30.25e9, nbytes / 5.5e9) * 1e3)


def test_estimate_is_never_compared_with_a_measurement() -> None:
    e = estimate(1e9, 1e6, "rpi4")
    with pytest.raises(DeviceError, match="estimates are reported separately"):
        Comparison(e, e)  # type: ignore[arg-type]
    assert np.isfinite(e.latency_ms)


def test_host_channel_multiple_is_detected_from_the_cpu_flags() -> None:
    """host.toml says 0: the multiple comes from this CPU's SIMD width, stated with its reason."""
    from devices.profile import native_channel_multiple

    assert native_channel_multiple("flags\t: fpu sse avx avx2 avx512f avx512bw\n")[0] == 16
    assert native_channel_multiple("flags\t: fpu sse avx avx2 fma\n")[0] == 8
    assert native_channel_multiple("Features\t: fp asimd evtstrm crc32\n")[0] == 4
    host = load_profile("host")
    assert host.channel_multiple == native_channel_multiple()[0] in (4, 8, 16)
    assert host.channel_multiple_source.startswith("detected on this machine")


def test_family_aliases_resolve_to_the_current_board() -> None:
    """`make deploy DEVICE=jetson` works: short family names load the current board's profile."""
    assert load_profile("jetson").name == "jetson-orin-nano"
    assert load_profile("rpi").name == "rpi5" == load_profile("pi").name
    with pytest.raises(ProfileError, match=r"\(or jetson, pi, raspberry-pi, rpi\)"):
        load_profile("toaster")
