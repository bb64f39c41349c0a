"""Loop orders of the bfloat16 forward's two AMX products at D 128, alternated in one process.

A copy of ``_cpu_kernels._forward_chunk``'s dense AMX loop on one thread (as
``bf16_forward_sections.py``) in which the score product and the values product are
replaced by variants, each variant's whole loop timed in turn (random order per round),
sections by the cycle counter; every variant's output is checked bit-equal to the kernel's.
``cur`` is the kernel's loop as it is (since 1 Dec 21:00).  Fusions tried 1 Dec 23:20–23:45
(docs/performance-log.md, "bfloat16 forward: fusing the exp pass …"): ``fused``/``fused-contig``
(each 32-query block's lazy pass followed at once by its ``P·V``, P in place or in one
16 KiB buffer), ``se1``/``se2`` (the lazy pass fused into the score product: each 32 × 32
block of Sᵀ stored to a small buffer and exponentiated at once), ``pipe32/64/128`` (the same
software-pipelined: block n's dots with block n − 1's pass interleaved, in one intrinsic),
``pair`` (``P·V`` over two key tiles per accumulator load/store), ``halves`` (Sᵀ at D 128 as
two Q-resident passes of 64 dims).  The ratios printed: whole loop (sum over rounds) and the
median of the rounds' ratios.

    PYTHONPATH=src .venv/bin/python benchmarks/bf16_forward_variants.py --rounds 9 --variants cur,fused-contig,pipe64
"""

from __future__ import annotations

import argparse
import os
import statistics

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from dotattn import semantics
from dotattn.kernels import _cpu_amx as A
from dotattn.kernels import _cpu_kernels as K
from dotattn.kernels import cpu
from dotattn.kernels._cpu_sync import _cycles
from dotattn.kernels._cpu_primitives import _aligned_empty, _tile_buffer
from dotattn.semantics import BFLOAT16


@intrinsic
def _prefetch_l1(typingctx, address):
    """``prefetcht0`` of the line at ``address``."""

    def codegen(context, builder, signature, args):
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fn = builder.module.declare_intrinsic("llvm.prefetch", fnty=ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]))
        builder.call(fn, [builder.inttoptr(args[0], i8p), ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(types.int64), codegen


@njit(inline="always")
def _scores_v(k_addr, k_ld, BK, D, q_addr, q_ld, BQ, s_addr, s_ld, kc):
    """kc = 0: query blocks outer (_cpu_amx.scores before 1 Dec 21:00); else key chunks of kc rows outer (the chunk of K stays in L1
    while the query blocks pass)."""
    if kc == -1:
        _scores_halves(k_addr, k_ld, BK, D, q_addr, q_ld, BQ, s_addr, s_ld)
        return
    if kc == 0:  # (the order before 1 Dec 21:00)
        for j in range(0, BQ, 32):
            for i in range(0, BK, 32):
                A._zero0()
                A._zero1()
                A._zero2()
                A._zero3()
                A._depth_2x2(k_addr + i * k_ld, k_ld, q_addr + j * 4, q_ld, D)
                A._store_2x2(s_addr + j * 4 + i * s_ld, s_ld)
        return
    for i0 in range(0, BK, kc):
        for j in range(0, BQ, 32):
            for i in range(i0, i0 + kc, 32):
                A._zero0()
                A._zero1()
                A._zero2()
                A._zero3()
                A._depth_2x2(k_addr + i * k_ld, k_ld, q_addr + j * 4, q_ld, D)
                A._store_2x2(s_addr + j * 4 + i * s_ld, s_ld)


@njit(inline="always")
def _scores_block64_acc(k_addr, k_ld, BK, q_addr, q_ld, j, s_addr, s_ld):
    """``_cpu_amx._scores_block64`` adding to the Sᵀ block already there (tiles loaded, not zeroed)."""
    A._load4(q_addr + j * 4, q_ld)
    A._load5(q_addr + 16 * q_ld + j * 4, q_ld)
    A._load6(q_addr + (j + 16) * 4, q_ld)
    A._load7(q_addr + 16 * q_ld + (j + 16) * 4, q_ld)
    for i in range(0, BK, 16):
        A._load0(s_addr + i * s_ld, s_ld)
        A._load1(s_addr + i * s_ld + 64, s_ld)
        A._load2(k_addr + i * k_ld, k_ld)
        A._load3(k_addr + i * k_ld + 64, k_ld)
        A._dot024()
        A._dot036()
        A._dot125()
        A._dot137()
        A._store0(s_addr + i * s_ld, s_ld)
        A._store1(s_addr + i * s_ld + 64, s_ld)


@njit(inline="always")
def _scores_halves(k_addr, k_ld, BK, D, q_addr, q_ld, BQ, s_addr, s_ld):
    """Sᵀ at D 128 as two Q-resident passes of 64 dims (the D 64 loop): the second adds to
    the first's stored tiles — the same dots per output tile in the same order."""
    for j in range(0, BQ, 32):
        A._scores_block64(k_addr, k_ld, BK, q_addr, q_ld, j, s_addr + j * 4, s_ld)
    for h in range(64, D, 64):
        for j in range(0, BQ, 32):
            _scores_block64_acc(k_addr + 2 * h, k_ld, BK, q_addr + (h // 2) * q_ld, q_ld, j, s_addr + j * 4, s_ld)


@njit(inline="always")
def _values_v(v_addr, v_ld, Dv, BK, p_addr, p_ld, BQ, c_addr, c_ld, order, chunk):
    """order 0: as _cpu_amx.values (query blocks outer; the forward's before 1 Dec 21:00); 1: dim blocks outer (Vᵀ's 32 rows stay
    in L1); 2: key chunks of ``chunk`` outer (Vᵀ's chunk stays in L1; accᵀ loaded per chunk);
    3: dim chunks of ``chunk`` rows outer, query blocks, dim blocks inner."""
    if order == 0:
        for j in range(0, BQ, 32):
            A._values_block(v_addr, v_ld, Dv, BK, p_addr + j * 4, p_ld, c_addr + j * 4, c_ld, False)
    elif order == 1:
        for i in range(0, Dv, 32):
            for j in range(0, BQ, 32):
                c = c_addr + j * 4 + i * c_ld
                A._load0(c, c_ld)
                A._load1(c + 64, c_ld)
                A._load2(c + 16 * c_ld, c_ld)
                A._load3(c + 16 * c_ld + 64, c_ld)
                A._depth_2x2(v_addr + i * v_ld, v_ld, p_addr + j * 4, p_ld, BK)
                A._store_2x2(c, c_ld)
    elif order == 2:
        for k0 in range(0, BK, chunk):
            for j in range(0, BQ, 32):
                for i in range(0, Dv, 32):
                    c = c_addr + j * 4 + i * c_ld
                    A._load0(c, c_ld)
                    A._load1(c + 64, c_ld)
                    A._load2(c + 16 * c_ld, c_ld)
                    A._load3(c + 16 * c_ld + 64, c_ld)
                    A._depth_2x2(v_addr + i * v_ld + k0 * 2, v_ld, p_addr + j * 4 + (k0 // 2) * p_ld, p_ld, chunk)
                    A._store_2x2(c, c_ld)
    elif order == 4:  # rows outer, the next 32-query block of P asked into L1 during the depth loop
        for i in range(0, Dv, 32):
            for j in range(0, BQ, 32):
                c = c_addr + j * 4 + i * c_ld
                nj = j + 32 if j + 32 < BQ else 0
                A._load0(c, c_ld)
                A._load1(c + 64, c_ld)
                A._load2(c + 16 * c_ld, c_ld)
                A._load3(c + 16 * c_ld + 64, c_ld)
                a_addr = v_addr + i * v_ld
                b_addr = p_addr + j * 4
                for kk in range(0, BK, 32):
                    nb = p_addr + nj * 4 + (kk // 2) * p_ld
                    for r in range(16):
                        _prefetch_l1(nb + r * p_ld)
                        _prefetch_l1(nb + r * p_ld + 64)
                    A._load4(a_addr + kk * 2, v_ld)
                    A._load5(a_addr + 16 * v_ld + kk * 2, v_ld)
                    A._load6(b_addr + (kk // 2) * p_ld, p_ld)
                    A._load7(b_addr + (kk // 2) * p_ld + 64, p_ld)
                    A._dot046()
                    A._dot147()
                    A._dot256()
                    A._dot357()
                A._store_2x2(c, c_ld)
    elif order == 5:  # rows outer, P block-major (each 32-query block's pairs contiguous, rows 128 bytes apart)
        blk = (BK // 2) * 128
        for i in range(0, Dv, 32):
            for j in range(0, BQ, 32):
                c = c_addr + j * 4 + i * c_ld
                A._load0(c, c_ld)
                A._load1(c + 64, c_ld)
                A._load2(c + 16 * c_ld, c_ld)
                A._load3(c + 16 * c_ld + 64, c_ld)
                A._depth_2x2(v_addr + i * v_ld, v_ld, p_addr + (j // 32) * blk, 128, BK)
                A._store_2x2(c, c_ld)
    else:
        for i0 in range(0, Dv, chunk):
            for j in range(0, BQ, 32):
                for i in range(i0, i0 + chunk, 32):
                    c = c_addr + j * 4 + i * c_ld
                    A._load0(c, c_ld)
                    A._load1(c + 64, c_ld)
                    A._load2(c + 16 * c_ld, c_ld)
                    A._load3(c + 16 * c_ld + 64, c_ld)
                    A._depth_2x2(v_addr + i * v_ld, v_ld, p_addr + j * 4, p_ld, BK)
                    A._store_2x2(c, c_ld)


@njit(inline="always")
def _loop_buffers(q, kp, vp, lse, o):
    """The kernel loop's per-thread state, as ``_cpu_kernels._forward_chunk`` sets it up (AMX
    path): the softmax constant, the query tile and its AMX operand, the tile config, Sᵀ, P's
    operand, the exponent scratch, the accumulator and the row statistics — one set-up for
    every variant below."""
    D, BK, Dv, BQ, T = q.shape[3], kp.shape[3], vp.shape[4], o.BQ, lse.dtype
    c2, _ = K._constants(o, lse)
    Qs = _aligned_empty(BQ, D, q)
    Qs[:] = 0
    Qv = _tile_buffer(D // 2, BQ, np.empty(0, dtype=np.uint32), q)
    cfg = K.tile_config()
    ST = _tile_buffer(BK, BQ, lse, q)
    Pb = _tile_buffer(BK, BQ, q, q)
    N = np.empty((BK, BQ), dtype=np.int32)
    acc = K._new_acc(BQ, Dv, lse, q)
    m, m_use = np.empty(BQ, dtype=T), np.empty(BQ, dtype=T)
    bmax, row_sum = np.empty(BQ, dtype=T), np.empty(BQ, dtype=T)
    tsum = np.empty(BQ, dtype=T)
    plan = np.zeros(4, dtype=np.int64)
    prefetch = K._prefetch_kv(kp, vp)
    return c2, Qs, Qv, cfg, ST, Pb, N, acc, m, m_use, bmax, row_sum, tsum, plan, prefetch


@njit(inline="always")
def _start_task(t, q, Qs, Qv, m, row_sum, acc, o, Hkv, nqb):
    """Task ``t``'s start, as the kernel's loop does it: its head and query tile, the tile loaded
    (packed for AMX), running max −inf, running sum and accumulator 0."""
    B, Hq = q.shape[0], q.shape[1]
    b, h, qb = K._forward_task(t, B, Hq, nqb, q)
    i0, nrows, nr = K._rows(b, qb, o)
    K._load_q(Qs, Qv, q, b, h, i0, nr, o.amx)
    m[:] = -np.inf
    row_sum[:] = 0.0
    K._zero(acc)
    return b, h, h // (Hq // Hkv), i0, nrows, nr


@njit
def _chunk(q, kp, vp, out, lse, o, T_, kc, order, chunk):  # dense, no chain, AMX, one thread
    B, Hq, Lq, D = q.shape
    Hkv, nkb, BK = kp.shape[1], kp.shape[2], kp.shape[3]
    Dv, BQ, T = vp.shape[4], o.BQ, lse.dtype
    nqb = (Lq + BQ - 1) // BQ
    c2, Qs, Qv, cfg, ST, Pb, N, acc, m, m_use, bmax, row_sum, tsum, plan, prefetch = _loop_buffers(q, kp, vp, lse, o)
    accT = acc.T
    Pblk = _aligned_empty((BQ // 32) * (BK // 2), 32, np.empty(0, dtype=np.uint32))
    for t in range(B * Hq * nqb):
        b, h, hk, i0, nrows, nr = _start_task(t, q, Qs, Qv, m, row_sum, acc, o, Hkv, nqb)
        for kb in range(nkb):
            c0 = _cycles()
            Kb = kp[b, hk, kb]
            A._tile_config(cfg.ctypes.data)
            _scores_v(Kb.ctypes.data, Kb.strides[0], BK, D, Qv.ctypes.data, Qv.strides[0], BQ, ST.ctypes.data, ST.strides[0], kc)
            A._tile_release()
            c1 = _cycles()
            T_[0] += c1 - c0
            lazy = K._lazy_ok(m, Pb, True)
            if prefetch:
                K._plan_next_tiles(plan, kp, vp, b, hk, kb)
            if order == 5:  # the lazy pass writing P block-major; an exact tile's P copied there
                done = False
                if lazy:
                    tsum[:] = 0.0
                    lines = (plan[1] + 63) // 64 + (plan[3] + 63) // 64
                    share = (lines + BQ // 32 - 1) // (BQ // 32)
                    for j in range(0, BQ, 32):
                        A.exp2_pairs(ST.ctypes.data + 4 * j, ST.strides[0], BK, Pblk.ctypes.data + (j // 32) * (BK // 2) * 128,
                                     128, c2, m.ctypes.data + 4 * j, tsum.ctypes.data + 4 * j, 0,
                                     plan.ctypes.data, (j // 32) * share, share)
                    done = True
                    for r in range(BQ):
                        done &= tsum[r] <= np.float32(65536.0)
                    if done:
                        for r in range(BQ):
                            row_sum[r] += tsum[r]
                if not done:
                    K._online_softmax(ST, N, c2, m, m_use, bmax, row_sum, acc, Pb, True, o.amx, plan)
                    P32 = Pblk.reshape(BQ // 32, BK // 2, 32)
                    for pr in range(BK // 2):
                        src = Pb[2 * pr].view(np.uint32)
                        for j in range(0, BQ, 32):
                            for e in range(32):
                                P32[j // 32, pr, e] = src[j + e]
            elif not (lazy and K._lazy_softmax(ST, c2, m, bmax, tsum, row_sum, Pb, o.amx, plan)):
                K._online_softmax(ST, N, c2, m, m_use, bmax, row_sum, acc, Pb, True, o.amx, plan)
            c2_ = _cycles()
            T_[1] += c2_ - c1
            VT = vp[b, hk, kb].T
            A._tile_config(cfg.ctypes.data)
            _values_v(VT.ctypes.data, VT.strides[0], VT.shape[0], VT.shape[1], Pblk.ctypes.data if order == 5 else Pb.ctypes.data,
                      2 * Pb.strides[0], BQ,
                      accT.ctypes.data, accT.strides[0], order, chunk)
            A._tile_release()
            T_[2] += _cycles() - c2_
        c0 = _cycles()
        K._store_rows(out, lse, acc, m, row_sum, tsum, b, h, i0, nrows, nr, o.amx)
        T_[3] += _cycles() - c0


@njit
def _block_exact(ST, j, c2, m, m_use, bmax, row_sum, acc, ST32, N32, Pb32, nofetch):
    """The exact (two-pass) softmax step for the 32-query block at column ``j`` of ``ST``
    alone: its scores copied to ``ST32``, P into ``Pb32`` in key pairs."""
    BK = ST.shape[0]
    for c in range(BK):
        for r in range(32):
            ST32[c, r] = ST[c, j + r]
    s = slice(j, j + 32)
    if not K._online_softmax(ST32, N32, c2, m[s], m_use[s], bmax[s], row_sum[s], acc[s], Pb32, True, True, nofetch):
        K._pv_operand(ST32, Pb32, True)


@njit
def _chunk_fused(q, kp, vp, out, lse, o, T_, contig, pvmode):
    """The kernel's loop with each 32-query block's lazy exp pass followed at once by its
    ``accᵀ[:, block] += Vᵀ·P_block`` (P still in L1): ``contig`` writes the block's P into
    one contiguous 16 KiB buffer (rows 128 bytes apart) instead of its place in Pb."""
    B, Hq, Lq, D = q.shape
    Hkv, nkb, BK = kp.shape[1], kp.shape[2], kp.shape[3]
    Dv, BQ, T = vp.shape[4], o.BQ, lse.dtype
    nqb = (Lq + BQ - 1) // BQ
    c2, Qs, Qv, cfg, ST, Pb, N, acc, m, m_use, bmax, row_sum, tsum, plan, prefetch = _loop_buffers(q, kp, vp, lse, o)
    nofetch = np.zeros(4, dtype=np.int64)
    accT = acc.T
    Pc = _aligned_empty(BK // 2, 32, np.empty(0, dtype=np.uint32))
    ST32 = _tile_buffer(BK, 32, lse, q)
    Pb32 = _tile_buffer(BK, 32, q, q)
    N32 = np.empty((BK, 32), dtype=np.int32)
    fails = 0
    for t in range(B * Hq * nqb):
        b, h, hk, i0, nrows, nr = _start_task(t, q, Qs, Qv, m, row_sum, acc, o, Hkv, nqb)
        for kb in range(nkb):
            c0 = _cycles()
            Kb = kp[b, hk, kb]
            A.scores(Kb.ctypes.data, Kb.strides[0], BK, D, Qv.ctypes.data, Qv.strides[0], BQ, ST.ctypes.data, ST.strides[0], cfg)
            c1 = _cycles()
            T_[0] += c1 - c0
            lazy = K._lazy_ok(m, Pb, True)
            if prefetch:
                K._plan_next_tiles(plan, kp, vp, b, hk, kb)
            VT = vp[b, hk, kb].T
            if not lazy:
                K._online_softmax(ST, N, c2, m, m_use, bmax, row_sum, acc, Pb, True, o.amx, plan)
                A.values_rows_outer(VT.ctypes.data, VT.strides[0], Dv, BK, Pb.ctypes.data, 2 * Pb.strides[0], BQ,
                                    accT.ctypes.data, accT.strides[0], cfg)
            else:
                lines = (plan[1] + 63) // 64 + (plan[3] + 63) // 64
                share = (lines + BQ // 32 - 1) // (BQ // 32)
                for j in range(0, BQ, 32):
                    if contig:
                        p_addr, p_ld = Pc.ctypes.data, 128
                    else:
                        p_addr, p_ld = Pb.ctypes.data + 4 * j, 2 * Pb.strides[0]
                    for r in range(j, j + 32):
                        tsum[r] = 0.0
                    A.exp2_pairs(ST.ctypes.data + 4 * j, ST.strides[0], BK, p_addr, p_ld, c2, m.ctypes.data + 4 * j,
                                 tsum.ctypes.data + 4 * j, 0, plan.ctypes.data, (j // 32) * share, share)
                    ok = True
                    for r in range(j, j + 32):
                        ok &= tsum[r] <= np.float32(65536.0)
                    if ok:
                        for r in range(j, j + 32):
                            row_sum[r] += tsum[r]
                    else:
                        fails += 1
                        _block_exact(ST, j, c2, m, m_use, bmax, row_sum, acc, ST32, N32, Pb32, nofetch)
                        p_addr, p_ld = Pb32.ctypes.data, 2 * Pb32.strides[0]
                    A.values(VT.ctypes.data, VT.strides[0], Dv, BK, p_addr, p_ld, 32, accT.ctypes.data + 4 * j, accT.strides[0], cfg)
            T_[1] += _cycles() - c1
        c0 = _cycles()
        K._store_rows(out, lse, acc, m, row_sum, tsum, b, h, i0, nrows, nr, o.amx)
        T_[3] += _cycles() - c0
    return fails


@njit(inline="always")
def _scores_exp(k_addr, k_ld, BK, D, q_addr, q_ld, BQ, buf, nbuf, p_addr, p_ld, mul, m_addr, sum_addr, plan_addr, share):
    """The lazy exp pass fused into the score product: key chunks of 64 rows outer (as
    ``_cpu_amx.scores``), each 32 × 32 block of Sᵀ stored into a small buffer (``nbuf`` of 4
    KiB, rows 128 bytes apart, taken in turn) and exponentiated at once into P's key pairs."""
    chunk = 64
    n = 0
    for i0 in range(0, BK, chunk):
        for j in range(0, BQ, 32):
            for i in range(i0, i0 + chunk, 32):
                A._zero0()
                A._zero1()
                A._zero2()
                A._zero3()
                A._depth_2x2(k_addr + i * k_ld, k_ld, q_addr + j * 4, q_ld, D)
                b = buf + (n % nbuf) * 4096
                A._store_2x2(b, 128)
                A._exp2_pairs_sum(b, 128, 32, p_addr + (i // 2) * p_ld + j * 4, p_ld, mul, m_addr + j * 4, sum_addr + j * 4, 0,
                                  plan_addr, n * share, share)
                n += 1


def _amx_call(builder, name, consts, args=()):
    argtypes = [ir.IntType(8)] * len(consts) + [a.type for a in args]
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), argtypes), name)
    builder.call(fn, [ir.Constant(ir.IntType(8), c) for c in consts] + list(args))


@intrinsic
def _se_step(typingctx, k_addr, k_ld, depth, q_addr, q_ld, cur, prev, p_addr, p_ld, mul, sub_addr, sum_addr, has_prev, plan_addr, pf_first, pf_count):
    """One 32 × 32 block of Sᵀ = K·Qᵀ (2 × 2 tiles, ``depth`` deep) stored at ``cur`` (rows 128
    bytes apart), with the previous block's lazy exp pass (scores at ``prev``) interleaved
    between its depth steps: the vector work beside the tile unit's."""
    i64 = types.int64
    sig = types.void(i64, i64, i64, i64, i64, i64, i64, i64, i64, types.float32, i64, i64, i64, i64, i64, i64)

    def codegen(context, builder, signature, args):
        (k_addr, k_ld, depth, q_addr, q_ld, cur, prev, p_addr, p_ld, mul, sub_addr, sum_addr, has_prev,
         plan_addr, pf_first, pf_count) = args
        A._amx_function(context, builder, "+amx-tile,+amx-bf16," + A._AVX512)
        i64t = ir.IntType(64)
        c = lambda v: ir.Constant(i64t, v)
        ptr = lambda a: builder.inttoptr(a, ir.IntType(8).as_pointer())
        fma = builder.module.declare_intrinsic("llvm.fma.v16f32", fnty=ir.FunctionType(A._VF, [A._VF] * 3))
        undef = ir.Constant(A._VF, ir.Undefined)
        first = builder.insert_element(undef, mul, ir.Constant(A._I32, 0))
        mul_v = builder.shuffle_vector(first, undef, ir.Constant(ir.VectorType(A._I32, 16), [0] * 16))
        neg_sub, vsum = [], []
        for g in range(2):
            neg_sub.append(builder.fneg(builder.load(A._vptr(builder, builder.add(sub_addr, c(64 * g))), align=4)))
            t = cgutils.alloca_once(builder, A._VF)
            builder.store(builder.load(A._vptr(builder, builder.add(sum_addr, c(64 * g))), align=4), t)
            vsum.append(t)
        plan = A._plan_ranges(builder, plan_addr)
        A._prefetch_plan_lines(builder, plan, pf_first, pf_count)
        for t in range(4):
            _amx_call(builder, "llvm.x86.tilezero", [t])
        nsteps = builder.sdiv(depth, c(32))
        with cgutils.for_range(builder, nsteps) as loop:
            st = loop.index
            a0 = builder.add(k_addr, builder.mul(st, c(64)))
            b0 = builder.add(q_addr, builder.mul(builder.mul(st, c(16)), q_ld))
            _amx_call(builder, "llvm.x86.tileloadd64", [4], [ptr(a0), k_ld])
            _amx_call(builder, "llvm.x86.tileloadd64", [5], [ptr(builder.add(a0, builder.mul(c(16), k_ld))), k_ld])
            _amx_call(builder, "llvm.x86.tileloadd64", [6], [ptr(b0), q_ld])
            _amx_call(builder, "llvm.x86.tileloadd64", [7], [ptr(builder.add(b0, c(64))), q_ld])
            for d in ((0, 4, 6), (1, 4, 7), (2, 5, 6), (3, 5, 7)):
                _amx_call(builder, "llvm.x86.tdpbf16ps", list(d))
            lo = builder.sdiv(builder.mul(st, c(16)), nsteps)
            hi = builder.sdiv(builder.mul(builder.add(st, c(1)), c(16)), nsteps)
            n = builder.select(builder.icmp_signed("!=", has_prev, c(0)), builder.sub(hi, lo), c(0))
            with cgutils.for_range(builder, n) as inner:
                rp = builder.add(lo, inner.index)
                for g, s0, s1, dst in A._row_pair_halves(builder, rp, prev, c(128), p_addr, p_ld):
                    p0 = A._exp2_vec(builder, builder.call(fma, [s0, mul_v, neg_sub[g]]))
                    p1 = A._exp2_vec(builder, builder.call(fma, [s1, mul_v, neg_sub[g]]))
                    builder.store(builder.fadd(builder.load(vsum[g]), builder.fadd(p0, p1)), vsum[g])
                    pairs = A._bf16_pairs(builder, p0, p1)
                    builder.store(pairs, A._vptr(builder, dst, pairs.type), align=4)
        _amx_call(builder, "llvm.x86.tilestored64", [0], [ptr(cur), c(128)])
        _amx_call(builder, "llvm.x86.tilestored64", [1], [ptr(builder.add(cur, c(64))), c(128)])
        _amx_call(builder, "llvm.x86.tilestored64", [2], [ptr(builder.add(cur, c(2048))), c(128)])
        _amx_call(builder, "llvm.x86.tilestored64", [3], [ptr(builder.add(cur, c(2048 + 64))), c(128)])
        with builder.if_then(builder.icmp_signed("!=", has_prev, c(0))):
            for g in range(2):
                builder.store(builder.load(vsum[g]), A._vptr(builder, builder.add(sum_addr, c(64 * g))), align=4)
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always")
def _scores_exp_pipe(k_addr, k_ld, BK, D, q_addr, q_ld, BQ, buf, p_addr, p_ld, mul, m_addr, sum_addr, plan_addr, share, chunk):
    """:func:`_scores_exp` software-pipelined: block n's dots with block n − 1's exp pass."""
    n = 0
    pp, pm, ps, pb = 0, m_addr, sum_addr, 0  # (the first step reads sub and sum: valid addresses)
    for i0 in range(0, BK, chunk):
        for j in range(0, BQ, 32):
            for i in range(i0, i0 + chunk, 32):
                b = buf + (n % 2) * 4096
                _se_step(k_addr + i * k_ld, k_ld, D, q_addr + j * 4, q_ld, b, pb, pp, p_ld, mul, pm, ps, n, plan_addr, n * share, share)
                pp, pm, ps, pb = p_addr + (i // 2) * p_ld + j * 4, m_addr + j * 4, sum_addr + j * 4, b
                n += 1
    A._exp2_pairs_sum(pb, 128, 32, pp, p_ld, mul, pm, ps, 0, plan_addr, 0, 0)


@njit
def _chunk_se(q, kp, vp, out, lse, o, T_, nbuf, unused):
    """The kernel's loop with the lazy exp pass fused into the score product (Sᵀ stored only
    where a tile takes the exact step: then recomputed)."""
    B, Hq, Lq, D = q.shape
    Hkv, nkb, BK = kp.shape[1], kp.shape[2], kp.shape[3]
    Dv, BQ, T = vp.shape[4], o.BQ, lse.dtype
    nqb = (Lq + BQ - 1) // BQ
    c2, Qs, Qv, cfg, ST, Pb, N, acc, m, m_use, bmax, row_sum, tsum, plan, prefetch = _loop_buffers(q, kp, vp, lse, o)
    accT = acc.T
    buf = _aligned_empty(nbuf * 1024, 1, np.empty(0, dtype=np.float32))
    fails = 0
    for t in range(B * Hq * nqb):
        b, h, hk, i0, nrows, nr = _start_task(t, q, Qs, Qv, m, row_sum, acc, o, Hkv, nqb)
        for kb in range(nkb):
            c0 = _cycles()
            Kb = kp[b, hk, kb]
            lazy = K._lazy_ok(m, Pb, True)
            if prefetch:
                K._plan_next_tiles(plan, kp, vp, b, hk, kb)
            done = False
            if lazy:
                tsum[:] = 0.0
                lines = (plan[1] + 63) // 64 + (plan[3] + 63) // 64
                calls = (BK // 32) * (BQ // 32)
                share = (lines + calls - 1) // calls
                A._tile_config(cfg.ctypes.data)
                if unused > 0:
                    _scores_exp_pipe(Kb.ctypes.data, Kb.strides[0], BK, D, Qv.ctypes.data, Qv.strides[0], BQ, buf.ctypes.data,
                                     Pb.ctypes.data, 2 * Pb.strides[0], np.float32(c2), m.ctypes.data, tsum.ctypes.data, plan.ctypes.data, share, unused)
                else:
                    _scores_exp(Kb.ctypes.data, Kb.strides[0], BK, D, Qv.ctypes.data, Qv.strides[0], BQ, buf.ctypes.data, nbuf,
                                Pb.ctypes.data, 2 * Pb.strides[0], np.float32(c2), m.ctypes.data, tsum.ctypes.data, plan.ctypes.data, share)
                A._tile_release()
                done = True
                for r in range(BQ):
                    done &= tsum[r] <= np.float32(65536.0)
                if done:
                    for r in range(BQ):
                        row_sum[r] += tsum[r]
                else:
                    fails += 1
            if not done:
                A.scores(Kb.ctypes.data, Kb.strides[0], BK, D, Qv.ctypes.data, Qv.strides[0], BQ, ST.ctypes.data, ST.strides[0], cfg)
                K._online_softmax(ST, N, c2, m, m_use, bmax, row_sum, acc, Pb, True, o.amx, plan)
            c1 = _cycles()
            T_[0] += c1 - c0
            VT = vp[b, hk, kb].T
            A.values_rows_outer(VT.ctypes.data, VT.strides[0], Dv, BK, Pb.ctypes.data, 2 * Pb.strides[0], BQ,
                                accT.ctypes.data, accT.strides[0], cfg)
            T_[2] += _cycles() - c1
        c0 = _cycles()
        K._store_rows(out, lse, acc, m, row_sum, tsum, b, h, i0, nrows, nr, o.amx)
        T_[3] += _cycles() - c0
    return fails


@njit(inline="always")
def _values_pair(v1, v2, v_ld, Dv, BK, p1, p2, p_ld, BQ, c_addr, c_ld, nt):
    """``accᵀ += Vᵀ₁·P₁ (+ Vᵀ₂·P₂ when nt == 2)``, accᵀ's 32-row blocks outer (as
    ``_cpu_amx.values_rows_outer``), each 2 × 2 block of accᵀ loaded and stored once for both
    key tiles: the same dots in the same order, half the accumulator's tile loads and stores."""
    for i in range(0, Dv, 32):
        for j in range(0, BQ, 32):
            c = c_addr + i * c_ld + j * 4
            A._load0(c, c_ld)
            A._load1(c + 64, c_ld)
            A._load2(c + 16 * c_ld, c_ld)
            A._load3(c + 16 * c_ld + 64, c_ld)
            A._depth_2x2(v1 + i * v_ld, v_ld, p1 + j * 4, p_ld, BK)
            if nt == 2:
                A._depth_2x2(v2 + i * v_ld, v_ld, p2 + j * 4, p_ld, BK)
            A._store_2x2(c, c_ld)


@njit
def _chunk_pair(q, kp, vp, out, lse, o, T_, unused0, unused1):
    """The kernel's loop with ``accᵀ += Vᵀ·P`` taken for two key tiles at a time (P of the
    first kept in a second buffer while the second tile's scores and softmax run); a tile
    whose softmax takes the exact step (rescaling accᵀ) first flushes the pending one."""
    B, Hq, Lq, D = q.shape
    Hkv, nkb, BK = kp.shape[1], kp.shape[2], kp.shape[3]
    Dv, BQ, T = vp.shape[4], o.BQ, lse.dtype
    nqb = (Lq + BQ - 1) // BQ
    c2, Qs, Qv, cfg, ST, Pb0, N, acc, m, m_use, bmax, row_sum, tsum, plan, prefetch = _loop_buffers(q, kp, vp, lse, o)
    Pb1 = _tile_buffer(BK, BQ, q, q)
    accT = acc.T
    p_ld = 2 * Pb0.strides[0]
    for t in range(B * Hq * nqb):
        b, h, hk, i0, nrows, nr = _start_task(t, q, Qs, Qv, m, row_sum, acc, o, Hkv, nqb)
        pend = -1  # the key tile whose P waits in the other buffer
        for kb in range(nkb):
            Pb = Pb1 if kb % 2 else Pb0
            c0 = _cycles()
            Kb = kp[b, hk, kb]
            A.scores(Kb.ctypes.data, Kb.strides[0], BK, D, Qv.ctypes.data, Qv.strides[0], BQ, ST.ctypes.data, ST.strides[0], cfg)
            c1 = _cycles()
            T_[0] += c1 - c0
            lazy = K._lazy_ok(m, Pb, True)
            if prefetch:
                K._plan_next_tiles(plan, kp, vp, b, hk, kb)
            if not (lazy and K._lazy_softmax(ST, c2, m, bmax, tsum, row_sum, Pb, o.amx, plan)):
                if pend >= 0:  # the exact step rescales accᵀ: the pending tile's product first
                    c3 = _cycles()
                    VT = vp[b, hk, pend].T
                    Pp = Pb1 if pend % 2 else Pb0
                    A._tile_config(cfg.ctypes.data)
                    _values_pair(VT.ctypes.data, 0, VT.strides[0], Dv, BK, Pp.ctypes.data, 0, p_ld, BQ, accT.ctypes.data, accT.strides[0], 1)
                    A._tile_release()
                    pend = -1
                    T_[2] += _cycles() - c3
                K._online_softmax(ST, N, c2, m, m_use, bmax, row_sum, acc, Pb, True, o.amx, plan)
            c2_ = _cycles()
            T_[1] += c2_ - c1
            if pend >= 0 or kb == nkb - 1:
                VT = vp[b, hk, kb].T
                A._tile_config(cfg.ctypes.data)
                if pend >= 0:
                    V1 = vp[b, hk, pend].T
                    P1 = Pb1 if pend % 2 else Pb0
                    _values_pair(V1.ctypes.data, VT.ctypes.data, VT.strides[0], Dv, BK, P1.ctypes.data, Pb.ctypes.data, p_ld, BQ,
                                 accT.ctypes.data, accT.strides[0], 2)
                else:
                    _values_pair(VT.ctypes.data, 0, VT.strides[0], Dv, BK, Pb.ctypes.data, 0, p_ld, BQ, accT.ctypes.data, accT.strides[0], 1)
                A._tile_release()
                pend = -1
            else:
                pend = kb
            T_[2] += _cycles() - c2_
        c0 = _cycles()
        K._store_rows(out, lse, acc, m, row_sum, tsum, b, h, i0, nrows, nr, o.amx)
        T_[3] += _cycles() - c0
    return 0


VARIANTS = {"before": (0, 0, 0), "s128": (128, 0, 0), "s64": (64, 0, 0), "s32": (32, 0, 0), "v-dimout": (0, 1, 0),
            "v-key128": (0, 2, 128), "v-key64": (0, 2, 64), "v-dim64": (0, 3, 64), "s64+v-dim64": (64, 3, 64),
            "s32+v-dim64": (32, 3, 64), "s64+v-key128": (64, 2, 128), "s64+v-dimout": (64, 1, 0), "s32+v-dimout": (32, 1, 0), "s64+v-dimout-pf": (64, 4, 0), "s64+v-blocked": (64, 5, 0),
            "cur": (64, 1, 0), "fused": ("F", 0, 0), "fused-contig": ("F", 1, 0),
            "se1": ("S", 1, 0), "se2": ("S", 2, 0), "pipe64": ("S", 2, 64), "pipe32": ("S", 2, 32), "pipe128": ("S", 2, 128), "pair": ("P", 0, 0), "halves": (-1, 1, 0)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--H", type=int, default=4)
    parser.add_argument("--D", type=int, default=128)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    names = args.variants.split(",")
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, args.H, 4096, args.D), dtype=np.float32).astype(BFLOAT16) for _ in range(3))
    call = semantics.normalize(q, k, v)
    p = cpu.prepare(call, None, forward=True)
    assert p.options.amx
    ref = cpu._run_forward(call, p, False, True)[0].view(np.uint16)
    out = np.empty_like(ref)
    lse = np.empty(ref.shape[:3], np.float32)
    T = {n: np.zeros(4, np.int64) for n in names}
    def once(n):
        v = VARIANTS[n]
        if v[0] == "P":
            return _chunk_pair(p.q, p.kp, p.vp, out, lse, p.options, T[n], 0, 0)
        if v[0] == "S":
            return _chunk_se(p.q, p.kp, p.vp, out, lse, p.options, T[n], v[1], v[2])
        if v[0] == "F":
            return _chunk_fused(p.q, p.kp, p.vp, out, lse, p.options, T[n], v[1], v[2])
        _chunk(p.q, p.kp, p.vp, out, lse, p.options, T[n], *v)
        return 0

    for n in names:
        fails = once(n)
        assert np.array_equal(out, ref), n
        if fails:
            print(f"  {n}: {fails} blocks took the exact step after the first tile")
        T[n][:] = 0
    order = np.random.default_rng(1)
    per_round = {n: [] for n in names}  # each round's whole-loop cycles, for the median ratio
    for _ in range(args.rounds):
        for n in order.permutation(names):
            before = T[n].sum()
            once(n)
            per_round[n].append(T[n].sum() - before)
    hz = 2.0e9  # only ratios and shares are quoted; cycles of the TSC → ms at a nominal rate
    base = T[names[0]]
    print(f"H{args.H} L4096 D{args.D} dense, one thread, {args.rounds} rounds, load {os.getloadavg()[0]:.2f} "
          f"(TSC ms at 2 GHz nominal: scores / pass / P·V / rows / total; ratio to {names[0]})")
    for n in names:
        t = T[n] / args.rounds / hz * 1e3
        print(f"  {n:<16} " + " ".join(f"{x:7.2f}" for x in t) + f"  {t.sum():7.2f}"
              f"   scores {T[n][0] / base[0]:.3f}  P·V {T[n][2] / base[2]:.3f}  pass+P·V {(T[n][1] + T[n][2]) / (base[1] + base[2]):.3f}  total {T[n].sum() / base.sum():.3f}"
              f"  median of rounds' ratios {statistics.median(a / b for a, b in zip(per_round[n], per_round[names[0]])):.3f}")


if __name__ == "__main__":
    main()
