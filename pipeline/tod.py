"""Tolerance of Difference: how many units of a layer FAIR removes at level alpha.

D_k = the k units with the lowest U, E_k = the k units with the highest R,
ToD(k) = |D_k ∩ E_k| / k. The count is the largest k <= floor(0.99 n) with ToD(k) <= alpha.

Vectorised with ranks: a unit is in D_k for k > rank_D(u) and in E_k for k > rank_E(u), so it is
in both for k > max(rank_D, rank_E); |D_k ∩ E_k| is the cumulative count of those maxima.
O(n log n), no loop over k. Ties are broken by unit index (stable sorts), lower index first, in
both orders: among equal U the lower index is removed first, among equal R the lower index
counts as 'needed' first. A one-unit layer is never pruned.
"""

from __future__ import annotations

import numpy as np

MAX_FRACTION_PERCENT = 99  # the count never exceeds floor(0.99 n)


def low_u_order(U: np.ndarray) -> np.ndarray:
    """Unit indices by increasing U (removal candidates first), ties by index."""
    return np.argsort(np.asarray(U, dtype=np.float64), kind="stable")


def high_r_order(R: np.ndarray) -> np.ndarray:
    """Unit indices by decreasing R (most needed first), ties by index."""
    return np.argsort(-np.asarray(R, dtype=np.float64), kind="stable")


def overlap_counts(U: np.ndarray, R: np.ndarray) -> np.ndarray:
    """|D_k ∩ E_k| for k = 1..n (int64 array of length n)."""
    U = np.asarray(U)
    n = U.shape[0]
    if np.asarray(R).shape != (n,):
        raise ValueError(f"U and R must have the same length ({n} vs {np.asarray(R).shape})")
    rank_d = np.empty(n, dtype=np.int64)
    rank_d[low_u_order(U)] = np.arange(n)
    rank_e = np.empty(n, dtype=np.int64)
    rank_e[high_r_order(R)] = np.arange(n)
    enter = np.maximum(rank_d, rank_e)  # in both sets for k >= enter + 1
    return np.cumsum(np.bincount(enter, minlength=n))[:n]


def tod_curve(U: np.ndarray, R: np.ndarray) -> np.ndarray:
    """ToD(k) = |D_k ∩ E_k| / k for k = 1..n (float64 array of length n)."""
    ov = overlap_counts(U, R)
    return ov / np.arange(1, ov.shape[0] + 1)


def max_count(n: int) -> int:
    """The largest count ToD may return for an n-unit layer: floor(0.99 n), 0 for n <= 1."""
    return 0 if n <= 1 else (MAX_FRACTION_PERCENT * n) // 100


def count_from_curve(curve: np.ndarray, alpha: float) -> int:
    """Largest k <= floor(0.99 n) with curve[k-1] <= alpha, 0 if none."""
    kmax = max_count(curve.shape[0])
    ok = np.flatnonzero(curve[:kmax] <= alpha)
    return int(ok[-1] + 1) if ok.size else 0


def tod_count(U: np.ndarray, R: np.ndarray, alpha: float) -> int:
    """How many of this layer's units FAIR removes at level alpha."""
    if np.asarray(U).shape[0] <= 1:
        return 0
    return count_from_curve(tod_curve(U, R), alpha)


def pruned_units(U: np.ndarray, R: np.ndarray, alpha: float) -> np.ndarray:
    """The removed units at level alpha: D_k, the k lowest-U units (ascending indices)."""
    k = tod_count(U, R, alpha)
    return np.sort(low_u_order(U)[:k])
