"""The measurements behind the cpu kernels' design (docs/performance.md, "why this design").

Each line times one alternative on an L2-resident score block (BK × BQ = 256 × 128 float32,
the kernels' tile) or a whole forward, single-threaded unless stated, median of repeats:

1. exp: NumPy's SIMD ``np.exp2`` ufunc; a Numba loop calling ``math.exp2``; the kernels'
   polynomial + integer-exponent ``_exp2_shifted``.
2. row reductions: a horizontal max per row of S (``BQ × BK``) against the column max over a
   transposed block ST (``BK × BQ``, element-wise between rows: vectorizes).
3. block GEMM: ``np.dot`` inside Numba (SciPy's BLAS, 1 thread) against a hand-written Numba
   loop nest (``k`` outer so the inner loop vectorizes).
4. BLAS threads: the forward with BLAS left at its default thread count inside the kernels'
   own threads, against BLAS limited to 1 thread.
5. tiles: the forward (H8, L4096, D64) with several ``(BQ, BK)``.

    .venv/bin/python benchmarks/cpu_design_alternatives.py
"""

from __future__ import annotations

import math
import statistics
import time

import numpy as np
import scipy.linalg.cython_blas  # noqa: F401  (Numba's np.dot uses this BLAS)
from numba import njit
from threadpoolctl import threadpool_limits

from dotattn import semantics
from dotattn.kernels import _cpu_primitives as P
from dotattn.kernels import cpu
from dotattn.kernels._cpu_primitives import exp2_fraction

BK, BQ, D = 256, 128, 64


def timeit(fn, repeats=7, number=50) -> float:
    """Median seconds per call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - t0) / number)
    return statistics.median(times)


@njit(cache=True)
def _exp2_libm(x):
    for c in range(x.shape[0]):
        for r in range(x.shape[1]):
            x[c, r] = math.exp2(x[c, r])


@njit(cache=True, fastmath={"contract", "afn", "nsz"})
def _exp2_indexed_2d(ST, N, mul, sub):
    """The kernels' exp written with ``ST[c, r]`` indexing: LLVM leaves this one scalar."""
    BK, BQ = ST.shape
    for c in range(BK):
        for r in range(BQ):
            xc = max(ST[c, r] * mul - sub[r], np.float32(-127.0))
            n = np.floor(xc + np.float32(0.5))
            ST[c, r] = exp2_fraction(xc - n)
            N[c, r] = np.int32(n)
    bits = ST.reshape(ST.size).view(np.int32)
    nflat = N.reshape(N.size)
    for i in range(bits.size):
        e = nflat[i]
        bits[i] = np.int32(bits[i] + (e << 23)) if e > -127 else np.int32(0)


@njit(cache=True, fastmath={"nnan", "nsz", "contract"})
def _row_max_horizontal(S, out):
    for r in range(S.shape[0]):
        m = S[r, 0]
        for c in range(1, S.shape[1]):
            v = S[r, c]
            m = v if v > m else m
        out[r] = m


@njit(cache=True, fastmath={"contract"})
def _gemm_loops(a, b, out):
    """out = a · b with the k loop outside the vectorized j loop."""
    out[:] = 0.0
    for i in range(a.shape[0]):
        for k in range(a.shape[1]):
            aik = a[i, k]
            for j in range(b.shape[1]):
                out[i, j] += aik * b[k, j]


def main() -> None:
    rng = np.random.default_rng(0)
    ST = (rng.standard_normal((BK, BQ)) * 3 - 6).astype(np.float32)
    N = np.empty((BK, BQ), dtype=np.int32)
    zeros = np.zeros(BQ, dtype=np.float32)
    n = ST.size
    print(f"1. exp on a {BK}×{BQ} float32 block (ns/element)")
    work = ST.copy()
    print(f"   numpy np.exp2 (SIMD ufunc)      {timeit(lambda: np.exp2(ST, out=work)) / n * 1e9:.3f}")
    print(
        f"   numba loop calling math.exp2    {timeit(lambda: (work.__setitem__(slice(None), ST), _exp2_libm(work))) / n * 1e9:.3f}"
    )
    print(
        f"   numba polynomial + int exponent {timeit(lambda: (work.__setitem__(slice(None), ST), P._exp2_shifted_f32(work, N, np.float32(1), zeros))) / n * 1e9:.3f}"
    )
    print(
        f"   same, 2-D indexed inner loop    "
        f"{timeit(lambda: (work.__setitem__(slice(None), ST), _exp2_indexed_2d(work, N, np.float32(1), zeros))) / n * 1e9:.3f}"
    )
    print(
        f"   (copying the block, included above) {timeit(lambda: work.__setitem__(slice(None), ST)) / n * 1e9:.3f}"
    )
    x = -rng.random(1 << 16, dtype=np.float32)[None] * 30
    y = x.copy()
    P._exp2_shifted_f32(y, np.empty(y.shape, np.int32), np.float32(1), np.zeros(y.shape[1], np.float32))
    exact = np.exp2(x.astype(np.float64))
    print(f"   polynomial max relative error   {float(np.max(np.abs(y - exact) / exact)):.2e}")

    print(f"2. row max of a {BQ}×{BK} block (ns/element)")
    S = np.ascontiguousarray(ST.T)
    out = np.empty(BQ, dtype=np.float32)
    print(f"   horizontal, S (BQ × BK)         {timeit(lambda: _row_max_horizontal(S, out)) / n * 1e9:.3f}")
    print(f"   vertical, ST (BK × BQ)          {timeit(lambda: P._col_max(ST, out)) / n * 1e9:.3f}")

    print(f"3. block GEMMs, 1 thread (GFLOP/s): S = K·Qᵀ ({BK}×{D}·{D}×{BQ}) and P·V ({BQ}×{BK}·{BK}×{D})")
    K = rng.standard_normal((BK, D), dtype=np.float32)
    Q = rng.standard_normal((BQ, D), dtype=np.float32)
    QT = np.ascontiguousarray(Q.T)
    PT = np.ascontiguousarray(ST.T)
    PV = np.empty((BQ, D), dtype=np.float32)
    flop = 2.0 * BK * BQ * D
    with threadpool_limits(1, user_api="blas"):
        print(f"   np.dot in numba, K·Qᵀ           {flop / timeit(lambda: P._matmul(K, Q.T, ST)) / 1e9:.1f}")
        print(f"   np.dot in numba, P·V            {flop / timeit(lambda: P._matmul(PT, K, PV)) / 1e9:.1f}")
        print(
            f"   hand-written loops, K·Qᵀ        {flop / timeit(lambda: _gemm_loops(K, QT, ST), number=10) / 1e9:.1f}"
        )

    print("4./5. forward H8 L4096 D64 float32, both threads (GFLOP/s)")
    q = rng.standard_normal((1, 8, 4096, 64), dtype=np.float32)
    call = semantics.normalize(q, q, q)
    flop = 4.0 * 8 * 4096 * 4096 * 64
    for tiles in [(64, 128), (128, 128), (128, 256), (128, 512), (256, 256), (256, 512)]:
        print(
            f"   tiles {tiles}: {flop / timeit(lambda: cpu.forward(call, block_size=tiles), repeats=3, number=1) / 1e9:.1f}"
        )
    q_small = q[:, :2, :1024]
    call_small = semantics.normalize(q_small, q_small, q_small)
    flop_small = 4.0 * 2 * 1024 * 1024 * 64
    kernels = cpu.default_kernels()
    p = cpu.prepare(call_small)
    o = np.empty((1, 2, 1024, 64), dtype=np.float32)
    lse = np.empty((1, 2, 1024), dtype=np.float32)

    def raw():  # the kernel itself, under whatever BLAS thread limit the caller set
        kernels.forward(p.q, p.kp, p.vp, o, lse, p.options, 2)

    with threadpool_limits(1, user_api="blas"):
        limited = flop_small / timeit(raw, repeats=3, number=2) / 1e9
    with threadpool_limits(2, user_api="blas"):
        free = flop_small / timeit(raw, repeats=3, number=1) / 1e9
    print(
        f"   H2 L1024: BLAS limited to 1 thread {limited:.1f}; BLAS at 2 threads inside our threads {free:.1f}"
    )


if __name__ == "__main__":
    main()
