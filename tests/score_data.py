"""Small seeded calibration data and scored models shared by the planning tests."""

from __future__ import annotations

import torch

from pipeline.models import ResNet
from pipeline.scores import Scores
from pipeline.scoring import score


def data(
    n_classes: int, per_class: int, shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded inputs with a class-dependent offset, labels interleaved."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n_classes * per_class) % n_classes
    x = torch.randn(len(y), *shape, generator=g) + 0.3 * y.float().view(-1, *([1] * len(shape)))
    return x, y


def small_resnet_scores() -> tuple[ResNet, Scores]:
    """A two-stage ResNet (residual channel groups) and its FAIR scores."""
    torch.manual_seed(0)
    model = ResNet(blocks=(1, 1), widths=(8, 16), num_classes=4)
    x, y = data(4, 6, (3, 8, 8))
    return model, score(model, (x, y), samples_per_class=6, projections=8, progress=False)
