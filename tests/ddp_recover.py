"""Run by tests/test_recovery.py under `torchrun --nproc_per_node 2`: recover the prepared
student with the global batch split across the processes; rank 0 saves the result."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recovery_setup import load  # noqa: E402

from exporters.weights import save_pruned_weights  # noqa: E402
from pipeline.recovery import RecoveryConfig, init_distributed, recover  # noqa: E402


def main(folder: Path, out: Path) -> None:
    dist = init_distributed()
    prep = load(folder)
    config = RecoveryConfig(steps=12, batch_size=64, lr=2e-3, optimizer="adamw", augment="shift")
    result = recover(prep.student(), prep.teacher, prep.train, prep.heldout, config,
                     plan_digest=prep.plan.digest(), progress=False)  # fmt: skip
    if dist.rank == 0:
        save_pruned_weights(result.model, prep.plan, out)
        (out.with_suffix(".world")).write_text(str(result.world_size))
    dist.barrier()
    dist.close()  # left open, gloo's threads can abort the process at exit


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
