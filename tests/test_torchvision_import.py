"""A user's model file may `import torchvision` (models, `torchvision.ops` layers), through the
real command line in a fresh process, and so may a script that imports fair-edge first."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

USER_MODEL = """
import torch
import torchvision
from torchvision.ops import Conv2dNormActivation


def build(num_classes=10):
    return torch.nn.Sequential(
        Conv2dNormActivation(1, 8, 3),
        Conv2dNormActivation(8, 8, 3),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, num_classes),
    )


def resnet(num_classes=10):
    return torchvision.models.resnet18(num_classes=num_classes)
"""


def _python(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_user_model_file_importing_torchvision_runs_through_the_cli(tmp_path: Path) -> None:
    (tmp_path / "mynet.py").write_text(USER_MODEL)
    proc = _python(
        ["-m", "fair_edge.cli", "score", "--model", "mynet.py:build", "--data", "digits",
         "--samples-per-class", "4", "--projections", "4", "--no-cache", "--json", "--quiet",
         "--out", str(tmp_path / "out")],
        tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["layers"] == ["0.0", "1.0"]


def test_a_script_importing_fair_edge_first_can_use_torchvision(tmp_path: Path) -> None:
    code = (
        "import fair_edge.cli, torchvision, torchvision.ops;"
        "m = torchvision.models.resnet18(num_classes=3); print(m.fc.out_features)"
    )
    proc = _python(["-c", code], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "3"


def test_the_hook_is_what_makes_it_work(tmp_path: Path) -> None:
    """Without fair-edge imported first, this torchvision build fails on the missing op; a build
    whose compiled ops load imports either way (then the hook never acts)."""
    bare = _python(["-c", "import torchvision"], tmp_path)
    hooked = _python(["-c", "import calibration, torchvision"], tmp_path)
    assert hooked.returncode == 0, hooked.stderr
    if bare.returncode != 0:
        assert "torchvision::nms" in bare.stderr
