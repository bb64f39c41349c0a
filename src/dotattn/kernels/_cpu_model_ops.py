"""Fused element-wise steps of a Llama block on float32 token rows (``dotattn.models``), and
the matrix–vector products of its decode steps (:func:`gemv`, at the end).

RMSNorm with its residual add, rotate-half RoPE and SwiGLU, each one pass over its rows.
Written as NumPy operations they were 5–7 passes each over arrays of the prompt's size
(``B·L × hidden``), which at 4,096 tokens no longer fit in the caches: 1.4 s of a 7.5 s
prompt pass, as much as half the GEMMs' time.  Every kernel takes ``(chunk, chunks)`` and
works on rows ``[N·chunk/chunks, N·(chunk+1)/chunks)``, releasing the GIL, so
:func:`dotattn.kernels._launch.run_chunks` runs the chunks of one step side by side.

The arithmetic is float32 throughout, as in ``transformers``: sums of squares accumulate in
float32 (vector lanes), the divisions stay divisions, and SiLU's exponential is the attention
kernels' float32 ``2**x`` (``_cpu_primitives._exp2_one``: relative error ≤ 7.9e-8, 0 below 2**−125.5).
"""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from . import _cpu_amx as _amx
from ._cpu_amx_f32 import split_rows
from ._cpu_cache import install_locator
from ._cpu_decode_kernels import _prefetch
from ._cpu_primitives import LOG2E, _exp2_one, _gemm_f32, _mkl_threads_local
from ._cpu_sync import ENTERED, _store_release, finish_partners, partner_done
from ._entry_order import load_callee_first

install_locator()  # before any @njit(cache=True) below: the kernels cache beside the package

_JIT_CACHE = True
_FAST = {"nsz", "contract", "reassoc"}  # vector lanes for the sums; no approximate division
# error_model="numpy" on every kernel: with Python's (the default), each division tests its
# divisor for zero to raise ZeroDivisionError, and that branch kept LLVM from vectorizing
# any loop with a division in it (SwiGLU ran 2× slower than NumPy's seven passes).


@njit(cache=_JIT_CACHE, inline="always")
def _rows(n, chunk, chunks):
    return n * chunk // chunks, n * (chunk + 1) // chunks


@njit(cache=_JIT_CACHE, nogil=True, fastmath=_FAST, error_model="numpy")
def add_rms_norm(x, proj, add, weight, eps, h, chunk, chunks):
    """Rows of ``x (N, E)``: ``x += proj`` (when ``add``: the pending residual), then
    ``h = x / sqrt(mean(x²) + eps) · weight``."""
    N, E = x.shape
    r0, r1 = _rows(N, chunk, chunks)
    for i in range(r0, r1):
        xi, hi = x[i], h[i]
        if add:
            pi = proj[i]
            for j in range(E):
                xi[j] += pi[j]
        ss = np.float32(0.0)
        for j in range(E):
            ss += xi[j] * xi[j]
        rms = np.sqrt(ss / np.float32(E) + eps)
        for j in range(E):
            hi[j] = xi[j] / rms * weight[j]


@njit(cache=_JIT_CACHE, nogil=True, fastmath=_FAST, error_model="numpy")
def rope(qkv, positions, cos, sin, out, chunk, chunks):
    """Rows of ``qkv (N, ≥ H·D)``: its first ``H`` heads rotated into ``out (N, H, D)``.

    Rotate-half RoPE: ``[x1·cos − x2·sin, x2·cos + x1·sin]`` with ``x1, x2`` a head's two
    halves and ``cos``/``sin`` the tables' rows ``(positions, ≥ D/2)`` at the row's position
    ``positions[i]`` (the tables' two halves are equal; the first is read).
    """
    N, H, D = out.shape
    half = D // 2
    r0, r1 = _rows(N, chunk, chunks)
    for i in range(r0, r1):
        src, c, s = qkv[i], cos[positions[i]], sin[positions[i]]
        for hh in range(H):
            dst = out[i, hh]
            base = hh * D
            for j in range(half):
                x1, x2 = src[base + j], src[base + half + j]
                dst[j] = x1 * c[j] - x2 * s[j]
                dst[half + j] = x2 * c[j] + x1 * s[j]


@njit(cache=_JIT_CACHE, nogil=True, fastmath=_FAST, error_model="numpy")
def swiglu(gate_up, act, chunk, chunks):
    """Rows of ``gate_up (N, 2F)`` = ``[gate | up]``: ``act (N, F) = silu(gate) · up``.

    ``silu(g) = g · sigmoid(g)`` with ``sigmoid(g) = 1/(1 + e)`` for ``g ≥ 0`` and
    ``e/(1 + e)`` for ``g < 0``, ``e = e**−|g|``: the exponential only ever sees arguments
    ≤ 0, so nothing overflows (a very negative gate gives 0, SiLU's limit).
    """
    N, F = act.shape
    r0, r1 = _rows(N, chunk, chunks)
    one, log2e, zero = np.float32(1.0), np.float32(LOG2E), np.float32(0.0)
    for i in range(r0, r1):
        gu, a = gate_up[i], act[i]
        for j in range(F):
            g = gu[j]
            e = _exp2_one(-abs(g), log2e, zero)  # e**−|g| = 2**(−|g|·log2 e): the kernels' exp
            num = one if g >= 0 else e
            a[j] = g * (num / (one + e)) * gu[F + j]


# ---- matrix–vector products of a decode step ------------------------------------------------
# A decode step multiplies a few token rows by every weight matrix once: ≈ 2 FLOPs per 4-byte
# weight read, so its time is the time to stream the weights from memory.  MKL's GEMM with
# one row (torch.mm) streamed them at ≈ 11–18 GB/s on both cores here; these loops read them
# in order, four weight rows at a time (each x element loaded once per four FMAs), with the
# row range split into one chunk per thread of a Numba prange team.  A team, not Python pool
# threads taking row blocks from a shared counter (the attention kernels' way): a product
# here lasts 0.1–0.3 ms, and a pool thread woken per product started too late to help — in
# the model at 512 tokens (load 1.2–1.5) the pool version decoded at 20.8 tok/s, the team
# at 30.5, torch.mm at 23.7.  The team's known cost, a launch that waits for a descheduled
# thread on a busy machine, is what smollm._StepThreads' one-thread mode is for.
GEMV_ROW_BLOCK = 4


@njit(cache=_JIT_CACHE, inline="always")
def _dot_row_block(x, w0, w1, w2, w3, out, o):
    """``out[b, o + k] = Σ_i x[b, i] · wk[i]`` for four weight rows ``w0…w3`` and every token row."""
    B, I = x.shape
    for b in range(B):
        xb = x[b]
        a0 = np.float32(0.0)
        a1 = np.float32(0.0)
        a2 = np.float32(0.0)
        a3 = np.float32(0.0)
        for i in range(I):
            xi = xb[i]
            a0 += w0[i] * xi
            a1 += w1[i] * xi
            a2 += w2[i] * xi
            a3 += w3[i] * xi
        ob = out[b]
        ob[o] = a0
        ob[o + 1] = a1
        ob[o + 2] = a2
        ob[o + 3] = a3


@njit(cache=_JIT_CACHE, inline="always")
def _dot_row_block_pairs(x, w0, w1, w2, w3, out, o):
    """:func:`_dot_row_block` two token rows at a time: eight sums share each weight load
    (four rows by one token row load five vectors for four FMAs, bound by the loads)."""
    B, I = x.shape
    b = 0
    while b + 2 <= B:
        xa, xb = x[b], x[b + 1]
        a0 = np.float32(0.0)
        a1 = np.float32(0.0)
        a2 = np.float32(0.0)
        a3 = np.float32(0.0)
        b0 = np.float32(0.0)
        b1 = np.float32(0.0)
        b2 = np.float32(0.0)
        b3 = np.float32(0.0)
        for i in range(I):
            u, v = xa[i], xb[i]
            a0 += w0[i] * u
            a1 += w1[i] * u
            a2 += w2[i] * u
            a3 += w3[i] * u
            b0 += w0[i] * v
            b1 += w1[i] * v
            b2 += w2[i] * v
            b3 += w3[i] * v
        oa, ob = out[b], out[b + 1]
        oa[o], oa[o + 1], oa[o + 2], oa[o + 3] = a0, a1, a2, a3
        ob[o], ob[o + 1], ob[o + 2], ob[o + 3] = b0, b1, b2, b3
        b += 2
    if b < B:
        _dot_row_block(x[b:], w0, w1, w2, w3, out[b:], o)


@njit(cache=_JIT_CACHE, inline="always")
def _dot_row(x, wo, out, o):
    """``out[b, o] = Σ_i x[b, i] · wo[i]`` for one weight row and every token row."""
    B, I = x.shape
    for b in range(B):
        xb = x[b]
        acc = np.float32(0.0)
        for i in range(I):
            acc += wo[i] * xb[i]
        out[b, o] = acc


@njit(cache=_JIT_CACHE, nogil=True, fastmath=_FAST, error_model="numpy")
def gemv_rows(x, w, out, r0, r1):
    """``out[b, o] = Σ_i x[b, i] · w[o, i]`` for output rows ``o ∈ [r0, r1)``: ``x (B, I)``,
    ``w (O, I)`` row-major (a linear layer's ``(out, in)`` weight), ``out (B, O)``.

    Float32 sums over ``i`` in vector lanes (reassociated, as any BLAS does); NaN and inf
    propagate as in a product (no ``nnan``/``ninf`` flags).
    """
    o = r0
    while o + GEMV_ROW_BLOCK <= r1:
        _dot_row_block(x, w[o], w[o + 1], w[o + 2], w[o + 3], out, o)
        o += GEMV_ROW_BLOCK
    while o < r1:  # the last rows of an O that is not a multiple of the block
        _dot_row(x, w[o], out, o)
        o += 1


@njit(cache=_JIT_CACHE, inline="always")
def _block_rows(n, chunk, chunks):
    """Rows ``[r0, r1)`` of chunk ``chunk``: boundaries on multiples of the row block."""
    blocks = (n + GEMV_ROW_BLOCK - 1) // GEMV_ROW_BLOCK
    return min(n, blocks * chunk // chunks * GEMV_ROW_BLOCK), min(n, blocks * (chunk + 1) // chunks * GEMV_ROW_BLOCK)


@njit(cache=_JIT_CACHE, parallel=True, fastmath=_FAST, error_model="numpy")
def gemv(x, w, out, chunks):
    """:func:`gemv_rows` over all of ``w``'s rows in ``chunks`` chunks, one per thread of
    Numba's team (the caller passes ``numba.get_num_threads()``: read inside the kernel it
    would keep Numba from caching the machine code).  With one thread, call
    :func:`gemv_rows` directly: no parallel launch."""
    O = w.shape[0]
    for c in numba.prange(chunks):
        r0, r1 = _block_rows(O, c, chunks)
        gemv_rows(x, w, out, r0, r1)


# ---- a short prompt pass's products: fixed column chunks, each one sgemm on one thread -----
# SmolLM's prompt passes of 9–127 token rows run on all cores or on the caller alone, as a
# chooser picks; MKL on two threads splits the depth of some of these products and rounds
# differently from one thread.  Here the chunks are the same in both modes — each an sgemm of
# the same shape at the same addresses, MKL pinned to its thread — on Numba's team (whose
# workers spin between products, as torch's OpenMP ones do: a pool thread woken per product
# started ≈ 0.1 ms late) or in turn on the caller.  Needs the bound sgemm to be MKL's
# (_cpu_isa.f32_gemm()).


@njit(cache=_JIT_CACHE, nogil=True)
def gemm_columns_rows(x, w, out, c0, c1, chunks):
    """``out[:, cols] = x · w[cols]ᵀ`` for the column chunks ``c ∈ [c0, c1)`` of ``chunks``
    (chunk ``c``: ``w``'s rows ``[O·c // chunks, O·(c + 1) // chunks)``), each one sgemm on
    this thread: ``x (R, I)`` and ``out (R, O)`` with contiguous rows, ``w (O, I)`` row-major."""
    O = w.shape[0]
    previous = _mkl_threads_local(1)
    for c in range(c0, c1):
        a, b = O * c // chunks, O * (c + 1) // chunks
        if b > a:
            _gemm_f32(x, w[a:b].T, out[:, a:b], 0.0)
    _mkl_threads_local(previous)


@njit(cache=_JIT_CACHE, parallel=True)
def gemm_columns(x, w, out, chunks):
    """:func:`gemm_columns_rows` over all ``chunks`` on Numba's team (one chunk per iteration:
    the bits do not depend on which thread runs a chunk)."""
    for c in numba.prange(chunks):
        # (prange's index is a uint64: as an int64, the one-thread mode's entry)
        gemm_columns_rows(x, w, out, np.int64(c), np.int64(c) + 1, chunks)


# ---- the same products on block-coded weights ------------------------------------------------
# ``models/_block_weights.py``: a matrix whose values are, per block of BLOCK values of a row,
# ``float32(scale·code) + offset`` with int8 codes — exactly (GGUF's Q8_0/Q4_1 weights after
# gguf's float32 dequantization).  Kept that way it is 1.25 bytes a value instead of 4, and a
# decode step streams 3.3× fewer bytes.  The product groups each row's sum by block:
# ``Σ_b (scale_b · Σ_j code_j·x_j + offset_b · Σ_j x_j)`` — the same weights, the sum's
# rounding in another order (as between any two BLAS).
BLOCK = 32
PREFETCH_AHEAD = 2048  # bytes of codes ahead of the current ones that the block loop asks for


@njit(cache=_JIT_CACHE, inline="always")
def _round_to_half(x):
    """``x`` (≥ 0, float64) rounded to the nearest float16 number (as float32; ties to even,
    float16's subnormal step 2**−24 below 2**−14; no overflow handling: a candidate only)."""
    if x == 0.0:
        return np.float32(0.0)
    _, e = math.frexp(x)
    step = max(e - 11, -24)  # float16 keeps 11 significant bits, down to 2**-24
    return np.float32(math.ldexp(np.rint(math.ldexp(x, -step)), step))


@njit(cache=_JIT_CACHE, inline="always")
def _try_codes(row, j0, s, off, low, high, codes):
    """Codes of ``row[j0 : j0 + BLOCK]`` for scale ``s`` and offset ``off``; True if
    ``float32(s·code) + off`` gives back every value bit for bit.  (Two loops without an early
    exit, and rounding by ``floor(v + 0.5)``, which has a vector instruction: both vectorize.)"""
    inv = np.float32(0.0) if s == 0 else np.float32(1.0) / s  # a guess: the check below decides
    half = np.float32(0.5)
    wrong = 0  # a count, not a bool: the loop then vectorizes
    for j in range(j0, j0 + BLOCK):
        q = min(max(np.floor((row[j] - off) * inv + half), low), high)
        codes[j] = np.int8(q)
        wrong += np.int32(s * q + off != row[j])
    return wrong == 0


@njit(cache=_JIT_CACHE, nogil=True, error_model="numpy")
def block_codes(w, levels, symmetric, codes, scale, offset, failed, chunk, chunks):
    """Find ``codes (O, I)`` int8, ``scale``/``offset (O, I/BLOCK)`` float32 with
    ``w[o, b·BLOCK + j] == float32(scale[o, b]·codes[o, b·BLOCK + j]) + offset[o, b]`` for
    the form ``(levels, symmetric)``: codes in ``[−levels, levels]`` and offset 0, or in
    ``[0, levels]`` above the block's minimum — for the rows of chunk ``chunk`` of ``chunks``.
    ``failed[chunk]`` becomes 1 at the first block that no tried scale rebuilds exactly, else 0.

    The scale tried is the block's span over ``levels`` (the value of largest magnitude, or
    the largest, has the extreme code), rounded to float16 first — the file's scales are
    float16 — then as float32; the check, not the guess, makes the result exact.
    """
    O, I = w.shape
    high = np.float32(levels)
    low = -high if symmetric else np.float32(0.0)
    failed[chunk] = 0
    r0, r1 = _rows(O, chunk, chunks)
    for o in range(r0, r1):
        row = w[o]
        for b in range(I // BLOCK):
            j0 = b * BLOCK
            lo, hi, big = row[j0], row[j0], abs(row[j0])
            for j in range(j0 + 1, j0 + BLOCK):
                v = row[j]
                lo, hi, big = min(lo, v), max(hi, v), max(big, abs(v))
            off = np.float32(0.0) if symmetric else lo
            span = np.float64(big) if symmetric else np.float64(hi) - np.float64(lo)
            estimate = span / levels
            s = _round_to_half(estimate)
            ok = _try_codes(row, j0, s, off, low, high, codes[o])
            if not ok:
                s = np.float32(estimate)
                ok = _try_codes(row, j0, s, off, low, high, codes[o])
            if not ok:
                failed[chunk] = 1
                return
            scale[o, b], offset[o, b] = s, off


@njit(cache=_JIT_CACHE, nogil=True, fastmath=_FAST, error_model="numpy")
def block_sums(x, sums):
    """``sums[r, b] = Σ_j x[r, b·BLOCK + j]``: the offsets' factor, once per product."""
    R, I = x.shape
    for r in range(R):
        for b in range(I // BLOCK):
            acc = np.float32(0.0)
            for j in range(b * BLOCK, (b + 1) * BLOCK):
                acc += x[r, j]
            sums[r, b] = acc


# no "reassoc": the lane loops vectorize without it (each lane is its own sum), and without it
# a row's bits do not depend on whether it went through the four-row loop or the rest loop
_LANES = {"nsz", "contract"}


@njit(cache=_JIT_CACHE, nogil=True, fastmath=_LANES, error_model="numpy")
def gemv_blocks_rows(x, xsums, codes, scale, offset, has_offset, out, r0, r1):
    """:func:`gemv_rows` for block-coded weights: ``out[r, o] = Σ_j w[o, j]·x[r, j]`` with
    ``w[o, j] = scale[o, b]·codes[o, j] + offset[o, b]`` (``b = j // BLOCK``), for output rows
    ``o ∈ [r0, r1)``, four weight rows at a time (each x element loaded once per four rows).

    ``scale·code`` (exact: the weight less its offset) times ``x`` goes into one of BLOCK
    lane sums per row, which the vector loop keeps lane-wise across blocks (a sum per block
    would end every block in a horizontal reduction); ``offset·Σ_block x`` (``xsums``) goes
    into a plain sum.
    """
    R, I = x.shape
    nb = I // BLOCK
    lanes = np.empty((GEMV_ROW_BLOCK, BLOCK), np.float32)
    o = r0
    while o < r1:
        rows = min(GEMV_ROW_BLOCK, r1 - o)
        for r in range(R):
            xr = x[r]
            lanes[:] = 0.0
            if rows == GEMV_ROW_BLOCK:
                c0, c1, c2, c3 = codes[o], codes[o + 1], codes[o + 2], codes[o + 3]
                l0, l1, l2, l3 = lanes[0], lanes[1], lanes[2], lanes[3]
                for b in range(nb):
                    s0, s1, s2, s3 = scale[o, b], scale[o + 1, b], scale[o + 2, b], scale[o + 3, b]
                    j0 = b * BLOCK
                    # the four rows are consecutive in memory and advance 4·BLOCK bytes a block:
                    # ask for the two lines that far ahead of the row block's start
                    ahead = GEMV_ROW_BLOCK * j0 + PREFETCH_AHEAD
                    _prefetch(c0, ahead)
                    _prefetch(c0, ahead + 64)
                    for j in range(BLOCK):
                        xi = xr[j0 + j]
                        l0[j] += s0 * np.float32(c0[j0 + j]) * xi
                        l1[j] += s1 * np.float32(c1[j0 + j]) * xi
                        l2[j] += s2 * np.float32(c2[j0 + j]) * xi
                        l3[j] += s3 * np.float32(c3[j0 + j]) * xi
            else:  # the last rows of an O that is not a multiple of the row block
                for k in range(rows):
                    ck, lk = codes[o + k], lanes[k]
                    for b in range(nb):
                        sk = scale[o + k, b]
                        j0 = b * BLOCK
                        for j in range(BLOCK):
                            lk[j] += sk * np.float32(ck[j0 + j]) * xr[j0 + j]
            for k in range(rows):
                acc = np.float32(0.0)
                for j in range(BLOCK):
                    acc += lanes[k, j]
                if has_offset:
                    for b in range(nb):
                        acc += offset[o + k, b] * xsums[r, b]
                out[r, o + k] = acc
        o += rows


@njit(cache=_JIT_CACHE, nogil=True, fastmath=_FAST, error_model="numpy")
def gemm_blocks_rows(x, codes, scale, offset, has_offset, out, r0, r1):
    """:func:`gemv_rows` by the block-coded weights' float32 values, for more token rows than
    :func:`gemv_blocks_rows` serves well: each block of four weight rows is rebuilt once
    (``float32(scale·code) + offset``: the weights themselves, exactly) into a buffer that
    stays in L1, and every token row is multiplied by it, two token rows at a time (eight
    sums share each load: 10–30 % faster than one row at a time, 16 FMA lanes a cycle at
    16–24 rows, Numba's 8-lane vectors' ceiling).  The matrix–vector kernel converts the
    codes again for every token row (a whole pass a row: 0.93 ms a row for SmolLM2's
    49,152 × 576 head); here the codes are read once, at 1.25 bytes a value, whatever the
    rows.  Each output element is one thread's sum in a fixed order: the same bits on any
    thread count."""
    R, I = x.shape
    nb = I // BLOCK
    wbuf = np.empty((GEMV_ROW_BLOCK, I), np.float32)
    w0, w1, w2, w3 = wbuf[0], wbuf[1], wbuf[2], wbuf[3]
    zero = np.float32(0.0)
    o = r0
    while o + GEMV_ROW_BLOCK <= r1:
        # ---- the row block's float32 weights, once (four rows in one loop: it vectorizes;
        # a loop of one row's 32-value block did not, and ran 3× slower) ----
        c0, c1, c2, c3 = codes[o], codes[o + 1], codes[o + 2], codes[o + 3]
        for b in range(nb):
            s0, s1, s2, s3 = scale[o, b], scale[o + 1, b], scale[o + 2, b], scale[o + 3, b]
            if has_offset:
                m0, m1, m2, m3 = offset[o, b], offset[o + 1, b], offset[o + 2, b], offset[o + 3, b]
            else:
                m0 = m1 = m2 = m3 = zero
            j0 = b * BLOCK
            for j in range(j0, j0 + BLOCK):
                w0[j] = s0 * np.float32(c0[j]) + m0
                w1[j] = s1 * np.float32(c1[j]) + m1
                w2[j] = s2 * np.float32(c2[j]) + m2
                w3[j] = s3 * np.float32(c3[j]) + m3
        # ---- every token row against them ----
        _dot_row_block_pairs(x, w0, w1, w2, w3, out, o)
        o += GEMV_ROW_BLOCK
    while o < r1:  # the last rows of an O that is not a multiple of the block
        for b in range(nb):
            sk = scale[o, b]
            m = offset[o, b] if has_offset else zero
            for j in range(b * BLOCK, (b + 1) * BLOCK):
                w0[j] = sk * np.float32(codes[o, j]) + m
        _dot_row(x, w0, out, o)
        o += 1


@njit(cache=_JIT_CACHE, parallel=True, fastmath=_FAST, error_model="numpy")
def gemm_blocks(x, codes, scale, offset, has_offset, out, chunks):
    """:func:`gemm_blocks_rows` over all rows in ``chunks`` chunks on Numba's team (as :func:`gemv`)."""
    O = codes.shape[0]
    for c in numba.prange(chunks):
        r0, r1 = _block_rows(O, c, chunks)
        gemm_blocks_rows(x, codes, scale, offset, has_offset, out, r0, r1)


@njit(cache=_JIT_CACHE, parallel=True, fastmath=_LANES, error_model="numpy")
def gemv_blocks(x, xsums, codes, scale, offset, has_offset, out, chunks):
    """:func:`gemv_blocks_rows` over all rows in ``chunks`` chunks on Numba's team (as :func:`gemv`)."""
    O = codes.shape[0]
    for c in numba.prange(chunks):
        r0, r1 = _block_rows(O, c, chunks)
        gemv_blocks_rows(x, xsums, codes, scale, offset, has_offset, out, r0, r1)


# ---- a prompt pass's products on AMX: block codes as bfloat16 pairs --------------------------
# A prompt pass multiplies hundreds of token rows by each weight matrix: compute-bound, and
# MKL's float32 sgemm runs at the FMA units' rate (≈ 170 GFLOP/s a core here: 77 % of SmolLM2's
# 512-token pass, docs/models.md).  Block-coded weights are small integers (|code| ≤ 127) times
# a per-block scale, plus a per-block offset: the codes are exact in bfloat16, so AMX's
# ``tdpbf16ps`` multiplies them exactly by the three bfloat16 pieces of each token value
# (hi + mid + lo = the float32 value: ``_cpu_amx_f32``), one block (32 values) deep.  Each
# block's 32 × 32 output block is stored and added into a float32 accumulator, scaled by the
# block's scales, plus the row's block sum times its offsets:
#     out[t, o] = Σ_b scale[o, b]·Σ_j code[o, j]·x[t, j] + offset[o, b]·Σ_j x[t, j]
# — gemv_blocks' grouping; every product exact, each block's sum and the accumulation in
# float32.  Each output element is one thread's sum in a fixed order: the same bits on any
# chunking.  (x's largest magnitude must be in the pieces' range, _cpu_amx_f32.ok_range: the
# tile unit flushes subnormal pieces; the caller checks it, from split_rows_sums' ``top``.)
PAIRS_COLS = 32  # output columns per block of the pairs layout (a 2 × 2 tile product's width)


@njit(cache=_JIT_CACHE, nogil=True)
def block_pairs(codes, out):
    """``out (O/32, I/2, 32)`` uint32 ← the codes ``(O, I)`` int8 as bfloat16 bits in depth pairs,
    per block of 32 output rows: word ``(ob, k, c) = bf16(codes[32·ob + c, 2k]) |
    bf16(codes[32·ob + c, 2k + 1]) << 16`` (the AMX B operand of :func:`gemm_pairs`;
    an integer of 8 bits or fewer is exact in bfloat16: the top half of its float32 bits)."""
    O, I = codes.shape
    for ob in range(O // PAIRS_COLS):
        blk = out[ob]
        for c in range(PAIRS_COLS):
            row = codes[ob * PAIRS_COLS + c]
            for k in range(I // 2):
                lo = np.float32(row[2 * k]).view(np.uint32) >> np.uint32(16)
                hi = np.float32(row[2 * k + 1]).view(np.uint32) >> np.uint32(16)
                blk[k, c] = lo | (hi << np.uint32(16))


@njit(cache=_JIT_CACHE, nogil=True, fastmath=_FAST, error_model="numpy")
def split_rows_sums(x, pieces, sums, top, chunk, chunks):
    """Rows of chunk ``chunk`` of ``pieces``' ``Mp`` rows: ``pieces (3, Mp, I)`` ← the bfloat16
    pieces of ``x (M, I)`` (rows contiguous; rows past M zero), ``sums (Mp, I/BLOCK)`` ← each
    row's block sums (float32), ``top[chunk]`` ← the chunk's largest ``|x|`` as its bits
    (uint32 ``bits & 0x7FFFFFFF``: an integer maximum, which vectorizes; ±inf 0x7F800000, a
    NaN more — :func:`_cpu_amx_f32.bits_to_largest`)."""
    M, I = x.shape
    Mp = pieces.shape[1]
    r0, r1 = _rows(Mp, chunk, chunks)
    n = max(min(r1, M) - r0, 0)  # this chunk's real rows
    if r1 > r0:
        split_rows(x[r0 : r0 + n], pieces[:, r0:r1], n, I)
    mask = np.uint32(0x7FFFFFFF)
    big = np.uint32(0)
    for m in range(r0, r1):
        srow = sums[m]
        if m >= M:
            srow[:] = 0.0
            continue
        row = x[m]
        bits = row.view(np.uint32)
        for i in range(I):
            v = bits[i] & mask
            big = v if v > big else big
        for b in range(I // BLOCK):
            s = np.float32(0.0)
            for j in range(b * BLOCK, (b + 1) * BLOCK):
                s += row[j]
            srow[b] = s
    top[chunk] = big


_V16F = ir.VectorType(ir.FloatType(), 16)


@intrinsic
def _scaled_add_block(typingctx, acc, s, scale, sums, sums_step, offset, has_offset):
    """``acc[r, 0:32] += s[r, 0:32]·scale[0:32] (+ sums[r·sums_step]·offset[0:32])`` for the 32
    rows of a 32 × 32 float32 block (rows 128 bytes apart; addresses as integers), the scales
    and offsets loaded once: two FMAs a 16-lane vector (a Numba loop reloaded them every row)."""

    def codegen(context, builder, signature, args):
        acc, s, scale, sums, sums_step, offset, has_offset = args
        _amx._amx_function(context, builder, _amx._AVX512)
        i64 = ir.IntType(64)
        undef = ir.Constant(_V16F, ir.Undefined)
        fma = builder.module.declare_intrinsic("llvm.fma.v16f32", fnty=ir.FunctionType(_V16F, [_V16F] * 3))

        def vec(addr, off):
            return builder.inttoptr(builder.add(addr, ir.Constant(i64, off)), _V16F.as_pointer())

        scales = [builder.load(vec(scale, o), align=4) for o in (0, 64)]
        with builder.if_else(builder.icmp_signed("!=", has_offset, ir.Constant(i64, 0))) as (with_offset, without):
            for use_offset, branch in ((True, with_offset), (False, without)):
                with branch:
                    offsets = [builder.load(vec(offset, o), align=4) for o in (0, 64)] if use_offset else None
                    with cgutils.for_range(builder, ir.Constant(i64, 32)) as loop:
                        r = loop.index
                        row = builder.mul(r, ir.Constant(i64, 128))
                        if use_offset:
                            at = builder.add(sums, builder.mul(r, builder.mul(sums_step, ir.Constant(i64, 4))))
                            v = builder.load(builder.inttoptr(at, ir.FloatType().as_pointer()), align=4)
                            first = builder.insert_element(undef, v, ir.Constant(ir.IntType(32), 0))
                            row_sum = builder.shuffle_vector(first, undef, ir.Constant(ir.VectorType(ir.IntType(32), 16), [0] * 16))
                        for k, o in enumerate((0, 64)):
                            ap = vec(builder.add(acc, row), o)
                            total = builder.call(fma, [builder.load(vec(builder.add(s, row), o), align=4), scales[k], builder.load(ap, align=4)])
                            if use_offset:
                                total = builder.call(fma, [row_sum, offsets[k], total])
                            builder.store(total, ap, align=4)
        return context.get_dummy_value()

    sig = types.void(types.int64, types.int64, types.int64, types.int64, types.int64, types.int64, types.int64)
    return sig, codegen


@njit(cache=_JIT_CACHE, inline="always")
def _block_product(a0, a_ps, a_ld, b0, m0, b):
    """Tiles 0–3 ← block ``b``'s 32 × 32 output block at token row ``m0``: the three pieces of
    the rows (A, lo first, hi last: smallest terms first) by the block's code pairs (B, kept in
    tiles 6 and 7 for the three)."""
    _amx._zero0()
    _amx._zero1()
    _amx._zero2()
    _amx._zero3()
    bb = b0 + b * 16 * 4 * PAIRS_COLS  # 16 pair rows of 32 words
    _amx._load6(bb, 4 * PAIRS_COLS)
    _amx._load7(bb + 64, 4 * PAIRS_COLS)
    for p in range(2, -1, -1):
        ab = a0 + p * a_ps + m0 * a_ld + 2 * BLOCK * b
        _amx._load4(ab, a_ld)
        _amx._load5(ab + 16 * a_ld, a_ld)
        _amx._dot046()
        _amx._dot147()
        _amx._dot256()
        _amx._dot357()


@njit(cache=_JIT_CACHE, nogil=True, error_model="numpy")
def gemm_pairs(pieces, sums, pairs, scale_t, offset_t, has_offset, out, chunk, chunks):
    """``out[:, cols] = x·Wᵀ`` for chunk ``chunk`` of ``chunks`` of the output's 32-column
    blocks, on AMX (see above): ``pieces (3, Mp, I)`` and ``sums (Mp, I/BLOCK)`` from
    :func:`split_rows_sums`, ``pairs (O/32, I/2, 32)`` from :func:`block_pairs`, ``scale_t``
    and ``offset_t (I/BLOCK, O)`` the scales and offsets transposed (read only with
    ``has_offset``), ``out (M, O)`` float32 (rows past M not written).

    Token blocks outer, column blocks inner: a token block's pieces (≤ 300 KiB) stay in L2
    while the chunk's code pairs stream (the other order read every token block's pieces
    again for each column block: 1.62 against 2.38 ms for 512 × 1536 → 576 on two threads).
    Each block's tiles are stored to a scratch and scaled into the accumulator one block later,
    while the next block's products run."""
    Mp, I = pieces.shape[1], pieces.shape[2]
    M, O = out.shape
    nb = I // BLOCK
    ncb = O // PAIRS_COLS
    c0, c1 = _rows(ncb, chunk, chunks)
    if c1 <= c0:
        return
    buf = np.empty(2 * 1024 + 1024 + 32, np.float32)  # two stored blocks and the accumulator
    skip = (-buf.ctypes.data) % 64 // 4
    s_base = buf[skip:].ctypes.data
    acc = buf[skip + 2048 : skip + 3072].reshape(32, PAIRS_COLS)
    acc0 = acc.ctypes.data
    a0, a_ps, a_ld = pieces.ctypes.data, pieces.strides[0], pieces.strides[1]
    cfg = _amx.tile_config()
    sums0, sums_step = sums.ctypes.data, sums.strides[0] // 4
    with_offset = 1 if has_offset else 0
    _amx._tile_config(cfg.ctypes.data)
    for m0 in range(0, Mp, 32):
        for cb in range(c0, c1):
            n0 = cb * PAIRS_COLS
            b0 = pairs[cb].ctypes.data
            acc[:] = 0.0
            pend = 0
            for b in range(nb):
                _block_product(a0, a_ps, a_ld, b0, m0, b)
                if b > 0:  # the block before, while this one's products run
                    _scaled_add_block(acc0, s_base + pend * 4096, scale_t[b - 1, n0:].ctypes.data,
                                      sums0 + 4 * (m0 * sums_step + b - 1), sums_step, offset_t[b - 1, n0:].ctypes.data, with_offset)
                pend ^= 1
                _amx._store_2x2(s_base + pend * 4096, 128)
            _scaled_add_block(acc0, s_base + pend * 4096, scale_t[nb - 1, n0:].ctypes.data,
                              sums0 + 4 * (m0 * sums_step + nb - 1), sums_step, offset_t[nb - 1, n0:].ctypes.data, with_offset)
            for r in range(min(32, M - m0)):
                orow, arow = out[m0 + r], acc[r]
                for c in range(PAIRS_COLS):
                    orow[n0 + c] = arow[c]
    _amx._tile_release()


# =================================================================================
# the prompt pass's chunked steps on the spinning partner threads (_launch.Partners)
# =================================================================================

# The steps a prompt pass runs in chunks (``fn(*args, chunk, chunks)``), by their argument count:
# the counts differ, so one caller's and one partner's entry serve them all, the kernel chosen
# at compile time from the arguments' tuple (:func:`chunk_kernel`).  On the Intel Xeon of 5 Dec
# 2026 a 128-token prompt pass handed 361 chunks to the pool; on the partners it took 127
# instead of 161 ms (docs/models.md, "the prompt pass's steps on the partners").
CHUNK_KERNELS = {6: add_rms_norm, 5: rope, 2: swiglu, 4: split_rows_sums, 7: gemm_pairs}


def chunk_kernel(nargs: int):
    """The chunked step taking ``nargs`` arguments before ``chunk, chunks`` (or None)."""
    return CHUNK_KERNELS.get(nargs)


def _run_chunk(args, chunk, chunks):
    raise NotImplementedError("compiled only")


@overload(_run_chunk, jit_options={"cache": _JIT_CACHE})
def _run_chunk_overload(args, chunk, chunks):
    kernel = chunk_kernel(len(args))
    if kernel is None:
        return None
    return lambda args, chunk, chunks: kernel(*args, chunk, chunks)


@njit(cache=_JIT_CACHE, nogil=True)
def chunks_caller(flags, gen, partners, max_cycles, args, chunks):
    """The caller's side of a chunked step on the partners: ``flags[ENTERED] = gen`` (the GIL is
    free from here on), chunk 0, then ``_cpu_sync.finish_partners``; the chunk of a partner
    cancelled there (asleep still) runs here.  True when no partner is left running."""
    _store_release(flags, ENTERED, gen)
    _run_chunk(args, 0, chunks)
    cancelled, left = finish_partners(flags, gen, partners, max_cycles)
    for i in range(partners):
        if cancelled & (1 << i):
            _run_chunk(args, i + 1, chunks)
    return left == 0


@njit(cache=_JIT_CACHE, nogil=True)
def chunks_partner(flags, i, gen, args, chunks):
    """Partner ``i``'s side: chunk ``i + 1``, then ``gen`` in its DONE slot."""
    _run_chunk(args, i + 1, chunks)
    partner_done(flags, i, gen)


def _chunk_kernel_at(at: int):
    """For :func:`~._entry_order.load_callee_first`: the chunked step whose argument tuple is an
    entry's argument ``at``, and that step's own signature (``… , chunk, chunks``)."""

    def callee_for(args):
        step = args[at]
        kernel = chunk_kernel(len(step.types))
        return None if kernel is None else (kernel, (*step.types, types.int64, types.int64))

    return callee_for


# each step's own entry loads before the partners' entries that run it: one machine code per
# step, whatever the process ran first (kernels/_entry_order.py)
load_callee_first(chunks_caller, _chunk_kernel_at(4))
load_callee_first(chunks_partner, _chunk_kernel_at(3))
# and each product's one-thread entry (the one-thread mode's) before the team's entry that runs it
_I64 = types.int64
load_callee_first(gemv, lambda a: (gemv_rows, (*a[:3], _I64, _I64)))
load_callee_first(gemm_columns, lambda a: (gemm_columns_rows, (*a[:3], _I64, _I64, _I64)))
load_callee_first(gemm_blocks, lambda a: (gemm_blocks_rows, (*a[:6], _I64, _I64)))
load_callee_first(gemv_blocks, lambda a: (gemv_blocks_rows, (*a[:7], _I64, _I64)))


def precompile_chunk_entries() -> None:
    """Load or compile :func:`chunks_caller` and :func:`chunks_partner` for every signature the
    chunked steps have so far (``dotattn precompile``, after the model steps)."""
    flags = types.Array(types.int64, 1, "C")
    for kernel in CHUNK_KERNELS.values():
        for sig in list(kernel.signatures):
            args = types.Tuple(sig[:-2])
            chunks_caller.compile((flags, types.int64, types.int64, types.int64, args, types.int64))
            chunks_partner.compile((flags, types.int64, types.int64, args, types.int64))
