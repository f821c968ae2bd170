"""Remove attention heads from a torch module (the heads a plan removes from its ONNX export)."""

from __future__ import annotations

from torch import nn

from exporters.errors import SurgeryError
from pipeline.attention import HeadPrunedAttention, plain_attention


def replace_attention(model: nn.Module, name: str, num_heads: int) -> None:
    """Swap the (already sliced) nn.MultiheadAttention `name` for a HeadPrunedAttention."""
    mod = model.get_submodule(name)
    if isinstance(mod, HeadPrunedAttention):
        mod.num_heads = num_heads
        mod.heads.in_proj_shape = list(mod.in_proj_weight.shape)
        return
    if not plain_attention(mod):
        raise SurgeryError(
            f"{name!r} is not an nn.MultiheadAttention with one packed in-projection and no "
            "bias_k/bias_v; its heads cannot be removed in torch (prune the ONNX export instead)"
        )
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, HeadPrunedAttention(mod, num_heads))
