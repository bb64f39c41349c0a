"""AMX tile loads and ``tdpbf16ps`` on this host, alone and mixed: TSC cycles per dot (or load).

Every operand is in L1 (a 64-byte aligned 256 KiB buffer, the same few lines reloaded).  The
forward's products (2 × 2 blocks: 4 tile loads, then 4 dots per 32-deep step) ran ≈ 25 TSC
cycles per dot in the kernel and about as slow on pieces whose operands stay in L1.  Here
dots alone and loads alone run near their throughputs, while loads and dots mixed ran at
1.5–4× the dots alone, and double-buffered operand tiles (1 × 2 blocks, step s + 1's loads
into tiles step s does not read) did not help (docs/performance-log.md, "bfloat16 forward: fusing
the exp pass …").  This host's AMX speed moved 2.5× between runs (dots alone 11.8 at 23:38,
29.0 at 23:59 on 1 Dec): compare the lines of one run only.  On 2 Dec (07:49, load 0.8) a fast moment had dots alone
13.0 and the 2 × 2 step 13.0 too (its loads hidden), the scores' pattern with its 4 stores 16–17
(a store ≈ a dot); twenty minutes earlier (load 1.3) dots 28.6 and the step 56.7: the "load →
dot switch" cost comes and goes with the host's state (docs/performance-log.md, "bfloat16 forward:
the first P·V from tile zeros …").

    PYTHONPATH=src .venv/bin/python benchmarks/bf16_amx_tile_micro.py
"""

from __future__ import annotations

import os

import numpy as np
from numba import njit

from dotattn.kernels import _cpu_amx as A
from dotattn.kernels._cpu_amx import _dot, _tile_op, _tile_zero
from dotattn.kernels._cpu_sync import _cycles
from dotattn.kernels._cpu_isa import amx_tiles

_L = [_tile_op("llvm.x86.tileloadd64", t) for t in range(8)]
_d024, _d125, _d036, _d137 = _dot(0, 2, 4), _dot(1, 2, 5), _dot(0, 3, 6), _dot(1, 3, 7)
_z0, _z1 = _tile_zero(0), _tile_zero(1)
_l2, _l3, _l4, _l5, _l6, _l7 = _L[2:]


@njit
def dots_only(n, cfg, buf, ld):
    """4 independent accumulators, operands loaded once."""
    A._tile_config(cfg.ctypes.data)
    a = buf.ctypes.data
    A._load4(a, ld)
    A._load5(a, ld)
    A._load6(a, ld)
    A._load7(a, ld)
    A._zero0()
    A._zero1()
    A._zero2()
    A._zero3()
    c0 = _cycles()
    for _ in range(n):
        A._dot046()
        A._dot147()
        A._dot256()
        A._dot357()
    c = _cycles() - c0
    A._tile_release()
    return c / (4 * n)


@njit
def loads_only(n, cfg, buf, ld):
    """Tile loads alone (cycles per load)."""
    A._tile_config(cfg.ctypes.data)
    a = buf.ctypes.data
    c0 = _cycles()
    for _ in range(n):
        A._load4(a, ld)
        A._load5(a + 16 * ld, ld)
        A._load6(a + 64, ld)
        A._load7(a + 128, ld)
    c = _cycles() - c0
    A._tile_release()
    return c / (4 * n)


@njit
def step_2x2(n, cfg, buf, ld):
    """The products' depth step (``_cpu_amx._depth_2x2``): 4 loads, 4 dots, 128 deep."""
    A._tile_config(cfg.ctypes.data)
    a = buf.ctypes.data
    A._zero0()
    A._zero1()
    A._zero2()
    A._zero3()
    c0 = _cycles()
    for _ in range(n):
        A._depth_2x2(a, ld, a + 32 * ld, ld, 128)
    c = _cycles() - c0
    A._tile_release()
    return c / (16 * n)


@njit
def b_resident(n, cfg, buf, ld):
    """B tiles resident, A reloaded: 2 loads per 4 dots (the D 64 scores' scheme)."""
    A._tile_config(cfg.ctypes.data)
    a = buf.ctypes.data
    A._load6(a, ld)
    A._load7(a + 64, ld)
    A._zero0()
    A._zero1()
    A._zero2()
    A._zero3()
    c0 = _cycles()
    for _ in range(n):
        A._load4(a, ld)
        A._load5(a + 16 * ld, ld)
        A._dot046()
        A._dot147()
        A._dot256()
        A._dot357()
    c = _cycles() - c0
    A._tile_release()
    return c / (4 * n)


@njit
def double_buffered_1x2(n, cfg, buf, ld):
    """C tiles 0, 1; A tiles 2/3 and B tiles 4, 5/6, 7 alternating between steps."""
    A._tile_config(cfg.ctypes.data)
    a = buf.ctypes.data
    _z0()
    _z1()
    c0 = _cycles()
    for _ in range(n):
        _l2(a, ld)
        _l4(a + 64, ld)
        _l5(a + 128, ld)
        _d024()
        _d125()
        _l3(a + 16 * ld, ld)
        _l6(a + 192, ld)
        _l7(a + 256, ld)
        _d036()
        _d137()
    c = _cycles() - c0
    A._tile_release()
    return c / (4 * n)


@njit
def step_2x2_stores(n, cfg, buf, ld):
    """The D 128 score product's pattern: 4 tile zeros, 4 depth steps (16 loads, 16 dots), 4
    tile stores (to L1 here; the kernel's Sᵀ lies in L2)."""
    A._tile_config(cfg.ctypes.data)
    a = buf.ctypes.data
    c0 = _cycles()
    for _ in range(n):
        A._zero0()
        A._zero1()
        A._zero2()
        A._zero3()
        A._depth_2x2(a, ld, a + 32 * ld, ld, 128)
        A._store_2x2(a + 64 * ld, ld)
    c = _cycles() - c0
    A._tile_release()
    return c / (16 * n)


@njit
def step_interleaved(n, cfg, buf, ld):
    """:func:`step_2x2` with each next-step load issued as soon as its tile's last dot is
    (d046 d256 L6 d147 L4 d357 L5 L7): no gain (2 Dec 07:2x, 55.0 against 56.7)."""
    A._tile_config(cfg.ctypes.data)
    a = buf.ctypes.data
    b = a + 32 * ld
    A._zero0()
    A._zero1()
    A._zero2()
    A._zero3()
    A._load4(a, ld)
    A._load5(a + 16 * ld, ld)
    A._load6(b, ld)
    A._load7(b + 64, ld)
    c0 = _cycles()
    for _ in range(n):
        for kk in range(0, 128, 32):
            A._dot046()
            A._dot256()
            A._load6(b + (kk // 2) * ld, ld)
            A._dot147()
            A._load4(a + kk * 2, ld)
            A._dot357()
            A._load5(a + 16 * ld + kk * 2, ld)
            A._load7(b + (kk // 2) * ld + 64, ld)
    c = _cycles() - c0
    A._tile_release()
    return c / (16 * n)


def main() -> None:
    ok, why = amx_tiles()
    if not ok:
        raise SystemExit(f"no AMX here: {why}")
    cfg = A.tile_config()
    raw = np.zeros(256 * 1024 // 4 + 16, np.float32)
    skip = (-raw.ctypes.data) % 64 // 4
    buf = raw[skip : skip + 256 * 1024 // 4]  # 64-byte aligned: a tile row split over two lines runs slower
    assert buf.ctypes.data % 64 == 0
    print(f"TSC cycles per dot (per load for loads_only), operands in L1, min / median of 41 runs of 20000 "
          f"steps (the TSC counts time the thread was not running: the minimum is the figure); load {os.getloadavg()[0]:.2f}")
    fns = (dots_only, loads_only, step_2x2, b_resident, double_buffered_1x2, step_2x2_stores, step_interleaved)
    for f in fns:
        f(10, cfg, buf, 256)
    runs = {f.__name__: [] for f in fns}
    order = np.random.default_rng(0)
    for _ in range(41):
        for i in order.permutation(len(fns)):
            runs[fns[i].__name__].append(fns[i](20000, cfg, buf, 256))
    for name, r in runs.items():
        print(f"  {name:<22} {min(r):6.1f} {np.median(r):6.1f}")


if __name__ == "__main__":
    main()
