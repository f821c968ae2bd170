"""A user's own network file and a folder of PNG images in class sub-folders, through the real
command line: size, channels, mean/std (or a preset, or --input-shape), class order from a labels
file, all recorded in the manifest; the report names the data of every accuracy figure, states
short classes, and warns when the unpruned model scores near chance (labels in another order).
A folder the model cannot read is one line saying what to change, with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import cli_error, run_cli
from PIL import Image

from calibration.loaders import FASHION_MNIST_CLASSES, load_fashion_mnist

MODEL_FILE = """
from pipeline.train import default_model

def build():
    return default_model(progress=False)
"""
# folder names can hold no '/': "T-shirt/top" -> "T-shirt_top"
NAMES = [c.replace("/", "_") for c in FASHION_MNIST_CLASSES]
COUNTS = [20] * 8 + [6, 6]  # the last two classes are short


@pytest.fixture(scope="module")
def user(tmp_path_factory) -> dict[str, Path]:
    """mynet.py, a labels file in the model's order, a shuffled one, and a folder of 56x56 RGB
    PNGs (Fashion-MNIST test images upscaled 2x: the model wants 1x28x28, normalised)."""
    root = tmp_path_factory.mktemp("user")
    raw = load_fashion_mnist("test")
    images = np.round(raw.inputs[:, 0] * 0.3530 * 255 + 0.2860 * 255).clip(0, 255)
    for c, (name, n) in enumerate(zip(NAMES, COUNTS, strict=True)):
        folder = root / "imgs" / name
        folder.mkdir(parents=True)
        for i, idx in enumerate(np.nonzero(raw.labels == c)[0][:n]):
            gray = np.kron(images[idx], np.ones((2, 2))).astype(np.uint8)
            Image.fromarray(np.stack([gray] * 3, axis=2)).save(folder / f"{i}.png")
    loose = root / "loose"
    loose.mkdir()
    for i in range(40):
        Image.fromarray(images[i].astype(np.uint8)).save(loose / f"{i:02d}.png")
    (root / "labels.txt").write_text("\n".join(NAMES) + "\n")
    shuffled = NAMES[3:] + NAMES[:3]
    (root / "shuffled.txt").write_text("\n".join(shuffled) + "\n")
    (root / "mynet.py").write_text(MODEL_FILE)
    return {"root": root, "imgs": root / "imgs", "loose": loose, "model": root / "mynet.py"}


def _deploy(user: dict[str, Path], out: Path, *extra: str) -> dict:
    code, out_text, err = run_cli(
        ["deploy", "--model", f"{user['model']}:build", "--data", str(user["imgs"]),
         "--samples-per-class", "12", "--projections", "8", "--tod", "0.05", "--runtime", "onnx",
         "--runs", "2", "--warmup", "0", "--no-cache", "--json", "--quiet", "--out", str(out),
         *extra]
    )  # fmt: skip
    assert code == 0, err
    bundle = Path(json.loads(out_text)["bundle"])
    return {
        "manifest": json.loads((bundle / "manifest.json").read_text()),
        "report": json.loads((bundle / "report.json").read_text()),
        "md": (bundle / "report.md").read_text(),
    }


def test_folder_with_preprocessing_options_and_labels_file(user, tmp_path: Path) -> None:
    r = _deploy(user, tmp_path / "dist", "--image-size", "28", "--channels", "1",
                "--mean", "0.2860", "--std", "0.3530", "--labels-file",
                str(user["root"] / "labels.txt"))  # fmt: skip
    pre = r["manifest"]["preprocessing"]
    assert pre["resize"] == [28, 28] and pre["channels"] == 1 and pre["resize_mode"] == "stretch"
    assert (
        pre["mean"] == [0.286] and pre["std"] == [0.353] and pre["scale"] == pytest.approx(1 / 255)
    )
    assert r["manifest"]["labels"] == NAMES
    steps = r["manifest"]["preprocessing_steps"]
    assert steps[0].startswith("read the image as grayscale") and "resize to 28x28" in steps[1]
    assert r["manifest"]["onnx_opset"] == 17
    summary = r["report"]["summary"]
    acc = summary["metrics"]["accuracy"][0]
    assert acc > 0.7  # the model's own order: it reads these images as it was trained
    assert not any("chance" in w for w in summary["warnings"])
    ev = summary["data"]["evaluation"]
    assert ev["source"].startswith(f"{ev['samples']} samples held out of folder:")
    assert not ev["is_calibration"]
    sc = summary["data"]["scoring"]
    assert set(sc["short"]) == {"Bag", "Ankle boot"} and all(v < 12 for v in sc["short"].values())
    assert sc["samples"] == sum(sc["counts"].values()) < 12 * 10
    assert any("fewer than --samples-per-class 12" in w for w in summary["warnings"])
    assert "every top-1 figure: " + ev["source"] in r["md"]
    assert "short classes: " in r["md"] and "## Warnings" in r["md"]


def test_shuffled_labels_warn_of_chance(user, tmp_path: Path) -> None:
    """--input-shape 1,28,28 sets channels and size; the preset the mean/std; the labels file is
    in another order than the model's outputs, so the report warns before its ratios."""
    r = _deploy(user, tmp_path / "dist", "--input-shape", "1,28,28", "--normalize",
                "fashion-mnist", "--labels-file", str(user["root"] / "shuffled.txt"))  # fmt: skip
    summary = r["report"]["summary"]
    assert summary["metrics"]["accuracy"][0] < 0.3
    warning = next(w for w in summary["warnings"] if "chance" in w)
    assert "labels or preprocessing likely do not match" in warning
    assert r["md"].index("## Warnings") < r["md"].index("ratio (pruned vs original)")
    assert r["manifest"]["preprocessing"]["resize"] == [28, 28]


def test_folder_that_does_not_fit_the_model_says_what_to_change(user, tmp_path: Path) -> None:
    line = cli_error(["deploy", "--model", f"{user['model']}:build", "--data", str(user["imgs"]),
                      "--out", str(tmp_path / "dist")])  # fmt: skip
    assert "set --channels 1 and --image-size" in line and "[3, 56, 56]" in line
    assert not (tmp_path / "dist").exists()
    line = cli_error(["score", "--model", f"{user['model']}:build", "--data", "digits",
                      "--channels", "1", "--out", str(tmp_path / "dist")])  # fmt: skip
    assert "--channels apply to image folders" in line
    line = cli_error(["score", "--data", str(user["imgs"]), "--channels", "1", "--mean",
                      "0.5,0.5,0.5", "--out", str(tmp_path / "dist")])  # fmt: skip
    assert "give one value each, or --channels 3" in line
    bad = user["root"] / "bad_labels.txt"
    bad.write_text("\n".join(NAMES[:-1]) + "\n")
    line = cli_error(["score", "--model", f"{user['model']}:build", "--data", str(user["imgs"]),
                      "--input-shape", "1,28,28", "--labels-file", str(bad)])  # fmt: skip
    assert "'Ankle boot'" in line and "not in the class list" in line


def test_unlabelled_plain_folder(user, tmp_path: Path) -> None:
    code, out, err = run_cli(
        ["score", "--model", f"{user['model']}:build", "--data", str(user["loose"]),
         "--input-shape", "1,28,28", "--normalize", "fashion-mnist", "--samples-per-class", "4",
         "--projections", "4", "--no-cache", "--json", "--quiet", "--out", str(tmp_path / "o")]
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    assert result["layers"] and result["sampling"]["labels"] == "the unpruned model's top-1"


def test_score_states_short_classes(user, tmp_path: Path) -> None:
    code, out, err = run_cli(
        ["score", "--model", f"{user['model']}:build", "--data", str(user["imgs"]),
         "--input-shape", "1,28,28", "--normalize", "fashion-mnist", "--samples-per-class", "8",
         "--projections", "4", "--no-cache", "--json", "--out", str(tmp_path / "o")]
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    assert set(result["sampling"]["short"]) == {"Bag", "Ankle boot"}
    assert "fewer than --samples-per-class 8" in result["warnings"][0]


def test_class_order_from_the_models_own_list(user) -> None:
    """Without a labels file, a model's `class_names` attribute orders the classes."""
    import torch

    from fair_edge.config import Options
    from fair_edge.data_source import load_user_data

    model = torch.nn.Linear(1, 10)
    model.class_names = NAMES  # type: ignore[attr-defined]
    opts = Options(input_shape=[1, 28, 28])
    cs = load_user_data(str(user["imgs"]), opts, model)
    assert cs.class_names == NAMES
    assert np.bincount(cs.labels).tolist() == COUNTS  # folder "Bag" -> index 8, not sorted order
    plain = load_user_data(str(user["imgs"]), opts, None)
    assert plain.class_names == sorted(NAMES) and plain.sample_shape == (1, 28, 28)


def test_resize_modes_match_pil_and_numpy() -> None:
    from calibration.data import Preprocessing
    from calibration.errors import CalibrationError

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(30, 50), dtype=np.uint8)  # H=30, W=50
    crop = Preprocessing(resize=(20, 20), resize_mode="center-crop", channels=1)
    np.testing.assert_array_equal(crop.apply([img])[0, 0], img[5:25, 15:35].astype(np.float32))
    short = Preprocessing(resize=(15, 15), resize_mode="shorter-side", channels=1)
    # oracle: PIL scales the shorter side 30 -> 15 (50 -> 25), then the centre 15x15
    ref = np.asarray(
        Image.fromarray(img.astype(np.float32), mode="F").resize((25, 15), Image.BILINEAR)
    )[:, 5:20]
    np.testing.assert_allclose(short.apply([img])[0, 0], ref, atol=1e-4)
    stretch = Preprocessing(resize=(15, 15), channels=1).apply([img])[0, 0]
    assert not np.allclose(stretch, ref, atol=1e-2)  # the modes really differ
    with pytest.raises(CalibrationError, match="smaller than the 40x40 centre crop"):
        Preprocessing(resize=(40, 40), resize_mode="center-crop", channels=1).apply([img])
