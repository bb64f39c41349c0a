"""Every available backend against the float64 reference.

The hypothesis space covers shapes (2-D to 5-D, both layouts, Lq ≠ Lk, Dv ≠ D, GQA), all
four dtypes and every mask kind in combination; fixed cases cover the odd sizes (D = 59,
L = 97, 1025), the seeds' examples and pitfalls, fully-masked rows, NaN padding, determinism
and gradients (vs the reference's backward and vs finite differences).

A backend that declines a call must do so with ``UnsupportedCallError`` naming itself; that
is asserted instead of the comparison.
"""

from __future__ import annotations

import helpers as H
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dotattn
from dotattn import registry
from dotattn.errors import UnsupportedCallError
from dotattn.kernels.dropout import keep_block

BACKENDS = H.backends_under_test()
FLOAT_DTYPES = H.DTYPES


def test_reference_and_numpy_are_available():
    available = {row["name"] for row in dotattn.info() if row["available"]}
    assert {"reference", "numpy"} <= available


# =================================================================================
# the case space
# =================================================================================


def _pairwise_shape(draw, batch, Hq, Lq, Lk):
    """A shape broadcastable to (..., Hq, Lq, Lk)."""
    choices = [(Lq, Lk), (1, Lk), (Hq, Lq, Lk), (Hq, 1, Lk), batch + (Hq, Lq, Lk)]
    if batch:
        choices.append(batch + (1, 1, Lk))
    return draw(st.sampled_from(choices))


@st.composite
def cases(draw, max_len: int = 24, max_dim: int = 12):
    """A dict describing one attention call: sizes, dtype, layout and options."""
    ndim = draw(st.sampled_from([2, 3, 4, 5]))
    layout = draw(st.sampled_from(["bhld", "blhd"])) if ndim > 2 else "bhld"
    batch = {2: (), 3: (), 4: (draw(st.integers(1, 2)),), 5: (draw(st.integers(1, 2)), 2)}[ndim]
    if ndim == 2:
        Hkv, group = 1, 1
    else:
        Hkv, group = draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 3]))
    Hq = Hkv * group
    Lq = draw(st.integers(0 if draw(st.booleans()) else 1, max_len))
    Lk = draw(st.sampled_from([Lq, draw(st.integers(0, max_len))]))
    D = draw(st.integers(1, max_dim))
    Dv = draw(st.sampled_from([D, draw(st.integers(1, max_dim))]))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)

    opts = {}
    if layout != "bhld":
        opts["layout"] = layout
    causal = draw(st.sampled_from([False, False, True, "bottom_right", "top_left"]))
    if causal:
        opts["causal"] = causal
    if draw(st.booleans()):
        side = st.one_of(st.none(), st.integers(0, max(Lq, Lk) + 1))
        opts["window"] = (draw(side), draw(side))
    if draw(st.integers(0, 3)) == 0:
        opts["mask"] = H.random_mask(seed + 1, _pairwise_shape(draw, batch, Hq, Lq, Lk), 0.8)
    if draw(st.integers(0, 3)) == 0:
        shape = _pairwise_shape(draw, batch, Hq, Lq, Lk)
        opts["bias"] = rng.standard_normal(shape).astype(draw(st.sampled_from([np.float32, np.float64])))
    if draw(st.integers(0, 3)) == 0:
        opts["softcap"] = draw(st.sampled_from([0.5, 2.0, 30.0]))
    if draw(st.integers(0, 3)) == 0:
        opts["alibi_slopes"] = rng.uniform(0.0, 1.0, (Hq,) if not batch or draw(st.booleans()) else batch + (Hq,))
    if draw(st.integers(0, 4)) == 0:
        opts["scale"] = draw(st.sampled_from([0.0, 0.3, 1.0]))
    if draw(st.integers(0, 2)) == 0:
        opts["q_lengths"] = H.random_lengths(seed + 2, batch, Lq)
    if draw(st.integers(0, 2)) == 0:
        opts["kv_lengths"] = H.random_lengths(seed + 3, batch, Lk)
    if draw(st.integers(0, 3)) == 0:
        n_seg = draw(st.integers(1, 3))
        q_ids = np.sort(rng.integers(0, n_seg, batch + (Lq,)), axis=-1)
        if Lq == Lk and draw(st.booleans()):
            opts["segment_ids"] = q_ids
        else:
            opts["segment_ids"] = (q_ids, np.sort(rng.integers(0, n_seg, batch + (Lk,)), axis=-1))
    if draw(st.integers(0, 3)) == 0:
        opts["dropout_p"] = draw(st.sampled_from([0.1, 0.5]))
        opts["seed"] = draw(st.integers(0, 2**40))
    magnitude = draw(st.sampled_from([1.0, 1.0, 3.0]))
    q, k, v = H.random_qkv(
        seed,
        batch=batch,
        Hq=None if ndim == 2 else Hq,
        Hkv=None if ndim == 2 else Hkv,
        Lq=Lq,
        Lk=Lk,
        D=D,
        Dv=Dv,
        dtype=dtype,
        layout=layout,
        q_lengths=opts.get("q_lengths"),
        kv_lengths=opts.get("kv_lengths"),
        magnitude=magnitude,
    )
    return q, k, v, opts


def _forced(backend, fn, *args, **kwargs):
    """``fn(..., implementation=backend)``, or None when the backend declines the call properly."""
    try:
        return fn(*args, implementation=backend, **kwargs)
    except UnsupportedCallError as exc:
        assert f"{backend}:" in str(exc) or f"{backend!r}" in str(exc), str(exc)
        assert backend != "reference", f"the reference must take every call: {exc}"
        return None


def _out_shape(q, v, layout):
    """Expected output shape: q's with the last dim of v."""
    return q.shape[:-1] + v.shape[-1:]


def check_forward(backend, q, k, v, opts):
    got = _forced(backend, dotattn.attention, q, k, v, return_lse=True, **opts)
    if got is None:
        return
    out, lse = got
    ref_out, ref_lse = H.reference(q, k, v, **opts)
    naive_out, naive_lse = H.naive(q, k, v, **opts)
    assert out.shape == _out_shape(q, v, opts.get("layout")) and out.dtype == q.dtype
    compute = np.float64 if q.dtype == np.float64 else np.float32
    assert lse.dtype == compute and lse.shape == ref_lse.shape
    # The output's rounding grows with the scores' size: a score s rounded in the input dtype
    # moves its weight by ≈ ulp(s), so with |s| ≈ 145 (scale 1, large q and k) the order of the
    # q·k sums alone decides errors of 1e-4 in float32, and the naive baseline is sometimes
    # lucky there (2.4e-5 against our 7.2e-5 in a case hypothesis found).  As for the weights,
    # the floor scales with max|lse| (≈ max|s| + log of the keys near it): where scores are O(1)
    # that is a few units, about the floor's old max(1, max|out|).
    magnitude = float(np.abs(ref_lse[np.isfinite(ref_lse)]).max(initial=0.0))
    H.assert_close_to_reference(out, ref_out, naive_out, name=f"{backend} out", magnitude=magnitude)
    H.assert_close_to_reference(lse, ref_lse, naive_lse, name=f"{backend} lse")
    # Rows with no visible key (padded query rows included) are exactly 0.
    empty = np.isneginf(ref_lse)
    if opts.get("layout") == "blhd":
        empty = np.swapaxes(empty, -1, -2)
    assert (out[empty] == 0).all()


def check_backward(backend, q, k, v, opts):
    got = _forced(backend, dotattn.attention, q, k, v, return_lse=True, **opts)
    if got is None:
        return
    out, lse = got
    dout = np.random.default_rng(7).standard_normal(out.shape).astype(q.dtype)
    with_bias = opts.get("bias") is not None
    grads = _forced(backend, dotattn.attention_backward, q, k, v, out, lse, dout, return_dbias=with_bias, **opts)
    if grads is None:
        return
    ref = H.reference_grads(q, k, v, dout, **opts)
    nai = H.naive_grads(q, k, v, dout, **opts)
    names = ("dq", "dk", "dv", "dbias")
    for name, x, arr in zip(names, grads, (q, k, v, opts.get("bias"))):
        assert x.shape == arr.shape and x.dtype == arr.dtype, f"{name}: {x.shape}/{x.dtype}"
    # Gradients are differences of terms of size |q|·|k|·|v|·|dout|-ish: the floor scales with them.
    finite = [np.nan_to_num(np.abs(x.astype(np.float64))).max(initial=0.0) for x in (q, k, v, dout)]
    magnitude = max(finite) ** 2
    for name, g, r, n in zip(names, grads, ref, nai):
        # dbias comes back in the bias's dtype, which may be coarser than the inputs'.
        dtype = max(q.dtype, g.dtype, key=lambda d: H.FLOORS.get(np.dtype(d), 0.0))
        H.assert_close_to_reference(
            g, r, n, name=f"{backend} {name}", factor=3.0, dtype=dtype, magnitude=magnitude
        )


# =================================================================================
# hypothesis sweeps
# =================================================================================


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=150)
@given(case=cases())
def test_forward_matches_reference(backend, case):
    check_forward(backend, *case)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=100)
@given(case=cases(max_len=16, max_dim=8))
def test_backward_matches_reference(backend, case):
    check_backward(backend, *case)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=50)
@given(case=cases(max_len=16))
def test_weights_match_reference(backend, case):
    q, k, v, opts = case
    got = _forced(backend, dotattn.attention, q, k, v, return_lse=True, return_weights=True, **opts)
    if got is None:
        return
    out, lse, weights = got
    compute = np.float64 if q.dtype == np.float64 else np.float32
    assert weights.dtype == compute
    ref = H.reference_weights(q, k, v, **opts)
    # Tiled backends form weights as exp(s − lse) with a float32 LSE: their rounding grows with |lse|.
    _, ref_lse = H.reference(q, k, v, **opts)
    magnitude = float(np.abs(ref_lse[np.isfinite(ref_lse)]).max(initial=0.0))
    H.assert_close_to_reference(
        weights, ref, H.naive_weights(q, k, v, **opts), name=f"{backend} weights", magnitude=magnitude
    )
    # Same forward with or without the weights.
    out2, lse2 = dotattn.attention(q, k, v, return_lse=True, implementation=backend, **opts)
    H.assert_bitwise_equal(out, out2)
    H.assert_bitwise_equal(lse, lse2, "lse")


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=400)
@given(case=cases(max_len=70, max_dim=40))
def test_forward_matches_reference_exhaustive(backend, case):
    check_forward(backend, *case)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=200)
@given(case=cases(max_len=40, max_dim=24))
def test_backward_matches_reference_exhaustive(backend, case):
    check_backward(backend, *case)


# =================================================================================
# fixed cases: odd sizes
# =================================================================================

ODD_CASES = [
    # (dtype, causal, Lq, Lk, D, Dv, Hq, Hkv)
    (np.float32, False, 97, 1025, 59, 59, 2, 1),
    (np.float16, "bottom_right", 97, 1025, 59, 31, 2, 2),
    (np.float32, "top_left", 1025, 97, 59, 59, 1, 1),
    (H.BFLOAT16, True, 1025, 1025, 59, 59, 1, 1),
    (np.float64, "bottom_right", 97, 97, 59, 67, 4, 2),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtype,causal,Lq,Lk,D,Dv,Hq,Hkv",
    ODD_CASES,
    ids=[H.case_id(c[0], c[1] and f"causal_{c[1]}", Lq=c[2], Lk=c[3], D=c[4], H=f"{c[6]}x{c[7]}") for c in ODD_CASES],
)
def test_odd_sizes(backend, dtype, causal, Lq, Lk, D, Dv, Hq, Hkv):
    q, k, v = H.random_qkv(11, batch=(1,), Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D, Dv=Dv, dtype=dtype)
    check_forward(backend, q, k, v, {"causal": causal} if causal else {})


@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_sizes_backward(backend):
    q, k, v = H.random_qkv(12, batch=(1,), Hq=2, Hkv=1, Lq=97, Lk=131, D=59, Dv=33, dtype=np.float32)
    check_backward(backend, q, k, v, {"causal": True, "bias": np.random.default_rng(0).standard_normal((97, 131))})


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=H.dtype_name)
def test_odd_sizes_backward_large(backend, dtype):
    q, k, v = H.random_qkv(13, batch=(1,), Hq=2, Hkv=1, Lq=1025, Lk=1025, D=59, dtype=dtype, kv_lengths=[1000])
    check_backward(backend, q, k, v, {"causal": True, "kv_lengths": np.array([1000]), "window": (300, None)})


# =================================================================================
# the seeds' examples and pitfalls
# =================================================================================


def _softmax64(s):
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_2d_example(backend):
    rng = np.random.default_rng(0)
    Q, K, V = rng.random((3, 5)), rng.random((5, 5)), rng.random((5, 5))
    out = dotattn.attention(Q, K, V, implementation=backend)
    expected = _softmax64(Q @ K.T / np.sqrt(5)) @ V
    assert out.shape == (3, 5)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_value_dim_differs(backend):
    rng = np.random.default_rng(1)
    Q, K, V = rng.random((1, 10, 300)), rng.random((1, 10, 300)), rng.random((1, 10, 700))
    out = dotattn.attention(Q, K, V, implementation=backend)
    expected = _softmax64(Q[0] @ K[0].T / np.sqrt(300)) @ V[0]
    assert out.shape == (1, 10, 700)
    np.testing.assert_allclose(out[0], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=H.dtype_name)
def test_huge_logits_stay_finite(backend, dtype):
    # Logits of ±1e4: the seeds' softmax exp(s)/sum(exp(s)) overflows to inf/inf = NaN.
    q = np.array([[1.0], [-1.0]], dtype=dtype)
    k = np.array([[1e4], [-1e4], [0.0]], dtype=dtype)
    v = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=dtype)
    s = q @ k.T
    with np.errstate(over="ignore", invalid="ignore"):
        seed_p = np.exp(s) / np.exp(s).sum(axis=-1, keepdims=True)
    assert np.isnan(seed_p).any()
    out, lse = dotattn.attention(q, k, v, scale=1.0, return_lse=True, implementation=backend)
    np.testing.assert_array_equal(out, v[:2])
    np.testing.assert_allclose(lse, [1e4, 1e4], rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_zero_is_the_mean_of_visible_values(backend):
    q, k, v = H.random_qkv(3, batch=(), Hq=1, Lq=4, Lk=6, D=3, dtype=np.float64)
    out = dotattn.attention(q, k, v, scale=0.0, causal="top_left", implementation=backend)
    expected = np.stack([v[0, : i + 1].mean(axis=0) for i in range(4)])
    np.testing.assert_allclose(out[0], expected, rtol=1e-12)


# =================================================================================
# fully-masked rows, padding, empty sizes
# =================================================================================


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=H.dtype_name)
def test_fully_masked_rows_give_zero(backend, dtype):
    B, Hq, Lq, Lk = 2, 2, 6, 4
    q, k, v = H.random_qkv(5, batch=(B,), Hq=Hq, Lq=Lq, Lk=Lk, D=3, dtype=dtype)
    mask = np.ones((B, Hq, Lq, Lk), dtype=bool)
    mask[0, 1, 3] = False  # one row of one head
    kv_lengths = np.array([Lk, 0])  # every row of sequence 1
    opts = dict(mask=mask, kv_lengths=kv_lengths, causal="bottom_right")  # rows 0, 1 see no key (Lq > Lk)
    out, lse = dotattn.attention(q, k, v, return_lse=True, implementation=backend, **opts)
    empty = np.zeros((B, Hq, Lq), dtype=bool)
    empty[0, 1, 3] = True
    empty[1] = True
    empty[:, :, :2] = True
    assert (out[empty] == 0).all() and np.isneginf(lse[empty]).all()
    assert np.isfinite(lse[~empty]).all() and (np.abs(out[~empty]).sum(axis=-1) > 0).all()

    dout = np.ones_like(out)
    dq, dk, dv = dotattn.attention_backward(q, k, v, out, lse, dout, implementation=backend, **opts)
    for g in (dq, dk, dv):
        assert np.isfinite(g.astype(np.float64)).all()
    assert (dq[empty] == 0).all()
    assert (dk[1] == 0).all() and (dv[1] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_bias_masks_like_a_mask(backend):
    # Additive -inf masks (torch float masks) must not turn the online softmax's max into -inf − -inf = NaN.
    q, k, v = H.random_qkv(23, batch=(1,), Hq=2, Lq=600, Lk=600, D=8, dtype=np.float32)
    visible = np.ones((600, 600), dtype=bool)
    visible[5] = False
    visible[7, :300] = False
    visible[9, 100:] = False
    bias = np.where(visible, 0.0, -np.inf).astype(np.float32)
    out, lse = dotattn.attention(q, k, v, bias=bias, return_lse=True, implementation=backend)
    out_m, lse_m = dotattn.attention(q, k, v, mask=visible, return_lse=True, implementation=backend)
    np.testing.assert_allclose(out, out_m, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(lse_m))
    assert (out[0, :, 5] == 0).all()
    grads = dotattn.attention_backward(q, k, v, out, lse, np.ones_like(out), bias=bias, return_dbias=True, implementation=backend)
    for g in grads:
        assert not np.isnan(g).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_key_sequence(backend):
    q = np.ones((2, 3, 4), dtype=np.float32)
    k = np.ones((2, 0, 4), dtype=np.float32)
    v = np.ones((2, 0, 5), dtype=np.float32)
    out, lse = dotattn.attention(q, k, v, return_lse=True, implementation=backend)
    assert out.shape == (2, 3, 5) and (out == 0).all() and np.isneginf(lse).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_query_sequence(backend):
    q = np.ones((2, 0, 4), dtype=np.float32)
    k = np.ones((2, 3, 4), dtype=np.float32)
    out, lse = dotattn.attention(q, k, k, return_lse=True, implementation=backend)
    assert out.shape == (2, 0, 4) and lse.shape == (2, 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_nan_padding_never_leaks(backend, layout):
    B, Hq, Hkv, Lq, Lk = 3, 4, 2, 13, 17
    q_len, kv_len = np.array([13, 5, 0]), np.array([17, 9, 4])
    q, k, v = H.random_qkv(
        8, batch=(B,), Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk, D=6, dtype=np.float32, layout=layout,
        q_lengths=q_len, kv_lengths=kv_len,
    )
    opts = dict(q_lengths=q_len, kv_lengths=kv_len, causal=True, layout=layout, alibi_slopes=np.full(Hq, 0.1))
    assert np.isnan(q).any() and np.isnan(k).any() and np.isnan(v).any()
    out, lse = dotattn.attention(q, k, v, return_lse=True, implementation=backend, **opts)
    assert np.isfinite(out).all() and not np.isnan(lse).any()
    h_axis = 1 if layout == "bhld" else 2
    for b in range(B):
        rows = np.arange(Lq) >= q_len[b]
        padded = out[b][:, rows] if layout == "bhld" else out[b][rows]
        assert (padded == 0).all()
        assert np.isneginf(lse[b][:, rows]).all()
    # dout is NaN past the lengths too: a backward that reads it leaks NaN into dk/dv.
    dout = H._nan_pad(np.ones_like(out), q_len, layout)
    dq, dk, dv = dotattn.attention_backward(q, k, v, out, lse, dout, implementation=backend, **opts)
    for name, g in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert np.isfinite(g).all(), name
    for b in range(B):
        take = (lambda x, rows: x[:, rows]) if h_axis == 1 else (lambda x, rows: x[rows])
        assert (take(dq[b], np.arange(Lq) >= q_len[b]) == 0).all()
        assert (take(dk[b], np.arange(Lk) >= kv_len[b]) == 0).all()
        assert (take(dv[b], np.arange(Lk) >= kv_len[b]) == 0).all()
    ref_out, _ = H.reference(q, k, v, **opts)
    H.assert_close_to_reference(out, ref_out, H.naive(q, k, v, **opts)[0], name="out")


# =================================================================================
# determinism, dispatch, equivalences
# =================================================================================


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_calls_are_bitwise_identical(backend):
    q, k, v = H.random_qkv(9, batch=(2,), Hq=4, Hkv=2, Lq=150, Lk=170, D=24, dtype=np.float32)
    opts = dict(causal=True, dropout_p=0.3, seed=42, window=(60, 5))
    first = dotattn.attention(q, k, v, return_lse=True, implementation=backend, **opts)
    second = dotattn.attention(q, k, v, return_lse=True, implementation=backend, **opts)
    for a, b, name in zip(first, second, ("out", "lse")):
        H.assert_bitwise_equal(a, b, name)
    dout = np.random.default_rng(1).standard_normal(first[0].shape).astype(np.float32)
    g1 = dotattn.attention_backward(q, k, v, *first, dout, implementation=backend, **opts)
    g2 = dotattn.attention_backward(q, k, v, *first, dout, implementation=backend, **opts)
    for a, b, name in zip(g1, g2, ("dq", "dk", "dv")):
        H.assert_bitwise_equal(a, b, name)


def test_default_dispatch_runs_the_first_able_backend():
    q, k, v = H.random_qkv(10, batch=(1,), Hq=2, Lq=33, Lk=40, D=8)
    call = dotattn.semantics.normalize(q, k, v, causal=True)
    chosen = registry.select(call)
    # Tensor backends (triton, available under the interpreter) never take NumPy arrays:
    # the first available array backend in priority order runs the call.
    able = [row["name"] for row in dotattn.info() if row["available"] and row["name"] not in registry.TENSOR_BACKENDS]
    assert chosen.name == able[0]
    H.assert_bitwise_equal(
        dotattn.attention(q, k, v, causal=True), dotattn.attention(q, k, v, causal=True, implementation=chosen.name)
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_gqa_equals_repeated_heads(backend):
    q, k, v = H.random_qkv(14, batch=(2,), Hq=6, Hkv=2, Lq=19, Lk=23, D=8, dtype=np.float64)
    grouped = dotattn.attention(q, k, v, causal=True, implementation=backend)
    repeated = dotattn.attention(q, np.repeat(k, 3, axis=1), np.repeat(v, 3, axis=1), causal=True, implementation=backend)
    np.testing.assert_allclose(grouped, repeated, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layout_and_batch_dims_are_views_of_one_computation(backend):
    q, k, v = H.random_qkv(15, batch=(2, 3), Hq=2, Lq=11, Lk=7, D=5, dtype=np.float64)
    out5 = dotattn.attention(q, k, v, implementation=backend)
    out4 = dotattn.attention(*(x.reshape((6,) + x.shape[2:]) for x in (q, k, v)), implementation=backend)
    np.testing.assert_allclose(out5.reshape(out4.shape), out4, rtol=1e-12, atol=1e-14)
    swap = [np.ascontiguousarray(np.swapaxes(x, -3, -2)) for x in (q, k, v)]
    outl = dotattn.attention(*swap, layout="blhd", implementation=backend)
    np.testing.assert_allclose(np.swapaxes(outl, -3, -2), out5, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_alignments_agree_when_square(backend):
    q, k, v = H.random_qkv(16, batch=(1,), Hq=1, Lq=20, Lk=20, D=4, dtype=np.float64)
    a = dotattn.attention(q, k, v, causal="top_left", implementation=backend)
    b = dotattn.attention(q, k, v, causal="bottom_right", implementation=backend)
    np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)


# =================================================================================
# dropout
# =================================================================================


def test_dropout_mask_keeps_the_expected_share():
    keep = keep_block(123, 0.3, 0, 1, np.arange(256), np.arange(256), 2, 256, 256)
    assert abs(keep.mean() - 0.7) < 0.01
    again = keep_block(123, 0.3, 0, 1, np.arange(128, 256), np.arange(40, 90), 2, 256, 256)
    np.testing.assert_array_equal(again, keep[128:, 40:90])  # any block is drawn independently


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_seed_and_weights(backend):
    q, k, v = H.random_qkv(17, batch=(1,), Hq=2, Lq=30, Lk=30, D=4, dtype=np.float64)
    out_a, w_a = dotattn.attention(q, k, v, dropout_p=0.5, seed=1, return_weights=True, implementation=backend)
    out_b = dotattn.attention(q, k, v, dropout_p=0.5, seed=2, implementation=backend)
    _, w_0 = dotattn.attention(q, k, v, return_weights=True, implementation=backend)
    assert not np.allclose(out_a, out_b)  # a different seed, a different mask
    np.testing.assert_allclose(w_a, w_0, rtol=1e-13)  # returned weights are pre-dropout
    unseeded = [dotattn.attention(q, k, v, dropout_p=0.5, implementation=backend) for _ in range(2)]
    assert not np.array_equal(*unseeded)  # no seed: a fresh one each call


# =================================================================================
# backward vs finite differences of the reference
# =================================================================================

FD_OPTIONS = {
    "plain": {},
    "causal-bias": {"causal": True, "bias": "full"},
    "softcap-alibi-window": {"softcap": 1.5, "alibi_slopes": np.array([0.3, 0.7]), "window": (2, 1)},
    "mask-lengths-topleft": {"mask": "mask", "kv_lengths": np.array([4]), "q_lengths": np.array([2]), "causal": "top_left"},
    "dropout": {"dropout_p": 0.4, "seed": 5},
    "segments-bias-broadcast": {"segment_ids": np.array([[0, 0, 1]]), "bias": "row"},
}


def _fd_options(name):
    rng = np.random.default_rng(3)
    opts = dict(FD_OPTIONS[name])
    if opts.get("bias") == "full":
        opts["bias"] = rng.standard_normal((1, 2, 3, 5))
    elif opts.get("bias") == "row":
        opts["bias"] = rng.standard_normal((1, 5))
    if opts.get("mask") == "mask":
        opts["mask"] = np.array([[True, False, True, True, False]] * 3)
    if "segment_ids" in opts:
        opts["segment_ids"] = (opts["segment_ids"], np.array([[0, 0, 1, 1, 1]]))
    return opts


def _numeric_grad(f, x, eps=1e-6):
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        orig = x[idx]
        x[idx] = orig + eps
        hi = f()
        x[idx] = orig - eps
        lo = f()
        x[idx] = orig
        g[idx] = (hi - lo) / (2 * eps)
    return g


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(FD_OPTIONS))
def test_backward_matches_finite_differences(backend, name):
    opts = _fd_options(name)
    q, k, v = H.random_qkv(18, batch=(1,), Hq=2, Hkv=1, Lq=3, Lk=5, D=3, Dv=2, dtype=np.float64)
    dout = np.random.default_rng(4).standard_normal((1, 2, 3, 2))

    def loss():
        return float((dotattn.attention(q, k, v, implementation="reference", **opts) * dout).sum())

    out, lse = dotattn.attention(q, k, v, return_lse=True, implementation=backend, **opts)
    with_bias = "bias" in opts
    grads = dotattn.attention_backward(q, k, v, out, lse, dout, implementation=backend, return_dbias=with_bias, **opts)
    wrt = [q, k, v] + ([opts["bias"]] if with_bias else [])
    for label, x, g in zip(("dq", "dk", "dv", "dbias"), wrt, grads):
        np.testing.assert_allclose(g, _numeric_grad(loss, x), rtol=1e-6, atol=1e-8, err_msg=f"{backend} {name} {label}")


# =================================================================================
# memory layouts and option forms
# =================================================================================


def _strided_views(q, k, v):
    """The same values behind negative strides, Fortran order and a sliced parent."""
    pad = np.full(q.shape[:-1] + (q.shape[-1] * 2,), np.nan, q.dtype)
    pad[..., ::2] = q
    return pad[..., ::2], np.asfortranarray(k), np.ascontiguousarray(v[..., ::-1])[..., ::-1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    q, k, v = H.random_qkv(19, batch=(2,), Hq=4, Hkv=2, Lq=37, Lk=45, D=12, Dv=7, dtype=np.float32)
    sq, sk, sv = _strided_views(q, k, v)
    assert not (sq.flags.c_contiguous or sk.flags.c_contiguous or sv.flags.c_contiguous)
    opts = dict(causal=True, bias=np.random.default_rng(0).standard_normal((1, 45)).astype(np.float32))
    check_forward(backend, sq, sk, sv, opts)
    out, lse = dotattn.attention(sq, sk, sv, return_lse=True, implementation=backend, **opts)
    dout = np.asfortranarray(np.ones_like(out))
    got = dotattn.attention_backward(sq, sk, sv, out, lse, dout, implementation=backend, **opts)
    want = dotattn.attention_backward(q, k, v, out, lse, np.ones_like(out), implementation=backend, **opts)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float16, np.float32], ids=H.dtype_name)
def test_decode_one_query_long_cache(backend, dtype):
    kv_len = np.array([1025, 700, 1])
    q, k, v = H.random_qkv(20, batch=(3,), Hq=8, Hkv=1, Lq=1, Lk=1025, D=64, dtype=dtype, kv_lengths=kv_len)
    check_forward(backend, q, k, v, dict(kv_lengths=kv_len, causal=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_head_dims(backend):
    q, k, v = H.random_qkv(21, batch=(1,), Hq=2, Lq=33, Lk=65, D=257, Dv=1, dtype=np.float32)
    check_forward(backend, q, k, v, {"window": (10, 10)})


@pytest.mark.parametrize("backend", BACKENDS)
def test_option_forms_lists_scalars_and_int_dtypes(backend):
    q, k, v = H.random_qkv(22, batch=(2,), Hq=3, Lq=6, Lk=6, D=4, dtype=np.float64)
    as_lists = dotattn.attention(
        q, k, v, mask=[[True] * 6] * 6, alibi_slopes=[1, 2, 3], q_lengths=[6, 3], kv_lengths=np.array([2, 6], np.uint8),
        segment_ids=[[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 2, 2]], implementation=backend,
    )
    as_arrays = dotattn.attention(
        q, k, v, mask=np.ones((6, 6), bool), alibi_slopes=np.array([1.0, 2.0, 3.0]), q_lengths=np.array([6, 3]),
        kv_lengths=np.array([2, 6]), segment_ids=np.array([[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 2, 2]]), implementation=backend,
    )
    H.assert_bitwise_equal(as_lists, as_arrays)
    scalar = dotattn.attention(q, k, v, kv_lengths=4, implementation=backend)
    H.assert_bitwise_equal(scalar, dotattn.attention(q, k, v, kv_lengths=np.array([4, 4]), implementation=backend))


# =================================================================================
# a gradient through the LSE (dispatch.run_backward's dlse)
# =================================================================================


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "Lq, Lk, Hq, Hkv, causal", [(1, 9, 2, 1, False), (5, 20, 4, 2, True), (70, 600, 2, 2, True)], ids=str
)
def test_a_gradient_through_the_lse_matches_reference(backend, Lq, Lk, Hq, Hkv, causal):
    """Every backend, whether it takes ``dlse`` as it is (``takes_dlse``: the cpu backend's
    short rows add it to the Δ their kernel forms) or the call folded by
    ``semantics.fold_lse_grad``, gives the reference's gradients (float64: the same numbers up
    to the summation order); dv does not see dlse."""
    from dotattn import dispatch, semantics

    q, k, v = H.random_qkv(21, batch=(1,), Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk, D=16, dtype=np.float64)
    rng = np.random.default_rng(22)
    dout = rng.standard_normal((1, Hq, Lq, 16))
    dlse = rng.standard_normal((1, Hq, Lq))
    call = semantics.normalize(q, k, v, causal=causal, scale=1.3)

    def grads(impl, **kw):
        out, lse = dispatch.run_forward(call, implementation=impl)[:2]
        return dispatch.run_backward(call, out, lse, dout, implementation=impl, **kw)[:3]

    try:
        ours, plain = grads(backend, dlse=dlse), grads(backend)
    except UnsupportedCallError as exc:
        assert backend in str(exc)
        return
    ref = grads("reference", dlse=dlse)
    for name, g, r in zip(("dq", "dk", "dv"), ours, ref):
        assert g.shape == r.shape, name
        np.testing.assert_allclose(g, r, rtol=1e-9, atol=1e-11, err_msg=f"{backend} {name}")
    np.testing.assert_allclose(ours[2], plain[2], rtol=1e-12, atol=1e-13)
    assert not np.allclose(ours[0], plain[0])  # (dlse reached dq)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_alibi_slopes_are_float_slopes(backend):
    """bfloat16 slopes (ml_dtypes', which NumPy does not count as floating) were refused as
    "alibi_slopes must be a float array, got dtype bfloat16": they give the float32 slopes' result."""
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((1, 4, 5, 8)).astype(np.float32) for _ in range(3))
    slopes = np.array([0.5, 0.25, 0.125, 0.0625], np.float32)  # (exact in bfloat16)
    want = dotattn.attention(q, k, v, alibi_slopes=slopes, causal=True, implementation=backend)
    got = dotattn.attention(q, k, v, alibi_slopes=slopes.astype(H.DTYPES[1]), causal=True, implementation=backend)
    np.testing.assert_array_equal(got, want)
