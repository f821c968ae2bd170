"""TFLite conversion with litert-torch, run by the real ai-edge-litert interpreter and checked
against ONNX Runtime on the same real inputs: fp32 of a pruned model, int8 full-integer kernels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from calibration.loaders import load_fashion_mnist
from exporters.errors import ExportError
from exporters.evaluate import tflite_outputs
from exporters.onnx_export import export_onnx
from exporters.surgery import apply_plan, save_model
from exporters.tflite import FP32_ATOL, convert_tflite, verify_tflite
from exporters.torch_prune import prune_torch
from pipeline.plan import LayerPlan, ModelFingerprint, Plan
from pipeline.train import default_model


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> dict:
    """The trained default model with the quarter of lowest-L1 channels of two layers removed."""
    folder = tmp_path_factory.mktemp("tflite")
    test = load_fashion_mnist("test")
    x = test.inputs[:300]
    model = default_model(progress=False)
    example = torch.from_numpy(x[:1])
    proto = export_onnx(model, example, None)
    layers = {}
    for name in ("features.0.0", "features.3.0"):
        w = model.get_submodule(name).weight.detach()
        l1 = w.abs().flatten(1).sum(1).numpy()
        layers[name] = LayerPlan(name, len(l1), sorted(np.argsort(l1)[: len(l1) // 4].tolist()))
    plan = Plan(ModelFingerprint.from_model(model), layers)
    pruned_proto, _ = apply_plan(proto, plan, verify_inputs=x[:16])
    onnx_path = folder / "pruned.onnx"
    save_model(pruned_proto, onnx_path)
    small = prune_torch(model, plan, example_input=example, onnx_model=proto)
    return {"folder": folder, "x": x, "y": test.labels[:300], "model": small, "onnx": onnx_path,
            "example": example}  # fmt: skip


def test_fp32_tflite_matches_the_pruned_onnx(pruned: dict) -> None:
    path = convert_tflite(pruned["model"], pruned["example"], pruned["folder"] / "p.tflite")
    rep = verify_tflite(path, pruned["onnx"], pruned["x"], pruned["y"])
    assert rep.samples == 300 and rep.quantization == "none"
    assert rep.max_abs_diff <= FP32_ATOL and rep.top1_agreement == 1.0
    assert rep.accuracy_tflite == rep.accuracy_onnx > 0.5
    # Oracle: the interpreter's outputs against the pruned torch module itself.
    with torch.no_grad():
        ref = pruned["model"](torch.from_numpy(pruned["x"][:50])).numpy()
    np.testing.assert_allclose(tflite_outputs(path, pruned["x"][:50]), ref, atol=1e-4, rtol=1e-4)


def test_int8_tflite_has_int8_kernels_and_keeps_accuracy(pruned: dict) -> None:
    from ai_edge_litert.interpreter import Interpreter

    calib = load_fashion_mnist("train").inputs[:128]
    path = convert_tflite(
        pruned["model"], pruned["example"], pruned["folder"] / "p8.tflite",
        quantization="int8", calibration_inputs=calib,
    )  # fmt: skip
    interp = Interpreter(model_path=str(path))
    dtypes = {d["dtype"] for d in interp.get_tensor_details()}
    assert np.int8 in dtypes
    rep = verify_tflite(path, pruned["onnx"], pruned["x"], pruned["y"], quantization="int8")
    assert rep.top1_agreement >= 0.95
    assert abs(rep.accuracy_tflite - rep.accuracy_onnx) <= 0.03
    fp32 = pruned["folder"] / "p.tflite"
    if not fp32.is_file():
        convert_tflite(pruned["model"], pruned["example"], fp32)
    assert path.stat().st_size < 0.45 * fp32.stat().st_size


def test_a_wrong_conversion_is_caught(pruned: dict) -> None:
    """The pruned .tflite checked against the unpruned model's ONNX: the difference is caught."""
    tfl = pruned["folder"] / "p.tflite"
    if not tfl.is_file():
        convert_tflite(pruned["model"], pruned["example"], tfl)
    full_onnx = pruned["folder"] / "full.onnx"
    export_onnx(default_model(progress=False), pruned["example"], full_onnx)
    with pytest.raises(ExportError, match="differs from the pruned ONNX model by"):
        verify_tflite(tfl, full_onnx, pruned["x"][:20])


def test_unsupported_requests(pruned: dict, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="not one of none, int8"):
        convert_tflite(
            pruned["model"], pruned["example"], tmp_path / "a.tflite", quantization="int4"
        )
    with pytest.raises(ExportError, match="needs calibration inputs"):
        convert_tflite(
            pruned["model"], pruned["example"], tmp_path / "b.tflite", quantization="int8"
        )
    assert list(tmp_path.iterdir()) == []
