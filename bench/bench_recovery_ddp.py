"""Recovery throughput: against a plain training step, and under torchrun with 2 processes.

    .venv/bin/python -m bench.bench_recovery_ddp [--steps 60]

The built-in default model pruned as `make deploy` prunes it (FAIR, half the FLOPs, rounded to
8, BatchNorm re-estimated). Measured in one run: samples/s of a plain training step of the
unpruned model (forward + backward + AdamW, batch 128, 2 threads); recover() in one process
(2 threads); recover() under `torchrun --standalone --nproc_per_node 2` (1 thread each, gloo on
loopback), same global batch and steps; and the largest weight difference between the one- and
two-process results. Writes bench/RESULTS-recovery-ddp.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent


def prepare(folder: Path) -> None:
    """Teacher weights, the deploy plan and the BN-re-estimated pruned student, saved."""
    import io

    from calibration.sampling import balanced_sample
    from exporters.bn_recal import recalibrate_bn
    from exporters.costs import OnnxCostModel
    from exporters.graph_groups import find_groups
    from exporters.onnx_export import export_onnx
    from exporters.torch_prune import prune_torch
    from exporters.weights import save_pruned_weights
    from pipeline.planning import plan_for_budget
    from pipeline.rounding import round_plan
    from pipeline.scoring import score
    from pipeline.train import default_data, default_model

    model = default_model(progress=False)
    calib = balanced_sample(default_data("train"), 32, 0)[0]
    x1 = torch.from_numpy(calib.inputs[:1])
    proto = export_onnx(model, x1, None)
    groups = find_groups(proto)
    scores = score(model, calib, samples_per_class=32, progress=False)
    plan = plan_for_budget(scores, 0.5, "flops", OnnxCostModel(proto), groups, model)
    plan = round_plan(plan, scores, 8, mode="nearest", groups=groups)
    plan.method["input_shape"] = [1, 1, 28, 28]
    student = recalibrate_bn(prune_torch(model, plan, x1, proto), calib.inputs[:256])[0]
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    (folder / "teacher.pt").write_bytes(buf.getvalue())
    plan.save(folder / "plan.json")
    save_pruned_weights(student, plan, folder / "student.safetensors")


def worker(folder: Path, out: Path, steps: int) -> None:
    """One recovery (inside torchrun or not); rank 0 writes weights and samples/s."""
    from exporters.weights import load_pruned, save_pruned_weights
    from pipeline.models import SmallCNN
    from pipeline.plan import Plan
    from pipeline.recovery import RecoveryConfig, init_distributed, recover
    from pipeline.train import DEFAULT_WIDTH, default_data

    dist = init_distributed()
    plan = Plan.load(folder / "plan.json")
    teacher = SmallCNN(1, 10, DEFAULT_WIDTH)
    teacher.load_state_dict(torch.load(folder / "teacher.pt", weights_only=True))
    student = load_pruned(lambda: SmallCNN(1, 10, DEFAULT_WIDTH), plan,
                          folder / "student.safetensors")  # fmt: skip
    data = default_data("train")
    r = recover(student, teacher.eval(), data, None, RecoveryConfig(steps=steps),
                plan_digest=plan.digest(), progress=False)  # fmt: skip
    if dist.rank == 0:
        save_pruned_weights(r.model, plan, out)
        out.with_suffix(".json").write_text(json.dumps({"samples_per_second": r.samples_per_second,
                                                        "world": r.world_size}))  # fmt: skip


def outputs_compared(
    folder: Path, one: dict[str, torch.Tensor], two: dict[str, torch.Tensor]
) -> tuple[float, float]:
    """Largest logit difference and top-1 agreement of the two results on 1,000 test images."""
    from exporters.weights import load_pruned
    from pipeline.models import SmallCNN
    from pipeline.train import DEFAULT_WIDTH, default_data

    x = torch.from_numpy(default_data("test").inputs[:1000])
    outs = []
    for state in (one, two):
        m = load_pruned(lambda: SmallCNN(1, 10, DEFAULT_WIDTH), folder / "plan.json",
                        folder / "student.safetensors")  # fmt: skip
        m.load_state_dict(state)
        with torch.no_grad():
            outs.append(m.eval()(x))
    return float((outs[0] - outs[1]).abs().max()), float(
        (outs[0].argmax(1) == outs[1].argmax(1)).float().mean()
    )


def plain_training(steps: int) -> float:
    from pipeline.train import default_data, default_model

    model = default_model(progress=False).train()
    data = default_data("train")
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x, y = torch.from_numpy(data.inputs[:128]), torch.from_numpy(data.labels[:128])
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * 128 / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(Path(args.worker[0]), Path(args.worker[1]), args.steps)
        return
    torch.set_num_threads(2)
    plain = plain_training(args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        prepare(folder)
        me = [sys.executable, "-m", "bench.bench_recovery_ddp", "--steps", str(args.steps)]
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        runs = {
            "one": (["env", "OMP_NUM_THREADS=2", *me], 1),
            "two": (["env", "OMP_NUM_THREADS=1", torchrun, "--standalone", "--nproc_per_node",
                     "2", "-m", "bench.bench_recovery_ddp", "--steps", str(args.steps)], 2),
        }  # fmt: skip
        got = {}
        for name, (cmd, _) in runs.items():
            out = folder / f"{name}.safetensors"
            subprocess.run([*cmd, "--worker", str(folder), str(out)], check=True, cwd=REPO,
                           env={**os.environ}, capture_output=True)  # fmt: skip
            got[name] = (load_file(out), json.loads(out.with_suffix(".json").read_text()))
        diff = max(float((got["one"][0][k] - got["two"][0][k]).abs().max()) for k in got["one"][0])
        logits, agree = outputs_compared(folder, got["one"][0], got["two"][0])
    one, two = got["one"][1]["samples_per_second"], got["two"][1]["samples_per_second"]
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines()
                       if ln.startswith("Model name")), "unknown")  # fmt: skip
    text = f"""# Recovery throughput and torchrun scaling

Command: `.venv/bin/python -m bench.bench_recovery_ddp --steps {args.steps}`\n
Date: {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}; machine: {model_name}, 2 cores.

Model: the built-in default (SmallCNN width 32) pruned as `make deploy` prunes it; recovery
{args.steps} steps of 128 images (AdamW, frozen BN, shift augmentation), no held-out checks.

| what | samples/s | ratio |
|---|---|---|
| plain training step of the unpruned model (2 threads) | {plain:.0f} | 1.00 |
| recover(), 1 process, 2 threads | {one:.0f} | {one / plain:.2f} of plain training |
| recover(), torchrun 2 processes x 1 thread (gloo, loopback) | {two:.0f} | {two / one:.2f}x the 1-process run |

Largest weight difference, 2 processes vs 1: {diff:.2e}; largest logit difference on 1,000
test images {logits:.2e}, top-1 agreement {agree:.4f}. The 2-process test (12 AdamW steps on
the digits net) holds weights within 1e-5; over longer runs AdamW's normalised step turns the
different summation order of the all-reduce into differences up to about one learning rate
(1e-3) on weights whose gradient is near zero, which the outputs barely show.
recover() runs a teacher forward pass per step on top of the pruned student's forward and
backward, and augments the batch. On 2 cores the two processes share the cores the one
process used, so the scaling shows the cost of the gradient all-reduce, not more hardware.
"""
    (ROOT / "RESULTS-recovery-ddp.md").write_text(text)
    print(text)


if __name__ == "__main__":
    np.random.seed(0)
    main()
