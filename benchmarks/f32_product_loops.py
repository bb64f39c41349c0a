"""The float32 split products' AMX loop (``_cpu_amx_f32.product``) against other loops, alone.

The backward's five split products run at ≈ 9 ns a ``tdpbf16ps`` (docs/performance.md, "float32
backward: the profile per section …").  This times, on one thread, with the backward's tile
shapes (BQ 128 × BK 256, D 64 or 128: ``Sᵀ = K·Qᵀ``, ``dV += Pᵀ·dO``, ``dQᵀ += Kᵀ·dSᵀ``) and a
32 × 32 × 64 product hot in L1, ns per ``tdpbf16ps`` (minimum over ``--rounds``, each of
``--repeats`` products: the machine's other tenants make medians move):

* ``product``: the shipped loop (2 × 2 tiles, the six sub-products each over the whole depth);
* ``2x1-db``: 2 × 1 C tiles with the operand tiles double-buffered (no load waits for the
  product just issued; 1.5 loads a product) — the same bits;
* ``prefetch``: the shipped loop with ``prefetcht0`` of the next block's streamed operand,
  16 lines a depth step — the same bits;
* ``2x1-kouter``: 2 × 1 C tiles, the depth steps outermost, each step's nine operand tiles
  loaded once into six registers (0.75 loads a product) — **other bits**: the small terms of
  a step are added to the sum of the earlier steps' ``hi·hi`` terms; its largest difference
  from ``product`` is printed;
* ``peak``: back-to-back ``tdpbf16ps`` on loaded tiles (N(0, 1) pieces), four accumulators.

    flock /tmp/bench.lock env PYTHONPATH=src taskset -c 1 .venv/bin/python benchmarks/f32_product_loops.py [--d 64] [--rounds 15]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from dotattn.kernels import _cpu_amx as X
from dotattn.kernels import _cpu_amx_f32 as F
from dotattn.kernels import _cpu_isa
from dotattn.kernels._cpu_amx import (
    _depth_2x2,
    _dot046,
    _dot147,
    _dot256,
    _dot357,
    _load2,
    _load3,
    _load4,
    _load5,
    _load6,
    _load7,
    _store0,
    _store1,
    _store_2x2,
    _tile_config,
    _tile_release,
    _zero0,
    _zero1,
    _zero2,
    _zero3,
    tile_config,
)

SEG_A, SEG_B = F._SEG_A, F._SEG_B  # (A piece, B piece) of the six sub-products: 0 hi, 1 mid, 2 lo
_d026, _d136, _d047, _d157 = X._dot(0, 2, 6), X._dot(1, 3, 6), X._dot(0, 4, 7), X._dot(1, 5, 7)
_d024, _d134, _d057, _d167 = X._dot(0, 2, 4), X._dot(1, 3, 4), X._dot(0, 5, 7), X._dot(1, 6, 7)
_d054, _d164, _d027, _d137 = X._dot(0, 5, 4), X._dot(1, 6, 4), X._dot(0, 2, 7), X._dot(1, 3, 7)


@intrinsic
def _prefetch16(typingctx, addr, stride):
    """``prefetcht0`` of 16 cache lines at ``addr + r·stride``."""

    def codegen(context, builder, signature, args):
        a, s = args
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0")
        for r in range(16):
            p = builder.inttoptr(builder.add(a, builder.mul(s, ir.Constant(s.type, r))), i8p)
            builder.call(fn, [p, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(types.int64, types.int64), codegen


@njit(inline="always")
def _half_db(a0, a_ps, a_ld, b0, b_ps, b_ld, i, j, nk):
    """C tiles 0, 1 = rows i … i+31 of the 16 columns from j, the shipped order; steps in pairs,
    even steps' operands in tiles 2, 3, 6, odd steps' in 4, 5, 7."""
    for t in range(0, 6 * nk, 2):
        s0, k0 = t // nk, t % nk
        s1, k1 = (t + 1) // nk, (t + 1) % nk
        ae = a0 + SEG_A[s0] * a_ps + i * a_ld + k0 * 64
        be = b0 + SEG_B[s0] * b_ps + 4 * j + k0 * 16 * b_ld
        ao = a0 + SEG_A[s1] * a_ps + i * a_ld + k1 * 64
        bo = b0 + SEG_B[s1] * b_ps + 4 * j + k1 * 16 * b_ld
        _load2(ae, a_ld)
        _load6(be, b_ld)
        _load3(ae + 16 * a_ld, a_ld)
        _load4(ao, a_ld)
        _load7(bo, b_ld)
        _load5(ao + 16 * a_ld, a_ld)
        _d026()
        _d136()
        _d047()
        _d157()


@njit(inline="always")
def _block_kouter(a0, a_ps, a_ld, b0, b_ps, b_ld, i, j, nk):
    """C tiles 0, 1 = rows i … i+31 of the 16 columns from j: per depth step hi·lo, lo·hi,
    mid·mid, hi·mid, mid·hi, hi·hi; A's hi/lo tiles 2, 3 / 5, 6 swapped every step."""
    a_r, a16, b_c = a0 + i * a_ld, 16 * a_ld, b0 + 4 * j
    for kk in range(nk):
        a, b = a_r + kk * 64, b_c + kk * 16 * b_ld
        if kk % 2 == 0:
            _load2(a, a_ld)
            _load3(a + a16, a_ld)
            _load4(b + 2 * b_ps, b_ld)
            _d024()
            _d134()
            _load5(a + 2 * a_ps, a_ld)
            _load6(a + 2 * a_ps + a16, a_ld)
            _load7(b, b_ld)
            _d057()
            _d167()
            _load5(a + a_ps, a_ld)
            _load6(a + a_ps + a16, a_ld)
            _load4(b + b_ps, b_ld)
            _d054()
            _d164()
            _d024()
            _d134()
            _d057()
            _d167()
            _d027()
            _d137()
        else:
            _load5(a, a_ld)
            _load6(a + a16, a_ld)
            _load4(b + 2 * b_ps, b_ld)
            _d054()
            _d164()
            _load2(a + 2 * a_ps, a_ld)
            _load3(a + 2 * a_ps + a16, a_ld)
            _load7(b, b_ld)
            _d027()
            _d137()
            _load2(a + a_ps, a_ld)
            _load3(a + a_ps + a16, a_ld)
            _load4(b + b_ps, b_ld)
            _d024()
            _d134()
            _d054()
            _d164()
            _d027()
            _d137()
            _d057()
            _d167()


@njit(nogil=True)
def run(a, b, c, cfg, variant, reps):
    """``reps`` products ``c = A·B`` by loop ``variant`` (0 shipped, 1 2x1-db, 2 prefetch, 3 2x1-kouter)."""
    M, N = c.shape
    nk = a.shape[2] // 32
    a_ps, a_ld = a.strides[0], a.strides[1]
    b_ps, b_ld = b.strides[0], b.strides[1]
    c_ld = c.strides[0]
    a0, b0, c0 = a.ctypes.data, b.ctypes.data, c.ctypes.data
    if variant == 0:
        for r in range(reps):
            F.product(a, b, c, cfg)
        return
    _tile_config(cfg.ctypes.data)
    for r in range(reps):
        for i in range(0, M, 32):
            if variant == 2:
                for j in range(0, N, 32):
                    jn = j + 32 if j + 32 < N else 0
                    _zero0()
                    _zero1()
                    _zero2()
                    _zero3()
                    for s in range(6):
                        aa = a0 + SEG_A[s] * a_ps + i * a_ld
                        bb = b0 + SEG_B[s] * b_ps + 4 * j
                        for kk in range(nk):
                            t = s * nk + kk  # chunk t of the next block's B: piece, step, half
                            p, rem = t // (2 * nk), t % (2 * nk)
                            _prefetch16(b0 + p * b_ps + (rem // 2) * 16 * b_ld + 4 * jn + (rem % 2) * 64, b_ld)
                            _depth_2x2(aa + kk * 64, a_ld, bb + kk * 16 * b_ld, b_ld, 32)
                    _store_2x2(c0 + i * c_ld + 4 * j, c_ld)
                continue
            for j in range(0, N, 16):
                _zero0()
                _zero1()
                if variant == 1:
                    _half_db(a0, a_ps, a_ld, b0, b_ps, b_ld, i, j, nk)
                else:
                    _block_kouter(a0, a_ps, a_ld, b0, b_ps, b_ld, i, j, nk)
                _store0(c0 + i * c_ld + 4 * j, c_ld)
                _store1(c0 + (i + 16) * c_ld + 4 * j, c_ld)
    _tile_release()


@njit(nogil=True)
def peak(a, b, cfg, n):
    _tile_config(cfg.ctypes.data)
    _load4(a.ctypes.data, 64)
    _load5(a.ctypes.data + 1024, 64)
    _load6(b.ctypes.data, 64)
    _load7(b.ctypes.data + 1024, 64)
    _zero0()
    _zero1()
    _zero2()
    _zero3()
    for i in range(n):
        _dot046()
        _dot147()
        _dot256()
        _dot357()
    _tile_release()


def _aligned(nbytes):
    buf = np.zeros(nbytes + 64, np.uint8)
    s = (-buf.ctypes.data) % 64
    return buf[s : s + nbytes]


def _rows(x):
    out = F.pieces_buffer(x.shape[0], x.shape[1], np.empty(0, np.uint16))
    F.split_rows(x, out, x.shape[0], x.shape[1])
    return out


def _pairs(x):
    out = F.pieces_buffer(x.shape[0] // 2, x.shape[1], np.empty(0, np.uint32))
    F.split_pairs(x, out, x.shape[0], x.shape[1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--d", type=int, default=64, choices=(64, 128))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    ok, why = _cpu_isa.amx_tiles()
    if not ok:
        raise SystemExit(f"no AMX here: {why}")
    rng = np.random.default_rng(0)
    BK, BQ, D = 256, 128, args.d

    def f32(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    def out(m, n):
        return _aligned(4 * m * n).view(np.float32).reshape(m, n)

    cases = {
        "S = K·Qᵀ": (_rows(f32(BK, D)), _pairs(f32(D, BQ)), out(BK, BQ)),
        "dV += Pᵀ·dO": (_rows(f32(BK, BQ)), _pairs(f32(BQ, D)), out(BK, D)),
        "dQᵀ += Kᵀ·dSᵀ": (_rows(f32(D, BK)), _pairs(f32(BK, BQ)), out(D, BQ)),
        "32 × 32 × 64, L1": (_rows(f32(32, 64)), _pairs(f32(64, 32)), out(32, 32)),
    }
    cfg = tile_config()
    names = ("product", "2x1-db", "prefetch", "2x1-kouter")
    print(f"ns per tdpbf16ps, one thread, minimum of {args.rounds} rounds; D {D}")
    for case, (a, b, c) in cases.items():
        M, N = c.shape
        n_dots = 6 * (M // 16) * (N // 16) * (a.shape[2] // 32)
        reps = args.repeats * (20 if M == 32 else 1)
        ref = np.empty_like(c)
        run(a, b, ref, cfg, 0, 1)
        best = dict.fromkeys(names, np.inf)
        diff = 0.0
        for v, name in enumerate(names):
            c[:] = np.nan
            run(a, b, c, cfg, v, 1)
            if v < 3:
                assert np.array_equal(c.view(np.uint32), ref.view(np.uint32)), f"{name}: not the shipped bits"
            else:
                diff = float(np.abs(c.astype(np.float64) - ref).max() / np.abs(ref).max())
        for _ in range(args.rounds):
            for v, name in enumerate(names):
                t = time.perf_counter()
                run(a, b, c, cfg, v, reps)
                best[name] = min(best[name], (time.perf_counter() - t) / reps)
        cells = "  ".join(f"{k} {best[k] * 1e9 / n_dots:.2f}" for k in names)
        print(f"  {case:<18} ({n_dots} products): {cells}   (2x1-kouter's largest difference {diff:.1e} of max |c|)")
    a = _aligned(2048).view(np.uint16)
    b = _aligned(2048).view(np.uint16)
    a[:] = (f32(1024).view(np.uint32) >> 16).astype(np.uint16)
    b[:] = (f32(1024).view(np.uint32) >> 16).astype(np.uint16)
    peak(a, b, cfg, 10)
    best = np.inf
    for _ in range(args.rounds):
        t = time.perf_counter()
        peak(a, b, cfg, 20000)
        best = min(best, (time.perf_counter() - t) / 80000)
    print(f"  peak (loaded tiles, four accumulators): {best * 1e9:.2f}")


if __name__ == "__main__":
    main()
