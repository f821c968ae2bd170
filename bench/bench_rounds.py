"""Repeated prune/recover rounds against one shot, at an equal total recovery budget.

    nice -n 10 .venv/bin/python -m bench.bench_rounds [--models vgg,resnet] [--target 0.7]
        [--steps 460] [--rounds 1,2,3]

For each network of the accuracy bench (Fashion-MNIST, trained once) and K in --rounds: K rounds
of score -> plan -> prune -> BN re-estimate -> recover (fair_edge.recovery_stage.prune_in_rounds,
the code `fair-edge deploy --rounds K` runs), each round recovering for steps/K steps, so every K
spends the same training budget. Top-1 on all 10,000 test images; the held-out share of the
training set picks the best weights. Writes bench/results-rounds.json and
bench/RESULTS-rounds.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.accuracy_models import trained
from calibration.fileio import atomic_write_text
from fair_edge.config import Options
from fair_edge.recovery_stage import recovery_data
from fair_edge.stage_cache import StageCache
from pipeline.train import default_data, evaluate

ROOT = Path(__file__).resolve().parent


def run_one(name: str, target: float, steps: int, rounds: int, cache: StageCache) -> dict[str, Any]:
    """K rounds toward `target` with steps/K recovery steps each; test top-1 of the result."""
    from fair_edge.recovery_stage import prune_in_rounds

    model, meta = trained(name, progress=False)
    train, test = default_data("train"), default_data("test")
    opts = Options(target=target, rounds=rounds, recover_steps=max(1, steps // rounds),
                   quiet=True).validate()  # fmt: skip
    data = recovery_data(opts, train, train, model)
    t0 = time.perf_counter()
    result = prune_in_rounds(model, train, data, opts, cache, 8, progress=False)
    return {
        "model": name, "rounds": rounds, "target": target, "steps_per_round": opts.recover_steps,
        "flops_kept": result.rounds[-1]["flops_kept"], "unpruned": meta.get("test_accuracy"),
        "top1": evaluate(result.model, test), "seconds": time.perf_counter() - t0,
        "per_round": result.rounds,
    }  # fmt: skip


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines()
                       if ln.startswith("Model name")), "unknown")  # fmt: skip
    lines = [
        "# Prune/recover rounds against one shot (equal recovery budget)", "",
        f"Command: `{command}`  ", f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"machine: {model_name}, 2 cores.", "",
        "Each K spends the same number of recovery steps in all (steps/K per round); teacher: the "
        "unpruned network; data: Fashion-MNIST training set minus 1,000 held-out images; top-1 on "
        "all 10,000 test images.", "",
        "| network | rounds | FLOPs kept | unpruned | top-1 after the last round | minutes |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['model']} | {r['rounds']} | {r['flops_kept']:.3f} | "
                     f"{r['unpruned']:.4f} | {r['top1']:.4f} | {r['seconds'] / 60:.1f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vgg,resnet")
    ap.add_argument("--target", type=float, default=0.7)
    ap.add_argument("--steps", type=int, default=460)
    ap.add_argument("--rounds", default="1,2,3")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = StageCache(Path(tmp))
        for name in args.models.split(","):
            for k in (int(v) for v in args.rounds.split(",")):
                rows.append(run_one(name, args.target, args.steps, k, cache))
                print(json.dumps({k2: v for k2, v in rows[-1].items() if k2 != "per_round"}))
    command = ("nice -n 10 .venv/bin/python -m bench.bench_rounds --models " + args.models
               + f" --target {args.target} --steps {args.steps} --rounds {args.rounds}")  # fmt: skip
    atomic_write_text(ROOT / "results-rounds.json", json.dumps(rows, indent=1, default=float))
    atomic_write_text(ROOT / "RESULTS-rounds.md", markdown(rows, command))


if __name__ == "__main__":
    main()
