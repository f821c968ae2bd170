"""Loaders: every supported data source becomes a `CalibrationSet`.

Sources: the Fashion-MNIST Debian package, IDX files (MNIST format), scikit-learn digits, an image
folder (one sub-folder per class, or unlabelled images directly in it), .npz/.npy arrays (never unpickled) and any torch Dataset.
`load_data(spec)` picks the loader from a name or a path.
"""

from __future__ import annotations

import gzip
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from calibration.data import CalibrationSet, Preprocessing
from calibration.errors import CalibrationError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
# The whole training set's per-pixel statistics (of x / 255), the usual Fashion-MNIST constants.
FASHION_MNIST_PREPROCESSING = Preprocessing(
    mean=(0.2860,), std=(0.3530,), scale=1 / 255, channels=1
)
IMAGE_EXTENSIONS = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
)

# IDX type codes (third byte of the magic number) -> numpy dtype (big-endian as stored).
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_maybe_gz(path: Path) -> bytes:
    if not path.is_file():
        raise CalibrationError(f"data file not found: {path}")
    with open(path, "rb") as fh:
        head = fh.read(2)
    try:
        if head == b"\x1f\x8b":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (OSError, EOFError) as exc:
        raise CalibrationError(f"cannot read {path}: {exc} (corrupt or truncated file?)") from exc


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse one IDX file (gzip or raw): magic 0x0000TTDD, D big-endian uint32 dims, then data."""
    path = Path(path)
    raw = _read_maybe_gz(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise CalibrationError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    if ndim < 1 or len(raw) < 4 + 4 * ndim:
        raise CalibrationError(f"{path}: IDX header truncated or has {ndim} dimensions")
    dims = tuple(int(v) for v in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[raw[2]]
    expected = int(np.prod(dims)) * dtype.itemsize
    body = len(raw) - 4 - 4 * ndim
    if body != expected:
        raise CalibrationError(
            f"{path}: IDX header says {dims} ({expected} bytes) but the file holds {body} data bytes"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim).reshape(dims)
    return data.astype(dtype.newbyteorder("="))


def load_idx(
    images: str | os.PathLike,
    labels: str | os.PathLike | None = None,
    *,
    class_names: Sequence[str] | None = None,
    preprocessing: Preprocessing | None = None,
    source: str | None = None,
) -> CalibrationSet:
    """Load IDX images (N x H x W) and optional IDX labels (N) as a 1-channel NCHW set."""
    x = read_idx(images)
    if x.ndim not in (3, 4):
        raise CalibrationError(
            f"{images}: IDX images must be N x H x W (or N x H x W x C), got {x.shape}"
        )
    y = None
    if labels is not None:
        y = read_idx(labels)
        if y.ndim != 1:
            raise CalibrationError(f"{labels}: IDX labels must be one-dimensional, got {y.shape}")
        if len(y) != len(x):
            raise CalibrationError(
                f"{images} holds {len(x)} images but {labels} holds {len(y)} labels"
            )
    pre = preprocessing or Preprocessing(scale=1 / 255 if x.dtype == np.uint8 else 1.0)
    return CalibrationSet(
        inputs=pre.apply(x),
        labels=y,
        class_names=list(class_names or []),
        preprocessing=pre,
        source=source or f"idx:{images}",
    )


def load_fashion_mnist(
    split: str = "train", *, root: str | os.PathLike | None = None
) -> CalibrationSet:
    """Fashion-MNIST from the Debian package `dataset-fashion-mnist` (60,000 train / 10,000 test)."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise CalibrationError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    base = Path(root) if root is not None else FASHION_MNIST_DIR
    images = base / f"{prefix}-images-idx3-ubyte.gz"
    labels = base / f"{prefix}-labels-idx1-ubyte.gz"
    missing = [str(p) for p in (images, labels) if not p.is_file()]
    if missing:
        raise CalibrationError(
            f"Fashion-MNIST not found ({missing[0]}); install it: `apt install dataset-fashion-mnist` (or `make setup`)"
        )
    return load_idx(
        images,
        labels,
        class_names=FASHION_MNIST_CLASSES,
        preprocessing=FASHION_MNIST_PREPROCESSING,
        source=f"fashion-mnist:{split}",
    )


def load_digits(*, flat: bool = False) -> CalibrationSet:
    """scikit-learn's bundled 8x8 digits (1,797 samples, values 0..16 scaled to 0..1).

    `flat=True` gives N x 64 features (for an MLP); otherwise N x 1 x 8 x 8 images.
    """
    try:
        from sklearn.datasets import load_digits as _sk_digits
    except ImportError as exc:
        raise CalibrationError(
            "the 'digits' data needs scikit-learn: pip install 'fair-edge[data]'"
        ) from exc

    d = _sk_digits()
    pre = Preprocessing(scale=1 / 16, channels=None if flat else 1)
    x = d.images.astype(np.float32)
    inputs = pre.normalise(x.reshape(len(x), -1), None) if flat else pre.apply(x)
    return CalibrationSet(
        inputs=inputs,
        labels=d.target.astype(np.int64),
        class_names=[str(c) for c in d.target_names],
        preprocessing=pre,
        source="digits" + (":flat" if flat else ""),
    )


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB") if im.mode not in ("L", "RGB") else im
            return np.asarray(im)
    except (UnidentifiedImageError, OSError) as exc:
        raise CalibrationError(f"cannot read image {path}: {exc}") from exc


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def read_labels_file(path: str | os.PathLike) -> list[str]:
    """Class names, one per line in the model's output order (blank lines and # comments skipped)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise CalibrationError(f"labels file {str(p)!r} does not exist") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"cannot read labels file {str(p)!r}: {exc}") from exc
    names = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    if not names:
        raise CalibrationError(f"labels file {str(p)!r} lists no class; write one name per line")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise CalibrationError(f"labels file {str(p)!r} lists {dup[0]!r} twice; one line per class")
    return names


def load_image_folder(
    path: str | os.PathLike,
    size: int | tuple[int, int] | None = None,
    *,
    mean: Sequence[float] = (0.0,),
    std: Sequence[float] = (1.0,),
    channels: int | None = 3,
    layout: str = "NCHW",
    resize_mode: str = "stretch",
    max_per_class: int | None = None,
    preprocessing: Preprocessing | None = None,
    classes: Sequence[str] | None = None,
) -> CalibrationSet:
    """Images under `path/<class>/*.png|jpg...`, or directly under `path` (then unlabelled).

    Class index = position in `classes` (a labels file or the model's own class list: the
    model's output order) when given, else sorted sub-folder name order; every sub-folder must be
    one of `classes`, while classes without a folder are allowed. Pixels are scaled to 0..1, then
    normalised with `mean`/`std`. `size` (int or (h, w)) resizes by `resize_mode`; without it all
    images must share a size. `max_per_class` takes the first files (sorted).
    """
    root = Path(path)
    if not root.is_dir():
        raise CalibrationError(f"image folder not found: {root}")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if preprocessing is None:
        resize = (size, size) if isinstance(size, int) else size
        preprocessing = Preprocessing(
            resize=resize,
            mean=tuple(mean),
            std=tuple(std),
            scale=1 / 255,
            layout=layout,
            channels=channels,
            resize_mode=resize_mode,
        )
    names = list(classes) if classes is not None else folders
    if not folders:
        files = _image_files(root)
        if not files:
            raise CalibrationError(
                f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}; put them there, "
                "or each class's images in its own sub-folder"
            )
        images = [_read_image(f) for f in files[:max_per_class]]
        return CalibrationSet(
            inputs=preprocessing.apply(images),
            class_names=names,
            preprocessing=preprocessing,
            source=f"folder:{root} (unlabelled)",
        )
    unknown = [f for f in folders if f not in names]
    if unknown:
        raise CalibrationError(
            f"class folder {unknown[0]!r} under {root} is not in the class list "
            f"({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}); rename the folder or "
            "fix the labels file"
        )
    images: list[np.ndarray] = []
    labels: list[int] = []
    empty = []
    for name in folders:
        files = _image_files(root / name)
        if max_per_class is not None:
            files = files[:max_per_class]
        if not files:
            empty.append(name)
        for f in files:
            images.append(_read_image(f))
            labels.append(names.index(name))
    if not images:
        raise CalibrationError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    if empty:
        raise CalibrationError(f"class folder(s) without images under {root}: {', '.join(empty)}")
    return CalibrationSet(
        inputs=preprocessing.apply(images),
        labels=np.asarray(labels, dtype=np.int64),
        class_names=names,
        preprocessing=preprocessing,
        source=f"folder:{root}",
    )


_X_KEYS = ("x", "images", "inputs", "data", "X")
_Y_KEYS = ("y", "labels", "targets", "Y")


def load_arrays(
    path: str | os.PathLike,
    *,
    class_names: Sequence[str] | None = None,
    preprocessing: Preprocessing | None = None,
) -> CalibrationSet:
    """Arrays from .npz (keys x/y or images/labels) or .npy (inputs only), never unpickled.

    Inputs are taken as already preprocessed unless `preprocessing` is given (then it is applied
    to N x H x W (x C) images, or its scale/mean/std to N x F features). uint8 inputs without
    preprocessing are scaled by 1/255.
    """
    p = Path(path)
    if not p.is_file():
        raise CalibrationError(f"array file not found: {p}")
    try:
        loaded = np.load(p, allow_pickle=False)
    except ValueError as exc:
        raise CalibrationError(
            f"{p} holds pickled Python objects, which fair-edge never loads; save plain numeric arrays"
        ) from exc
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise CalibrationError(f"cannot read {p} as .npy/.npz: {exc}") from exc
    y = None
    try:
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                keys = set(loaded.files)
                xk = next((k for k in _X_KEYS if k in keys), None)
                if xk is None:
                    raise CalibrationError(
                        f"{p} has keys {sorted(keys)}; expected inputs under one of {', '.join(_X_KEYS)}"
                    )
                yk = next((k for k in _Y_KEYS if k in keys), None)
                x = loaded[xk]
                y = loaded[yk] if yk is not None else None
        else:
            x = loaded
    except ValueError as exc:
        raise CalibrationError(
            f"{p} holds pickled Python objects, which fair-edge never loads; save plain numeric arrays"
        ) from exc
    if x.dtype == object:
        raise CalibrationError(f"{p} inputs are Python objects; save plain numeric arrays")
    if preprocessing is not None:
        inputs = preprocessing.apply(x) if x.ndim in (3, 4) else preprocessing.normalise(x, None)
        pre = preprocessing
    elif x.dtype == np.uint8:
        pre = Preprocessing(scale=1 / 255)
        inputs = pre.normalise(x, None)
    else:
        pre = Preprocessing()
        inputs = x
    return CalibrationSet(
        inputs=inputs,
        labels=y,
        class_names=list(class_names or []),
        preprocessing=pre,
        source=f"arrays:{p}",
    )


def from_torch_dataset(
    ds: Any,
    *,
    class_names: Sequence[str] | None = None,
    limit: int | None = None,
    preprocessing: Preprocessing | None = None,
    source: str | None = None,
) -> CalibrationSet:
    """Materialise a torch Dataset yielding (input tensor, int label) pairs (already transformed)."""
    import torch

    try:
        n = len(ds)
    except TypeError as exc:
        raise CalibrationError("the dataset has no length; pass a map-style torch Dataset") from exc
    if limit is not None:
        n = min(n, limit)
    xs, ys = [], []
    for i in range(n):
        item = ds[i]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise CalibrationError(f"dataset item {i} is not an (input, label) pair")
        x, y = item[0], item[1]
        xs.append(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x))
        ys.append(int(y))
    if not xs:
        raise CalibrationError("the torch dataset is empty")
    try:
        inputs = np.stack(xs).astype(np.float32)
    except ValueError as exc:
        raise CalibrationError(f"dataset inputs differ in shape: {exc}") from exc
    names = class_names or getattr(ds, "classes", None) or []
    return CalibrationSet(
        inputs=inputs,
        labels=np.asarray(ys, dtype=np.int64),
        class_names=list(names),
        preprocessing=preprocessing or Preprocessing(),
        source=source or f"torch:{type(ds).__name__}",
    )


def load_data(spec: str | os.PathLike, **kwargs: Any) -> CalibrationSet:
    """Pick a loader from a name ('fashion-mnist', 'fashion-mnist:test', 'digits') or a path.

    Paths: a folder of class sub-folders, a .npz/.npy file, or an IDX images file (its labels file
    is found by replacing 'images-idx3' with 'labels-idx1' in the name).
    """
    s = str(spec)
    name, _, arg = s.partition(":")
    if name in ("fashion-mnist", "fashion_mnist", "fmnist"):
        return load_fashion_mnist(arg or "train", **kwargs)
    if name == "digits":
        return load_digits(flat=arg == "flat", **kwargs)
    p = Path(s)
    if p.is_dir():
        return load_image_folder(p, **kwargs)
    if p.suffix.lower() in (".npz", ".npy"):
        return load_arrays(p, **kwargs)
    if "idx" in p.name and p.is_file():
        lab = p.with_name(p.name.replace("images-idx3", "labels-idx1"))
        return load_idx(p, lab if lab != p and lab.is_file() else None, **kwargs)
    if not p.exists():
        raise CalibrationError(
            f"no data at {s!r}: give 'fashion-mnist', 'digits', a class-folder path, a .npz/.npy or an IDX file"
        )
    raise CalibrationError(
        f"cannot tell the format of {s!r}; use a class folder, .npz/.npy or an IDX file"
    )
