"""Tiny real models for the device tests, written directly with onnx.helper and the TFLite schema."""

from __future__ import annotations

from pathlib import Path

import flatbuffers
import numpy as np
import onnx
from ai_edge_litert import schema_py_generated as tfl
from onnx import TensorProto, helper, numpy_helper


def conv_onnx(
    path: Path, cin: int = 3, cout: int = 8, hw: int = 16, k: int = 3, seed: int = 0
) -> Path:
    """Conv(k x k, same padding) -> Relu on a 1 x cin x hw x hw input, opset 17."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((cout, cin, k, k)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    pad = k // 2
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[pad] * 4, kernel_shape=[k, k]),
            helper.make_node("Relu", ["c"], ["y"]),
        ],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, hw, hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cout, hw, hw])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def fc_tflite(
    path: Path, n_in: int = 16, n_out: int = 8, seed: int = 0
) -> tuple[Path, np.ndarray, np.ndarray]:
    """One FULLY_CONNECTED op (y = x W^T + b), built with the TFLite flatbuffer schema."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_out, n_in)).astype(np.float32)
    b = rng.standard_normal(n_out).astype(np.float32)
    model = tfl.ModelT()
    model.version = 3
    model.description = "fair-edge test"
    model.buffers = []
    for data in (None, w, b):
        buf = tfl.BufferT()
        buf.data = None if data is None else list(data.tobytes())
        model.buffers.append(buf)

    def tensor(name: str, shape: tuple[int, ...], buffer: int) -> tfl.TensorT:
        t = tfl.TensorT()
        t.name, t.shape, t.type, t.buffer = name, list(shape), tfl.TensorType.FLOAT32, buffer
        return t

    sg = tfl.SubGraphT()
    sg.tensors = [
        tensor("x", (1, n_in), 0),
        tensor("w", (n_out, n_in), 1),
        tensor("b", (n_out,), 2),
        tensor("y", (1, n_out), 0),
    ]
    sg.inputs, sg.outputs = [0], [3]
    op = tfl.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0, 1, 2], [3]
    op.builtinOptionsType = tfl.BuiltinOptions.FullyConnectedOptions
    op.builtinOptions = tfl.FullyConnectedOptionsT()
    sg.operators = [op]
    code = tfl.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = tfl.BuiltinOperator.FULLY_CONNECTED
    code.version = 1
    model.operatorCodes, model.subgraphs = [code], [sg]
    fb = flatbuffers.Builder(1024)
    fb.Finish(model.Pack(fb), file_identifier=b"TFL3")
    path.write_bytes(bytes(fb.Output()))
    return path, w, b
