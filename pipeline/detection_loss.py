"""torchvision's own training losses on a detector's raw head outputs (`RawDetectionHeads`).

FAIR's R term needs the task's loss. A torchvision detector computes it inside `forward` after
its transform; the pruned graph stops at the raw heads, so the loss is rebuilt here from the
detector's own parts (anchor generator, matcher, box coder, the head's `compute_loss`), all plain
torch ops: SSD / SSDLite (matched anchors, hard-negative mining), RetinaNet (focal loss + box
loss) and the region proposal network of Faster R-CNN (objectness + box deltas on sampled
anchors; its second stage needs RoIAlign, a compiled op, and is not part of the raw heads).
Anchors depend on the input size, so the loss is built for one image size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.scores import ScoringError
from pipeline.zoo import import_torchvision

__all__ = ["raw_head_loss"]


def _size(image_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = image_size
    return int(h), int(w)


def _targets(targets: Any, device: torch.device, num_classes: int) -> list[dict[str, torch.Tensor]]:
    """Per-image {'boxes': M x 4 float32 xyxy, 'labels': M int64} on the outputs' device."""
    for t in targets:
        labels = np.asarray(t["labels"]).reshape(-1)
        if labels.size and (labels.min() < 1 or labels.max() >= num_classes):
            raise ScoringError(
                f"box label {int(labels.max() if labels.max() >= num_classes else labels.min())} "
                f"is out of range for a detector with {num_classes} classes (1 to "
                f"{num_classes - 1}, 0 = background); set --num-classes above the largest label"
            )
    return [
        {
            "boxes": torch.as_tensor(
                np.asarray(t["boxes"]), dtype=torch.float32, device=device
            ).reshape(-1, 4),
            "labels": torch.as_tensor(
                np.asarray(t["labels"]), dtype=torch.int64, device=device
            ).reshape(-1),
        }
        for t in targets
    ]


def _matched(det: nn.Module, tg: list[dict[str, torch.Tensor]], anchors: list[torch.Tensor]):
    """Per image, the index of the box each anchor is matched to (-1/-2 unmatched), as SSD does."""
    from torchvision.ops import boxes as box_ops

    out = []
    for t, a in zip(tg, anchors, strict=True):
        if t["boxes"].numel() == 0:
            out.append(torch.full((a.shape[0],), -1, dtype=torch.int64, device=a.device))
        else:
            out.append(det.proposal_matcher(box_ops.box_iou(t["boxes"], a)))
    return out


def raw_head_loss(
    name: str, num_classes: int, image_size: int | tuple[int, int]
) -> Callable[[dict[str, torch.Tensor], Any], torch.Tensor]:
    """The loss of torchvision detector `name` on its raw head outputs, for `image_size` inputs.

    The returned function takes (raw outputs as `RawDetectionHeads` returns them, one dict of
    'boxes' M x 4 (x1, y1, x2, y2 pixels) and 'labels' M (>= 1) per image) and returns the sum of
    the detector's loss terms. Only the detector's configuration is used (anchors, matcher, box
    coder), never its weights, so any initialisation of the same architecture gives the same loss.
    """
    tv = import_torchvision()
    from torchvision.models.detection import FasterRCNN, RetinaNet
    from torchvision.models.detection.image_list import ImageList
    from torchvision.models.detection.rpn import concat_box_prediction_layers
    from torchvision.models.detection.ssd import SSD

    h, w = _size(image_size)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        det = tv.models.get_model(
            name, weights=None, weights_backbone=None, num_classes=num_classes
        ).eval()
    if not isinstance(det, (SSD, RetinaNet, FasterRCNN)):
        raise ScoringError(
            f"no raw-head loss for {type(det).__name__} ({name!r}): SSD, RetinaNet and Faster "
            "R-CNN are supported; pass your own loss (--loss module:function)"
        )
    with torch.no_grad():
        shapes = [tuple(f.shape[1:]) for f in det.backbone(torch.zeros(1, 3, h, w)).values()]
    rpn = det.rpn if isinstance(det, FasterRCNN) else None
    generator = rpn.anchor_generator if rpn is not None else det.anchor_generator
    cache: dict[tuple[int, str], list[torch.Tensor]] = {}

    def anchors_for(n: int, device: torch.device) -> list[torch.Tensor]:
        key = (n, str(device))
        if key not in cache:
            images = ImageList(torch.zeros(n, 3, h, w, device=device), [(h, w)] * n)
            feats = [torch.zeros(n, *s, device=device) for s in shapes]
            cache.clear()
            cache[key] = generator(images, feats)
        return cache[key]

    def check(got: int, want: int) -> None:
        if got != want:
            raise ScoringError(
                f"the {name} loss was built for {h}x{w} inputs ({want} anchors per image) but "
                f"the outputs hold {got}; build it with the data's image size"
            )

    def loss(out: dict[str, torch.Tensor], targets: Any) -> torch.Tensor:
        if rpn is not None:
            levels = sum(k.startswith("objectness_") for k in out)
            objectness = [out[f"objectness_{i}"] for i in range(levels)]
            deltas = [out[f"bbox_deltas_{i}"] for i in range(levels)]
            n, device = objectness[0].shape[0], objectness[0].device
            anchors = anchors_for(n, device)
            check(sum(o[0].numel() for o in objectness), anchors[0].shape[0])
            obj, dlt = concat_box_prediction_layers(objectness, deltas)
            tg = _targets(targets, device, num_classes)
            labels, matched_boxes = rpn.assign_targets_to_anchors(anchors, tg)
            regression = rpn.box_coder.encode(matched_boxes, anchors)
            return sum(rpn.compute_loss(obj, dlt, labels, regression))
        n, device = out["cls_logits"].shape[0], out["cls_logits"].device
        anchors = anchors_for(n, device)
        check(out["cls_logits"].shape[1], anchors[0].shape[0])
        tg = _targets(targets, device, num_classes)
        if isinstance(det, RetinaNet):
            parts = det.compute_loss(tg, out, anchors)
        else:
            parts = det.compute_loss(tg, out, anchors, _matched(det, tg, anchors))
        return sum(parts.values())

    return loss
