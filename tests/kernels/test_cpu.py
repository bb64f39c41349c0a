"""The ``cpu`` backend's own tests: small tiles so every block path runs on small shapes.

``tests/test_backends.py`` already runs the cpu backend through the shared reference suite
with its default tiles (one block for small shapes).  Here the tiles are a few rows wide, so
skipped, partial and full blocks, padding columns and several key blocks per query block all
occur; plus what only this backend has: user ``score_mod``/``mask_mod``, block masks, the
exact dropout mask, bitwise repeatability and block skipping ≡ dense masking.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dotattn
from dotattn import registry, semantics
from dotattn.errors import AttentionTypeError, AttentionValueError
from dotattn.kernels import cpu, reference
from dotattn.kernels.dropout import keep_block

import helpers as H

TILES = [(4, 8), (8, 4), (3, 5), (16, 16)]


def _canonical_inputs(seed, B, Hq, Hkv, Lq, Lk, D, Dv, dtype, q_lengths=None, kv_lengths=None):
    return H.random_qkv(
        seed,
        batch=(B,),
        Hq=Hq,
        Hkv=Hkv,
        Lq=Lq,
        Lk=Lk,
        D=D,
        Dv=Dv,
        dtype=dtype,
        q_lengths=q_lengths,
        kv_lengths=kv_lengths,
    )


def _run(q, k, v, dout, tiles, **options):
    """cpu (out, lse, dq, dk, dv[, dbias]) with the given tiles, canonical shapes."""
    call = semantics.normalize(q, k, v, **options)
    out, lse = cpu.forward(call, block_size=tiles)
    dq, dk, dv, dbias = cpu.backward(call, out, lse, dout, want_dbias=call.bias is not None, block_size=tiles)
    return out, lse, dq, dk, dv, dbias, call


def _check_against_reference(q, k, v, tiles, **options):
    rng = np.random.default_rng(7)
    dout = rng.standard_normal(q.shape[:-1] + (v.shape[-1],)).astype(q.dtype)
    out, lse, dq, dk, dv, dbias, call = _run(q, k, v, dout, tiles, **options)
    ours = (dq, dk, dv) + ((semantics.reduce_bias_grad(call, dbias),) if dbias is not None else ())
    H.assert_forward_backward_close_to_reference(q, k, v, dout, out, lse, ours, **options)


# =================================================================================
# against the reference, every option, tiles small enough for every block kind
# =================================================================================


@st.composite
def cases(draw):
    B = draw(st.integers(1, 2))
    Hkv = draw(st.integers(1, 2))
    Hq = Hkv * draw(st.sampled_from([1, 3]))
    Lq = draw(st.integers(1, 37))
    Lk = draw(st.sampled_from([Lq, draw(st.integers(0, 37))]))
    D = draw(st.sampled_from([1, 5, 59]))
    Dv = draw(st.sampled_from([D, 3]))
    dtype = draw(st.sampled_from([np.float32, np.float64, np.float16]))
    options = {}
    if draw(st.booleans()):
        options["causal"] = draw(st.sampled_from([True, "top_left"]))
    if draw(st.booleans()):
        options["window"] = (draw(st.sampled_from([None, 0, 3, 9])), draw(st.sampled_from([None, 0, 4])))
    if draw(st.booleans()):
        options["softcap"] = draw(st.sampled_from([0.5, 5.0]))
    if draw(st.booleans()):
        options["alibi_slopes"] = np.linspace(0.05, 0.5, Hq)
    q_lengths = kv_lengths = None
    if draw(st.booleans()):
        q_lengths = H.random_lengths(draw(st.integers(0, 99)), (B,), Lq)
        kv_lengths = H.random_lengths(draw(st.integers(0, 99)), (B,), Lk)
        options["q_lengths"], options["kv_lengths"] = q_lengths, kv_lengths
    if draw(st.booleans()) and Lq == Lk:
        rng = np.random.default_rng(draw(st.integers(0, 99)))
        options["segment_ids"] = np.sort(rng.integers(0, 3, size=(B, Lq)), axis=1)
    if draw(st.booleans()):
        options["dropout_p"] = 0.3
        options["seed"] = draw(st.integers(0, 2**40))
    if draw(st.booleans()):
        options["bias"] = np.random.default_rng(1).standard_normal((Hq, Lq, Lk)).astype(dtype)
    if draw(st.booleans()):
        options["mask"] = H.random_mask(draw(st.integers(0, 99)), (Lq, Lk))
    if draw(st.booleans()):
        options["scale"] = draw(st.sampled_from([0.0, -0.3, 1.7]))
    tiles = draw(st.sampled_from(TILES))
    seed = draw(st.integers(0, 2**16))
    return dict(
        seed=seed,
        B=B,
        Hq=Hq,
        Hkv=Hkv,
        Lq=Lq,
        Lk=Lk,
        D=D,
        Dv=Dv,
        dtype=dtype,
        tiles=tiles,
        q_lengths=q_lengths,
        kv_lengths=kv_lengths,
        options=options,
    )


@settings(max_examples=60)
@given(cases())
def test_matches_reference_with_small_tiles(case):
    q, k, v = _canonical_inputs(
        case["seed"],
        case["B"],
        case["Hq"],
        case["Hkv"],
        case["Lq"],
        case["Lk"],
        case["D"],
        case["Dv"],
        case["dtype"],
        case["q_lengths"],
        case["kv_lengths"],
    )
    _check_against_reference(q, k, v, case["tiles"], **case["options"])


@pytest.mark.parametrize("tiles", TILES, ids=lambda t: f"tiles{t[0]}x{t[1]}")
def test_odd_sizes_gqa_causal_padding(tiles):
    """D = 59, Lq = 97 ≠ Lk = 130, GQA 6/2, bottom-right causal, NaN past the lengths."""
    q_len, kv_len = np.array([97, 40]), np.array([130, 90])
    q, k, v = _canonical_inputs(3, 2, 6, 2, 97, 130, 59, 33, np.float32, q_len, kv_len)
    _check_against_reference(q, k, v, tiles, causal=True, q_lengths=q_len, kv_lengths=kv_len)


@pytest.mark.parametrize("top", [0, 1024, 2048])  # the row's largest weight first in its tile: the online step, then lazy ones
@pytest.mark.parametrize("D, Hq", [(4, 1), (8, 1), (8, 2)], ids=["d4", "d8", "d8-gqa"])  # (gqa: forward_grouped)
def test_float32_row_sum_of_many_small_weights(top, D, Hq):
    """A row whose one large weight (≈ 1) sits before thousands of small ones (≈ 5e-8, under
    half an ulp of 1): the exp passes sum in blocks of keys, not one by one into a sum already
    ≈ 1, where each small P rounds away — as the naive softmax's pairwise sum does not.  One
    by one, every output of such a row came out 3× the naive error (CI, 1 Dec: Lq 196, Lk 567,
    D 31); here the old sum lost up to 255 · 5e-8 of the row's weight.  The values' side too:
    MKL's sgemm off Intel CPUs added a narrow (Dv ≤ 8) P·V into acc one key at a time, 7.7–35×
    the naive error (CI on an AMD Zen 5, 3 Dec): values under 16 wide take blocks of keys."""
    rng = np.random.default_rng(top)
    Lq, Lk = 32, 4096
    q = np.zeros((1, Hq, Lq, D), np.float32)
    q[..., 0] = 1.0
    k = rng.standard_normal((1, 1, Lk, D)).astype(np.float32)
    k[..., 0] = rng.uniform(-0.5, 0.5, Lk).astype(np.float32)
    k[0, 0, top, 0] = 17.0
    v = rng.standard_normal((1, 1, Lk, D)).astype(np.float32) + 3.0
    options = dict(scale=1.0, causal=Hq > 1)  # (bottom-right: every row sees all but a few of the last keys)
    call = semantics.normalize(q, k, v, **options)
    assert cpu._grouped_f32(call) == (Hq > 1)
    out, lse = cpu.forward(call)
    ref_out, ref_lse = H.reference(q, k, v, **options)
    naive_out, naive_lse = H.naive(q, k, v, **options)
    H.assert_close_to_reference(out, ref_out, naive_out, name="out")
    H.assert_close_to_reference(lse, ref_lse, naive_lse, name="lse")


def test_fully_masked_rows_give_zero_and_minus_inf():
    q, k, v = _canonical_inputs(0, 1, 2, 2, 9, 9, 4, 4, np.float32)
    mask = np.ones((9, 9), dtype=bool)
    mask[2] = False
    dout = np.ones((1, 2, 9, 4), dtype=np.float32)
    out, lse, dq, dk, dv, _, _ = _run(q, k, v, dout, (4, 4), mask=mask, kv_lengths=np.array([9]))
    assert np.all(out[:, :, 2] == 0) and np.all(lse[:, :, 2] == -np.inf)
    assert np.all(dq[:, :, 2] == 0)
    assert np.isfinite(out).all() and np.isfinite(dk).all() and np.isfinite(dv).all()


def test_empty_keys_give_zero_output():
    q, k, v = _canonical_inputs(0, 1, 1, 1, 5, 0, 4, 4, np.float32)
    out, lse = dotattn.attention(q, k, v, return_lse=True, implementation="cpu")
    assert np.all(out == 0) and np.all(lse == -np.inf)


# =================================================================================
# block skipping ≡ the same visibility given as a dense mask
# =================================================================================


@pytest.mark.parametrize(
    "structure",
    [
        dict(causal=True),
        dict(causal="top_left"),
        dict(window=(5, 2)),
        dict(window=(None, 0)),
        dict(segment_ids=np.repeat(np.arange(4), 10)[None].repeat(2, 0)),
        dict(causal=True, window=(7, None), kv_lengths=np.array([40, 23]), q_lengths=np.array([40, 31])),
    ],
    ids=["causal", "causal_top_left", "window", "window_right0", "segments", "causal_window_lengths"],
)
def test_block_skipping_is_bitwise_the_dense_masked_path(structure):
    q, k, v = _canonical_inputs(
        5, 2, 2, 1, 40, 40, 8, 8, np.float32, structure.get("q_lengths"), structure.get("kv_lengths")
    )
    dout = np.random.default_rng(2).standard_normal((2, 2, 40, 8)).astype(np.float32)
    call = semantics.normalize(q, k, v, **structure)
    dense = np.stack([call.visible(b, 0, np.arange(40), np.arange(40)) for b in range(2)])[:, None]
    lengths = {n: structure[n] for n in ("q_lengths", "kv_lengths") if n in structure}
    skipped = _run(q, k, v, dout, (8, 8), **structure)
    masked = _run(q, k, v, dout, (8, 8), mask=dense, **lengths)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), skipped[:5], masked[:5]):
        H.assert_bitwise_equal(a, b, name)


def test_invisible_blocks_are_skipped():
    """Top-left causal, 32 queries over 64 keys: 8-wide key tiles past key 31 are never read.

    NaN in V there would otherwise reach the output through ``0 · NaN`` in ``P·V``.  The kernel
    itself runs (``cpu.forward`` hands calls with non-finite values to the NumPy code).
    """
    q, k, v = _canonical_inputs(1, 1, 1, 1, 32, 64, 4, 4, np.float32)
    v_poisoned = v.copy()
    v_poisoned[..., 32:, :] = np.nan

    def run(v_):
        call = semantics.normalize(q, k, v_, causal="top_left")
        return cpu._run_forward(call, cpu.prepare(call, (8, 8)))

    clean, poisoned = run(v), run(v_poisoned)
    for a, b in zip(clean, poisoned):
        H.assert_bitwise_equal(a, b)


# =================================================================================
# user functions and block masks
# =================================================================================


def softcap_and_distance(score, b, h, q_idx, kv_idx):
    """= softcap 4 then a bias of 0.05·(q_idx − kv_idx): checkable against the reference."""
    return 4.0 * np.tanh(score / 4.0) + 0.05 * (q_idx - kv_idx)


def band_or_column(b, h, q_idx, kv_idx):
    """A band widening with the head, plus one column per sequence: skip, partial and full tiles."""
    return abs(q_idx - kv_idx) <= 6 + 4 * h or kv_idx == 3 * b


def _mods_equivalent(B, Hq, Lq, Lk):
    i = np.arange(Lq)[:, None]
    j = np.arange(Lk)[None, :]
    mask = np.zeros((B, Hq, Lq, Lk), dtype=bool)
    for b in range(B):
        for h in range(Hq):
            mask[b, h] = np.vectorize(band_or_column)(b, h, i, j)
    return dict(softcap=4.0, bias=(0.05 * (i - j)).astype(np.float32), mask=mask)


# (the first compiles the user kernel, ≈ 110 s beside the other worker; the second, later in
# the run, loads it from the disk cache — marked heavy too, it would likely start beside the
# first on the other worker and compile the same kernel at the same time)
@pytest.mark.parametrize("with_block_mask", [pytest.param(False, marks=pytest.mark.heavy), True], ids=["mask_mod", "block_mask"])
def test_user_mods_match_the_reference_with_equivalent_options(with_block_mask, monkeypatch):
    B, Hq, Lq, Lk = 2, 2, 45, 50
    q, k, v = _canonical_inputs(11, B, Hq, 1, Lq, Lk, 8, 8, np.float32)
    dout = np.random.default_rng(4).standard_normal((B, Hq, Lq, 8)).astype(np.float32)
    extras = dict(score_mod=softcap_and_distance, mask_mod=band_or_column)
    tiles = dict(block_size=(8, 16))
    if with_block_mask:
        # block_mask= alone: it carries its mask_mod (the same compiled kernels) and its tiles
        extras = dict(score_mod=softcap_and_distance,
                      block_mask=dotattn.block_mask(band_or_column, B, Hq, Lq, Lk, block_size=(8, 16)))
        tiles = {}
    call = semantics.normalize(q, k, v, causal=True, extras=extras)
    out, lse = cpu.forward(call, **tiles)
    grads = cpu.backward(call, out, lse, dout, **tiles)[:3]
    # The user's kernels run their one-thread entries' tasks on the pool threads (cpu._run_tasks:
    # a prange entry would compile the whole kernel a second time): no prange entry compiled,
    # and the bits of the same tasks on one thread (the forked child's path).
    kernels = cpu.kernels_for(softcap_and_distance, band_or_column)
    assert not kernels.forward.overloads and not kernels.backward.overloads
    assert kernels._forward_chunk.overloads and kernels._backward_chunk.overloads
    pool_grads = cpu.backward(call, out, lse, dout, serial=False, **tiles)[:3]  # (this size runs serially)
    monkeypatch.setattr(cpu._entries, "one_thread", True, raising=False)
    one_out, one_lse = cpu.forward(call, **tiles)
    one_grads = cpu.backward(call, one_out, one_lse, dout, serial=False, **tiles)[:3]
    for a, b in zip((out, lse, *pool_grads), (one_out, one_lse, *one_grads)):
        H.assert_bitwise_equal(a, b)
    monkeypatch.setattr(cpu._entries, "one_thread", False)
    if with_block_mask:
        # the block mask's skipped and full tiles give the bits of the mod evaluated on every
        # tile (the same tiles and the same compiled kernels: no second compile in the suite —
        # without a score_mod, a kernel of its own, is the slow test below)
        plain = semantics.normalize(q, k, v, causal=True, extras=dict(score_mod=softcap_and_distance, mask_mod=band_or_column))
        plain_out, plain_lse = cpu.forward(plain, block_size=(8, 16))
        plain_grads = cpu.backward(plain, plain_out, plain_lse, dout, block_size=(8, 16))[:3]
        for a, b in zip((out, lse, *grads), (plain_out, plain_lse, *plain_grads)):
            H.assert_bitwise_equal(a, b)
    equivalent = dict(causal=True, **_mods_equivalent(B, Hq, Lq, Lk))
    ref_out, ref_lse = H.reference(q, k, v, **equivalent)
    naive_out, naive_lse = H.naive(q, k, v, **equivalent)
    H.assert_close_to_reference(out, ref_out, naive_out, name="out")
    H.assert_close_to_reference(lse, ref_lse, naive_lse, name="lse")
    ref_grads = H.reference_grads(q, k, v, dout, **equivalent)[:3]
    naive_grads = H.naive_grads(q, k, v, dout, **equivalent)[:3]
    for name, g, r, n in zip(("dq", "dk", "dv"), grads, ref_grads, naive_grads):
        # score_mod's derivative is a central difference: a little more than rounding
        H.assert_close_to_reference(g, r, n, name=name, factor=3.0, magnitude=4.0, floor=2e-5)


@pytest.mark.slow  # a kernel of its own (mask_mod alone): ≈ 80 s of compile on a clean checkout, 110 beside the other worker
def test_block_mask_gives_bitwise_the_mask_mod_result():
    B, Hq, Lq, Lk = 2, 2, 45, 50
    q, k, v = _canonical_inputs(12, B, Hq, 1, Lq, Lk, 8, 8, np.float32)
    bm = dotattn.block_mask(band_or_column, B, Hq, Lq, Lk, block_size=(8, 16))
    a = dotattn.attention(q, k, v, mask_mod=band_or_column, implementation="cpu", return_lse=True)
    b = dotattn.attention(q, k, v, block_mask=bm, implementation="cpu", return_lse=True)
    # different tiles (default vs 8×16) reorder sums: compare with the float32 rule, then the
    # same tiles bitwise
    np.testing.assert_allclose(a[0], b[0], rtol=2e-5, atol=2e-6)
    call_a = semantics.normalize(q, k, v, extras=dict(mask_mod=band_or_column))
    call_b = semantics.normalize(q, k, v, extras=dict(block_mask=bm))
    for x, y in zip(cpu.forward(call_a, block_size=(8, 16)), cpu.forward(call_b)):
        H.assert_bitwise_equal(x, y)


def test_block_mask_classes_are_exact():
    bm = dotattn.block_mask(band_or_column, 2, 3, 45, 50, block_size=(8, 16))
    assert bm.classes.shape == (2, 3, 6, 4)
    for b in range(2):
        for h in range(3):
            for qb in range(6):
                for kb in range(4):
                    i = np.arange(qb * 8, min(qb * 8 + 8, 45))[:, None]
                    j = np.arange(kb * 16, min(kb * 16 + 16, 50))[None, :]
                    vis = np.vectorize(band_or_column)(b, h, i, j)
                    want = 0 if not vis.any() else (2 if vis.all() else 1)
                    assert bm.classes[b, h, qb, kb] == want, (b, h, qb, kb)
    assert 0.0 < bm.sparsity < 1.0
    assert "skipped" in repr(bm)


def test_block_mask_broadcasts_over_batch_and_heads():
    bm = dotattn.block_mask(band_or_column, None, None, 45, 50, block_size=(8, 16))
    assert bm.classes.shape == (1, 1, 6, 4)


def test_block_mask_errors():
    bm = dotattn.block_mask(band_or_column, 1, 2, 45, 50)
    q, k, v = _canonical_inputs(0, 1, 2, 2, 45, 40, 4, 4, np.float32)
    with pytest.raises(AttentionValueError, match="block_mask was built for Lq=45, Lk=50"):
        dotattn.attention(q, k, v, block_mask=bm)
    q, k, v = _canonical_inputs(0, 2, 2, 2, 45, 50, 4, 4, np.float32)
    with pytest.raises(AttentionValueError, match="built for B=3, H=2"):
        dotattn.attention(q, k, v, block_mask=dotattn.block_mask(band_or_column, 3, 2, 45, 50))
    with pytest.raises(AttentionValueError, match="another mask_mod"):
        dotattn.attention(q[:1], k[:1], v[:1], block_mask=bm, mask_mod=lambda b, h, i, j: True)
    with pytest.raises(AttentionTypeError, match="block_mask must come from dotattn.block_mask"):
        dotattn.attention(q, k, v, block_mask=np.ones((1, 1, 1, 1)))
    with pytest.raises(AttentionTypeError, match="mask_mod must be a function"):
        dotattn.attention(q, k, v, mask_mod=3)
    with pytest.raises(AttentionTypeError, match="score_mod must be a function"):
        dotattn.attention(q, k, v, score_mod="x")
    with pytest.raises(AttentionValueError, match="block_size must be a pair"):
        dotattn.block_mask(band_or_column, 1, 1, 8, 8, block_size=(8,))
    with pytest.raises(AttentionValueError, match="Lq must be ≥ 0"):
        dotattn.block_mask(band_or_column, 1, 1, -1, 8)
    with pytest.raises(AttentionTypeError, match="H must be an int or None"):
        dotattn.block_mask(band_or_column, 1, 1.5, 8, 8)


def test_unknown_extras_are_declined_with_a_reason():
    """semantics refuses typos; should an unknown backend option reach the backend, it says why."""
    q, k, v = _canonical_inputs(0, 1, 1, 1, 4, 4, 4, 4, np.float32)
    with pytest.raises(AttentionTypeError, match="unexpected keyword argument 'frobnicate'"):
        dotattn.attention(q, k, v, frobnicate=1, implementation="cpu")
    call = dataclasses.replace(semantics.normalize(q, k, v), extras={"frobnicate": 1})
    assert cpu.CpuBackend().unsupported_reasons(call) == [
        "does not take frobnicate (it takes score_mod, mask_mod, block_mask)"
    ]


# =================================================================================
# dropout, weights, determinism, finite differences, dispatch
# =================================================================================


def test_dropout_mask_is_exactly_keep_block():
    """With V = I, out = P ∘ keep / (1 − p): the kept pattern is readable from the output."""
    L, p, seed = 23, 0.4, 1234
    q, k, _ = _canonical_inputs(0, 2, 3, 3, L, L, 4, 4, np.float32)
    v = np.broadcast_to(np.eye(L, dtype=np.float32), (2, 3, L, L)).copy()
    call = semantics.normalize(q, k, v, dropout_p=p, seed=seed)
    out, _ = cpu.forward(call, block_size=(8, 4))
    for b in range(2):
        for h in range(3):
            keep = keep_block(seed, p, b, h, np.arange(L), np.arange(L), 3, L, L)
            np.testing.assert_array_equal(out[b, h] != 0, keep)


def test_weights_match_reference():
    q, k, v = _canonical_inputs(9, 1, 2, 1, 30, 33, 6, 6, np.float32)
    options = dict(causal=True, softcap=3.0, alibi_slopes=np.array([0.1, 0.3]))
    _, w = dotattn.attention(q, k, v, return_weights=True, implementation="cpu", **options)
    H.assert_close_to_reference(
        w, H.reference_weights(q, k, v, **options), H.naive_weights(q, k, v, **options)
    )


def test_repeated_calls_are_bitwise_identical():
    q, k, v = _canonical_inputs(21, 2, 4, 2, 300, 310, 16, 16, np.float32)
    dout = np.random.default_rng(0).standard_normal((2, 4, 300, 16)).astype(np.float32)
    first = _run(q, k, v, dout, None, causal=True, dropout_p=0.1, seed=3)
    second = _run(q, k, v, dout, None, causal=True, dropout_p=0.1, seed=3)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), first[:5], second[:5]):
        H.assert_bitwise_equal(a, b, name)


# The backward's dQ is summed in fixed parts (b, kv head, c) that threads take from a queue
# (_cpu_kernels.backward): whichever thread runs a part, its sums come in the same order.
BACKWARD_DEAL_CASES = {
    "float32 causal": (np.float32, dict(causal=True)),  # the split-AMX route where the CPU has AMX
    "float32 dropout": (np.float32, dict(causal=True, dropout_p=0.1, seed=3)),  # the MKL/loop route
    "float32 softcap": (np.float32, dict(softcap=5.0)),
    "bfloat16 causal": (semantics.BFLOAT16, dict(causal=True)),
    "bfloat16 dense": (semantics.BFLOAT16, dict()),
}


def _deal_inputs(dtype):
    # 3 key tiles per head at the backward's default tiles: the deal's rule crosses heads
    q, k, v = _canonical_inputs(5, 2, 4, 2, 700, 700, 64, 64, np.float32)
    dout = np.random.default_rng(1).standard_normal((2, 4, 700, 64)).astype(np.float32)
    return tuple(x.astype(dtype) for x in (q, k, v, dout))


def _grads(q, k, v, dout, **options):
    call = semantics.normalize(q, k, v, **options)
    out, lse = cpu.forward(call)
    return cpu.backward(call, out, lse, dout, serial=False)[:3]


@pytest.mark.parametrize("case", list(BACKWARD_DEAL_CASES))
def test_backward_bits_do_not_depend_on_which_thread_runs_a_part(case, monkeypatch):
    dtype, options = BACKWARD_DEAL_CASES[case]
    q, k, v, dout = _deal_inputs(dtype)
    # three dQ parts whatever the core count (two threads take three parts' tiles)
    monkeypatch.setattr(cpu, "_num_threads", lambda: 3)
    team = _grads(q, k, v, dout, **options)
    from dotattn.kernels import _cpu_kernels

    kernel = _cpu_kernels.backward

    def one_thread(*args):  # every part on the calling thread: the others delayed for good
        *args, nchunks = args
        _cpu_kernels._backward_chunk(np.zeros(1, dtype=np.int64), nchunks, *args)

    one_thread.overloads, one_thread.stats = kernel.overloads, kernel.stats
    monkeypatch.setattr(_cpu_kernels, "backward", one_thread)
    alone = _grads(q, k, v, dout, **options)
    for name, a, b in zip(("dq", "dk", "dv"), team, alone):
        H.assert_bitwise_equal(a, b, f"{case} {name}")


@pytest.mark.parametrize("case", ["float32 causal", "bfloat16 dense"])
def test_backward_bits_repeat_beside_a_busy_thread(case):
    import threading

    dtype, options = BACKWARD_DEAL_CASES[case]
    q, k, v, dout = _deal_inputs(dtype)
    first = _grads(q, k, v, dout, **options)
    stop = threading.Event()

    def busy():  # NumPy releases the GIL: a core taken from the kernel's team now and then
        a = np.ones((300, 300))
        while not stop.is_set():
            a = a @ a / 300.0

    thread = threading.Thread(target=busy, daemon=True)
    thread.start()
    try:
        for _ in range(4):
            again = _grads(q, k, v, dout, **options)
            for name, a, b in zip(("dq", "dk", "dv"), first, again):
                H.assert_bitwise_equal(a, b, f"{case} {name}")
    finally:
        stop.set()
        thread.join()


def test_gradients_match_finite_differences():
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal(s) for s in ((1, 2, 11, 5), (1, 1, 13, 5), (1, 1, 13, 4)))
    w = rng.standard_normal((1, 2, 11, 4))
    options = dict(causal=True, softcap=2.0, alibi_slopes=np.array([0.2, 0.5]), window=(6, None))

    def loss(q, k, v):
        return float((dotattn.attention(q, k, v, implementation="cpu", **options) * w).sum())

    call = semantics.normalize(q, k, v, **options)
    out, lse = cpu.forward(call, block_size=(4, 4))
    grads = cpu.backward(call, out, lse, w, block_size=(4, 4))[:3]
    eps = 1e-6
    for which, (x, g) in enumerate(zip((q, k, v), grads)):
        for idx in [(0, 0, 3, 1), (0, 0, 7, 4), (0, 0, 10, 0)][: 3 if which == 0 else 2]:
            idx = tuple(min(i, s - 1) for i, s in zip(idx, x.shape))
            xp, xm = x.copy(), x.copy()
            xp[idx] += eps
            xm[idx] -= eps
            args_p = [q, k, v]
            args_m = [q, k, v]
            args_p[which], args_m[which] = xp, xm
            numeric = (loss(*args_p) - loss(*args_m)) / (2 * eps)
            assert abs(numeric - g[idx]) <= 1e-6 * max(1.0, abs(numeric)), (which, idx, numeric, g[idx])


def test_cpu_is_the_default_for_numpy_inputs():
    q, k, v = _canonical_inputs(0, 1, 1, 1, 4, 4, 4, 4, np.float32)
    call = semantics.normalize(q, k, v)
    assert registry.select(call).name == "cpu"
    assert reference.ReferenceBackend().unsupported_reasons(call) == []
