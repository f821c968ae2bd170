"""Export a torch model to one ONNX file whose initializers keep the torch parameter names.

The legacy (TorchScript) exporter is used because it names initializers after the parameters
('layer1.0.conv1.weight'), so a plan keyed by torch layer names drives the ONNX surgery. Its
initializer de-duplication (which merges, e.g., every all-ones BatchNorm weight into one tensor
and loses the names) is switched off by exporting initializers as inputs first and removing
them from the graph inputs afterwards. Constant folding stays off so no parameter is pre-folded.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from calibration.fileio import atomic_write_bytes
from exporters.errors import ExportError
from pipeline.plan import ModelFingerprint

_TWO_GB = 2**31 - 1
MIN_OPSET = 17
MAX_OPSET = 20  # torch.onnx's TorchScript exporter writes up to opset 20
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def export_onnx(
    model: nn.Module,
    example_input: torch.Tensor,
    path: str | os.PathLike | None,
    opset: int = 17,
) -> onnx.ModelProto:
    """Export `model` (in eval mode, dynamic batch axis) to a single ONNX file at `path`.

    Returns the ModelProto. `path=None` exports in memory only. The user's model is left as it
    was (training flag restored).
    """
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(
            f"opset {opset} is not supported; fair-edge exports opset {MIN_OPSET} to {MAX_OPSET} "
            "(the range of torch's TorchScript ONNX exporter that keeps parameter names)"
        )
    was_training = model.training
    model.eval()
    buf = io.BytesIO()
    try:
        names = output_names(model, example_input)
        with warnings.catch_warnings(), torch.no_grad(), _mha_fastpath_off():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (example_input,),
                buf,
                dynamo=False,
                do_constant_folding=False,
                opset_version=opset,
                input_names=["input"],
                output_names=names,
                dynamic_axes={"input": {0: "batch"}, **{n: {0: "batch"} for n in names}},
                keep_initializers_as_inputs=True,
            )
    except Exception as exc:  # torch raises many types; report them as one clear line
        raise ExportError(
            f"torch.onnx.export failed for {type(model).__name__}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}; check the example input shape"
        ) from exc
    finally:
        model.train(was_training)
    proto = onnx.load_from_string(buf.getvalue())
    _drop_initializer_inputs(proto)
    data = proto.SerializeToString()
    if len(data) > _TWO_GB:
        raise ExportError("model is larger than 2 GB; single-file ONNX cannot hold it")
    if path is not None:
        atomic_write_bytes(Path(path), data)
    return proto


def output_names(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """ONNX output names: 'output' for one tensor; dict keys (or output0, output1, ...) for a
    dict, tuple or list of tensors (segmentation's {'out': ...}, a detector's raw heads)."""
    with torch.no_grad():
        out = model(example_input)
    if isinstance(out, torch.Tensor):
        return ["output"]
    if isinstance(out, dict) and all(isinstance(v, torch.Tensor) for v in out.values()):
        keys = [str(k) for k in out]
        return ["output"] if len(keys) == 1 else keys
    if isinstance(out, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in out):
        return ["output"] if len(out) == 1 else [f"output{i}" for i in range(len(out))]
    raise ExportError(
        f"{type(model).__name__} returns {type(out).__name__}, not a tensor or a flat dict/tuple "
        "of tensors; wrap it to return the tensors to deploy"
    )


def flat_outputs(out: Any) -> list[np.ndarray]:
    """A model's outputs as float32 arrays in ONNX output order (a tensor, dict values, tuple)."""
    items = list(out.values()) if isinstance(out, dict) else out
    items = items if isinstance(items, (tuple, list)) else [items]
    return [t.detach().float().cpu().numpy() for t in items]


@contextlib.contextmanager
def _mha_fastpath_off() -> Iterator[None]:
    """Trace nn.MultiheadAttention / TransformerEncoder through their plain ops, then restore.

    Under no_grad in eval mode they take a fused kernel (aten::_native_multi_head_attention)
    that the ONNX exporter cannot translate, so e.g. torchvision's ViT would not export.
    """
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(was)


def _drop_initializer_inputs(proto: onnx.ModelProto) -> None:
    """Remove initializers from the graph inputs (the exporter put them there, see module doc)."""
    inits = {t.name for t in proto.graph.initializer}
    keep = [copy.deepcopy(i) for i in proto.graph.input if i.name not in inits]
    del proto.graph.input[:]
    proto.graph.input.extend(keep)


def layer_initializers(proto: onnx.ModelProto) -> dict[str, list[str]]:
    """Map each torch layer name ('features.0.0') to its initializer names ('features.0.0.weight', ...)."""
    out: dict[str, list[str]] = {}
    for t in proto.graph.initializer:
        if t.name.startswith("onnx::") or "." not in t.name:
            continue
        layer, _ = t.name.rsplit(".", 1)
        out.setdefault(layer, []).append(t.name)
    return out


def onnx_fingerprint_shapes(proto: onnx.ModelProto) -> dict[str, list[int]]:
    """Shapes of the initializers that are torch parameters (buffers and exporter constants left out)."""
    shapes = {}
    for t in proto.graph.initializer:
        if t.name.startswith("onnx::") or "." not in t.name:
            continue
        if t.name.rsplit(".", 1)[1] in BUFFER_SUFFIXES:
            continue
        if t.data_type not in (
            onnx.TensorProto.FLOAT,
            onnx.TensorProto.FLOAT16,
            onnx.TensorProto.DOUBLE,
        ):
            continue
        shapes[t.name] = [int(d) for d in t.dims]
    return shapes


def onnx_fingerprint(proto: onnx.ModelProto) -> ModelFingerprint:
    """The plan fingerprint of an ONNX export; equals ModelFingerprint.from_model of its torch model
    when every parameter is used by the forward pass."""
    return ModelFingerprint.from_shapes(onnx_fingerprint_shapes(proto))


def load_onnx(path: str | os.PathLike) -> onnx.ModelProto:
    """Read and check an ONNX file; one clear ExportError for anything wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"ONNX file {str(path)!r} does not exist")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ExportError(
            f"{str(path)!r} is not a readable ONNX model ({type(exc).__name__}); export it again"
        ) from exc
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    for t in proto.graph.initializer:
        if uses_external_data(t):
            location = ExternalDataInfo(t).location
            if not (path.parent / location).is_file():
                raise ExportError(
                    f"ONNX file {str(path)!r} refers to external data {location!r} that is missing; "
                    "keep the data file next to the model or re-export as a single file"
                )
    try:
        onnx.load_external_data_for_model(proto, str(path.parent))
    except Exception as exc:
        raise ExportError(
            f"external data of {str(path)!r} cannot be read ({type(exc).__name__}: {exc})"
        ) from exc
    check_model(proto, what=str(path))
    return proto


def check_model(proto: onnx.ModelProto, what: str = "model") -> None:
    """Run the ONNX checker; raise ExportError with its first line on failure."""
    if not isinstance(proto, onnx.ModelProto):
        raise ExportError(f"{what} is not an onnx.ModelProto (got {type(proto).__name__})")
    if len(proto.graph.node) == 0:
        raise ExportError(f"{what} is not an ONNX model (it has no graph nodes)")
    try:
        from exporters.graph_groups import skeleton

        onnx.checker.check_model(skeleton(proto))  # the structure, without serialising weights
    except Exception as exc:
        line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{what} fails the ONNX checker: {line}") from exc
