"""Where the float32 backward's time goes *inside the kernel* on the split-AMX route: cycles
per section of each tile, on one thread and on two.

``cpu_profile_backward.py`` and ``f32_split_tile.py`` time a tile's steps alone with their
operands hot; in the kernel each task (a key tile) streams every query tile's Q, dO and their
pieces from L3, and two threads share the L3 and the memory bus.  This runs a copy of
``_cpu_kernels._backward_chunk``'s loop for the split route (float32, no dropout, no score
chain; ``Sᵀ``/``dPᵀ`` split and dV, dK, dQ on MKL, or all five split (``--modes all5``) as
``_cpu_kernels._split_tile``) on ``--threads`` chunks of a prange (``--modes mkl``: all five on MKL at the MKL route's tiles), with a cycle counter
(``llvm.readcyclecounter``) around each section, checks that dK and dV have the kernel's bits,
and prints per section ns a tile (per thread: each thread's own tiles) and GFLOP/s for the
products.  The copy calls the kernel's own helpers: keep its loop in step with
``_backward_chunk`` when that changes.  It keeps the fixed deal of key tiles to threads
(``_snake_chunk`` over the flat task index) that the kernel had until 1 Dec: each thread's
sections over the same tiles, so that a slower core shows as such (the kernel's threads now
take dQ parts from a queue, and a slower core runs fewer of them).

Two modes try prefetching the split route's cold operands (the query tile's pieces: Qᵀ's and
dOᵀ's in depth pairs, Q's and dO's in row pairs, 384 KiB a 128 × 256 tile at D128, streamed from
L3 once per key tile): ``all5pf`` asks the next query tile's pieces into L2 (``prefetcht1``) a
share per 8-row block of the exp and dS passes; ``all5jit`` asks each product's cold B operand
during the product before it.  Neither gained (2 Dec, session 28: docs/performance.md, f32bwd).

    flock /tmp/bench.lock env PYTHONPATH=src .venv/bin/python benchmarks/f32_backward_sections.py d64 [--threads 1,2] [--modes mkl3,all5,all5pf,all5jit]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from dotattn import semantics
from dotattn.kernels import _cpu_amx_f32 as F
from dotattn.kernels import _cpu_kernels as K
from dotattn.kernels import cpu
from dotattn.kernels._cpu_sync import _cycles  # the time-stamp counter, in compiled code

CASES = {"d64": (8, 64, None), "d128": (4, 128, None), "causal": (8, 64, "bottom_right")}
SECTIONS = ("task: split K, V tiles; zero dK, dV", "tile class, Q/dO rows, lse, Δ", "Sᵀ = K·Qᵀ (split)",
            "exp pass P (+ P's pieces)", "dPᵀ = V·dOᵀ (split)", "dV += Pᵀ·dO", "dS pass (+ dS's pieces)",
            "dK += dSᵀ·Q", "dQ += dS·K", "task: write dK, dV")
PRODUCTS = (2, 4, 5, 7, 8)
NS = 12  # sections + tile count + spare


@intrinsic
def _prefetch_t1(typingctx, addr):
    """``prefetcht1`` (into L2) of the line at ``addr``."""

    def codegen(context, builder, signature, args):
        ptr_t = ir.IntType(8).as_pointer()
        fn = builder.module.declare_intrinsic(
            "llvm.prefetch", [ptr_t], ir.FunctionType(ir.VoidType(), [ptr_t, ir.IntType(32), ir.IntType(32), ir.IntType(32)]))
        i32 = ir.IntType(32)
        builder.call(fn, [builder.inttoptr(args[0], ptr_t), ir.Constant(i32, 0), ir.Constant(i32, 2), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(types.int64), codegen


@njit(inline="always")
def _plan_region(plan, r, addr, nrows, row_bytes, stride):
    plan[r, 0], plan[r, 1], plan[r, 2], plan[r, 3] = addr, nrows, row_bytes // 64, stride


@njit
def _plan_query_tile(plan, o, b, h, i0, BQ):
    """The next query tile's pieces (Qᵀ, dOᵀ in depth pairs; Q, dO in row pairs) as regions of
    rows ``(address, rows, lines a row, row stride)``; its total lines in ``plan[8, 0]``."""
    n = 0
    for arr in (o.qpc, o.dopc):
        a = arr[b, h]
        _plan_region(plan, n, a[0, 0, i0:].ctypes.data, 3 * a.shape[1], 4 * BQ, a.strides[1])
        n += 1
    q2 = i0 // 2
    for arr in (o.qrp, o.dorp):
        a = arr[b, h]
        for p in range(3):
            _plan_region(plan, n, a[p, q2].ctypes.data, 1, (BQ // 2) * a.strides[2], 0)
            n += 1
    total = 0
    for r in range(n):
        total += plan[r, 1] * plan[r, 2]
    for r in range(n, 8):
        plan[r, 1] = 0
    plan[8, 0] = total


@njit(inline="always")
def _plan_columns(plan, r, arr, b, h, i0, BQ):
    """Region ``r``: query tile ``i0``'s columns of a head's depth-pair pieces (qpc, dopc)."""
    a = arr[b, h]
    _plan_region(plan, r, a[0, 0, i0:].ctypes.data, 3 * a.shape[1], 4 * BQ, a.strides[1])


@njit(inline="always")
def _plan_pairs(plan, r, arr, b, h, i0, BQ):
    """Regions ``r … r+2``: query tile ``i0``'s row pairs of a head's pieces (qrp, dorp)."""
    a = arr[b, h]
    for p in range(3):
        _plan_region(plan, r + p, a[p, i0 // 2].ctypes.data, 1, (BQ // 2) * a.strides[2], 0)


@njit
def _plan_total(plan, n):
    total = 0
    for r in range(n):
        total += plan[r, 1] * plan[r, 2]
    for r in range(n, 8):
        plan[r, 1] = 0
    plan[8, 0] = total


@njit
def _product_pf(a, m0, b, c, cfg, plan):
    """``F.product_from`` with the plan's lines prefetched (L2), a share after each block."""
    M, N = c.shape
    depth = a.shape[2]
    a_ps, a_ld = a.strides[0], a.strides[1]
    b_ps, b_ld = b.strides[0], b.strides[1]
    c_ld = c.strides[0]
    a0, b0, c0 = a.ctypes.data + m0 * a_ld, b.ctypes.data, c.ctypes.data
    nblk = (M // 32) * (N // 32)
    share = (plan[8, 0] + nblk - 1) // nblk
    F._tile_config(cfg.ctypes.data)
    t = 0
    for i in range(0, M, 32):
        for j in range(0, N, 32):
            F._block(a0, a_ps, a_ld, b0, b_ps, b_ld, i, j, depth)
            F._store_2x2(c0 + i * c_ld + 4 * j, c_ld)
            if share:
                _prefetch_share(plan, t * share, share)
            t += 1
    F._tile_release()


@njit
def _product_add_pf(a, b, c, s, cfg, plan):
    """``F.product_add`` with the plan's lines prefetched (L2), a share after each block."""
    M, N = c.shape
    depth = a.shape[2]
    a_ps, a_ld = a.strides[0], a.strides[1]
    b_ps, b_ld = b.strides[0], b.strides[1]
    c_ld = c.strides[0]
    a0, b0, c0 = a.ctypes.data, b.ctypes.data, c.ctypes.data
    s_base = s.ctypes.data
    nI, nJ = M // 32, N // 32
    share = (plan[8, 0] + nI * nJ - 1) // (nI * nJ)
    F._tile_config(cfg.ctypes.data)
    pend = 0
    pi, pj = -1, -1
    i_outer = M <= N
    for t in range(nI * nJ):
        if i_outer:
            i, j = 32 * (t // nJ), 32 * (t % nJ)
        else:
            i, j = 32 * (t % nI), 32 * (t // nI)
        F._block(a0, a_ps, a_ld, b0, b_ps, b_ld, i, j, depth)
        if pi >= 0:
            F._add_block(c0, c_ld, s_base + pend * 4096, pi, pj)
        pend ^= 1
        F._store_2x2(s_base + pend * 4096, 128)
        pi, pj = i, j
        if share:
            _prefetch_share(plan, t * share, share)
    if pi >= 0:
        F._add_block(c0, c_ld, s_base + pend * 4096, pi, pj)
    F._tile_release()


@njit
def _prefetch_share(plan, first, count):
    """Lines ``first … first + count − 1`` of the plan's regions, in order, prefetched."""
    k = 0
    end = first + count
    for r in range(8):
        lines = plan[r, 1] * plan[r, 2]
        if k + lines <= first:
            k += lines
            continue
        for j in range(max(first - k, 0), min(lines, end - k)):
            row, ln = j // plan[r, 2], j % plan[r, 2]
            _prefetch_t1(plan[r, 0] + row * plan[r, 3] + 64 * ln)
        k += lines
        if k >= end:
            break


@njit(cache=True)
def _chunk(chunk, nchunks, q, kp, vp, dout, lse, delta, dq_parts, dkp, dvp, o, T_, pf):
    B, Hq, Lq, D = q.shape
    Hkv, nkb, BK = kp.shape[1], kp.shape[2], kp.shape[3]
    Dv, BQ, T = vp.shape[4], o.BQ, dkp.dtype
    nqb = (Lq + BQ - 1) // BQ
    group = Hq // Hkv
    c2, inv_keep = K._constants(o, dkp)
    wide = K._short_rows(o.Lq, o.Lk)
    Qs = np.zeros((BQ, D), dtype=q.dtype)
    dOs = np.zeros((BQ, Dv), dtype=dout.dtype)
    Pb = np.empty((BK, BQ), dtype=q.dtype)
    N = np.empty((BK, BQ), dtype=np.int32)
    dK, dV = np.empty((BK, D), dtype=T), np.empty((BK, Dv), dtype=T)
    lse2, dls = np.empty(BQ, dtype=T), np.empty(BQ, dtype=T)
    lo, hi = np.empty(BQ, dtype=np.int64), np.empty(BQ, dtype=np.int64)
    unused = np.empty((BK, BQ), dtype=T)
    no_qv, cfg = np.empty((0, 0), dtype=np.uint32), K.tile_config()
    sa = o.split_all
    pc_rows, pc_cols = (BK, BQ) if sa else (0, 32)
    pc = F.pieces_buffer(pc_rows, pc_cols, np.empty(0, dtype=np.uint16))
    d_pairs = F.pieces_buffer(pc_rows // 2, pc_cols, np.empty(0, dtype=np.uint32))
    scratch = K._aligned_empty(64, 32, dkp)
    KbT = np.empty((D if sa else 0, BK if sa else 0), dtype=T)
    ST, dPT = K._aligned_empty(BK, BQ, dkp), K._aligned_empty(BK, BQ, dkp)
    plan = np.zeros((9, 4), dtype=np.int64)
    threads = K._gemm_threads_begin(q)
    Tc = T_[chunk]
    for t in range(B * Hkv * nkb):
        if K._snake_chunk(t, nchunks) != chunk:
            continue
        c0 = _cycles()
        b, hk, kb = t // (Hkv * nkb), (t // nkb) % Hkv, t % nkb
        Kb, Vb = kp[b, hk, kb], vp[b, hk, kb]
        if o.split_in_task:
            K._split_key_tile(Kb, Vb, KbT, b, hk, kb, o)
        dK[:] = 0.0
        dV[:] = 0.0
        Tc[0] += _cycles() - c0
        for h in range(hk * group, (hk + 1) * group):
            for qb in range(nqb):
                c0 = _cycles()
                cls = K._tile_class(b, h, qb, kb, BK, o)
                if cls == K.SKIP:
                    continue
                i0, nrows, nr = K._rows(b, qb, o)
                if nr == BQ:
                    Qt, dOt = q[b, h, i0 : i0 + BQ], dout[b, h, i0 : i0 + BQ]
                else:
                    K._load_rows(Qs, q, b, h, i0, nr)
                    K._load_rows(dOs, dout, b, h, i0, nr)
                    Qt, dOt = Qs[:, :], dOs[:, :]
                K._lse_rows(lse2, lse, b, h, i0, nr)
                for r in range(BQ):
                    dls[r] = delta[b, h, i0 + r] if r < nr else 0.0
                c1 = _cycles()
                Tc[1] += c1 - c0
                K._scores(ST, Qt, no_qv, Kb, cls, b, h, qb, kb, kb * BK, o, lo, hi, unused, unused, False, cfg, False)
                c2_ = _cycles()
                Tc[2] += c2_ - c1
                Tc[10] += 1
                if sa and pf == 2:  # each product prefetches the next product's cold B operand
                    hn, qn = (h, qb + 1) if qb + 1 < nqb else (h + 1, 0)
                    next_ok = hn < (hk + 1) * group
                    q2 = i0 // 2
                    # (Sᵀ already done above, on F.product; its prefetch of dOᵀ's pieces is
                    # issued by the exp pass's first block instead: here, before the pass)
                    _plan_columns(plan, 0, o.dopc, b, h, i0, BQ)
                    _plan_total(plan, 1)
                    _prefetch_share(plan, 0, plan[8, 0])
                    for r0 in range(0, BK, 8):
                        K._exp2_shifted(ST[r0 : r0 + 8], N[r0 : r0 + 8], c2, lse2)
                        F.split_block_rows(ST, pc, r0, r0 + 8)
                    c3 = _cycles()
                    Tc[3] += c3 - c2_
                    _plan_pairs(plan, 0, o.dorp, b, h, i0, BQ)
                    _plan_total(plan, 3)
                    _product_pf(o.vpc[b, hk, kb], 0, o.dopc[b, h, :, :, i0 : i0 + BQ], dPT, cfg, plan)
                    c4 = _cycles()
                    Tc[4] += c4 - c3
                    _plan_pairs(plan, 0, o.qrp, b, h, i0, BQ)
                    _plan_total(plan, 3)
                    _product_add_pf(pc, o.dorp[b, h, :, q2 : q2 + BQ // 2], dV, scratch, cfg, plan)
                    c5 = _cycles()
                    Tc[5] += c5 - c4
                    for r0 in range(0, BK, 8):
                        K._ds_block(ST[r0 : r0 + 8], dPT[r0 : r0 + 8], dls)
                        F.split_block_rows_pairs(ST, pc, d_pairs, r0, r0 + 8)
                    c6 = _cycles()
                    Tc[6] += c6 - c5
                    plan[8, 0] = 0
                    if next_ok:
                        _plan_columns(plan, 0, o.qpc, b, hn, qn * BQ, BQ)
                        _plan_total(plan, 1)
                    _product_add_pf(pc, o.qrp[b, h, :, q2 : q2 + BQ // 2], dK, scratch, cfg, plan)
                    c7 = _cycles()
                    Tc[7] += c7 - c6
                    plan[8, 0] = 0
                    F.product_add(o.ktp[b, hk, kb], d_pairs, dq_parts[chunk, b, h, :, i0 : i0 + BQ], scratch, cfg)
                    Tc[8] += _cycles() - c7
                    continue
                if sa:
                    share = 0
                    if pf:  # the next query tile of this head (or the next head's first)
                        hn, qn = (h, qb + 1) if qb + 1 < nqb else (h + 1, 0)
                        plan[8, 0] = 0
                        if hn < (hk + 1) * group:
                            _plan_query_tile(plan, o, b, hn, qn * BQ, BQ)
                        share = (plan[8, 0] + 2 * (BK // 8) - 1) // (2 * (BK // 8))
                    for r0 in range(0, BK, 8):
                        K._exp2_shifted(ST[r0 : r0 + 8], N[r0 : r0 + 8], c2, lse2)
                        F.split_block_rows(ST, pc, r0, r0 + 8)
                        if share:
                            _prefetch_share(plan, (r0 // 8) * share, share)
                    c3 = _cycles()
                    Tc[3] += c3 - c2_
                    K._split_product(o.vpc, o.dopc, dPT, b, h, kb, i0, cfg)
                    c4 = _cycles()
                    Tc[4] += c4 - c3
                    q2 = i0 // 2
                    F.product_add(pc, o.dorp[b, h, :, q2 : q2 + BQ // 2], dV, scratch, cfg)
                    c5 = _cycles()
                    Tc[5] += c5 - c4
                    for r0 in range(0, BK, 8):
                        K._ds_block(ST[r0 : r0 + 8], dPT[r0 : r0 + 8], dls)
                        F.split_block_rows_pairs(ST, pc, d_pairs, r0, r0 + 8)
                        if share:
                            _prefetch_share(plan, (BK // 8 + r0 // 8) * share, share)
                    c6 = _cycles()
                    Tc[6] += c6 - c5
                    F.product_add(pc, o.qrp[b, h, :, q2 : q2 + BQ // 2], dK, scratch, cfg)
                    c7 = _cycles()
                    Tc[7] += c7 - c6
                    F.product_add(o.ktp[b, hk, kb], d_pairs, dq_parts[chunk, b, h, :, i0 : i0 + BQ], scratch, cfg)
                    Tc[8] += _cycles() - c7
                    continue
                # the MKL route (--modes mkl), as _backward_chunk runs float32 without dropout
                K._exp2_operand(ST, N, c2, lse2, Pb, True)
                c3 = _cycles()
                Tc[3] += c3 - c2_
                K._qk(Vb, dOt, no_qv, dPT, False, cfg, wide)
                c4 = _cycles()
                Tc[4] += c4 - c3
                K._gemm(ST, dOt, dV, 1.0)
                c5 = _cycles()
                Tc[5] += c5 - c4
                K._ds_block(ST, dPT, dls)
                c6 = _cycles()
                Tc[6] += c6 - c5
                K._gemm(ST, Qt, dK, 1.0)
                c7 = _cycles()
                Tc[7] += c7 - c6
                K._gemm(ST.T[:nr], Kb, dq_parts[chunk, b, h, i0 : i0 + nr], 1.0)
                Tc[8] += _cycles() - c7
        c0 = _cycles()
        dkp[b, hk, kb] = dK * o.scale
        dvp[b, hk, kb] = dV
        Tc[9] += _cycles() - c0
    K._gemm_threads_end(q, threads)


@njit(parallel=True, cache=True)
def _kernel(q, kp, vp, dout, lse, delta, dq_parts, dkp, dvp, o, T_, nchunks, pf):
    for chunk in prange(nchunks):
        _chunk(chunk, nchunks, q, kp, vp, dout, lse, delta, dq_parts, dkp, dvp, o, T_, pf)


def _largest(p, dout):
    """The largest magnitudes of q and dO (real rows) and of K and V (packed): the range check's
    inputs, as ``cpu.backward`` took them before its one query-side pass."""
    from dotattn.kernels._cpu_amx_f32 import largest

    o = p.options
    return {"q": largest(p.q, o.q_lens), "k": cpu._largest_tiles(p.kp), "v": cpu._largest_tiles(p.vp),
            "dout": largest(dout, o.q_lens)}


def _prepared(call, out, lse, dout):
    """``cpu.backward``'s set-up for the split route (the arrays its kernel takes)."""
    p = cpu.prepare(call, cpu.F32_SPLIT_BACKWARD_BLOCK_SIZE, split=True)
    tops = _largest(p, dout)
    lse_c = np.ascontiguousarray(lse, dtype=np.float32)
    delta = np.einsum("bhld,bhld->bhl", dout, out, dtype=np.float32)
    fix = cpu.lse_rounding_fix(lse_c)
    dout_k = np.multiply(dout, fix.astype(np.float32)[..., None])
    delta = np.ascontiguousarray((delta * fix).astype(np.float32))
    p = cpu._with_split_operands(p, call, dout_k, tops)
    return p, dout_k, lse_c, delta


def _prepared_mkl(call, out, lse, dout):
    """``cpu.backward``'s set-up for the MKL route (float32 tiles on MKL's sgemm)."""
    p = cpu.prepare(call, cpu.DEFAULT_BACKWARD_BLOCK_SIZE, split=False)
    lse_c = np.ascontiguousarray(lse, dtype=np.float32)
    delta = np.einsum("bhld,bhld->bhl", dout, out, dtype=np.float32)
    fix = cpu.lse_rounding_fix(lse_c)
    dout_k = np.multiply(dout, fix.astype(np.float32)[..., None])
    delta = np.ascontiguousarray((delta * fix).astype(np.float32))
    return p, dout_k, lse_c, delta


_ROUTE = {"mkl": "mkl", "mkl3": "amx", "all5": "amx5", "all5pf": "amx5", "all5jit": "amx5"}
_PF = {"all5pf": 1, "all5jit": 2}


def _config(call, out, lse, do, mode, nch):
    all5 = mode.startswith("all5")
    os.environ["DOTATTN_F32_PRODUCTS"] = _ROUTE[mode]
    if mode == "mkl":
        p, dout_k, lse_c, delta = _prepared_mkl(call, out, lse, do)
        assert not (p.options.split_s or p.options.split_dp or p.options.split_all), "not the MKL route here"
    else:
        p, dout_k, lse_c, delta = _prepared(call, out, lse, do)
        assert p.options.split_s and p.options.split_dp and p.options.split_all == all5, "not the split route here"
    o = p.options
    B, Hq, Lq, D = call.q.shape

    def fresh():
        if o.split_all:
            nq = -(-Lq // o.BQ) * o.BQ
            dq_parts = np.zeros((nch, B, Hq, o.qrp.shape[4], nq + 16), dtype=np.float32)
        else:
            dq_parts = np.zeros((nch, B, Hq, Lq, D), dtype=np.float32)
        return dq_parts, np.zeros(p.kp.shape[:4] + (D,), np.float32), np.zeros(p.vp.shape[:4] + (call.Dv,), np.float32)

    return p, (p.q, p.kp, p.vp, dout_k, lse_c, delta), fresh


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("case", choices=sorted(CASES), nargs="?", default="d64")
    parser.add_argument("--threads", default="1,2", help="thread counts (chunks), comma-separated")
    parser.add_argument("--modes", default="mkl3,all5", help="mkl: all five on MKL's sgemm at the MKL route's tiles; mkl3: Sᵀ, dPᵀ split, dV, dK, dQ on MKL; all5: all five split; all5pf, all5jit: all five with prefetches (see above)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    H, D, causal = CASES[args.case]
    rng = np.random.default_rng(0)
    q, k, v, do = (rng.standard_normal((1, H, 4096, D), dtype=np.float32) for _ in range(4))
    call = semantics.normalize(q, k, v, causal=causal)
    out, lse = cpu.forward(call)[:2]
    from dotattn.kernels._blas import ONE_BLAS_THREAD

    configs = {}
    for mode in args.modes.split(","):
        for nch in (int(n) for n in args.threads.split(",")):
            p, args_, fresh = _config(call, out, lse, do, mode, nch)
            T_ = np.zeros((nch, NS), np.int64)
            dq_parts, dkp, dvp = fresh()
            with ONE_BLAS_THREAD:
                _kernel(*args_, dq_parts, dkp, dvp, p.options, T_, nch, _PF.get(mode, 0))  # compile, warm
            os.environ["DOTATTN_F32_PRODUCTS"] = _ROUTE[mode]
            _, dk_ref, dv_ref, _ = cpu.backward(call, out, lse, do)  # the kernel's bits
            nkbBK = dkp.shape[2] * dkp.shape[3]
            assert np.array_equal(dkp.reshape(1, H, nkbBK, D)[:, :, :4096], dk_ref), "dK differs from the kernel's: update the loop"
            assert np.array_equal(dvp.reshape(1, H, nkbBK, D)[:, :, :4096], dv_ref), "dV differs from the kernel's"
            T_[:] = 0
            configs[(mode, nch)] = (p, args_, fresh, T_, [])
    load0 = os.getloadavg()[0]
    with ONE_BLAS_THREAD:
        for _ in range(args.rounds):
            for (mode, nch), (p, args_, fresh, T_, walls) in configs.items():
                dq_parts, dkp, dvp = fresh()
                t0 = time.perf_counter()
                _kernel(*args_, dq_parts, dkp, dvp, p.options, T_, nch, _PF.get(mode, 0))
                walls.append(time.perf_counter() - t0)
    load1 = os.getloadavg()[0]
    c0, t0 = _cycles_now(), time.perf_counter()
    time.sleep(0.2)
    hz = (_cycles_now() - c0) / (time.perf_counter() - t0)
    print(f"{args.case} (H{H} L4096 D{D}{' causal' if causal else ''}), configs alternated, {args.rounds} rounds, "
          f"load {load0:.2f} → {load1:.2f}, counter {hz / 1e9:.2f} GHz")
    for (mode, nch), (p, args_, fresh, T_, walls) in configs.items():
        o = p.options
        wall = statistics.median(walls)
        print(f"\n{mode}, BQ {o.BQ} × BK {p.kp.shape[3]}, {nch} thread(s): kernel median {wall * 1e3:.1f} ms "
              f"(min {min(walls) * 1e3:.1f})")
        flop = 2.0 * o.BQ * p.kp.shape[3] * D
        for c in range(nch):
            tiles = T_[c, 10] / args.rounds
            tot = T_[c, :10].sum() / args.rounds / hz
            print(f"  thread {c}: {tiles:.0f} tiles, {tot * 1e3:.1f} ms in sections")
        tiles = T_[:, 10].sum()
        allc = T_[:, :10].sum()
        print(f"  {'section':<40} {'ns/tile':>9} {'share':>6} {'GFLOP/s':>8}")
        for s, name in enumerate(SECTIONS):
            ns = T_[:, s].sum() / tiles / hz * 1e9
            gf = f"{flop / ns:8.1f}" if s in PRODUCTS else ""
            print(f"  {name:<40} {ns:9.0f} {T_[:, s].sum() / allc:6.1%} {gf}")
        print(f"  {'tile, all sections':<40} {allc / tiles / hz * 1e9:9.0f}")


@njit
def _now():
    return _cycles()


def _cycles_now():
    return _now()


if __name__ == "__main__":
    main()
