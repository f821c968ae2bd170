"""What the report says about the data: which samples every figure came from, classes that fell
short of the asked count, and an unpruned model that scores near or below chance (the sign of
labels in another order than the model's outputs, or of preprocessing it was not trained with).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from calibration.data import CalibrationSet

# "Near chance": within a tenth of the way from the majority-class rate to a perfect score.
NEAR_CHANCE = 0.1


def scoring_sample(cs: CalibrationSet, per_class: int, seed: int) -> dict[str, Any]:
    """The samples scoring uses (as compute_scores draws them): counts per class and short ones."""
    if cs.labels is None:
        n = min(len(cs), per_class * 100)
        return {"samples": n, "per_class": per_class, "labels": "the unpruned model's top-1",
                "counts": {}, "short": {}}  # fmt: skip
    from calibration.sampling import balanced_sample

    rep = balanced_sample(cs, per_class, seed)[1]
    return {"samples": int(sum(rep.counts.values())), "per_class": per_class,
            "labels": cs.label_source, "counts": rep.counts, "short": rep.short}  # fmt: skip


def short_warning(sample: dict[str, Any]) -> str | None:
    short = sample["short"]
    if not short:
        return None
    listed = ", ".join(f"{k}={v}" for k, v in list(short.items())[:8])
    return (
        f"scoring used fewer than --samples-per-class {sample['per_class']} samples for "
        f"{len(short)} class(es) ({listed}{', ...' if len(short) > 8 else ''}); their scores are "
        "noisier: add images of those classes or lower --samples-per-class"
    )


def chance_level(cs: CalibrationSet) -> float | None:
    """Top-1 of always answering the most frequent class of `cs` (1/K when balanced)."""
    if cs.labels is None or len(cs) == 0:
        return None
    return float(np.bincount(cs.labels).max() / len(cs))


def chance_warning(accuracy: float | None, cs: CalibrationSet) -> str | None:
    """A warning when the unpruned model's top-1 on `cs` is near or below chance."""
    chance = chance_level(cs)
    if accuracy is None or chance is None or chance >= 1.0:
        return None
    if accuracy > chance + NEAR_CHANCE * (1.0 - chance):
        return None
    where = "below" if accuracy < chance else "near"
    return (
        f"the unpruned model scores {accuracy:.4f} top-1 on {cs.source}, {where} chance "
        f"({chance:.4f}, always answering the most frequent of {len(np.unique(cs.labels))} "
        "classes): its labels or preprocessing likely do not match the model; check the class "
        "order (--labels-file) and --image-size/--channels/--mean/--std. Accuracy changes on "
        "this data say little"
    )
