"""Torch-Pruning 1.6.1 as a peer of the recovery bench; runs in bench/.env-tp, not the project venv.

    python3 -m venv bench/.env-tp && bench/.env-tp/bin/pip install torch==2.13.0
    bench/.env-tp/bin/pip install torch-pruning==1.6.1 numpy
    bench/.env-tp/bin/python -m bench.tp_prune --model vgg --weights W.pt --target 0.5 --out P.pt

Loads the accuracy bench's network (bench/accuracy_models.BUILDERS, torch only) with the given
weights, prunes it with Torch-Pruning's own MetaPruner and group L2-norm importance
(GroupNormImportance; named GroupMagnitudeImportance in 1.6.1), one uniform ratio per layer
(global_pruning=False, classifier output kept), the smallest ratio that removes at least `target`
of the MACs (bisection, tp.utils.count_ops_and_params). Writes the pruned state_dict (weights
only, torch.save) and prints one JSON line: ratio and the MACs/params share removed.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import sys

import torch
import torch_pruning as tp
from torch import nn

from bench.accuracy_models import BUILDERS

X1 = torch.zeros(1, 1, 28, 28)


def prune(model: nn.Module, ratio: float) -> nn.Module:
    """A pruned copy of `model`: every layer `ratio` of its channels, group L2-norm importance."""
    m = copy.deepcopy(model).eval()
    imp_cls = getattr(tp.importance, "GroupNormImportance", tp.importance.GroupMagnitudeImportance)
    head = [mod for mod in m.modules() if isinstance(mod, nn.Linear)][-1]
    pruner = tp.pruner.MetaPruner(
        m, X1, importance=imp_cls(p=2), pruning_ratio=ratio, ignored_layers=[head],
        global_pruning=False,
    )  # fmt: skip
    pruner.step()
    return m


def removed(base: tuple[float, float], model: nn.Module) -> tuple[float, float]:
    """(MACs share removed, params share removed) relative to `base`."""
    macs, params = tp.utils.count_ops_and_params(model, X1)
    return 1 - macs / base[0], 1 - params / base[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, choices=sorted(BUILDERS))
    ap.add_argument("--weights", required=True)
    ap.add_argument("--target", type=float, required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = BUILDERS[args.model]()
    model.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
    base = tp.utils.count_ops_and_params(model, X1)
    lo, hi = 0.0, 0.95
    while hi - lo > 1e-3:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if removed(base, prune(model, mid))[0] >= args.target else (mid, hi)
    pruned = prune(model, hi)
    torch.save(pruned.state_dict(), args.out)
    macs, params = removed(base, pruned)
    info = {
        "ratio": hi,
        "macs_removed": macs,
        "params_removed": params,
        "tp": importlib.metadata.version("torch-pruning"),
    }
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
