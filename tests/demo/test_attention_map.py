"""dotattn.attention_map: exact block averages of the reference's probabilities, O(N) memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dotattn
from dotattn import semantics
from dotattn.kernels import reference


def _pooled_reference(q, k, pool, **options) -> np.ndarray:
    """Pool the float64 reference's full weights: the oracle attention_map must equal."""
    v = np.zeros(k.shape[:-1] + (1,), dtype=k.dtype)
    call = semantics.normalize(q, k, v, **options)
    p = reference.probabilities(call)  # (B, Hq, Lq, Lk)
    bq, bk = pool
    rows, cols = -(-call.Lq // bq), -(-call.Lk // bk)
    padded = np.pad(p, ((0, 0), (0, 0), (0, rows * bq - call.Lq), (0, cols * bk - call.Lk)))
    sums = padded.reshape(call.B, call.Hq, rows, bq, cols, bk).sum(axis=(3, 5))
    counts = np.minimum(bq, call.Lq - np.arange(rows) * bq)[:, None] * np.minimum(bk, call.Lk - np.arange(cols) * bk)
    return semantics.finalize_pairwise(call, sums / counts)


def _qk(rng, shape_q, shape_k, dtype=np.float32):
    return rng.standard_normal(shape_q).astype(dtype), rng.standard_normal(shape_k).astype(dtype)


def _assert_maps_equal(ours, ref, dtype):
    assert ours.shape == ref.shape
    assert ours.dtype == (np.float64 if dtype == np.float64 else np.float32)
    # Averages of probabilities in [0, 1]: float32 exp/LSE rounding, a few ulps.
    tol = 1e-12 if dtype == np.float64 else 2e-6
    err = np.abs(ours - ref)
    worst = np.unravel_index(np.argmax(err), err.shape)
    assert err.max() <= tol, f"max |ours − ref| = {err.max():.3g} at {worst}: {ours[worst]} vs {ref[worst]}"


OPTION_CASES = {
    "plain": {},
    "causal-bottom-right": {"causal": True},
    "causal-top-left": {"causal": "top_left"},
    "window": {"window": (9, 3)},
    "softcap-scale": {"softcap": 5.0, "scale": 0.7},
    "lengths": {"q_lengths": np.array([37, 0]), "kv_lengths": np.array([50, 13])},
    "segments": {"segment_ids": np.array([[0] * 20 + [1] * 17 + [2] * 13] * 2)},
}


@pytest.mark.parametrize("name", list(OPTION_CASES))
def test_matches_pooled_reference_weights(name):
    rng = np.random.default_rng(1)
    q, k = _qk(rng, (2, 4, 50, 19), (2, 2, 50, 19))  # GQA 4/2, odd sizes
    options = dict(OPTION_CASES[name])
    ours = dotattn.attention_map(q, k, pool=(8, 7), **options)
    _assert_maps_equal(ours, _pooled_reference(q, k, (8, 7), **options), np.float32)


def test_mask_bias_alibi_blhd_float64():
    rng = np.random.default_rng(2)
    q, k = _qk(rng, (3, 41, 2, 8), (3, 66, 2, 8), np.float64)  # layout blhd
    mask = rng.random((3, 2, 41, 66)) < 0.7
    bias = rng.standard_normal((2, 41, 66))
    options = dict(mask=mask, bias=bias, alibi_slopes=np.array([0.5, 0.125]), layout="blhd")
    ours = dotattn.attention_map(q, k, pool=(5, 11), **options)
    assert ours.shape == (3, 2, 9, 6)  # lse/weights/maps ignore layout: (..., Hq, ·, ·)
    _assert_maps_equal(ours, _pooled_reference(q, k, (5, 11), **options), np.float64)


@settings(max_examples=25, deadline=None)
@given(
    lq=st.integers(1, 70),
    lk=st.integers(1, 70),
    bq=st.integers(1, 80),
    bk=st.integers(1, 80),
    causal=st.sampled_from([False, "bottom_right", "top_left"]),
    seed=st.integers(0, 2**16),
)
def test_any_shape_and_pool(lq, lk, bq, bk, causal, seed):
    rng = np.random.default_rng(seed)
    q, k = _qk(rng, (lq, 6), (lk, 6))  # 2-D: one head, no batch
    ours = dotattn.attention_map(q, k, pool=(bq, bk), causal=causal)
    assert ours.shape == (-(-lq // bq), -(-lk // bk))
    _assert_maps_equal(ours, _pooled_reference(q, k, (bq, bk), causal=causal), np.float32)


def test_pool_one_gives_the_weights_and_rows_sum_to_one():
    rng = np.random.default_rng(3)
    q, k = _qk(rng, (2, 33, 16), (2, 45, 16))
    _, weights = dotattn.attention(q, k, np.zeros((2, 45, 4), np.float32), return_weights=True)
    np.testing.assert_allclose(dotattn.attention_map(q, k, pool=(1, 1)), weights, atol=1e-6)
    whole_rows = dotattn.attention_map(q, k, pool=(1, 45))
    np.testing.assert_allclose(whole_rows[..., 0] * 45, 1.0, atol=1e-5)


def test_fully_masked_rows_are_zero_not_nan():
    rng = np.random.default_rng(4)
    q, k = _qk(rng, (1, 1, 16, 8), (1, 1, 16, 8))
    out = dotattn.attention_map(q, k, pool=(4, 4), kv_lengths=np.array([0]))
    assert out.shape == (1, 1, 4, 4) and not out.any()


def test_memory_stays_far_below_the_full_matrix():
    rng = np.random.default_rng(5)
    n = 4096
    q, k = _qk(rng, (1, 1, n, 16), (1, 1, n, 16))
    tracemalloc.start()
    try:
        out = dotattn.attention_map(q, k, pool=(64, 64), causal=True, implementation="numpy")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    full = n * n * 4
    assert peak < full / 8, f"peak {peak / 2**20:.1f} MiB vs the {full / 2**20:.0f} MiB matrix"
    # causal: blocks above the diagonal are exactly 0, diagonal blocks average about a half
    assert out.shape == (1, 1, 64, 64) and not np.triu(out[0, 0], 1).any()
    np.testing.assert_allclose(out[0, 0].sum(axis=1) * 64, 1.0, atol=1e-4)


@pytest.mark.parametrize(
    "pool, error, match",
    [
        ((4,), ValueError, r"pool must be a pair \(bq, bk\) of ints ≥ 1, got \(4,\)"),
        ((0, 4), ValueError, "pool's bq must be ≥ 1, got 0"),
        ((4, 2.5), TypeError, "pool's bk must be an int ≥ 1, got 2.5"),
        ((True, 4), TypeError, "pool's bq must be an int ≥ 1, got True"),
    ],
)
def test_bad_pool(pool, error, match):
    q = np.zeros((4, 2), np.float32)
    with pytest.raises(error, match=match):
        dotattn.attention_map(q, q, pool=pool)


def test_bad_arrays_are_refused_by_name():
    q = np.zeros((4, 2), np.float32)
    with pytest.raises(TypeError, match="attention_map takes NumPy arrays, got k of type builtins.list"):
        dotattn.attention_map(q, [[0.0, 0.0]], pool=(1, 1))
    with pytest.raises(ValueError, match="q and k must have the same head dim D"):
        dotattn.attention_map(q, np.zeros((4, 3), np.float32), pool=(1, 1))
    with pytest.raises(TypeError, match="must have a floating dtype"):
        dotattn.attention_map(q.astype(np.int32), q.astype(np.int32), pool=(1, 1))
