"""Parameter values between a pruned torch module, the pruned ONNX graph and a weights file.

Recovery and BatchNorm re-estimation change values, never the architecture, so the graph that
ships stays the surgery's: the new values go into the pruned ONNX model by initializer name (the
export keeps torch names), and ONNX Runtime must then compute what the torch module computes.

The pruned weights are also shipped for PyTorch users as safetensors (no pickle) beside the plan;
`load_pruned` rebuilds the pruned architecture from the user's own model factory and the plan,
then loads them, so training can go on in PyTorch.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from calibration.fileio import atomic_write_bytes, read_safetensors
from exporters.errors import ExportError, VerificationError
from exporters.onnx_export import flat_outputs
from exporters.verify import DEFAULT_TOL, ort_session
from pipeline.plan import Plan

WEIGHTS_SCHEMA = "fair-edge/pruned-weights"


@dataclass
class WriteBackReport:
    """How many tensors went into the graph, and ONNX Runtime against torch afterwards."""

    tensors: int
    max_abs_diff: float
    bound: float
    tolerance: float
    samples: int

    def to_json(self) -> dict[str, float | int]:
        return asdict(self)


def apply_tensors(
    proto: onnx.ModelProto, tensors: Mapping[str, np.ndarray], what: str
) -> onnx.ModelProto:
    """A copy of `proto` with the named initializers replaced; names and shapes must exist."""
    result = copy.deepcopy(proto)
    inits = {t.name: t for t in result.graph.initializer}
    missing = sorted(set(tensors) - set(inits))
    if missing:
        raise ExportError(
            f"the ONNX model has no initializer {missing[0]!r} (of {len(missing)} {what}): it was "
            "exported with constants folded or renamed; write the values before folding"
        )
    for name, value in tensors.items():
        old = inits[name]
        if tuple(old.dims) != tuple(value.shape):
            raise ExportError(
                f"{what} {name!r} has shape {list(value.shape)} but the ONNX model holds "
                f"{list(old.dims)}: the torch model and the ONNX model were pruned by different plans"
            )
        dtype = onnx.helper.tensor_dtype_to_np_dtype(old.data_type)
        old.CopyFrom(numpy_helper.from_array(np.asarray(value).astype(dtype), name))
    return result


def model_tensors(model: nn.Module, names: set[str]) -> dict[str, np.ndarray]:
    """The module's parameters and floating buffers that the graph holds, as float32 arrays."""
    state = model.state_dict()
    return {
        k: v.detach().float().cpu().numpy().copy()
        for k, v in state.items()
        if k in names and v.is_floating_point()
    }


def check_matches_torch(
    proto: onnx.ModelProto,
    model: nn.Module,
    inputs: np.ndarray,
    what: str,
    tol: float = DEFAULT_TOL,
) -> tuple[float, float]:
    """ONNX Runtime vs the torch module on `inputs`: max |onnx - torch| <= tol * max(1, max|torch|)."""
    x = np.ascontiguousarray(np.asarray(inputs, dtype=np.float32))
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    was = model.training
    model.eval()
    with torch.no_grad():
        refs = flat_outputs(model(torch.from_numpy(x).to(dtype=dtype)))
    model.train(was)
    sess = ort_session(proto)
    gots = sess.run(None, {sess.get_inputs()[0].name: x})
    diff = max(
        (
            float(np.max(np.abs(np.asarray(g, np.float32) - r)))
            for g, r in zip(gots, refs, strict=True)
            if r.size
        ),
        default=0.0,
    )
    bound = tol * max([1.0] + [float(np.max(np.abs(r))) for r in refs if r.size])
    if not diff <= bound:
        raise VerificationError(
            f"after {what} the ONNX model differs from the torch model by {diff:.3g} (allowed "
            f"{bound:.3g}); report this model to fair-edge"
        )
    return diff, bound


def write_back(
    model: nn.Module,
    proto: onnx.ModelProto,
    verify_inputs: np.ndarray,
    what: str = "recovery",
    tol: float = DEFAULT_TOL,
) -> tuple[onnx.ModelProto, WriteBackReport]:
    """Every parameter (and BatchNorm statistic) of `model` written into `proto`, then verified.

    Every trainable parameter must have its initializer in the graph: a parameter the graph does
    not hold by name would mean the shipped model silently keeps old values.
    """
    inits = {t.name for t in proto.graph.initializer}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    absent = [n for n in trainable if n not in inits]
    if absent:
        raise ExportError(
            f"the pruned ONNX graph has no initializer for parameter {absent[0]!r} (of "
            f"{len(absent)}): export with fair-edge's exporter (constant folding off) so names stay"
        )
    tensors = model_tensors(model, inits)
    result = apply_tensors(proto, tensors, "parameters")
    diff, bound = check_matches_torch(result, model, verify_inputs, what, tol)
    return result, WriteBackReport(len(tensors), diff, bound, tol, len(verify_inputs))


# ------------------------------------------------------------------------------ weights file


def save_pruned_weights(model: nn.Module, plan: Plan, path: str | os.PathLike) -> Path:
    """The pruned module's state_dict as safetensors, tagged with the plan's digest (atomic)."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    meta = {"schema": WEIGHTS_SCHEMA, "plan": plan.digest()}
    return atomic_write_bytes(path, save(state, metadata=meta))


def load_pruned(
    model: nn.Module | Callable[[], nn.Module],
    plan: Plan | str | os.PathLike,
    weights: str | os.PathLike,
    example_input: torch.Tensor | None = None,
) -> nn.Module:
    """The user's architecture, pruned by `plan`, with the shipped (recovered) weights loaded.

    `model` is the unpruned module or a factory that builds it; any weights it holds are
    replaced. The example input defaults to the plan's recorded input shape.
    """
    from exporters.torch_prune import prune_torch

    the_plan = plan if isinstance(plan, Plan) else Plan.load(plan)
    base = model() if callable(model) and not isinstance(model, nn.Module) else model
    try:
        state, meta = read_safetensors(weights)
    except Exception as exc:
        raise ExportError(
            f"pruned weights {os.fspath(weights)!r} cannot be read ({type(exc).__name__}); give "
            "the bundle's weights.safetensors"
        ) from exc
    if meta.get("schema") != WEIGHTS_SCHEMA or meta.get("plan") != the_plan.digest():
        raise ExportError(
            f"pruned weights {os.fspath(weights)!r} were not written for this plan; give the "
            "plan.json from the same bundle"
        )
    pruned = prune_torch(base, the_plan, example_input=example_input, verify=False)
    try:
        pruned.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise ExportError(
            f"pruned weights do not fit the architecture pruned by the plan ({first}); use the "
            "model factory the plan was made for"
        ) from exc
    return pruned.eval()
