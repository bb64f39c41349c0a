"""NumPy ``MultiHeadAttention`` against a hand-written float64 computation."""

from __future__ import annotations

import helpers as H
import numpy as np
import pytest

from dotattn import MultiHeadAttention
from dotattn.errors import AttentionTypeError, AttentionValueError


def mha_by_hand(p, query, key, value, Hq, Hkv, Dh, *, causal=False, kv_len=None, q_len=None):
    """Float64, one sequence (2-D inputs), one head at a time, loops instead of reshapes.

    ``p`` holds the parameters (biases may be absent).  Causal is bottom-right.
    """
    f = {n: np.asarray(a, dtype=np.float64) for n, a in p.items()}
    query, key, value = (np.asarray(x, dtype=np.float64) for x in (query, key, value))
    Lq, Lk = len(query), len(key)
    kv_len = Lk if kv_len is None else kv_len
    q_len = Lq if q_len is None else q_len
    Q = query @ f["w_q"] + f.get("b_q", 0.0)
    K = key @ f["w_k"] + f.get("b_k", 0.0)
    V = value @ f["w_v"] + f.get("b_v", 0.0)
    heads = []
    for h in range(Hq):
        g = h // (Hq // Hkv)
        q, k, v = Q[:, h * Dh : (h + 1) * Dh], K[:, g * Dh : (g + 1) * Dh], V[:, g * Dh : (g + 1) * Dh]
        head = np.zeros((Lq, Dh))
        for i in range(q_len):
            visible = [j for j in range(kv_len) if not causal or j <= i + kv_len - q_len]
            if not visible:
                continue
            s = np.array([q[i] @ k[j] / np.sqrt(Dh) for j in visible])
            w = np.exp(s - s.max())
            w /= w.sum()
            head[i] = sum(wj * v[j] for wj, j in zip(w, visible))
        heads.append(head)
    out = np.concatenate(heads, axis=1) @ f["w_o"] + f.get("b_o", 0.0)
    out[q_len:] = 0.0
    return out


def test_self_attention_matches_the_formula():
    mha = MultiHeadAttention(32, 4, seed=1, dtype=np.float64)
    x = np.random.default_rng(0).standard_normal((9, 32))
    np.testing.assert_allclose(mha(x), mha_by_hand(mha.params, x, x, x, 4, 4, 8), rtol=1e-10, atol=1e-12)


def test_cross_attention_with_other_key_and_value_dims():
    mha = MultiHeadAttention(24, 3, kdim=10, vdim=7, head_dim=5, seed=2, dtype=np.float64)
    rng = np.random.default_rng(1)
    x, key, value = rng.standard_normal((6, 24)), rng.standard_normal((11, 10)), rng.standard_normal((11, 7))
    expected = mha_by_hand(mha.params, x, key, value, 3, 3, 5)
    np.testing.assert_allclose(mha(x, key, value), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("Hkv", [1, 2], ids=["mqa", "gqa"])
def test_grouped_query_attention(Hkv):
    mha = MultiHeadAttention(16, 4, num_kv_heads=Hkv, seed=3, dtype=np.float64)
    assert mha.params["w_k"].shape == (16, Hkv * 4)
    x = np.random.default_rng(2).standard_normal((7, 16))
    np.testing.assert_allclose(mha(x), mha_by_hand(mha.params, x, x, x, 4, Hkv, 4), rtol=1e-10, atol=1e-12)


def test_without_bias():
    mha = MultiHeadAttention(16, 2, bias=False, seed=4, dtype=np.float64)
    assert set(mha.params) == {"w_q", "w_k", "w_v", "w_o"}
    x = np.random.default_rng(3).standard_normal((5, 16))
    np.testing.assert_allclose(mha(x), mha_by_hand(mha.params, x, x, x, 2, 2, 8), rtol=1e-10, atol=1e-12)
    with pytest.raises(AttentionValueError, match="built with bias=False"):
        mha.set_weights(b_q=np.zeros(16))


def test_weights_settable_from_arrays():
    mha = MultiHeadAttention(12, 2, seed=5, dtype=np.float64)
    rng = np.random.default_rng(4)
    new = {name: rng.standard_normal(arr.shape) for name, arr in mha.params.items()}
    mha.set_weights(**new)
    for name, arr in mha.get_weights().items():
        np.testing.assert_array_equal(arr, new[name])
    x = rng.standard_normal((4, 12))
    np.testing.assert_allclose(mha(x), mha_by_hand(new, x, x, x, 2, 2, 6), rtol=1e-10, atol=1e-12)


def test_causal_and_padding_per_sequence():
    mha = MultiHeadAttention(16, 2, num_kv_heads=1, seed=6, dtype=np.float64)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 8, 16))  # (B, L, E)
    lengths = np.array([8, 5, 1])
    out = mha(x, causal=True, q_lengths=lengths, kv_lengths=lengths)
    assert out.shape == (3, 8, 16)
    for b, n in enumerate(lengths):
        expected = mha_by_hand(mha.params, x[b], x[b], x[b], 2, 1, 8, causal=True, kv_len=n, q_len=n)
        np.testing.assert_allclose(out[b], expected, rtol=1e-10, atol=1e-12)


def test_key_padding_equals_truncated_keys():
    mha = MultiHeadAttention(16, 4, seed=7)
    rng = np.random.default_rng(6)
    x, memory = rng.standard_normal((2, 5, 16)).astype(np.float32), rng.standard_normal((2, 9, 16)).astype(np.float32)
    memory[1, 6:] = np.nan  # padding must not leak
    out = mha(x, memory, kv_lengths=np.array([9, 6]))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[1], mha(x[1], memory[1, :6]), rtol=1e-5, atol=1e-6)


def test_return_weights_and_batch_dims():
    mha = MultiHeadAttention(8, 2, seed=8)
    x = np.random.default_rng(7).standard_normal((2, 3, 6, 8)).astype(np.float32)
    out, weights = mha(x, return_weights=True)
    assert out.shape == (2, 3, 6, 8) and out.dtype == np.float32
    assert weights.shape == (2, 3, 2, 6, 6)
    np.testing.assert_allclose(weights.sum(axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(out[1, 2], mha(x[1, 2]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float16, H.BFLOAT16, np.float32], ids=H.dtype_name)
def test_low_precision_inputs_keep_their_dtype(dtype):
    mha = MultiHeadAttention(16, 2, seed=9, dtype=np.float64)
    x = np.random.default_rng(8).standard_normal((5, 16))
    out = mha(x.astype(dtype))
    assert out.dtype == dtype
    tol = {np.dtype(np.float16): 2e-2, H.BFLOAT16: 1e-1, np.dtype(np.float32): 1e-5}[np.dtype(dtype)]
    np.testing.assert_allclose(out.astype(np.float64), mha(x), atol=tol)


def test_initialization_is_a_function_of_the_seed():
    a, b, c = MultiHeadAttention(16, 2, seed=1), MultiHeadAttention(16, 2, seed=1), MultiHeadAttention(16, 2, seed=2)
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name])
    assert not np.array_equal(a.params["w_q"], c.params["w_q"])
    limit = np.sqrt(6 / 32)
    assert np.abs(a.params["w_q"]).max() <= limit and (a.params["b_o"] == 0).all()
    assert a.params["w_q"].dtype == np.float32


@pytest.mark.parametrize(
    "kwargs,exc_type,fragment",
    [
        (dict(embed_dim=10, num_heads=3), AttentionValueError, "embed_dim=10 is not divisible by num_heads=3"),
        (dict(embed_dim=12, num_heads=4, num_kv_heads=3), AttentionValueError, "multiple of num_kv_heads=3"),
        (dict(embed_dim=0, num_heads=1), AttentionValueError, "embed_dim must be ≥ 1"),
        (dict(embed_dim=8.0, num_heads=1), AttentionTypeError, "embed_dim must be an int"),
        (dict(embed_dim=8, num_heads=2, dtype=np.int32), AttentionTypeError, "dtype must be float16"),
        # NumPy's own TypeError before, and None gave float64 parameters (np.dtype(None))
        (dict(embed_dim=8, num_heads=2, dtype="foo"), AttentionTypeError, "dtype must be float16.*got 'foo'"),
        (dict(embed_dim=8, num_heads=2, dtype=None), AttentionTypeError, "dtype must be float16.*got None"),
    ],
    ids=["indivisible", "gqa", "zero", "float", "dtype", "dtype-name", "dtype-none"],
)
def test_constructor_errors(kwargs, exc_type, fragment):
    with pytest.raises(exc_type, match=fragment):
        MultiHeadAttention(**kwargs)


def test_call_and_weight_errors():
    mha = MultiHeadAttention(8, 2, kdim=6)
    x = np.ones((3, 8), np.float32)
    with pytest.raises(AttentionValueError, match=r"query must have last dim embed_dim=8, got shape \(3, 7\)"):
        mha(np.ones((3, 7), np.float32), np.ones((4, 6), np.float32))
    with pytest.raises(AttentionValueError, match="key must have last dim kdim=6"):
        mha(x)
    with pytest.raises(AttentionTypeError, match="query must be a numpy.ndarray"):
        mha([[1.0] * 8])
    with pytest.raises(AttentionTypeError, match="share one dtype"):
        mha(x, np.ones((4, 6)), np.ones((4, 8), np.float32))
    with pytest.raises(AttentionValueError, match="key and value must have the same leading dims"):
        mha(x, np.ones((4, 6), np.float32), np.ones((5, 8), np.float32))
    with pytest.raises(AttentionValueError, match=r"w_q must have shape \(8, 8\), got \(8, 4\)"):
        mha.set_weights(w_q=np.ones((8, 4)))
    with pytest.raises(AttentionValueError, match="unknown parameter 'w_x'"):
        mha.set_weights(w_x=np.ones((8, 4)))
    with pytest.raises(AttentionTypeError, match="w_o must be a float array"):
        mha.set_weights(w_o=np.ones((8, 8), dtype=np.int64))


def test_a_refused_set_weights_changes_nothing():
    """set_weights stored each array as it went: a refused w_k left the accepted w_q replaced."""
    mha = MultiHeadAttention(16, 2)
    before = mha.get_weights()
    with pytest.raises(AttentionValueError, match="w_k must have shape"):
        mha.set_weights(w_q=np.ones((16, 16)), w_k=np.zeros((3, 3)))
    assert all(np.array_equal(mha.params[n], before[n]) for n in before)
    mha.set_weights(w_q=np.ones((16, 16)))
    assert (mha.params["w_q"] == 1).all()
