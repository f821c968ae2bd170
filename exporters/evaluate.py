"""Run an exported model file (ONNX or TFLite) on a batch of inputs, and score its top-1.

Accuracy before and after every runtime step (pruning, TFLite conversion, int8, fp16) is
recomputed from the file that ships, with the runtime that will run it, not from the torch model.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from exporters.errors import ExportError


def onnx_session(path: str | os.PathLike, threads: int = 1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(os.fspath(path), so, providers=["CPUExecutionProvider"])


def onnx_outputs(path: str | os.PathLike, inputs: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The first output of the ONNX model for every row of `inputs` (fixed batch 1 handled)."""
    sess = onnx_session(path)
    meta = sess.get_inputs()[0]
    dim0 = meta.shape[0] if meta.shape else None
    bs = batch_size if not isinstance(dim0, int) else dim0
    want = np.float16 if meta.type == "tensor(float16)" else np.float32
    outs = []
    for i in range(0, len(inputs), bs):
        x = np.ascontiguousarray(inputs[i : i + bs], dtype=want)
        if isinstance(dim0, int) and len(x) != dim0:
            x = np.concatenate([x, np.zeros((dim0 - len(x), *x.shape[1:]), x.dtype)])
            outs.append(sess.run(None, {meta.name: x})[0][: len(inputs) - i])
        else:
            outs.append(sess.run(None, {meta.name: x})[0])
    return np.concatenate(outs).astype(np.float32)


def tflite_outputs(path: str | os.PathLike, inputs: np.ndarray) -> np.ndarray:
    """The first output of a TFLite model for every row; int8 input/output tensors are
    (de)quantised with the tensor's own scale and zero point."""
    from ai_edge_litert.interpreter import Interpreter

    path = Path(path)
    try:
        interp = Interpreter(model_path=str(path), num_threads=1)
    except Exception as exc:
        raise ExportError(f"cannot load TFLite model {str(path)!r}: {exc}") from exc
    inp = interp.get_input_details()[0]
    out = interp.get_output_details()[0]
    batch = int(inp["shape"][0]) if len(inp["shape"]) else 1
    if len(inp["shape"]) and tuple(inp["shape"][1:]) != tuple(inputs.shape[1:]):
        raise ExportError(
            f"TFLite input shape {list(inp['shape'])} does not match the data's sample shape "
            f"{list(inputs.shape[1:])}"
        )
    interp.allocate_tensors()
    results = []
    for i in range(0, len(inputs), batch):
        x = inputs[i : i + batch]
        n = len(x)
        if n != batch:
            x = np.concatenate([x, np.zeros((batch - n, *x.shape[1:]), x.dtype)])
        x = _quantise(x, inp)
        interp.set_tensor(inp["index"], x)
        interp.invoke()
        results.append(_dequantise(interp.get_tensor(out["index"]), out)[:n])
    return np.concatenate(results)


def _quantise(x: np.ndarray, detail: dict) -> np.ndarray:
    dtype = detail["dtype"]
    if np.issubdtype(dtype, np.integer):
        scale, zero = detail["quantization"]
        info = np.iinfo(dtype)
        return np.clip(np.round(x / scale + zero), info.min, info.max).astype(dtype)
    return np.ascontiguousarray(x, dtype=dtype)


def _dequantise(y: np.ndarray, detail: dict) -> np.ndarray:
    if np.issubdtype(detail["dtype"], np.integer):
        scale, zero = detail["quantization"]
        return (y.astype(np.float32) - zero) * scale
    return y.astype(np.float32)


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def model_outputs(path: str | os.PathLike, inputs: np.ndarray) -> np.ndarray:
    """Dispatch on the file suffix (.onnx / .tflite)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".onnx":
        return onnx_outputs(path, inputs)
    if suffix == ".tflite":
        return tflite_outputs(path, inputs)
    raise ExportError(f"cannot run {str(path)!r}: expected an .onnx or .tflite file")


def accuracy(path: str | os.PathLike, inputs: np.ndarray, labels: np.ndarray) -> float:
    return top1(model_outputs(path, inputs), labels)
