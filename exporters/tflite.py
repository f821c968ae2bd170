"""TFLite conversion of the pruned model with litert-torch, verified against the pruned ONNX file.

The converter takes the physically pruned torch module (the one whose ONNX export went through
surgery), so the .tflite and the .onnx come from the same weights. Verification runs the written
.tflite with the ai-edge-litert interpreter and the .onnx with ONNX Runtime on the same
calibration inputs; the conversion fails when the outputs differ beyond the tolerance. int8:
PT2E static quantisation (symmetric, per-channel weights, activations calibrated on the
calibration set), converted to a TFLite model with int8 kernels and float input/output.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from calibration.fileio import atomic_write_bytes
from exporters.errors import ExportError
from exporters.evaluate import onnx_outputs, tflite_outputs, top1

FP32_ATOL = 1e-3
"""Max |tflite - onnx| logit difference accepted for a float conversion (both fp32, different
kernels and op order; observed differences are ~1e-6 for the SmallCNN)."""


class TFLiteUnavailable(ExportError):
    """litert-torch is not installed (install the 'tflite' extra)."""


@dataclass
class TFLiteReport:
    """A written .tflite file and how it compares with the ONNX reference on the same inputs."""

    path: str
    quantization: str
    samples: int
    max_abs_diff: float
    top1_agreement: float
    accuracy_onnx: float | None
    accuracy_tflite: float | None
    size_bytes: int
    converter: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def converter_version() -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version("litert-torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def _litert_torch():
    try:
        with _quiet():
            import litert_torch
    except ImportError as exc:
        raise TFLiteUnavailable(
            "TFLite conversion needs litert-torch: pip install 'fair-edge[tflite]' "
            "(or choose --runtime onnx)"
        ) from exc
    return litert_torch


@contextlib.contextmanager
def _quiet():
    """The converter prints progress lines to stdout; keep them out of the CLI's output."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _pt2e_int8(model: nn.Module, example: torch.Tensor, calibration: np.ndarray):
    """Static int8 PT2E: observers inserted, calibrated on the calibration inputs, converted."""
    from litert_torch.quantize.pt2e_quantizer import (
        PT2EQuantizer,
        get_symmetric_quantization_config,
    )
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = PT2EQuantizer().set_global(
        get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False)
    )
    exported = torch.export.export(model, (example,)).module()
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        bs = example.shape[0]
        for i in range(0, len(calibration) - bs + 1, bs):
            prepared(torch.from_numpy(np.ascontiguousarray(calibration[i : i + bs])))
    converted = convert_pt2e(prepared, fold_quantize=False)
    return converted, QuantConfig(pt2e_quantizer=quantizer)


def convert_tflite(
    model: nn.Module,
    example_input: torch.Tensor,
    out_path: str | os.PathLike,
    *,
    quantization: str = "none",
    calibration_inputs: np.ndarray | None = None,
    max_calibration: int = 256,
) -> Path:
    """Convert `model` (batch size fixed to example_input's) to a .tflite file at `out_path`."""
    lt = _litert_torch()
    model = model.eval()
    out_path = Path(out_path)
    try:
        with _quiet(), tempfile.TemporaryDirectory(prefix="fair-edge-tflite-") as tmp:
            if quantization == "int8":
                if calibration_inputs is None or len(calibration_inputs) == 0:
                    raise ExportError("TFLite int8 needs calibration inputs")
                qmodel, qconfig = _pt2e_int8(
                    model,
                    example_input,
                    np.asarray(calibration_inputs[:max_calibration], np.float32),
                )
                edge = lt.convert(qmodel, (example_input,), quant_config=qconfig)
            elif quantization == "none":
                edge = lt.convert(model, (example_input,))
            else:
                raise ExportError(f"TFLite quantisation {quantization!r} is not one of none, int8")
            tmp_file = Path(tmp, "model.tflite")
            edge.export(str(tmp_file))
            atomic_write_bytes(out_path, tmp_file.read_bytes())
    except ExportError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ExportError(
            f"TFLite conversion of {type(model).__name__} failed: {type(exc).__name__}: {first}; "
            "use --runtime onnx to skip TFLite"
        ) from exc
    return out_path


def verify_tflite(
    tflite_path: str | os.PathLike,
    onnx_path: str | os.PathLike,
    inputs: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    atol: float | None = FP32_ATOL,
    quantization: str = "none",
) -> TFLiteReport:
    """Run both files on `inputs`; raise ExportError if a float model differs by more than `atol`.

    Quantised models are not held to a logit tolerance (their error is the point of the report);
    their top-1 agreement and accuracy are reported instead.
    """
    ref = onnx_outputs(onnx_path, inputs)
    got = tflite_outputs(tflite_path, inputs)
    if got.shape != ref.shape:
        raise ExportError(
            f"TFLite output shape {got.shape} differs from the ONNX output shape {ref.shape}"
        )
    diff = float(np.max(np.abs(got - ref)))
    if quantization == "none" and atol is not None and not diff <= atol:
        raise ExportError(
            f"TFLite model {Path(tflite_path).name} differs from the pruned ONNX model by {diff:.3g} "
            f"(tolerance {atol:g}) on {len(inputs)} calibration inputs; use --runtime onnx"
        )
    return TFLiteReport(
        path=os.fspath(tflite_path),
        quantization=quantization,
        samples=len(inputs),
        max_abs_diff=diff,
        top1_agreement=float(np.mean(ref.argmax(1) == got.argmax(1))),
        accuracy_onnx=top1(ref, labels) if labels is not None else None,
        accuracy_tflite=top1(got, labels) if labels is not None else None,
        size_bytes=Path(tflite_path).stat().st_size,
        converter=f"litert-torch {converter_version()}",
    )
