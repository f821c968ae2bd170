"""A small pruned network on real data (scikit-learn digits) for the recovery tests and the
torchrun script: teacher trained once, FAIR plan at 60% fewer FLOPs, pruned student saved."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from calibration.data import CalibrationSet
from calibration.loaders import load_digits
from calibration.sampling import balanced_sample
from exporters.costs import OnnxCostModel
from exporters.graph_groups import find_groups
from exporters.onnx_export import export_onnx
from exporters.torch_prune import prune_torch
from exporters.weights import load_pruned, save_pruned_weights
from pipeline.plan import Plan
from pipeline.planning import plan_for_budget
from pipeline.scoring import score
from pipeline.train import train


def digits_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 16, 10),
    )  # fmt: skip


@dataclass
class Prepared:
    teacher: nn.Module
    plan: Plan
    train: CalibrationSet
    heldout: CalibrationSet
    test: CalibrationSet
    folder: Path

    def student(self) -> nn.Module:
        return load_pruned(digits_net, self.plan, self.folder / "student.safetensors")


def splits() -> tuple[CalibrationSet, CalibrationSet, CalibrationSet]:
    data = load_digits()
    order = np.random.default_rng(0).permutation(len(data))
    return (data.subset(np.sort(order[:1100])), data.subset(np.sort(order[1100:1400])),
            data.subset(np.sort(order[1400:])))  # fmt: skip


def prepare(folder: Path) -> Prepared:
    """Train the teacher, plan and prune it, save teacher weights, plan and student."""
    tr, held, te = splits()
    teacher = digits_net()
    train(teacher, tr, epochs=12, batch_size=64, lr=5e-3, seed=0, progress=False)
    calib, _ = balanced_sample(tr, 16, 0)
    scores = score(teacher, calib, samples_per_class=16, progress=False)
    x1 = torch.from_numpy(calib.inputs[:1])
    proto = export_onnx(teacher, x1, None)
    plan = plan_for_budget(scores, 0.6, "flops", OnnxCostModel(proto), find_groups(proto), teacher,
                           strict=False)  # fmt: skip
    plan.method["input_shape"] = [1, 1, 8, 8]
    student = prune_torch(teacher, plan, x1, proto)
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(teacher.state_dict(), buf)
    (folder / "teacher.pt").write_bytes(buf.getvalue())
    plan.save(folder / "plan.json")
    save_pruned_weights(student, plan, folder / "student.safetensors")
    return Prepared(teacher, plan, tr, held, te, folder)


def load(folder: Path) -> Prepared:
    """What `prepare` saved, read back (as another process would)."""
    tr, held, te = splits()
    teacher = digits_net()
    teacher.load_state_dict(torch.load(folder / "teacher.pt", weights_only=True))
    return Prepared(teacher.eval(), Plan.load(folder / "plan.json"), tr, held, te, folder)
