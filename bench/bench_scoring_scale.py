"""Scoring at the method's own scale: torchvision resnet50, 224x224, many classes, peak memory.

    python -m bench.bench_scoring_scale --configs 10x8,20x16,40x16 --max-memory 8G \
        --baseline /work/main --out bench/results-scoring-scale.jsonl

Every measurement runs in a fresh subprocess, whose peak resident memory (getrusage ru_maxrss,
the whole process: Python, torch, model, calibration samples, everything) is reported beside
its wall and CPU time: `fwdbwd` is one plain forward+backward (cross-entropy, .backward())
over the same samples at --fwdbwd-batch; `score` is pipeline.scoring.score at --max-memory;
`baseline` is score() of another checkout (--baseline, e.g. main before the budget) at its
default batch 64. The calibration data is an iterable of batches generated on the fly (random
images plus a per-class pattern, labels interleaved), as a data loader would give it, so the
only copy of the samples is the one scoring keeps. The weights are torchvision's random
initialisation (timing and memory do not depend on them). Rows are appended to --out as each
measurement ends, so a long run leaves what it finished.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve()


def batches(k: int, spc: int, size: int, seed: int = 0) -> Iterator[tuple]:
    import torch

    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(k, 3, size, size, generator=g)
    n = k * spc
    for s in range(0, n, 64):
        y = torch.arange(s, min(n, s + 64)) % k
        x = torch.randn(len(y), 3, size, size, generator=g) + 0.5 * patterns[y]
        yield x, y


def child(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(Path(args.root).resolve()))
    import torch
    import torch.nn.functional as F

    from pipeline.zoo import torchvision_model

    torch.manual_seed(0)
    model = torchvision_model(args.model).eval()
    out: dict = {"kind": args.child, "classes": args.classes, "spc": args.spc, "size": args.size}
    w, c = time.perf_counter(), time.process_time()
    if args.child == "fwdbwd":
        b = args.fwdbwd_batch
        for x, y in batches(args.classes, args.spc, args.size):
            for s in range(0, len(x), b):
                F.cross_entropy(model(x[s : s + b]), y[s : s + b]).backward()
        out["batch"] = b
    else:
        from pipeline.scoring import score

        lines: list[str] = []

        class Keep(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                lines.append(record.getMessage())

        logging.getLogger("pipeline.scoring").addHandler(Keep())
        logging.getLogger("pipeline.scoring").setLevel(logging.INFO)
        kw = {"max_memory": args.max_memory} if args.child == "score" else {}
        score(model, batches(args.classes, args.spc, args.size), samples_per_class=args.spc,
              max_classes=args.classes, progress=args.progress, **kw)  # fmt: skip
        out["plan"] = lines[0] if lines else "batch 64, U in memory (no budget)"
        out["max_memory"] = args.max_memory if args.child == "score" else None
    out["wall_s"] = time.perf_counter() - w
    out["cpu_s"] = time.process_time() - c
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    out["samples"] = args.classes * args.spc
    out["root"] = str(Path(args.root).resolve())
    out["threads"] = torch.get_num_threads()
    out["end"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return out


def run_child(kind: str, k: int, spc: int, args: argparse.Namespace, root: str) -> dict:
    cmd = [sys.executable, str(HERE), "--child", kind, "--classes", str(k), "--spc", str(spc),
           "--size", str(args.size), "--model", args.model, "--max-memory", args.max_memory,
           "--fwdbwd-batch", str(args.fwdbwd_batch), "--root", root]  # fmt: skip
    if args.progress:
        cmd.append("--progress")
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
    if done.returncode != 0:
        return {"kind": kind, "classes": k, "spc": spc, "error": done.stderr.strip()[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="10x8,20x16,40x16", help="classes x samples per class")
    ap.add_argument("--kinds", default="fwdbwd,score", help="fwdbwd, score, baseline")
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--max-memory", default="8G")
    ap.add_argument("--fwdbwd-batch", type=int, default=32)
    ap.add_argument("--baseline", default=None, help="checkout whose score() is the baseline")
    ap.add_argument("--out", type=Path, default=Path("bench/results-scoring-scale.jsonl"))
    ap.add_argument("--progress", action="store_true", help="show the children's progress bars")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--classes", type=int, default=10, help=argparse.SUPPRESS)
    ap.add_argument("--spc", type=int, default=8, help=argparse.SUPPRESS)
    ap.add_argument("--root", default=str(HERE.parents[1]), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return 0
    for cfg in args.configs.split(","):
        k, spc = (int(v) for v in cfg.split("x"))
        for kind in args.kinds.split(","):
            root = args.baseline if kind == "baseline" else str(HERE.parents[1])
            if kind == "baseline" and not root:
                continue
            row = run_child(kind, k, spc, args, root)
            print(json.dumps(row), flush=True)
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
