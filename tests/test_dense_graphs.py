"""Segmentation and detection graphs: output heads held with a reason, the rest pruned and
verified against the masked original (ONNX surgery and the physically pruned torch module)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_surgery import settle_bn

from bench.yolo_tiny import TinyYolo
from exporters.graph_groups import ChannelGraph
from exporters.onnx_export import export_onnx
from exporters.random_plan import random_plan
from exporters.surgery import apply_plan
from exporters.torch_prune import prune_torch
from pipeline.plan import LayerPlan, ModelFingerprint
from pipeline.zoo import torchvision_dense_model


def _prune_30(model, x):
    proto = export_onnx(model, x, None)
    graph = ChannelGraph(proto)
    plan = random_plan(
        graph.channel_groups, 0.3, seed=0, fingerprint=ModelFingerprint.from_model(model)
    )
    _, report = apply_plan(proto, plan, graph=graph)
    return proto, graph, plan, report


def _verified(report) -> None:
    v = report.verification
    assert v["max_abs_diff"] <= v["bound"] and v["max_abs_ref"] > 1e-3, v


def test_tiny_yolo_heads_held_chunks_followed_rest_pruned_and_verified():
    torch.manual_seed(0)
    model = settle_bn(TinyYolo(classes=4), (1, 3, 64, 64))
    x = torch.randn(1, 3, 64, 64)
    proto, graph, plan, report = _prune_30(model, x)
    assert [o.name for o in proto.graph.output] == ["output0", "output1", "output2"]
    groups = graph.channel_groups
    held = {m: g.reason for g in groups if g.frozen for m in g.members}
    for scale in range(3):
        for branch in ("box", "cls"):
            reason = held[f"head.{branch}.{scale}.2"]
            assert reason.startswith(f"output head of model output 'output{scale}'"), reason
    assert "fpn4.cv1.conv" not in held  # a C2f's chunk is followed (pruned bounds written)
    prunable = [g for g in groups if not g.frozen]
    assert len(prunable) >= 35
    _verified(report)
    pruned = prune_torch(model, plan, example_input=x, onnx_model=proto)  # checks it runs equal
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


def test_pruning_a_chunk_producer_is_exact():
    torch.manual_seed(0)
    model = settle_bn(TinyYolo(classes=4), (1, 3, 64, 64))
    x = torch.randn(1, 3, 64, 64)
    proto = export_onnx(model, x, None)
    graph = ChannelGraph(proto)
    w = model.fpn4.cv1.conv.weight.shape[0]
    plan = random_plan(
        graph.channel_groups, 0.3, seed=0, fingerprint=ModelFingerprint.from_model(model)
    )
    group = next(g for g in graph.channel_groups if "fpn4.cv1.conv" in g.members)
    for m in group.members:  # one channel from each half of the chunk
        plan.layers[m] = LayerPlan(name=m, n_units=w, pruned=[0, w - 1], group=group.name)
    _, report = apply_plan(proto, plan, graph=graph, verify_inputs=x.numpy())
    _verified(report)


def test_ssdlite_raw_heads_held_and_backbone_pruned_verified():
    model = settle_bn(
        torchvision_dense_model("ssdlite320_mobilenet_v3_large", "detection", num_classes=5),
        (1, 3, 320, 320),
    )
    proto, graph, _, report = _prune_30(model, torch.randn(1, 3, 320, 320))
    assert [o.name for o in proto.graph.output] == ["bbox_regression", "cls_logits"]
    held = [g for g in graph.channel_groups if g.frozen]
    assert len(held) == 12 and all(g.reason.startswith("output head of model output") for g in held)
    assert sum(not g.frozen for g in graph.channel_groups) >= 30
    _verified(report)


def test_lraspp_only_the_classifier_is_held():
    model = settle_bn(
        torchvision_dense_model("lraspp_mobilenet_v3_large", "segmentation", num_classes=5),
        (1, 3, 96, 96),
    )
    _, graph, _, report = _prune_30(model, torch.randn(1, 3, 96, 96))
    held = [g for g in graph.channel_groups if g.frozen]
    assert [sorted(g.members) for g in held] == [
        ["classifier.high_classifier", "classifier.low_classifier"]
    ]
    _verified(report)


def test_seeded_init_is_reproducible_and_leaves_the_rng_alone():
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    a = torchvision_dense_model("lraspp_mobilenet_v3_large", "segmentation", num_classes=3)
    after = torch.rand(1)
    b = torchvision_dense_model("lraspp_mobilenet_v3_large", "segmentation", num_classes=3)
    assert torch.equal(before, after)
    for (_, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(p, q)
    assert not np.isnan(a(torch.randn(1, 3, 64, 64))["out"].detach().numpy()).any()


def test_unknown_dense_model_is_one_line():
    from calibration.errors import FairEdgeError

    with pytest.raises(FairEdgeError, match="unknown torchvision detection model 'resnet18'"):
        torchvision_dense_model("resnet18", "detection")


def test_fasterrcnn_rpn_raw_heads_held_and_backbone_pruned_verified():
    model = settle_bn(
        torchvision_dense_model("fasterrcnn_mobilenet_v3_large_fpn", "detection", num_classes=5),
        (1, 3, 160, 160),
    )
    x = torch.randn(1, 3, 160, 160)
    proto, graph, plan, report = _prune_30(model, x)
    assert [o.name for o in proto.graph.output][:2] == ["objectness_0", "objectness_1"]
    held = {m: g.reason for g in graph.channel_groups if g.frozen for m in g.members}
    assert set(held) == {"rpn.head.cls_logits", "rpn.head.bbox_pred"}
    assert held["rpn.head.cls_logits"].startswith("output head of model output 'objectness_0'")
    # the RPN head is one conv shared by every FPN level: the levels' output convs are one group
    fpn_out = next(g for g in graph.channel_groups if "backbone.fpn.layer_blocks.0.0" in g.members)
    assert "backbone.fpn.layer_blocks.1.0" in fpn_out.members
    _verified(report)
    prune_torch(model, plan, example_input=x, onnx_model=proto)  # the shared weight sliced once
