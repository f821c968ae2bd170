"""The accuracy benchmark's networks for 1x28x28 Fashion-MNIST: VGG-style (plain), ResNet-style
(residual) and MobileNetV2-style (inverted residual, depthwise).

Widths are halved from VGG_SMALL_CFG / the default ResNet so one epoch on the full 60,000-image
training set fits a shared 2-core CPU; all are trained once per seed and cached (pipeline.train).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from pipeline.models import VGG, MobileNet, ResNet

VGG_FM_CFG: tuple[int | str, ...] = (16, 16, "M", 32, 32, "M", 64, 64, "M")
# (expand, out channels, blocks, stride): a stride-2 first stage keeps one epoch near a minute
MOBILENET_FM_CFG: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 2),
    (4, 24, 2, 2),
    (4, 32, 2, 1),
)
FULL_EPOCH = dict(epochs=1, batch_size=128, lr=3e-3, seed=0, n_train=None)

BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "vgg": lambda: VGG(cfg=VGG_FM_CFG, in_channels=1, num_classes=10, hidden=128),
    "resnet": lambda: ResNet(blocks=(1, 1, 1), widths=(16, 32, 64), in_channels=1, num_classes=10),
    "mobilenet": lambda: MobileNet(in_channels=1, num_classes=10, cfg=MOBILENET_FM_CFG, stem=16),
}


def trained(name: str, progress: bool = True, seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """The named benchmark network trained one epoch on the full Fashion-MNIST training set.

    `seed` seeds the initial weights and the batch order; seed 0 keeps its original cache entry.
    """
    from pipeline.train import TrainConfig, default_data, train_cached  # not in bench/.env

    return train_cached(
        f"bench-{name}",
        BUILDERS[name],
        TrainConfig(**{**FULL_EPOCH, "seed": seed}),
        train_set=lambda: default_data("train"),
        test_set=lambda: default_data("test"),
        progress=progress,
    )


if __name__ == "__main__":
    import json
    import os
    import sys

    import torch

    torch.set_num_threads(2)
    seeds = [int(s) for s in os.environ.get("BENCH_SEEDS", "0").split(",")]
    for n in sys.argv[1:] or list(BUILDERS):
        for s in seeds:
            _, meta = trained(n, progress=False, seed=s)
            print(json.dumps(meta), flush=True)
