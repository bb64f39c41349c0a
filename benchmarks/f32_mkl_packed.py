"""MKL's packed-operand API on the float32 backward's five tile products: go/no-go.

One key task of the MKL route's backward — a BK-key tile of K and V against the 4096/BQ query
tiles of one head (tiles as ``cpu.DEFAULT_BACKWARD_BLOCK_SIZE``: BQ 256 × BK 512) — products
only, one thread: ``Sᵀ = K·Qᵀ``, ``dPᵀ = V·dOᵀ``, ``dV += Sᵀ·dO``, ``dK += Sᵀ·Q``, ``dQ += S·K``
(``Sᵀ`` standing in for P and dS).  Three variants:

* ``sgemm_``: what the kernel runs (MKL packs both operands inside every call);
* K and V packed once per task (``cblas_sgemm_pack``; ``cblas_sgemm_compute`` for ``Sᵀ``,
  ``dPᵀ`` and ``dQ``), the query side as it lies;
* the same plus each query tile's Qᵀ, dOᵀ, Q and dO packed once per call (reused by every key
  task of the head).

It checks that the packed products give ``sgemm_``'s bits, alternates the variants in random
order, and prints medians.  MKL is called through ctypes (≈ 1 µs a call against ≈ 100 µs a
product); ``cblas_sgemm_pack_get_size`` sizes each packed buffer.

    flock /tmp/bench.lock .venv/bin/python benchmarks/f32_mkl_packed.py [--BQ 256 --BK 512 --D 64 --rounds 9]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import random
import statistics
import time

os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402

ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112
A_MATRIX, B_MATRIX, PACKED = 161, 162, 151
L = 4096  # query rows of the head


class Mkl:
    """The MKL entry points, from torch's libtorch_cpu.so, on the calling thread only."""

    def __init__(self):
        import torch

        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        lib.MKL_Set_Num_Threads_Local.argtypes = [ctypes.c_int]
        lib.MKL_Set_Num_Threads_Local(1)
        i, f, p = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
        self._sgemm = lib.sgemm_
        self._sgemm.restype = None
        self._size = lib.cblas_sgemm_pack_get_size
        self._size.restype, self._size.argtypes = ctypes.c_size_t, [i, i, i, i]
        self._pack = lib.cblas_sgemm_pack
        self._pack.restype, self._pack.argtypes = None, [i, i, i, i, i, i, f, p, i, p]
        self._compute = lib.cblas_sgemm_compute
        self._compute.restype, self._compute.argtypes = None, [i, i, i, i, i, i, p, i, p, i, f, p, i]

    def gemm(self, ta, tb, M, N, K, a, b, beta, c):
        """Row-major ``c = op(a)·op(b) + beta·c`` by Fortran ``sgemm_`` (as the kernels call it)."""
        ref = ctypes.byref
        flag = {NO_TRANS: b"N", TRANS: b"T"}
        self._sgemm(ref(ctypes.c_char(flag[tb])), ref(ctypes.c_char(flag[ta])), ref(ctypes.c_int(N)),
                    ref(ctypes.c_int(M)), ref(ctypes.c_int(K)), ref(ctypes.c_float(1.0)), ctypes.c_void_p(b.ctypes.data),
                    ref(ctypes.c_int(b.strides[0] // 4)), ctypes.c_void_p(a.ctypes.data), ref(ctypes.c_int(a.strides[0] // 4)),
                    ref(ctypes.c_float(beta)), ctypes.c_void_p(c.ctypes.data), ref(ctypes.c_int(c.strides[0] // 4)))

    def packed(self, which, trans, M, N, K, x):
        """``x`` packed as the A or B operand (``which``) of an ``M × N × K`` product."""
        buf = np.empty(self._size(which, M, N, K) // 4 + 16, np.float32)
        self._pack(ROW_MAJOR, which, trans, M, N, K, 1.0, x.ctypes.data, x.strides[0] // 4, buf.ctypes.data)
        return buf

    def compute(self, ta, tb, M, N, K, a, lda, b, ldb, beta, c):
        """``cblas_sgemm_compute``: ``ta``/``tb`` PACKED for a packed buffer (``lda``/``ldb`` then unused)."""
        self._compute(ROW_MAJOR, ta, tb, M, N, K, a.ctypes.data, lda, b.ctypes.data, ldb, beta, c.ctypes.data,
                      c.strides[0] // 4)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--BQ", type=int, default=256)
    parser.add_argument("--BK", type=int, default=512)
    parser.add_argument("--D", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    BQ, BK, D = args.BQ, args.BK, args.D
    nq = L // BQ
    mkl = Mkl()
    rng = np.random.default_rng(0)
    K, V = (rng.standard_normal((BK, D), dtype=np.float32) for _ in range(2))
    Q, dO = (rng.standard_normal((L, D), dtype=np.float32) for _ in range(2))
    ST, dPT = np.zeros((BK, BQ), np.float32), np.zeros((BK, BQ), np.float32)
    dK, dV, dQ = np.zeros((BK, D), np.float32), np.zeros((BK, D), np.float32), np.zeros((L, D), np.float32)
    tiles = [(Q[i * BQ : (i + 1) * BQ], dO[i * BQ : (i + 1) * BQ], dQ[i * BQ : (i + 1) * BQ]) for i in range(nq)]
    # the query side packed once per call: Qᵀ, dOᵀ (B of Sᵀ, dPᵀ) and Q, dO (B of dK, dV)
    query = [
        tuple(mkl.packed(B_MATRIX, t, BK, n, k, x) for t, n, k, x in
              ((TRANS, BQ, D, q), (TRANS, BQ, D, do), (NO_TRANS, D, BQ, q), (NO_TRANS, D, BQ, do)))
        for q, do, _ in tiles
    ]

    def plain():
        for q, do, dq in tiles:
            mkl.gemm(NO_TRANS, TRANS, BK, BQ, D, K, q, 0.0, ST)
            mkl.gemm(NO_TRANS, TRANS, BK, BQ, D, V, do, 0.0, dPT)
            mkl.gemm(NO_TRANS, NO_TRANS, BK, D, BQ, ST, do, 1.0, dV)
            mkl.gemm(NO_TRANS, NO_TRANS, BK, D, BQ, ST, q, 1.0, dK)
            mkl.gemm(TRANS, NO_TRANS, BQ, D, BK, ST, K, 1.0, dq)

    def packed(query_side):
        Ka, Va = (mkl.packed(A_MATRIX, NO_TRANS, BK, BQ, D, x) for x in (K, V))
        Kb = mkl.packed(B_MATRIX, NO_TRANS, BQ, D, BK, K)
        for (q, do, dq), (qt, dot, qb, dob) in zip(tiles, query):
            if query_side:
                mkl.compute(PACKED, PACKED, BK, BQ, D, Ka, D, qt, D, 0.0, ST)
                mkl.compute(PACKED, PACKED, BK, BQ, D, Va, D, dot, D, 0.0, dPT)
                mkl.compute(NO_TRANS, PACKED, BK, D, BQ, ST, BQ, dob, D, 1.0, dV)
                mkl.compute(NO_TRANS, PACKED, BK, D, BQ, ST, BQ, qb, D, 1.0, dK)
            else:
                mkl.compute(PACKED, TRANS, BK, BQ, D, Ka, D, q, D, 0.0, ST)
                mkl.compute(PACKED, TRANS, BK, BQ, D, Va, D, do, D, 0.0, dPT)
                mkl.gemm(NO_TRANS, NO_TRANS, BK, D, BQ, ST, do, 1.0, dV)
                mkl.gemm(NO_TRANS, NO_TRANS, BK, D, BQ, ST, q, 1.0, dK)
            mkl.compute(TRANS, PACKED, BQ, D, BK, ST, BQ, Kb, D, 1.0, dq)

    variants = {"sgemm_ (the kernel's)": plain, "K, V packed per task": lambda: packed(False),
                "K, V per task + query side per call": lambda: packed(True)}
    results = {}
    for name, run in variants.items():
        for x in (dK, dV, dQ):
            x[:] = 0
        run()
        results[name] = [x.copy() for x in (ST, dPT, dK, dV, dQ)]
    ref = results["sgemm_ (the kernel's)"]
    for name, got in results.items():
        print(f"{name}: same bits as sgemm_ {all(np.array_equal(a, b) for a, b in zip(ref, got))}")
    sizes = [mkl._size(A_MATRIX, BK, BQ, D), mkl._size(B_MATRIX, BK, BQ, D)]
    print(f"cblas_sgemm_pack_get_size: K as A {sizes[0] / 2**20:.1f} MiB, a query tile as B {sizes[1] / 2**20:.1f} MiB "
          f"(the tiles themselves: {BK * D * 4 / 2**10:.0f} / {BQ * D * 4 / 2**10:.0f} KiB)")
    times = {name: [] for name in variants}
    load0 = os.getloadavg()[0]
    for _ in range(args.rounds):
        order = list(variants)
        random.shuffle(order)
        for name in order:
            t0 = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - t0)
    flop = 5 * 2 * BQ * BK * D * nq
    base = statistics.median(times["sgemm_ (the kernel's)"])
    print(f"BQ {BQ} × BK {BK}, D {D}, one task ({nq} tiles), {args.rounds} rounds alternated, "
          f"load {load0:.2f} → {os.getloadavg()[0]:.2f}:")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"  {name:<38} {t * 1e3:7.2f} ms  {flop / t / 1e9:6.1f} GFLOP/s  × {base / t:.3f}")


if __name__ == "__main__":
    main()
