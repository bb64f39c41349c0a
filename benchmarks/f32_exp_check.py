"""float32 2**x of the tile passes: the 16-lane form (``_cpu_simd.exp2_tile16``) against its
plain-loop twin ``_cpu_primitives._exp2_one`` (must be the same bits), and both forms' error
against float64 over a dense grid of x in (−125.5, 0] (the bit-add form before 2 Dec: 2.6 ulp),
special values (±0, ±inf, NaN, the flush band, positive x), and the instructions of the pass.
``--portable``: the form compiled where the CPU lacks AVX-512 DQ (roundeven, ldexp, a select)
instead of ``vreduceps``/``vscalefps`` — the same bits.  Scratch cache directories as in
``f32_exp_pass.py`` (with ``--portable`` they must be: the kernels' cache keys do not see it).

    DOTATTN_PRECOMPILED_DIR=/tmp/x NUMBA_CACHE_DIR=/tmp/y PYTHONPATH=src \
        .venv/bin/python benchmarks/f32_exp_check.py
"""
import collections, re, sys

import numpy as np
from numba import njit
from dotattn.kernels import _cpu_simd as S, _cpu_primitives as P

if "--portable" in sys.argv:
    S.has_scalef = lambda: False

@njit(cache=False)
def vec_pass(ST, mul, sub):
    BK, BQ = ST.shape
    S.exp2_tile16(ST, mul, sub, sub, BQ // 16, False, P._NO_PREFETCH)

@njit(cache=False, fastmath={"contract", "afn", "nsz"})
def twin_pass(ST, mul, sub):
    BK, BQ = ST.shape
    for c in range(BK):
        row = ST[c]
        for r in range(BQ):
            row[r] = P._exp2_one(row[r], mul, sub[r])

@njit(cache=False, fastmath={"contract", "afn", "nsz"})
def old_twin(ST, mul, sub):
    BK, BQ = ST.shape
    for c in range(BK):
        row = ST[c]
        for r in range(BQ):
            xc = max(row[r] * mul - sub[r], np.float32(-127.0))
            n = np.floor(xc + np.float32(0.5))
            e = np.int32(n)
            p = P.exp2_fraction(xc - n)
            bits = np.int32(np.float32(p).view(np.int32) + (e << 23))
            row[r] = np.int32(bits).view(np.float32) if e > -127 else np.float32(0.0)

def run(fn, x):
    n = x.size; pad = (-n) % 16
    xs = np.concatenate([x, np.zeros(pad, np.float32)]).reshape(-1, 16).copy()
    sub = np.zeros(16, np.float32)
    fn(xs, np.float32(1.0), sub)
    return xs.reshape(-1)[:n]

# dense grid of x in [-126, 0]: all float32 in [-1, 0] with step, plus a uniform dense grid
rng = np.random.default_rng(0)
grid = np.concatenate([
    -np.linspace(0, 126, 40_000_001, dtype=np.float64).astype(np.float32),
    -np.abs(rng.random(5_000_000, dtype=np.float32)) * np.float32(2.0) ** rng.integers(-30, 7, 5_000_000).astype(np.float32),
    np.array([0.0, -0.0, -1e-30, -1e-8, -0.5, -1, -125.9999, -126.0, -126.00002, -126.4, -126.5, -126.6, -127, -127.5, -200, -np.inf, np.nan, 1.0, 7.9, 8.0, 100.0, 127.9, 128.0, 1e9, 3e9, np.inf], np.float32),
])
grid = grid[(grid >= -126) | ~np.isfinite(grid) | (grid > 0) | (grid < -126)]
v = run(vec_pass, grid)
t = run(twin_pass, grid)
o = run(old_twin, grid)
same = (v.view(np.int32) == t.view(np.int32)) | (np.isnan(v) & np.isnan(t))
print("vector vs twin: differing", int((~same).sum()), "of", grid.size)
if (~same).any():
    idx = np.nonzero(~same)[0][:10]
    print(list(zip(grid[idx], v[idx], t[idx])))
sel = np.isfinite(grid) & (grid > -125.5) & (grid <= 0)
ref = np.exp2(grid[sel].astype(np.float64))
for name, y in (("new", v), ("old", o)):
    yy = y[sel].astype(np.float64)
    rel = np.abs(yy / ref - 1)
    ulp = np.abs(yy - ref) / np.spacing(ref.astype(np.float32)).astype(np.float64)
    print(f"{name}: max rel {rel.max():.3e} (at x={grid[sel][rel.argmax()]!r}), max ulp {ulp.max():.3f}, mean ulp {ulp.mean():.4f}")
special = grid[-26:]
print("special x:", special)
print("new:", run(vec_pass, special))
print("twin:", run(twin_pass, special))
print("old:", run(old_twin, special))
# the band the new form flushes: (-126, -125.5]
band = np.isfinite(grid) & (grid > -126) & (grid <= -125.5)
refb = np.exp2(grid[band].astype(np.float64))
print("band (-126,-125.5]: true 2**x in", refb.min(), refb.max(), "; old max rel there", np.abs(o[band]/refb-1).max(), "; new gives", np.unique(v[band]))
# asm of the vector pass: instruction counts in the inner loop
asm = vec_pass.inspect_asm(vec_pass.signatures[0])
ins = collections.Counter(re.findall(r"^\s+(v\w+)", asm, re.M))
print({k: ins[k] for k in sorted(ins) if k.startswith(('vreduce','vscalef','vrndscale','vfmadd','vcvt','vpslld','vpadd','vmax','vsub','vcmp'))})
