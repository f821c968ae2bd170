"""Channel groups: output channels of several layers that must be removed together.

A group is a first-class object (as in Torch-Pruning's dependency graph): the layers whose
output channel i is tied by a residual Add, a depthwise conv, or an elementwise gate. The
exporters layer discovers groups from the ONNX graph; the planner scores and prunes per group.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class ChannelGroup:
    """Layers (by stable torch name) whose output channel i is one unit of the group."""

    name: str
    members: list[str]
    n_channels: int
    frozen: bool = False
    reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ChannelGroup:
        return cls(**data)
