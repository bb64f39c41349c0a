"""The float32 split product with its B operand cold (from L3) or hot (L2), and in two layouts.

The backward's split products ran at 13–15 ns a ``tdpbf16ps`` in the kernel against ≈ 8.6 alone
(``f32_product_loops.py``): each key tile's task streams every query tile's pieces (Qᵀ, dOᵀ in
depth pairs; Q, dO in row pairs) from L3.  This times ``_cpu_amx_f32.product`` at the
backward's ``Sᵀ = K·Qᵀ`` shape (256 keys × 128 queries, D 128), one thread, over every query tile
of four heads in turn:

* ``wide``: B the query tile's columns of a head's pieces ``(3, D/2, L + 16)`` (the kernel's
  ``qpc``: rows 16 KiB apart);
* ``tiles``: the same pieces stored per query tile, contiguous (rows 576 bytes apart);
* ``hot``: one query tile's pieces again and again (in L2).

2 Dec 15:22 (load 1.3): wide 37.2 µs (12.1 ns a ``tdpbf16ps``), tiles 36.6, hot 26.3 — the layout
does not matter, a cold B costs ≈ 11 µs a product.

    flock /tmp/bench.lock env PYTHONPATH=src .venv/bin/python benchmarks/f32_split_cold_operand.py
"""

import time

import numpy as np
from numba import njit

from dotattn.kernels import _cpu_amx_f32 as F
from dotattn.kernels import _cpu_isa
from dotattn.kernels._cpu_amx import tile_config

if not _cpu_isa.amx_tiles()[0]:  # (also asks the OS for the tile state)
    raise SystemExit("no AMX here")
cfg = tile_config()
rng = np.random.default_rng(0)
H, L, D, BQ, BK = 4, 4096, 128, 128, 256
nqb = L // BQ
def al(shape, dt):
    n = int(np.prod(shape)) * np.dtype(dt).itemsize
    buf = np.zeros(n + 64, np.uint8); s = (-buf.ctypes.data) % 64
    return buf[s:s+n].view(dt).reshape(shape)
# wide: (H, 3, 64, L+16)
wide = al((H, 3, D // 2, L + 16), np.uint32); wide[:] = rng.integers(0, 1 << 30, wide.shape, dtype=np.uint32) & 0x3F003F00
tiles = al((H, nqb, 3, D // 2, BQ + 16), np.uint32)[..., :BQ]
for h in range(H):
    for t in range(nqb):
        tiles[h, t] = wide[h, :, :, t*BQ:(t+1)*BQ]
a = F.pieces_buffer(BK, D, np.empty(0, np.uint16)); a[:] = 0x3F00
c = al((BK, BQ), np.float32)
@njit
def run_wide(a, wide, c, cfg):
    for h in range(wide.shape[0]):
        for t in range(wide.shape[3] // 128):
            F.product(a, wide[h, :, :, t * 128:(t + 1) * 128], c, cfg)
@njit
def run_tiles(a, tiles, c, cfg):
    for h in range(tiles.shape[0]):
        for t in range(tiles.shape[1]):
            F.product(a, tiles[h, t], c, cfg)
@njit
def run_hot(a, tiles, c, cfg, n):
    for r in range(n):
        F.product(a, tiles[0, 0], c, cfg)
run_wide(a, wide, c, cfg); run_tiles(a, tiles, c, cfg); run_hot(a, tiles, c, cfg, 1)
n = H * nqb
ndots = 6 * (BK // 16) * (BQ // 16) * (D // 32)
res = {"wide": [], "tiles": [], "hot": []}
for r in range(9):
    t = time.perf_counter(); run_wide(a, wide, c, cfg); res["wide"].append((time.perf_counter() - t) / n)
    t = time.perf_counter(); run_tiles(a, tiles, c, cfg); res["tiles"].append((time.perf_counter() - t) / n)
    t = time.perf_counter(); run_hot(a, tiles, c, cfg, n); res["hot"].append((time.perf_counter() - t) / n)
for k, v in res.items():
    print(k, "median us %.1f  min %.1f  ns/tdp %.2f" % (np.median(v) * 1e6, min(v) * 1e6, np.median(v) * 1e9 / ndots))
