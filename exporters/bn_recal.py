"""Re-estimate BatchNorm statistics of a pruned model on the calibration inputs (no training).

Removing channels changes what every later layer sees, so the running mean and variance stored
in its BatchNorm layers go stale, and a one-shot pruned network can lose most of its accuracy
for that reason alone. One forward pass over the calibration inputs with the BatchNorm layers
collecting statistics (cumulative average, as `torch.nn.BatchNorm` does with momentum None)
refreshes them. No weight or bias is changed and no gradient is taken: this is not fine-tuning.

The new statistics are written into the pruned ONNX model by initializer name (the export keeps
torch buffer names), and the result is checked against the recalibrated torch model in ONNX
Runtime with the surgery's tolerance.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import numpy as np
import onnx
import torch
from torch import nn

from exporters.errors import ExportError
from exporters.verify import DEFAULT_TOL
from exporters.weights import apply_tensors, check_matches_torch

_STATS = ("running_mean", "running_var")


@dataclass
class BnRecalReport:
    """What the recalibration did: layers, samples, and the ONNX-vs-torch check."""

    layers: int
    samples: int
    batch_size: int
    max_abs_diff: float
    tolerance: float

    def to_json(self) -> dict[str, float | int]:
        return asdict(self)


def batchnorm_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    }


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module, inputs: np.ndarray, batch_size: int = 64
) -> tuple[nn.Module, dict[str, np.ndarray]]:
    """A copy of `model` whose BatchNorm running statistics come from `inputs`.

    Returns the copy (eval mode) and its new statistics keyed by buffer name
    (`<layer>.running_mean`, `<layer>.running_var`). Dropout and every other module stay in eval
    mode during the pass; only the BatchNorm layers collect statistics.
    """
    x = np.asarray(inputs)
    if x.ndim < 2 or len(x) < 2:
        raise ExportError(
            f"BatchNorm recalibration needs at least 2 calibration samples, got {len(x)}"
        )
    if not np.all(np.isfinite(x)):
        raise ExportError("BatchNorm recalibration: the calibration inputs contain NaN or inf")
    if batch_size < 2:
        raise ExportError(f"BatchNorm recalibration needs batches of 2 or more, got {batch_size}")
    out = copy.deepcopy(model).eval()
    bns = batchnorm_layers(out)
    if not bns:
        raise ExportError(
            "the model has no BatchNorm layer with running statistics: nothing to recalibrate; "
            "drop --recalibrate-bn"
        )
    for m in bns.values():
        m.reset_running_stats()
        m.momentum = None
        m.train()
    param = next(out.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    # a last batch of one sample has no variance: fold it into the batch before
    starts = list(range(0, len(x), batch_size))
    if len(x) - starts[-1] < 2 and len(starts) > 1:
        starts.pop()
    for i, s in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(x)
        out(torch.from_numpy(np.ascontiguousarray(x[s:end])).to(device=device, dtype=dtype))
    out.eval()
    stats = {
        f"{name}.{stat}": getattr(m, stat).detach().float().cpu().numpy().copy()
        for name, m in bns.items()
        for stat in _STATS
    }
    return out, stats


def apply_bn_stats(proto: onnx.ModelProto, stats: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of `proto` with the named BatchNorm statistic initializers replaced."""
    return apply_tensors(proto, stats, "BatchNorm statistics")


def recalibrate_onnx(
    pruned_torch: nn.Module,
    pruned_onnx: onnx.ModelProto,
    inputs: np.ndarray,
    verify_inputs: np.ndarray,
    batch_size: int = 64,
    tol: float = DEFAULT_TOL,
) -> tuple[nn.Module, onnx.ModelProto, BnRecalReport]:
    """Recalibrate `pruned_torch` on `inputs`, write its statistics into `pruned_onnx`, verify.

    `pruned_torch` and `pruned_onnx` must be the same pruned network (exporters.torch_prune and
    exporters.surgery by one plan). Raises VerificationError when ONNX Runtime's outputs differ
    from the recalibrated torch model's by more than tol * max(1, max|torch|).
    """
    model, stats = recalibrate_bn(pruned_torch, inputs, batch_size)
    proto = apply_bn_stats(pruned_onnx, stats)
    diff, _ = check_matches_torch(proto, model, verify_inputs, "BatchNorm recalibration", tol)
    report = BnRecalReport(
        layers=len(stats) // 2,
        samples=len(inputs),
        batch_size=batch_size,
        max_abs_diff=diff,
        tolerance=tol,
    )
    return model, proto, report
