"""The float32 exp pass alone: the bit-add form (``_cpu_simd._exp2_vector``, the tile passes'
2**x before 2 Dec) against ``vreduceps``/``vscalefps`` (``_exp2_unit_vector``), one 256-query ×
512-key tile (Sᵀ of 512 × 256, the MKL route's tile), alternated in one process, random order
per round, thread CPU time, medians.

* fwd: ``exp2_max_tile16`` over blocks of 32 keys (the forward's lazy pass: exp, max, sum);
* bwd: ``exp2_tile16`` over the tile (the backward's P rebuilt from the LSE);
* bwd copy+exp: the tile refreshed from a copy first (dense, and half its queries' keys −inf:
  masked lanes must take no microcode assist), and the copy alone.

The two forms are compiled into the same process by swapping ``_cpu_simd._exp2_unit_vector``
before each set's first call; run with ``DOTATTN_PRECOMPILED_DIR`` and ``NUMBA_CACHE_DIR``
pointing at scratch directories (the passes here are not cached, the kernels' helpers may be).

    DOTATTN_PRECOMPILED_DIR=/tmp/x NUMBA_CACHE_DIR=/tmp/y PYTHONPATH=src \
        .venv/bin/python benchmarks/f32_exp_pass.py [rounds]
"""
import sys, time, random, numpy as np
from numba import njit
from dotattn.kernels import _cpu_simd as S, _cpu_primitives as P

def make():
    @njit(cache=False)
    def fwd(ST, mul, sub, tsum, tmax, reps):
        BK, BQ = ST.shape
        part = np.empty(BQ, dtype=np.float32)
        for _ in range(reps):
            tsum[:] = 0.0
            tmax[:] = -np.inf
            for c0 in range(0, BK, 32):
                part[:] = 0.0
                S.exp2_max_tile16(ST[c0:c0 + 32], mul, sub, part, tmax, BQ // 16, P._NO_PREFETCH)
                for r in range(BQ):
                    tsum[r] += part[r]
    @njit(cache=False)
    def bwd(ST, mul, sub, reps):
        BK, BQ = ST.shape
        for _ in range(reps):
            S.exp2_tile16(ST, mul, sub, sub, BQ // 16, False, P._NO_PREFETCH)
    @njit(cache=False)
    def bwd_copy(ST, SRC, mul, sub, reps):
        BK, BQ = ST.shape
        for _ in range(reps):
            ST[:, :] = SRC
            S.exp2_tile16(ST, mul, sub, sub, BQ // 16, False, P._NO_PREFETCH)
    @njit(cache=False)
    def copy_only(ST, SRC, reps):
        for _ in range(reps):
            ST[:, :] = SRC
    return fwd, bwd, bwd_copy, copy_only

BK, BQ = 512, 256
rng = np.random.default_rng(1)
ST = rng.standard_normal((BK, BQ), dtype=np.float32) * 3
SRC = ST.copy()
MASKED = ST.copy(); MASKED[:, : BQ // 2] = -np.inf  # half the queries' keys masked (−inf scores)
sub = np.full(BQ, 10.0, np.float32)
mul = np.float32(1.4426950408889634)
tsum = np.zeros(BQ, np.float32); tmax = np.zeros(BQ, np.float32)

reps = 20
def warm(fs):
    fwd, bwd, bwd_copy, copy_only = fs
    fwd(ST, mul, sub, tsum, tmax, 1); bwd(ST, mul, sub, 1); bwd_copy(ST, SRC, mul, sub, 1); copy_only(ST, SRC, 1)
new = make(); warm(new)  # compiled at the first call: with the new form
S._exp2_unit_vector, keep = S._exp2_vector, S._exp2_unit_vector
old = make(); warm(old)  # with the old form
S._exp2_unit_vector = keep
cases = {
    "fwd (exp+max+sum)": lambda fs: fs[0](ST, mul, sub, tsum, tmax, reps),
    "bwd (exp)": lambda fs: fs[1](ST, mul, sub, reps),
    "bwd copy+exp, dense": lambda fs: fs[2](ST, SRC, mul, sub, reps),
    "bwd copy+exp, half -inf": lambda fs: fs[2](ST, MASKED, mul, sub, reps),
    "copy only": lambda fs: fs[3](ST, SRC, reps),
}
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 9
res = {(c, v): [] for c in cases for v in ("old", "new")}
for _ in range(rounds):
    for c, fn in cases.items():
        order = ["old", "new"]; random.shuffle(order)
        for v in order:
            fs = old if v == "old" else new
            t0 = time.thread_time_ns(); fn(fs); t1 = time.thread_time_ns()
            res[(c, v)].append((t1 - t0) / reps / 1e3)
for c in cases:
    o, n = np.median(res[(c, "old")]), np.median(res[(c, "new")])
    print(f"{c:26s} old {o:8.2f} us  new {n:8.2f} us  new/old {n/o:.3f}   (old min {min(res[(c,'old')]):.2f}, new min {min(res[(c,'new')]):.2f})")
