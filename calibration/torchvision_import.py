"""Let `import torchvision` work anywhere in a process that imported fair-edge.

The torchvision wheel paired with this CPU torch build cannot load its compiled detection ops,
and its import then fails (`operator torchvision::nms does not exist`) while registering their
fake kernels. `install()` puts a finder on `sys.meta_path` that wraps torchvision's own loader:
the first import runs unchanged, and only when it fails for that reason are the two missing op
schemas defined and the import run once more. So a user's model file, or a script that imports
fair-edge first, can `import torchvision` (models, `torchvision.ops` layers) as usual; a build
whose ops load is never touched. The detection kernels themselves (nms) stay unavailable.

It lives in the bottom layer because every fair-edge package imports `calibration`, so the hook
is in place before any user code runs.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import Any

MISSING_OP = "torchvision::"


@functools.cache
def define_detection_op_schemas() -> Any:
    """Define torchvision's nms/qnms schemas once; the cached Library keeps them registered."""
    import torch

    lib = torch.library.Library("torchvision", "FRAGMENT")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    return lib


class _RetryLoader(importlib.abc.Loader):
    """torchvision's loader, run again after defining the schemas if its first run fails on them."""

    def __init__(self, real: importlib.abc.Loader) -> None:
        self._real = real

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._real.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        try:
            self._real.exec_module(module)
        except RuntimeError as exc:
            if MISSING_OP not in str(exc):
                raise
            define_detection_op_schemas()
            self._real.exec_module(module)

    def __getattr__(self, name: str) -> Any:  # resource readers, is_package, ...
        return getattr(self._real, name)


class TorchvisionFinder(importlib.abc.MetaPathFinder):
    """Finds `torchvision` with the other finders and hands back its spec with `_RetryLoader`."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != "torchvision":
            return None
        for finder in sys.meta_path:
            if finder is self or isinstance(finder, TorchvisionFinder):
                continue
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _RetryLoader(spec.loader)
                return spec
        return None


def install() -> None:
    """Put the finder first on sys.meta_path (once); nothing to do once torchvision is imported."""
    if "torchvision" in sys.modules:
        return
    if not any(isinstance(f, TorchvisionFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, TorchvisionFinder())


def import_torchvision() -> ModuleType:
    """Import torchvision through the finder (also when it was imported before install())."""
    install()
    try:
        import torchvision
    except RuntimeError as exc:  # imported and failed before the finder was in place
        if MISSING_OP not in str(exc):
            raise
        define_detection_op_schemas()
        import torchvision
    return torchvision
