"""Coverage: 30% of every prunable group removed at random, verified, for the model zoo.

Each model is exported once per session (module-scoped cache). BatchNorm statistics are set
from two random batches first so activations are O(1) and the oracle comparison is meaningful.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_surgery import settle_bn

from exporters.costs import OnnxCostModel, count_cost
from exporters.graph_groups import ChannelGraph
from exporters.onnx_export import export_onnx, onnx_fingerprint
from exporters.random_plan import random_plan
from exporters.surgery import apply_plan
from exporters.torch_prune import prune_torch
from exporters.verify import ort_session
from pipeline.plan import ModelFingerprint
from pipeline.zoo import efficientnet_lite0, torchvision_model

# name -> (input size, expect fully prunable apart from the output layer, torch cross-check)
ZOO = {
    "resnet18": (64, True, True),
    "resnet50": (64, True, False),
    "mobilenet_v2": (64, True, False),
    "mobilenet_v3_small": (64, True, True),
    "vgg16_bn": (224, True, False),  # its AdaptiveAvgPool2d(7) needs 224 to export
    "densenet121": (64, True, False),
    "efficientnet_b0": (64, True, False),
    "squeezenet1_1": (64, True, True),
    "shufflenet_v2_x1_0": (64, False, False),
    "regnet_y_400mf": (64, False, False),
    "googlenet": (64, True, True),
    "efficientnet_lite0": (64, True, True),
}


@pytest.fixture(scope="module")
def zoo_cache():
    return {}


def _get(cache, name):
    if name not in cache:
        torch.manual_seed(0)
        size = ZOO[name][0]
        model = (
            efficientnet_lite0()
            if name == "efficientnet_lite0"
            else torchvision_model(name, num_classes=10)
        )
        model = settle_bn(model, (1, 3, size, size))
        x = torch.randn(1, 3, size, size)
        proto = export_onnx(model, x, None)
        cache[name] = (model, x, proto, ChannelGraph(proto))
    return cache[name]


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_random_30_percent_verified(zoo_cache, name):
    model, x, proto, graph = _get(zoo_cache, name)
    _, fully, cross = ZOO[name]
    groups = graph.channel_groups
    frozen = [g for g in groups if g.frozen]
    assert all(g.reason for g in frozen)
    non_output = [g for g in frozen if "model output" not in g.reason]
    assert (not non_output) == fully, [g.reason for g in non_output][:3]
    prunable = [g for g in groups if not g.frozen]
    assert len(prunable) >= 5
    assert not [g for g in groups if "index_maps" in g.extra], "zoo couplings are identity maps"
    if name != "googlenet":  # googlenet's unused aux classifiers are not in the export
        assert onnx_fingerprint(proto).digest == ModelFingerprint.from_model(model).digest
    plan = random_plan(groups, 0.3, seed=0, fingerprint=ModelFingerprint.from_model(model))
    pruned, report = apply_plan(proto, plan, graph=graph)
    v = report.verification
    assert v["max_abs_diff"] <= v["bound"] and v["max_abs_ref"] > 1e-4
    assert report.flops_after < report.flops_before
    rem = OnnxCostModel(proto, graph=graph).remaining(plan)
    c0, c1 = count_cost(proto), count_cost(pruned)
    assert rem["flops"] == pytest.approx(c1.flops / c0.flops, rel=1e-9)
    assert rem["params"] == pytest.approx(c1.params / c0.params, rel=1e-9)
    if cross:
        small = prune_torch(model, plan, x, onnx_model=proto)
        feed = np.random.default_rng(2).standard_normal((2, *x.shape[1:])).astype(np.float32)
        a = ort_session(export_onnx(small, x, None)).run(None, {"input": feed})[0]
        b = ort_session(pruned).run(None, {"input": feed})[0]
        np.testing.assert_allclose(a, b, atol=1e-4 * max(1.0, float(np.abs(b).max())))
