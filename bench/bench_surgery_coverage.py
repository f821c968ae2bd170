"""Surgery coverage per architecture family: prunable groups before/after, a verified 30% plan,
parameters and FLOPs removed, ONNX Runtime CPU latency with and without rounding.

Models are torchvision's (weights=None), plus 'deit_tiny': torchvision's VisionTransformer at
DeiT-Tiny's size (224, patch 16, 12 layers, 3 heads of 64, MLP 768). A ViT's classifier starts
at zero in torchvision, which would make every output 0; it is drawn from N(0, 0.02) here so the
output comparison of the verification sees something.

Run: nice .venv/bin/python -m bench.bench_surgery_coverage [--models ...] [--runs 10]
         [--before /path/to/other/checkout]
'groups before' runs the channel analysis of another checkout (default: none, column omitted)
on the same export in a subprocess. Plans are random (seed 0): round(30%) of every prunable
group, the same count from every conv group of a grouped convolution; 'kept multiple of 8'
rounds each group's kept width. Latency: interleaved runs, median, ORT_ENABLE_ALL, one batch.
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

import numpy as np
import onnx
import onnxruntime as ort
import torch

from bench.bench_surgery import _latency, _session
from exporters.graph_groups import ChannelGraph
from exporters.onnx_export import export_onnx
from exporters.random_plan import random_plan
from exporters.surgery import apply_plan
from pipeline.plan import ModelFingerprint
from pipeline.zoo import import_torchvision, torchvision_model

_COUNT = (
    "import json, sys, onnx\n"
    "from exporters.graph_groups import ChannelGraph\n"
    "gs = ChannelGraph(onnx.load(sys.argv[1])).channel_groups\n"
    "print(json.dumps([sum(not g.frozen for g in gs), len(gs),"
    " sum(len(g.members) for g in gs if not g.frozen), sum(len(g.members) for g in gs)]))\n"
)


def _counts(path: str, checkout: str) -> list[int]:
    env = {**os.environ, "PYTHONPATH": checkout}
    out = subprocess.run(
        [sys.executable, "-c", _COUNT, path],
        env=env,
        cwd=checkout,  # `python -c` puts the working directory first on sys.path
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _build(name: str) -> torch.nn.Module:
    if name == "deit_tiny":
        tv = import_torchvision()
        model = tv.models.VisionTransformer(
            image_size=224, patch_size=16, num_layers=12, num_heads=3, hidden_dim=192,
            mlp_dim=768,
        )  # fmt: skip
    else:
        model = torchvision_model(name)
    head = getattr(getattr(model, "heads", None), "head", None)
    if isinstance(head, torch.nn.Linear):
        torch.nn.init.normal_(head.weight, std=0.02)
    return model.eval()


def _attention_note(graph: ChannelGraph, plan: object) -> str:
    """'12 x 12 heads of 64, 4 removed per layer' for the attention groups of a plan."""
    atts = list(graph.attentions.values())
    if not atts:
        return ""
    removed = sorted({len(plan.layers[a.module].pruned) for a in atts if a.module in plan.layers})
    return (
        f"{len(atts)} attention layers of {atts[0].heads} heads x {atts[0].head_dim}, "
        f"{'/'.join(map(str, removed)) or 0} heads removed per layer"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--models",
        nargs="+",
        default=["resnext50_32x4d", "regnet_x_400mf", "regnet_y_400mf", "shufflenet_v2_x1_0"],
    )
    ap.add_argument("--multiples", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--before", default=None, help="another checkout for 'groups before'")
    args = ap.parse_args()
    print(
        f"# bench_surgery_coverage {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, "
        f"{platform.machine()}, onnxruntime {ort.__version__}, input 1x3x{args.size}x{args.size}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start\n"
    )
    print(
        "| model | groups prunable before | groups prunable after | layers prunable after "
        "| kept multiple of | params removed | FLOPs removed | verify max abs diff (bound) "
        "| max tensor rel diff | surgery s | latency orig ms | latency pruned ms | latency removed |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    feed = np.random.default_rng(0).standard_normal((1, 3, args.size, args.size)).astype(np.float32)
    for name in args.models:
        torch.manual_seed(0)
        model = _build(name)
        proto = export_onnx(model, torch.randn(1, 3, args.size, args.size), None)
        before = "-"
        if args.before:
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "m.onnx")
                onnx.save(proto, path)
                b = _counts(path, args.before)
                before = f"{b[0]} / {b[1]}"
        graph = ChannelGraph(proto)
        groups = graph.channel_groups
        live = [g for g in groups if not g.frozen]
        layers = f"{sum(len(g.members) for g in live)} / {sum(len(g.members) for g in groups)}"
        fp = ModelFingerprint.from_model(model)
        results = []
        for mult in args.multiples:
            plan = random_plan(groups, 0.3, seed=0, fingerprint=fp, multiple=mult)
            pruned, report = apply_plan(proto, plan)
            results.append((mult, pruned, report))
            note = _attention_note(graph, plan)
            if note:
                print(f"<!-- {name}, kept multiple of {mult}: {note} -->", flush=True)
        lat = _latency([_session(proto)] + [_session(r[1]) for r in results], feed, args.runs)
        for k, (mult, _, r) in enumerate(results):
            v = r.verification
            print(
                f"| {name} | {before} | {len(live)} / {len(groups)} | {layers} | {mult} "
                f"| {1 - r.params_after / r.params_before:.1%} "
                f"| {1 - r.flops_after / r.flops_before:.1%} "
                f"| {v['max_abs_diff']:.2g} ({v['bound']:.2g}) | {v['max_tensor_rel_diff']:.2g} "
                f"| {r.timings['surgery_s']:.2f} | {lat[0] * 1e3:.1f} | {lat[k + 1] * 1e3:.1f} "
                f"| {1 - lat[k + 1] / lat[0]:.1%} |",
                flush=True,
            )
        print(f"<!-- {name}: load average {os.getloadavg()[0]:.1f} after timing -->", flush=True)


if __name__ == "__main__":
    main()
