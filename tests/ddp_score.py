"""Run by tests/test_scoring_budget.py under `torchrun --nproc_per_node 2` (and plainly, as the
single-process reference): score the seeded digits CNN; rank 0 saves the scores. With the
argument `data-differs`: the torchrun guard against different calibration data per process."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scoring_setup import digits_cnn, digits_data  # noqa: E402

from pipeline.recovery import init_distributed  # noqa: E402
from pipeline.scoring import score  # noqa: E402


def main(out: Path, u_store: str) -> None:
    dist = init_distributed()
    x, y = digits_data()
    scores = score(digits_cnn().to(dist.device()), (x, y), samples_per_class=9, batch_size=16,
                   u_store=u_store, progress=False)  # fmt: skip
    if dist.rank == 0:
        scores.save(out)
        out.with_suffix(".world").write_text(str(dist.world))
    dist.barrier()
    dist.close()  # left open, gloo's threads can abort the process at exit


def data_differs(out: Path) -> None:
    """compute_scores with one changed calibration value in process 1: each process writes the
    one-line error it raised."""
    from calibration.data import CalibrationSet
    from calibration.errors import FairEdgeError
    from fair_edge.config import Options
    from fair_edge.plan_stage import compute_scores
    from fair_edge.stage_cache import StageCache

    dist = init_distributed()
    x, y = digits_data()
    x = x.numpy().copy()
    x[0, 0, 0, 0] += dist.rank
    cs = CalibrationSet(x, y.numpy())
    try:
        compute_scores(digits_cnn(), cs, Options(samples_per_class=9, quiet=True),
                       StageCache(out.parent / "stages", enabled=False), dist)  # fmt: skip
        message = "no error"
    except FairEdgeError as exc:
        message = str(exc)
    out.with_suffix(f".rank{dist.rank}").write_text(message)
    dist.barrier()
    dist.close()


if __name__ == "__main__":
    if sys.argv[2] == "data-differs":
        data_differs(Path(sys.argv[1]))
    else:
        main(Path(sys.argv[1]), sys.argv[2])
