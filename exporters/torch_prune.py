"""Prune a torch module physically by the same plan and the same channel graph as the ONNX surgery.

The channel graph found on the module's ONNX export lists every initializer slice pruning
needs; the initializers carry the torch parameter and buffer names, so the same slices apply
to a deep copy of the module's tensors. Module attributes (Conv in/out channels and groups,
BatchNorm num_features, Linear in/out features) are then set from the new tensor shapes. The
result is checked against the masked original ONNX model in ONNX Runtime.
"""

from __future__ import annotations

import copy
from collections import defaultdict

import numpy as np
import onnx
import torch
from torch import nn

from exporters.errors import SurgeryError
from exporters.graph_groups import ChannelGraph, grouped_weight
from exporters.onnx_export import export_onnx, flat_outputs
from exporters.torch_attention import replace_attention
from exporters.verify import DEFAULT_TOL, GraphWeights, _Runner, masked_original
from pipeline.plan import Plan, PlanError


def _example(plan: Plan, example_input: torch.Tensor | None) -> torch.Tensor:
    if example_input is not None:
        return example_input
    shape = plan.method.get("input_shape") if isinstance(plan.method, dict) else None
    if not shape:
        raise PlanError(
            "prune_torch needs an example input (or plan.method['input_shape']) to trace the model"
        )
    return torch.randn(*[int(s) for s in shape])


def prune_torch(
    model: nn.Module,
    plan: Plan,
    example_input: torch.Tensor | None = None,
    onnx_model: onnx.ModelProto | None = None,
    verify: bool = True,
    tol: float = DEFAULT_TOL,
) -> nn.Module:
    """A physically smaller deep copy of `model` with the plan's channels removed (eval mode).

    `onnx_model` is the export of `model` (made here from `example_input` when not given).
    With `verify`, the result's outputs are compared with the masked original ONNX model.
    """
    plan.check_model(model)
    x = _example(plan, example_input)
    if onnx_model is None:
        onnx_model = export_onnx(model, x, None)
    graph = ChannelGraph(onnx_model)
    pruned = graph.pruned_roots(plan)
    new = copy.deepcopy(model).eval()
    tensors: dict[str, torch.Tensor] = dict(new.named_parameters())
    tensors.update(dict(new.named_buffers()))
    edits: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
    for s in graph.slices:
        keep = graph.kept(s.desc, pruned)
        if keep.all():
            continue
        keep = np.repeat(keep, s.desc.block) if s.desc.block > 1 else keep
        name = graph.nodes[s.node_idx].input[s.input_idx]
        if name not in tensors:
            raise SurgeryError(
                f"ONNX constant {name!r} has no torch parameter of that name; this model cannot be "
                "pruned in torch (prune the ONNX export instead)"
            )
        prev = edits[name].get(s.axis)
        if prev is not None and not np.array_equal(prev, keep):
            raise SurgeryError(f"parameter {name!r} would be sliced two different ways")
        edits[name][s.axis] = keep
    for name, by_axis in edits.items():
        t = tensors[name].detach()
        for axis, keep in sorted(by_axis.items()):
            if t.shape[axis] != keep.size:
                raise SurgeryError(
                    f"parameter {name!r} axis {axis} has {t.shape[axis]} entries, expected {keep.size}"
                )
            t = t.index_select(axis, torch.from_numpy(np.flatnonzero(keep)))
        prefix, attr = name.rsplit(".", 1) if "." in name else ("", name)
        mod = new.get_submodule(prefix)
        if attr in mod._parameters:
            mod._parameters[attr] = nn.Parameter(
                t.clone(), requires_grad=tensors[name].requires_grad
            )
        else:
            mod._buffers[attr] = t.clone()
    for gw in graph.grouped_weights:
        keep_in, keep_out = graph.kept(gw.in_desc, pruned), graph.kept(gw.out_desc, pruned)
        if keep_in.all() and keep_out.all():
            continue
        name = graph.nodes[gw.node_idx].input[1]
        mod = new.get_submodule(name.rsplit(".", 1)[0])
        w = grouped_weight(mod.weight.detach().numpy(), keep_in, keep_out, gw.groups)
        mod.weight = nn.Parameter(
            torch.from_numpy(w.copy()), requires_grad=mod.weight.requires_grad
        )
        edits.setdefault(name, {})
    for ni, desc in graph.group_attrs:
        weight = graph.nodes[ni].input[1]
        mod = new.get_submodule(weight.rsplit(".", 1)[0])
        mod.groups = int(graph.kept(desc, pruned).sum())
    touched = {n.rsplit(".", 1)[0] for n in edits} | {
        graph.nodes[ni].input[1].rsplit(".", 1)[0] for ni, _ in graph.group_attrs
    }
    for prefix in touched:
        _fix_attributes(new.get_submodule(prefix))
    for att in graph.attentions.values():
        desc = graph.descs.get(att.out)
        kept = att.heads if desc is None else int(graph.kept(desc, pruned).sum()) // att.head_dim
        if kept < att.heads:
            replace_attention(new, att.module, kept)
    if verify:
        _check(graph, pruned, new, x, tol)
    return new


def _fix_attributes(mod: nn.Module) -> None:
    """Set the shape attributes a module's forward and repr read from its (sliced) tensors."""
    if isinstance(mod, nn.modules.conv._ConvNd):
        w = mod.weight
        if mod.transposed:
            mod.in_channels, mod.out_channels = w.shape[0], w.shape[1] * mod.groups
        else:
            mod.out_channels, mod.in_channels = w.shape[0], w.shape[1] * mod.groups
    elif isinstance(mod, nn.Linear):
        mod.out_features, mod.in_features = mod.weight.shape
    elif isinstance(mod, nn.modules.batchnorm._NormBase):
        ref = mod.weight if mod.weight is not None else mod.running_mean
        mod.num_features = ref.shape[0]
    elif isinstance(mod, nn.PReLU):
        mod.num_parameters = mod.weight.numel()


def _check(
    graph: ChannelGraph, pruned: np.ndarray, new: nn.Module, x: torch.Tensor, tol: float
) -> None:
    """The pruned module must compute what the masked original ONNX model computes."""
    runner = _Runner(masked_original(graph, pruned, weights=False), GraphWeights(graph))
    inits = graph.init_names
    input_name = next(i.name for i in graph.model.graph.input if i.name not in inits)
    feed_x = torch.randn(
        (2, *x.shape[1:]), generator=torch.Generator().manual_seed(0), dtype=x.dtype
    )
    refs = runner.run({input_name: feed_x.numpy()})
    try:
        with torch.no_grad():
            outs = flat_outputs(new(feed_x))
    except Exception as exc:
        raise SurgeryError(
            f"the pruned torch module fails to run ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "its code likely hard-codes channel counts"
        ) from exc
    if len(outs) != len(refs) or any(o.shape != r.shape for o, r in zip(outs, refs, strict=False)):
        raise SurgeryError(
            "the pruned torch module's outputs do not have the pruned ONNX graph's shapes; "
            "its code likely hard-codes channel counts"
        )
    diff = max(float(np.max(np.abs(r - o))) for r, o in zip(refs, outs, strict=True))
    lim = tol * max(1.0, max(float(np.max(np.abs(r))) for r in refs))
    if not diff <= lim:
        raise SurgeryError(
            f"the pruned torch module differs from the masked original by {diff:.3g} > {lim:.3g}; "
            "its code likely hard-codes channel counts"
        )
