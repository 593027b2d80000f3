"""Unbiased pass@k against hand-computed binomial ratios."""

import math
from math import comb

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from replay.core.passk import default_ks, mean_pass_at_k, pass_at_k, pass_at_k_groups


def test_hand_computed_values():
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(8, 2, 4) == pytest.approx(1 - 15 / 70)  # 1 - C(6,4)/C(8,4)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the pass rate
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 3, 3) == 1.0  # n - c < k: every subset holds a right answer
    assert pass_at_k(4, 4, 4) == 1.0


def test_large_n_stays_finite_and_accurate():
    # C(1000, 500) overflows a float; the product form does not
    value = pass_at_k(1000, 1, 500)
    assert value == pytest.approx(0.5)
    assert pass_at_k(1000, 2, 500) == pytest.approx(1 - (500 * 499) / (1000 * 999))


def test_vectorised_matches_scalar_and_marks_small_groups_nan():
    n = np.array([4, 8, 8, 3, 16, 1])
    c = np.array([1, 2, 0, 3, 5, 1])
    got = pass_at_k_groups(n, c, 4)
    want = [1 - comb(a - b, 4) / comb(a, 4) if a >= 4 else math.nan for a, b in zip(n, c)]
    np.testing.assert_allclose(got, want)
    np.testing.assert_allclose(pass_at_k_groups(n, c, 1), c / n)


def test_mean_pass_at_k_uses_groups_with_enough_samples():
    result = mean_pass_at_k(np.array([4, 4, 2]), np.array([1, 0, 2]), [1, 2, 4])
    assert result[1] == pytest.approx((0.25 + 0.0 + 1.0) / 3)
    assert result[2] == pytest.approx((0.5 + 0.0 + 1.0) / 3)
    assert result[4] == pytest.approx((1.0 + 0.0) / 2)
    assert math.isnan(mean_pass_at_k(np.array([2]), np.array([1]), [4])[4])


def test_default_ks():
    assert default_ks(1) == [1]
    assert default_ks(8) == [1, 2, 4, 8]
    assert default_ks(6) == [1, 2, 4, 6]
    assert default_ks(16) == [1, 2, 4, 8, 16]
    assert default_ks(100) == [1, 2, 4, 8, 16, 32, 64, 100]
    with pytest.raises(ValueError):
        default_ks(0)


def test_rejects_impossible_counts():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError):
        pass_at_k_groups(np.array([3]), np.array([4]), 1)


@given(st.integers(1, 60).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_matches_exact_binomials(nck):
    n, c, k = nck
    exact = 1 - comb(n - c, k) / comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    assert pass_at_k_groups(np.array([n]), np.array([c]), k)[0] == pytest.approx(exact, abs=1e-12)
