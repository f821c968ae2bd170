"""Grouped convolutions (ResNeXt, RegNet): every conv group loses as many channels, exactly.

A small ResNeXt (torchvision's ResNet with groups=8) and regnet_x_400mf at 32x32 keep the test
fast; the surgery is verified against the masked original, and the checks are shown to fail.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import numpy_helper
from test_surgery import settle_bn

from exporters.errors import VerificationError
from exporters.graph_groups import ChannelGraph
from exporters.onnx_export import export_onnx
from exporters.random_plan import random_plan
from exporters.surgery import apply_plan
from exporters.torch_prune import prune_torch
from exporters.verify import GraphWeights, compare_tensors, masked_original, random_inputs
from pipeline.baselines import plan_from_importance
from pipeline.plan import LayerPlan, ModelFingerprint, PlanError
from pipeline.planning import plan as fair_plan
from pipeline.planning import segment_pick
from pipeline.rounding import round_plan
from pipeline.scoring import score
from pipeline.zoo import import_torchvision, torchvision_model


def _resnext() -> torch.nn.Module:
    resnet = import_torchvision().models.resnet
    torch.manual_seed(0)
    return resnet.ResNet(
        resnet.Bottleneck, [1, 1, 1, 1], groups=8, width_per_group=4, num_classes=10
    )


@pytest.fixture(scope="module")
def resnext():
    model = settle_bn(_resnext(), (1, 3, 32, 32))
    x = torch.randn(1, 3, 32, 32)
    proto = export_onnx(model, x, None)
    return model, x, proto, ChannelGraph(proto)


def test_grouped_convs_are_prunable_and_record_their_conv_groups(resnext):
    _, _, _, graph = resnext
    groups = graph.channel_groups
    frozen = [g for g in groups if g.frozen]
    assert len(frozen) == 1 and "model output" in frozen[0].reason
    segmented = [g for g in groups if "conv_groups" in g.extra]
    assert len(segmented) == 8  # conv1 and conv2 outputs of each of the 4 blocks
    for g in segmented:
        segs = g.extra["conv_groups"]
        assert len(segs) == 8 and sorted(sum(segs, [])) == list(range(g.n_channels))


def test_random_plan_verified_and_torch_matches(resnext):
    model, x, proto, graph = resnext
    plan = random_plan(graph.channel_groups, 0.3, seed=0,
                       fingerprint=ModelFingerprint.from_model(model))  # fmt: skip
    pruned, report = apply_plan(proto, plan, graph=graph)
    v = report.verification
    assert v["max_abs_diff"] <= v["bound"] and v["tensors_compared"] > 20
    convs = {n.input[1]: n for n in pruned.graph.node if n.op_type == "Conv"}
    w = next(t for t in pruned.graph.initializer if t.name == "layer1.0.conv2.weight")
    assert [a.i for a in convs[w.name].attribute if a.name == "group"] == [8]
    assert list(w.dims)[:2] == [8 * 3, 3]  # 4 per conv group, one pruned from each
    small = prune_torch(model, plan, x, onnx_model=proto)
    assert small.layer1[0].conv2.groups == 8 and small.layer1[0].conv2.weight.shape[:2] == (24, 3)


def test_a_misplaced_channel_inside_a_conv_group_fails_verification(resnext):
    model, _, proto, graph = resnext
    plan = random_plan(graph.channel_groups, 0.3, seed=0,
                       fingerprint=ModelFingerprint.from_model(model))  # fmt: skip
    pruned, _ = apply_plan(proto, plan, graph=graph)
    target = next(t for t in pruned.graph.initializer if t.name == "layer2.0.conv2.weight")
    w = numpy_helper.to_array(target).copy()
    w[:, [0, 1]] = w[:, [1, 0]]  # two kept input channels of every conv group swapped
    target.CopyFrom(numpy_helper.from_array(w, target.name))
    mask = graph.pruned_roots(plan)
    with pytest.raises(VerificationError, match="at tensor"):
        compare_tensors(graph, mask, masked_original(graph, mask, weights=False), pruned,
                        random_inputs(pruned, seed=1), reference_weights=GraphWeights(graph))  # fmt: skip


def test_unequal_counts_per_conv_group_are_refused(resnext):
    model, _, proto, graph = resnext
    g = next(g for g in graph.channel_groups if "conv_groups" in g.extra)
    segs = g.extra["conv_groups"]
    plan = random_plan([], 0.3, seed=0, fingerprint=ModelFingerprint.from_model(model))
    for m in g.members:
        plan.layers[m] = LayerPlan(m, g.n_channels, sorted([segs[0][0], segs[0][1], segs[1][0]]))
    with pytest.raises(PlanError, match="same count from each of its 8 conv groups"):
        apply_plan(proto, plan, graph=graph)


def test_segment_pick_is_the_lowest_of_each_conv_group():
    rng = np.random.default_rng(0)
    u = rng.random(24)
    order = np.argsort(u, kind="stable")
    segs = [np.arange(k * 6, k * 6 + 6) for k in range(4)]
    got = segment_pick(order, segs, 9)  # 9 / 4 rounds to 2 per conv group
    want = sorted(int(i) for s in segs for i in s[np.argsort(u[s])][:2])
    assert got == want
    assert segment_pick(order, segs, 40) == sorted(
        int(i) for s in segs for i in s[np.argsort(u[s])][:5]
    )  # at most all but one of each


def test_fair_plan_and_rounding_keep_conv_groups_uniform(resnext):
    model, x, proto, graph = resnext
    g = torch.Generator().manual_seed(0)
    y = torch.arange(40) % 10
    xs = torch.randn(40, 3, 32, 32, generator=g) + 0.3 * y.float().view(-1, 1, 1, 1)
    s = score(model, (xs, y), samples_per_class=4, projections=8, progress=False)
    groups = graph.channel_groups
    p = fair_plan(s, 0.3, groups=groups)
    seg_groups = [gr for gr in groups if "conv_groups" in gr.extra]
    pruned_any = False
    for gr in seg_groups:
        lp = p.layers[gr.members[0]]
        counts = {len(set(lp.pruned) & set(seg)) for seg in gr.extra["conv_groups"]}
        assert len(counts) == 1
        pruned_any |= bool(lp.pruned)
        u = sum(s[m].U for m in gr.members)
        for seg in gr.extra["conv_groups"]:  # the lowest-U channels of each conv group
            inside = [i for i in lp.pruned if i in seg]
            rest = [i for i in seg if i not in inside]
            if inside and rest:
                assert max(u[inside]) <= min(u[rest])
    assert pruned_any
    apply_plan(proto, p, graph=graph)
    r = round_plan(p, s, 16, groups=groups)
    for gr in seg_groups:
        lp = r.layers[gr.members[0]]
        assert lp.kept % 16 == 0 or lp.kept == gr.n_channels
    apply_plan(proto, r, graph=graph)


def test_regnet_x_grouped_convs_verified():
    torch.manual_seed(0)
    model = settle_bn(torchvision_model("regnet_x_400mf", num_classes=10), (1, 3, 32, 32))
    proto = export_onnx(model, torch.randn(1, 3, 32, 32), None)
    graph = ChannelGraph(proto)
    groups = graph.channel_groups
    held = [g.reason for g in groups if g.frozen]
    assert len(held) == 1 and "channels reach the model output 'output'" in held[0], held
    plan = random_plan(groups, 0.3, seed=0, fingerprint=ModelFingerprint.from_model(model))
    _, report = apply_plan(proto, plan, graph=graph)
    assert report.verification["max_abs_diff"] <= report.verification["bound"]
    assert report.flops_after < 0.7 * report.flops_before


def test_magnitude_baseline_keeps_conv_groups_uniform(resnext):
    model, _, proto, graph = resnext
    groups = graph.channel_groups
    mods = dict(model.named_modules())
    importance = {
        m: mods[m].weight.detach().abs().flatten(1).sum(1).numpy()
        for g in groups
        for m in g.members
    }
    counts = {m: int(0.3 * len(v)) for m, v in importance.items()}
    plan = plan_from_importance(importance, counts, ModelFingerprint.from_model(model), groups)
    for g in groups:
        segs = g.extra.get("conv_groups")
        if segs and not g.frozen:
            lp = plan.layers[g.members[0]]
            assert lp.pruned and len({len(set(lp.pruned) & set(s)) for s in segs}) == 1
    apply_plan(proto, plan, graph=graph)
