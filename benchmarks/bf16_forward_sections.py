"""Where the bfloat16 forward's time goes *inside the kernel*: cycles per section, one thread.

``cpu_profile.py`` times each step of one tile alone, with its operands hot; in the kernel
the K/V tiles stream from L2/L3 and the tile buffers share L1, and per query tile there is
work no tile step shows (loading and packing Q, zeroing the accumulator, writing the rows).
This runs a copy of ``_cpu_kernels._forward_chunk``'s loop (the AMX path, no dropout, no
score chain) on one thread with a cycle counter (``llvm.readcyclecounter``) around each
section, checks that its output has the kernel's bits, and prints each section's share of
the median wall time.  The copy calls the kernel's own helpers: keep its loop in step with
``_forward_chunk`` when that changes.

    PYTHONPATH=src .venv/bin/python benchmarks/bf16_forward_sections.py d128 [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
from numba import njit

from dotattn import semantics
from dotattn.kernels import _cpu_kernels as K
from dotattn.kernels import cpu
from dotattn.kernels._cpu_sync import _cycles  # the time-stamp counter, in compiled code
from dotattn.kernels._cpu_primitives import _aligned_empty, _tile_buffer
from dotattn.semantics import BFLOAT16

CASES = {"d64": (8, 64, None), "d128": (4, 128, None), "causal": (8, 64, True), "causal128": (4, 128, True)}
SECTIONS = ("per query tile: load, pack Q, zero acc", "tile class", "scores (+ masks)", "lazy check + plan",
            "lazy step", "exact step", "P·V", "output rows")


@njit
def _chunk(q, kp, vp, out, lse, o, T_, zero_first):  # _cpu_kernels._forward_chunk, one thread, sections timed
    B, Hq, Lq, D = q.shape
    Hkv, nkb, BK = kp.shape[1], kp.shape[2], kp.shape[3]
    Dv, BQ, T = vp.shape[4], o.BQ, lse.dtype
    nqb = (Lq + BQ - 1) // BQ
    c2, inv_keep = K._constants(o, lse)
    Qs = _aligned_empty(BQ, D, q)
    Qs[:] = 0
    Qv = _tile_buffer(D // 2 if o.amx else 0, BQ, np.empty(0, dtype=np.uint32), q)
    cfg = K.tile_config()
    ST = _tile_buffer(BK, BQ, lse, q)
    Pb = _tile_buffer(BK, BQ, q, q)
    N = np.empty((BK, BQ), dtype=np.int32)
    unused = np.empty((BK, BQ), dtype=T)
    acc = K._new_acc(BQ, Dv, lse, q)
    m, m_use = np.empty(BQ, dtype=T), np.empty(BQ, dtype=T)
    bmax, row_sum = np.empty(BQ, dtype=T), np.empty(BQ, dtype=T)
    tsum = np.empty(BQ, dtype=T)
    lo, hi = np.empty(BQ, dtype=np.int64), np.empty(BQ, dtype=np.int64)
    plan = np.zeros(4, dtype=np.int64)
    no_plan = np.zeros(4, dtype=np.int64)
    prefetch = K._prefetch_kv(kp, vp)
    for t in range(B * Hq * nqb):
        b, h, qb = K._forward_task(t, B, Hq, nqb, q)
        hk = h // (Hq // Hkv)
        i0, nrows, nr = K._rows(b, qb, o)
        c0 = _cycles()
        K._load_q(Qs, Qv, q, b, h, i0, nr, o.amx)
        m[:] = -np.inf
        row_sum[:] = 0.0
        fresh = K._fresh_acc(acc, o.amx) and not zero_first  # (zero_first: the loop before 2 Dec 07:50)
        if not fresh:
            K._zero(acc)
        c1 = _cycles()
        T_[0] += c1 - c0
        for kb in range(nkb):
            c0 = _cycles()
            cls = K._tile_class(b, h, qb, kb, BK, o)
            if cls == K.SKIP:
                continue
            c1 = _cycles()
            T_[1] += c1 - c0
            K._scores(ST, Qs, Qv, kp[b, hk, kb], cls, b, h, qb, kb, o, lo, hi, unused, unused, False, cfg, o.amx)
            c2_ = _cycles()
            T_[2] += c2_ - c1
            lazy = K._lazy_ok(m, Pb, o.dropout_p == 0.0)
            if prefetch:
                K._plan_next_tiles(plan, kp, vp, b, hk, kb)
            c3 = _cycles()
            T_[3] += c3 - c2_
            if lazy and K._lazy_softmax(ST, c2, m, bmax, tsum, row_sum, Pb, o.amx, plan):
                c4 = _cycles()
                T_[4] += c4 - c3
                T_[8] += 1
            else:
                # (zero_first: the loop before 2 Dec 07:50, whose exact step prefetched nothing)
                K._online_softmax(ST, N, c2, m, m_use, bmax, row_sum, acc, Pb, True, o.amx, no_plan if zero_first else plan)
                c4 = _cycles()
                T_[5] += c4 - c3
                T_[9] += 1
            K._pv(Pb, vp[b, hk, kb], acc, o.amx, cfg, fresh)
            fresh = False
            T_[6] += _cycles() - c4
        c0 = _cycles()
        if fresh:
            K._zero(acc)
        K._store_rows(out, lse, acc, m, row_sum, tsum, b, h, i0, nrows, nr, o.amx)
        T_[7] += _cycles() - c0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("case", choices=sorted(CASES), nargs="?", default="d128")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ab", action="store_true", help="alternate the loop as before 2 Dec 07:50 (the accumulator "
                        "zeroed per query tile, the exact step prefetching nothing) and the kernel's (the first P·V from "
                        "tile zeros, the exact step prefetching the next K/V tiles), random order per round")
    args = parser.parse_args()
    H, D, causal = CASES[args.case]
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, H, 4096, D), dtype=np.float32).astype(BFLOAT16) for _ in range(3))
    call = semantics.normalize(q, k, v, causal=causal)
    p = cpu.prepare(call, None, forward=True)
    if not p.options.amx:
        raise SystemExit(f"no AMX path here: {cpu.amx_path()[1]}")
    out = np.empty((1, H, 4096, D), dtype=np.uint16)
    lse = np.empty((1, H, 4096), np.float32)
    T_ = np.zeros(10, np.int64)
    _chunk(p.q, p.kp, p.vp, out, lse, p.options, T_, False)  # compile, warm
    kernel_out = cpu._run_forward(call, p, False, True)[0].view(np.uint16)
    assert np.array_equal(kernel_out, out), "the copy's output differs from the kernel's: update its loop"
    if args.ab:
        _chunk(p.q, p.kp, p.vp, out, lse, p.options, T_, True)
        assert np.array_equal(kernel_out, out), "the zeroing loop's output differs"
        times = {False: [], True: []}
        rng2 = np.random.default_rng()
        for _ in range(args.rounds):
            for z in rng2.permutation([False, True]):
                t0 = time.perf_counter()
                _chunk(p.q, p.kp, p.vp, out, lse, p.options, T_, bool(z))
                times[bool(z)].append(time.perf_counter() - t0)
        new, old = np.array(times[False]), np.array(times[True])
        print(f"{args.case}, one thread, load {os.getloadavg()[0]:.2f}, {args.rounds} rounds: zeroed {np.median(old) * 1e3:.2f} ms, "
              f"fresh {np.median(new) * 1e3:.2f} ms; ratio of medians {np.median(new) / np.median(old):.4f}, "
              f"median of round ratios {np.median(new / old):.4f}")
        return
    T_[:] = 0
    walls = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        _chunk(p.q, p.kp, p.vp, out, lse, p.options, T_, False)
        walls.append(time.perf_counter() - t0)
    wall = statistics.median(walls)
    per_round = T_[:8] / args.rounds
    hz = per_round.sum() / wall  # cycles of the counter per second, from the median round
    print(f"{args.case} (H{H} L4096 D{D}{' causal' if causal else ''}), one thread, load {os.getloadavg()[0]:.2f}: "
          f"median {wall * 1e3:.1f} ms of {args.rounds} rounds")
    for name, c in zip(SECTIONS, per_round):
        print(f"  {name:<40} {c / hz * 1e3:7.2f} ms  {c / per_round.sum():6.1%}")
    lazy, exact = T_[8] // args.rounds, T_[9] // args.rounds
    print(f"  tiles: {lazy} lazy ({T_[4] / max(T_[8], 1) / hz * 1e6:.2f} µs each), "
          f"{exact} exact ({T_[5] / max(T_[9], 1) / hz * 1e6:.2f} µs each)")


if __name__ == "__main__":
    main()
