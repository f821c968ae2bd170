"""BatchNorm recalibration of a pruned model: statistics against a numpy oracle, the ONNX model
against the recalibrated torch model (surgery tolerance), the accuracy it recovers on real data,
bad input, and `fair-edge deploy --recalibrate-bn` end to end."""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from calibration.loaders import load_fashion_mnist
from calibration.sampling import balanced_sample
from exporters.bn_recal import apply_bn_stats, recalibrate_bn, recalibrate_onnx
from exporters.errors import ExportError
from exporters.evaluate import onnx_outputs, top1
from exporters.graph_groups import find_groups
from exporters.onnx_export import export_onnx
from exporters.surgery import apply_plan
from exporters.torch_prune import prune_torch
from fair_edge.cli import main
from pipeline.planning import plan_for_budget
from pipeline.scoring import score
from pipeline.train import default_model


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip


def test_first_layer_statistics_match_a_numpy_oracle() -> None:
    net = _net().eval()
    x = np.random.default_rng(0).normal(size=(40, 3, 8, 8)).astype(np.float32)
    for bs in (40, 10):  # one batch, and equal batches (their cumulative average is the same)
        fresh, stats = recalibrate_bn(net, x, batch_size=bs)
        with torch.no_grad():
            a = net[0](torch.from_numpy(x)).numpy()  # what the first BatchNorm sees
        per_batch = a.reshape(40 // bs, bs, 8, 8, 8)
        mean = per_batch.mean(axis=(1, 3, 4)).mean(axis=0)
        var = per_batch.var(axis=(1, 3, 4), ddof=1).mean(axis=0)  # unbiased, as torch stores
        np.testing.assert_allclose(stats["1.running_mean"], mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(stats["1.running_var"], var, rtol=1e-4, atol=1e-5)
        assert not fresh.training and all(not m.training for m in fresh.modules())
    assert net[1].running_mean.abs().sum() == 0  # the caller's model is untouched


def test_onnx_gets_the_statistics_and_matches_torch(tmp_path: Path) -> None:
    net = _net().eval()
    x = np.random.default_rng(1).normal(size=(32, 3, 8, 8)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto = export_onnx(net, torch.from_numpy(x[:1]), None)
    model, new, rep = recalibrate_onnx(net, proto, x, x[:8])
    assert rep.layers == 2 and rep.samples == 32 and rep.max_abs_diff <= rep.tolerance * 10
    inits = {t.name: numpy_helper.to_array(t) for t in new.graph.initializer}
    np.testing.assert_allclose(inits["1.running_var"], model[1].running_var.numpy(), rtol=1e-6)
    onnx.save(new, tmp_path / "m.onnx")
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(onnx_outputs(tmp_path / "m.onnx", x), want, atol=1e-4)


def test_bad_input_is_one_clear_error() -> None:
    net = _net().eval()
    x = np.zeros((4, 3, 8, 8), np.float32)
    with pytest.raises(ExportError, match="at least 2 calibration samples"):
        recalibrate_bn(net, x[:1])
    with pytest.raises(ExportError, match="NaN or inf"):
        recalibrate_bn(net, np.full_like(x, np.nan))
    with pytest.raises(ExportError, match="no BatchNorm"):
        recalibrate_bn(nn.Sequential(nn.Flatten(), nn.Linear(192, 2)), x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto = export_onnx(net, torch.from_numpy(x[:1]), None)
    with pytest.raises(ExportError, match="has no initializer"):
        apply_bn_stats(proto, {"9.running_mean": np.zeros(8, np.float32)})
    with pytest.raises(ExportError, match="different plans"):
        apply_bn_stats(proto, {"1.running_mean": np.zeros(5, np.float32)})


def test_recovers_accuracy_of_a_one_shot_pruned_model() -> None:
    """The default model pruned to 30% of its FLOPs: recalibration (no training) must recover
    accuracy on 2,000 Fashion-MNIST test images, and the ONNX model must match torch."""
    model = default_model(progress=False)
    calib = balanced_sample(load_fashion_mnist("train"), 32, seed=0)[0]
    test = load_fashion_mnist("test").subset(np.arange(2000))
    x0 = torch.from_numpy(calib.inputs[:1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto = export_onnx(model, x0, None)
    groups = find_groups(proto)
    scores = score(model, calib, samples_per_class=32, progress=False)
    plan = plan_for_budget(scores, 0.7, "flops", groups=groups, model=model)
    pruned_proto, _ = apply_plan(proto, plan, verify_inputs=calib.inputs[:64])
    pruned_torch = prune_torch(model, plan, x0, proto)
    _, recal_proto, rep = recalibrate_onnx(
        pruned_torch, pruned_proto, calib.inputs, test.inputs[:64]
    )

    def acc(p: onnx.ModelProto) -> float:
        import onnxruntime as ort

        sess = ort.InferenceSession(p.SerializeToString(), providers=["CPUExecutionProvider"])
        out = sess.run(None, {sess.get_inputs()[0].name: test.inputs})[0]
        return top1(out, test.labels)

    before, after = acc(pruned_proto), acc(recal_proto)
    assert after > before + 0.05, (before, after)  # measured: 0.43 -> 0.57
    assert rep.layers >= 2


def test_deploy_with_recalibrate_bn(tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["deploy", "--out", str(tmp_path), "--target", "0.5", "--recalibrate-bn",
                     "--runtime", "onnx", "--runs", "5", "--warmup", "1", "--eval-samples", "500",
                     "--json", "--quiet"])  # fmt: skip
    assert code == 0, err.getvalue()
    result = json.loads(out.getvalue())
    manifest = json.loads((Path(result["bundle"]) / "manifest.json").read_text())
    recal = manifest["metrics"]["bn_recalibration"]
    assert recal["layers"] >= 2 and recal["samples"] >= 20
    assert any("BatchNorm statistics" in n for n in result["summary"]["notes"])
