"""The ``cpu`` decode kernel's bfloat16 scores on ``vdpbf16ps`` (``cpu_decode.BF16_DOT``:
a bfloat16 q on a bfloat16 cache, one query row per K/V head, D % 32 == 0): against the
float64 reference, against the widening path it replaces (forced by ``BF16_DOT = False``), the
same bits wherever a sequence sits, and the calls that keep the widening path."""

from __future__ import annotations

import numpy as np
import pytest

import decode_cases as C
import helpers as H
import dotattn
from dotattn import decoding
from dotattn.kernels import _cpu_decode_kernels as K
from dotattn.kernels import _cpu_isa, _cpu_sync, cpu_decode
from dotattn.semantics import BFLOAT16

HAS_DOT = cpu_decode._bf16_dot_available()


@pytest.fixture
def dot(monkeypatch):
    """``set(on)``: the vdpbf16ps scores on (where the CPU has them) or off for this test."""

    def set_(on: bool) -> None:
        monkeypatch.setattr(cpu_decode, "BF16_DOT", bool(on) and HAS_DOT)

    return set_


def _run(case, **options):
    return dotattn.attention_with_kvcache(
        case.q, case.k_cache, case.v_cache, case.k_new, case.v_new, return_lse=True,
        implementation="cpu", **case.kwargs(**options),
    )


def _check(case, out, lse, **options):
    out64, lse64, naive = C.expected(case, **options)
    H.assert_close_to_reference(C.canonical(out, case.layout), out64, naive, name="out", dtype=BFLOAT16)
    finite = np.isfinite(lse64)
    assert (np.isneginf(lse) == ~finite).all(), "rows with no visible key must have lse = −inf"
    np.testing.assert_allclose(lse[finite], lse64[finite], rtol=1e-3, atol=1e-3)


def test_the_path_is_taken_where_it_applies(monkeypatch):
    """Which calls take it: bfloat16 q and cache, R = 1, D % 32 == 0, Dv % 16 == 0, no rotary."""
    monkeypatch.setattr(cpu_decode, "BF16_DOT", True)
    seen = []
    real = K.run_serial

    def spy(q, kflat, kst, vflat, vst, table, ps, kind, *rest):
        seen.append(kind)
        if kind == K.KIND_BF16_DOT and not HAS_DOT:
            # BF16_DOT forced on a CPU without avx512_bf16 (this test checks the routing only):
            # vdpbf16ps would stop the process (SIGILL), so the widening kernel runs instead
            kind = K.KIND_BF16
        return real(q, kflat, kst, vflat, vst, table, ps, kind, *rest)

    monkeypatch.setattr(K, "run_serial", spy)

    def kind_of(rotary=None, **shape):
        case = C.make_case(5, B=2, max_len=40, **{"Hq": 2, "Hkv": 2, "D": 64, "dtype": BFLOAT16, **shape})
        seen.clear()
        _run(case, **({} if rotary is None else {"rotary": rotary}))
        return seen[-1]

    assert kind_of() == K.KIND_BF16_DOT
    assert kind_of(D=96, Dv=48) == K.KIND_BF16_DOT
    assert kind_of(page_size=5, layout="blhd") == K.KIND_BF16_DOT
    assert kind_of(Hq=4) == K.KIND_BF16  # GQA: R = 2 rows per K/V head
    assert kind_of(Lq=2, Lnew=2) == K.KIND_BF16  # two new tokens: R = 2
    assert kind_of(D=80) == K.KIND_BF16  # D not a multiple of 32
    assert kind_of(D=64, Dv=40) == K.KIND_BF16  # Dv not a multiple of 16
    assert kind_of(q_dtype=np.float32) == K.KIND_BF16  # a float32 q
    assert kind_of(dtype=np.float16) == K.KIND_F16
    cos, sin = C.rope_tables(64, 32)
    assert kind_of(rotary=(cos, sin)) == K.KIND_BF16  # a rotated q is not bfloat16
    monkeypatch.setattr(cpu_decode, "BF16_DOT", False)
    assert kind_of() == K.KIND_BF16


def test_environment_forces_the_widening_path(monkeypatch):
    monkeypatch.setenv(_cpu_isa.ENV_VAR, "off")
    assert cpu_decode._bf16_dot_available() is False
    monkeypatch.delenv(_cpu_isa.ENV_VAR)
    assert cpu_decode._bf16_dot_available() == ("avx512bf16" in _cpu_isa._cpu_features() and _cpu_sync._X86)


# (id, make_case kwargs): lengths not multiples of 16, across split boundaries, empty sequences
CASES = [
    ("contig-D128", dict(D=128, lengths=[0, 1, 15, 17, decoding.SPLIT_SIZE + 33])),
    ("paged-ps7-D64", dict(D=64, page_size=7, lengths=[31, 2 * decoding.SPLIT_SIZE + 5, 0])),
    ("paged-ps16-D96-Dv48-blhd", dict(D=96, Dv=48, page_size=16, layout="blhd", lengths=[100, 3, 250])),
    ("contig-D32-nonew", dict(D=32, Lnew=None, lengths=[1, 77, 0])),
    ("mha-Hkv4-D64", dict(Hq=4, Hkv=4, D=64, lengths=[40, 300, 9])),
]


@pytest.mark.parametrize("name,shape", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("on", [True, False], ids=["dot", "widen"])
def test_matches_reference(dot, name, shape, on):
    dot(on)
    shape = {"Hq": 2, "Hkv": 2, "B": len(shape["lengths"]), "dtype": BFLOAT16, **shape}
    case = C.make_case(sum(map(ord, name)), **shape)
    out, lse = _run(case)
    assert out.dtype == BFLOAT16
    _check(case, out, lse)


@pytest.mark.parametrize("options", [dict(window=(50, None)), dict(softcap=2.0), dict(alibi_slopes="per-head")],
                         ids=["window", "softcap", "alibi"])
def test_options_match_reference(dot, options):
    """The scale applied to the scores, before softcap, ALiBi and the window's mask."""
    dot(True)
    case = C.make_case(11, B=2, Hq=2, Hkv=2, D=64, dtype=BFLOAT16, lengths=[200, 90], page_size=9)
    if options.get("alibi_slopes") == "per-head":
        options = dict(alibi_slopes=np.array([[0.05, 0.2], [0.1, 0.02]], dtype=np.float32))
    out, lse = _run(case, **options)
    _check(case, out, lse, **options)


def test_scores_close_to_the_widening_path(dot):
    """Exact products, a different summation order: the LSE (its scores' log-sum-exp) within a
    few float32 roundings of the widening path's, the outputs within one bfloat16 rounding."""
    case = C.make_case(7, B=4, Hq=8, Hkv=8, D=128, dtype=BFLOAT16, lengths=[1, 255, 1000, 4 * decoding.SPLIT_SIZE])
    dot(True)
    out1, lse1 = _run(case)
    dot(False)
    out0, lse0 = _run(case)
    np.testing.assert_allclose(lse1, lse0, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out1.astype(np.float32), out0.astype(np.float32), rtol=2**-7, atol=2**-7)


def test_bitwise_invariant_to_batch_capacity_and_pages(dot):
    """The same sequence gives the same bits alone, in a batch, in a bigger cache, in pages."""
    dot(True)
    rng = np.random.default_rng(4)
    n, D, heads = 2 * decoding.SPLIT_SIZE + 77, 64, 2
    k_seq = rng.standard_normal((heads, n + 1, D)).astype(BFLOAT16)
    v_seq = rng.standard_normal((heads, n + 1, D)).astype(BFLOAT16)
    q = rng.standard_normal((1, heads, 1, D)).astype(BFLOAT16)

    def run(B, slot, capacity, page_size):
        lengths = rng.integers(0, capacity, size=B)
        lengths[slot] = n
        qs = rng.standard_normal((B, heads, 1, D)).astype(BFLOAT16)
        qs[slot] = q[0]
        kn = rng.standard_normal((B, heads, 1, D)).astype(BFLOAT16)
        vn = rng.standard_normal((B, heads, 1, D)).astype(BFLOAT16)
        kn[slot], vn[slot] = k_seq[:, n:], v_seq[:, n:]
        if page_size is None:
            kc = np.full((B, heads, capacity, D), np.nan, dtype=BFLOAT16)
            vc = np.full((B, heads, capacity, D), np.nan, dtype=BFLOAT16)
            others = rng.standard_normal((B, heads, capacity, D)).astype(BFLOAT16)
            for b in range(B):
                kc[b, :, : lengths[b]] = vc[b, :, : lengths[b]] = others[b, :, : lengths[b]]
            kc[slot, :, :n], vc[slot, :, :n] = k_seq[:, :n], v_seq[:, :n]
            table = None
        else:
            pages = -(-capacity // page_size)
            table = rng.permutation(B * pages).reshape(B, pages)
            kc = rng.standard_normal((B * pages, heads, page_size, D)).astype(BFLOAT16)
            vc = rng.standard_normal((B * pages, heads, page_size, D)).astype(BFLOAT16)
            for j in range(n):
                kc[table[slot, j // page_size], :, j % page_size] = k_seq[:, j]
                vc[table[slot, j // page_size], :, j % page_size] = v_seq[:, j]
        out, lse = dotattn.attention_with_kvcache(
            qs, kc, vc, kn, vn, cache_lengths=lengths, block_table=table, return_lse=True, implementation="cpu"
        )
        return out[slot], lse[slot]

    alone = run(1, 0, n + 1, None)
    for B, slot, capacity, page_size in [(4, 2, 3 * decoding.SPLIT_SIZE + 5, None), (3, 1, 1000, 16), (5, 4, n + 9, 1), (2, 0, 2048, 100)]:
        got = run(B, slot, capacity, page_size)
        H.assert_bitwise_equal(got[0], alone[0], name=f"out B={B} capacity={capacity} page_size={page_size}")
        H.assert_bitwise_equal(got[1], alone[1], name=f"lse B={B} capacity={capacity} page_size={page_size}")


@pytest.mark.parametrize("shape", [dict(Hq=8, Hkv=2, D=128), dict(D=72), dict(D=40), dict(D=80), dict(q_dtype=np.float32)],
                         ids=["gqa", "D72", "D40", "D80", "q-float32"])
def test_other_calls_keep_the_widening_path_bits(dot, shape):
    """Calls outside the path give the same bits with it on and off, and match the reference."""
    case = C.make_case(13, **{"B": 2, "Hq": 2, "Hkv": 2, "dtype": BFLOAT16, "lengths": [150, 33], **shape})
    dot(True)
    on = _run(case)
    dot(False)
    off = _run(case)
    H.assert_bitwise_equal(on[0], off[0], name="out")
    H.assert_bitwise_equal(on[1], off[1], name="lse")
    _check(case, *on)


def test_nan_in_a_visible_key_poisons_only_its_row(dot):
    """IEEE: a NaN key the row sees makes the row NaN; the other rows are untouched."""
    dot(True)
    case = C.make_case(17, B=2, Hq=2, Hkv=2, D=64, dtype=BFLOAT16, lengths=[60, 60], Lnew=None)
    case.k_cache[0, 1, 20, 5] = np.nan
    out, lse = _run(case)
    assert np.isnan(out[0, 1].astype(np.float32)).all() and np.isnan(lse[0, 1]).all()
    assert np.isfinite(out[0, 0].astype(np.float32)).all() and np.isfinite(out[1].astype(np.float32)).all()


def test_huge_logits_put_all_weight_on_the_huge_score(dot):
    """Scores ≈ 1e20 (the scale applied after the sum): an ordinary softmax, as on the widening
    path (tests/reliability/test_huge_logits.py)."""
    dot(True)
    B, heads, D, cap = 1, 2, 32, 40
    k_cache = np.ones((B, heads, cap, D), np.float32).astype(BFLOAT16)
    v_cache = np.arange(heads * cap * D, dtype=np.float32).reshape(B, heads, cap, D).astype(BFLOAT16)
    k_cache[0, :, 21] = 1e20
    q = np.ones((B, heads, 1, D), np.float32).astype(BFLOAT16)
    out, lse = dotattn.attention_with_kvcache(q, k_cache, v_cache, cache_lengths=np.array([33]), return_lse=True,
                                              implementation="cpu")
    H.assert_bitwise_equal(out[0, :, 0], v_cache[0, :, 21], name="out")
    big = float(k_cache[0, 0, 21, 0].astype(np.float32))  # the key's value as stored
    np.testing.assert_allclose(lse[0, :, 0], np.float32(D * big / np.sqrt(D)), rtol=1e-6)
