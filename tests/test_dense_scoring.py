"""Dense-task FAIR scores: U per position against a scipy oracle, R against weight gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import wasserstein_distance
from torch import nn

from calibration.errors import CalibrationError
from pipeline.dense_scoring import IGNORE, boxes_to_label_map, pool_labels
from pipeline.scores import ScoringError
from pipeline.scoring import score


class TinySeg(nn.Module):
    """conv (stride 2) -> relu -> conv -> 1x1 classifier -> upsample: a dense model in miniature."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(4, 5, 3, padding=1)
        self.head = nn.Conv2d(5, classes, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = F.relu(self.mid(F.relu(self.stem(x))))
        return {"out": F.interpolate(self.head(h), size=x.shape[-2:], mode="nearest")}


def _data(n: int = 6, size: int = 8, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.randint(0, classes, (n, size, size), generator=g)
    return x, y


def _majority(y: np.ndarray, k: int) -> np.ndarray:
    """Slow oracle: the most frequent label of every k x k block, ties to the lower class."""
    n, h, w = y.shape
    out = np.zeros((n, h // k, w // k), dtype=np.int64)
    for i in range(n):
        for r in range(h // k):
            for c in range(w // k):
                block = y[i, r * k : (r + 1) * k, c * k : (c + 1) * k].ravel()
                out[i, r, c] = int(np.argmax(np.bincount(block)))
    return out


def _oracle_u(act: np.ndarray, lab: np.ndarray) -> np.ndarray:
    """max over class pairs of scipy's 1-D W1, per channel; act N x C x h x w, lab N x h x w."""
    classes = np.unique(lab)
    u = np.zeros(act.shape[1])
    for ch in range(act.shape[1]):
        v = act[:, ch]
        for i, a in enumerate(classes):
            for b in classes[i + 1 :]:
                u[ch] = max(u[ch], wasserstein_distance(v[lab == a], v[lab == b]))
    return u


def test_pool_labels_is_block_majority_and_keeps_ignore():
    _, y = _data(n=3, size=8, classes=4)
    got = pool_labels(y, (4, 4), 4).numpy()
    assert (got == _majority(y.numpy(), 2)).all()
    y2 = torch.full((1, 4, 4), IGNORE)
    y2[0, :2, :2] = 1
    assert pool_labels(y2, (2, 2), 2).tolist() == [[[1, IGNORE], [IGNORE, IGNORE]]]


def test_boxes_to_label_map_smallest_box_wins():
    boxes = np.array([[0, 0, 8, 8], [2, 2, 4, 4], [1, 1, 6, 6]], dtype=float)
    m = boxes_to_label_map(boxes, np.array([1, 2, 3]), (10, 10))
    assert m[3, 3] == 2 and m[5, 5] == 3 and m[7, 7] == 1 and m[9, 9] == 0


def test_dense_u_is_exact_w1_and_r_is_weight_taylor():
    torch.manual_seed(0)
    model = TinySeg().eval()
    x, y = _data()
    s = score(model, (x, y), task="segmentation", samples_per_class=10_000, progress=False)
    assert set(s.layers) == {"stem", "mid"} and s.output_layers == ["head"]
    acts: dict[str, torch.Tensor] = {}
    hooks = [
        getattr(model, n).register_forward_hook(lambda m, i, o, n=n: acts.__setitem__(n, o))
        for n in ("stem", "mid")
    ]
    out = model(x)["out"]
    for h in hooks:
        h.remove()
    lab = _majority(y.numpy(), 2)
    for name in ("stem", "mid"):
        want = _oracle_u(acts[name].detach().numpy(), lab)
        np.testing.assert_allclose(s[name].U, want, rtol=1e-5, atol=1e-6)
        assert s[name].positions == 16
    loss = F.cross_entropy(out, y)
    for name in ("stem", "mid"):
        mod = getattr(model, name)
        gw, gb = torch.autograd.grad(loss, [mod.weight, mod.bias], retain_graph=True)
        taylor = (mod.weight * gw).sum(dim=(1, 2, 3)) + mod.bias * gb
        np.testing.assert_allclose(s[name].R, taylor.abs().detach().numpy(), rtol=1e-4, atol=1e-9)


def test_position_cap_is_seeded_and_bounds_each_class():
    torch.manual_seed(0)
    model = TinySeg().eval()
    x, y = _data()
    a = score(model, (x, y), task="segmentation", samples_per_class=5, progress=False)
    b = score(model, (x, y), task="segmentation", samples_per_class=5, progress=False)
    c = score(model, (x, y), task="segmentation", samples_per_class=5, seed=1, progress=False)
    full = score(model, (x, y), task="segmentation", samples_per_class=10_000, progress=False)
    assert np.array_equal(a["stem"].U, b["stem"].U)
    assert not np.array_equal(a["stem"].U, c["stem"].U)
    assert not np.array_equal(a["stem"].U, full["stem"].U)
    np.testing.assert_array_equal(a["stem"].R, full["stem"].R)  # R uses every position


def test_pseudo_labels_and_bad_input():
    torch.manual_seed(3)
    model = TinySeg().eval()
    x, y = _data()
    with torch.no_grad():
        model.head.weight.mul_(20)  # an untrained head predicts one class everywhere
    s = score(model, (x, None), task="segmentation", progress=False)
    with torch.no_grad():
        want = np.unique(model(x)["out"].argmax(dim=1).numpy())
    assert s.classes == want.tolist() and len(want) >= 2
    with pytest.raises(CalibrationError, match="out of range"):
        score(model, (x, y + 5), task="segmentation", progress=False)
    with pytest.raises(CalibrationError, match="1 class"):
        score(model, (x, torch.zeros_like(y)), task="segmentation", progress=False)
    with pytest.raises(ScoringError, match="task="):
        score(model, (x, y), task="depth", progress=False)


def test_user_loss_failures_are_one_line():
    torch.manual_seed(0)
    model = TinySeg().eval()
    x, y = _data()

    def broken(out, target):
        raise KeyError("logits")

    def per_pixel(out, target):
        return F.cross_entropy(out["out"], target, reduction="none")

    with pytest.raises(ScoringError, match="'broken' failed: KeyError"):
        score(model, (x, y), task="segmentation", loss=broken, progress=False)
    with pytest.raises(ScoringError, match=r"returned \[6, 8, 8\], not a scalar"):
        score(model, (x, y), task="segmentation", loss=per_pixel, progress=False)
    s = score(
        model,
        (x, y),
        task="segmentation",
        loss=lambda o, t: 2 * F.cross_entropy(o["out"], t),
        progress=False,
    )
    ref = score(model, (x, y), task="segmentation", progress=False)
    np.testing.assert_allclose(s["mid"].R, 2 * ref["mid"].R, rtol=1e-5)
