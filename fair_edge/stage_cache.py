"""Cache of pipeline stages keyed by the content hash of what they depend on.

Scoring is the slow stage; its inputs are the model's weights, the calibration data and the
scoring options. Keying on their content (not on file names or timestamps) means a re-run of
`deploy` with another ToD level or device finds the scores already computed, and any change to
the weights or data computes them afresh. Entries are folders written with atomic_directory,
so an interrupted run never leaves an entry that looks complete.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from calibration.fileio import atomic_directory, cache_dir


def _update_array(h: Any, arr: np.ndarray) -> None:
    arr = np.ascontiguousarray(arr)
    h.update(f"{arr.dtype.str}:{arr.shape};".encode())
    h.update(arr.tobytes())


def hash_model(model: nn.Module) -> str:
    """SHA-256 of every parameter and buffer (name, dtype, shape, bytes) and the class name."""
    h = hashlib.sha256(type(model).__qualname__.encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        t = tensor.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()
        _update_array(h, t.numpy())
    return h.hexdigest()


def hash_arrays(*arrays: np.ndarray | None) -> str:
    h = hashlib.sha256()
    for arr in arrays:
        if arr is None:
            h.update(b"none;")
        else:
            _update_array(h, np.asarray(arr))
    return h.hexdigest()


def hash_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class StageCache:
    """Folders under `root/<stage>/<key>/`; disabled means every lookup misses and nothing is kept."""

    root: Path
    enabled: bool = True

    @classmethod
    def default(cls, enabled: bool = True) -> StageCache:
        return cls(cache_dir("stages"), enabled)

    @staticmethod
    def key(*parts: Any) -> str:
        """One key from several content hashes and option dicts."""
        return hash_json(list(parts))

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def lookup(self, stage: str, key: str) -> Path | None:
        path = self.path(stage, key)
        if self.enabled and (path / "stage.json").is_file():
            return path
        return None

    def fetch(
        self, stage: str, key: str, compute: Callable[[Path], dict[str, Any] | None]
    ) -> tuple[Path, bool]:
        """Return (folder, hit). On a miss `compute(folder)` writes the stage's files into a temp
        folder that becomes the entry only when it returns."""
        found = self.lookup(stage, key)
        if found is not None:
            return found, True
        path = self.path(stage, key)
        with atomic_directory(path) as tmp:
            meta = compute(tmp) or {}
            (tmp / "stage.json").write_text(
                json.dumps({"stage": stage, "key": key, **meta}, indent=1, default=str) + "\n"
            )
        return path, False
