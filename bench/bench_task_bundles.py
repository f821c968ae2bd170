"""Every dense model family through the command line: `fair-edge deploy --task ...` writes a bundle.

Run: nice .venv/bin/python -m bench.bench_task_bundles [--families lraspp ...] [--out FILE]
Per family: the .npz data (bench/task_models.py: 16 synthetic images with masks or boxes), one
`fair-edge deploy` subprocess (30% FLOPs, rounded to the host profile's multiple, ONNX Runtime
only, 5 timed runs), then the bundle checked: manifest.json present and every file's SHA-256
matching it (`fair-edge report`), model.onnx passing onnx.checker and running in ONNX Runtime with
finite outputs, the surgery verification inside the bound.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.task_models import CLASSES, DET_SIZES, SEG_SIZE, YOLO_SIZE, write_det, write_seg

ROOT = Path(__file__).resolve().parent.parent
MODELS = "bench/task_models.py"
FAST = ["--target", "0.3", "--runtime", "onnx", "--runs", "5", "--warmup", "1", "--no-cache",
        "--quiet"]  # fmt: skip

# family -> (task, --model, --loss or None, data kind, input size)
FAMILIES: dict[str, tuple[str, str, str | None, str, int]] = {
    "lraspp": ("segmentation", f"{MODELS}:lraspp", None, "seg", SEG_SIZE),
    "deeplabv3": ("segmentation", f"{MODELS}:deeplabv3", None, "seg", SEG_SIZE),
    "fcn_resnet50": ("segmentation", f"{MODELS}:fcn_resnet50", None, "seg", SEG_SIZE),
    "ssdlite": ("detection", f"{MODELS}:ssdlite", f"{MODELS}:ssdlite_loss", "det",
                DET_SIZES["ssdlite320_mobilenet_v3_large"]),
    "fasterrcnn": ("detection", f"{MODELS}:fasterrcnn", f"{MODELS}:fasterrcnn_loss", "det",
                   DET_SIZES["fasterrcnn_mobilenet_v3_large_fpn"]),
    "retinanet": ("detection", f"{MODELS}:retinanet", f"{MODELS}:retinanet_loss", "det",
                  DET_SIZES["retinanet_resnet50_fpn"]),
    "tiny_yolo": ("detection", f"{MODELS}:tiny_yolo", "bench/yolo_tiny.py:yolo_loss", "det",
                  YOLO_SIZE),
}  # fmt: skip


def command(family: str, data: Path, out: Path) -> list[str]:
    task, model, loss, _, _ = FAMILIES[family]
    argv = ["deploy", "--task", task, "--model", model, "--num-classes", str(CLASSES), "--data",
            str(data), "--out", str(out)]  # fmt: skip
    return argv + (["--loss", loss] if loss else []) + FAST


def cli(argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = "import sys; from fair_edge.cli import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True)  # fmt: skip


def check_bundle(bundle: Path, x: np.ndarray) -> dict[str, Any]:
    """Manifest hashes, onnx.checker, an ONNX Runtime run, the surgery verification."""
    import onnx
    import onnxruntime as ort

    r = cli(["report", str(bundle)])
    manifest = (bundle / "manifest.json").is_file() and r.returncode == 0
    onnx.checker.check_model(str(bundle / "model.onnx"))
    sess = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {sess.get_inputs()[0].name: x[:1]})
    report = json.loads((bundle / "report.json").read_text())
    v = report["surgery"]["verification"]
    ratios = report["summary"]["ratios"]
    return {
        "manifest": manifest,
        "onnx_ok": all(np.isfinite(o).all() for o in outs),
        "outputs": len(outs),
        "verify": f"{v['max_abs_diff']:.2g} (bound {v['bound']:.2g}, max ref {v['max_abs_ref']:.2g})",
        "verified": v["max_abs_diff"] <= v["bound"],
        "flops": ratios.get("flops"),
        "params": ratios.get("params"),
    }


def run(family: str, work: Path) -> dict[str, Any]:
    task, _, _, kind, size = FAMILIES[family]
    data = work / f"{family}.npz"
    if kind == "seg":
        write_seg(data, size)
    else:
        write_det(data, size)
    out = work / family
    argv = command(family, data, out)
    t0 = time.perf_counter()
    r = cli(argv)
    wall = time.perf_counter() - t0
    shown = "fair-edge " + " ".join(argv).replace(str(work) + "/", "")
    row: dict[str, Any] = {"family": family, "task": task, "input": f"3x{size}x{size}",
                           "command": shown, "rc": r.returncode, "wall": wall}  # fmt: skip
    if r.returncode != 0:
        row["error"] = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        return row
    bundle = next(p for p in out.iterdir() if p.is_dir())
    row.update(check_bundle(bundle, np.load(data)["x"]))
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", nargs="*", default=list(FAMILIES))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            row = run(family, Path(tmp))
            print(row, flush=True)
            rows.append(row)
    lines = [
        f"host: {platform.machine()}, Python {platform.python_version()}, "
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, "
        f"load average {os.getloadavg()[0]:.1f}",
        "",
        "| family | task | input | exit | bundle written (manifest + hashes) | model.onnx checker + "
        "ORT run | surgery max abs diff | FLOPs / params ratio | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["rc"] != 0:
            lines.append(f"| {r['family']} | {r['task']} | {r['input']} | {r['rc']} | no: "
                         f"{r['error']} | - | - | - | {r['wall']:.0f} |")  # fmt: skip
            continue
        lines.append(
            f"| {r['family']} | {r['task']} | {r['input']} | 0 | "
            f"{'yes' if r['manifest'] else 'NO'} | {'ok' if r['onnx_ok'] else 'NOT FINITE'} "
            f"({r['outputs']} outputs) | {r['verify']}{'' if r['verified'] else ' FAILED'} | "
            f"{r['flops']:.3f} / {r['params']:.3f} | {r['wall']:.0f} |"
        )
    lines += ["", "Commands (data written by bench/task_models.py, 16 images):", ""]
    lines += [f"    {r['command']}" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
