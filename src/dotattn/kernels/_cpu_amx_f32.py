"""float32 tile products on Intel AMX as sums of bfloat16 products ("bf16x6"), for the
float32 kernels' score product ``Sᵀ = K·Qᵀ`` (forward and backward), the forward's ``acc +=
P·V`` and the backward's other four products.

AMX multiplies bfloat16 only, but a float32 ``x`` is exactly the sum of three bfloat16
pieces: ``hi = bf16(x)``, ``mid = bf16(x − hi)``, ``lo = bf16(x − hi − mid)`` (8 + 8 + 8
significand bits cover float32's 24; each subtraction is exact).  A float32 product ``a·b``
is then ``Σ a_i·b_j`` over the nine piece pairs; the three smallest (``mid·lo``, ``lo·mid``,
``lo·lo``, ≤ 2⁻²⁵ of ``|a·b|``) are dropped, so six bfloat16 products — each exact in
float32 — make one float32 product (cuBLAS's float32 emulation on recent GPUs).

**Order matters.**  ``tdpbf16ps`` rounds into its float32 accumulator at every step.  Each
32 × 32 output block therefore starts at 0, takes the small cross terms first (``lo·hi``,
``hi·lo``, ``mid·mid``, then ``hi·mid``, ``mid·hi``) and the ``hi·hi`` terms last (``_SEG_A``,
``_SEG_B``).  An output element's value depends only on its row of A, its column of B and
the depth — not on the tile shape or where the element sits in it — so the forward and the
backward may tile differently and still compute the *same* scores bit for bit, which the
backward needs: it rebuilds ``P = 2^(S − lse)`` from the forward's LSE, and the rounding of
S cancels there only when both passes computed S the same way (docs/performance.md, "float32
on AMX as split bfloat16 products": dQ 1.81× naive at scale 2.5 when they differed).

The unit flushes denormal inputs and outputs: operands whose largest magnitude lies outside
[``SPLIT_MIN``, ``SPLIT_MAX``] take MKL's float32 tiles instead (:func:`ok_range`, decided per
call by ``cpu.f32_split_route``).

Layouts are those of :mod:`._cpu_amx`: A in rows of ``K`` bfloat16 (``(3, M, Kp)`` uint16,
one piece after the other), B in depth pairs (``(3, Kp/2, N)`` uint32: row ``k/2`` holds per
column the pair ``(b[k], b[k+1])``).  Depths, rows and columns are padded with zeros to
multiples of 32.  The splits and the product are those of ``benchmarks/f32_split_tile.py``,
where they were measured (same file history).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from ._cpu_amx import (
    _AVX512,
    _BFloat,
    _amx_function,
    _transpose16,
    _transpose_add16,
    _transpose_store16,
    _depth_2x2,
    _store_2x2,
    _tile_config,
    _tile_release,
    _zero0,
    _zero1,
    _zero2,
    _zero3,
)
from ._cpu_cache import install_locator
from ._cpu_primitives import _from_bf16, _to_bf16

install_locator()  # before any @njit(cache=True) below: the kernels cache beside the package

_JIT_CACHE = True

# The range of an operand's largest magnitude for which the split route runs (else MKL's
# float32 tiles): at most 2⁴⁰, so that no piece, product or sum of products nears float32's
# overflow (bf16(x) rounds to inf above ≈ 3.39e38); at least 2⁻⁴⁰, so that the products of two
# operands' large elements (≥ 2⁻⁸⁰) and their lo pieces' products (≥ 2⁻¹¹⁴) stay far above the
# tile unit's flush of results below 2⁻¹²⁶.  All-zero operands are fine (every piece is 0).
SPLIT_MAX = 2.0**40
SPLIT_MIN = 2.0**-40

# Depths, rows and columns of the pieces: whole AMX steps.
QUANTUM = 32


def ok_range(largest: float) -> bool:
    """Whether an operand whose largest magnitude is ``largest`` may take the split products
    (NaN and ±inf may not: MKL's tiles then follow the NaN policy as before)."""
    return largest == 0.0 or SPLIT_MIN <= largest <= SPLIT_MAX


def padded(n: int) -> int:
    """``n`` rounded up to :data:`QUANTUM`."""
    return -(-n // QUANTUM) * QUANTUM


# (A piece, B piece) of each bfloat16 product, smallest first: 0 = hi, 1 = mid, 2 = lo
_SEG_A = (2, 0, 1, 0, 1, 0)
_SEG_B = (0, 2, 1, 1, 0, 0)


@njit(cache=_JIT_CACHE, inline="always")
def _pieces(x):
    """``x`` → bfloat16 bits of ``hi, mid, lo`` (uint16 each, as uint32)."""
    h = _to_bf16(x)
    r = x - _from_bf16(h)
    m = _to_bf16(r)
    lo = _to_bf16(r - _from_bf16(m))
    return np.uint32(h), np.uint32(m), np.uint32(lo)


@njit(cache=_JIT_CACHE, inline="always")
def _store_pair(out, k2, n, a, b):
    """``out[:, k2, n]`` ← the pieces of ``a`` (low halves) and ``b`` (high halves): one depth
    pair of a B operand (zeros, whose pieces are zeros, where there is no element)."""
    h0, m0, l0 = _pieces(a)
    h1, m1, l1 = _pieces(b)
    sh = np.uint32(16)
    out[0, k2, n] = h0 | (h1 << sh)
    out[1, k2, n] = m0 | (m1 << sh)
    out[2, k2, n] = l0 | (l1 << sh)


_VF = ir.VectorType(ir.FloatType(), 16)
_V32I16 = ir.VectorType(ir.IntType(16), 32)
_V32I32 = ir.VectorType(ir.IntType(32), 32)
_V32F = ir.VectorType(ir.FloatType(), 32)
_I32 = ir.IntType(32)


def _pieces_vec(builder, x0, x1):
    """Two 16-lane float32 vectors → their hi, mid, lo pieces as 32 bfloat16 (x0's first):
    ``vcvtne2ps2bf16`` rounds to nearest even (and flushes denormals, as the tile unit would),
    the widened piece is subtracted exactly.  Bit for bit :func:`_pieces` for normal inputs."""
    cvt = builder.module.declare_intrinsic(
        "llvm.x86.avx512bf16.cvtne2ps2bf16.512", fnty=ir.FunctionType(ir.VectorType(_BFloat(), 32), [_VF, _VF])
    )
    lo_half = ir.Constant(ir.VectorType(_I32, 16), list(range(16)))
    hi_half = ir.Constant(ir.VectorType(_I32, 16), list(range(16, 32)))
    sixteen = ir.Constant(_V32I32, [16] * 32)
    out = []
    for piece in range(3):
        bits = builder.bitcast(builder.call(cvt, [x1, x0]), _V32I16)
        out.append(bits)
        if piece < 2:
            wide = builder.bitcast(builder.shl(builder.zext(bits, _V32I32), sixteen), _V32F)
            x0 = builder.fsub(x0, builder.shuffle_vector(wide, wide, lo_half))
            x1 = builder.fsub(x1, builder.shuffle_vector(wide, wide, hi_half))
    return out


def _vload(builder, addr):
    return builder.load(builder.inttoptr(addr, _VF.as_pointer()), align=4)


@intrinsic
def _split32(typingctx, src, dst, ps):
    """32 float32 at ``src`` → their three pieces, 32 bfloat16 each at ``dst``, ``dst + ps``,
    ``dst + 2·ps`` (bytes)."""

    def codegen(context, builder, signature, args):
        src, dst, ps = args
        _amx_function(context, builder, _AVX512)
        x0 = _vload(builder, src)
        x1 = _vload(builder, builder.add(src, ir.Constant(src.type, 64)))
        for p, bits in enumerate(_pieces_vec(builder, x0, x1)):
            addr = builder.add(dst, builder.mul(ps, ir.Constant(ps.type, p)))
            builder.store(bits, builder.inttoptr(addr, _V32I16.as_pointer()), align=2)
        return context.get_dummy_value()

    return types.void(types.int64, types.int64, types.int64), codegen


@njit(cache=_JIT_CACHE, nogil=True)
def split_rows(x, out, M, K):
    """A operand: ``out (3, ≥Mp, Kp)`` uint16 ← pieces of ``x[:M, :K]`` float32 (rows
    contiguous), zero elsewhere up to ``Mp = out.shape[1]`` rows and ``Kp`` columns."""
    Mp, Kp = out.shape[1], out.shape[2]
    K32 = K - K % 32
    ps = out.strides[0]
    for m in range(Mp):
        if m < M:
            src, dst = x[m].ctypes.data, out[0, m].ctypes.data
            for k in range(0, K32, 32):
                _split32(src + 4 * k, dst + 2 * k, ps)
            for k in range(K32, K):
                h, md, lo = _pieces(x[m, k])
                out[0, m, k] = np.uint16(h)
                out[1, m, k] = np.uint16(md)
                out[2, m, k] = np.uint16(lo)
            for k in range(K, Kp):
                out[0, m, k] = 0
                out[1, m, k] = 0
                out[2, m, k] = 0
        else:
            for k in range(Kp):
                out[0, m, k] = 0
                out[1, m, k] = 0
                out[2, m, k] = 0


@njit(cache=_JIT_CACHE, nogil=True)
def transpose_pairs(rows, out, N):
    """``out (3, Kp/2, ≥N)`` uint32 ← ``rows (3, ≥N, Kp)`` uint16 read as pairs (the pieces of
    :func:`split_rows` of ``x (N, K)``): the B operand for ``C = A·xᵀ``.  16 columns at a time
    (column-by-column writes to rows a power of two apart alias in L1)."""
    K2 = rows.shape[2] // 2
    for p in range(3):
        r32 = rows[p].view(np.uint32)
        o = out[p]
        for n0 in range(0, N, 16):
            for k in range(K2):
                orow = o[k]
                for n in range(n0, min(n0 + 16, N)):
                    orow[n] = r32[n, k]


@njit(cache=_JIT_CACHE, parallel=True)
def split_tiles(kp, out):
    """Per key tile, the A operand of ``Sᵀ = K·Qᵀ`` (or ``dPᵀ = V·dOᵀ``): ``out (B, H, nkb, 3,
    ≥BK, Dp)`` uint16 ← pieces of ``kp (B, H, nkb, BK, D)`` (zero-padded past the real keys
    already, so the pieces are too).  A prange loop: alone it took 1.37–5.0 ms against 0.71–0.79
    on the calling thread at load 4.6, but the whole dense forward (which splits K per call) ran
    faster with it — H8 L4096 D64 / H4 D128, alternated in one process: 0.918 / 0.937 at load
    1.25, 0.998 / 0.958 at load 2.1–2.5 (1 Dec, 05:59–06:01)."""
    B, H, nkb, BK, D = kp.shape
    for t in prange(B * H * nkb):
        b, h, kb = t // (H * nkb), (t // nkb) % H, t % nkb
        split_rows(kp[b, h, kb], out[b, h, kb], BK, D)


@intrinsic
def _split_cols16(typingctx, src, src_ld, dst, dst_ld, ps):
    """16 rows of 32 float32 at ``src`` (rows ``src_ld`` bytes apart) → their pieces in depth
    pairs, transposed: for each piece ``p`` and pair ``k`` (depths 2k, 2k + 1) the 16 rows' pairs
    (64 bytes) at ``dst + p·ps + k·dst_ld``.  The split of :func:`_split32` and a 16 × 16
    transpose of 32-bit pairs in registers: the scalar transpose of a row scratch
    (:func:`transpose_pairs`) took ≈ 2/3 of the Qᵀ split's time."""

    def codegen(context, builder, signature, args):
        src, src_ld, dst, dst_ld, ps = args
        _amx_function(context, builder, _AVX512)
        v16 = ir.VectorType(_I32, 16)
        pieces = [[], [], []]
        for r in range(16):
            row = builder.add(src, builder.mul(src_ld, ir.Constant(src_ld.type, r)))
            x0 = _vload(builder, row)
            x1 = _vload(builder, builder.add(row, ir.Constant(row.type, 64)))
            for p, bits in enumerate(_pieces_vec(builder, x0, x1)):
                pieces[p].append(builder.bitcast(bits, v16))
        for p in range(3):
            base = builder.add(dst, builder.mul(ps, ir.Constant(ps.type, p)))
            for k, vec in enumerate(_transpose16(builder, pieces[p])):
                addr = builder.add(base, builder.mul(dst_ld, ir.Constant(dst_ld.type, k)))
                builder.store(vec, builder.inttoptr(addr, v16.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.void(types.int64, types.int64, types.int64, types.int64, types.int64), codegen


@njit(cache=_JIT_CACHE, nogil=True)
def split_columns_head(x, M, o, n_lo, n_hi):
    """Columns ``n_lo … n_hi − 1`` (``n_lo`` a multiple of 16) of one head's B operand: ``o (3,
    Dp/2, ≥n_hi)`` uint32 ← pieces of ``x (Lq, D)``'s rows in depth pairs, rows at or past ``M``
    zero.  Blocks of 16 rows × 32 depths are split and transposed in registers
    (:func:`_split_cols16`); the rest (rows past the last whole 16 of the real ones, depths past
    the last whole 32) element by element."""
    D = x.shape[1]
    K2 = o.shape[1]
    D32 = D - D % 32
    zero = np.float32(0.0)
    n16 = max(n_lo, min(n_hi, M - M % 16))  # rows [n_lo, n16) in whole 16-row blocks
    if D32 > 0 and n16 > n_lo:
        ps, ld = o.strides[0], o.strides[1]
        for n0 in range(n_lo, n16, 16):
            for k0 in range(0, D32, 32):
                _split_cols16(x[n0].ctypes.data + 4 * k0, x.strides[0], o[0, k0 // 2].ctypes.data + 4 * n0, ld, ps)
    for k2 in range(K2):
        k = 2 * k2
        n_from = n16 if k < D32 else n_lo
        for n in range(n_from, n_hi):
            real = n < M
            _store_pair(o, k2, n, x[n, k] if real and k < D else zero, x[n, k + 1] if real and k + 1 < D else zero)


@njit(cache=_JIT_CACHE, nogil=True)
def split_columns(q, lens, out, threads):
    """The B operand of ``Sᵀ = K·Qᵀ`` (or ``dPᵀ = V·dOᵀ``) for every query row of a head:
    ``out (B, H, 3, Dp/2, ≥Lqp)`` uint32 ← pieces of ``q (B, H, Lq, D)`` in depth pairs, rows at
    or past ``lens[b]`` zero (padding rows may hold anything, NaN included), columns past Lq
    zero.  A query tile is ``out[b, h, :, :, i0:i0+BQ]``.  Per head :func:`split_columns_head`:
    bit for bit :func:`split_rows` + :func:`transpose_pairs` (with ``out`` 64-byte aligned, as
    ``cpu._pieces_buffer``'s, each block's stores are whole cache lines).  On the calling
    thread: ≈ 1 ms for H8 L4096 D64 (the 12 MiB of pieces written once), where the parallel
    row scratch + scalar transpose took 5–18 ms at load 4.6 — a parallel launch on a busy
    machine waits for descheduled threads.  (``threads``: unused, kept for callers.)"""
    B, H, Lq, D = q.shape
    for t in range(B * H):
        b, h = t // H, t % H
        split_columns_head(q[b, h], min(Lq, lens[b]), out[b, h], 0, out.shape[4])


@njit(cache=_JIT_CACHE, inline="always")
def _block(a0, a_ps, a_ld, b0, b_ps, b_ld, i, j, depth):
    """The 32 × 32 block at ``(i, j)``: six sub-products from 0, smallest first."""
    _zero0()
    _zero1()
    _zero2()
    _zero3()
    for s in range(6):
        _depth_2x2(a0 + _SEG_A[s] * a_ps + i * a_ld, a_ld, b0 + _SEG_B[s] * b_ps + 4 * j, b_ld, depth)


@njit(cache=_JIT_CACHE, nogil=True)
def product_from(a, m0, b, c, cfg):
    """``c[:M, :N] = A[m0:m0+M]·B`` in float32 (``M``, ``N`` = ``c``'s shape, multiples of 32;
    ``m0`` a multiple of 32): ``a (3, ≥m0+M, Kp)`` uint16 pieces in rows, passed whole,
    ``b (3, Kp/2, ≥N)`` uint32 pieces in depth pairs.  A's 32-row block stays (L1) while B's
    blocks stream.  The row offset is applied to the address, not by slicing ``a``: the slice
    ``a[:, m0:]`` (Numba layout "A") for every tile ran the whole forward 4–6 % slower in two
    tree A/Bs (2 Dec)."""
    M, N = c.shape
    depth = a.shape[2]
    a_ps, a_ld = a.strides[0], a.strides[1]
    b_ps, b_ld = b.strides[0], b.strides[1]
    c_ld = c.strides[0]
    a0, b0, c0 = a.ctypes.data + m0 * a_ld, b.ctypes.data, c.ctypes.data
    _tile_config(cfg.ctypes.data)
    for i in range(0, M, 32):
        for j in range(0, N, 32):
            _block(a0, a_ps, a_ld, b0, b_ps, b_ld, i, j, depth)
            _store_2x2(c0 + i * c_ld + 4 * j, c_ld)
    _tile_release()


@njit(cache=_JIT_CACHE, nogil=True)
def product(a, b, c, cfg):
    """``c[:M, :N] = A·B``: :func:`product_from` from A's first row (a whole tile)."""
    product_from(a, 0, b, c, cfg)


@njit(cache=_JIT_CACHE, nogil=True)
def _abs_bits_max(x, lens):
    """The largest ``bits & 0x7FFFFFFF`` over ``x[b, h, :lens[b]]`` (float32 ``x`` C-contiguous,
    read as uint32): for magnitudes the bits order as the values, ±inf gives 0x7F800000 and a
    NaN more.  An integer maximum over a flat span, which LLVM vectorizes (a float one with NaN
    checks stays scalar): 0.29 ms for 8 MiB against NumPy's max and min 0.59 (1 Dec, 08:00)."""
    B, H, L, X = x.shape
    mask = np.uint32(0x7FFFFFFF)
    top = np.uint32(0)
    for b in range(B):
        n = min(L, lens[b])
        for h in range(H):
            flat = x[b, h, :n].reshape(n * X).view(np.uint32)
            for i in range(flat.shape[0]):
                v = flat[i] & mask
                top = v if v > top else top
    return top


def largest(x: np.ndarray, lens: np.ndarray) -> float:
    """``max |x[b, h, :lens[b]]|`` of float32 ``x (B, H, L, X)``, NaN when those rows hold a NaN
    or ±inf: the range check of :func:`ok_range` (rows past the lengths may hold anything).
    C-contiguous float32 by :func:`_abs_bits_max`; other layouts by NumPy's ``max`` and ``min``
    (0.6–0.9 ms for H8 L4096 D64)."""
    if x.dtype == np.float32 and x.flags.c_contiguous and x.ndim == 4:
        top = int(_abs_bits_max(x, np.ascontiguousarray(lens, dtype=np.int64)))
        if top >= 0x7F800000:
            return float("nan")
        return float(np.array(top, dtype=np.uint32).view(np.float32))
    B, H, L, X = x.shape
    parts = [x] if bool(np.all(lens >= L)) else [x[b, :, : min(L, int(n))] for b, n in enumerate(lens)]
    top = 0.0
    for part in parts:
        if part.size == 0:
            continue
        hi, lo = float(part.max()), float(part.min())
        if not (np.isfinite(hi) and np.isfinite(lo)):
            return float("nan")
        top = max(top, hi, -lo)
    return top


# ---------------------------------------------------------------------------------
# The backward's other three products on the split (dV += Pᵀ·dO, dK += dSᵀ·Q, dQᵀ += Kᵀ·dSᵀ):
# P's and dS's pieces written by the exp and dS passes, the per-call operands (Q and dO in
# pairs of query rows, Kᵀ's rows per key tile) split once per call
# (benchmarks/f32_split_tile.py: 1.24–1.34× MKL's backward tile at 128 × 256 with all five)
# ---------------------------------------------------------------------------------


@intrinsic
def _split_pair16(typingctx, src0, src1, dst, ps):
    """16 float32 at ``src0`` (depth k) and 16 at ``src1`` (depth k + 1) → per column the
    uint32 pair ``(piece(x0), piece(x1))``, 16 pairs for each piece at ``dst + p·ps``."""

    def codegen(context, builder, signature, args):
        src0, src1, dst, ps = args
        _amx_function(context, builder, _AVX512)
        interleave = ir.Constant(ir.VectorType(_I32, 32), [i // 2 + (i % 2) * 16 for i in range(32)])
        for p, bits in enumerate(_pieces_vec(builder, _vload(builder, src0), _vload(builder, src1))):
            pairs = builder.shuffle_vector(bits, bits, interleave)
            addr = builder.add(dst, builder.mul(ps, ir.Constant(ps.type, p)))
            builder.store(pairs, builder.inttoptr(addr, _V32I16.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.void(types.int64, types.int64, types.int64, types.int64), codegen


@njit(cache=_JIT_CACHE, nogil=True)
def split_pairs(x, out, K, N):
    """B operand with the depth along ``x``'s rows: ``out (3, ≥K/2, Np)`` uint32 ← pieces of
    ``x[:K, :N]`` (rows contiguous) in pairs of consecutive rows, zero elsewhere (up to
    ``out.shape[1]`` pair rows and ``Np`` columns)."""
    K2, Np = out.shape[1], out.shape[2]
    N16 = N - N % 16
    ps = out.strides[0]
    zero = np.float32(0.0)
    for k2 in range(K2):
        k = 2 * k2
        n0 = 0
        if k + 1 < K:
            src0, src1, dst = x[k].ctypes.data, x[k + 1].ctypes.data, out[0, k2].ctypes.data
            for n in range(0, N16, 16):
                _split_pair16(src0 + 4 * n, src1 + 4 * n, dst + 4 * n, ps)
            n0 = N16
        for n in range(n0, Np):
            real = n < N
            _store_pair(out, k2, n, x[k, n] if real and k < K else zero, x[k + 1, n] if real and k + 1 < K else zero)


@njit(cache=_JIT_CACHE, nogil=True)
def split_row_pairs(q, lens, out):
    """The B operand of ``dK += dSᵀ·Q`` (or ``dV += Pᵀ·dO``) for every query row of a head:
    ``out (B, H, 3, ≥Lq/2, Dp)`` uint32 ← pieces of ``q (B, H, Lq, D)`` in pairs of query rows,
    rows at or past ``lens[b]`` zero.  A query tile is ``out[b, h, :, i0/2:(i0+BQ)/2]``.  On the
    calling thread, as :func:`split_columns`: H8 L4096 D64 1.4 ms, where a prange loop took 0.85
    idle and 3.4 at load 1.7 (1 Dec, 07:40)."""
    B, H, Lq, D = q.shape
    for t in range(B * H):
        b, h = t // H, t % H
        split_pairs(q[b, h], out[b, h], min(Lq, lens[b]), D)


@njit(cache=_JIT_CACHE, nogil=True)
def split_tile_t(kb, kt, out):
    """The A operand of ``dQᵀ += Kᵀ·dSᵀ`` for one key tile: ``out (3, ≥Dp, BK)`` uint16 ← pieces
    of ``kb (BK, D)`` transposed, through the scratch ``kt (D, BK)``."""
    BK, D = kb.shape
    for j0 in range(0, BK, 16):  # 16 keys at a time: each row of kt written a cache line at once
        j1 = min(j0 + 16, BK)
        for d in range(D):
            row = kt[d]
            for j in range(j0, j1):
                row[j] = kb[j, d]
    split_rows(kt, out, D, BK)


@njit(cache=_JIT_CACHE, parallel=True)
def split_tiles_t(kp, out):
    """Per key tile, the A operand of ``dQᵀ += Kᵀ·dSᵀ``: ``out (B, H, nkb, 3, ≥Dp, BK)`` uint16 ←
    pieces of each tile of ``kp (B, H, nkb, BK, D)`` transposed (the per-call pass; the
    backward's tasks split their own tile, ``split_tile_t``, unless ``cpu.SPLIT_IN_TASK`` is off)."""
    B, H, nkb, BK, D = kp.shape
    for t in prange(B * H * nkb):
        b, h, kb = t // (H * nkb), (t // nkb) % H, t % nkb
        split_tile_t(kp[b, h, kb], np.empty((D, BK), dtype=kp.dtype), out[b, h, kb])


@intrinsic
def _vadd32(typingctx, c, s):
    """``c[0:32] += s[0:32]`` (float32) as two AVX-512 adds: Numba's loop stayed scalar (the
    arrays might alias), ≈ 0.6 µs a 32 × 32 block."""

    def codegen(context, builder, signature, args):
        c, s = args
        _amx_function(context, builder, _AVX512)
        for off in (0, 64):
            o = ir.Constant(c.type, off)
            cp = builder.inttoptr(builder.add(c, o), _VF.as_pointer())
            sp = builder.inttoptr(builder.add(s, o), _VF.as_pointer())
            builder.store(builder.fadd(builder.load(cp, align=4), builder.load(sp, align=4)), cp, align=4)
        return context.get_dummy_value()

    return types.void(types.int64, types.int64), codegen


@njit(cache=_JIT_CACHE, inline="always")
def _add_block(c0, c_ld, s0, i, j):
    for r in range(32):
        _vadd32(c0 + (i + r) * c_ld + 4 * j, s0 + r * 128)


@njit(cache=_JIT_CACHE, inline="always")
def _add_block_t(c0, c_ld, s0, i, j):
    """``c[j:j+32, i:i+32] += sᵀ`` for the 32 × 32 block ``s`` (rows 128 bytes apart)."""
    for y in range(0, 32, 16):
        for x in range(0, 32, 16):
            _transpose_add16(s0 + x * 128 + 4 * y, 128, c0 + (j + y) * c_ld + 4 * (i + x), c_ld)


@njit(cache=_JIT_CACHE, inline="always")
def _add_stored(c0, c_ld, s0, i, j, transposed):
    """The stored 32 × 32 block ``s0`` added into ``c`` at ``(i, j)``, or transposed at ``(j, i)``."""
    if transposed:
        _add_block_t(c0, c_ld, s0, i, j)
    else:
        _add_block(c0, c_ld, s0, i, j)


@njit(cache=_JIT_CACHE, inline="always")
def _add_products(a, b, c, s, cfg, transposed):
    """``c += A·B`` (``transposed``: ``c += (A·B)ᵀ``), ``c``'s blocks whole 32 × 32 ones; operands
    as :func:`product`, ``s`` a 64-byte aligned scratch of 2 × 32 × 32 float32.  Each block's
    six sub-products from 0 into a tile, stored to the scratch and added into ``c`` **one block
    later** with AVX-512 adds (reading a tile store back at once stalled, ≈ 370 ns a block).
    A's 32-row block stays while B's stream when ``A·B`` is no taller than wide, else B's
    column block stays."""
    if transposed:
        N, M = c.shape
    else:
        M, N = c.shape
    depth = a.shape[2]
    a_ps, a_ld = a.strides[0], a.strides[1]
    b_ps, b_ld = b.strides[0], b.strides[1]
    c_ld = c.strides[0]
    a0, b0, c0 = a.ctypes.data, b.ctypes.data, c.ctypes.data
    s_base = s.ctypes.data
    _tile_config(cfg.ctypes.data)
    pend = 0
    pi, pj = -1, -1
    nI, nJ = M // 32, N // 32
    i_outer = M <= N
    for t in range(nI * nJ):
        if i_outer:
            i, j = 32 * (t // nJ), 32 * (t % nJ)
        else:
            i, j = 32 * (t % nI), 32 * (t // nI)
        _block(a0, a_ps, a_ld, b0, b_ps, b_ld, i, j, depth)
        if pi >= 0:  # the block before, while this one's products run
            _add_stored(c0, c_ld, s_base + pend * 4096, pi, pj, transposed)
        pend ^= 1
        _store_2x2(s_base + pend * 4096, 128)
        pi, pj = i, j
    if pi >= 0:
        _add_stored(c0, c_ld, s_base + pend * 4096, pi, pj, transposed)
    _tile_release()


@njit(cache=_JIT_CACHE, nogil=True)
def product_add(a, b, c, s, cfg):
    """``c[:M, :N] += A·B`` (``M, N = c.shape``, multiples of 32): :func:`_add_products`."""
    _add_products(a, b, c, s, cfg, False)


@njit(cache=_JIT_CACHE, nogil=True)
def product_add_t(a, b, c, s, cfg):
    """``c[:N, :M] += (A·B)ᵀ`` (``N, M = c.shape``, multiples of 32): :func:`_add_products`.  The
    forward's ``acc += P·V`` as ``(Vᵀ·P)ᵀ`` (``A`` = Vᵀ's pieces of a key tile, ``B`` = P's in
    key pairs): the accumulator keeps its row layout, so the softmax's rescale and the output
    rows stay as they are."""
    _add_products(a, b, c, s, cfg, True)


@njit(cache=_JIT_CACHE, inline="always")
def _bits_max(flat, top):
    """``max(top, bits & 0x7FFFFFFF)`` over the uint32 view ``flat`` of float32 values: the largest
    magnitude as bits (±inf 0x7F800000, NaN above; see :func:`_abs_bits_max`)."""
    mask = np.uint32(0x7FFFFFFF)
    for i in range(flat.shape[0]):
        v = flat[i] & mask
        top = v if v > top else top
    return top


@njit(cache=_JIT_CACHE, inline="always")
def _dot_as_einsum(a, b):
    """``Σ a[i]·b[i]`` of two float32 rows in float32, bit for bit NumPy's ``einsum`` over a
    contiguous last axis (``sum_of_products_contig_contig_outstride0_two``: four lanes, each
    taking four products a step, last first, unfused; the lanes summed pairwise), so that Δ
    keeps the bits of the ``np.einsum`` it replaces (checked against it: test)."""
    n = a.shape[0]
    z = np.float32(0.0)
    s0, s1, s2, s3 = z, z, z, z
    i = 0
    while n - i >= 16:
        s0 = (((s0 + a[i + 12] * b[i + 12]) + a[i + 8] * b[i + 8]) + a[i + 4] * b[i + 4]) + a[i] * b[i]
        s1 = (((s1 + a[i + 13] * b[i + 13]) + a[i + 9] * b[i + 9]) + a[i + 5] * b[i + 5]) + a[i + 1] * b[i + 1]
        s2 = (((s2 + a[i + 14] * b[i + 14]) + a[i + 10] * b[i + 10]) + a[i + 6] * b[i + 6]) + a[i + 2] * b[i + 2]
        s3 = (((s3 + a[i + 15] * b[i + 15]) + a[i + 11] * b[i + 11]) + a[i + 7] * b[i + 7]) + a[i + 3] * b[i + 3]
        i += 16
    while i < n:  # (the masked loads of the last steps: lanes past n add nothing)
        s0 += a[i] * b[i]
        if i + 1 < n:
            s1 += a[i + 1] * b[i + 1]
        if i + 2 < n:
            s2 += a[i + 2] * b[i + 2]
        if i + 3 < n:
            s3 += a[i + 3] * b[i + 3]
        i += 4
    return (s0 + s1) + (s2 + s3)


@njit(cache=_JIT_CACHE, nogil=True)
def _dout_head(dout, out, fix, dout_k, delta, M):
    """One head's rows of the backward's dO side: ``dout_k = dO·fix`` (fix rounded to float32, all
    rows), ``delta = float32(fix·Σ dO∘O)`` (Δ summed in float32 as ``np.einsum`` sums it, times
    fix in float64: the bits of the NumPy passes this replaces), and the largest magnitudes (as
    bits) of dO's and O's first ``M`` rows (the real ones)."""
    L, Dv = dout.shape
    top_do, top_o = np.uint32(0), np.uint32(0)
    for i in range(L):
        f = fix[i]
        f32 = np.float32(f)
        x, dk = dout[i], dout_k[i]
        for d in range(Dv):
            dk[d] = x[d] * f32
        delta[i] = np.float32(np.float64(_dot_as_einsum(x, out[i])) * f)
        if i < M:
            top_do = _bits_max(x.view(np.uint32), top_do)
            top_o = _bits_max(out[i].view(np.uint32), top_o)
    return top_do, top_o


@njit(cache=_JIT_CACHE, nogil=True)
def split_query_side(q, dout, out, fix, kp, vp, lens, dout_k, delta, qpc, dopc, qrp, dorp, pieces, pairs, tops,
                     chunk, nchunks):
    """The backward's per-call passes over its operands on the split route, this chunk's share
    (for ``_launch.run_chunks``: a pool thread and the caller, no prange team), one task per
    head of ``q``, of ``dout``, then of the packed ``kp`` and ``vp`` (tasks dealt in turn):

    * q's head: its largest magnitude (``tops[chunk, 0]``, as bits: :func:`_bits_max`) in the
      real rows (``lens``), and with ``pieces`` its Qᵀ pieces (``qpc``, :func:`split_columns`),
      with ``pairs`` its row pairs (``qrp``, :func:`split_row_pairs`);
    * dO's head (:func:`_dout_head`): ``dout_k = dO·fix`` (the LSE's rounding fix, per row),
      ``delta = fix·rowsum(dO ∘ O)``, the largest magnitudes of dO and O (``tops[chunk, 1]``,
      ``[chunk, 2]``) in the real rows; then ``dout_k``'s pieces (``dopc``, ``dorp``) while the
      head is in L2;
    * K's and V's heads: their largest magnitudes (``tops[chunk, 3]``, ``[chunk, 4]``; the
      packed tiles are zero past the real keys).

    One read of each operand serves the NaN policy's finiteness check, the split route's range
    check, Δ and dO's fix, which were passes of their own on the calling thread."""
    B, H, Lq, D = q.shape
    Hkv = kp.shape[1]
    BH, BHkv = B * H, B * Hkv
    for t in range(2 * BH + 2 * BHkv):
        if t % nchunks != chunk:
            continue
        if t < 2 * BH:
            u = t % BH
            b, h = u // H, u % H
            M = min(Lq, lens[b])
            if t < BH:
                tops[chunk, 0] = _bits_max(q[b, h, :M].reshape(M * D).view(np.uint32), tops[chunk, 0])
                if pieces:
                    split_columns_head(q[b, h], M, qpc[b, h], 0, qpc.shape[4])
                if pairs:
                    split_pairs(q[b, h], qrp[b, h], M, D)
            else:
                top_do, top_o = _dout_head(dout[b, h], out[b, h], fix[b, h], dout_k[b, h], delta[b, h], M)
                tops[chunk, 1] = max(tops[chunk, 1], top_do)
                tops[chunk, 2] = max(tops[chunk, 2], top_o)
                if pieces:
                    split_columns_head(dout_k[b, h], M, dopc[b, h], 0, dopc.shape[4])
                if pairs:
                    split_pairs(dout_k[b, h], dorp[b, h], M, dout.shape[3])
        else:
            u = t - 2 * BH
            slot = 3 if u < BHkv else 4
            tile = (kp if u < BHkv else vp)[(u % BHkv) // Hkv, (u % BHkv) % Hkv]
            n = tile.shape[0] * tile.shape[1] * tile.shape[2]
            tops[chunk, slot] = _bits_max(tile.reshape(n).view(np.uint32), tops[chunk, slot])


@njit(cache=_JIT_CACHE, nogil=True)
def operand_tops(q, kp, vp, lens, tops, chunk, nchunks):
    """The forward's checks of its operands in one pass on ``_launch.run_chunks``, this chunk's
    share: the largest magnitude (as bits, :func:`_bits_max`) of q's real rows (``lens``) into
    ``tops[chunk, 0]``, of the packed K and V tiles (zero past the real keys) into ``[chunk, 1]``
    and ``[chunk, 2]``, one task per head."""
    B, H, Lq, D = q.shape
    Hkv = kp.shape[1]
    BH, BHkv = B * H, B * Hkv
    for t in range(BH + 2 * BHkv):
        if t % nchunks != chunk:
            continue
        if t < BH:
            b, h = t // H, t % H
            M = min(Lq, lens[b])
            tops[chunk, 0] = _bits_max(q[b, h, :M].reshape(M * D).view(np.uint32), tops[chunk, 0])
        else:
            u = t - BH
            slot = 1 if u < BHkv else 2
            tile = (kp if u < BHkv else vp)[(u % BHkv) // Hkv, (u % BHkv) % Hkv]
            n = tile.shape[0] * tile.shape[1] * tile.shape[2]
            tops[chunk, slot] = _bits_max(tile.reshape(n).view(np.uint32), tops[chunk, slot])


def bits_to_largest(top: int) -> float:
    """A largest magnitude as bits (:func:`_bits_max`) → its float value, NaN for NaN or ±inf."""
    if top >= 0x7F800000:
        return float("nan")
    return float(np.array(top, dtype=np.uint32).view(np.float32))


@njit(cache=_JIT_CACHE, nogil=True)
def split_block_rows(ST, rows_out, r0, r1):
    """Rows ``r0 … r1−1`` of ``ST (BK, BQ)`` (BQ a multiple of 32) → their pieces in
    ``rows_out (3, ≥BK, BQ)`` (an A operand with depth BQ), while they are in L1."""
    BQ = ST.shape[1]
    ps = rows_out.strides[0]
    for c in range(r0, r1):
        src, dst = ST[c].ctypes.data, rows_out[0, c].ctypes.data
        for k in range(0, BQ, 32):
            _split32(src + 4 * k, dst + 2 * k, ps)


@njit(cache=_JIT_CACHE, nogil=True)
def split_block_pairs(ST, pairs_out, r0, r1):
    """Rows ``r0 … r1−1`` (``r0`` even) of ``ST (BK, BQ)`` → their pieces in pairs of rows in
    ``pairs_out (3, ≥BK/2, BQ)`` (a B operand with depth BK)."""
    BQ = ST.shape[1]
    ps = pairs_out.strides[0]
    for c in range(r0, r1, 2):
        s0, s1, dst = ST[c].ctypes.data, ST[c + 1].ctypes.data, pairs_out[0, c // 2].ctypes.data
        for k in range(0, BQ, 16):
            _split_pair16(s0 + 4 * k, s1 + 4 * k, dst + 4 * k, ps)


@intrinsic
def _split_rows_pairs32(typingctx, src0, src1, dst0, dst1, rps, pdst, pps):
    """32 float32 of row ``c`` at ``src0`` and 32 of row ``c + 1`` at ``src1`` → their pieces
    in rows (32 bfloat16 each at ``dst0``/``dst1`` + ``p·rps``, as :func:`_split32`) *and* in
    pairs of the two rows (32 uint32 at ``pdst + p·pps``, as :func:`_split_pair16` twice): one
    split, the pairs interleaved from the rows' pieces by two-source shuffles — the dS pass
    split every element twice, once per layout."""

    def codegen(context, builder, signature, args):
        src0, src1, dst0, dst1, rps, pdst, pps = args
        _amx_function(context, builder, _AVX512)
        sixty_four = ir.Constant(src0.type, 64)
        ra = _pieces_vec(builder, _vload(builder, src0), _vload(builder, builder.add(src0, sixty_four)))
        rb = _pieces_vec(builder, _vload(builder, src1), _vload(builder, builder.add(src1, sixty_four)))
        lo = ir.Constant(ir.VectorType(_I32, 32), [i // 2 + (i % 2) * 32 for i in range(32)])
        hi = ir.Constant(ir.VectorType(_I32, 32), [16 + i // 2 + (i % 2) * 32 for i in range(32)])
        for p in range(3):
            off = builder.mul(rps, ir.Constant(rps.type, p))
            for dst, bits in ((dst0, ra[p]), (dst1, rb[p])):
                builder.store(bits, builder.inttoptr(builder.add(dst, off), _V32I16.as_pointer()), align=2)
            base = builder.add(pdst, builder.mul(pps, ir.Constant(pps.type, p)))
            for half, idx in ((0, lo), (64, hi)):
                pairs = builder.shuffle_vector(ra[p], rb[p], idx)
                addr = builder.add(base, ir.Constant(base.type, half))
                builder.store(pairs, builder.inttoptr(addr, _V32I16.as_pointer()), align=4)
        return context.get_dummy_value()

    sig = types.void(types.int64, types.int64, types.int64, types.int64, types.int64, types.int64, types.int64)
    return sig, codegen


@njit(cache=_JIT_CACHE, nogil=True)
def split_block_rows_pairs(ST, rows_out, pairs_out, r0, r1):
    """Rows ``r0 … r1−1`` (``r0``, ``r1`` even) of ``ST (BK, BQ)`` → their pieces in rows and in
    pairs of rows: :func:`split_block_rows` and :func:`split_block_pairs` bit for bit, each
    element split once."""
    BQ = ST.shape[1]
    rps, pps = rows_out.strides[0], pairs_out.strides[0]
    for c in range(r0, r1, 2):
        s0, s1 = ST[c].ctypes.data, ST[c + 1].ctypes.data
        d0, d1, pd = rows_out[0, c].ctypes.data, rows_out[0, c + 1].ctypes.data, pairs_out[0, c // 2].ctypes.data
        for k in range(0, BQ, 32):
            _split_rows_pairs32(s0 + 4 * k, s1 + 4 * k, d0 + 2 * k, d1 + 2 * k, rps, pd + 4 * k, pps)


@njit(cache=_JIT_CACHE, nogil=True)
def pieces_buffer(rows, cols, like):
    """A ``(3, rows, cols)`` pieces buffer of ``like``'s dtype (uint16 rows or uint32 pairs) at a
    64-byte boundary, each piece a row and each row a cache line longer than needed (a strided
    view): rows or pieces a power of two apart share L1 sets."""
    pad = 64 // like.itemsize
    R, C = rows + 1, cols + pad
    n = 3 * R * C
    buf = np.zeros(n + pad, dtype=like.dtype)
    skip = (-buf.ctypes.data) % 64 // buf.itemsize
    return buf[skip : skip + n].reshape((3, R, C))[:, :rows, :cols]


@njit(cache=_JIT_CACHE, nogil=True)
def dq_from_transposed(parts, out, scale, chunk, nchunks):
    """``out (B, H, Lq, D)`` ← ``scale · Σ_c parts[c, :, :, :D, :Lq]ᵀ`` (dQᵀ's per-chunk parts
    ``(chunks, B, H, ≥D, ≥Lq)``, summed in chunk order: bitwise repeatable), in one pass
    (:func:`sum_scale_transpose`; NumPy's sum, the transposed copy and the scaling took three
    passes, 5.3 ms for H8 L4096 D64 → 3.4 with scalar stores).  This chunk's heads
    (``_launch.run_chunks``)."""
    B, H, Lq, D = out.shape
    tmp = np.empty((16, Lq + 16), dtype=out.dtype)  # (rows 16 floats longer: not 4 KiB apart)
    for t in range(B * H):
        if t % nchunks == chunk:
            sum_scale_transpose(parts, out, t // H, t % H, 0, 0, Lq, scale, tmp)


@njit(cache=_JIT_CACHE, nogil=True)
def sum_scale_transpose(parts, out, b, h, r0, i0, L, scale, tmp):
    """``out[b, h, i0 + i, d] = scale · Σ_c parts[c, b, h, r0 + d, i]`` for ``i < L`` and every
    ``d``: 16 rows of dQᵀ summed in chunk order and scaled into ``tmp (16, ≥L)``, then written
    transposed, 16 × 16 blocks through registers (:func:`_transpose_store16`).  The one pass
    behind both dQᵀ layouts (:func:`dq_from_transposed`, ``_cpu_kernels.dq_from_tiles``); it takes
    the whole arrays and offsets, so that their rows stay contiguous to the compiler."""
    n = parts.shape[0]
    D = out.shape[3]
    L16 = L - L % 16
    tmp_ld, out_ld = tmp.strides[0], out.strides[2]
    for d0 in range(0, D, 16):
        nd = min(16, D - d0)
        for dd in range(nd):
            row = tmp[dd]
            p0 = parts[0, b, h, r0 + d0 + dd]
            for i in range(L):
                row[i] = p0[i]
            for c in range(1, n):
                pc = parts[c, b, h, r0 + d0 + dd]
                for i in range(L):
                    row[i] += pc[i]
            for i in range(L):
                row[i] *= scale
        first = 0
        if nd == 16:
            for j0 in range(0, L16, 16):
                _transpose_store16(tmp[0].ctypes.data + 4 * j0, tmp_ld, out[b, h, i0 + j0].ctypes.data + 4 * d0, out_ld)
            first = L16
        for i in range(first, L):
            o = out[b, h, i0 + i]
            for dd in range(nd):
                o[d0 + dd] = tmp[dd, i]
