"""Raw-head detection losses against torchvision's own loss computed by the whole detector."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.detection_loss import raw_head_loss
from pipeline.scores import ScoringError
from pipeline.zoo import RawDetectionHeads, import_torchvision


def _targets(n: int, size: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        xy = rng.uniform(0, size * 0.5, (3, 2))
        wh = rng.uniform(size * 0.15, size * 0.45, (3, 2))
        boxes = np.concatenate([xy, np.minimum(xy + wh, size)], 1)
        out.append({"boxes": torch.tensor(boxes, dtype=torch.float32),
                    "labels": torch.tensor(rng.integers(1, 5, 3))})  # fmt: skip
    return out


def _detector(name: str, **kwargs):
    """Seeded, with an identity transform (no normalisation; the input size is kept)."""
    tv = import_torchvision()
    torch.manual_seed(0)
    det = tv.models.get_model(name, weights=None, weights_backbone=None, num_classes=5,
                              image_mean=[0.0] * 3, image_std=[1.0] * 3, **kwargs)  # fmt: skip
    det.train()
    for m in det.modules():  # BatchNorm as in eval, so both paths see the same features
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    return det


@pytest.mark.parametrize(
    ("name", "size", "kwargs"),
    [
        ("ssdlite320_mobilenet_v3_large", 320, {}),
        ("retinanet_resnet50_fpn", 128, {"min_size": 128, "max_size": 128}),
    ],
)
def test_single_stage_loss_equals_the_detectors_own(name, size, kwargs):
    det = _detector(name, **kwargs)
    x = torch.randn(2, 3, size, size)
    tg = _targets(2, size)
    loss = raw_head_loss(name, 5, size)
    with torch.no_grad():
        own = sum(det(list(x), tg).values())
        out = RawDetectionHeads(det)(x)
        ours = loss(out, tg)
        moved = loss(out, [{"boxes": t["boxes"] + 16, "labels": t["labels"]} for t in tg])
    assert float(own) > 0
    torch.testing.assert_close(ours, own, rtol=1e-5, atol=1e-6)
    assert abs(float(moved) - float(own)) > 1e-3  # the comparison can fail


def test_rpn_loss_equals_the_region_proposal_networks_own():
    from torchvision.models.detection.image_list import ImageList

    det = _detector("fasterrcnn_mobilenet_v3_large_fpn")
    x = torch.randn(2, 3, 256, 256)
    tg = _targets(2, 256)
    loss = raw_head_loss("fasterrcnn_mobilenet_v3_large_fpn", 5, 256)
    det.rpn.filter_proposals = lambda *args: ([], [])  # proposals need NMS, a compiled op
    with torch.no_grad():
        feats = det.backbone(x)
        torch.manual_seed(3)  # the anchor sampler draws from the global generator
        _, parts = det.rpn(ImageList(x, [(256, 256)] * 2), feats, tg)
        own = sum(parts.values())
        torch.manual_seed(3)
        ours = loss(RawDetectionHeads(det)(x), tg)
    assert float(own) > 0
    torch.testing.assert_close(ours, own, rtol=1e-5, atol=1e-6)


def test_numpy_targets_and_images_without_boxes():
    det = _detector("ssdlite320_mobilenet_v3_large")
    loss = raw_head_loss("ssdlite320_mobilenet_v3_large", 5, 160)
    with torch.no_grad():
        out = RawDetectionHeads(det)(torch.randn(2, 3, 160, 160))
    tg = [{"boxes": np.array([[10.0, 20.0, 150.0, 100.0]]), "labels": np.array([2])},
          {"boxes": np.zeros((0, 4)), "labels": np.zeros(0, np.int64)}]  # fmt: skip
    assert float(loss(out, tg)) > 0


def test_wrong_image_size_is_one_line():
    det = _detector("fasterrcnn_mobilenet_v3_large_fpn")
    with torch.no_grad():
        out = RawDetectionHeads(det)(torch.randn(1, 3, 128, 128))
    with pytest.raises(ScoringError, match="built for 160x160 inputs .* build it with the data"):
        raw_head_loss("fasterrcnn_mobilenet_v3_large_fpn", 5, 160)(out, _targets(1, 128))


def test_unsupported_detector_is_one_line():
    with pytest.raises(ScoringError, match="no raw-head loss for FCOS"):
        raw_head_loss("fcos_resnet50_fpn", 5, 128)


def test_box_label_out_of_range_is_one_line():
    det = _detector("ssdlite320_mobilenet_v3_large")
    with torch.no_grad():
        out = RawDetectionHeads(det)(torch.randn(1, 3, 160, 160))
    tg = [{"boxes": np.array([[10.0, 20.0, 150.0, 100.0]]), "labels": np.array([5])}]
    with pytest.raises(ScoringError, match="box label 5 is out of range for a detector with 5"):
        raw_head_loss("ssdlite320_mobilenet_v3_large", 5, 160)(out, tg)
