"""Calibration data: loaders on real data, bad input, balanced sampling, pseudo labels."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from calibration.data import CalibrationSet, Preprocessing
from calibration.errors import CalibrationError, FairEdgeError
from calibration.loaders import (
    FASHION_MNIST_DIR,
    from_torch_dataset,
    load_arrays,
    load_data,
    load_digits,
    load_fashion_mnist,
    load_idx,
    load_image_folder,
    read_idx,
)
from calibration.pseudo_labels import agreement, pseudo_label
from calibration.sampling import balanced_sample


@pytest.fixture(scope="module")
def fmnist_test() -> CalibrationSet:
    return load_fashion_mnist("test")


def _write_idx(path: Path, arr: np.ndarray, gz: bool = True) -> Path:
    code = {np.uint8: 0x08, np.int32: 0x0C, np.float32: 0x0D}[arr.dtype.type]
    dt = {np.uint8: ">u1", np.int32: ">i4", np.float32: ">f4"}[arr.dtype.type]
    raw = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    raw += arr.astype(dt).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


# ---------- real data ----------


def test_fashion_mnist_matches_raw_bytes(fmnist_test: CalibrationSet) -> None:
    cs = fmnist_test
    assert cs.inputs.shape == (10000, 1, 28, 28) and cs.inputs.dtype == np.float32
    assert cs.labels is not None and cs.labels.dtype == np.int64
    assert np.bincount(cs.labels).tolist() == [1000] * 10  # the test split is balanced
    assert cs.class_names[0] == "T-shirt/top" and cs.class_names[9] == "Ankle boot"
    # oracle: decode the first image straight from the gzip bytes (16-byte header)
    with gzip.open(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz") as fh:
        raw = fh.read()
    first = np.frombuffer(raw, np.uint8, count=784, offset=16).reshape(28, 28)
    pre = cs.preprocessing
    expect = (first / 255.0 - pre.mean[0]) / pre.std[0]
    np.testing.assert_allclose(cs.inputs[0, 0], expect, atol=1e-5)
    with gzip.open(FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz") as fh:
        lab = fh.read()
    assert cs.labels[:20].tolist() == list(lab[8:28])
    meta = cs.to_json()
    json.dumps(meta)
    assert meta["num_samples"] == 10000 and meta["label_source"] == "given"
    assert Preprocessing.from_json(meta["preprocessing"]) == pre


def test_digits_images_and_flat() -> None:
    from sklearn.datasets import load_digits as sk

    img, flat = load_digits(), load_digits(flat=True)
    d = sk()
    assert img.inputs.shape == (1797, 1, 8, 8) and flat.inputs.shape == (1797, 64)
    np.testing.assert_allclose(flat.inputs, d.data / 16.0, atol=1e-6)
    np.testing.assert_allclose(img.inputs.reshape(1797, 64), flat.inputs, atol=1e-6)
    assert (img.labels == d.target).all() and img.num_classes == 10


def _make_photo_folder(root: Path) -> Path:
    """Three 'classes' of 24x32 crops from sklearn's bundled photos (china, flower, both mixed)."""
    from sklearn.datasets import load_sample_images

    china, flower = load_sample_images().images
    rng = np.random.default_rng(0)
    for name, src in (("china", [china]), ("flower", [flower]), ("mixed", [china, flower])):
        (root / name).mkdir(parents=True)
        for i in range(5):
            img = src[i % len(src)]
            y, x = rng.integers(0, 400), rng.integers(0, 600)
            ext = ".png" if i % 2 else ".jpg"
            Image.fromarray(img[y : y + 24, x : x + 32]).save(root / name / f"{i}{ext}")
    (root / "china" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_loads_and_resizes(tmp_path: Path) -> None:
    root = _make_photo_folder(tmp_path / "photos")
    cs = load_image_folder(root, size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert cs.class_names == ["china", "flower", "mixed"]
    assert cs.inputs.shape == (15, 3, 16, 16)
    assert np.bincount(cs.labels).tolist() == [5, 5, 5]
    # oracle: the PNG file resized with PIL directly
    ref = Image.open(root / "china" / "1.png").resize((16, 16), Image.BILINEAR)
    expect = (np.asarray(ref, np.float32) / 255 - 0.5) / 0.25
    np.testing.assert_allclose(cs.inputs[1].transpose(1, 2, 0), expect, atol=0.05)
    nhwc = load_image_folder(root, size=(8, 12), layout="NHWC", channels=1)
    assert nhwc.inputs.shape == (15, 8, 12, 1)
    assert load_data(root).inputs.shape == (15, 3, 24, 32)  # one size already: no resize needed


def test_arrays_npz_npy_and_dispatch(tmp_path: Path, fmnist_test: CalibrationSet) -> None:
    x = fmnist_test.inputs[:50]
    y = fmnist_test.labels[:50]
    np.savez(tmp_path / "a.npz", images=x, labels=y)
    cs = load_data(tmp_path / "a.npz")
    np.testing.assert_array_equal(cs.inputs, x)
    np.testing.assert_array_equal(cs.labels, y)
    np.save(tmp_path / "b.npy", (np.arange(12, dtype=np.uint8) * 20).reshape(3, 4))
    b = load_arrays(tmp_path / "b.npy")
    assert b.labels is None and b.label_source == "none"
    np.testing.assert_allclose(b.inputs[0], np.array([0, 20, 40, 60]) / 255, atol=1e-6)
    assert load_data("digits:flat").inputs.shape == (1797, 64)
    assert load_data("fashion-mnist:test").source == "fashion-mnist:test"


def test_idx_roundtrip_and_dispatch(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (7, 5, 6), dtype=np.uint8)
    labs = np.array([0, 1, 2, 0, 1, 2, 2], np.uint8)
    ip = _write_idx(tmp_path / "x-images-idx3-ubyte.gz", imgs)
    _write_idx(tmp_path / "x-labels-idx1-ubyte.gz", labs)
    np.testing.assert_array_equal(read_idx(ip), imgs)
    raw = _write_idx(tmp_path / "raw-idx", rng.standard_normal((3, 2)).astype(np.float32), gz=False)
    assert read_idx(raw).shape == (3, 2) and read_idx(raw).dtype == np.float32
    cs = load_data(ip)
    assert cs.inputs.shape == (7, 1, 5, 6) and cs.labels.tolist() == labs.tolist()
    np.testing.assert_allclose(cs.inputs[:, 0], imgs / 255, atol=1e-6)


class _TinyDataset(torch.utils.data.Dataset):
    classes = ["a", "b"]

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.full((2, 3), float(i)), i % 2


def test_from_torch_dataset() -> None:
    cs = from_torch_dataset(_TinyDataset())
    assert cs.inputs.shape == (6, 2, 3) and cs.class_names == ["a", "b"]
    assert cs.labels.tolist() == [0, 1, 0, 1, 0, 1] and cs.inputs[4, 1, 2] == 4.0


def test_batches_subset_and_numpy_batches(fmnist_test: CalibrationSet) -> None:
    cs = fmnist_test.subset(np.arange(70))
    got = list(cs.batches(32))
    assert [len(b[0]) for b in got] == [32, 32, 6]
    assert all(isinstance(t, torch.Tensor) for b in got for t in b)
    np.testing.assert_array_equal(torch.cat([b[0] for b in got]).numpy(), cs.inputs)
    np.testing.assert_array_equal(torch.cat([b[1] for b in got]).numpy(), cs.labels)
    shuffled = torch.cat([b[1] for b in cs.batches(32, shuffle=True, seed=3)]).numpy()
    assert sorted(shuffled.tolist()) == sorted(cs.labels.tolist())
    assert not np.array_equal(shuffled, cs.labels)
    nb = list(cs.as_numpy_batches(50))
    assert [b.shape for b in nb] == [(50, 1, 28, 28), (20, 1, 28, 28)] and nb[0].dtype == np.float32
    mask = cs.labels == 0
    assert len(cs.subset(mask)) == int(mask.sum())


# ---------- bad input ----------


def test_bad_inputs_raise_one_line_errors(tmp_path: Path) -> None:
    x = np.zeros((4, 3), np.float32)
    with pytest.raises(CalibrationError, match="empty"):
        CalibrationSet(np.zeros((0, 3), np.float32))
    bad = x.copy()
    bad[2, 1] = np.nan
    with pytest.raises(CalibrationError, match="NaN/inf in 1 sample"):
        CalibrationSet(bad, np.array([0, 1, 0, 1]))
    with pytest.raises(CalibrationError, match="out of range"):
        CalibrationSet(x, np.array([0, 1, 2, 3]), class_names=["a", "b"])
    with pytest.raises(CalibrationError, match="one per sample"):
        CalibrationSet(x, np.array([0, 1]))
    with pytest.raises(CalibrationError, match="no labels"):
        next(CalibrationSet(x).batches(2))
    with pytest.raises(CalibrationError, match="layout"):
        Preprocessing(layout="CHW")
    with pytest.raises(CalibrationError, match="not found"):
        load_data(tmp_path / "nothing.npz")
    with pytest.raises(CalibrationError, match="no data at"):
        load_data(str(tmp_path / "nowhere"))
    with pytest.raises(CalibrationError, match="apt install dataset-fashion-mnist"):
        load_fashion_mnist("test", root=tmp_path)
    with pytest.raises(CalibrationError, match="'train' or 'test'"):
        load_fashion_mnist("val")
    with pytest.raises(CalibrationError, match="no images .* or each class's images in its own"):
        load_image_folder(tmp_path)
    assert issubclass(CalibrationError, FairEdgeError)


def test_corrupt_and_wrong_idx(tmp_path: Path) -> None:
    imgs = np.zeros((4, 3, 3), np.uint8)
    good = _write_idx(tmp_path / "g-images-idx3-ubyte", imgs, gz=False).read_bytes()
    (tmp_path / "magic").write_bytes(b"\x12\x34" + good[2:])
    with pytest.raises(CalibrationError, match="bad magic"):
        read_idx(tmp_path / "magic")
    (tmp_path / "short").write_bytes(good[:-5])
    with pytest.raises(CalibrationError, match="header says"):
        read_idx(tmp_path / "short")
    (tmp_path / "trunc.gz").write_bytes(gzip.compress(good)[:30])
    with pytest.raises(CalibrationError, match="corrupt or truncated"):
        read_idx(tmp_path / "trunc.gz")
    lab = _write_idx(tmp_path / "l", np.zeros(5, np.uint8))
    with pytest.raises(CalibrationError, match="4 images but"):
        load_idx(tmp_path / "g-images-idx3-ubyte", lab)


def test_pickled_npz_refused_and_broken_files(tmp_path: Path) -> None:
    np.savez(tmp_path / "p.npz", x=np.array([{"a": 1}, {"b": 2}], dtype=object), y=np.array([0, 1]))
    with pytest.raises(CalibrationError, match="pickled"):
        load_arrays(tmp_path / "p.npz")
    np.save(tmp_path / "p.npy", np.array([[1], "x"], dtype=object), allow_pickle=True)
    with pytest.raises(CalibrationError, match="pickled"):
        load_arrays(tmp_path / "p.npy")
    (tmp_path / "z.npz").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(CalibrationError, match="cannot read"):
        load_arrays(tmp_path / "z.npz")
    np.savez(tmp_path / "k.npz", foo=np.zeros((2, 2)))
    with pytest.raises(CalibrationError, match="expected inputs"):
        load_arrays(tmp_path / "k.npz")
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    (tmp_path / "imgs" / "a" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(CalibrationError, match="cannot read image"):
        load_image_folder(tmp_path / "imgs")


# ---------- balanced sampling ----------


def test_balanced_sample_counts_and_determinism(fmnist_test: CalibrationSet) -> None:
    a, rep = balanced_sample(fmnist_test, 16, seed=5)
    b, _ = balanced_sample(fmnist_test, 16, seed=5)
    c, _ = balanced_sample(fmnist_test, 16, seed=6)
    assert np.bincount(a.labels).tolist() == [16] * 10 and rep.balanced and rep.warning is None
    np.testing.assert_array_equal(a.inputs, b.inputs)
    assert not np.array_equal(a.inputs, c.inputs)
    # every drawn sample is a real sample of its class
    flat = fmnist_test.inputs.reshape(len(fmnist_test), -1)
    pos = {row.tobytes(): i for i, row in enumerate(flat)}
    idx = [pos[r.tobytes()] for r in a.inputs.reshape(len(a), -1)]
    assert len(set(idx)) == len(idx)
    assert (fmnist_test.labels[idx] == a.labels).all()


def test_balanced_sample_short_and_bad_classes() -> None:
    x = np.arange(20, dtype=np.float32).reshape(10, 2)
    y = np.array([0, 0, 0, 0, 0, 1, 1, 1, 2, 2])
    cs = CalibrationSet(x, y, class_names=["a", "b", "c", "d"])
    s, rep = balanced_sample(cs, 4, seed=0)
    assert rep.counts == {"a": 4, "b": 3, "c": 2} and rep.short == {"b": 3, "c": 2}
    assert rep.missing == ["d"] and "unequal class counts" in rep.warning
    assert np.bincount(s.labels).tolist() == [4, 3, 2]
    with pytest.raises(CalibrationError, match="at least 2 classes"):
        balanced_sample(CalibrationSet(x, np.zeros(10, np.int64)), 4)
    with pytest.raises(CalibrationError, match="fewer than 2 samples: 2;"):
        balanced_sample(CalibrationSet(x, np.array([0] * 5 + [1] * 4 + [2])), 4)
    with pytest.raises(CalibrationError, match="no labels"):
        balanced_sample(CalibrationSet(x), 4)


# ---------- pseudo labels ----------


def test_pseudo_labels_equal_model_argmax(fmnist_test: CalibrationSet) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    unlabelled = CalibrationSet(fmnist_test.inputs[:300], source="photos")
    assert unlabelled.label_source == "none"
    ps = pseudo_label(unlabelled, model, class_names=fmnist_test.class_names)
    with torch.no_grad():
        expect = model(torch.from_numpy(unlabelled.inputs)).argmax(1).numpy()
    np.testing.assert_array_equal(ps.labels, expect)
    assert ps.label_source == "pseudo" and ps.to_json()["label_source"] == "pseudo"
    assert ps.class_names[0] == "T-shirt/top"
    # a plain callable works the same and the original set is unchanged
    ps2 = pseudo_label(unlabelled, lambda a: model(torch.from_numpy(a)))
    np.testing.assert_array_equal(ps2.labels, expect)
    assert ps2.class_names == [str(i) for i in range(10)] and unlabelled.labels is None
    with pytest.raises(CalibrationError, match="expected N x classes"):
        pseudo_label(unlabelled, lambda a: np.zeros(len(a)))
    logits = np.array([[3.0, 2.0, 1.0], [0.0, 1.0, 2.0]])
    other = np.array([[2.0, 3.0, 1.0], [0.0, 1.0, 2.0]])
    assert agreement(logits, other, 1) == 0.5 and agreement(logits, other, 2) == 1.0
