"""Channel dependency graph: couplings found, unknown patterns frozen with a reason, never wrong."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from exporters.graph_groups import ChannelGraph, find_groups
from exporters.onnx_export import export_onnx
from exporters.random_plan import random_plan
from exporters.surgery import apply_plan
from pipeline.models import MobileNet, ResNet
from pipeline.plan import ModelFingerprint


def _groups(model, shape):
    proto = export_onnx(model.eval(), torch.randn(*shape), None)
    return proto, {g.name: g for g in find_groups(proto)}


def _by_member(groups, member):
    return next(g for g in groups.values() if member in g.members)


def _prune_all(model, proto, fraction=0.4, seed=0):
    """Random plan over every prunable group, applied with automatic verification."""
    groups = find_groups(proto)
    plan = random_plan(groups, fraction, seed, ModelFingerprint.from_model(model))
    pruned, report = apply_plan(proto, plan)
    assert report.verification["max_abs_diff"] <= report.verification["bound"]
    return pruned, report, plan


def test_resnet_residual_adds_couple_stem_and_block_outputs():
    proto, groups = _groups(ResNet(), (1, 3, 32, 32))
    g = _by_member(groups, "stem.0")
    assert set(g.members) == {"stem.0", "layers.0.conv2", "layers.1.conv2"} and not g.frozen
    g2 = _by_member(groups, "layers.2.shortcut.0")
    assert set(g2.members) == {"layers.2.shortcut.0", "layers.2.conv2", "layers.3.conv2"}
    assert not _by_member(groups, "layers.0.conv1").frozen
    fc = groups["fc"]
    assert fc.frozen and "model output" in fc.reason


def test_depthwise_conv_couples_with_its_producer():
    proto, groups = _groups(MobileNet(), (1, 3, 32, 32))
    g = _by_member(groups, "features.2.block.1.0")
    assert set(g.members) == {"features.2.block.0.0", "features.2.block.1.0"}
    pruned, _, plan = _prune_all(MobileNet().eval(), proto)
    dw = next(
        n
        for n in pruned.graph.node
        if n.op_type == "Conv" and "features.2.block.1.0.weight" in n.input
    )
    group = next(a.i for a in dw.attribute if a.name == "group")
    assert group == plan.layers["features.2.block.1.0"].kept


class SE(nn.Module):
    """Conv -> SiLU -> squeeze-excitation gate ([N,C,1,1] * [N,C,H,W]) -> conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc1 = nn.Conv2d(16, 4, 1)
        self.fc2 = nn.Conv2d(4, 16, 1)
        self.out = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        y = nn.functional.silu(self.conv(x))
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
        return self.out(y * s)


def test_squeeze_excitation_gate_couples_gate_and_features():
    model = SE()
    proto, groups = _groups(model, (1, 3, 16, 16))
    g = _by_member(groups, "conv")
    assert set(g.members) == {"conv", "fc2"} and not g.frozen
    assert not groups["fc1"].frozen
    _prune_all(model, proto)


class ConcatSplit(nn.Module):
    """DenseNet/Inception-style concat, a channel split (chunk) and a channel slice."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 1)
        self.c = nn.Conv2d(14, 10, 1)
        self.d = nn.Conv2d(5, 4, 1)
        self.e = nn.Conv2d(3, 7, 1)
        self.head = nn.Linear(4 * 8 * 8 + 3 * 64, 5)

    def forward(self, x):
        y = torch.cat([torch.relu(self.a(x)), self.b(x)], 1)
        p, q = torch.split(self.c(y), [5, 5], dim=1)
        z = torch.relu(self.d(p + q))
        w = self.e(x)[:, 2:5]
        return self.head(torch.cat([torch.flatten(z, 1), torch.flatten(w, 1)], 1))


def test_concat_split_slice_and_flatten_blocks():
    model = ConcatSplit().eval()
    proto, groups = _groups(model, (1, 3, 8, 8))
    for name in ("a", "b", "d", "e"):
        assert not _by_member(groups, name).frozen, name
    c = groups["c"]  # p + q adds c's channel i to its channel i + 5: a self-coupling
    assert c.frozen and "layout" in c.reason
    _prune_all(model, proto, fraction=0.3)
    _prune_all(model, proto, fraction=0.5, seed=4)


class Shuffle(nn.Module):
    """ShuffleNet channel shuffle: a Reshape/Transpose/Reshape that mixes channels."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 4, 1)
        self.g = nn.Conv2d(8, 8, 3, padding=1, groups=2)

    def forward(self, x):
        y = self.a(x)
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.b(self.g(y))


def test_channel_shuffle_and_grouped_conv_are_followed():
    """The shuffle is a permutation: the grouped conv's two conv groups, seen through it, are
    a's channels {0, 1, 4, 5} and {2, 3, 6, 7} (a channel c of part k lands at 2c + k)."""
    model = Shuffle().eval()
    proto, groups = _groups(model, (1, 3, 8, 8))
    assert not groups["a"].frozen and groups["a"].extra["conv_groups"] == [
        [0, 1, 4, 5],
        [2, 3, 6, 7],
    ]
    assert not groups["g"].frozen and groups["g"].extra["conv_groups"] == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
    ]
    assert groups["b"].frozen and "output" in groups["b"].reason
    plan = random_plan(list(groups.values()), 0.3, seed=0,
                       fingerprint=ModelFingerprint.from_model(model))  # fmt: skip
    _, report = apply_plan(proto, plan)
    assert report.verification["max_abs_diff"] <= report.verification["bound"]
    assert report.params_after < report.params_before


def _tiny_onnx(op_nodes, extra_inits=()):
    """conv(3->6) -> <op_nodes on 't'> -> conv(6->2) with custom domain ops allowed."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((6, 3, 1, 1)).astype(np.float32), "p.weight")
    w2 = numpy_helper.from_array(rng.standard_normal((2, 6, 1, 1)).astype(np.float32), "q.weight")
    nodes = [helper.make_node("Conv", ["x", "p.weight"], ["t"], name="p")]
    nodes += op_nodes
    nodes.append(helper.make_node("Conv", ["u", "q.weight"], ["y"], name="q"))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 4, 4])],
        [w1, w2, *extra_inits],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom", 1)]
    )


def test_unknown_custom_op_freezes_and_never_crashes():
    proto = _tiny_onnx([helper.make_node("Magic", ["t"], ["u"], name="magic", domain="custom")])
    groups = {g.name: g for g in find_groups(proto)}
    assert groups["p"].frozen and "custom op" in groups["p"].reason


def test_transpose_is_followed_and_softmax_across_channels_freezes():
    proto = _tiny_onnx(
        [
            helper.make_node("Transpose", ["t"], ["t2"], perm=[0, 2, 3, 1], name="tr"),
            helper.make_node("Relu", ["t2"], ["t3"], name="r"),
            helper.make_node("Transpose", ["t3"], ["u"], perm=[0, 3, 1, 2], name="tr2"),
        ]
    )
    graph = ChannelGraph(proto)
    assert not graph.channel_groups[0].frozen
    proto2 = _tiny_onnx([helper.make_node("Softmax", ["t"], ["u"], axis=1, name="sm")])
    g = find_groups(proto2)[0]
    assert g.frozen and "Softmax" in g.reason


def test_residual_add_with_mismatched_concat_layout_is_frozen():
    """Add(concat(a, b), c): c's channels map onto two producers -> non-uniform -> frozen."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(3, 8, 1)
            self.d = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.d(torch.cat([self.a(x), self.b(x)], 1) + self.c(x))

    proto, groups = _groups(M(), (1, 3, 4, 4))
    g = _by_member(groups, "c")
    assert set(g.members) == {"a", "b", "c"} and g.frozen and "layout" in g.reason


def test_group_json_roundtrip_and_shapes_known():
    proto, groups = _groups(ResNet(), (1, 3, 32, 32))
    from pipeline.groups import ChannelGroup

    for g in groups.values():
        assert ChannelGroup.from_json(g.to_json()) == g
    with pytest.raises(Exception):  # noqa: B017 - any checker error: the model stays usable
        onnx.checker.check_model(onnx.ModelProto())


def test_subgraph_reading_a_tracked_tensor_freezes_it():
    """An If whose branch reads the conv output implicitly must freeze that conv."""
    then_g = helper.make_graph(
        [helper.make_node("Identity", ["t"], ["u_then"])],
        "then",
        [],
        [helper.make_tensor_value_info("u_then", TensorProto.FLOAT, None)],
    )
    else_g = helper.make_graph(
        [helper.make_node("Relu", ["t"], ["u_else"])],
        "else",
        [],
        [helper.make_tensor_value_info("u_else", TensorProto.FLOAT, None)],
    )
    cond = numpy_helper.from_array(np.array(True), "cond")
    proto = _tiny_onnx(
        [
            helper.make_node(
                "If", ["cond"], ["u"], then_branch=then_g, else_branch=else_g, name="if"
            )
        ],
        extra_inits=[cond],
    )
    g = {x.name: x for x in find_groups(proto)}["p"]
    assert g.frozen and "subgraph" in g.reason


class Tokens(nn.Module):
    """nn.Linear on a 3-D input exports as MatMul(x, Transpose(weight)) + Add(bias)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 12), nn.Linear(12, 3)
        self.norm = nn.LayerNorm(12)

    def forward(self, x):
        return self.c(self.norm(self.b(nn.functional.gelu(self.a(x)))))


def test_matmul_on_transposed_weight_and_layernorm():
    model = Tokens().eval()
    proto, groups = _groups(model, (1, 5, 8))
    assert not groups["a"].frozen and groups["a"].n_channels == 16
    assert groups["b"].frozen and "LayerNormalization" in groups["b"].reason
    pruned, report, plan = _prune_all(model, proto, fraction=0.5)
    from exporters.costs import OnnxCostModel, count_cost

    assert count_cost(proto).params == sum(p.numel() for p in model.parameters())
    rem = OnnxCostModel(proto).remaining(plan)
    assert rem["flops"] == pytest.approx(
        count_cost(pruned).flops / count_cost(proto).flops, rel=1e-12
    )
    assert rem["params"] == pytest.approx(
        count_cost(pruned).params / count_cost(proto).params, rel=1e-12
    )


def test_torch_prune_follows_transposed_matmul_weights():
    from exporters.torch_prune import prune_torch

    model = Tokens().eval()
    x = torch.randn(1, 5, 8)
    proto = export_onnx(model, x, None)
    plan = random_plan(find_groups(proto), 0.5, 3, ModelFingerprint.from_model(model))
    small = prune_torch(model, plan, x, onnx_model=proto)  # verified against the masked original
    assert small.a.out_features == plan.layers["a"].kept == small.b.in_features


class Gate(nn.Module):
    """SE gate written with expand_as (an Expand node) instead of broadcasting."""

    def __init__(self):
        super().__init__()
        self.conv, self.gate, self.out = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        g = torch.sigmoid(self.gate(y.mean((2, 3), keepdim=True))).expand(-1, -1, 4, 4)
        return self.out(y * g)


def test_expand_gate_couples():
    model = Gate().eval()
    proto, groups = _groups(model, (1, 3, 4, 4))
    g = _by_member(groups, "conv")
    assert set(g.members) == {"conv", "gate"} and not g.frozen
    _prune_all(model, proto)


@pytest.mark.parametrize("seed", range(4))
def test_opaque_op_anywhere_freezes_and_never_crashes(seed):
    """Replace a random Relu/Add of a ResNet by an opaque custom op: analysis freezes, never fails."""
    proto = export_onnx(ResNet().eval(), torch.randn(1, 3, 32, 32), None)
    rng = np.random.default_rng(seed)
    idx = [k for k, n in enumerate(proto.graph.node) if n.op_type in ("Relu", "Add")]
    node = proto.graph.node[int(rng.choice(idx))]
    node.domain, node.op_type = "custom", "Opaque"
    proto.opset_import.append(helper.make_opsetid("custom", 1))
    groups = find_groups(proto)
    frozen = [g for g in groups if g.frozen and "custom op" in g.reason]
    assert frozen and all(g.members for g in groups)
    members = sorted(m for g in groups for m in g.members)
    clean = find_groups(export_onnx(ResNet().eval(), torch.randn(1, 3, 32, 32), None))
    assert members == sorted(m for g in clean for m in g.members), "every layer in one group"


@pytest.mark.parametrize("opset", [18, 20])
def test_newer_opsets(opset):
    """Opset 18 moved Reduce axes and Split sizes to inputs; the analysis follows both forms."""
    cases = ((ConcatSplit(), (1, 3, 8, 8), "a"), (SE(), (1, 3, 16, 16), "conv"))
    for model, shape, member in cases:
        model.eval()
        proto = export_onnx(model, torch.randn(*shape), None, opset=opset)
        assert not _by_member({g.name: g for g in find_groups(proto)}, member).frozen
        _prune_all(model, proto, fraction=0.4, seed=opset)


class _SharedHead(nn.Module):
    """Two producers (an FPN's levels) read by one shared conv head, as torchvision's RPN does."""

    def __init__(self) -> None:
        super().__init__()
        self.p3, self.p4 = nn.Conv2d(3, 8, 3, 1, 1), nn.Conv2d(3, 8, 3, 2, 1)
        self.head = nn.Conv2d(8, 6, 3, 1, 1)
        self.out = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.out(torch.relu(self.head(self.p3(x)))), self.out(self.head(self.p4(x)))


def test_inputs_of_a_shared_weight_are_pruned_alike_in_onnx_and_torch():
    from exporters.torch_prune import prune_torch

    torch.manual_seed(0)
    model = _SharedHead().eval()
    x = torch.randn(1, 3, 16, 16)
    proto, groups = _groups(model, (1, 3, 16, 16))
    assert sorted(_by_member(groups, "p3").members) == ["p3", "p4"]  # one input axis, one group
    assert _by_member(groups, "out").frozen
    pruned, _, plan = _prune_all(model, proto, fraction=0.5)
    head_w = next(i for i in pruned.graph.initializer if i.name == "head.weight")
    assert list(head_w.dims)[:2] == [3, 4]  # sliced once, not duplicated per reader
    small = prune_torch(model, plan, example_input=x, onnx_model=proto)  # verified inside
    assert small.head.in_channels == 4 and small.p4.out_channels == 4
