"""Channel dependency graph over an ONNX graph (Torch-Pruning style, groups as first-class objects).

Every output channel of a weight-bearing producer (Conv, ConvTranspose, Gemm, MatMul) is a node.
Each tensor that carries channels gets a descriptor: its channel axis, the node behind each
position on that axis, and a block size (after Flatten each channel spans H*W features). Ops
propagate descriptors; ops that tie channels together (residual Add, SE gate Mul, depthwise
conv, shared weights) union the nodes position by position. Producers whose channels are
joined form a group. Anything not understood freezes the nodes it touches, with the reason:
the analysis never guesses, so surgery never builds a wrong graph.

Alongside the groups the analysis records every edit that pruning needs (initializer slices,
group counts, split sizes, slice bounds, reshape constants), so surgery, the masked original,
the cost model and torch pruning all read one description.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from exporters.attention import IN_PROJ, Attention, find_attentions
from exporters.shape_probe import eval_with_shape, fixed_values
from pipeline.groups import ChannelGroup
from pipeline.plan import LayerPlan, Plan, PlanError

UNARY_OPS = frozenset(
    [
        "Relu",
        "Clip",
        "LeakyRelu",
        "Sigmoid",
        "HardSigmoid",
        "HardSwish",
        "Tanh",
        "Dropout",
        "Identity",
        "Erf",
        "Elu",
        "Selu",
        "Celu",
        "Softplus",
        "Softsign",
        "Exp",
        "Log",
        "Neg",
        "Abs",
        "Sqrt",
        "Reciprocal",
        "Cast",
        "Gelu",
        "Mish",
        "Floor",
        "Ceil",
        "Round",
        "Sign",
        "ThresholdedRelu",
        "Sin",
        "Cos",
        "Not",
        "IsNaN",
        "IsInf",
        "Shrink",
    ]
)
BROADCAST_OPS = frozenset(
    [
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Pow",
        "Max",
        "Min",
        "Mean",
        "Sum",
        "PRelu",
        "Where",
        "Equal",
        "Less",
        "Greater",
        "And",
        "Or",
        "Xor",
        "Mod",
        "BitShift",
        "LessOrEqual",
        "GreaterOrEqual",
    ]
)
POOL_OPS = frozenset(
    ["MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"]
)
REDUCE_OPS = frozenset(
    [
        "ReduceMean",
        "ReduceSum",
        "ReduceMax",
        "ReduceMin",
        "ReduceProd",
        "ReduceL1",
        "ReduceL2",
        "ReduceLogSum",
        "ReduceLogSumExp",
        "ReduceSumSquare",
    ]
)
SHAPE_ONLY_OPS = frozenset({"Shape", "Size"})
_FOLDABLE = frozenset(
    [
        "Constant",
        "ConstantOfShape",
        "Concat",
        "Where",
        "Equal",
        "Less",
        "Greater",
        "Not",
        "Max",
        "Min",
        "Abs",
        "Expand",
        "Reshape",
        "Slice",
        "Transpose",
        "Cast",
        "Unsqueeze",
        "Squeeze",
        "Gather",
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Range",
        "Identity",
        "Neg",
        "Floor",
        "Ceil",
        "Shape",
    ]
)
MIXING_KINDS = frozenset({"conv", "convT", "gemm", "matmul", "grouped"})


@dataclass
class ChanDesc:
    """The channel axis of one tensor: node id per channel position, `block` elements each."""

    axis: int
    ids: np.ndarray
    block: int = 1


@dataclass
class SliceParam:
    """Slice constant input `input_idx` of node `node_idx` along `axis`, keeping kept channels."""

    node_idx: int
    input_idx: int
    axis: int
    desc: ChanDesc


@dataclass
class GroupedWeight:
    """A grouped convolution whose per-group input and output channels are both pruned: its
    weight [cout, cin/g, ...] keeps, for each conv group k, the kept outputs of group k against
    the kept inputs of group k (different positions per group, the same count)."""

    node_idx: int
    in_desc: ChanDesc
    out_desc: ChanDesc
    groups: int


def grouped_weight(w: np.ndarray, keep_in: np.ndarray, keep_out: np.ndarray, g: int) -> np.ndarray:
    """The pruned weight of a grouped convolution (see GroupedWeight); counts must be uniform."""
    cpo, cpi = w.shape[0] // g, w.shape[1]
    blocks = []
    for k in range(g):
        rows = np.flatnonzero(keep_out[k * cpo : (k + 1) * cpo]) + k * cpo
        cols = np.flatnonzero(keep_in[k * cpi : (k + 1) * cpi])
        blocks.append(w[rows][:, cols])
    return np.concatenate(blocks, axis=0)


@dataclass
class Shuffle:
    """A channel shuffle (Reshape-Transpose-Reshape) from node `first` to node `last`: output
    channel j is input channel perm[j]."""

    first: int
    last: int
    in_desc: ChanDesc
    perm: np.ndarray


@dataclass
class Producer:
    """A weight-bearing op whose output channels are units: keyed by its weight initializer."""

    weight: str
    layer: str | None
    op: str
    node_idx: int
    ids: np.ndarray


@dataclass
class NodeInfo:
    """What the cost model needs per node: its kind and channel descriptors in and out."""

    kind: str
    in_desc: ChanDesc | None
    out_desc: ChanDesc | None


@dataclass
class GroupInfo:
    """Internal form of a group: roots per group channel and each member's channel index map."""

    group: ChannelGroup
    roots: np.ndarray
    member_maps: dict[str, np.ndarray]
    segments: list[np.ndarray] | None = None


_NO_INFO = NodeInfo("", None, None)


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def alloc(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, a: int) -> int:
        p = self.parent
        root = a
        while p[root] != root:
            root = p[root]
        while p[a] != root:
            p[a], a = root, p[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if ra < rb:
                self.parent[rb] = ra
            else:
                self.parent[ra] = rb


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def copy_without_initializers(src: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy of everything but the initializers (copied separately, only where kept)."""
    model = onnx.ModelProto()
    for field_name in (
        "ir_version",
        "producer_name",
        "producer_version",
        "domain",
        "model_version",
        "doc_string",
    ):
        setattr(model, field_name, getattr(src, field_name))
    model.opset_import.extend(src.opset_import)
    model.metadata_props.extend(src.metadata_props)
    model.functions.extend(src.functions)
    g, sg = model.graph, src.graph
    g.name = sg.name
    g.doc_string = sg.doc_string
    g.node.extend(sg.node)
    g.input.extend(sg.input)
    g.output.extend(sg.output)
    g.value_info.extend(sg.value_info)
    g.sparse_initializer.extend(sg.sparse_initializer)
    return model


def eval_node(node: onnx.NodeProto, inputs: list[np.ndarray | None]) -> list[np.ndarray] | None:
    """One node's outputs from constant inputs, by ONNX's reference evaluator (None when an
    input is unknown or the evaluator cannot run it): folding computed shapes and constants."""
    if any(v is None for i, v in zip(node.input, inputs, strict=True) if i):
        return None
    from onnx.reference import ReferenceEvaluator

    feeds = {i: v for i, v in zip(node.input, inputs, strict=True) if i}
    try:
        return [np.asarray(o) for o in ReferenceEvaluator(node).run(None, feeds)]
    except Exception:
        return None


def skeleton(model: onnx.ModelProto, max_elems: int = 4096) -> onnx.ModelProto:
    """A copy without the large initializers (declared as typed graph inputs instead).

    Shape inference, the checker and graph cleanup only need the structure and the small
    constants (shapes, pads), so they run on this instead of serialising every weight.
    """
    sk = onnx.ModelProto()
    sk.ir_version = model.ir_version
    sk.opset_import.extend(model.opset_import)
    g = sk.graph
    g.name = model.graph.name
    g.node.extend(model.graph.node)
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    add_weights_as_inputs(sk, model.graph.initializer, max_elems)
    return sk


def add_weights_as_inputs(sk: onnx.ModelProto, initializers: Any, max_elems: int = 4096) -> None:
    """Add small initializers to `sk` as they are, large ones as typed graph inputs."""
    g = sk.graph
    for t in initializers:
        if int(np.prod(t.dims, dtype=np.int64)) <= max_elems:
            g.initializer.append(t)
        else:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))


def inferred_shapes(model: onnx.ModelProto, strict: bool = False) -> dict[str, list[int | None]]:
    """Static dims (None where symbolic) of every tensor ONNX shape inference can type."""
    return inferred_types_and_shapes(model, strict)[1]


def inferred_types_and_shapes(
    model: onnx.ModelProto, strict: bool = False
) -> tuple[dict[str, int], dict[str, list[int | None]]]:
    """({tensor: ONNX element type}, {tensor: static dims}) from one shape inference pass."""
    try:
        inferred = onnx.shape_inference.infer_shapes(
            skeleton(model), strict_mode=strict, data_prop=True
        )
    except Exception:
        if strict:
            raise
        inferred = model
    shapes: dict[str, list[int | None]] = {}
    types: dict[str, int] = {}
    for vi in (
        list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    ):
        t = vi.type.tensor_type
        types[vi.name] = t.elem_type
        if t.HasField("shape"):
            shapes[vi.name] = [
                d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim
            ]
    if not strict and any(None in v[1:] for v in shapes.values()):
        _fill_symbolic(model, shapes)
    for t in model.graph.initializer:
        shapes[t.name] = list(t.dims)
    return types, shapes


def _fill_symbolic(model: onnx.ModelProto, shapes: dict[str, list[int | None]]) -> None:
    """Fill dims ONNX inference leaves unknown from ONNX Runtime's symbolic shape inference,
    which also follows shape arithmetic (Div, Cast) such as a channel shuffle's view sizes."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        done = SymbolicShapeInference.infer_shapes(skeleton(model), auto_merge=True)
    except Exception:
        return
    if done is None:
        return
    for vi in done.graph.value_info:
        dims = vi.type.tensor_type.shape.dim
        known = [d.dim_value if d.HasField("dim_value") else None for d in dims]
        old = shapes.get(vi.name)
        if old is None:
            shapes[vi.name] = known
        elif len(old) == len(known):
            shapes[vi.name] = [a if a is not None else b for a, b in zip(old, known, strict=True)]


def layer_name_of(weight: str) -> str | None:
    """'features.0.0.weight' -> 'features.0.0'; exporter-made names ('onnx::...') have none.
    nn.MultiheadAttention's packed 'attn.in_proj_weight' names the attention module 'attn'."""
    if weight.endswith(IN_PROJ) and not weight.startswith("onnx::"):
        return weight[: -len(IN_PROJ)]
    if weight.startswith("onnx::") or not weight.endswith(".weight"):
        return None
    return weight[: -len(".weight")]


class ChannelGraph:
    """The analysis of one ONNX model: descriptors, groups, and the edits pruning needs."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        graph = model.graph
        self.nodes = list(graph.node)
        self.init_names = {t.name for t in graph.initializer}
        self._inits = {t.name: t for t in graph.initializer}
        self._const_cache: dict[str, np.ndarray] = {}
        self._fold_failed: set[str] = set()
        self._producer_node = {o: n for n in self.nodes for o in n.output}
        self._producer_idx = {o: k for k, n in enumerate(self.nodes) for o in n.output}
        self._const_nodes = {
            n.output[0]: n for n in self.nodes if n.op_type == "Constant" and len(n.output) == 1
        }
        self.types, self.shapes = inferred_types_and_shapes(model)
        self.uf = _UnionFind()
        self.owner: list[tuple[str, int]] = []
        self.descs: dict[str, ChanDesc] = {}
        self.slices: list[SliceParam] = []
        self.group_attrs: list[tuple[int, ChanDesc]] = []
        self.grouped_weights: list[GroupedWeight] = []
        self._segmented: list[tuple[np.ndarray, int, str, bool]] = []  # ids, parts, node, soft
        self._handled: set[int] = set()
        self.shuffles: list[Shuffle] = []
        self.computed_slices: list[tuple[int, ChanDesc, int, int]] = []
        self.split_sizes: list[tuple[int, list[ChanDesc], int]] = []
        self.slice_bounds: list[tuple[int, int, ChanDesc, int, int]] = []
        self.reshapes: list[tuple[int, int, ChanDesc]] = []
        self.producers: dict[str, Producer] = {}
        self._weight_inputs: dict[str, ChanDesc | None] = {}
        self.node_info: dict[int, NodeInfo] = {}
        self._freezes: list[tuple[np.ndarray, str]] = []
        self._consumer_map: dict[str, list[int]] | None = None
        self.attentions, self._attn_failed = find_attentions(self)
        self._attn_by_qkv = {a.qkv: a for a in self.attentions.values()}
        self._attn_by_weight = {a.weight: a for a in self.attentions.values()}
        for a in self.attentions.values():
            self._handled.update(a.core)
        self._analyse()
        self.heads = self._output_heads()
        self._finalise()

    # ---------------------------------------------------------------- helpers
    def const(self, name: str) -> np.ndarray | None:
        if name in self._const_cache:
            return self._const_cache[name]
        arr = None
        if name in self._inits:
            arr = numpy_helper.to_array(self._inits[name])
        elif name in self._const_nodes:
            val = _attr(self._const_nodes[name], "value")
            if val is not None:
                arr = numpy_helper.to_array(val)
        if arr is not None:
            self._const_cache[name] = arr
        return arr

    def value(self, name: str, depth: int = 0) -> np.ndarray | None:
        """Read-only value of a tensor computed from constants alone (e.g. exported pad amounts)."""
        arr = self.const(name)
        if arr is not None or depth > 32 or name in self._fold_failed:
            return arr
        node = self._producer_node.get(name)
        if node is None or node.op_type not in _FOLDABLE:
            return None
        outs = eval_node(node, [self.value(i, depth + 1) if i else None for i in node.input])
        if outs is None:
            self._fold_failed.add(name)
            return None
        for o, v in zip(node.output, outs, strict=False):
            self._const_cache[o] = np.asarray(v)
        return self._const_cache.get(name)

    def _param_shape(self, name: str) -> list[int] | None:
        """Shape of a rewritable constant without converting its data (None if not one)."""
        if name in self._inits:
            return [int(d) for d in self._inits[name].dims]
        if name in self._const_nodes:
            arr = self.const(name)
            return None if arr is None else list(arr.shape)
        return None

    def is_param(self, name: str) -> bool:
        """A constant that surgery may rewrite (an initializer or a Constant node output)."""
        return name in self.init_names or name in self._const_nodes

    def _alloc(self, n: int, owner: str) -> np.ndarray:
        ids = self.uf.alloc(n)
        self.owner.extend((owner, i) for i in range(n))
        return ids

    def freeze(self, desc: ChanDesc | np.ndarray | None, reason: str) -> None:
        if desc is None:
            return
        ids = desc.ids if isinstance(desc, ChanDesc) else desc
        self._freezes.append((ids, reason))

    def _union(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist(), strict=True):
            self.uf.union(x, y)

    def _rank(self, name: str) -> int | None:
        s = self.shapes.get(name)
        return None if s is None else len(s)

    def _slice(self, idx: int, inp: int, axis: int, desc: ChanDesc) -> None:
        self.slices.append(SliceParam(idx, inp, axis, desc))

    def _shared_input(self, weight: str, d: ChanDesc | None) -> None:
        """A weight read by several nodes (a head shared across FPN levels) has one input axis:
        the inputs of all its readers lose the same channels, or none do."""
        if weight not in self._weight_inputs:
            self._weight_inputs[weight] = d
            return
        first = self._weight_inputs[weight]
        if first is None and d is None:
            return
        if first is None or d is None or len(first.ids) != len(d.ids) or first.block != d.block:
            why = f"weight {weight} is shared by nodes whose inputs do not line up"
            self.freeze(first, why)
            self.freeze(d, why)
            return
        self._union(first.ids, d.ids)

    def _producer(self, node_idx: int, node: onnx.NodeProto, weight: str, n: int) -> ChanDesc:
        if weight in self.producers:
            prod = self.producers[weight]
            if len(prod.ids) != n:
                ids = self._alloc(n, weight)
                self.freeze(ids, f"weight {weight} is shared with a different layout")
                self.freeze(prod.ids, f"weight {weight} is shared with a different layout")
                return ChanDesc(1, ids)
            return ChanDesc(1, prod.ids)
        ids = self._alloc(n, weight)
        layer = layer_name_of(weight)
        self.producers[weight] = Producer(weight, layer, node.op_type, node_idx, ids)
        if layer is None:
            self.freeze(ids, f"{node.op_type} weight {weight!r} has no torch parameter name")
        if weight in self._attn_failed:
            self.freeze(ids, self._attn_failed[weight])
        att = self.attentions.get(node_idx)
        if att is not None and att.weight == weight:
            for h in range(att.heads):  # a head is one unit: its q, k and v rows go together
                chans = ids[att.head_channels(h)]
                self._union(np.full(len(chans), chans[0]), chans)
        return ChanDesc(1, ids)

    def _freeze_inputs(self, node: onnx.NodeProto, reason: str) -> None:
        for name in node.input:
            self.freeze(self.descs.get(name), reason)

    # ---------------------------------------------------------------- analysis
    def _analyse(self) -> None:
        for t in self.model.graph.input:
            if t.name in self.init_names:
                continue
            shape = self.shapes.get(t.name)
            if shape and len(shape) >= 2 and shape[1]:
                ids = self._alloc(int(shape[1]), f"<input {t.name}>")
                self.freeze(ids, f"channels of model input {t.name!r}")
                self.descs[t.name] = ChanDesc(1, ids)
        for idx, node in enumerate(self.nodes):
            if idx in self._handled:
                continue
            try:
                self._visit(idx, node)
            except Exception as exc:  # an op we misread must freeze, never crash
                self._unknown(
                    node, f"{node.op_type} node {node.name!r} could not be analysed ({exc})"
                )
            for o in node.output:
                if o in self._attn_by_qkv:
                    self._attention_out(self._attn_by_qkv[o])
        for out in self.model.graph.output:
            self.freeze(self.descs.get(out.name), f"channels reach the model output {out.name!r}")

    def _attention_out(self, att: Attention) -> None:
        """The core's output carries the v channels (head-major), which the out-projection
        reads; every core node's cost scales with the kept heads."""
        d = self.descs.get(att.qkv)
        r, ro = self._rank(att.qkv), self._rank(att.out)
        e = att.embed
        if d is None or r is None or ro is None:
            return
        if d.axis != r - 1 or d.block != 1 or len(d.ids) != 3 * e:
            self.freeze(d, f"attention {att.module!r}: q|k|v channels are not on the last axis")
            return
        v = ChanDesc(ro - 1, d.ids[2 * e :])
        self.descs[att.out] = v
        for k in att.core:
            self.node_info[k] = NodeInfo("attn", None, v)

    def _unknown(self, node: onnx.NodeProto, reason: str | None = None) -> None:
        reason = (
            reason or f"{node.op_type} node {node.name!r} is not understood by the channel analysis"
        )
        self._freeze_inputs(node, reason)
        for a in node.attribute:
            if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
                for sub in subs:
                    for n in sub.node:
                        for name in n.input:
                            self.freeze(self.descs.get(name), reason)
        for o in node.output:
            self.descs.pop(o, None)

    def _visit(self, idx: int, node: onnx.NodeProto) -> None:
        op = node.op_type
        ins = list(node.input)
        d = self.descs.get(ins[0]) if ins else None
        out = node.output[0] if node.output else ""
        if node.domain not in ("", "ai.onnx"):
            return self._unknown(node, f"custom op {node.domain}::{op} ({node.name!r})")
        if any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
            for a in node.attribute
        ):
            return self._unknown(node, f"{op} {node.name!r} has a subgraph")
        if op in ("Conv", "ConvTranspose"):
            return self._conv(idx, node, d)
        if op == "Gemm":
            return self._gemm(idx, node, d)
        if op == "MatMul":
            return self._matmul(idx, node, d)
        if op in SHAPE_ONLY_OPS or op == "Constant":
            return None
        if d is None and not any(n in self.descs for n in ins):
            return None  # nothing tracked flows through this node
        if op in ("BatchNormalization", "InstanceNormalization"):
            if d is None or d.axis != 1 or d.block != 1:
                return self._unknown(node)
            n_params = 4 if op == "BatchNormalization" else 2
            for k in range(1, 1 + n_params):
                if not self.is_param(ins[k]):
                    return self._unknown(node, f"{op} {node.name!r} has computed parameters")
            for k in range(1, 1 + n_params):
                self._slice(idx, k, 0, d)
            self.descs[out] = d
            self.node_info[idx] = NodeInfo("norm", d, d)
            return None
        if op == "LayerNormalization":
            r = self._rank(ins[0])
            first = int(_attr(node, "axis", -1)) % r if r else None
            if d is not None and first is not None and d.axis >= first:
                return self._unknown(
                    node,
                    f"LayerNorm {node.name!r} normalises over the channels: its mean and variance "
                    "change when a channel is removed, so pruning them cannot be exact",
                )
            return self._unknown(node)
        if op in UNARY_OPS:
            if d is None:
                return self._unknown(node)
            self.descs[out] = d
            self.node_info[idx] = NodeInfo("elem", d, d)
            return None
        if op in BROADCAST_OPS:
            return self._broadcast(idx, node)
        if op in POOL_OPS:
            if d is None or d.axis != 1 or d.block != 1:
                return self._unknown(node)
            self.descs[out] = d
            self.node_info[idx] = NodeInfo("pool", d, d)
            return None
        handler = {
            "Concat": self._concat,
            "Split": self._split,
            "Slice": self._slice_op,
            "Pad": self._pad,
            "Resize": self._resize,
            "Upsample": self._resize,
            "Flatten": self._flatten,
            "Reshape": self._reshape,
            "Squeeze": self._squeeze,
            "Unsqueeze": self._unsqueeze,
            "Transpose": self._transpose,
            "Softmax": self._softmax,
            "LogSoftmax": self._softmax,
            "Expand": self._expand,
        }.get(op)
        if op in REDUCE_OPS:
            handler = self._reduce
        if handler is None:
            return self._unknown(node)
        return handler(idx, node)

    def _conv(self, idx: int, node: onnx.NodeProto, d: ChanDesc | None) -> None:
        ins = list(node.input)
        w = self._param_shape(ins[1]) if len(ins) > 1 else None
        if w is None:
            return self._unknown(node, f"{node.op_type} {node.name!r} has a computed weight")
        g = int(_attr(node, "group", 1))
        transpose = node.op_type == "ConvTranspose"
        cin = w[0] if transpose else w[1] * g
        cout = w[1] * g if transpose else w[0]
        in_axis, out_axis = (0, 1) if transpose else (1, 0)
        if d is not None and (d.axis != 1 or d.block != 1):
            self.freeze(d, f"{node.op_type} {node.name!r} input channels are not on axis 1")
            d = None
        self._shared_input(ins[1], d)
        outd = self._producer(idx, node, ins[1], cout)
        bias = len(ins) > 2 and ins[2] != ""
        if bias and not self.is_param(ins[2]):
            return self._unknown(node, f"{node.op_type} {node.name!r} has a computed bias")
        kind = "convT" if transpose else "conv"
        if g == 1:
            if d is not None:
                self._slice(idx, 1, in_axis, d)
        elif not transpose and g == cin and cout == g:
            kind = "dwconv"
            if d is not None:
                self._union(outd.ids, d.ids)
                self.group_attrs.append((idx, outd))
            else:
                self.freeze(
                    outd, f"depthwise conv {node.name!r} reads channels that are not tracked"
                )
        else:
            kind = "grouped"
            if transpose or d is None or cin // g < 2 or cout // g < 2:
                why = (
                    "a transposed grouped convolution"
                    if transpose
                    else "its input channels are not tracked"
                    if d is None
                    else "a conv group holds a single channel (pruning one removes the group)"
                )
                self.freeze(d, f"feeds grouped {node.op_type} {node.name!r} (groups={g}): {why}")
                self.freeze(
                    outd, f"output of grouped {node.op_type} {node.name!r} (groups={g}): {why}"
                )
            else:
                self._segmented.append((d.ids, g, node.name, False))
                self._segmented.append((outd.ids, g, node.name, False))
                self.grouped_weights.append(GroupedWeight(idx, d, outd, g))
                if bias:
                    self._slice(idx, 2, 0, outd)
        if kind != "grouped":
            self._slice(idx, 1, out_axis, outd)
            if bias:
                self._slice(idx, 2, 0, outd)
        self.descs[node.output[0]] = outd
        self.node_info[idx] = NodeInfo(kind, d, outd)
        return None

    def _gemm(self, idx: int, node: onnx.NodeProto, d: ChanDesc | None) -> None:
        ins = list(node.input)
        if not self.is_param(ins[1]) or int(_attr(node, "transA", 0)) != 0:
            return self._unknown(node, f"Gemm {node.name!r} has a computed or transposed operand")
        w = self._param_shape(ins[1])
        if w is None or len(w) != 2:
            return self._unknown(node, f"Gemm {node.name!r} has no 2-D constant weight")
        trans_b = int(_attr(node, "transB", 0))
        in_axis, out_axis = (1, 0) if trans_b else (0, 1)
        if d is not None and d.axis != 1:
            self.freeze(d, f"Gemm {node.name!r} input channels are not on the feature axis")
            d = None
        self._shared_input(ins[1], d)
        outd = self._producer(idx, node, ins[1], int(w[out_axis]))
        if d is not None:
            self._slice(idx, 1, in_axis, d)
        self._slice(idx, 1, out_axis, outd)
        if len(ins) > 2 and ins[2]:
            c = self._param_shape(ins[2])
            if c is None:
                return self._unknown(node, f"Gemm {node.name!r} has a computed bias")
            if len(c) >= 1 and c[-1] == len(outd.ids) and len(outd.ids) > 1:
                self._slice(idx, 2, len(c) - 1, outd)
        self.descs[node.output[0]] = outd
        self.node_info[idx] = NodeInfo("gemm", d, outd)
        return None

    def transposed_weight(self, name: str) -> tuple[int, str] | None:
        """(node index, initializer) when `name` is Transpose(perm=[1, 0]) of a 2-D constant.

        The legacy exporter writes nn.Linear on a 3-D input as MatMul(x, Transpose(weight)).
        """
        t_idx = self._producer_idx.get(name)
        if t_idx is None:
            return None
        t = self.nodes[t_idx]
        w = self._param_shape(t.input[0]) if t.op_type == "Transpose" else None
        if w is None or len(w) != 2 or list(_attr(t, "perm", [1, 0])) != [1, 0]:
            return None
        return t_idx, t.input[0]

    def _matmul(self, idx: int, node: onnx.NodeProto, d: ChanDesc | None) -> None:
        ins = list(node.input)
        target, wname, in_axis, out_axis = (idx, 1), ins[1], 0, 1
        w = self._param_shape(ins[1])
        tw = self.transposed_weight(ins[1]) if w is None else None
        if tw is not None:
            target, wname, in_axis, out_axis = (tw[0], 0), tw[1], 1, 0
            w = self._param_shape(wname)
        if w is None or len(w) != 2 or ins[0] in self.init_names:
            return self._unknown(
                node, f"MatMul {node.name!r} is not a layer with a constant 2-D weight"
            )
        rank = self._rank(ins[0])
        if d is not None and (rank is None or d.axis != rank - 1):
            self.freeze(d, f"MatMul {node.name!r} input channels are not on the last axis")
            d = None
        self._shared_input(wname, d)
        outd = self._producer(idx, node, wname, int(w[out_axis]))
        outd = ChanDesc(rank - 1 if rank else 1, outd.ids)
        if d is not None:
            self._slice(target[0], target[1], in_axis, d)
        self._slice(target[0], target[1], out_axis, outd)
        self.descs[node.output[0]] = outd
        self.node_info[idx] = NodeInfo("matmul", d, outd)
        return None

    def _broadcast(self, idx: int, node: onnx.NodeProto) -> None:
        out = node.output[0]
        out_shape = self.shapes.get(out)
        if out_shape is None:
            return self._unknown(node, f"{node.op_type} {node.name!r} has an unknown output shape")
        r_out = len(out_shape)
        tracked = []
        for i, name in enumerate(node.input):
            d = self.descs.get(name)
            r = self._rank(name)
            if d is not None:
                if r is None:
                    return self._unknown(node)
                tracked.append((i, d.axis + r_out - r, d))
        axes = {a for _, a, _ in tracked}
        if len(axes) != 1:
            return self._unknown(
                node, f"{node.op_type} {node.name!r} combines channels on different axes"
            )
        oa = axes.pop()
        full = [
            (i, d)
            for i, _, d in tracked
            if len(d.ids) * d.block == (out_shape[oa] or len(d.ids) * d.block)
        ]
        if not full:
            return self._unknown(node)
        ref = full[0][1]
        for i, _, d in tracked:
            if all(i != j for j, _ in full):
                self.freeze(d, f"{node.op_type} {node.name!r} broadcasts a tracked channel")
        for _, d in full[1:]:
            if d.block != ref.block or len(d.ids) != len(ref.ids):
                return self._unknown(
                    node, f"{node.op_type} {node.name!r} joins channels of different layout"
                )
            self._union(ref.ids, d.ids)
        tracked_inputs = {i for i, _, _ in tracked}
        for i, name in enumerate(node.input):
            if i in tracked_inputs or not name:
                continue
            shape = self.shapes.get(name)
            if shape is None:
                return self._unknown(
                    node, f"{node.op_type} {node.name!r} has an operand of unknown shape"
                )
            ia = oa - (r_out - len(shape))
            if ia < 0 or shape[ia] == 1:
                continue
            if self.is_param(name) and shape[ia] == len(ref.ids) * ref.block:
                self._slice(idx, i, ia, ref)
                continue
            return self._unknown(
                node,
                f"{node.op_type} {node.name!r} mixes tracked channels with a computed per-channel operand",
            )
        self.descs[out] = ChanDesc(oa, ref.ids, ref.block)
        self.node_info[idx] = NodeInfo("elem", ref, self.descs[out])
        return None

    def _concat(self, idx: int, node: onnx.NodeProto) -> None:
        out = node.output[0]
        r = self._rank(out)
        if r is None:
            return self._unknown(node)
        axis = int(_attr(node, "axis")) % r
        parts = []
        for name in node.input:
            d = self.descs.get(name)
            if d is not None:
                parts.append(d)
                continue
            shape = self.shapes.get(name)
            if shape is None or shape[axis] is None:
                return self._unknown(node, f"Concat {node.name!r} has an input of unknown size")
            ids = self._alloc(int(shape[axis]), f"<concat input {name}>")
            self.freeze(ids, f"Concat {node.name!r} input {name!r} carries untracked channels")
            parts.append(ChanDesc(axis, ids))
        if all(p.axis == axis for p in parts):
            if len({p.block for p in parts}) != 1:
                return self._unknown(
                    node, f"Concat {node.name!r} joins flattened blocks of different size"
                )
            self.descs[out] = ChanDesc(axis, np.concatenate([p.ids for p in parts]), parts[0].block)
            return None
        if len({(p.axis, len(p.ids), p.block) for p in parts}) == 1:
            for p in parts[1:]:
                self._union(parts[0].ids, p.ids)
            self.descs[out] = parts[0]
            return None
        return self._unknown(node, f"Concat {node.name!r} mixes channel axes")

    def _split(self, idx: int, node: onnx.NodeProto) -> None:
        d = self.descs.get(node.input[0])
        r = self._rank(node.input[0])
        if d is None or r is None:
            return self._unknown(node)
        axis = int(_attr(node, "axis", 0)) % r
        if axis != d.axis:
            for o in node.output:
                self.descs[o] = d
            return None
        n = len(d.ids) * d.block
        if len(node.input) > 1 and node.input[1]:
            sizes = self.value(node.input[1])
            if sizes is None:  # computed: the inferred output sizes, written as constants
                outs = [self.shapes.get(o) for o in node.output]
                if any(o is None or len(o) <= axis or o[axis] is None for o in outs):
                    return self._unknown(node, f"Split {node.name!r} has computed sizes")
                sizes = [o[axis] for o in outs]
            sizes = [int(s) for s in sizes]
        elif _attr(node, "split") is not None:
            sizes = [int(s) for s in _attr(node, "split")]
        else:
            k = len(node.output)
            if n % k:
                return self._unknown(node, f"Split {node.name!r} splits unevenly")
            sizes = [n // k] * k
        if sum(sizes) != n or any(s % d.block for s in sizes):
            return self._unknown(node, f"Split {node.name!r} does not split whole channels")
        outs = []
        start = 0
        for o, s in zip(node.output, sizes, strict=True):
            c = s // d.block
            od = ChanDesc(d.axis, d.ids[start : start + c], d.block)
            start += c
            self.descs[o] = od
            outs.append(od)
        self.split_sizes.append((idx, outs, d.block))
        return None

    def _slice_op(self, idx: int, node: onnx.NodeProto) -> None:
        ins = list(node.input)
        d = self.descs.get(ins[0])
        r = self._rank(ins[0])
        if d is None or r is None or len(ins) < 3:
            return self._unknown(node)
        vals = [self.value(n) if n else None for n in ins[1:5]]
        starts, ends = vals[0], vals[1]
        if starts is None or ends is None:
            return self._slice_computed(idx, node, d)
        axes = vals[2] if len(vals) > 2 and vals[2] is not None else np.arange(len(starts))
        if len(ins) > 3 and ins[3] and vals[2] is None:
            return self._unknown(node, f"Slice {node.name!r} has computed axes")
        steps = vals[3] if len(vals) > 3 and vals[3] is not None else np.ones(len(starts), np.int64)
        axes = [int(a) % r for a in axes]
        si = self.shapes.get(ins[0])
        so = self.shapes.get(node.output[0])
        if si is not None and (so is None or None in so):
            so = list(si)
            for p_, ax in enumerate(axes):
                if so[ax] is not None:
                    bounds = slice(int(starts[p_]), int(ends[p_]), int(steps[p_])).indices(so[ax])
                    so[ax] = len(range(*bounds))
            self.shapes[node.output[0]] = so
        if d.axis not in axes:
            self.descs[node.output[0]] = d
            return None
        pos = axes.index(d.axis)
        if int(steps[pos]) != 1 or d.block != 1:
            return self._unknown(node, f"Slice {node.name!r} takes strided or partial channels")
        s, e, _ = slice(int(starts[pos]), int(ends[pos])).indices(len(d.ids))
        e = max(e, s)
        self.descs[node.output[0]] = ChanDesc(d.axis, d.ids[s:e], 1)
        self.slice_bounds.append((idx, pos, d, s, e))
        return None

    def _slice_computed(self, idx: int, node: onnx.NodeProto, d: ChanDesc) -> None:
        """x.chunk(2, 1) exported over Shape(x): bounds computed at run time. Their values for
        the original shape say which channels the slice takes; surgery writes the pruned bounds
        as constants (the computed ones would split the pruned count, not the kept channels)."""
        ins = list(node.input)
        reason = f"Slice {node.name!r} has computed bounds"
        si = self._channel_shape(ins[0], d)
        axes = self.value(ins[3]) if len(ins) > 3 and ins[3] else None
        steps = self.value(ins[4]) if len(ins) > 4 and ins[4] else None
        if si is None or axes is None or d.block != 1 or np.size(axes) != 1:
            return self._unknown(node, reason)
        if int(np.ravel(axes)[0]) % len(si) != d.axis or (
            steps is not None and int(np.ravel(steps)[0]) != 1
        ):
            return self._unknown(node, reason)
        vals = fixed_values(self, [ins[1], ins[2]], ins[0], si)
        if vals is None or any(np.size(v) != 1 for v in vals):
            return self._unknown(node, f"{reason} that depend on more than the channel count")
        n = len(d.ids)
        start, end, _ = slice(int(np.ravel(vals[0])[0]), int(np.ravel(vals[1])[0])).indices(n)
        if end <= start:
            return self._unknown(node, reason)
        self.descs[node.output[0]] = ChanDesc(d.axis, d.ids[start:end], 1)
        so = list(si)
        so[d.axis] = end - start
        self.shapes[node.output[0]] = so
        self.computed_slices.append((idx, d, start, end))
        size = end - start
        if n % size == 0 and start % size == 0:  # torch.chunk: equal parts, so the pruned
            # torch module chunks the kept channels at the same places only if every part
            # loses as many channels (recorded like a grouped conv's groups)
            self._segmented.append((d.ids, n // size, node.name, True))
        return None

    def _pad(self, idx: int, node: onnx.NodeProto) -> None:
        d = self.descs.get(node.input[0])
        r = self._rank(node.input[0])
        pads = self.value(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        if d is None or r is None or pads is None:
            return self._unknown(node, f"Pad {node.name!r} has computed pads")
        axes = list(range(r))
        if len(node.input) > 3 and node.input[3]:
            a = self.value(node.input[3])
            if a is None:
                return self._unknown(node)
            axes = [int(x) % r for x in a]
        k = len(axes)
        if d.axis in axes:
            p = axes.index(d.axis)
            if int(pads[p]) != 0 or int(pads[p + k]) != 0:
                return self._unknown(node, f"Pad {node.name!r} pads the channel axis")
        self.descs[node.output[0]] = d
        self.node_info[idx] = NodeInfo("elem", d, d)
        return None

    def _resize(self, idx: int, node: onnx.NodeProto) -> None:
        d = self.descs.get(node.input[0])
        si, so = self.shapes.get(node.input[0]), self.shapes.get(node.output[0])
        sizes_given = len(node.input) > 3 and node.input[3]
        keeps = True
        scales = self.value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if not sizes_given and d is not None and si is not None and scales is not None:
            scales = np.atleast_1d(scales)  # constant scales: the channel scale must be 1
            if len(scales) == len(si) and float(scales[d.axis]) == 1.0:
                so = list(so) if so is not None else [None] * len(si)
                so[d.axis] = si[d.axis]
        if sizes_given and d is not None:  # sizes computed as Concat(Shape(x)[:2], spatial)
            pieces = self._shape_pieces(node.input[3])
            keeps = (
                pieces is not None
                and len(pieces) > d.axis
                and pieces[d.axis] == ("dim", node.input[0], d.axis)
            )
        if (
            d is None
            or si is None
            or so is None
            or not keeps
            or si[d.axis] != so[d.axis]
            or d.block != 1
        ):
            return self._unknown(node, f"{node.op_type} {node.name!r} may change the channel count")
        self.descs[node.output[0]] = d
        self.node_info[idx] = NodeInfo("elem", d, d)
        return None

    def _expand(self, idx: int, node: onnx.NodeProto) -> None:
        """Expand (e.g. a gate's expand_as) keeps the channels if its shape leaves them alone."""
        d = self.descs.get(node.input[0])
        si, so = self.shapes.get(node.input[0]), self.shapes.get(node.output[0])
        shape = self.value(node.input[1])
        if d is None or si is None or so is None or shape is None:
            return self._unknown(node, f"Expand {node.name!r} has a computed or unknown shape")
        shape = [int(v) for v in np.atleast_1d(shape)]
        a = d.axis + len(so) - len(si)
        pos = a - (len(so) - len(shape))
        if so[a] != len(d.ids) * d.block or (pos >= 0 and shape[pos] != 1):
            return self._unknown(node, f"Expand {node.name!r} sets the channel extent")
        self.descs[node.output[0]] = ChanDesc(a, d.ids, d.block)
        return None

    def _flatten(self, idx: int, node: onnx.NodeProto) -> None:
        d = self.descs.get(node.input[0])
        shape = self.shapes.get(node.input[0])
        if d is None or shape is None:
            return self._unknown(node)
        k = int(_attr(node, "axis", 1)) % max(len(shape), 1)
        rest = shape[d.axis + 1 :]
        if d.axis != k or any(s is None for s in rest):
            return self._unknown(
                node, f"Flatten {node.name!r} interleaves channels with other axes"
            )
        self.descs[node.output[0]] = ChanDesc(
            1, d.ids, d.block * int(np.prod(rest, dtype=np.int64))
        )
        return None

    def _shape_pieces(self, name: str, depth: int = 0) -> list[Any] | None:
        """A computed shape vector as a list of ints and ('dim', tensor, k) references, or None.

        Follows the exporter's pattern for x.view(x.size(0), -1): Concat of Unsqueeze(Gather(
        Shape(x), k)) and constants.
        """
        v = self.value(name)
        if v is not None:
            return [int(x) for x in np.atleast_1d(v)]
        node = self._producer_node.get(name)
        if node is None or depth > 8:
            return None
        if node.op_type == "Shape" and not node.attribute:
            r = self._rank(node.input[0])
            return None if r is None else [("dim", node.input[0], k) for k in range(r)]
        if node.op_type == "Gather" and int(_attr(node, "axis", 0)) == 0:
            src, idx = self._shape_pieces(node.input[0], depth + 1), self.value(node.input[1])
            if src is None or idx is None or np.ndim(idx) > 1:
                return None
            return [src[int(i)] for i in np.atleast_1d(idx)]
        if node.op_type in ("Unsqueeze", "Squeeze", "Identity", "Cast"):
            return self._shape_pieces(node.input[0], depth + 1)
        if node.op_type == "Slice":  # Shape(x)[a:b], as F.interpolate(size=...) exports it
            src = self._shape_pieces(node.input[0], depth + 1)
            bounds = [self.value(i) if i else None for i in list(node.input[1:]) + [""] * 4][:4]
            starts, ends, axes, steps = bounds
            if src is None or starts is None or ends is None:
                return None
            if (axes is not None and [int(a) for a in np.atleast_1d(axes)] not in ([0], [-1])) or (
                steps is not None and [int(t) for t in np.atleast_1d(steps)] != [1]
            ):
                return None
            lo, hi = int(np.atleast_1d(starts)[0]), int(np.atleast_1d(ends)[0])
            return src[slice(lo, hi)]
        if node.op_type == "Concat":
            out: list[Any] = []
            for i in node.input:
                part = self._shape_pieces(i, depth + 1)
                if part is None:
                    return None
                out += part
            return out
        return None

    def _reshape_computed(self, idx: int, node: onnx.NodeProto, d: ChanDesc) -> bool:
        """x.view(x.size(0), ..., -1) merging the channel axis and everything after it."""
        pieces = self._shape_pieces(node.input[1])
        si = self.shapes.get(node.input[0])
        a = d.axis
        if pieces is None or si is None or len(pieces) != a + 1 or pieces[a] != -1:
            return False
        for k, piece in enumerate(pieces[:a]):
            same_dim = isinstance(piece, tuple) and piece[2] == k
            if not (same_dim or (isinstance(piece, int) and piece == si[k])):
                return False
        tail = si[a + 1 :]
        if any(x is None for x in tail) or si[a] is None:
            return False
        p_in = int(np.prod(tail, dtype=np.int64))
        self.descs[node.output[0]] = ChanDesc(a, d.ids, d.block * p_in)
        self.shapes[node.output[0]] = list(si[:a]) + [si[a] * p_in]
        return True

    def _channel_shape(self, name: str, d: ChanDesc) -> list[int | None] | None:
        """The inferred shape of `name` with its channel extent from the descriptor (shape
        inference loses it after shapes computed at run time)."""
        shape = self.shapes.get(name)
        if shape is None or len(shape) <= d.axis:
            return None
        shape = list(shape)
        shape[d.axis] = len(d.ids) * d.block
        return shape

    def _consumers(self, name: str) -> list[int]:
        if self._consumer_map is None:
            self._consumer_map = {}
            for k, n in enumerate(self.nodes):
                for i in dict.fromkeys(n.input):
                    self._consumer_map.setdefault(i, []).append(k)
        return self._consumer_map.get(name, [])

    def _shuffle(self, idx: int, node: onnx.NodeProto, d: ChanDesc) -> bool:
        """Channel shuffle: Reshape(x, [n, g, c/g, h, w]) -> Transpose(0, 2, 1, ...) ->
        Reshape(back to [n, c, h, w]), shapes computed from Shape(x), checked at several
        channel counts. It is a fixed permutation of the channels, so nothing is tied: surgery
        replaces it by a Gather of the kept channels in shuffled order."""
        x = node.input[0]
        si = self._channel_shape(x, d)
        if si is None or d.axis != 1 or d.block != 1 or len(si) < 2:
            return False
        c = len(d.ids)
        users = self._consumers(node.output[0])
        if len(users) != 1 or self.nodes[users[0]].op_type != "Transpose":
            return False
        t_idx = users[0]
        perm = list(_attr(self.nodes[t_idx], "perm") or [])
        r = len(si) + 1
        if perm != [0, 2, 1, *range(3, r)]:
            return False
        users2 = self._consumers(self.nodes[t_idx].output[0])
        if len(users2) != 1 or self.nodes[users2[0]].op_type != "Reshape":
            return False
        r2_idx = users2[0]
        back = self.nodes[r2_idx]
        if self.is_param(node.input[1]) or self.is_param(back.input[1]):
            return False

        def targets(count: int, fill: int) -> tuple[list[int], list[int]] | None:
            probe = [fill if v is None else int(v) for v in si]
            probe[1] = count
            a = eval_with_shape(self, node.input[1], x, probe)
            b = eval_with_shape(self, back.input[1], x, probe)
            if a is None or b is None:
                return None
            return [int(v) for v in np.ravel(a)], [int(v) for v in np.ravel(b)]

        first = targets(c, 1)
        if first is None or len(first[0]) != r or first[0][1] < 2:
            return False
        g = first[0][1]
        if c % g or c // g < 2:
            return False
        for count, fill in ((c, 2), (g, 1), (2 * g, 1), (c - g, 1)):
            got = targets(count, fill)
            if got is None:
                return False
            probe = [fill if v is None else int(v) for v in si]
            probe[1] = count
            split, merged = got
            rest = probe[2:]
            if split[1:3] != [g, count // g] or split[3:] != rest:
                return False
            if merged[1:] != [count, *rest] or split[0] not in (probe[0], -1, 0):
                return False
            if merged[0] not in (probe[0], -1, 0):
                return False
        # output channel i * g + k is input channel k * (c / g) + i
        perm = np.arange(c).reshape(g, c // g).T.reshape(-1)
        self.descs[back.output[0]] = ChanDesc(1, d.ids[perm], 1)
        self.shapes[back.output[0]] = list(si)
        self._handled.update({t_idx, r2_idx})
        self.shuffles.append(Shuffle(idx, r2_idx, d, perm))
        return True

    def _reshape(self, idx: int, node: onnx.NodeProto) -> None:
        d = self.descs.get(node.input[0])
        if d is not None and self._shuffle(idx, node, d):
            return None
        if (
            d is not None
            and not self.is_param(node.input[1])
            and self._reshape_computed(idx, node, d)
        ):
            return None
        si, so = self.shapes.get(node.input[0]), self.shapes.get(node.output[0])
        if d is None or si is None or so is None:
            return self._unknown(node, f"Reshape {node.name!r} has unknown shapes")
        a = d.axis
        reason = f"Reshape {node.name!r} mixes channels with other axes ({si} -> {so})"
        if len(so) <= a or si[:a] != so[:a]:
            return self._unknown(node, reason)
        tail_in, tail_out = si[a + 1 :], so[a + 1 :]
        if any(s is None for s in tail_in + tail_out) or si[a] is None or so[a] is None:
            return self._unknown(node, reason)
        p_in, p_out = int(np.prod(tail_in, dtype=np.int64)), int(np.prod(tail_out, dtype=np.int64))
        if len(so) == a + 1 and so[a] == si[a] * p_in:
            new = ChanDesc(a, d.ids, d.block * p_in)
        elif so[a] == si[a] and p_in == p_out:
            new = d
        elif len(si) == a + 1 and so[a] * p_out == si[a] and p_out == d.block:
            new = ChanDesc(a, d.ids, 1)
        else:
            return self._unknown(node, reason)
        shape_name = node.input[1]
        if self.is_param(shape_name):
            target = self.const(shape_name)
            if target is not None and int(target[a]) not in (-1, 0):
                self.reshapes.append((idx, a, new))
        else:
            return self._unknown(node, f"Reshape {node.name!r} has a computed target shape")
        self.descs[node.output[0]] = new
        return None

    def _axes(self, node: onnx.NodeProto) -> list[int] | None:
        if len(node.input) > 1 and node.input[1]:
            v = self.const(node.input[1]) if self.is_param(node.input[1]) else None
            return None if v is None else [int(x) for x in np.atleast_1d(v)]
        a = _attr(node, "axes")
        return None if a is None else [int(x) for x in a]

    def _squeeze(self, idx: int, node: onnx.NodeProto) -> None:
        d = self.descs.get(node.input[0])
        r = self._rank(node.input[0])
        axes = self._axes(node)
        if d is None or r is None or axes is None:
            return self._unknown(node)
        axes = [x % r for x in axes]
        if d.axis in axes:
            return self._unknown(node, f"Squeeze {node.name!r} removes the channel axis")
        self.descs[node.output[0]] = ChanDesc(
            d.axis - sum(x < d.axis for x in axes), d.ids, d.block
        )
        return None

    def _unsqueeze(self, idx: int, node: onnx.NodeProto) -> None:
        d = self.descs.get(node.input[0])
        ro = self._rank(node.output[0])
        axes = self._axes(node)
        if d is None or ro is None or axes is None:
            return self._unknown(node)
        a = d.axis
        for x in sorted(x % ro for x in axes):
            if x <= a:
                a += 1
        self.descs[node.output[0]] = ChanDesc(a, d.ids, d.block)
        return None

    def _transpose(self, idx: int, node: onnx.NodeProto) -> None:
        d = self.descs.get(node.input[0])
        r = self._rank(node.input[0])
        perm = _attr(node, "perm")
        if d is None or r is None or d.block != 1:
            return self._unknown(node, f"Transpose {node.name!r} moves flattened channels")
        perm = list(perm) if perm is not None else list(range(r))[::-1]
        self.descs[node.output[0]] = ChanDesc(perm.index(d.axis), d.ids, 1)
        return None

    def _softmax(self, idx: int, node: onnx.NodeProto) -> None:
        d = self.descs.get(node.input[0])
        r = self._rank(node.input[0])
        if d is None or r is None or int(_attr(node, "axis", -1)) % r == d.axis:
            return self._unknown(node, f"{node.op_type} {node.name!r} normalises across channels")
        self.descs[node.output[0]] = d
        self.node_info[idx] = NodeInfo("elem", d, d)
        return None

    def _reduce(self, idx: int, node: onnx.NodeProto) -> None:
        d = self.descs.get(node.input[0])
        r = self._rank(node.input[0])
        axes = self._axes(node)
        if d is None or r is None or axes is None:
            return self._unknown(node, f"{node.op_type} {node.name!r} reduces over all axes")
        axes = [x % r for x in axes]
        if d.axis in axes or d.block != 1:
            return self._unknown(node, f"{node.op_type} {node.name!r} reduces across channels")
        keep = int(_attr(node, "keepdims", 1))
        a = d.axis if keep else d.axis - sum(x < d.axis for x in axes)
        self.descs[node.output[0]] = ChanDesc(a, d.ids, 1)
        self.node_info[idx] = NodeInfo("pool", d, self.descs[node.output[0]])
        return None

    def _output_heads(self) -> dict[int, str]:
        """Weight-bearing nodes whose output reaches a model output with no other one in between
        (classifier layers, box/class heads), by node index -> the first such output's name."""
        stop = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
        heads: dict[int, str] = {}
        for out in self.model.graph.output:
            stack, seen = [out.name], set()
            while stack:
                name = stack.pop()
                k = self._producer_idx.get(name)
                if k is None or k in seen:
                    continue
                seen.add(k)
                if self.nodes[k].op_type in stop:
                    heads.setdefault(k, out.name)
                    continue
                stack.extend(i for i in self.nodes[k].input if i and i not in self.init_names)
        return heads

    # ---------------------------------------------------------------- groups
    def _finalise(self) -> None:
        n = len(self.uf.parent)
        self.root = np.array([self.uf.find(i) for i in range(n)], dtype=np.int64)
        self.frozen_reason: dict[int, str] = {}
        for ids, reason in self._freezes:
            for r in np.unique(self.root[ids]).tolist():
                self.frozen_reason.setdefault(r, reason)
        # producers linked by any shared root form one group
        prods = sorted(self.producers.values(), key=lambda p: p.node_idx)
        puf = _UnionFind()
        puf.alloc(len(prods))
        first_of_root: dict[int, int] = {}
        for k, p in enumerate(prods):
            for r in np.unique(self.root[p.ids]).tolist():
                if r in first_of_root:
                    puf.union(first_of_root[r], k)
                else:
                    first_of_root[r] = k
        comps: dict[int, list[int]] = {}
        for k in range(len(prods)):
            comps.setdefault(puf.find(k), []).append(k)
        self.groups: list[GroupInfo] = []
        for ks in comps.values():
            members = [prods[k] for k in ks]
            self.groups.append(self._make_group(members))
        self._segment_groups()
        self.member_of = {m: gi for gi in self.groups for m in gi.member_maps}

    def _segment_groups(self) -> None:
        """Record each grouped convolution's conv groups on the channel groups it reads and
        writes: a plan must remove the same number of channels from every conv group."""
        where: dict[int, tuple[GroupInfo, int]] = {}
        for gi in self.groups:
            for k, r in enumerate(gi.roots.tolist()):
                where[r] = (gi, k)

        def hold(gi: GroupInfo, reason: str, soft: bool = False) -> None:
            """Freeze gi; a soft split (torch.chunk, exact in ONNX either way) only drops its
            equal-count request, leaving the torch-module check to say when it cannot follow."""
            if soft:
                return
            if not gi.group.frozen:
                gi.group.frozen, gi.group.reason = True, reason
            gi.segments = None
            gi.group.extra.pop("conv_groups", None)

        for ids, g, name, soft in self._segmented:
            roots = self.root[ids].tolist()
            owners = {id(where[r][0]): where[r][0] for r in roots if r in where}
            # a channel may repeat inside one part (a shuffle ties parts), never across parts
            parts = [sorted(set(row)) for row in np.asarray(roots).reshape(g, -1).tolist()]
            flat = [r for p in parts for r in p]
            if len(owners) != 1 or len(flat) != len(set(flat)) or any(r not in where for r in flat):
                for gi in owners.values():
                    hold(gi, f"{name!r} splits channels into {g} parts that share channels or "
                             "span several groups", soft)  # fmt: skip
                continue
            gi = next(iter(owners.values()))
            if gi.group.frozen:
                continue
            if len(flat) != gi.group.n_channels or len({len(p) for p in parts}) != 1:
                hold(gi, f"{name!r} splits a channel group into {g} unequal parts", soft)
                continue
            segs = [np.sort([where[r][1] for r in p]) for p in parts]
            if gi.segments is not None:
                same = {tuple(x.tolist()) for x in gi.segments} == {tuple(x.tolist()) for x in segs}
                if not same:
                    hold(gi, f"{name!r} splits the channels into {g} parts other than another "
                             "grouped conv or split of the same channel group", soft)  # fmt: skip
                continue
            gi.segments = segs
            gi.group.extra["conv_groups"] = [x.tolist() for x in segs]

    def _attention_group(self, prod: Producer, att: Attention) -> GroupInfo:
        """One unit per head: the roots of each head's first q channel, in head order."""
        roots = self.root[prod.ids[[att.head_channels(h)[0] for h in range(att.heads)]]]
        reason = next(
            (self.frozen_reason[r] for r in roots.tolist() if r in self.frozen_reason), ""
        )
        if len(np.unique(roots)) != att.heads:
            reason = reason or f"heads of attention {att.module!r} are coupled with each other"
        extra: dict[str, Any] = {
            "ops": [prod.op],
            "attention": {"heads": att.heads, "head_dim": att.head_dim},
        }
        group = ChannelGroup(att.module, [att.module], att.heads, bool(reason), reason, extra)
        return GroupInfo(group, roots, {att.module: np.arange(att.heads)})

    def _make_group(self, members: list[Producer]) -> GroupInfo:
        first = members[0]
        att = self._attn_by_weight.get(first.weight)
        if att is not None and len(members) == 1:
            return self._attention_group(first, att)
        roots = self.root[first.ids]
        names = [m.layer or m.weight for m in members]
        reason = ""
        maps: dict[str, np.ndarray] = {}
        uniform = len(np.unique(roots)) == len(roots)
        for m, name in zip(members, names, strict=True):
            r = self.root[m.ids]
            if (
                len(r) != len(roots)
                or len(np.unique(r)) != len(r)
                or set(r.tolist()) != set(roots.tolist())
            ):
                uniform = False
                break
            pos = {v: i for i, v in enumerate(r.tolist())}
            maps[name] = np.array([pos[v] for v in roots.tolist()], dtype=np.int64)
        if not uniform:
            reason = "members are coupled with different channel layouts (e.g. an Add of a Concat)"
            dw = [m for m in members if self.node_info.get(m.node_idx, _NO_INFO).kind == "dwconv"]
            if dw:
                reason = (
                    f"depthwise conv {dw[0].layer or dw[0].weight!r} reads a concatenation of "
                    "several layers' channels: each would lose a different subset, which a "
                    "channel group does not describe"
                )
            maps = {name: np.arange(len(m.ids)) for m, name in zip(members, names, strict=True)}
        else:
            for r in roots.tolist():
                if r in self.frozen_reason:
                    reason = self.frozen_reason[r]
                    break
        head = next((self.heads[m.node_idx] for m in members if m.node_idx in self.heads), None)
        if reason and head is not None:
            reason = (
                f"output head of model output {head!r} (no Conv/Linear in between): its channel "
                f"count is the output's layout ({reason})"
            )
        extra: dict[str, Any] = {"ops": [m.op for m in members]}
        if head is not None:
            extra["output_head"] = head
        if uniform and any(not np.array_equal(v, np.arange(len(v))) for v in maps.values()):
            extra["index_maps"] = {k: v.tolist() for k, v in maps.items()}
        name = names[0] if len(names) == 1 else f"{names[0]}+{len(names) - 1}"
        group = ChannelGroup(name, names, len(roots), bool(reason), reason, extra)
        return GroupInfo(group, roots, maps)

    # ---------------------------------------------------------------- plans
    @property
    def channel_groups(self) -> list[ChannelGroup]:
        return [g.group for g in self.groups]

    def pruned_roots(self, plan: Plan) -> np.ndarray:
        """Boolean over node roots: True where the plan removes that channel. Validates the plan."""
        pruned = np.zeros(len(self.root), dtype=bool)
        chosen: dict[str, tuple[str, frozenset[int]]] = {}
        for name, lp in plan.layers.items():
            if not isinstance(lp, LayerPlan):
                raise PlanError(f"plan entry {name!r} is not a LayerPlan")
            gi = self.member_of.get(name)
            if gi is None and not lp.pruned:
                continue  # a layer the plan keeps whole need not be prunable here
            if gi is None:
                raise PlanError(
                    f"plan names layer {name!r}, which is not a prunable layer of this model; "
                    "re-create the plan for this model"
                )
            n = len(gi.member_maps[name])
            if lp.n_units != n:
                raise PlanError(
                    f"plan says layer {name!r} has {lp.n_units} units but the model has {n}; "
                    "re-create the plan for this model"
                )
            lp.validate()
            if not lp.pruned:
                continue
            if gi.group.frozen:
                raise PlanError(
                    f"plan prunes layer {name!r}, whose channel group {gi.group.name!r} is frozen "
                    f"({gi.group.reason}); leave it out of the plan"
                )
            inv = np.empty(n, dtype=np.int64)
            inv[gi.member_maps[name]] = np.arange(n)
            gch = frozenset(inv[np.asarray(lp.pruned, dtype=np.int64)].tolist())
            prev = chosen.get(gi.group.name)
            if prev is not None and prev[1] != gch:
                raise PlanError(
                    f"layers {prev[0]!r} and {name!r} are coupled (group {gi.group.name!r}) but the "
                    "plan removes different channels from them; prune coupled layers identically"
                )
            chosen[gi.group.name] = (name, gch)
            if len(gch) >= gi.group.n_channels:
                raise PlanError(
                    f"plan removes every channel of group {gi.group.name!r}; at least one must stay"
                )
            if gi.segments is not None:
                counts = [len(gch.intersection(seg.tolist())) for seg in gi.segments]
                if len(set(counts)) != 1:
                    raise PlanError(
                        f"plan removes {min(counts)} to {max(counts)} channels per conv group from "
                        f"layer {name!r}, but its grouped convolution needs the same count from "
                        f"each of its {len(counts)} conv groups; re-plan with the model's groups"
                    )
            pruned[gi.roots[sorted(gch)]] = True
        return pruned

    def kept(self, desc: ChanDesc, pruned: np.ndarray) -> np.ndarray:
        """Boolean per channel position of `desc`: True where the channel stays."""
        return ~pruned[self.root[desc.ids]]


def find_groups(onnx_model: onnx.ModelProto) -> list[ChannelGroup]:
    """Channel groups of an ONNX model (frozen ones carry the reason they cannot be pruned)."""
    return ChannelGraph(onnx_model).channel_groups


def group_plan_layers(
    graph: ChannelGraph, group_channels: dict[str, list[int]]
) -> dict[str, LayerPlan]:
    """LayerPlans for every member of the named groups, given pruned *group* channel indices."""
    by_name = {gi.group.name: gi for gi in graph.groups}
    out: dict[str, LayerPlan] = {}
    for gname, chans in group_channels.items():
        gi = by_name[gname]
        for member, mp in gi.member_maps.items():
            idx = sorted(int(mp[c]) for c in chans)
            out[member] = LayerPlan(member, len(mp), idx, group=gname)
    return out
