"""Where a model comes from: an entry point plus weights, a torchvision name, an ONNX file, or the
built-in default (SmallCNN trained once on Fashion-MNIST).

Weights are only ever read with `torch.load(weights_only=True)`, so a weights file cannot run
code; a state dict that does not fit the model fails with the first differing parameter named.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from calibration.data import CalibrationSet
from calibration.errors import FairEdgeError

KINDS = ("default", "entry_point", "torchvision", "onnx")


class ModelSourceError(FairEdgeError):
    """A model spec or weights file that cannot be turned into a model."""


@dataclass
class ModelSource:
    """A resolved model: a torch module (all kinds but 'onnx') or an ONNX file."""

    kind: str
    spec: str
    name: str
    model: nn.Module | None = None
    onnx_path: Path | None = None
    weights: Path | None = None
    eval_data: CalibrationSet | None = None
    """Held-out data the model comes with (the default model's test split)."""
    calibration_data: CalibrationSet | None = None
    """Data the model comes with for scoring (the default model's training split)."""
    info: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "spec": self.spec,
            "name": self.name,
            "weights": str(self.weights) if self.weights else None,
            "onnx_path": str(self.onnx_path) if self.onnx_path else None,
        }

    def require_torch(self, why: str) -> nn.Module:
        if self.model is None:
            raise ModelSourceError(
                f"{why} needs the PyTorch model, but {self.spec!r} is an ONNX file; give "
                "`module:factory` with --weights (an ONNX model can only be pruned with --plan)"
            )
        return self.model


def _safe_name(text: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "-" for c in text)
    return keep.strip("-.") or "model"


def _import_factory(spec: str, what: str = "model entry point") -> Any:
    """`package.module:factory` or `path/to/file.py:factory`."""
    mod_name, _, attr = spec.rpartition(":")
    if not mod_name or not attr:
        raise ModelSourceError(f"{what} {spec!r} must look like 'module:{what.split()[0]}'")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.is_file():
                raise ModelSourceError(f"{what} file {mod_name!r} does not exist")
            module_spec = importlib.util.spec_from_file_location(
                f"_fair_edge_model_{path.stem}", path
            )
            if module_spec is None or module_spec.loader is None:
                raise ModelSourceError(f"cannot import {mod_name!r} as a Python module")
            module = importlib.util.module_from_spec(module_spec)
            # registered and with its folder importable, as `python file.py` would have it:
            # dataclasses and sibling imports in the user's file need both
            sys.modules[module_spec.name] = module
            sys.path.insert(0, str(path.resolve().parent))
            try:
                module_spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(module_spec.name, None)
                raise
            finally:
                sys.path.remove(str(path.resolve().parent))
        else:
            module = importlib.import_module(mod_name)
    except FairEdgeError:
        raise
    except Exception as exc:
        raise ModelSourceError(
            f"importing {what} {spec!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise ModelSourceError(f"{what} {spec!r}: {mod_name} has no callable {attr!r}")
    return factory


def _check_state_dict(model: nn.Module, state: dict[str, Any], path: Path) -> None:
    """Name the first missing, unexpected or mis-shaped parameter before load_state_dict does."""
    want = model.state_dict()
    missing = [k for k in want if k not in state]
    extra = [k for k in state if k not in want]
    if missing:
        raise ModelSourceError(
            f"weights {str(path)!r} do not fit the model: {len(missing)} parameter(s) missing, "
            f"first {missing[0]!r}; give the weights saved from this model's state_dict()"
        )
    if extra:
        raise ModelSourceError(
            f"weights {str(path)!r} do not fit the model: {len(extra)} unexpected parameter(s), "
            f"first {extra[0]!r}; give the weights saved from this model's state_dict()"
        )
    for k, v in want.items():
        got = state[k]
        if not isinstance(got, torch.Tensor):
            raise ModelSourceError(f"weights {str(path)!r}: entry {k!r} is not a tensor")
        if tuple(got.shape) != tuple(v.shape):
            raise ModelSourceError(
                f"weights {str(path)!r} do not fit the model: {k!r} has shape {tuple(got.shape)} "
                f"in the file but {tuple(v.shape)} in the model"
            )


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a state dict saved with torch.save (optionally under a 'state_dict' key)."""
    path = Path(path)
    if not path.is_file():
        raise ModelSourceError(f"weights file {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelSourceError(
            f"cannot read weights {str(path)!r} with weights_only=True ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); save them with torch.save(model.state_dict())"
        ) from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelSourceError(
            f"weights {str(path)!r} hold a {type(state).__name__}, not a state dict; "
            "save them with torch.save(model.state_dict())"
        )
    _check_state_dict(model, state, path)
    model.load_state_dict(state, strict=True)


def load_loss(spec: str) -> Any:
    """The --loss function (`module:function` or `file.py:function`), imported once."""
    return _import_factory(spec, what="loss function")


def resolve_model(
    spec: str | None,
    *,
    weights: str | os.PathLike | None = None,
    num_classes: int | None = None,
    progress: bool = True,
    task: str = "classification",
) -> ModelSource:
    """Turn a --model value into a ModelSource (see the module docstring for the forms)."""
    if spec is None or spec in ("", "default"):
        if weights is not None:
            raise ModelSourceError(
                "--weights needs --model 'module:factory' (or a torchvision name)"
            )
        from pipeline.train import default_data, default_model_info

        model, info = default_model_info(progress=progress)
        return ModelSource(
            "default",
            "default",
            "smallcnn",
            model.eval(),
            eval_data=default_data("test"),
            calibration_data=default_data("train"),
            info=info,
        )
    if spec.lower().endswith(".onnx"):
        path = Path(spec)
        if not path.is_file():
            raise ModelSourceError(f"ONNX model {spec!r} does not exist")
        return ModelSource("onnx", spec, _safe_name(path.stem), onnx_path=path)
    if ":" in spec:
        factory = _import_factory(spec)
        try:
            model = factory(num_classes=num_classes) if num_classes is not None else factory()
        except Exception as exc:
            raise ModelSourceError(
                f"model entry point {spec!r} failed: {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(model, nn.Module):
            raise ModelSourceError(
                f"model entry point {spec!r} returned {type(model).__name__}, not a torch.nn.Module"
            )
        name = _safe_name(spec.rpartition(":")[2])
        kind = "entry_point"
    else:
        from pipeline.zoo import efficientnet_lite0, torchvision_dense_model, torchvision_model

        if task != "classification":
            model = torchvision_dense_model(spec, task, num_classes=num_classes)
        elif spec.replace("-", "_") == "efficientnet_lite0":
            model = efficientnet_lite0(pretrained=weights is None)
        else:
            model = torchvision_model(spec, num_classes=num_classes or 1000)
        name = _safe_name(spec)
        kind = "torchvision"
    if weights is not None:
        load_weights(model, weights)
    return ModelSource(kind, spec, name, model.eval(), weights=Path(weights) if weights else None)
