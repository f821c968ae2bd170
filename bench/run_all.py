"""Run every benchmark in turn (`make bench`); each prints its ratios and the command to record.

Each benchmark runs in its own process so one failing (e.g. the reference package missing)
does not hide the others; the exit code is non-zero if any failed. The scoring benchmark needs
the authors' package beside torch: it runs in bench/.env (built by bench/setup_reference_env.sh).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REFERENCE_PYTHON = ROOT / "bench" / ".env" / "bin" / "python"

# (module, extra arguments, where the reference environment is needed: "run" (the benchmark
# runs in it), "call" (it calls the reference there) or "")
BENCHMARKS: tuple[tuple[str, list[str], str], ...] = (
    ("bench.bench_scoring", [], "run"),
    ("bench.bench_u_agreement", [], "call"),
    ("bench.bench_surgery_coverage", [], ""),
    ("bench.bench_tasks", [], ""),
    ("bench.bench_surgery", [], ""),
    ("bench.bench_host_profile", [], ""),
    ("bench.bench_runner_spread", [], ""),
    ("bench.bench_channel_multiple", [], ""),
    ("bench.bench_latency", ["--out", "bench/RESULTS-latency.md"], ""),
    ("bench.bench_accuracy", ["--models", "vgg,resnet", "--finetune-samples", "2000"], ""),
    ("bench.accuracy_effnet", [], ""),
    (
        "bench.bench_study",
        [
            "--models",
            "vgg,resnet,mobilenet",
            "--seeds",
            "0",
            "--levels",
            "0.5,0.7",
            "--steps",
            "50",
            "--recover-levels",
            "0.5,0.7",
        ],
        "",
    ),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("only", nargs="*", help="benchmark modules to run (default: all)")
    args = parser.parse_args(argv)
    chosen = [b for b in BENCHMARKS if not args.only or b[0] in args.only]
    unknown = set(args.only) - {b[0] for b in BENCHMARKS}
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    if any(ref for _, _, ref in chosen) and not REFERENCE_PYTHON.exists():
        subprocess.check_call(["bash", str(ROOT / "bench" / "setup_reference_env.sh")])
    failed = []
    for module, extra, reference in chosen:
        python = str(REFERENCE_PYTHON) if reference == "run" else sys.executable
        print(f"=== {module} {' '.join(extra)}", flush=True)
        start = time.perf_counter()
        rc = subprocess.call([python, "-m", module, *extra], cwd=ROOT)
        print(f"=== {module}: exit {rc} after {time.perf_counter() - start:.0f} s", flush=True)
        if rc:
            failed.append(module)
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
