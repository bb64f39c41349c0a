"""The float32 fused decode pass alone, against C's item order, over the bench's B8 4k cache.

    flock /tmp/bench.lock env PYTHONPATH=src python benchmarks/decode_fused_pass_alone.py [FILE ...]

Each FILE is a copy of ``src/dotattn/kernels/_cpu_decode_kernels.py`` (``new``, or no FILE: the
imported one).  A Numba driver calls its ``_fused_simd`` (the pass that ``_chunk`` runs for a
float32 chunk whose rows see all its keys) item by item over the whole cache — 256 keys of one
(sequence, K/V head), 4 query rows, D 128, the row offsets written per item as ``_fill_offsets``
does, no next item asked for — on one thread, and on two (halves, a Python thread each); beside
it ``decode_access_patterns.c``'s item order (K of an item, then its V; no requests) and its
scores alone, on one and two OpenMP threads.  Rounds in a shuffled order; prints medians (best
of 3 calls a round).  No ``run_items``, tickets, merges or partner threads: what is left is the
pass's own reading of the memory.  Then each version's pass over 4 items held in the L2
(``ns a key``): its compute, for the one-thread figures' overlap.  Needs gcc (AVX-512 or AVX2: the C is GCC
vector extensions since 5 Dec 2026).
"""

from __future__ import annotations

import importlib.util
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import numpy as np  # noqa: E402
from numba import njit  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import decode_access_patterns as dap  # noqa: E402

from dotattn import bench_decode as bd  # noqa: E402
from dotattn.kernels import cpu_decode  # noqa: E402

R, D, N = 4, 128, 256  # query rows a K/V head (Hq 32 / Hkv 8), head dim, keys an item (SPLIT_SIZE)


def versions(files):
    mods = {}
    for f in files or ["new"]:
        if f == "new":
            mods["new"] = cpu_decode.K
            continue
        spec = importlib.util.spec_from_file_location("dotattn.kernels._dk_" + Path(f).stem, f)
        m = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = m
        spec.loader.exec_module(m)
        mods[Path(f).stem] = m
    return mods


def make_driver(module):
    fused = module._fused_simd

    @njit(_nrt=False, nogil=True)
    def drive(q, kf, vf, offs, voffs, s, o, m, st, ab, lo, hi, reps):
        for _ in range(reps):
            for it in range(lo, hi):
                base = it * N * D
                for t in range(N):
                    offs[t] = base + t * D
                    voffs[t] = base + t * D
                for r in range(R):
                    m[r] = -np.inf
                st[:] = 0.0
                o[:] = 0.0
                fused(q, R, D, kf, 0, offs, N, s, N, vf, voffs, D, o, m, st, offs, offs, 0, 0.0, ab, 0)

    return drive


def scratch():
    return (np.zeros(4 * N, np.int64), np.zeros(4 * N, np.int64), np.zeros(R * N, np.float32),
            np.zeros(R * D, np.float32), np.full(R, -np.inf, np.float32), np.zeros(R * 48, np.float32),
            np.zeros(8, np.float32))


def main() -> None:
    mods = versions(sys.argv[1:])
    _, kc, vc = bd.case_inputs(8, 4096, "float32")
    kf, vf = kc.reshape(-1), vc.reshape(-1)
    nitems = kf.size // (N * D)
    q = (np.random.default_rng(0).standard_normal(R * D) * D**-0.5).astype(np.float32)
    runs, drivers = {}, {}
    for name, m in mods.items():
        drive = drivers[name] = make_driver(m)
        one, other = scratch(), scratch()

        def alone(drive=drive, one=one):
            drive(q, kf, vf, *one, 0, nitems, 1)

        def halves(drive=drive, one=one, other=other):
            th = threading.Thread(target=drive, args=(q, kf, vf, *other, nitems // 2, nitems, 1))
            th.start()
            drive(q, kf, vf, *one, 0, nitems // 2, 1)
            th.join()

        runs[f"{name} pass, 1 thread"] = alone
        runs[f"{name} pass, 2 threads"] = halves
    dll = dap.build()
    rows = np.ascontiguousarray(q.reshape(R, D))

    def c_run(pattern, threads):
        def run():
            dll.omp_set_num_threads(threads)
            dll.run(kc.ctypes.data, vc.ctypes.data, rows.ctypes.data, nitems, N, pattern)
        return run

    for threads in (1, 2):
        runs[f"C item, {threads} thread{'s' if threads > 1 else ''}"] = c_run(dap.PATTERNS["item"], threads)
        runs[f"C scores only, {threads} thread{'s' if threads > 1 else ''}"] = c_run(dap.PATTERNS["scores-only"], threads)
    for run in runs.values():
        run()
        run()
    times = {name: [] for name in runs}
    order = list(runs)
    load = open("/proc/loadavg").read().split()[0]
    for _ in range(int(os.environ.get("ROUNDS", "10"))):
        random.shuffle(order)
        for name in order:
            time.sleep(0.02)
            best = []
            for _ in range(3):
                t0 = time.perf_counter()
                runs[name]()
                best.append(time.perf_counter() - t0)
            times[name].append(min(best))
    print(f"B8 4k float32 cache ({2 * kc.nbytes / 1e6:.0f} MB of K and V), load {load} → {open('/proc/loadavg').read().split()[0]}")
    for name, ts in times.items():
        med = statistics.median(ts)
        nbytes = kc.nbytes if "scores only" in name else 2 * kc.nbytes
        print(f"  {name:28s} {med * 1e3:7.2f} ms  {nbytes / med / 1e9:5.1f} GB/s")
    # the pass's compute: 4 items (1 MB of K and V, L2-resident) again and again, one thread
    small_k, small_v = kf[: 4 * N * D].copy(), vf[: 4 * N * D].copy()
    for name, drive in drivers.items():
        buf = scratch()
        drive(q, small_k, small_v, *buf, 0, 4, 1)
        best = min(_timed(drive, q, small_k, small_v, buf) for _ in range(5))
        print(f"  {name} pass, L2-resident: {best / (2000 * 4 * N) * 1e9:.2f} ns a key")


def _timed(drive, q, k, v, buf):
    t0 = time.perf_counter()
    drive(q, k, v, *buf, 0, 4, 2000)
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
