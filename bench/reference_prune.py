"""Prune a benchmark network with the authors' `network-pruner` 2.16, end to end (runs in bench/.env).

bench_accuracy runs this in the reference environment (bench/setup_reference_env.sh): their
`metrics`: their get_metrics on the same calibration samples; U (D) and R (RE) and their orders go
to OUT/metrics.json (their own pickle file is never read). `prune`: get_ratios at each ToD level,
get_skeleton and prune; each pruned state_dict goes to OUT/ref-<level>.pt, the ratios to
OUT/prune.json. The main environment measures accuracy and FLOPs of those models like its own.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.accuracy_models import BUILDERS  # noqa: E402


def _load(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    model = BUILDERS[args.model]()
    model.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
    with np.load(args.calib, allow_pickle=False) as d:
        x, y = torch.from_numpy(d["x"]), torch.from_numpy(d["y"])
    return model.eval(), x, y


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["metrics", "prune"])
    ap.add_argument("--model", required=True, choices=sorted(BUILDERS))
    ap.add_argument("--weights", required=True, type=Path)
    ap.add_argument(
        "--calib", required=True, type=Path, help=".npz with x, y (the calibration set)"
    )
    ap.add_argument("--layers", required=True, help="comma-separated module names to prune")
    ap.add_argument("--levels", default="", help="prune: comma-separated ToD levels")
    ap.add_argument("--samples-per-class", type=int, default=32)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument(
        "--freeze-bn",
        action="store_true",
        help="metrics: BatchNorm momentum 0, so their train-mode R passes cannot move running stats",
    )
    args = ap.parse_args(argv)
    from Network_Pruner import FAIR_Pruner as fp

    torch.set_num_threads(2)
    model, x, y = _load(args)
    names = args.layers.split(",")
    index = {n: i for i, (n, _) in enumerate(model.named_modules())}
    layers = [index[n] for n in names]
    args.out.mkdir(parents=True, exist_ok=True)
    log = io.StringIO()
    metrics_json = args.out / "metrics.json"
    if args.mode == "metrics":
        if args.freeze_bn:
            for mod in model.modules():
                if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                    mod.momentum = 0.0
        loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=False)
        random.seed(0)
        torch.manual_seed(0)
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(log):
            results = fp.get_metrics(
                model,
                loader,
                layers,
                layers,
                device=torch.device("cpu"),
                the_samplesize_for_compute_distance=args.samples_per_class,
                results_save_path=str(args.out / "metrics.pkl"),  # their format; never read back
            )
        out = {"layers": names, "seconds": round(time.perf_counter() - t0, 1)}
        for j, n in enumerate(names):
            out[n] = {
                "D": torch.as_tensor(results[f"D_{j}"]).double().tolist(),
                "RE": torch.as_tensor(results[f"RE_{j}_hat"]).double().tolist(),
                "D_order": [int(i) for i in results[f"D_{j}_s2b_idx"]],
                "RE_order": [int(i) for i in results[f"RE_{j}_hat_s2b_idx"]],
            }
        bn = {k: v.numpy() for k, v in model.state_dict().items() if "running_" in k}
        np.savez(args.out / "bn_after.npz", **bn)  # BatchNorm statistics their passes left behind
        tmp = metrics_json.with_suffix(".tmp")
        tmp.write_text(json.dumps(out))
        tmp.replace(metrics_json)  # atomic: a killed run leaves no half file
        print(json.dumps({"metrics_seconds": out["seconds"]}), flush=True)
        return 0
    saved = json.loads(metrics_json.read_text())
    results = {}
    for j, n in enumerate(names):
        results[f"D_{j}_s2b_idx"] = saved[n]["D_order"]
        results[f"RE_{j}_hat_s2b_idx"] = saved[n]["RE_order"]
    report = {}
    example = x[:2]
    for level in [float(v) for v in args.levels.split(",") if v]:
        try:
            with contextlib.redirect_stdout(log):
                ratios = fp.get_ratios(model, results, layers, ToD_level=level)
                skeleton = fp.get_skeleton(model, ratios, example, layers2prune=layers)
                path = args.out / f"ref-{level}.pt"
                _, rep = fp.prune(
                    skeleton,
                    model,
                    results,
                    ratios,
                    layers2prune=layers,
                    pruned_model_save_path=str(path),
                    example_inputs=example,
                    device="cpu",
                )
            entry = {"ratios": [int(r) for r in ratios], "weights": path.name}
            entry.update({k: float(v) for k, v in rep.items()})
        except Exception as exc:  # record why a level failed; the others still count
            entry = {"error": f"{type(exc).__name__}: {exc}"}
        report[str(level)] = entry
        print(json.dumps({"level": level, **entry}), flush=True)
    (args.out / "prune.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
