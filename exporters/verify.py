"""Verification oracle: the pruned model must compute what the masked original computes.

The masked original is the unpruned ONNX model with a 0/1 mask multiplied into every tensor
right where it enters a channel-mixing consumer (Conv, ConvTranspose, Gemm, MatMul): pruned
channels are zeroed there and nowhere else, which is exactly what removing them means, since
every op between a producer and its mixing consumers acts channel by channel. Both models run
in ONNX Runtime on seeded random inputs and on calibration inputs.

Tolerance (fp32): max |pruned - masked| <= tol * max(1, max |masked|), tol = 1e-4 by default;
the difference comes only from the changed summation order of the smaller reductions.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from exporters.errors import SurgeryError, VerificationError
from exporters.graph_groups import (
    MIXING_KINDS,
    ChannelGraph,
    add_weights_as_inputs,
    copy_without_initializers,
    skeleton,
)

DEFAULT_TOL = 1e-4
# More elements than this in one sample of a declared input is a shape no edge model runs on
# (1 GiB of float32); numpy would try to allocate it for the random batch and crash.
MAX_SAMPLE_ELEMS = 2**28
# Operator domains ONNX Runtime's CPU build runs. Any other needs a custom-op library fair-edge
# does not load, so a model using one can never be verified.
ORT_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})
_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
}


@dataclass
class VerificationResult:
    max_abs_diff: float
    bound: float
    max_abs_ref: float
    tol: float
    n_random: int
    n_calibration: int
    tensors_compared: int = 0
    max_tensor_rel_diff: float = 0.0

    def to_json(self) -> dict:
        return dict(self.__dict__)


def masked_original(
    graph: ChannelGraph, pruned: np.ndarray, weights: bool = True
) -> onnx.ModelProto:
    """The original model with pruned channels zeroed where they enter their mixing consumers.

    With `weights=False` the large initializers become typed graph inputs (see `_Runner`), so
    the weights need not be copied.
    """
    model = copy_without_initializers(graph.model)
    new_nodes = []
    masks = []
    for idx, node in enumerate(model.graph.node):
        info = graph.node_info.get(idx)
        if info is not None and info.kind in MIXING_KINDS and info.in_desc is not None:
            keep = graph.kept(info.in_desc, pruned)
            if not keep.all():
                d = info.in_desc
                rank = _input_rank(graph, node, info.kind)
                mask = np.repeat(keep.astype(np.float32), d.block)
                mask = mask.reshape([mask.size] + [1] * (rank - 1 - d.axis))
                mname = f"{node.input[0]}__fe_mask{idx}"
                masks.append(numpy_helper.from_array(mask, mname))
                out = f"{node.input[0]}__fe_masked{idx}"
                new_nodes.append(
                    helper.make_node("Mul", [node.input[0], mname], [out], name=f"fe_mask_{idx}")
                )
                node.input[0] = out
        new_nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    if weights:
        model.graph.initializer.extend(graph.model.graph.initializer)
    else:
        add_weights_as_inputs(model, graph.model.graph.initializer)
    model.graph.initializer.extend(masks)
    return model


def _input_rank(graph: ChannelGraph, node: onnx.NodeProto, kind: str) -> int:
    """Rank of a mixing node's data input. Shape inference stops at ops it cannot type (custom
    domains), but a convolution's input has its weight's rank and a Gemm's is 2."""
    shape = graph.shapes.get(node.input[0])
    if shape is not None:
        return len(shape)
    if kind == "gemm":
        return 2
    if kind in ("conv", "convT") and len(node.input) > 1:
        weight = graph.shapes.get(node.input[1])
        if weight is None:
            arr = graph.const(node.input[1])
            weight = None if arr is None else list(arr.shape)
        if weight is not None:
            return len(weight)
    raise SurgeryError(
        f"{node.op_type} {node.name!r}: shape inference cannot type its input, so the masked "
        "original cannot be built; make the model's shapes inferable (onnx.shape_inference) and re-run"
    )


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sub in a.graphs:
                    yield from _all_nodes(sub)


def check_runnable(model: onnx.ModelProto) -> None:
    """Raise SurgeryError for an op ONNX Runtime cannot run here (a custom domain without a
    model-local function defining it): verification would fail on it only after the surgery."""
    local = {(f.domain, f.name) for f in model.functions}
    for node in _all_nodes(model.graph):
        if node.domain not in ORT_DOMAINS and (node.domain, node.op_type) not in local:
            raise SurgeryError(
                f"{node.domain}::{node.op_type} (node {node.name!r}) is an op of a custom domain "
                "that ONNX Runtime cannot run here, so no pruned model could be verified; export "
                "the model with standard ONNX ops and re-run"
            )


class GraphWeights(Mapping):
    """The original model's initializers as numpy arrays, decoded once and cached by the graph."""

    def __init__(self, graph: ChannelGraph) -> None:
        self.graph = graph

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.graph.init_names:
            raise KeyError(name)
        return self.graph.const(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.graph.init_names)

    def __len__(self) -> int:
        return len(self.graph.init_names)


class _Runner:
    """Runs a model in ONNX Runtime with its large weights fed as inputs.

    Serialising hundreds of MB of weights into a session costs seconds; feeding the numpy arrays
    to a weightless skeleton does not. `weights` supplies arrays for graph inputs that are
    weights (a model built by `masked_original(..., weights=False)`).
    """

    def __init__(
        self, model: onnx.ModelProto, weights: Mapping[str, np.ndarray] | None = None
    ) -> None:
        sk = skeleton(model)
        small = {t.name for t in sk.graph.initializer}
        self.weights = {
            t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name not in small
        }
        if weights is not None:
            inits = {t.name for t in model.graph.initializer}
            for inp in model.graph.input:
                if inp.name not in inits and inp.name in weights:
                    self.weights[inp.name] = weights[inp.name]
        self.session = ort_session(sk)

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, {**feed, **self.weights})


def ort_session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(
            model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        raise SurgeryError(
            f"ONNX Runtime cannot load the model: {str(exc).splitlines()[0]}"
        ) from exc


def _data_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _static_batch(inp: onnx.ValueInfoProto) -> int | None:
    dims = inp.type.tensor_type.shape.dim
    return dims[0].dim_value if len(dims) and dims[0].HasField("dim_value") else None


def random_shapes(
    model: onnx.ModelProto, batch: int = 2, like: Mapping[str, np.ndarray] | None = None
) -> dict[str, list[int]]:
    """Shape of each random verification input, checked before anything is allocated.

    A symbolic batch axis (the first) gets `batch`; other symbolic axes take their size from
    `like` (one calibration feed), whose samples must also match every declared size. A sample
    over MAX_SAMPLE_ELEMS elements is refused rather than allocated.
    """
    shapes = {}
    for inp in _data_inputs(model):
        dim = inp.type.tensor_type.shape.dim
        declared = [d.dim_value if d.HasField("dim_value") else d.dim_param or "?" for d in dim]
        dims: list[int | None] = [d.dim_value if d.HasField("dim_value") else None for d in dim]
        sample = None if like is None else like.get(inp.name)
        if sample is not None:
            got = list(np.shape(sample))
            if len(got) != len(dims) or any(
                d is not None and d != g for d, g in zip(dims[1:], got[1:], strict=True)
            ):
                raise SurgeryError(
                    f"input {inp.name!r} is declared {declared} but the verification data's "
                    f"samples are {got[1:]}; give data of the model's input shape, or export the "
                    "model for the data's shape"
                )
            dims = [dims[0], *got[1:]] if dims else dims
        if dims and dims[0] is None:
            dims[0] = batch
        if any(d is None for d in dims):
            raise SurgeryError(
                f"input {inp.name!r} has a symbolic non-batch dimension; pass verify_inputs"
            )
        static = [int(d or 0) for d in dims]
        if math.prod(static[1:]) > MAX_SAMPLE_ELEMS or math.prod(static) > MAX_SAMPLE_ELEMS * batch:
            raise SurgeryError(
                f"input {inp.name!r} is declared {declared}: {math.prod(static):,} elements for "
                f"one verification batch, more than fair-edge allocates ({MAX_SAMPLE_ELEMS:,} per "
                "sample); export the model with its real input size and re-run"
            )
        shapes[inp.name] = static
    return shapes


def random_inputs(
    model: onnx.ModelProto,
    batch: int = 2,
    seed: int = 0,
    like: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Seeded standard-normal inputs of the shapes `random_shapes` checked."""
    rng = np.random.default_rng(seed)
    shapes = random_shapes(model, batch, like)
    feeds = {}
    for inp in _data_inputs(model):
        dtype = helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
        feeds[inp.name] = rng.standard_normal(shapes[inp.name]).astype(dtype)
    return feeds


def check_verify_inputs(model: onnx.ModelProto, inputs: object = None) -> None:
    """Raise SurgeryError, before any surgery, when `inputs` or the declared input shapes cannot
    make a verification batch (see `random_shapes`)."""
    calib = as_feeds(model, inputs)
    random_shapes(model, like=calib[0] if calib else None)


def as_feeds(model: onnx.ModelProto, inputs: object) -> list[dict[str, np.ndarray]]:
    """Calibration feeds: up to 64 samples, in batches of 16 or of the declared static batch."""
    if inputs is None:
        return []
    data = _data_inputs(model)
    if isinstance(inputs, dict):
        return [{k: np.asarray(v) for k, v in inputs.items()}]
    if isinstance(inputs, np.ndarray) or hasattr(inputs, "numpy"):
        arr = np.asarray(inputs, dtype=np.float32)
        static = _static_batch(data[0]) or None
        step, stop = static or 16, min(len(arr), 64)
        return [
            {data[0].name: arr[i : i + step]}
            for i in range(0, stop, step)
            if static is None or i + step <= stop
        ]
    if isinstance(inputs, Sequence):
        out = []
        for x in inputs:
            out.extend(as_feeds(model, x))
        return out
    raise SurgeryError(
        f"verify_inputs must be an array, a dict of arrays or a list of them, not {type(inputs).__name__}"
    )


def compare_models(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    inputs: object = None,
    tol: float = DEFAULT_TOL,
    n_random: int = 1,
    reference_weights: Mapping[str, np.ndarray] | None = None,
) -> VerificationResult:
    """Run both models on random (+ given) inputs; raise VerificationError beyond the tolerance.

    Inputs follow the candidate's graph inputs; `reference_weights` feeds a weightless reference.
    """
    calib = as_feeds(candidate, inputs)
    like = calib[0] if calib else None
    feeds = [random_inputs(candidate, seed=s, like=like) for s in range(n_random)]
    try:
        ref_s, cand_s = _Runner(reference, reference_weights), _Runner(candidate)
    except SurgeryError:
        raise
    except Exception as exc:
        raise VerificationError(
            f"verification cannot load a model: {str(exc).splitlines()[0]}"
        ) from exc
    worst, bound, ref_max = 0.0, 0.0, 0.0
    for feed in feeds + calib:
        try:
            ref = ref_s.run(feed)
            out = cand_s.run(feed)
        except Exception as exc:
            raise VerificationError(f"verification run failed: {str(exc).splitlines()[0]}") from exc
        for a, b in zip(ref, out, strict=True):
            a = np.asarray(a, dtype=np.float64)
            b = np.asarray(b, dtype=np.float64)
            if a.shape != b.shape:
                raise VerificationError(
                    f"pruned output shape {b.shape} differs from the original's {a.shape}"
                )
            diff = float(np.max(np.abs(a - b))) if a.size else 0.0
            lim = tol * max(1.0, float(np.max(np.abs(a))) if a.size else 1.0)
            if not np.isfinite(diff) or diff > lim:
                raise VerificationError(
                    f"pruned model differs from the masked original: max |diff| {diff:.3g} > {lim:.3g}; "
                    "the artifact was not written"
                )
            ref_max = max(ref_max, float(np.max(np.abs(a))) if a.size else 0.0)
            if diff >= worst:
                worst, bound = diff, lim
    return VerificationResult(worst, bound, ref_max, tol, len(feeds), len(calib))


def _float_tensors(graph: ChannelGraph) -> list[str]:
    """Names of the float tensors the original graph's nodes compute (not its outputs); their
    types come from the channel analysis's own shape inference pass."""
    types = graph.types
    outputs = {o.name for o in graph.model.graph.output}
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)
    return [o for n in graph.nodes for o in n.output
            if o and o not in outputs and types.get(o) in floats]  # fmt: skip


def _exposing(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of `model` that also returns the named intermediate tensors."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.output[:]
    out.graph.output.extend(
        helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names
    )
    return out


def compare_tensors(
    graph: ChannelGraph,
    pruned: np.ndarray,
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    feed: dict[str, np.ndarray],
    tol: float = DEFAULT_TOL,
    reference_weights: Mapping[str, np.ndarray] | None = None,
) -> tuple[int, float]:
    """Every float tensor both graphs compute must agree, the reference's restricted to the kept
    channels, within tol x that tensor's own largest magnitude.

    The outputs alone can be blind: a wrong channel whose effect is small at the output (small
    classifier weights, a layer scale of 1e-6) passes any bound set by the output's size. Here a
    misplaced channel is seen in the tensor where it happens, at that tensor's own scale.
    Returns (tensors compared, largest difference relative to its tensor's scale).
    """
    names = [
        n
        for n in _float_tensors(graph)
        if n in {o for nd in candidate.graph.node for o in nd.output}
    ]
    if not names:
        return 0, 0.0
    try:
        ref = _Runner(_exposing(reference, names), reference_weights).run(feed)
        got = _Runner(_exposing(candidate, names)).run(feed)
    except Exception as exc:
        raise VerificationError(
            f"verification of the intermediate tensors failed to run: {str(exc).splitlines()[0]}"
        ) from exc
    compared, worst = 0, 0.0
    for name, a, b in zip(names, ref, got, strict=True):
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        desc = graph.descs.get(name)
        if desc is not None and a.shape != b.shape:
            keep = graph.kept(desc, pruned)
            keep = np.repeat(keep, desc.block) if desc.block > 1 else keep
            if a.ndim > desc.axis and a.shape[desc.axis] == keep.size:
                a = np.take(a, np.flatnonzero(keep), axis=desc.axis)
        if a.shape != b.shape or not a.size:
            continue  # a tensor whose layout the channel graph does not describe
        scale = float(np.max(np.abs(a)))
        diff = float(np.max(np.abs(a - b)))
        if not np.isfinite(diff) or diff > tol * scale + 1e-12:
            raise VerificationError(
                f"pruned model differs from the masked original at tensor {name!r}: max |diff| "
                f"{diff:.3g} against its own scale {scale:.3g} (bound {tol * scale:.3g}); the "
                "artifact was not written"
            )
        compared += 1
        worst = max(worst, diff / scale if scale > 0 else 0.0)
    return compared, worst
