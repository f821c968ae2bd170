"""One shared parameter and FLOP counter over an ONNX graph, and the exact plan cost model.

Conventions (per sample, batch = 1): FLOPs of Conv, ConvTranspose, Gemm and MatMul are
multiply-accumulates (the fvcore convention, bias adds not counted); BatchNormalization and
InstanceNormalization, elementwise ops and Softmax count one per output element; pooling counts
the kernel size per output element (global pooling: one per input element); reductions one per
input element. Parameters are the float initializers a node reads, each counted once, except the
BatchNorm running mean and variance (buffers in torch, so the count matches torch's parameters).

`OnnxCostModel.remaining(plan)` needs no surgery: every counted cost is linear in the kept
fraction of the node's output channels, or (for channel-mixing layers) in the product of its
input and output kept fractions, so the pruned totals follow analytically from the channel
graph. The test suite checks it equals `count_cost` of the actual pruned model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from exporters.graph_groups import (
    _FOLDABLE,
    BROADCAST_OPS,
    MIXING_KINDS,
    POOL_OPS,
    REDUCE_OPS,
    UNARY_OPS,
    ChannelGraph,
    add_weights_as_inputs,
    copy_without_initializers,
    eval_node,
    inferred_shapes,
    layer_name_of,
)
from pipeline.plan import Plan

_FLOAT_TYPES = (
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.BFLOAT16,
)
_NO_FLOP_UNARY = frozenset({"Identity", "Dropout", "Cast"})


@dataclass
class NodeCost:
    """Parameters and FLOPs of one node; `weight_params` is the part in input 1 (conv/gemm weight)."""

    node: str
    op: str
    layer: str | None
    params: int
    weight_params: int
    flops: int


@dataclass
class CostSummary:
    nodes: list[NodeCost]

    @property
    def params(self) -> int:
        return sum(n.params for n in self.nodes)

    @property
    def flops(self) -> int:
        return sum(n.flops for n in self.nodes)

    def by_layer(self) -> dict[str, dict[str, int]]:
        """Costs of the weight-bearing nodes keyed by torch layer name."""
        out: dict[str, dict[str, int]] = {}
        for n in self.nodes:
            if n.layer:
                row = out.setdefault(n.layer, {"params": 0, "flops": 0})
                row["params"] += n.params
                row["flops"] += n.flops
        return out

    def to_json(self) -> dict:
        return {
            "params": self.params,
            "flops": self.flops,
            "nodes": [asdict(n) for n in self.nodes],
        }


def _dims(shape: list[int | None] | None) -> list[int] | None:
    if shape is None:
        return None
    return [1 if d is None else int(d) for d in shape]


def _numel(shape: list[int | None] | None) -> int:
    s = _dims(shape)
    return 0 if s is None else int(np.prod(s, dtype=np.int64))


def _node_flops(
    node: onnx.NodeProto, shapes: dict[str, list[int | None]], weight_shape: list[int] | None
) -> int:
    op = node.op_type
    out = shapes.get(node.output[0]) if node.output else None
    inp = shapes.get(node.input[0]) if node.input else None
    if op == "Conv" and weight_shape is not None:
        return _numel(out) * int(np.prod(weight_shape[1:], dtype=np.int64))
    if op == "ConvTranspose" and weight_shape is not None:
        return _numel(inp) * int(np.prod(weight_shape[1:], dtype=np.int64))
    if op in ("Gemm", "MatMul"):
        if weight_shape is not None and len(weight_shape) == 2:
            trans_b = op == "Gemm" and any(x.name == "transB" and x.i for x in node.attribute)
            return _numel(out) * int(weight_shape[1] if trans_b else weight_shape[0])
        a = _dims(inp)
        if a is None:
            return 0
        trans_a = any(x.name == "transA" and x.i for x in node.attribute)
        k = a[0] if (op == "Gemm" and trans_a) else a[-1]
        return _numel(out) * k
    if (
        op in ("BatchNormalization", "InstanceNormalization", "Softmax", "LogSoftmax")
        or op in BROADCAST_OPS
    ):
        return _numel(out)
    if op in UNARY_OPS and op not in _NO_FLOP_UNARY:
        return _numel(out)
    if op in ("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool") or op in REDUCE_OPS:
        return _numel(inp)
    if op in POOL_OPS:
        k = next((list(x.ints) for x in node.attribute if x.name == "kernel_shape"), [1])
        return _numel(out) * int(np.prod(k, dtype=np.int64))
    return 0


def _shape_math(onnx_model: onnx.ModelProto) -> set[str]:
    """Nodes that compute only from tensor shapes and integer constants (x.view(n, -1)'s size
    arithmetic): no model FLOPs, and surgery may replace them by constants."""
    static = {t.name for t in onnx_model.graph.initializer if t.data_type not in _FLOAT_TYPES}
    names: set[str] = set()
    for n in onnx_model.graph.node:
        if n.op_type in ("Shape", "Size", "Constant") or (
            n.input and all(i in static for i in n.input if i)
        ):
            static.update(n.output)
            names.add(n.name)
    return names


def _batch_of_one(onnx_model: onnx.ModelProto) -> onnx.ModelProto:
    """A weightless copy whose symbolic batch axes are 1, so shapes that merge the batch with
    another axis (attention's batch * heads, tokens * batch) are inferred per sample."""
    model = copy_without_initializers(onnx_model)
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if len(dims) and not dims[0].HasField("dim_value"):
            dims[0].dim_value = 1
    add_weights_as_inputs(model, onnx_model.graph.initializer)
    return model


def _fold_reshape_targets(model: onnx.ModelProto, shapes: dict[str, list[int | None]]) -> bool:
    """Write as constants the computed Reshape targets that follow from the shapes known now
    (e.g. attention's [tokens, batch * heads, E // heads] from Shape(x)); ONNX shape inference
    does not propagate values through Div or Cast. True when a target was written."""
    producer = {o: n for n in model.graph.node for o in n.output}
    consts = {
        t.name: numpy_helper.to_array(t)
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.INT64
    }
    memo: dict[str, np.ndarray | None] = {}

    def val(name: str, depth: int = 0) -> np.ndarray | None:
        if name in consts:
            return consts[name]
        if name in memo:
            return memo[name]
        node, res = producer.get(name), None
        if node is not None and depth < 32:
            if node.op_type == "Shape":
                shape = shapes.get(node.input[0])
                if shape is not None and None not in shape:
                    attrs = {a.name: a.i for a in node.attribute}
                    res = np.array(shape, np.int64)[attrs.get("start", 0) : attrs.get("end")]
            elif node.op_type in _FOLDABLE:
                outs = eval_node(node, [val(i, depth + 1) if i else None for i in node.input])
                res = None if outs is None else outs[list(node.output).index(name)]
        memo[name] = res
        return res

    changed = False
    for k, node in enumerate(model.graph.node):
        out = shapes.get(node.output[0]) if node.op_type == "Reshape" else [1]
        if out is not None and None not in out or node.input[1] in consts:
            continue
        v = val(node.input[1])
        if v is None or v.dtype != np.int64:
            continue
        name = f"{node.input[1]}__fe_per_sample{k}"
        model.graph.initializer.append(numpy_helper.from_array(v, name))
        node.input[1] = name
        changed = True
    return changed


def count_cost(onnx_model: onnx.ModelProto) -> CostSummary:
    """Per-node parameters and FLOPs of an ONNX model (see the module doc for the conventions)."""
    one = _batch_of_one(onnx_model)
    shapes = inferred_shapes(one)
    for _ in range(4):  # each round fixes the Reshapes whose targets the last one made known
        if not _fold_reshape_targets(one, shapes):
            break
        shapes = inferred_shapes(one)
    for t in onnx_model.graph.initializer:
        shapes[t.name] = list(t.dims)
    inits = {t.name: t for t in onnx_model.graph.initializer}
    for n in onnx_model.graph.node:  # weights some tools keep in Constant nodes (not scalars)
        is_value = n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"
        if is_value and int(np.prod(n.attribute[0].t.dims, dtype=np.int64)) > 1:
            inits.setdefault(n.output[0], n.attribute[0].t)
    shape_math = _shape_math(onnx_model)
    seen: set[str] = set()
    nodes = []
    # MatMul(x, Transpose(W)) (nn.Linear on 3-D input): W counts as the MatMul's weight
    matmul_b = {n.input[1] for n in onnx_model.graph.node if n.op_type == "MatMul"}
    transposed = {
        n.output[0]: n.input[0]
        for n in onnx_model.graph.node
        if n.op_type == "Transpose"
        and n.output[0] in matmul_b
        and n.input[0] in inits
        and len(inits[n.input[0]].dims) == 2
    }
    for node in onnx_model.graph.node:
        params = weight = 0
        inputs = list(node.input)
        if node.op_type == "MatMul" and len(inputs) > 1 and inputs[1] in transposed:
            inputs[1] = transposed[inputs[1]]
        elif node.op_type == "Transpose" and node.output[0] in transposed:
            inputs = []
        for i, name in enumerate(inputs):
            t = inits.get(name)
            if t is None or name in seen or t.data_type not in _FLOAT_TYPES:
                continue
            if node.op_type == "BatchNormalization" and i >= 3:
                continue
            seen.add(name)
            n = int(np.prod(t.dims, dtype=np.int64))
            params += n
            if i == 1 and node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
                weight = n
        wname = inputs[1] if len(inputs) > 1 else ""
        wshape = list(inits[wname].dims) if wname in inits else None
        if wshape is not None and wname != node.input[1]:
            wshape = wshape[::-1]
        layer = (
            layer_name_of(wname)
            if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")
            else None
        )
        flops = 0 if node.name in shape_math else _node_flops(node, shapes, wshape)
        nodes.append(NodeCost(node.name, node.op_type, layer, params, weight, flops))
    return CostSummary(nodes)


class OnnxCostModel:
    """Exact kept fractions of parameters and FLOPs for a plan, from the channel graph alone.

    Implements the pipeline.cost.CostModel protocol: `remaining(plan) -> {'params', 'flops'}`.
    """

    def __init__(
        self,
        onnx_model: onnx.ModelProto,
        groups: object | None = None,
        graph: ChannelGraph | None = None,
    ) -> None:
        # `groups` is accepted for the protocol's constructor shape; the exact groups come from the graph.
        self.graph = graph or ChannelGraph(onnx_model)
        self.base = count_cost(onnx_model)
        self.total_params = self.base.params
        self.total_flops = self.base.flops
        terms = []
        root = self.graph.root
        for idx, nc in enumerate(self.base.nodes):
            info = self.graph.node_info.get(idx)
            if info is None or (nc.params == 0 and nc.flops == 0):
                continue
            rin = root[info.in_desc.ids] if info.in_desc is not None else None
            rout = root[info.out_desc.ids] if info.out_desc is not None else None
            mixing = info.kind in MIXING_KINDS
            terms.append(
                (
                    rin if mixing else None,
                    rout,
                    nc.weight_params,
                    nc.params - nc.weight_params,
                    nc.flops,
                )
            )
        self._terms = terms

    def remaining(self, plan: Plan) -> dict[str, float]:
        pruned = self.graph.pruned_roots(plan)
        params = float(self.total_params)
        flops = float(self.total_flops)
        for rin, rout, wp, op, fl in self._terms:
            fin = 1.0 - pruned[rin].mean() if rin is not None and len(rin) else 1.0
            fout = 1.0 - pruned[rout].mean() if rout is not None and len(rout) else 1.0
            params -= (wp + op) - (wp * fin * fout + op * fout)
            flops -= fl - fl * fin * fout
        return {
            "params": params / self.total_params if self.total_params else 1.0,
            "flops": flops / self.total_flops if self.total_flops else 1.0,
        }
