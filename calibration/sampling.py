"""Class-balanced sampling: the same number of samples from each class, reproducibly.

FAIR's U score compares class-conditional output distributions, which is exact (sorted-sample
differences) and fair across class pairs when every class has the same count.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from calibration.data import CalibrationSet
from calibration.errors import CalibrationError

MIN_PER_CLASS = 2  # a Wasserstein distance between classes needs at least two samples of each


@dataclasses.dataclass
class SamplingReport:
    """What `balanced_sample` took: per-class counts, and the classes that had too few samples."""

    per_class: int
    seed: int
    counts: dict[str, int]
    short: dict[str, int]  # class name -> samples available (fewer than per_class)
    missing: list[str]  # class names with no samples at all
    warning: str | None = None

    @property
    def balanced(self) -> bool:
        return not self.short

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def balanced_sample(
    cs: CalibrationSet, per_class: int, seed: int = 0
) -> tuple[CalibrationSet, SamplingReport]:
    """Draw `per_class` samples of every class present (all of a class that has fewer).

    Classes with fewer than `per_class` samples are kept whole and reported (`report.short`,
    `report.warning`); a class with a single sample, or data with fewer than two classes, is an
    error. Samples come out grouped by class, in class order; the draw depends only on `seed`.
    """
    labels = cs.require_labels()
    if per_class < MIN_PER_CLASS:
        raise CalibrationError(f"per_class must be >= {MIN_PER_CLASS}, got {per_class}")
    counts = np.bincount(labels, minlength=cs.num_classes)
    present = np.nonzero(counts)[0]
    if len(present) < 2:
        raise CalibrationError(
            f"calibration data from {cs.source or 'input'} has {len(present)} class(es); FAIR needs labelled samples of at least 2 classes"
        )
    too_few = [cs.class_names[c] for c in present if counts[c] < MIN_PER_CLASS]
    if too_few:
        raise CalibrationError(
            f"class(es) with fewer than {MIN_PER_CLASS} samples: {', '.join(too_few)}; add samples or drop those classes"
        )
    chosen = []
    taken: dict[str, int] = {}
    short: dict[str, int] = {}
    for c in present:
        idx = np.nonzero(labels == c)[0]
        if len(idx) > per_class:
            rng = np.random.default_rng([seed, int(c)])  # one stream per class: independent draws
            idx = np.sort(rng.choice(idx, size=per_class, replace=False))
        elif len(idx) < per_class:
            short[cs.class_names[c]] = len(idx)
        chosen.append(idx)
        taken[cs.class_names[c]] = len(idx)
    missing = [cs.class_names[c] for c in range(cs.num_classes) if counts[c] == 0]
    warning = None
    if short:
        warning = (
            f"unequal class counts: {len(short)} class(es) have fewer than {per_class} samples "
            f"({', '.join(f'{k}={v}' for k, v in short.items())})"
        )
    report = SamplingReport(
        per_class=per_class, seed=seed, counts=taken, short=short, missing=missing, warning=warning
    )
    return cs.subset(np.concatenate(chosen)), report
