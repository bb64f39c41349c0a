"""The cpu backend's bfloat16 path: bfloat16 GEMMs (P rounded to bfloat16), float32 softmax.

Against the float64 reference with the 2× naive rule (the naive baseline computes in
bfloat16, P included); odd head dims and lengths that are no multiple of the tile; and the
float32 fallback forced by ``DOTATTN_CPU_BF16=off`` agrees with it.
"""

from __future__ import annotations

import numpy as np
import pytest

import dotattn
from dotattn import semantics
from dotattn.kernels import _cpu_isa, _launch, cpu
from dotattn.semantics import BFLOAT16

import helpers as H

HAS_BF16_ISA = cpu.bf16_path()[0]


def _inputs(seed, Hq, Hkv, Lq, Lk, D):
    return H.random_qkv(seed, batch=(1,), Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D, Dv=D, dtype=BFLOAT16)


def _check(q, k, v, tiles, **options):
    call = semantics.normalize(q, k, v, **options)
    dout = np.random.default_rng(3).standard_normal(q.shape[:-1] + (v.shape[-1],)).astype(BFLOAT16)
    out, lse = cpu.forward(call, block_size=tiles)
    dq, dk, dv, _ = cpu.backward(call, out, lse, dout, block_size=tiles)
    ref_out, ref_lse = H.reference(q, k, v, **options)
    naive_out, naive_lse = H.naive(q, k, v, **options)
    H.assert_close_to_reference(out.astype(BFLOAT16), ref_out, naive_out, name="out")
    H.assert_close_to_reference(lse, ref_lse, naive_lse, name="lse", dtype=BFLOAT16)
    ref_grads = H.reference_grads(q, k, v, dout, **options)
    naive_grads = H.naive_grads(q, k, v, dout, **options)
    for name, g, r, n in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads, naive_grads):
        H.assert_close_to_reference(g.astype(BFLOAT16), r, n, name=name, factor=3.0, magnitude=4.0)
    return out, lse, dq, dk, dv


@pytest.mark.parametrize(
    "Hq, Hkv, Lq, Lk, D, tiles, options",
    [
        (2, 2, 37, 45, 59, (8, 16), {}),  # odd head dim, lengths no multiple of the tiles
        (4, 2, 50, 50, 64, (16, 16), {"causal": True}),  # GQA, causal
        (2, 1, 33, 70, 24, (8, 32), {"window": (5, 9), "softcap": 20.0}),
        (2, 2, 40, 40, 16, (8, 8), {"dropout_p": 0.2, "seed": 5, "kv_lengths": np.array([31])}),
        # the default tiles (256 × 256 both ways on this path), several per row, the last ones partial
        (2, 1, 700, 600, 64, None, {"causal": True}),
    ],
    ids=["odd-D59", "gqa-causal", "window-softcap", "dropout-kvlen", "default-tiles"],
)
def test_bf16_matches_the_reference(Hq, Hkv, Lq, Lk, D, tiles, options):
    q, k, v = _inputs(11, Hq, Hkv, Lq, Lk, D)
    if "dropout_p" in options:  # the reference helpers take no dropout: compare with the fallback
        call = semantics.normalize(q, k, v, **options)
        out, _ = cpu.forward(call, block_size=tiles)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(_cpu_isa.ENV_VAR, "off")
            out32, _ = cpu.forward(semantics.normalize(q, k, v, **options), block_size=tiles)
        np.testing.assert_allclose(out, out32, atol=0.06)
        return
    _check(q, k, v, tiles, **options)


def test_the_bf16_path_runs_where_the_cpu_has_it():
    on, what = cpu.bf16_path()
    q, k, v = _inputs(1, 2, 2, 16, 16, 8)
    storage = cpu.storage_dtype(semantics.normalize(q, k, v))
    assert storage == (BFLOAT16 if on else np.dtype(np.float32)), what
    status = next(r["status"] for r in dotattn.info() if r["name"] == "cpu")
    assert "; bfloat16: " in status
    # its own part only: the float32 tiles' part names MKL wherever torch is installed
    bf16 = status.split("; bfloat16: ", 1)[1].split(";", 1)[0]
    assert bf16.startswith("MKL") == on, bf16
    assert on or bf16.startswith("float32 "), bf16


def test_forced_fallback_uses_float32_and_agrees(monkeypatch):
    q, k, v = _inputs(2, 2, 2, 70, 70, 32)
    fast = dotattn.attention(q, k, v, causal=True, implementation="cpu")
    monkeypatch.setenv(_cpu_isa.ENV_VAR, "off")
    call = semantics.normalize(q, k, v, causal=True)
    assert cpu.storage_dtype(call) == np.dtype(np.float32)
    assert cpu.bf16_path() == (False, f"float32 fallback forced by {_cpu_isa.ENV_VAR}=off")
    slow = dotattn.attention(q, k, v, causal=True, implementation="cpu")
    ref, _ = H.reference(q, k, v, causal=True)
    naive, _ = H.naive(q, k, v, causal=True)
    for out in (fast, slow):
        H.assert_close_to_reference(out, ref, naive, name="out")
    assert fast.dtype == slow.dtype == BFLOAT16


def test_bf16_is_bitwise_repeatable():
    q, k, v = _inputs(4, 2, 2, 64, 64, 32)
    a = dotattn.attention(q, k, v, implementation="cpu")
    b = dotattn.attention(q, k, v, implementation="cpu")
    assert np.array_equal(a.view(np.uint16), b.view(np.uint16))


@pytest.mark.parametrize("L", [40, 700], ids=["small-call kernel", "general kernel"])
def test_bf16_nan_in_a_hidden_keys_value_stays_hidden(L):
    """A NaN value of a key that a causal row never sees leaves that row finite (docs/semantics.md),
    as in float32: the bfloat16 operands (uint16 bits) used to pass the finiteness check."""
    q, k, v = _inputs(5, 2, 2, L, L, 32)
    j = L - 10
    v[0, 1, j] = np.nan
    out = dotattn.attention(q, k, v, causal=True, implementation="cpu").astype(np.float32)
    assert np.isfinite(out[0, :, :j]).all() and np.isfinite(out[0, 0]).all()
    assert np.isnan(out[0, 1, j:]).all()
    clean = v.copy()
    clean[0, 1, j] = 0  # rows before j never see key j: their answer is that of any finite value there
    ref, _ = H.reference(q, k, clean, causal=True)
    naive, _ = H.naive(q, k, clean, causal=True)
    H.assert_close_to_reference(out[0, :, :j].astype(BFLOAT16), ref[0, :, :j], naive[0, :, :j], name="out")


# --- the forward's tile products on AMX (kernels/_cpu_amx.py) -------------------------------

HAS_AMX = cpu.amx_path()[0]


def _check_forward(q, k, v, tiles, **options):
    call = semantics.normalize(q, k, v, **options)
    out, lse = cpu.forward(call, block_size=tiles)
    ref_out, ref_lse = H.reference(q, k, v, **options)
    naive_out, naive_lse = H.naive(q, k, v, **options)
    H.assert_close_to_reference(out.astype(BFLOAT16), ref_out, naive_out, name="out")
    H.assert_close_to_reference(lse, ref_lse, naive_lse, name="lse", dtype=BFLOAT16)
    return out


@pytest.mark.parametrize(
    "Hq, Hkv, Lq, Lk, D, Dv, tiles, options",
    [
        # D 64 (Q kept in tile registers), GQA, causal, lengths no multiple of the tiles
        (4, 2, 100, 130, 64, 64, (32, 64), {"causal": True}),
        (2, 2, 96, 64, 128, 128, (64, 32), {}),  # D 128: the 2 × 2 blocking, several key steps
        (1, 1, 70, 90, 32, 64, (32, 32), {"kv_lengths": np.array([77])}),  # D ≠ Dv, padded keys
        (2, 1, 64, 200, 64, 32, (32, 96), {"window": (40, 10), "softcap": 15.0}),
        # padding query rows (zeros out of the transposed accumulator)
        (2, 2, 96, 96, 64, 64, (32, 32), {"q_lengths": np.array([50]), "causal": True}),
    ],
    ids=["d64-gqa-causal", "d128", "d32-dv64-kvlen", "window-softcap", "qlen-causal"],
)
def test_amx_tile_products_match_the_reference(Hq, Hkv, Lq, Lk, D, Dv, tiles, options):
    q, k, v = H.random_qkv(21, batch=(1,), Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D, Dv=Dv, dtype=BFLOAT16)
    call = semantics.normalize(q, k, v, **options)
    assert cpu.prepare(call, tiles, forward=True).options.amx == HAS_AMX  # sizes in whole 32-steps
    _check_forward(q, k, v, tiles, **options)


def test_amx_needs_whole_32_steps():
    q, k, v = _inputs(3, 2, 2, 64, 64, 48)  # D 48: no whole number of 32-wide steps
    assert not cpu.prepare(semantics.normalize(q, k, v), (32, 32), forward=True).options.amx
    q, k, v = _inputs(3, 2, 2, 64, 64, 64)
    assert not cpu.prepare(semantics.normalize(q, k, v), (16, 32), forward=True).options.amx
    assert not cpu.prepare(semantics.normalize(q, k, v), (32, 32)).options.amx  # the backward's


def test_amx_forced_off_takes_mkl_and_agrees(monkeypatch):
    q, k, v = _inputs(6, 4, 2, 96, 160, 64)
    tiles, options = (32, 64), {"causal": True}
    amx = _check_forward(q, k, v, tiles, **options)
    monkeypatch.setenv(_cpu_isa.AMX_ENV_VAR, "off")
    assert cpu.amx_path() == (False, f"MKL's bfloat16 GEMM, AMX tiles forced off by {_cpu_isa.AMX_ENV_VAR}=off")
    assert not cpu.prepare(semantics.normalize(q, k, v, **options), tiles, forward=True).options.amx
    mkl = _check_forward(q, k, v, tiles, **options)
    np.testing.assert_allclose(amx, mkl, rtol=0, atol=2e-2)  # the same bf16 P; sums in another order


def test_amx_dropout_rounds_p_in_key_pairs():
    """With dropout P is rounded after the mask (not in the fused pass): the key-pair rounding."""
    q, k, v = _inputs(7, 2, 2, 64, 96, 64)
    options = {"dropout_p": 0.3, "seed": 2}
    out, _ = cpu.forward(semantics.normalize(q, k, v, **options), block_size=(32, 32))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(_cpu_isa.AMX_ENV_VAR, "off")
        mkl, _ = cpu.forward(semantics.normalize(q, k, v, **options), block_size=(32, 32))
    np.testing.assert_allclose(out, mkl, rtol=0, atol=2e-2)
    assert np.abs(out).max() > 0.1


@pytest.mark.parametrize("causal", [False, True], ids=["dense", "causal"])
@pytest.mark.parametrize("excess", [0.5, 7.5, 8.5, 300.0])
def test_bf16_lazy_step_when_the_max_grows_in_a_later_tile(excess, causal):
    """The bfloat16 forward's lazy step (exp, sum, tile max and rounding in one pass against
    the running shift; LAZY_LOG2 = 8): keys from 600 on score ``excess`` (base 2) more than
    the first tile's — kept below the threshold, the exact step above it, P past float32 at 300."""
    from dotattn.kernels._cpu_primitives import LAZY_LOG2

    assert LAZY_LOG2 == 8.0
    rng = np.random.default_rng(1)
    L = 1536  # six key tiles of 256
    s = rng.uniform(0.0, 1.0, L)
    s[600:] += excess * np.log(2.0)
    q = np.zeros((1, 2, L, 64), dtype=np.float32)
    q[..., 0] = 1.0
    k = np.zeros((1, 2, L, 64), dtype=np.float32)
    k[..., 0] = s
    k[..., 1:] = 0.01 * rng.standard_normal((1, 2, L, 63))
    v = rng.standard_normal((1, 2, L, 64))
    q, k, v = (x.astype(BFLOAT16) for x in (q, k, v))
    out, lse = dotattn.attention(q, k, v, scale=1.0, causal=causal, return_lse=True, implementation="cpu")
    ref_out, ref_lse = H.reference(q, k, v, scale=1.0, causal=causal)
    nai_out, nai_lse = H.naive(q, k, v, scale=1.0, causal=causal)
    H.assert_close_to_reference(out, ref_out, nai_out, name="out")
    H.assert_close_to_reference(lse, ref_lse, nai_lse, name="lse", dtype=BFLOAT16, magnitude=float(np.abs(ref_lse).max()))


@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
def test_bf16_nonfinite_score_in_a_later_tile_reaches_the_row(value):
    """A NaN/+inf score first met in a later key tile (the lazy pass's tile max) makes its rows NaN, as NumPy's backend."""
    q, k, v = _inputs(3, 2, 2, 1536, 1536, 64)
    k[0, 1, 1300, 0] = value
    q[0, 1, :, 0] = np.abs(q[0, 1, :, 0].astype(np.float32)) + 0.1
    ours = dotattn.attention(q, k, v, implementation="cpu").astype(np.float32)
    theirs = dotattn.attention(q, k, v, implementation="numpy").astype(np.float32)
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
    assert np.isnan(ours[0, 1]).all() and np.isfinite(ours[0, 0]).all()


def _bf16_bits_to_f64(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


@pytest.mark.parametrize("want_max", [True, False], ids=["lazy-step", "online-step"])
def test_amx_softmax_pass_against_float64(want_max):
    """``_cpu_amx.exp2_pairs`` (512-bit vectors written out): each P within bfloat16's rounding
    (2**−8 relative, plus the polynomial's 7.5e-5) of the float64 ``2**(s·mul − sub)``, in key
    pairs; 0 at and below 2**−125 and for −inf scores; the sum of the unrounded P added to
    ``sum`` within float32 error; the column max; NaN scores make P, the sum and the max NaN."""
    from dotattn.kernels import _cpu_amx
    from dotattn.kernels._cpu_primitives import _aligned_empty

    if not HAS_AMX:  # the pass's instructions (avx512_bf16) may be missing: no forward takes it here
        q, k, v = _inputs(3, 2, 2, 64, 64, 64)
        assert not cpu.prepare(semantics.normalize(q, k, v), (32, 32), forward=True).options.amx
        return
    rng = np.random.default_rng(8)
    BK, BQ = 96, 64
    S = _aligned_empty(BK, BQ, np.empty(0, np.float32))
    S[:] = rng.standard_normal((BK, BQ), dtype=np.float32) * 4
    S[3, 5] = -np.inf  # a masked score
    S[10:, 60:] = -np.inf  # a masked block
    S[7, 33] = np.nan  # a NaN score: column 33 NaN
    mul = np.float32(0.7)
    sub = (np.nanmax(S, axis=0) * mul).astype(np.float32)
    sub[20] += 200.0  # 2**(x) with x down to ≈ −215: the flush to 0 below 2**−125
    sub[21] = np.float32(np.nanmax(S[:, 21]) * mul) - 6.0  # scores above the shift (lazy step: P ≤ 2**8)
    Pb = _aligned_empty(BK // 2, BQ, np.empty(0, np.uint32))
    row_sum = np.full(BQ, 1.5, np.float32)  # added to
    tile_max = np.zeros(BQ, np.float32)
    for j in range(0, BQ, 32):
        _cpu_amx.exp2_pairs(
            S.ctypes.data + 4 * j, S.strides[0], BK, Pb.ctypes.data + 4 * j, Pb.strides[0], mul,
            sub.ctypes.data + 4 * j, row_sum.ctypes.data + 4 * j, tile_max.ctypes.data + 4 * j if want_max else 0,
        )
    P = np.empty((BK, BQ))
    P[0::2], P[1::2] = _bf16_bits_to_f64(Pb & 0xFFFF), _bf16_bits_to_f64(Pb >> 16)
    with np.errstate(invalid="ignore", over="ignore"):
        x = S.astype(np.float64) * np.float64(mul) - sub.astype(np.float64)
        exact = np.exp2(x)
    exact[x <= -125] = 0.0
    nan_col = np.zeros(BQ, bool)
    nan_col[33] = True
    ok = ~nan_col[None, :] & np.ones((BK, 1), bool)
    assert np.isnan(P[7, 33]) and np.isnan(row_sum[33])
    assert np.all(np.isfinite(P[ok]))
    assert np.all((P[ok] == 0) == (exact[ok] == 0))
    assert (exact[:, 20] == 0).sum() > 10 and (P[:, 21] > 1).any()
    nz = ok & (exact > 0)
    assert np.max(np.abs(P[nz] - exact[nz]) / exact[nz]) <= 2.0**-8 + 1e-4
    fine = ~nan_col
    expect_sum = 1.5 + exact.sum(axis=0)
    assert np.max(np.abs(row_sum[fine] - expect_sum[fine]) / expect_sum[fine]) < 2e-4
    if want_max:
        assert np.array_equal(tile_max[fine], np.max(S[:, fine], axis=0)) and np.isnan(tile_max[33])
    else:
        assert np.all(tile_max == 0)  # not written


@pytest.mark.parametrize(
    "Hq, Hkv, Lq, Lk, D, tiles, options",
    [
        (4, 2, 300, 290, 64, None, {"causal": True}),  # GQA, causal, lengths no multiple of the tile
        (2, 2, 70, 90, 59, (32, 32), {}),  # odd head dim (MKL's products)
        (2, 1, 96, 96, 128, (32, 64), {"q_lengths": np.array([50]), "kv_lengths": np.array([80])}),
        # D 96: six 16-dim blocks of the vector strips; 77 rows: whole strips and a 13-row tail
        (2, 1, 77, 64, 96, (64, 32), {}),
    ],
    ids=["gqa-causal", "odd-D59", "d128-lengths", "d96-tail-strip"],
)
def test_bf16_output_written_by_the_kernel(Hq, Hkv, Lq, Lk, D, tiles, options):
    """``forward(final=True)`` (what ``dotattn.attention`` runs) rounds the output rows to
    bfloat16 in the kernel: the same bits as the float32 output cast afterwards, within the
    2× naive rule of the float64 reference, NaN rows NaN (a NaN query)."""
    q, k, v = _inputs(12, Hq, Hkv, Lq, Lk, D)
    q[0, 1, 30, 3] = np.nan  # (row 30 is real and sees keys in every case)
    call = semantics.normalize(q, k, v, **options)
    out32, lse32 = cpu.forward(call, block_size=tiles)
    out16, lse16 = cpu.forward(semantics.normalize(q, k, v, **options), block_size=tiles, final=True)
    assert out16.dtype == (BFLOAT16 if HAS_BF16_ISA else np.float32)
    cast = out32.astype(BFLOAT16)
    assert np.array_equal(np.isnan(out16.astype(np.float32)), np.isnan(cast.astype(np.float32)))
    assert np.isnan(out16[0, 1, 30].astype(np.float32)).all()
    finite = ~np.isnan(cast.astype(np.float32))
    assert np.array_equal(out16.astype(BFLOAT16).view(np.uint16)[finite], cast.view(np.uint16)[finite])
    assert np.array_equal(lse16, lse32, equal_nan=True)
    api = dotattn.attention(q, k, v, implementation="cpu", **options)  # default tiles (or the small-call kernel)
    assert api.dtype == BFLOAT16 and np.isnan(api[0, 1, 30].astype(np.float32)).all()
    q[0, 1, 30, 3] = 0
    ref, _ = H.reference(q, k, v, **options)
    naive, _ = H.naive(q, k, v, **options)
    H.assert_close_to_reference(out16[:, :1], ref[:, :1], naive[:, :1], name="out")
    H.assert_close_to_reference(api[:, :1], ref[:, :1], naive[:, :1], name="out (dotattn.attention)")


@pytest.mark.parametrize("D, BQ, nr", [(32, 32, 32), (64, 256, 256), (64, 256, 200), (128, 256, 37), (256, 64, 63)])
def test_query_tile_packed_by_the_vector_transpose(D, BQ, nr):
    """``_cpu_amx.pack_q_rows`` (whole 16-row blocks through ``_transpose_store16``, the rest
    element by element): ``Qv[k, n]`` = query row ``i0 + n``'s pair ``k`` for ``n < nr``, 0 after."""
    from dotattn.kernels import _cpu_amx
    from dotattn.kernels._cpu_primitives import _aligned_empty

    if not HAS_AMX:  # (avx512 may be missing): no forward packs its query tiles there
        q, k, v = _inputs(3, 1, 1, 32, 32, 32)
        assert not cpu.prepare(semantics.normalize(q, k, v), (32, 32), forward=True).options.amx
        return
    rng = np.random.default_rng(D + nr)
    L, i0 = 300, 7
    q32 = rng.integers(0, 2**32, size=(2, 3, L, D // 2), dtype=np.uint32)
    Qv = _aligned_empty(D // 2, BQ, np.empty(0, np.uint32))
    Qv[:] = 0xDEADBEEF
    _cpu_amx.pack_q_rows(q32, 1, 2, i0, nr, Qv)
    expect = np.zeros((D // 2, BQ), dtype=np.uint32)
    expect[:, :nr] = q32[1, 2, i0 : i0 + nr].T
    assert np.array_equal(Qv, expect)


def test_output_rows_from_the_transposed_accumulator():
    """``_cpu_amx.rows_bf16`` (the vector transpose of 16 output rows): ``out[r, d] =
    bf16(accᵀ[d, r] · scale[r])`` rounded to nearest even — the same bits as NumPy's product
    cast by ml_dtypes — 0 for a row whose scale is 0 even where accᵀ holds inf/NaN, NaN for
    a NaN scale; the output's row stride apart from its width, nothing written outside."""
    from dotattn.kernels import _cpu_amx
    from dotattn.kernels._cpu_primitives import _aligned_empty

    if not HAS_AMX:  # (avx512_bf16 may be missing): no forward takes the strips there
        q, k, v = _inputs(3, 1, 1, 32, 32, 32)
        assert not cpu.prepare(semantics.normalize(q, k, v), (32, 32), forward=True).options.amx
        return
    rng = np.random.default_rng(9)
    Dv, BQ = 48, 64
    accT = _aligned_empty(Dv, BQ, np.empty(0, np.float32))
    accT[:] = rng.standard_normal((Dv, BQ), dtype=np.float32) * 100
    accT[5, 16 + 3] = np.inf  # row 3 of the strip: scale 0
    accT[7, 16 + 4] = np.nan
    accT[:, 16 + 9] = np.float32(1.0) + np.float32(2.0**-8)  # a tie: rounds to even (1.0)
    scale = rng.random(BQ, dtype=np.float32) + 0.5
    scale[16 + 3] = scale[16 + 4] = 0.0
    scale[16 + 6] = np.nan
    scale[16 + 9] = 1.0
    out = np.full((20, Dv + 8), 0xABCD, dtype=np.uint16)  # rows 2 … 17 written, 8 columns spare
    _cpu_amx.rows_bf16(accT.ctypes.data + 16 * 4, accT.strides[0], scale.ctypes.data + 16 * 4,
                       out.ctypes.data + 2 * out.strides[0], out.strides[0], Dv)
    rows = slice(16, 32)
    with np.errstate(invalid="ignore"):  # inf · 0 in the row the select zeroes
        expect = np.where(scale[rows, None] != 0, accT[:, rows].T * scale[rows, None], np.float32(0.0))
    assert np.array_equal(out[2:18, :Dv], expect.astype(BFLOAT16).view(np.uint16))
    assert np.all(out[2 + 3, :Dv] == 0) and np.all(out[2 + 4, :Dv] == 0)
    assert np.isnan(out[2 + 6, :Dv].view(BFLOAT16).astype(np.float32)).all()
    assert np.all(out[2 + 9, :Dv] == 0x3F80)  # 1 + 2**-8 → 1.0 (even)
    assert np.all(out[:2] == 0xABCD) and np.all(out[18:] == 0xABCD) and np.all(out[:, Dv:] == 0xABCD)


@pytest.mark.parametrize("D, BK, L", [(64, 256, 512), (96, 32, 96), (2, 2, 6)], ids=["d64", "d96-partial-block", "tiny"])
def test_v_packed_transposed_from_whole_tiles(D, BK, L):
    """``_pack_kv(transposed=True)`` for whole key tiles (``_cpu_amx.pack_vt``, key pairs as
    uint32 words) gives NumPy's transposed copy bit for bit; kv_lengths below L keep the copy
    that zeroes the padding."""
    rng = np.random.default_rng(4)
    v = rng.standard_normal((2, 3, L, D), dtype=np.float32).astype(BFLOAT16)
    v[1, 2, 3, 1] = np.nan  # bits move as they are
    packed = cpu._pack_kv(v, None, BK, BFLOAT16, transposed=True)
    expect = v.reshape(2, 3, L // BK, BK, D)
    assert packed.shape == expect.shape and packed.strides[3] == 2  # the transposed view
    assert np.array_equal(packed.view(np.uint16), expect.view(np.uint16))
    short = cpu._pack_kv(v, np.array([L - 1, L]), BK, BFLOAT16, transposed=True)
    assert np.all(short[0].reshape(3, L, D)[:, L - 1].view(np.uint16) == 0)
    assert np.array_equal(short[1].view(np.uint16), expect[1].view(np.uint16))


def test_bf16_finiteness_check_on_every_bit_pattern():
    """``cpu._all_finite`` on bfloat16 (and its uint16 bits): each of the 65,536 patterns alone in
    a finite array, at the first, a middle and the last place, of a contiguous array and of a
    strided view — False exactly for NaN and ±inf (exponent bits all ones)."""
    patterns = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    nonfinite = (patterns & 0x7F80) == 0x7F80
    base = np.full(48, 0x3F80, dtype=np.uint16)  # 1.0
    for u, bad in zip(patterns.tolist(), nonfinite.tolist()):
        for where in (0, 23, 47):
            base[where] = u
            assert cpu._all_finite(base) is not bad and cpu._all_finite(base.view(BFLOAT16)) is not bad
            assert cpu._all_finite(base.reshape(6, 8)[:, ::2]) is not (bad and where % 2 == 0)
            base[where] = 0x3F80


@pytest.mark.parametrize(
    "bits, finite",
    [(None, True), (0x7F80, False), (0xFF80, False), (0x7FC1, False), (0xFFFF, False), (0x7F7F, True), (0xFF7F, True),
     (0x0001, True), (0x8000, True)],
    ids=["all-finite", "inf", "-inf", "nan", "nan-ffff", "max", "-max", "subnormal", "-0"],
)
def test_v_packing_checks_finiteness(bits, finite):
    """``pack_vt`` (whole key tiles) says whether V is finite from the bits it moves — NaN and
    ±inf in either half of a uint32 word, at any key and dim — and the forward uses that
    instead of a pass of its own; the copy for padded tiles checks nothing (None)."""
    rng = np.random.default_rng(5)
    v = rng.standard_normal((1, 2, 64, 32), dtype=np.float32).astype(BFLOAT16)
    for key, dim in ((0, 0), (17, 5), (63, 31), (40, 30)):  # both halves of a word, odd/even keys
        w = v.copy()
        if bits is not None:
            w.view(np.uint16)[0, 1, key, dim] = bits
        packed, ok = cpu._pack_kv_checked(w, None, 32, BFLOAT16, transposed=True)
        assert ok is finite
        assert np.array_equal(packed.view(np.uint16), w.reshape(1, 2, 2, 32, 32).view(np.uint16))
        assert ok == cpu._all_finite(w)
    assert cpu._pack_kv_checked(v, np.array([50]), 32, BFLOAT16, transposed=True)[1] is None
    if bits is not None and not finite:  # a non-finite value reaches the NumPy backend's policy
        w = v.copy()
        w.view(np.uint16)[0, 1, 63, 31] = bits
        q, k, _ = _inputs(6, 2, 2, 64, 64, 32)
        out, _ = cpu.forward(semantics.normalize(q, k, w, causal=True))
        assert np.isfinite(out[0, 1, :63].astype(np.float32)).all()  # rows that never see key 63


@pytest.mark.parametrize("k_memory", ["aligned", "misaligned", "read-only"])
@pytest.mark.parametrize("B, Hkv, L, D, Dv", [(1, 8, 512, 64, 64), (2, 3, 256, 128, 32), (3, 1, 64, 32, 96)])
def test_forward_kv_packed_by_heads_on_the_pool_as_on_one_thread(B, Hkv, L, D, Dv, k_memory, monkeypatch):
    """``cpu._pack_bf16_forward_kv`` (K copied to a 64-byte boundary where needed, Vᵀ packed,
    heads split over the caller and the pool) gives :func:`cpu._pack_kv` /
    :func:`cpu._pack_kv_checked`'s arrays bit for bit, strides and finiteness included, on
    one thread or two; K in place where it is aligned and writable."""
    rng = np.random.default_rng(7)
    k = rng.standard_normal((B, Hkv, L, D), dtype=np.float32).astype(BFLOAT16)
    if k_memory == "misaligned":
        raw = np.empty(k.size + 64, np.uint16)
        skip = (-raw.ctypes.data % 64) // 2 + 8  # 16 bytes past a boundary
        k2 = raw[skip : skip + k.size].view(BFLOAT16).reshape(k.shape)
        k2[:] = k
        k = k2
    elif k_memory == "read-only":
        k.flags.writeable = False
    for bad in (None, np.nan, -np.inf):
        v = rng.standard_normal((B, Hkv, L, Dv), dtype=np.float32).astype(BFLOAT16)
        if bad is not None:
            v[-1, -1, L - 1, Dv - 1] = bad
        kp, vp, finite = cpu._pack_bf16_forward_kv(k, v, None, 32)
        expect_vp, expect_finite = cpu._pack_kv_checked(v, None, 32, BFLOAT16, transposed=True)
        expect_kp = cpu._pack_kv(k, None, 32, BFLOAT16)
        assert kp.shape == expect_kp.shape and np.array_equal(kp.view(np.uint16), expect_kp.view(np.uint16))
        assert vp.shape == expect_vp.shape and vp.strides == expect_vp.strides
        assert np.array_equal(vp.view(np.uint16), expect_vp.view(np.uint16))
        assert finite is expect_finite is (bad is None)
        assert kp.ctypes.data % 64 == 0 and vp.ctypes.data % 64 == 0
        assert (kp.base is not None and np.shares_memory(kp, k)) == (k_memory == "aligned" and k.ctypes.data % 64 == 0)
        monkeypatch.setattr(_launch, "num_threads", lambda: 1)
        one = cpu._pack_bf16_forward_kv(k, v, None, 32)
        monkeypatch.undo()
        assert np.array_equal(one[1].view(np.uint16), vp.view(np.uint16)) and one[2] is finite
    # not whole tiles in C order: the general packing
    assert cpu._pack_bf16_forward_kv(k, v[:, :, : L - 2], None, 32) is None
    assert cpu._pack_bf16_forward_kv(k, v, np.full(B, L - 1), 32) is None


@pytest.mark.parametrize("L, causal", [(512, False), (300, True)], ids=["whole-tiles", "partial-tiles"])
def test_backward_final_rounds_bf16_gradients_as_astype_does(L, causal):
    """``cpu.backward_final`` (front ends' gradients: ``dispatch.run_backward(final=True)``)
    returns bfloat16 dq/dk/dv with the bits of ``finalize_grad``'s ``astype`` of the float32
    ones; gradients that are not contiguous (dk/dv of a partial last key tile) stay float32
    for ``finalize_grad``; float32 calls are untouched."""
    from dotattn import dispatch

    rng = np.random.default_rng(11)
    q, k, v, do = (rng.standard_normal((2, 3, L, 64), dtype=np.float32).astype(BFLOAT16) for _ in range(4))
    call = semantics.normalize(q, k, v, causal=causal)
    out, lse = cpu.forward(call)
    plain = cpu.backward(call, out, lse, do)
    final = cpu.backward_final(call, out, lse, do)
    for g, f, name in zip(plain[:3], final[:3], "qkv"):
        assert g.dtype == np.float32
        assert f.dtype == (BFLOAT16 if g.flags.c_contiguous else np.float32)
        assert f.dtype == BFLOAT16 or name != "q"
        expect = semantics.finalize_grad(call, g, name)
        got = semantics.finalize_grad(call, f, name)
        assert got.dtype == BFLOAT16 and np.array_equal(got.view(np.uint16), expect.view(np.uint16))
    via_dispatch = dispatch.run_backward(call, out, lse, do, implementation="cpu", final=True)
    assert all(np.array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8)) for a, b in zip(via_dispatch[:3], final[:3]))
    q32 = q.astype(np.float32)
    call32 = semantics.normalize(q32, q32, q32, causal=causal)
    out32, lse32 = cpu.forward(call32)
    assert all(g.dtype == np.float32 for g in cpu.backward_final(call32, out32, lse32, q32)[:3])


def test_bf16_gradient_rounding_keeps_nan_and_ties_to_even():
    """The compiled rounding of ``backward_final`` (``_round_to_bf16``) gives ml_dtypes' bits for
    every non-NaN float32 (ties to even, ±inf, ±0, subnormals, overflow to inf) and a quiet NaN
    with the sign for every NaN (its payload's top bits kept, as the forward's kernel rows do)."""
    from dotattn.kernels._cpu_primitives import _round_to_bf16

    rng = np.random.default_rng(12)
    bits = np.concatenate([
        rng.integers(0, 2**32, 100_000, dtype=np.uint64).astype(np.uint32),
        np.array([0x3F808000, 0x3F818000, 0x7F7FFFFF, 0xFF7FFFFF, 0x00000001, 0x80000000, 0x7F800000, 0xFF800000,
                  0x7F800001, 0x7FFFFFFF, 0xFFFFFFFF, 0xFFC00000], dtype=np.uint32),
    ])
    x = bits.view(np.float32)
    got = np.empty(x.size, np.uint16)
    _round_to_bf16(x, got)
    nan = np.isnan(x)
    with np.errstate(invalid="ignore"):
        expect = x.astype(BFLOAT16).view(np.uint16)
    assert np.array_equal(got[~nan], expect[~nan])
    assert np.all((got[nan] & 0x7FC0) == 0x7FC0)  # quiet NaN
    assert np.array_equal(got[nan] >> 15, (bits[nan] >> 31).astype(np.uint16))  # the sign kept


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("B, Hq, Hkv, L, D, Dv, causal", [(1, 4, 4, 1024, 64, 64, False), (2, 3, 1, 700, 128, 96, True)])
def test_backward_checks_and_delta_on_two_threads(B, Hq, Hkv, L, D, Dv, causal, threads, monkeypatch):
    """``cpu._backward_checks_and_delta`` (a bfloat16 backward's finiteness checks and Δ on the
    caller and the pool) gives ``einsum``'s Δ on ml_dtypes' float32 bit for bit, finds a
    NaN/inf in dO, O or q, and the backward's gradients are those of the serial checks."""
    if not {"avx512bf16", "amx-bf16"} & _cpu_isa._cpu_features():  # bfloat16 operands compute in float32
        pytest.skip(H.lacks("AVX-512 BF16", "no bfloat16 backward here: its Δ pass never runs"))
    rng = np.random.default_rng(13)
    q, k = (rng.standard_normal((B, h, L, D), dtype=np.float32).astype(BFLOAT16) for h in (Hq, Hkv))
    v = rng.standard_normal((B, Hkv, L, Dv), dtype=np.float32).astype(BFLOAT16)
    call = semantics.normalize(q, k, v, causal=causal)
    out, lse = cpu.forward(call)
    out = out.astype(BFLOAT16)
    do = rng.standard_normal(out.shape, dtype=np.float32).astype(BFLOAT16)
    monkeypatch.setattr(_launch, "num_threads", lambda: threads)
    p = cpu.prepare(call, cpu.BF16_BACKWARD_BLOCK_SIZE)
    finite, delta, do_k = cpu._backward_checks_and_delta(call, p, out, do, lse)
    expect = np.einsum("bhld,bhld->bhl", do.astype(np.float32), out.astype(np.float32), dtype=np.float32)
    assert finite is True and np.array_equal(delta, expect) and np.array_equal(do_k, do.view(np.uint16))
    H.assert_backward_checks_find_nonfinite(q, k, v, out, do, lse, causal=causal, block_size=cpu.BF16_BACKWARD_BLOCK_SIZE)
    grads = cpu.backward(call, out, lse, do)
    monkeypatch.setattr(cpu, "_backward_checks_and_delta", lambda *a: None)
    serial = cpu.backward(call, out, lse, do)
    assert all(np.array_equal(a, b) for a, b in zip(grads[:3], serial[:3]))
    # a NaN in dO takes the NumPy backend's policy either way
    monkeypatch.undo()
    bad_do = do.copy()
    bad_do[0, 0, 1, 0] = np.nan
    monkeypatch.setattr(_launch, "num_threads", lambda: threads)
    with np.errstate(invalid="ignore"):
        split = cpu.backward(call, out, lse, bad_do)
        monkeypatch.setattr(cpu, "_backward_checks_and_delta", lambda *a: None)
        general = cpu.backward(call, out, lse, bad_do)
    assert all(np.array_equal(a, b, equal_nan=True) for a, b in zip(split[:3], general[:3]))


# --- the backward's tile products on AMX (Options.bwd_amx: K·Qᵀ, V·dOᵀ, P̃ᵀ·dO, dS·Q) --------


def _backward_both_ways(q, k, v, tiles, monkeypatch, **options):
    """The backward's gradients on AMX and with MKL forced (``DOTATTN_CPU_BWD_AMX=off``)."""
    call = semantics.normalize(q, k, v, **options)
    dout = np.random.default_rng(3).standard_normal(q.shape[:-1] + (v.shape[-1],)).astype(BFLOAT16)
    out, lse = cpu.forward(call, block_size=tiles)
    BT = cpu.BF16_BACKWARD_BLOCK_SIZE if tiles is None else tiles
    assert cpu.bf16_backward_amx(call, cpu.prepare(call, BT)) == HAS_AMX
    amx = cpu.backward(call, out, lse, dout, block_size=tiles)[:3]
    with monkeypatch.context() as mp:
        mp.setenv(cpu.BWD_AMX_ENV_VAR, "off")
        assert not cpu.bf16_backward_amx(call, cpu.prepare(call, BT))
        mkl = cpu.backward(call, out, lse, dout, block_size=tiles)[:3]
    return amx, mkl


@pytest.mark.parametrize(
    "Hq, Hkv, Lq, Lk, D, Dv, tiles, options",
    [
        # the default tiles (256 × 256), GQA, causal, lengths no multiple of the tile
        (4, 2, 300, 270, 64, 64, None, {"causal": True}),
        (2, 2, 96, 160, 128, 128, (32, 64), {}),  # D 128
        (1, 1, 70, 90, 32, 64, (32, 32), {"kv_lengths": np.array([77])}),  # D ≠ Dv, padded keys
        (2, 2, 96, 96, 64, 64, (32, 32), {"q_lengths": np.array([51]), "causal": True}),  # padding query rows (odd)
        (2, 1, 64, 200, 64, 32, (32, 96), {"window": (40, 10), "softcap": 15.0}),  # unfused: chain rule
    ],
    ids=["d64-gqa-causal-odd", "d128", "d32-dv64-kvlen", "qlen-causal", "window-softcap"],
)
def test_backward_amx_matches_mkl_and_the_reference(Hq, Hkv, Lq, Lk, D, Dv, tiles, options, monkeypatch):
    q, k, v = H.random_qkv(23, batch=(1,), Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D, Dv=Dv, dtype=BFLOAT16)
    amx, mkl = _backward_both_ways(q, k, v, tiles, monkeypatch, **options)
    for a, m in zip(amx, mkl):  # (the same bits on this host's MKL; another MKL may sum otherwise)
        np.testing.assert_allclose(a, m, rtol=0, atol=2e-3 * max(1.0, float(np.abs(m).max())))
    _check(q, k, v, tiles, **options)  # the AMX route against the float64 reference


def test_backward_amx_with_dropout_agrees_with_mkl(monkeypatch):
    q, k, v = _inputs(7, 2, 2, 64, 96, 64)
    amx, mkl = _backward_both_ways(q, k, v, (32, 32), monkeypatch, dropout_p=0.3, seed=2)
    for a, m in zip(amx, mkl):
        np.testing.assert_allclose(a, m, rtol=0, atol=2e-3 * max(1.0, float(np.abs(m).max())))
        assert np.abs(m).max() > 0.01


def test_backward_amx_needs_whole_32_steps():
    """Head dims or tiles that are no whole AMX steps keep MKL (as the forward's rule)."""
    q, k, v = _inputs(3, 2, 2, 64, 64, 48)  # D 48
    call = semantics.normalize(q, k, v)
    assert not cpu.bf16_backward_amx(call, cpu.prepare(call, (32, 32)))
    q, k, v = _inputs(3, 2, 2, 64, 64, 64)
    call = semantics.normalize(q, k, v)
    assert not cpu.bf16_backward_amx(call, cpu.prepare(call, (16, 32)))
    assert cpu.bf16_backward_amx(call, cpu.prepare(call, (32, 32))) == HAS_AMX
    f32 = semantics.normalize(*(x.astype(np.float32) for x in (q, k, v)))
    assert not cpu.bf16_backward_amx(f32, cpu.prepare(f32, (32, 32)))
    _check(q[:, :, :, :48], k[:, :, :, :48], v[:, :, :, :48], (16, 16))  # the MKL route, D 48


@pytest.mark.parametrize("B, H, L, X, lens", [(1, 3, 300, 64, None), (2, 2, 77, 128, (51, 77)), (1, 1, 5, 32, (4,))])
def test_backward_amx_operands_packed(B, H, L, X, lens, monkeypatch):
    """q's/dO's rows in pairs of dims transposed (``_bf16_pairs_t``) and in pairs of rows
    (``_bf16_row_pairs``): NumPy's reading of the bits; zero past ``q_lens`` and the padding;
    the same on one thread."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((B, H, L, X), dtype=np.float32).astype(BFLOAT16).view(np.uint16)
    q_lens = np.array(lens if lens else (L,) * B, dtype=np.int64)
    BQ = 32
    nq = -(-L // BQ) * BQ
    keep = np.zeros((B, H, nq, X), np.uint16)
    for b in range(B):
        keep[b, :, : q_lens[b]] = x[b, :, : q_lens[b]]
    t = cpu._bf16_pairs_t(x, q_lens, BQ)
    assert t.shape == (B, H, 1, X // 2, nq + 16) and t.ctypes.data % 64 == 0
    assert np.array_equal(t[:, :, 0, :, :nq], keep.view(np.uint32).swapaxes(2, 3)) and not t[..., nq:].any()
    r = cpu._bf16_row_pairs(x, q_lens, BQ)
    expect = keep[:, :, 0::2].astype(np.uint32) | (keep[:, :, 1::2].astype(np.uint32) << 16)
    assert r.shape == (B, H, 1, nq // 2, X) and np.array_equal(r[:, :, 0], expect)
    # the backward's four in one hand-off (q and dO: here x and its bits reversed)
    y = x[..., ::-1].copy()
    both = cpu._bf16_query_side_pairs(x, y, q_lens, BQ)
    expect4 = [t, cpu._bf16_pairs_t(y, q_lens, BQ), r, cpu._bf16_row_pairs(y, q_lens, BQ)]
    assert all(a.ctypes.data % 64 == 0 and a.shape == e.shape and np.array_equal(a, e) for a, e in zip(both, expect4))
    monkeypatch.setattr(_launch, "num_threads", lambda: 1)
    assert np.array_equal(cpu._bf16_pairs_t(x, q_lens, BQ), t) and np.array_equal(cpu._bf16_row_pairs(x, q_lens, BQ), r)
    assert all(np.array_equal(a, e) for a, e in zip(cpu._bf16_query_side_pairs(x, y, q_lens, BQ), expect4))


# --- the fifth product, dQᵀ += Kᵀ·dS on AMX (Kᵀ per task, dS in key pairs from the dS pass) ---


@pytest.mark.parametrize(
    "Hq, Hkv, Lq, Lk, D, Dv, tiles, options, serial",
    [
        (3, 1, 301, 283, 64, 64, None, {"causal": True}, False),  # GQA 3:1, causal, odd lengths, two parts
        (2, 2, 45, 77, 32, 32, (32, 32), {}, True),  # D 32, odd lengths, one part
        (2, 1, 130, 100, 128, 64, (64, 32), {"kv_lengths": np.array([93])}, False),  # D 128 ≠ Dv, padded keys
        (1, 1, 70, 64, 64, 96, (32, 64), {"q_lengths": np.array([51]), "causal": True}, True),  # Dv > D, padded rows
        (2, 2, 64, 96, 32, 32, (32, 32), {"softcap": 10.0}, False),  # dS in float32 first: pairs from its rounding
    ],
    ids=["gqa3-causal-odd-2parts", "d32-odd", "d128-dv64-kvlen", "dv96-qlen-causal", "softcap-unfused"],
)
def test_backward_amx_dq_same_bits_as_mkl(Hq, Hkv, Lq, Lk, D, Dv, tiles, options, serial, monkeypatch):
    """dQ on our AMX tiles (``Options.bwd_amx``: ``_cpu_kernels._dq_product`` into dQᵀ's parts,
    summed by ``dq_from_transposed``) gives MKL's bits (``DOTATTN_CPU_BWD_AMX=off``: dQ +=
    dSᵀ·K by ``cblas_gemm_bf16bf16f32``) — this host's MKL sums ``tdpbf16ps`` over the keys in
    the same order onto the loaded dQ — on one thread and on the kernel's pool (dQ in two
    parts), and the float64 reference's tolerance holds."""
    if not HAS_AMX:
        pytest.skip(H.lacks("AMX", "the MKL route only"))
    q, k, v = H.random_qkv(31, batch=(1,), Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D, Dv=Dv, dtype=BFLOAT16)
    call = semantics.normalize(q, k, v, **options)
    dout = np.random.default_rng(3).standard_normal(q.shape[:-1] + (Dv,)).astype(BFLOAT16)
    out, lse = cpu.forward(call, block_size=tiles)
    amx = cpu.backward(call, out, lse, dout, block_size=tiles, serial=serial)[:3]
    with monkeypatch.context() as mp:
        mp.setenv(cpu.BWD_AMX_ENV_VAR, "off")
        mkl = cpu.backward(call, out, lse, dout, block_size=tiles, serial=serial)[:3]
    for name, a, m in zip(("dq", "dk", "dv"), amx, mkl):
        assert a.shape == m.shape and np.array_equal(a.view(np.uint32), m.view(np.uint32)), name
    assert np.abs(amx[0]).max() > 0.01
    _check(q, k, v, tiles, **options)


def test_backward_amx_dq_of_a_one_row_tile(monkeypatch):
    """A query tile with one real row: MKL multiplies ``dSᵀ[:1]·K`` on another kernel (a
    vector product, summed in another order), so dQ's row differs from MKL's by float32
    rounding there (its AMX tiles, as ours, for 2 … 32 rows: checked for every count at D 64
    and 128 on this host); dK and dV are MKL's bits still."""
    if not HAS_AMX:
        pytest.skip(H.lacks("AMX", "the MKL route only"))
    q, k, v = H.random_qkv(31, batch=(1,), Hq=1, Hkv=1, Lq=65, Lk=64, D=64, Dv=64, dtype=BFLOAT16)
    call = semantics.normalize(q, k, v)
    dout = np.random.default_rng(3).standard_normal(q.shape).astype(BFLOAT16)
    out, lse = cpu.forward(call, block_size=(32, 64))
    amx = cpu.backward(call, out, lse, dout, block_size=(32, 64))[:3]
    with monkeypatch.context() as mp:
        mp.setenv(cpu.BWD_AMX_ENV_VAR, "off")
        mkl = cpu.backward(call, out, lse, dout, block_size=(32, 64))[:3]
    assert np.array_equal(amx[0][..., :64, :], mkl[0][..., :64, :])
    np.testing.assert_allclose(amx[0][..., 64, :], mkl[0][..., 64, :], rtol=0, atol=1e-6 * float(np.abs(mkl[0]).max()))
    assert np.array_equal(amx[1], mkl[1]) and np.array_equal(amx[2], mkl[2])
    _check(q, k, v, (32, 64))


def test_backward_dq_transposed_parts_are_the_amx_routes(monkeypatch):
    """dQ's parts are transposed by query tiles (``(chunks, B, H, nqb·D, BQ + 16)``, 64-byte
    aligned) exactly where the bfloat16 backward runs on AMX, and summed back in chunk order;
    the MKL route keeps rows."""
    q, k, v = _inputs(5, 2, 2, 96, 64, 64)
    call = semantics.normalize(q, k, v)
    dout = np.random.default_rng(3).standard_normal(q.shape).astype(BFLOAT16)
    out, lse = cpu.forward(call, block_size=(32, 32))
    seen = []
    real = cpu._buffer

    def spy(role, shape, dtype, zero=False):  # (the buffers the kernel adds into: zeros)
        if zero:
            seen.append(tuple(shape))
        return real(role, shape, dtype, zero)

    monkeypatch.setattr(cpu, "_buffer", spy)
    got = cpu.backward(call, out, lse, dout, block_size=(32, 32), serial=False)[0]
    chunks = cpu._num_threads()
    assert ((chunks, 1, 2, 3 * 64, 32 + 16) in seen) == HAS_AMX
    seen.clear()
    with monkeypatch.context() as mp:
        mp.setenv(cpu.BWD_AMX_ENV_VAR, "off")
        mkl = cpu.backward(call, out, lse, dout, block_size=(32, 32), serial=False)[0]
    # rows: (chunks, B, H, Lq, D), nothing in the transposed layout
    assert (chunks, 1, 2, 96, 64) in seen and not any(s[-1] == 32 + 16 for s in seen)
    np.testing.assert_allclose(got, mkl, rtol=0, atol=2e-3 * max(1.0, float(np.abs(mkl).max())))


def test_amx_ds_pass_writes_rows_and_key_pairs():
    """``_cpu_amx.ds_pairs`` (512-bit vectors): dS in place of P̃ bit for bit as
    ``_cpu_primitives._ds_bf16`` (ties to even, NaN and ±inf through, signed zeros, tiny
    products) and the same dS in key pairs; ``_bf16_key_pairs`` pairs rows as they are;
    ``_cpu_amx.tile_t`` transposes a key tile as NumPy."""
    from dotattn.kernels import _cpu_amx
    from dotattn.kernels._cpu_primitives import _aligned_empty, _bf16_key_pairs, _ds_bf16

    from dotattn.kernels._cpu_isa import _cpu_features

    if "avx512bf16" not in _cpu_features():  # (no AMX needed: passes on a Zen 5 without AMX)
        pytest.skip(H.lacks("AVX-512 BF16", "the pass needs its instructions"))
    rng = np.random.default_rng(12)
    BK, BQ = 64, 96
    P = _aligned_empty(BK, BQ, np.empty(0, np.uint16))
    P[:] = (rng.standard_normal((BK, BQ), dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    P[0, :8] = [0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0x0001, 0x3F80, 0x0080]  # ±0, ±inf, NaN, tiny
    dP = _aligned_empty(BK, BQ, np.empty(0, np.float32))
    dP[:] = rng.standard_normal((BK, BQ), dtype=np.float32) * 3
    dP[1, :4] = [np.nan, np.inf, 1e-38, -1e-30]
    delta = rng.standard_normal(BQ).astype(np.float32)
    expect = P.copy()
    _ds_bf16(expect, dP, delta)
    pairs = np.full((BK // 2, BQ + 16), 0xABCDABCD, np.uint32)
    got = P.copy()
    _cpu_amx.ds_pairs(got.ctypes.data, got.strides[0], dP.ctypes.data, dP.strides[0], BK, BQ, delta.ctypes.data,
                      pairs.ctypes.data, pairs.strides[0])
    assert np.array_equal(got, expect)
    want = expect[0::2].astype(np.uint32) | (expect[1::2].astype(np.uint32) << 16)
    assert np.array_equal(pairs[:, :BQ], want) and np.all(pairs[:, BQ:] == 0xABCDABCD)
    again = np.zeros((BK // 2, BQ), np.uint32)
    _bf16_key_pairs(expect, again)
    assert np.array_equal(again, want)
    for D, BKt in ((64, 256), (128, 32), (32, 64)):
        K = (rng.standard_normal((BKt, D), dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
        KT = np.zeros((D, BKt + 32), np.uint16)
        _cpu_amx.tile_t(K.view(np.uint32), KT.view(np.uint32))
        assert np.array_equal(KT[:, :BKt], K.T) and not KT[:, BKt:].any()
