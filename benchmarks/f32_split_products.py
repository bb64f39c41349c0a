"""float32 tile products: MKL ``sgemm`` (the kernels' path) against AMX on split bfloat16 pieces.

Issue 13 §2's go/no-go for computing the float32 kernels' tile products on AMX ("bf16x6",
cuBLAS's float32 emulation on recent GPUs): AMX multiplies bfloat16 only, but a float32 ``x``
is exactly ``hi + mid + lo`` with ``hi = bf16(x)``, ``mid = bf16(x − hi)``, ``lo = bf16(x −
hi − mid)`` (8 + 8 + 8 significand bits cover float32's 24; each subtraction is exact).  A
float32 product is then the sum of six bfloat16 products (``mid·lo``, ``lo·mid``, ``lo·lo``
≤ 2⁻²⁵ of it are dropped), each exact in float32.  **Order matters**: ``tdpbf16ps`` rounds
into its float32 accumulator at every step and a term far below ``ulp(acc)`` is lost, so each
output starts at 0, takes the small cross terms first (``lo·hi``, ``hi·lo``, ``mid·mid``, then
``hi·mid``, ``mid·hi``) and the ``hi·hi`` terms last; products that accumulate (``dV += P·dO``)
compute into a scratch tile and add it once.  The tile unit flushes denormals (pieces below
2⁻¹²⁶ count as 0), so a kernel would send operands whose largest magnitude is outside
``[2⁻⁴⁰, 2⁴⁰]`` to MKL (``SPLIT_MIN``/``SPLIT_MAX``).

Everything here is self-contained (the split, the AMX product on ``kernels/_cpu_amx.py``'s
tile intrinsics, the adds); the kernel wiring that was tried lives on branch
``f32split-amx-experiment`` (docs/performance-log.md, "float32 on AMX as split bfloat16 products").
Printed, one thread, routes alternating round by round in one process (medians):

1. each tile product of the float32 backward (BQ 256 × BK 512, D 64) and the forward's ``P·V``:
   MKL against split-AMX including what the kernel pays per tile (splitting P or dS, the
   query tile's operands, the scratch add); operands split once per call (K, V, Kᵀ) untimed;
2. the products alone (no splits, no adds) and the splits alone;
3. the backward's per-tile sequence on AMX (the products, splits and adds in the kernel's
   order, a stand-in pass over the score tile, 16 query tiles in turn) against MKL's five;
4. accuracy: max |error| against float64 of MKL, NumPy float32 ``a @ b`` (the naive
   baseline's product) and split-AMX.

    flock /tmp/bench.lock .venv/bin/python benchmarks/f32_split_products.py [--rounds 7] [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import time



import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

# the split helpers the kernel uses (kernels/_cpu_amx_f32.py), not copies of them
from dotattn.kernels._cpu_amx_f32 import (  # noqa: F401
    _pieces, _pieces_vec, _split32, _split_pair16, _vload, split_pairs, split_rows, transpose_pairs,
)
from dotattn.kernels._cpu_amx import (
    _AVX512,
    _BFloat,
    _amx_function,
    _depth_2x2,
    _store_2x2,
    _tile_config,
    _tile_release,
    _zero0,
    _zero1,
    _zero2,
    _zero3,
)
from dotattn.kernels._cpu_primitives import _from_bf16, _to_bf16

_JIT_CACHE = False  # (a benchmark: compiled per run)

# The range of an operand's largest magnitude for which the split path runs (else MKL's
# float32 tiles): at most 2⁴⁰, so that no piece, product or sum of products nears float32's
# overflow (bf16(x) rounds to inf above ≈ 3.39e38); at least 2⁻⁴⁰, so that the products of
# two operands' large elements (≥ 2⁻⁸⁰) and their lo pieces' products (≥ 2⁻¹¹⁴) stay far
# above the tile unit's flush of results below 2⁻¹²⁶ (what it flushes then is ≤ 2⁻¹²⁶ per
# product against results near 2⁻⁸⁰: far below float32's rounding of them).
SPLIT_MAX = 2.0**40
SPLIT_MIN = 2.0**-40  # (the gate the experiment used: ok_range below)

# (A piece, B piece) of each bfloat16 product, smallest first: 0 = hi, 1 = mid, 2 = lo
_SEG_A = (2, 0, 1, 0, 1, 0)
_SEG_B = (0, 2, 1, 1, 0, 0)


_VF = ir.VectorType(ir.FloatType(), 16)
_V32I16 = ir.VectorType(ir.IntType(16), 32)
_V32I32 = ir.VectorType(ir.IntType(32), 32)
_V32F = ir.VectorType(ir.FloatType(), 32)
_I32 = ir.IntType(32)


@njit(cache=_JIT_CACHE, nogil=True)
def product(a, b, c, M, N, K, cfg):
    """``c[:M, :N] = A·B`` in float32 from split operands: ``a (3, ≥M, K)`` uint16 pieces (from
    :func:`split_rows`), ``b (3, K/2, ≥N)`` uint32 pairs (from :func:`split_pairs` /
    :func:`split_pairs_t`), ``c`` float32 with contiguous rows.  M, N, K multiples of 32.
    Per 32 × 32 output block: the six piece products over the whole depth, smallest first."""
    a_ps, a_ld = a.strides[0], a.strides[1]
    b_ps, b_ld = b.strides[0], b.strides[1]
    c_ld = c.strides[0]
    a0, b0, c0 = a.ctypes.data, b.ctypes.data, c.ctypes.data
    _tile_config(cfg.ctypes.data)
    for i in range(0, M, 32):
        for j in range(0, N, 32):
            _zero0()
            _zero1()
            _zero2()
            _zero3()
            for s in range(6):
                _depth_2x2(a0 + _SEG_A[s] * a_ps + i * a_ld, a_ld, b0 + _SEG_B[s] * b_ps + j * 4, b_ld, K)
            _store_2x2(c0 + i * c_ld + j * 4, c_ld)
    _tile_release()


@njit(cache=_JIT_CACHE, nogil=True)
def add_into(c, s, M, N):
    """``c[:M, :N] += s[:M, :N]`` (a product's scratch result into its accumulator, once)."""
    for i in range(M):
        ci, si = c[i], s[i]
        for j in range(N):
            ci[j] += si[j]


@njit(cache=_JIT_CACHE, nogil=True)
def add_into_t(c, s, M, N):
    """``c[:M, :N] += s[:N, :M]ᵀ`` (``dQ += (dQᵀ)ᵀ``), 16 rows of ``c`` at a time."""
    for i0 in range(0, M, 16):
        i1 = min(i0 + 16, M)
        for j in range(N):
            sj = s[j]
            for i in range(i0, i1):
                c[i, j] += sj[i]


@njit(cache=_JIT_CACHE, nogil=True)
def query_operands(xs, rows, out_t, out_p, X):
    """A query tile's two B operands from its rows ``xs (BQ, X)`` float32 (zero past the real
    rows): ``out_t (3, Xp/2, BQ)`` for ``C = A·xsᵀ`` (depth X) and ``out_p (3, BQ/2, Xp)`` for
    ``C = A·xs`` (depth BQ); ``rows (3, BQ, Xp)`` uint16 scratch."""
    BQ = xs.shape[0]
    split_rows(xs, rows, BQ, X)
    transpose_pairs(rows, out_t, BQ)
    split_pairs(xs, out_p, BQ, X)


# =================================================================================
# the benchmark
# =================================================================================

from dotattn.kernels import _cpu_isa  # noqa: E402
from dotattn.kernels import _cpu_primitives as P  # noqa: E402
from dotattn.kernels._blas import ONE_BLAS_THREAD  # noqa: E402
from dotattn.kernels._cpu_amx import tile_config  # noqa: E402


def aligned(shape, dtype):
    """Zeros at a 64-byte boundary (a tile row across two cache lines costs 1.7×: _cpu_amx)."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buf = np.zeros(n + 64, np.uint8)
    off = -buf.ctypes.data % 64
    return buf[off : off + n].view(dtype).reshape(shape)


@njit
def _mkl(a, b, c, beta, n):
    threads = P._gemm_threads_begin(a)
    for _ in range(n):
        P._gemm(a, b, c, beta)
    P._gemm_threads_end(a, threads)


@njit
def _product(a, b, c, M, N, K, cfg, n):
    for _ in range(n):
        product(a, b, c, M, N, K, cfg)


@njit
def _split_rows(x, out, M, K, n):
    for _ in range(n):
        split_rows(x, out, M, K)


@njit
def _split_pairs(x, out, K, N, n):
    for _ in range(n):
        split_pairs(x, out, K, N)


@njit
def _query(xs, rows, out_t, out_p, X, n):
    for _ in range(n):
        query_operands(xs, rows, out_t, out_p, X)


@njit
def _scores_tile(xa, qs, rows, qt, qp, c, cfg, n):
    """``C = A·Qᵀ`` with the query tile's operands made per tile (as a kernel without a per-call pass would)."""
    M, D = xa.shape[1], xa.shape[2]
    BQ = qs.shape[0]
    for _ in range(n):
        query_operands(qs, rows, qt, qp, D)
        product(xa, qt, c, M, BQ, D, cfg)


@njit
def _acc_tile(a, ax, bp, s, c, cfg, n):
    """``C += A·B``: A (float32) split per tile, B's pieces given, scratch result added once."""
    M, K = a.shape
    N = bp.shape[2]
    for _ in range(n):
        split_rows(a, ax, M, K)
        product(ax, bp, s, M, N, K, cfg)
        add_into(c, s, M, N)


@njit
def _dq_tile(kt, ds, dsp, s, dq, cfg, n):
    """``dQ += dSᵀ·K`` as ``dQᵀ = Kᵀ·dS`` (dS in key pairs, split per tile), added transposed."""
    D, BK = kt.shape[1], kt.shape[2]
    BQ = ds.shape[1]
    for _ in range(n):
        split_pairs(ds, dsp, BK, BQ)
        product(kt, dsp, s, D, BQ, BK, cfg)
        add_into_t(dq, s, BQ, D)


@njit
def _sequence(kx, vx, ktx, qts, qps, ST, dPT, px, dsp, sK, sV, sQ, dK, dV, dq, cfg, n):
    """The backward's tile on AMX in the kernel's order; query tiles in turn (cold operands)."""
    BK, BQ = ST.shape
    D = kx.shape[2]
    for it in range(n):
        i = it % qts.shape[0]
        qt, qp = qts[i], qps[i]
        product(kx, qt, ST, BK, BQ, D, cfg)
        for r in range(BK):  # stand-in for the exp pass (reads and writes the tile)
            row = ST[r]
            for c in range(BQ):
                row[c] = row[c] * np.float32(0.001)
        product(vx, qt, dPT, BK, BQ, D, cfg)
        split_rows(ST, px, BK, BQ)
        product(px, qp, sV, BK, D, BQ, cfg)
        add_into(dV, sV, BK, D)
        split_rows(ST, px, BK, BQ)
        split_pairs(ST, dsp, BK, BQ)
        product(px, qp, sK, BK, D, BQ, cfg)
        add_into(dK, sK, BK, D)
        product(ktx, dsp, sQ, D, BQ, BK, cfg)
        add_into_t(dq, sQ, BQ, D)


@njit
def _mkl_sequence(Kb, Vb, Qss, dOss, ST, dPT, dK, dV, dq, n):
    threads = P._gemm_threads_begin(Kb)
    BK, BQ = ST.shape
    for it in range(n):
        i = it % Qss.shape[0]
        Qs, dOs = Qss[i], dOss[i]
        P._gemm(Kb, Qs.T, ST, 0.0)
        for r in range(BK):
            row = ST[r]
            for c in range(BQ):
                row[c] = row[c] * np.float32(0.001)
        P._gemm(Vb, dOs.T, dPT, 0.0)
        P._gemm(ST, dOs, dV, 1.0)
        P._gemm(ST, Qs, dK, 1.0)
        P._gemm(ST.T, Kb, dq, 1.0)
    P._gemm_threads_end(Kb, threads)


def _pieces_rows(x):
    M, K = x.shape
    out = aligned((3, M, K), np.uint16)
    split_rows(x, out, M, K)
    return out


def _pieces_pairs(x):
    K, N = x.shape
    out = aligned((3, K // 2, N), np.uint32)
    split_pairs(x, out, K, N)
    return out


def _time(thunks, rounds):
    times = {name: [] for name in thunks}
    for rnd in range(rounds + 1):
        for name, thunk in thunks.items():
            t0 = time.perf_counter()
            n = thunk()
            if rnd:  # round 0 compiles and warms up
                times[name].append((time.perf_counter() - t0) / n * 1e6)
    return {name: statistics.median(t) for name, t in times.items()}


def speed(args, cfg, rng) -> None:
    f = lambda *s: rng.standard_normal(s, dtype=np.float32)  # noqa: E731
    D, BQ, BK = 64, 256, 512
    n = args.repeats
    Qs, dOs, Kb, Vb = f(BQ, D), f(BQ, D), f(BK, D), f(BK, D)
    ST, dPT = aligned((BK, BQ), np.float32), aligned((BK, BQ), np.float32)
    ST[:] = f(BK, BQ)
    kx, vx = _pieces_rows(Kb), _pieces_rows(Vb)
    ktx, vtx = _pieces_rows(np.ascontiguousarray(Kb.T)), _pieces_rows(np.ascontiguousarray(Vb.T))
    rows, qt, qp = aligned((3, BQ, D), np.uint16), aligned((3, D // 2, BQ), np.uint32), aligned((3, BQ // 2, D), np.uint32)
    query_operands(Qs, rows, qt, qp, D)
    px, dsp = aligned((3, BK, BQ), np.uint16), aligned((3, BK // 2, BQ), np.uint32)
    sK, sQ = aligned((BK, D), np.float32), aligned((D, BQ), np.float32)
    dK, dq = np.zeros((BK, D), np.float32), np.zeros((BQ, D), np.float32)
    print(f"\n1. tile products, one thread, µs (median of {args.rounds} rounds × {n}); split-AMX with its per-tile splits and adds")
    cases = [
        ("bwd Sᵀ=K·Qᵀ 512×256×64", lambda: _mkl(Kb, Qs.T, ST, 0.0, n) or n,
         lambda: _scores_tile(kx, Qs, rows, qt, qp, ST, cfg, n) or n),
        ("bwd dPᵀ=V·dOᵀ 512×256×64", lambda: _mkl(Vb, dOs.T, dPT, 0.0, n) or n,
         lambda: _scores_tile(vx, dOs, rows, qt, qp, dPT, cfg, n) or n),
        ("bwd dV+=P·dO 512×64×256", lambda: _mkl(ST, dOs, dK, 1.0, n) or n,
         lambda: _acc_tile(ST, px, qp, sK, dK, cfg, n) or n),
        ("bwd dK+=dS·Q 512×64×256", lambda: _mkl(ST, Qs, dK, 1.0, n) or n,
         lambda: _acc_tile(ST, px, qp, sK, dK, cfg, n) or n),
        ("bwd dQ+=dSᵀ·K 256×64×512", lambda: _mkl(ST.T, Kb, dq, 1.0, n) or n,
         lambda: _dq_tile(ktx, ST, dsp, sQ, dq, cfg, n) or n),
        ("fwd acc+=Pᵀ·V 256×64×512", lambda: _mkl(ST.T, Vb, dq, 1.0, n) or n,
         lambda: _dq_tile(vtx, ST, dsp, sQ, dq, cfg, n) or n),
    ]
    flops = 2 * BK * BQ * D
    with ONE_BLAS_THREAD:
        for name, mkl, amx in cases:
            t = _time({"mkl": mkl, "amx": amx}, args.rounds)
            print(f"  {name:<28} mkl {t['mkl']:6.1f} ({flops / t['mkl'] / 1e3:5.1f} GFLOP/s)   split-amx {t['amx']:6.1f} "
                  f"({flops / t['amx'] / 1e3:5.1f})   {t['mkl'] / t['amx']:.2f}×", flush=True)
        print("\n2. the pieces alone, µs")
        t = _time({
            "product Sᵀ=K·Qᵀ 512×256×64 (6,144 tdpbf16ps)": lambda: _product(kx, qt, ST, BK, BQ, D, cfg, n) or n,
            "product dK=dS·Q 512×64×256": lambda: _product(px, qp, sK, BK, D, BQ, cfg, n) or n,
            "product dQᵀ=Kᵀ·dS 64×256×512": lambda: _product(ktx, dsp, sQ, D, BQ, BK, cfg, n) or n,
            "split 512×256 into rows": lambda: _split_rows(ST, px, BK, BQ, n) or n,
            "split 512×256 into key pairs": lambda: _split_pairs(ST, dsp, BK, BQ, n) or n,
            "query tile 256×64: both operands": lambda: _query(Qs, rows, qt, qp, D, n) or n,
        }, args.rounds)
        for name, v in t.items():
            print(f"  {name:<62} {v:6.1f}")
        print("\n3. the backward's whole tile (5 products, splits, adds, a stand-in exp pass), 16 query tiles in turn, µs")
        nq = 16
        qts, qps = aligned((nq, 3, D // 2, BQ), np.uint32), aligned((nq, 3, BQ // 2, D), np.uint32)
        Qss, dOss = f(nq, BQ, D), f(nq, BQ, D)
        for i in range(nq):
            query_operands(Qss[i], rows, qts[i], qps[i], D)
        sV, dV = aligned((BK, D), np.float32), np.zeros((BK, D), np.float32)
        t = _time({
            "mkl": lambda: _mkl_sequence(Kb, Vb, Qss, dOss, ST, dPT, dK, dV, dq, n) or n,
            "amx": lambda: _sequence(kx, vx, ktx, qts, qps, ST, dPT, px, dsp, sK, sV, sQ, dK, dV, dq, cfg, n) or n,
        }, args.rounds)
        print(f"  mkl {t['mkl']:.1f}   split-amx {t['amx']:.1f}   {t['mkl'] / t['amx']:.2f}×")


def accuracy(cfg, rng) -> None:
    print("\n4. accuracy: max |error| against float64 (product only, beta 0), over max |exact|")
    for label, M, N, K, kind in (
        ("Sᵀ=K·Qᵀ D64", 512, 256, 64, "normal"),
        ("Sᵀ=K·Qᵀ D128", 256, 256, 128, "normal"),
        ("Sᵀ=K·Qᵀ D64, ×3", 512, 256, 64, "scale3"),
        ("dV=P·dO, P softmax rows", 512, 64, 256, "softmax"),
        ("dQᵀ=Kᵀ·dS", 64, 256, 512, "normal"),
        ("Sᵀ=K·Qᵀ D64, A ×1e-10", 512, 256, 64, "tiny"),
    ):
        a = rng.standard_normal((M, K), dtype=np.float32)
        b = rng.standard_normal((K, N), dtype=np.float32)
        if kind == "scale3":
            a *= 3
            b *= 3
        elif kind == "softmax":
            s = rng.standard_normal((M, K)) * 3
            e = np.exp(s - s.max(axis=1, keepdims=True))
            a = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
        elif kind == "tiny":
            a *= np.float32(1e-10)
        exact = a.astype(np.float64) @ b.astype(np.float64)
        mkl = np.zeros((M, N), np.float32)
        _mkl(a, b, mkl, 0.0, 1)
        amx = aligned((M, N), np.float32)
        product(_pieces_rows(a), _pieces_pairs(b), amx, M, N, K, cfg)
        ref = np.abs(exact).max()
        errs = {r: np.abs(v.astype(np.float64) - exact).max() / ref for r, v in (("mkl", mkl), ("numpy f32", a @ b), ("split-amx", amx))}
        cells = "  ".join(f"{r} {e:.2e}" for r, e in errs.items())
        print(f"  {label:<26} {M}×{N}×{K}  {cells}   split-amx / numpy {errs['split-amx'] / errs['numpy f32']:.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--accuracy-only", action="store_true")
    args = parser.parse_args()
    print(f"float32 tiles: {_cpu_isa.f32_gemm()[1]}; AMX: {_cpu_isa.amx_tiles()[1]}")
    if not _cpu_isa.amx_tiles()[0]:
        raise SystemExit("no AMX here")
    rng = np.random.default_rng(0)
    cfg = tile_config()
    if not args.accuracy_only:
        speed(args, cfg, rng)
    accuracy(cfg, rng)


if __name__ == "__main__":
    main()
