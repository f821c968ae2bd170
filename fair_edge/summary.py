"""The deploy report's text, built from the run's summary dict (one source for JSON, Markdown
and HTML), and the record of which data every figure came from.
"""

from __future__ import annotations

from typing import Any

from fair_edge.config import Options
from fair_edge.inputs import MIN_SPLIT, Inputs


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def summary_title(summary: dict[str, Any]) -> str:
    return f"fair-edge deploy: {summary['model']} on {summary['device']}"


def summary_sections(summary: dict[str, Any], runtime: str | None = None) -> list[dict[str, Any]]:
    """The report's lead as sections (both report.md and report.html render them): ratios first
    (latency, memory, size, FLOPs, accuracy), then accuracy at each step, recovery, the accuracy
    budget, variants and notes. runtime: what the latency ratio was measured with."""
    from devices.report import bullets, image, para, section, table

    r = summary["ratios"]
    m = summary["metrics"]
    on = f", {runtime}" if runtime else ""
    speed = f"{_fmt(r['latency_speedup'], '.2f')}x" + (
        " (a slowdown)" if (r["latency_speedup"] or 1.0) < 1.0 else ""
    )
    ratio_rows = [
        (f"latency speed-up (p50, original / pruned{on})", speed),
        ("peak memory (pruned / original)", _fmt(r["memory"], ".3f")),
        ("model file size (pruned / original)", _fmt(r["size"], ".3f")),
        ("FLOPs (pruned / original)", _fmt(r["flops"], ".3f")),
        ("parameters (pruned / original)", _fmt(r["params"], ".3f")),
        ("top-1 accuracy change (points)", _fmt(r["accuracy_change_points"], "+.2f")),
    ]
    metric_rows = [
        (f"latency p50 (ms{on})", _fmt(m["latency_p50_ms"][0]), _fmt(m["latency_p50_ms"][1])),
        ("peak RSS (MB)", _fmt(m["peak_rss_mb"][0], ".1f"), _fmt(m["peak_rss_mb"][1], ".1f")),
        ("file size (bytes)", f"{m['size_bytes'][0]:,}", f"{m['size_bytes'][1]:,}"),
        ("FLOPs", f"{m['flops'][0]:,}", f"{m['flops'][1]:,}"),
        ("parameters", f"{m['params'][0]:,}", f"{m['params'][1]:,}"),
        (
            f"top-1 accuracy ({summary['accuracy_on']})",
            _fmt(m["accuracy"][0], ".4f"),
            _fmt(m["accuracy"][1], ".4f"),
        ),
    ]
    warnings = summary.get("warnings") or []
    out = [section("Warnings", bullets(warnings, strong=True), cls="warnings")] if warnings else []
    out += [
        section(
            None,
            para(
                f"Measured {summary['measured_where']} ({summary['measured_why']}); original and "
                "pruned timed back to back in one run."
                + (
                    ""
                    if summary.get("representative", True)
                    else " Latency under emulation is NOT representative of the board; sizes, "
                    "FLOPs and accuracy are."
                )
            ),
            table(["ratio (pruned vs original)", "value"], ratio_rows, "ratios", "lr"),
            table(["", "original", "pruned"], metric_rows, "metrics"),
            cls="lead",
        )
    ]
    stages = summary.get("accuracy_stages") or {}
    if stages:
        out.append(
            section(
                f"Top-1 accuracy at each step, on {summary['accuracy_on']}",
                table(
                    ["model", "top-1"], [(k, _fmt(v, ".4f")) for k, v in stages.items()], "accuracy"
                ),  # fmt: skip
                cls="accuracy",
            )
        )
    rec = summary.get("recovery")
    if rec and "rounds" not in rec:
        out.append(
            section(
                "Recovery",
                para(
                    f"Recovery: {rec['steps']} steps ({rec['config']['optimizer']}, lr "
                    f"{rec['config']['lr']:g}, batch {rec['config']['batch_size']}) on "
                    f"{rec['data']['train']} ({rec['data']['train_samples']} samples); held-out: "
                    f"{rec['data']['heldout']}; {rec['samples_per_second']:.0f} samples/s"
                    + (" (cached)" if rec.get("cached") else "")
                ),
                cls="recovery",
            )
        )
    elif rec:
        out.append(
            section(
                "Recovery rounds",
                bullets(
                    [
                        f"round {x['round']}: FLOPs kept {x['flops_kept']:.3f} (target "
                        f"{x['flops_kept_target']:.3f}), held-out top-1 "
                        f"{_fmt(x['heldout_after'], '.4f')}"
                        for x in rec["rounds"]
                    ]
                ),
                cls="recovery",
            )
        )
    trade = summary.get("tradeoff")
    if trade:
        out.append(
            section(
                "Accuracy budget",
                para(
                    f"Accuracy budget: at most {trade['max_drop']} points lost ({trade['fix']}, "
                    f"on {trade['heldout']}); every plan tried:"
                ),
                table(
                    ["target", "FLOPs removed", "top-1", "points lost", "within budget"],
                    [
                        (
                            f"{p['target']:.3f}",
                            f"{p['flops_removed']:.3f}",
                            _fmt(p["accuracy"], ".4f"),
                            f"{p['drop_points']:.2f}",
                            "yes" if p["ok"] else "no",
                        )
                        for p in trade["points"]
                    ],
                    "tradeoff",
                ),
                image("tradeoff.png", "accuracy against FLOPs"),
                cls="tradeoff",
            )
        )
    variants = summary.get("variants") or []
    if variants:
        out.append(
            section(
                "Variants",
                bullets(
                    [
                        f"{v['file']}: {v['kind']}, top-1 {_fmt(v.get('accuracy'), '.4f')} "
                        f"(change vs pruned fp32 {_fmt(v.get('accuracy_change_points'), '+.2f')} "
                        f"points), {v['size_bytes']:,} bytes"
                        for v in variants
                    ]
                ),
                cls="variants",
            )
        )
    data = summary.get("data")
    if data:
        out.append(section("Data", bullets(data_lines(data)), cls="data"))
    notes = summary.get("notes") or []
    if notes:
        out.append(section("Notes", bullets([str(n) for n in notes]), cls="notes"))
    return out


def data_record(
    opts: Options, inp: Inputs, acc_orig: float | None, scored: bool
) -> tuple[dict[str, Any], list[str]]:
    """Which data every figure came from, and the warnings about it (short classes, chance)."""
    from fair_edge.data_checks import chance_level, chance_warning, scoring_sample, short_warning

    ev = inp.evaluation
    record: dict[str, Any] = {
        "calibration": {"source": inp.calibration.source, "samples": len(inp.calibration),
                        "labels": inp.calibration.label_source},
        "scoring": scoring_sample(inp.calibration, opts.samples_per_class, opts.seed)
        if scored else None,
        "evaluation": {"source": ev.source, "samples": len(ev), "labels": ev.label_source,
                       "chance": chance_level(ev), "is_calibration": inp.eval_is_calibration},
        "preprocessing": inp.calibration.preprocessing.to_json(),
    }  # fmt: skip
    warnings = [w for w in (short_warning(record["scoring"]) if scored else None,
                            chance_warning(acc_orig, ev)) if w]  # fmt: skip
    if inp.eval_is_calibration and ev.labels is not None:
        warnings.append(
            f"accuracy is measured on the {len(ev)} calibration samples themselves (too few to hold "
            f"{MIN_SPLIT // 5} out): give --eval-data, or more labelled data"
        )
    return record, warnings


def data_lines(data: dict[str, Any]) -> list[str]:
    """The report's Data section: what each figure was measured on."""
    cal, ev, sc, pre = (
        data["calibration"],
        data["evaluation"],
        data["scoring"],
        data["preprocessing"],
    )
    lines = [
        f"calibration data: {cal['source']}, {cal['samples']} samples (labels: {cal['labels']})"
    ]
    if sc is not None:
        short = f"; short classes: {', '.join(f'{k}={v}' for k, v in sc['short'].items())}" if sc[
            "short"] else ""  # fmt: skip
        lines.append(
            f"scoring used {sc['samples']} of them ({sc['per_class']} per class asked, labels: "
            f"{sc['labels']}){short}"
        )
    chance = "n/a" if ev["chance"] is None else format(ev["chance"], ".4f")
    lines.append(
        f"every top-1 figure: {ev['source']}, {ev['samples']} samples (labels: {ev['labels']}; "
        f"chance {chance})"
    )
    size = "x".join(map(str, pre["resize"])) if pre.get("resize") else "as stored"
    lines.append(
        f"preprocessing (also in manifest.json): size {size} ({pre.get('resize_mode', 'stretch')}), "
        f"channels {pre.get('channels') or 'as stored'}, scale {pre['scale']:.6g}, mean "
        f"{pre['mean']}, std {pre['std']}, layout {pre['layout']}"
    )
    return lines
