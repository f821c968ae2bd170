"""A small YOLOv8-style detector (C2f split/concat blocks, SPPF, FPN+PAN neck, 3-scale decoupled
head) and a per-position detection loss, defined here so nothing is downloaded.

Each scale's output is N x (4 + classes) x h x w raw head values (box logits, class logits;
class 0 is background): what is exported, pruned and timed. Decoding and NMS are not part of it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.dense_scoring import boxes_to_label_map, pool_labels
from pipeline.scores import ScoringError


class ConvBnAct(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 1, s: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool = True) -> None:
        super().__init__()
        self.cv1, self.cv2 = ConvBnAct(c, c, 3), ConvBnAct(c, c, 3)
        self.add = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """cv1 -> split in two -> n bottlenecks on the last piece, each output kept -> concat -> cv2."""

    def __init__(self, cin: int, cout: int, n: int = 1, shortcut: bool = True) -> None:
        super().__init__()
        self.c = cout // 2
        self.cv1 = ConvBnAct(cin, 2 * self.c)
        self.cv2 = ConvBnAct((2 + n) * self.c, cout)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        for m in self.m:
            y.append(m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.cv1 = ConvBnAct(cin, cin // 2)
        self.cv2 = ConvBnAct(cin // 2 * 4, cout)
        self.pool = nn.MaxPool2d(5, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.pool(x)
        y2 = self.pool(y1)
        return self.cv2(torch.cat([x, y1, y2, self.pool(y2)], 1))


class DetectHead(nn.Module):
    """Decoupled head per scale: a box branch and a class branch, concatenated on channels."""

    def __init__(self, chans: tuple[int, ...], classes: int) -> None:
        super().__init__()
        self.box = nn.ModuleList(
            nn.Sequential(ConvBnAct(c, 32, 3), ConvBnAct(32, 32, 3), nn.Conv2d(32, 4, 1))
            for c in chans
        )
        self.cls = nn.ModuleList(
            nn.Sequential(ConvBnAct(c, 32, 3), ConvBnAct(32, 32, 3), nn.Conv2d(32, classes, 1))
            for c in chans
        )

    def forward(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return tuple(
            torch.cat([b(f), c(f)], 1) for f, b, c in zip(feats, self.box, self.cls, strict=True)
        )


class TinyYolo(nn.Module):
    """Backbone (strides 8/16/32 with C2f), SPPF, FPN up + PAN down with C2f, 3-scale head."""

    def __init__(self, classes: int = 4, w: int = 16) -> None:
        super().__init__()
        self.stem = ConvBnAct(3, w, 3, 2)
        self.s2 = nn.Sequential(ConvBnAct(w, 2 * w, 3, 2), C2f(2 * w, 2 * w, 1))
        self.s3 = nn.Sequential(ConvBnAct(2 * w, 4 * w, 3, 2), C2f(4 * w, 4 * w, 2))
        self.s4 = nn.Sequential(ConvBnAct(4 * w, 8 * w, 3, 2), C2f(8 * w, 8 * w, 2))
        self.s5 = nn.Sequential(
            ConvBnAct(8 * w, 8 * w, 3, 2), C2f(8 * w, 8 * w, 1), SPPF(8 * w, 8 * w)
        )
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.fpn4 = C2f(16 * w, 8 * w, 1, shortcut=False)
        self.fpn3 = C2f(12 * w, 4 * w, 1, shortcut=False)
        self.down3 = ConvBnAct(4 * w, 4 * w, 3, 2)
        self.pan4 = C2f(12 * w, 8 * w, 1, shortcut=False)
        self.down4 = ConvBnAct(8 * w, 8 * w, 3, 2)
        self.pan5 = C2f(16 * w, 8 * w, 1, shortcut=False)
        self.head = DetectHead((4 * w, 8 * w, 8 * w), classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        p3 = self.s3(self.s2(self.stem(x)))
        p4 = self.s4(p3)
        p5 = self.s5(p4)
        f4 = self.fpn4(torch.cat([self.up(p5), p4], 1))
        f3 = self.fpn3(torch.cat([self.up(f4), p3], 1))
        n4 = self.pan4(torch.cat([self.down3(f3), f4], 1))
        n5 = self.pan5(torch.cat([self.down4(n4), p5], 1))
        return self.head([f3, n4, n5])


def tiny_yolo(num_classes: int = 4) -> TinyYolo:
    """Factory for `--model bench/yolo_tiny.py:tiny_yolo` (seeded init)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return TinyYolo(classes=num_classes).eval()


def yolo_loss(outputs: tuple[torch.Tensor, ...], targets: list[dict[str, Any]]) -> torch.Tensor:
    """Per-position detection loss: class cross-entropy at every cell (label = the class of the
    smallest box covering the cell, background 0), plus L1 of sigmoid box values against the
    covering box's normalised corners at positive cells."""
    x0 = outputs[0]
    k = x0.shape[1] - 4
    size = (x0.shape[2] * 8, x0.shape[3] * 8)  # input resolution (first scale is stride 8)
    maps, boxes = [], []
    for t in targets:
        b = np.asarray(t["boxes"], dtype=np.float64).reshape(-1, 4)
        lab = np.asarray(t["labels"]).reshape(-1)
        maps.append(boxes_to_label_map(b, lab, size))
        idx = boxes_to_label_map(b, np.arange(1, len(b) + 1), size)  # which box covers a pixel
        corners = np.concatenate([np.zeros((1, 4)), b / [size[1], size[0], size[1], size[0]]])
        boxes.append(corners[idx])
    lab_full = torch.from_numpy(np.stack(maps))
    if int(lab_full.max()) >= k:
        raise ScoringError(
            f"box label {int(lab_full.max())} is out of range for a head with {k} classes "
            "(0 = background); set --num-classes above the largest box label"
        )
    box_full = torch.from_numpy(np.stack(boxes)).float().permute(0, 3, 1, 2)
    total = x0.new_zeros(())
    for out in outputs:
        h, w = out.shape[2:]
        lab = pool_labels(lab_full, (h, w), k).to(out.device)
        total = total + F.cross_entropy(out[:, 4:].float(), lab)
        pos = (lab > 0).unsqueeze(1)
        if bool(pos.any()):
            tgt = F.interpolate(box_full, size=(h, w), mode="nearest").to(out.device)
            err = (torch.sigmoid(out[:, :4].float()) - tgt).abs() * pos
            total = total + err.sum() / (4 * pos.sum())
    return total / len(outputs)
