"""Numba kernels of the ``cpu`` backend: fused tiled attention, forward and backward.

FlashAttention-2 (Dao 2023) on a CPU: the online softmax of Milakov & Gimelshein (2018) over
key blocks, scores never leave a ``BQ × BK`` block that lives in L2.  Each block:

1. ``Sᵀ = K_blk · Q_blkᵀ`` with ``np.dot`` (BLAS sgemm on contiguous blocks, 1 BLAS thread:
   our own threads run one block each);
2. the score chain of ``docs/semantics.md`` (scale, softcap, bias, ALiBi, ``score_mod``)
   and the masks (lengths, causal, window, segments, dense mask, ``mask_mod``), skipped
   where the block is fully visible; invisible blocks are never visited;
3. the softmax in base 2 (``log2(e)`` folded into the scale) with :func:`_exp2_shifted`, a
   polynomial ``2^f`` plus an integer exponent add — two loops LLVM vectorizes;
4. ``acc += P · V_blk`` with ``np.dot``.

This file is also a *template*: ``cpu.kernels_for(score_mod, mask_mod)`` runs its source
again in a namespace where ``score_mod_fn``/``mask_mod_fn`` are the user's compiled
functions — a generated file behind their source, cached on disk like this one, for
self-contained functions; an in-memory namespace with ``_JIT_CACHE`` False for closures.
The default instance below uses no-op mods and is cached on disk (``cache=True``).

Conventions: ``T`` is the compute dtype (float32, or float64 for float64 inputs).  Packed
inputs are ``kp (B, Hkv, nkb, BK, D)`` / ``vp (B, Hkv, nkb, BK, Dv)`` with zeros past each
sequence's real length.  ``causal``: 0 none, 1 bottom-right, 2 top-left.  Window sides < 0
mean unbounded.  Dense mask/bias come flattened with element strides ``(sb, sh, si, sj)``.
``geom`` (int64, 8) places the call inside a larger problem (``semantics.BlockGeometry``):
``[position shift, top-left offset, h0, row0, col0, Hq, Lq, Lk]`` — bottom-right/window/ALiBi
offsets add ``geom[0]``, top-left causal is ``j ≤ i + geom[1]``, dropout draws the counter of
head ``h + h0``, row ``i + row0``, key ``j + col0`` of a ``Hq × Lq × Lk`` problem.  A whole
call passes ``[0, 0, 0, 0, 0, Hq, Lq, Lk]``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ._cpu_primitives import (
    LN2,
    LOG2E,
    PARTIAL,
    SKIP,
    _add_into,
    _block_class,
    _col_max,
    _col_sum_into,
    _ds_block,
    _dropout_block,
    _exp2_shifted,
    _matmul,
    _mul_into,
)

_JIT_CACHE = globals().get("_JIT_CACHE", True)


@njit(cache=_JIT_CACHE, inline="always")
def _no_score_mod(score, b, h, q_idx, kv_idx):
    return score


@njit(cache=_JIT_CACHE, inline="always")
def _no_mask_mod(b, h, q_idx, kv_idx):
    return True


score_mod_fn = globals().get("score_mod_fn", _no_score_mod)
mask_mod_fn = globals().get("mask_mod_fn", _no_mask_mod)
HAS_SCORE_MOD = globals().get("HAS_SCORE_MOD", False)
HAS_MASK_MOD = globals().get("HAS_MASK_MOD", False)


# =================================================================================
# visibility: block classes and per-element masks
# =================================================================================


@njit(cache=_JIT_CACHE)
def _block_class_bm(
    b,
    h,
    qb,
    kb,
    BQ,
    BK,
    Lq,
    Lk,
    q_lens,
    kv_lens,
    causal,
    left,
    right,
    q_seg,
    kv_seg,
    has_seg,
    geom,
    has_dense_mask,
    bm,
    bm_on,
):
    """The class of block ``(qb, kb)`` of the ``BQ × BK`` tiling, every mask included.

    The dense mask and ``mask_mod`` make a block PARTIAL unless the user's block mask
    (``bm (Bm, Hm, nqb, nkb)``, derived from that ``mask_mod``) says it is FULL or SKIP.
    The last key block is never FULL when it is shorter than BK (its padding is masked).
    """
    i0 = qb * BQ
    j0 = kb * BK
    nrows = min(BQ, Lq - i0)
    ncols = min(BK, Lk - j0)
    cls = _block_class(
        b,
        h,
        i0,
        nrows,
        j0,
        ncols,
        q_lens,
        kv_lens,
        causal,
        left,
        right,
        q_seg,
        kv_seg,
        has_seg,
        geom,
    )
    if cls == SKIP:
        return SKIP
    if ncols < BK or has_dense_mask:
        cls = PARTIAL
    if bm_on:
        user = bm[b % bm.shape[0], h % bm.shape[1], qb, kb]
        if user == SKIP:
            return SKIP
        if user == PARTIAL:
            cls = PARTIAL
    elif HAS_MASK_MOD:
        cls = PARTIAL
    return cls


@njit(cache=_JIT_CACHE)
def _mask_block(
    ST,
    lo,
    hi,
    b,
    h,
    i0,
    nrows,
    j0,
    q_lens,
    kv_lens,
    causal,
    left,
    right,
    q_seg,
    kv_seg,
    has_seg,
    geom,
    mask,
    mstr,
    has_dense_mask,
):
    """Set ``ST[c, r] = −inf`` where query ``i0+r`` does not see key ``j0+c`` (valid rows only).

    Lengths, causal and window give each row an interval ``[lo, hi]`` of keys, applied by a
    branch-free (vectorized) select; segments, the dense mask and ``mask_mod`` go element
    by element inside that interval.  ``lo``/``hi`` are int64 scratch of BQ.
    """
    qlen = q_lens[b]
    kvlen = kv_lens[b]
    off = kvlen - qlen + geom[0]  # geom[0]: a block's position shift (BlockGeometry)
    BK, BQ = ST.shape
    nr = min(nrows, qlen - i0)
    for r in range(BQ):
        if r >= nr:
            lo[r] = 1
            hi[r] = 0
            continue
        i = i0 + r
        p = i + off
        top = min(kvlen, j0 + BK) - 1  # last visible key by lengths, causal, right window
        if causal == 1:
            top = min(top, p)
        elif causal == 2:
            top = min(top, i + geom[1])
        if right >= 0:
            top = min(top, p + right)
        bottom = j0
        if left >= 0:
            bottom = max(bottom, p - left)
        lo[r] = bottom - j0
        hi[r] = top - j0
    for c in range(BK):
        row = ST[c]  # a row view keeps this select a vectorized 1-D loop
        for r in range(BQ):
            row[r] = row[r] if lo[r] <= c and c <= hi[r] else -np.inf
    if has_seg or has_dense_mask or HAS_MASK_MOD:
        for r in range(nr):
            i = i0 + r
            for c in range(max(lo[r], 0), min(hi[r] + 1, BK)):
                j = j0 + c
                vis = True
                if has_seg:
                    vis = q_seg[b, i] == kv_seg[b, j]
                if has_dense_mask and vis:
                    vis = mask[b * mstr[0] + h * mstr[1] + i * mstr[2] + j * mstr[3]] != 0
                if HAS_MASK_MOD and vis:
                    vis = mask_mod_fn(b, h, i, j)
                if not vis:
                    ST[c, r] = -np.inf


@njit(cache=_JIT_CACHE)
def _transform_block(
    ST,
    G,
    GM,
    want_grad,
    b,
    h,
    i0,
    nrows,
    j0,
    ncols,
    q_lens,
    kv_lens,
    scale,
    softcap,
    bias,
    bstr,
    has_bias,
    slopes,
    has_alibi,
    geom,
):
    """Raw dot products → scores in base 2: ``log2(e) · score_mod(softcap(scale·s) + bias − ALiBi)``.

    With ``want_grad`` the backward's chain-rule factors come out too: ``G[c, r]`` =
    softcap's ``1 − tanh²`` and ``GM[c, r]`` = score_mod's derivative (a central difference
    in float64, since a user function has no symbolic derivative).
    """
    qlen = q_lens[b]
    kvlen = kv_lens[b]
    off = kvlen - qlen + geom[0]  # geom[0]: a block's position shift (BlockGeometry)
    BK, BQ = ST.shape
    slope = slopes[b, h] if has_alibi else 0.0
    for c in range(BK):
        j = j0 + c
        for r in range(BQ):
            i = i0 + r
            s = ST[c, r] * scale
            if softcap > 0.0:
                t = math.tanh(s / softcap)
                s = softcap * t
                if want_grad:
                    G[c, r] = 1.0 - t * t
            if has_bias and r < nrows and c < ncols:
                s += bias[b * bstr[0] + h * bstr[1] + i * bstr[2] + j * bstr[3]]
            if has_alibi:
                s -= slope * abs(i + off - j)
            if HAS_SCORE_MOD:
                if want_grad:
                    s64 = np.float64(s)
                    eps = 1e-4 * max(1.0, abs(s64))
                    up = np.float64(score_mod_fn(s64 + eps, b, h, i, j))
                    dn = np.float64(score_mod_fn(s64 - eps, b, h, i, j))
                    GM[c, r] = (up - dn) / (2.0 * eps)
                s = score_mod_fn(s, b, h, i, j)
            ST[c, r] = s * LOG2E


@njit(cache=_JIT_CACHE)
def _scores_block(
    ST,
    Qs,
    Kb,
    lo,
    hi,
    G,
    GM,
    want_grad,
    cls,
    simple,
    b,
    h,
    i0,
    nrows,
    j0,
    ncols,
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
    geom,
):
    """``ST = (K_blk · Q_blkᵀ)``, through the score chain (unless ``simple``) and the masks (PARTIAL blocks)."""
    _matmul(Kb, Qs.T, ST)
    if not simple:
        _transform_block(
            ST,
            G,
            GM,
            want_grad,
            b,
            h,
            i0,
            nrows,
            j0,
            ncols,
            q_lens,
            kv_lens,
            scale,
            softcap,
            bias,
            bstr,
            has_bias,
            slopes,
            has_alibi,
            geom,
        )
    if cls == PARTIAL:
        _mask_block(
            ST,
            lo,
            hi,
            b,
            h,
            i0,
            nrows,
            j0,
            q_lens,
            kv_lens,
            causal,
            left,
            right,
            q_seg,
            kv_seg,
            has_seg,
            geom,
            mask,
            mstr,
            has_dense_mask,
        )


# =================================================================================
# forward
# =================================================================================


@njit(cache=_JIT_CACHE, parallel=True, nogil=True)
def forward(
    q,
    kp,
    vp,
    out,
    lse,
    BQ,
    Lk,
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
    geom,
    dropout_p,
    dropout_key,
    bm,
    bm_on,
    nchunks,
):
    """``out (B, Hq, Lq, Dv)`` and natural-log ``lse (B, Hq, Lq)`` of every query block.

    Tasks ``(b, h, query block)`` are dealt round-robin to ``nchunks`` chunks, one per thread,
    so causal work is balanced and each output row is written by exactly one task.
    """
    for chunk in prange(nchunks):
        _forward_chunk(
            chunk,
            q,
            kp,
            vp,
            out,
            lse,
            BQ,
            Lk,
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
            geom,
            dropout_p,
            dropout_key,
            bm,
            bm_on,
            nchunks,
        )


@njit(cache=_JIT_CACHE)
def _forward_chunk(
    chunk,
    q,
    kp,
    vp,
    out,
    lse,
    BQ,
    Lk,
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
    geom,
    dropout_p,
    dropout_key,
    bm,
    bm_on,
    nchunks,
):
    """One thread's share of :func:`forward`: tasks ``chunk, chunk + nchunks, …``."""
    B, Hq, Lq, D = q.shape
    Hkv = kp.shape[1]
    nkb, BK = kp.shape[2], kp.shape[3]
    Dv = vp.shape[4]
    group = Hq // Hkv
    nqb = (Lq + BQ - 1) // BQ
    ntasks = B * Hq * nqb
    # simple: no per-element score chain; scale·log2(e) is folded into the exponent's multiply
    simple = softcap <= 0.0 and not has_bias and not has_alibi and not HAS_SCORE_MOD and scale > 0.0
    consts = np.empty(3, dtype=q.dtype)  # compute-dtype scalars, so hot loops stay in that dtype
    consts[0] = scale * LOG2E if simple else 1.0
    consts[1] = 0.0
    consts[2] = 1.0 / (1.0 - dropout_p)
    c2, zero, inv_keep = consts[0], consts[1], consts[2]
    Qs = np.zeros((BQ, D), dtype=q.dtype)
    ST = np.empty((BK, BQ), dtype=q.dtype)
    dummy = np.empty((1, 1), dtype=q.dtype)
    dummy_drop = np.empty((BK, BQ), dtype=q.dtype)  # _dropout_block's dP (unused here)
    N = np.empty((BK, BQ), dtype=np.int32)
    PV = np.empty((BQ, Dv), dtype=q.dtype)
    acc = np.empty((BQ, Dv), dtype=q.dtype)
    m = np.empty(BQ, dtype=q.dtype)
    m_use = np.empty(BQ, dtype=q.dtype)
    bmax = np.empty(BQ, dtype=q.dtype)
    row_sum = np.empty(BQ, dtype=q.dtype)
    lo = np.empty(BQ, dtype=np.int64)
    hi = np.empty(BQ, dtype=np.int64)
    for t in range(chunk, ntasks, nchunks):
        b = t // (Hq * nqb)
        h = (t // nqb) % Hq
        qb = t % nqb
        hk = h // group
        i0 = qb * BQ
        nrows = min(BQ, Lq - i0)
        nr = min(nrows, q_lens[b] - i0)
        if nr <= 0:
            out[b, h, i0 : i0 + nrows] = 0.0
            lse[b, h, i0 : i0 + nrows] = -np.inf
            continue
        Qs[:] = 0.0
        Qs[:nr] = q[b, h, i0 : i0 + nr]
        m[:] = -np.inf
        row_sum[:] = zero
        acc[:] = zero
        for kb in range(nkb):
            j0 = kb * BK
            ncols = min(BK, Lk - j0)
            cls = _block_class_bm(
                b,
                h,
                qb,
                kb,
                BQ,
                BK,
                Lq,
                Lk,
                q_lens,
                kv_lens,
                causal,
                left,
                right,
                q_seg,
                kv_seg,
                has_seg,
                geom,
                has_dense_mask,
                bm,
                bm_on,
            )
            if cls == SKIP:
                continue
            _scores_block(
                ST,
                Qs,
                kp[b, hk, kb],
                lo,
                hi,
                dummy,
                dummy,
                False,
                cls,
                simple,
                b,
                h,
                i0,
                nrows,
                j0,
                ncols,
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
                geom,
            )
            # update the running max; rescale acc and row_sum by 2^(m_old − m_new)
            _col_max(ST, bmax)
            for r in range(BQ):
                m_new = max(m[r], bmax[r] * c2)
                mu = m_new if m_new > -np.inf else zero
                alpha = math.exp2(m[r] - mu) if m[r] > -np.inf else zero
                m[r] = m_new
                m_use[r] = mu
                row_sum[r] *= alpha
                acc_row = acc[r]  # row views keep the short inner loops vectorized
                for d in range(Dv):
                    acc_row[d] *= alpha
            # P = 2^(S·c − m); running sum (pre-dropout); acc += P·V
            _exp2_shifted(ST, N, c2, m_use)
            _col_sum_into(ST, row_sum)
            if dropout_p > 0.0:
                _dropout_block(
                    ST, ST, dummy_drop, dropout_key, dropout_p, inv_keep, b, h + geom[2], i0 + geom[3], nr, j0 + geom[4], geom[5], geom[6], geom[7]
                )
            np.dot(ST.T, vp[b, hk, kb], out=PV)
            _add_into(acc, PV)
        # normalize; rows without a visible key give 0 and lse = −inf
        for r in range(nrows):
            if r < nr and row_sum[r] > zero:
                inv = 1.0 / row_sum[r]
                for d in range(Dv):
                    out[b, h, i0 + r, d] = acc[r, d] * inv
                lse[b, h, i0 + r] = (m[r] + math.log2(row_sum[r])) * LN2
            else:
                out[b, h, i0 + r, :] = 0.0
                lse[b, h, i0 + r] = -np.inf


# =================================================================================
# backward
# =================================================================================


@njit(cache=_JIT_CACHE, parallel=True, nogil=True)
def backward(
    q,
    kp,
    vp,
    dout,
    lse,
    delta,
    dq_parts,
    dkp,
    dvp,
    dbias,
    want_dbias,
    BQ,
    Lk,
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
    geom,
    dropout_p,
    dropout_key,
    bm,
    bm_on,
    nchunks,
):
    """FlashAttention-2 backward: tasks ``(b, kv head, key block)`` own their dK/dV block.

    For each query head of the group and each visible query block, scores are recomputed
    and ``P = 2^(S₂ − lse₂)``; then ``dV += P̃ᵀ·dO`` (P̃ = P after dropout), ``dP = dO·Vᵀ``
    (times the same dropout mask), ``dS = P∘(dP − Δ)``, ``dK += dSᵀ·Q``, ``dQ += dS·K``
    (all on transposed blocks).  dQ rows are shared between key blocks, so each chunk (one
    per thread, tasks dealt round-robin) adds into its own ``dq_parts[chunk]``; the caller
    sums the parts in a fixed order, which keeps results bitwise repeatable.  dK is scaled by
    ``scale`` here, dQ by the caller.
    """
    for chunk in prange(nchunks):
        _backward_chunk(
            chunk,
            q,
            kp,
            vp,
            dout,
            lse,
            delta,
            dq_parts,
            dkp,
            dvp,
            dbias,
            want_dbias,
            BQ,
            Lk,
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
            geom,
            dropout_p,
            dropout_key,
            bm,
            bm_on,
            nchunks,
        )


@njit(cache=_JIT_CACHE)
def _backward_chunk(
    chunk,
    q,
    kp,
    vp,
    dout,
    lse,
    delta,
    dq_parts,
    dkp,
    dvp,
    dbias,
    want_dbias,
    BQ,
    Lk,
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
    geom,
    dropout_p,
    dropout_key,
    bm,
    bm_on,
    nchunks,
):
    """One thread's share of :func:`backward`: tasks ``chunk, chunk + nchunks, …``."""
    B, Hq, Lq, D = q.shape
    Hkv = kp.shape[1]
    nkb, BK = kp.shape[2], kp.shape[3]
    Dv = vp.shape[4]
    group = Hq // Hkv
    nqb = (Lq + BQ - 1) // BQ
    ntasks = B * Hkv * nkb
    simple = softcap <= 0.0 and not has_bias and not has_alibi and not HAS_SCORE_MOD and scale > 0.0
    need_g = softcap > 0.0 or HAS_SCORE_MOD
    consts = np.empty(2, dtype=q.dtype)
    consts[0] = scale * LOG2E if simple else 1.0
    consts[1] = 1.0 / (1.0 - dropout_p)
    c2, inv_keep = consts[0], consts[1]
    Qs = np.zeros((BQ, D), dtype=q.dtype)
    dOs = np.zeros((BQ, Dv), dtype=q.dtype)
    ST = np.empty((BK, BQ), dtype=q.dtype)
    dPT = np.empty((BK, BQ), dtype=q.dtype)
    PdT = np.empty((BK, BQ), dtype=q.dtype)
    G = np.empty((BK, BQ), dtype=q.dtype)
    GM = np.empty((BK, BQ), dtype=q.dtype)
    N = np.empty((BK, BQ), dtype=np.int32)
    dQt = np.empty((BQ, D), dtype=q.dtype)
    dKt = np.empty((BK, D), dtype=q.dtype)
    dVt = np.empty((BK, Dv), dtype=q.dtype)
    dK = np.empty((BK, D), dtype=q.dtype)
    dV = np.empty((BK, Dv), dtype=q.dtype)
    lse2 = np.empty(BQ, dtype=q.dtype)
    dls = np.empty(BQ, dtype=q.dtype)
    lo = np.empty(BQ, dtype=np.int64)
    hi = np.empty(BQ, dtype=np.int64)
    for t in range(chunk, ntasks, nchunks):
        b = t // (Hkv * nkb)
        hk = (t // nkb) % Hkv
        kb = t % nkb
        j0 = kb * BK
        ncols = min(BK, Lk - j0)
        dK[:] = 0.0
        dV[:] = 0.0
        Kb = kp[b, hk, kb]
        Vb = vp[b, hk, kb]
        for g in range(group):
            h = hk * group + g
            for qb in range(nqb):
                cls = _block_class_bm(
                    b,
                    h,
                    qb,
                    kb,
                    BQ,
                    BK,
                    Lq,
                    Lk,
                    q_lens,
                    kv_lens,
                    causal,
                    left,
                    right,
                    q_seg,
                    kv_seg,
                    has_seg,
                    geom,
                    has_dense_mask,
                    bm,
                    bm_on,
                )
                if cls == SKIP:
                    continue
                i0 = qb * BQ
                nrows = min(BQ, Lq - i0)
                nr = min(nrows, q_lens[b] - i0)
                Qs[:] = 0.0
                Qs[:nr] = q[b, h, i0 : i0 + nr]
                dOs[:] = 0.0
                dOs[:nr] = dout[b, h, i0 : i0 + nr]
                for r in range(BQ):
                    lv = lse[b, h, i0 + r] if r < nr else -np.inf
                    # rows without a visible key (lse = −inf) get P = 2^(S − ∞) = 0
                    lse2[r] = lv * LOG2E if lv > -np.inf else np.inf
                    dls[r] = delta[b, h, i0 + r] if r < nr else 0.0
                # recompute P from the LSE
                _scores_block(
                    ST,
                    Qs,
                    Kb,
                    lo,
                    hi,
                    G,
                    GM,
                    need_g,
                    cls,
                    simple,
                    b,
                    h,
                    i0,
                    nrows,
                    j0,
                    ncols,
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
                    geom,
                )
                _exp2_shifted(ST, N, c2, lse2)
                # dV += P̃ᵀ·dO; dPᵀ = V·dOᵀ (dropout: the forward's mask on both)
                _matmul(Vb, dOs.T, dPT)
                if dropout_p > 0.0:
                    _dropout_block(
                        ST, PdT, dPT, dropout_key, dropout_p, inv_keep, b, h + geom[2], i0 + geom[3], nr, j0 + geom[4], geom[5], geom[6], geom[7]
                    )
                    _matmul(PdT, dOs, dVt)
                else:
                    _matmul(ST, dOs, dVt)
                _add_into(dV, dVt)
                # dS = P ∘ (dP − Δ), in place of P; then the chain rule through
                # score_mod (the bias's gradient stops here) and softcap
                _ds_block(ST, dPT, dls)
                if HAS_SCORE_MOD:
                    _mul_into(ST, GM)
                if want_dbias:
                    for r in range(nr):
                        for c in range(ncols):
                            dbias[b, h, i0 + r, j0 + c] = ST[c, r]
                if softcap > 0.0:
                    _mul_into(ST, G)
                _matmul(ST, Qs, dKt)
                _add_into(dK, dKt)
                _matmul(ST.T, Kb, dQt)
                _add_into(dq_parts[chunk, b, h, i0 : i0 + nr], dQt[:nr])
        for c in range(BK):
            for d in range(D):
                dkp[b, hk, kb, c, d] = dK[c, d] * scale
            for d in range(Dv):
                dvp[b, hk, kb, c, d] = dV[c, d]


# =================================================================================
# weights (materialized on request)
# =================================================================================


@njit(cache=_JIT_CACHE, parallel=True, nogil=True)
def weights(
    q,
    kp,
    lse,
    P_out,
    BQ,
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
    geom,
    bm,
    bm_on,
    nchunks,
):
    """Pre-dropout probabilities ``P_out (B, Hq, Lq, Lk)`` from the forward's LSE (zeros elsewhere)."""
    for chunk in prange(nchunks):
        _weights_chunk(
            chunk,
            q,
            kp,
            lse,
            P_out,
            BQ,
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
            geom,
            bm,
            bm_on,
            nchunks,
        )


@njit(cache=_JIT_CACHE)
def _weights_chunk(
    chunk,
    q,
    kp,
    lse,
    P_out,
    BQ,
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
    geom,
    bm,
    bm_on,
    nchunks,
):
    """One thread's share of :func:`weights`: tasks ``chunk, chunk + nchunks, …``."""
    B, Hq, Lq, D = q.shape
    Hkv = kp.shape[1]
    nkb, BK = kp.shape[2], kp.shape[3]
    Lk = P_out.shape[3]
    group = Hq // Hkv
    nqb = (Lq + BQ - 1) // BQ
    ntasks = B * Hq * nqb
    simple = softcap <= 0.0 and not has_bias and not has_alibi and not HAS_SCORE_MOD and scale > 0.0
    consts = np.empty(1, dtype=q.dtype)
    consts[0] = scale * LOG2E if simple else 1.0
    c2 = consts[0]
    Qs = np.zeros((BQ, D), dtype=q.dtype)
    ST = np.empty((BK, BQ), dtype=q.dtype)
    N = np.empty((BK, BQ), dtype=np.int32)
    dummy = np.empty((1, 1), dtype=q.dtype)
    lse2 = np.empty(BQ, dtype=q.dtype)
    lo = np.empty(BQ, dtype=np.int64)
    hi = np.empty(BQ, dtype=np.int64)
    for t in range(chunk, ntasks, nchunks):
        b = t // (Hq * nqb)
        h = (t // nqb) % Hq
        qb = t % nqb
        hk = h // group
        i0 = qb * BQ
        nrows = min(BQ, Lq - i0)
        nr = min(nrows, q_lens[b] - i0)
        if nr <= 0:
            continue
        Qs[:] = 0.0
        Qs[:nr] = q[b, h, i0 : i0 + nr]
        for r in range(BQ):
            lv = lse[b, h, i0 + r] if r < nr else -np.inf
            lse2[r] = lv * LOG2E if lv > -np.inf else np.inf
        for kb in range(nkb):
            j0 = kb * BK
            ncols = min(BK, Lk - j0)
            cls = _block_class_bm(
                b,
                h,
                qb,
                kb,
                BQ,
                BK,
                Lq,
                Lk,
                q_lens,
                kv_lens,
                causal,
                left,
                right,
                q_seg,
                kv_seg,
                has_seg,
                geom,
                has_dense_mask,
                bm,
                bm_on,
            )
            if cls == SKIP:
                continue
            _scores_block(
                ST,
                Qs,
                kp[b, hk, kb],
                lo,
                hi,
                dummy,
                dummy,
                False,
                cls,
                simple,
                b,
                h,
                i0,
                nrows,
                j0,
                ncols,
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
                geom,
            )
            _exp2_shifted(ST, N, c2, lse2)
            for c in range(ncols):
                for r in range(nr):
                    P_out[b, h, i0 + r, j0 + c] = ST[c, r]
