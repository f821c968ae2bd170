"""One call for the common case: `prune(model, example_inputs, data, target=0.5)`.

It does what the command line's stages do, in memory: export to ONNX (parameter names kept),
find the channel groups on that graph (residual adds, depthwise convs: the part that is easy to
forget by hand), score on a class-balanced draw of the data, plan (a ToD level, or the share of
FLOPs/params to remove), round, cut the channels out of the ONNX graph and verify it against the
masked original, and build the physically smaller PyTorch module (verified too).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from calibration.data import CalibrationSet
from calibration.errors import FairEdgeError
from calibration.fileio import atomic_write_bytes
from pipeline.controls import PlanControls
from pipeline.groups import ChannelGroup
from pipeline.plan import Plan
from pipeline.scores import Scores

VERIFY_SAMPLES = 64


@dataclass
class PruneResult:
    """What `prune` made: the plan, both ONNX graphs, the surgery report and the pruned module."""

    plan: Plan
    scores: Scores
    groups: list[ChannelGroup]
    original: onnx.ModelProto
    pruned: onnx.ModelProto
    surgery: Any  # exporters.surgery_report.SurgeryReport
    model: nn.Module
    sampling: dict[str, Any]

    @property
    def flops_kept(self) -> float:
        return self.surgery.flops_after / max(1, self.surgery.flops_before)

    @property
    def params_kept(self) -> float:
        return self.surgery.params_after / max(1, self.surgery.params_before)

    def save(self, folder: str | os.PathLike = ".") -> dict[str, Path]:
        """Write model.onnx (the unpruned export), pruned.onnx and plan.json (atomically)."""
        out = Path(folder)
        paths = {
            "original": out / "model.onnx",
            "pruned": out / "pruned.onnx",
            "plan": out / "plan.json",
        }
        atomic_write_bytes(paths["original"], self.original.SerializeToString())
        atomic_write_bytes(paths["pruned"], self.pruned.SerializeToString())
        self.plan.save(paths["plan"])
        return paths


def _as_set(data: Any) -> CalibrationSet:
    if isinstance(data, CalibrationSet):
        return data
    if isinstance(data, str | os.PathLike):
        from calibration.loaders import load_data

        return load_data(data)
    if isinstance(data, tuple | list) and len(data) == 2:
        x, y = data
        to_np = lambda v: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v  # noqa: E731
        return CalibrationSet(np.asarray(to_np(x)), None if y is None else np.asarray(to_np(y)))
    raise FairEdgeError(
        "data must be a CalibrationSet, an (inputs, labels) pair, or a data spec like 'digits'"
    )


def prune(
    model: nn.Module,
    example_inputs: torch.Tensor,
    data: Any,
    target: float | None = None,
    *,
    tod: float | None = None,
    metric: str = "flops",
    allocation: str = "tod",
    ignore_layers: Sequence[str] | str | None = None,
    max_layer_ratio: float | None = None,
    layer_ratio_caps: Mapping[str, float] | None = None,
    round_to: int | None = None,
    round_mode: str | None = None,
    samples_per_class: int = 32,
    projections: int = 128,
    seed: int = 0,
    opset: int = 17,
    progress: bool = False,
) -> PruneResult:
    """Prune `model` with FAIR: remove a `target` share of `metric`, or prune at ToD level `tod`
    (0.05 when neither is given). `data`: labelled (or unlabelled: the model's own top-1 is
    used) calibration data. `ignore_layers`/`max_layer_ratio`/`layer_ratio_caps` keep layers
    out or cap them (see pipeline.controls); `allocation` spreads a `target` over layers
    (pipeline.planning: 'tod', 'tod-capped:M', 'blend:W'); `round_to` rounds kept channels to a multiple
    (`round_mode` nearest for a target, up for a ToD level, by default). The model itself is
    not changed."""
    from calibration.sampling import balanced_sample
    from exporters.costs import OnnxCostModel
    from exporters.graph_groups import find_groups
    from exporters.onnx_export import export_onnx
    from exporters.surgery import apply_plan
    from exporters.torch_prune import prune_torch
    from pipeline.planning import plan, plan_for_budget
    from pipeline.rounding import round_plan
    from pipeline.scoring import score

    if target is not None and tod is not None:
        raise FairEdgeError("give either target= or tod=, not both")
    cs = _as_set(data)
    sampling: dict[str, Any] = {"samples": len(cs), "label_source": cs.label_source}
    if cs.labels is not None:
        cs, report = balanced_sample(cs, samples_per_class, seed)
        sampling = {**report.to_json(), "samples": len(cs), "label_source": cs.label_source}
    controls = PlanControls.of(ignore_layers, max_layer_ratio, layer_ratio_caps)
    proto = export_onnx(model, example_inputs, None, opset=opset)
    groups = find_groups(proto)
    cost = OnnxCostModel(proto)
    scoring_data: Any = cs if cs.labels is not None else (torch.from_numpy(cs.inputs), None)
    scores = score(model, scoring_data, samples_per_class=samples_per_class,
                   projections=projections, seed=seed, progress=progress)  # fmt: skip
    if target is not None:
        p = plan_for_budget(scores, target, metric, cost=cost, groups=groups, model=model,
                            controls=controls, allocation=allocation)  # fmt: skip
    else:
        p = plan(scores, 0.05 if tod is None else tod, groups=groups, model=model,
                 controls=controls)  # fmt: skip
    if round_to is not None and round_to > 1:
        mode = round_mode or ("nearest" if target is not None else "up")
        p = round_plan(p, scores, round_to, mode=mode, groups=groups, cost=cost)
    p.method["export"] = {"opset": opset}
    p.method.setdefault("input_shape", [1, *example_inputs.shape[1:]])
    verify_x = cs.inputs[:VERIFY_SAMPLES]
    pruned, report = apply_plan(proto, p, verify_inputs=verify_x)
    module = prune_torch(model, p, example_inputs, proto)
    return PruneResult(p, scores, groups, proto, pruned, report, module, sampling)
