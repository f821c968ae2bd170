"""The pruning plan: which output units of which layer to remove, as versioned JSON.

Layers are keyed by stable torch names (the module path, e.g. 'layer1.0.conv1'); the ONNX
export keeps those names on initializers ('layer1.0.conv1.weight'), so one plan drives both
torch pruning and ONNX surgery. The model's fingerprint (every parameter's name and shape)
makes applying a plan to another model fail with a message that names the first difference.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from calibration.errors import FairEdgeError
from calibration.fileio import atomic_write_text
from pipeline.groups import ChannelGroup

PLAN_SCHEMA = "fair-edge/plan"
PLAN_VERSION = 1


class PlanError(FairEdgeError):
    """A plan file that cannot be read, or that does not fit the model it is applied to."""


@dataclass
class ModelFingerprint:
    """Every parameter's name and shape, and a digest of them."""

    digest: str
    shapes: dict[str, list[int]]

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, Any]) -> ModelFingerprint:
        norm = {k: [int(d) for d in v] for k, v in shapes.items()}
        text = "\n".join(f"{k}:{'x'.join(map(str, v))}" for k, v in sorted(norm.items()))
        return cls(hashlib.sha256(text.encode()).hexdigest(), norm)

    @classmethod
    def from_model(cls, model: nn.Module) -> ModelFingerprint:
        return cls.from_shapes({k: tuple(p.shape) for k, p in model.named_parameters()})

    def diff(self, other: ModelFingerprint) -> str | None:
        """One line naming the first difference, or None when the two match."""
        if self.digest == other.digest:
            return None
        for name in sorted(set(self.shapes) | set(other.shapes)):
            a, b = self.shapes.get(name), other.shapes.get(name)
            if a != b:
                if a is None:
                    return f"parameter {name!r} is in the model but not in the plan's model"
                if b is None:
                    return f"parameter {name!r} of the plan's model is missing from the model"
                return f"parameter {name!r} has shape {b} in the model but {a} in the plan"
        return "parameter fingerprints differ"


@dataclass
class LayerPlan:
    """Output units of one layer to remove (ascending indices)."""

    name: str
    n_units: int
    pruned: list[int]
    group: str | None = None
    unrounded_pruned: int | None = None

    @property
    def kept(self) -> int:
        return self.n_units - len(self.pruned)

    def keep_mask(self) -> np.ndarray:
        mask = np.ones(self.n_units, dtype=bool)
        mask[self.pruned] = False
        return mask

    def validate(self) -> None:
        idx = np.asarray(self.pruned, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_units):
            raise PlanError(
                f"plan for layer {self.name!r} removes unit indices outside 0..{self.n_units - 1}; "
                "re-create the plan for this model"
            )
        if len(np.unique(idx)) != idx.size:
            raise PlanError(f"plan for layer {self.name!r} lists a unit twice; re-create the plan")
        if idx.size >= self.n_units:
            raise PlanError(
                f"plan removes all {self.n_units} units of layer {self.name!r}; at least one must stay"
            )


@dataclass
class Plan:
    """A versioned pruning plan for one model."""

    fingerprint: ModelFingerprint
    layers: dict[str, LayerPlan]
    method: dict[str, Any] = field(default_factory=dict)
    groups: list[ChannelGroup] = field(default_factory=list)
    version: int = PLAN_VERSION

    def pruned_units(self) -> int:
        return sum(len(lp.pruned) for lp in self.layers.values())

    def digest(self) -> str:
        """A hash of what the plan removes from which model (the method record is left out)."""
        layers = {n: sorted(int(i) for i in lp.pruned) for n, lp in sorted(self.layers.items())}
        text = json.dumps({"model": self.fingerprint.digest, "layers": layers}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def check_model(self, model: nn.Module) -> None:
        """Raise PlanError if `model` is not the model this plan was made for."""
        problem = self.fingerprint.diff(ModelFingerprint.from_model(model))
        if problem:
            raise PlanError(f"plan does not match the model: {problem}; re-plan for this model")

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": PLAN_SCHEMA,
            "version": self.version,
            "method": self.method,
            "fingerprint": {"digest": self.fingerprint.digest, "shapes": self.fingerprint.shapes},
            "groups": [g.to_json() for g in self.groups],
            "layers": {
                name: {
                    "n_units": lp.n_units,
                    "pruned": [int(i) for i in lp.pruned],
                    "group": lp.group,
                    "unrounded_pruned": lp.unrounded_pruned,
                }
                for name, lp in self.layers.items()
            },
        }

    @classmethod
    def from_json(cls, data: Any) -> Plan:
        if not isinstance(data, dict) or data.get("schema") != PLAN_SCHEMA:
            raise PlanError("not a fair-edge plan (missing schema 'fair-edge/plan')")
        if data.get("version") != PLAN_VERSION:
            raise PlanError(
                f"plan version {data.get('version')} is not supported (this fair-edge reads "
                f"version {PLAN_VERSION}); re-create the plan"
            )
        try:
            fp = data["fingerprint"]
            layers = {
                name: LayerPlan(
                    name=name,
                    n_units=int(v["n_units"]),
                    pruned=[int(i) for i in v["pruned"]],
                    group=v.get("group"),
                    unrounded_pruned=v.get("unrounded_pruned"),
                )
                for name, v in data["layers"].items()
            }
            plan = cls(
                fingerprint=ModelFingerprint(
                    fp["digest"], {k: list(s) for k, s in fp["shapes"].items()}
                ),
                layers=layers,
                method=dict(data.get("method", {})),
                groups=[ChannelGroup.from_json(g) for g in data.get("groups", [])],
                version=int(data["version"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(
                f"plan file is malformed ({type(exc).__name__}: {exc}); re-create it"
            ) from exc
        for lp in plan.layers.values():
            lp.validate()
        return plan

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, json.dumps(self.to_json(), indent=1, sort_keys=False) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError as exc:
            raise PlanError(f"plan file {os.fspath(path)!r} does not exist") from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PlanError(f"plan file {os.fspath(path)!r} is not valid JSON: {exc}") from exc
        return cls.from_json(data)
