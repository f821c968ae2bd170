"""Targets of dense tasks, stored next to the inputs in one .npz (never unpickled).

Segmentation: 'masks', N x H x W integer class maps (255 = ignore). Detection: 'boxes',
N x M x 4 (x1, y1, x2, y2 in input pixels) and 'box_labels', N x M classes >= 1, rows with label
-1 being padding (images with fewer than M boxes). Both optional: segmentation without masks
falls back to the unpruned model's per-pixel argmax.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from calibration.errors import CalibrationError


def load_dense_targets(
    spec: str | os.PathLike | None, task: str, n: int, hw: tuple[int, int]
) -> np.ndarray | list[dict[str, np.ndarray]] | None:
    """The task's targets for the `n` samples of `spec` (None when `spec` holds none)."""
    if spec is None or Path(spec).suffix.lower() != ".npz" or not Path(spec).is_file():
        return None
    try:
        with np.load(spec, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files if k in ("masks", "boxes", "box_labels")}
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise CalibrationError(f"cannot read targets from {spec}: {exc}") from exc
    if task == "segmentation":
        return _masks(arrays.get("masks"), n, hw, spec)
    if task == "detection":
        return _boxes(arrays.get("boxes"), arrays.get("box_labels"), n, spec)
    return None


def _masks(m: Any, n: int, hw: tuple[int, int], spec: Any) -> np.ndarray | None:
    if m is None:
        return None
    if m.ndim != 3 or len(m) != n or tuple(m.shape[1:]) != tuple(hw):
        raise CalibrationError(
            f"{spec}: 'masks' must be N x H x W = {[n, *hw]} (one class map per input), got "
            f"{list(m.shape)}; resize the masks with the images"
        )
    if not np.issubdtype(m.dtype, np.integer) or int(m.min()) < 0:
        raise CalibrationError(f"{spec}: 'masks' must hold class indices >= 0 (255 = ignore)")
    return m.astype(np.int64)


def _boxes(b: Any, lab: Any, n: int, spec: Any) -> list[dict[str, np.ndarray]] | None:
    if b is None and lab is None:
        return None
    if b is None or lab is None:
        raise CalibrationError(f"{spec}: detection targets need both 'boxes' and 'box_labels'")
    if b.ndim != 3 or b.shape[-1] != 4 or len(b) != n or lab.shape != b.shape[:2]:
        raise CalibrationError(
            f"{spec}: 'boxes' must be N x M x 4 and 'box_labels' N x M with N={n}, got "
            f"{list(b.shape)} and {list(lab.shape)}"
        )
    if not np.issubdtype(lab.dtype, np.integer) or not np.isfinite(b).all():
        raise CalibrationError(f"{spec}: 'box_labels' must be integers and 'boxes' finite")
    out = []
    for i in range(n):
        keep = lab[i] >= 0
        out.append(
            {"boxes": b[i][keep].astype(np.float64), "labels": lab[i][keep].astype(np.int64)}
        )
    return out
