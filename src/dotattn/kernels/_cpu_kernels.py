"""Numba kernels of the ``cpu`` backend: fused tiled attention, forward, backward and weights.

FlashAttention-2 (Dao 2023, arXiv:2307.08691) on a CPU, after FlashAttention (Dao et al.
2022) and the online softmax of Milakov & Gimelshein (2018): scores never leave a
``BQ × BK`` tile that lives in L2.  Per tile:

1. ``Sᵀ = K_blk · Q_blkᵀ`` by BLAS (1 BLAS thread: our own threads run one tile each);
2. the score chain of ``docs/semantics.md`` (scale, softcap, bias, ALiBi, ``score_mod``)
   and the masks (lengths, causal, window, segments, dense mask, ``mask_mod``), skipped
   where the tile is fully visible; invisible tiles are never visited;
3. the softmax in base 2 (``log2(e)`` folded into the scale) by :func:`_exp2_shifted`;
4. ``acc += P · V_blk`` by BLAS, accumulating in place.

Score tiles are transposed (``ST (BK, BQ)``): per-row reductions become vectorized
element-wise operations between rows of ``ST``.  ``T`` is the compute dtype (float32, or
float64 for float64 inputs).  Packed inputs are ``kp (B, Hkv, nkb, BK, D)`` /
``vp (B, Hkv, nkb, BK, Dv)``, zero past each sequence's real length; every other option
arrives in one :class:`~dotattn.kernels._cpu_options.Options` ``o`` — including where the
call sits in a larger problem (``semantics.BlockGeometry``: a position shift for
bottom-right/window/ALiBi, a top-left causal offset, the full problem's dropout counters).

This file is also a *template*: ``cpu.kernels_for(score_mod, mask_mod)`` runs its source
again in a namespace where ``score_mod_fn``/``mask_mod_fn`` are the user's compiled
functions (a generated, disk-cached file for self-contained functions; an in-memory
namespace with ``_JIT_CACHE`` False otherwise).  The default instance uses no-op mods.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from . import _cpu_amx, _cpu_amx_f32
from ._cpu_amx import rows_bf16, tile_config
from ._entry_order import load_callee_first
from ._cpu_primitives import (
    HUGE_SHIFT,
    LOG2E,
    PARTIAL,
    SKIP,
    _aligned_empty,
    _as_operand,
    _block_class,
    _delta_from_tile,
    _ds_block,
    _ds_operand,
    _ds_operand_pairs,
    _dots,
    _dropout_block,
    _exp2_operand,
    _exp2_shifted,
    _exp2_shifted_sum,
    _exp2_sum_operand,
    _gemm,
    _gemm_threads_begin,
    _gemm_threads_end,
    _key_pairs,
    _lazy_ok,
    _lazy_softmax,
    _lazy_spoils_scores,
    _lse_natural,
    _load_q,
    _mul_into,
    _fresh_acc,
    _new_acc,
    _pv,
    _pv_operand,
    _qk,
    _rescale_rows,
    _row,
    _short_rows,
    _snake_chunk,
    _take_task,
    _tile_buffer,
    _tile_max,
    _to_bf16,
    _transposed_acc,
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
# tiles: geometry, loading, per-call constants
# =================================================================================


@njit(cache=_JIT_CACHE, inline="always")
def _rows(b, qb, o):
    """``(i0, nrows, nr)``: first row of query tile ``qb``, its rows within Lq, and within q_lens[b]."""
    i0 = qb * o.BQ
    nrows = min(o.BQ, o.Lq - i0)
    return i0, nrows, min(nrows, o.q_lens[b] - i0)


@njit(cache=_JIT_CACHE, inline="always")
def _load_rows(dst, src, b, h, i0, nr):
    """``dst[:nr] = src[b, h, i0:i0+nr]``, zeros below (padding rows must not carry NaN)."""
    dst[:] = 0
    dst[:nr] = src[b, h, i0 : i0 + nr]


@njit(cache=_JIT_CACHE)
def _simple(o):
    """No per-element score chain: ``scale·log2(e)`` then rides in the exponent's multiply."""
    return o.softcap <= 0.0 and not o.has_bias and not o.has_alibi and not HAS_SCORE_MOD and o.scale > 0.0


@njit(cache=_JIT_CACHE)
def _constants(o, like):
    """``(c2, inv_keep)`` in ``like``'s dtype, so the hot loops never widen to float64.

    ``c2`` multiplies raw scores inside the exponent (``scale·log2(e)`` when the score chain
    is off, else 1: the chain already applied both); ``inv_keep = 1/(1 − dropout_p)``.
    """
    c = np.empty(2, dtype=like.dtype)
    c[0] = o.scale * LOG2E if _simple(o) else 1.0
    c[1] = 1.0 / (1.0 - o.dropout_p)
    return c[0], c[1]


@njit(cache=_JIT_CACHE, _nrt=False)
def _plan_next_tiles(plan, kp, vp, b, hk, kb):
    """The prefetch plan of key tile ``kb``'s exp pass (``_cpu_simd.exp2_max_tile16``,
    ``_cpu_amx.exp2_pairs``): value tile ``kb`` (``P·V`` reads it next) and key tile ``kb + 1``
    (none after the last), each one contiguous block of the packed ``kp``/``vp`` — its
    ``strides[2]`` bytes (for bfloat16 ``vp`` is a transposed view: ``shape[3]·strides[3]``
    would be one row of Vᵀ)."""
    plan[0] = vp.ctypes.data + b * vp.strides[0] + hk * vp.strides[1] + kb * vp.strides[2]
    plan[1] = vp.strides[2]
    plan[3] = 0
    if kb + 1 < kp.shape[2]:
        plan[2] = kp.ctypes.data + b * kp.strides[0] + hk * kp.strides[1] + (kb + 1) * kp.strides[2]
        plan[3] = kp.strides[2]


@njit(cache=_JIT_CACHE, _nrt=False)
def _plan_next(plan, kp, vp, b, hk, kb, o):
    """The forward's prefetch plan (:func:`_plan_next_tiles`) for what the next steps read: on
    the split route the score product reads key tile ``kb + 1``'s pieces (``o.kpc[b, hk, kb +
    1]``, one contiguous block: 3 × (BK + 1) rows of Dp bfloat16), not its float32 ``kp`` tile —
    which the plan fetched into L2 unread while the pieces came from L3 as the product ran."""
    _plan_next_tiles(plan, kp, vp, b, hk, kb)
    if o.split_s and plan[3] != 0:
        kpc = o.kpc
        plan[2] = kpc.ctypes.data + b * kpc.strides[0] + hk * kpc.strides[1] + (kb + 1) * kpc.strides[2]
        plan[3] = kpc.strides[2]


# bfloat16 (AMX) forward: the exp pass prefetches the next K/V tiles only where one head's K
# and V pass this many bytes — at H4 L4096 D128 (2 MiB; with the tile buffers more than a
# core's 2 MiB L2) one thread's kernel ran 35.5–36.6 → 33.5–34.2 ms; at D 64 (1 MiB, which
# stays in L2) the prefetches only cost (43.5–43.9 → 45.5 ms; 00:52, load 2.2–2.9).
BF16_PREFETCH_MIN_KV_BYTES = 3 << 19


def _prefetch_kv(kp, vp):
    """Whether the forward's exp pass prefetches K/V tiles (``_plan_next_tiles``): always for
    float32; for bfloat16 operands where a head's K and V take ``BF16_PREFETCH_MIN_KV_BYTES``."""
    raise NotImplementedError("compiled only")


@overload(_prefetch_kv, jit_options={"cache": _JIT_CACHE})
def _prefetch_kv_overload(kp, vp):
    if kp.dtype == types.uint16:
        return lambda kp, vp: kp.strides[1] + vp.strides[1] >= BF16_PREFETCH_MIN_KV_BYTES
    return lambda kp, vp: True


@njit(cache=_JIT_CACHE, _nrt=False)
def _lse_rows(lse2, lse, b, h, i0, nr):
    """The saved natural-log LSE of rows ``i0…`` in base 2; rows without a visible key
    (lse = −inf) and padding rows get +inf, so that ``P = 2^(S − ∞) = 0`` there.

    Rounding the base-2 LSE to float32 scales every P the backward rebuilds in the row (up to
    6.6e-7 at logits ≈ 17), which ``cpu.backward`` puts right by scaling the row's dO and Δ
    (:func:`dotattn.kernels.cpu.lse_rounding_fix`) — except in calls whose every P comes from
    its tile's own softmax (``exact_rows`` in :func:`_backward_chunk`), which see no LSE."""
    for r in range(lse2.shape[0]):
        lv = lse[b, h, i0 + r] if r < nr else -np.inf
        lse2[r] = np.float64(lv) * LOG2E if lv > -np.inf else np.inf


# =================================================================================
# visibility: tile classes and per-element masks
# =================================================================================


@njit(cache=_JIT_CACHE, _nrt=False)
def _tile_class(b, h, qb, kb, BK, o):
    """SKIP, PARTIAL or FULL for tile ``(qb, kb)``, every mask included.

    The dense mask and ``mask_mod`` make a tile PARTIAL unless the user's block mask says
    FULL or SKIP.  A last key tile shorter than BK is never FULL (its padding is masked).

    Compiled without reference counting (``_nrt=False``), as the other per-tile helpers
    that read ``o``'s arrays and allocate nothing: with it, every call increfs and decrefs
    the meminfos of the arrays it touches (88 decref sites in ``_block_class``) — atomic
    operations on cache lines both threads share — and a window call's 16,384 tile classes
    took 1.8 ms on one thread instead of 0.33.
    """
    i0, nrows, _ = _rows(b, qb, o)
    j0 = kb * BK
    ncols = min(BK, o.Lk - j0)
    cls = _block_class(b, i0, nrows, j0, ncols, o)
    if cls == SKIP:
        return SKIP
    if ncols < BK or o.has_dense_mask:
        cls = PARTIAL
    if o.bm_on:
        user = o.bm[b % o.bm.shape[0], h % o.bm.shape[1], qb, kb]
        if user == SKIP:
            return SKIP
        if user == PARTIAL:
            cls = PARTIAL
    elif HAS_MASK_MOD:
        cls = PARTIAL
    return cls


@njit(cache=_JIT_CACHE, _nrt=False)
def _row_intervals(lo, hi, b, i0, nr, j0, BK, period, o):
    """``[lo[r], hi[r]]``: the columns of key tile ``j0 … j0+BK−1`` that row ``r`` sees by
    lengths, causal and window, for every ``r < lo.shape[0]``; row ``r`` is query ``i0 + r %
    period`` (``period`` = BQ, or one head's rows of a grouped tile), empty ``[1, 0]`` when
    ``r % period ≥ nr`` (past the tile or ``q_lens``)."""
    kvlen = o.kv_lens[b]
    off = kvlen - o.q_lens[b] + o.shift
    for r in range(lo.shape[0]):
        rr = r % period
        if rr >= nr:
            lo[r] = 1
            hi[r] = 0
            continue
        i = i0 + rr
        p = i + off
        top = min(kvlen, j0 + BK) - 1  # last visible key by lengths, causal, right window
        if o.causal == 1:
            top = min(top, p)
        elif o.causal == 2:
            top = min(top, i + o.top_left_offset)
        if o.right >= 0:
            top = min(top, p + o.right)
        bottom = j0 if o.left < 0 else max(j0, p - o.left)
        lo[r] = bottom - j0
        hi[r] = top - j0


# A PARTIAL tile's keys are trimmed (:func:`_key_extent`) to whole blocks of this many: a
# multiple of the exp passes' SUM_KEYS (32), so that the forward's row sums add the same
# blocks of keys (the blocks cut off are all zeros).
TRIM_KEYS = 32


@njit(cache=_JIT_CACHE, _nrt=False)
def _keys_seen(lo, hi, b, i0, nr, j0, BK, o):
    """``(c0, c1)``: the keys ``j0+c0 … j0+c1−1`` of a key tile that hold every key its query
    rows ``i0 … i0+nr−1`` may see by lengths, causal and window (:func:`_row_intervals`, into
    the scratch ``lo``/``hi``, whose length is the rows' count), rounded out to TRIM_KEYS;
    ``(0, 0)`` when no row sees a key.  Segments, a dense mask and ``mask_mod`` only hide keys
    inside these intervals (:func:`_mask_tile`), so the keys cut off are masked for every row:
    their P is 0 and they add nothing to any product."""
    _row_intervals(lo, hi, b, i0, nr, j0, BK, lo.shape[0], o)
    c_lo, c_hi = BK, -1
    for r in range(lo.shape[0]):
        if lo[r] <= hi[r]:
            c_lo = min(c_lo, lo[r])
            c_hi = max(c_hi, hi[r])
    if c_hi < 0:
        return 0, 0
    return c_lo // TRIM_KEYS * TRIM_KEYS, min(BK, (c_hi // TRIM_KEYS + 1) * TRIM_KEYS)


@njit(cache=_JIT_CACHE, _nrt=False)
def _key_extent(lo, hi, b, i0, nr, j0, BK, o):
    """:func:`_keys_seen` of one query tile's rows (``lo``/``hi`` of BQ), the whole tile
    ``(0, BK)`` when no row sees a key."""
    c0, c1 = _keys_seen(lo, hi, b, i0, nr, j0, BK, o)
    if c1 == 0:
        return 0, BK
    return c0, c1


@njit(cache=_JIT_CACHE, _nrt=False)
def _select_intervals(ST, lo, hi):
    """``ST[c, r] = −inf`` outside ``lo[r] ≤ c ≤ hi[r]`` (a branch-free, vectorized select)."""
    BK, R = ST.shape
    for c in range(BK):
        row = _row(ST, c)  # a C-ordered row view keeps this select a vectorized 1-D loop
        for r in range(R):
            row[r] = row[r] if lo[r] <= c and c <= hi[r] else -np.inf


@njit(cache=_JIT_CACHE, _nrt=False)
def _mask_tile(ST, lo, hi, b, h, i0, nrows, j0, o):
    """``ST[c, r] = −inf`` where query ``i0+r`` does not see key ``j0+c``.

    Lengths, causal and window give each row an interval ``[lo, hi]`` of keys, applied by a
    branch-free (vectorized) select; segments, the dense mask and ``mask_mod`` go element
    by element inside it.  ``lo``/``hi`` are int64 scratch of BQ.
    """
    BK, BQ = ST.shape
    nr = min(nrows, o.q_lens[b] - i0)
    _row_intervals(lo, hi, b, i0, nr, j0, BK, BQ, o)
    _select_intervals(ST, lo, hi)
    if o.has_seg or o.has_dense_mask or HAS_MASK_MOD:
        m, ms = o.mask, o.mstr
        for r in range(nr):
            i = i0 + r
            for c in range(max(lo[r], 0), min(hi[r] + 1, BK)):
                j = j0 + c
                vis = True
                if o.has_seg:
                    vis = o.q_seg[b, i] == o.kv_seg[b, j]
                if o.has_dense_mask and vis:
                    vis = m[b * ms[0] + h * ms[1] + i * ms[2] + j * ms[3]] != 0
                if HAS_MASK_MOD and vis:
                    vis = mask_mod_fn(b, h, i, j)
                if not vis:
                    ST[c, r] = -np.inf


@njit(cache=_JIT_CACHE)
def _score_chain(ST, G, GM, want_grad, b, h, i0, nrows, j0, ncols, o):
    """Raw dot products → base-2 scores ``log2(e) · score_mod(softcap(scale·s) + bias − ALiBi)``.

    With ``want_grad`` the backward's chain-rule factors come out too: ``G`` = softcap's
    ``1 − tanh²`` and ``GM`` = score_mod's derivative (a float64 central difference: a user
    function has no symbolic derivative).
    """
    off = o.kv_lens[b] - o.q_lens[b] + o.shift
    BK, BQ = ST.shape
    slope = o.slopes[b, h] if o.has_alibi else 0.0
    bias, bs = o.bias, o.bstr
    for c in range(BK):
        j = j0 + c
        for r in range(BQ):
            i = i0 + r
            hidden = False  # a −inf bias entry hides its key as a mask does, whatever the score
            s = ST[c, r] * o.scale
            if o.softcap > 0.0:
                t = math.tanh(s / o.softcap)
                s = o.softcap * t
                if want_grad:
                    G[c, r] = 1.0 - t * t
            if o.has_bias and r < nrows and c < ncols:
                bv = bias[b * bs[0] + h * bs[1] + i * bs[2] + j * bs[3]]
                hidden = bv == -np.inf
                s += bv
            if o.has_alibi:
                s -= slope * abs(i + off - j)
            if hidden:
                if want_grad and HAS_SCORE_MOD:
                    GM[c, r] = 0.0
                ST[c, r] = -np.inf
                continue
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
def _scores(ST, Qs, Qv, Kb, cls, b, h, qb, kb, j0, o, lo, hi, G, GM, want_grad, cfg, amx):
    """``ST = K_blk · Q_blkᵀ``, through the score chain (unless simple) and the masks (PARTIAL tiles).

    ``ST``/``Kb`` are key tile ``kb``'s keys ``j0 …`` (``kb·BK``, or later for a tile trimmed
    to its rows' keys: :func:`_key_extent`).  On AMX (``amx``: the forward's ``o.amx``, the
    bfloat16 backward's ``o.bwd_amx``) from the packed query tile ``Qv``; elsewhere ``Qv`` is
    an empty placeholder.
    """
    i0, nrows, _ = _rows(b, qb, o)
    BK = ST.shape[0]
    if not (o.split_s and _split_product(o.kpc, o.qpc, ST, b, h, kb, i0, cfg)):
        _qk(Kb, Qs, Qv, ST, amx, cfg, _short_rows(o.Lq, o.Lk))
    if not _simple(o):
        _score_chain(ST, G, GM, want_grad, b, h, i0, nrows, j0, min(BK, o.Lk - j0), o)
    if cls == PARTIAL:
        _mask_tile(ST, lo, hi, b, h, i0, nrows, j0, o)


def _split_product(a_pieces, b_pieces, C, b, h, kb, i0, cfg):
    """``C = A·Bᵀ`` for key tile ``kb`` and the query tile at row ``i0`` of head ``h`` on AMX as
    split bfloat16 products (``_cpu_amx_f32.product``: ``Sᵀ = K·Qᵀ`` from ``o.kpc``/``o.qpc``,
    ``dPᵀ = V·dOᵀ`` from ``o.vpc``/``o.dopc``); True when done.  float32 tiles only (the other
    dtypes' kernels compile a no-op returning False)."""
    raise NotImplementedError("compiled only")


@overload(_split_product, jit_options={"cache": _JIT_CACHE})
def _split_product_overload(a_pieces, b_pieces, C, b, h, kb, i0, cfg):
    if C.dtype != types.float32:
        return lambda a_pieces, b_pieces, C, b, h, kb, i0, cfg: False

    def impl(a_pieces, b_pieces, C, b, h, kb, i0, cfg):
        hk = h // (b_pieces.shape[1] // a_pieces.shape[1])
        _cpu_amx_f32.product(a_pieces[b, hk, kb], b_pieces[b, h, :, :, i0 : i0 + C.shape[1]], C, cfg)
        return True

    return impl


def _split_product_keys(a_pieces, b_pieces, C, b, h, kb, c0, i0, cfg):
    """:func:`_split_product` of part of a tile: the keys ``c0 … c0 + C.shape[0] − 1`` of key
    tile ``kb`` and the ``C.shape[1]`` queries from row ``i0`` (a strip,
    :func:`_tile_in_strips`).  Each element is the same bits whatever part of the tile is
    computed: the product's order is per element."""
    raise NotImplementedError("compiled only")


@overload(_split_product_keys, jit_options={"cache": _JIT_CACHE})
def _split_product_keys_overload(a_pieces, b_pieces, C, b, h, kb, c0, i0, cfg):
    if C.dtype != types.float32:
        return lambda a_pieces, b_pieces, C, b, h, kb, c0, i0, cfg: False

    def impl(a_pieces, b_pieces, C, b, h, kb, c0, i0, cfg):
        hk = h // (b_pieces.shape[1] // a_pieces.shape[1])
        _cpu_amx_f32.product_from(a_pieces[b, hk, kb], c0, b_pieces[b, h, :, :, i0 : i0 + C.shape[1]], C, cfg)
        return True

    return impl


def _split_pv(ST, vt, pairs, scratch, acc, cfg):
    """``acc += P·V`` on the split route (``o.split_pv``) with P (float32) in ``ST``: P's pieces
    in key pairs into ``pairs (3, BK/2, BQ)``, then ``(Vᵀ·P)ᵀ`` added into ``acc`` from Vᵀ's pieces
    ``vt`` of the key tile (``_cpu_amx_f32.product_add_t``).  float32 only (the other dtypes'
    kernels compile a no-op; the route never reaches them)."""
    raise NotImplementedError("compiled only")


@overload(_split_pv, jit_options={"cache": _JIT_CACHE})
def _split_pv_overload(ST, vt, pairs, scratch, acc, cfg):
    if ST.dtype != types.float32:
        return lambda ST, vt, pairs, scratch, acc, cfg: None

    def impl(ST, vt, pairs, scratch, acc, cfg):
        BK, BQ = ST.shape
        _cpu_amx_f32.split_pairs(ST, pairs, BK, BQ)
        _cpu_amx_f32.product_add_t(vt, pairs, acc, scratch, cfg)

    return impl


# =================================================================================
# the online softmax
# =================================================================================


@njit(cache=_JIT_CACHE)
def _online_softmax(ST, N, c2, m, m_use, bmax, row_sum, acc, Pb, fuse, amx, plan):
    """``P = 2^(S·c2 − m_new)``; ``row_sum``/``acc`` rescaled by ``2^(m_old − m_new)``, then ``row_sum += Σ P``.

    Returns True when P went straight into the bfloat16 operand ``Pb`` (``fuse``: no
    dropout to apply first), False when ``ST`` holds P in the compute dtype.  The float32
    exp pass prefetches ``plan``'s memory (:func:`_plan_next_tiles`).
    """
    # update the running max (rows that have seen no key keep −inf and a 0 shift)
    zero = m.dtype.type(0.0)  # a compute-dtype 0: a float64 one would widen the loops below
    nan = m.dtype.type(np.nan)
    _tile_max(ST, bmax, Pb)  # NaN for a column holding NaN
    # no row has seen a key yet (a query tile's first key tile): the accumulator is all +0 (P
    # was 0 against finite V), which a rescale would leave +0 — skipped, same bits
    fresh = True
    for r in range(m.shape[0]):
        if m[r] > -np.inf:
            fresh = False
        tile_max = bmax[r] * c2
        # a NaN or +inf score makes exp(s − max) NaN (IEEE): the row stays NaN (_write_rows)
        m_new = nan if (m[r] != m[r] or not tile_max < np.inf) else max(m[r], tile_max)
        mu = m_new if m_new > -np.inf else zero
        alpha = math.exp2(m[r] - mu) if m[r] > -np.inf else zero
        m[r] = m_new
        m_use[r] = mu
        # rescale the running sum (and below the accumulator) to the new max
        row_sum[r] *= alpha
        bmax[r] = alpha  # the tile max is spent: bmax holds the rescale factors now
    if not fresh:
        _rescale_rows(acc, bmax)
    # exponentiate against the new max and sum (one pass); the sum is before dropout.
    # bfloat16 without dropout: that pass also rounds P into the GEMM operand ``Pb``.
    # The tile's sum starts from 0 (in ``bmax``, spent again) and joins ``row_sum`` once:
    # added key by key into a running sum that already holds the row's largest P (≈ 1),
    # each P ≈ 1e-3 rounds at ulp(1)/2 and 567 of them left the sum 3.7e-6 low — every
    # output of the row 3× the naive softmax's error (Lq 196, Lk 567, D 31; CI, 1 Dec).
    for r in range(m.shape[0]):
        bmax[r] = zero
    in_pb = _exp2_sum_operand(ST, c2, m_use, bmax, Pb, fuse, amx, plan)
    if not in_pb:
        _exp2_shifted_sum(ST, N, c2, m_use, bmax, plan)
    for r in range(m.shape[0]):
        row_sum[r] += bmax[r]
    return in_pb


@njit(cache=_JIT_CACHE, _nrt=False)
def _write_rows(out, lse, acc, m, row_sum, b, h, i0, nrows, nr):
    """``out = acc / row_sum`` and natural-log ``lse = (m + log2 row_sum)·ln 2``; rows
    without a visible key (or past q_lens) give 0 and lse = −inf, rows whose max is NaN
    (a NaN or +inf score) NaN."""
    for r in range(nrows):
        if r < nr and m[r] != m[r]:
            out[b, h, i0 + r, :] = np.nan
            lse[b, h, i0 + r] = np.nan
        elif r < nr and row_sum[r] > 0.0:
            inv = 1.0 / row_sum[r]
            for d in range(out.shape[3]):
                out[b, h, i0 + r, d] = acc[r, d] * inv
            lse[b, h, i0 + r] = _lse_natural(m[r], row_sum[r])
        else:
            out[b, h, i0 + r, :] = 0.0
            lse[b, h, i0 + r] = -np.inf


@njit(cache=_JIT_CACHE, _nrt=False)
def _write_rows_t(out, lse, accT, m, row_sum, scale, b, h, i0, nrows, nr, vec):
    """:func:`_write_rows` from a transposed accumulator ``accT (Dv, BQ)`` (the bfloat16
    forward's): the row factors first, then 16-row strips read along ``accT``'s rows — the
    element-wise form read ``accT`` with a 1 KiB stride (32 µs a 256-row tile against 2).
    ``vec`` (the AMX path: the CPU has avx512_bf16): whole strips into bfloat16 ``out`` by
    :func:`_strip_bf16`'s vector transpose."""
    for r in range(nrows):
        if r < nr and m[r] != m[r]:
            scale[r] = np.nan
            lse[b, h, i0 + r] = np.nan
        elif r < nr and row_sum[r] > 0.0:
            scale[r] = 1.0 / row_sum[r]
            lse[b, h, i0 + r] = _lse_natural(m[r], row_sum[r])
        else:
            scale[r] = 0.0
            lse[b, h, i0 + r] = -np.inf
    Dv = accT.shape[0]
    for r0 in range(0, nrows, 16):
        r1 = min(r0 + 16, nrows)
        if vec and r1 - r0 == 16 and _strip_bf16(out, accT, scale, b, h, i0 + r0, r0):
            continue
        for d in range(Dv):
            arow = _row(accT, d)
            for r in range(r0, r1):
                # NaN/0 rows: NaN·acc = NaN; 0·acc would keep a NaN or inf of acc, so select
                out[b, h, i0 + r, d] = _out_value(arow[r] * scale[r] if scale[r] != 0.0 else np.float32(0.0), out)


def _strip_bf16(out, accT, scale, b, h, i, r0):
    """Rows ``i … i+15`` of bfloat16 ``out`` (uint16 bits) from ``accT[:, r0:r0+16]`` scaled by
    ``scale[r0:r0+16]``, by ``_cpu_amx.rows_bf16`` (a vector transpose: 65 → ≈ 5 µs a
    256-row tile at D 128): True when done, False where it does not apply (float32 ``out``,
    ``Dv`` no multiple of 16, rows not contiguous), which the element-wise loop then takes."""
    raise NotImplementedError("compiled only")


@overload(_strip_bf16, jit_options={"cache": _JIT_CACHE}, inline="always")
def _strip_bf16_overload(out, accT, scale, b, h, i, r0):
    if out.dtype != types.uint16:
        return lambda out, accT, scale, b, h, i, r0: False

    def impl(out, accT, scale, b, h, i, r0):
        Dv = accT.shape[0]
        if Dv % 16 != 0 or out.strides[3] != 2 or accT.strides[1] != 4:
            return False
        o_addr = out.ctypes.data + b * out.strides[0] + h * out.strides[1] + i * out.strides[2]
        rows_bf16(accT.ctypes.data + 4 * r0, accT.strides[0], scale.ctypes.data + 4 * r0, o_addr, out.strides[2], Dv)
        return True

    return impl


def _out_value(x, out):
    """``x`` as ``out`` stores it: rounded to bfloat16 bits (``_to_bf16``, to nearest even) when
    ``out`` holds them (uint16), else as it is."""
    raise NotImplementedError("compiled only")


@overload(_out_value, jit_options={"cache": _JIT_CACHE}, inline="always")
def _out_value_overload(x, out):
    if out.dtype == types.uint16:
        return lambda x, out: _to_bf16(np.float32(x))
    return lambda x, out: x


def _store_rows(out, lse, acc, m, row_sum, scale, b, h, i0, nrows, nr, vec):
    """The forward's normalize step: :func:`_write_rows`, or :func:`_write_rows_t` for a
    transposed (F-ordered) accumulator (``vec``: its vector strips allowed)."""
    raise NotImplementedError("compiled only")


@overload(_store_rows, jit_options={"cache": _JIT_CACHE})
def _store_rows_overload(out, lse, acc, m, row_sum, scale, b, h, i0, nrows, nr, vec):
    if _transposed_acc(acc):
        return lambda out, lse, acc, m, row_sum, scale, b, h, i0, nrows, nr, vec: _write_rows_t(
            out, lse, acc.T, m, row_sum, scale, b, h, i0, nrows, nr, vec
        )
    return lambda out, lse, acc, m, row_sum, scale, b, h, i0, nrows, nr, vec: _write_rows(
        out, lse, acc, m, row_sum, b, h, i0, nrows, nr
    )


def _zero(acc):
    """``acc[:] = 0`` along the memory order (an F-ordered slice fill ran elementwise: 74 µs a 256 × 64 tile)."""
    raise NotImplementedError("compiled only")


@overload(_zero, jit_options={"cache": _JIT_CACHE})
def _zero_overload(acc):
    if _transposed_acc(acc):

        def impl_t(acc):
            acc.T[:] = 0.0

        return impl_t

    def impl(acc):
        acc[:] = 0.0

    return impl


def _forward_task(t, B, Hq, nqb, q):
    """``(b, h, qb)`` of forward task ``t``: the last query tiles first (under a causal mask
    they see the most keys), heads fastest — for bfloat16 operands (AMX) head by head
    instead, so that consecutive tasks reuse one head's K/V from L2."""
    raise NotImplementedError("compiled only")


@overload(_forward_task, jit_options={"cache": _JIT_CACHE})
def _forward_task_overload(t, B, Hq, nqb, q):
    if q.dtype == types.uint16:

        def by_head(t, B, Hq, nqb, q):
            bh = t // nqb
            return bh // Hq, bh % Hq, nqb - 1 - t % nqb

        return by_head
    return lambda t, B, Hq, nqb, q: ((t % (B * Hq)) // Hq, t % Hq, nqb - 1 - t // (B * Hq))


# =================================================================================
# forward
# =================================================================================


@njit(cache=_JIT_CACHE, parallel=True, nogil=True)
def forward(q, kp, vp, out, lse, o, nchunks):
    """``out (B, Hq, Lq, Dv)`` and natural-log ``lse (B, Hq, Lq)``.

    ``nchunks`` threads take tasks ``(b, h, query tile)`` from one queue as they finish, the
    last query tiles first (under a causal mask they see the most keys); each output row is
    written by exactly one task, whichever thread runs it.
    """
    queue = np.zeros(1, dtype=np.int64)
    for chunk in prange(nchunks):
        _forward_chunk(queue, q, kp, vp, out, lse, o)


@njit(cache=_JIT_CACHE, nogil=True)  # (user kernels run it on the _launch pool: cpu._run_tasks)
def _forward_chunk(queue, q, kp, vp, out, lse, o):
    B, Hq, Lq, D = q.shape
    Hkv, nkb, BK = kp.shape[1], kp.shape[2], kp.shape[3]
    # T, the compute dtype, is lse's: ``out`` may hold bfloat16 bits (uint16: the caller's
    # final output, rounded as the rows are written)
    Dv, BQ, T = vp.shape[4], o.BQ, lse.dtype
    nqb = (Lq + BQ - 1) // BQ
    c2, inv_keep = _constants(o, lse)
    # GEMM operands in the storage dtype (bf16 bits or T), 64-byte aligned (_aligned_empty);
    # for bfloat16 the tile buffers' rows padded by a cache line (_tile_buffer: _cpu_amx.ROW_PAD)
    Qs = _aligned_empty(BQ, D, q)
    Qs[:] = 0
    Qv = _tile_buffer(D // 2 if o.amx else 0, BQ, np.empty(0, dtype=np.uint32), q)  # Qs packed for AMX
    cfg = tile_config()
    ST = _tile_buffer(BK, BQ, lse, q)
    Pb = _tile_buffer(BK, BQ, q, q)  # P rounded to bf16 for P·V (bf16 path only; key pairs on AMX)
    N = np.empty((BK, BQ), dtype=np.int32)  # _exp2_shifted's exponent scratch
    unused = np.empty((BK, BQ), dtype=T)  # (dP and the chain-rule factors: backward only)
    acc = _new_acc(BQ, Dv, lse, q)  # bf16: transposed in memory (accᵀ += Vᵀ·P)
    m, m_use = np.empty(BQ, dtype=T), np.empty(BQ, dtype=T)  # running max; the shift applied
    bmax, row_sum = np.empty(BQ, dtype=T), np.empty(BQ, dtype=T)  # the tile's max; running sum
    tsum = np.empty(BQ, dtype=T)  # the tile's row sums (lazy step)
    lo, hi = np.empty(BQ, dtype=np.int64), np.empty(BQ, dtype=np.int64)
    plan = np.zeros(4, dtype=np.int64)  # what the lazy pass prefetches (_plan_next_tiles)
    prefetch = _prefetch_kv(kp, vp)
    # the split route's P·V (o.split_pv): P's pieces in key pairs; a scratch for the adds
    pv_pairs = _cpu_amx_f32.pieces_buffer(BK // 2 if o.split_pv else 0, BQ, np.empty(0, dtype=np.uint32))
    pv_scratch = _aligned_empty(64, 32, lse)  # two 32 × 32 blocks
    # PARTIAL tiles trimmed to their rows' keys (_key_extent) where MKL (or NumPy) runs the
    # products; AMX's (bfloat16 on o.amx, float32's split pieces) keep whole tiles
    trim = not (o.amx or o.split_s)
    # ... on the split route, PARTIAL tiles whose rows' keys differ enough go in query strips
    # of o.strip_rows rows (0: never; never with AMX's bfloat16 operands or dropout)
    strips = o.strip_rows > 0 and not o.amx and o.dropout_p == 0.0
    threads = _gemm_threads_begin(q)
    while True:
        t = _take_task(queue)
        if t >= B * Hq * nqb:
            break
        b, h, qb = _forward_task(t, B, Hq, nqb, q)
        hk = h // (Hq // Hkv)
        i0, nrows, nr = _rows(b, qb, o)
        if nr <= 0:
            out[b, h, i0 : i0 + nrows] = 0.0
            lse[b, h, i0 : i0 + nrows] = -np.inf
            continue
        if o.split_in_task:  # this task alone reads its query tile's Qᵀ pieces
            _split_query_tile(q, b, h, i0, BQ, o)
        # -- load the query tile (on AMX packed straight into Qv); running max −inf, running
        #    sum and accumulator 0
        _load_q(Qs, Qv, q, b, h, i0, nr, o.amx)
        m[:] = -np.inf
        row_sum[:] = 0.0
        # on AMX the first P·V starts the accumulator from tile zeros (no zeroing pass)
        fresh = _fresh_acc(acc, o.amx)
        if not fresh:
            _zero(acc)
        for kb in range(nkb):
            cls = _tile_class(b, h, qb, kb, BK, o)
            if cls == SKIP:
                continue
            # -- a PARTIAL tile whose rows see very different keys (a causal diagonal) on the
            #    split route: in query strips, each with its own keys (_tile_in_strips)
            j0 = kb * BK
            if cls == PARTIAL and strips and _strips_pay(lo, hi, b, i0, nr, j0, BK, o):
                _tile_in_strips(ST, N, unused, Pb, Qs, Qv, acc, m, m_use, bmax, tsum, row_sum, lo, hi, kp, vp,
                                b, h, hk, qb, kb, c2, o, cfg, plan, prefetch, pv_pairs, pv_scratch)
                fresh = False
                continue
            # -- a PARTIAL tile on MKL's products: only the keys c0 … c1−1 its rows may see
            c0, c1 = 0, BK
            if trim and cls == PARTIAL:
                c0, c1 = _key_extent(lo, hi, b, i0, nr, j0, BK, o)
            STt, Pbt, Nt, Ut = ST[c0:c1], Pb[c0:c1], N[c0:c1], unused[c0:c1]
            Kt, Vt = kp[b, hk, kb][c0:c1], vp[b, hk, kb][c0:c1]
            # -- scores of the tile, masked
            _scores(STt, Qs, Qv, Kt, cls, b, h, qb, kb, j0 + c0, o, lo, hi, Ut, Ut, False, cfg, o.amx)
            # -- P = 2^(S − m): against the running shift in one pass when the tile's max
            #    stays within 2^LAZY_LOG2 of it (float32 compute; bfloat16 P straight into
            #    the operand), else online: rescale acc and row_sum to the new max (the
            #    scores recomputed if the lazy pass spoiled them: float32 only)
            lazy = _lazy_ok(m, Pbt, o.dropout_p == 0.0)
            in_pb = False
            if prefetch:
                _plan_next(plan, kp, vp, b, hk, kb, o)
            if lazy and _lazy_softmax(STt, c2, m, bmax, tsum, row_sum, Pbt, o.amx, plan):
                in_pb = not _lazy_spoils_scores(Pbt)  # bfloat16: P went into the operand
            else:
                if lazy and _lazy_spoils_scores(Pbt):
                    _scores(STt, Qs, Qv, Kt, cls, b, h, qb, kb, j0 + c0, o, lo, hi, Ut, Ut, False, cfg, o.amx)
                in_pb = _online_softmax(STt, Nt, c2, m, m_use, bmax, row_sum, acc, Pbt, o.dropout_p == 0.0, o.amx, plan)
            # -- dropout (after the sum: the normalizer is the pre-dropout one)
            if o.dropout_p > 0.0:
                _dropout_block(STt, STt, Ut, inv_keep, b, h, i0, nr, j0 + c0, o)
            # -- acc += P · V (the split route: whole tiles, P in ST)
            if o.split_pv and not in_pb:
                _split_pv(STt, o.vtp[b, hk, kb], pv_pairs, pv_scratch, acc, cfg)
            else:
                _pv(Pbt if in_pb else _pv_operand(STt, Pbt, o.amx), Vt, acc, o.amx, cfg, fresh)
            fresh = False
        if fresh:  # no key tile ran
            _zero(acc)
        # -- normalize
        _store_rows(out, lse, acc, m, row_sum, tsum, b, h, i0, nrows, nr, o.amx)
    _gemm_threads_end(q, threads)


# A PARTIAL tile goes in query strips only when the strips' keys × rows come to at most
# STRIP_WORK of the tile's own trimmed extent × the same rows: a causal diagonal tile in strips
# of 64 rows computes 640 × 64 of its 256 × 256 scores (0.625); tiles whose rows all see the
# same keys (a ragged last key tile, key lengths) stay whole, with the same bits as before.
STRIP_WORK = 0.75


@njit(cache=_JIT_CACHE, _nrt=False)
def _strips_pay(lo, hi, b, i0, nr, j0, BK, o):
    """Whether a PARTIAL forward tile (query rows ``i0 … i0+nr−1``, keys from ``j0``) is
    worth computing in strips of ``o.strip_rows`` query rows (:data:`STRIP_WORK`)."""
    BQ, RS = lo.shape[0], o.strip_rows
    c0, c1 = _keys_seen(lo, hi, b, i0, nr, j0, BK, o)
    # the strips' keys × rows against the whole tile's over the same rows (not BQ: a short last
    # query tile whose rows all see the same keys stays whole)
    work, rows = 0, 0
    for r0 in range(0, nr, RS):
        rs = min(RS, BQ - r0)
        s0, s1 = _keys_seen(lo[:rs], hi[:rs], b, i0 + r0, min(rs, nr - r0), j0, BK, o)
        work += (s1 - s0) * rs
        rows += rs
    return work <= STRIP_WORK * (c1 - c0) * rows


def _strip(buf, rows, cols):
    """The first ``rows × cols`` elements of a C-ordered tile buffer as a C-ordered ``(rows,
    cols)`` array (a strip's scores, exponents, P): its rows packed, so the tile passes and
    products take it as they take a whole tile."""
    raise NotImplementedError("compiled only")


@overload(_strip, jit_options={"cache": _JIT_CACHE})
def _strip_overload(buf, rows, cols):
    if buf.layout != "C":  # the padded bfloat16 buffers (never in strips: o.amx)
        return lambda buf, rows, cols: buf[:rows, :cols]
    return lambda buf, rows, cols: buf.reshape(buf.size)[: rows * cols].reshape((rows, cols))


@njit(cache=_JIT_CACHE)
def _strip_scores(STs, Qs, Qv, U, b, h, hk, kb, kp, j0, c0, i0, nrows, lo, hi, o, cfg):
    """A strip's scores ``STs`` (keys ``j0+c0 …`` × queries ``i0 …``), through the score chain
    (unless simple) and masked: on the split route from the pieces, else by MKL from the
    strip's rows of the query tile ``Qs``."""
    nk = STs.shape[0]
    if not (o.split_s and _split_product_keys(o.kpc, o.qpc, STs, b, h, kb, c0, i0, cfg)):
        _qk(kp[b, hk, kb][c0 : c0 + nk], Qs, Qv, STs, False, cfg, _short_rows(o.Lq, o.Lk))
    if not _simple(o):
        _score_chain(STs, U, U, False, b, h, i0, nrows, j0 + c0, min(nk, o.Lk - j0 - c0), o)
    _mask_tile(STs, lo, hi, b, h, i0, nrows, j0 + c0, o)


@njit(cache=_JIT_CACHE)
def _tile_in_strips(ST, N, U, Pb, Qs, Qv, acc, m, m_use, bmax, tsum, row_sum, lo, hi, kp, vp,
                    b, h, hk, qb, kb, c2, o, cfg, plan, prefetch, pv_pairs, pv_scratch):
    """One PARTIAL forward tile as strips of ``o.strip_rows`` query rows, each strip's scores,
    softmax step and ``acc += P·V`` over only the keys its rows may see (:func:`_keys_seen`):
    a causal diagonal tile's upper triangle is mostly never computed.  Per row the same steps
    as the whole tile's (the running max, sum and accumulator are per row; the lazy step's
    check is per strip); a strip whose rows see no key of the tile is skipped (its P is 0)."""
    i0, nrows, nr = _rows(b, qb, o)
    BK, BQ = ST.shape
    j0 = kb * BK
    RS = o.strip_rows
    for r0 in range(0, nr, RS):
        r1 = min(r0 + RS, BQ)
        rs = r1 - r0
        lo_s, hi_s = lo[:rs], hi[:rs]
        c0, c1 = _keys_seen(lo_s, hi_s, b, i0 + r0, min(rs, nr - r0), j0, BK, o)
        if c1 <= c0:
            continue
        nk = c1 - c0
        STs, Ns, Us, Pbs = _strip(ST, nk, rs), _strip(N, nk, rs), _strip(U, nk, rs), _strip(Pb, nk, rs)
        ms, mus, bms, ts, sums, accs = m[r0:r1], m_use[r0:r1], bmax[r0:r1], tsum[r0:r1], row_sum[r0:r1], acc[r0:r1]
        Vs = vp[b, hk, kb][c0:c1]
        nrows_s = min(rs, nrows - r0)
        # -- the strip's scores, masked
        _strip_scores(STs, Qs[r0:r1], Qv, Us, b, h, hk, kb, kp, j0, c0, i0 + r0, nrows_s, lo_s, hi_s, o, cfg)
        # -- P = 2^(S − m): the lazy step against the strip's running shifts, else online
        lazy = _lazy_ok(ms, Pbs, True)
        in_pb = False
        if prefetch:
            _plan_next(plan, kp, vp, b, hk, kb, o)
        if lazy and _lazy_softmax(STs, c2, ms, bms, ts, sums, Pbs, False, plan):
            in_pb = not _lazy_spoils_scores(Pbs)
        else:
            if lazy and _lazy_spoils_scores(Pbs):
                _strip_scores(STs, Qs[r0:r1], Qv, Us, b, h, hk, kb, kp, j0, c0, i0 + r0, nrows_s, lo_s, hi_s, o, cfg)
            in_pb = _online_softmax(STs, Ns, c2, ms, mus, bms, sums, accs, Pbs, True, False, plan)
        # -- acc += P · V over the strip's keys (on split products from key c0, 32-steps as
        #    the whole tile's: the keys left out add exact zeros there — the same bits)
        if o.split_pv and not in_pb:
            _split_pv(STs, o.vtp[b, hk, kb][:, :, c0:c1], pv_pairs[:, : nk // 2, :rs], pv_scratch, accs, cfg)
        else:
            _pv(Pbs if in_pb else _pv_operand(STs, Pbs, False), Vs, accs, False, cfg, False)


@njit(cache=_JIT_CACHE, nogil=True)
def forward_grouped(queue, q2, kp2, vp2, out2, lse, o, chunk, nchunks):
    """:func:`forward` for GQA/MQA calls whose masks are intervals per query row (lengths,
    causal, window) and whose scores need no chain (no softcap, bias, ALiBi, ``score_mod``,
    dropout): a task ``(b, K/V head, query tile)`` stacks that tile's rows of all ``G = Hq /
    Hkv`` query heads of the group (``G · BQ`` rows), so each K/V tile is multiplied once for
    the group, in GEMMs ``G``× taller (MKL runs a 384-row tile at ≈ 1.25× the rate of a
    128-row one), and the tile's mask is the same for every head.  ``cpu.forward`` sends
    only such calls here (:func:`dotattn.kernels.cpu._grouped_f32`).

    One worker's part: the caller runs it on Python threads (``_launch.run_chunks``; ``chunk``
    and ``nchunks`` are that interface's and unused), each taking tasks from the shared
    ``queue`` until none is left — no Numba ``prange`` team, whose threads spin after a launch
    on the cores the model's next matrix product needs, and whose launch waits for every
    thread of the team on a busy machine (the caller here takes every task a descheduled
    worker has not).

    ``q2``, ``kp2``, ``vp2``, ``out2``: the arrays behind a stride-0 axis of length 2
    (``cpu._any_layout``; read at ``[0]``), typed layout "A" whatever their strides: one
    compiled specialization reads the caller's strided views in place and writes the output
    in the caller's layout.
    """
    _forward_grouped_chunk(queue, q2[0], kp2[0], vp2[0], out2[0], lse, o)


@njit(cache=_JIT_CACHE)
def _forward_grouped_chunk(queue, q, kp, vp, out, lse, o):
    B, Hq, Lq, D = q.shape
    Hkv, nkb, BK = kp.shape[1], kp.shape[2], kp.shape[3]
    Dv, BQ, T = vp.shape[4], o.BQ, out.dtype
    G = Hq // Hkv
    R = G * BQ  # rows of a task: query head h0 + g holds rows g·BQ … (g+1)·BQ − 1
    nqb = (Lq + BQ - 1) // BQ
    c2, _ = _constants(o, out)
    wide = _short_rows(o.Lq, o.Lk)  # short problems: float64 score products (_dots)
    Qs = _aligned_empty(R, D, q)  # 64-byte aligned, as the per-head forward's
    Qs[:] = 0
    ST = _aligned_empty(BK, R, out)
    N = np.empty((BK, R), dtype=np.int32)
    acc = _aligned_empty(R, Dv, out)
    m, m_use = np.empty(R, dtype=T), np.empty(R, dtype=T)
    bmax, row_sum, tsum = np.empty(R, dtype=T), np.empty(R, dtype=T), np.empty(R, dtype=T)
    lo, hi = np.empty(R, dtype=np.int64), np.empty(R, dtype=np.int64)
    no_plan = np.zeros(4, dtype=np.int64)  # (tiles read in place may be strided: no prefetch)
    threads = _gemm_threads_begin(q)
    while True:
        t = _take_task(queue)
        if t >= B * Hkv * nqb:
            break
        # the last query tiles first (under a causal mask they see the most keys)
        b, hk, qb = (t % (B * Hkv)) // Hkv, t % Hkv, nqb - 1 - t // (B * Hkv)
        h0 = hk * G
        i0, nrows, nr = _rows(b, qb, o)
        if nr <= 0:
            out[b, h0 : h0 + G, i0 : i0 + nrows] = 0.0
            lse[b, h0 : h0 + G, i0 : i0 + nrows] = -np.inf
            continue
        for g in range(G):
            _load_rows(Qs[g * BQ : (g + 1) * BQ], q, b, h0 + g, i0, nr)
        m[:] = -np.inf
        row_sum[:] = 0.0
        acc[:] = 0.0
        for kb in range(nkb):
            # lengths, causal and window do not depend on the head: one class for the group
            cls = _tile_class(b, h0, qb, kb, BK, o)
            if cls == SKIP:
                continue
            # a PARTIAL tile: only the keys c0 … c1−1 its rows may see (_key_extent)
            j0 = kb * BK
            c0, c1 = 0, BK
            if cls == PARTIAL:
                c0, c1 = _key_extent(lo[:BQ], hi[:BQ], b, i0, nr, j0, BK, o)
            STt, Nt = ST[c0:c1], N[c0:c1]
            Kb = kp[b, hk, kb][c0:c1]
            _dots(Kb, Qs, STt, wide)
            if cls == PARTIAL:
                _row_intervals(lo, hi, b, i0, nr, j0 + c0, c1 - c0, BQ, o)
                _select_intervals(STt, lo, hi)
            # the forward's softmax step: lazy against the running shift, else online
            lazy = _lazy_ok(m, STt, True)
            if not (lazy and _lazy_softmax(STt, c2, m, bmax, tsum, row_sum, STt, False, no_plan)):
                if lazy:  # the lazy pass spoiled the scores: recompute them
                    _dots(Kb, Qs, STt, wide)
                    if cls == PARTIAL:
                        _select_intervals(STt, lo, hi)
                _online_softmax(STt, Nt, c2, m, m_use, bmax, row_sum, acc, STt, False, False, no_plan)
            _pv(STt, vp[b, hk, kb][c0:c1], acc, False, 0, False)  # (as forward's: the same bits)
        for g in range(G):
            rows = slice(g * BQ, (g + 1) * BQ)
            _write_rows(out, lse, acc[rows], m[rows], row_sum[rows], b, h0 + g, i0, nrows, nr)
    _gemm_threads_end(q, threads)


# =================================================================================
# backward
# =================================================================================


@njit(cache=_JIT_CACHE, parallel=True, nogil=True)
def backward(q, kp, vp, dout, lse, delta, dq_parts, dkp, dvp, dbias, want_dbias, o, nchunks):
    """FlashAttention-2 backward: tasks ``(b, kv head, key tile)`` own their dK/dV tile.

    For each query head of the group and each visible query tile, scores are recomputed
    and ``P = 2^(S₂ − lse₂)``; then ``dV += P̃ᵀ·dO`` (P̃ = P after dropout), ``dP = dO·Vᵀ``
    (times the same dropout mask), ``dS = P∘(dP − Δ)``, ``dK += dSᵀ·Q``, ``dQ += dS·K``.
    dQ rows are shared between key tiles, so they are summed in ``nchunks`` parts
    ``dq_parts[c]`` that the caller adds in a fixed order.  Key tiles are dealt to parts by a
    fixed rule (back and forth over the flat task index: :func:`_snake_chunk`), and a *part*
    ``(b, kv head, c)`` — that head's tiles of rule ``c``, in increasing key order, adding into
    ``dq_parts[c, b, heads of the group]`` — is the unit the threads take from one queue, as
    in the forward: any thread may run any part, but every dQ part is summed in the same order
    whichever thread ran it (bitwise repeatable), and a thread the OS runs slower simply runs
    fewer parts (with a fixed deal of tiles to threads the fast thread waited for the slow
    one: 538 against 458 ms of the same work, docs/performance.md).
    dK is scaled by ``scale`` here, dQ by the caller.
    """
    queue = np.zeros(1, dtype=np.int64)
    for chunk in prange(nchunks):
        _backward_chunk(queue, nchunks, q, kp, vp, dout, lse, delta, dq_parts, dkp, dvp, dbias, want_dbias, o)


@njit(cache=_JIT_CACHE, nogil=True)  # (user kernels run it on the _launch pool: cpu._run_tasks)
def _backward_chunk(queue, nchunks, q, kp, vp, dout, lse, delta, dq_parts, dkp, dvp, dbias, want_dbias, o):
    """The parts ``(b, kv head, c)`` this thread takes from ``queue`` (see :func:`backward`;
    a caller running it alone passes a fresh queue and ``nchunks`` 1, or any ``nchunks``: the
    same bits as the team's)."""
    B, Hq, Lq, D = q.shape
    Hkv, nkb, BK = kp.shape[1], kp.shape[2], kp.shape[3]
    Dv, BQ, T = vp.shape[4], o.BQ, dkp.dtype
    nqb = (Lq + BQ - 1) // BQ
    group = Hq // Hkv
    need_g = o.softcap > 0.0 or HAS_SCORE_MOD
    fuse = o.dropout_p == 0.0 and not need_g and not want_dbias  # P̃ and dS straight to bf16 operands
    c2, inv_keep = _constants(o, dkp)
    wide = _short_rows(o.Lq, o.Lk)  # (see _dots)
    Qs = np.zeros((BQ, D), dtype=q.dtype)  # GEMM operands in the storage dtype (bf16 bits or T)
    dOs = np.zeros((BQ, Dv), dtype=dout.dtype)
    Pb = _aligned_empty(BK, BQ, q)  # P̃ and dS rounded to bf16 (bf16 path only; AMX's A operand)
    # Short problems whose keys fit one tile (float operands): P from the tile's own softmax
    # (_softmax_rows), not from the float32 LSE, whose absolute rounding became P's relative
    # error (dV 1.6× the 3×-naive limit at L 11 D 128, scale 1; docs/performance.md)
    # (a block call of a larger problem sees part of each row's keys: its P needs the LSE)
    whole_rows = o.dropout_geom[2] == 0 and o.dropout_geom[5] == o.Lk
    exact_rows = _short_rows(o.Lq, o.Lk) and nkb == 1 and whole_rows and not _bf16_operand(Pb)
    one = c2 * np.float32(0.0) + np.float32(1.0)
    bmax, m_use, row_sum, zeros = np.empty(BQ, dtype=T), np.empty(BQ, dtype=T), np.empty(BQ, dtype=T), np.zeros(BQ, dtype=T)
    no_plan = np.zeros(4, dtype=np.int64)
    ST, dPT, PdT = np.empty((BK, BQ), dtype=T), np.empty((BK, BQ), dtype=T), np.empty((BK, BQ), dtype=T)
    G, GM = np.empty((BK, BQ), dtype=T), np.empty((BK, BQ), dtype=T)  # chain-rule factors
    N = np.empty((BK, BQ), dtype=np.int32)
    dK, dV = _aligned_empty(BK, D, dkp), _aligned_empty(BK, Dv, dkp)  # (AMX: tile loads/stores)
    lse2, dls = np.empty(BQ, dtype=T), np.empty(BQ, dtype=T)
    lo, hi = np.empty(BQ, dtype=np.int64), np.empty(BQ, dtype=np.int64)
    # bfloat16 on AMX (o.bwd_amx): Sᵀ and dPᵀ by _cpu_amx.scores from o.qv/o.dov (a placeholder
    # view of their type otherwise); ST and dPT then at cache-line boundaries (tile stores)
    bamx = o.bwd_amx
    no_qv, cfg = o.qv[0, 0, 0, :0, :0], tile_config()
    # split-AMX route with all five products (o.split_all): P's, then dS's, pieces in rows (the
    # A operands of dV and dK) and dS's in pairs of keys (dQᵀ's B); a scratch for the adds
    sa = o.split_all
    pc_rows, pc_cols = (BK, BQ) if sa else (0, 32)
    pc = _cpu_amx_f32.pieces_buffer(pc_rows, pc_cols, np.empty(0, dtype=np.uint16))
    d_pairs = _cpu_amx_f32.pieces_buffer(pc_rows // 2, pc_cols, np.empty(0, dtype=np.uint32))
    scratch = _aligned_empty(64, 32, dkp)  # two 32 × 32 blocks
    KbT = np.empty((D if sa else 0, BK if sa else 0), dtype=T)  # (the task's Kᵀ for its pieces)
    if o.split_s or bamx:  # the tile products write ST/dPT by tile stores: at cache-line boundaries
        ST, dPT = _aligned_empty(BK, BQ, dkp), _aligned_empty(BK, BQ, dkp)
    # ... and dQᵀ += Kᵀ·dS into dq_parts transposed by query tiles ((…, nqb·D, BQ + 16), summed
    # by dq_from_tiles): the task's Kᵀ (D, BK) and dS in key pairs (BK/2, BQ), rows a cache
    # line past their 2·BK / 4·BQ bytes (_cpu_amx.ROW_PAD)
    KT = _aligned_empty(D if bamx else 0, BK + 32 if bamx else 0, q)
    Dp = _aligned_empty(BK // 2 if bamx else 0, BQ + 16 if bamx else 0, np.empty(0, dtype=np.uint32))
    # PARTIAL tiles trimmed to their rows' keys (_key_extent) where MKL (or NumPy) runs the
    # products, and on the split route with all five products (sa: every product takes a key
    # offset in whole 32-key steps, _key_extent's TRIM_KEYS); the other AMX routes' products
    # (bfloat16 on o.bwd_amx, float32's two split products) keep whole tiles: their operands
    # are packed per key tile, in AMX steps of 16/32 keys
    trim = not (bamx or o.split_s or o.split_dp) or sa
    threads = _gemm_threads_begin(q)
    while True:
        part = _take_task(queue)
        if part >= B * Hkv * nchunks:
            break
        chunk, bh = part % nchunks, part // nchunks
        for t in range(bh * nkb, (bh + 1) * nkb):  # this head's key tiles, in increasing order
            if _snake_chunk(t, nchunks) != chunk:
                continue
            b, hk, kb = t // (Hkv * nkb), (t // nkb) % Hkv, t % nkb
            j0 = kb * BK
            Kb, Vb = kp[b, hk, kb], vp[b, hk, kb]
            if o.split_in_task:  # this task alone reads its key tile's pieces
                _split_key_tile(Kb, Vb, KbT, b, hk, kb, o)
            if bamx:
                _key_tile_t(Kb, KT)
            dK[:] = 0.0
            dV[:] = 0.0
            for h in range(hk * group, (hk + 1) * group):
                for qb in range(nqb):
                    cls = _tile_class(b, h, qb, kb, BK, o)
                    if cls == SKIP:
                        continue
                    # -- load Q, dO, the LSE (base 2) and Δ = rowsum(dO ∘ O) of the query tile
                    i0, nrows, nr = _rows(b, qb, o)
                    if nr == BQ:  # whole tiles: the products read q and dO where they lie
                        Qt, dOt = q[b, h, i0 : i0 + BQ], dout[b, h, i0 : i0 + BQ]
                    else:  # the last tile: zero rows below (padding must not carry NaN)
                        _load_rows(Qs, q, b, h, i0, nr)
                        _load_rows(dOs, dout, b, h, i0, nr)
                        Qt, dOt = Qs[:, :], dOs[:, :]
                    _lse_rows(lse2, lse, b, h, i0, nr)
                    for r in range(BQ):
                        dls[r] = delta[b, h, i0 + r] if r < nr else 0.0
                    # -- recompute P = 2^(S − lse) (and the chain-rule factors G, GM); bfloat16
                    #    without dropout or chain rule: straight into the operand Pb, rounded
                    Qv, dOv = no_qv, no_qv
                    if bamx:  # the AMX B operands: this query tile's columns of q's and dO's pairs
                        Qv, dOv = o.qv[b, h, 0, :, i0 : i0 + BQ], o.dov[b, h, 0, :, i0 : i0 + BQ]
                    # -- a PARTIAL tile on MKL's products: only the keys c0 … c1−1 that one of
                    #    its rows may see (the others' P is 0: they add nothing to any product)
                    c0, c1 = 0, BK
                    if trim and cls == PARTIAL:
                        c0, c1 = _key_extent(lo, hi, b, i0, nr, j0, BK, o)
                    STt, dPTt, PdTt, Pbt = ST[c0:c1], dPT[c0:c1], PdT[c0:c1], Pb[c0:c1]
                    Gt, GMt, Nt, Kt, Vt = G[c0:c1], GM[c0:c1], N[c0:c1], Kb[c0:c1], Vb[c0:c1]
                    dKt, dVt = dK[c0:c1], dV[c0:c1]
                    if sa and c1 - c0 < BK:  # a trimmed tile: the scores of its keys from the pieces
                        _strip_scores(STt, Qt, Qv, Gt, b, h, hk, kb, kp, j0, c0, i0, nrows, lo, hi, o, cfg)
                    else:
                        _scores(STt, Qt, Qv, Kt, cls, b, h, qb, kb, j0 + c0, o, lo, hi, Gt, GMt, need_g, cfg, bamx)
                    if sa:
                        _split_tile(ST, dPT, N, c2, lse2, dls, pc, d_pairs, scratch, dK, dV,
                                    dq_parts[chunk, b, h, :, i0 : i0 + BQ], b, h, hk, kb, i0, c0, c1, o, cfg)
                        continue
                    if exact_rows:
                        _softmax_rows(STt, Nt, c2, lse2, bmax, m_use, row_sum, zeros, one, no_plan)
                        in_pb = False
                    else:
                        in_pb = _exp2_operand(STt, Nt, c2, lse2, Pbt, fuse)
                    # -- dV += P̃ᵀ·dO; dPᵀ = V·dOᵀ (dropout: the forward's mask on both)
                    if not (o.split_dp and _split_product(o.vpc, o.dopc, dPT, b, h, kb, i0, cfg)):
                        _qk(Vt, dOt, dOv, dPTt, bamx, cfg, wide)  # (summed as the scores: see _dots)
                    P = STt
                    if o.dropout_p > 0.0:
                        _dropout_block(STt, PdTt, dPTt, inv_keep, b, h, i0, nr, j0 + c0, o)
                        P = PdTt
                    _acc_product(Pbt if in_pb else _as_operand(P, Pbt), dOt, o.dorows, b, h, i0, dVt, bamx, cfg)
                    # -- dS = P ∘ (dP − Δ) in place of P; chain rule through score_mod (the
                    #    bias's gradient stops here) and softcap
                    if in_pb and bamx:  # rounded in place, from P̃, and in key pairs (dQ's B)
                        _ds_operand_pairs(Pb, dPT, dls, Dp)
                    elif in_pb:
                        _ds_operand(Pbt, dPTt, dls)  # rounded in place, from P̃
                    else:
                        if exact_rows:  # Δ from this tile's P and dP: every key of the rows is here
                            _delta_from_tile(STt, dPTt, dls, nr)
                        _ds_block(STt, dPTt, dls)
                        if HAS_SCORE_MOD:
                            _mul_into(STt, GMt)
                        if want_dbias:  # (dbias is zeros outside c0 … c1−1)
                            nc = min(c1 - c0, o.Lk - j0 - c0)
                            dbias[b, h, i0 : i0 + nr, j0 + c0 : j0 + c0 + nc] = STt[:nc, :nr].T
                        if o.softcap > 0.0:
                            _mul_into(STt, Gt)
                    # -- dK += dSᵀ·Q; dQ += dS·K (this part's dQ rows; on AMX dQᵀ's columns)
                    dS = Pbt if in_pb else _as_operand(STt, Pbt)
                    _acc_product(dS, Qt, o.qrows, b, h, i0, dKt, bamx, cfg)
                    if bamx:  # dQᵀ += Kᵀ·dS, the query tile's columns of this part's dQᵀ
                        if not in_pb:
                            _key_pairs(dS, Dp)
                        _dq_product(dS, KT, Dp, dq_parts[chunk, b, h, qb * D : (qb + 1) * D, :BQ], cfg)
                    else:
                        _gemm(dS.T[:nr], Kt, dq_parts[chunk, b, h, i0 : i0 + nr], 1.0)
            # -- write the tile's dK (times scale) and dV
            dkp[b, hk, kb] = dK * o.scale
            dvp[b, hk, kb] = dV
    _gemm_threads_end(q, threads)


def _acc_product(A, Bt, pairs, b, h, i0, C, amx, cfg):
    """``C += A · Bt`` for the bfloat16 backward's ``dV += P̃ᵀ·dO`` and ``dK += dS·Q`` (``A (BK,
    BQ)`` bfloat16 bits, rows of keys; ``Bt (BQ, X)`` the query tile's rows): on AMX (``amx``,
    ``_cpu_amx.values``) with B the tile's rows in pairs from ``pairs[b, h, 0, i0/2 …]`` (the
    call's ``Options.dorows``/``qrows``), else by :func:`_gemm` (MKL; float32/float64 tiles)."""
    raise NotImplementedError("compiled only")


@overload(_acc_product, jit_options={"cache": _JIT_CACHE})
def _acc_product_overload(A, Bt, pairs, b, h, i0, C, amx, cfg):
    if A.dtype != types.uint16:
        return lambda A, Bt, pairs, b, h, i0, C, amx, cfg: _gemm(A, Bt, C, 1.0)

    def impl(A, Bt, pairs, b, h, i0, C, amx, cfg):
        if amx:
            st = pairs.strides
            addr = pairs.ctypes.data + b * st[0] + h * st[1] + (i0 // 2) * st[3]
            _cpu_amx.values(A.ctypes.data, A.strides[0], A.shape[0], A.shape[1], addr, st[3], C.shape[1],
                            C.ctypes.data, C.strides[0], cfg)
        else:
            _gemm(A, Bt, C, 1.0)

    return impl


def _key_tile_t(Kb, KT):
    """The bfloat16 backward's Kᵀ of the task's key tile into ``KT (D, ≥BK)`` (``_cpu_amx.tile_t``):
    the A operand of ``dQᵀ += Kᵀ·dS``.  Other dtypes: nothing (never reached)."""
    raise NotImplementedError("compiled only")


@overload(_key_tile_t, jit_options={"cache": _JIT_CACHE})
def _key_tile_t_overload(Kb, KT):
    if Kb.dtype != types.uint16:
        return lambda Kb, KT: None
    return lambda Kb, KT: _cpu_amx.tile_t(Kb.view(np.uint32), KT.view(np.uint32))


def _dq_product(dS, KT, Dp, dqT, cfg):
    """``dqT (D, BQ) += Kᵀ·dS`` on AMX (``_cpu_amx.values``): A = the task's ``KT (D, ≥BK)``, B =
    dS in key pairs ``Dp (BK/2, ≥BQ)``, the query tile's columns of this part's dQᵀ — the
    bfloat16 backward's fifth product (``dQ += dSᵀ·K`` on MKL otherwise; the same bits: both
    sum ``tdpbf16ps`` over the keys in order onto the loaded dQ).  ``dS`` only picks the dtype:
    other dtypes compile a no-op."""
    raise NotImplementedError("compiled only")


@overload(_dq_product, jit_options={"cache": _JIT_CACHE})
def _dq_product_overload(dS, KT, Dp, dqT, cfg):
    if dS.dtype != types.uint16:
        return lambda dS, KT, Dp, dqT, cfg: None

    def impl(dS, KT, Dp, dqT, cfg):
        _cpu_amx.values(KT.ctypes.data, KT.strides[0], KT.shape[0], dS.shape[0], Dp.ctypes.data, Dp.strides[0], dS.shape[1],
                        dqT.ctypes.data, dqT.strides[0], cfg)

    return impl


@njit(cache=_JIT_CACHE, nogil=True)
def dq_from_tiles(parts, out, scale, chunk, nchunks):
    """``out (B, H, Lq, D)`` ← ``scale · Σ_c`` dQᵀ's parts, the bfloat16 AMX backward's layout
    ``parts (chunks, B, H, nqb·D, BQ + 16)``: query tile ``qb``'s dQᵀ ``(D, BQ)`` at rows ``qb·D …``
    — each tile product's block in one piece (34 pages at D 128, where dQᵀ rows a whole
    sequence long put each of its 128 rows on a page of its own).  Summed in chunk order,
    scaled and transposed per query tile by ``_cpu_amx_f32.sum_scale_transpose`` (the pass and
    the bits of ``dq_from_transposed``).  This chunk's heads (``_launch.run_chunks``)."""
    B, H, Lq, D = out.shape
    BQ = parts.shape[4] - 16
    tmp = np.empty((16, BQ + 16), dtype=out.dtype)
    for t in range(B * H):
        if t % nchunks != chunk:
            continue
        for qb in range(parts.shape[3] // D):
            i0 = qb * BQ
            if i0 >= Lq:
                break
            _cpu_amx_f32.sum_scale_transpose(parts, out, t // H, t % H, qb * D, i0, min(BQ, Lq - i0), scale, tmp)


def _split_query_tile(q, b, h, i0, BQ, o):
    """The forward's Qᵀ pieces of the query tile at row ``i0`` of head ``h`` into ``o.qpc[b, h,
    :, :, i0:i0+BQ]`` (``o.split_in_task``): what ``_cpu_amx_f32.split_columns`` writes for
    every tile in a pass per call, here by the task that owns the tile, on the kernel's
    threads.  float32 only (the other dtypes' kernels compile a no-op)."""
    raise NotImplementedError("compiled only")


@overload(_split_query_tile, jit_options={"cache": _JIT_CACHE})
def _split_query_tile_overload(q, b, h, i0, BQ, o):
    if q.dtype != types.float32:
        return lambda q, b, h, i0, BQ, o: None

    def impl(q, b, h, i0, BQ, o):
        if o.split_s:
            M = min(q.shape[2], o.q_lens[b])
            _cpu_amx_f32.split_columns_head(q[b, h], M, o.qpc[b, h], i0, i0 + BQ)

    return impl


def _split_key_tile(Kb, Vb, KbT, b, hk, kb, o):
    """The split-AMX pieces of key tile ``kb`` (``o.split_in_task``): K's into ``o.kpc[b, hk,
    kb]`` (``o.split_s``), V's into ``o.vpc[b, hk, kb]`` (``o.split_dp``) — what
    ``_cpu_amx_f32.split_tiles`` writes for every tile in a pass per call (1.8 ms each at H8
    L4096 D64 on one thread, the pieces' 12 MiB through L3), here on the kernel's threads, the
    tile hot for its products — and with all five products (``o.split_all``) Kᵀ's into
    ``o.ktp[b, hk, kb]`` through the scratch ``KbT (D, BK)`` (``split_tiles_t``'s work: a
    prange pass per call took 1.9 ms idle, 9.2 ms at load 2.7).  float32 tiles only (the other
    dtypes' kernels compile a no-op)."""
    raise NotImplementedError("compiled only")


@overload(_split_key_tile, jit_options={"cache": _JIT_CACHE})
def _split_key_tile_overload(Kb, Vb, KbT, b, hk, kb, o):
    if Kb.dtype != types.float32:
        return lambda Kb, Vb, KbT, b, hk, kb, o: None

    def impl(Kb, Vb, KbT, b, hk, kb, o):
        if o.split_s:
            _cpu_amx_f32.split_rows(Kb, o.kpc[b, hk, kb], Kb.shape[0], Kb.shape[1])
        if o.split_dp:
            _cpu_amx_f32.split_rows(Vb, o.vpc[b, hk, kb], Vb.shape[0], Vb.shape[1])
        if o.split_all:
            _cpu_amx_f32.split_tile_t(Kb, KbT, o.ktp[b, hk, kb])

    return impl


def _split_tile(ST, dPT, N, c2, lse2, dls, pc, d_pairs, scratch, dK, dV, dqT, b, h, hk, kb, i0, c0, c1, o, cfg):
    """The rest of a backward tile on the split-AMX route with all five products (``o.split_all``;
    Sᵀ is in ``ST`` already): the exp pass writes P's pieces in rows 8 rows at a time (while in
    L1), ``dPᵀ = V·dOᵀ``, ``dV += Pᵀ·dO``, the dS pass writes dS's pieces in rows and in pairs
    of keys, ``dK += dSᵀ·Q``, ``dQᵀ += Kᵀ·dSᵀ`` into the transposed ``dqT (Dp, BQ)``.

    Only the keys ``c0 … c1 − 1`` of the tile (multiples of 32; a PARTIAL tile trimmed to the
    keys its rows see, :func:`_key_extent`, else ``0 … BK``): the others' P and dS are 0, so
    their rows of dK and dV would gain exact zeros, and in ``dQᵀ``'s depth (keys, in 32-steps
    from ``c0`` as from 0) they would add exact zeros between the same steps — the same bits
    as the whole tile.  float32 only (the other dtypes' kernels compile a no-op; the route
    never reaches them)."""
    raise NotImplementedError("compiled only")


@overload(_split_tile, jit_options={"cache": _JIT_CACHE})
def _split_tile_overload(ST, dPT, N, c2, lse2, dls, pc, d_pairs, scratch, dK, dV, dqT, b, h, hk, kb, i0, c0, c1, o, cfg):
    if ST.dtype != types.float32:
        return lambda ST, dPT, N, c2, lse2, dls, pc, d_pairs, scratch, dK, dV, dqT, b, h, hk, kb, i0, c0, c1, o, cfg: None

    def impl(ST, dPT, N, c2, lse2, dls, pc, d_pairs, scratch, dK, dV, dqT, b, h, hk, kb, i0, c0, c1, o, cfg):
        BQ = ST.shape[1]
        F = _cpu_amx_f32
        # -- P = 2^(S − lse) in place, its pieces in rows (dV's A operand)
        for r0 in range(c0, c1, 8):
            _exp2_shifted(ST[r0 : r0 + 8], N[r0 : r0 + 8], c2, lse2)
            F.split_block_rows(ST, pc, r0, r0 + 8)
        # -- dPᵀ = V·dOᵀ; dV += Pᵀ·dO (the keys' rows of P's pieces and of dV)
        _split_product_keys(o.vpc, o.dopc, dPT[c0:c1], b, h, kb, c0, i0, cfg)
        q2 = i0 // 2
        F.product_add(pc[:, c0:c1], o.dorp[b, h, :, q2 : q2 + BQ // 2], dV[c0:c1], scratch, cfg)
        # -- dS = P ∘ (dP − Δ) in place, its pieces in rows (dK's A) and in key pairs (dQᵀ's B)
        for r0 in range(c0, c1, 8):
            _ds_block(ST[r0 : r0 + 8], dPT[r0 : r0 + 8], dls)
            F.split_block_rows_pairs(ST, pc, d_pairs, r0, r0 + 8)
        # -- dK += dSᵀ·Q; dQᵀ += Kᵀ·dSᵀ over the keys c0 … c1 − 1 (Kᵀ's columns, dS's pair rows)
        F.product_add(pc[:, c0:c1], o.qrp[b, h, :, q2 : q2 + BQ // 2], dK[c0:c1], scratch, cfg)
        F.product_add(o.ktp[b, hk, kb][:, :, c0:c1], d_pairs[:, c0 // 2 : c1 // 2], dqT, scratch, cfg)

    return impl


# =================================================================================
# weights (materialized on request)
# =================================================================================


@njit(cache=_JIT_CACHE, parallel=True, nogil=True)
def weights(q, kp, lse, P_out, o, nchunks):
    """Pre-dropout probabilities ``P_out (B, Hq, Lq, Lk)`` (zeros elsewhere).

    Each row's shift ``m`` and sum ``l`` are recomputed in a first pass over its key tiles
    (the forward's online softmax, without the accumulator), then ``P = 2^((S·c2 − m) − log2
    l)``.  From the forward's float32 LSE, ``P = 2^(S·c2 − lse·log2 e)`` carried the LSE's
    absolute rounding — up to ulp(40)/2 ≈ 1.9·10⁻⁶ for an LSE of 40 — as a relative error of
    every P in the row, where the naive softmax's is a few ulps: 2.5× the 2×-naive rule's
    limit at scale 1, L 11 (docs/performance.md).  The LSE still marks the rows without a
    visible key (−inf) or with NaN: those give 0, as before.
    """
    queue = np.zeros(1, dtype=np.int64)  # tasks taken as threads finish, as in the forward
    for chunk in prange(nchunks):
        _weights_chunk(queue, q, kp, lse, P_out, o)


@njit(cache=_JIT_CACHE)
def _shift_rows(ST, c2, m):
    """``ST[c, r] = ST[c, r]·c2 − m[r]`` (−inf stays −inf), before the exp subtracts ``log2
    l``: both small, so the difference loses nothing.  By one FMA, unless a row's shift is
    huge (|m| ≥ 2²⁰): then the product is rounded first, as ``m`` was, so that the maximum's
    exponent is exactly 0 (the rule of ``_cpu_primitives._exp2_shifted_f32``)."""
    huge = False
    for r in range(m.shape[0]):
        huge |= not abs(m[r]) < HUGE_SHIFT
    if huge:
        _mul_rows(ST, c2)
        _sub_rows(ST, m)
    else:
        _fma_rows(ST, c2, m)


@njit(cache=_JIT_CACHE, fastmath={"contract", "nsz"})
def _fma_rows(ST, c2, m):
    for c in range(ST.shape[0]):
        row = ST[c]
        for r in range(ST.shape[1]):
            row[r] = row[r] * c2 - m[r]


@njit(cache=_JIT_CACHE)
def _mul_rows(ST, c2):
    for c in range(ST.shape[0]):
        row = ST[c]
        for r in range(ST.shape[1]):
            row[r] = row[r] * c2  # stored: rounded


@njit(cache=_JIT_CACHE)
def _sub_rows(ST, m):
    for c in range(ST.shape[0]):
        row = ST[c]
        for r in range(ST.shape[1]):
            row[r] = row[r] - m[r]


def _bf16_operand(Pb):
    """Whether ``Pb`` holds bfloat16 bits (the bfloat16 kernels' GEMM operands)."""
    raise NotImplementedError("compiled only")


@overload(_bf16_operand, jit_options={"cache": _JIT_CACHE})
def _bf16_operand_overload(Pb):
    bf16 = Pb.dtype == types.uint16
    return lambda Pb: bf16


@njit(cache=_JIT_CACHE)
def _softmax_rows(ST, N, c2, lse2, m, m_use, row_sum, zeros, one, plan):
    """``P = 2^(S·c2 − m) / l`` from the scores of a tile that holds every key of its rows:
    ``m`` the row's scaled maximum, ``l`` its sum — the naive softmax's precision, where the
    forward's float32 LSE carries its absolute rounding into every P.  Rows the LSE marks
    with +inf (no visible key, past ``q_lens``) give 0, as :func:`_exp2_operand` does."""
    _tile_max(ST, m, ST)
    zero = m.dtype.type(0.0)
    for r in range(m.shape[0]):
        mx = m[r] * c2
        m_use[r] = mx if mx > -np.inf else zero
        row_sum[r] = 0.0
    _shift_rows(ST, c2, m_use)
    _exp2_shifted_sum(ST, N, one, zeros, row_sum, plan)
    for r in range(m.shape[0]):
        m[r] = one / row_sum[r] if (lse2[r] < np.inf and row_sum[r] > 0.0) else zero
    _scale_columns(ST, m)


@njit(cache=_JIT_CACHE)
def _scale_columns(ST, f):
    for c in range(ST.shape[0]):
        row = ST[c]
        for r in range(ST.shape[1]):
            row[r] = row[r] * f[r]


@njit(cache=_JIT_CACHE, nogil=True)  # (user kernels run it on the _launch pool: cpu._run_tasks)
def _weights_chunk(queue, q, kp, lse, P_out, o):
    B, Hq, Lq, D = q.shape
    Hkv, nkb, BK = kp.shape[1], kp.shape[2], kp.shape[3]
    BQ, T = o.BQ, P_out.dtype
    nqb = (Lq + BQ - 1) // BQ
    c2, _ = _constants(o, P_out)
    one = c2 * np.float32(0.0) + np.float32(1.0)  # 1 in the compute dtype (a Python 1.0 would widen float32)
    Qs = np.zeros((BQ, D), dtype=q.dtype)
    ST = np.empty((BK, BQ), dtype=T)
    N = np.empty((BK, BQ), dtype=np.int32)
    unused = np.empty((1, 1), dtype=T)
    no_acc = np.zeros((BQ, 0), dtype=T)  # (the statistics pass has no accumulator)
    no_plan = np.zeros(4, dtype=np.int64)
    lse2 = np.empty(BQ, dtype=T)
    m, m_use = np.empty(BQ, dtype=T), np.empty(BQ, dtype=T)
    bmax, row_sum = np.empty(BQ, dtype=T), np.empty(BQ, dtype=T)
    lo, hi = np.empty(BQ, dtype=np.int64), np.empty(BQ, dtype=np.int64)
    no_qv, cfg = np.empty((0, 0), dtype=np.uint32), tile_config()  # (AMX: forward only)
    threads = _gemm_threads_begin(q)
    while True:
        t = _take_task(queue)
        if t >= B * Hq * nqb:
            break
        b, h, qb = (t % (B * Hq)) // Hq, t % Hq, nqb - 1 - t // (B * Hq)
        hk = h // (Hq // Hkv)
        i0, nrows, nr = _rows(b, qb, o)
        if nr <= 0:
            continue
        # -- load the query tile; the LSE (base 2) marks the rows that give 0 (+inf)
        _load_rows(Qs, q, b, h, i0, nr)
        _lse_rows(lse2, lse, b, h, i0, nr)
        # -- first pass: each row's shift m and sum l (the forward's online softmax)
        m[:] = -np.inf
        row_sum[:] = 0.0
        for kb in range(nkb):
            cls = _tile_class(b, h, qb, kb, BK, o)
            if cls == SKIP:
                continue
            _scores(ST, Qs, no_qv, kp[b, hk, kb], cls, b, h, qb, kb, kb * BK, o, lo, hi, unused, unused, False, cfg, False)
            _online_softmax(ST, N, c2, m, m_use, bmax, row_sum, no_acc, ST, False, False, no_plan)
        for r in range(BQ):
            lse2[r] = math.log2(row_sum[r]) if (lse2[r] < np.inf and row_sum[r] > 0.0) else np.inf
        # -- second pass: P = 2^((S·c2 − m) − log2 l), written out
        for kb in range(nkb):
            cls = _tile_class(b, h, qb, kb, BK, o)
            if cls == SKIP:
                continue
            _scores(ST, Qs, no_qv, kp[b, hk, kb], cls, b, h, qb, kb, kb * BK, o, lo, hi, unused, unused, False, cfg, False)
            _shift_rows(ST, c2, m_use)
            _exp2_shifted(ST, N, one, lse2)
            j0 = kb * BK
            ncols = min(BK, o.Lk - j0)
            P_out[b, h, i0 : i0 + nr, j0 : j0 + ncols] = ST[:ncols, :nr].T
    _gemm_threads_end(q, threads)


# Each one-thread entry loads before the prange entry that runs it: the team, a forked child's
# one thread and the user's kernels on the pool run the same machine code, whatever the process
# loaded first (kernels/_entry_order.py)
_QUEUE = types.Array(types.int64, 1, "C")
load_callee_first(forward, lambda a: (_forward_chunk, (_QUEUE, *a[:-1])))
load_callee_first(backward, lambda a: (_backward_chunk, (_QUEUE, types.int64, *a[:-1])))
load_callee_first(weights, lambda a: (_weights_chunk, (_QUEUE, *a[:-1])))
