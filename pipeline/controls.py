"""User controls over a plan: layers kept out of pruning, and caps on the share pruned per layer.

`ignore` names layers (torch module paths) or shell-style patterns (`layer1.*`, `*downsample*`);
a pattern also matches every layer under a module it names (`layer1` matches `layer1.0.conv1`).
`max_ratio` caps the share of units removed from any layer; `ratio_caps` caps the layers a
pattern matches (the lowest cap wins). A channel group takes the strictest cap of its members
and is kept whole when one of them is ignored. A pattern that matches no layer is an error, so
a typo never silently prunes what it meant to protect. The plan records the controls and what
they resolved to (`method['controls']`), and rounding never rounds past a cap.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.plan import PlanError


def matches(name: str, pattern: str) -> bool:
    """`pattern` names the layer, a module above it, or matches it shell-style."""
    return name == pattern or name.startswith(pattern + ".") or fnmatch.fnmatchcase(name, pattern)


def _ratio(value: Any, what: str) -> float:
    try:
        r = float(value)
    except (TypeError, ValueError) as exc:
        raise PlanError(f"{what} must be a share in [0, 1), e.g. 0.5, got {value!r}") from exc
    if not (0.0 <= r < 1.0) or math.isnan(r):
        raise PlanError(f"{what} must be a share in [0, 1), e.g. 0.5, got {value!r}")
    return r


@dataclass(frozen=True)
class PlanControls:
    """Layers never pruned, and the largest share of units a layer may lose."""

    ignore: tuple[str, ...] = ()
    max_ratio: float | None = None
    ratio_caps: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.ignore, str):
            object.__setattr__(self, "ignore", (self.ignore,))
        object.__setattr__(self, "ignore", tuple(str(p) for p in self.ignore if str(p).strip()))
        if self.max_ratio is not None:
            object.__setattr__(self, "max_ratio", _ratio(self.max_ratio, "the max layer ratio"))
        caps = {str(k): _ratio(v, f"the ratio cap of {k!r}") for k, v in self.ratio_caps.items()}
        object.__setattr__(self, "ratio_caps", caps)

    @property
    def empty(self) -> bool:
        return not self.ignore and self.max_ratio is None and not self.ratio_caps

    def resolve(
        self, layers: Mapping[str, int], known: Iterable[str] = ()
    ) -> tuple[dict[str, str], dict[str, int]]:
        """({ignored layer: why}, {capped layer: most units it may lose}) for `layers` (name ->
        units); a pattern must match one of `layers` or `known` (the model's other layers)."""
        every = list(dict.fromkeys([*layers, *known]))
        ignored: dict[str, str] = {}
        for pat in self.ignore:
            hit = [n for n in every if matches(n, pat)]
            _check_hit(pat, hit, every, "--ignore-layers")
            for n in hit:
                if n in layers:
                    ignored.setdefault(n, f"ignored (--ignore-layers {pat!r})")
        caps: dict[str, float] = {}
        if self.max_ratio is not None:
            caps = {n: self.max_ratio for n in layers}
        for pat, r in self.ratio_caps.items():
            hit = [n for n in every if matches(n, pat)]
            _check_hit(pat, hit, every, "layer_ratio_caps")
            for n in hit:
                if n in layers:
                    caps[n] = min(r, caps.get(n, 1.0))
        max_pruned = {n: int(math.floor(r * layers[n] + 1e-9)) for n, r in caps.items()}
        return ignored, max_pruned

    def to_json(self) -> dict[str, Any]:
        return {
            "ignore_layers": list(self.ignore),
            "max_layer_ratio": self.max_ratio,
            "layer_ratio_caps": dict(self.ratio_caps),
        }

    @classmethod
    def of(
        cls,
        ignore: Sequence[str] | str | None = None,
        max_ratio: float | None = None,
        ratio_caps: Mapping[str, float] | None = None,
    ) -> PlanControls:
        """From option values: `ignore` may be one comma-separated string."""
        if isinstance(ignore, str):
            ignore = [p.strip() for p in ignore.split(",")]
        return cls(tuple(ignore or ()), max_ratio, dict(ratio_caps or {}))


def _check_hit(pattern: str, hit: list[str], every: list[str], option: str) -> None:
    if hit:
        return
    shown = ", ".join(every[:6]) + (", ..." if len(every) > 6 else "")
    raise PlanError(
        f"{option} pattern {pattern!r} matches no layer of the model; use layer names like {shown}"
    )
