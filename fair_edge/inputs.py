"""The deploy chain's inputs: profile, model and data resolved and checked before anything runs.

Bad input fails here, in one line, before any progress bar, stage or file.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calibration.data import CalibrationSet
from calibration.errors import FairEdgeError
from devices.profile import DeviceProfile, load_profile
from exporters.evaluate import model_outputs, top1
from fair_edge.config import Options
from fair_edge.model_source import ModelSource, resolve_model

VERIFY_SAMPLES = 64
INT8_CALIBRATION = 256


class DeployError(FairEdgeError):
    """A deploy that cannot go on (missing data for a model, an unusable option combination)."""


@dataclass
class Inputs:
    """The resolved model, profile and data a deploy (or a single stage) works on."""

    source: ModelSource
    profile: DeviceProfile
    calibration: CalibrationSet
    evaluation: CalibrationSet
    eval_is_calibration: bool


def show_progress(opts: Options) -> bool:
    """Progress bars only for a person watching: not with --quiet/--json, not into a pipe or log."""
    return not (opts.quiet or opts.json) and sys.stderr.isatty()


def resolve_profile(name: str) -> DeviceProfile:
    return load_profile(name)


def resolve_inputs(opts: Options) -> Inputs:
    """Profile first (cheapest to get wrong), then model, then data."""
    from fair_edge.data_source import load_user_data

    profile = resolve_profile(opts.device)
    source = resolve_model(
        opts.model,
        weights=opts.weights,
        num_classes=opts.num_classes,
        progress=show_progress(opts),
        task=opts.task,
    )
    if opts.data is not None:
        calib = load_user_data(opts.data, opts, source.model)
        if opts.task != "classification":  # dense targets are read by compute_scores
            calib = dataclasses.replace(calib, labels=None, label_source="none", class_names=[])
    elif source.calibration_data is not None:
        calib = source.calibration_data
    else:
        raise DeployError(
            f"model {source.spec!r} needs calibration data: give --data (a class folder, .npz/.npy, "
            "an IDX file, 'fashion-mnist' or 'digits')"
        )
    if opts.eval_data is not None:
        evaluation, same = load_user_data(opts.eval_data, opts, source.model), False
    elif opts.data is None and source.eval_data is not None:
        evaluation, same = source.eval_data, False
    elif calib.labels is not None and len(calib) >= MIN_SPLIT:
        calib, evaluation = split_heldout(calib, opts.eval_samples, opts.seed)
        same = False
    else:
        evaluation, same = calib, True
    if opts.input_shape is not None and list(calib.sample_shape) != list(opts.input_shape):
        raise DeployError(
            f"--input-shape {opts.input_shape} does not match the data's samples "
            f"{list(calib.sample_shape)}; fix the preprocessing (--image-size/--channels, for "
            "image folders and raw arrays) or the shape"
        )
    if evaluation.sample_shape != calib.sample_shape:
        raise DeployError(
            f"evaluation data samples are {list(evaluation.sample_shape)} but calibration samples "
            f"are {list(calib.sample_shape)}; use data with the same preprocessing"
        )
    if len(evaluation) > opts.eval_samples:
        idx = np.sort(
            np.random.default_rng(opts.seed).permutation(len(evaluation))[: opts.eval_samples]
        )
        evaluation = evaluation.subset(idx)
    return Inputs(source, profile, calib, evaluation, same)


MIN_SPLIT = 50  # below this a labelled set is too small to hold a share out for evaluation


def split_heldout(
    cs: CalibrationSet, n_eval: int, seed: int
) -> tuple[CalibrationSet, CalibrationSet]:
    """(the rest, a seeded held-out share): accuracy never comes from samples calibrated on."""
    n = min(n_eval, max(1, len(cs) // 5))
    order = np.random.default_rng(seed + 7919).permutation(len(cs))
    held = cs.subset(np.sort(order[:n]))
    held = dataclasses.replace(held, source=f"{n} samples held out of {cs.source} (never "
                               "used for calibration or recovery)")  # fmt: skip
    return cs.subset(np.sort(order[n:])), held


def example_input(cs: CalibrationSet) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(cs.inputs[:1]))


def calibration_subset(cs: CalibrationSet, n: int, seed: int) -> np.ndarray:
    """`n` calibration inputs, seeded, class-balanced when labelled (int8 ranges, verification)."""
    if len(cs) <= n:
        return cs.inputs
    if cs.labels is not None and cs.num_classes > 1:
        from calibration.sampling import balanced_sample

        per_class = max(2, n // max(1, cs.num_classes))
        try:
            return balanced_sample(cs, per_class, seed)[0].inputs[:n]
        except FairEdgeError:
            pass
    idx = np.sort(np.random.default_rng(seed).permutation(len(cs))[:n])
    return cs.inputs[idx]


def check_model_runs(
    model: torch.nn.Module, cs: CalibrationSet, source: ModelSource, opts: Options | None = None
) -> None:
    """One forward pass on a data sample, so a model/data mismatch is one clear line."""
    try:
        with torch.no_grad():
            out = model(example_input(cs))
    except Exception as exc:
        from fair_edge.data_source import first_layer_hint

        hint = first_layer_hint(model)
        raise DeployError(
            f"model {source.spec!r} cannot run on the data's samples of shape "
            f"{list(cs.sample_shape)} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            + (
                f"{hint} (or give data with the model's input shape)"
                if hint
                else "give data with the model's input shape and preprocessing"
            )
        ) from exc
    if opts is not None and opts.task != "classification":
        return _check_dense(out, cs, source, opts)
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise DeployError(
            f"model {source.spec!r} must return N x classes logits, got "
            f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}"
        )
    if cs.labels is not None and out.shape[1] < cs.num_classes:
        raise DeployError(
            f"model {source.spec!r} has {out.shape[1]} outputs but the data has {cs.num_classes} "
            "classes; set --num-classes or use matching data"
        )


def _check_dense(out: Any, cs: CalibrationSet, source: ModelSource, opts: Options) -> None:
    """A dense task's model output and targets, checked before anything is written."""
    from calibration.dense_targets import load_dense_targets
    from exporters.onnx_export import output_names
    from pipeline.dense_scoring import dense_logits

    if opts.task == "segmentation" and opts.loss is None:
        try:
            dense_logits(out)
        except FairEdgeError as exc:
            raise DeployError(f"model {source.spec!r}: {exc}") from exc
    output_names(source.model, example_input(cs))  # a flat tensor/dict/tuple, or one line
    if cs.inputs.ndim != 4:
        raise DeployError(
            f"--task {opts.task} needs image inputs N x C x H x W, the data's samples are "
            f"{list(cs.sample_shape)}"
        )
    targets = load_dense_targets(opts.data, opts.task, len(cs), cs.inputs.shape[-2:])
    if opts.task == "detection" and (opts.loss is None or targets is None):
        raise DeployError(
            "--task detection needs --loss module:function (raw head outputs, targets) -> loss "
            "and box targets in --data (a .npz with 'boxes' N x M x 4 and 'box_labels' N x M)"
        )


# The built-in default shows the product working: half the FLOPs removed, then recovered.
DEFAULT_MODEL_SETTINGS = {"target": 0.5}


def apply_model_defaults(opts: Options, source: ModelSource, notes: list[str]) -> Options:
    """The built-in default model's own settings, where the user chose no plan of their own."""
    chose = any(v is not None for v in (opts.tod, opts.target, opts.latency_ms, opts.max_drop,
                                        opts.plan))  # fmt: skip
    if source.kind != "default" or chose:
        return opts
    changes = {k: v for k, v in DEFAULT_MODEL_SETTINGS.items() if getattr(opts, k) is None}
    if changes:
        notes.append(
            "built-in default settings: "
            + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in changes.items())
        )
    return dataclasses.replace(opts, **changes)


def torch_accuracy(model: torch.nn.Module, cs: CalibrationSet) -> float | None:
    """Top-1 of a torch module on the evaluation data (None when it has no labels)."""
    if cs.labels is None:
        return None
    from pipeline.train import evaluate

    return evaluate(model, cs)


def accuracy_of(path: Path, cs: CalibrationSet) -> float | None:
    if cs.labels is None:
        return None
    return top1(model_outputs(path, cs.inputs), cs.labels)
