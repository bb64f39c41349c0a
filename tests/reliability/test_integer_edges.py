"""Integer options at their edges: clamped where that is the meaning, refused with the real
value otherwise — never wrapped (int64 overflow) and never a bare OverflowError."""

from __future__ import annotations

import helpers as H
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dotattn
from dotattn.errors import AttentionTypeError, AttentionValueError

BACKENDS = H.backends_under_test()
BIG = [2**31, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 10**30]


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_window_sides_mean_unbounded(backend):
    q, k, v = H.random_qkv(0, Lq=7, Lk=9)
    for big in (2**63 - 1, 10**30, np.uint64(2**64 - 1), np.int64(2**62)):
        for window, same in (((0, big), dict(window=(0, None))), ((big, 0), dict(window=(None, 0))),
                             ((big, big), {})):
            out, lse = dotattn.attention(q, k, v, window=window, return_lse=True, implementation=backend)
            ref_out, ref_lse = H.reference(q, k, v, **same)
            H.assert_close_to_reference(out, ref_out, H.naive(q, k, v, **same)[0], name=f"{backend} {window}")
            H.assert_close_to_reference(lse, ref_lse, name=f"{backend} lse {window}")


@settings(max_examples=40)
@given(left=st.one_of(st.none(), st.integers(0, 2**64)), right=st.one_of(st.none(), st.integers(0, 2**64)),
       Lq=st.integers(1, 6), Lk=st.integers(1, 6))
def test_any_window_side_matches_its_clamped_value(left, right, Lq, Lk):
    """A side ≥ Lq + Lk hides nothing: the same result as ``None`` on that side (numpy vs reference)."""
    q, k, v = H.random_qkv(1, Lq=Lq, Lk=Lk)
    clamp = [None if s is None or s >= Lq + Lk else s for s in (left, right)]
    out = dotattn.attention(q, k, v, window=(left, right), causal="top_left", implementation="numpy")
    ref, _ = H.reference(q, k, v, window=tuple(clamp), causal="top_left")
    H.assert_close_to_reference(out, ref, H.naive(q, k, v, window=tuple(clamp), causal="top_left")[0])


@pytest.mark.parametrize("big", BIG[3:])
def test_lengths_report_their_real_value(big):
    q, k, v = H.random_qkv(0, batch=(2,))
    for name in ("q_lengths", "kv_lengths"):
        for lengths in (np.array([3, big], dtype=np.uint64 if big < 2**64 else object), [3, big]):
            with pytest.raises(AttentionValueError, match=rf"\b{big}\b"):
                dotattn.attention(q, k, v, **{name: lengths})
        with pytest.raises(AttentionValueError, match=rf"\b{big}\b"):
            dotattn.attention(q[0], k[0], v[0], **{name: big})


def test_unsigned_lengths_within_range_work():
    q, k, v = H.random_qkv(0, batch=(2,), Lq=5, kv_lengths=[3, 5])
    out = dotattn.attention(q, k, v, kv_lengths=np.array([3, 5], np.uint64))
    ref, _ = H.reference(q, k, v, kv_lengths=np.array([3, 5]))
    H.assert_close_to_reference(out, ref, H.naive(q, k, v, kv_lengths=np.array([3, 5]))[0])


def test_segment_ids_beyond_int64_are_refused_not_wrapped():
    """2**64 − 1 would wrap to −1 and match a real −1 id of the other side."""
    q, k, v = H.random_qkv(0, batch=(1,), Lq=2, Lk=2)
    q_ids = np.array([[2**64 - 1, 0]], dtype=np.uint64)
    kv_ids = np.array([[-1, 0]], dtype=np.int64)
    with pytest.raises(AttentionValueError, match="segment_ids.*18446744073709551615"):
        dotattn.attention(q, k, v, segment_ids=(q_ids, kv_ids))


@pytest.mark.parametrize("name", ["scale", "softcap", "dropout_p"])
def test_huge_int_floats_are_a_value_error(name):
    q, k, v = H.random_qkv(0)
    with pytest.raises(AttentionValueError, match=name):
        dotattn.attention(q, k, v, **{name: 10**400})


@pytest.mark.parametrize("seed", [-1, 2**63, 2**64 - 1, 10**30])
def test_seed_out_of_range(seed):
    q, k, v = H.random_qkv(0)
    with pytest.raises(AttentionValueError, match=rf"seed must be in \[0, 2\*\*63\), got {seed}"):
        dotattn.attention(q, k, v, dropout_p=0.1, seed=seed)


def test_max_weights_bytes_edges():
    q, k, v = H.random_qkv(0)
    with pytest.raises(AttentionValueError, match="max_weights_bytes must be ≥ 0, got -1"):
        dotattn.attention(q, k, v, return_weights=True, max_weights_bytes=-1)
    with pytest.raises(AttentionValueError, match="over max_weights_bytes=0"):
        dotattn.attention(q, k, v, return_weights=True, max_weights_bytes=0)
    _, w = dotattn.attention(q, k, v, return_weights=True, max_weights_bytes=10**30)  # past int64: no limit
    assert w.shape == (2, 2, 5, 5)


# =================================================================================
# native JAX (implementation="jax"): ids and lengths keep their values in the kernel
# =================================================================================

# Ids 0 and 2**32 (and 5 and 2**32 + 5) are different segments; an int32 cast would merge them.
_WIDE_Q_IDS = np.array([[0, 0, 2**32, 2**32, 5], [2**33, 7, 7, 2**32 + 5, 5]], dtype=np.int64)
_WIDE_KV_IDS = np.array([[0, 2**32, 2**32, 0, 5, 2**32 + 5], [7, 5, 2**33, 2**32 + 5, 7, 5]], dtype=np.int64)


def _check_wide_ids(out, q, k, v):
    ids = (_WIDE_Q_IDS, _WIDE_KV_IDS)
    ref, _ = H.reference(q, k, v, segment_ids=ids)
    H.assert_close_to_reference(np.asarray(out), ref, H.naive(q, k, v, segment_ids=ids)[0], name="jax wide ids")


def test_native_jax_segment_ids_past_int32_are_not_wrapped():
    """NumPy ids through the jax backend and the JAX front end, with and without jax_enable_x64
    (int64 in the kernel, or dense ranks of the values)."""
    jax = pytest.importorskip("jax")
    q, k, v = H.random_qkv(3, batch=(2,), Lq=5, Lk=6)
    for x64 in (False, True):
        with jax.enable_x64(x64):
            _check_wide_ids(dotattn.attention(q, k, v, segment_ids=(_WIDE_Q_IDS, _WIDE_KV_IDS), implementation="jax"), q, k, v)
            jq, jk, jv = (jax.numpy.asarray(x) for x in (q, k, v))
            _check_wide_ids(dotattn.attention(jq, jk, jv, segment_ids=(_WIDE_Q_IDS, _WIDE_KV_IDS), implementation="jax"), q, k, v)


def test_native_jax_traced_int64_ids_and_lengths_keep_their_width():
    """Under jit with jax_enable_x64, int64 ids past int32 compare as int64, and an int64 length
    past int32 clamps to L (a cast first made 2**32 + 3 into 3)."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    q, k, v = H.random_qkv(3, batch=(2,), Lq=5, Lk=6)
    with jax.enable_x64(True):
        f = jax.jit(lambda q, k, v, a, b: dotattn.attention(q, k, v, segment_ids=(a, b), implementation="jax"))
        _check_wide_ids(f(*(jnp.asarray(x) for x in (q, k, v, _WIDE_Q_IDS, _WIDE_KV_IDS))), q, k, v)
        g = jax.jit(lambda q, k, v, n: dotattn.attention(q, k, v, kv_lengths=n, implementation="jax"))
        out = g(*(jnp.asarray(x) for x in (q, k, v)), jnp.asarray([2**32 + 3, 4], jnp.int64))
        kv_len = np.array([6, 4])  # the clamped meaning of a traced length past Lk
        ref, _ = H.reference(q, k, v, kv_lengths=kv_len)
        H.assert_close_to_reference(np.asarray(out), ref, H.naive(q, k, v, kv_lengths=kv_len)[0])


def test_native_jax_ids_that_cannot_be_compared_exactly_are_refused():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    q, k, v = (jnp.asarray(x) for x in H.random_qkv(3, batch=(2,), Lq=5, Lk=6))
    with jax.enable_x64(False):
        # uint32 beside int32: one of them would wrap in the other's type
        ids_q, ids_k = jnp.zeros((2, 5), jnp.uint32), jnp.zeros((2, 6), jnp.int32)
        with pytest.raises(AttentionTypeError, match=r"segment_ids\[0\] \(query ids\) has dtype uint32"):
            dotattn.attention(q, k, v, segment_ids=(ids_q, ids_k), implementation="jax")
        # NumPy ids past int32 beside traced JAX ids: JAX itself would truncate them
        with pytest.raises(AttentionValueError, match=r"segment_ids\[1\] \(key ids\) holds values outside int32"):
            jax.jit(lambda a: dotattn.attention(q, k, v, segment_ids=(a, _WIDE_KV_IDS), implementation="jax"))(ids_k[:, :5])
