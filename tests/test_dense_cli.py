"""Dense tasks through the command line: segmentation and detection deploys, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import cli_error, run_cli
from dense_models import det_npz, seg_npz

HERE = Path(__file__).parent
SEG = f"{HERE / 'dense_models.py'}:tiny_seg"
FAST = ["--no-round", "--runtime", "onnx", "--runs", "3", "--warmup", "1", "--no-cache", "--quiet"]


@pytest.fixture(scope="module")
def seg_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("seg") / "seg.npz"
    seg_npz(path)
    return path


def test_segmentation_deploy_end_to_end(tmp_path, seg_data):
    code, out, err = run_cli(["deploy", "--model", SEG, "--task", "segmentation", "--data",
                              str(seg_data), "--target", "0.3", "--out", str(tmp_path), *FAST])  # fmt: skip
    assert code == 0, err
    bundle = next(tmp_path.iterdir())
    report = json.loads((bundle / "report.json").read_text())
    v = report["surgery"]["verification"]
    assert v["max_abs_diff"] <= v["bound"] and v["max_abs_ref"] > 1e-3 and v["n_calibration"] >= 1
    assert report["summary"]["ratios"]["flops"] < 0.9
    assert report["summary"]["metrics"]["accuracy"] == [None, None]
    assert (bundle / "model.onnx").is_file() and (bundle / "weights.safetensors").is_file()


def test_detection_deploy_end_to_end(tmp_path):
    data = tmp_path / "det.npz"
    det_npz(data)
    out_dir = tmp_path / "out"
    code, out, err = run_cli(["deploy", "--model", f"{HERE.parent / 'bench' / 'yolo_tiny.py'}:tiny_yolo",
                              "--task", "detection", "--loss",
                              f"{HERE.parent / 'bench' / 'yolo_tiny.py'}:yolo_loss", "--data", str(data),
                              "--target", "0.3", "--out", str(out_dir), *FAST])  # fmt: skip
    assert code == 0, err
    report = json.loads((next(out_dir.iterdir()) / "report.json").read_text())
    v = report["surgery"]["verification"]
    assert v["max_abs_diff"] <= v["bound"] and v["max_abs_ref"] > 1e-3
    assert report["summary"]["ratios"]["flops"] < 0.95


def test_detection_box_label_beyond_the_heads_classes_is_one_line(tmp_path):
    data = tmp_path / "det.npz"
    det_npz(data)  # box labels 1 to 3
    out_dir = tmp_path / "out"
    yolo = HERE.parent / "bench" / "yolo_tiny.py"
    line = cli_error(["deploy", "--model", f"{yolo}:tiny_yolo", "--num-classes", "3", "--task",
                      "detection", "--loss", f"{yolo}:yolo_loss", "--data", str(data), "--target",
                      "0.3", "--out", str(out_dir), *FAST])  # fmt: skip
    assert "box label 3 is out of range for a head with 3 classes" in line, line
    assert "--num-classes" in line and not out_dir.exists()


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--loss", f"{HERE / 'dense_models.py'}:failing_loss"], "failed: KeyError"),
        (["--loss", f"{HERE / 'dense_models.py'}:per_pixel_loss"], "not a scalar tensor"),
        (["--loss", f"{HERE / 'dense_models.py'}:nothing"], "has no callable 'nothing'"),
        (["--task", "detection"], "--task detection needs --loss"),
        (["--model", f"{HERE / 'dense_models.py'}:classifier"], "N x classes x H x W logits"),
        (["--max-memory", "8G"], "--max-memory covers classification scoring, not --task"),
    ],
)
def test_dense_bad_input_is_one_line_and_writes_nothing(tmp_path, seg_data, extra, needle):
    out_dir = tmp_path / "out"
    args = ["deploy", "--model", SEG, "--task", "segmentation", "--data", str(seg_data),
            "--target", "0.3", "--out", str(out_dir), *FAST]  # fmt: skip
    for flag in ("--model", "--task"):
        if flag in extra:
            i = args.index(flag)
            del args[i : i + 2]
    line = cli_error(args + extra)
    assert needle in line, line
    assert not out_dir.exists()
