"""Per-core speed of the ``cpu`` split-KV decode kernel (issue 9 §2, docs/decoding.md).

One query token per sequence, Hq 32, Hkv 8, D 128, ``attention_with_kvcache(...,
implementation="cpu")`` on a contiguous cache; prints the median time of ``--repeats`` calls
after three warm-ups and the K/V bytes read per second.  The kernel uses every core it may
run on, so pin it to measure one core against two:

    taskset -c 0   .venv/bin/python benchmarks/decode_per_core.py float32 1 32768
    taskset -c 0,1 .venv/bin/python benchmarks/decode_per_core.py float16 8 4096

and ``--read`` prints the one-thread NumPy read figure (a sum over 256 MB) beside it.
Run under ``flock /tmp/bench.lock`` on a shared machine and write ``uptime`` beside figures.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import dotattn
from dotattn.semantics import BFLOAT16

HQ, HKV, D = 32, 8, 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dtype", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("batch", type=int)
    parser.add_argument("context", type=int)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--read", action="store_true", help="also time a NumPy sum over 256 MB")
    args = parser.parse_args()
    dtype = BFLOAT16 if args.dtype == "bfloat16" else np.dtype(args.dtype)
    rng = np.random.default_rng(0)
    shape = (args.batch, HKV, args.context, D)
    k = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    v = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    q = rng.standard_normal((args.batch, HQ, 1, D), dtype=np.float32)
    lengths = np.full(args.batch, args.context, dtype=np.int64)

    def step():
        return dotattn.attention_with_kvcache(q, k, v, cache_lengths=lengths, implementation="cpu")

    for _ in range(3):
        step()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    t = float(np.median(times))
    line = f"{args.dtype} B{args.batch} {args.context}: {t * 1e3:.2f} ms, {(k.nbytes + v.nbytes) / t / 1e9:.1f} GB/s of K/V"
    if args.read:
        buf = np.ones((256 << 20) // 4, dtype=np.float32)
        buf.sum()
        reads = []
        for _ in range(5):
            t0 = time.perf_counter()
            buf.sum()
            reads.append(buf.nbytes / (time.perf_counter() - t0) / 1e9)
        line += f"; NumPy sum {float(np.median(reads)):.1f} GB/s"
    with open("/proc/loadavg") as f:
        line += f"; load {' '.join(f.read().split()[:3])}"
    print(line)


if __name__ == "__main__":
    main()
