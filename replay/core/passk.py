"""Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k)/C(n, k) for n samples of which c are right.

Binomials overflow long before n gets interesting, so we use the product form
C(n-c, k)/C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i), evaluated as a sum of log1p terms.
"""

from __future__ import annotations

import math

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k draws (without replacement) from n samples is right."""
    _check(n, c, k)
    if n - c < k:  # every k-subset holds a right sample
        return 1.0
    return 0.0 - math.expm1(sum(math.log1p(-k / i) for i in range(n - c + 1, n + 1)))


def pass_at_k_groups(n: np.ndarray, c: np.ndarray, k: int) -> np.ndarray:
    """Vectorised pass@k, one value per group; NaN where a group has fewer than k samples."""
    n = np.asarray(n, dtype=np.int64)
    c = np.asarray(c, dtype=np.int64)
    if n.shape != c.shape:
        raise ValueError(f"n and c must have the same shape, got {n.shape} and {c.shape}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if np.any(c < 0) or np.any(c > n):
        raise ValueError("need 0 <= c <= n for every group")
    top = int(n.max()) if n.size else 0
    # prefix[m] = sum_{i=k+1}^{m} log1p(-k/i), so a group's log ratio is prefix[n] - prefix[n-c]
    terms = np.zeros(top + 1)
    terms[k + 1:] = np.log1p(-k / np.arange(k + 1, top + 1, dtype=np.float64))
    prefix = np.cumsum(terms)
    log_ratio = prefix[n] - prefix[np.maximum(n - c, 0)]
    out = np.where(n - c < k, 1.0, 0.0 - np.expm1(log_ratio))
    return np.where(n < k, np.nan, out)


def mean_pass_at_k(n: np.ndarray, c: np.ndarray, ks: list[int]) -> dict[int, float]:
    """{k: mean pass@k over the groups with at least k samples} (NaN if there are none)."""
    result = {}
    for k in ks:
        values = pass_at_k_groups(n, c, k)
        valid = values[~np.isnan(values)]
        result[k] = float(valid.mean()) if valid.size else math.nan
    return result


def default_ks(n: int) -> list[int]:
    """1, 2, 4, ... up to n, plus n itself."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    ks = [1 << p for p in range(n.bit_length()) if 1 << p <= n]
    return ks if ks[-1] == n else ks + [n]


def _check(n: int, c: int, k: int) -> None:
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
