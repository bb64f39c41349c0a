"""The bfloat16 forward's two tile products on Intel AMX, written here instead of called in MKL.

MKL's ``cblas_gemm_bf16bf16f32`` (the bfloat16 path's GEMM, :mod:`._cpu_isa`) repacks both
operands on every call: per 256 × 256 tile at D 64 it took 15–17 µs for ``Sᵀ = K·Qᵀ`` and
14–16 µs for ``acc += P·V`` — more than half of a tile, while the AMX unit itself needs
≈ 2.7 µs for each (512 ``tdpbf16ps`` of 16 × 16 × 32 at ≈ 5.2 ns).  Here the operands are laid
out once so that the tile unit reads them as they lie:

* ``Sᵀ = K·Qᵀ``: A = the K tile as packed (rows of D bfloat16); B = Qᵀ in the unit's pair
  layout ("VNNI": row ``k/2`` holds, per query, the pair ``(q[k], q[k+1])``) — which is Q's
  bits read as uint32 and transposed: :func:`pack_q`, once per query tile.
* ``accᵀ += Vᵀ·P``: A = Vᵀ (the forward packs V transposed, once per call); B = P in pairs
  of keys, which the softmax pass writes directly (``_cpu_primitives._exp2_sum_bf16``
  with ``vnni``); the accumulator is kept transposed, ``(Dv, BQ)``.

Every address the tile unit touches is 64-byte aligned (the kernels' buffers, the packed
K/V): a tile row split across two cache lines ran the score product 1.7× slower.

The instructions are LLVM's AMX intrinsics; the functions using them carry the
``amx-tile,amx-bf16`` target features themselves, so they compile on every x86 CPU and run
only where :func:`dotattn.kernels._cpu_isa.amx_tiles` said yes (which also asked the OS for
the AMX register state).  Operands: bfloat16 bits as uint16/uint32 arrays; sizes multiples
of 32 (``cpu.prepare`` takes this path only then).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._cpu_cache import install_locator
from ._cpu_simd import target_features

install_locator()  # before any @njit(cache=True) below: the kernels cache beside the package

_JIT_CACHE = True
_i8, _i64 = ir.IntType(8), ir.IntType(64)
_ptr = _i8.as_pointer()


def _avx512_here() -> bool:
    """Whether this CPU runs the 512-bit integer vectors of :func:`_pack_vt_block16` (AVX-512
    F, BW, DQ, VL); :func:`pack_vt` keeps its element loop elsewhere."""
    from ._cpu_isa import _cpu_features

    return {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= _cpu_features()


_VEC_PACK = _avx512_here()


class _BFloat(ir.types._BaseFloatType):
    """LLVM's ``bfloat`` type (llvmlite names ``half``, ``float`` and ``double`` only)."""

    null = "0.0"
    intrinsic_name = "bf16"

    def __str__(self):
        return "bfloat"


_BFloat._create_instance()


def _amx_function(context, builder, extra="+amx-tile,+amx-bf16"):
    """Give the function being compiled the AMX target features (on top of the host's), or
    ``extra`` ones: merged into one attribute when a function uses several kinds."""
    attrs = builder.function.attributes
    key = '"target-features"="'
    have = [a for a in attrs if isinstance(a, str) and a.startswith(key)]
    features = have[0][len(key) : -1] if have else target_features(context)
    for a in have:
        set.discard(attrs, a)
    parts = [f for f in features.split(",") if f]
    parts += [f for f in extra.split(",") if f not in parts]
    set.add(attrs, key + ",".join(parts) + '"')


def _call(builder, name, argtypes, args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), argtypes), name)
    builder.call(fn, args)


@intrinsic
def _tile_config(typingctx, address):
    """``ldtilecfg``: the 64-byte configuration at ``address``."""

    def codegen(context, builder, signature, args):
        _amx_function(context, builder)
        _call(builder, "llvm.x86.ldtilecfg", [_ptr], [builder.inttoptr(args[0], _ptr)])
        return context.get_dummy_value()

    return types.void(types.int64), codegen


@intrinsic
def _tile_release(typingctx):
    def codegen(context, builder, signature, args):
        _amx_function(context, builder)
        _call(builder, "llvm.x86.tilerelease", [], [])
        return context.get_dummy_value()

    return types.void(), codegen


def _tile_op(name, tile):
    """``tileloadd``/``tilestored`` of tile register ``tile`` (an immediate) at (address, row stride in bytes)."""

    @intrinsic
    def op(typingctx, address, stride):
        def codegen(context, builder, signature, args):
            _amx_function(context, builder)
            _call(builder, name, [_i8, _ptr, _i64], [ir.Constant(_i8, tile), builder.inttoptr(args[0], _ptr), args[1]])
            return context.get_dummy_value()

        return types.void(types.int64, types.int64), codegen

    return op


def _tile_zero(tile):
    @intrinsic
    def op(typingctx):
        def codegen(context, builder, signature, args):
            _amx_function(context, builder)
            _call(builder, "llvm.x86.tilezero", [_i8], [ir.Constant(_i8, tile)])
            return context.get_dummy_value()

        return types.void(), codegen

    return op


def _dot(c, a, b):
    """``tdpbf16ps``: tile ``c`` (16 × 16 float32) += tile ``a`` (16 × 32 bf16) · tile ``b`` (16 pairs × 16)."""

    @intrinsic
    def op(typingctx):
        def codegen(context, builder, signature, args):
            _amx_function(context, builder)
            _call(builder, "llvm.x86.tdpbf16ps", [_i8] * 3, [ir.Constant(_i8, t) for t in (c, a, b)])
            return context.get_dummy_value()

        return types.void(), codegen

    return op


_load = [_tile_op("llvm.x86.tileloadd64", t) for t in range(8)]
_store = [_tile_op("llvm.x86.tilestored64", t) for t in range(4)]
_load0, _load1, _load2, _load3, _load4, _load5, _load6, _load7 = _load
_store0, _store1, _store2, _store3 = _store
_zero0, _zero1, _zero2, _zero3 = (_tile_zero(t) for t in range(4))
# 2 × 2 blocking: C tiles 0–3, A tiles 4, 5 (two row blocks), B tiles 6, 7 (two column blocks)
_dot046, _dot147, _dot256, _dot357 = _dot(0, 4, 6), _dot(1, 4, 7), _dot(2, 5, 6), _dot(3, 5, 7)
# D = 64, Q resident: C tiles 0, 1 (two column blocks), A tiles 2, 3 (the two 32-wide halves
# of 16 keys), B tiles 4, 5 (columns j, both halves) and 6, 7 (columns j + 16)
_dot024, _dot036, _dot125, _dot137 = _dot(0, 2, 4), _dot(0, 3, 5), _dot(1, 2, 6), _dot(1, 3, 7)


@njit(cache=_JIT_CACHE)
def tile_config():
    """The configuration every product here uses: palette 1, tiles 0–7 of 16 rows × 64 bytes."""
    cfg = np.zeros(64, dtype=np.uint8)
    cfg[0] = 1
    for t in range(8):
        cfg[16 + 2 * t] = 64
        cfg[48 + t] = 16
    return cfg


@njit(cache=_JIT_CACHE, nogil=True)
def pack_vt(v32, out32):
    """V packed transposed per key tile, the A operand of :func:`values`: ``out (B, H, nkb, X,
    BK)`` from ``v (B, H, nkb·BK, X)``, both bfloat16 bits read as uint32 (``v32 (…, X/2)``,
    ``out32 (…, X, BK/2)``).  Two keys' rows at a time: their uint32 words ``a = (V[k, d],
    V[k, d+1])`` and ``b = (V[k+1, d], V[k+1, d+1])`` give Vᵀ's words ``(V[k, d], V[k+1, d])
    = lo(a) | lo(b) << 16`` and ``(V[k, d+1], V[k+1, d+1]) = hi(a) | hi(b)``: no 16-bit
    element moves alone.

    Where the CPU has AVX-512 and the tile is whole 16 × 16 word blocks (X/2 and BK/2
    multiples of 16, unit strides), each block of 16 key pairs × 16 words goes through
    vectors (:func:`_pack_vt_block16`: 32 row loads, the word trick on 16 lanes, two 16 × 16
    transposes in registers, 32 stores of a cache line); else element by element, 32 dims at
    a time (64 output rows of a tile stay in L1).  H4 L4096 D128 / H8 D64 on one thread after a
    forward call: 1.0–1.3 ms in vectors, 2.2–3.0 element by element (NumPy's strided copy took
    1.1–2.2); whole calls 0.96 (D128), 0.98 (D64), 0.96–0.97 (causal): docs/performance-log.md,
    "bfloat16 forward: V's transposing pack in vectors".

    Returns whether every value is finite, checked on the bits as they pass (the forward's
    separate check of V took another 0.45–0.5 ms a call): a bfloat16 half ``x`` is NaN or
    ±inf iff ``(x & 0x7FFF) + 0x80`` reaches bit 15, done on both halves of a word at once."""
    B, H, L, X2 = v32.shape
    nkb, BK2 = out32.shape[2], out32.shape[4]
    lo, hi = np.uint32(0xFFFF), np.uint32(0xFFFF0000)
    magnitude, step, top = np.uint32(0x7FFF7FFF), np.uint32(0x00800080), np.uint32(0x80008000)
    bad = np.uint32(0)
    if _VEC_PACK and X2 % 16 == 0 and BK2 % 16 == 0 and v32.strides[3] == 4 and out32.strides[4] == 4:
        flags = np.zeros(16, dtype=np.uint32)
        s_ld, d_ld = v32.strides[2], out32.strides[3]
        for b in range(B):
            for h in range(H):
                src_h = v32.ctypes.data + b * v32.strides[0] + h * v32.strides[1]
                for kb in range(nkb):
                    dst_t = out32.ctypes.data + b * out32.strides[0] + h * out32.strides[1] + kb * out32.strides[2]
                    for kp0 in range(0, BK2, 16):
                        src = src_h + (kb * 2 * BK2 + 2 * kp0) * s_ld
                        for j0 in range(0, X2, 16):
                            _pack_vt_block16(src + j0 * 4, s_ld, dst_t + 2 * j0 * d_ld + kp0 * 4, d_ld, flags.ctypes.data)
        for i in range(16):
            bad |= flags[i]
        return (bad & top) == 0
    for b in range(B):
        for h in range(H):
            for kb in range(nkb):
                o = out32[b, h, kb]
                for j0 in range(0, X2, 32):
                    j1 = min(j0 + 32, X2)
                    for kp in range(BK2):
                        k = kb * 2 * BK2 + 2 * kp
                        a_row = v32[b, h, k]
                        b_row = v32[b, h, k + 1]
                        for j in range(j0, j1):
                            a = a_row[j]
                            w = b_row[j]
                            o[2 * j, kp] = (a & lo) | (w << np.uint32(16))
                            o[2 * j + 1, kp] = (a >> np.uint32(16)) | (w & hi)
                            bad |= ((a & magnitude) + step) | ((w & magnitude) + step)
    return (bad & top) == 0


@njit(cache=_JIT_CACHE, nogil=True)
def tile_t(k32, out32):
    """One key tile transposed, the A operand of :func:`values` for the bfloat16 backward's
    ``dQᵀ += Kᵀ·dS``: ``out (X, ≥BK)`` bfloat16 from ``k (BK, X)``, both read as uint32
    (``k32 (BK, X/2)``, ``out32 (X, ≥BK/2)``), by :func:`pack_vt`'s word trick (two keys'
    words give two of Kᵀ's).  Done by the task that owns the key tile, once for all its
    query tiles."""
    BK2, X2 = k32.shape[0] // 2, k32.shape[1]
    lo, hi = np.uint32(0xFFFF), np.uint32(0xFFFF0000)
    for j0 in range(0, X2, 32):
        j1 = min(j0 + 32, X2)
        for kp in range(BK2):
            a_row = k32[2 * kp]
            b_row = k32[2 * kp + 1]
            for j in range(j0, j1):
                a = a_row[j]
                w = b_row[j]
                out32[2 * j, kp] = (a & lo) | (w << np.uint32(16))
                out32[2 * j + 1, kp] = (a >> np.uint32(16)) | (w & hi)


@njit(cache=_JIT_CACHE)
def pack_q(Qs, Qv):
    """``Qv (D/2, BQ)`` uint32 = Q's bits as pairs, transposed: the B operand of ``K·Qᵀ``."""
    BQ, D = Qs.shape
    Q32 = Qs.reshape(BQ * D).view(np.uint32)
    half = D // 2
    if half <= 32:  # query by query: 2.8 µs a 256-row tile at D 64 (16 queries at a time: 6.0)
        for n in range(BQ):
            for k in range(half):
                Qv[k, n] = Q32[n * half + k]
        return
    # 16 queries at a time: query by query, the 1 KiB-strided writes to D/2 rows aliased in L1
    # at D 128 (54 µs a 256-row tile against 32, same process)
    for n0 in range(0, BQ, 16):
        for k in range(half):
            qrow = Qv[k]
            for n in range(n0, min(n0 + 16, BQ)):
                qrow[n] = Q32[n * half + k]


def _transpose16(builder, rows):
    """16 vectors of 16 × i32 (a 16 × 16 matrix by rows) → its transpose, by four stages of
    two-source shuffles (stage ``b`` swaps bit ``b`` of the row and the column index)."""
    rows = list(rows)
    for b in (8, 4, 2, 1):
        keep = ir.Constant(ir.VectorType(_I32, 16), [c if c & b == 0 else 16 + c - b for c in range(16)])
        swap = ir.Constant(ir.VectorType(_I32, 16), [c + b if c & b == 0 else 16 + c for c in range(16)])
        for i in range(16):
            if i & b == 0:
                r0, r1 = rows[i], rows[i + b]
                rows[i] = builder.shuffle_vector(r0, r1, keep)
                rows[i + b] = builder.shuffle_vector(r0, r1, swap)
    return rows


def _transpose_codegen(add):
    """The code of :func:`_transpose_store16` (``add`` False) and :func:`_transpose_add16`."""

    def codegen(context, builder, signature, args):
        src, src_ld, dst, dst_ld = args
        _amx_function(context, builder, _AVX512)
        v16 = ir.VectorType(_I32, 16)
        rows = []
        for r in range(16):
            addr = builder.add(src, builder.mul(src_ld, ir.Constant(src_ld.type, r)))
            rows.append(builder.load(builder.inttoptr(addr, v16.as_pointer()), align=4))
        for k, vec in enumerate(_transpose16(builder, rows)):
            addr = builder.add(dst, builder.mul(dst_ld, ir.Constant(dst_ld.type, k)))
            if add:
                vf = ir.VectorType(ir.FloatType(), 16)
                ptr = builder.inttoptr(addr, vf.as_pointer())
                builder.store(builder.fadd(builder.load(ptr, align=4), builder.bitcast(vec, vf)), ptr, align=4)
            else:
                builder.store(vec, builder.inttoptr(addr, v16.as_pointer()), align=4)
        return context.get_dummy_value()

    return codegen


@intrinsic
def _transpose_store16(typingctx, src, src_ld, dst, dst_ld):
    """16 rows of 16 32-bit words at ``src`` (rows ``src_ld`` bytes apart) → their transpose, 16
    rows of 16 at ``dst`` (``dst_ld`` apart): a 16 × 16 block moved through registers
    (:func:`_transpose16`), where element-by-element stores each went to another row (float32
    dQᵀ parts in ``_cpu_amx_f32.sum_scale_transpose``; the query tile's bfloat16 pairs in
    :func:`pack_q_rows`)."""
    return types.void(types.int64, types.int64, types.int64, types.int64), _transpose_codegen(False)


@intrinsic
def _transpose_add16(typingctx, src, src_ld, dst, dst_ld):
    """``dst[k, 0:16] += src[0:16, k]`` for ``k < 16`` (float32; rows ``src_ld`` and ``dst_ld``
    bytes apart): :func:`_transpose_store16` adding instead of storing (a product's block added
    transposed: ``_cpu_amx_f32.product_add_t``)."""
    return types.void(types.int64, types.int64, types.int64, types.int64), _transpose_codegen(True)


def _i32x16(value):
    """A ``<16 x i32>`` constant of ``value`` (a uint32 bit pattern) in every lane."""
    value = int(value) & 0xFFFFFFFF
    return ir.Constant(ir.VectorType(_I32, 16), [value - (1 << 32) if value >= 1 << 31 else value] * 16)


@intrinsic
def _pack_vt_block16(typingctx, src, src_ld, dst, dst_ld, flags):
    """:func:`pack_vt` for 16 key pairs × 16 uint32 words: keys ``2r`` and ``2r + 1`` (r < 16)
    at ``src + 2r·src_ld`` and ``src + (2r+1)·src_ld`` (16 words each); Vᵀ's rows ``2j`` and
    ``2j + 1`` (j < 16) at ``dst + 2j·dst_ld`` and ``dst + (2j+1)·dst_ld`` (16 words: the 16 key
    pairs).  The word trick per lane gives per key pair r the vectors ``lo_r[j] = (V[2r, 2j],
    V[2r+1, 2j])`` and ``hi_r[j]``; their 16 × 16 transposes (:func:`_transpose16`) are Vᵀ's
    rows.  ``flags`` (16 uint32) gathers ``((w & 0x7FFF7FFF) + 0x00800080)`` of every word read
    by or (the finiteness check)."""

    def codegen(context, builder, signature, args):
        src, src_ld, dst, dst_ld, flags = args
        _amx_function(context, builder, _AVX512)
        v16 = ir.VectorType(_I32, 16)
        lo_m, hi_m, sixteen = _i32x16(0xFFFF), _i32x16(0xFFFF0000), _i32x16(16)
        magnitude, step = _i32x16(0x7FFF7FFF), _i32x16(0x00800080)
        fptr = builder.inttoptr(flags, v16.as_pointer())
        bad = builder.load(fptr, align=4)
        los, his = [], []
        for r in range(16):
            addr = builder.add(src, builder.mul(src_ld, ir.Constant(src_ld.type, 2 * r)))
            a = builder.load(builder.inttoptr(addr, v16.as_pointer()), align=4)
            w = builder.load(builder.inttoptr(builder.add(addr, src_ld), v16.as_pointer()), align=4)
            los.append(builder.or_(builder.and_(a, lo_m), builder.shl(w, sixteen)))
            his.append(builder.or_(builder.lshr(a, sixteen), builder.and_(w, hi_m)))
            for x in (a, w):
                bad = builder.or_(bad, builder.add(builder.and_(x, magnitude), step))
        builder.store(bad, fptr, align=4)
        for e, rows in enumerate((los, his)):
            for j, vec in enumerate(_transpose16(builder, rows)):
                addr = builder.add(dst, builder.mul(dst_ld, ir.Constant(dst_ld.type, 2 * j + e)))
                builder.store(vec, builder.inttoptr(addr, v16.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.void(types.int64, types.int64, types.int64, types.int64, types.int64), codegen


@njit(cache=_JIT_CACHE)
def pack_q_rows(q32, b, h, i0, nr, Qv):
    """:func:`pack_q` read where the rows lie: query rows ``i0 … i0+nr−1`` of head ``(b, h)`` of
    ``q32`` (the kernel's ``q`` as uint32 pairs, ``(B, H, Lq, D/2)``) into ``Qv (D/2, BQ)``,
    columns from ``nr`` on 0 — no copy of the query tile first (which, with its zeroing, took
    ≈ 8.5 µs a 256-row tile at D 128 in isolation).

    Whole 16-row blocks by :func:`_transpose_store16` (16 × 16 words a step; D/2 is a multiple of
    16 on the AMX path): element by element (16 queries at a time where D/2 rows alias, as
    :func:`pack_q`) a 256-row tile took 31 µs at D 128."""
    half, BQ = Qv.shape[0], Qv.shape[1]
    step = BQ if half <= 32 else 16  # (see pack_q: 16 queries at a time where D/2 rows alias)
    vec = half % 16 == 0 and q32.strides[3] == 4 and Qv.strides[1] == 4
    n_vec = (min(nr, BQ) // 16) * 16 if vec else 0
    base = q32.ctypes.data + b * q32.strides[0] + h * q32.strides[1] + i0 * q32.strides[2]
    for n0 in range(0, n_vec, 16):
        for k0 in range(0, half, 16):
            _transpose_store16(base + n0 * q32.strides[2] + k0 * 4, q32.strides[2], Qv.ctypes.data + k0 * Qv.strides[0] + n0 * 4, Qv.strides[0])
    for n0 in range(n_vec, BQ, step):
        n1 = min(n0 + step, BQ)
        for k in range(half):
            qrow = Qv[k]
            for n in range(n0, min(n1, nr)):
                qrow[n] = q32[b, h, i0 + n, k]
            for n in range(max(n0, nr), n1):
                qrow[n] = 0


@njit(cache=_JIT_CACHE, nogil=True)
def pack_pairs_t(x32, lens, out, r0, r1):
    """Whole heads of query-side rows in AMX pair layout, transposed, once per call: the
    bfloat16 backward's B operands of ``Sᵀ = K·Qᵀ`` and ``dPᵀ = V·dOᵀ`` (``Options.qv``/``dov``)
    — what :func:`pack_q_rows` does per query tile, done once per head instead of once per
    (key tile, query tile).  ``x32 (R, L, X/2)``: heads ``(b, h)`` flattened, bfloat16 bits
    read as uint32; ``out (R, X/2, Lp)`` uint32, ``Lp ≥ L``; row ``i`` of head ``r`` kept where
    ``i < lens[r]``, every other column 0 (padding rows must not carry NaN).  Heads ``r0 …
    r1 − 1`` only (split over the caller and the ``_launch`` pool); 16 rows at a time (one
    cache line of each output row), as :func:`pack_q_rows`."""
    L, half, Lp = x32.shape[1], x32.shape[2], out.shape[2]
    for r in range(r0, r1):
        n = min(lens[r], L)
        xr, o = x32[r], out[r]
        for i0 in range(0, Lp, 16):
            i1 = min(i0 + 16, Lp)
            for k in range(half):
                row = o[k]
                for i in range(i0, min(i1, n)):
                    row[i] = xr[i, k]
                for i in range(max(i0, n), i1):
                    row[i] = 0


@njit(cache=_JIT_CACHE, nogil=True)
def pack_row_pairs(x16, lens, out, r0, r1):
    """Whole heads of query-side rows in pairs of rows, once per call: the bfloat16 backward's
    B operands of ``dV += P̃ᵀ·dO`` and ``dK += dS·Q`` (:func:`values` with A = P̃ᵀ or dS as
    the kernel holds them, ``(BK, BQ)`` rows of keys; ``Options.qrows``/``dorows``).  ``x16
    (R, L, X)`` bfloat16 bits (heads flattened); ``out (R, Lp/2, X)`` uint32, word ``(p, d) =
    x[2p, d] | x[2p+1, d] << 16``; rows ``i ≥ lens[r]`` read as 0 (padding rows must not carry
    NaN), pairs past them 0.  Heads ``r0 … r1 − 1`` only."""
    L, X, P = x16.shape[1], x16.shape[2], out.shape[1]
    for r in range(r0, r1):
        n = min(lens[r], L)
        xr, o = x16[r], out[r]
        for p in range(P):
            row = o[p]
            i = 2 * p
            if i + 1 < n:
                a, b = xr[i], xr[i + 1]
                for d in range(X):
                    row[d] = np.uint32(a[d]) | (np.uint32(b[d]) << np.uint32(16))
            elif i < n:
                a = xr[i]
                for d in range(X):
                    row[d] = np.uint32(a[d])
            else:
                for d in range(X):
                    row[d] = 0


@njit(cache=_JIT_CACHE, inline="always")
def _depth_2x2(a_addr, a_ld, b_addr, b_ld, depth):
    """C tiles 0–3 += two 16-row A blocks (rows ``a_ld`` bytes apart, from ``a_addr``) times
    two 16-column B blocks (pair rows ``b_ld`` apart, from ``b_addr``), ``depth`` deep in
    32-steps: the inner loop of both products.  Inlined (tile registers do not survive a call)."""
    for kk in range(0, depth, 32):
        _load4(a_addr + kk * 2, a_ld)
        _load5(a_addr + 16 * a_ld + kk * 2, a_ld)
        _load6(b_addr + (kk // 2) * b_ld, b_ld)
        _load7(b_addr + (kk // 2) * b_ld + 64, b_ld)
        _dot046()
        _dot147()
        _dot256()
        _dot357()


@njit(cache=_JIT_CACHE, inline="always")
def _store_2x2(c, c_ld):
    _store0(c, c_ld)
    _store1(c + 64, c_ld)
    _store2(c + 16 * c_ld, c_ld)
    _store3(c + 16 * c_ld + 64, c_ld)


@njit(cache=_JIT_CACHE, inline="always")
def _scores_block64(k_addr, k_ld, BK, q_addr, q_ld, j, s_addr, s_ld):
    """``Sᵀ[:, j:j+32]`` (BK keys × 32 queries) at D = 64, at ``s_addr`` (rows ``s_ld`` bytes
    apart; the block's first column there): the four B tiles of the block stay loaded while
    all key rows pass (half the tile loads of the 2 × 2 scheme): 9.4–10.6 µs a 256 × 256 tile
    against 14–15 µs 2 × 2 and 16–26 µs for MKL (same process, load 1–1.5)."""
    _load4(q_addr + j * 4, q_ld)
    _load5(q_addr + 16 * q_ld + j * 4, q_ld)
    _load6(q_addr + (j + 16) * 4, q_ld)
    _load7(q_addr + 16 * q_ld + (j + 16) * 4, q_ld)
    for i in range(0, BK, 16):
        _zero0()
        _zero1()
        _load2(k_addr + i * k_ld, k_ld)
        _load3(k_addr + i * k_ld + 64, k_ld)
        _dot024()
        _dot036()
        _dot125()
        _dot137()
        _store0(s_addr + i * s_ld, s_ld)
        _store1(s_addr + i * s_ld + 64, s_ld)


# Key rows of a D ≠ 64 score product taken per chunk of this many bytes of K (whole 32-row
# blocks, at least one), each chunk with every query block: the chunk stays in L1 while the
# query blocks pass, and Qᵀ's pairs stream from L2 once per chunk — rather than all of K (64
# KiB at D 128, more than L1) once per 32-query block.  In the kernel's loop, one thread
# (``benchmarks/bf16_forward_variants.py``, 1 Dec 20:53–21:07, load 0.3–1.0), the score product
# against the query blocks outer: H4 L4096 D128 chunks of 64 keys (16 KiB) 0.75–0.87×, of 32
# 0.90–0.93, of 128 0.89–1.00; H2 D256 chunks of 32 keys (16 KiB) 0.79×, of 64 1.13×.
SCORE_CHUNK_BYTES = 16384


@njit(cache=_JIT_CACHE, inline="always")
def _load_or_zero_2x2(c, c_ld, fresh):
    """C tiles 0–3 from accᵀ's 32 × 32 block at ``c`` — or, ``fresh`` (a query tile's first
    key tile), tile zeros: the accumulator is then not read, so it needs no zeroing pass."""
    if fresh:
        _zero0()
        _zero1()
        _zero2()
        _zero3()
    else:
        _load0(c, c_ld)
        _load1(c + 64, c_ld)
        _load2(c + 16 * c_ld, c_ld)
        _load3(c + 16 * c_ld + 64, c_ld)


@njit(cache=_JIT_CACHE, inline="always")
def _values_block(v_addr, v_ld, Dv, BK, p_addr, p_ld, c_addr, c_ld, fresh):
    """``accᵀ[:, block] += Vᵀ · P[:, block]`` for one 32-query block: P pairs at ``p_addr``,
    accᵀ's block at ``c_addr`` (``= Vᵀ · P[:, block]`` when ``fresh``)."""
    for i in range(0, Dv, 32):
        c = c_addr + i * c_ld
        _load_or_zero_2x2(c, c_ld, fresh)
        _depth_2x2(v_addr + i * v_ld, v_ld, p_addr, p_ld, BK)
        _store_2x2(c, c_ld)


@njit(cache=_JIT_CACHE, nogil=True)
def scores(k_addr, k_ld, BK, D, q_addr, q_ld, BQ, s_addr, s_ld, cfg):
    """``Sᵀ (BK, BQ) = K · Qᵀ`` in float32: K rows at ``k_addr`` (``k_ld`` bytes apart), Q as
    :func:`pack_q` made it (``(D/2, BQ)`` uint32, rows ``q_ld`` bytes apart), Sᵀ rows ``s_ld``
    bytes apart.  BK, BQ and D multiples of 32.  (The kernels' row strides are a cache line
    more than the rows' 4·BQ bytes: :data:`ROW_PAD`.)"""
    _tile_config(cfg.ctypes.data)
    if D == 64:  # Q resident: the query blocks outer
        for j in range(0, BQ, 32):
            _scores_block64(k_addr, k_ld, BK, q_addr, q_ld, j, s_addr + j * 4, s_ld)
    else:  # 2 × 2 blocks, key chunks outer (SCORE_CHUNK_BYTES), each with every query block
        chunk = max(32, SCORE_CHUNK_BYTES // (2 * D) // 32 * 32)
        for i0 in range(0, BK, chunk):
            i1 = min(i0 + chunk, BK)
            for j in range(0, BQ, 32):
                for i in range(i0, i1, 32):
                    _zero0()
                    _zero1()
                    _zero2()
                    _zero3()
                    _depth_2x2(k_addr + i * k_ld, k_ld, q_addr + j * 4, q_ld, D)
                    _store_2x2(s_addr + i * s_ld + j * 4, s_ld)
    _tile_release()


ROWS_OUTER_MAX_DV = 128


@njit(cache=_JIT_CACHE, nogil=True)
def values_rows_outer(v_addr, v_ld, Dv, BK, p_addr, p_ld, BQ, c_addr, c_ld, cfg, fresh=False):
    """:func:`values` (same operands, same bits) with accᵀ's 32-row blocks outer: each block's
    A rows (Vᵀ's 32 dims over BK keys: 16 KiB at BK 256) stay in L1 while P's query blocks
    pass, instead of all of Vᵀ (32–64 KiB) streaming from L2 once per query block.  The
    forward's ``accᵀ += Vᵀ·P``: in the kernel's loop, one thread (``benchmarks/
    bf16_forward_variants.py``, 1 Dec 20:53, load 0.3), 0.88–0.95× the product's time at D 128
    and 0.88 at D 64; at D 256 1.06–1.07 in two of three runs (21:05–21:08, load 1.0): the
    forward takes it up to Dv :data:`ROWS_OUTER_MAX_DV`.  ``fresh``: ``accᵀ = Vᵀ·P`` (C from
    tile zeros, accᵀ not read: a query tile's first key tile)."""
    _tile_config(cfg.ctypes.data)
    for i in range(0, Dv, 32):
        for j in range(0, BQ, 32):
            c = c_addr + i * c_ld + j * 4
            _load_or_zero_2x2(c, c_ld, fresh)
            _depth_2x2(v_addr + i * v_ld, v_ld, p_addr + j * 4, p_ld, BK)
            _store_2x2(c, c_ld)
    _tile_release()


@njit(cache=_JIT_CACHE, nogil=True)
def values(v_addr, v_ld, Dv, BK, p_addr, p_ld, BQ, c_addr, c_ld, cfg, fresh=False):
    """``accᵀ (Dv, BQ) += Vᵀ · P`` in float32: Vᵀ rows at ``v_addr`` (``v_ld`` bytes apart, BK
    keys each), P in key pairs (``(BK/2, BQ)`` uint32, rows ``p_ld`` bytes apart), accᵀ rows
    ``c_ld`` bytes apart.  Dv, BK and BQ multiples of 32.  ``fresh``: ``accᵀ = Vᵀ·P`` (accᵀ
    not read)."""
    _tile_config(cfg.ctypes.data)
    for j in range(0, BQ, 32):
        _values_block(v_addr, v_ld, Dv, BK, p_addr + j * 4, p_ld, c_addr + j * 4, c_ld, fresh)
    _tile_release()


# The row stride of the forward's tile buffers on this path (Qᵀ's pairs, Sᵀ, P's key pairs,
# accᵀ) is their 4·BQ bytes plus this (``_cpu_primitives._tile_buffer``).  At BQ 256 the rows
# lay 1 KiB apart: the 16 rows of a tile load or store (and the softmax pass's row pairs) fell
# into 4 of L1's 64 sets, so a 32-query block's Qᵀ pairs (128 lines) could not stay in L1
# while the key rows passed, and P's pairs, accᵀ and Sᵀ likewise.  A cache line more spreads
# them over 16 sets: the three steps in the kernel's order, one thread, H4 L4096 D128 36.4 →
# 32.1 ms (D 64: 45.1 → 41.8; 00:40, load 1.3–1.8).  Per buffer alone: P's pairs 1.8 ms, Qᵀ
# 1.1, accᵀ 0.5–0.9, Sᵀ 0.4.
ROW_PAD = 64


# =================================================================================
# the softmax pass into the AMX B operand, written as 512-bit vectors
# =================================================================================
#
# Numba's autovectorized form of this pass (``_cpu_primitives._exp2_sum_max_bf16``) ran ≈ 18
# vector µops per 16 scores on the two 512-bit ports: a NaN-sticky max (two compares, a mask
# or, a masked move), a clamp, ``roundeven`` and a subtraction for the fraction, an int
# round trip for ``vscalefps``, a select, and two ``vcvtneps2bf16`` plus a widen, shift and
# or per key pair.  Written here: a plain ``vmaxps`` (a NaN score is found through the sum,
# below), ``vreduceps`` for the fraction ``x − ⌊x⌋`` (one µop), ``vscalefps`` scaling by
# ``2^⌊x⌋`` from the float ``x`` itself under a zeroing mask (no clamp, no int round trip, no
# select), and one ``vcvtne2ps2bf16`` + ``vpermw`` per two key rows: ≈ 10.5 µops.

_VF = ir.VectorType(ir.FloatType(), 16)
_I16, _I32 = ir.IntType(16), ir.IntType(32)
_LANES = 16
# 2**f on [0, 1), degree 3, minimax in the relative error: 7.5e-5 (float32 Horner), far below
# bfloat16's 2**−9 rounding of P (the naive baseline rounds P too).
_EXP2_01 = (0.07802452892065048, 0.22606714069843292, 0.6958335638046265, 0.9999251961708069)
_EXP2_FLOOR = -125.0  # 2**x for x ≤ this is 0 (as the float32 path, which flushes below 2**−126)
_AVX512 = "+avx512f,+avx512bw,+avx512dq,+avx512vl,+avx512bf16"


def _vconst(value):
    return ir.Constant(_VF, [float(np.float32(value))] * _LANES)


def _vfn(builder, name, ret, args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


def _vptr(builder, addr, ty=_VF):
    return builder.inttoptr(addr, ty.as_pointer())


# words (lo[0], hi[0], lo[1], hi[1], …) of the 32 bfloat16 halves of vcvtne2ps2bf16(hi, lo)
_PAIR_WORDS = [i // 2 + (i % 2) * 16 for i in range(32)]


def _row_pair_halves(builder, c, s_addr, s_ld, p_addr, p_ld):
    """The row pair ``c`` of a 32-query column block of Sᵀ (rows ``2c`` and ``2c + 1``, ``s_ld``
    bytes apart) and its row of key pairs in P (``p_ld`` bytes apart): per 16-query half
    ``g`` yields ``(g, s0, s1, dst)`` — the two rows' float32 vectors and where the half's
    uint32 pair words go."""
    row0 = builder.add(s_addr, builder.mul(builder.mul(c, ir.Constant(c.type, 2)), s_ld))
    row1 = builder.add(row0, s_ld)
    prow = builder.add(p_addr, builder.mul(c, p_ld))
    for g in range(2):
        off = ir.Constant(ir.IntType(64), 64 * g)
        s0 = builder.load(_vptr(builder, builder.add(row0, off)), align=4)
        s1 = builder.load(_vptr(builder, builder.add(row1, off)), align=4)
        yield g, s0, s1, builder.add(prow, off)


def _bf16_pairs(builder, lo, hi):
    """Two float32 vectors rounded to bfloat16 (``vcvtne2ps2bf16``, ties to even) and paired
    lane by lane: lane ``i`` of the ``<16 x i32>`` result holds ``lo[i]`` in its low half and
    ``hi[i]`` in its high half — one key pair (or dim pair) as one uint32 word, AMX's layout."""
    vbf = ir.VectorType(_BFloat(), 32)
    cvt = _vfn(builder, "llvm.x86.avx512bf16.cvtne2ps2bf16.512", vbf, [_VF, _VF])
    both = builder.bitcast(builder.call(cvt, [hi, lo]), ir.VectorType(_I16, 32))  # low half: lo
    words = ir.Constant(ir.VectorType(_I32, 32), _PAIR_WORDS)
    pairs = builder.shuffle_vector(both, ir.Constant(ir.VectorType(_I16, 32), ir.Undefined), words)
    return builder.bitcast(pairs, ir.VectorType(_I32, _LANES))


def _exp2_vec(builder, x):
    """``2**x`` per lane: 0 where ``x ≤ −125``, NaN where ``x`` is NaN (so that a NaN score
    reaches the row sum), relative error ≤ 7.5e-5 elsewhere.

    ``vreduceps`` (round down, no fraction bits kept) gives ``f = x − ⌊x⌋`` exactly; the
    polynomial ``2**f``; ``vscalefps`` multiplies by ``2**⌊x⌋`` taking ``x`` as a float, under
    a zeroing mask (``x > −125`` or unordered): masked lanes produce no underflow, whose
    microcode assist ran a causal tile's masked half 12× slower (docs/performance.md).
    """
    zero = ir.Constant(_VF, [0.0] * _LANES)
    every = ir.Constant(_I16, -1)
    reduce = _vfn(builder, "llvm.x86.avx512.mask.reduce.ps.512", _VF, [_VF, _I32, _VF, _I16, _I32])
    scalef = _vfn(builder, "llvm.x86.avx512.mask.scalef.ps.512", _VF, [_VF, _VF, _VF, _I16, _I32])
    fma = builder.module.declare_intrinsic("llvm.fma.v16f32", fnty=ir.FunctionType(_VF, [_VF] * 3))
    # imm 9: keep 0 fraction bits, round down (bits 1:0 = 01, bit 2 = 0), no precision exception
    f = builder.call(reduce, [x, ir.Constant(_I32, 9), zero, every, ir.Constant(_I32, 4)])
    p = _vconst(_EXP2_01[0])
    for c in _EXP2_01[1:]:
        p = builder.call(fma, [p, f, _vconst(c)])
    keep = builder.bitcast(builder.fcmp_unordered(">", x, _vconst(_EXP2_FLOOR)), _I16)
    return builder.call(scalef, [p, x, zero, keep, ir.Constant(_I32, 4)])


def _plan_ranges(builder, plan_addr):
    """A prefetch plan's ``(address, lines)`` of both ranges, read once before a loop (inside
    it, LLVM kept reloading them and dividing: the pass ran 0.6–1.2 µs a tile slower even
    with nothing to prefetch)."""
    i64t = ir.IntType(64)
    plan = builder.inttoptr(plan_addr, i64t.as_pointer())
    a, na, b, nb = (builder.load(builder.gep(plan, [ir.Constant(i64t, k)])) for k in range(4))
    lines = [builder.sdiv(builder.add(n, ir.Constant(i64t, 63)), ir.Constant(i64t, 64)) for n in (na, nb)]
    return a, lines[0], b, lines[1]


def _prefetch_plan_lines(builder, plan, first, count):
    """Prefetch (``prefetcht1``) lines ``first … first + count − 1`` of :func:`_plan_ranges`'
    two ranges (lines past both skipped)."""
    i64t = ir.IntType(64)
    a, la, b, lb = plan
    fn = builder.module.declare_intrinsic(
        "llvm.prefetch", [_ptr], ir.FunctionType(ir.VoidType(), [_ptr, _I32, _I32, _I32])
    )
    line = ir.Constant(i64t, 64)
    with cgutils.for_range(builder, count) as loop:
        k = builder.add(first, loop.index)
        with builder.if_then(builder.icmp_signed("<", k, builder.add(la, lb))):
            addr = builder.select(builder.icmp_signed("<", k, la), builder.add(a, builder.mul(k, line)),
                                  builder.add(b, builder.mul(builder.sub(k, la), line)))
            builder.call(fn, [builder.inttoptr(addr, _ptr), ir.Constant(_I32, 0), ir.Constant(_I32, 2), ir.Constant(_I32, 1)])


def _pairs_pass(with_max):
    """The pass over one 32-query column block as an intrinsic; see :func:`exp2_pairs`.
    ``with_max``: the column max too (one ``vmaxps`` per 16 scores, ≈ 10 % of the pass)."""

    @intrinsic
    def block(typingctx, s_addr, s_ld, rows, p_addr, p_ld, mul, sub_addr, sum_addr, max_addr, plan_addr, pf_first, pf_count):
        i64 = types.int64
        sig = types.void(i64, i64, i64, i64, i64, types.float32, i64, i64, i64, i64, i64, i64)

        def codegen(context, builder, signature, args):
            s_addr, s_ld, rows, p_addr, p_ld, mul, sub_addr, sum_addr, max_addr, plan_addr, pf_first, pf_count = args
            _amx_function(context, builder, _AVX512)
            i64t = ir.IntType(64)
            iters = builder.sdiv(rows, ir.Constant(rows.type, 2))
            # the plan's lines [first, first + count) spread over the row pairs, rounded up
            safe = builder.select(builder.icmp_signed(">", iters, ir.Constant(i64t, 0)), iters, ir.Constant(i64t, 1))
            per_iter = builder.sdiv(builder.add(pf_count, builder.sub(safe, ir.Constant(i64t, 1))), safe)
            plan = _plan_ranges(builder, plan_addr)
            fma = builder.module.declare_intrinsic("llvm.fma.v16f32", fnty=ir.FunctionType(_VF, [_VF] * 3))
            undef = ir.Constant(_VF, ir.Undefined)
            first = builder.insert_element(undef, mul, ir.Constant(_I32, 0))
            mul_v = builder.shuffle_vector(first, undef, ir.Constant(ir.VectorType(_I32, _LANES), [0] * _LANES))
            vmax, vsum, neg_sub = [], [], []
            for g in range(2):  # the block's two 16-query halves
                off = ir.Constant(i64t, 64 * g)
                neg_sub.append(builder.fneg(builder.load(_vptr(builder, builder.add(sub_addr, off)), align=4)))
                m = cgutils.alloca_once(builder, _VF)
                builder.store(_vconst(-np.inf), m)
                t = cgutils.alloca_once(builder, _VF)
                builder.store(builder.load(_vptr(builder, builder.add(sum_addr, off)), align=4), t)
                vmax.append(m)
                vsum.append(t)
            with cgutils.for_range(builder, iters) as loop:
                c = loop.index
                _prefetch_plan_lines(builder, plan, builder.add(pf_first, builder.mul(c, per_iter)), per_iter)
                for g, s0, s1, dst in _row_pair_halves(builder, c, s_addr, s_ld, p_addr, p_ld):
                    if with_max:
                        t = builder.load(vmax[g])
                        t = builder.select(builder.fcmp_ordered(">", s0, t), s0, t)  # one vmaxps each
                        t = builder.select(builder.fcmp_ordered(">", s1, t), s1, t)
                        builder.store(t, vmax[g])
                    p0 = _exp2_vec(builder, builder.call(fma, [s0, mul_v, neg_sub[g]]))
                    p1 = _exp2_vec(builder, builder.call(fma, [s1, mul_v, neg_sub[g]]))
                    builder.store(builder.fadd(builder.load(vsum[g]), builder.fadd(p0, p1)), vsum[g])
                    # the key pair of query r as one uint32 word
                    pairs = _bf16_pairs(builder, p0, p1)
                    builder.store(pairs, _vptr(builder, dst, pairs.type), align=4)
            nan = _vconst(np.nan)
            for g in range(2):
                off = ir.Constant(i64t, 64 * g)
                total = builder.load(vsum[g])
                builder.store(total, _vptr(builder, builder.add(sum_addr, off)), align=4)
                if with_max:
                    # NaN where the sum is: a NaN score (plain vmaxps passes over it) or +inf
                    t = builder.select(builder.fcmp_unordered("uno", total, total), nan, builder.load(vmax[g]))
                    builder.store(t, _vptr(builder, builder.add(max_addr, off)), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return block


_exp2_pairs_max, _exp2_pairs_sum = _pairs_pass(True), _pairs_pass(False)


@intrinsic
def _round_pairs_block(typingctx, s_addr, s_ld, rows, p_addr, p_ld):
    """:func:`round_pairs` for one 32-query column block."""
    i64 = types.int64
    sig = types.void(i64, i64, i64, i64, i64)

    def codegen(context, builder, signature, args):
        s_addr, s_ld, rows, p_addr, p_ld = args
        _amx_function(context, builder, _AVX512)
        with cgutils.for_range(builder, builder.sdiv(rows, ir.Constant(rows.type, 2))) as loop:
            for _g, s0, s1, dst in _row_pair_halves(builder, loop.index, s_addr, s_ld, p_addr, p_ld):
                pairs = _bf16_pairs(builder, s0, s1)
                builder.store(pairs, _vptr(builder, dst, pairs.type), align=4)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=_JIT_CACHE, nogil=True)
def round_pairs(s_addr, s_ld, rows, p_addr, p_ld):
    """float32 ``P`` (``(rows, 32)`` at ``s_addr``, rows ``s_ld`` bytes apart: one 32-query
    column block of a transposed tile) rounded to bfloat16 (to nearest even) in key pairs at
    ``p_addr`` (``(rows/2, 32)`` uint32, rows ``p_ld`` bytes apart): the B operand of
    :func:`values` where P was computed in float32 first (dropout).  ``rows`` even."""
    _round_pairs_block(s_addr, s_ld, rows, p_addr, p_ld)


@intrinsic
def _ds_pairs_tile(typingctx, p_addr, p_ld, dp_addr, dp_ld, rows, cols, delta_addr, pairs_addr, pairs_ld):
    """:func:`ds_pairs` as one intrinsic: row pairs outer, 16-query groups inner."""
    i64 = types.int64
    sig = types.void(i64, i64, i64, i64, i64, i64, i64, i64, i64)

    def codegen(context, builder, signature, args):
        p_addr, p_ld, dp_addr, dp_ld, rows, cols, delta_addr, pairs_addr, pairs_ld = args
        _amx_function(context, builder, _AVX512)
        i64t = ir.IntType(64)
        c16, two = ir.Constant(i64t, 16), ir.Constant(i64t, 2)
        vi16, vbf = ir.VectorType(_I16, _LANES), ir.VectorType(_BFloat(), 32)
        vi32 = ir.VectorType(_I32, _LANES)
        cvt = _vfn(builder, "llvm.x86.avx512bf16.cvtne2ps2bf16.512", vbf, [_VF, _VF])
        undef16 = ir.Constant(ir.VectorType(_I16, 32), ir.Undefined)
        with cgutils.for_range(builder, builder.sdiv(rows, two)) as outer:
            c = outer.index
            prow0 = builder.add(p_addr, builder.mul(builder.mul(c, two), p_ld))
            prow1 = builder.add(prow0, p_ld)
            drow0 = builder.add(dp_addr, builder.mul(builder.mul(c, two), dp_ld))
            drow1 = builder.add(drow0, dp_ld)
            qrow = builder.add(pairs_addr, builder.mul(c, pairs_ld))
            with cgutils.for_range(builder, builder.sdiv(cols, c16)) as inner:
                g = inner.index
                off2, off4 = builder.mul(g, ir.Constant(i64t, 32)), builder.mul(g, ir.Constant(i64t, 64))
                delta = builder.load(_vptr(builder, builder.add(delta_addr, off4)), align=4)
                ds = []
                for prow, drow in ((prow0, drow0), (prow1, drow1)):
                    bits = builder.load(_vptr(builder, builder.add(prow, off2), vi16), align=2)
                    wide = builder.shl(builder.zext(bits, vi32), ir.Constant(vi32, [16] * _LANES))
                    p = builder.bitcast(wide, _VF)
                    d = builder.load(_vptr(builder, builder.add(drow, off4)), align=4)
                    ds.append(builder.fmul(p, builder.fsub(d, delta)))
                # one rounding of both rows (ties to even, as _cpu_primitives._to_bf16's
                # vcvtneps2bf16): the low 16 halves row 2c's, the high 16 row 2c + 1's
                both = builder.bitcast(builder.call(cvt, [ds[1], ds[0]]), ir.VectorType(_I16, 32))
                for e, prow in enumerate((prow0, prow1)):
                    half = builder.shuffle_vector(both, undef16, ir.Constant(ir.VectorType(_I32, _LANES), list(range(16 * e, 16 * e + 16))))
                    builder.store(half, _vptr(builder, builder.add(prow, off2), vi16), align=2)
                words = ir.Constant(ir.VectorType(_I32, 32), _PAIR_WORDS)
                pairs = builder.bitcast(builder.shuffle_vector(both, undef16, words), vi32)
                builder.store(pairs, _vptr(builder, builder.add(qrow, off4), vi32), align=4)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=_JIT_CACHE, nogil=True)
def ds_pairs(p_addr, p_ld, dp_addr, dp_ld, rows, cols, delta_addr, pairs_addr, pairs_ld):
    """The bfloat16 backward's dS pass on 512-bit vectors, writing dS twice: ``dS = bf16(P̃ ∘
    (dPᵀ − Δ))`` (``_cpu_primitives._ds_bf16``'s bits) over the rounded P̃ ``(rows, cols)``
    bfloat16 at ``p_addr`` (rows ``p_ld`` bytes apart; overwritten by dS: the A operand of
    ``dK += dS·Q``), from float32 ``dPᵀ`` at ``dp_addr`` (rows ``dp_ld`` apart) and ``cols``
    float32 Δ at ``delta_addr``; and dS in key pairs at ``pairs_addr`` (``(rows/2, cols)``
    uint32, rows ``pairs_ld`` apart: the B operand of ``dQᵀ += Kᵀ·dS`` by :func:`values`) —
    one ``vcvtne2ps2bf16`` per two rows × 16 queries gives both.  ``rows`` even, ``cols`` a
    multiple of 16.  (Numba's loop of ``_ds_bf16`` ran on 4-lane vectors.)"""
    _ds_pairs_tile(p_addr, p_ld, dp_addr, dp_ld, rows, cols, delta_addr, pairs_addr, pairs_ld)


# A prefetch plan with nothing in it (``exp2_pairs``' default)
_NO_PLAN = np.zeros(4, dtype=np.int64)


@njit(cache=_JIT_CACHE, nogil=True)
def exp2_pairs(s_addr, s_ld, rows, p_addr, p_ld, mul, sub_addr, sum_addr, max_addr, plan_addr=0, first=0, count=0):
    """For one block of 32 queries (columns) of a transposed float32 score tile ``Sᵀ (rows,
    32)`` at ``s_addr`` (rows ``s_ld`` bytes apart): ``P = 2**(S·mul − sub)`` rounded to
    bfloat16 and written in key pairs at ``p_addr`` (``(rows/2, 32)`` uint32, rows ``p_ld``
    bytes apart: the B operand of :func:`values`), ``sum[r] += Σ_c P`` (P before rounding) and,
    unless ``max_addr`` is 0, ``max[r] = max_c S`` — NaN where a score is NaN or the sum is
    not finite.  ``sub``, ``sum``, ``max``: 32 float32 each; ``rows`` even.

    Meanwhile lines ``first … first + count − 1`` of the prefetch plan at ``plan_addr`` (an
    ``int64[4]``: address and byte length of two ranges, as ``_cpu_simd``'s float32 passes
    take) are asked into L2 (``prefetcht1``), a few per row pair: the kernel's next K/V tiles."""
    if plan_addr == 0:
        plan_addr = _NO_PLAN.ctypes.data
        count = 0
    if max_addr != 0:
        _exp2_pairs_max(s_addr, s_ld, rows, p_addr, p_ld, np.float32(mul), sub_addr, sum_addr, max_addr, plan_addr, first, count)
    else:
        _exp2_pairs_sum(s_addr, s_ld, rows, p_addr, p_ld, np.float32(mul), sub_addr, sum_addr, max_addr, plan_addr, first, count)



# =================================================================================
# the forward's output rows from the transposed accumulator, rounded to bfloat16
# =================================================================================
#
# ``out[r, d] = bf16(accᵀ[d, r] · scale[r])`` is a transpose: element by element (16 rows at a
# time, ``_cpu_kernels._write_rows_t``) it took 31 µs a 256-row query tile at D 64 and 65 µs
# at D 128 — 8–13 % of the bfloat16 forward (one thread, in the kernel, 00:30, load 0.6).
# Here per 16 rows × 16 dims: 16 vector loads along accᵀ's rows, the scaling, 8
# ``vcvtne2ps2bf16`` + ``vpermw`` giving per row the uint32 words of dim pairs (as
# :func:`exp2_pairs` does for key pairs), a 16 × 8 word transpose in three rounds of 8
# two-source shuffles, and 16 stores of 32 bytes (one output row's 16 dims each).


def _shuffle(builder, a, b, idx):
    return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, len(idx)), idx))


@intrinsic
def _rows_strip16(typingctx, acc_addr, acc_ld, scale_addr, out_addr, out_ld, dv):
    i64 = types.int64
    sig = types.void(i64, i64, i64, i64, i64, i64)

    def codegen(context, builder, signature, args):
        acc_addr, acc_ld, scale_addr, out_addr, out_ld, dv = args
        _amx_function(context, builder, _AVX512)
        i64t = ir.IntType(64)
        zero = ir.Constant(_VF, [0.0] * _LANES)
        scale = builder.load(_vptr(builder, scale_addr), align=4)
        # a row whose scale is 0 (no visible key, padding) writes 0 even where accᵀ holds
        # inf/NaN; NaN rows (scale NaN) write NaN — as the element-wise form
        keep = builder.fcmp_unordered("!=", scale, zero)
        with cgutils.for_range(builder, builder.sdiv(dv, ir.Constant(dv.type, 16))) as loop:
            d0 = builder.mul(loop.index, ir.Constant(i64t, 16))
            words = []
            for k in range(8):  # dims d0+2k, d0+2k+1 → per row one uint32 word (low: d0+2k)
                vals = []
                for e in range(2):
                    row = builder.add(acc_addr, builder.mul(builder.add(d0, ir.Constant(i64t, 2 * k + e)), acc_ld))
                    a = builder.load(_vptr(builder, row), align=4)
                    vals.append(builder.select(keep, builder.fmul(a, scale), zero))
                words.append(_bf16_pairs(builder, vals[0], vals[1]))
            # words[k][r]: row r, pair k.  Round 1: rows 8h…8h+7 of pairs 2j, 2j+1
            x = [[_shuffle(builder, words[2 * j], words[2 * j + 1], [v for r in range(8 * h, 8 * h + 8) for v in (r, 16 + r)])
                  for h in range(2)] for j in range(4)]
            # round 2: rows 4q…4q+3 (of the half) of pairs 4j2 … 4j2+3
            y = [[[_shuffle(builder, x[2 * j2][h], x[2 * j2 + 1][h],
                            [v for r in range(4 * q, 4 * q + 4) for v in (2 * r, 2 * r + 1, 16 + 2 * r, 17 + 2 * r)])
                   for q in range(2)] for h in range(2)] for j2 in range(2)]
            vi8 = ir.VectorType(_I32, 8)
            for h in range(2):
                for q in range(2):
                    for o in range(2):  # round 3: rows 2o, 2o+1 (of the quarter), pairs 0…7
                        z = _shuffle(builder, y[0][h][q], y[1][h][q],
                                     [v for r in range(2 * o, 2 * o + 2) for v in
                                      (4 * r, 4 * r + 1, 4 * r + 2, 4 * r + 3, 16 + 4 * r, 17 + 4 * r, 18 + 4 * r, 19 + 4 * r)])
                        for rr in range(2):
                            r = 8 * h + 4 * q + 2 * o + rr
                            half = _shuffle(builder, z, z, list(range(8 * rr, 8 * rr + 8)))
                            dst = builder.add(builder.add(out_addr, builder.mul(ir.Constant(i64t, r), out_ld)),
                                              builder.mul(d0, ir.Constant(i64t, 2)))
                            builder.store(half, _vptr(builder, dst, vi8), align=2)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=_JIT_CACHE, nogil=True)
def rows_bf16(acc_addr, acc_ld, scale_addr, out_addr, out_ld, dv):
    """16 output rows ``out[r, d] = bf16(accᵀ[d, r] · scale[r])`` (round to nearest even; 0
    where ``scale[r]`` is 0, NaN where it is NaN): accᵀ's first column of the 16 at
    ``acc_addr`` (rows ``acc_ld`` bytes apart), 16 float32 ``scale`` at ``scale_addr``, output
    row 0 at ``out_addr`` (rows ``out_ld`` bytes apart, dims contiguous uint16).  ``dv`` a
    multiple of 16."""
    _rows_strip16(acc_addr, acc_ld, scale_addr, out_addr, out_ld, dv)
