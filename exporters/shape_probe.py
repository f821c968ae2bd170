"""Shape arithmetic the exporter computes at run time, probed at other channel counts.

torch exports `x.view(n, g, c // g, h, w)` and `x.chunk(2, 1)` (ShuffleNet's channel shuffle and
split) as small graphs over Shape(x). After pruning, those graphs recompute their values from the
pruned tensor's shape. The channel analysis needs to know what they will compute then: this module
evaluates a tensor with Shape(x) replaced by a chosen shape, so a value can be checked to follow
the channel count (e.g. to be exactly c / 2 for every even c) before surgery relies on it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from exporters.graph_groups import ChannelGraph

_MAX_DEPTH = 24


def eval_with_shape(graph: ChannelGraph, name: str, x: str, shape: list[int]) -> np.ndarray | None:
    """The value of `name` when Shape(`x`) is `shape` (None if it depends on anything else)."""
    return _eval(graph, name, x, np.asarray(shape, dtype=np.int64), {}, 0)


def _eval(
    graph: ChannelGraph,
    name: str,
    x: str,
    shape: np.ndarray,
    memo: dict[str, np.ndarray | None],
    depth: int,
) -> np.ndarray | None:
    if name in memo:
        return memo[name]
    node = graph._producer_node.get(name)
    result: np.ndarray | None = None
    if node is not None and node.op_type == "Shape" and node.input[0] == x:
        start = end = None
        for a in node.attribute:
            if a.name == "start":
                start = a.i
            elif a.name == "end":
                end = a.i
        result = shape[start:end]
    elif node is None or node.op_type == "Shape" or depth > _MAX_DEPTH:
        result = graph.value(name)
    else:
        from exporters.graph_groups import _FOLDABLE, eval_node

        if node.op_type not in _FOLDABLE:
            result = None
        else:
            ins = [_eval(graph, i, x, shape, memo, depth + 1) if i else None for i in node.input]
            outs = eval_node(node, ins)
            result = None if outs is None else outs[list(node.output).index(name)]
    memo[name] = result
    return result


def fixed_values(
    graph: ChannelGraph, names: list[str], x: str, shape: list[int | None]
) -> list[np.ndarray] | None:
    """The values of `names` for the model's own shape of `x` (unknown dims probed at 1 and 2:
    None unless the values do not depend on them)."""
    out = []
    for fill in (1, 2):
        probe = [fill if s is None else int(s) for s in shape]
        vals = [eval_with_shape(graph, n, x, probe) for n in names]
        if any(v is None for v in vals):
            return None
        out.append(vals)
    if any(not np.array_equal(a, b) for a, b in zip(out[0], out[1], strict=True)):
        return None
    return out[0]
