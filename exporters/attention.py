"""Attention heads in an exported graph: recognise nn.MultiheadAttention, rebuild it with fewer heads.

torch exports nn.MultiheadAttention as a packed in-projection (q|k|v rows of `in_proj_weight`),
a core of shape arithmetic, reshapes, two batched MatMuls and a Softmax, and the output
projection. The core's shape arithmetic mixes the head count with the channel count (the
unflatten to (3, E), bsz * num_heads, a view to E columns), so its constants cannot be
followed channel by channel. Instead the core is recognised as a whole: the nodes between the
in-projection's output and the out-projection's input are cut out and run in ONNX Runtime, and
they must compute exactly standard scaled dot-product attention for one head count, sequence
axis and output layout (found by trying them all on random inputs). A head is then one unit: its
query, key and value rows and its out-projection columns. Surgery replaces the core by the same
attention written with the kept head count; the head dimension, and so the 1/sqrt(head_dim)
scale, is unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper, numpy_helper

if TYPE_CHECKING:
    from exporters.graph_groups import ChannelGraph

IN_PROJ = ".in_proj_weight"
_PROBES = (2, 3)  # sizes tried for the symbolic (batch) dims of the attention's input
_MAX_SCORES = 2**25  # largest attention score tensor a head-count guess may allocate


@dataclass
class Attention:
    """One recognised self-attention: in-projection node, core nodes and their layout."""

    module: str  # torch module name (the in-projection weight without '.in_proj_weight')
    weight: str
    in_node: int
    x: str  # the in-projection's data input
    qkv: str  # q|k|v after the in-projection bias
    out: str  # the core's output, the out-projection's data input
    out_node: int
    core: list[int]  # node indices computing `out` from `qkv` (and Shape(x))
    heads: int
    head_dim: int
    seq_axis: int  # axis of qkv's leading dims along which tokens attend
    merged: bool  # output leading dims merged into one ([-1, E]) or kept as qkv's

    @property
    def embed(self) -> int:
        return self.heads * self.head_dim

    def head_channels(self, h: int) -> np.ndarray:
        """Positions of head h's q, k and v rows in the packed 3E in-projection output."""
        e, d = self.embed, self.head_dim
        base = np.arange(h * d, (h + 1) * d)
        return np.concatenate([base, base + e, base + 2 * e])


def find_attentions(graph: ChannelGraph) -> tuple[dict[int, Attention], dict[str, str]]:
    """Recognised attentions by in-projection node index, and {in_proj weight: why not} for
    those not recognised (their heads stay frozen with that reason)."""
    found: dict[int, Attention] = {}
    failed: dict[str, str] = {}
    for name in sorted(graph.init_names):
        if not name.endswith(IN_PROJ):
            continue
        got = _recognise(graph, name)
        if isinstance(got, str):
            failed[name] = f"attention {name[: -len(IN_PROJ)]!r} is not recognised: {got}"
        else:
            found[got.in_node] = got
    return found, failed


def _weight_node(graph: ChannelGraph, weight: str) -> tuple[int, str] | None:
    """(node, data input) of the single Gemm(transB) or MatMul(x, Transpose(W)) using `weight`."""
    hits = []
    for k, n in enumerate(graph.nodes):
        if n.op_type == "Gemm" and len(n.input) > 1 and n.input[1] == weight:
            if int(next((a.i for a in n.attribute if a.name == "transB"), 0)) == 1:
                hits.append((k, n.input[0]))
            else:
                return None
        elif n.op_type == "MatMul" and len(n.input) > 1:
            tw = graph.transposed_weight(n.input[1])
            if tw is not None and tw[1] == weight:
                hits.append((k, n.input[0]))
    return hits[0] if len(hits) == 1 else None


def _recognise(graph: ChannelGraph, weight: str) -> Attention | str:
    module = weight[: -len(IN_PROJ)]
    w = graph.const(weight)
    if w is None or w.ndim != 2 or w.shape[0] % 3:
        return "the packed in-projection weight is not [3E, E_in]"
    e = w.shape[0] // 3
    got = _weight_node(graph, weight)
    if got is None:
        return "the in-projection is not one MatMul/Gemm over the packed weight (cross-attention?)"
    in_node, x = got
    qkv = graph.nodes[in_node].output[0]
    users = graph._consumers(qkv)
    bias = f"{module}.in_proj_bias"
    if (
        len(users) == 1
        and graph.nodes[users[0]].op_type == "Add"
        and bias in graph.nodes[users[0]].input
    ):
        qkv = graph.nodes[users[0]].output[0]
    out_w = f"{module}.out_proj.weight"
    got = _weight_node(graph, out_w) if out_w in graph.init_names else None
    if got is None:
        return f"its output projection {out_w!r} is not one Gemm/MatMul"
    out_node, out = got
    core = _core(graph, out, {qkv, x})
    if isinstance(core, str):
        return core
    escape = _escaping(graph, core, qkv, out, out_node)
    if escape is not None:
        return escape
    shape_x = graph.shapes.get(x)
    if not shape_x or len(shape_x) < 2 or shape_x[-1] is None:
        return "its input shape is unknown"
    layout = _layout(graph, core, qkv, x, out, list(shape_x), e)
    if isinstance(layout, str):
        return layout
    heads, seq_axis, merged = layout
    return Attention(
        module, weight, in_node, x, qkv, out, out_node, core, heads, e // heads, seq_axis, merged
    )


def _core(graph: ChannelGraph, out: str, cut: set[str]) -> list[int] | str:
    """Nodes `out` depends on, stopping at the `cut` tensors and at constants."""
    seen: set[int] = set()
    stack = [out]
    while stack:
        name = stack.pop()
        if not name or name in cut or name in graph.init_names:
            continue
        k = graph._producer_idx.get(name)
        if k is None:
            return f"its core reads {name!r}, a tensor from outside the attention (a mask?)"
        if k in seen:
            continue
        seen.add(k)
        stack.extend(graph.nodes[k].input)
    return sorted(seen)


def _live_nodes(graph: ChannelGraph) -> set[int]:
    live: set[int] = set()
    stack = [o.name for o in graph.model.graph.output]
    while stack:
        k = graph._producer_idx.get(stack.pop())
        if k is None or k in live:
            continue
        live.add(k)
        stack.extend(i for i in graph.nodes[k].input if i)
    return live


def _escaping(
    graph: ChannelGraph, core: list[int], qkv: str, out: str, out_node: int
) -> str | None:
    """Why a tensor computed from q|k|v is used outside the core (None when none is); the
    core's output goes to the out-projection only."""
    inside = set(core) | {out_node}
    dep = {qkv}
    live = _live_nodes(graph)
    outputs = {o.name for o in graph.model.graph.output}
    for k in core:
        n = graph.nodes[k]
        if any(i in dep for i in n.input):
            dep.update(n.output)
    for name in dep:
        if name in outputs:
            return f"its internal tensor {name!r} is a model output"
        for user in graph._consumers(name):
            if (user not in inside or (user == out_node and name != out)) and user in live:
                return (
                    f"its internal tensor {name!r} is used outside the attention (attention "
                    "weights returned?)"
                )
    return None


def _core_model(
    graph: ChannelGraph, core: list[int], qkv: str, x: str, out: str, opset: int
) -> onnx.ModelProto:
    nodes = [graph.nodes[k] for k in core]
    used = {i for n in nodes for i in n.input}
    inits = [graph._inits[i] for i in sorted(used) if i in graph._inits]
    g = helper.make_graph(
        nodes,
        "attention_core",
        [
            helper.make_tensor_value_info(qkv, onnx.TensorProto.FLOAT, None),
            helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, None),
        ],
        [helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    s = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return s.run(None, feeds)[0]


def attention_np(qkv: np.ndarray, heads: int, seq_axis: int, merged: bool) -> np.ndarray:
    """Scaled dot-product attention over `seq_axis` of q|k|v [..., 3E] (the slow, obvious form)."""
    lead = list(qkv.shape[:-1])
    e = qkv.shape[-1] // 3
    d = e // heads
    q, k, v = (qkv[..., i * e : (i + 1) * e].reshape(*lead, heads, d) for i in range(3))
    q, k, v = (np.moveaxis(t, seq_axis, -2) for t in (q, k, v))  # [..., H, N, d]
    s = q @ np.swapaxes(k, -1, -2) / math.sqrt(d)
    s = np.exp(s - s.max(axis=-1, keepdims=True))
    o = (s / s.sum(axis=-1, keepdims=True)) @ v
    o = np.moveaxis(o, -2, seq_axis).reshape(*lead, e)
    return o.reshape(-1, e) if merged else o


def _layout(
    graph: ChannelGraph,
    core: list[int],
    qkv: str,
    x: str,
    out: str,
    shape_x: list[int | None],
    e: int,
) -> tuple[int, int, bool] | str:
    """(heads, sequence axis, merged output) for which the core computes standard attention at
    every probe; a message when no candidate does."""
    opset = next((o.version for o in graph.model.opset_import if o.domain in ("", "ai.onnx")), 17)
    orig = _core_model(graph, core, qkv, x, out, opset)
    rng = np.random.default_rng(0)
    cases = []
    for p in _PROBES:
        dims = [p if s is None else int(s) for s in shape_x]
        xv = rng.standard_normal(dims).astype(np.float32)
        qv = rng.standard_normal([*dims[:-1], 3 * e]).astype(np.float32)
        try:
            ref = _run(orig, {qkv: qv, x: xv})
        except Exception as exc:
            return f"its core does not run on its own ({str(exc).splitlines()[0][:120]})"
        cases.append((xv, qv, ref))
    rank = len(shape_x)
    xv, qv, ref = cases[0]
    q64 = qv.astype(np.float64)
    found = None
    for h in _head_counts(graph, core, e, int(np.prod(qv.shape[:-1]))):
        for s in range(rank - 1):
            got = attention_np(q64, h, s, merged=False)
            for merged in (False, True) if rank > 2 else (False,):
                got = got.reshape(-1, e) if merged else got
                if found is None and got.shape == ref.shape and _close(ref, got):
                    found = (h, s, merged)
            if found is not None:
                break
        if found is not None:
            break
    if found is None:
        return "its core is not plain scaled dot-product attention (a mask, bias_k/v or dropout?)"
    h, s, merged = found
    for _xv, qv, ref in cases:  # the graph surgery writes must agree too, at every probe
        g = helper.make_graph(
            core_nodes("check", qkv, out, rank, h, e // h, s, merged),
            "canonical",
            [helper.make_tensor_value_info(qkv, onnx.TensorProto.FLOAT, None)],
            [helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None)],
        )
        got = _run(helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]), {qkv: qv})
        if got.shape != ref.shape or not _close(ref, got):
            return "its core differs from the attention surgery writes"
    return found


def _head_counts(graph: ChannelGraph, core: list[int], e: int, rows: int) -> list[int]:
    """Head counts to try, in order: the integer constants of the core that divide E, most
    used first (the exported head count enters several shape computations), then the other
    divisors of E whose score tensor at the probe stays under _MAX_SCORES elements (a wrong
    count only costs time; the result is checked)."""
    uses: dict[int, int] = {}
    for k in core:
        for name in graph.nodes[k].input:
            v = graph.const(name) if name else None
            if v is not None and v.size == 1 and v.dtype.kind in "iu":
                h = int(v.reshape(-1)[0])
                if 1 < h <= e and e % h == 0:
                    uses[h] = uses.get(h, 0) + 1
    hints = sorted(uses, key=lambda h: -uses[h])
    rest = [h for h in range(1, e + 1) if e % h == 0 and h not in uses]
    return hints + [h for h in rest if h * rows * rows <= _MAX_SCORES]


def _close(ref: np.ndarray, got: np.ndarray, tol: float = 1e-4) -> bool:
    return bool(np.max(np.abs(ref - got)) <= tol * max(1.0, float(np.max(np.abs(ref)))))


def core_nodes(
    prefix: str,
    qkv: str,
    out: str,
    rank: int,
    heads: int,
    head_dim: int,
    seq_axis: int,
    merged: bool,
) -> list[onnx.NodeProto]:
    """ONNX nodes (constants included) computing `out` from q|k|v (rank `rank`, [..., 3 *
    heads * head_dim]) as attention_np does. Like torch's export, q and k^T are each scaled by
    head_dim ** -0.25, so the pruned core's ops are the original's with fewer heads."""
    e = heads * head_dim
    lead = rank - 1
    batch = [a for a in range(lead) if a != seq_axis]
    nb = len(batch)

    def t(s: str) -> str:
        return f"{prefix}/{s}"

    def const(name: str, arr: np.ndarray) -> onnx.NodeProto:
        return helper.make_node(
            "Constant",
            [],
            [t(name)],
            name=t(f"Constant_{name}"),
            value=numpy_helper.from_array(arr),
        )

    back = [nb + 1 if j == seq_axis else batch.index(j) for j in range(lead)] + [nb, nb + 2]
    return [
        const("split", np.array([0] * lead + [3, heads, head_dim], np.int64)),
        const("merge", np.array([-1, e] if merged else [0] * lead + [e], np.int64)),
        const("scale", np.array(head_dim**-0.25, np.float32)),
        *[const(f"idx{i}", np.array(i, np.int64)) for i in range(3)],
        helper.make_node("Reshape", [qkv, t("split")], [t("heads")], name=t("Reshape_split")),
        helper.make_node(
            "Transpose",
            [t("heads")],
            [t("qkv_t")],
            name=t("Transpose_heads"),
            perm=[lead, *batch, lead + 1, seq_axis, lead + 2],
        ),
        *[
            helper.make_node(
                "Gather", [t("qkv_t"), t(f"idx{i}")], [t(c)], name=t(f"Gather_{c}"), axis=0
            )
            for i, c in enumerate("qkv")
        ],
        helper.make_node(
            "Transpose",
            [t("k")],
            [t("k_t")],
            name=t("Transpose_k"),
            perm=[*range(nb + 1), nb + 2, nb + 1],
        ),
        helper.make_node("Mul", [t("q"), t("scale")], [t("q_s")], name=t("Mul_q")),
        helper.make_node("Mul", [t("k_t"), t("scale")], [t("k_s")], name=t("Mul_k")),
        helper.make_node("MatMul", [t("q_s"), t("k_s")], [t("scores")], name=t("MatMul_qk")),
        helper.make_node("Softmax", [t("scores")], [t("probs")], name=t("Softmax"), axis=-1),
        helper.make_node("MatMul", [t("probs"), t("v")], [t("ctx")], name=t("MatMul_v")),
        helper.make_node(
            "Transpose", [t("ctx")], [t("ctx_t")], name=t("Transpose_back"), perm=back
        ),
        helper.make_node("Reshape", [t("ctx_t"), t("merge")], [out], name=t("Reshape_merge")),
    ]
