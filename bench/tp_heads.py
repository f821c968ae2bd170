"""Torch-Pruning 1.6.1 on nn.MultiheadAttention heads, checked against the masked original.

Runs in bench/.env-tp (see bench/tp_prune.py): `bench/.env-tp/bin/python -m bench.tp_heads`.
A residual attention block (Linear embedding 6 -> 24, nn.MultiheadAttention with 6 heads of 4,
residual add, an MLP 24 -> 48 -> 24 with its residual, Linear classifier) loses head 1. The oracle is the unpruned block with head 1's
out-projection columns zeroed (what removing the head means). Torch-Pruning is asked two ways:
(1) the same indices (head 1's 4 channels) through its dependency graph, (2) its own head
pruning (MetaPruner, num_heads, prune_num_heads=True, one head of six). (3) For comparison, MLP
hidden units 0, 5, 9 through its dependency graph against the block with those units masked.
Prints one JSON line per case: what it built, and max |pruned - masked| where it ran.
"""

from __future__ import annotations

import importlib.metadata
import json

import torch
import torch_pruning as tp
from torch import nn


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 24)
        self.attn = nn.MultiheadAttention(24, 6)
        self.fc1 = nn.Linear(24, 48)
        self.fc2 = nn.Linear(48, 24)
        self.head = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x).transpose(0, 1)
        a, _ = self.attn(h, h, h, need_weights=False)
        h = h + a
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return self.head(h.mean(dim=0))


def _shapes(m: Block) -> dict:
    return {
        "embed_out": m.embed.out_features,
        "num_heads": m.attn.num_heads,
        "head_dim": m.attn.head_dim,
        "in_proj": list(m.attn.in_proj_weight.shape),
        "out_proj": list(m.attn.out_proj.weight.shape),
        "fc1_out": m.fc1.out_features,
    }


def main() -> None:
    torch.manual_seed(0)
    base = Block().eval()
    x = torch.randn(3, 7, 6)
    ref = Block().eval()
    ref.load_state_dict(base.state_dict())
    head = list(range(4, 8))
    with torch.no_grad():
        ref.attn.out_proj.weight[:, head] = 0
        want = ref(x)
    version = importlib.metadata.version("torch-pruning")

    def fresh() -> Block:
        m = Block().eval()
        m.load_state_dict(base.state_dict())
        return m

    m = fresh()
    row: dict = {"case": "head 1's channels through the dependency graph", "tp": version}
    try:
        dg = tp.DependencyGraph().build_dependency(m, example_inputs=x)
        dg.get_pruning_group(m.attn, tp.prune_multihead_attention_out_channels, idxs=head).prune()
        with torch.no_grad():
            row["max_abs_diff_vs_masked"] = float((m(x) - want).abs().max())
        row.update(_shapes(m))
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    print(json.dumps(row))

    m = fresh()
    row = {"case": "MetaPruner prune_num_heads, 1 of 6 heads", "tp": version}
    try:
        pruner = tp.pruner.MetaPruner(
            m, x, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=0.0,
            num_heads={m.attn: 6}, prune_num_heads=True, prune_head_dims=False,
            head_pruning_ratio=1 / 6, ignored_layers=[m.head],
        )  # fmt: skip
        pruner.step()
        row.update(_shapes(m))
        with torch.no_grad():
            out = m(x)
        row["runs"] = True
        row["output_shape"] = list(out.shape)
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    print(json.dumps(row))

    m, units = fresh(), [0, 5, 9]
    ref = fresh()
    with torch.no_grad():
        ref.fc1.weight[units] = 0
        ref.fc1.bias[units] = 0
        want_mlp = ref(x)
    dg = tp.DependencyGraph().build_dependency(m, example_inputs=x)
    dg.get_pruning_group(m.fc1, tp.prune_linear_out_channels, idxs=units).prune()
    with torch.no_grad():
        diff = float((m(x) - want_mlp).abs().max())
    print(json.dumps({"case": "MLP hidden units 0, 5, 9 through the dependency graph",
                      "tp": version, **_shapes(m), "max_abs_diff_vs_masked": diff}))  # fmt: skip


if __name__ == "__main__":
    main()
