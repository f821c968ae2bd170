"""Models beyond classifiers: segmentation and detection, scored, planned, pruned, verified, timed.

Run: nice .venv/bin/python -m bench.bench_tasks [--models lraspp ...] [--runs 30] [--out FILE]
Per model: weights=None with seeded init, BatchNorm statistics set from the calibration images
(train-mode forward, no weight change) so activations are O(1); dense FAIR scores (U per
position against the task's targets, R from the task loss) on 16 synthetic images; a FAIR plan
removing 30% of FLOPs (pipeline.planning.plan_for_budget, no rounding); ONNX surgery verified
against the masked original on the calibration images plus a random batch; both graphs
simplified (BatchNorm folded) and timed by ONNX Runtime CPU, original and pruned in one run
(devices.report.measure_pair, 3 alternating rounds). Detectors are exported up to their raw head
outputs (no anchors decoding, no NMS: torchvision's compiled ops are not available here) and
scored with torchvision's own training loss on those outputs (pipeline.detection_loss; for
Faster R-CNN the region proposal network's).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.yolo_tiny import TinyYolo, yolo_loss
from devices.profile import load_profile
from devices.report import measure_pair
from devices.runspec import RunSpec
from exporters.costs import OnnxCostModel, count_cost
from exporters.graph_groups import find_groups
from exporters.onnx_export import export_onnx
from exporters.surgery import apply_plan, save_model
from fair_edge.deploy import simplify_file
from pipeline.detection_loss import raw_head_loss
from pipeline.planning import plan_for_budget
from pipeline.rounding import round_plan
from pipeline.scoring import score
from pipeline.zoo import torchvision_dense_model

N_IMAGES = 16


def seg_data(size: int, classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images with class-coloured rectangles, and their masks."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N_IMAGES, 3, size, size)).astype(np.float32)
    m = np.zeros((N_IMAGES, size, size), np.int64)
    for i in range(N_IMAGES):
        for _ in range(3):
            r, c = rng.integers(0, size * 3 // 4, 2)
            h, w = rng.integers(size // 8, size // 2, 2)
            k = int(rng.integers(1, classes))
            m[i, r : r + h, c : c + w] = k
            x[i, k % 3, r : r + h, c : c + w] += 1.5
    return torch.from_numpy(x), torch.from_numpy(m)


def det_data(size: int, classes: int, seed: int = 0) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N_IMAGES, 3, size, size)).astype(np.float32)
    targets = []
    for i in range(N_IMAGES):
        boxes, labels = [], []
        for _ in range(int(rng.integers(1, 4))):
            x1, y1 = rng.uniform(0, size * 0.6, 2)
            w, h = rng.uniform(size * 0.1, size * 0.4, 2)
            boxes.append([x1, y1, min(size, x1 + w), min(size, y1 + h)])
            labels.append(int(rng.integers(1, classes)))
            x[i, labels[-1] % 3, int(y1) : int(y1 + h), int(x1) : int(x1 + w)] += 1.5
        targets.append(
            {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)}
        )
    return torch.from_numpy(x), targets


def settle_bn(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """BatchNorm running statistics from the calibration images (cumulative average)."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for s in range(0, len(x), 8):
            model(x[s : s + 8])
    return model.eval()


def models() -> dict[str, Callable[[], tuple[torch.nn.Module, str, Any, Any, int]]]:
    """name -> () -> (model, task, (inputs, targets), loss, input size)."""

    def seg(name: str, size: int = 128, classes: int = 5):
        def make():
            return (torchvision_dense_model(name, "segmentation", classes), "segmentation",
                    seg_data(size, classes), None, size)  # fmt: skip

        return make

    def det(name: str, size: int, classes: int = 5):
        def make():
            return (torchvision_dense_model(name, "detection", classes), "detection",
                    det_data(size, classes), raw_head_loss(name, classes, size), size)  # fmt: skip

        return make

    def yolo():
        size, classes = 160, 4
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = TinyYolo(classes=classes)
        return model, "detection", det_data(size, classes), yolo_loss, size

    return {
        "lraspp_mobilenet_v3_large": seg("lraspp_mobilenet_v3_large"),
        "deeplabv3_mobilenet_v3_large": seg("deeplabv3_mobilenet_v3_large"),
        "fcn_resnet50": seg("fcn_resnet50"),
        "ssdlite320_mobilenet_v3_large": det("ssdlite320_mobilenet_v3_large", 320),
        "fasterrcnn_mobilenet_v3_large_fpn": det("fasterrcnn_mobilenet_v3_large_fpn", 320),
        "retinanet_resnet50_fpn": det("retinanet_resnet50_fpn", 256),
        "tiny_yolo (C2f, 3 scales)": yolo,
    }


def _held(groups: list[Any]) -> str:
    kinds = Counter()
    for g in groups:
        if not g.frozen:
            continue
        r = g.reason
        if r.startswith("output head"):
            kinds["output head"] += 1
        elif "torch.chunk" in r:
            kinds["chunk split"] += 1
        elif "different channel layouts" in r:
            kinds["residual on a split half"] += 1
        else:
            kinds[r[:60]] += 1
    return ", ".join(f"{k}: {v}" for k, v in kinds.items()) or "none"


def run(name: str, make: Callable[[], Any], runs: int, work: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    model, task, (x, targets), loss, size = make()
    settle_bn(model, x)
    t1 = time.perf_counter()
    scores = score(model, (x, targets), task=task, loss=loss, samples_per_class=64,
                   progress=False, batch_size=8)  # fmt: skip
    t2 = time.perf_counter()
    proto = export_onnx(model, x[:1], None)
    groups = find_groups(proto)
    plan = plan_for_budget(scores, 0.3, "flops", cost=OnnxCostModel(proto), groups=groups,
                           model=model)  # fmt: skip
    profile = load_profile("host")
    rounded = round_plan(plan, scores, profile.channel_multiple, mode="nearest", groups=groups,
                         cost=OnnxCostModel(proto))  # fmt: skip
    pruned, report = apply_plan(proto, plan, verify_inputs=x[:8].numpy())
    pruned_r, report_r = apply_plan(proto, rounded, verify_inputs=x[:8].numpy())
    t3 = time.perf_counter()
    files = {}
    for key, graph in (("o", proto), ("p", pruned), ("r", pruned_r)):
        raw = work / f"{key}.raw.onnx"
        save_model(graph, raw)
        files[key] = work / f"{key}.onnx"
        simplify_file(raw, files[key], x[:4].numpy())
    co, cp, cr = count_cost(proto), count_cost(pruned), count_cost(pruned_r)
    spec = RunSpec(warmup=3, runs=runs)
    cmp = measure_pair(files["o"], files["p"], profile, "local", spec, rounds=3)
    cmp_r = measure_pair(files["o"], files["r"], profile, "local", spec, rounds=3)
    v = max(
        report.verification, report_r.verification, key=lambda d: d["max_abs_diff"] / d["bound"]
    )
    return {
        "model": name,
        "task": task,
        "input": f"3x{size}x{size}",
        "groups": f"{sum(not g.frozen for g in groups)} / {len(groups)}",
        "held": _held(groups),
        "verify": f"{v['max_abs_diff']:.2g} (bound {v['bound']:.2g}, max ref {v['max_abs_ref']:.2g})",
        "params_removed": 1 - cp.params / co.params,
        "flops_removed": 1 - cp.flops / co.flops,
        "p50": (cmp.original.p50_ms, cmp.pruned.p50_ms),
        "multiple": profile.channel_multiple,
        "rounded": (1 - cr.params / co.params, 1 - cr.flops / co.flops),
        "p50_r": (cmp_r.original.p50_ms, cmp_r.pruned.p50_ms),
        "times": (t1 - t0, t2 - t1, t3 - t2),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    table = models()
    names = args.models or [n for n in table if n not in ("fcn_resnet50", "retinanet_resnet50_fpn")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            r = run(name, table[name], args.runs, Path(tmp))
            print(r, flush=True)
            rows.append(r)
    lines = [
        f"host: {platform.machine()}, {platform.python_version()}, "
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        "",
        "| model | task | input | groups prunable / all | held (why) | surgery max abs diff | "
        "params / FLOPs removed | ORT CPU p50 original -> pruned (ms) | "
        "rounded to the host multiple: params / FLOPs removed | p50 original -> pruned (ms) | "
        "score s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        o, p = r["p50"]
        ro, rp = r["p50_r"]
        lines.append(
            f"| {r['model']} | {r['task']} | {r['input']} | {r['groups']} | {r['held']} | "
            f"{r['verify']} | {r['params_removed']:.1%} / {r['flops_removed']:.1%} | "
            f"{o:.2f} -> {p:.2f} ({o / p:.2f}x) | (x{r['multiple']}) {r['rounded'][0]:.1%} / "
            f"{r['rounded'][1]:.1%} | {ro:.2f} -> {rp:.2f} ({ro / rp:.2f}x) | {r['times'][1]:.0f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
