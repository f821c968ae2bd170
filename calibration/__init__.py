"""Calibration data: loaders, class-balanced sampling, and the project's shared primitives.

This is the bottom layer of fair-edge (calibration -> pipeline -> exporters -> devices), so the
error base class and atomic file writing that every layer needs live here.
"""

from calibration import torchvision_import
from calibration.errors import FairEdgeError

# any `import torchvision` after this works on builds whose detection ops cannot load
torchvision_import.install()

__all__ = ["FairEdgeError"]
