"""Before/after reports: original vs pruned, measured on the same device in one run.

Writes report.json (schema-versioned), report.md and report.html with two plots (latency
distribution, before/after bars). Every page leads with the ratios. Estimates, when given, go in
a separate, labelled section and are never put in a ratio with a measurement.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from calibration.fileio import atomic_directory, atomic_write_text
from devices.errors import DeviceError
from devices.estimate import Estimate
from devices.measurement import Measurement
from devices.profile import DeviceProfile, load_profile
from devices.runspec import RunSpec

SCHEMA = "fair-edge.report/1"


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return float(num) / float(den)


@dataclass
class Comparison:
    """Original and pruned model measured on one device; ratios are original / pruned for time."""

    original: Measurement
    pruned: Measurement

    def __post_init__(self) -> None:
        for m in (self.original, self.pruned):
            if not isinstance(m, Measurement):
                raise DeviceError(
                    f"a comparison takes two Measurements, got {type(m).__name__}: "
                    "estimates are reported separately, never compared with measurements"
                )
        a, b = self.original, self.pruned
        if (a.profile, a.where, a.device) != (b.profile, b.where, b.device):
            raise DeviceError(
                f"original ran on '{a.device}' but pruned on '{b.device}': compare models "
                "measured on the same device (use measure_pair)"
            )

    @property
    def device(self) -> str:
        return self.original.device

    @property
    def ratios(self) -> dict[str, float | None]:
        a, b = self.original, self.pruned
        return {
            "speedup_p50": _ratio(a.latency_ms["p50"], b.latency_ms["p50"]),
            "speedup_mean": _ratio(a.latency_ms["mean"], b.latency_ms["mean"]),
            "speedup_p90": _ratio(a.latency_ms["p90"], b.latency_ms["p90"]),
            "throughput_ratio": _ratio(b.throughput_ips, a.throughput_ips),
            "size_ratio": _ratio(b.model["size_bytes"], a.model["size_bytes"]),
            "peak_rss_ratio": _ratio(b.memory_mb.get("peak_rss"), a.memory_mb.get("peak_rss")),
            "load_growth_ratio": _ratio(
                b.memory_mb.get("rss_growth_load"), a.memory_mb.get("rss_growth_load")
            ),
        }

    def headline(self) -> str:
        r = self.ratios
        speed = r["speedup_p50"]
        parts = [
            f"{self.device}: pruned is {speed:.2f}x faster at p50"
            if speed >= 1.0
            else f"{self.device}: pruned is {1.0 / speed:.2f}x SLOWER at p50"
        ]
        if r["size_ratio"] is not None:
            parts.append(f"{r['size_ratio']:.2f}x the file size")
        if r["peak_rss_ratio"] is not None:
            parts.append(f"{r['peak_rss_ratio']:.2f}x the peak memory")
        text = ", ".join(parts)
        if not self.original.representative:
            text += f" ({self.original.label})"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "ratios": self.ratios,
            "original": self.original.to_dict(),
            "pruned": self.pruned.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Comparison:
        return cls(Measurement.from_dict(data["original"]), Measurement.from_dict(data["pruned"]))


def measure_pair(
    original: str | os.PathLike,
    pruned: str | os.PathLike,
    profile: DeviceProfile | str,
    where: str = "local",
    spec: RunSpec | None = None,
    rounds: int = 1,
    **kwargs,
) -> Comparison:
    """Measure both models on one device (local, ssh or emulated) in one run.

    With `rounds` > 1 the two alternate in ABBA order (A B, B A, A B, ...) and each model's
    rounds are pooled, so a load that drifts during the run hits both models alike.
    """
    profile = load_profile(profile) if isinstance(profile, str) else profile
    if where == "local":
        from devices.local import run_local as run
    elif where == "ssh":
        from devices.ssh import run_ssh as run
    elif where == "emulated":
        from devices.emulation import run_emulated as run
    else:
        raise DeviceError(f"where must be local, ssh or emulated, got {where!r}")
    if rounds < 1:
        raise DeviceError(f"rounds must be >= 1, got {rounds}")
    runs: dict[str, list[Measurement]] = {"a": [], "b": []}
    for i in range(rounds):
        for which in "ab" if i % 2 == 0 else "ba":
            path = original if which == "a" else pruned
            runs[which].append(run(path, profile, spec, **kwargs))
    return Comparison(Measurement.merge(runs["a"]), Measurement.merge(runs["b"]))


def report_dict(comparisons: list[Comparison], estimates: list[Estimate] = ()) -> dict[str, Any]:
    for e in estimates:
        if not isinstance(e, Estimate):
            raise DeviceError(f"estimates must be Estimate records, got {type(e).__name__}")
    return {
        "schema": SCHEMA,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "headlines": [c.headline() for c in comparisons],
        "comparisons": [c.to_dict() for c in comparisons],
        "estimates": [e.to_dict() for e in estimates],
    }


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def _rows(c: Comparison) -> list[tuple[str, str, str, str]]:
    a, b = c.original, c.pruned
    rows = []
    for key in ("p50", "p90", "p99", "mean", "std"):
        rows.append(
            (
                f"latency {key} (ms)",
                _fmt(a.latency_ms[key], ".3f"),
                _fmt(b.latency_ms[key], ".3f"),
                _fmt(_ratio(a.latency_ms[key], b.latency_ms[key])),
            )
        )
    if a.cpu_ms and b.cpu_ms:
        rows.append(
            (
                "process CPU time p50 (ms)",
                _fmt(a.cpu_ms["p50"], ".3f"),
                _fmt(b.cpu_ms["p50"], ".3f"),
                _fmt(_ratio(a.cpu_ms["p50"], b.cpu_ms["p50"])),
            )
        )
    rows.append(
        (
            "throughput (inf/s)",
            _fmt(a.throughput_ips, ".1f"),
            _fmt(b.throughput_ips, ".1f"),
            _fmt(_ratio(b.throughput_ips, a.throughput_ips)),
        )
    )
    for key, name in (
        ("peak_rss", "peak RSS (MB)"),
        ("rss_growth_load", "RSS growth over load (MB)"),
    ):
        rows.append(
            (
                name,
                _fmt(a.memory_mb.get(key), ".1f"),
                _fmt(b.memory_mb.get(key), ".1f"),
                _fmt(_ratio(b.memory_mb.get(key), a.memory_mb.get(key))),
            )
        )
    rows.append(
        (
            "model file (KiB)",
            _fmt(a.model["size_bytes"] / 1024, ".1f"),
            _fmt(b.model["size_bytes"] / 1024, ".1f"),
            _fmt(_ratio(b.model["size_bytes"], a.model["size_bytes"])),
        )
    )
    rows.append(
        (
            "load time (ms)",
            _fmt(a.load_s * 1e3, ".1f"),
            _fmt(b.load_s * 1e3, ".1f"),
            _fmt(_ratio(b.load_s, a.load_s)),
        )
    )
    return rows


def _plots(comparisons: list[Comparison], folder: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(comparisons)
    fig, axes = plt.subplots(n, 1, figsize=(7, 2.8 * n), squeeze=False)
    for ax, c in zip(axes[:, 0], comparisons, strict=True):
        data = [c.original.samples_ms, c.pruned.samples_ms]
        ax.boxplot(data, orientation="horizontal", showfliers=True)
        ax.set_yticks([1, 2], ["original", "pruned"])
        ax.set_xlabel("latency per inference (ms)")
        title = c.device if c.original.representative else f"{c.device} [not representative]"
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(folder / "latency.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(5, 2.2 * n), 3.5))
    width = 0.38
    xs = range(n)
    for offset, name in ((-width / 2, "original"), (width / 2, "pruned")):
        values = [getattr(c, name).p50_ms for c in comparisons]
        bars = ax.bar([x + offset for x in xs], values, width * 0.95, label=name)
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
    ax.set_xticks(
        list(xs), [c.original.profile + "\n" + c.original.where for c in comparisons], fontsize=8
    )
    ax.set_ylabel("p50 latency (ms)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "bars.png", dpi=100)
    plt.close(fig)
    return {"latency_plot": "latency.png", "bars_plot": "bars.png"}


def markdown(data: dict[str, Any], comparisons: list[Comparison], estimates: list[Estimate]) -> str:
    lines = ["# fair-edge device report", ""]
    lines += [f"- **{h}**" for h in data["headlines"]] + [""]
    for c in comparisons:
        lines += [f"## {c.device}", ""]
        if not c.original.representative:
            lines += [f"> {c.original.label}: latency here says the model runs, not how fast.", ""]
        rt = c.original.runtime
        lines += [
            f"runtime {rt.get('name')} {rt.get('version')} ({', '.join(rt.get('providers_used', []))}), "
            f"{c.original.threads} threads, {c.original.runs} / {c.pruned.runs} timed runs after "
            f"{c.original.warmup} warm-up; machine {c.original.system.get('machine')}",
            "",
            "| | original | pruned | ratio |",
            "|---|---:|---:|---:|",
        ]
        lines += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} |" for r in _rows(c)]
        lines += [""]
    lines += ["![latency distribution](latency.png)", "", "![p50 before/after](bars.png)", ""]
    if estimates:
        lines += [
            "## Estimates (not measurements)",
            "",
            "| profile | model | estimate (ms) | bound | basis |",
            "|---|---|---:|---|---|",
        ]
        lines += [
            f"| {e.profile} | {e.model} | {e.latency_ms:.3f} | {e.bound} | {e.basis} |"
            for e in estimates
        ]
        lines += [""]
    return "\n".join(lines)


def html_page(
    data: dict[str, Any], comparisons: list[Comparison], estimates: list[Estimate]
) -> str:
    esc = html.escape
    body = ["<h1>fair-edge device report</h1>", "<ul>"]
    body += [f"<li><b>{esc(h)}</b></li>" for h in data["headlines"]] + ["</ul>"]
    for c in comparisons:
        body.append(f"<h2>{esc(c.device)}</h2>")
        if not c.original.representative:
            body.append(f"<p><i>{esc(c.original.label)}</i></p>")
        body.append("<table><tr><th></th><th>original</th><th>pruned</th><th>ratio</th></tr>")
        body += ["<tr>" + "".join(f"<td>{esc(x)}</td>" for x in r) + "</tr>" for r in _rows(c)]
        body.append("</table>")
    body += [
        '<img src="latency.png" alt="latency distribution">',
        '<img src="bars.png" alt="p50 bars">',
    ]
    if estimates:
        body.append(
            "<h2>Estimates (not measurements)</h2><table><tr><th>profile</th><th>model</th>"
            "<th>estimate (ms)</th><th>bound</th><th>basis</th></tr>"
        )
        body += [
            f"<tr><td>{esc(e.profile)}</td><td>{esc(e.model)}</td><td>{e.latency_ms:.3f}</td>"
            f"<td>{esc(e.bound)}</td><td>{esc(e.basis)}</td></tr>"
            for e in estimates
        ]
        body.append("</table>")
    style = "body{font-family:sans-serif;max-width:60em}td,th{padding:2px 8px;text-align:right}"
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>fair-edge report</title>"
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    )


def write_report(
    out_dir: str | os.PathLike,
    comparisons: Comparison | list[Comparison],
    estimates: list[Estimate] = (),
) -> dict[str, Path]:
    """Write report.json, report.md, report.html and the two plots into `out_dir` atomically."""
    comparisons = [comparisons] if isinstance(comparisons, Comparison) else list(comparisons)
    if not comparisons:
        raise DeviceError("a report needs at least one original/pruned comparison")
    estimates = list(estimates)
    data = report_dict(comparisons, estimates)
    out = Path(out_dir)
    with atomic_directory(out) as tmp:
        data["files"] = _plots(comparisons, tmp)
        atomic_write_text(tmp / "report.json", json.dumps(data, indent=2, sort_keys=True))
        atomic_write_text(tmp / "report.md", markdown(data, comparisons, estimates))
        atomic_write_text(tmp / "report.html", html_page(data, comparisons, estimates))
    return {
        name: out / name
        for name in ("report.json", "report.md", "report.html", "latency.png", "bars.png")
    }


def load_report(path: str | os.PathLike) -> tuple[list[Comparison], list[Estimate]]:
    """Read a report.json back into comparisons and estimates."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if data.get("schema") != SCHEMA:
        raise DeviceError(f"{path}: report schema {data.get('schema')!r} is not {SCHEMA!r}")
    comps = [Comparison.from_dict(c) for c in data["comparisons"]]
    ests = [Estimate(**e) for e in data["estimates"]]
    return comps, ests
