"""The decode kernel's split size (keys per chunk), A/B in one process (docs/decoding-log.md).

The split is a run-time argument of the ``cpu`` decode kernel, so this patches
``cpu_decode.SPLIT_SIZE`` between calls (the library's value is
:data:`dotattn.decode_semantics.SPLIT_SIZE`, shared by every backend and by the bitwise
batch-invariance promise: this is a measurement, not a setting).  The bench's inputs (one query,
Hq 32, Hkv 8, D 128; ``--paged`` the bench's paged cache), each timed call after 0.15 s of calls,
the sizes and torch SDPA's fastest decode form in a random order per round; prints the largest
difference of each size's output from the first size's (other chunkings round differently) and
the medians with × SDPA.  Under ``flock /tmp/bench.lock`` on a shared machine:

    PYTHONPATH=src python benchmarks/decode_split_ab.py 1 4096 float16 31 256,512,1024 [--paged]
"""

from __future__ import annotations

import random
import statistics
import sys
import time

import numpy as np

from decode_ab import _load  # (this folder is on sys.path when a script here runs)

from dotattn import bench_decode as bd
from dotattn.kernels import cpu_decode


def _timed(fn, warm_s: float = 0.15) -> float:
    end = time.perf_counter() + warm_s
    while time.perf_counter() < end:
        fn()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if len(args) != 5:
        print(__doc__)
        raise SystemExit(2)
    B, ctx, dtype, rounds = int(args[0]), int(args[1]), args[2], int(args[3])
    sizes = [int(x) for x in args[4].split(",")]
    paged = "--paged" in sys.argv
    q, kc, vc = bd.case_inputs(B, ctx, dtype)
    run = bd._make_peer("dotattn-paged" if paged else "dotattn", B, ctx, dtype, q, kc, vc)
    sdpa = bd._make_peer("torch-sdpa", B, ctx, dtype, q, kc, vc)
    outs = {}
    for s in sizes:
        cpu_decode.SPLIT_SIZE = s
        outs[s] = np.asarray(run(), dtype=np.float64)
    first = outs[sizes[0]]
    print("largest difference from the first size:", {s: float(np.abs(o - first).max()) for s, o in outs.items()})
    times: dict = {s: [] for s in [*sizes, "sdpa"]}
    load0 = _load()
    for _ in range(rounds):
        order = [*sizes, "sdpa"]
        random.shuffle(order)
        for s in order:
            if s == "sdpa":
                times[s].append(_timed(sdpa))
            else:
                cpu_decode.SPLIT_SIZE = s
                times[s].append(_timed(run))
    med = {s: statistics.median(v) * 1e3 for s, v in times.items()}
    print(f"B{B} {ctx} {dtype}{' paged' if paged else ''}, {rounds} rounds, load {load0} -> {_load()}: "
          + "  ".join(f"{s}: {m:.3f} ms (x SDPA {med['sdpa'] / m:.2f})" for s, m in med.items()))


if __name__ == "__main__":
    main()
