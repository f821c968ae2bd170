"""Channel shuffle (ShuffleNet V2): the Reshape-Transpose-Reshape permutation and the chunk
slices of computed bounds are followed, pruned exactly, and the checks are shown to fail."""

from __future__ import annotations

import pytest
import torch
from onnx import numpy_helper
from test_surgery import settle_bn

from exporters.errors import VerificationError
from exporters.graph_groups import ChannelGraph
from exporters.onnx_export import export_onnx
from exporters.random_plan import random_plan
from exporters.surgery import apply_plan
from exporters.verify import GraphWeights, compare_tensors, masked_original, random_inputs
from pipeline.plan import ModelFingerprint
from pipeline.zoo import import_torchvision


@pytest.fixture(scope="module")
def shufflenet():
    tv = import_torchvision()
    torch.manual_seed(0)
    model = tv.models.shufflenetv2.ShuffleNetV2([2, 2, 2], [8, 16, 32, 64, 64], num_classes=10)
    model = settle_bn(model, (1, 3, 32, 32))
    proto = export_onnx(model, torch.randn(1, 3, 32, 32), None)
    return model, proto, ChannelGraph(proto)


def test_shuffles_and_chunks_are_followed(shufflenet):
    _, _, graph = shufflenet
    assert len(graph.shuffles) == 6 and len(graph.computed_slices) == 6
    reasons = [g.reason for g in graph.channel_groups if g.frozen]
    assert not [r for r in reasons if "Reshape" in r or "Slice" in r or "unknown size" in r]
    stream = [g for g in graph.channel_groups if not g.frozen and any(
        m.endswith("branch2.5") for m in g.members)]  # fmt: skip
    assert stream, "the branch outputs that feed the shuffles are prunable"


def test_random_plan_on_the_shuffle_stream_verified(shufflenet):
    model, proto, graph = shufflenet
    plan = random_plan(graph.channel_groups, 0.3, seed=0,
                       fingerprint=ModelFingerprint.from_model(model))  # fmt: skip
    pruned, report = apply_plan(proto, plan, graph=graph)
    v = report.verification
    assert v["max_abs_diff"] <= v["bound"] and v["tensors_compared"] > 50
    gathers = [n for n in pruned.graph.node if n.op_type == "Gather" and n.input[1] in
               {t.name for t in pruned.graph.initializer}]  # fmt: skip
    assert len(gathers) >= 1  # a pruned shuffle became a Gather of the kept channels
    assert report.flops_after < report.flops_before


def test_a_misordered_shuffle_fails_verification(shufflenet):
    model, proto, graph = shufflenet
    plan = random_plan(graph.channel_groups, 0.3, seed=0,
                       fingerprint=ModelFingerprint.from_model(model))  # fmt: skip
    pruned, _ = apply_plan(proto, plan, graph=graph)
    inits = {t.name: t for t in pruned.graph.initializer}
    gather = next(n for n in pruned.graph.node if n.op_type == "Gather" and n.input[1] in inits)
    idx = numpy_helper.to_array(inits[gather.input[1]]).copy()
    idx[[0, 1]] = idx[[1, 0]]
    inits[gather.input[1]].CopyFrom(numpy_helper.from_array(idx, gather.input[1]))
    mask = graph.pruned_roots(plan)
    with pytest.raises(VerificationError, match="at tensor"):
        compare_tensors(graph, mask, masked_original(graph, mask, weights=False), pruned,
                        random_inputs(pruned, seed=1), reference_weights=GraphWeights(graph))  # fmt: skip
