"""The command line and the orchestration on top of the layers: options, model sources, the
stage cache, and the deploy chain that assembles calibration -> pipeline -> exporters ->
devices into one run, and `prune()`, the one-call Python API (fair_edge.api)."""

from typing import Any

__all__ = ["PruneResult", "prune"]


def __getattr__(name: str) -> Any:
    """`from fair_edge import prune` without importing torch and onnx for the command line."""
    if name in __all__:
        from fair_edge import api

        return getattr(api, name)
    raise AttributeError(f"module 'fair_edge' has no attribute {name!r}")
