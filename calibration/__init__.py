"""Calibration data: loaders, class-balanced sampling, and the project's shared primitives.

This is the bottom layer of fair-edge (calibration -> pipeline -> exporters -> devices), so the
error base class and atomic file writing that every layer needs live here.
"""

from calibration.errors import FairEdgeError

__all__ = ["FairEdgeError"]
