"""A latency model of one ONNX model on one device, built from per-layer tables measured there.

FLOPs are a poor guide to latency on small CPUs: channel counts off the kernel's block size,
memory-bound depthwise convs and per-op overhead all bend the curve. So each prunable layer
(every Conv and Gemm) is timed on the device at a grid of (input, output) channel counts, as a
single-op ONNX model of the right shapes (the op with a bias, which is what ORT leaves of
Conv + BatchNorm, plus the activation that follows it), with ONNX Runtime at the profile's thread
count. A plan's latency is then predicted as

    base + sum over layers of the table interpolated at the plan's kept counts

where the base (measured full model minus the layers' tables at full size) holds what pruning
does not touch (pools, adds, the session run itself). A layer's input count comes from the layer
that feeds it through channel-preserving ops (BatchNorm, activations, pools, residual adds,
Flatten), found from the graph. Tables are measured once and cached per (profile, runtime
version, threads, model fingerprint, grid) in calibration.fileio.cache_dir("latency").

Grid counts are multiples of the profile's channel multiple, so predictions are for rounded
plans; for unrounded counts the interpolation is optimistic by the misalignment penalty (that gap
is what rounding removes; bench/bench_latency.py measures it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from calibration.errors import FairEdgeError
from calibration.fileio import atomic_write_text, cache_dir
from pipeline.plan import Plan

SCHEMA = "fair-edge/latency-model"
VERSION = 1
DEFAULT_FRACTIONS: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)

# Ops whose output channel i comes from input channel i (so channel counts pass through).
_PASS_THROUGH = {
    "BatchNormalization", "Relu", "Clip", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid",
    "HardSwish", "Tanh", "Elu", "Selu", "Gelu", "Softplus", "MaxPool", "AveragePool",
    "GlobalAveragePool", "GlobalMaxPool", "Dropout", "Identity", "Pad", "Add", "Sum", "Mul",
    "Sub", "Div", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Cast", "LpNormalization",
}  # fmt: skip
_ACTIVATIONS = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh"}


MIN_PREDICTION_MS = 1e-3


class LatencyModelError(FairEdgeError):
    """A model the latency tables cannot be built for, or a table file that cannot be used."""


@dataclass
class LayerTable:
    """Measured latency of one Conv/Gemm layer over a grid of input and output channel counts.

    `in_grid` counts are in units of the source layer (`in_source`); the op's real input size is
    that times `in_per_unit` (H*W for a Gemm after Flatten). `ms[i][j]` is at (in_grid[i],
    out_grid[j]), the session-run overhead already subtracted.
    """

    name: str
    node: str
    op: str  # 'conv' | 'depthwise' | 'gemm'
    in_full: int
    out_full: int
    in_source: str | None
    in_per_unit: int
    out_prunable: bool
    spec: dict[str, Any]
    in_grid: list[int]
    out_grid: list[int]
    ms: list[list[float]]

    def counts(self, kept: Mapping[str, int]) -> tuple[int, int]:
        """(input units of the source, output units) of this layer under `kept` counts."""
        cin = kept.get(self.in_source, self.in_full) if self.in_source else self.in_full
        if self.op == "depthwise":
            return cin, cin
        cout = kept.get(self.name, self.out_full) if self.out_prunable else self.out_full
        return cin, cout

    def predict(self, cin: int, cout: int) -> float:
        values = np.asarray(self.ms, dtype=np.float64)
        if self.op == "depthwise":
            return max(0.0, _interp1(cin, self.in_grid, values[:, 0]))
        rows = [_interp1(cout, self.out_grid, values[i]) for i in range(len(self.in_grid))]
        return max(0.0, _interp1(cin, self.in_grid, np.asarray(rows)))


def _interp1(x: float, xs: Sequence[int], ys: np.ndarray) -> float:
    """Piecewise-linear in x, extended linearly beyond the grid (proportionally for one point)."""
    xs_a = np.asarray(xs, dtype=np.float64)
    ys_a = np.asarray(ys, dtype=np.float64)
    if xs_a.size == 1:
        return float(ys_a[0] * x / xs_a[0])
    if x < xs_a[0]:
        slope = (ys_a[1] - ys_a[0]) / (xs_a[1] - xs_a[0])
        return float(ys_a[0] + slope * (x - xs_a[0]))
    if x > xs_a[-1]:
        slope = (ys_a[-1] - ys_a[-2]) / (xs_a[-1] - xs_a[-2])
        return float(ys_a[-1] + slope * (x - xs_a[-1]))
    return float(np.interp(x, xs_a, ys_a))


@dataclass
class LatencyModel:
    """Per-layer latency tables of one model on one device, and the measured full-model time."""

    profile: str
    runtime: str
    runtime_version: str
    threads: int
    fingerprint: str
    input_shape: list[int]
    multiple: int
    stat: str
    full_ms: float
    overhead_ms: float
    layers: list[LayerTable]
    timing: str = "kernel"
    build_s: float = 0.0
    scale: float = 1.0
    offset_ms: float | None = None
    calibration: dict[str, Any] = field(default_factory=dict)
    accuracy: dict[str, Any] = field(default_factory=dict)
    schema: str = SCHEMA
    version: int = VERSION

    @property
    def base_ms(self) -> float:
        """Full-model time minus every layer's table at full size: what pruning leaves alone."""
        return self.full_ms - self.layers_ms({})

    def layers_ms(self, kept: Mapping[str, int]) -> float:
        return float(sum(t.predict(*t.counts(kept)) for t in self.layers))

    def predict(self, plan_or_kept: Plan | Mapping[str, int]) -> float:
        """Predicted latency (ms) of the model pruned by a plan (or per-layer kept counts).

        Uncalibrated: base + sum of the layers' tables. After `calibrate`: offset + scale * sum,
        fitted on measured pruned models (absorbs what isolated single-op timings miss in the
        whole graph: layout reorders, pools and adds shrinking with the channels).
        """
        kept = kept_counts(plan_or_kept)
        offset = self.base_ms if self.offset_ms is None else self.offset_ms
        # isolated kernel timings can sum past the whole model's time, so the linear model may
        # go to zero or below for a heavily pruned plan; no run is faster than the session's
        # own per-run overhead (or 1 us)
        return max(offset + self.scale * self.layers_ms(kept), self.overhead_ms, MIN_PREDICTION_MS)

    def breakdown(self, plan_or_kept: Plan | Mapping[str, int]) -> dict[str, float]:
        kept = kept_counts(plan_or_kept)
        return {t.name: t.predict(*t.counts(kept)) for t in self.layers}

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> LatencyModel:
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise LatencyModelError("not a fair-edge latency model (missing schema); rebuild it")
        if data.get("version") != VERSION:
            raise LatencyModelError(
                f"latency model version {data.get('version')} is not supported; rebuild it"
            )
        try:
            layers = [LayerTable(**t) for t in data["layers"]]
            rest = {k: v for k, v in data.items() if k != "layers"}
            return cls(layers=layers, **rest)
        except (KeyError, TypeError) as exc:
            raise LatencyModelError(f"latency model file is malformed ({exc}); rebuild it") from exc

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> LatencyModel:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise LatencyModelError(
                f"latency model file {os.fspath(path)!r} does not exist"
            ) from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise LatencyModelError(
                f"latency model file {os.fspath(path)!r} is not JSON: {exc}"
            ) from exc
        return cls.from_json(data)


def kept_counts(plan_or_kept: Plan | Mapping[str, int]) -> dict[str, int]:
    if isinstance(plan_or_kept, Plan):
        return {name: lp.kept for name, lp in plan_or_kept.layers.items()}
    return {k: int(v) for k, v in plan_or_kept.items()}


# ---------------------------------------------------------------------------------------------
# Graph analysis


@dataclass
class _LayerInfo:
    name: str
    node: onnx.NodeProto
    op: str
    in_full: int
    out_full: int
    in_source: str | None
    in_per_unit: int
    out_prunable: bool
    spec: dict[str, Any]


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def layer_name(weight: str, node: onnx.NodeProto) -> str:
    """Torch layer name from the weight initializer ('layer1.0.conv1.weight' -> 'layer1.0.conv1')."""
    return weight[: -len(".weight")] if weight.endswith(".weight") else (node.name or weight)


def model_fingerprint(model: onnx.ModelProto) -> str:
    """Digest of what latency depends on: ops, attributes, wiring and tensor shapes (not values)."""
    h = hashlib.sha256()
    for inp in model.graph.input:
        dims = [d.dim_value or d.dim_param for d in inp.type.tensor_type.shape.dim]
        h.update(f"in:{inp.name}:{dims}\n".encode())
    for init in model.graph.initializer:
        h.update(f"init:{init.name}:{list(init.dims)}\n".encode())
    for node in model.graph.node:
        attrs = sorted((a.name, str(helper.get_attribute_value(a))[:200]) for a in node.attribute)
        h.update(f"node:{node.op_type}:{list(node.input)}:{list(node.output)}:{attrs}\n".encode())
    return h.hexdigest()


def _shape_map(model: onnx.ModelProto, tensors: Sequence[str]) -> dict[str, list[int]]:
    """Initializer shapes, and the shapes of `tensors` at batch 1 from one ONNX Runtime run.

    Running the model (every listed tensor made an extra output) gives exact shapes where static
    shape inference stops, e.g. after a Pad whose pads are computed in the graph.
    """
    shapes: dict[str, list[int]] = {i.name: list(i.dims) for i in model.graph.initializer}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outputs = {o.name for o in probe.graph.output}
    wanted = [t for t in dict.fromkeys(tensors) if t not in shapes]
    probe.graph.output.extend(
        helper.make_empty_tensor_value_info(t) for t in wanted if t not in outputs
    )
    try:
        sess = session(probe.SerializeToString(), 1)
        names = [o.name for o in sess.get_outputs()]
        values = sess.run(names, _random_feeds(sess))
    except Exception as exc:  # ORT raises several types; one clear line instead
        raise LatencyModelError(
            f"ONNX Runtime cannot run the model to read its layer shapes ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}); check the model with onnx.checker"
        ) from exc
    shapes.update({n: list(v.shape) for n, v in zip(names, values, strict=True)})
    return shapes


def analyze(model: onnx.ModelProto) -> list[_LayerInfo]:
    """Every Conv/Gemm with its shapes, attributes and the layer that sets its input channels."""
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    data_inputs = [n.input[0] for n in graph.node if n.op_type in ("Conv", "Gemm") and n.input]
    shapes = _shape_map(model, data_inputs)
    outputs = {o.name for o in graph.output}
    weighted = {
        id(n): layer_name(n.input[1], n)
        for n in graph.node
        if n.op_type in ("Conv", "Gemm")
        and len(n.input) > 1
        and _is_param(n.input[1], inits, producer)
    }

    def source(tensor: str, seen: set[str]) -> str | None:
        """The layer whose output channels `tensor`'s channels are, through pass-through ops."""
        if tensor in seen or tensor in inits:
            return None
        seen.add(tensor)
        node = producer.get(tensor)
        if node is None:
            return None
        if id(node) in weighted:
            return weighted[id(node)]
        if node.op_type not in _PASS_THROUGH:
            return None
        for inp in node.input:
            if inp and inp not in inits and producer.get(inp) is not None:
                found = source(inp, seen)
                if found is not None:
                    return found
        return None

    def feeds_output(tensor: str) -> bool:
        if tensor in outputs:
            return True
        nexts = consumers.get(tensor, [])
        return any(
            n.op_type in ("Identity", "Softmax", "LogSoftmax", "Flatten")
            and feeds_output(n.output[0])
            for n in nexts
        )

    infos = []
    for node in graph.node:
        if id(node) not in weighted:
            continue
        name = weighted[id(node)]
        w = shapes.get(node.input[1])
        x = shapes.get(node.input[0])
        if w is None or x is None:
            raise LatencyModelError(
                f"cannot infer the shapes around layer {name!r}; export the model with static shapes"
            )
        src = source(node.input[0], set())
        if node.op_type == "Conv":
            group = int(_attr(node, "group", 1))
            out_full, in_full = int(w[0]), int(x[1])
            op = "depthwise" if group > 1 and group == in_full == out_full else "conv"
            if group > 1 and op != "depthwise":
                src = None  # grouped (non-depthwise) convs keep their input fixed here
            spec = {
                "kernel": [int(k) for k in w[2:]],
                "strides": list(_attr(node, "strides", [1] * (len(w) - 2))),
                "pads": list(_attr(node, "pads", [0] * 2 * (len(w) - 2))),
                "dilations": list(_attr(node, "dilations", [1] * (len(w) - 2))),
                "group": group,
                "spatial": [int(d) for d in x[2:]],
                "bias": True,
            }
            per_unit = 1
        else:
            trans_b = int(_attr(node, "transB", 0))
            out_full = int(w[0] if trans_b else w[1])
            in_full = int(w[1] if trans_b else w[0])
            op, spec, per_unit = "gemm", {"bias": True}, 1
        act = _following_activation(node, consumers)
        spec["activation"] = act
        if src is not None:
            src_full = _layer_out_units(src, infos)
            if src_full is None or in_full % src_full:
                src = None
            else:
                per_unit = in_full // src_full
                in_full = src_full
        out_prunable = not feeds_output(_chain_end(node, consumers))
        infos.append(
            _LayerInfo(name, node, op, in_full, out_full, src, per_unit, out_prunable, spec)
        )
    if not infos:
        raise LatencyModelError(
            "the model has no Conv or Gemm layer with a weight initializer to time"
        )
    return infos


def _is_param(name: str, inits: set[str], producer: dict[str, onnx.NodeProto]) -> bool:
    if name in inits:
        return True
    node = producer.get(name)
    return node is not None and node.op_type == "Identity" and node.input[0] in inits


def _layer_out_units(name: str, infos: list[_LayerInfo]) -> int | None:
    return next((info.out_full for info in infos if info.name == name), None)


def _following_activation(
    node: onnx.NodeProto, consumers: dict[str, list[onnx.NodeProto]]
) -> str | None:
    """The activation after the layer (through one BatchNormalization), if it is the only consumer."""
    out = node.output[0]
    for _ in range(2):
        nexts = consumers.get(out, [])
        if len(nexts) != 1:
            return None
        if nexts[0].op_type in _ACTIVATIONS:
            return nexts[0].op_type
        if nexts[0].op_type != "BatchNormalization":
            return None
        out = nexts[0].output[0]
    return None


def _chain_end(node: onnx.NodeProto, consumers: dict[str, list[onnx.NodeProto]]) -> str:
    out = node.output[0]
    while True:
        nexts = consumers.get(out, [])
        if len(nexts) != 1 or nexts[0].op_type not in (
            "BatchNormalization",
            *_ACTIVATIONS,
            "Identity",
        ):
            return out
        out = nexts[0].output[0]


# ---------------------------------------------------------------------------------------------
# Single-op models and timing


def op_model(info: _LayerInfo | LayerTable, cin_units: int, cout: int) -> tuple[bytes, np.ndarray]:
    """A one-layer ONNX model (op + bias + activation) at the given counts, and an input for it."""
    rng = np.random.default_rng(0)
    spec = info.spec
    cin = cin_units * info.in_per_unit
    nodes, inits = [], []
    if info.op in ("conv", "depthwise"):
        group = cin if info.op == "depthwise" else int(spec["group"])
        if info.op == "depthwise":
            cout = cin
        k = spec["kernel"]
        x_shape = [1, cin, *spec["spatial"]]
        w = rng.standard_normal((cout, cin // group, *k)).astype(np.float32) * 0.1
        inits += [
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(np.zeros(cout, np.float32), "b"),
        ]
        nodes.append(
            helper.make_node(
                "Conv",
                ["x", "w", "b"],
                ["y0"],
                kernel_shape=k,
                strides=spec["strides"],
                pads=spec["pads"],
                dilations=spec["dilations"],
                group=group,
            )  # fmt: skip
        )
    else:
        x_shape = [1, cin]
        w = rng.standard_normal((cout, cin)).astype(np.float32) * 0.1
        inits += [
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(np.zeros(cout, np.float32), "b"),
        ]
        nodes.append(helper.make_node("Gemm", ["x", "w", "b"], ["y0"], transB=1))
    act = spec.get("activation")
    if act == "Clip":
        inits += [
            numpy_helper.from_array(np.float32(0), "lo"),
            numpy_helper.from_array(np.float32(6), "hi"),
        ]
        nodes.append(helper.make_node("Clip", ["y0", "lo", "hi"], ["y"]))
    elif act:
        nodes.append(helper.make_node(act, ["y0"], ["y"]))
    else:
        nodes.append(helper.make_node("Identity", ["y0"], ["y"]))
    graph = helper.make_graph(
        nodes, "layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = rng.standard_normal(x_shape).astype(np.float32)
    return model.SerializeToString(), x


def session(model: bytes | str | os.PathLike, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    src = model if isinstance(model, bytes) else os.fspath(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def time_session(
    sess: ort.InferenceSession, feeds: dict[str, np.ndarray], repeats: int, warmup: int = 2
) -> np.ndarray:
    """Wall times (ms) of `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        sess.run(None, feeds)
    times = np.empty(repeats)
    for i in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times[i] = time.perf_counter() - t0
    return times * 1e3


def statistic(times_ms: np.ndarray, stat: str = "min") -> float:
    """'min' (best run: the uncontended time, robust on a shared machine) or 'p50' (median)."""
    if stat == "min":
        return float(np.min(times_ms))
    if stat == "p50":
        return float(np.median(times_ms))
    raise LatencyModelError(f"latency statistic must be 'min' or 'p50', got {stat!r}")


def time_onnx(
    model: bytes | str | os.PathLike | onnx.ModelProto,
    threads: int,
    repeats: int = 30,
    warmup: int = 3,
    rounds: int = 1,
    stat: str = "min",
) -> float:
    """Latency (ms) of a whole ONNX model on this machine, random input of its shape: the
    statistic over `rounds` fresh sessions of `repeats` runs each."""
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    times = []
    for _ in range(rounds):
        sess = session(model, threads)
        times.append(time_session(sess, _random_feeds(sess), repeats, warmup))
    return statistic(np.concatenate(times), stat)


_BORDER_OPS = {"ReorderInput", "ReorderOutput", "Identity"}


@dataclass
class ProfiledRun:
    """One model's latency from ONNX Runtime's profiler, robust to a busy machine.

    `latency_ms` = sum over nodes of each node's best kernel time + the best per-run framework
    overhead (run time minus its kernels): the model's time when nothing else competes for the
    core. Short kernels are rarely preempted, so per-node bests hold even when whole runs are not.
    """

    latency_ms: float
    kernels_ms: dict[str, float]
    overhead_ms: float
    wall_min_ms: float
    wall_p50_ms: float


def profile_run(
    model: bytes | onnx.ModelProto,
    threads: int,
    repeats: int = 20,
    feeds: dict[str, np.ndarray] | None = None,
    skip_ops: frozenset[str] = frozenset(),
) -> ProfiledRun:
    """Run `model` `repeats` times under ORT's profiler and summarise it (see ProfiledRun)."""
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    with tempfile.TemporaryDirectory(prefix="fair-edge-ortprof-") as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "prof")
        sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        feeds = feeds if feeds is not None else _random_feeds(sess)
        for _ in range(2):
            sess.run(None, feeds)
        for _ in range(repeats):
            sess.run(None, feeds)
        with open(sess.end_profiling(), encoding="utf-8") as fh:
            events = json.load(fh)
    return summarize_profile(events, skip_runs=2, skip_ops=skip_ops)


def summarize_profile(
    events: list[dict[str, Any]], skip_runs: int = 0, skip_ops: frozenset[str] = frozenset()
) -> ProfiledRun:
    """ProfiledRun from ORT profile events (the JSON list), leaving out the first `skip_runs` runs."""
    runs = [(ev["ts"], ev["ts"] + ev["dur"]) for ev in events if ev.get("name") == "model_run"][
        skip_runs:
    ]
    kernels = [
        ev for ev in events
        if ev.get("cat") == "Node" and str(ev.get("name", "")).endswith("_kernel_time")
    ]  # fmt: skip
    if not runs or not kernels:
        raise LatencyModelError("ONNX Runtime's profiler reported no runs; use timing='wall'")
    starts = np.asarray([r[0] for r in runs])
    per_node: dict[str, list[float]] = {}
    run_kernel = np.zeros(len(runs))
    for ev in kernels:
        i = int(np.searchsorted(starts, ev["ts"], side="right")) - 1
        if i < 0 or ev["ts"] > runs[i][1]:
            continue  # a warm-up run
        run_kernel[i] += ev["dur"]
        if ev.get("args", {}).get("op_name") in skip_ops:
            continue
        per_node.setdefault(ev["name"][: -len("_kernel_time")], []).append(ev["dur"] / 1e3)
    walls = np.asarray([(b - a) for a, b in runs], dtype=np.float64)
    overhead = float(np.min(walls - run_kernel)) / 1e3
    best = {k: float(np.min(v)) for k, v in per_node.items()}
    return ProfiledRun(
        latency_ms=sum(best.values()) + max(0.0, overhead),
        kernels_ms=best,
        overhead_ms=max(0.0, overhead),
        wall_min_ms=float(walls.min()) / 1e3,
        wall_p50_ms=float(np.median(walls)) / 1e3,
    )


_BORDER_OPS = frozenset({"ReorderInput", "ReorderOutput", "Identity"})


def kernel_ms(model: bytes, feeds: dict[str, np.ndarray], threads: int, repeats: int) -> float:
    """Best kernel time (ms) of a one-layer model's ops, its layout reorders and Identity left out."""
    run = profile_run(model, threads, repeats, feeds=feeds, skip_ops=_BORDER_OPS)
    if not run.kernels_ms:
        raise LatencyModelError(
            "ONNX Runtime's profiler reported no kernel times; use timing='wall'"
        )
    return float(sum(run.kernels_ms.values()))


def measure_latency(
    model: bytes | onnx.ModelProto,
    threads: int,
    how: str = "profile",
    repeats: int = 20,
    rounds: int = 3,
) -> float:
    """A model's latency (ms) on this machine: 'profile' (ProfiledRun.latency_ms, best over
    `rounds` sessions) or 'wall' (best wall-clock run)."""
    if how == "profile":
        return min(profile_run(model, threads, repeats).latency_ms for _ in range(rounds))
    if how == "wall":
        data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
        return time_onnx(data, threads, repeats=repeats, rounds=rounds, stat="min")
    raise LatencyModelError(f"measurement must be 'profile' or 'wall', got {how!r}")


def _random_feeds(sess: ort.InferenceSession) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for inp in sess.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
        feeds[inp.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _overhead_ms(threads: int, repeats: int, stat: str) -> float:
    """Time of one session run of a trivial model: subtracted from every single-op timing."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "noop",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
    )  # fmt: skip
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    sess = session(m.SerializeToString(), threads)
    return statistic(
        time_session(sess, {"x": np.zeros((1, 8), np.float32)}, max(repeats, 50), 5), stat
    )


def grid(full: int, multiple: int, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> list[int]:
    """Grid counts: each fraction of `full` rounded up to the multiple (at least one multiple), and full."""
    pts = {full}
    for f in fractions:
        c = max(multiple, math.ceil(f * full / multiple) * multiple)
        if c < full:
            pts.add(c)
    return sorted(pts)


def resolve_profile(profile: Any) -> tuple[str, int, int, bool]:
    """(name, threads, channel multiple, is_host) from a DeviceProfile, a profile name, or None."""
    if profile is None:
        return "host", os.cpu_count() or 1, 1, True
    if isinstance(profile, str | os.PathLike):
        from devices.profile import load_profile

        profile = load_profile(profile)
    threads = int(getattr(profile, "threads", 0)) or (os.cpu_count() or 1)
    return profile.name, threads, int(profile.channel_multiple), bool(profile.is_host)


def build_latency_model(
    model: onnx.ModelProto | str | os.PathLike,
    profile: Any = "host",
    *,
    threads: int | None = None,
    multiple: int | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    repeats: int = 10,
    full_repeats: int = 30,
    stat: str = "min",
    timing: str = "kernel",
    cache: bool = True,
    progress: Callable[[str], None] | None = None,
) -> LatencyModel:
    """Measure (or load from the cache) the per-layer latency tables of `model` on this machine.

    The device is the machine running this: a profile that is not the host is refused (measure
    on the board itself). `threads` and `multiple` default to the profile's. `timing='kernel'`
    takes each layer's time from ONNX Runtime's profiler (the op's kernel alone, as it runs inside
    the whole graph: without the layout reorders and the session-run overhead a one-op model adds
    at its borders); `timing='wall'` times the one-op session run minus an empty run's time.
    """
    if timing not in ("kernel", "wall"):
        raise LatencyModelError(f"timing must be 'kernel' or 'wall', got {timing!r}")
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(os.fspath(model))
    name, p_threads, p_multiple, is_host = resolve_profile(profile)
    if not is_host:
        raise LatencyModelError(
            f"latency tables for profile {name!r} must be measured on that device: run this on the "
            "board (profile 'host' there), then pass the cached table file"
        )
    threads = int(threads or p_threads)
    multiple = int(multiple or p_multiple)
    fp = model_fingerprint(model)
    key = hashlib.sha256(
        json.dumps(
            [name, ort.__version__, threads, fp, multiple, list(fractions), repeats]
        ).encode()
    ).hexdigest()[:20]
    path = cache_dir("latency") / f"{name}-ort{ort.__version__}-t{threads}-{key}.json"
    if cache and path.is_file():
        try:
            return LatencyModel.load(path)
        except LatencyModelError:
            pass  # a stale or damaged cache entry is rebuilt below
    t0 = time.perf_counter()
    infos = analyze(model)
    overhead = _overhead_ms(threads, repeats, stat)
    tables = []
    for info in infos:
        if progress:
            progress(info.name)
        in_grid = grid(info.in_full, multiple, fractions) if info.in_source else [info.in_full]
        if info.op == "depthwise":
            out_grid = [0]
        elif info.out_prunable:
            out_grid = grid(info.out_full, multiple, fractions)
        else:
            out_grid = [info.out_full]
        ms = []
        for cin in in_grid:
            row = []
            for cout in out_grid:
                data, x = op_model(info, cin, cout)
                if timing == "kernel":
                    row.append(kernel_ms(data, {"x": x}, threads, repeats))
                else:
                    sess = session(data, threads)
                    t = statistic(time_session(sess, {"x": x}, repeats), stat)
                    row.append(max(0.0, t - overhead))
            ms.append(row)
        tables.append(
            LayerTable(
                name=info.name,
                node=info.node.name,
                op=info.op,
                in_full=info.in_full,
                out_full=info.out_full,
                in_source=info.in_source,
                in_per_unit=info.in_per_unit,
                out_prunable=info.out_prunable,
                spec=info.spec,
                in_grid=in_grid,
                out_grid=out_grid,
                ms=ms,
            )  # fmt: skip
        )
    full = measure_latency(
        model.SerializeToString(),
        threads,
        "profile" if timing == "kernel" else "wall",
        full_repeats,
    )
    shape = [
        int(d)
        for d in _random_feeds(session(model.SerializeToString(), threads)).popitem()[1].shape
    ]
    lm = LatencyModel(
        profile=name, runtime="onnxruntime", runtime_version=ort.__version__, threads=threads,
        fingerprint=fp, input_shape=shape, multiple=multiple, stat=stat, full_ms=full, overhead_ms=overhead, timing=timing,
        layers=tables, build_s=time.perf_counter() - t0,
    )  # fmt: skip
    if cache:
        lm.save(path)
    return lm


# ---------------------------------------------------------------------------------------------
# Accuracy on held-out plans


def mape(pairs: Sequence[tuple[float, float]]) -> float:
    """Mean absolute percentage error of (predicted, measured) pairs, in percent."""
    arr = np.asarray(pairs, dtype=np.float64)
    return float(np.mean(np.abs(arr[:, 0] - arr[:, 1]) / arr[:, 1]) * 100.0)


def evaluate(
    lm: LatencyModel,
    plans: Sequence[Plan | Mapping[str, int]],
    materialize: Callable[[Plan | Mapping[str, int]], onnx.ModelProto | bytes],
    *,
    repeats: int = 20,
    rounds: int = 3,
) -> dict[str, Any]:
    """Predicted vs measured latency on held-out plans; `materialize` builds each pruned model.

    Measured the way the model's full time was ('profile' for kernel tables, else 'wall').
    Records the result in `lm.accuracy` and returns it: per-plan pairs, MAPE and max error (%).
    """
    pairs = []
    for p in plans:
        measured = measure_latency(materialize(p), lm.threads, _how(lm), repeats, rounds)
        pairs.append((lm.predict(p), measured))
    errs = [abs(a - b) / b * 100.0 for a, b in pairs]
    lm.accuracy = {
        "measured": _how(lm),
        "plans": len(pairs),
        "mape_pct": mape(pairs),
        "max_err_pct": float(max(errs)),
        "pairs_ms": [[round(a, 4), round(b, 4)] for a, b in pairs],
    }
    return lm.accuracy


def _how(lm: LatencyModel) -> str:
    return "profile" if lm.timing == "kernel" else "wall"


def uniform_counts(lm: LatencyModel, fraction: float) -> dict[str, int]:
    """Every prunable layer keeping `fraction` of its units, rounded up to the model's multiple.

    Layers with equal unit counts get equal kept counts, so coupled groups stay consistent.
    """
    out = {}
    for t in lm.layers:
        if t.out_prunable and t.op != "depthwise":
            m = lm.multiple
            out[t.name] = min(t.out_full, max(m, math.ceil(fraction * t.out_full / m) * m))
    for t in lm.layers:
        if t.op == "depthwise" and t.in_source in out:
            out[t.name] = out[t.in_source]
    return out


def calibrate(
    lm: LatencyModel,
    plans: Sequence[Plan | Mapping[str, int]],
    materialize: Callable[[Plan | Mapping[str, int]], onnx.ModelProto | bytes],
    *,
    repeats: int = 20,
    rounds: int = 3,
    full_model: onnx.ModelProto | bytes | None = None,
) -> dict[str, Any]:
    """Fit offset and scale of the prediction by least squares on measured pruned models.

    The full model is one point (re-measured now when `full_model` is given, so all points come
    from the same period on a shared machine); each plan in `plans` (calibration plans, kept
    apart from the held-out plans of `evaluate`) is measured and adds one more.
    """
    xs = [lm.layers_ms({})]
    ys = [
        lm.full_ms
        if full_model is None
        else measure_latency(full_model, lm.threads, _how(lm), repeats, rounds)
    ]
    for p in plans:
        xs.append(lm.layers_ms(kept_counts(p)))
        ys.append(measure_latency(materialize(p), lm.threads, _how(lm), repeats, rounds))
    a = np.vstack([np.ones(len(xs)), xs]).T
    (offset, scale), *_ = np.linalg.lstsq(a, np.asarray(ys), rcond=None)
    if not (scale > 0 and np.isfinite(offset)):
        raise LatencyModelError(
            f"latency calibration failed (scale {scale:.3g}): the measurements are too noisy; "
            "re-run on a quieter machine or with more repeats"
        )
    lm.scale, lm.offset_ms = float(scale), float(offset)
    lm.calibration = {
        "plans": len(plans),
        "points_ms": [[round(x, 4), round(y, 4)] for x, y in zip(xs, ys, strict=True)],
        "scale": lm.scale,
        "offset_ms": lm.offset_ms,
    }
    return lm.calibration
