"""Loop orders of the bfloat16 forward's two AMX products at D 128, alternated in one process.

A copy of ``_cpu_kernels._forward_chunk``'s dense AMX loop on one thread (as
``bf16_forward_sections.py``) in which the score product and the values product are
replaced by variants, each variant's whole loop timed in turn (random order per round),
sections by the cycle counter; every variant's output is checked bit-equal to the kernel's.

    PYTHONPATH=src .venv/bin/python benchmarks/bf16_forward_variants.py --rounds 7
"""

from __future__ import annotations

import argparse
import os
import statistics

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from dotattn import semantics
from dotattn.kernels import _cpu_amx as A
from dotattn.kernels import _cpu_kernels as K
from dotattn.kernels import cpu
from dotattn.kernels._cpu_decode_kernels import _cycles
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
def _values_v(v_addr, v_ld, Dv, BK, p_addr, p_ld, BQ, c_addr, c_ld, order, chunk):
    """order 0: as _cpu_amx.values (query blocks outer; the forward's before 1 Dec 21:00); 1: dim blocks outer (Vᵀ's 32 rows stay
    in L1); 2: key chunks of ``chunk`` outer (Vᵀ's chunk stays in L1; accᵀ loaded per chunk);
    3: dim chunks of ``chunk`` rows outer, query blocks, dim blocks inner."""
    if order == 0:
        for j in range(0, BQ, 32):
            A._values_block(v_addr, v_ld, Dv, BK, p_addr + j * 4, p_ld, c_addr + j * 4, c_ld)
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


@njit
def _chunk(q, kp, vp, out, lse, o, T_, kc, order, chunk):  # dense, no chain, AMX, one thread
    B, Hq, Lq, D = q.shape
    Hkv, nkb, BK = kp.shape[1], kp.shape[2], kp.shape[3]
    Dv, BQ, T = vp.shape[4], o.BQ, lse.dtype
    nqb = (Lq + BQ - 1) // BQ
    c2, inv_keep = K._constants(o, lse)
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
    accT = acc.T
    Pblk = _aligned_empty((BQ // 32) * (BK // 2), 32, np.empty(0, dtype=np.uint32))
    for t in range(B * Hq * nqb):
        b, h, qb = K._forward_task(t, B, Hq, nqb, q)
        hk = h // (Hq // Hkv)
        i0, nrows, nr = K._rows(b, qb, o)
        K._load_q(Qs, Qv, q, b, h, i0, nr, o.amx)
        m[:] = -np.inf
        row_sum[:] = 0.0
        K._zero(acc)
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


VARIANTS = {"before": (0, 0, 0), "s128": (128, 0, 0), "s64": (64, 0, 0), "s32": (32, 0, 0), "v-dimout": (0, 1, 0),
            "v-key128": (0, 2, 128), "v-key64": (0, 2, 64), "v-dim64": (0, 3, 64), "s64+v-dim64": (64, 3, 64),
            "s32+v-dim64": (32, 3, 64), "s64+v-key128": (64, 2, 128), "s64+v-dimout": (64, 1, 0), "s32+v-dimout": (32, 1, 0), "s64+v-dimout-pf": (64, 4, 0), "s64+v-blocked": (64, 5, 0)}


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
    for n in names:
        _chunk(p.q, p.kp, p.vp, out, lse, p.options, T[n], *VARIANTS[n])
        assert np.array_equal(out, ref), n
        T[n][:] = 0
    order = np.random.default_rng(1)
    for _ in range(args.rounds):
        for n in order.permutation(names):
            _chunk(p.q, p.kp, p.vp, out, lse, p.options, T[n], *VARIANTS[n])
    hz = 2.0e9  # only ratios and shares are quoted; cycles of the TSC → ms at a nominal rate
    base = T[names[0]]
    print(f"H{args.H} L4096 D{args.D} dense, one thread, {args.rounds} rounds, load {os.getloadavg()[0]:.2f} "
          f"(TSC ms at 2 GHz nominal: scores / pass / P·V / rows / total; ratio to {names[0]})")
    for n in names:
        t = T[n] / args.rounds / hz * 1e3
        print(f"  {n:<16} " + " ".join(f"{x:7.2f}" for x in t) + f"  {t.sum():7.2f}"
              f"   scores {T[n][0] / base[0]:.3f}  P·V {T[n][2] / base[2]:.3f}  total {T[n].sum() / base.sum():.3f}")


if __name__ == "__main__":
    main()
