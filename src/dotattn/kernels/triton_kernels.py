"""Fused attention kernels in Triton (FlashAttention-2 structure), every option in-kernel.

Imported only by :mod:`dotattn.kernels.triton_backend` when a call needs them: importing
this module imports ``triton``, and ``@triton.jit`` decides *at import* whether the kernels
are compiled for the GPU or run by Triton's interpreter (``TRITON_INTERPRET=1``, NumPy on
CPU tensors, one program at a time) — :data:`INTERPRETED` records which.

Canonical shapes (``docs/semantics.md``)::

    q (B, Hq, Lq, D)   k (B, Hkv, Lk, D)   v (B, Hkv, Lk, Dv)   out (B, Hq, Lq, Dv)
    lse (B, Hq, Lq) float32                 mask/bias (B, Hq, Lq, Lk), any strides (0 = broadcast)

Kernels:

* :func:`attn_fwd` — grid ``(cdiv(Lq, BLOCK_M), B·Hq)``: one query block of one head streams
  the key blocks its rules leave visible (online softmax, running max/sum in float32) and
  writes ``out`` and the natural-log ``lse``.
* :func:`attn_bwd_delta` — ``Δ_i = rowsum(dO ∘ O) − dlse_i`` (the LSE's own gradient folds
  in here).
* :func:`attn_bwd_dkdv` — grid ``(cdiv(Lk, BLOCK_N), B·Hkv)``: one key block of one K/V head
  walks every query head of its GQA group and the query blocks that can see it, accumulating
  ``dK``, ``dV`` (and writing ``dS`` as the bias gradient when asked) — no atomics, no
  repeated K/V.
* :func:`attn_bwd_dq` — grid ``(cdiv(Lq, BLOCK_M), B·Hq)``: ``dQ`` of one query block from
  the key blocks it sees, again without atomics, so the backward is deterministic.
* :func:`attn_weights` — the pre-dropout probabilities, materialized (``return_weights``).

Visibility is the one of ``AttentionCall.visible`` (causal bottom-right/top-left, window,
lengths, segment ids, bool mask), evaluated per tile from indices; padding past the lengths
is never loaded (masked loads), so NaN there cannot leak.  Dropout uses the counter-based
SplitMix64 hash of :mod:`dotattn.kernels.dropout` in uint64 arithmetic, bit for bit: the same
seed keeps the same elements on GPU and CPU.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton import knobs

INTERPRETED = bool(knobs.runtime.interpret)

# Helpers called from inside the kernels.  Compiled, they are @triton.jit functions (inlined).
# Under the interpreter every call of a jit function re-patches triton.language (~1 ms, a third
# of the interpreter's time on test shapes); a running kernel has already patched it, so
# there the helpers are called as the plain Python functions they are.
_helper = (lambda fn: fn) if INTERPRETED else triton.jit

# SplitMix64 constants (kernels/dropout.py); Triton types literals ≥ 2**63 as uint64.
# (Globals a compiled kernel reads must be constexpr.)
_GOLDEN = tl.constexpr(0x9E3779B97F4A7C15)
_MIX1 = tl.constexpr(0xBF58476D1CE4E5B9)
_MIX2 = tl.constexpr(0x94D049BB133111EB)


@_helper
def _tanh(x):
    """float32 tanh (Triton has none that also runs in the interpreter).

    Cephes ``tanhf``: an odd polynomial below |x| = 0.625 (no cancellation near 0, where
    ``1 − 2/(e^{2x}+1)`` would lose digits), the exponential form above.
    """
    ax = tl.abs(x)
    z = x * x
    poly = ((((-5.70498872745e-3 * z + 2.06390887954e-2) * z - 5.37397155531e-2) * z + 1.33314422036e-1) * z
            - 3.33332819422e-1) * z * x + x
    big = 1.0 - 2.0 / (tl.exp(2.0 * ax) + 1.0)
    big = tl.where(x < 0, -big, big)
    return tl.where(ax < 0.625, poly, big)


@_helper
def _keep(key, threshold, b, h, rows, cols, Hq, Lq, Lk):
    """Dropout keep decision of the block: SplitMix64(counter ^ key) >> 11 ≥ ceil(p·2⁵³).

    ``u = (z >> 11)·2⁻⁵³ ≥ p`` is exactly ``z >> 11 ≥ ceil(p·2⁵³)`` (both sides are integers
    scaled by a power of two), so the comparison needs no float64.
    """
    base = (b.to(tl.uint64) * Hq.to(tl.uint64) + h.to(tl.uint64)) * Lq.to(tl.uint64)
    counter = (base + rows.to(tl.uint64))[:, None] * Lk.to(tl.uint64) + cols.to(tl.uint64)[None, :]
    z = (counter ^ key) + _GOLDEN
    z = (z ^ (z >> 30)) * _MIX1
    z = (z ^ (z >> 27)) * _MIX2
    z = z ^ (z >> 31)
    return (z >> 11) >= threshold


@_helper
def _visible(rows, cols, b, h, q_len, kv_len, off, tl_off, Lq, Lk, win_left, win_right,
             MASK, smb, smh, smm, smn, QSEG, KVSEG,
             CAUSAL: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,
             HAS_SEG: tl.constexpr, HAS_MASK: tl.constexpr):
    """Boolean (BLOCK_M, BLOCK_N) visibility: the rules of ``AttentionCall.visible``."""
    r = rows[:, None]
    c = cols[None, :]
    vis = (r < q_len) & (c < kv_len)
    pos_q = r + off  # bottom-right position of the query on the key axis
    if CAUSAL == 1:
        vis = vis & (c <= pos_q)
    if CAUSAL == 2:
        vis = vis & (c <= r + tl_off)
    if HAS_WL:
        vis = vis & (c >= pos_q - win_left)
    if HAS_WR:
        vis = vis & (c <= pos_q + win_right)
    if HAS_SEG:
        qs = tl.load(QSEG + b.to(tl.int64) * Lq + rows, mask=rows < Lq, other=-1)
        ks = tl.load(KVSEG + b.to(tl.int64) * Lk + cols, mask=cols < Lk, other=-2)
        vis = vis & (qs[:, None] == ks[None, :])
    if HAS_MASK:
        m_ptrs = MASK + b.to(tl.int64) * smb + h.to(tl.int64) * smh + r.to(tl.int64) * smm + c.to(tl.int64) * smn
        m = tl.load(m_ptrs, mask=(r < Lq) & (c < Lk), other=0)
        vis = vis & (m != 0)
    return vis


@_helper
def _dot_ieee(a, b):
    """``tl.dot(a, b, input_precision="ieee")`` (float32 accumulation); under Triton's
    interpreter the operands are widened to float32 first — exactly: its bfloat16 ``tl.dot``
    multiplied the raw bit patterns, so a bfloat16 call through it returned outputs of ~1e9
    (found 7 Dec 2026; compiled kernels are unchanged: ``_WIDEN_DOTS`` is a constexpr)."""
    if _WIDEN_DOTS:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision="ieee")


@_helper
def _scores(q, k, vis, rows, cols, b, h, off, Lq, Lk, scale, softcap, BIAS, sbb, sbh, sbm, sbn, SLOPES, Hq,
            HAS_SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """float32 scores of a tile in the semantics' order, −inf where ``vis`` hides the pair, and
    tanh(s/c) for the softcap's gradient."""
    s = _dot_ieee(q, tl.trans(k)) * scale
    th = s  # unused without a softcap
    if HAS_SOFTCAP:
        th = _tanh(s / softcap)
        s = softcap * th
    if HAS_BIAS:
        r = rows[:, None]
        c = cols[None, :]
        b_ptrs = BIAS + b.to(tl.int64) * sbb + h.to(tl.int64) * sbh + r.to(tl.int64) * sbm + c.to(tl.int64) * sbn
        bias = tl.load(b_ptrs, mask=(r < Lq) & (c < Lk), other=0.0).to(tl.float32)
        s += bias
    if HAS_ALIBI:
        slope = tl.load(SLOPES + b * Hq + h).to(tl.float32)
        dist = tl.abs((rows[:, None] + off) - cols[None, :]).to(tl.float32)
        s -= slope * dist
    if HAS_BIAS:
        # A −inf bias entry hides its key as a mask does, even where the score is NaN or +inf.
        s = tl.where(bias == float("-inf"), float("-inf"), s)
    return tl.where(vis, s, float("-inf")), th


@_helper
def _live_dot(a, live, pos, b, SIGNED: tl.constexpr):
    """``tl.dot(a, b)`` over the pairs ``live`` marks only (docs/semantics.md, NaN policy).

    ``a`` (M, K) float32 is 0 off ``live``; a NaN/±inf of ``b`` (K, N) must not meet those
    zeros (0·NaN would leak a hidden value).  A finite ``b`` tile (the usual case, one check
    per tile) is one dot; otherwise the finite part is one dot and the non-finite entries are
    added as IEEE would over the live pairs: NaN where a live pair meets NaN (or a zero
    coefficient meets ±inf, or both infinities meet), else ±inf with the coefficient's sign.
    ``SIGNED``: the sign is ``a``'s own (dS); else ``a`` is a probability, positive exactly
    where ``pos`` says (visible, kept): an underflowed 0 there still gives ±inf (as
    numpy_tiled.live_matmul).

    The pair counts come from float16 dots of small integer codes (exact: counts ≤ K ≤ 255,
    sums < 2**24 in the float32 accumulator), packed so that two dots (three for dS) do the
    work — each extra dot costs the kernel shared memory, which sm_80 has little of.
    """
    bf = b.to(tl.float32)
    finite = (bf - bf) == 0.0  # NaN for NaN and ±inf
    if tl.max((finite == 0).to(tl.int32)) > 0:
        out = _dot_ieee(a.to(b.dtype), tl.where(finite, b, 0.0).to(b.dtype))
        is_nan = bf != bf
        is_inf = (bf == float("inf")) | (bf == float("-inf"))
        sign_code = tl.where(bf == float("inf"), 1.0, tl.where(bf == float("-inf"), 256.0, 0.0)).to(tl.float16)
        if SIGNED:
            pos_m = live & (a > 0)
            zero_m = live & (a == 0)
        else:
            pos_m = live & pos
            zero_m = live & (pos == 0)
        # Σ (live + 256·zero)·(nan + 256·inf) = n(live, NaN) + 256·(…) + 65536·n(zero, ±inf)
        left = tl.where(zero_m, 257.0, tl.where(live, 1.0, 0.0)).to(tl.float16)
        right = tl.where(is_nan, 1.0, tl.where(is_inf, 256.0, 0.0)).to(tl.float16)
        codes = tl.dot(left, right, input_precision="ieee").to(tl.int32)
        nan = ((codes & 255) > 0) | ((codes >> 16) > 0)
        # Σ pos·(+inf + 256·−inf) = n(pos, +inf) + 256·n(pos, −inf)
        signs = tl.dot(pos_m.to(tl.float16), sign_code, input_precision="ieee").to(tl.int32)
        up = (signs & 255) > 0
        down = (signs >> 8) > 0
        if SIGNED:
            neg = tl.dot((live & (a < 0)).to(tl.float16), sign_code, input_precision="ieee").to(tl.int32)
            up = up | ((neg >> 8) > 0)  # −coefficient · −inf
            down = down | ((neg & 255) > 0)
        out = tl.where(up, float("inf"), out)
        out = tl.where(down, float("-inf"), out)
        out = tl.where(nan | (up & down), float("nan"), out)
    else:
        out = _dot_ieee(a.to(b.dtype), b)
    return out


@_helper
def _key_range(row0, q_len, kv_len, off, tl_off, win_left, win_right, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr):
    """Key blocks [lo, hi) that the query block at ``row0`` can see; empty for padded blocks."""
    row1 = tl.minimum(row0 + BLOCK_M, q_len)
    lo = row0 * 0
    hi = kv_len + row0 * 0
    if CAUSAL == 1:
        hi = tl.minimum(hi, row1 + off)
    if CAUSAL == 2:
        hi = tl.minimum(hi, row1 + tl_off)
    if HAS_WL:
        lo = tl.maximum(lo, row0 + off - win_left)
    if HAS_WR:
        hi = tl.minimum(hi, row1 + off + win_right)
    lo = (lo // BLOCK_N) * BLOCK_N
    hi = tl.where(row0 < q_len, hi, lo)
    return lo, hi


@_helper
def _query_program(Hq, group):
    """What a program of grid ``(cdiv(Lq, BLOCK_M), B·Hq)`` works on: its query block, the
    flat (batch, head) index, the batch, the query head and that head's K/V head."""
    pid_bh = tl.program_id(1)
    h = pid_bh % Hq
    return tl.program_id(0), pid_bh, pid_bh // Hq, h, h // group


# ``GEOM`` describes a block of a larger problem (``semantics.BlockGeometry``, used by ring
# attention): int64 [position shift, top-left offset, dropout h0, row0, col0, Hq, Lq, Lk] —
# zeros and the call's own sizes for a whole problem.

@_helper
def _lengths(b, QLEN, KVLEN, Lq, Lk, HAS_QLEN: tl.constexpr, HAS_KVLEN: tl.constexpr):
    q_len = Lq + b * 0
    kv_len = Lk + b * 0
    if HAS_QLEN:
        q_len = tl.load(QLEN + b).to(tl.int32)
    if HAS_KVLEN:
        kv_len = tl.load(KVLEN + b).to(tl.int32)
    return q_len, kv_len


@_helper
def _positions(b, QLEN, KVLEN, GEOM, Lq, Lk, HAS_QLEN: tl.constexpr, HAS_KVLEN: tl.constexpr):
    """Batch ``b``'s real lengths and where its queries sit on the key axis: query ``i`` at
    ``i + off`` (bottom-right, shifted by the block's place in a larger problem), or at
    ``i + tl_off`` for top-left causality."""
    q_len, kv_len = _lengths(b, QLEN, KVLEN, Lq, Lk, HAS_QLEN, HAS_KVLEN)
    shift = tl.load(GEOM + 0).to(tl.int32)
    tl_off = tl.load(GEOM + 1).to(tl.int32)
    return q_len, kv_len, kv_len - q_len + shift, tl_off


@_helper
def _dropout_origin(GEOM):
    """Where the block sits in the whole problem's dropout counters: h0, row0, col0, Hq, Lq, Lk."""
    return tl.load(GEOM + 2), tl.load(GEOM + 3), tl.load(GEOM + 4), tl.load(GEOM + 5), tl.load(GEOM + 6), \
        tl.load(GEOM + 7)


@_helper
def _dropout_key(seed_key, drop_threshold):
    """The launch's int64 seed key and keep threshold as the uint64s :func:`_keep` compares."""
    return seed_key.to(tl.int64).to(tl.uint64, bitcast=True), drop_threshold.to(tl.int64).to(tl.uint64)


@_helper
def _head(PTR, b, h, stride_b, stride_h):
    """Pointer to head ``h`` of batch ``b`` (int64 offsets: large tensors overflow int32)."""
    return PTR + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h


@_helper
def _load_tile(base, rows, n_rows, stride_row, offs, n_offs, stride_off):
    """The (len(rows), len(offs)) tile ``base[rows, offs]``; 0 past ``n_rows`` / ``n_offs``
    (padding is never read, so a NaN there cannot leak)."""
    return tl.load(base + rows[:, None].to(tl.int64) * stride_row + offs[None, :] * stride_off,
                   mask=(rows[:, None] < n_rows) & (offs[None, :] < n_offs), other=0.0)


@_helper
def _store_tile(base, rows, n_rows, stride_row, offs, n_offs, stride_off, tile):
    """Store ``tile`` at ``base[rows, offs]``, rows below ``n_rows`` and offsets below ``n_offs``."""
    tl.store(base + rows[:, None].to(tl.int64) * stride_row + offs[None, :] * stride_off, tile,
             mask=(rows[:, None] < n_rows) & (offs[None, :] < n_offs))


@_helper
def _load_lse(LSE, bh, Lq, rows, q_len):
    """The forward's LSE of ``rows``, with +inf for rows that saw no key (−inf), so that
    ``exp(s − lse)`` is 0 there and never ``exp(−inf + inf)`` = NaN."""
    lse = tl.load(LSE + bh * Lq + rows, mask=rows < q_len, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse)


@_helper
def _online_softmax(s, m_i, l_i):
    """One key tile of the online softmax: the tile's ``p = exp(s − m_new)``, the factor
    ``alpha`` that rescales what was summed before, the new row sums and maxima."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # Rows that have seen no visible key keep m = −inf; 0 stands in so exp() gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    return p, alpha, l_i * alpha + tl.sum(p, 1), m_new


@_helper
def _softmax_results(acc, m_i, l_i):
    """The rows' output ``acc / l`` and natural-log LSE; 0 and −inf for rows with no visible key."""
    # l = 0 only for rows with no visible key; NaN (a NaN input in the row) must stay NaN, so
    # the test is l ≠ 0, not l > 0.
    seen = l_i != 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = tl.where(seen[:, None], acc / l_safe[:, None], 0.0)
    return out, tl.where(seen, m_i + tl.log(l_safe), float("-inf"))


@triton.jit(do_not_specialize=['Hq', 'group', 'Lq', 'Lk', 'D', 'Dv', 'win_left', 'win_right', 'seed_key', 'drop_threshold'])
def attn_fwd(
    Q, K, V, O, LSE, MASK, BIAS, SLOPES, QLEN, KVLEN, QSEG, KVSEG, GEOM,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
    smb, smh, smm, smn, sbb, sbh, sbm, sbn,
    Hq, group, Lq, Lk, D, Dv, scale, softcap, win_left, win_right, seed_key, drop_threshold, drop_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, HAS_QLEN: tl.constexpr,
    HAS_KVLEN: tl.constexpr, HAS_SEG: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
):
    pid_m, pid_bh, b, h, hk = _query_program(Hq, group)
    q_len, kv_len, off, tl_off = _positions(b, QLEN, KVLEN, GEOM, Lq, Lk, HAS_QLEN, HAS_KVLEN)
    g_h0, g_row0, g_col0, g_Hq, g_Lq, g_Lk = _dropout_origin(GEOM)
    key, threshold = _dropout_key(seed_key, drop_threshold)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_tile(_head(Q, b, h, sqb, sqh), rows, q_len, sqm, offs_d, D, sqd)
    k_base = _head(K, b, hk, skb, skh)
    v_base = _head(V, b, hk, svb, svh)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    lo, hi = _key_range(pid_m * BLOCK_M, q_len, kv_len, off, tl_off, win_left, win_right,
                        BLOCK_M, BLOCK_N, CAUSAL, HAS_WL, HAS_WR)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        vis = _visible(rows, cols, b, h, q_len, kv_len, off, tl_off, Lq, Lk, win_left, win_right,
                       MASK, smb, smh, smm, smn, QSEG, KVSEG, CAUSAL, HAS_WL, HAS_WR, HAS_SEG, HAS_MASK)
        # Block skipping: tiles no rule lets through (other documents, all-False mask) cost no dot.
        if tl.max(vis.to(tl.int32)) > 0:
            k = _load_tile(k_base, cols, kv_len, skn, offs_d, D, skd)
            v = _load_tile(v_base, cols, kv_len, svn, offs_dv, Dv, svd)
            s, th = _scores(q, k, vis, rows, cols, b, h, off, Lq, Lk, scale, softcap, BIAS, sbb, sbh, sbm, sbn,
                            SLOPES, Hq, HAS_SOFTCAP, HAS_BIAS, HAS_ALIBI)
            live = s != float("-inf")  # the pairs that take part (NaN scores included)
            p, alpha, l_i, m_new = _online_softmax(s, m_i, l_i)  # the sum l stays pre-dropout
            pos = live
            if DROPOUT:
                keep = _keep(key, threshold, b, h + g_h0, rows + g_row0, cols + g_col0, g_Hq, g_Lq, g_Lk)
                p = tl.where(keep, p * drop_scale, 0.0)
                pos = live & keep
            # ±inf already summed (an infinite value) stays ±inf when alpha underflows to 0
            acc = tl.where(tl.abs(acc) == float("inf"), acc, acc * alpha[:, None])
            acc = acc + _live_dot(p, live, pos, v, False)
            m_i = m_new
    out, lse = _softmax_results(acc, m_i, l_i)
    _store_tile(_head(O, b, h, sob, soh), rows, Lq, som, offs_dv, Dv, sod, out.to(O.dtype.element_ty))
    tl.store(LSE + pid_bh.to(tl.int64) * Lq + rows, lse, mask=rows < Lq)


@triton.jit(do_not_specialize=['Hq', 'Lq', 'Dv'])
def attn_bwd_delta(
    O, DO, DLSE, DELTA, QLEN, sob, soh, som, sod, sdb, sdh, sdm, sdd,
    Hq, Lq, Dv,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_QLEN: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    """Δ_i = rowsum(dO ∘ O) − dlse_i, 0 on padded rows (their O/dO are never read)."""
    pid_m, pid_bh, b, h, _ = _query_program(Hq, 1)
    q_len, _ = _lengths(b, QLEN, QLEN, Lq, Lq, HAS_QLEN, False)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    o = _load_tile(_head(O, b, h, sob, soh), rows, q_len, som, offs_dv, Dv, sod)
    do = _load_tile(_head(DO, b, h, sdb, sdh), rows, q_len, sdm, offs_dv, Dv, sdd)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        # ∂lse_i/∂s_ij = p_ij: an upstream dlse turns dS = P∘(dP − Δ) into P∘(dP − (Δ − dlse)).
        delta -= tl.load(DLSE + pid_bh.to(tl.int64) * Lq + rows, mask=rows < q_len, other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * Lq + rows, delta, mask=rows < Lq)


@triton.jit(do_not_specialize=['Hq', 'Hkv', 'group', 'Lq', 'Lk', 'D', 'Dv', 'win_left', 'win_right', 'seed_key', 'drop_threshold'])
def attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, DBIAS, MASK, BIAS, SLOPES, QLEN, KVLEN, QSEG, KVSEG, GEOM,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdm, sdd,
    sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
    smb, smh, smm, smn, sbb, sbh, sbm, sbn,
    Hq, Hkv, group, Lq, Lk, D, Dv, scale, softcap, win_left, win_right, seed_key, drop_threshold, drop_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, HAS_QLEN: tl.constexpr,
    HAS_KVLEN: tl.constexpr, HAS_SEG: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, WANT_DBIAS: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bk = tl.program_id(1)
    b = pid_bk // Hkv
    hk = pid_bk % Hkv
    q_len, kv_len, off, tl_off = _positions(b, QLEN, KVLEN, GEOM, Lq, Lk, HAS_QLEN, HAS_KVLEN)
    g_h0, g_row0, g_col0, g_Hq, g_Lq, g_Lk = _dropout_origin(GEOM)
    key, threshold = _dropout_key(seed_key, drop_threshold)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = _load_tile(_head(K, b, hk, skb, skh), cols, kv_len, skn, offs_d, D, skd)
    v = _load_tile(_head(V, b, hk, svb, svh), cols, kv_len, svn, offs_dv, Dv, svd)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    # Query rows [lo, hi) that can see any key of this block (the mirror of _key_range).
    col0 = pid_n * BLOCK_N
    col1 = tl.minimum(col0 + BLOCK_N, kv_len)
    lo = col0 * 0
    hi = q_len + col0 * 0
    if CAUSAL == 1:
        lo = tl.maximum(lo, col0 - off)
    if CAUSAL == 2:
        lo = tl.maximum(lo, col0 - tl_off)
    if HAS_WL:
        hi = tl.minimum(hi, col1 + win_left - off)
    if HAS_WR:
        lo = tl.maximum(lo, col0 - off - win_right)
    lo = (lo // BLOCK_M) * BLOCK_M
    hi = tl.where(col0 < kv_len, hi, lo)

    for g in range(0, group):  # the query heads of this K/V head's group: summed here, never repeated
        h = hk * group + g
        bh = (b * Hq + h).to(tl.int64)
        q_base = _head(Q, b, h, sqb, sqh)
        do_base = _head(DO, b, h, sdb, sdh)
        for start_m in range(lo, hi, BLOCK_M):
            rows = start_m + tl.arange(0, BLOCK_M)
            vis = _visible(rows, cols, b, h, q_len, kv_len, off, tl_off, Lq, Lk, win_left, win_right,
                           MASK, smb, smh, smm, smn, QSEG, KVSEG, CAUSAL, HAS_WL, HAS_WR, HAS_SEG, HAS_MASK)
            if tl.max(vis.to(tl.int32)) > 0:
                q = _load_tile(q_base, rows, q_len, sqm, offs_d, D, sqd)
                do = _load_tile(do_base, rows, q_len, sdm, offs_dv, Dv, sdd)
                lse = _load_lse(LSE, bh, Lq, rows, q_len)
                delta = tl.load(DELTA + bh * Lq + rows, mask=rows < q_len, other=0.0)
                s, th = _scores(q, k, vis, rows, cols, b, h, off, Lq, Lk, scale, softcap, BIAS, sbb, sbh, sbm, sbn,
                                SLOPES, Hq, HAS_SOFTCAP, HAS_BIAS, HAS_ALIBI)
                live = s != float("-inf")  # pairs that take part; hidden ones never read a value
                p = tl.where(live, tl.exp(s - lse[:, None]), 0.0)  # a NaN lse stays in the keys it sees
                dp = _dot_ieee(do, tl.trans(v))
                if DROPOUT:
                    keep = _keep(key, threshold, b, h + g_h0, rows + g_row0, cols + g_col0, g_Hq, g_Lq, g_Lk)
                    pd = tl.where(keep, p * drop_scale, 0.0)
                    dp = tl.where(keep, dp * drop_scale, 0.0)
                    pos = live & keep
                else:
                    pd = p
                    pos = live
                dv += _live_dot(tl.trans(pd), tl.trans(live), tl.trans(pos), do, False)
                ds = tl.where(live, p * (dp - delta[:, None]), 0.0)  # dS = P ∘ (dP − Δ)
                if WANT_DBIAS:
                    # Each (head, row, key) belongs to exactly one program: plain stores, no race.
                    _store_tile(DBIAS + bh * Lq * Lk, rows, Lq, Lk, cols, Lk, 1, ds)  # (B·Hq, Lq, Lk)
                if HAS_SOFTCAP:
                    ds = tl.where(live, ds * (1.0 - th * th), 0.0)  # d(c·tanh(x/c))/dx
                dk += _live_dot(tl.trans(ds), tl.trans(live), tl.trans(live), q, True)
    dk = dk * scale
    _store_tile(_head(DK, b, hk, sdkb, sdkh), cols, Lk, sdkn, offs_d, D, sdkd, dk.to(DK.dtype.element_ty))
    _store_tile(_head(DV, b, hk, sdvb, sdvh), cols, Lk, sdvn, offs_dv, Dv, sdvd, dv.to(DV.dtype.element_ty))


@triton.jit(do_not_specialize=['Hq', 'group', 'Lq', 'Lk', 'D', 'Dv', 'win_left', 'win_right', 'seed_key', 'drop_threshold'])
def attn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, MASK, BIAS, SLOPES, QLEN, KVLEN, QSEG, KVSEG, GEOM,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdm, sdd,
    sdqb, sdqh, sdqm, sdqd,
    smb, smh, smm, smn, sbb, sbh, sbm, sbn,
    Hq, group, Lq, Lk, D, Dv, scale, softcap, win_left, win_right, seed_key, drop_threshold, drop_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, HAS_QLEN: tl.constexpr,
    HAS_KVLEN: tl.constexpr, HAS_SEG: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
):
    pid_m, pid_bh, b, h, hk = _query_program(Hq, group)
    q_len, kv_len, off, tl_off = _positions(b, QLEN, KVLEN, GEOM, Lq, Lk, HAS_QLEN, HAS_KVLEN)
    g_h0, g_row0, g_col0, g_Hq, g_Lq, g_Lk = _dropout_origin(GEOM)
    key, threshold = _dropout_key(seed_key, drop_threshold)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_tile(_head(Q, b, h, sqb, sqh), rows, q_len, sqm, offs_d, D, sqd)
    do = _load_tile(_head(DO, b, h, sdb, sdh), rows, q_len, sdm, offs_dv, Dv, sdd)
    bh = pid_bh.to(tl.int64)
    lse = _load_lse(LSE, bh, Lq, rows, q_len)
    delta = tl.load(DELTA + bh * Lq + rows, mask=rows < q_len, other=0.0)
    k_base = _head(K, b, hk, skb, skh)
    v_base = _head(V, b, hk, svb, svh)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, hi = _key_range(pid_m * BLOCK_M, q_len, kv_len, off, tl_off, win_left, win_right,
                        BLOCK_M, BLOCK_N, CAUSAL, HAS_WL, HAS_WR)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        vis = _visible(rows, cols, b, h, q_len, kv_len, off, tl_off, Lq, Lk, win_left, win_right,
                       MASK, smb, smh, smm, smn, QSEG, KVSEG, CAUSAL, HAS_WL, HAS_WR, HAS_SEG, HAS_MASK)
        if tl.max(vis.to(tl.int32)) > 0:
            k = _load_tile(k_base, cols, kv_len, skn, offs_d, D, skd)
            v = _load_tile(v_base, cols, kv_len, svn, offs_dv, Dv, svd)
            s, th = _scores(q, k, vis, rows, cols, b, h, off, Lq, Lk, scale, softcap, BIAS, sbb, sbh, sbm, sbn,
                            SLOPES, Hq, HAS_SOFTCAP, HAS_BIAS, HAS_ALIBI)
            live = s != float("-inf")
            p = tl.where(live, tl.exp(s - lse[:, None]), 0.0)
            dp = _dot_ieee(do, tl.trans(v))
            if DROPOUT:
                keep = _keep(key, threshold, b, h + g_h0, rows + g_row0, cols + g_col0, g_Hq, g_Lq, g_Lk)
                dp = tl.where(keep, dp * drop_scale, 0.0)
            ds = tl.where(live, p * (dp - delta[:, None]), 0.0)
            if HAS_SOFTCAP:
                ds = tl.where(live, ds * (1.0 - th * th), 0.0)
            dq += _live_dot(ds, live, live, k, True)
    dq = dq * scale
    _store_tile(_head(DQ, b, h, sdqb, sdqh), rows, Lq, sdqm, offs_d, D, sdqd, dq.to(DQ.dtype.element_ty))


@triton.jit(do_not_specialize=['Hq', 'group', 'Lq', 'Lk', 'D', 'win_left', 'win_right'])
def attn_weights(
    Q, K, LSE, W, MASK, BIAS, SLOPES, QLEN, KVLEN, QSEG, KVSEG, GEOM,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, smb, smh, smm, smn, sbb, sbh, sbm, sbn,
    Hq, group, Lq, Lk, D, scale, softcap, win_left, win_right,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, HAS_QLEN: tl.constexpr,
    HAS_KVLEN: tl.constexpr, HAS_SEG: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    """Pre-dropout probabilities exp(s − lse) into a zeroed (B, Hq, Lq, Lk) float32 W."""
    pid_m, pid_bh, b, h, hk = _query_program(Hq, group)
    q_len, kv_len, off, tl_off = _positions(b, QLEN, KVLEN, GEOM, Lq, Lk, HAS_QLEN, HAS_KVLEN)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(_head(Q, b, h, sqb, sqh), rows, q_len, sqm, offs_d, D, sqd)
    bh = pid_bh.to(tl.int64)
    lse = _load_lse(LSE, bh, Lq, rows, q_len)
    k_base = _head(K, b, hk, skb, skh)
    lo, hi = _key_range(pid_m * BLOCK_M, q_len, kv_len, off, tl_off, win_left, win_right,
                        BLOCK_M, BLOCK_N, CAUSAL, HAS_WL, HAS_WR)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        vis = _visible(rows, cols, b, h, q_len, kv_len, off, tl_off, Lq, Lk, win_left, win_right,
                       MASK, smb, smh, smm, smn, QSEG, KVSEG, CAUSAL, HAS_WL, HAS_WR, HAS_SEG, HAS_MASK)
        if tl.max(vis.to(tl.int32)) > 0:
            k = _load_tile(k_base, cols, kv_len, skn, offs_d, D, skd)
            s, _ = _scores(q, k, vis, rows, cols, b, h, off, Lq, Lk, scale, softcap, BIAS, sbb, sbh, sbm, sbn,
                           SLOPES, Hq, HAS_SOFTCAP, HAS_BIAS, HAS_ALIBI)
            # hidden keys get weight 0 also in a NaN row (exp(−inf − NaN) is NaN)
            p = tl.where(s != float("-inf"), tl.exp(s - lse[:, None]), 0.0)
            _store_tile(W + bh * Lq * Lk, rows, Lq, Lk, cols, Lk, 1, p)  # W is (B·Hq, Lq, Lk)


# Decoding on tensor cores in float32 precision.  A float32 operand (q, the weights p) is cut
# into 16-bit terms of the cache's type whose sum is the operand: three bfloat16 terms hold
# its 24 bits, two float16 terms 22 after the operand is scaled by a power of two into
# float16's range: q's rows to a largest magnitude in [1, 2) (or [2, 4) for a row whose largest
# magnitude is ≥ 2¹²⁷), the weights p ≤ 1 by 2¹⁵ (_P_SCALE: float16's normal numbers end at
# 2⁻¹⁴, so unscaled a weight under ≈ 6e-5 of the chunk's largest kept a few bits, one under
# 2⁻²⁵ none, and the second term of one under 2⁻³ lost bits too).  Each term times the cache's exact 16-bit values is
# exact in the float32 accumulator, so the terms' dots add up to the float32 dot but for the
# order of the additions — at 2–3 tensor-core dots a tile instead of one float32 dot on the
# CUDA cores, which spilled registers and read the cache at ~1 % of the H200's bandwidth
# (docs/decoding-log.md, "On a GPU: the triton decode kernel").  Triton's interpreter computes
# bfloat16 dots on the raw integer bits, so there the terms are widened to float32 first (the
# same sums, exactly).
_WIDEN_DOTS = tl.constexpr(INTERPRETED)


@_helper
def _mma(a, b):
    """``a·b`` of two 16-bit tiles, float32 accumulation."""
    if _WIDEN_DOTS:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@_helper
def _split_dot(a, b, TERMS: tl.constexpr):
    """``a·b`` for ``a`` float32 and ``b`` a 16-bit tile: the sum of the dots of ``a``'s
    ``TERMS`` 16-bit terms (of ``b``'s type) with ``b``."""
    hi = a.to(b.dtype)
    rest = a - hi.to(tl.float32)
    mid = rest.to(b.dtype)
    out = _mma(mid, b)
    if TERMS == 3:
        out += _mma((rest - mid.to(tl.float32)).to(b.dtype), b)
    return out + _mma(hi, b)


# The float16 weights' factor (2¹⁵: p·2¹⁵ ≤ 32768 < float16's largest, 65504) and its inverse.
_P_SCALE = tl.constexpr(32768.0)
_P_UNSCALE = tl.constexpr(1.0 / 32768.0)


@_helper
def _pow2_row_scale(q):
    """Per row of ``q``, the power of two that brings its largest magnitude into [1, 2) — into
    [2, 4) for a largest magnitude ≥ 2¹²⁷, whose factor 2⁻¹²⁷ is not a normal float32 (its
    exponent bits 0 made the factor 0.0 and zeroed the row) — and its inverse, both exact; 1
    for a row of zeros, subnormals or non-finite values."""
    amax = tl.max(tl.abs(q), 1)
    e = (amax.to(tl.int32, bitcast=True) >> 23) & 255
    ok = (e > 0) & (e < 255)
    e = tl.minimum(e, 253)
    up = tl.where(ok, (254 - e) << 23, 127 << 23).to(tl.float32, bitcast=True)
    down = tl.where(ok, e << 23, 127 << 23).to(tl.float32, bitcast=True)
    return up, down


@_helper
def _not_finite(x):
    """1 where ``x`` holds a NaN or ±inf, else 0 (int32 scalar)."""
    return tl.max(((x - x) != 0.0).to(tl.int32))


@triton.jit(do_not_specialize=["Hq", "Hkv", "G", "Lq", "D", "Dv", "page_size", "split", "win_left", "win_right"])
def decode_split(
    Q, K, V, TABLE, KVLEN, SLOPES, OUT, LSE, FLAG,
    sqb, sqh, sqm, sqd, skp, skh, sks, skd, svp, svh, svs, svd, stb, stp,
    sob, soh, som, soc, sod, slb, slh, slm, slc,
    Hq, Hkv, G, Lq, D, Dv, page_size, split, scale, softcap, win_left, win_right,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, EVEN_D: tl.constexpr, TERMS: tl.constexpr, REDO: tl.constexpr,
):
    """Split-KV decoding ("flash decoding"), grid ``(n_chunks, B·Hkv)``: the ``G·Lq`` query rows
    of one K/V head (GQA folded into rows, so each cached key is read once for the group)
    against keys ``[c·split, (c+1)·split)`` of one sequence, read through its page table.

    Writes the chunk's partial output ``OUT[b, h, i, c]`` (float32) and LSE ``LSE[b, h, i, c]``
    (float64; −inf for a chunk with no visible key), merged afterwards over chunks (:func:`decode_merge`);
    where a call has one chunk, ``OUT`` is the call's output (any float dtype: the store rounds
    to it) and ``LSE`` its LSE, with chunk strides 0.  ``Q`` in any float dtype.
    Query ``i`` sits at position ``kv_len − Lq + i`` (bottom-right); only keys below ``kv_len``
    are read.  ``EVEN_D``: D and Dv equal their blocks (no masked lanes: vector loads).

    Two passes share this body.  The first (``REDO`` off) computes every chunk with plain dots
    (``TERMS`` 0: float32 IEEE dots, for float32 caches; 2 or 3: the 16-bit terms above, for
    float16 and bfloat16 caches) and sets ``FLAG[b, hk, c]`` where a visible score or the
    output is not finite.  The second (``REDO`` on: float32 IEEE dots whatever ``TERMS``)
    recomputes the flagged chunks only, with the NaN/±inf rule of ``attn_fwd``
    (docs/semantics.md) that plain dots cannot keep: a hidden key's NaN/±inf value never meets
    its weight 0, a live key's still counts where its weight underflowed, an infinity already
    summed survives alpha's underflow.  Chunks of finite scores and outputs (all but rare
    calls) need none of that, and its code costs registers the first pass has no room for.
    """
    c = tl.program_id(0)
    pid = tl.program_id(1)
    flag_at = FLAG + pid * tl.num_programs(0) + c
    b = pid // Hkv
    hk = pid % Hkv
    n = tl.load(KVLEN + b).to(tl.int32)
    r = tl.arange(0, BLOCK_R)
    g = r // Lq
    i = r % Lq
    row_ok = r < G * Lq
    h = hk * G + g
    pos = n - Lq + i
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < (BLOCK_D if EVEN_D else D)  # all true for EVEN_D: the compiler sees it
    dv_ok = offs_dv < (BLOCK_DV if EVEN_D else Dv)
    q_ptrs = Q + b.to(tl.int64) * sqb + h[:, None].to(tl.int64) * sqh + i[:, None].to(tl.int64) * sqm + offs_d[None, :] * sqd
    # (q in its own dtype: a 16-bit q is widened here, exactly, not by a torch conversion on every call)
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    # q's rows in float16's range (TERMS 2): scores come out multiplied by `up`, taken off with
    # the scale (`down·scale` is exact: a power of two times the scale)
    row_scale = tl.full([BLOCK_R], scale, dtype=tl.float32)
    if TERMS == 2 and not REDO:
        up, down = _pow2_row_scale(q)
        q = q * up[:, None]
        row_scale = down * scale
    slope = tl.zeros([BLOCK_R], dtype=tl.float32)
    if HAS_ALIBI:
        slope = tl.load(SLOPES + b * Hq + h, mask=row_ok, other=0.0).to(tl.float32)
    lo = c * split
    hi = tl.minimum(lo + split, n)
    if HAS_WL:
        lo = tl.maximum(lo, n - Lq - win_left)
    if REDO:
        flag = tl.load(flag_at)
        hi = tl.where(flag != 0, hi, lo)  # an unflagged chunk reads nothing and stores nothing
    bad = tl.zeros([], dtype=tl.int32)
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)
    k_base = K + hk.to(tl.int64) * skh
    v_base = V + hk.to(tl.int64) * svh
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < hi
        page = tl.load(TABLE + b.to(tl.int64) * stb + (cols // page_size).to(tl.int64) * stp, mask=col_ok, other=0)
        slot = (cols % page_size).to(tl.int64)
        k = tl.load(k_base + page[:, None].to(tl.int64) * skp + slot[:, None] * sks + offs_d[None, :] * skd,
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_base + page[:, None].to(tl.int64) * svp + slot[:, None] * svs + offs_dv[None, :] * svd,
                    mask=col_ok[:, None] & dv_ok[None, :], other=0.0)
        if TERMS == 0 or REDO:
            s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision="ieee")
        else:
            s = _split_dot(q, tl.trans(k), TERMS)
        s = s * row_scale[:, None]
        dist = pos[:, None] - cols[None, :]  # query position − key position
        vis = row_ok[:, None] & col_ok[None, :]
        if CAUSAL:
            vis = vis & (dist >= 0)
        if HAS_WL:
            vis = vis & (dist <= win_left)
        if HAS_WR:
            vis = vis & (dist >= -win_right)
        if not REDO:
            bad = bad | _not_finite(tl.where(vis, s, 0.0))
        if HAS_SOFTCAP:
            s = softcap * _tanh(s / softcap)
        if HAS_ALIBI:
            s -= slope[:, None] * tl.abs(dist).to(tl.float32)
        s = tl.where(vis, s, float("-inf"))
        live = s != float("-inf")  # the pairs that take part (NaN scores included): docs/semantics.md
        p, alpha, l_i, m_i = _online_softmax(s, m_i, l_i)
        if REDO:
            # (until 4 Dec 2026 one tl.dot let 0·NaN through: a −inf score's key leaked its NaN
            # value into the row)
            acc = tl.where(tl.abs(acc) == float("inf"), acc, acc * alpha[:, None])
            acc = acc + _live_dot(p, live, live, v.to(tl.float32), False)
        elif TERMS == 0:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        elif TERMS == 2:  # (float16 terms: p scaled into their normal range, the product back, exactly)
            acc = acc * alpha[:, None] + _split_dot(p * _P_SCALE, v, TERMS) * _P_UNSCALE
        else:
            acc = acc * alpha[:, None] + _split_dot(p, v, TERMS)
    out, _ = _softmax_results(acc, m_i, l_i)
    # the LSE in float64 (LSE is float64 where the chunks are merged; a call's own float32 LSE
    # where there is one chunk, rounded once by the store): m + log l rounded to float32 is ≈
    # ulp(m) off — 1e-3 at m ≈ 1e4, a merge weight 5e-5 off where the scores were exact
    seen = l_i != 0.0
    lse = tl.where(seen, m_i.to(tl.float64) + tl.log(tl.where(seen, l_i, 1.0)).to(tl.float64), float("-inf"))
    o_ptrs = (OUT + b.to(tl.int64) * sob + h[:, None].to(tl.int64) * soh + i[:, None].to(tl.int64) * som
              + c.to(tl.int64) * soc + offs_dv[None, :] * sod)
    l_ptrs = LSE + b.to(tl.int64) * slb + h.to(tl.int64) * slh + i.to(tl.int64) * slm + c.to(tl.int64) * slc
    keep = row_ok
    if REDO:
        # (the flag as a row vector: the interpreter's & with a boolean scalar gave int32)
        keep = row_ok & (tl.zeros([BLOCK_R], dtype=tl.int32) + flag != 0)
    else:
        tl.store(flag_at, bad | _not_finite(acc))
    tl.store(o_ptrs, out, mask=keep[:, None] & dv_ok[None, :])
    tl.store(l_ptrs, lse, mask=keep)


@triton.jit(do_not_specialize=["Hq", "Lq", "Dv", "split"])
def decode_merge(
    PART_OUT, PART_LSE, KVLEN, OUT, LSE,
    spb, sph, spm, spc, spd, slb, slh, slm, slc, sob, soh, som, sod, sdb, sdh, sdm,
    Hq, Lq, Dv, split,
    BLOCK_C: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """The chunks' partial results of one query row merged by their LSEs, grid ``(B·Hq·Lq,)``:
    :func:`dotattn.merge_attention_states`'s rule (``kernels/_merge.py``) in one kernel instead
    of a few torch operations per chunk.  Only the row's own sequence's chunks are read, in
    blocks of ``BLOCK_C`` at fixed places, so the result does not depend on the batch.

    A part with LSE −inf is empty and brings nothing; a part whose weight underflowed to 0
    still brings its NaN/±inf entries; a NaN LSE makes the row NaN.  ``OUT`` may be of any float
    dtype (the store rounds the float32 row to it, to nearest even) and any strides.
    """
    row = tl.program_id(0)
    b = row // (Hq * Lq)
    h = (row // Lq) % Hq
    i = row % Lq
    n = tl.load(KVLEN + b).to(tl.int32)
    n_c = tl.maximum(1, tl.cdiv(n, split))
    offs_c = tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < Dv
    lse_base = PART_LSE + b.to(tl.int64) * slb + h.to(tl.int64) * slh + i.to(tl.int64) * slm
    out_base = PART_OUT + b.to(tl.int64) * spb + h.to(tl.int64) * sph + i.to(tl.int64) * spm
    # the parts' LSEs are float64 (decode_split): their differences to the largest are exact
    # there, and small enough for float32 once taken
    m = tl.full([], float("-inf"), dtype=tl.float64)
    nan = tl.zeros([], dtype=tl.int32)
    for c0 in range(0, n_c, BLOCK_C):
        cs = c0 + offs_c
        part = tl.load(lse_base + cs.to(tl.int64) * slc, mask=cs < n_c, other=float("-inf"))
        m = tl.maximum(m, tl.max(part))
        nan = nan | tl.max((part != part).to(tl.int32))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    m_safe = tl.where(nan != 0, float("nan"), m_safe)
    total = tl.zeros([], dtype=tl.float32)
    for c0 in range(0, n_c, BLOCK_C):
        cs = c0 + offs_c
        part = tl.load(lse_base + cs.to(tl.int64) * slc, mask=cs < n_c, other=float("-inf"))
        total += tl.sum(tl.exp((part - m_safe).to(tl.float32)))
    seen = total > 0.0
    safe_total = tl.where(seen, total, 1.0)
    acc = tl.zeros([BLOCK_DV], dtype=tl.float32)
    for c0 in range(0, n_c, BLOCK_C):
        cs = c0 + offs_c
        c_ok = cs < n_c
        part = tl.load(lse_base + cs.to(tl.int64) * slc, mask=c_ok, other=float("-inf"))
        x = tl.load(out_base + cs[:, None].to(tl.int64) * spc + offs_d[None, :] * spd,
                    mask=c_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.where(seen, tl.exp((part - m_safe).to(tl.float32)) / safe_total, 0.0)
        w = tl.where(total != total, float("nan"), w)
        empty = part == float("-inf")
        keep_x = ((x - x) != 0.0) & (empty == 0)[:, None]  # an underflowed part's NaN/±inf
        term = tl.where((w != 0.0)[:, None], w[:, None] * x, tl.where(keep_x, x, 0.0))
        acc += tl.sum(term, 0)
    tl.store(OUT + b.to(tl.int64) * sob + h.to(tl.int64) * soh + i.to(tl.int64) * som + offs_d * sod, acc, mask=d_ok)
    tl.store(LSE + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh + i.to(tl.int64) * sdm, m_safe + tl.log(total).to(tl.float64))


@triton.jit(do_not_specialize=["n_pairs", "D", "Dv"])
def decode_append(
    NEW_K, NEW_V, K, V, PAIRS, n_pairs,
    snkb, snkh, snkl, snkd, snvb, snvh, snvl, snvd, skp, skh, sks, skd, svp, svh, svs, svd, D, Dv,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """The append of a decode call, grid ``(n_pairs, Hkv)``: new token ``j`` of sequence ``b``
    (``NEW_K (B, Hkv, Lnew, D)``, ``NEW_V``) copied into slot ``s`` of page ``p`` of the caches
    (``K (P, Hkv, page_size, D)``, ``V``), for the pairs ``PAIRS (4, n_pairs)`` int64 of rows
    (p, s, b, j).  The new keys/values come in the caches' dtype (the caller converts, so the
    rounding is torch's): a copy of bits, one launch where torch's indexing took several."""
    t = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    page = tl.load(PAIRS + t)
    slot = tl.load(PAIRS + n_pairs + t)
    b = tl.load(PAIRS + 2 * n_pairs + t)
    j = tl.load(PAIRS + 3 * n_pairs + t)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    k = tl.load(NEW_K + b * snkb + h * snkh + j * snkl + offs_d * snkd, mask=d_ok)
    tl.store(K + page * skp + h * skh + slot * sks + offs_d * skd, k, mask=d_ok)
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < Dv
    v = tl.load(NEW_V + b * snvb + h * snvh + j * snvl + offs_dv * snvd, mask=dv_ok)
    tl.store(V + page * svp + h * svh + slot * svs + offs_dv * svd, v, mask=dv_ok)
