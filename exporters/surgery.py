"""ONNX graph surgery: remove a plan's channels from the exported model, then prove it.

The channel graph (exporters.graph_groups) lists every edit pruning needs; this module applies
them to a copy of the model (initializer slices, depthwise group counts, split sizes, slice
bounds, reshape constants), drops what became dead with onnx-graphsurgeon, runs strict shape
inference and the ONNX checker, and verifies against the masked original (exporters.verify)
before returning. Nothing is written unless everything passed.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from calibration.fileio import atomic_write_bytes
from exporters.attention import core_nodes
from exporters.costs import count_cost
from exporters.errors import SurgeryError
from exporters.graph_groups import (
    ChannelGraph,
    copy_without_initializers,
    grouped_weight,
    skeleton,
)
from exporters.onnx_export import check_model, onnx_fingerprint_shapes
from exporters.surgery_report import LayerRow, SurgeryReport
from exporters.verify import (
    DEFAULT_TOL,
    GraphWeights,
    as_feeds,
    check_runnable,
    check_verify_inputs,
    compare_models,
    compare_tensors,
    masked_original,
    random_inputs,
)
from pipeline.plan import Plan, PlanError


def check_fingerprint(onnx_model: onnx.ModelProto, plan: Plan) -> None:
    """Raise PlanError unless every torch parameter in the ONNX model has the plan's shape.

    The plan's fingerprint comes from the torch model (ModelFingerprint.from_model); the ONNX
    export carries the same parameters as initializers under the same names.
    """
    onnx_shapes = onnx_fingerprint_shapes(onnx_model)
    plan_shapes = plan.fingerprint.shapes
    for name, shape in sorted(onnx_shapes.items()):
        if name not in plan_shapes:
            raise PlanError(
                f"plan does not match the model: parameter {name!r} of the ONNX model is not in the "
                "plan's model; re-plan for this model"
            )
        if list(plan_shapes[name]) != shape:
            raise PlanError(
                f"plan does not match the model: parameter {name!r} has shape {shape} in the ONNX "
                f"model but {list(plan_shapes[name])} in the plan; re-plan for this model"
            )


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


class _Writer:
    """Edits constants of a model copy: in place when unshared, as a fresh initializer otherwise.

    Initializers are collected here and added once at the end, so no weight is copied twice.
    """

    def __init__(self, model: onnx.ModelProto, graph: ChannelGraph) -> None:
        self.model = model
        self.graph = graph
        self.replaced: dict[str, onnx.TensorProto] = {}
        self.added: list[onnx.TensorProto] = []
        self.consts = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}
        self.uses: dict[str, int] = defaultdict(int)
        for n in model.graph.node:
            for name in n.input:
                self.uses[name] += 1
        for o in model.graph.output:
            self.uses[o.name] += 1
        self.counter = 0

    def replace(self, name: str, arr: np.ndarray) -> None:
        if name in self.graph.init_names:
            self.replaced[name] = numpy_helper.from_array(arr, name)
        else:
            node = self.consts[name]
            for a in node.attribute:
                if a.name == "value":
                    a.t.CopyFrom(numpy_helper.from_array(arr))

    def fresh(self, node: onnx.NodeProto, input_idx: int, arr: np.ndarray) -> None:
        self.counter += 1
        new = f"{node.input[input_idx]}__fe{self.counter}"
        self.added.append(numpy_helper.from_array(arr, new))
        node.input[input_idx] = new

    def write_initializers(self) -> None:
        src = self.graph.model.graph.initializer
        self.model.graph.initializer.extend([self.replaced.get(t.name, t) for t in src])
        self.model.graph.initializer.extend(self.added)


def _take(arr: np.ndarray, index: list[Any]) -> np.ndarray:
    """arr restricted to the given index arrays per axis, in one copy."""
    axes = [k for k, ix in enumerate(index) if not isinstance(ix, slice)]
    if len(axes) == 1:
        return np.take(arr, index[axes[0]], axis=axes[0])
    full = [
        ix if not isinstance(ix, slice) else np.arange(arr.shape[k]) for k, ix in enumerate(index)
    ]
    return arr[np.ix_(*full)]


def build_pruned(graph: ChannelGraph, pruned: np.ndarray) -> onnx.ModelProto:
    """Apply the channel graph's edits for the pruned channels to a copy of the model."""
    model = copy_without_initializers(graph.model)
    nodes = model.graph.node
    for k, n in enumerate(nodes):
        if not n.name:
            n.name = f"fe_node_{k}"
    w = _Writer(model, graph)
    per_use: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = defaultdict(list)
    for s in graph.slices:
        keep = graph.kept(s.desc, pruned)
        if s.desc.block > 1:
            keep = np.repeat(keep, s.desc.block)
        per_use[(s.node_idx, s.input_idx)].append((s.axis, keep))
    by_name: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for (ni, ii), ops in per_use.items():
        if any(not k.all() for _, k in ops):
            by_name[nodes[ni].input[ii]].append((ni, ii))
    for name, uses in by_name.items():
        base = graph.const(name)
        results = []
        for ni, ii in uses:
            index: list[Any] = [slice(None)] * base.ndim
            key = []
            for axis, keep in sorted(per_use[(ni, ii)], key=lambda t: t[0]):
                if base.shape[axis] != keep.size:
                    raise SurgeryError(
                        f"internal: {name!r} axis {axis} has {base.shape[axis]} entries, expected {keep.size}"
                    )
                index[axis] = np.flatnonzero(keep)
                key.append((axis, keep.tobytes()))
            results.append(((ni, ii), tuple(key), _take(base, index)))
        if len({k for _, k, _ in results}) == 1 and len(uses) == w.uses[name]:
            w.replace(name, results[0][2])
        else:
            for (ni, ii), _, arr in results:
                w.fresh(nodes[ni], ii, arr)
    for gw in graph.grouped_weights:
        keep_in, keep_out = graph.kept(gw.in_desc, pruned), graph.kept(gw.out_desc, pruned)
        if keep_in.all() and keep_out.all():
            continue
        name = nodes[gw.node_idx].input[1]
        arr = grouped_weight(graph.const(name), keep_in, keep_out, gw.groups)
        if w.uses[name] == 1:
            w.replace(name, arr)
        else:
            w.fresh(nodes[gw.node_idx], 1, arr)
    for ni, desc in graph.group_attrs:
        kept = int(graph.kept(desc, pruned).sum())
        for a in nodes[ni].attribute:
            if a.name == "group":
                a.i = kept
    opset = _opset(model)
    for ni, outs, block in graph.split_sizes:
        sizes = np.array([int(graph.kept(o, pruned).sum()) * block for o in outs], dtype=np.int64)
        node = nodes[ni]
        if opset >= 13:
            keep_attrs = [a for a in node.attribute if a.name not in ("split", "num_outputs")]
            del node.attribute[:]
            node.attribute.extend(keep_attrs)
            if len(node.input) < 2:
                node.input.append("")
            if node.input[1] == "":
                node.input[1] = f"{node.name or 'split'}_sizes"
            w.fresh(node, 1, sizes)
        else:
            for a in node.attribute:
                if a.name == "split":
                    del a.ints[:]
                    a.ints.extend(sizes.tolist())
                    break
            else:
                node.attribute.append(onnx.helper.make_attribute("split", sizes.tolist()))
    for ni, pos, desc, s, e in graph.slice_bounds:
        keep = graph.kept(desc, pruned)
        ns = int(keep[:s].sum())
        ne = ns + int(keep[s:e].sum())
        node = nodes[ni]
        for k, val in ((1, ns), (2, ne)):
            arr = np.array(graph.const(graph.nodes[ni].input[k]), copy=True)
            arr[pos] = val
            w.fresh(node, k, arr)
    for sh in graph.shuffles:
        keep = graph.kept(sh.in_desc, pruned)
        if keep.all():
            continue  # the computed shapes still fit
        rank = np.cumsum(keep) - 1
        order = np.array([rank[i] for i in sh.perm if keep[i]], dtype=np.int64)
        node, first = nodes[sh.last], nodes[sh.first]
        node.op_type = "Gather"
        del node.attribute[:]
        node.attribute.append(onnx.helper.make_attribute("axis", 1))
        node.input[0] = first.input[0]
        w.fresh(node, 1, order)
    for ni, desc, s, e in graph.computed_slices:
        keep = graph.kept(desc, pruned)
        ns = int(keep[:s].sum())
        ne = ns + int(keep[s:e].sum())
        node = nodes[ni]
        w.fresh(node, 1, np.array([ns], dtype=np.int64))
        w.fresh(node, 2, np.array([ne], dtype=np.int64))
    for ni, axis, desc in graph.reshapes:
        node = nodes[ni]
        arr = np.array(graph.const(graph.nodes[ni].input[1]), copy=True)
        arr[axis] = int(graph.kept(desc, pruned).sum()) * desc.block
        w.fresh(node, 1, arr)
    _rebuild_attention(graph, pruned, model)
    w.write_initializers()
    del model.graph.value_info[:]
    return _finish(model)


def _rebuild_attention(graph: ChannelGraph, pruned: np.ndarray, model: onnx.ModelProto) -> None:
    """Replace each attention core that lost heads by the same attention over the kept heads
    (exporters.attention); its output keeps its name, the old core becomes dead and is dropped."""
    for att in graph.attentions.values():
        desc = graph.descs.get(att.out)
        if desc is None:
            continue
        kept = int(graph.kept(desc, pruned).sum()) // att.head_dim
        if kept == att.heads:
            continue
        old = model.graph.node[graph._producer_idx[att.out]]
        old.output[0] = f"{att.out}__fe_replaced"
        nodes = core_nodes(
            f"fe_attention_{att.in_node}",
            att.qkv,
            att.out,
            len(graph.shapes[att.qkv]),
            kept,
            att.head_dim,
            att.seq_axis,
            att.merged,
        )
        model.graph.node.extend(nodes)


def _finish(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop dead nodes and initializers (graphsurgeon on the weightless skeleton), infer shapes
    strictly and run the checker, then carry the inferred shapes over to the full model."""
    try:
        sk = skeleton(model)
        g = gs.import_onnx(sk)
        g.cleanup(remove_unused_graph_inputs=False).toposort()
        live = gs.export_onnx(g, do_type_check=False)
        live_names = {n.name for n in live.graph.node}
        order = {n.name: k for k, n in enumerate(live.graph.node)}
        nodes = []
        for n in sorted(
            (n for n in model.graph.node if n.name in live_names), key=lambda n: order[n.name]
        ):
            c = onnx.NodeProto()
            c.CopyFrom(n)
            nodes.append(c)
        used = {i for n in nodes for i in n.input} | {o.name for o in model.graph.output}
        out = model
        del out.graph.node[:]
        out.graph.node.extend(nodes)
        for k in reversed(range(len(out.graph.initializer))):
            if out.graph.initializer[k].name not in used:
                del out.graph.initializer[k]
        checked = onnx.shape_inference.infer_shapes(skeleton(out), strict_mode=True, data_prop=True)
        onnx.checker.check_model(checked)
        out.graph.value_info.extend(checked.graph.value_info)
    except Exception as exc:
        line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SurgeryError(
            f"pruned graph is invalid ({line}); the plan cannot be applied to this model"
        ) from exc
    return out


def _report(
    graph: ChannelGraph, pruned: np.ndarray, original: onnx.ModelProto, result: onnx.ModelProto
) -> SurgeryReport:
    before, after = count_cost(original), count_cost(result)
    cost_b, cost_a = before.by_layer(), after.by_layer()
    rows = []
    for prod in sorted(graph.producers.values(), key=lambda p: p.node_idx):
        if prod.layer is None:
            continue
        b, a = cost_b.get(prod.layer, {}), cost_a.get(prod.layer, {})
        rows.append(
            LayerRow(
                layer=prod.layer,
                op=prod.op,
                channels_before=len(prod.ids),
                channels_after=int((~pruned[graph.root[prod.ids]]).sum()),
                params_before=b.get("params", 0),
                params_after=a.get("params", 0),
                flops_before=b.get("flops", 0),
                flops_after=a.get("flops", 0),
            )
        )
    frozen = [
        {
            "group": g.group.name,
            "members": g.group.members,
            "channels": g.group.n_channels,
            "reason": g.group.reason,
        }
        for g in graph.groups
        if g.group.frozen
    ]
    return SurgeryReport(
        layers=rows,
        frozen=frozen,
        params_before=before.params,
        params_after=after.params,
        flops_before=before.flops,
        flops_after=after.flops,
    )


def apply_plan(
    onnx_model: onnx.ModelProto,
    plan: Plan,
    verify_inputs: object = None,
    tol: float = DEFAULT_TOL,
    graph: ChannelGraph | None = None,
) -> tuple[onnx.ModelProto, SurgeryReport]:
    """Prune `onnx_model` by `plan`; the result is verified against the masked original.

    Raises PlanError for a plan that does not fit, SurgeryError for a graph that cannot be
    pruned or verified (custom-domain ops, declared input shapes that do not fit the data or
    memory; checked before any surgery), VerificationError when the outputs differ beyond `tol`
    (see exporters.verify).
    `verify_inputs`: calibration inputs (array N x ... of which the first 64 samples are used in
    batches of 16, or of the model's static batch size, a feed dict, or a list of either); a
    seeded random batch, shaped like them, is always checked too.
    """
    check_model(onnx_model)
    if not isinstance(plan, Plan):
        raise PlanError(f"expected a pipeline.plan.Plan, got {type(plan).__name__}")
    check_fingerprint(onnx_model, plan)
    check_runnable(onnx_model)
    check_verify_inputs(onnx_model, verify_inputs)
    t0 = time.perf_counter()
    graph = graph or ChannelGraph(onnx_model)
    pruned = graph.pruned_roots(plan)
    result = build_pruned(graph, pruned)
    t1 = time.perf_counter()
    masked = masked_original(graph, pruned, weights=False)
    check = compare_models(
        masked, result, verify_inputs, tol=tol, reference_weights=GraphWeights(graph)
    )
    calib = as_feeds(result, verify_inputs)
    feed = random_inputs(result, seed=1, like=calib[0] if calib else None)
    check.tensors_compared, check.max_tensor_rel_diff = compare_tensors(
        graph, pruned, masked, result, feed, tol, reference_weights=GraphWeights(graph)
    )
    t2 = time.perf_counter()
    report = _report(graph, pruned, onnx_model, result)
    report.verification = check.to_json()
    report.timings = {"surgery_s": t1 - t0, "verify_s": t2 - t1}
    return result, report


def save_model(onnx_model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write a (verified) model atomically as one file."""
    atomic_write_bytes(path, onnx_model.SerializeToString())


def prune_onnx_file(
    src: str | os.PathLike,
    plan: Plan,
    dst: str | os.PathLike,
    verify_inputs: object = None,
    tol: float = DEFAULT_TOL,
) -> SurgeryReport:
    """Load, prune, verify and atomically write: on any error nothing is written at `dst`."""
    from exporters.onnx_export import load_onnx

    model = load_onnx(src)
    result, report = apply_plan(model, plan, verify_inputs=verify_inputs, tol=tol)
    save_model(result, dst)
    return report
