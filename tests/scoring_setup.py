"""A small seeded CNN on scikit-learn's digits, shared by tests/test_scoring_budget.py and the
torchrun script tests/ddp_score.py: one conv wide enough (96 channels) that U is computed in
several unit chunks, BatchNorm, a hidden linear layer."""

from __future__ import annotations

import torch
from torch import nn

from calibration.loaders import load_digits


def digits_data() -> tuple[torch.Tensor, torch.Tensor]:
    cs = load_digits()
    return torch.from_numpy(cs.inputs[:400]), torch.from_numpy(cs.labels[:400])


def digits_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 96, 3, padding=1),
        nn.BatchNorm2d(96),
        nn.ReLU(),
        nn.Conv2d(96, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 64, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    ).eval()
