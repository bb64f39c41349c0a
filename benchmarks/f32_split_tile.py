"""The float32 backward's whole tile: MKL's sgemm tiles against split-bfloat16 products on AMX.

Issue 13 §2 go/no-go, second attempt (the first, on branch ``f32split-amx-experiment``, timed
each product with split passes of its own: 1.08× a tile; docs/performance-log.md, "float32 on AMX
as split bfloat16 products").  Here the split route is timed as a kernel would run it:

* the per-call operands (K, V rows; Kᵀ rows per key tile; Q and dO as transposed pairs and
  as row pairs per query tile) split once per call, outside the tile — their cost, O(L·D),
  is timed apart and added per tile amortized (a query tile's pieces serve L/BK key tiles, a
  key tile's L/BQ query tiles);
* the splits done in registers inside the passes: the exp pass (``2^(s·c2 − lse)``, a
  degree-6 polynomial) writes P back and P's pieces in rows (dV's A operand); the dS pass
  computes ``P ∘ (dP − Δ)`` and writes dS's pieces in rows (dK's A) and in key pairs (dQᵀ's B)
  from one split, no float32 dS (``_exp_fused``, ``_ds_fused``; ``--parts`` also times the
  simpler variant that splits eight finished rows at a time from L1);
* the products on ``_cpu_amx``'s 2 × 2 tile loop (``product``): each 32 × 32 output block's
  six sub-products from 0, smallest first, ``hi·hi`` last; accumulating products (dV, dK,
  dQᵀ) store the block to a scratch and add it into the result one block later, with
  AVX-512 adds (reading a tile store back at once stalls; Numba's add loop stayed scalar);
* ``--amx`` picks the products that take the split route (``st,dp,dv,dk,dq``), the rest
  MKL: ``Sᵀ = K·Qᵀ`` on MKL keeps the backward's scores those of today's forward (the
  backward's ``P = 2^(S − lse)`` cancels the forward's rounding only then).

One thread; the routes alternate round by round in one process (medians).  The MKL tile is
``_cpu_kernels._backward_chunk``'s steps (``_dots``, ``_exp2_shifted``, ``_gemm``,
``_ds_block``); masks are not modelled (dense tiles).  The tile's dK, dV, dQ of both routes
are checked against NumPy float64 (and NumPy float32, the naive baseline) first.
``--peak`` times ``tdpbf16ps`` alone.

    flock /tmp/bench.lock .venv/bin/python benchmarks/f32_split_tile.py [--bq 128 --bk 256] [--amx st,dp,dv,dk,dq] [--parts] [--peak]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from dotattn.kernels import _cpu_isa
from dotattn.kernels import _cpu_primitives as P
from dotattn.kernels import cpu
from dotattn.kernels._blas import ONE_BLAS_THREAD
from dotattn.kernels._cpu_primitives import _from_bf16, _to_bf16
# the split helpers the kernel uses (kernels/_cpu_amx_f32.py), not copies of them
from dotattn.kernels._cpu_amx_f32 import (  # noqa: F401
    _pieces, _pieces_vec, _split32, _split_pair16, _vload, split_pairs, split_rows, transpose_pairs,
)
from dotattn.kernels._cpu_amx import (
    _AVX512,
    _dot046,
    _dot147,
    _dot256,
    _dot357,
    _load4,
    _load5,
    _load6,
    _load7,
    _BFloat,
    _amx_function,
    _depth_2x2,
    _store_2x2,
    _tile_config,
    _tile_release,
    _zero0,
    _zero1,
    _zero2,
    _zero3,
    tile_config,
)

# -- splitting float32 into three bfloat16 pieces (from branch f32split-amx-experiment's
#    kernels/_cpu_amx_f32.py, kept off main; see docs/performance.md): x = hi + mid + lo exactly,
#    hi = bf16(x), mid = bf16(x − hi), lo = bf16(x − hi − mid); a product is the six piece
#    products (A piece, B piece) below, smallest first, hi·hi last (mid·lo, lo·mid, lo·lo ≤ 2⁻²⁵
#    of it are dropped)
_SEG_A = (2, 0, 1, 0, 1, 0)
_SEG_B = (0, 2, 1, 1, 0, 0)

_VF = ir.VectorType(ir.FloatType(), 16)
_V32I16 = ir.VectorType(ir.IntType(16), 32)
_V32I32 = ir.VectorType(ir.IntType(32), 32)
_V32F = ir.VectorType(ir.FloatType(), 32)
_I32 = ir.IntType(32)


_I16x16 = ir.VectorType(ir.IntType(16), 16)


@intrinsic
def _ds_pieces(typingctx, p0, p1, dp0, dp1, delta, r0, r1, rps, pr, pps):
    """dS = P ∘ (dP − Δ) for 16 columns of the row pair (c, c + 1), split in registers and
    written in both layouts at once: rows ``c`` at ``r0``, ``c + 1`` at ``r1`` (pieces ``rps``
    bytes apart; dK's A) and the key-pair row at ``pr`` (pieces ``pps`` apart; dQᵀ's B).  One
    split for both layouts; no float32 dS written (every product that reads dS takes pieces)."""

    def codegen(context, builder, signature, args):
        p0, p1, dp0, dp1, delta, r0, r1, rps, pr, pps = args
        _amx_function(context, builder, _AVX512)
        d = _vload(builder, delta)
        x0 = builder.fmul(_vload(builder, p0), builder.fsub(_vload(builder, dp0), d))
        x1 = builder.fmul(_vload(builder, p1), builder.fsub(_vload(builder, dp1), d))
        low = ir.Constant(ir.VectorType(_I32, 16), list(range(16)))
        high = ir.Constant(ir.VectorType(_I32, 16), list(range(16, 32)))
        inter = ir.Constant(ir.VectorType(_I32, 32), [i // 2 + (i % 2) * 16 for i in range(32)])
        for p, bits in enumerate(_pieces_vec(builder, x0, x1)):
            k = ir.Constant(rps.type, p)
            for base, sel in ((r0, low), (r1, high)):
                addr = builder.add(base, builder.mul(rps, k))
                builder.store(builder.shuffle_vector(bits, bits, sel), builder.inttoptr(addr, _I16x16.as_pointer()), align=2)
            addr = builder.add(pr, builder.mul(pps, k))
            builder.store(builder.shuffle_vector(bits, bits, inter), builder.inttoptr(addr, _V32I16.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.void(*([types.int64] * 10)), codegen


@njit(nogil=True)
def _ds_fused(ST, dPT, delta, d_rows, d_pairs):
    """dS's pieces (rows and key pairs) straight from P and dP: :func:`_ds_pieces` per row pair."""
    BK, BQ = ST.shape
    rps, pps = d_rows.strides[0], d_pairs.strides[0]
    dl = delta.ctypes.data
    for c in range(0, BK, 2):
        p0, p1 = ST[c].ctypes.data, ST[c + 1].ctypes.data
        q0, q1 = dPT[c].ctypes.data, dPT[c + 1].ctypes.data
        r0, r1, pr = d_rows[0, c].ctypes.data, d_rows[0, c + 1].ctypes.data, d_pairs[0, c // 2].ctypes.data
        for k in range(0, BQ, 16):
            _ds_pieces(p0 + 4 * k, p1 + 4 * k, q0 + 4 * k, q1 + 4 * k, dl + 4 * k, r0 + 2 * k, r1 + 2 * k, rps,
                       pr + 4 * k, pps)


# 2**f on [−½, ½]: degree-6 least-squares fit (relative error ≈ 1e-8, below float32's), for
# the exp pass written in registers (the kernel's float32 exp reaches the same accuracy class)
_E2 = tuple(float(c) for c in np.polyfit(np.linspace(-0.5, 0.5, 20001), np.exp2(np.linspace(-0.5, 0.5, 20001)), 6))


@intrinsic
def _exp_pieces(typingctx, s_addr, lse_addr, mul, rows_dst, rps):
    """32 float32 of an Sᵀ row: ``P = 2^(s·mul − lse)`` written back in place (the dS pass reads
    it) and split in registers into ``rows_dst`` (pieces ``rps`` bytes apart; dV's A)."""

    def codegen(context, builder, signature, args):
        s_addr, lse_addr, mul, rows_dst, rps = args
        _amx_function(context, builder, _AVX512)
        VF = _VF
        i16, i32 = ir.IntType(16), ir.IntType(32)
        fma = builder.module.declare_intrinsic("llvm.fma.v16f32", fnty=ir.FunctionType(VF, [VF] * 3))
        reduce = cgutils.get_or_insert_function(builder.module, ir.FunctionType(VF, [VF, i32, VF, i16, i32]),
                                                "llvm.x86.avx512.mask.reduce.ps.512")
        scalef = cgutils.get_or_insert_function(builder.module, ir.FunctionType(VF, [VF, VF, VF, i16, i32]),
                                                "llvm.x86.avx512.mask.scalef.ps.512")
        zero = ir.Constant(VF, [0.0] * 16)
        m = builder.insert_element(ir.Constant(VF, ir.Undefined), mul, ir.Constant(i32, 0))
        m = builder.shuffle_vector(m, m, ir.Constant(ir.VectorType(i32, 16), [0] * 16))
        ps = []
        for off in (0, 64):
            sp = builder.inttoptr(builder.add(s_addr, ir.Constant(s_addr.type, off)), VF.as_pointer())
            lp = builder.inttoptr(builder.add(lse_addr, ir.Constant(s_addr.type, off)), VF.as_pointer())
            x = builder.call(fma, [builder.load(sp, align=4), m, builder.fneg(builder.load(lp, align=4))])
            f = builder.call(reduce, [x, ir.Constant(i32, 8), zero, ir.Constant(i16, -1), ir.Constant(i32, 4)])
            p = ir.Constant(VF, [_E2[0]] * 16)
            for c in _E2[1:]:
                p = builder.call(fma, [p, f, ir.Constant(VF, [c] * 16)])
            keep = builder.bitcast(builder.fcmp_unordered(">", x, ir.Constant(VF, [-125.0] * 16)), i16)
            p = builder.call(scalef, [p, builder.fsub(x, f), zero, keep, ir.Constant(i32, 4)])
            builder.store(p, sp, align=4)
            ps.append(p)
        for k, bits in enumerate(_pieces_vec(builder, ps[0], ps[1])):
            addr = builder.add(rows_dst, builder.mul(rps, ir.Constant(rps.type, k)))
            builder.store(bits, builder.inttoptr(addr, _V32I16.as_pointer()), align=2)
        return context.get_dummy_value()

    return types.void(types.int64, types.int64, types.float32, types.int64, types.int64), codegen


@njit(nogil=True)
def _exp_fused(ST, c2, lse2, p_rows):
    BK, BQ = ST.shape
    rps = p_rows.strides[0]
    la = lse2.ctypes.data
    for c in range(BK):
        src, dst = ST[c].ctypes.data, p_rows[0, c].ctypes.data
        for k in range(0, BQ, 32):
            _exp_pieces(src + 4 * k, la + 4 * k, c2, dst + 2 * k, rps)




def _aligned(shape, dtype, pad_last=0, pad_rows=0):
    """Zeroed, 64-byte aligned, the last axis padded by ``pad_last`` elements (row strides a
    cache line more than a power of two); returns the padded array (slice it for the view)."""
    shape = tuple(shape[:-2]) + (shape[-2] + pad_rows, shape[-1] + pad_last)
    return cpu._zeros_aligned(shape, dtype)


@intrinsic
def _prefetch(typingctx, addr):
    """``prefetcht0`` of the line at ``addr``."""

    def codegen(context, builder, signature, args):
        i8p = ir.IntType(8).as_pointer()
        fn = builder.module.declare_intrinsic("llvm.prefetch", [i8p], ir.FunctionType(ir.VoidType(), [i8p, _I32, _I32, _I32]))
        builder.call(fn, [builder.inttoptr(args[0], i8p), ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
        return context.get_dummy_value()

    return types.void(types.int64), codegen


@njit(nogil=True, inline="always")
def _prefetch_block(base, ps, ld, nrows, nbytes):
    """The lines of ``nrows`` rows (``ld`` apart) of ``nbytes`` each, in the three pieces."""
    for p in range(3):
        for r in range(nrows):
            row = base + p * ps + r * ld
            for off in range(0, nbytes, 64):
                _prefetch(row + off)


@njit(nogil=True, inline="always")
def _block(a0, a_ps, a_ld, b0, b_ps, b_ld, i, j, k0, kc):
    _zero0()
    _zero1()
    _zero2()
    _zero3()
    for s in range(6):
        _depth_2x2(a0 + _SEG_A[s] * a_ps + i * a_ld + 2 * k0, a_ld, b0 + _SEG_B[s] * b_ps + (k0 // 2) * b_ld + 4 * j, b_ld, kc)


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
            builder.store(builder.fadd(builder.load(cp, align=4), builder.load(sp, align=64)), cp, align=4)
        return context.get_dummy_value()

    return types.void(types.int64, types.int64), codegen


@njit(nogil=True, inline="always")
def _add_block(c, s, i, j):
    c0, c_ld = c.ctypes.data + 4 * j, c.strides[0]
    s0, s_ld = s.ctypes.data, s.strides[0]
    for r in range(32):
        _vadd32(c0 + (i + r) * c_ld, s0 + r * s_ld)


@njit(nogil=True)
def product(a, b, c, s, M, N, K, KC, i_outer, accumulate, cfg, panel=1, prefetch=False):
    """``c[:M, :N] (=|+=) A·B``: ``a (3, ≥M, ≥K)`` uint16 pieces in rows, ``b (3, ≥K/2, ≥N)``
    uint32 key pairs, ``c`` float32; ``s`` a (2, 32, 32) float32 scratch (aligned).  Depth in
    chunks of ``KC``; ``i_outer``: A's 32-row block stays (L1) while B's blocks stream, else
    B's.  A block that adds into ``c`` is stored to ``s`` and added one block later: reading a
    tile store back at once stalls (≈ 370 ns a block)."""
    a_ps, a_ld = a.strides[0], a.strides[1]
    b_ps, b_ld = b.strides[0], b.strides[1]
    c_ld = c.strides[0]
    a0, b0, c0 = a.ctypes.data, b.ctypes.data, c.ctypes.data
    s_ld = s.strides[1]
    _tile_config(cfg.ctypes.data)
    pend = 0
    pi, pj = -1, -1
    nI, nJ = (M + 31) // 32, (N + 31) // 32
    for k0 in range(0, K, KC):
        kc = min(KC, K - k0)
        direct = not accumulate and kc == K
        for t in range(nI * nJ):
            # panels of ``panel`` blocks of the streamed operand stay in L1 while the other's
            # blocks pass: each block loaded from L2 serves ``panel`` output blocks
            if i_outer:  # j in panels, i within, j within the panel
                pw = min(panel, nJ)
                p0 = t // (nI * pw) * pw
                pw = min(pw, nJ - p0)
                r = t - p0 * nI
                i, j = 32 * (r // pw), 32 * (p0 + r % pw)
            else:
                pw = min(panel, nI)
                p0 = t // (nJ * pw) * pw
                pw = min(pw, nI - p0)
                r = t - p0 * nJ
                i, j = 32 * (p0 + r % pw), 32 * (r // pw)
            if prefetch and t + 1 < nI * nJ:  # the next block's streamed operand into L1
                t1 = t + 1
                if i_outer:
                    pw1 = min(panel, nJ)
                    q0 = t1 // (nI * pw1) * pw1
                    pw1 = min(pw1, nJ - q0)
                    r1 = t1 - q0 * nI
                    i1, j1 = 32 * (r1 // pw1), 32 * (q0 + r1 % pw1)
                else:
                    pw1 = min(panel, nI)
                    q0 = t1 // (nJ * pw1) * pw1
                    pw1 = min(pw1, nI - q0)
                    r1 = t1 - q0 * nJ
                    i1, j1 = 32 * (q0 + r1 % pw1), 32 * (r1 // pw1)
                if j1 != j:
                    _prefetch_block(b0 + (k0 // 2) * b_ld + 4 * j1, b_ps, b_ld, kc // 2, 128)
                if i1 != i:
                    _prefetch_block(a0 + i1 * a_ld + 2 * k0, a_ps, a_ld, 32, 2 * kc)
            _block(a0, a_ps, a_ld, b0, b_ps, b_ld, i, j, k0, kc)
            if direct:
                _store_2x2(c0 + i * c_ld + 4 * j, c_ld)
            else:
                if pi >= 0:
                    _add_block(c, s[pend], pi, pj)
                pend ^= 1
                _store_2x2(s[pend].ctypes.data, s_ld)
                pi, pj = i, j
    if pi >= 0:
        _add_block(c, s[pend], pi, pj)
    _tile_release()


@njit(nogil=True)
def _exp_split(ST, N, c2, lse2, p_rows, rows):
    """The exp pass, eight rows at a time, each block's rows split into ``p_rows`` while in L1."""
    BK, BQ = ST.shape
    ps = p_rows.strides[0]
    for c0 in range(0, BK, rows):
        P._exp2_shifted(ST[c0 : c0 + rows], N[c0 : c0 + rows], c2, lse2)
        for c in range(c0, c0 + rows):
            src, dst = ST[c].ctypes.data, p_rows[0, c].ctypes.data
            for k in range(0, BQ, 32):
                _split32(src + 4 * k, dst + 2 * k, ps)


@njit(nogil=True)
def _ds_split(ST, dPT, delta, d_rows, d_pairs, rows):
    """The dS pass, eight rows at a time, each block split into rows (dK's A) and key pairs (dQᵀ's B)."""
    BK, BQ = ST.shape
    ps, pps = d_rows.strides[0], d_pairs.strides[0]
    for c0 in range(0, BK, rows):
        P._ds_block(ST[c0 : c0 + rows], dPT[c0 : c0 + rows], delta)
        for c in range(c0, c0 + rows):
            src, dst = ST[c].ctypes.data, d_rows[0, c].ctypes.data
            for k in range(0, BQ, 32):
                _split32(src + 4 * k, dst + 2 * k, ps)
        for c in range(c0, c0 + rows, 2):
            s0, s1, dst = ST[c].ctypes.data, ST[c + 1].ctypes.data, d_pairs[0, c // 2].ctypes.data
            for k in range(0, BQ, 16):
                _split_pair16(s0 + 4 * k, s1 + 4 * k, dst + 4 * k, pps)


@njit(nogil=True)
def _copy_n(ST, S0, n):
    for _ in range(n):
        ST[:] = S0


@njit(nogil=True)
def _exp_split_n(ST, S0, N, c2, lse2, p_rows, rows, n, split):
    """(timing) the exp pass on fresh scores each time, with or without the split."""
    for _ in range(n):
        ST[:] = S0
        if split:
            _exp_split(ST, N, c2, lse2, p_rows, rows)
        else:
            P._exp2_shifted(ST, N, c2, lse2)


@njit(nogil=True)
def _ds_split_n(ST, P0, dPT, delta, d_rows, d_pairs, rows, n, split):
    for _ in range(n):
        ST[:] = P0
        if split:
            _ds_split(ST, dPT, delta, d_rows, d_pairs, rows)
        else:
            P._ds_block(ST, dPT, delta)


@njit(nogil=True)
def _ds_fused_n(ST, P0, dPT, delta, d_rows, d_pairs, n):
    for _ in range(n):
        ST[:] = P0
        _ds_fused(ST, dPT, delta, d_rows, d_pairs)


@njit(nogil=True)
def _exp_fused_n(ST, S0, c2, lse2, p_rows, n):
    for _ in range(n):
        ST[:] = S0
        _exp_fused(ST, c2, lse2, p_rows)


@njit(nogil=True)
def forward_tile(split, Kb, Vb, Qs, K_p, qT_p, ST, N, c2, m2, row_sum, plan, acc, s, cfg, n):
    """(``--forward``) the float32 forward's tile in outline: ``Sᵀ = K·Qᵀ`` (MKL, or the
    split product), the exp pass with its row sums against a fixed shift, ``acc += Pᵀ·V``
    (MKL).  Only the score product differs between the routes."""
    BK, BQ = ST.shape
    D = Kb.shape[1]
    threads = P._gemm_threads_begin(Kb)
    for _ in range(n):
        if split:
            product(K_p, qT_p, ST, s, BK, BQ, D, 4096, True, False, cfg)
        else:
            P._dots(Kb, Qs, ST, False)
        P._exp2_shifted_sum(ST, N, c2, m2, row_sum, plan)
        P._gemm(ST.T, Vb, acc, 1.0)
    P._gemm_threads_end(Kb, threads)


@njit(nogil=True)
def tile_mkl(Kb, Vb, Qs, dOs, ST, dPT, N, c2, lse2, delta, dK, dV, dq, n):
    threads = P._gemm_threads_begin(Kb)
    for _ in range(n):
        P._dots(Kb, Qs, ST, False)
        P._exp2_shifted(ST, N, c2, lse2)
        P._dots(Vb, dOs, dPT, False)
        P._gemm(ST, dOs, dV, 1.0)
        P._ds_block(ST, dPT, delta)
        P._gemm(ST, Qs, dK, 1.0)
        P._gemm(ST.T, Kb, dq, 1.0)
    P._gemm_threads_end(Kb, threads)


@njit(nogil=True)
def _ds_split_sel(ST, dPT, delta, d_rows, d_pairs, rows, want_rows, want_pairs):
    BK, BQ = ST.shape
    ps, pps = d_rows.strides[0], d_pairs.strides[0]
    for c0 in range(0, BK, rows):
        P._ds_block(ST[c0 : c0 + rows], dPT[c0 : c0 + rows], delta)
        if want_rows:
            for c in range(c0, c0 + rows):
                src, dst = ST[c].ctypes.data, d_rows[0, c].ctypes.data
                for k in range(0, BQ, 32):
                    _split32(src + 4 * k, dst + 2 * k, ps)
        if want_pairs:
            for c in range(c0, c0 + rows, 2):
                s0, s1, dst = ST[c].ctypes.data, ST[c + 1].ctypes.data, d_pairs[0, c // 2].ctypes.data
                for k in range(0, BQ, 16):
                    _split_pair16(s0 + 4 * k, s1 + 4 * k, dst + 4 * k, pps)


@njit(nogil=True)
def tile_amx(on, Kb, Vb, Qs, dOs, K_p, V_p, KT_p, qT_p, doT_p, q_p, do_p, ST, dPT, N, c2, lse2, delta,
             p_rows, d_pairs, dK, dV, dq, dqT, s, cfg, KC, rows, n, fused_ds=True):
    """The tile with the products in ``on`` (st, dp, dv, dk, dq flags) split on AMX, the rest on MKL."""
    BK, BQ = ST.shape
    D = Kb.shape[1]
    st, dp, dv, dk, dqq = on
    threads = P._gemm_threads_begin(Kb)
    for _ in range(n):
        if st:
            product(K_p, qT_p, ST, s, BK, BQ, D, KC, True, False, cfg)
        else:
            P._dots(Kb, Qs, ST, False)
        if dv and fused_ds:
            _exp_fused(ST, c2, lse2, p_rows)
        elif dv:
            _exp_split(ST, N, c2, lse2, p_rows, rows)
        else:
            P._exp2_shifted(ST, N, c2, lse2)
        if dp:
            product(V_p, doT_p, dPT, s, BK, BQ, D, KC, True, False, cfg)
        else:
            P._dots(Vb, dOs, dPT, False)
        if dv:
            product(p_rows, do_p, dV, s, BK, D, BQ, KC, False, True, cfg)   # dV += Pᵀ·dO
        else:
            P._gemm(ST, dOs, dV, 1.0)
        if dk and dqq and fused_ds:
            _ds_fused(ST, dPT, delta, p_rows, d_pairs)
        elif dk or dqq:
            _ds_split_sel(ST, dPT, delta, p_rows, d_pairs, rows, dk, dqq)
        else:
            P._ds_block(ST, dPT, delta)
        if dk:
            product(p_rows, q_p, dK, s, BK, D, BQ, KC, False, True, cfg)    # dK += dSᵀ·Q
        else:
            P._gemm(ST, Qs, dK, 1.0)
        if dqq:
            product(KT_p, d_pairs, dqT, s, D, BQ, BK, KC, True, True, cfg)  # dQᵀ += Kᵀ·dSᵀ
        else:
            P._gemm(ST.T, Kb, dq, 1.0)
    P._gemm_threads_end(Kb, threads)


@njit(nogil=True)
def _split_query_operands(Qs, rows, qT_p, q_p, n):
    """A query tile's per-call pieces (one operand): transposed pairs (depth D) and row pairs (depth BQ)."""
    BQ, D = Qs.shape
    for _ in range(n):
        split_rows(Qs, rows, BQ, D)
        transpose_pairs(rows, qT_p, BQ)
        split_pairs(Qs, q_p, BQ, D)


@njit(nogil=True)
def _split_key_operands(Kb, KbT, K_p, KT_p, n):
    BK, D = Kb.shape
    for _ in range(n):
        split_rows(Kb, K_p, BK, D)
        split_rows(KbT, KT_p, D, BK)


@njit(nogil=True)
def _peak(cfg, buf, n, loads):
    """(``--peak``) ``n`` × four ``tdpbf16ps`` into four accumulators, operands resident or
    reloaded from L1 each time: the unit's own rate here."""
    _tile_config(cfg.ctypes.data)
    a = buf.ctypes.data
    _zero0()
    _zero1()
    _zero2()
    _zero3()
    _load4(a, 64)
    _load5(a + 1024, 64)
    _load6(a + 2048, 64)
    _load7(a + 3072, 64)
    for _ in range(n):
        if loads:
            _load4(a, 64)
            _load5(a + 1024, 64)
            _load6(a + 2048, 64)
            _load7(a + 3072, 64)
        _dot046()
        _dot147()
        _dot256()
        _dot357()
    _store_2x2(a, 128)
    _tile_release()


@njit(nogil=True)
def _peak_pieces(cfg, a, a_ps, a_ld, b, b_ps, b_ld, K, n):
    """(``--peak``) a 32 × 32 block's six sub-products over depth ``K``, ``n`` times, operands
    hot in L1 and changing from step to step as in a product (no zeroing, no store)."""
    _tile_config(cfg.ctypes.data)
    _zero0()
    _zero1()
    _zero2()
    _zero3()
    for _ in range(n):
        for s in range(6):
            _depth_2x2(a + _SEG_A[s] * a_ps, a_ld, b + _SEG_B[s] * b_ps, b_ld, K)
    _tile_release()


def _tile_reference(Kb, Vb, Qs, dOs, c2, lse2, delta, dtype):
    """The tile's dK, dV, dQ (unscaled, as the routes) computed by NumPy in ``dtype``."""
    K, V, Q, dO = (x.astype(dtype) for x in (Kb, Vb, Qs, dOs))
    ST = K @ Q.T
    PT = np.exp2(ST * dtype(c2) - lse2.astype(dtype))
    dPT = V @ dO.T
    dST = PT * (dPT - delta.astype(dtype))
    return dST @ Q, PT @ dO, dST.T @ K


def _median(fn, rounds, n):
    fn(1)
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn(n)
        out.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bq", type=int, default=256)
    ap.add_argument("--bk", type=int, default=512)
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--kc", type=int, default=4096, help="depth chunk of the products (chunking did not help: 2 × the adds)")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--piece-pad", type=int, default=1)
    ap.add_argument("--amx", default="dp,dv,dk,dq", help="products on split AMX, of st,dp,dv,dk,dq (the rest MKL)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--parts", action="store_true", help="also time each AMX step alone")
    ap.add_argument("--no-fused", action="store_true", help="split finished rows from L1 instead of in the passes' registers")
    ap.add_argument("--forward", action="store_true", help="also the forward's tile with its score product split")
    ap.add_argument("--peak", action="store_true", help="also time tdpbf16ps alone (the unit's rate)")
    args = ap.parse_args()
    BQ, BK, D, KC = args.bq, args.bk, args.D, args.kc
    ok, why = _cpu_isa.amx_tiles()  # also asks the OS for the AMX register state
    if not ok:
        raise SystemExit(f"no AMX here: {why}")
    L = 4096
    rng = np.random.default_rng(0)
    f = lambda *s: rng.standard_normal(s, dtype=np.float32)  # noqa: E731
    cfg = tile_config()
    PR = args.piece_pad  # rows between pieces: 0 lays them a multiple of 4 KiB apart (L1 set conflicts)
    pad16, pad32 = 32, 16  # a cache line of uint16 / uint32 / float32 elements
    Kb, Vb = f(BK, D) * np.float32(0.125), f(BK, D)
    Qs, dOs = f(BQ, D), f(BQ, D)
    ST = cpu._zeros_aligned((BK, BQ), np.float32)  # the float32 kernel's tile buffers: rows unpadded
    dPT = cpu._zeros_aligned((BK, BQ), np.float32)
    S0 = f(BK, BQ) * np.float32(0.125)
    P0 = np.exp2(S0 * np.float32(1.4427) - 6.0).astype(np.float32)
    N = np.empty((BK, BQ), np.int32)
    c2 = np.float32(0.18)
    lse2 = np.full(BQ, 6.0, np.float32)
    delta = f(BQ)
    dK, dV = np.zeros((BK, D), np.float32), np.zeros((BK, D), np.float32)
    dq = np.zeros((BQ, D), np.float32)
    dqT = _aligned((D, BQ), np.float32, 16)[:, :BQ]
    s = _aligned((2, 32, 32), np.float32)
    # per-call pieces
    K_p = _aligned((3, BK, D), np.uint16, pad16 if D % 512 == 0 else 0, pad_rows=PR)
    V_p = _aligned((3, BK, D), np.uint16, pad16 if D % 512 == 0 else 0, pad_rows=PR)
    KT_p = _aligned((3, D, BK), np.uint16, pad16, pad_rows=PR)
    rows_scratch = _aligned((3, BQ, D), np.uint16)
    qT_p = _aligned((3, D // 2, BQ), np.uint32, pad32, pad_rows=PR)
    doT_p = _aligned((3, D // 2, BQ), np.uint32, pad32, pad_rows=PR)
    q_p = _aligned((3, BQ // 2, D), np.uint32, pad_rows=PR)
    do_p = _aligned((3, BQ // 2, D), np.uint32, pad_rows=PR)
    KbT = np.ascontiguousarray(Kb.T)
    split_rows(Kb, K_p, BK, D)
    split_rows(Vb, V_p, BK, D)
    split_rows(KbT, KT_p, D, BK)
    _split_query_operands(Qs, rows_scratch, qT_p, q_p, 1)
    _split_query_operands(dOs, rows_scratch, doT_p, do_p, 1)
    p_rows = _aligned((3, BK, BQ), np.uint16, pad16, pad_rows=PR)
    d_pairs = _aligned((3, BK // 2, BQ), np.uint32, pad32, pad_rows=PR)
    on = tuple(x in args.amx.split(",") for x in ("st", "dp", "dv", "dk", "dq"))
    cpu._bind_f32_gemm()
    n, rounds = args.repeats, args.rounds

    # correctness of the AMX tile against the MKL tile (same inputs, one run each)
    def run_once(route):
        ST[:] = 0
        dK[:] = 0
        dV[:] = 0
        dq[:] = 0
        dqT[:] = 0
        if route == "mkl":
            tile_mkl(Kb, Vb, Qs, dOs, ST, dPT, N, c2, lse2, delta, dK, dV, dq, 1)
            return dK.copy(), dV.copy(), dq.copy()
        tile_amx(on, Kb, Vb, Qs, dOs, K_p, V_p, KT_p, qT_p, doT_p, q_p, do_p, ST, dPT, N, c2, lse2, delta,
                 p_rows, d_pairs, dK, dV, dq, dqT, s, cfg, KC, args.rows, 1, not args.no_fused)
        return dK.copy(), dV.copy(), (np.ascontiguousarray(dqT.T) if on[4] else dq.copy())

    with ONE_BLAS_THREAD:
        m, a = run_once("mkl"), run_once("amx")
        ref, naive = _tile_reference(Kb, Vb, Qs, dOs, c2, lse2, delta, np.float64), _tile_reference(Kb, Vb, Qs, dOs, c2, lse2, delta, np.float32)
        print("tile accuracy, max |error| / max |float64|:")
        for name, x, y, r, nv in zip(("dK", "dV", "dQ"), m, a, ref, naive):
            e = lambda v: np.abs(v.astype(np.float64) - r).max() / np.abs(r).max()  # noqa: E731
            print(f"  {name}: MKL {e(x):.2e}  split-AMX {e(y):.2e}  NumPy float32 {e(nv):.2e}  (split-AMX / NumPy {e(y) / e(nv):.2f})")
        times = {"mkl": [], "amx": []}
        thunks = {
            "mkl": lambda k: tile_mkl(Kb, Vb, Qs, dOs, ST, dPT, N, c2, lse2, delta, dK, dV, dq, k),
            "amx": lambda k: tile_amx(on, Kb, Vb, Qs, dOs, K_p, V_p, KT_p, qT_p, doT_p, q_p, do_p, ST, dPT, N, c2, lse2,
                                      delta, p_rows, d_pairs, dK, dV, dq, dqT, s, cfg, KC, args.rows, k, not args.no_fused),
        }
        for t in thunks.values():
            t(1)
        for _ in range(rounds):
            for route, t in thunks.items():
                ST[:] = S0  # keep the exponent's inputs sane between rounds
                t0 = time.perf_counter()
                t(n)
                times[route].append((time.perf_counter() - t0) / n * 1e6)
        q_ops = _median(lambda k: _split_query_operands(Qs, rows_scratch, qT_p, q_p, k), rounds, n) * 2
        k_ops = _median(lambda k: _split_key_operands(Kb, KbT, K_p, KT_p, k), rounds, n) * 1.5
        amort = q_ops / (L // BK) + k_ops / (L // BQ)
        med = {r: statistics.median(t) for r, t in times.items()}
        flop_scale = (256 * 512) / (BQ * BK)
        print(f"tile BQ {BQ} × BK {BK}, D {D}, KC {KC}, on AMX: {args.amx}, one thread, medians of {rounds} × {n}")
        print(f"  MKL tile       {med['mkl']:7.1f} µs   (per 256×512: {med['mkl'] * flop_scale:7.1f})")
        print(f"  split-AMX tile {med['amx']:7.1f} µs   (per 256×512: {med['amx'] * flop_scale:7.1f}); "
              f"+ per-call operand splits amortized {amort:.1f} µs a tile (query tile {q_ops:.1f}, key tile {k_ops:.1f})")
        ratio = med["mkl"] / (med["amx"] + amort)
        print(f"  MKL / split-AMX (with the amortized splits): {ratio:.2f}×   rounds mkl {[round(x) for x in times['mkl']]} amx {[round(x) for x in times['amx']]}")
        if args.forward:
            row_sum = np.zeros(BQ, np.float32)
            acc = np.zeros((BQ, D), np.float32)
            plan = np.zeros(4, np.int64)
            ftimes = {False: [], True: []}
            for split in (False, True):
                forward_tile(split, Kb, Vb, Qs, K_p, qT_p, ST, N, c2, lse2, row_sum, plan, acc, s, cfg, 1)
            for _ in range(rounds):
                for split in (False, True):
                    t0 = time.perf_counter()
                    forward_tile(split, Kb, Vb, Qs, K_p, qT_p, ST, N, c2, lse2, row_sum, plan, acc, s, cfg, n)
                    ftimes[split].append((time.perf_counter() - t0) / n * 1e6)
            fm, fs = statistics.median(ftimes[False]), statistics.median(ftimes[True])
            print(f"  forward tile (Sᵀ, exp with sums, Pᵀ·V): MKL scores {fm:.1f} µs, split scores {fs:.1f} µs: {fm / fs:.2f}×")
        if args.peak:
            buf = cpu._zeros_aligned((1024,), np.float32)
            for loads in (False, True):
                t = _median(lambda k: _peak(cfg, buf, 1000 * k, loads), rounds, n) / 4000 * 1e3
                print(f"  tdpbf16ps alone, operands {'reloaded from L1' if loads else 'resident'}: {t:.2f} ns each "
                      f"(a 256 × 512 × 64 product's 6 × 1,024 of them: {6144 * t / 1e3:.1f} µs)")
            # the same with changing operands: bfloat16 pieces of N(0, 1) (a block's 32 rows of
            # A and 32 columns of B, depth 64: 24 KiB, hot in L1), and zeros
            A = cpu._zeros_aligned((3, 33, 64), np.uint16)
            Bp = cpu._zeros_aligned((3, 33, 32), np.uint32)
            for label in ("zeros", "pieces of N(0, 1) data"):
                if label != "zeros":
                    A[:] = (rng.standard_normal(A.shape).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
                    Bp.view(np.uint16)[:] = (rng.standard_normal(Bp.view(np.uint16).shape).astype(np.float32)
                                              .view(np.uint32) >> 16).astype(np.uint16)
                t = _median(lambda k: _peak_pieces(cfg, A.ctypes.data, A.strides[0], 128, Bp.ctypes.data, Bp.strides[0],
                                                   128, 64, 1000 * k), rounds, n) / 48000 * 1e3
                print(f"  a block's six sub-products, hot in L1, operands {label}: {t:.2f} ns a tdpbf16ps")
        if args.parts:
            parts = {
                "Sᵀ product (amx)": lambda k: [product(K_p, qT_p, ST, s, BK, BQ, D, KC, True, False, cfg) for _ in range(k)],
                "dPᵀ product": lambda k: [product(V_p, doT_p, dPT, s, BK, BQ, D, KC, True, False, cfg) for _ in range(k)],
                "dV += Pᵀ·dO": lambda k: [product(p_rows, do_p, dV, s, BK, D, BQ, KC, False, True, cfg) for _ in range(k)],
                "dK += dSᵀ·Q": lambda k: [product(p_rows, q_p, dK, s, BK, D, BQ, KC, False, True, cfg) for _ in range(k)],
                "dQᵀ += Kᵀ·dSᵀ": lambda k: [product(KT_p, d_pairs, dqT, s, D, BQ, BK, KC, True, True, cfg) for _ in range(k)],
                "exp + split P (− copy)": lambda k: _exp_split_n(ST, S0, N, c2, lse2, p_rows, args.rows, k, True),
                "exp fused split, registers (− copy)": lambda k: _exp_fused_n(ST, S0, c2, lse2, p_rows, k),
                "exp alone (− copy)": lambda k: _exp_split_n(ST, S0, N, c2, lse2, p_rows, BK, k, False),
                "dS + split rows, pairs (− copy)": lambda k: _ds_split_n(ST, P0, dPT, delta, p_rows, d_pairs, args.rows, k, True),
                "dS fused split, registers (− copy)": lambda k: _ds_fused_n(ST, P0, dPT, delta, p_rows, d_pairs, k),
                "dS alone (− copy)": lambda k: _ds_split_n(ST, P0, dPT, delta, p_rows, d_pairs, BK, k, False),
            }
            copy = _median(lambda k: _copy_n(ST, S0, k), rounds, n)
            for name, fn in parts.items():
                ST[:] = S0
                t = _median(fn, rounds, n) - (copy if "copy" in name else 0.0)
                print(f"    {name:<32} {t:7.1f} µs")


if __name__ == "__main__":
    main()
