"""int8 and fp16 variants of an exported model, calibrated on the same calibration set as scoring.

int8: ONNX Runtime static quantisation in QDQ form with per-channel weight scales (signed int8
activations and weights, ORT's recommended CPU format), activation ranges from a
CalibrationDataReader over the calibration inputs. `symmetric=True` writes the form TensorRT
accepts: every zero point 0 (symmetric activations and weights), per-channel weights, float
biases (TensorRT fuses them; it has no int32 DequantizeLinear). fp16: weights and activations in half
precision with float32 inputs/outputs kept, for runtimes that have fast fp16 (Jetson GPU).
The accuracy change is always measured on the written file, never assumed.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from calibration.fileio import atomic_write_bytes
from exporters.errors import ExportError
from exporters.evaluate import model_outputs, top1


@dataclass
class QuantizeReport:
    """What a quantisation step produced and what it cost in accuracy (on the eval inputs)."""

    kind: str
    path: str
    calibration_samples: int
    accuracy_before: float | None
    accuracy_after: float | None
    max_abs_logit_diff: float
    top1_agreement: float
    size_before: int
    size_after: int

    @property
    def accuracy_change(self) -> float | None:
        if self.accuracy_before is None or self.accuracy_after is None:
            return None
        return self.accuracy_after - self.accuracy_before

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "accuracy_change": self.accuracy_change}


class _Reader:
    """onnxruntime CalibrationDataReader over calibration inputs (batch 1, float32)."""

    def __init__(self, input_name: str, inputs: np.ndarray):
        self._name = input_name
        self._inputs = inputs
        self._i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._i >= len(self._inputs):
            return None
        x = np.ascontiguousarray(self._inputs[self._i : self._i + 1], dtype=np.float32)
        self._i += 1
        return {self._name: x}

    def rewind(self) -> None:
        self._i = 0


def _make_reader(input_name: str, inputs: np.ndarray):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(_Reader, CalibrationDataReader):
        pass

    return Reader(input_name, inputs)


def _input_name(path: Path) -> str:
    model = onnx.load(os.fspath(path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    if len(names) != 1:
        raise ExportError(f"{path.name}: quantisation supports one model input, found {names}")
    return names[0]


def quantize_int8_onnx(
    model_path: str | os.PathLike,
    out_path: str | os.PathLike,
    calibration_inputs: np.ndarray,
    *,
    per_channel: bool = True,
    max_samples: int = 256,
    symmetric: bool = False,
) -> Path:
    """Write an int8 QDQ model calibrated (MinMax) on up to `max_samples` calibration inputs.

    symmetric: zero points 0 everywhere and float biases, for TensorRT (checked on the written
    model by `require_symmetric`).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model_path, out_path = Path(model_path), Path(out_path)
    if calibration_inputs is None or len(calibration_inputs) == 0:
        raise ExportError(
            "int8 quantisation needs calibration data and got none: give --calibration "
            "(the activation ranges come from it)"
        )
    extra = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False}
    calib = np.asarray(calibration_inputs[:max_samples], dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="fair-edge-int8-") as tmp:
        pre = Path(tmp, "pre.onnx")
        try:
            quant_pre_process(os.fspath(model_path), os.fspath(pre), skip_symbolic_shape=True)
        except Exception:
            pre = model_path  # pre-processing only helps; quantise the model as is
        out_tmp = Path(tmp, "int8.onnx")
        try:
            quantize_static(
                os.fspath(pre),
                os.fspath(out_tmp),
                _make_reader(_input_name(model_path), calib),
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                extra_options=extra if symmetric else {},
            )
            if symmetric:
                require_symmetric(onnx.load(os.fspath(out_tmp)), model_path.name)
        except Exception as exc:
            raise ExportError(
                f"ONNX Runtime int8 quantisation of {model_path.name} failed: {type(exc).__name__}: {exc}"
            ) from exc
        atomic_write_bytes(out_path, out_tmp.read_bytes())
    return out_path


def nonzero_zero_points(model: onnx.ModelProto) -> dict[str, list[int]]:
    """{QuantizeLinear node: its non-zero zero points}; empty when every one is 0.

    A QuantizeLinear without a zero-point input quantises with zero point 0 (ONNX default).
    """
    from onnx import numpy_helper

    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute:
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    bad: dict[str, list[int]] = {}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or len(node.input) < 3 or not node.input[2]:
            continue
        if node.input[2] not in consts:
            raise ExportError(
                f"QuantizeLinear {node.name}: zero point {node.input[2]} is not a constant; "
                "TensorRT needs constant zero points"
            )
        zp = np.asarray(consts[node.input[2]]).astype(np.int64).ravel()
        if np.any(zp != 0):
            bad[node.name or node.output[0]] = sorted({int(v) for v in zp if v != 0})
    return bad


def require_symmetric(model: onnx.ModelProto, name: str) -> None:
    """Raise ExportError unless every QuantizeLinear has zero point 0 (what TensorRT accepts)."""
    quants = sum(n.op_type == "QuantizeLinear" for n in model.graph.node)
    if quants == 0:
        raise ExportError(f"{name} has no QuantizeLinear node: it is not an int8 QDQ model")
    bad = nonzero_zero_points(model)
    if bad:
        first = next(iter(bad))
        raise ExportError(
            f"{name}: {len(bad)} of {quants} QuantizeLinear nodes have non-zero zero points "
            f"(first {first}: {bad[first]}), which TensorRT rejects; quantise with symmetric=True"
        )


def convert_fp16_onnx(model_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Half-precision weights and compute, float32 inputs and outputs (keep_io_types)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(os.fspath(model_path))
    try:
        half = convert_float_to_float16(model, keep_io_types=True)
    except Exception as exc:
        raise ExportError(f"fp16 conversion of {Path(model_path).name} failed: {exc}") from exc
    atomic_write_bytes(out_path, half.SerializeToString())
    return Path(out_path)


def compare(
    kind: str,
    before: str | os.PathLike,
    after: str | os.PathLike,
    inputs: np.ndarray,
    labels: np.ndarray | None,
    calibration_samples: int,
) -> QuantizeReport:
    """Accuracy and output agreement of `after` against `before` on the same inputs."""
    ref = model_outputs(before, inputs)
    out = model_outputs(after, inputs)
    return QuantizeReport(
        kind=kind,
        path=os.fspath(after),
        calibration_samples=calibration_samples,
        accuracy_before=top1(ref, labels) if labels is not None else None,
        accuracy_after=top1(out, labels) if labels is not None else None,
        max_abs_logit_diff=float(np.max(np.abs(ref - out))),
        top1_agreement=float(np.mean(ref.argmax(1) == out.argmax(1))),
        size_before=Path(before).stat().st_size,
        size_after=Path(after).stat().st_size,
    )


def quantize(
    kind: str,
    model_path: str | os.PathLike,
    out_path: str | os.PathLike,
    calibration_inputs: np.ndarray,
    eval_inputs: np.ndarray,
    eval_labels: np.ndarray | None,
    max_samples: int = 256,
    symmetric: bool = False,
) -> QuantizeReport:
    """Write the `kind` ('int8' or 'fp16') variant of an ONNX model and report its accuracy change."""
    if kind == "int8":
        quantize_int8_onnx(
            model_path, out_path, calibration_inputs, max_samples=max_samples, symmetric=symmetric
        )
        n = min(len(calibration_inputs), max_samples)
    elif kind == "fp16":
        convert_fp16_onnx(model_path, out_path)
        n = 0
    else:
        raise ExportError(f"unknown quantisation {kind!r}; use int8 or fp16")
    return compare(kind, model_path, out_path, eval_inputs, eval_labels, n)
