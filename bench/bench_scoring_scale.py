"""Scoring at the method's own scale: torchvision resnet50, 224x224, many classes, peak memory.

    python -m bench.bench_scoring_scale --configs 10x8,20x16,40x16 --max-memory 8G \
        --baseline /work/main --out bench/results-scoring-scale.jsonl

Every measurement runs in a fresh subprocess, whose peak resident memory (getrusage ru_maxrss,
the whole process: Python, torch, model, calibration samples, everything) is reported beside
its wall and CPU time: `fwdbwd` is one plain forward+backward (cross-entropy, .backward())
over the same samples at --fwdbwd-batch; `score` is pipeline.scoring.score at --max-memory;
`baseline` is score() of another checkout (--baseline, e.g. main before the budget) at its
default batch 64; `select` / `select-baseline` run only scoring's sample selection (this checkout
/ the --baseline one), whose peak is the samples' copies. The calibration data is an iterable of batches generated on the fly (random
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
import threading
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


class RssTimeline:
    """Resident memory sampled every `every` seconds in a background thread (/proc/self/statm),
    so a row shows when the peak happened, not only how high it was. Read here rather than with
    pipeline.membudget.used_bytes: a `baseline` child imports an older checkout without it."""

    def __init__(self, every: float = 0.2) -> None:
        self.every = every
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.perf_counter()
        while not self._stop.is_set():
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * self._page
            self.samples.append((time.perf_counter() - t0, rss))
            self._stop.wait(self.every)

    def __enter__(self) -> RssTimeline:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def profile(self, slices: int = 40) -> list[float]:
        """The highest sample (GB) in each of `slices` equal slices of the run's wall time."""
        if not self.samples:
            return []
        end = self.samples[-1][0] or 1.0
        top = [0] * slices
        for t, rss in self.samples:
            i = min(slices - 1, int(slices * t / end))
            top[i] = max(top[i], rss)
        return [round(v / 1e9, 3) for v in top]


def child(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(Path(args.root).resolve()))
    import torch

    from pipeline.zoo import torchvision_model

    torch.manual_seed(0)
    model = torchvision_model(args.model).eval()
    out: dict = {"kind": args.child, "classes": args.classes, "spc": args.spc, "size": args.size}
    w, c = time.perf_counter(), time.process_time()
    with RssTimeline() as timeline:
        run_measured(args, model, out)
    out["wall_s"] = time.perf_counter() - w
    out["cpu_s"] = time.process_time() - c
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    out["rss_profile_gb"] = timeline.profile()
    out["samples"] = args.classes * args.spc
    out["root"] = str(Path(args.root).resolve())
    out["threads"] = torch.get_num_threads()
    out["end"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return out


def run_measured(args: argparse.Namespace, model: object, out: dict) -> None:
    """The measured work of one child: a plain forward+backward, score(), or scoring's sample
    selection alone (`select`: the peak of picking and interleaving the samples)."""
    import torch.nn.functional as F

    if args.child.startswith("select"):
        import inspect

        import torch

        from pipeline.scoring import _select

        cpu = torch.device("cpu")
        pos = [model, batches(args.classes, args.spc, args.size), args.spc, args.classes, 0, cpu,
               torch.float32, 64]  # fmt: skip
        if "budget" in inspect.signature(_select).parameters:  # older checkouts have no budget
            pos.append(10**12)
        out["selected_gb"] = _select(*pos).x.nbytes / 1e9
    elif args.child == "fwdbwd":
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
        out["log"] = lines[1:]
        out["max_memory"] = args.max_memory if args.child == "score" else None


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
    ap.add_argument(
        "--kinds", default="fwdbwd,score", help="fwdbwd, score, baseline, select, select-baseline"
    )
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
            on_baseline = kind in ("baseline", "select-baseline")
            root = args.baseline if on_baseline else str(HERE.parents[1])
            if on_baseline and not root:
                continue
            row = run_child(kind, k, spc, args, root)
            print(json.dumps(row), flush=True)
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
