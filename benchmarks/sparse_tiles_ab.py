"""Windows and packed documents: forward tile sizes alternated in one process (issue 13 §2).

Usage: PYTHONPATH=src python benchmarks/sparse_tiles_ab.py [--rounds 9] [--cases docs8,docs16,...]
       [--tiles 128x128,128x512,...] [--dtype float32]

Each round calls ``cpu.forward(call, block_size=tiles)`` once per tile size (``auto``: the
backend's own choice), in an order shuffled per round, after one untimed call; prints medians
(ms), the interquartile range and each tile's median ratio to the first tile size listed.
Cases: ``docs<N>`` (N equal documents), ``uneven`` (documents of :data:`UNEVEN` lengths, all on
128s, not all on 256s), ``window<W>`` (window (W, W)); L4096, H8 D64 as `dotattn bench --shapes
issue` unless ``--H``/``--D`` say otherwise.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import numpy as np

from dotattn import semantics
from dotattn.kernels import cpu

UNEVEN = [640, 384, 512, 256, 768, 128, 896, 512]  # 4096 keys, boundaries on 128s


def make_call(case: str, dtype: str, L: int = 4096, H: int = 8, D: int = 64):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, H, L, D), dtype=np.float32) for _ in range(3))
    if dtype != "float32":
        import ml_dtypes

        q, k, v = (x.astype(ml_dtypes.bfloat16) for x in (q, k, v))
    if case.startswith("docs"):
        n = int(case[4:])
        seg = np.repeat(np.arange(n), L // n)[None]
        return semantics.normalize(q, k, v, segment_ids=seg)
    if case == "uneven":
        seg = np.repeat(np.arange(len(UNEVEN)), UNEVEN)[None]
        return semantics.normalize(q, k, v, segment_ids=seg)
    if case.startswith("window"):
        w = int(case[6:])
        return semantics.normalize(q, k, v, window=(w, w))
    raise ValueError(case)


def tiles_of(s: str):
    return None if s == "auto" else tuple(int(x) for x in s.split("x"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--cases", default="docs8,docs16,docs32,uneven,window256")
    ap.add_argument("--tiles", default="128x128,128x256,128x512,256x512")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--pause", type=float, default=0.05, help="seconds before each timed call (the bench: 0.3)")
    ap.add_argument("--H", type=int, default=8)
    ap.add_argument("--D", type=int, default=64)
    a = ap.parse_args()
    tiles = a.tiles.split(",")
    rnd = random.Random(1)
    for case in a.cases.split(","):
        call = make_call(case, a.dtype, H=a.H, D=a.D)
        for t in tiles:  # warm-up (and compile) each
            cpu.forward(call, block_size=tiles_of(t))
        times = {t: [] for t in tiles}
        for _ in range(a.rounds):
            order = tiles[:]
            rnd.shuffle(order)
            for t in order:
                bs = tiles_of(t)
                time.sleep(a.pause)
                t0 = time.perf_counter()
                cpu.forward(call, block_size=bs)
                times[t].append((time.perf_counter() - t0) * 1e3)
        base = statistics.median(times[tiles[0]])
        line = [f"{case:10s}"]
        for t in tiles:
            xs = sorted(times[t])
            med = statistics.median(xs)
            q1, q3 = xs[len(xs) // 4], xs[(3 * len(xs)) // 4]
            line.append(f"{t} {med:6.1f} [{q1:.1f}-{q3:.1f}] {med / base:.2f}")
        print(" | ".join(line), flush=True)


if __name__ == "__main__":
    main()
