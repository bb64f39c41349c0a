"""The cpu decode kernel's softcap, ``c·tanh(s/c)``: the 16-lane ``tanh`` it is computed with
(``_cpu_simd._tanh_vector``, through ``_softcap_row``) against float64, its special values and
its masked tail (the softcapped calls against the reference: tests/decoding)."""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from dotattn.kernels import _cpu_decode_kernels as K


@njit(cache=False)
def _softcap(s, i0, count, cap):
    K._softcap_row(s, i0, count, cap)


def _ulps(got, x):
    ref = np.tanh(x.astype(np.float64))
    ulp = np.spacing(np.abs(ref).astype(np.float32)).astype(np.float64)
    return np.abs(got.astype(np.float64) - ref) / ulp


def test_tanh_within_a_few_ulps_of_float64():
    x = np.concatenate([
        np.linspace(-12.0, 12.0, 1_000_001, dtype=np.float32),
        np.geomspace(1e-30, 1.0, 100_001).astype(np.float32),
        -np.geomspace(1e-38, 20.0, 100_001).astype(np.float32),
        np.nextafter(np.float32(0.55), np.float32([0.0, 1.0])),  # both sides of the series' bound
    ])
    got = x.copy()
    _softcap(got, 0, got.size, 1.0)
    worst = _ulps(got, x).max()
    assert worst <= 2.5, f"tanh off by {worst:.2f} ulp"
    assert _ulps(np.tanh(x), x).max() <= 2.0  # NumPy's float32 tanh, for scale (≈ 1.4 ulp)


def test_tanh_special_values():
    x = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45, 9.5, -30.0, 1e30], np.float32)
    got = x.copy()
    _softcap(got, 0, got.size, 1.0)
    assert got[0] == 0.0 and not np.signbit(got[0])
    assert got[1] == 0.0 and np.signbit(got[1])
    assert got[2] == 1.0 and got[3] == -1.0
    assert np.isnan(got[4])
    assert got[5] == x[5] and got[6] == x[6]  # tanh(x) = x below x³/3's reach
    assert got[7] == np.float32(np.tanh(9.5)) and got[8] == -1.0 and got[9] == 1.0


@pytest.mark.parametrize("count", [1, 15, 16, 17, 40])
def test_softcap_row_touches_only_its_range(count):
    rng = np.random.default_rng(count)
    s = (rng.standard_normal(70) * 20).astype(np.float32)
    before = s.copy()
    _softcap(s, 3, count, 5.0)
    want = (np.float32(5.0) * np.tanh(before[3 : 3 + count].astype(np.float64) / 5.0)).astype(np.float32)
    np.testing.assert_allclose(s[3 : 3 + count], want, rtol=3e-7, atol=0)
    np.testing.assert_array_equal(s[:3], before[:3])
    np.testing.assert_array_equal(s[3 + count :], before[3 + count :])


def test_float64_scores_use_libm():
    s = np.linspace(-40, 40, 33)
    want = 7.0 * np.tanh(s / 7.0)
    _softcap(s, 0, s.size, 7.0)
    np.testing.assert_allclose(s, want, rtol=1e-15, atol=0)
