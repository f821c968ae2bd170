"""ToD counts against a brute-force set-intersection loop."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.tod import max_count, overlap_counts, pruned_units, tod_count, tod_curve


def brute_count(U: np.ndarray, R: np.ndarray, alpha: float) -> tuple[int, list[int]]:
    """The definition, literally: sets D_k and E_k for every k, ties by unit index."""
    n = len(U)
    low_u = sorted(range(n), key=lambda i: (U[i], i))
    high_r = sorted(range(n), key=lambda i: (-R[i], i))
    if n <= 1:
        return 0, []
    best = 0
    for k in range(1, int(np.floor(0.99 * n + 1e-9)) + 1):
        if len(set(low_u[:k]) & set(high_r[:k])) / k <= alpha:
            best = k
    return best, sorted(low_u[:best])


@pytest.mark.parametrize("trial", range(60))
def test_count_matches_brute_force(trial: int) -> None:
    rng = np.random.default_rng(trial)
    n = int(rng.integers(1, 120))
    if trial % 3 == 0:  # many ties, like dead ReLU units with R exactly 0
        U = rng.integers(0, 4, n).astype(float)
        R = rng.integers(0, 3, n).astype(float)
    elif trial % 3 == 1:  # U and R positively related: the interesting case for ToD
        U = rng.random(n)
        R = U + 0.3 * rng.random(n)
    else:
        U, R = rng.random(n), rng.random(n)
    for alpha in (0.005, 0.05, 0.2, 0.5, 0.9):
        k, idx = brute_count(U, R, alpha)
        assert tod_count(U, R, alpha) == k
        assert pruned_units(U, R, alpha).tolist() == idx


def test_curve_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    U, R = rng.random(50), rng.random(50)
    low_u, high_r = np.argsort(U, kind="stable"), np.argsort(-R, kind="stable")
    expect = [len(set(low_u[:k]) & set(high_r[:k])) for k in range(1, 51)]
    assert overlap_counts(U, R).tolist() == expect
    np.testing.assert_allclose(tod_curve(U, R), np.array(expect) / np.arange(1, 51))


def test_hand_example() -> None:
    # lowest U: 0,1,2,3 ; highest R: 3,2,1,0 -> overlaps 0,0,2,4 at k=1..4
    U = np.array([0.1, 0.2, 0.3, 0.4])
    R = np.array([1.0, 2.0, 3.0, 4.0])
    assert overlap_counts(U, R).tolist() == [0, 0, 2, 4]
    assert tod_count(U, R, 0.05) == 2  # floor(0.99*4)=3, ToD(3)=2/3
    assert tod_count(U, R, 0.7) == 3  # capped at floor(0.99 n)
    assert pruned_units(U, R, 0.05).tolist() == [0, 1]


def test_one_unit_layer_never_pruned_and_bound() -> None:
    assert tod_count(np.array([0.0]), np.array([0.0]), 0.99) == 0
    assert (
        max_count(1) == 0 and max_count(2) == 1 and max_count(100) == 99 and max_count(200) == 198
    )
    rng = np.random.default_rng(5)
    for _ in range(20):
        n = int(rng.integers(2, 300))
        U, R = rng.random(n), rng.random(n)
        for alpha in (0.01, 0.05):  # D_k and E_k must overlap once k > n/2
            assert tod_count(U, R, alpha) <= n / (2 - alpha) + 1


def test_length_mismatch() -> None:
    with pytest.raises(ValueError):
        overlap_counts(np.zeros(3), np.zeros(4))
