"""Torch-Pruning 1.6.1 on a grouped convolution, checked against the masked original.

Runs in bench/.env-tp (see bench/tp_prune.py): `bench/.env-tp/bin/python -m bench.tp_grouped`.
A ResNeXt-style block (1x1 conv -> 3x3 conv with 4 groups of 4 -> 1x1 conv) loses 4 of the 16
channels between the first two convs, one per conv group, through Torch-Pruning's dependency
graph. The oracle is the unpruned block with those channels zeroed. Prints one JSON line per
index set: the pruned weight shapes and max |pruned - masked|.
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
        self.c1 = nn.Conv2d(8, 16, 1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.c3 = nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c3(torch.relu(self.c2(torch.relu(self.c1(x)))))


def main() -> None:
    torch.manual_seed(0)
    base = Block().eval()
    x = torch.randn(2, 8, 6, 6)
    cases = {"same position in every conv group": [0, 4, 8, 12],
             "a different position per conv group": [0, 5, 10, 15]}  # fmt: skip
    for name, idxs in cases.items():
        ref = Block().eval()
        ref.load_state_dict(base.state_dict())
        pruned = Block().eval()
        pruned.load_state_dict(base.state_dict())
        graph = tp.DependencyGraph().build_dependency(pruned, example_inputs=x)
        graph.get_pruning_group(pruned.c1, tp.prune_conv_out_channels, idxs=idxs).prune()
        with torch.no_grad():
            ref.c1.weight[idxs] = 0
            ref.c1.bias[idxs] = 0
            diff = float((pruned(x) - ref(x)).abs().max())
        print(json.dumps({
            "case": name, "indices": idxs, "c2_weight": list(pruned.c2.weight.shape),
            "c2_groups": pruned.c2.groups, "max_abs_diff_vs_masked": diff,
            "tp": importlib.metadata.version("torch-pruning"),
        }))  # fmt: skip


if __name__ == "__main__":
    main()
