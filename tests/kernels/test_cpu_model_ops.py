"""The fused element-wise kernels of ``dotattn.models`` (kernels/_cpu_model_ops.py) against
float64 NumPy formulas, chunked runs against one-chunk runs, and SiLU at extreme gates."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dotattn.kernels import _cpu_model_ops as ops

from helpers import assert_close_to_reference, lacks

# float32 kernels against float64 math: a few float32 roundings per element
REL = 2e-6


def _rms_norm64(x, weight, eps):
    x = x.astype(np.float64)
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * weight


def _rope64(qkv, positions, cos, sin, H, D):
    half = D // 2
    heads = qkv[:, : H * D].reshape(len(qkv), H, D).astype(np.float64)
    c, s = cos[positions][:, None, :half].astype(np.float64), sin[positions][:, None, :half].astype(np.float64)
    x1, x2 = heads[..., :half], heads[..., half:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def _swiglu64(gate_up):
    F = gate_up.shape[1] // 2
    g, u = gate_up[:, :F].astype(np.float64), gate_up[:, F:].astype(np.float64)
    with np.errstate(over="ignore"):
        return g / (1.0 + np.exp(-g)) * u


def _assert_rel(got, want):
    scale = np.abs(want).max(initial=0.0) or 1.0
    err = np.abs(got.astype(np.float64) - want).max(initial=0.0) / scale
    assert err <= REL, f"relative error {err:.2e} > {REL:.0e}"


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 70), e=st.integers(1, 100), add=st.booleans(), chunks=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_add_rms_norm(n, e, add, chunks, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, e), dtype=np.float32) * 3
    proj = rng.standard_normal((n, e), dtype=np.float32)
    weight = rng.standard_normal(e, dtype=np.float32)
    eps = np.float32(1e-5)
    want_x = x.astype(np.float64) + (proj if add else 0.0)
    want_h = _rms_norm64(want_x.astype(np.float32), weight, eps)
    x1, h1 = x.copy(), np.empty_like(x)
    for c in range(chunks):
        ops.add_rms_norm(x1, proj, add, weight, eps, h1, c, chunks)
    np.testing.assert_array_equal(x1, (x + proj) if add else x)  # the residual add is one float32 add
    _assert_rel(h1, want_h)
    x2, h2 = x.copy(), np.empty_like(x)
    ops.add_rms_norm(x2, proj, add, weight, eps, h2, 0, 1)
    np.testing.assert_array_equal(h1, h2)  # rows are independent: chunking never changes a bit


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), heads=st.integers(1, 6), half=st.integers(1, 40), extra=st.integers(0, 3),
       chunks=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_rope(n, heads, half, extra, chunks, seed):
    rng = np.random.default_rng(seed)
    D = 2 * half
    qkv = rng.standard_normal((n, (heads + extra) * D), dtype=np.float32)  # extra heads are not rotated
    ctx = n + 10
    angles = np.arange(ctx)[:, None] * (1.0 / 1e4 ** (np.arange(half) / half))
    angles = np.concatenate([angles, angles], axis=-1)
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    positions = rng.integers(0, ctx, n).astype(np.int64)
    out = np.empty((n, heads, D), np.float32)
    for c in range(chunks):
        ops.rope(qkv, positions, cos, sin, out, c, chunks)
    _assert_rel(out, _rope64(qkv, positions, cos, sin, heads, D))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), f=st.integers(1, 100), chunks=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_swiglu(n, f, chunks, seed):
    rng = np.random.default_rng(seed)
    gate_up = rng.standard_normal((n, 2 * f), dtype=np.float32) * 6
    act = np.empty((n, f), np.float32)
    for c in range(chunks):
        ops.swiglu(gate_up, act, c, chunks)
    _assert_rel(act, _swiglu64(gate_up))


def test_swiglu_at_extreme_gates():
    """SiLU's limits: 0 for very negative gates (no overflow, no NaN), g for very positive ones;
    ±0, subnormal and huge gates are exact or within float32 rounding.  ``e**x`` below 2**−125.5
    (x ≤ −87.0) flushes to 0, as the attention kernels' exp does: an absolute error < 1e-35."""
    gates = np.array([-1e30, -1e4, -200.0, -88.0, -87.0, -20.0, -1.0, -0.0, 0.0, 1e-40, 1e-3, 1.0, 20.0, 100.0, 1e4, 1e30],
                     np.float32)
    gate_up = np.concatenate([gates, np.full_like(gates, 2.0)])[None]
    act = np.empty((1, len(gates)), np.float32)
    ops.swiglu(gate_up, act, 0, 1)
    assert np.isfinite(act).all()
    want = _swiglu64(gate_up)[0]
    np.testing.assert_allclose(act[0], want, rtol=REL, atol=1e-35)
    assert act[0, 0] == 0.0 and act[0, -1] == np.float32(2e30)


# ---- the decode step's matrix–vector products ---------------------------------------------
def _gemv_all(x, w, chunks):
    """``gemv_rows`` over ``chunks`` row ranges (as the parallel kernel splits them: on
    multiples of the row block), over all rows at once (the one-thread mode) and the parallel
    kernel itself; all must give the same bits.  (Not ranges cut anywhere: a row summed alone
    (``_dot_row``) and in a four-row block may round differently — LLVM vectorizes the two
    loops differently on an AVX2-only Zen 3.)"""
    O = w.shape[0]
    by_ranges = np.full((x.shape[0], O), np.nan, np.float32)
    for c in range(chunks):
        ops.gemv_rows(x, w, by_ranges, *ops._block_rows(O, c, chunks))
    whole = np.full_like(by_ranges, np.nan)
    ops.gemv_rows(x, w, whole, 0, O)
    out = np.full_like(by_ranges, np.nan)
    ops.gemv(x, w, out, chunks)
    np.testing.assert_array_equal(out, by_ranges)  # rows are independent: chunking never changes a bit
    np.testing.assert_array_equal(out, whole)
    return out


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 8), o=st.integers(1, 70), i=st.integers(1, 100), chunks=st.integers(1, 5),
       magnitude=st.sampled_from([1e-3, 1.0, 1e3]), seed=st.integers(0, 2**16))
def test_gemv_against_a_float64_product(b, o, i, chunks, magnitude, seed):
    """Any sizes (rows not a multiple of the 4-row block, ``in`` not a multiple of the vector
    width), 1–8 token rows, any chunking: within twice NumPy's float32 product's error."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((b, i)) * magnitude).astype(np.float32)
    w = rng.standard_normal((o, i), dtype=np.float32)
    got = _gemv_all(x, w, chunks)
    assert_close_to_reference(got, x.astype(np.float64) @ w.T.astype(np.float64), x @ w.T, name="gemv")


def test_gemv_at_model_sizes():
    """SmolLM's matrices (576 and 1536 inputs) and a vocabulary-sized odd row count."""
    rng = np.random.default_rng(1)
    for b, o, i in ((1, 960, 576), (3, 577, 1536), (8, 4099, 576)):
        x = rng.standard_normal((b, i), dtype=np.float32)
        w = rng.standard_normal((o, i), dtype=np.float32)
        got = _gemv_all(x, w, 2)
        assert_close_to_reference(got, x.astype(np.float64) @ w.T.astype(np.float64), x @ w.T, name=f"gemv {b}×{o}×{i}")


@settings(max_examples=25, deadline=None)
@given(r=st.integers(1, 130), o=st.integers(1, 300), i=st.integers(1, 200), chunks=st.integers(1, 5),
       seed=st.integers(0, 2**16))
def test_gemm_columns_on_the_team_and_in_turn_give_the_same_bits(r, o, i, chunks, seed):
    """A short prompt pass's products (``gemm_columns``: column chunks, each MKL's sgemm on one
    thread) give the same bits on Numba's team and chunk after chunk on the caller (the two
    modes of SmolLM's chooser), within twice NumPy's float32 product's error, and leave no
    thread-local MKL count set on the caller."""
    from dotattn.kernels._cpu_isa import f32_gemm, mkl_threads_here

    if not f32_gemm()[0]:
        pytest.skip("the column GEMM runs where the kernels' sgemm is MKL's (torch installed)")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((r, i), dtype=np.float32)
    w = rng.standard_normal((o, i), dtype=np.float32)
    team, in_turn = np.full((r, o), np.nan, np.float32), np.full((r, o), np.nan, np.float32)
    # this thread's local count as an earlier test left it (torch.set_num_threads sets one:
    # ATen's set_num_threads calls mkl_set_num_threads_local), cleared for the check and put back
    before = mkl_threads_here(0)
    try:
        ops.gemm_columns(x, w, team, chunks)
        ops.gemm_columns_rows(x, w, in_turn, 0, chunks, chunks)
        assert mkl_threads_here(0) == 0  # the calls restored what they found (0: no local count)
    finally:
        mkl_threads_here(before)
    np.testing.assert_array_equal(team, in_turn)
    assert_close_to_reference(team, x.astype(np.float64) @ w.T.astype(np.float64), x @ w.T, name="gemm_columns")


def test_gemv_propagates_nan_and_inf_like_a_product():
    """NaN in a weight row makes that output NaN for every token row; ±inf in ``x`` gives ±inf
    where the other terms are finite and NaN where inf meets a zero weight or an opposite inf."""
    rng = np.random.default_rng(2)
    b, o, i = 3, 37, 41
    x = rng.standard_normal((b, i), dtype=np.float32)
    w = rng.standard_normal((o, i), dtype=np.float32)
    w[5, 7] = np.nan
    x[1, 3] = np.inf  # row 1: ±inf by the sign of w[:, 3]
    w[9, 3] = 0.0  # … and inf·0 = NaN at output 9
    x[2, 0], x[2, 1] = np.inf, -np.inf  # row 2: inf − inf = NaN where w[:, 0] and w[:, 1] share a sign
    got = _gemv_all(x, w, 3)
    with np.errstate(invalid="ignore", over="ignore"):
        want = x.astype(np.float64) @ w.T.astype(np.float64)
    assert np.isnan(want).any() and np.isinf(want).any()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(got[np.isinf(want)], want[np.isinf(want)])
    assert np.isfinite(got[np.isfinite(want)]).all()


# ---- the same products on block-coded weights (models/_block_weights.py) -----------------
def _q4_1_like(rng, o, i):
    """float32 weights made as gguf dequantizes Q4_1: ``float32(d·q) + m``, ``d, m`` float16, ``q`` 0…15."""
    d = rng.uniform(1e-4, 0.05, (o, i // 32)).astype(np.float16).astype(np.float32)
    m = rng.uniform(-0.3, 0.1, (o, i // 32)).astype(np.float16).astype(np.float32)
    q = rng.integers(0, 16, (o, i // 32, 32)).astype(np.float32)
    q[:, :, 0], q[:, :, 1] = 0, 15  # the quantizer's extremes: the block's min has code 0, its max 15
    rng.permuted(q, axis=2, out=q)
    return ((d[:, :, None] * q) + m[:, :, None]).reshape(o, i)


def _q8_0_like(rng, o, i):
    """float32 weights made as gguf dequantizes Q8_0: ``q·d``, ``d`` float16, ``q`` −127…127."""
    d = rng.uniform(1e-5, 0.01, (o, i // 32)).astype(np.float16).astype(np.float32)
    q = rng.integers(-127, 128, (o, i // 32, 32)).astype(np.float32)
    q[:, :, 0] = rng.choice([-127, 127], (o, i // 32))  # the block's largest magnitude has code ±127
    return (q * d[:, :, None]).reshape(o, i)


def _gemv_blocks_all(x, blocks, chunks):
    """``gemv_blocks_rows`` over ``chunks`` row ranges and the parallel kernel: the same bits."""
    O, I = blocks.shape
    sums = np.empty((x.shape[0], I // ops.BLOCK), np.float32)
    ops.block_sums(x, sums)
    has_offset = blocks.offset is not None
    offset = blocks.offset if has_offset else blocks.scale
    by_ranges = np.full((x.shape[0], O), np.nan, np.float32)
    bounds = np.linspace(0, O, chunks + 1).astype(int)
    for r0, r1 in zip(bounds[:-1], bounds[1:]):
        ops.gemv_blocks_rows(x, sums, blocks.codes, blocks.scale, offset, has_offset, by_ranges, r0, r1)
    out = np.full_like(by_ranges, np.nan)
    ops.gemv_blocks(x, sums, blocks.codes, blocks.scale, offset, has_offset, out, chunks)
    np.testing.assert_array_equal(out, by_ranges)
    return out


def _gemm_blocks_all(x, blocks, chunks):
    """``gemm_blocks_rows`` over the parallel kernel's ``chunks`` row ranges (on multiples of
    four rows: a row's sum in the four-row loop and in the rest loop vectorize differently)
    and the parallel kernel, and the one-thread call of all rows: the same bits."""
    O, I = blocks.shape
    has_offset = blocks.offset is not None
    offset = blocks.offset if has_offset else blocks.scale
    whole = np.full((x.shape[0], O), np.nan, np.float32)
    ops.gemm_blocks_rows(x, blocks.codes, blocks.scale, offset, has_offset, whole, 0, O)
    by_ranges = np.full((x.shape[0], O), np.nan, np.float32)
    for r0, r1 in (ops._block_rows(O, c, chunks) for c in range(chunks)):
        ops.gemm_blocks_rows(x, blocks.codes, blocks.scale, offset, has_offset, by_ranges, r0, r1)
    out = np.full_like(by_ranges, np.nan)
    ops.gemm_blocks(x, blocks.codes, blocks.scale, offset, has_offset, out, chunks)
    np.testing.assert_array_equal(out, by_ranges)
    np.testing.assert_array_equal(out, whole)
    return out


@settings(max_examples=30, deadline=None)
@given(form=st.sampled_from(["q4_1", "q8_0"]), b=st.integers(1, 8), o=st.integers(1, 40), blocks=st.integers(1, 6),
       chunks=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_block_codes_rebuild_every_weight_and_their_product_is_the_weights_product(form, b, o, blocks, chunks, seed):
    """Q4_1- and Q8_0-made float32 matrices are found exactly (every value rebuilt bit for bit
    by gguf's formula), and the product on the codes is within twice NumPy's float32 product's
    error of the float64 product by the float32 weights; chunking never changes a bit."""
    from dotattn.models._block_weights import exact_blocks

    rng = np.random.default_rng(seed)
    i = 32 * blocks
    w = (_q4_1_like if form == "q4_1" else _q8_0_like)(rng, o, i)
    found = exact_blocks(w)
    assert found is not None
    assert (found.offset is None) == (form == "q8_0")  # the symmetric form needs no offsets
    np.testing.assert_array_equal(found.to_float32(), w)
    x = rng.standard_normal((b, i), dtype=np.float32)
    got = _gemv_blocks_all(x, found, chunks)
    assert_close_to_reference(got, x.astype(np.float64) @ w.T.astype(np.float64), x @ w.T, name=f"gemv_blocks {form}")
    got = _gemm_blocks_all(x, found, chunks)
    assert_close_to_reference(got, x.astype(np.float64) @ w.T.astype(np.float64), x @ w.T, name=f"gemm_blocks {form}")
    # each token row's result is its own: the first two rows alone give the same bits
    np.testing.assert_array_equal(_gemm_blocks_all(x[:2], found, chunks), got[:2])


def test_block_codes_at_model_sizes_and_in_one_buffer():
    """SmolLM-shaped matrices of both forms encoded together (one buffer each for codes, scales,
    offsets, in the given order), products within the rule; a matrix that is no block form
    (plain random float32), one with NaN and one of 40 columns stay None and take no room."""
    from dotattn.models._block_weights import encode_matrices

    rng = np.random.default_rng(3)
    mats = [_q4_1_like(rng, 960, 576), rng.standard_normal((8, 64), dtype=np.float32), _q4_1_like(rng, 577, 1536),
            _q4_1_like(rng, 4, 64), np.ones((3, 40), np.float32), _q8_0_like(rng, 4099, 576)]
    mats[3][1, 5] = np.nan
    found = encode_matrices(mats)
    assert [f is None for f in found] == [False, True, False, True, True, False]
    assert np.shares_memory(found[0].codes, found[2].codes) is False
    assert found[2].codes.base is found[0].codes.base is found[5].codes.base  # one buffer, in order
    for w, f in zip(mats, found):
        if f is None:
            continue
        np.testing.assert_array_equal(f.to_float32(), w)
        x = rng.standard_normal((3, w.shape[1]), dtype=np.float32)
        got = _gemv_blocks_all(x, f, 2)
        assert_close_to_reference(got, x.astype(np.float64) @ w.T.astype(np.float64), x @ w.T, name=f"gemv_blocks {w.shape}")
        x = rng.standard_normal((13, w.shape[1]), dtype=np.float32)  # a decode step of 13 sequences
        got = _gemm_blocks_all(x, f, 2)
        assert_close_to_reference(got, x.astype(np.float64) @ w.T.astype(np.float64), x @ w.T, name=f"gemm_blocks {w.shape}")


def test_block_codes_refuse_values_no_scale_rebuilds():
    """One value off by an ulp in one block (a Q4_1 matrix otherwise): no exact form, None."""
    from dotattn.models._block_weights import exact_blocks

    rng = np.random.default_rng(4)
    w = _q4_1_like(rng, 6, 96)
    assert exact_blocks(w) is not None
    w[4, 70] = np.nextafter(w[4, 70], np.float32(np.inf))
    assert exact_blocks(w) is None
    assert exact_blocks(w[:, :48]) is None  # 48 columns: not whole blocks
    assert exact_blocks(w.astype(np.float64)) is None


def test_block_products_propagate_nan_and_inf_of_x():
    """±inf in ``x`` gives ±inf or NaN as the float32 product by the same weights does (one
    token row at a time and the many-row kernel)."""
    from dotattn.models._block_weights import exact_blocks

    rng = np.random.default_rng(5)
    w = _q8_0_like(rng, 9, 64)
    x = rng.standard_normal((2, 64), dtype=np.float32)
    x[0, 3] = np.inf
    x[1, 0], x[1, 40] = np.nan, 1.0
    with np.errstate(invalid="ignore", over="ignore"):
        want = x.astype(np.float64) @ w.T.astype(np.float64)
    for got in (_gemv_blocks_all(x, exact_blocks(w), 2), _gemm_blocks_all(x, exact_blocks(w), 2)):
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_array_equal(got[np.isinf(want)], want[np.isinf(want)])


# ---- a prompt pass's products on AMX from the block codes (gemm_pairs) ---------------------
AMX = __import__("dotattn.kernels._cpu_isa", fromlist=["amx_tiles"]).amx_tiles()[0]


def _pairs_operands(found):
    """:func:`ops.block_pairs` of ``found``'s codes and the transposed scales and offsets."""
    O, I = found.shape
    pairs = np.full((O // ops.PAIRS_COLS, I // 2, ops.PAIRS_COLS), 0xFFFFFFFF, np.uint32)
    ops.block_pairs(found.codes, pairs)
    has_offset = found.offset is not None
    offset = found.offset if has_offset else found.scale
    return pairs, np.ascontiguousarray(found.scale.T), np.ascontiguousarray(offset.T), has_offset


def _gemm_pairs_all(x, found, chunks):
    """``split_rows_sums`` and ``gemm_pairs`` in ``chunks`` chunks, and in one: the same bits;
    returns the product and the largest magnitude the split reported (as bits)."""
    from dotattn.kernels._cpu_amx_f32 import pieces_buffer

    M, I = x.shape
    Mp = -(-M // 32) * 32
    pairs, scale_t, offset_t, has_offset = _pairs_operands(found)
    results = []
    for n in (chunks, 1):
        pieces = pieces_buffer(Mp, I, np.empty(0, np.uint16))
        pieces[:] = 0xFFFF  # rows past M must come back zero
        sums, top = np.full((Mp, I // ops.BLOCK), np.nan, np.float32), np.zeros(n, np.uint32)
        for c in range(n):
            ops.split_rows_sums(x, pieces, sums, top, c, n)
        assert not pieces[:, M:].any() and not sums[M:].any()
        out = np.full((M, found.shape[0]), np.nan, np.float32)
        for c in range(n):
            ops.gemm_pairs(pieces, sums, pairs, scale_t, offset_t, has_offset, out, c, n)
        results.append((out, int(top.max())))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    assert results[0][1] == results[1][1]
    return results[0]


@pytest.mark.skipif(not AMX, reason=lacks("AMX", "the block products on AMX need AMX tiles (amx_tiles)"))
@settings(max_examples=25, deadline=None)
@given(form=st.sampled_from(["q4_1", "q8_0"]), m=st.integers(1, 70), o=st.integers(1, 3), blocks=st.integers(1, 5),
       chunks=st.integers(1, 4), scale=st.sampled_from([1.0, 1e-6, 3e4]), seed=st.integers(0, 2**16))
def test_gemm_pairs_is_the_weights_product_within_the_naive_error(form, m, o, blocks, chunks, scale, seed):
    """The prompt pass's product on AMX (token values as three bfloat16 pieces, the codes as
    exact bfloat16, each block scaled in float32) is within twice NumPy's float32 product's
    error of the float64 product by the float32 weights, for token rows not in whole tiles,
    both block forms and magnitudes across the pieces' range; the chunking changes no bit; the
    split reports the largest |x| exactly."""
    from dotattn.models._block_weights import exact_blocks

    rng = np.random.default_rng(seed)
    i, O = 32 * blocks, 32 * o
    w = (_q4_1_like if form == "q4_1" else _q8_0_like)(rng, O, i)
    found = exact_blocks(w)
    x = (rng.standard_normal((m, i)) * scale).astype(np.float32)
    got, top = _gemm_pairs_all(x, found, chunks)
    assert top == int(np.abs(x).max().view(np.uint32))
    assert_close_to_reference(got, x.astype(np.float64) @ w.T.astype(np.float64), x @ w.T, name=f"gemm_pairs {form}")


@pytest.mark.skipif(not AMX, reason=lacks("AMX", "the block products on AMX need AMX tiles (amx_tiles)"))
def test_gemm_pairs_at_model_sizes_and_the_code_pairs():
    """SmolLM2's four projection shapes at a 300-token pass (Q4_1 and Q8_0 forms): within the
    rule; every pair word holds two codes' bfloat16 bits, the lower half the even depth."""
    from dotattn.models._block_weights import exact_blocks

    rng = np.random.default_rng(6)
    for (O, I), make in zip(((960, 576), (576, 576), (3072, 576), (576, 1536)), (_q4_1_like, _q8_0_like) * 2):
        w = make(rng, O, I)
        found = exact_blocks(w)
        pairs = _pairs_operands(found)[0]
        halves = np.stack([pairs & 0xFFFF, pairs >> 16], axis=-1).astype(np.uint32) << 16  # (O/32, I/2, 32, 2)
        codes = halves.view(np.float32).transpose(0, 2, 1, 3).reshape(O, I)
        np.testing.assert_array_equal(codes, found.codes.astype(np.float32))
        x = rng.standard_normal((300, I), dtype=np.float32)
        got, _ = _gemm_pairs_all(x, found, 2)
        assert_close_to_reference(got, x.astype(np.float64) @ w.T.astype(np.float64), x @ w.T, name=f"gemm_pairs {w.shape}")


def test_split_rows_sums_reports_nan_and_inf_as_out_of_range():
    """The split's largest magnitude (bits) is ≥ ±inf's for a NaN and equals it for ±inf: the
    caller's range check (``_cpu_amx_f32.ok_range``) then sends the product to MKL."""
    from dotattn.kernels._cpu_amx_f32 import bits_to_largest, ok_range, pieces_buffer
    from dotattn.kernels._cpu_isa import _cpu_features

    if "avx512bf16" not in _cpu_features():  # (no AMX needed; only AMX hosts call it: smollm._amx_product)
        pytest.skip(lacks("AVX-512 BF16", "the split needs its instructions (vcvtne2ps2bf16)"))

    x = np.ones((5, 64), np.float32)
    for bad, want in ((np.inf, 0x7F800000), (-np.inf, 0x7F800000), (np.nan, 0x7F800001)):
        y = x.copy()
        y[3, 33] = bad
        top = np.zeros(2, np.uint32)
        pieces, sums = pieces_buffer(32, 64, np.empty(0, np.uint16)), np.empty((32, 2), np.float32)
        for c in range(2):
            ops.split_rows_sums(y, pieces, sums, top, c, 2)
        assert int(top.max()) >= want and not ok_range(bits_to_largest(int(top.max())))
    top = np.zeros(1, np.uint32)
    ops.split_rows_sums(np.zeros((3, 64), np.float32), pieces_buffer(32, 64, np.empty(0, np.uint16)),
                        np.empty((32, 2), np.float32), top, 0, 1)
    assert top[0] == 0 and ok_range(bits_to_largest(0))  # all zeros: in range


def _chunked_steps(rng, n=130):
    """Each of the prompt pass's chunked steps with fresh outputs: ``[(kernel, args, outputs)]``."""
    e, heads, D, f = 64, 3, 16, 48
    x, proj = rng.standard_normal((n, e), dtype=np.float32), rng.standard_normal((n, e), dtype=np.float32)
    table = rng.standard_normal((n + 4, D), dtype=np.float32)
    qkv = rng.standard_normal((n, (heads + 1) * D), dtype=np.float32)
    gate_up = rng.standard_normal((n, 2 * f), dtype=np.float32)
    norm = (x.copy(), proj, True, rng.standard_normal(e, dtype=np.float32), np.float32(1e-5), np.empty_like(x))
    rope = (qkv, np.arange(n, dtype=np.int64), table, table, np.empty((n, heads, D), np.float32))
    swiglu = (gate_up, np.empty((n, f), np.float32))
    return [(ops.add_rms_norm, norm, (0, 5)), (ops.rope, rope, (4,)), (ops.swiglu, swiglu, (1,))]


def test_chunk_entries_pick_each_step_by_its_argument_count():
    """One caller's and one partner's entry serve every chunked step: the argument counts differ
    and name the kernel."""
    for nargs, kernel in ops.CHUNK_KERNELS.items():
        assert kernel.py_func.__code__.co_argcount == nargs + 2  # (… chunk, chunks)
        assert ops.chunk_kernel(nargs) is kernel
    assert ops.chunk_kernel(3) is None


@pytest.mark.parametrize("partner_asleep", [False, True], ids=["partner", "partner-never-woken"])
def test_chunked_steps_on_the_partners_give_the_bits_of_one_thread(partner_asleep, monkeypatch):
    """Chunk 0 on the caller and chunk 1 on a partner (``_launch.on_partners`` with the model's
    entries) write what the two chunks in turn write; a partner that never wakes has its part
    cancelled and its chunk run by the caller."""
    from dotattn.kernels import _cpu_sync as S
    from dotattn.kernels import _launch

    from helpers import park_partners_for_good

    monkeypatch.setattr(_launch, "_partners", None)
    if partner_asleep:
        monkeypatch.setattr(_launch, "PARTNER_SPIN_S", 0.0)
        _launch.get_partners(1)
        park_partners_for_good(_launch, monkeypatch)
    rng = np.random.default_rng(5)
    for kernel, args, outs in _chunked_steps(rng):
        serial = [np.copy(a) if isinstance(a, np.ndarray) else a for a in args]
        for c in range(2):
            kernel(*serial, c, 2)
        ran = _launch.on_partners(1, ops.chunks_caller, (args, 2), ops.chunks_partner, (args, 2))
        assert ran, "another call held the partners"
        for i in outs:
            np.testing.assert_array_equal(args[i], serial[i], err_msg=f"{kernel.py_func.__name__} output {i}")
        if partner_asleep:
            p = _launch._partners
            assert p.flags[S.FLAG_STRIDE + S.CLAIM] == 2 * p.gen + 1, "the sleeping partner was not cancelled"
    assert _launch._partners.gen == 3
