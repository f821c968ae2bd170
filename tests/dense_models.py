"""Small dense models and data for the CLI tests (fast at 32x32; nothing downloaded)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class TinySegBN(nn.Module):
    """conv-bn-relu (stride 2) -> conv-bn-relu -> residual conv -> 1x1 classifier -> upsample."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.res = nn.Conv2d(16, 16, 3, 1, 1)
        self.head = nn.Conv2d(16, num_classes, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.stem(x)
        h = F.relu(self.mid(h) + self.res(h))
        return {"out": F.interpolate(self.head(h), size=x.shape[-2:], mode="bilinear")}


def tiny_seg(num_classes: int = 3) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return TinySegBN(num_classes).eval()


def classifier(num_classes: int = 3) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(num_classes)).eval()


def failing_loss(output, targets):
    raise KeyError("logits")


def per_pixel_loss(output, targets):
    return F.cross_entropy(output["out"], targets, reduction="none")


def seg_npz(path, n: int = 16, size: int = 32, classes: int = 3, masks: bool = True) -> None:
    """Images with class-coloured rectangles and their masks (0 = background)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 3, size, size)).astype(np.float32)
    m = np.zeros((n, size, size), np.int64)
    for i in range(n):
        for _ in range(2):
            r, c = rng.integers(0, size // 2, 2)
            h, w = rng.integers(size // 4, size // 2, 2)
            k = int(rng.integers(1, classes))
            m[i, r : r + h, c : c + w] = k
            x[i, k % 3, r : r + h, c : c + w] += 2.0
    np.savez(path, **({"x": x, "masks": m} if masks else {"x": x}))


def det_npz(path, n: int = 12, size: int = 64, classes: int = 4) -> None:
    """Images with up to 3 boxes each ('box_labels' -1 pads)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 3, size, size)).astype(np.float32)
    boxes = np.zeros((n, 3, 4))
    labels = np.full((n, 3), -1, np.int64)
    for i in range(n):
        for j in range(int(rng.integers(1, 4))):
            x1, y1 = rng.uniform(0, size * 0.6, 2)
            w, h = rng.uniform(size * 0.15, size * 0.4, 2)
            boxes[i, j] = [x1, y1, min(size, x1 + w), min(size, y1 + h)]
            labels[i, j] = int(rng.integers(1, classes))
            x[i, labels[i, j] % 3, int(y1) : int(y1 + h), int(x1) : int(x1 + w)] += 2.0
    np.savez(path, x=x, boxes=boxes, box_labels=labels)
