"""Where the float32 cpu backward's time goes: each step of one tile, timed alone.

One thread, one tile of the backward's default shape (``cpu.DEFAULT_BACKWARD_BLOCK_SIZE``:
BQ 256 queries × BK 512 keys, D 64), each step of ``_cpu_kernels._backward_chunk``'s inner
loop compiled as its own loop of ``--repeats`` runs (medians of ``--rounds``): the query
tile's loads, the five tile products (MKL's sgemm, as the kernel calls them), the exponent
``P = 2^(S·c2 − lse)`` and ``dS = P ∘ (dP − Δ)``.  Times the tile count of the dense H8 L4096
backward (8 · 16 · 8 = 1,024) over the thread count (2) this predicts the kernel; the whole
``cpu.backward`` call on the same problem (serial, one thread, H1) is printed beside it.

    flock /tmp/bench.lock .venv/bin/python benchmarks/cpu_profile_backward.py [--D 64] [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from numba import njit

from dotattn import semantics
from dotattn.kernels import _cpu_primitives as P
from dotattn.kernels import cpu
from dotattn.kernels._blas import ONE_BLAS_THREAD


@njit
def _load(Qs, dOs, q, n):
    for _ in range(n):
        Qs[:] = 0
        Qs[:] = q[0, 0, 0 : Qs.shape[0]]
        dOs[:] = 0
        dOs[:] = q[0, 0, 0 : dOs.shape[0], : dOs.shape[1]]


@njit
def _gemm(a, b, c, beta, n):
    threads = P._gemm_threads_begin(a)
    for _ in range(n):
        P._gemm(a, b, c, beta)
    P._gemm_threads_end(a, threads)


@njit
def _dots(a, b, c, n):
    threads = P._gemm_threads_begin(a)
    for _ in range(n):
        P._dots(a, b, c, False)
    P._gemm_threads_end(a, threads)


@njit
def _exp(ST, S0, N, c2, lse2, n):
    for _ in range(n):
        ST[:] = S0
        P._exp2_shifted(ST, N, c2, lse2)


@njit
def _copy(ST, S0, n):
    for _ in range(n):
        ST[:] = S0


@njit
def _ds(ST, P0, dPT, delta, n):
    for _ in range(n):
        ST[:] = P0
        P._ds_block(ST, dPT, delta)


def _median(fn, rounds, n) -> float:
    fn(1)
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn(n)
        out.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--D", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    BQ, BK = cpu.DEFAULT_BACKWARD_BLOCK_SIZE
    D = args.D
    rng = np.random.default_rng(0)
    f = lambda *s: rng.standard_normal(s, dtype=np.float32)  # noqa: E731
    q = f(1, 1, 4096, D)
    Qs, dOs, Kb, Vb = np.zeros((BQ, D), np.float32), np.zeros((BQ, D), np.float32), f(BK, D), f(BK, D)
    S0 = f(BK, BQ) * np.float32(0.125)
    ST, dPT = np.empty((BK, BQ), np.float32), f(BK, BQ)
    N = np.empty((BK, BQ), np.int32)
    lse2 = np.full(BQ, 6.0, np.float32)
    delta = f(BQ)
    P0 = np.exp2(S0 * np.float32(1.4427) - 6.0).astype(np.float32)
    dK, dV, dq = np.zeros((BK, D), np.float32), np.zeros((BK, D), np.float32), np.zeros((BQ, D), np.float32)
    cpu._bind_f32_gemm()
    n, r = args.repeats, args.rounds
    steps = {}
    with ONE_BLAS_THREAD:
        steps["load Q, dO rows (2 × BQ × D)"] = _median(lambda k: _load(Qs, dOs, q, k), r, n)
        steps["Sᵀ = K·Qᵀ (MKL)"] = _median(lambda k: _dots(Kb, Qs, ST, k), r, n)
        copy = _median(lambda k: _copy(ST, S0, k), r, n)
        steps["P = 2^(S·c2 − lse) (exp pass)"] = _median(lambda k: _exp(ST, S0, N, np.float32(0.18), lse2, k), r, n) - copy
        steps["dPᵀ = V·dOᵀ (MKL)"] = _median(lambda k: _dots(Vb, dOs, dPT, k), r, n)
        steps["dV += P·dO (MKL)"] = _median(lambda k: _gemm(P0, dOs, dV, 1.0, k), r, n)
        steps["dS = P ∘ (dP − Δ)"] = _median(lambda k: _ds(ST, P0, dPT, delta, k), r, n) - copy
        steps["dK += dS·Q (MKL)"] = _median(lambda k: _gemm(P0, Qs, dK, 1.0, k), r, n)
        steps["dQ += dSᵀ·K (MKL)"] = _median(lambda k: _gemm(P0.T, Kb, dq, 1.0, k), r, n)
    total = sum(steps.values())
    print(f"float32 backward, one {BQ} × {BK} tile, D {D}, one thread (medians of {r} × {n}; "
          f"the tile copy {copy:.1f} µs subtracted from the exp and dS passes)")
    for name, t in steps.items():
        print(f"  {name:<34} {t:7.1f} µs  {100 * t / total:5.1f} %")
    tiles = 8 * (4096 // BQ) * (4096 // BK)
    print(f"  {'sum':<34} {total:7.1f} µs → {total * tiles / 2 / 1e3:.1f} ms predicted for dense H8 L4096 on 2 threads")
    # the whole call, one head, serial: its tiles' sum against the call
    x = [f(1, 1, 4096, D) for _ in range(4)]
    call = semantics.normalize(x[0], x[1], x[2])
    out, lse = cpu.forward(call)
    cpu.backward(call, out, lse, x[3], serial=True)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        cpu.backward(call, out, lse, x[3], serial=True)
        times.append((time.perf_counter() - t0) * 1e3)
    h1 = (4096 // BQ) * (4096 // BK)
    print(f"  cpu.backward H1 L4096 serial: {statistics.median(times):.1f} ms (tile sum × {h1} tiles: {total * h1 / 1e3:.1f} ms)")


if __name__ == "__main__":
    main()
