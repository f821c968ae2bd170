"""Model builders, losses and data for `fair-edge deploy --task ...` on every dense family.

    fair-edge deploy --task segmentation --model bench/task_models.py:lraspp --data seg96.npz ...
    fair-edge deploy --task detection --model bench/task_models.py:retinanet \\
        --loss bench/task_models.py:retinanet_loss --data det128.npz ...

Every builder is torchvision's architecture with weights=None, weights_backbone=None and a
seeded initialisation (pipeline.zoo.torchvision_dense_model); detectors are their raw heads.
BatchNorm running statistics are then set from 16 seeded noise images at the family's input
size (a train-mode forward, no weight change): with the initial statistics an untrained deep
model's outputs shrink towards zero (SSDLite's to ~1e-17), which would leave the surgery check
nothing to compare.
A detector's loss is torchvision's own on those heads (pipeline.detection_loss), built for the
image size its data is written at (DET_SIZES). `write_seg` and `write_det` write the .npz files.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bench.yolo_tiny import tiny_yolo as _tiny_yolo
from pipeline.detection_loss import raw_head_loss
from pipeline.zoo import torchvision_dense_model

CLASSES = 5
SEG_SIZE = 96
DET_SIZES = {
    "ssdlite320_mobilenet_v3_large": 160,
    "fasterrcnn_mobilenet_v3_large_fpn": 160,
    "retinanet_resnet50_fpn": 128,
}
YOLO_SIZE = 64


def settled(model: nn.Module, size: int, n: int = 16) -> nn.Module:
    """BatchNorm statistics (cumulative average) from seeded noise images; eval mode after."""
    x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for s in range(0, n, 8):
            model(x[s : s + 8])
    return model.eval()


def _seg(name: str, num_classes: int) -> nn.Module:
    return settled(torchvision_dense_model(name, "segmentation", num_classes), SEG_SIZE)


def _det(name: str, num_classes: int) -> nn.Module:
    return settled(torchvision_dense_model(name, "detection", num_classes), DET_SIZES[name])


def lraspp(num_classes: int = CLASSES) -> nn.Module:
    return _seg("lraspp_mobilenet_v3_large", num_classes)


def deeplabv3(num_classes: int = CLASSES) -> nn.Module:
    return _seg("deeplabv3_mobilenet_v3_large", num_classes)


def fcn_resnet50(num_classes: int = CLASSES) -> nn.Module:
    return _seg("fcn_resnet50", num_classes)


def ssdlite(num_classes: int = CLASSES) -> nn.Module:
    return _det("ssdlite320_mobilenet_v3_large", num_classes)


def fasterrcnn(num_classes: int = CLASSES) -> nn.Module:
    return _det("fasterrcnn_mobilenet_v3_large_fpn", num_classes)


def retinanet(num_classes: int = CLASSES) -> nn.Module:
    return _det("retinanet_resnet50_fpn", num_classes)


def tiny_yolo(num_classes: int = CLASSES) -> nn.Module:
    """The YOLOv8-style detector of bench/yolo_tiny.py (its loss: yolo_tiny.py:yolo_loss)."""
    return settled(_tiny_yolo(num_classes), YOLO_SIZE)


@functools.cache
def _loss(name: str) -> Any:
    """Built once per process (it builds the detector to read its anchor configuration)."""
    return raw_head_loss(name, CLASSES, DET_SIZES[name])


def ssdlite_loss(out: dict[str, torch.Tensor], targets: Any) -> torch.Tensor:
    return _loss("ssdlite320_mobilenet_v3_large")(out, targets)


def fasterrcnn_loss(out: dict[str, torch.Tensor], targets: Any) -> torch.Tensor:
    return _loss("fasterrcnn_mobilenet_v3_large_fpn")(out, targets)


def retinanet_loss(out: dict[str, torch.Tensor], targets: Any) -> torch.Tensor:
    return _loss("retinanet_resnet50_fpn")(out, targets)


def write_seg(path: Path, size: int = SEG_SIZE, n: int = 16) -> None:
    """`x` noise images with class-coloured rectangles, `masks` their class maps."""
    from bench.bench_tasks import seg_data

    x, m = seg_data(size, CLASSES)
    np.savez(path, x=x[:n].numpy(), masks=m[:n].numpy())


def write_det(path: Path, size: int, n: int = 16) -> None:
    """`x` noise images with class-coloured boxes, `boxes` N x 3 x 4, `box_labels` (-1 pads)."""
    from bench.bench_tasks import det_data

    x, targets = det_data(size, CLASSES)
    boxes = np.zeros((n, 3, 4), np.float32)
    labels = np.full((n, 3), -1, np.int64)
    for i, t in enumerate(targets[:n]):
        k = len(t["labels"])
        boxes[i, :k], labels[i, :k] = t["boxes"].numpy(), t["labels"].numpy()
    np.savez(path, x=x[:n].numpy(), boxes=boxes, box_labels=labels)
