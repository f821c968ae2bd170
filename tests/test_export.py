"""ONNX export: names kept on initializers, dynamic batch, atomic write, clear errors on bad files."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from exporters.errors import ExportError
from exporters.onnx_export import (
    export_onnx,
    layer_initializers,
    load_onnx,
    onnx_fingerprint_shapes,
)
from exporters.verify import ort_session
from pipeline.models import ResNet, SmallCNN
from pipeline.plan import ModelFingerprint


def test_export_keeps_names_dynamic_batch_and_outputs(tmp_path):
    model = SmallCNN().train()
    path = tmp_path / "m.onnx"
    proto = export_onnx(model, torch.randn(1, 1, 28, 28), path)
    assert model.training, "the user's training flag must be restored"
    assert path.is_file() and not list(tmp_path.glob(".*tmp"))
    names = {t.name for t in proto.graph.initializer}
    assert "features.0.0.weight" in names and "classifier.1.weight" in names
    assert "features.0.1.running_var" in names
    assert layer_initializers(proto)["features.0.1"] == [
        "features.0.1.weight",
        "features.0.1.bias",
        "features.0.1.running_mean",
        "features.0.1.running_var",
    ]
    assert not {i.name for i in proto.graph.input} & names, "initializers must not be graph inputs"
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        ref = model.eval()(x).numpy()
    out = ort_session(load_onnx(path)).run(None, {"input": x.numpy()})[0]
    assert out.shape == (3, 10)
    np.testing.assert_allclose(out, ref, atol=1e-4)


def test_export_does_not_merge_equal_initializers():
    """Fresh BatchNorms all have weight 1 and bias 0; the legacy exporter would merge them."""
    proto = export_onnx(ResNet(), torch.randn(1, 3, 32, 32), None)
    bn_weights = [t.name for t in proto.graph.initializer if t.name.endswith("bn1.weight")]
    assert len(bn_weights) == 6
    assert not [n for n in proto.graph.node if n.op_type == "Identity"]


def test_onnx_fingerprint_equals_torch_fingerprint():
    model = ResNet()
    proto = export_onnx(model, torch.randn(1, 3, 32, 32), None)
    a = ModelFingerprint.from_model(model)
    b = ModelFingerprint.from_shapes(onnx_fingerprint_shapes(proto))
    assert a.diff(b) is None and a.digest == b.digest


def test_export_error_is_clear_and_writes_nothing(tmp_path):
    path = tmp_path / "bad.onnx"
    with pytest.raises(ExportError, match="example input"):
        export_onnx(nn.Linear(4, 2), torch.randn(1, 5), path)
    assert not list(tmp_path.iterdir())


def test_load_rejects_a_file_that_is_not_onnx(tmp_path):
    path = tmp_path / "x.onnx"
    path.write_bytes(b"this is not a protobuf \x00\xff" * 10)
    with pytest.raises(ExportError, match="not a readable ONNX model|not an ONNX model"):
        load_onnx(path)
    with pytest.raises(ExportError, match="does not exist"):
        load_onnx(tmp_path / "missing.onnx")


def test_load_rejects_a_model_that_fails_the_checker(tmp_path):
    proto = export_onnx(SmallCNN(), torch.randn(1, 1, 28, 28), None)
    proto.graph.node[0].input[1] = "no_such_tensor"
    path = tmp_path / "broken.onnx"
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(ExportError, match="fails the ONNX checker"):
        load_onnx(path)


def test_load_reports_missing_external_data(tmp_path):
    proto = export_onnx(SmallCNN(), torch.randn(1, 1, 28, 28), None)
    path = tmp_path / "ext.onnx"
    onnx.save_model(
        proto, str(path), save_as_external_data=True, location="ext.onnx.data", size_threshold=0
    )
    assert load_onnx(path).graph.initializer
    (tmp_path / "ext.onnx.data").unlink()
    with pytest.raises(ExportError, match="external data"):
        load_onnx(path)
