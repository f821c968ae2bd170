"""Coverage: 30% of every prunable group removed at random, verified, for the model zoo.

Each model is exported once per session (module-scoped cache). BatchNorm statistics are set
from two random batches first so activations are O(1) and the oracle comparison is meaningful.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import numpy_helper
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
    "regnet_y_400mf": (64, True, True),
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


@pytest.mark.parametrize("name", list(ZOO))
def test_a_single_misplaced_channel_fails_verification(zoo_cache, name):
    """Swap two output channels of one pruned convolution in the verified result: the per-tensor
    check must fail, on every model of the zoo, however small the effect at the output."""
    from exporters.errors import VerificationError
    from exporters.verify import GraphWeights, compare_tensors, masked_original, random_inputs

    model, x, proto, graph = _get(zoo_cache, name)
    plan = random_plan(graph.channel_groups, 0.3, seed=0,
                       fingerprint=ModelFingerprint.from_model(model))  # fmt: skip
    pruned, report = apply_plan(proto, plan, graph=graph)
    assert report.verification["tensors_compared"] > 10
    original_dims = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    conv_weights = {n.input[1] for n in pruned.graph.node if n.op_type == "Conv"}
    target = next(
        t for t in pruned.graph.initializer
        if t.name in conv_weights and tuple(t.dims) != original_dims[t.name] and t.dims[0] >= 2
    )  # fmt: skip
    w = numpy_helper.to_array(target).copy()
    w[[0, 1]] = w[[1, 0]]  # channel 0's weights where channel 1's belong, and back
    target.CopyFrom(numpy_helper.from_array(w, target.name))
    mask = graph.pruned_roots(plan)
    feed = random_inputs(pruned, seed=1)
    with pytest.raises(VerificationError, match="at tensor"):
        compare_tensors(graph, mask, masked_original(graph, mask, weights=False), pruned, feed,
                        reference_weights=GraphWeights(graph))  # fmt: skip


class _LayerScaled(torch.nn.Module):
    """A residual branch scaled by 1e-6 (ConvNeXt's layer scale): its channels barely move the
    output, so an output-only comparison cannot see a mistake inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.a = torch.nn.Conv2d(8, 16, 1)
        self.b = torch.nn.Conv2d(16, 8, 1)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        s = s + 1e-6 * self.b(torch.relu(self.a(s)))
        return self.head(s.mean(dim=(2, 3)))


def test_output_only_check_is_blind_where_the_tensor_check_is_not():
    from exporters.errors import VerificationError
    from exporters.verify import (
        GraphWeights,
        compare_models,
        compare_tensors,
        masked_original,
        random_inputs,
    )

    torch.manual_seed(0)
    model = _LayerScaled().eval()
    proto = export_onnx(model, torch.randn(1, 3, 8, 8), None)
    graph = ChannelGraph(proto)
    plan = random_plan(graph.channel_groups, 0.3, seed=0,
                       fingerprint=ModelFingerprint.from_model(model))  # fmt: skip
    assert plan.layers["a"].pruned, "the scaled branch is pruned"
    pruned, _ = apply_plan(proto, plan, graph=graph)
    target = next(t for t in pruned.graph.initializer if t.name == "a.weight")
    w = numpy_helper.to_array(target).copy()
    w[[0, 1]] = w[[1, 0]]
    target.CopyFrom(numpy_helper.from_array(w, target.name))
    mask = graph.pruned_roots(plan)
    reference = masked_original(graph, mask, weights=False)
    compare_models(reference, pruned, reference_weights=GraphWeights(graph))  # blind: passes
    with pytest.raises(VerificationError, match="at tensor"):
        compare_tensors(graph, mask, reference, pruned, random_inputs(pruned, seed=1),
                        reference_weights=GraphWeights(graph))  # fmt: skip
