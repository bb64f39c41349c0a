"""The float32 forward's lazy rescaling (kernels/_cpu_primitives.py, LAZY_LOG2).

After a row's first tile the forward exponentiates each key tile against the running shift
and takes the tile's maximum in the same pass; it keeps the shift when that maximum exceeds
it by at most LAZY_LOG2 (base 2) and otherwise recomputes the tile's scores and takes the
exact two-pass step.  These cases put the growth of the maximum on either side of that
threshold, far past it (P would overflow float32), and NaN/+inf scores in a later tile
(which the one pass must still find), against the float64 reference with the 2× naive rule.
"""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

import dotattn
from dotattn.kernels import _cpu_primitives as P

import helpers as H

L = 1536  # three key tiles of the dense float32 forward (256 × 512), six of the causal one (256 × 256)


def _designed(scores_per_key, seed=0, v_scale=1.0):
    """q, k, v with score ``q_i·k_j = scores_per_key[j]·(1 + small noise)`` (scale 1)."""
    rng = np.random.default_rng(seed)
    q = np.zeros((1, 2, L, 64), dtype=np.float32)
    q[..., 0] = 1.0
    q[..., 1:] = 0.01 * rng.standard_normal((1, 2, L, 63))
    k = np.zeros((1, 2, L, 64), dtype=np.float32)
    k[..., 0] = scores_per_key
    k[..., 1:] = 0.01 * rng.standard_normal((1, 2, L, 63))
    v = (v_scale * rng.standard_normal((1, 2, L, 64))).astype(np.float32)
    return q, k, v


def _check(q, k, v, **options):
    out, lse = dotattn.attention(q, k, v, scale=1.0, return_lse=True, implementation="cpu", **options)
    ref_out, ref_lse = H.reference(q, k, v, scale=1.0, **options)
    nai_out, nai_lse = H.naive(q, k, v, scale=1.0, **options)
    H.assert_close_to_reference(out, ref_out, nai_out, name="out")
    H.assert_close_to_reference(lse, ref_lse, nai_lse, name="lse", magnitude=float(np.abs(ref_lse).max()))


@pytest.mark.parametrize("causal", [False, True], ids=["dense", "causal"])
@pytest.mark.parametrize("excess", [0.5, 7.0, P.LAZY_LOG2 - 0.01, P.LAZY_LOG2 + 0.5, 40.0, 300.0])
def test_the_max_grows_in_a_later_tile(excess, causal):
    """The first tile's scores lie in [0, 1]; keys from 600 on jump by ``excess`` (base 2):
    kept (P up to 2^excess) below the threshold, the exact step above it; at 300 a lazy P
    would overflow float32."""
    rng = np.random.default_rng(1)
    s = rng.uniform(0.0, 1.0, L)
    s[600:] += excess * np.log(2.0)
    _check(*_designed(s.astype(np.float32)), causal=causal)


@pytest.mark.parametrize("causal", [False, True], ids=["dense", "causal"])
def test_logits_growing_along_the_keys(causal):
    """Every tile raises the maximum past the threshold: every tile takes the exact step."""
    s = np.linspace(0.0, 400.0, L, dtype=np.float32)
    _check(*_designed(s), causal=causal)


def test_large_values_with_p_above_one():
    """P up to 2^(LAZY_LOG2 − 0.01) times values near 1e30 stays finite and accurate."""
    rng = np.random.default_rng(2)
    s = rng.uniform(0.0, 1.0, L)
    s[900:] += (P.LAZY_LOG2 - 0.01) * np.log(2.0)
    _check(*_designed(s.astype(np.float32), v_scale=1e30))


@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
def test_a_nonfinite_score_in_a_later_tile_reaches_the_row(value):
    """A NaN (or +inf) score first met in the third key tile still makes its rows NaN, as
    the numpy backend does; the other rows stay exact."""
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((1, 2, L, 64)).astype(np.float32) for _ in range(3))
    k[0, 1, 1300, 0] = value
    q[0, 1, :, 0] = np.abs(q[0, 1, :, 0]) + 0.1  # +inf·q > 0: +inf scores, never inf − inf
    for causal in (False, True):
        ours = dotattn.attention(q, k, v, causal=causal, implementation="cpu")
        theirs = dotattn.attention(q, k, v, causal=causal, implementation="numpy")
        np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
        assert np.isnan(ours[0, 1, 1300:]).all()
        ref_out, _ = H.reference(q[:, :1], k[:, :1], v[:, :1], causal=causal)
        nai_out, _ = H.naive(q[:, :1], k[:, :1], v[:, :1], causal=causal)
        H.assert_close_to_reference(ours[:, :1], ref_out, nai_out, name="finite head")


@njit
def _lazy_pass(ST, c2, m, tile_sum, tile_max):
    P._exp2_sum_max_f32(ST, c2, m, tile_sum, tile_max)


@njit
def _exact_pass(ST, c2, m, row_sum):
    P._exp2_sum_core_f32(ST, c2, m, row_sum)


@pytest.mark.parametrize("rows", [1, 6, 7, 512])
def test_the_one_pass_matches_the_exact_steps_exp_and_sum(rows):
    """The lazy pass (rows visited in pairs, 16-lane strips, a plain loop for the last
    columns) gives the exact step's P and row sums bit for bit, and the column maximum with
    NaN sticky and −inf ignored."""
    rng = np.random.default_rng(rows)
    width = 256 + 5
    S0 = (30 * rng.standard_normal((rows, width))).astype(np.float32)
    S0[0, 0] = -np.inf
    S0[-1, 3] = np.nan
    m = np.full(width, 3.0, np.float32)
    c2 = np.float32(0.18)
    ST, tile_sum, tile_max = S0.copy(), np.empty(width, np.float32), np.empty(width, np.float32)
    _lazy_pass(ST, c2, m, tile_sum, tile_max)
    ST2, row_sum = S0.copy(), np.zeros(width, np.float32)
    _exact_pass(ST2, c2, m, row_sum)
    H.assert_bitwise_equal(ST, ST2, "P")
    H.assert_bitwise_equal(tile_sum, row_sum, "row sums")
    assert np.isnan(tile_max[3])
    expected = S0.max(axis=0)
    keep = np.arange(width) != 3
    H.assert_bitwise_equal(tile_max[keep], expected[keep], "column max")
