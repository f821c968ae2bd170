"""Latency estimates from a model's cost and a profile's published figures (roofline).

An Estimate is never a Measurement: it has its own type and `kind = "estimate"`, carries the
basis it was computed from, and reports refuse to put the two in one comparison.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from devices.errors import DeviceError
from devices.profile import DeviceProfile, load_profile

SCHEMA = "fair-edge.estimate/1"
MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class Estimate:
    """A roofline latency bound: max(FLOPs / compute, bytes / bandwidth)."""

    profile: str
    model: str
    latency_ms: float
    compute_ms: float
    memory_ms: float
    bound: str
    flops: float
    bytes: float
    compute_gflops: float
    compute_source: str
    bandwidth_gbps: float
    bandwidth_source: str
    basis: str
    label: str = "estimate"
    kind: str = "estimate"
    schema: str = SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Estimate:
        data = json.loads(text)
        if data.get("schema") != SCHEMA or data.get("kind") != "estimate":
            raise DeviceError(f"not a fair-edge estimate record (schema {data.get('schema')!r})")
        return cls(**data)


def estimate(
    flops: float, bytes_moved: float, profile: DeviceProfile | str, *, model: str = ""
) -> Estimate:
    """Roofline estimate for `flops` floating-point operations moving `bytes_moved` bytes."""
    profile = load_profile(profile) if isinstance(profile, str) else profile
    if flops < 0 or bytes_moved < 0:
        raise DeviceError(
            f"estimate needs non-negative FLOPs and bytes, got {flops}, {bytes_moved}"
        )
    compute_ms = flops / (profile.compute.value * 1e9) * 1e3
    memory_ms = bytes_moved / (profile.bandwidth.value * 1e9) * 1e3
    bound = "compute" if compute_ms >= memory_ms else "memory"
    basis = (
        f"roofline max(FLOPs / {profile.compute.value:g} GFLOP/s [{profile.compute.kind}], "
        f"bytes / {profile.bandwidth.value:g} GB/s [{profile.bandwidth.kind}]); "
        "ignores runtime overheads, cache reuse and threading; a rough guide, not a measurement"
    )
    return Estimate(
        profile=profile.name,
        model=model,
        latency_ms=max(compute_ms, memory_ms),
        compute_ms=compute_ms,
        memory_ms=memory_ms,
        bound=bound,
        flops=float(flops),
        bytes=float(bytes_moved),
        compute_gflops=profile.compute.value,
        compute_source=profile.compute.source,
        bandwidth_gbps=profile.bandwidth.value,
        bandwidth_source=profile.bandwidth.source,
        basis=basis,
    )


def onnx_cost(model: onnx.ModelProto | str | os.PathLike) -> tuple[float, float]:
    """(FLOPs, bytes) of one batch-1 inference of an ONNX model.

    FLOPs: exporters.costs.count_cost, with its multiply-accumulates counted as 2 FLOPs. Bytes:
    every initializer read once plus every intermediate tensor written once and read once.
    """
    from exporters.costs import count_cost

    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    cost = count_cost(proto)
    flops = sum(n.flops * (2 if n.op in MAC_OPS else 1) for n in cost.nodes)
    inferred = onnx.shape_inference.infer_shapes(proto)
    weight_bytes = sum(
        int(np.prod(t.dims, dtype=np.int64))
        * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        for t in proto.graph.initializer
    )
    act_bytes = 0
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        t = vi.type.tensor_type
        if not t.HasField("shape") or t.elem_type == 0:
            continue
        n = int(
            np.prod([d.dim_value if d.dim_value > 0 else 1 for d in t.shape.dim], dtype=np.int64)
        )
        act_bytes += 2 * n * onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).itemsize
    return float(flops), float(weight_bytes + act_bytes)


def estimate_onnx(path: str | os.PathLike, profile: DeviceProfile | str) -> Estimate:
    """Roofline estimate for an ONNX file on a profile's board."""
    flops, nbytes = onnx_cost(path)
    return estimate(flops, nbytes, profile, model=os.path.basename(str(path)))
