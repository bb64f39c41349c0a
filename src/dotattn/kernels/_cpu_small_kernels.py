"""Numba kernels of the ``cpu`` backend for small calls: one work item per (sequence, K/V head).

Real models make many small calls (a sentence encoder: 32 sentences × 12 heads of 20 tokens;
a decode step: one query row against a short cache).  The general kernels
(:mod:`dotattn.kernels._cpu_kernels`) tile each (sequence, query head) separately and stream
key blocks through an online softmax; on such calls their per-tile set-up dominates.  Here a
work item is one (sequence ``b``, K/V head ``hk``): the ``group = Hq / Hkv`` query heads that
read that K/V head are folded into the rows (``R = group · Lq``; a decode step's 3 query heads
of a group become 3 rows of one GEMM), and all ``Lk`` keys fit in one score block, so the
softmax is exact in one pass — no running max, no rescaling:

1. ``Sᵀ = K · Qᵀ`` (``nk × R``, ``nk`` = the last key any row can see) with one BLAS GEMM;
2. the score chain of ``docs/semantics.md`` (scale, softcap, bias, ALiBi) unless "simple",
   then the masks: an interval ``[lo, hi]`` per row (lengths, causal, window) as a
   vectorized select, segment ids and a dense mask element by element;
3. ``P = 2^(Sᵀ·c − m)`` with a vectorized exp (the shared polynomial), the row sums (before dropout), the
   dropout mask of :mod:`dotattn.kernels.dropout` (same bits as every backend);
4. ``out = Pᵀ·V / row sum`` with one BLAS GEMM, ``lse = (m + log2(row sum)) · ln 2``;
   a NaN/+inf row maximum or a non-finite output element is reported in ``status`` (the NaN
   policy's case, which the caller reruns on the general kernels).

Items are dealt round-robin to ``nchunks`` chunks; :func:`forward_chunk` runs one chunk and
releases the GIL, so ``_launch.run_chunks`` runs chunks in Python threads, the caller taking
any chunk no thread has started (no ``prange`` team that must all be scheduled).

Conventions as in ``_cpu_kernels``: ``T`` the compute dtype; ``q (B, Hkv, R, D)`` with row
``r`` = query head ``hk·group + r // Lq``, query ``r % Lq``; ``k (B, Hkv, Lk, D)``,
``v (B, Hkv, Lk, Dv)``; ``causal`` 0 none, 1 bottom-right, 2 top-left; window sides < 0
unbounded; dense mask/bias flattened with element strides ``(sb, sh, si, sj)``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, types
from numba.extending import overload

from ._cpu_primitives import (
    HUGE_SHIFT,
    LOG2E,
    SUM_KEYS,
    _dropout_keep,
    _take_task,
    _gemm,
    _gemm_threads_begin,
    _gemm_threads_end,
    _lse_natural,
    _matmul,
    _short_rows,
    exp2_fraction,
)
from ._cpu_simd import dot_tile_f64, fma


# GEMMs of at least this many multiply-adds go to the bound sgemm (MKL's where torch is
# installed: ≈ 13 % less time for a B1 H12 L128 D64 call, one thread), smaller ones to
# NumPy's dot (OpenBLAS), whose call costs less: ≈ 10 % less time for 20 × 20 × 32 items.
_BOUND_GEMM_MIN = 1 << 16


def _item_gemm(a, b, out):
    """``out = a · b`` for an item: float32 products of :data:`_BOUND_GEMM_MIN` or more
    multiply-adds by the bound sgemm, the rest (and float64) by NumPy's dot."""
    raise NotImplementedError("compiled only")


@overload(_item_gemm, jit_options={"cache": True})
def _item_gemm_overload(a, b, out):
    if a.dtype == types.float32:

        def impl_f32(a, b, out):
            if a.shape[0] * a.shape[1] * b.shape[1] >= _BOUND_GEMM_MIN:
                _gemm(a, b, out, 0.0)
            else:
                _matmul(a, b, out)

        return impl_f32
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


# Lanes of the row maximum: 16 independent running maxima (one AVX-512 register of float32)
# that LLVM vectorizes, where one running maximum is a chain of dependent selects (≈ 1 ns per
# score: 14 µs of a 128 × 128 block, measured).
_LANES = 16


# The shift ``S·c2 − m`` by one FMA (the product exact, one rounding), except for rows whose
# shift is huge: there an FMA computes x·c2 − round(x·c2) for the max element, its rounding
# error, which for logits of 1e12 is ~1e4 — 2^(±1e4) instead of 2^0 — so the product is
# rounded first, as ``m`` was (the general kernels' rule past HUGE_SHIFT: _cpu_primitives._exp2_shifted_f32).
# Rounded first everywhere, the product's error (|S·c2|·2⁻²⁴ absolute, a relative error of P)
# came on top of the scores' own at large ``scale``.


@njit(cache=True, fastmath={"nsz"})
def _rows_max_shift(F, R, nk, m, c2, lanes):
    """``m[r] = c2 · max_c S[r, c]`` (0 for a row of −inf) and ``S[r] = S[r]·c2 − m[r]``
    for ``S`` the ``(R, nk)`` block stored row-major in ``F``; ``lanes``: scratch of
    :data:`_LANES` elements.  A row holding a NaN gets ``m = +inf`` (the general path's case)."""
    m[0] = c2
    c2t = m[0]  # c2 in the compute dtype, so the shift loop stays in it
    for r in range(R):
        base = r * nk
        for j in range(_LANES):
            lanes[j] = -np.inf
        nan = 0
        c = 0
        while c + _LANES <= nk:
            for j in range(_LANES):
                x = F[base + c + j]
                a = lanes[j]
                lanes[j] = x if x > a else a  # a NaN never wins: it is counted below
                nan += x != x
            c += _LANES
        mx = lanes[0]
        for j in range(1, _LANES):
            mx = lanes[j] if lanes[j] > mx else mx
        for c in range(c, nk):
            x = F[base + c]
            mx = x if x > mx else mx
            nan += x != x
        if nan:
            mx = np.inf  # a NaN score: marked like +inf, for the general path's NaN policy
        m[r] = mx * c2t if mx > -np.inf else 0.0
        mr = m[r]
        if abs(mr) < HUGE_SHIFT:
            for c in range(nk):
                F[base + c] = fma(F[base + c], c2t, -mr)
        else:
            for c in range(nk):
                F[base + c] = F[base + c] * c2t - mr


def _exp2_flat(F, N):
    """``F[i] = 2**F[i]`` in place for the already shifted scores (``F[i] ≤ 0`` or −inf); ``N``
    int32 scratch of ``F``'s size.  The shared block exp (``_cpu_primitives._exp2_shifted``)
    with a zero shift did the same, plus a scan of its per-row shifts for huge values — one
    per score here, an unvectorizable search loop as long as the block — and its float32 loop
    ran in float64 (a Python-float multiplier): ≈ 1 ns per score against ≈ 0.3.  Compiled per
    dtype by the overload below; float64 uses ``math.exp2`` (accuracy over speed)."""
    raise NotImplementedError("compiled only")


@njit(cache=True, fastmath={"contract", "afn", "nsz"})
def _exp2_flat_f32(F, N):
    # float32 throughout: x = e + f, e = round(x), 2**f by the shared polynomial, then e
    # added to the exponent bits in an integer loop (both loops vectorize; −inf and results
    # below 2**−126 give 0), as in _cpu_primitives._exp2_shifted_f32.
    n = F.size
    for i in range(n):
        xc = max(F[i], np.float32(-127.0))
        e = np.floor(xc + np.float32(0.5))
        F[i] = exp2_fraction(xc - e)
        N[i] = np.int32(e)
    bits = F.view(np.int32)
    for i in range(n):
        e = N[i]
        bits[i] = np.int32(bits[i] + (e << 23)) if e > -127 else np.int32(0)


@njit(cache=True)
def _exp2_flat_f64(F, N):
    for i in range(F.size):
        F[i] = math.exp2(F[i])


@overload(_exp2_flat, jit_options={"cache": True})
def _exp2_flat_overload(F, N):
    if F.dtype == types.float64:
        return lambda F, N: _exp2_flat_f64(F, N)
    return lambda F, N: _exp2_flat_f32(F, N)


@njit(cache=True, fastmath={"nsz", "contract", "reassoc"})
def _rows_sum(F, R, nk, row_sum):
    """Each row's sum, in blocks of SUM_KEYS keys (as the tiled kernels' exp passes)."""
    for r in range(R):
        base = r * nk
        acc = F[base] - F[base]  # a zero of the compute dtype (a finite probability)
        for c0 in range(0, nk, SUM_KEYS):
            part = acc - acc
            for c in range(c0, min(nk, c0 + SUM_KEYS)):
                part += F[base + c]
            acc += part
        row_sum[r] = acc



@njit(cache=True, nogil=True)
def forward_chunk(
    q,
    k,
    v,
    out,
    lse,
    group,
    Lq,
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
    until none is left: for each ``t``, every row of ``(b, hk) = divmod(t, Hkv)``,
    ``out[b, hk] (R, Dv)`` and ``lse[b, hk] (R,)``.  ``status[chunk]`` becomes 1 (and the
    chunk stops) where an item meets a non-finite score or output: the NaN policy's case,
    which the caller reruns on the general kernels.

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
    # scratch, once per chunk
    ST = np.empty(Lk * R, dtype=q.dtype)
    N = np.empty(Lk * R, dtype=np.int32)
    PV = np.empty((R, Dv), dtype=q.dtype)
    lo = np.empty(R, dtype=np.int64)
    hi = np.empty(R, dtype=np.int64)
    m = np.empty(R, dtype=q.dtype)
    row_sum = np.empty(R, dtype=q.dtype)
    lanes = np.empty(_LANES, dtype=q.dtype)
    short = _short_rows(Lq, Lk)  # score products summed in float64 (_item_scores)
    threads = _gemm_threads_begin(q)  # MKL's GEMMs on this thread only (our chunks are the threads)
    items = B * Hkv
    while True:
        t = _take_task(queue)
        if t >= items:
            break
        b = t // Hkv
        hk = t % Hkv
        qlen = q_lens[b]
        kvlen = kv_lens[b]
        off = kvlen - qlen  # query i sits at key position i + off (bottom-right)
        # the keys each row can see by lengths, causal and window: [lo, hi]
        nk = 0
        for r in range(R):
            i = r % Lq
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
        if nk <= 0:
            out[b, hk] = 0.0
            lse[b, hk] = -np.inf
            continue
        # Only keys [0, nk) are read: padding past kv_lengths (even NaN) never enters a GEMM.
        # Scores row-major, S (R, nk): a row's softmax runs over contiguous keys.  The loops
        # index the flat F (S's memory) instead of taking row views: every view of an array
        # costs Numba an atomic reference-count increment and decrement, which on an 11 × 11
        # block took 40 % of the item's time (measured with perf).
        n = R * nk
        F = ST[:n]
        S = F.reshape(R, nk)
        _item_scores(q[b, hk], k[b, hk, :nk], S, short)
        simple = softcap <= 0.0 and not has_bias and not has_alibi and scale > 0.0
        if not simple:
            for r in range(R):
                h = hk * group + r // Lq
                i = r % Lq
                base = r * nk
                slope = slopes[b, h] if has_alibi else 0.0
                for c in range(nk):
                    s = F[base + c] * scale
                    if softcap > 0.0:
                        s = softcap * math.tanh(s / softcap)
                    if has_bias and i < qlen:
                        s += bias[b * bstr[0] + h * bstr[1] + i * bstr[2] + c * bstr[3]]
                    if has_alibi:
                        s -= slope * abs(i + off - c)
                    F[base + c] = s * LOG2E
        # masks: keys outside the row's interval, then segments and the dense mask inside it
        for r in range(R):
            base = r * nk
            for c in range(min(lo[r], nk)):
                F[base + c] = -np.inf
            for c in range(max(hi[r] + 1, 0), nk):
                F[base + c] = -np.inf
        if has_seg or has_dense_mask:
            for r in range(R):
                h = hk * group + r // Lq
                i = r % Lq
                base = r * nk
                for c in range(max(lo[r], 0), hi[r] + 1):
                    vis = True
                    if has_seg:
                        vis = q_seg[b, i] == kv_seg[b, c]
                    if vis and has_dense_mask:
                        vis = mask[b * mstr[0] + h * mstr[1] + i * mstr[2] + c * mstr[3]] != 0
                    if not vis:
                        F[base + c] = -np.inf
        # softmax in base 2: P = 2^(S·c2 − m), m the row max in the same units; the exp runs
        # over the whole block as one row (its per-column shift is 0: the rows are shifted here)
        c2 = scale * LOG2E if simple else 1.0
        _rows_max_shift(F, R, nk, m, c2, lanes)
        _exp2_flat(F, N[:n])
        _rows_sum(F, R, nk, row_sum)  # before dropout: the normalizer is the full softmax's
        if dropout_p > 0.0:
            inv_keep = 1.0 / (1.0 - dropout_p)
            for r in range(R):
                h = hk * group + r // Lq
                i = r % Lq
                base = r * nk
                for c in range(nk):
                    if _dropout_keep(dropout_key, dropout_p, b, h, i, c, Hq, Lq, Lk):
                        F[base + c] *= inv_keep
                    else:
                        F[base + c] = 0.0
        _item_gemm(S, v[b, hk, :nk], PV)
        # A NaN/+inf score, or a non-finite output (a NaN or ±inf value, seen or hidden behind a
        # zero weight), is the NaN policy's case: the item reports it and the call reruns on the
        # general path, which follows the policy pair by pair.  Finite inputs never take it.
        bad = 0
        for r in range(R):
            if m[r] == np.inf:
                bad = 1
                break
            elif row_sum[r] > 0.0:
                inv = 1.0 / row_sum[r]
                for d in range(Dv):
                    o = PV[r, d] * inv
                    out[b, hk, r, d] = o
                    # o − o is 0 for a finite o, NaN otherwise; counted in an int, which LLVM
                    # vectorizes (a float sum of them is a chain of dependent adds)
                    bad += (o - o) != 0.0
                lse[b, hk, r] = _lse_natural(m[r], row_sum[r])
            else:
                for d in range(Dv):
                    out[b, hk, r, d] = 0.0
                lse[b, hk, r] = -np.inf
        if bad:
            status[chunk] = 1
            break
    _gemm_threads_end(q, threads)
