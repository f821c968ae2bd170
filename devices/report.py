"""Before/after reports: original vs pruned, measured on the same device in one run.

Writes report.json (schema-versioned), report.md and report.html with two plots (latency
distribution, before/after bars). Every page leads with the ratios. Estimates, when given, go in
a separate, labelled section and are never put in a ratio with a measurement.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
import re
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


RUNTIME_NAMES = {"onnxruntime": "ONNX Runtime", "tflite": "TFLite", "trtexec": "TensorRT trtexec"}
TEMPLATES = Path(__file__).parent / "templates"


def runtime_label(m: Measurement, full: bool = True) -> str:
    """The runtime a measurement ran on, as headings and plots name it.

    full: "ONNX Runtime 1.20.1 (CPUExecutionProvider)", "TFLite (ai-edge-litert 2.3.0)";
    short: "ONNX Runtime 1.20.1", "TFLite 2.3.0".
    """
    rt = m.runtime or {}
    raw = str(rt.get("name") or "unknown runtime")
    name = RUNTIME_NAMES.get(raw, raw)
    version = rt.get("version")
    if not full:
        return f"{name} {version}" if version else name
    if raw == "tflite":
        return f"{name} ({rt.get('package') or 'tflite'} {version or 'unknown'})"
    providers = ", ".join(rt.get("providers_used") or [])
    text = f"{name} {version}" if version else name
    return f"{text} ({providers})" if providers else text


def section_labels(comparisons: list[Comparison], full: bool = True) -> list[str]:
    """Each comparison's runtime label; where two share one (fp32 and a variant on the same
    runtime), the pruned file's name and precision tell them apart."""
    labels = [runtime_label(c.original, full) for c in comparisons]
    out = []
    for label, c in zip(labels, comparisons, strict=True):
        if labels.count(label) > 1:
            rt = c.pruned.runtime or {}
            trt = any("Tensorrt" in p for p in rt.get("providers_used") or [])
            label += f", {c.pruned.model['name']}"
            label += f" at TensorRT {rt['precision']}" if trt and rt.get("precision") else ""
        out.append(label)
    return out


def gpu_lines(c: Comparison) -> list[str]:
    """What the GPU path did: providers asked for and missing, which provider ran each node,
    TensorRT precision, the engine cache and the first run (where the engine is built)."""
    lines = []
    for name, m in (("original", c.original), ("pruned", c.pruned)):
        rt = m.runtime or {}
        if rt.get("name") not in ("onnxruntime", "trtexec"):
            continue
        parts = []
        placement = rt.get("placement")
        if placement:
            ran = ", ".join(f"{p} {n}" for p, n in sorted(placement["by_provider"].items()))
            parts.append(f"nodes run by provider: {ran}")
        if rt.get("providers_missing"):
            parts.append(f"missing here (fell back): {', '.join(rt['providers_missing'])}")
        ran_trt = rt.get("name") == "trtexec" or any(
            "Tensorrt" in p for p in rt.get("providers_used") or []
        )
        if ran_trt:
            parts.append(f"TensorRT precision {rt.get('precision')}")
        cache = rt.get("engine_cache")
        if cache:
            state = "reused" if cache.get("reused") else "built this run"
            parts.append(f"engine cache {cache['path']} ({state})")
        if rt.get("first_run_s") is not None:
            why = ", TensorRT builds or loads its engine here" if ran_trt else ""
            parts.append(f"first run {rt['first_run_s'] * 1e3:.1f} ms (not in the latency{why})")
        summary = rt.get("summary") or {}
        gpu = (summary.get("sections") or {}).get("GPU Compute Time")
        if gpu:
            parts.append(f"trtexec GPU compute median {gpu.get('median'):.3f} ms")
        if parts:
            lines.append(f"{name}: " + "; ".join(parts))
    return lines


def _where(c: Comparison) -> str:
    m = c.original
    return m.profile if m.where == "local" else f"{m.profile}, {m.where}"


# Blocks of a section; both templates render each kind, so Markdown and HTML carry the same
# sections with the same content.
def para(text: str) -> dict[str, Any]:
    return {"kind": "p", "text": text}


def quote(text: str) -> dict[str, Any]:
    return {"kind": "quote", "text": text}


def bullets(entries: list[str], strong: bool = False) -> dict[str, Any]:
    return {"kind": "list", "entries": list(entries), "strong": strong}


def table(header: list[str], rows: list[Any], cls: str, align: str | None = None) -> dict[str, Any]:
    """align: one letter per column, l or r (default: first column left, the rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    return {
        "kind": "table",
        "header": list(header),
        "rows": [list(r) for r in rows],
        "cls": cls,
        "align": align,
    }


def image(src: str, alt: str) -> dict[str, Any]:
    return {"kind": "img", "src": src, "alt": alt}


def section(title: str | None, *blocks: dict[str, Any], cls: str = "") -> dict[str, Any]:
    return {"title": title, "blocks": [b for b in blocks if b], "cls": cls}


def device_sections(
    comparisons: list[Comparison], estimates: list[Estimate] = (), lead: bool = True
) -> list[dict[str, Any]]:
    """The device report's sections: headlines, one latency section per runtime, the plots and
    the estimates. lead: the headlines open the page (no heading of their own)."""
    out = [
        section(
            None if lead else "Measured pairs (original vs pruned)",
            bullets([c.headline() for c in comparisons], strong=True),
            cls="headlines",
        )
    ]
    for c, label in zip(comparisons, section_labels(comparisons), strict=True):
        a, b = c.original, c.pruned
        gpu = gpu_lines(c)
        out.append(
            section(
                f"Latency — {label}, {_where(c)}",
                None
                if a.representative
                else quote(f"{a.label}: latency here says the model runs, not how fast."),
                para(
                    f"runtime {runtime_label(a)}, {a.threads} threads, {a.runs} / {b.runs} "
                    f"timed runs after {a.warmup} warm-up; device {c.device}, machine "
                    f"{a.system.get('machine')}"
                ),
                table(["", "original", "pruned", "ratio"], _rows(c), "measurements"),
                bullets(gpu) if gpu else None,
                cls="runtime",
            )
        )
    names = ", ".join(dict.fromkeys(runtime_label(c.original, full=False) for c in comparisons))
    out.append(
        section(
            f"Latency plots — {names}",
            image("latency.png", f"latency distribution, original vs pruned — {names}"),
            image("bars.png", f"p50 latency before/after — {names}"),
            cls="plots",
        )
    )
    if estimates:
        out.append(
            section(
                "Estimates (not measurements)",
                table(
                    ["profile", "model", "estimate (ms)", "bound", "basis"],
                    [
                        (e.profile, e.model, f"{e.latency_ms:.3f}", e.bound, e.basis)
                        for e in estimates
                    ],
                    "estimates",
                    align="llrll",
                ),
                cls="estimates",
            )
        )
    return out


def report_context(title: str, sections: list[dict[str, Any]]) -> dict[str, Any]:
    """The one context both templates render: a title and a list of sections."""
    titles = [s["title"] for s in sections if s["title"]]
    dup = sorted({t for t in titles if titles.count(t) > 1})
    if dup:
        raise DeviceError(f"report sections share a title: {dup}")
    return {"title": title, "sections": sections}


def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _md_row(cells: list[Any]) -> str:
    return "| " + " | ".join(_md_cell(c) for c in cells) + " |"


def _md_align(align: str) -> str:
    return "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"


@functools.cache
def _environment(fmt: str) -> Any:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=fmt == "html",
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["md_row"] = _md_row
    env.filters["md_align"] = _md_align
    return env


def render(context: dict[str, Any], fmt: str) -> str:
    """Render the report context as "md" (report.md.j2) or "html" (report.html.j2)."""
    if fmt not in ("md", "html"):
        raise DeviceError(f"report format must be md or html, got {fmt!r}")
    text = _environment(fmt).get_template(f"report.{fmt}.j2").render(**context)
    if fmt == "md":
        text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip() + "\n"


def _plots(comparisons: list[Comparison], folder: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(comparisons)
    fig, axes = plt.subplots(n, 1, figsize=(7, 2.8 * n), squeeze=False)
    labels = section_labels(comparisons)
    for ax, c, label in zip(axes[:, 0], comparisons, labels, strict=True):
        data = [c.original.samples_ms, c.pruned.samples_ms]
        ax.boxplot(data, orientation="horizontal", showfliers=True)
        ax.set_yticks([1, 2], ["original", "pruned"])
        ax.set_xlabel("latency per inference (ms)")
        title = f"{label} — {c.device}"
        if not c.original.representative:
            title += " [not representative]"
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
        list(xs),
        [
            f"{label}\n{c.original.profile} {c.original.where}"
            for c, label in zip(comparisons, section_labels(comparisons, False), strict=True)
        ],
        fontsize=8,
    )
    names = ", ".join(dict.fromkeys(runtime_label(c.original, full=False) for c in comparisons))
    ax.set_title(f"p50 latency, original vs pruned — {names}", fontsize=9)
    ax.set_ylabel("p50 latency (ms)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "bars.png", dpi=100)
    plt.close(fig)
    return {"latency_plot": "latency.png", "bars_plot": "bars.png"}


def markdown(data: dict[str, Any], comparisons: list[Comparison], estimates: list[Estimate]) -> str:
    ctx = report_context("fair-edge device report", device_sections(comparisons, estimates))
    return render(ctx, "md")


def html_page(
    data: dict[str, Any], comparisons: list[Comparison], estimates: list[Estimate]
) -> str:
    ctx = report_context("fair-edge device report", device_sections(comparisons, estimates))
    return render(ctx, "html")


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
