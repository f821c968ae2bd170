"""Reference models run and have the shapes the rest of the pipeline assumes."""

from __future__ import annotations

import pytest
import torch

from pipeline.models import MLP, VGG, VGG_SMALL_CFG, MobileNet, ResNet, SmallCNN
from pipeline.zoo import efficientnet_lite0, torchvision_model


@pytest.mark.parametrize(
    ("model", "shape"),
    [
        (SmallCNN(), (2, 1, 28, 28)),
        (VGG(VGG_SMALL_CFG, in_channels=1), (2, 1, 28, 28)),
        (ResNet(), (2, 3, 32, 32)),
        (MobileNet(), (2, 3, 32, 32)),
        (MLP(), (2, 64)),
    ],
)
def test_reference_models_classify_ten_classes(model, shape) -> None:
    out = model.eval()(torch.randn(shape))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


def test_torchvision_imports_on_the_cpu_build() -> None:
    model = torchvision_model("resnet18", num_classes=10).eval()
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_efficientnet_lite0_has_real_pretrained_weights() -> None:
    a, b = efficientnet_lite0(pretrained=True), efficientnet_lite0(pretrained=False)
    wa = dict(a.named_parameters())
    wb = dict(b.named_parameters())
    assert wa.keys() == wb.keys()
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)
    x = torch.randn(1, 3, 224, 224)
    assert a.eval()(x).shape == (1, 1000)
