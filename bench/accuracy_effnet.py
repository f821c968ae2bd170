"""EfficientNet-Lite0 (ImageNet weights), label-free: prune on bundled photos, measure agreement.

    python -m bench.accuracy_effnet [--targets 0.2,0.3] [--calib 240] [--held 160]

No labelled ImageNet data ships with any installed package, so calibration uses the photos that
scikit-learn and scikit-image bundle, augmented (random resized crops, flips, brightness), with
pseudo labels from the unpruned model's top-1 (label-free mode). Pruned models (ONNX surgery,
verified) are compared with the unpruned model on held-out crops (other seed): top-1 agreement
(same top-1 class) and top-5 agreement (unpruned top-1 within the pruned top-5). Latency: ONNX
Runtime, 1 thread, batch 1, original and pruned timed interleaved in one run (median).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np
import torch

from calibration.data import CalibrationSet, Preprocessing
from calibration.pseudo_labels import agreement, pseudo_label
from exporters.bn_recal import recalibrate_onnx
from exporters.costs import OnnxCostModel
from exporters.graph_groups import find_groups
from exporters.onnx_export import export_onnx
from exporters.surgery import apply_plan
from exporters.torch_prune import prune_torch
from pipeline.baselines import l1_importance, uniform_plan_for_budget
from pipeline.plan import ModelFingerprint
from pipeline.planning import plan_for_budget
from pipeline.rounding import round_plan
from pipeline.scoring import score
from pipeline.zoo import efficientnet_lite0

IMAGENET = Preprocessing(
    resize=(224, 224),
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    scale=1 / 255,
    channels=3,
)
SKIMAGE_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "retina",
    "camera",
    "moon",
    "coins",
)


def bundled_photos() -> dict[str, np.ndarray]:
    """The photos scikit-learn and scikit-image install with themselves (no download)."""
    import skimage.data as skd
    from sklearn.datasets import load_sample_images

    photos = {}
    s = load_sample_images()
    for f, img in zip(s.filenames, s.images, strict=True):
        photos[f.rsplit("/", 1)[-1]] = img
    for name in SKIMAGE_PHOTOS:
        img = np.asarray(getattr(skd, name)())
        photos[name] = np.repeat(img[:, :, None], 3, axis=2) if img.ndim == 2 else img[:, :, :3]
    return photos


def augmented(photos: dict[str, np.ndarray], n: int, seed: int, size: int = 224) -> np.ndarray:
    """n random resized crops (area 15-100%, aspect 3/4-4/3), random flip and brightness."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    imgs = list(photos.values())
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        img = imgs[i % len(imgs)]
        h, w = img.shape[:2]
        area = rng.uniform(0.15, 1.0) * h * w
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        ch = int(min(h, max(16, round(np.sqrt(area / aspect)))))
        cw = int(min(w, max(16, round(np.sqrt(area * aspect)))))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = Image.fromarray(img[y : y + ch, x : x + cw]).resize((size, size), Image.BILINEAR)
        a = np.asarray(crop, np.float32) * rng.uniform(0.8, 1.2)
        if rng.random() < 0.5:
            a = a[:, ::-1]
        out[i] = np.clip(a, 0, 255).astype(np.uint8)
    return out


def _ort(proto: Any):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _outputs(sess: Any, x: np.ndarray, bs: int = 16) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i : i + bs]})[0] for i in range(0, len(x), bs)])


def _latency(sessions: dict[str, Any], x: np.ndarray, repeats: int) -> dict[str, float]:
    """Median ms per batch-1 run; the models take turns so load drifts hit all alike."""
    times: dict[str, list[float]] = {k: [] for k in sessions}
    feed = x[:1]
    for s in sessions.values():
        _outputs(s, feed)
    for _ in range(repeats):
        for k, s in sessions.items():
            t = time.perf_counter()
            _outputs(s, feed)
            times[k].append((time.perf_counter() - t) * 1000)
    return {k: float(np.median(v)) for k, v in times.items()}


def run(targets: list[float], n_calib: int, n_held: int, repeats: int, spc: int) -> dict:
    photos = bundled_photos()
    model = efficientnet_lite0()
    calib = CalibrationSet(
        IMAGENET.apply(augmented(photos, n_calib, seed=0)),
        preprocessing=IMAGENET,
        source="bundled-photos+aug",
    )
    held = IMAGENET.apply(augmented(photos, n_held, seed=1))
    t0 = time.perf_counter()
    labelled = pseudo_label(calib, model, batch_size=32)
    counts = np.bincount(labelled.labels, minlength=1000)
    keep = counts[labelled.labels] >= 2  # W1 needs two samples of a class
    cs = labelled.subset(keep)
    t_label = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = score(
        model, cs, samples_per_class=spc, where="raw", seed=0, progress=False, batch_size=16
    )
    t_score = time.perf_counter() - t0
    x1 = torch.from_numpy(held[:1])
    proto = export_onnx(model, x1, None)
    groups = find_groups(proto)
    cost = OnnxCostModel(proto)
    base = _ort(proto)
    ref_out = _outputs(base, held)
    res: dict[str, Any] = {
        "photos": sorted(photos),
        "calibration": cs.to_json() | {"dropped_singleton_samples": int((~keep).sum())},
        "pseudo_label_classes": int((counts >= 2).sum()),
        "label_seconds": round(t_label, 1),
        "score_seconds": round(t_score, 1),
        "held_out": n_held,
        "rows": [],
    }
    l1 = l1_importance(model, scores.names())
    fp = ModelFingerprint.from_model(model)
    for t in targets:
        fair = plan_for_budget(scores, t, "flops", cost, groups, model, strict=False)
        plans = {
            "fair": fair,
            "fair-rounded8": round_plan(fair, scores, 8, "nearest", groups=groups),
            "uniform-l1": uniform_plan_for_budget(l1, t, cost, fp, groups),
        }
        sessions = {"unpruned": base}
        rows = {}
        for name, p in plans.items():
            pruned, report = apply_plan(proto, p, verify_inputs=held[:4])
            sess = _ort(pruned)
            out = _outputs(sess, held)
            # the same pruned graph with BatchNorm statistics re-estimated on the calibration
            # crops (what `fair-edge deploy` ships by default)
            small = prune_torch(model, p, x1, proto)
            _, recal, _ = recalibrate_onnx(small, pruned, calib.inputs, held[:4])
            out_recal = _outputs(_ort(recal), held)
            rem = cost.remaining(p)
            rows[name] = {
                "method": name,
                "target": t,
                "flops_removed": 1 - rem["flops"],
                "params_removed": 1 - rem["params"],
                "top1_agreement": agreement(ref_out, out, 1),
                "top5_agreement": agreement(ref_out, out, 5),
                "top1_agreement_bn_recal": agreement(ref_out, out_recal, 1),
                "top5_agreement_bn_recal": agreement(ref_out, out_recal, 5),
                "setting": p.method.get("alpha", p.method.get("ratio")),
            }
            sessions[name] = sess
        lat = _latency(sessions, held, repeats)
        for name, row in rows.items():
            row["latency_ms"] = lat[name]
            row["latency_unpruned_ms"] = lat["unpruned"]
            row["speedup"] = lat["unpruned"] / lat[name]
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="0.2,0.3")
    ap.add_argument("--calib", type=int, default=240)
    ap.add_argument("--held", type=int, default=160)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--samples-per-class", type=int, default=16)
    ap.add_argument("--json", default="bench/results-accuracy-effnet.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    res = run(
        [float(t) for t in args.targets.split(",")],
        args.calib,
        args.held,
        args.repeats,
        args.samples_per_class,
    )
    res["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    res["command"] = "python -m bench.accuracy_effnet " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    from calibration.fileio import atomic_write_text

    atomic_write_text(args.json, json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
