"""nn.MultiheadAttention written out head by head: for scoring heads and for holding fewer of them.

nn.MultiheadAttention derives the head dimension as embed_dim // num_heads and checks that the
query's width equals embed_dim, so it cannot hold fewer heads than its input width allows, and
its per-head output (the tensor a head's FAIR scores read) never leaves its fused functional
code. HeadPrunedAttention keeps the same parameter names (in_proj_weight, in_proj_bias,
out_proj) holding the kept heads' rows and columns, the original head dimension, and computes
the same attention; its per-head output passes through a `heads` child module (an identity),
batch x heads x (tokens * head_dim), where hooks see it as units x positions.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


class HeadOutputs(nn.Identity):
    """Identity over the per-head attention output, batch x heads x (tokens * head_dim); knows
    the packed in-projection's shape (what scoring reports as the layer's weight shape)."""

    def __init__(self, in_proj_shape: list[int]) -> None:
        super().__init__()
        self.in_proj_shape = [int(d) for d in in_proj_shape]


def plain_attention(mod: nn.Module) -> bool:
    """nn.MultiheadAttention with one packed in-projection, no bias_k/bias_v, no zero attention:
    the form whose heads fair-edge scores and removes."""
    return (
        isinstance(mod, nn.MultiheadAttention)
        and mod._qkv_same_embed_dim
        and mod.bias_k is None
        and not mod.add_zero_attn
    )


class HeadPrunedAttention(nn.Module):
    """Self- or cross-attention over `num_heads` heads of the original head dimension."""

    def __init__(self, mha: nn.MultiheadAttention, num_heads: int) -> None:
        super().__init__()
        if not plain_attention(mha):
            raise ValueError(
                "only nn.MultiheadAttention with one packed in-projection, no bias_k/bias_v and "
                "no add_zero_attn can be written head by head"
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
        self.heads = HeadOutputs(list(mha.in_proj_weight.shape))

    def _mask(
        self,
        attn_mask: torch.Tensor | None,
        key_padding_mask: torch.Tensor | None,
        is_causal: bool,
        n: int,
        s: int,
        like: torch.Tensor,
    ) -> torch.Tensor | None:
        """An additive mask broadcasting over [batch, heads, n, s] (torch's mask semantics)."""

        def additive(m: torch.Tensor) -> torch.Tensor:
            if m.dtype == torch.bool:
                return torch.zeros(m.shape, dtype=like.dtype, device=like.device).masked_fill(
                    m, float("-inf")
                )
            return m.to(like.dtype)

        total = None
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(n, s, dtype=torch.bool, device=like.device).triu(1)
        if attn_mask is not None:
            if attn_mask.dim() != 2:
                raise ValueError(
                    "a per-head (3-D) attn_mask cannot follow removed heads; pass a 2-D mask"
                )
            total = additive(attn_mask)
        if key_padding_mask is not None:
            kp = additive(key_padding_mask)[:, None, None, :]
            total = kp if total is None else total + kp
        return total

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
        batched = query.dim() == 3
        if not batched:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        e = self.num_heads * self.head_dim
        w, b = self.in_proj_weight, self.in_proj_bias
        bs = (None, None, None) if b is None else b.split(e)
        q, k, v = (
            F.linear(t, wi, bi)
            for t, wi, bi in zip((query, key, value), w.split(e), bs, strict=True)
        )
        n, s, batch = q.shape[0], k.shape[0], q.shape[1]

        def split(t: torch.Tensor) -> torch.Tensor:  # [L, B, e] -> [B, H, L, d]
            return t.reshape(t.shape[0], batch, self.num_heads, self.head_dim).permute(1, 2, 0, 3)

        q, k, v = split(q), split(k), split(v)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        mask = self._mask(attn_mask, key_padding_mask, is_causal, n, s, scores)
        if mask is not None:
            scores = scores + mask
        probs = scores.softmax(dim=-1)
        if self.training and self.dropout > 0:
            probs = F.dropout(probs, self.dropout)
        ctx = probs @ v
        ctx = self.heads(ctx.flatten(2)).view(batch, self.num_heads, n, self.head_dim)
        ctx = ctx.permute(2, 0, 1, 3).reshape(n, batch, e)
        out = F.linear(ctx, self.out_proj.weight, self.out_proj.bias)  # as nn.MultiheadAttention
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


def _set(model: nn.Module, name: str, mod: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, mod)


@contextlib.contextmanager
def heads_exposed(model: nn.Module) -> Iterator[dict[str, str]]:
    """Every plain nn.MultiheadAttention of `model` temporarily replaced by the equal
    HeadPrunedAttention (same parameters, all heads); yields {'<attn>.heads': '<attn>'}."""
    swapped = {n: m for n, m in model.named_modules() if plain_attention(m)}
    try:
        for name, mha in swapped.items():
            new = HeadPrunedAttention(mha, mha.num_heads)
            new.train(mha.training)
            _set(model, name, new)
        yield {f"{n}.heads" if n else "heads": n for n in swapped}
    finally:
        for name, mha in swapped.items():
            _set(model, name, mha)
