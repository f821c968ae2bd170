"""Attention heads (torchvision ViT, nn.MultiheadAttention): a head is one unit, removed exactly.

A DeiT-Tiny-shaped but small ViT (2 layers, 4 heads of 8) keeps the tests fast; the surgery is
verified against the masked original, the torch module pruned by the same plan matches the
pruned ONNX model, and a misplaced head is shown to fail verification.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from exporters.attention import attention_np
from exporters.costs import OnnxCostModel, count_cost
from exporters.errors import VerificationError
from exporters.graph_groups import ChannelGraph
from exporters.onnx_export import export_onnx
from exporters.random_plan import random_plan
from exporters.surgery import apply_plan
from exporters.torch_prune import prune_torch
from exporters.verify import (
    GraphWeights,
    compare_models,
    compare_tensors,
    masked_original,
    ort_session,
    random_inputs,
)
from pipeline.attention import HeadPrunedAttention
from pipeline.plan import LayerPlan, ModelFingerprint
from pipeline.zoo import import_torchvision

ATTN0 = "encoder.layers.encoder_layer_0.self_attention"


def small_vit(heads: int = 4) -> nn.Module:
    tv = import_torchvision()
    torch.manual_seed(0)
    model = tv.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=heads, hidden_dim=32, mlp_dim=64,
        num_classes=10,
    )  # fmt: skip
    nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision starts it at zero
    return model.eval()


@pytest.fixture(scope="module")
def vit():
    model = small_vit()
    x = torch.randn(1, 3, 32, 32)
    proto = export_onnx(model, x, None)
    return model, x, proto, ChannelGraph(proto)


class PlainAttention(nn.Module):
    """nn.MultiheadAttention as most code calls it: sequence-first, attention weights asked for
    (and dropped), followed by a classifier."""

    def __init__(self, return_weights: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 24)
        self.attn = nn.MultiheadAttention(24, 6)
        self.head = nn.Linear(24, 5)
        self.return_weights = return_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x).transpose(0, 1)  # [B, L, 6] -> [L, B, 24]
        out, w = self.attn(h, h, h)
        y = self.head(out.mean(dim=0))
        return (y, w) if self.return_weights else y


def _plan(model: nn.Module, graph: ChannelGraph, heads: dict[str, list[int]]):
    plan = random_plan([], 0.0, seed=0, fingerprint=ModelFingerprint.from_model(model))
    for name, pruned in heads.items():
        n = next(g.n_channels for g in graph.channel_groups if g.name == name)
        plan.layers[name] = LayerPlan(name, n, pruned)
    return plan


def test_heads_are_units_and_mlp_hidden_units_stay_prunable(vit):
    _, _, _, graph = vit
    groups = {g.name: g for g in graph.channel_groups}
    for k in range(2):
        g = groups[f"encoder.layers.encoder_layer_{k}.self_attention"]
        assert not g.frozen and g.n_channels == 4
        assert g.extra["attention"] == {"heads": 4, "head_dim": 8}
        assert not groups[f"encoder.layers.encoder_layer_{k}.mlp.0"].frozen
    assert sum(not g.frozen for g in groups.values()) == 4
    att = next(a for a in graph.attentions.values() if a.module == ATTN0)
    assert (att.heads, att.head_dim, att.seq_axis, att.merged) == (4, 8, 0, True)


def test_random_plan_verified_and_torch_matches_pruned_onnx(vit):
    model, x, proto, graph = vit
    plan = random_plan(graph.channel_groups, 0.3, seed=0,
                       fingerprint=ModelFingerprint.from_model(model))  # fmt: skip
    assert plan.layers[ATTN0].pruned == [3]
    pruned, report = apply_plan(proto, plan, graph=graph)
    v = report.verification
    assert v["max_abs_diff"] <= v["bound"] and v["max_abs_ref"] > 1 and v["tensors_compared"] > 40
    w = next(t for t in pruned.graph.initializer if t.name == f"{ATTN0}.in_proj_weight")
    assert list(w.dims) == [3 * 24, 32]  # three heads of 8 kept; the input width is unchanged
    assert report.params_after < report.params_before
    assert report.flops_after < report.flops_before
    est = OnnxCostModel(proto, graph=graph).remaining(plan)  # exact, without surgery
    assert est["params"] == pytest.approx(report.params_after / report.params_before, abs=1e-12)
    assert est["flops"] == pytest.approx(report.flops_after / report.flops_before, abs=1e-12)
    small = prune_torch(model, plan, x, onnx_model=proto)
    attn = small.get_submodule(ATTN0)
    assert isinstance(attn, HeadPrunedAttention) and attn.num_heads == 3 and attn.head_dim == 8
    xs = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = small(xs).numpy()
    got = ort_session(pruned).run(None, {"input": xs.numpy()})[0]
    np.testing.assert_allclose(got, ref, atol=1e-4)


@pytest.mark.parametrize("block", [0, 2], ids=["query", "value"])
def test_a_misplaced_head_fails_verification(vit, block):
    """The pruned in-projection keeps the removed head's query (or value) rows in place of a
    kept head's: the attention output tensor differs, and so does the model output."""
    model, _, proto, graph = vit
    plan = _plan(model, graph, {ATTN0: [1]})
    pruned, _ = apply_plan(proto, plan, graph=graph)
    target = next(t for t in pruned.graph.initializer if t.name == f"{ATTN0}.in_proj_weight")
    w = numpy_helper.to_array(target).copy()
    orig = graph.const(f"{ATTN0}.in_proj_weight")
    w[block * 24 + 16 : block * 24 + 24] = orig[block * 32 + 8 : block * 32 + 16]  # head 1, not 3
    target.CopyFrom(numpy_helper.from_array(w, target.name))
    mask = graph.pruned_roots(plan)
    masked = masked_original(graph, mask, weights=False)
    with pytest.raises(VerificationError, match="at tensor"):
        compare_tensors(graph, mask, masked, pruned, random_inputs(pruned, seed=1),
                        reference_weights=GraphWeights(graph))  # fmt: skip
    with pytest.raises(VerificationError, match="differs from the masked original"):
        compare_models(masked, pruned, reference_weights=GraphWeights(graph), tol=1e-5)


def test_the_masked_original_is_the_model_without_the_head(vit):
    """Masking a head equals dropping its out-projection columns in torch; zeroing only its
    query and key rows does not remove it (softmax of zeros is uniform attention)."""
    model, _, proto, graph = vit
    plan = _plan(model, graph, {ATTN0: [2]})
    mask = graph.pruned_roots(plan)
    feed = random_inputs(proto, seed=3)
    sess = ort_session(masked_original(graph, mask))
    masked = sess.run(None, feed)[0]
    attn = model.get_submodule(ATTN0)
    cols = slice(16, 24)
    x = torch.from_numpy(feed["input"])
    with torch.no_grad():
        saved = attn.out_proj.weight[:, cols].clone()
        attn.out_proj.weight[:, cols] = 0
        without = model(x).numpy()
        attn.out_proj.weight[:, cols] = saved
        qk = attn.in_proj_weight[[*range(16, 24), *range(48, 56)]].clone()
        attn.in_proj_weight[[*range(16, 24), *range(48, 56)]] = 0
        qk_zeroed = model(x).numpy()
        attn.in_proj_weight[[*range(16, 24), *range(48, 56)]] = qk
    np.testing.assert_allclose(masked, without, atol=1e-4)
    assert np.abs(qk_zeroed - without).max() > 1e-2


def test_attention_flops_are_counted_per_head_and_token(vit):
    """The exported core merges batch with heads ([batch * heads, tokens, head_dim]); its
    FLOPs are counted per sample for every head, and the out-projection for every token."""
    _, _, proto, _ = vit
    cost = {c.node: c.flops for c in count_cost(proto).nodes}
    pre = f"/{ATTN0.replace('.', '/')}/"
    assert cost[pre + "MatMul_1"] == 4 * 17 * 17 * 8  # q k^T: heads x tokens^2 x head_dim
    assert cost[pre + "Gemm"] == 17 * 32 * 32  # out-projection: tokens x E x E


def test_plain_multihead_attention_heads_verified_and_torch_matches():
    torch.manual_seed(0)
    model = PlainAttention().eval()
    x = torch.randn(2, 7, 6)
    proto = export_onnx(model, x, None)
    graph = ChannelGraph(proto)
    g = next(g for g in graph.channel_groups if g.name == "attn")
    assert not g.frozen and g.extra["attention"] == {"heads": 6, "head_dim": 4}
    plan = _plan(model, graph, {"attn": [0, 4]})
    pruned, report = apply_plan(proto, plan, graph=graph)
    assert report.verification["max_abs_diff"] <= report.verification["bound"]
    small = prune_torch(model, plan, x, onnx_model=proto)
    assert small.attn.num_heads == 4
    xs = torch.randn(3, 7, 6)
    with torch.no_grad():
        ref = small(xs).numpy()
    np.testing.assert_allclose(ort_session(pruned).run(None, {"input": xs.numpy()})[0], ref,
                               atol=1e-4)  # fmt: skip


def test_returned_attention_weights_freeze_the_heads_with_the_reason():
    torch.manual_seed(0)
    model = PlainAttention(return_weights=True).eval()
    graph = ChannelGraph(export_onnx(model, torch.randn(2, 7, 6), None))
    g = next(g for g in graph.channel_groups if g.name == "attn")
    assert g.frozen and "not recognised" in g.reason and "outside the attention" in g.reason


def test_numpy_attention_matches_torch():
    """The oracle the core is recognised against is torch's own attention."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(12, 3, bias=False).eval()
    h = torch.randn(5, 2, 12)
    with torch.no_grad():
        ref, _ = mha(h, h, h, need_weights=False)
        qkv = (h @ mha.in_proj_weight.T).numpy().astype(np.float64)
        ctx = attention_np(qkv, 3, 0, merged=False)
        got = torch.from_numpy(ctx).float() @ mha.out_proj.weight.T
    np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=1e-5)


def _head_outputs(model: nn.Module, x: torch.Tensor, name: str) -> torch.Tensor:
    """Per-head attention outputs, batch x heads x (tokens * head_dim), computed from the
    attention's input and parameters with plain einsums (the obvious form)."""
    attn = model.get_submodule(name)
    got: dict[str, torch.Tensor] = {}

    def keep_input(mod: nn.Module, inp: tuple) -> None:
        got["x"] = inp[0].detach()

    handle = attn.register_forward_pre_hook(keep_input)
    with torch.no_grad():
        model(x)
    handle.remove()
    h = got["x"].double()  # [B, L, E] (batch first)
    w, b = attn.in_proj_weight.double(), attn.in_proj_bias.double()
    e, nh = attn.embed_dim, attn.num_heads
    d = e // nh
    q, k, v = ((h @ w[i * e : (i + 1) * e].T + b[i * e : (i + 1) * e]) for i in range(3))
    q, k, v = (t.reshape(*t.shape[:2], nh, d) for t in (q, k, v))
    p = torch.einsum("bqhd,bkhd->bhqk", q, k).div(d**0.5).softmax(-1)
    ctx = torch.einsum("bhqk,bkhd->bhqd", p, v)
    return ctx.flatten(2)


def test_heads_scored_against_oracles():
    """U per head is sliced W1 of the head's output; R per head is the Taylor term of its
    out-projection columns (= a * dL/da on the head's output)."""
    from test_scoring import interleaved, oracle_u

    from pipeline.scoring import score

    model = small_vit()
    x, y = interleaved(3, 4, (3, 32, 32))
    s = score(model, (x, y), samples_per_class=4, projections=6, seed=3, progress=False)
    assert isinstance(model.get_submodule(ATTN0), nn.MultiheadAttention)  # put back
    ls = s.layers[ATTN0]
    assert ls.kind == "heads" and ls.n_units == 4 and ls.positions == 17 * 8
    acts = _head_outputs(model, x, ATTN0)
    want_u = oracle_u(acts, "conv", y.numpy(), 3, f"{ATTN0}.heads", 6)
    np.testing.assert_allclose(ls.U, want_u, rtol=1e-4, atol=1e-7)
    wo = model.get_submodule(ATTN0).out_proj.weight
    loss = torch.nn.functional.cross_entropy(model(x), y)
    (g,) = torch.autograd.grad(loss, [wo])
    want_r = (wo * g).detach().double().reshape(32, 4, 8).sum(dim=(0, 2)).abs().numpy()
    np.testing.assert_allclose(ls.R, want_r, rtol=1e-3, atol=1e-6 * want_r.max())


def test_prune_api_end_to_end_on_the_small_vit():
    from fair_edge import prune

    model = small_vit(heads=8)
    x, y = interleaved_digits()
    mlps = [f"encoder.layers.encoder_layer_{k}.mlp.0" for k in range(2)]  # heads alone
    res = prune(model, torch.randn(1, 3, 32, 32), (x, y), target=0.1, samples_per_class=4,
                projections=8, ignore_layers=mlps)  # fmt: skip
    v = res.surgery.verification
    assert v["max_abs_diff"] <= v["bound"] and res.flops_kept < 0.9
    heads = [lp for n, lp in res.plan.layers.items() if n.endswith("self_attention")]
    assert heads and all(lp.n_units == 8 for lp in heads) and any(lp.pruned for lp in heads)
    xs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = res.model(xs).numpy()
    np.testing.assert_allclose(ort_session(res.pruned).run(None, {"input": xs.numpy()})[0], ref,
                               atol=1e-4)  # fmt: skip


def interleaved_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn digits upscaled to 3 x 32 x 32, 3 classes (real data, fast)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = np.isin(d.target, [0, 1, 2])
    img = torch.from_numpy(d.images[keep][:48]).float().div(16)[:, None]
    img = torch.nn.functional.interpolate(img, size=32).repeat(1, 3, 1, 1)
    return img, torch.from_numpy(d.target[keep][:48])


@pytest.mark.parametrize("batch_first", [False, True])
def test_head_by_head_attention_equals_multihead_attention(batch_first):
    """Scoring runs every plain nn.MultiheadAttention head by head: with masks, unbatched input
    and attention weights it must compute what torch's module computes."""
    from pipeline.attention import HeadPrunedAttention

    torch.manual_seed(0)
    mha = nn.MultiheadAttention(12, 3, batch_first=batch_first).eval()
    ours = HeadPrunedAttention(mha, 3).eval()
    q = torch.randn(2, 5, 12) if batch_first else torch.randn(5, 2, 12)
    kv = torch.randn(2, 4, 12) if batch_first else torch.randn(4, 2, 12)
    causal = torch.ones(5, 4, dtype=torch.bool).triu(1)
    pad = torch.tensor([[False, False, False, True], [False, True, False, False]])
    cases = [
        ((q, q, q), {}),
        ((q, kv, kv), {"attn_mask": causal, "key_padding_mask": pad}),
        ((q, kv, kv), {"attn_mask": torch.randn(5, 4)}),
        ((q[0] if batch_first else q[:, 0],) * 3, {}),
    ]
    with torch.no_grad():
        for args, kw in cases:
            want, want_w = mha(*args, **kw)
            got, got_w = ours(*args, **kw)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(got_w, want_w, atol=1e-5, rtol=1e-4)
