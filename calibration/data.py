"""The calibration set: preprocessed samples, their labels, and how they were preprocessed.

Every loader returns a `CalibrationSet`; scoring, int8 calibration and accuracy checks all read
the same one, so the preprocessing is declared once (`Preprocessing`) and recorded in the
bundle's manifest through `to_json()`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from calibration.errors import CalibrationError
from calibration.presets import RESIZE_MODES

LAYOUTS = ("NCHW", "NHWC")
LABEL_SOURCES = ("given", "pseudo", "none")


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How raw images become model inputs: x = ((resize(img) * scale) - mean) / std, in `layout`.

    `resize` is (height, width) or None, reached by `resize_mode` (see RESIZE_MODES); `mean`/`std` are per channel (or one value for all);
    `channels` is 1 (grayscale) or 3 (RGB) or None (keep what the images have); `layout` is the
    memory layout of the model's input. Non-image data (N x F arrays) uses only scale/mean/std.
    """

    resize: tuple[int, int] | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    scale: float = 1.0
    layout: str = "NCHW"
    channels: int | None = None
    resize_mode: str = "stretch"

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise CalibrationError(
                f"preprocessing resize mode {self.resize_mode!r} is not one of {', '.join(RESIZE_MODES)}"
            )
        if self.layout not in LAYOUTS:
            raise CalibrationError(
                f"preprocessing layout {self.layout!r} is not one of {', '.join(LAYOUTS)}"
            )
        if self.resize is not None:
            object.__setattr__(self, "resize", tuple(int(v) for v in self.resize))
            if len(self.resize) != 2 or min(self.resize) < 1:
                raise CalibrationError(
                    f"preprocessing resize must be (height, width) of positive ints, got {self.resize}"
                )
        object.__setattr__(self, "mean", tuple(float(v) for v in np.atleast_1d(self.mean)))
        object.__setattr__(self, "std", tuple(float(v) for v in np.atleast_1d(self.std)))
        if not self.mean or not self.std:
            raise CalibrationError("preprocessing mean and std need at least one value each")
        if any(s <= 0 or not np.isfinite(s) for s in self.std):
            raise CalibrationError(f"preprocessing std must be positive, got {self.std}")
        if not np.isfinite(self.scale) or self.scale == 0:
            raise CalibrationError(
                f"preprocessing scale must be finite and non-zero, got {self.scale}"
            )
        if self.channels not in (None, 1, 3):
            raise CalibrationError(
                f"preprocessing channels must be 1, 3 or None, got {self.channels}"
            )

    def normalise(self, x: np.ndarray, channel_axis: int | None) -> np.ndarray:
        """Apply scale, mean and std to float data whose channel axis is `channel_axis` (None: flat)."""
        x = np.asarray(x)
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        if mean.size > 1 or std.size > 1:
            if channel_axis is None:
                raise CalibrationError(
                    "per-channel mean/std need image data with a channel axis; give one value each"
                )
            n = x.shape[channel_axis]
            for name, v in (("mean", mean), ("std", std)):
                if v.size not in (1, n):
                    raise CalibrationError(
                        f"preprocessing {name} has {v.size} values but the images have {n} channels"
                    )
            shape = [1] * x.ndim
            shape[channel_axis] = -1
            mean = mean.reshape(shape) if mean.size > 1 else mean
            std = std.reshape(shape) if std.size > 1 else std
        # One affine pass: (x * scale - mean) / std == x * (scale / std) + (-mean / std).
        out = np.multiply(x, (np.float32(self.scale) / std).astype(np.float32), dtype=np.float32)
        out += (-mean / std).astype(np.float32)
        return out

    def apply(self, images: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        """Preprocess HxW or HxWxC images (any size, uint8 or float) into one float32 batch.

        A stacked N x H x W (x C) array is processed in one vectorised step.
        """
        if isinstance(images, np.ndarray) and images.ndim in (3, 4):
            if images.shape[0] == 0:
                raise CalibrationError("no images to preprocess")
            batch = images[..., None] if images.ndim == 3 else images
            batch = self._fix_channels(batch)
            if self.resize is not None and batch.shape[1:3] != self.resize:
                batch = np.stack([self._resize(a) for a in batch])
        else:
            out = []
            for img in images:
                a = np.asarray(img)
                if a.ndim == 2:
                    a = a[:, :, None]
                if a.ndim != 3:
                    raise CalibrationError(f"an image must be HxW or HxWxC, got shape {a.shape}")
                a = self._fix_channels(a[None])[0]
                if self.resize is not None and a.shape[:2] != self.resize:
                    a = self._resize(a)
                out.append(a)
            if not out:
                raise CalibrationError("no images to preprocess")
            shapes = {a.shape for a in out}
            if len(shapes) > 1:
                raise CalibrationError(
                    f"images differ in size/channels {sorted(shapes)}; set preprocessing resize and channels"
                )
            batch = np.stack(out)  # N H W C
        if self.layout == "NCHW":
            batch = np.ascontiguousarray(batch.transpose(0, 3, 1, 2))
        return self.normalise(batch, 1 if self.layout == "NCHW" else 3)

    def _fix_channels(self, batch: np.ndarray) -> np.ndarray:
        """N x H x W x C: drop alpha, convert to the declared channel count."""
        if batch.shape[3] == 4:
            batch = batch[..., :3]
        if batch.shape[3] not in (1, 3):
            raise CalibrationError(f"images must have 1, 3 or 4 channels, got {batch.shape[3]}")
        if self.channels == 1 and batch.shape[3] == 3:
            gray = np.array([0.299, 0.587, 0.114], np.float32)
            batch = (batch.astype(np.float32) @ gray)[..., None]
        elif self.channels == 3 and batch.shape[3] == 1:
            batch = np.repeat(batch, 3, axis=3)
        return batch

    def _resize(self, a: np.ndarray) -> np.ndarray:
        """One H x W x C image to `resize` by `resize_mode` (bilinear, per channel in float)."""
        h, w = self.resize
        ih, iw = a.shape[:2]
        if self.resize_mode == "stretch":
            return _bilinear(a, h, w)
        if self.resize_mode == "shorter-side":
            s = max(h / ih, w / iw)
            sh, sw = max(h, round(ih * s)), max(w, round(iw * s))
            a = _bilinear(a, sh, sw) if (sh, sw) != (ih, iw) else a
            ih, iw = sh, sw
        elif ih < h or iw < w:
            raise CalibrationError(
                f"an image of {ih}x{iw} is smaller than the {h}x{w} centre crop; use resize mode "
                "'shorter-side' or 'stretch', or a smaller image size"
            )
        top, left = (ih - h) // 2, (iw - w) // 2
        return a[top : top + h, left : left + w]

    def steps(self) -> list[str]:
        """The preprocessing as steps a board application can repeat (the manifest carries them)."""
        chans = {None: "as stored", 1: "grayscale (0.299 R + 0.587 G + 0.114 B)", 3: "RGB"}
        out = [f"read the image as {chans[self.channels]}, alpha dropped"]
        if self.resize is not None:
            h, w = self.resize
            out.append(
                {
                    "stretch": f"resize to {h}x{w} (bilinear, aspect ratio not kept)",
                    "shorter-side": f"scale (bilinear) to cover {h}x{w} keeping the aspect ratio, "
                    f"then crop the centre {h}x{w}",
                    "center-crop": f"crop the centre {h}x{w} (no scaling)",
                }[self.resize_mode]
            )
        out.append(f"x = (pixel * {self.scale:.8g} - mean) / std with mean {list(self.mean)}, "
                   f"std {list(self.std)} per channel")  # fmt: skip
        out.append(f"float32 in {self.layout} layout, batch first")
        return out

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["resize"] = list(self.resize) if self.resize is not None else None
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Preprocessing:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise CalibrationError(f"unknown preprocessing keys: {', '.join(sorted(unknown))}")
        d = dict(d)
        if d.get("resize") is not None:
            d["resize"] = tuple(d["resize"])
        for k in ("mean", "std"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


def _bilinear(a: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear resize of one H x W x C image to h x w, per channel in float (PIL mode F)."""
    from PIL import Image

    chans = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(a[:, :, c], dtype=np.float32), mode="F").resize(
                (w, h), Image.BILINEAR
            )
        )
        for c in range(a.shape[2])
    ]
    return np.stack(chans, axis=2)


@dataclasses.dataclass
class CalibrationSet:
    """Preprocessed samples (float32, N x C x H x W, N x H x W x C or N x F) with optional labels.

    `label_source` says where labels came from: 'given' (the data's own), 'pseudo' (the unpruned
    model's top-1, see `calibration.pseudo_labels`) or 'none' (unlabelled); reports state it.
    """

    inputs: np.ndarray
    labels: np.ndarray | None = None
    class_names: list[str] = dataclasses.field(default_factory=list)
    preprocessing: Preprocessing = dataclasses.field(default_factory=Preprocessing)
    source: str = ""
    label_source: str = ""

    def __post_init__(self) -> None:
        x = self.inputs
        if not isinstance(x, np.ndarray):
            x = np.asarray(x)
        if x.dtype == object or not (
            np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)
        ):
            raise CalibrationError(f"calibration inputs must be numeric, got dtype {x.dtype}")
        if x.ndim < 2:
            raise CalibrationError(
                f"calibration inputs need a sample axis and features (N x F or N x C x H x W), got shape {x.shape}"
            )
        if x.shape[0] == 0:
            raise CalibrationError(f"calibration set from {self.source or 'input'} is empty")
        x = np.ascontiguousarray(x, dtype=np.float32)
        bad = ~np.isfinite(x)
        if bad.any():
            rows = np.unique(np.nonzero(bad.reshape(len(x), -1))[0])
            raise CalibrationError(
                f"calibration inputs contain NaN/inf in {len(rows)} sample(s) (first: #{rows[0]}); clean or drop them"
            )
        self.inputs = x
        if self.labels is not None:
            y = np.asarray(self.labels)
            if y.ndim != 1 or len(y) != len(x):
                raise CalibrationError(
                    f"labels must be one per sample: {len(x)} samples but labels of shape {y.shape}"
                )
            if np.issubdtype(y.dtype, np.floating):
                if not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
                    raise CalibrationError(
                        "labels must be whole class indices, got non-integer values"
                    )
            elif not np.issubdtype(y.dtype, np.integer):
                raise CalibrationError(f"labels must be integer class indices, got dtype {y.dtype}")
            y = y.astype(np.int64)
            if y.min() < 0:
                raise CalibrationError(f"labels must be >= 0, found {int(y.min())}")
            if not self.class_names:
                self.class_names = [str(i) for i in range(int(y.max()) + 1)]
            if y.max() >= len(self.class_names):
                raise CalibrationError(
                    f"label {int(y.max())} is out of range for {len(self.class_names)} classes"
                )
            self.labels = y
        self.class_names = [str(c) for c in self.class_names]
        if not self.label_source:
            self.label_source = "given" if self.labels is not None else "none"
        if self.label_source not in LABEL_SOURCES:
            raise CalibrationError(
                f"label_source {self.label_source!r} is not one of {', '.join(LABEL_SOURCES)}"
            )
        if (self.labels is None) != (self.label_source == "none"):
            raise CalibrationError(
                f"label_source {self.label_source!r} does not match labels {'absent' if self.labels is None else 'present'}"
            )

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one input sample (e.g. (1, 28, 28))."""
        return tuple(int(v) for v in self.inputs.shape[1:])

    def class_counts(self) -> dict[str, int]:
        """Samples per class name (empty when unlabelled)."""
        if self.labels is None:
            return {}
        counts = np.bincount(self.labels, minlength=self.num_classes)
        return {name: int(c) for name, c in zip(self.class_names, counts, strict=True)}

    def require_labels(self) -> np.ndarray:
        if self.labels is None:
            raise CalibrationError(
                f"calibration set from {self.source or 'input'} has no labels; give labelled data or use label-free mode (pseudo labels)"
            )
        return self.labels

    def batches(
        self, batch_size: int = 64, *, shuffle: bool = False, seed: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (inputs, labels) tensor batches; the last batch may be smaller."""
        labels = self.require_labels()
        if batch_size < 1:
            raise CalibrationError(f"batch_size must be >= 1, got {batch_size}")
        order = (
            np.random.default_rng(seed).permutation(len(self)) if shuffle else np.arange(len(self))
        )
        for i in range(0, len(self), batch_size):
            idx = order[i : i + batch_size]
            yield torch.from_numpy(self.inputs[idx]), torch.from_numpy(labels[idx])

    def as_numpy_batches(self, batch_size: int = 1) -> Iterator[np.ndarray]:
        """Yield float32 input batches only (labels not needed), e.g. for int8 calibration readers.

        These are the same samples (and the same preprocessing) that scoring used.
        """
        if batch_size < 1:
            raise CalibrationError(f"batch_size must be >= 1, got {batch_size}")
        for i in range(0, len(self), batch_size):
            yield self.inputs[i : i + batch_size]

    def as_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All samples as one (X, Y) pair of tensors."""
        return torch.from_numpy(self.inputs), torch.from_numpy(self.require_labels())

    def subset(self, idx: Sequence[int] | np.ndarray) -> CalibrationSet:
        """A new set holding the samples at `idx` (indices or a boolean mask), same metadata."""
        idx = np.asarray(idx)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise CalibrationError(f"boolean mask of shape {idx.shape} for {len(self)} samples")
            idx = np.nonzero(idx)[0]
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise CalibrationError(f"subset index out of range for {len(self)} samples")
        return dataclasses.replace(
            self,
            inputs=self.inputs[idx],
            labels=None if self.labels is None else self.labels[idx],
            class_names=list(self.class_names),
        )

    def with_labels(
        self, labels: np.ndarray, label_source: str, class_names: Sequence[str] | None = None
    ) -> CalibrationSet:
        """The same samples with new labels (e.g. pseudo labels), everything else kept."""
        names = list(class_names) if class_names is not None else list(self.class_names)
        return dataclasses.replace(
            self, labels=labels, label_source=label_source, class_names=names
        )

    def to_json(self) -> dict[str, Any]:
        """Metadata only (no sample values): what the bundle manifest and reports record."""
        return {
            "source": self.source,
            "num_samples": len(self),
            "sample_shape": list(self.sample_shape),
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "class_counts": self.class_counts(),
            "label_source": self.label_source,
            "preprocessing": self.preprocessing.to_json(),
        }
