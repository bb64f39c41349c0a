"""The lean float32 decode item against the current kernel, C's item order and its own passes
(docs/decoding-log.md, "The lean float32 item, built and measured").

FILE is a copy of ``_cpu_decode_kernels.py`` that has the lean item (``_scores_lean32``, LEAN32;
commit 8ee3d7b, reverted by the next one):

    git show 8ee3d7b:src/dotattn/kernels/_cpu_decode_kernels.py > /tmp/lean.py
    PYTHONPATH=src python benchmarks/decode_lean_item.py /tmp/lean.py 9

On the bench's B8 4k float32 cache (one query, Hq 32, Hkv 8, D 128), call by call in a random
order per round, prints the median ms of:

- ``scores R,D const`` / ``scores R,D args`` / ``scores row loop, args``: the lean scores pass
  alone over every item's K on one thread, called with R = 4 and D = 128 as constants or as
  arguments, and (the last) from a second copy written here with ``LEAN32_FIXED_ROWS = False``:
  R = 4 through the row-group loop, as every R is there;
- ``passes K then V 1t/2t``: per item the lean scores pass, then the P·V pass (``_pv16``), no
  softmax (constant weights), items in address order — two threads each taking one half;
- ``C item 1t/2t``: ``decode_access_patterns.c``'s item order (demand reads only);
- ``dotattn lean 1t/2t`` and ``dotattn current 1t/2t``: ``attention_with_kvcache`` with the copy's
  kernels and with the imported ones, on one thread (``numba.set_num_threads(1)``) or two.

Run under ``flock /tmp/bench.lock`` on a shared machine; needs gcc and AVX-512F (the C).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # spinning OpenMP threads would take the cores

import ctypes  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numba  # noqa: E402
import numpy as np  # noqa: E402

from decode_ab import kernel_versions  # noqa: E402  (this script's folder is on sys.path)
from decode_access_patterns import CHUNK, PATTERNS, build  # noqa: E402

import dotattn  # noqa: E402
from dotattn import bench_decode as bd  # noqa: E402
from dotattn.kernels import cpu_decode  # noqa: E402

B, CONTEXT, R, D = 8, 4096, 4, 128


def drivers(lean, pv):
    """Numba loops over the cache's items calling the copy's passes."""

    @numba.njit(nogil=True)
    def scores_const(q, kflat, nitems, work, offs):
        c = 0.0
        qf = work[: 4 * 128]
        s = work[4 * 128 : 4 * 128 + 4 * CHUNK]
        mx = work[4096:4100]
        for it in range(nitems):
            for t in range(CHUNK):
                offs[t] = (it * CHUNK + t) * 128
            for i in range(4 * 128):
                qf[i] = q[i]
            c += lean(qf, 4, 128, kflat, offs, CHUNK, s, CHUNK, mx)
        return c

    @numba.njit(nogil=True)
    def scores_args(q, kflat, nitems, work, offs, rows, dim):
        c = 0.0
        qf = work[: rows * dim]
        s = work[rows * dim : rows * dim + rows * CHUNK]
        mx = work[4096 : 4096 + rows]
        for it in range(nitems):
            for t in range(CHUNK):
                offs[t] = (it * CHUNK + t) * dim
            for i in range(rows * dim):
                qf[i] = q[i]
            c += lean(qf, rows, dim, kflat, offs, CHUNK, s, CHUNK, mx)
        return c

    @numba.njit(nogil=True, parallel=True)
    def passes(q, kflat, vflat, nitems, works, offss, nthreads):
        total = 0.0
        for th in numba.prange(nthreads):
            per = nitems // nthreads
            work, offs = works[th], offss[th]
            qf = work[: R * D]
            s = work[R * D : R * D + R * CHUNK]
            mx = work[4096 : 4096 + R]
            o = work[8192 : 8192 + R * D]
            c = 0.0
            for it in range(th * per, th * per + per):
                for t in range(CHUNK):
                    offs[t] = (it * CHUNK + t) * D
                for i in range(R * D):
                    qf[i] = q[i]
                c += lean(qf, R, D, kflat, offs, CHUNK, s, CHUNK, mx)
                for i in range(R * CHUNK):
                    s[i] = 1.0 / CHUNK
                pv(s, CHUNK, R, CHUNK, vflat, 0, offs, D, o, vflat, offs, 0, D)
                c += o[0]
            total += c
        return total

    return scores_const, scores_args, passes


def main() -> None:
    if len(sys.argv) < 2:
        print(__doc__)
        raise SystemExit(2)
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 9
    source = Path(sys.argv[1]).read_text()
    if "LEAN32_FIXED_ROWS = True" not in source:
        raise SystemExit(f"{sys.argv[1]}: not a kernel copy with the lean item (see the docstring)")
    loop_copy = Path(tempfile.mkdtemp(prefix="dotattn-lean-")) / "lean_row_loop.py"
    loop_copy.write_text(source.replace("LEAN32_FIXED_ROWS = True", "LEAN32_FIXED_ROWS = False", 1))
    mods = kernel_versions([sys.argv[1], str(loop_copy)])
    name, mod = next(iter(mods.items()))
    scores_const, scores_args, passes = drivers(mod._scores_lean32, mod._pv16)
    _, scores_loop, _ = drivers(mods["lean_row_loop"]._scores_lean32, mod._pv16)
    dll = build()
    gomp = ctypes.CDLL("libgomp.so.1")
    q, kc, vc = bd.case_inputs(B, CONTEXT, "float32")
    kflat, vflat = kc.reshape(-1), vc.reshape(-1)
    nitems = kc.size // (CHUNK * D)
    rng = np.random.default_rng(0)
    qrows = np.ascontiguousarray(rng.standard_normal(R * D).astype(np.float32) * np.float32(0.05))
    works = np.zeros((2, 16384), np.float32)
    offss = np.zeros((2, CHUNK), np.int64)
    lengths = np.full(B, CONTEXT)
    current = cpu_decode.K

    def c_item(threads):
        def run():
            gomp.omp_set_num_threads(threads)
            dll.run(kc.ctypes.data, vc.ctypes.data, qrows.ctypes.data, nitems, CHUNK, PATTERNS["item"])
        return run

    def ours(kernels, threads):
        def run():
            cpu_decode.K = kernels
            numba.set_num_threads(threads)
            try:
                dotattn.attention_with_kvcache(q, kc, vc, cache_lengths=lengths, implementation="cpu")
            finally:
                numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
                cpu_decode.K = current
        return run

    runs = {
        "scores R,D const": lambda: scores_const(qrows, kflat, nitems, works[0], offss[0]),
        "scores R,D args": lambda: scores_args(qrows, kflat, nitems, works[0], offss[0], R, D),
        "scores row loop, args": lambda: scores_loop(qrows, kflat, nitems, works[0], offss[0], R, D),
        "passes K then V 1t": lambda: passes(qrows, kflat, vflat, nitems, works, offss, 1),
        "passes K then V 2t": lambda: passes(qrows, kflat, vflat, nitems, works, offss, 2),
        "C item 1t": c_item(1),
        "C item 2t": c_item(2),
        "dotattn lean 1t": ours(mod, 1),
        "dotattn lean 2t": ours(mod, 2),
        "dotattn current 1t": ours(current, 1),
        "dotattn current 2t": ours(current, 2),
    }
    for run in runs.values():  # compiles, then warms
        run()
        run()
    times = {k: [] for k in runs}
    for _ in range(rounds):
        order = list(runs)
        random.shuffle(order)
        for k in order:
            runs[k]()
            t = time.perf_counter()
            runs[k]()
            times[k].append(time.perf_counter() - t)
    print(f"B{B} {CONTEXT // 1024}k float32, {name}, {rounds} rounds, load {os.getloadavg()[0]:.2f}")
    for k, v in times.items():
        nbytes = kc.nbytes if k.startswith("scores") else 2 * kc.nbytes
        med = statistics.median(v)
        print(f"  {k:20s} {med * 1e3:7.2f} ms  {nbytes / med / 1e9:5.1f} GB/s")


if __name__ == "__main__":
    main()
