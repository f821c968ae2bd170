"""A measured run of one model on one device, as a schema-versioned JSON record.

Measurements come only from the runner actually timing the model; estimates live in
`devices.estimate` and have their own type so the two are never mixed up.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from calibration.fileio import atomic_write_text
from devices.errors import DeviceError

SCHEMA = "fair-edge.measurement/1"

WHERE_LABELS = {
    "local": "local",
    "ssh": "on board over SSH",
    "emulated": "emulated aarch64 - latency not representative",
}


@dataclass
class Measurement:
    """One model timed by the board runner, with where and how it ran."""

    profile: str
    where: str
    label: str
    device: str
    representative: bool
    model: dict[str, Any]
    runtime: dict[str, Any]
    threads: int
    load_s: float
    warmup: int
    runs: int
    latency_ms: dict[str, float]
    samples_ms: list[float]
    throughput_ips: float | None
    memory_mb: dict[str, float | None]
    system: dict[str, Any]
    cpu_ms: dict[str, float] = field(default_factory=dict)
    cpu_samples_ms: list[float] = field(default_factory=list)
    ort_profile: str | None = None
    hashes_verified: int | None = None
    timestamp: str = ""
    kind: str = "measurement"
    schema: str = SCHEMA
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def p50_ms(self) -> float:
        return float(self.latency_ms["p50"])

    @property
    def peak_rss_mb(self) -> float | None:
        return self.memory_mb.get("peak_rss")

    @classmethod
    def from_runner(
        cls,
        result: dict[str, Any],
        *,
        profile: str,
        where: str,
        device: str,
        label: str | None = None,
        representative: bool = True,
        extra: dict[str, Any] | None = None,
    ) -> Measurement:
        """Wrap the runner's JSON result; a failed run raises DeviceError with its message."""
        if not result.get("ok", False):
            err = result.get("error", {})
            raise DeviceError(
                f"{device}: runner failed ({err.get('code', 'unknown')}): {err.get('message', result)}"
            )
        return cls(
            profile=profile,
            where=where,
            label=label or WHERE_LABELS.get(where, where),
            device=device,
            representative=representative,
            model=result["model"],
            runtime=result["runtime"],
            threads=int(result["threads"]),
            load_s=float(result["load_s"]),
            warmup=int(result["warmup"]),
            runs=int(result["runs"]),
            latency_ms={k: float(v) for k, v in result["latency_ms"].items()},
            samples_ms=[float(x) for x in result["samples_ms"]],
            throughput_ips=result.get("throughput_ips"),
            memory_mb=dict(result["memory_mb"]),
            system=dict(result["system"]),
            cpu_ms={k: float(v) for k, v in result.get("cpu_ms", {}).items()},
            cpu_samples_ms=[float(x) for x in result.get("cpu_samples_ms", [])],
            ort_profile=result.get("ort_profile"),
            hashes_verified=result.get("hashes_verified"),
            timestamp=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            extra=dict(extra or {}),
        )

    @classmethod
    def merge(cls, parts: list[Measurement]) -> Measurement:
        """One Measurement from several rounds of the same model on the same device.

        Samples are pooled and the statistics recomputed from them; peak RSS is the largest,
        load time and load growth the median of the rounds.
        """
        from devices.board.runner import summarize

        if not parts:
            raise DeviceError("nothing to merge")
        first = parts[0]
        key = (first.profile, first.where, first.device, first.model.get("sha256"))
        for m in parts[1:]:
            if (m.profile, m.where, m.device, m.model.get("sha256")) != key:
                raise DeviceError("only rounds of one model on one device can be merged")
        if len(parts) == 1:
            return first
        samples = [x for m in parts for x in m.samples_ms]
        cpu = [x for m in parts for x in m.cpu_samples_ms]
        total_s = sum(samples) / 1000.0

        def median(values: list[float | None]) -> float | None:
            vals = sorted(v for v in values if v is not None)
            return statistics.median(vals) if vals else None

        peaks = [m.memory_mb.get("peak_rss") for m in parts]
        memory = {key: median([m.memory_mb.get(key) for m in parts]) for key in first.memory_mb}
        memory["peak_rss"] = max((p for p in peaks if p is not None), default=None)
        return dataclasses.replace(
            first,
            load_s=float(median([m.load_s for m in parts])),
            runs=len(samples),
            latency_ms=summarize([x / 1000.0 for x in samples]),
            samples_ms=samples,
            cpu_ms=summarize([x / 1000.0 for x in cpu]) if cpu else {},
            cpu_samples_ms=cpu,
            throughput_ips=len(samples) / total_s if total_s > 0 else None,
            memory_mb=memory,
            extra={**first.extra, "rounds": len(parts)},
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Measurement:
        if data.get("schema") != SCHEMA:
            raise DeviceError(
                f"measurement schema {data.get('schema')!r} is not {SCHEMA!r}: re-measure with this version"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise DeviceError(f"measurement has unknown fields {sorted(unknown)}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise DeviceError(f"measurement record is incomplete: {exc}") from None

    @classmethod
    def from_json(cls, text: str) -> Measurement:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Measurement:
        return cls.from_json(Path(path).read_text(encoding="utf-8"))
