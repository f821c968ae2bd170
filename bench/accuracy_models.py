"""The accuracy benchmark's networks: a VGG-style and a ResNet-style net for 1x28x28 Fashion-MNIST.

Widths are halved from VGG_SMALL_CFG / the default ResNet so one epoch on the full 60,000-image
training set fits a shared 2-core CPU; both are trained once and cached (pipeline.train).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from pipeline.models import VGG, ResNet

VGG_FM_CFG: tuple[int | str, ...] = (16, 16, "M", 32, 32, "M", 64, 64, "M")
FULL_EPOCH = dict(epochs=1, batch_size=128, lr=3e-3, seed=0, n_train=None)

BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "vgg": lambda: VGG(cfg=VGG_FM_CFG, in_channels=1, num_classes=10, hidden=128),
    "resnet": lambda: ResNet(blocks=(1, 1, 1), widths=(16, 32, 64), in_channels=1, num_classes=10),
}


def trained(name: str, progress: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """The named benchmark network trained one epoch on the full Fashion-MNIST training set."""
    from pipeline.train import TrainConfig, default_data, train_cached  # not in bench/.env

    return train_cached(
        f"bench-{name}",
        BUILDERS[name],
        TrainConfig(**FULL_EPOCH),
        train_set=lambda: default_data("train"),
        test_set=lambda: default_data("test"),
        progress=progress,
    )


if __name__ == "__main__":
    import json
    import sys

    import torch

    torch.set_num_threads(2)
    for n in sys.argv[1:] or list(BUILDERS):
        _, meta = trained(n, progress=False)
        print(json.dumps(meta), flush=True)
