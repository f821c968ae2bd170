"""What share of a model's parameters and FLOPs a plan keeps.

`CostModel` is the interface the budget planner searches with. The exporters provide the exact
implementation from the ONNX graph; `ScoresCostModel` is the fallback that needs nothing but the
Scores (weight shapes, output positions, which candidate feeds which layer, found on the autograd
graph at scoring time).

ScoresCostModel approximation: only Conv/Linear weights and biases and the BatchNorm right after a
layer change. A layer keeping a fraction ko of its output units and ki of its input channels keeps
ko*ki of its weights and MACs (ko only for grouped/depthwise convs, whose weights are per output
channel), ko of its bias and BN parameters. ki is the kept fraction of the candidate that feeds it
(through BN, activations, pooling, flatten); with several producers (a residual add) the largest,
which is exact when the producers are pruned as one channel group. FLOPs count Conv/Linear
multiply-accumulates only. Every other parameter is counted as kept.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

from pipeline.plan import Plan
from pipeline.scores import Scores


@runtime_checkable
class CostModel(Protocol):
    def remaining(self, plan: Plan) -> dict[str, float]:
        """{'params': fraction kept, 'flops': fraction kept} under `plan`."""
        ...


class ScoresCostModel:
    """Approximate params/FLOPs fractions from the Scores alone (see the module docstring)."""

    def __init__(self, scores: Scores) -> None:
        self.graph = scores.graph
        self.total_params = sum(math.prod(s) for s in scores.fingerprint.shapes.values())

    def _sizes(self, kept: dict[str, float]) -> tuple[float, float, float, float]:
        p_before = p_after = f_before = f_after = 0.0
        for name, g in self.graph.items():
            w = float(math.prod(g["weight_shape"]))
            n_out = g["weight_shape"][0]
            ko = kept.get(name, 1.0)
            ki = max((kept.get(p, 1.0) for p in g["producers"]), default=1.0)
            if g["groups"] > 1 and g["weight_shape"][1] == 1:
                ki = 1.0  # depthwise: its weight follows the output channels alone
            extra = (n_out if g["bias"] else 0) + g["per_channel_params"]
            p_before += w + extra
            p_after += w * ko * ki + extra * ko
            f_before += w * g["positions"]
            f_after += w * g["positions"] * ko * ki
        return p_before, p_after, f_before, f_after

    def remaining(self, plan: Plan) -> dict[str, float]:
        kept = {n: lp.kept / lp.n_units for n, lp in plan.layers.items() if lp.n_units}
        p_before, p_after, f_before, f_after = self._sizes(kept)
        other = max(0.0, self.total_params - p_before)
        params = (other + p_after) / (other + p_before) if (other + p_before) else 1.0
        flops = f_after / f_before if f_before else 1.0
        return {"params": params, "flops": flops}
