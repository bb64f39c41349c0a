"""Block calls (internal ``semantics.BlockGeometry``): one block of a larger problem.

Ring and Ulysses attention compute a full problem block by block.  A block call must give
exactly the matching slice of the full call: positions (bottom-right and top-left causal,
windows, ALiBi) measured in the full problem, and the dropout counter of the full problem's
sizes and absolute indices.  Here every backend computes a grid of uneven blocks (query
ranges × key ranges, and head ranges), the forward merged over key blocks with
``merge_attention_states``, the backward summed over blocks from the full call's output and
LSE, and compared with the same backend's full call (float64: ≤ 1e-12).
"""

from __future__ import annotations

import numpy as np
import pytest

from dotattn import merge_attention_states, semantics
from dotattn.errors import AttentionValueError
from dotattn.kernels import cpu, numpy_tiled, reference
from dotattn.semantics import BlockGeometry

import helpers as H

B, HQ, HKV, D, DV = 2, 4, 2, 8, 6

CASES = {
    "dense": dict(),
    "causal-bottom-right": dict(causal=True),
    "causal-top-left": dict(causal="top_left"),
    "window": dict(window=(5, 3)),
    "window-causal": dict(window=(4, None), causal=True),
    "alibi": dict(alibi_slopes=np.array([0.5, 0.25, 0.125, 0.0625])),
    "alibi-causal-softcap": dict(alibi_slopes=np.array([0.5, 0.25, 0.125, 0.0625]), causal=True, softcap=2.0),
    "dropout": dict(dropout_p=0.3, seed=1234),
    "dropout-causal-window": dict(dropout_p=0.2, seed=99, causal=True, window=(6, 2)),
}

# (Lq, Lk): self-attention and both cross shapes (bottom-right offsets ≠ 0)
SHAPES = [(23, 23), (17, 29), (29, 17)]


def _backend_fns(name):
    if name == "cpu":
        # small tiles: skipped, partial and full tiles all occur inside each block
        return (lambda c: cpu.forward(c, block_size=(4, 8)),
                lambda c, o, s, d: cpu.backward(c, o, s, d, block_size=(4, 8)))
    mod = {"reference": reference, "numpy": numpy_tiled}[name]
    return mod.forward, lambda c, o, s, d: mod.backward(c, o, s, d)


def _ranges(n, cuts):
    edges = [0] + [c for c in cuts if 0 < c < n] + [n]
    return list(zip(edges[:-1], edges[1:]))


def _segments(L, seed):
    """Packed documents: sorted random ids."""
    return np.sort(np.random.default_rng(seed).integers(0, 3, size=(B, L)))


def _block(call, q_rng, k_rng, h_rng=(0, HQ)):
    (i0, i1), (j0, j1), (h0, h1) = q_rng, k_rng, h_rng
    g0, g1 = h0 // call.group, h1 // call.group
    changes = dict(q=call.q[:, h0:h1, i0:i1], k=call.k[:, g0:g1, j0:j1], v=call.v[:, g0:g1, j0:j1])
    if call.q_segment_ids is not None:
        changes.update(q_segment_ids=call.q_segment_ids[:, i0:i1], kv_segment_ids=call.kv_segment_ids[:, j0:j1])
    if call.alibi_slopes is not None:
        changes["alibi_slopes"] = call.alibi_slopes[:, h0:h1]
    geom = BlockGeometry(q_start=i0, k_start=j0, Lq=call.Lq, Lk=call.Lk, h_start=h0, Hq=call.Hq)
    return semantics.block_call(call, geom, **changes)


@pytest.mark.parametrize("backend", ["reference", "numpy", "cpu"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"Lq{s[0]}-Lk{s[1]}")
@pytest.mark.parametrize("case", list(CASES) + ["segments-causal"])
def test_blocks_equal_the_full_call(backend, shape, case):
    Lq, Lk = shape
    options = dict(CASES.get(case, {}))
    if case == "segments-causal":
        if Lq != Lk:
            options["segment_ids"] = (_segments(Lq, 1), _segments(Lk, 2))
        else:
            options["segment_ids"] = _segments(Lq, 1)
        options["causal"] = True
    q, k, v = H.random_qkv(3, batch=(B,), Hq=HQ, Hkv=HKV, Lq=Lq, Lk=Lk, D=D, Dv=DV, dtype=np.float64)
    dout = np.random.default_rng(4).standard_normal((B, HQ, Lq, DV))
    call = semantics.normalize(q, k, v, **options)
    fwd, bwd = _backend_fns(backend)
    out, lse = fwd(call)
    dq, dk, dv, _ = bwd(call, out, lse, dout)

    q_ranges = _ranges(Lq, [5, 6, 14])  # uneven, one of a single row
    k_ranges = _ranges(Lk, [7, 16])
    h_ranges = [(0, 2), (2, 4)]  # Ulysses-style head blocks (one K/V head each)
    b_out = np.zeros_like(out)
    b_lse = np.zeros_like(lse)
    b_dq, b_dk, b_dv = np.zeros_like(dq), np.zeros_like(dk), np.zeros_like(dv)
    for h0, h1 in h_ranges:
        g0, g1 = h0 // call.group, h1 // call.group
        for i0, i1 in q_ranges:
            parts = [fwd(_block(call, (i0, i1), kr, (h0, h1))) for kr in k_ranges]
            o, s = merge_attention_states([p[0] for p in parts], [p[1] for p in parts])
            b_out[:, h0:h1, i0:i1], b_lse[:, h0:h1, i0:i1] = o, s
            for j0, j1 in k_ranges:
                bc = _block(call, (i0, i1), (j0, j1), (h0, h1))
                # the full call's output and LSE: P = exp(S − lse) is the full softmax's
                gq, gk, gv, _ = bwd(bc, out[:, h0:h1, i0:i1], lse[:, h0:h1, i0:i1], dout[:, h0:h1, i0:i1])
                b_dq[:, h0:h1, i0:i1] += gq
                b_dk[:, g0:g1, j0:j1] += gk
                b_dv[:, g0:g1, j0:j1] += gv

    np.testing.assert_array_equal(np.isneginf(b_lse), np.isneginf(lse))
    fin = np.isfinite(lse)
    assert np.abs(b_lse[fin] - lse[fin]).max(initial=0) <= 1e-12
    for name, ours, full in (("out", b_out, out), ("dq", b_dq, dq), ("dk", b_dk, dk), ("dv", b_dv, dv)):
        err = np.abs(ours - full).max()
        assert err <= 1e-12 * max(1.0, np.abs(full).max()), f"{name}: {err}"
    # and the full call itself is the reference's (the blocks are not just self-consistent)
    ref_out, ref_lse = reference.forward(call)
    assert np.abs(out - ref_out).max() <= 1e-12


def test_block_dropout_mask_is_the_full_calls_slice():
    """The kept elements of a block are the full call's, bit for bit (not just close)."""
    from dotattn.kernels.dropout import keep_block, keep_block_of

    q, k, v = H.random_qkv(5, batch=(B,), Hq=HQ, Hkv=HKV, Lq=19, Lk=31, D=D, dtype=np.float64)
    call = semantics.normalize(q, k, v, dropout_p=0.5, seed=7)
    bc = _block(call, (4, 11), (9, 30), (2, 4))
    full = keep_block(7, 0.5, 1, 3, np.arange(19), np.arange(31), HQ, 19, 31)
    np.testing.assert_array_equal(keep_block_of(bc, 1, 1, np.arange(7), np.arange(21)), full[4:11, 9:30])


def test_block_call_refuses_what_it_cannot_place():
    q, k, v = H.random_qkv(6, batch=(1,), Hq=2, Lq=8, D=4, dtype=np.float64)
    call = semantics.normalize(q, k, v)
    with pytest.raises(AttentionValueError, match="do not lie inside"):
        semantics.block_call(call, BlockGeometry(q_start=4, k_start=0, Lq=8, Lk=8))  # 8 rows from 4 > 8
    lengths = semantics.normalize(q, k, v, q_lengths=np.array([3]))
    with pytest.raises(AttentionValueError, match="no q_lengths"):
        semantics.block_call(lengths, BlockGeometry(q_start=0, k_start=0, Lq=8, Lk=8))
