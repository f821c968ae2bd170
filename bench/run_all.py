"""Run every benchmark in turn (`make bench`); each prints its ratios and the command to record.

Each benchmark runs in its own process so one failing (e.g. the reference package missing)
does not hide the others; the exit code is non-zero if any failed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

BENCHMARKS = (
    "bench.bench_scoring",
    "bench.bench_surgery",
    "bench.bench_runner_spread",
    "bench.bench_latency",
    "bench.bench_accuracy",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("only", nargs="*", help="benchmark modules to run (default: all)")
    args = parser.parse_args(argv)
    failed = []
    for module in args.only or BENCHMARKS:
        print(f"=== {module}", flush=True)
        start = time.perf_counter()
        rc = subprocess.call([sys.executable, "-m", module])
        print(f"=== {module}: exit {rc} after {time.perf_counter() - start:.0f} s", flush=True)
        if rc:
            failed.append(module)
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
