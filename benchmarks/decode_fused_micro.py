"""One-thread micro-benchmark of the fused 16-bit decode pass (docs/decoding.md, issue 9 §2).

Calls ``_fused_simd`` (the ``_fused16`` pass) directly from a Numba loop on the bench's B1 layout
(Hkv 8 heads of CONTEXT keys, D 128, R = 4 folded query rows, chunks of 256 keys, no next item
asked for: B1 4k's items), for each FILE (a copy of ``_cpu_decode_kernels.py``, ``new`` = the
imported one), versions alternated in a random order per round; prints the median and min over
rounds of ns per key and K/V head (each round: REPS passes over the items), for ``l2`` (one item,
256 keys, repeated: 128 KB of K/V in L2) and ``l3`` (all CONTEXT/256 × 8 items: B1 4k's 16 MB),
and whether the versions' outputs agree bit for bit.  Under ``flock /tmp/bench.lock``:

    PYTHONPATH=src python benchmarks/decode_fused_micro.py float16 4096 21 /tmp/old.py new [--rows=R]

(``--rows``: the query rows per K/V head, 4 by default; SmolLM2-135M's group is 3.)
"""

from __future__ import annotations

import random
import statistics
import sys
import time

import numpy as np
from numba import njit

from decode_ab import kernel_versions

from dotattn.semantics import BFLOAT16

HKV, D, R, SPLIT = 8, 128, 4, 256


def make_runner(m):
    fused_any = m._fused_simd
    stats = m.FUSED_STATS
    if fused_any.__code__.co_argcount == 21:  # softcap and ALiBi's arguments (4 Dec 2026): none here

        @njit(inline="always")
        def fused(q, R, D, flat, kind, offs, n, s, ns, vflat, voffs, Dv, o, m, st, pk, pv, npf):
            fused_any(q, R, D, flat, kind, offs, n, s, ns, vflat, voffs, Dv, o, m, st, pk, pv, npf, 0.0, s[:0], False)
    else:
        fused = fused_any

    @njit(cache=False)
    def run(q, kflat, vflat, kind, offs, items, reps, s, o, mrow, st, pk, out, R, D):
        # R and D are arguments, as in the kernel (module constants would be frozen into this loop,
        # and LLVM would unroll D loops the kernel never sees unrolled)
        n = SPLIT
        for _ in range(reps):
            for it in range(items.shape[0]):
                i = items[it]
                hk = i // (offs.shape[0] // (HKV * SPLIT))
                ko = offs[i * n : (i + 1) * n]
                o[:] = 0.0
                for r in range(R):
                    mrow[r] = -np.inf
                st[:] = 0.0
                fused(q[hk * R * D : (hk + 1) * R * D], R, D, kflat, kind, ko, n, s, n, vflat, ko, D, o, mrow, st, pk, pk, 0)
                out[i] += o[0] + o[R * D - 1]
        return stats

    return run


def main() -> None:
    if len(sys.argv) < 5:
        print(__doc__)
        raise SystemExit(2)
    global R
    rows = [a for a in sys.argv[1:] if a.startswith("--rows=")]
    if rows:
        R = int(rows[0].split("=")[1])
    argv = [a for a in sys.argv if not a.startswith("--rows=")]
    dt, ctx, rounds = argv[1], int(argv[2]), int(argv[3])
    mods = kernel_versions(argv[4:])
    d = BFLOAT16 if dt == "bfloat16" else np.dtype(dt)
    kind = {"float16": 2, "bfloat16": 1, "float32": 0}[dt]  # float32: the FUSED32 pass on 4-byte rows
    bits = np.float32 if dt == "float32" else np.uint16
    rng = np.random.default_rng(0)
    k = rng.standard_normal((HKV, ctx, D), dtype=np.float32).astype(d).view(bits).ravel()
    v = rng.standard_normal((HKV, ctx, D), dtype=np.float32).astype(d).view(bits).ravel()
    q = (rng.standard_normal(HKV * R * D, dtype=np.float32) / np.sqrt(D)).astype(np.float32)
    offs = ((np.arange(HKV)[:, None] * ctx + np.arange(ctx)[None, :]) * D).astype(np.int64).ravel()
    nitems = HKV * ctx // SPLIT
    cases = {"l2": (np.zeros(1, np.int64), max(1, 4096 // SPLIT) * 8), "l3": (np.arange(nitems, dtype=np.int64), 1)}
    runners = {name: make_runner(m) for name, m in mods.items()}
    bufs = {}
    for name in mods:
        st = np.zeros(R * mods[name].FUSED_STATS, np.float32)
        bufs[name] = (np.zeros(R * SPLIT, np.float32), np.zeros(R * D, np.float32), np.zeros(R, np.float32), st,
                      np.zeros(1, np.int64))
    from dotattn.kernels import cpu_decode
    k4, v4 = k.view(d).reshape(1, HKV, ctx, D), v.view(d).reshape(1, HKV, ctx, D)
    kflat, kst, _ = cpu_decode._flat(k4, k4)
    vflat, vst, _ = cpu_decode._flat(v4, v4)
    q4 = (rng.standard_normal((1, HKV * R, 1, D), dtype=np.float32) * np.float32(D**-0.5))
    table = np.zeros((1, 1), np.int64)
    kvlen = np.full(1, ctx, np.int64)
    slopes = np.zeros((1, 1), np.float32)

    def serial(m):
        return m.run_serial(q4, kflat, kst, vflat, vst, table, ctx, kind, kvlen, SPLIT, True, -1, -1, 0.0, 1.0, slopes, False, D)

    print("load", open("/proc/loadavg").read().split()[0], "dtype", dt, "ctx", ctx)
    outs = {}
    for name, run in runners.items():
        s, o, mrow, st, pk = bufs[name]
        for case, (items, reps) in cases.items():
            run(q, k, v, kind, offs, items, 1, s, o, mrow, st, pk, np.zeros(nitems, np.float64), R, D)
        outs[name] = (o.copy(), serial(mods[name])[0])
    names = list(mods)
    same = all(np.array_equal(outs[names[0]][0], outs[x][0]) and np.array_equal(outs[names[0]][1], outs[x][1]) for x in names)
    jobs = [(c, n) for c in list(cases) + ["run_serial"] for n in names]
    res = {j: [] for j in jobs}
    for _ in range(rounds):
        random.shuffle(jobs)
        for case, name in jobs:
            if case == "run_serial":
                ts = []
                for _ in range(3):
                    t = time.perf_counter()
                    serial(mods[name])
                    ts.append(time.perf_counter() - t)
                res[(case, name)].append(min(ts) * 1e9 / (HKV * ctx))
                continue
            items, reps = cases[case]
            s, o, mrow, st, pk = bufs[name]
            out = np.zeros(nitems, np.float64)
            t = time.perf_counter()
            runners[name](q, k, v, kind, offs, items, reps, s, o, mrow, st, pk, out, R, D)
            res[(case, name)].append((time.perf_counter() - t) * 1e9 / (reps * len(items) * SPLIT))
    for case in list(cases) + ["run_serial"]:
        base = statistics.median(res[(case, names[0] if False else list(mods)[0])])
        for name in mods:
            r = res[(case, name)]
            med = statistics.median(r)
            print(f"{case:>10} {name:>12}: median {med:6.2f} ns/key/head  min {min(r):6.2f}  x{base / med:.3f}")
    print("same bits", same, "load", open("/proc/loadavg").read().split()[0])


if __name__ == "__main__":
    main()
