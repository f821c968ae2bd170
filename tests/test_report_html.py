"""The deploy report as a person sees it: report.md and report.html come from one template
context, and Debian's chromium renders the HTML (DOM and screenshot) with the same sections."""

from __future__ import annotations

import html
import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu"]


def _chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail(
            "chromium is not installed: the report tests open report.html in Debian's headless "
            "chromium; run `make system-deps` (or `apt-get install -y chromium`)"
        )
    return path


class _Headings(HTMLParser):
    """h1/h2 texts and the text inside them, entities decoded."""

    def __init__(self) -> None:
        super().__init__()
        self.headings: list[str] = []
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag in ("h1", "h2"):
            self._in = tag
            self.headings.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == self._in:
            self._in = None

    def handle_data(self, data: str) -> None:
        if self._in:
            self.headings[-1] += data


def _md_headings(md: str) -> list[str]:
    return [line.lstrip("#").strip() for line in md.splitlines() if line.startswith(("# ", "## "))]


def _html_headings(page: str) -> list[str]:
    p = _Headings()
    p.feed(page)
    return [h.strip() for h in p.headings]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("deploy")
    proc = subprocess.run(
        [sys.executable, "-m", "fair_edge.cli", "deploy", "--runtime", "onnx", "--runs", "3",
         "--warmup", "1", "--eval-samples", "300", "--recover-steps", "5", "--out", str(out),
         "--quiet"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (found,) = [p.parent for p in out.glob("*/report.html")]
    return found


def _run_browser(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [_chromium(), *BROWSER_ARGS, *args], capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_markdown_and_html_have_the_same_sections(bundle: Path) -> None:
    md = (bundle / "report.md").read_text()
    page = (bundle / "report.html").read_text()
    md_titles, html_titles = _md_headings(md), _html_headings(page)
    assert md_titles == html_titles  # same sections, same order
    assert len(set(md_titles)) == len(md_titles)  # no two sections share a title
    assert md_titles[0] == "fair-edge deploy: smallcnn on host"
    for title in ("Top-1 accuracy at each step", "Recovery", "Notes", "Latency — ONNX Runtime"):
        assert any(t.startswith(title) for t in md_titles), (title, md_titles)
    latency = [t for t in md_titles if t.startswith("Latency — ")]
    assert latency and all(("ONNX Runtime" in t) or ("TFLite" in t) for t in latency)
    # the JSON report is untouched by the templates
    data = json.loads((bundle / "report.json").read_text())
    assert data["device_report"]["schema"] == "fair-edge.report/1"
    assert data["device_report"]["files"] == {
        "latency_plot": "latency.png",
        "bars_plot": "bars.png",
    }


def test_chromium_renders_accuracy_runtime_and_notes(bundle: Path) -> None:
    report = json.loads((bundle / "report.json").read_text())
    summary = report["summary"]
    rt = report["device_report"]["comparisons"][0]["original"]["runtime"]
    dom = _run_browser("--dump-dom", (bundle / "report.html").as_uri()).stdout
    assert '<table class="accuracy">' in dom  # chromium normalises the quotes
    headings = _html_headings(dom)
    want = f"Latency — ONNX Runtime {rt['version']} ({', '.join(rt['providers_used'])}), host"
    assert want in headings, headings
    assert any(h.startswith("Top-1 accuracy at each step") for h in headings)
    assert "Notes" in headings and "Recovery" in headings
    for stage, value in summary["accuracy_stages"].items():
        assert (
            f'<td class="l">{html.escape(stage, quote=False)}</td><td class="r">{value:.4f}</td>'
            in dom
        )
    for note in summary["notes"]:
        assert f"<li>{html.escape(note, quote=False)}</li>" in dom, note
    assert summary["recovery"]["data"]["train"] in dom
    assert 'alt="latency distribution, original vs pruned — ONNX Runtime' in dom


def test_chromium_screenshot_is_not_blank(bundle: Path, tmp_path: Path) -> None:
    from PIL import Image

    png = tmp_path / "report.png"
    _run_browser(
        f"--screenshot={png}", "--window-size=1200,2000", (bundle / "report.html").as_uri()
    )
    assert png.is_file() and png.stat().st_size > 10_000
    pixels = np.asarray(Image.open(png).convert("L"), dtype=np.float64)
    assert pixels.shape == (2000, 1200)
    assert pixels.std() > 5.0  # text, tables and plots, not a blank page
    assert (pixels < 128).mean() > 0.005  # some dark ink (text) on the page
