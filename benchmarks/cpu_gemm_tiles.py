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

    .venv/bin/python benchmarks/cpu_gemm_tiles.py [--rounds 7] [--repeats 200]
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
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
