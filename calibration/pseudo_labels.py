"""Label-free mode: label unlabelled calibration samples with the unpruned model's own top-1.

FAIR's scores need a class for every sample. Without labels, the classes the unpruned model
predicts are the ones pruning must keep apart, so its top-1 prediction stands in for the label;
the set records `label_source='pseudo'` and every report states it. The same samples (with or
without labels) are what int8 calibration reads (`CalibrationSet.as_numpy_batches`).

This module must not import the pipeline layer: pass a `predict` callable (inputs -> scores) or a
torch module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from calibration.data import CalibrationSet
from calibration.errors import CalibrationError

Predictor = Callable[[np.ndarray], Any]


def _as_predict(model_or_predict: Any, batch_size: int) -> Callable[[np.ndarray], np.ndarray]:
    """Wrap a torch module (no grad, eval mode, batched) or a plain callable into inputs -> scores."""
    import torch

    if isinstance(model_or_predict, torch.nn.Module):
        module = model_or_predict

        def run(x: np.ndarray) -> np.ndarray:
            was_training = module.training
            module.eval()
            try:
                with torch.no_grad():
                    outs = [
                        module(torch.from_numpy(x[i : i + batch_size])).float().numpy()
                        for i in range(0, len(x), batch_size)
                    ]
            finally:
                module.train(was_training)
            return np.concatenate(outs)

        return run
    if not callable(model_or_predict):
        raise CalibrationError("pseudo_label needs a torch module or a callable inputs -> scores")

    def call(x: np.ndarray) -> np.ndarray:
        out = model_or_predict(x)
        if hasattr(out, "detach"):
            out = out.detach().cpu().numpy()
        return np.asarray(out)

    return call


def pseudo_label(
    cs: CalibrationSet,
    predict: Predictor | Any,
    *,
    class_names: list[str] | None = None,
    batch_size: int = 256,
) -> CalibrationSet:
    """Return `cs` labelled with argmax(predict(inputs)), `label_source='pseudo'`.

    `predict` maps a float32 batch (N x ...) to class scores (N x K), or is a torch module.
    Class names come from `class_names`, else the set's own if they cover K, else '0'..'K-1'.
    Any labels the set already had are replaced (they are not used).
    """
    fn = _as_predict(predict, batch_size)
    scores = fn(cs.inputs)
    if scores.ndim != 2 or scores.shape[0] != len(cs):
        raise CalibrationError(
            f"the model returned scores of shape {scores.shape} for {len(cs)} samples; expected N x classes"
        )
    if not np.all(np.isfinite(scores)):
        raise CalibrationError("the model returned NaN/inf scores; check the preprocessing")
    k = scores.shape[1]
    labels = scores.argmax(axis=1).astype(np.int64)
    names = class_names or (
        cs.class_names if len(cs.class_names) == k else [str(i) for i in range(k)]
    )
    if len(names) != k:
        raise CalibrationError(f"{len(names)} class names given for a model with {k} outputs")
    return cs.with_labels(labels, "pseudo", class_names=names)


def agreement(reference: np.ndarray, other: np.ndarray, top_k: int = 1) -> float:
    """Fraction of samples whose reference top-1 class is within `other`'s top-k (top-k agreement)."""
    reference = np.asarray(reference)
    other = np.asarray(other)
    if reference.shape != other.shape or reference.ndim != 2:
        raise CalibrationError(f"score arrays differ: {reference.shape} vs {other.shape}")
    ref = reference.argmax(axis=1)
    top = np.argsort(-other, axis=1)[:, :top_k]
    return float(np.mean((top == ref[:, None]).any(axis=1)))
