"""What a surgery did: per-layer channels, parameters and FLOPs before/after, frozen groups."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class LayerRow:
    layer: str
    op: str
    channels_before: int
    channels_after: int
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int


@dataclass
class SurgeryReport:
    """Per-layer table, frozen groups with reasons, totals, verification result and timings."""

    layers: list[LayerRow]
    frozen: list[dict[str, Any]]
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    verification: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SurgeryReport:
        data = dict(data)
        data["layers"] = [LayerRow(**r) for r in data["layers"]]
        return cls(**data)

    def to_markdown(self) -> str:
        """A Markdown table per layer, then totals and the frozen groups with their reasons."""
        lines = [
            "| layer | op | channels | params | FLOPs |",
            "|---|---|---|---|---|",
        ]
        for r in self.layers:
            lines.append(
                f"| {r.layer} | {r.op} | {r.channels_before} -> {r.channels_after} | "
                f"{r.params_before:,} -> {r.params_after:,} | {r.flops_before:,} -> {r.flops_after:,} |"
            )
        pb, fb = max(self.params_before, 1), max(self.flops_before, 1)
        lines += [
            "",
            f"Total parameters {self.params_before:,} -> {self.params_after:,} "
            f"({self.params_after / pb:.1%} kept); FLOPs {self.flops_before:,} -> "
            f"{self.flops_after:,} ({self.flops_after / fb:.1%} kept).",
        ]
        if self.verification:
            v = self.verification
            lines.append(
                f"Verified against the masked original: max |diff| {v['max_abs_diff']:.3g} "
                f"<= {v['bound']:.3g} on {v['n_random']} random and {v['n_calibration']} calibration batches."
            )
        if self.frozen:
            lines += ["", "| frozen group | members | channels | reason |", "|---|---|---|---|"]
            for g in self.frozen:
                members = ", ".join(g["members"][:4]) + (" ..." if len(g["members"]) > 4 else "")
                lines.append(f"| {g['group']} | {members} | {g['channels']} | {g['reason']} |")
        return "\n".join(lines) + "\n"
