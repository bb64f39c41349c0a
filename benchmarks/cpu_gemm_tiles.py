"""Tile GEMMs of the cpu kernels, one thread: OpenBLAS (NumPy's dot, SciPy's sgemm) against MKL's sgemm.

The float32 kernels multiply tiles through a Fortran ``sgemm`` bound at run time (MKL's from
torch's ``libtorch_cpu.so``, else SciPy's OpenBLAS: ``kernels/_cpu_isa.py``).  This times
each tile product of the forward and backward, alternating the routes round by round in one
process (medians), on the calling thread only (OpenBLAS limited to one thread, MKL pinned with
``MKL_Set_Num_Threads_Local(1)``, as inside the kernels):

* ``numpy dot``: Numba's ``np.dot`` (OpenBLAS), then an add pass where the kernel accumulates
  (what the kernels did before);
* ``openblas``: SciPy's OpenBLAS ``sgemm`` with ``beta = 1`` (accumulates in place);
* ``mkl``: MKL's ``sgemm_`` with ``beta = 1``.

With ``--bf16`` it times the bfloat16 tile products instead: MKL's ``cblas_gemm_bf16bf16f32``
as the kernels call it against ``torch.matmul`` on bfloat16 tensors (one torch thread), the
same shapes — whether MKL reaches the AMX/``avx512_bf16`` rate torch's own GEMM does.

    .venv/bin/python benchmarks/cpu_gemm_tiles.py [--rounds 7] [--repeats 200] [--bf16]
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time

import llvmlite.binding as ll
import numpy as np
from numba import njit, types

from dotattn.kernels import _cpu_isa
from dotattn.kernels import _cpu_primitives as P
from dotattn.kernels._blas import ONE_BLAS_THREAD

_i64 = types.int64


def _route(symbol):
    sgemm = types.ExternalFunction(symbol, types.void(*([_i64] * 13)))

    @njit
    def gemm(a, b, c, beta):
        ta, lda = P._blas_layout(a)
        tb, ldb = P._blas_layout(b)
        M, K = a.shape
        N = b.shape[1]
        args = np.empty(8, dtype=np.int32)
        args[0] = 78 if tb == P.NO_TRANS else 84
        args[1] = 78 if ta == P.NO_TRANS else 84
        args[2], args[3], args[4] = N, M, K
        args[5], args[6], args[7] = ldb, lda, max(c.strides[0] // 4, N, 1)
        scalars = np.empty(2, dtype=np.float32)
        scalars[0], scalars[1] = 1.0, beta
        p, s = args.ctypes.data, scalars.ctypes.data
        sgemm(p, p + 4, p + 8, p + 12, p + 16, s, b.ctypes.data, p + 20, a.ctypes.data, p + 24, s + 4, c.ctypes.data, p + 28)
        return args[0] + scalars[0]

    @njit
    def loop(a, b, c, beta, n):
        threads = P._gemm_threads_begin(a)
        for _ in range(n):
            gemm(a, b, c, beta)
        P._gemm_threads_end(a, threads)

    return loop


@njit
def _numpy_loop(a, b, c, scratch, accumulate, n):
    for _ in range(n):
        if accumulate:
            P._np_matmul(a, b, scratch)
            P._add_into(c, scratch)
        else:
            P._np_matmul(a, b, c)


@njit
def _bf16_loop(a, b, c, beta, n):
    threads = P._gemm_threads_begin(a)
    for _ in range(n):
        P._gemm_bf16(a, b, c, beta)
    P._gemm_threads_end(a, threads)


def bf16_main(args) -> None:
    import torch

    ok, what = _cpu_isa.bf16_gemm()
    if not ok:
        raise SystemExit(what)
    torch.set_num_threads(1)
    print(f"bfloat16 tiles: {what}; torch {torch.__version__}, 1 thread")
    rng = np.random.default_rng(0)

    def bf(*shape):  # bfloat16 bits of normal samples, as uint16
        return (rng.standard_normal(shape, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)

    shapes = [  # (name, M, N, K): the forward's and backward's products
        ("fwd D64 S=K·Qᵀ", 256, 256, 64), ("fwd D64 acc+=Pᵀ·V", 256, 64, 256),
        ("fwd D128 S=K·Qᵀ", 256, 256, 128), ("fwd D128 acc+=Pᵀ·V", 256, 128, 256),
        ("bwd dPᵀ=V·dOᵀ", 512, 256, 64), ("bwd dV+=P·dO", 512, 64, 256), ("bwd dQ+=dSᵀ·K", 256, 64, 512),
        ("square 2048", 2048, 2048, 2048),
    ]
    for name, M, N, K in shapes:
        a, b = bf(M, K), bf(K, N)
        c = np.zeros((M, N), np.float32)
        ta = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        tb = torch.from_numpy(b.view(np.int16)).view(torch.bfloat16)
        n = max(3, args.repeats * (256 * 256 * 64) // (M * N * K))
        times = {"mkl": [], "torch": []}
        for rnd in range(args.rounds + 1):
            t0 = time.perf_counter()
            _bf16_loop(a, b, c, 1.0, n)
            t1 = time.perf_counter()
            for _ in range(n):
                torch.matmul(ta, tb)
            t2 = time.perf_counter()
            if rnd:
                times["mkl"].append((t1 - t0) / n)
                times["torch"].append((t2 - t1) / n)
        gf = {r: 2 * M * N * K / statistics.median(t) / 1e9 for r, t in times.items()}
        print(f"{name:<22} {M}×{N}×{K}  GFLOP/s: mkl {gf['mkl']:7.1f}  torch.matmul {gf['torch']:7.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 tiles: MKL against torch.matmul")
    args = parser.parse_args()
    if args.bf16:
        return bf16_main(args)
    _cpu_isa.f32_gemm()  # binds the thread setter (MKL's) for the loops below
    lib, why = _cpu_isa._mkl
    if lib is None:
        raise SystemExit(f"no MKL here: {why}")
    ll.add_symbol("bench_sgemm_mkl", ctypes.cast(lib.sgemm_, ctypes.c_void_p).value)
    ll.add_symbol("bench_sgemm_openblas", _cpu_isa._scipy_sgemm())
    routes = {"numpy dot": None, "openblas": _route("bench_sgemm_openblas"), "mkl": _route("bench_sgemm_mkl")}
    rng = np.random.default_rng(0)

    def f(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    # (name, a, b, c, accumulate): the kernels' views (Qs.T, P.T, dS.T are F-ordered)
    cases = []
    for D, BQ, BK, label in ((64, 256, 256, "fwd D64"), (128, 256, 256, "fwd D128"), (64, 64, 128, "sparse fwd D64")):
        Qs, Kb, Vb, ST = f(BQ, D), f(BK, D), f(BK, D), f(BK, BQ)
        cases.append((f"{label} S=K·Qᵀ {BK}×{BQ}×{D}", Kb, Qs.T, f(BK, BQ), False))
        cases.append((f"{label} acc+=Pᵀ·V {BQ}×{D}×{BK}", ST.T, Vb, f(BQ, D), True))
    D, BQ, BK = 64, 256, 512
    Qs, dOs, Kb, Vb, ST = f(BQ, D), f(BQ, D), f(BK, D), f(BK, D), f(BK, BQ)
    cases.append((f"bwd dPᵀ=V·dOᵀ {BK}×{BQ}×{D}", Vb, dOs.T, f(BK, BQ), False))
    cases.append((f"bwd dV+=P·dO {BK}×{D}×{BQ}", ST, dOs, f(BK, D), True))
    cases.append((f"bwd dQ+=dSᵀ·K {BQ}×{D}×{BK}", ST.T, Kb, f(BQ, D), True))
    n = args.repeats
    with ONE_BLAS_THREAD:
        for name, a, b, c, acc in cases:
            M, K = a.shape
            N = b.shape[1]
            times = {r: [] for r in routes}
            for rnd in range(args.rounds + 1):
                for route, loop in routes.items():
                    t0 = time.perf_counter()
                    if loop is None:
                        _numpy_loop(a, b, c, np.empty_like(c), acc, n)
                    else:
                        loop(a, b, c, 1.0 if acc else 0.0, n)
                    if rnd:  # round 0 compiles and warms up
                        times[route].append((time.perf_counter() - t0) / n)
            gf = {r: 2 * M * N * K / statistics.median(t) / 1e9 for r, t in times.items()}
            cells = "  ".join(f"{r} {g:6.1f}" for r, g in gf.items())
            print(f"{name:<34} GFLOP/s: {cells}   mkl/numpy {gf['mkl'] / gf['numpy dot']:.2f}×", flush=True)


if __name__ == "__main__":
    main()
