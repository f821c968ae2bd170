"""Where U's projected samples wait for the W1 step: in memory, or in files on disk.

Scoring writes, per candidate layer, one rows x units x Q float32 block per batch (rows = this
process's samples, in the order it scored them) and reads it back in chunks of whole units over
all rows, which is all W1 needs (every unit's classes are compared on their own). Both stores
keep the exact float32 values, so U does not depend on which one was used.

MemoryStore: one tensor per layer on the scoring device (fast; the budget decides when it fits).
DiskStore: one anonymous temporary file per layer (tempfile.TemporaryFile: unlinked as soon as
it is created, so the system frees it when the store closes or the process ends, killed or
not), laid out chunk by chunk (chunk j holds units [j*u, (j+1)*u) for all rows), so a batch is a
few positioned writes and a chunk one contiguous read; plain file I/O (no mmap), so the page
cache never counts as the process's resident memory.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import IO

import numpy as np
import torch

FLOAT_BYTES = 4
ChunkUnits = Callable[[int, int], int]  # (units, Q) -> units per chunk


class UStore:
    """rows x units x Q float32 per layer; written by row blocks, read by unit chunks."""

    kind = ""

    def __init__(self, rows: int, chunk_units: ChunkUnits) -> None:
        self.rows = rows
        self._chunk_units = chunk_units
        self.shapes: dict[str, tuple[int, int, int]] = {}  # name -> (units, Q, units per chunk)

    def _shape(self, name: str, block: torch.Tensor) -> tuple[int, int, int]:
        if name not in self.shapes:
            c, q = int(block.shape[1]), int(block.shape[2])
            self.shapes[name] = (c, q, max(1, min(c, int(self._chunk_units(c, q)))))
            self._allocate(name, c, q)
        return self.shapes[name]

    def chunks(self, name: str) -> list[tuple[int, int]]:
        """The unit ranges read() accepts, in order; every process with the same chunk_units
        and shapes gets the same ranges."""
        c, _, u = self.shapes[name]
        return [(s, min(c, s + u)) for s in range(0, c, u)]

    def write(self, name: str, offset: int, block: torch.Tensor) -> None:
        raise NotImplementedError

    def read(self, name: str, c0: int, c1: int) -> torch.Tensor:
        raise NotImplementedError

    def drop(self, name: str) -> None:
        """Forget a layer once its U is computed."""

    def close(self) -> None:
        """Free everything (idempotent)."""

    def _allocate(self, name: str, units: int, q: int) -> None:
        raise NotImplementedError


class MemoryStore(UStore):
    """One tensor per layer on `device`."""

    kind = "memory"

    def __init__(self, rows: int, chunk_units: ChunkUnits, device: torch.device) -> None:
        super().__init__(rows, chunk_units)
        self.device = device
        self._data: dict[str, torch.Tensor] = {}

    def _allocate(self, name: str, units: int, q: int) -> None:
        self._data[name] = torch.empty((self.rows, units, q), device=self.device)

    def write(self, name: str, offset: int, block: torch.Tensor) -> None:
        self._shape(name, block)
        self._data[name][offset : offset + block.shape[0]] = block

    def read(self, name: str, c0: int, c1: int) -> torch.Tensor:
        return self._data[name][:, c0:c1]

    def drop(self, name: str) -> None:
        self._data.pop(name, None)

    def close(self) -> None:
        self._data.clear()


class DiskStore(UStore):
    """One anonymous file per layer under `parent` (default: the system's temporary folder)."""

    kind = "disk"

    def __init__(self, rows: int, chunk_units: ChunkUnits, parent: str | None = None) -> None:
        super().__init__(rows, chunk_units)
        self.parent = parent
        self._files: dict[str, IO[bytes]] = {}
        self._fds: dict[str, int] = {}

    def _allocate(self, name: str, units: int, q: int) -> None:
        f = tempfile.TemporaryFile(prefix="fair-edge-u-", dir=self.parent)  # noqa: SIM115 (closed in drop)
        os.ftruncate(f.fileno(), self.rows * units * q * FLOAT_BYTES)
        self._files[name], self._fds[name] = f, f.fileno()

    def _base(self, name: str, c0: int) -> int:
        q = self.shapes[name][1]
        return self.rows * c0 * q * FLOAT_BYTES  # chunk c0 // u starts after c0 units of all rows

    def write(self, name: str, offset: int, block: torch.Tensor) -> None:
        _, q, _ = self._shape(name, block)
        fd = self._fds[name]
        b = block.detach().to(device="cpu", dtype=torch.float32)
        for c0, c1 in self.chunks(name):
            piece = np.ascontiguousarray(b[:, c0:c1].numpy())
            pos = self._base(name, c0) + offset * (c1 - c0) * q * FLOAT_BYTES
            _pwrite_all(fd, memoryview(piece).cast("B"), pos)

    def read(self, name: str, c0: int, c1: int) -> torch.Tensor:
        _, q, _ = self.shapes[name]
        out = np.empty((self.rows, c1 - c0, q), dtype=np.float32)
        _pread_all(self._fds[name], memoryview(out).cast("B"), self._base(name, c0))
        return torch.from_numpy(out)

    def drop(self, name: str) -> None:
        self._fds.pop(name, None)
        f = self._files.pop(name, None)
        if f is not None:
            f.close()

    def close(self) -> None:
        for name in list(self._files):
            self.drop(name)


def _pwrite_all(fd: int, buf: memoryview, pos: int) -> None:
    while len(buf):
        k = os.pwrite(fd, buf, pos)
        buf, pos = buf[k:], pos + k


def _pread_all(fd: int, buf: memoryview, pos: int) -> None:
    while len(buf):
        k = os.preadv(fd, [buf], pos)
        if k == 0:
            raise OSError(f"U store file ended early at byte {pos}")
        buf, pos = buf[k:], pos + k
