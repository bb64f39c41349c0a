"""Where the cpu forward's time goes: each step of one tile, timed alone, times the tile count.

One thread, one ``BQ × BK`` tile (default 256 × 256, D = 64), each step of the kernel's
inner loop compiled as its own loop of ``--repeats`` runs: the two GEMMs, the running max
and rescale, the exponent, the row sum; for bfloat16 the tile max and the one pass that
exponentiates, sums and rounds P into the GEMM operand (the passes it replaced — the
running max on 256-bit vectors, the float32 path's exp2 + row sum, the rounding of P — are
printed in parentheses, outside the sum); for float32, in parentheses, the one pass of the
lazy step (exp2 + row sum + tile max), which replaces max, exp2 and sum after a row's first
tile, and the exp2 + row sum pass of the exact step.  Multiplied by
the tiles of the dense H8 L4096 forward (8 · 16 · 16 = 2,048) and divided by the thread
count (2 here) this predicts the kernel's time; the difference to the measured forward
(also printed) is what the steps alone do not show (packing, thread imbalance, the task loop).

    .venv/bin/python benchmarks/cpu_profile.py [--dtype float32|bfloat16] [--D 64]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from numba import njit

from dotattn.kernels import _cpu_amx
from dotattn.kernels import _cpu_primitives as P
from dotattn.kernels import cpu
from dotattn.kernels._blas import ONE_BLAS_THREAD


def _steps():
    @njit
    def qk(Kb, Qs, ST, n):
        threads = P._gemm_threads_begin(Kb)  # MKL on the calling thread only, as in the kernels
        for _ in range(n):
            P._gemm(Kb, Qs.T, ST, 0.0)
        P._gemm_threads_end(Kb, threads)

    @njit
    def max_rescale(ST, m, bmax, row_sum, acc, c2, n):
        for _ in range(n):
            P._col_max(ST, bmax)
            for r in range(m.shape[0]):
                m_new = max(m[r], bmax[r] * c2)
                alpha = np.float32(1.0)
                m[r] = m_new
                row_sum[r] *= alpha
                acc_row = acc[r]
                for d in range(acc_row.shape[0]):
                    acc_row[d] *= alpha

    @njit
    def exp(ST, S0, N, c2, m, n):
        for _ in range(n):
            ST[:] = S0
            P._exp2_shifted(ST, N, c2, m)

    @njit
    def copy_only(ST, S0, n):
        for _ in range(n):
            ST[:] = S0

    @njit
    def rowsum(ST, row_sum, n):
        for _ in range(n):
            P._col_sum_into(ST, row_sum)

    @njit
    def round_p(ST, Pb, n):
        for _ in range(n):
            P._as_operand(ST, Pb)

    @njit
    def exp_sum(ST, S0, N, c2, m, row_sum, n):  # the float32 path's exp2 + row sum, one pass
        for _ in range(n):
            ST[:] = S0
            P._exp2_shifted_sum(ST, N, c2, m, row_sum, P._NO_PREFETCH)

    @njit
    def exp_sum_max(ST, S0, c2, m, tsum, bmax, n):  # the float32 forward's lazy step: exp2 + sum + tile max
        for _ in range(n):
            ST[:] = S0
            P._exp2_sum_max_f32(ST, c2, m, tsum, bmax)

    @njit
    def max_bf16(ST, bmax, Pb, n):  # the bfloat16 path's tile max (512-bit vectors)
        for _ in range(n):
            P._tile_max(ST, bmax, Pb)

    @njit
    def fused_bf16(ST, Pb, c2, m, row_sum, n):  # exp2 + row sum + rounding into the operand, one pass
        for _ in range(n):
            P._exp2_sum_bf16(ST, Pb, c2, m, row_sum)

    @njit
    def pv(Pm, Vb, acc, n):
        threads = P._gemm_threads_begin(Vb)
        for _ in range(n):
            P._gemm(Pm.T, Vb, acc, 1.0)
        P._gemm_threads_end(Vb, threads)

    @njit
    def fused_pairs(ST, Pb, c2, m, row_sum, n):  # the same pass writing P in key pairs (the AMX operand)
        for _ in range(n):
            P._exp2_sum_bf16_pairs(ST, Pb, c2, m, row_sum)

    @njit
    def qk_amx(Kb, Qs, Qv, ST, n):  # the Q tile packed once (as the kernel does per query tile)
        cfg = _cpu_amx.tile_config()
        _cpu_amx.pack_q(Qs, Qv)
        for _ in range(n):
            P._qk(Kb, Qs, Qv, ST, True, cfg, False)

    @njit
    def pv_amx(Pb, Vb, acc, n):  # Vb: a transposed-in-memory view, acc: an F-ordered view (accᵀ)
        cfg = _cpu_amx.tile_config()
        for _ in range(n):
            P._pv(Pb, Vb, acc, True, cfg)

    @njit
    def lazy_pairs(ST, Pb, c2, m, tsum, bmax, n):  # the lazy step: exp2 + sum + tile max + rounding, one pass
        for _ in range(n):
            P._exp2_sum_max_bf16(ST, Pb, c2, m, tsum, bmax, True)

    return (lazy_pairs, qk, max_rescale, exp, copy_only, rowsum, round_p, pv, max_bf16, fused_bf16, exp_sum, exp_sum_max,
            fused_pairs, qk_amx, pv_amx)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--D", type=int, default=64)
    parser.add_argument("--BQ", type=int, default=256)
    parser.add_argument("--BK", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    BQ, BK, D, n = args.BQ, args.BK, args.D, args.repeats
    bf16 = args.dtype == "bfloat16"
    print("float32 tiles:", cpu.f32_gemm_path()[1])  # binds the sgemm the steps call
    if bf16 and not cpu.bf16_path()[0]:
        raise SystemExit(f"no bfloat16 path here: {cpu.bf16_path()[1]}")
    rng = np.random.default_rng(0)
    S = np.uint16 if bf16 else np.float32

    def operand(*shape):
        x = rng.standard_normal(shape, dtype=np.float32)
        return (x.view(np.uint32) >> 16).astype(np.uint16) if bf16 else x

    Qs, Kb, Vb = operand(BQ, D), operand(BK, D), operand(BK, D)
    ST = np.empty((BK, BQ), np.float32)
    S0 = rng.standard_normal((BK, BQ), dtype=np.float32) - 4
    N = np.empty((BK, BQ), np.int32)
    Pb = np.empty((BK, BQ), S)
    m = np.zeros(BQ, np.float32)
    bmax = np.empty(BQ, np.float32)
    tsum = np.empty(BQ, np.float32)
    row_sum = np.ones(BQ, np.float32)
    acc = np.zeros((BQ, D), np.float32)
    c2 = np.float32(0.18)
    (lazy_pairs, qk, max_rescale, exp, copy_only, rowsum, round_p, pv, max_bf16, fused_bf16, exp_sum, exp_sum_max,
     fused_pairs, qk_amx, pv_amx) = _steps()
    Pm = Pb if bf16 else ST
    steps = {
        "S = K·Qᵀ (GEMM)": lambda k: qk(Kb, Qs, ST, k),
        "running max + rescale": lambda k: max_rescale(S0, m, bmax, row_sum, acc, c2, k),
        "exp2 (poly + exponent add)": lambda k: (exp(ST, S0, N, c2, m, k), copy_only(ST, S0, k)),
        "row sum": lambda k: rowsum(S0, row_sum, k),
        "P → bfloat16": lambda k: round_p(S0, Pb, k),
        "acc += P·V (GEMM)": lambda k: pv(Pm, Vb, acc, k),
    }
    if not bf16:
        del steps["P → bfloat16"]
        # the forward's lazy step (after a row's first tile): replaces the max, exp2 and sum above
        steps["(lazy: exp2+sum+max, one pass)"] = lambda k: (
            exp_sum_max(ST, S0, c2, m, tsum, bmax, k),
            copy_only(ST, S0, k),
        )
        steps["(exp2+sum, one pass)"] = lambda k: (exp_sum(ST, S0, N, c2, m, row_sum, k), copy_only(ST, S0, k))
    elif cpu.amx_path()[0]:  # what the bfloat16 forward runs on AMX (MKL's route in parentheses)
        al = lambda r, c, dt: P._aligned_empty(r, c, np.empty(0, dt))  # noqa: E731 (64-byte aligned, as the kernel's)
        Qa, Ka, STa, Pa = al(BQ, D, np.uint16), al(BK, D, np.uint16), al(BK, BQ, np.float32), al(BK, BQ, np.uint16)
        Qa[:], Ka[:] = Qs, Kb
        Qv, VT, accT = al(D // 2, BQ, np.uint32), al(D, BK, np.uint16), al(D, BQ, np.float32)
        VT[:], accT[:] = Vb.T, 0
        steps = {
            "S = K·Qᵀ (AMX, ours)": lambda k: qk_amx(Ka, Qa, Qv, STa, k),
            "tile max (512-bit)": lambda k: max_bf16(S0, bmax, Pb, k),
            "exp2+sum+round into key pairs": lambda k: fused_pairs(S0, Pa, c2, m, row_sum, k),
            "acc += P·V (AMX, ours)": lambda k: pv_amx(Pa, VT.T, accT.T, k),
            "(the lazy step instead: row sums checked)": lambda k: lazy_pairs(S0, Pa, c2, m, tsum, bmax, k),
            "(MKL: S = K·Qᵀ)": steps["S = K·Qᵀ (GEMM)"],
            "(MKL: exp2+sum+round, plain)": lambda k: fused_bf16(S0, Pb, c2, m, row_sum, k),
            "(MKL: acc += P·V)": steps["acc += P·V (GEMM)"],
        }
    else:  # what the bfloat16 forward runs (the separate passes above: its fallback, with dropout)
        steps = {
            "S = K·Qᵀ (GEMM)": steps["S = K·Qᵀ (GEMM)"],
            "tile max (512-bit)": lambda k: max_bf16(S0, bmax, Pb, k),
            "exp2+sum+round, one pass": lambda k: fused_bf16(S0, Pb, c2, m, row_sum, k),
            "acc += P·V (GEMM)": steps["acc += P·V (GEMM)"],
            "(before: running max + rescale)": steps["running max + rescale"],
            "(before: exp2 (+ row sum))": lambda k: (exp_sum(ST, S0, N, c2, m, row_sum, k), copy_only(ST, S0, k)),
            "(before: P → bfloat16)": steps["P → bfloat16"],
        }
    with ONE_BLAS_THREAD:
        results = {}
        for name, fn in steps.items():
            fn(1)  # compile
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                out = fn(n)
                times.append(time.perf_counter() - t0)
            per = statistics.median(times) / n
            if name.startswith(("exp2 (", "(before: exp2", "(lazy", "(exp2")):  # subtract the copy of S0 into ST the loop needs
                t0 = time.perf_counter()
                copy_only(ST, S0, n)
                per -= (time.perf_counter() - t0) / n
            results[name] = per
    tiles = 8 * (4096 // BQ) * (4096 // BK)
    total = sum(v for k, v in results.items() if not k.startswith("("))
    print(f"one {BQ}×{BK} tile, D={D}, {args.dtype}, 1 thread (median of 5 × {n}):")
    for name, per in results.items():
        print(f"  {name:<34} {per * 1e6:8.1f} µs  {per / total:6.1%}")
    flop = 4 * BQ * BK * D
    print(f"  {'sum':<28} {total * 1e6:8.1f} µs  → {flop / total / 1e9:.1f} GFLOP/s per thread")
    print(f"dense H8 L4096 forward: {tiles} tiles → {tiles * total / 2 * 1e3:.0f} ms predicted on 2 threads")


if __name__ == "__main__":
    main()
