"""Run by tests/test_scoring_budget.py under `torchrun --nproc_per_node 2` (and plainly, as the
single-process reference): score the seeded digits CNN; rank 0 saves the scores."""

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
    scores = score(digits_cnn().to(dist.device()), (x, y), samples_per_class=9, batch_size=16, u_store=u_store,
                   progress=False)  # fmt: skip
    if dist.rank == 0:
        scores.save(out)
        out.with_suffix(".world").write_text(str(dist.world))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
