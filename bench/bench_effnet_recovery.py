"""EfficientNet-Lite0 (ImageNet weights), label-free recovery on the photos available offline.

    nice -n 5 .venv/bin/python -m bench.bench_effnet_recovery [--targets 0.2,0.3] [--steps 60]

No labelled ImageNet data ships with any installed package. Training images: augmented crops of
the photos scikit-learn and scikit-image bundle (bench.accuracy_effnet.augmented, seed 2), no
labels: recovery is distillation from the unpruned model alone. Scoring: 160 crops (seed 0)
pseudo-labelled by the unpruned model, as bench.accuracy_effnet does. Held-out: 100 other crops
(seed 1): top-1 and top-5 agreement with the unpruned model (its top-1 in the pruned model's
top-1 / top-5), before recovery (BatchNorm re-estimated) and after. FAIR plans rounded to 8.
Writes bench/RESULTS-effnet-recovery.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from bench.accuracy_effnet import IMAGENET, augmented, bundled_photos
from calibration.data import CalibrationSet
from calibration.pseudo_labels import agreement, pseudo_label
from exporters.bn_recal import recalibrate_bn
from exporters.costs import OnnxCostModel
from exporters.graph_groups import find_groups
from exporters.onnx_export import export_onnx
from exporters.torch_prune import prune_torch
from pipeline.planning import plan_for_budget
from pipeline.recovery import RecoveryConfig, recover
from pipeline.rounding import round_plan
from pipeline.scoring import score
from pipeline.train import predict
from pipeline.zoo import efficientnet_lite0

ROOT = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="0.2,0.3")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--train", type=int, default=480)
    args = ap.parse_args()
    torch.set_num_threads(2)
    photos = bundled_photos()
    model = efficientnet_lite0().eval()
    calib = CalibrationSet(IMAGENET.apply(augmented(photos, 160, seed=0)), preprocessing=IMAGENET,
                           source="bundled-photos+aug")  # fmt: skip
    labelled = pseudo_label(calib, model, batch_size=32)
    counts = np.bincount(labelled.labels, minlength=1000)
    cs = labelled.subset(counts[labelled.labels] >= 2)
    scores = score(model, cs, samples_per_class=8, where="raw", seed=0, progress=False,
                   batch_size=16)  # fmt: skip
    held_x = IMAGENET.apply(augmented(photos, 100, seed=1))
    ref = predict(model, held_x, 25)
    held = CalibrationSet(held_x, labels=ref.argmax(1).astype(np.int64),
                          source="100 held-out crops, labelled by the unpruned model")  # fmt: skip
    train = CalibrationSet(IMAGENET.apply(augmented(photos, args.train, seed=2)),
                           source=f"{args.train} augmented crops, no labels")  # fmt: skip
    x1 = torch.from_numpy(held_x[:1])
    proto = export_onnx(model, x1, None)
    groups, cost = find_groups(proto), OnnxCostModel(proto)
    rows = []
    for t in (float(v) for v in args.targets.split(",")):
        p = round_plan(plan_for_budget(scores, t, "flops", cost, groups, model, strict=False),
                       scores, 8, "nearest", groups=groups)  # fmt: skip
        student = recalibrate_bn(prune_torch(model, p, x1, proto), calib.inputs)[0]
        before = predict(student, held_x, 25)
        t0 = time.perf_counter()
        r = recover(student, model, train, held,
                    RecoveryConfig(steps=args.steps, batch_size=args.batch, augment="none"),
                    progress=False)  # fmt: skip
        after = predict(r.model, held_x, 25)
        rows.append({
            "target": t, "flops_removed": 1 - cost.remaining(p)["flops"],
            "top1_before": agreement(ref, before, 1), "top5_before": agreement(ref, before, 5),
            "top1_after": agreement(ref, after, 1), "top5_after": agreement(ref, after, 5),
            "seconds": time.perf_counter() - t0, "samples_per_second": r.samples_per_second,
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    lines = [
        "# EfficientNet-Lite0, label-free recovery on bundled photos", "",
        f"Command: `nice -n 5 .venv/bin/python -m bench.bench_effnet_recovery --targets "
        f"{args.targets} --steps {args.steps}`", "",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; 2-core AMD EPYC VM.", "",
        f"Recovery: {args.steps} steps of {args.batch} crops (AdamW 1e-3, cosine, frozen BN), "
        f"distillation only, on {args.train} augmented crops of the {len(photos)} bundled photos; "
        "agreement with the unpruned model on 100 other crops. Before = FAIR plan rounded to 8 "
        "with BatchNorm re-estimated on 160 crops.", "",
        "| FLOPs removed | top-1 agreement before -> after | top-5 agreement before -> after | "
        "recovery time |", "|---|---|---|---|",
    ]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['flops_removed']:.1%} | {r['top1_before']:.2f} -> {r['top1_after']:.2f}"
                     f" | {r['top5_before']:.2f} -> {r['top5_after']:.2f} | {r['seconds']:.0f} s |")  # fmt: skip
    (ROOT / "RESULTS-effnet-recovery.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
