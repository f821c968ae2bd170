"""Before/after reports from real local measurements: ratios, pages, plots, refusals."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from tiny_models import conv_onnx

from devices.errors import DeviceError
from devices.estimate import estimate_onnx
from devices.measurement import Measurement
from devices.report import Comparison, load_report, measure_pair, write_report


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Comparison, Path, Path]:
    d = tmp_path_factory.mktemp("pair")
    big = conv_onnx(d / "original.onnx", cin=8, cout=32, hw=24)
    small = conv_onnx(d / "pruned.onnx", cin=8, cout=8, hw=24)
    return measure_pair(big, small, "rpi4", where="local", runs=15, warmup=2, threads=1), big, small


def test_ratios_come_from_the_measurements(pair) -> None:
    c, big, small = pair
    a, b = c.original, c.pruned
    assert a.device == b.device == "rpi4 profile run locally on host"
    r = c.ratios
    assert r["speedup_p50"] == pytest.approx(a.latency_ms["p50"] / b.latency_ms["p50"])
    assert r["size_ratio"] == pytest.approx(small.stat().st_size / big.stat().st_size)
    assert r["peak_rss_ratio"] == pytest.approx(b.memory_mb["peak_rss"] / a.memory_mb["peak_rss"])
    assert r["throughput_ratio"] == pytest.approx(b.throughput_ips / a.throughput_ips)
    s = r["speedup_p50"]
    want = f"{s:.2f}x faster" if s >= 1 else f"{1 / s:.2f}x SLOWER"  # never "0.98x faster"
    assert c.headline().startswith(f"{c.device}: pruned is {want} at p50")
    slow = type(c)(original=c.pruned, pruned=c.original)
    if slow.ratios["speedup_p50"] < 1:
        assert "SLOWER" in slow.headline() and "faster" not in slow.headline()


def test_report_files(pair, tmp_path: Path) -> None:
    c, big, _ = pair
    est = estimate_onnx(big, "rpi4")
    files = write_report(tmp_path / "report", c, [est])
    for f in files.values():
        assert f.is_file() and f.stat().st_size > 0
    assert files["latency.png"].read_bytes()[:4] == b"\x89PNG"
    data = json.loads(files["report.json"].read_text())
    assert data["schema"] == "fair-edge.report/1" and data["headlines"] == [c.headline()]
    md = files["report.md"].read_text().splitlines()
    assert md[2] == f"- **{c.headline()}**"  # the page leads with the ratios
    assert "## Estimates (not measurements)" in md
    kinds = {data["comparisons"][0][k]["kind"] for k in ("original", "pruned")}
    assert kinds == {"measurement"} and data["estimates"][0]["kind"] == "estimate"
    html = files["report.html"].read_text()
    assert "latency.png" in html and "Estimates (not measurements)" in html
    comps, ests = load_report(files["report.json"])
    assert comps[0].ratios == c.ratios and ests == [est]
    assert not list(tmp_path.glob(".report*"))  # written atomically, no temp folder left


def test_rounds_alternate_and_pool(pair) -> None:
    _, big, small = pair
    c = measure_pair(big, small, "host", rounds=2, runs=4, warmup=1, threads=1)
    for m in (c.original, c.pruned):
        assert m.extra["rounds"] == 2 and m.runs == 8 == len(m.samples_ms) == len(m.cpu_samples_ms)
        assert m.latency_ms["p50"] == pytest.approx(float(np.percentile(m.samples_ms, 50)))
        assert m.cpu_ms["p90"] == pytest.approx(float(np.percentile(m.cpu_samples_ms, 90)))
    with pytest.raises(DeviceError, match="only rounds of one model"):
        Measurement.merge([c.original, c.pruned])
    with pytest.raises(DeviceError, match="rounds must be"):
        measure_pair(big, small, "host", rounds=0)


def test_report_refusals(pair, tmp_path: Path) -> None:
    c, big, _ = pair
    other = dataclasses.replace(c.pruned, device="host", profile="host", label="local")
    with pytest.raises(DeviceError, match="compare models measured on the same device"):
        Comparison(c.original, other)
    with pytest.raises(DeviceError, match="estimates are reported separately"):
        Comparison(c.original, estimate_onnx(big, "rpi4"))  # type: ignore[arg-type]
    with pytest.raises(DeviceError, match="at least one"):
        write_report(tmp_path / "r", [])
    assert not (tmp_path / "r").exists()
    bad = c.original.to_dict() | {"schema": "fair-edge.measurement/0"}
    with pytest.raises(DeviceError, match="schema"):
        Measurement.from_dict(bad)
    with pytest.raises(DeviceError, match="where must be"):
        measure_pair(big, big, "rpi4", where="cloud")
