"""ONNX surgery on the hand-built nets: verified results, exact costs, torch cross-check, bad plans."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from exporters.costs import OnnxCostModel, count_cost
from exporters.errors import SurgeryError, VerificationError
from exporters.graph_groups import ChannelGraph, group_plan_layers
from exporters.onnx_export import export_onnx, onnx_fingerprint
from exporters.random_plan import random_plan
from exporters.simplify import simplify_checked
from exporters.surgery import apply_plan, prune_onnx_file
from exporters.surgery_report import SurgeryReport
from exporters.torch_prune import prune_torch
from exporters.verify import compare_models, masked_original, ort_session
from pipeline.models import MLP, VGG, VGG_SMALL_CFG, MobileNet, ResNet, SmallCNN
from pipeline.plan import LayerPlan, ModelFingerprint, Plan, PlanError

NETS = {
    "SmallCNN": (lambda: SmallCNN(), (1, 1, 28, 28)),
    "VGG": (lambda: VGG(VGG_SMALL_CFG), (1, 3, 32, 32)),
    "ResNet": (lambda: ResNet(), (1, 3, 32, 32)),
    "MobileNet": (lambda: MobileNet(), (1, 3, 32, 32)),
    "MLP": (lambda: MLP(), (1, 64)),
}


def settle_bn(model: torch.nn.Module, shape: tuple[int, ...]) -> torch.nn.Module:
    """Give BatchNorm real running statistics so activations (and the oracle) are O(1)."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, *shape[1:]))
    return model.eval()


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    out = {}
    for name, (make, shape) in NETS.items():
        model = settle_bn(make(), shape)
        x = torch.randn(*shape)
        proto = export_onnx(model, x, None)
        out[name] = (model, x, proto, ChannelGraph(proto))
    return out


def _feed(shape, seed=1, n=4):
    return np.random.default_rng(seed).standard_normal((n, *shape[1:])).astype(np.float32)


@pytest.mark.parametrize("name", list(NETS))
def test_surgery_matches_masked_original_and_shrinks(nets, name):
    model, x, proto, graph = nets[name]
    plan = random_plan(
        graph.channel_groups, 0.3, seed=3, fingerprint=ModelFingerprint.from_model(model)
    )
    assert plan.layers, "every hand-built net has prunable groups"
    assert onnx_fingerprint(proto).digest == plan.fingerprint.digest
    calib = _feed(x.shape, seed=5, n=8)
    before = proto.SerializeToString()
    pruned, report = apply_plan(proto, plan, verify_inputs=calib)
    assert proto.SerializeToString() == before, "the input model must not be changed"
    assert report.verification["n_calibration"] == 1 and report.verification["n_random"] == 1
    assert report.verification["max_abs_diff"] <= report.verification["bound"]
    feed = _feed(x.shape)
    out = ort_session(pruned).run(None, {"input": feed})[0]
    masked = ort_session(masked_original(graph, graph.pruned_roots(plan))).run(
        None, {"input": feed}
    )[0]
    orig = ort_session(proto).run(None, {"input": feed})[0]
    scale = max(1.0, float(np.abs(masked).max()))
    assert np.abs(out - masked).max() <= 1e-4 * scale
    assert np.abs(out - orig).max() > 1e-3 * float(np.abs(orig).max()), (
        "pruning must change the model"
    )
    assert report.params_after < report.params_before and report.flops_after < report.flops_before
    for row in report.layers:
        lp = plan.layers.get(row.layer)
        assert row.channels_after == (lp.kept if lp else row.channels_before)
    # exact analytic cost model == counter on the real pruned graph
    rem = OnnxCostModel(proto, graph=graph).remaining(plan)
    c0, c1 = count_cost(proto), count_cost(pruned)
    assert rem["params"] == pytest.approx(c1.params / c0.params, rel=1e-12)
    assert rem["flops"] == pytest.approx(c1.flops / c0.flops, rel=1e-12)
    back = SurgeryReport.from_json(report.to_json())
    assert back.to_markdown() == report.to_markdown() and "| layer |" in report.to_markdown()


@pytest.mark.parametrize("name", list(NETS))
def test_torch_prune_equals_onnx_surgery(nets, name):
    model, x, proto, graph = nets[name]
    plan = random_plan(
        graph.channel_groups, 0.5, seed=7, fingerprint=ModelFingerprint.from_model(model)
    )
    pruned_onnx, _ = apply_plan(proto, plan)
    small = prune_torch(model, plan, x, onnx_model=proto)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == sum(
        int(np.prod(s)) for s in ModelFingerprint.from_model(model).shapes.values()
    ), "the user's model is left unchanged"
    feed = _feed(x.shape)
    a = ort_session(export_onnx(small, x, None)).run(None, {"input": feed})[0]
    b = ort_session(pruned_onnx).run(None, {"input": feed})[0]
    np.testing.assert_allclose(a, b, atol=1e-4 * max(1.0, float(np.abs(b).max())))
    with torch.no_grad():
        np.testing.assert_allclose(small(torch.from_numpy(feed)).numpy(), b, atol=1e-4)


def test_count_cost_matches_hand_count():
    """SmallCNN counted by hand: convs (MACs), BN, ReLU, pools, linears; params = torch's."""
    model = SmallCNN()
    proto = export_onnx(model, torch.randn(1, 1, 28, 28), None)
    cost = count_cost(proto)
    assert cost.params == sum(p.numel() for p in model.parameters())
    convs = 28 * 28 * 32 * 9 + 28 * 28 * 32 * 32 * 9 + 14 * 14 * 64 * 32 * 9 + 14 * 14 * 64 * 64 * 9
    lin = 3136 * 128 + 128 * 10
    bn_relu = 2 * (2 * 28 * 28 * 32 + 2 * 14 * 14 * 64)
    pools = 14 * 14 * 32 * 4 + 7 * 7 * 64 * 4
    assert cost.flops == convs + lin + bn_relu + pools + 128


def test_verification_refuses_a_wrong_model(nets, tmp_path):
    model, x, proto, graph = nets["ResNet"]
    plan = random_plan(
        graph.channel_groups, 0.3, seed=1, fingerprint=ModelFingerprint.from_model(model)
    )
    pruned, _ = apply_plan(proto, plan)
    with pytest.raises(VerificationError, match="differs from the masked original"):
        compare_models(proto, pruned)  # the unmasked original is not what pruning computes


def test_failed_verification_writes_nothing(nets, tmp_path):
    """A tolerance no float result can meet forces the refusal path: no file appears."""
    model, x, proto, graph = nets["VGG"]
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    src.write_bytes(proto.SerializeToString())
    plan = random_plan(
        graph.channel_groups, 0.3, seed=1, fingerprint=ModelFingerprint.from_model(model)
    )
    with pytest.raises(VerificationError, match="not written"):
        prune_onnx_file(src, plan, dst, tol=-1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]
    prune_onnx_file(src, plan, dst)
    assert dst.is_file()


def _plan(model, layers):
    return Plan(ModelFingerprint.from_model(model), layers)


def test_bad_plans_are_refused_and_nothing_is_written(nets, tmp_path):
    model, x, proto, graph = nets["ResNet"]
    src = tmp_path / "in.onnx"
    src.write_bytes(proto.SerializeToString())
    dst = tmp_path / "out.onnx"
    bad = {
        "not a prunable layer": {"nope": LayerPlan("nope", 4, [0])},
        "has 32 units|model has 32": {"layers.0.conv1": LayerPlan("layers.0.conv1", 33, [0])},
        "outside": {"layers.0.conv1": LayerPlan("layers.0.conv1", 32, [40])},
        "every channel|at least one": {
            "layers.0.conv1": LayerPlan("layers.0.conv1", 32, list(range(32)))
        },
        "frozen": {"fc": LayerPlan("fc", 10, [0])},
        "coupled": {
            "layers.0.conv2": LayerPlan("layers.0.conv2", 32, [0]),
            "stem.0": LayerPlan("stem.0", 32, [1]),
        },
    }
    for pattern, layers in bad.items():
        with pytest.raises(PlanError, match=pattern):
            prune_onnx_file(src, _plan(model, layers), dst)
        assert not dst.exists()
    other = _plan(SmallCNN(), {})
    with pytest.raises(PlanError, match="does not match"):
        prune_onnx_file(src, other, dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]


def test_coupled_group_pruned_through_group_members(nets, tmp_path):
    model, x, proto, graph = nets["ResNet"]
    residual = next(g for g in graph.channel_groups if len(g.members) > 2 and not g.frozen)
    assert {"stem.0", "layers.0.conv2", "layers.1.conv2"} <= set(residual.members)
    layers = group_plan_layers(graph, {residual.name: [0, 5, 9]})
    src, dst = tmp_path / "src.onnx", tmp_path / "ok.onnx"
    src.write_bytes(proto.SerializeToString())
    report = prune_onnx_file(src, _plan(model, layers), dst)
    assert dst.is_file()
    rows = {r.layer: r for r in report.layers}
    assert all(rows[m].channels_after == residual.n_channels - 3 for m in residual.members)


def test_simplify_folds_bn_with_equal_outputs(nets):
    model, x, proto, graph = nets["ResNet"]
    plan = random_plan(
        graph.channel_groups, 0.3, seed=2, fingerprint=ModelFingerprint.from_model(model)
    )
    pruned, _ = apply_plan(proto, plan)
    slim, check = simplify_checked(pruned)
    assert not [n for n in slim.graph.node if n.op_type == "BatchNormalization"]
    assert check.max_abs_diff <= check.bound


def test_surgery_error_is_a_fair_edge_error():
    from calibration.errors import FairEdgeError

    assert issubclass(SurgeryError, FairEdgeError) and issubclass(VerificationError, SurgeryError)


def test_plan_fingerprinted_on_the_onnx_model_applies(nets):
    """A plan made from the ONNX file alone (no torch model) carries the same fingerprint."""
    model, x, proto, graph = nets["MobileNet"]
    fp = onnx_fingerprint(proto)
    assert fp.digest == ModelFingerprint.from_model(model).digest
    plan = random_plan(graph.channel_groups, 0.3, seed=9, fingerprint=fp)
    pruned, report = apply_plan(proto, plan)
    assert report.flops_after < report.flops_before


@pytest.mark.parametrize("fraction", [0.1, 0.9])
def test_extreme_fractions_verify(nets, fraction):
    """Down to a single kept channel per group, and barely any: every surgery still verifies."""
    for name in ("MobileNet", "ResNet", "SmallCNN"):
        model, x, proto, graph = nets[name]
        plan = random_plan(
            graph.channel_groups, fraction, seed=11, fingerprint=ModelFingerprint.from_model(model)
        )
        pruned, report = apply_plan(proto, plan, graph=graph)
        assert report.verification["max_abs_diff"] <= report.verification["bound"]
        assert all(r.channels_after >= 1 for r in report.layers)


def test_weights_held_in_constant_nodes_are_rewritten(nets):
    """Some tools store weights as Constant nodes instead of initializers: same surgery."""
    from onnx import helper

    model, x, proto, _ = nets["SmallCNN"]
    moved = onnx.ModelProto()
    moved.CopyFrom(proto)
    consts = [
        helper.make_node("Constant", [], [t.name], value=t, name=f"const_{t.name}")
        for t in moved.graph.initializer
    ]
    del moved.graph.initializer[:]
    nodes = consts + list(moved.graph.node)
    del moved.graph.node[:]
    moved.graph.node.extend(nodes)
    graph = ChannelGraph(moved)
    assert [g.frozen for g in graph.channel_groups] == [
        g.frozen for g in ChannelGraph(proto).channel_groups
    ]
    plan = random_plan(
        graph.channel_groups, 0.4, seed=1, fingerprint=ModelFingerprint.from_model(model)
    )
    pruned, report = apply_plan(moved, plan)
    assert report.params_after < report.params_before
    feed = _feed(x.shape)
    ref, _ = apply_plan(proto, plan)
    np.testing.assert_allclose(
        ort_session(pruned).run(None, {"input": feed})[0],
        ort_session(ref).run(None, {"input": feed})[0],
        atol=1e-5,
    )
