"""int8 (ORT static QDQ, per channel) and fp16 variants of the trained default model, checked
against the float model on real Fashion-MNIST test images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from calibration.loaders import load_fashion_mnist
from exporters.errors import ExportError
from exporters.evaluate import onnx_outputs, top1
from exporters.onnx_export import export_onnx
from exporters.quantize import (
    _Reader,
    convert_fp16_onnx,
    nonzero_zero_points,
    quantize,
    quantize_int8_onnx,
    require_symmetric,
)
from pipeline.train import default_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    import torch

    folder = tmp_path_factory.mktemp("quant")
    test = load_fashion_mnist("test")
    rng = np.random.default_rng(0)
    idx = np.sort(rng.permutation(len(test))[:1000])
    ev = test.subset(idx)
    calib = load_fashion_mnist("train").inputs[:256]
    model = default_model(progress=False)
    path = folder / "model.onnx"
    export_onnx(model, torch.from_numpy(calib[:1]), path)
    return {"folder": folder, "fp32": path, "ev": ev, "calib": calib}


def test_calibration_reader_yields_every_input_once_then_rewinds() -> None:
    x = np.arange(3 * 4, dtype=np.float32).reshape(3, 1, 2, 2)
    reader = _Reader("input", x)
    got = []
    while (item := reader.get_next()) is not None:
        got.append(item["input"])
    assert len(got) == 3 and all(g.shape == (1, 1, 2, 2) for g in got)
    np.testing.assert_array_equal(np.concatenate(got), x)
    reader.rewind()
    np.testing.assert_array_equal(reader.get_next()["input"], x[:1])


def test_int8_is_qdq_per_channel_and_keeps_accuracy(setup: dict) -> None:
    out = setup["folder"] / "model.int8.onnx"
    rep = quantize(
        "int8", setup["fp32"], out, setup["calib"], setup["ev"].inputs, setup["ev"].labels
    )
    model = onnx.load(str(out))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > 0
    inits = {t.name: t for t in model.graph.initializer}
    per_channel = []
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            w = numpy_helper.to_array(inits[node.input[0]])
            scale = numpy_helper.to_array(inits[node.input[1]])
            if w.ndim == 4:  # conv weights: one scale per output channel, stored as int8
                assert w.dtype == np.int8 and scale.shape == (w.shape[0],)
                per_channel.append(node.input[0])
    assert len(per_channel) == 4  # the SmallCNN's four convolutions
    # Oracle: the report's numbers recomputed from the two files.
    ref = onnx_outputs(setup["fp32"], setup["ev"].inputs)
    q = onnx_outputs(out, setup["ev"].inputs)
    assert rep.accuracy_before == pytest.approx(top1(ref, setup["ev"].labels))
    assert rep.accuracy_after == pytest.approx(top1(q, setup["ev"].labels))
    assert rep.accuracy_change == pytest.approx(rep.accuracy_after - rep.accuracy_before)
    assert rep.accuracy_before > 0.8
    assert abs(rep.accuracy_change) <= 0.02  # int8 costs at most 2 points here
    assert rep.top1_agreement >= 0.95  # seen 0.967 to 0.99 across retrained default models
    assert rep.size_after < 0.4 * rep.size_before and rep.calibration_samples == 256


def test_fp16_keeps_float32_io_and_outputs(setup: dict) -> None:
    out = convert_fp16_onnx(setup["fp32"], setup["folder"] / "model.fp16.onnx")
    model = onnx.load(str(out))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    weights = [t for t in model.graph.initializer if len(t.dims) == 4]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    x = setup["ev"].inputs[:200]
    ref, half = onnx_outputs(setup["fp32"], x), onnx_outputs(out, x)
    assert np.max(np.abs(ref - half)) < 0.05 * max(1.0, np.max(np.abs(ref)))
    assert np.mean(ref.argmax(1) == half.argmax(1)) >= 0.99


def test_bad_requests(setup: dict, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="unknown quantisation"):
        quantize("int4", setup["fp32"], tmp_path / "x.onnx", setup["calib"], setup["calib"], None)
    with pytest.raises(ExportError, match="needs calibration data and got none"):
        quantize_int8_onnx(setup["fp32"], tmp_path / "x.onnx", setup["calib"][:0])
    with pytest.raises(ExportError, match="needs calibration data and got none"):
        quantize_int8_onnx(setup["fp32"], tmp_path / "x.onnx", None, symmetric=True)
    assert not (tmp_path / "x.onnx").exists()


def _zero_points(path: Path) -> list[np.ndarray]:
    """Every QuantizeLinear's zero point, read straight from the file (oracle for the check)."""
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    quants = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert quants
    return [inits[n.input[2]] if len(n.input) > 2 and n.input[2] else np.zeros(1) for n in quants]


def test_symmetric_int8_for_tensorrt_has_zero_points_0_and_stays_close(setup: dict) -> None:
    """TensorRT's int8 QDQ: every QuantizeLinear zero point 0, per-channel weights, float
    biases; it still runs in ONNX Runtime and agrees with fp32 on real Fashion-MNIST."""
    out = setup["folder"] / "model.int8-trt.onnx"
    rep = quantize(
        "int8", setup["fp32"], out, setup["calib"], setup["ev"].inputs, setup["ev"].labels,
        symmetric=True,
    )  # fmt: skip
    zps = _zero_points(out)
    assert all(np.all(z == 0) for z in zps), zps
    assert nonzero_zero_points(onnx.load(str(out))) == {}
    model = onnx.load(str(out))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    conv_scales = [
        inits[n.input[1]]
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].ndim == 4
    ]
    assert len(conv_scales) == 4 and all(s.ndim == 1 and s.size > 1 for s in conv_scales)
    assert not any(
        inits[n.input[0]].dtype == np.int32
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in inits
    )  # biases stay float
    assert rep.accuracy_before > 0.8 and abs(rep.accuracy_change) <= 0.02
    assert rep.top1_agreement >= 0.95


def test_the_symmetric_check_fails_on_the_default_asymmetric_model(setup: dict) -> None:
    """The default (ORT-CPU) int8 model has non-zero activation zero points: the check says so."""
    out = setup["folder"] / "model.int8-asym.onnx"
    quantize_int8_onnx(setup["fp32"], out, setup["calib"][:64])
    model = onnx.load(str(out))
    assert any(np.any(z != 0) for z in _zero_points(out))
    bad = nonzero_zero_points(model)
    assert bad
    with pytest.raises(ExportError, match="non-zero zero points.*TensorRT rejects"):
        require_symmetric(model, out.name)
    with pytest.raises(ExportError, match="no QuantizeLinear"):
        require_symmetric(onnx.load(str(setup["fp32"])), "model.onnx")
