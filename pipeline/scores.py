"""FAIR scores of one model: per-unit Utilization (U) and Reconstruction (R) for every layer.

Scores are computed once (pipeline.scoring.score) and re-planned many times (pipeline.planning),
so they are saved to a single .npz file: one float64 array per layer and score, plus a JSON
metadata string stored as bytes. Loading never unpickles (np.load(allow_pickle=False)).
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from calibration.errors import FairEdgeError
from calibration.fileio import atomic_write_bytes
from pipeline.plan import ModelFingerprint

SCORES_SCHEMA = "fair-edge/scores"
SCORES_VERSION = 1


class ScoringError(FairEdgeError):
    """A model or score file that cannot be scored or read (bad model, bad option, bad file)."""


@dataclass
class LayerScores:
    """U and R of every output unit of one candidate layer (a unit = output channel / feature)."""

    name: str
    kind: str  # 'conv' | 'linear' | 'heads' (attention heads of pipeline.attention)
    U: np.ndarray
    R: np.ndarray
    weight_shape: list[int]
    positions: (
        int  # output positions per unit and sample (H*W for Conv2d, L for Conv1d, 1 for Linear)
    )
    where: str  # where U was actually measured for this layer: 'raw' | 'bn' | 'act'
    bn: str | None = None  # the BatchNorm module that consumes the raw output, if any
    act: str | None = None  # the activation module after it, if any

    @property
    def n_units(self) -> int:
        return int(self.U.shape[0])

    def meta(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "n_units": self.n_units,
            "weight_shape": [int(d) for d in self.weight_shape],
            "positions": int(self.positions),
            "where": self.where,
            "bn": self.bn,
            "act": self.act,
        }


@dataclass
class Scores:
    """FAIR scores of one model, with what is needed to plan and to estimate cost without it.

    `graph` describes every Conv/Linear layer seen in the forward pass (candidates, the output
    layer, skipped ones): weight shape, bias, groups, output positions, the candidate layers that
    feed its input ('producers') and per-channel parameters of a following BatchNorm. The cost
    fallback (pipeline.cost.ScoresCostModel) uses it.
    """

    layers: dict[str, LayerScores]
    fingerprint: ModelFingerprint
    where: str = "raw"
    seed: int = 0
    projections: int = 128
    samples_per_class: int = 32
    classes: list[int] = field(default_factory=list)
    class_counts: list[int] = field(default_factory=list)
    n_classes_total: int = 0
    mode: str = "eval"
    reference_compat: bool = False
    output_layers: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    graph: dict[str, dict[str, Any]] = field(default_factory=dict)
    version: int = SCORES_VERSION

    def __getitem__(self, name: str) -> LayerScores:
        return self.layers[name]

    def names(self) -> list[str]:
        return list(self.layers)

    def tod_curve(self, name: str) -> np.ndarray:
        """ToD(k) for k = 1..n of one layer (see pipeline.tod.tod_curve)."""
        from pipeline.tod import tod_curve

        ls = self.layers[name]
        return tod_curve(ls.U, ls.R)

    def meta(self) -> dict[str, Any]:
        return {
            "schema": SCORES_SCHEMA,
            "version": self.version,
            "fingerprint": {"digest": self.fingerprint.digest, "shapes": self.fingerprint.shapes},
            "where": self.where,
            "seed": int(self.seed),
            "projections": int(self.projections),
            "samples_per_class": int(self.samples_per_class),
            "classes": [int(c) for c in self.classes],
            "class_counts": [int(c) for c in self.class_counts],
            "n_classes_total": int(self.n_classes_total),
            "mode": self.mode,
            "reference_compat": bool(self.reference_compat),
            "output_layers": list(self.output_layers),
            "skipped": dict(self.skipped),
            "graph": self.graph,
            "layers": [ls.meta() for ls in self.layers.values()],
        }

    def to_bytes(self) -> bytes:
        arrays: dict[str, np.ndarray] = {
            "meta": np.frombuffer(json.dumps(self.meta()).encode("utf-8"), dtype=np.uint8)
        }
        for i, ls in enumerate(self.layers.values()):
            arrays[f"U{i}"] = np.asarray(ls.U, dtype=np.float64)
            arrays[f"R{i}"] = np.asarray(ls.R, dtype=np.float64)
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        return buf.getvalue()

    def save(self, path: str | os.PathLike) -> None:
        """Write the scores atomically to `path` (.npz)."""
        atomic_write_bytes(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Scores:
        where = os.fspath(path)
        try:
            obj = np.load(path, allow_pickle=False)
        except FileNotFoundError as exc:
            raise ScoringError(f"score file {where!r} does not exist") from exc
        except (OSError, ValueError, EOFError) as exc:
            raise ScoringError(
                f"score file {where!r} is not an .npz file ({exc}); re-run scoring"
            ) from exc
        if not isinstance(obj, np.lib.npyio.NpzFile):
            raise ScoringError(f"score file {where!r} is a single array, not a fair-edge .npz")
        try:
            with obj as npz:
                meta = json.loads(bytes(npz["meta"]).decode("utf-8"))
                arrays = {k: npz[k] for k in npz.files if k != "meta"}
        except (OSError, ValueError, KeyError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ScoringError(
                f"score file {where!r} is not a fair-edge score file ({exc}); re-run scoring"
            ) from exc
        return cls.from_parts(meta, arrays, source=os.fspath(path))

    @classmethod
    def from_parts(cls, meta: Any, arrays: dict[str, np.ndarray], source: str = "scores") -> Scores:
        if not isinstance(meta, dict) or meta.get("schema") != SCORES_SCHEMA:
            raise ScoringError(f"{source!r} is not a fair-edge score file (schema missing)")
        if meta.get("version") != SCORES_VERSION:
            raise ScoringError(
                f"{source!r} has score version {meta.get('version')}, this fair-edge reads "
                f"{SCORES_VERSION}; re-run scoring"
            )
        try:
            layers: dict[str, LayerScores] = {}
            for i, lm in enumerate(meta["layers"]):
                U = np.asarray(arrays[f"U{i}"], dtype=np.float64)
                R = np.asarray(arrays[f"R{i}"], dtype=np.float64)
                if U.shape != (lm["n_units"],) or R.shape != U.shape:
                    raise ValueError(f"layer {lm['name']!r} arrays have the wrong shape")
                layers[lm["name"]] = LayerScores(
                    name=lm["name"],
                    kind=lm["kind"],
                    U=U,
                    R=R,
                    weight_shape=[int(d) for d in lm["weight_shape"]],
                    positions=int(lm["positions"]),
                    where=lm["where"],
                    bn=lm.get("bn"),
                    act=lm.get("act"),
                )
            fp = meta["fingerprint"]
            return cls(
                layers=layers,
                fingerprint=ModelFingerprint(
                    fp["digest"], {k: list(v) for k, v in fp["shapes"].items()}
                ),
                where=meta["where"],
                seed=int(meta["seed"]),
                projections=int(meta["projections"]),
                samples_per_class=int(meta["samples_per_class"]),
                classes=[int(c) for c in meta["classes"]],
                class_counts=[int(c) for c in meta["class_counts"]],
                n_classes_total=int(meta["n_classes_total"]),
                mode=meta["mode"],
                reference_compat=bool(meta["reference_compat"]),
                output_layers=list(meta["output_layers"]),
                skipped=dict(meta["skipped"]),
                graph=dict(meta["graph"]),
                version=int(meta["version"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ScoringError(
                f"{source!r} is malformed ({type(exc).__name__}: {exc}); re-run scoring"
            ) from exc
