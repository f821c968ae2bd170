"""Models with nn.MultiheadAttention export to ONNX and ONNX Runtime computes what torch does."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from exporters.onnx_export import export_onnx, load_onnx
from exporters.verify import ort_session
from pipeline.zoo import import_torchvision


class SelfAttention(nn.Module):
    """One batch-first self-attention block: the fused fast path would take it under no_grad."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.attn(x, x, x, need_weights=False)
        return self.head(out.mean(dim=1))


def _matches_torch(model: nn.Module, example: torch.Tensor, x: torch.Tensor, path) -> None:
    """Export, reload from disk and compare ONNX Runtime's output with torch's within 1e-4."""
    export_onnx(model, example, path)
    with torch.no_grad():
        ref = model(x).numpy()
    out = ort_session(load_onnx(path)).run(None, {"input": x.numpy()})[0]
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, atol=1e-4)


def test_multihead_attention_exports_and_matches(tmp_path) -> None:
    torch.manual_seed(0)
    model = SelfAttention().eval()
    was = torch.backends.mha.get_fastpath_enabled()
    _matches_torch(model, torch.randn(1, 7, 32), torch.randn(3, 7, 32), tmp_path / "mha.onnx")
    assert torch.backends.mha.get_fastpath_enabled() == was, "the fast-path switch is restored"
    assert not model.training


def test_vision_transformer_exports_and_matches(tmp_path) -> None:
    tv = import_torchvision()
    torch.manual_seed(0)
    model = tv.models.VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=2,
        num_heads=4,
        hidden_dim=64,
        mlp_dim=128,
        num_classes=10,
    ).eval()
    _matches_torch(
        model, torch.randn(1, 3, 32, 32), torch.randn(2, 3, 32, 32), tmp_path / "vit.onnx"
    )
