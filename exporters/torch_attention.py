"""nn.MultiheadAttention with heads removed, as a torch module.

nn.MultiheadAttention derives the head dimension as embed_dim // num_heads and checks that the
query's width equals embed_dim, so it cannot hold fewer heads than its input width allows. This
module keeps the same parameter names (in_proj_weight, in_proj_bias, out_proj) with the kept
heads' rows and columns, the original head dimension, and computes the same attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from exporters.errors import SurgeryError


class HeadPrunedAttention(nn.Module):
    """Self- or cross-attention over `num_heads` kept heads of `head_dim` each."""

    def __init__(self, mha: nn.MultiheadAttention, num_heads: int) -> None:
        super().__init__()
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise SurgeryError(
                "attention heads can be removed only from nn.MultiheadAttention with one packed "
                "in-projection, no bias_k/bias_v and no add_zero_attn"
            )
        self.embed_dim = mha.embed_dim  # the width of the query it reads (unchanged)
        self.head_dim = mha.head_dim
        self.num_heads = num_heads
        self.batch_first = mha.batch_first
        self.dropout = mha.dropout
        self._qkv_same_embed_dim = False  # keeps TransformerEncoderLayer off its fused path
        self.in_proj_weight = mha.in_proj_weight
        self.in_proj_bias = mha.in_proj_bias
        self.out_proj = mha.out_proj
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise SurgeryError("HeadPrunedAttention takes no attention masks")
        batched = query.dim() == 3
        if not batched:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
        elif self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        e = self.num_heads * self.head_dim
        w, b = self.in_proj_weight, self.in_proj_bias
        bs = (None, None, None) if b is None else b.split(e)
        q, k, v = (
            F.linear(t, wi, bi)
            for t, wi, bi in zip((query, key, value), w.split(e), bs, strict=True)
        )
        n, batch = q.shape[0], q.shape[1]

        def heads(t: torch.Tensor) -> torch.Tensor:  # [L, B, e] -> [B, H, L, d]
            return t.reshape(t.shape[0], batch, self.num_heads, self.head_dim).permute(1, 2, 0, 3)

        q, k, v = heads(q), heads(k), heads(v)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        probs = scores.softmax(dim=-1)
        if self.training and self.dropout > 0:
            probs = F.dropout(probs, self.dropout)
        ctx = (probs @ v).permute(2, 0, 1, 3).reshape(n, batch, e)
        out = self.out_proj(ctx)
        if not batched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        weights = None
        if need_weights:
            weights = probs.mean(dim=1) if average_attn_weights else probs
            if not batched:
                weights = weights.squeeze(0)
        return out, weights


def replace_attention(model: nn.Module, name: str, num_heads: int) -> None:
    """Swap the (already sliced) nn.MultiheadAttention `name` for a HeadPrunedAttention."""
    mod = model.get_submodule(name)
    if isinstance(mod, HeadPrunedAttention):
        mod.num_heads = num_heads
        return
    if not isinstance(mod, nn.MultiheadAttention):
        raise SurgeryError(f"{name!r} is not an nn.MultiheadAttention; its heads cannot be removed")
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, HeadPrunedAttention(mod, num_heads))
