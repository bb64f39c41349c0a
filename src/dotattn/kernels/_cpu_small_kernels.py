"""Numba kernels of the ``cpu`` backend for small calls: one work item per (sequence, K/V head).

Real models make many small calls (a sentence encoder: 32 sentences × 12 heads of 20 tokens;
a decode step: one query row against a short cache; a chat model's short prompt).  The general
kernels (:mod:`dotattn.kernels._cpu_kernels`) tile each (sequence, query head) separately and
stream key blocks through an online softmax; on such calls their per-tile set-up dominates.
Here a work item is one (sequence ``b``, K/V head ``hk``) — under a causal mask (or a window
that hides later keys) one block of ``query_block`` queries of it: the ``group = Hq / Hkv``
query heads that read that K/V head are folded into the rows (``group · nq`` rows for ``nq``
queries; a decode step's 3 query heads of a group become 3 rows of one GEMM), and all the keys
the rows may see, ``[0, nk)``, fit in one score block, so the softmax is exact in one pass — no
running max, no rescaling:

1. ``Sᵀ = K · Qᵀ`` (``nk × rows``, ``nk`` = the last key any row can see) with one BLAS GEMM,
   held transposed as the tiled kernels hold their tiles, so that every per-row pass below
   runs down the columns, vectorized across rows, with the tiled kernels' own passes;
2. the score chain of ``docs/semantics.md`` (scale, softcap, bias, ALiBi) unless "simple",
   then the masks: an interval ``[lo, hi]`` per row (lengths, causal, window) as a
   vectorized select, segment ids and a dense mask element by element;
3. ``m`` = each row's maximum (``_cpu_primitives._col_max``), then ``P = 2^(S·c − m)`` and the
   row sums in one pass (``_cpu_primitives._exp2_shifted_sum``, before dropout), the dropout
   mask of :mod:`dotattn.kernels.dropout` (same bits as every backend);
4. ``out = P·V / row sum`` with one BLAS GEMM (``P`` read transposed), ``lse = (m + log2(row
   sum)) · ln 2``; a NaN/+inf row maximum or a non-finite output element is reported in
   ``status`` (the NaN policy's case, which the caller reruns on the general kernels).

Items are taken from a shared queue by ``nchunks`` chunks, the blocks that see the most keys
first; :func:`forward_chunk` runs one chunk and releases the GIL, so chunks run in Python
threads: the caller's (:func:`forward_caller`) and the spinning partners' (:func:`forward_partner`,
``_launch.Partners``), or ``_launch.run_chunks``'s pool threads where another call holds the
partners — no ``prange`` team that must all be scheduled.

Conventions as in ``_cpu_kernels``: ``T`` the compute dtype; ``q (B, Hkv, R, D)`` with row
``r`` = query head ``hk·group + r // Lq``, query ``r % Lq``; ``k (B, Hkv, Lk, D)``,
``v (B, Hkv, Lk, Dv)``; ``causal`` 0 none, 1 bottom-right, 2 top-left; window sides < 0
unbounded; dense mask/bias flattened with element strides ``(sb, sh, si, sj)``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from ._cpu_primitives import (
    LOG2E,
    _NO_PREFETCH,
    _col_max,
    _dropout_keep,
    _exp2_shifted_sum,
    _take_task,
    _gemm,
    _gemm_threads_begin,
    _gemm_threads_end,
    _lse_natural,
    _matmul,
    _short_rows,
)
from ._cpu_simd import dot_tile_f64
from ._cpu_sync import ENTERED, _store_release, finish_partners, partner_done
from ._entry_order import load_callee_first


def _item_gemm(a, b, out):
    """``out = a · b`` for an item: float32 by the bound sgemm (MKL's where torch is installed,
    else OpenBLAS's), float64 by NumPy's dot.

    Small float32 products once went to NumPy's dot, whose call cost less on the Xeon of 30
    Nov (20 × 20 × 32 items 730–760 against 800–850 µs with MKL; docs/performance-log.md).
    Since the item's ``P·V`` reads ``P`` transposed (the scores are held as ``Sᵀ``), NumPy's
    dot costs ≈ 8 % more there, and on the AMD EPYC Zen 3 of 5 Dec MKL's sgemm took 580
    against 940–1,020 ns at 20 × 20 × 32 (``docs/performance-log.md``, "The small kernel's
    scores transposed"): the bound sgemm takes every float32 product.
    """
    raise NotImplementedError("compiled only")


@overload(_item_gemm, jit_options={"cache": True})
def _item_gemm_overload(a, b, out):
    if a.dtype == types.float32:
        return lambda a, b, out: _gemm(a, b, out, 0.0)
    return lambda a, b, out: _matmul(a, b, out)


def _item_scores(qi, ki, S, short):
    """``S = qi · kiᵀ`` for an item: float32 ``short`` problems (``_cpu_primitives._short_rows``)
    by float64 sums (``_cpu_simd.dot_tile_f64``: a GEMM's one chain of float32 sums missed the
    2×-naive rule at a large scale), the rest by :func:`_item_gemm`."""
    raise NotImplementedError("compiled only")


@overload(_item_scores, jit_options={"cache": True})
def _item_scores_overload(qi, ki, S, short):
    if qi.dtype == types.float32:

        def impl_f32(qi, ki, S, short):
            if short and qi.strides[1] == 4 and ki.strides[1] == 4 and S.strides[1] == 4:
                dot_tile_f64(qi, ki, S)
            else:
                _item_gemm(qi, ki.T, S)

        return impl_f32
    return lambda qi, ki, S, short: _item_gemm(qi, ki.T, S)


@njit(cache=True, nogil=True)
def forward_chunk(
    q,
    k,
    v,
    out,
    lse,
    group,
    Lq,
    query_block,
    q_lens,
    kv_lens,
    scale,
    softcap,
    bias,
    bstr,
    has_bias,
    slopes,
    has_alibi,
    mask,
    mstr,
    has_dense_mask,
    causal,
    left,
    right,
    q_seg,
    kv_seg,
    has_seg,
    dropout_p,
    dropout_key,
    status,
    queue,
    chunk,
    nchunks,
):
    """Items taken one at a time from the shared ``queue`` (``int64[1]``, 0 at the start),
    until none is left; ``status[chunk]`` becomes 1 (and the chunk stops) where an item meets
    a non-finite score or output: the NaN policy's case, which the caller reruns on the
    general kernels.

    An item is one (sequence ``b``, K/V head ``hk``, block of ``query_block`` queries): the
    rows of the group's query heads for those queries, ``out[b, hk, g·Lq + i]`` and
    ``lse[b, hk, g·Lq + i]``, over the keys ``[0, nk)`` that any of them may see — under a
    causal mask a block of early queries reads few keys, so blocks skip the hidden half of
    the scores.  The blocks whose rows see the most keys (the last) come first, so that the
    threads end together.  One block (``query_block ≥ Lq``) is the whole sequence.

    A shared queue, not a fixed deal of items to chunks: a chunk whose thread the OS starts
    late just takes fewer items, where a fixed deal left the caller waiting for that
    thread's whole share (on a loaded machine two threads took longer than one).  Each item
    is computed the same way whichever chunk takes it: results are bitwise the same.

    One function, the item inlined in the loop: a call per item passing its ~40 arrays cost
    Numba an atomic reference-count increment and decrement per array (perf: 40 % of an
    11 × 11 block's time).  Releases the GIL, so chunks run side by side in Python threads
    (``_launch.run_chunks``).
    """
    B, Hkv, R, D = q.shape
    Hq = Hkv * group
    Lk = k.shape[2]
    Dv = v.shape[3]
    QB = max(1, min(query_block, Lq))
    nqb = (Lq + QB - 1) // QB
    RB = group * QB  # rows of the largest block
    # scratch, once per chunk
    ST = np.empty(Lk * RB, dtype=q.dtype)
    N = np.empty((1, 1), dtype=np.int32)  # (the exp pass's unused scratch argument)
    Qb = np.empty((RB, D), dtype=q.dtype)
    PV = np.empty((RB, Dv), dtype=q.dtype)
    lo = np.empty(RB, dtype=np.int64)
    hi = np.empty(RB, dtype=np.int64)
    m = np.empty(RB, dtype=q.dtype)
    row_sum = np.empty(RB, dtype=q.dtype)
    short = _short_rows(Lq, Lk)  # score products summed in float64 (_item_scores)
    simple = softcap <= 0.0 and not has_bias and not has_alibi and scale > 0.0
    # the exponent's multiplier in the compute dtype (the score chain below leaves base-2
    # scores when it runs)
    m[0] = scale * LOG2E if simple else 1.0
    c2 = m[0]
    threads = _gemm_threads_begin(q)  # MKL's GEMMs on this thread only (our chunks are the threads)
    pairs = B * Hkv
    items = pairs * nqb
    while True:
        t = _take_task(queue)
        if t >= items:
            break
        qb = nqb - 1 - t // pairs
        b = (t % pairs) // Hkv
        hk = t % Hkv
        i0 = qb * QB
        nq = min(QB, Lq - i0)
        Rb = group * nq  # row r: query head hk·group + r // nq, query i0 + r % nq
        qlen = q_lens[b]
        kvlen = kv_lens[b]
        off = kvlen - qlen  # query i sits at key position i + off (bottom-right)
        # the keys each row can see by lengths, causal and window: [lo, hi]
        nk = 0
        for r in range(Rb):
            i = i0 + r % nq
            if i >= qlen:
                lo[r] = 1
                hi[r] = 0
                continue
            p = i + off
            top = kvlen - 1
            if causal == 1:
                top = min(top, p)
            elif causal == 2:
                top = min(top, i)
            if right >= 0:
                top = min(top, p + right)
            bottom = 0
            if left >= 0:
                bottom = max(bottom, p - left)
            lo[r] = bottom
            hi[r] = top
            nk = max(nk, top + 1)
        hidden = False  # whether some row does not see every key of [0, nk) (rows past qlen see none)
        for r in range(Rb):
            hidden |= lo[r] > 0 or hi[r] < nk - 1
        if nk <= 0:
            for r in range(Rb):
                row = (r // nq) * Lq + i0 + r % nq
                out[b, hk, row] = 0.0
                lse[b, hk, row] = -np.inf
            continue
        if nqb == 1:
            qi = q[b, hk]
        else:  # the block's rows of each query head, side by side
            for g in range(group):
                Qb[g * nq : (g + 1) * nq] = q[b, hk, g * Lq + i0 : g * Lq + i0 + nq]
            qi = Qb[:Rb]
        # Only keys [0, nk) are read: padding past kv_lengths (even NaN) never enters a GEMM.
        # Scores transposed, Sᵀ (nk, Rb), as the tiled kernels hold them: a row's maximum and
        # sum run down the columns, vectorized across rows, by the tiled kernels' passes.
        ST_ = ST[: nk * Rb].reshape(nk, Rb)
        _item_scores(k[b, hk, :nk], qi, ST_, short)
        if not simple:
            for c in range(nk):
                srow = ST_[c]
                for r in range(Rb):
                    h = hk * group + r // nq
                    i = i0 + r % nq
                    s = srow[r] * scale
                    if softcap > 0.0:
                        s = softcap * math.tanh(s / softcap)
                    if has_bias and i < qlen:
                        s += bias[b * bstr[0] + h * bstr[1] + i * bstr[2] + c * bstr[3]]
                    if has_alibi:
                        s -= slopes[b, h] * abs(i + off - c)
                    srow[r] = s * LOG2E
        # masks: keys outside the row's interval (a branch-free select), then segments and
        # the dense mask inside it
        if hidden:
            for c in range(nk):
                srow = ST_[c]
                for r in range(Rb):
                    srow[r] = srow[r] if lo[r] <= c and c <= hi[r] else -np.inf
        if has_seg or has_dense_mask:
            for r in range(Rb):
                h = hk * group + r // nq
                i = i0 + r % nq
                for c in range(max(lo[r], 0), hi[r] + 1):
                    vis = True
                    if has_seg:
                        vis = q_seg[b, i] == kv_seg[b, c]
                    if vis and has_dense_mask:
                        vis = mask[b * mstr[0] + h * mstr[1] + i * mstr[2] + c * mstr[3]] != 0
                    if not vis:
                        ST_[c, r] = -np.inf
        # softmax in base 2: P = 2^(S·c2 − m), m = c2 · the row's maximum (0 for a row of
        # −inf).  A NaN or +inf maximum (or one whose shift overflows) is the NaN policy's case.
        mb, sums = m[:Rb], row_sum[:Rb]
        _col_max(ST_, mb)
        bad = 0
        for r in range(Rb):
            mx = mb[r]
            mb[r] = mx * c2 if mx > -np.inf else (mx if mx != mx else 0.0)
            if not mb[r] < np.inf:  # (NaN too)
                bad = 1
        if bad:
            status[chunk] = 1
            break
        sums[:] = 0.0
        _exp2_shifted_sum(ST_, N, c2, mb, sums, _NO_PREFETCH)  # the sums before dropout: the full softmax's
        if dropout_p > 0.0:
            inv_keep = 1.0 / (1.0 - dropout_p)
            for c in range(nk):
                srow = ST_[c]
                for r in range(Rb):
                    h = hk * group + r // nq
                    i = i0 + r % nq
                    if _dropout_keep(dropout_key, dropout_p, b, h, i, c, Hq, Lq, Lk):
                        srow[r] *= inv_keep
                    else:
                        srow[r] = 0.0
        pv = PV[:Rb]
        _item_gemm(ST_.T, v[b, hk, :nk], pv)
        # A non-finite output (a NaN or ±inf value, seen or hidden behind a zero weight) is
        # the NaN policy's case too: the call reruns on the general path, which follows the
        # policy pair by pair.  Finite inputs never take it.
        for r in range(Rb):
            row = (r // nq) * Lq + i0 + r % nq
            if sums[r] > 0.0:
                inv = 1.0 / sums[r]
                for d in range(Dv):
                    o = pv[r, d] * inv
                    out[b, hk, row, d] = o
                    # o − o is 0 for a finite o, NaN otherwise; counted in an int, which LLVM
                    # vectorizes (a float sum of them is a chain of dependent adds)
                    bad += (o - o) != 0.0
                lse[b, hk, row] = _lse_natural(mb[r], sums[r])
            else:
                for d in range(Dv):
                    out[b, hk, row, d] = 0.0
                lse[b, hk, row] = -np.inf
        if bad:
            status[chunk] = 1
            break
    _gemm_threads_end(q, threads)


@njit(cache=True, nogil=True)
def forward_caller(flags, gen, partners, max_cycles, args, nchunks):
    """The caller's side of a call on the spinning partners (``_launch.on_partners``): the
    call's number ``gen`` at ``flags[ENTERED]`` (the partners start at once, and the GIL is
    free from here on), chunk 0 of ``forward_chunk(*args, chunk, nchunks)``, then
    ``_cpu_sync.finish_partners``: a partner that has not claimed the call is cancelled — the
    shared queue is empty by then, so its chunk has nothing left to take.  True when no
    partner is left running."""
    _store_release(flags, ENTERED, gen)
    forward_chunk(*args, 0, nchunks)
    return finish_partners(flags, gen, partners, max_cycles)[1] == 0


@njit(cache=True, nogil=True)
def forward_partner(flags, i, gen, args, nchunks):
    """Partner ``i``'s side of call ``gen`` (claimed): chunk ``i + 1``, then ``gen`` in its DONE
    slot (release), after its items' writes."""
    forward_chunk(*args, i + 1, nchunks)
    partner_done(flags, i, gen)


@njit(cache=True, nogil=True, parallel=True)
def forward_team(args, nchunks):
    """The ``nchunks`` chunks of ``forward_chunk(*args, chunk, nchunks)`` on Numba's thread team
    (``_launch.on_numba_team``: a caller whose own work runs on that team, whose workers spin
    between its launches)."""
    for chunk in prange(nchunks):
        # (prange's index is a uint64: as an int64, the chunk entry of the other paths)
        forward_chunk(*args, np.int64(chunk), nchunks)


def _forward_chunk_of(at: int):
    """For :func:`~._entry_order.load_callee_first`: ``forward_chunk``'s own signature for the
    argument tuple that is an entry's argument ``at``."""
    return lambda args: (forward_chunk, (*args[at].types, types.int64, types.int64))


# forward_chunk's own entry loads before the three entries that run it: one machine code for
# the call's chunks on every path, whatever the process ran first (kernels/_entry_order.py)
load_callee_first(forward_caller, _forward_chunk_of(4))
load_callee_first(forward_partner, _forward_chunk_of(3))
load_callee_first(forward_team, _forward_chunk_of(0))
