"""Per-key compute of the ``cpu`` decode kernel on cache-resident data, kernel versions alternating
(docs/decoding-log.md, "16-bit caches at 32k").

``run_serial`` (plan, items, merges on the calling thread) on B 1, Hq 32, Hkv 8, D 128 and
CONTEXT keys — 256 keys (1 MB of 16-bit K/V) stay in L2 — for each FILE (a copy of
``_cpu_decode_kernels.py``, or ``new`` for the imported one), alternating round by round; prints
the min and median over rounds (each the min of 5 calls) in ns per key and K/V head, and
whether the versions give the same bits.  ``SPLITS=256,512`` (environment) also varies the
split size.  Run under ``flock /tmp/bench.lock`` on a shared machine:

    PYTHONPATH=src python benchmarks/decode_chunk_compute.py 256 float16,bfloat16 11 /tmp/old.py new
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from decode_ab import kernel_versions

from dotattn.kernels import cpu_decode
from dotattn.semantics import BFLOAT16

B, HQ, HKV, D = 1, 32, 8, 128


def main() -> None:
    if len(sys.argv) < 5:
        print(__doc__)
        raise SystemExit(2)
    ctx, dtypes, rounds = int(sys.argv[1]), sys.argv[2].split(","), int(sys.argv[3])
    splits = [int(x) for x in os.environ.get("SPLITS", "256").split(",")]
    mods = kernel_versions(sys.argv[4:])  # decode_ab.py's loader (this script's folder is on sys.path)
    versions = {f"{n}@{sp}": (m, sp) for n, m in mods.items() for sp in splits}
    for dt in dtypes:
        d = BFLOAT16 if dt == "bfloat16" else np.dtype(dt)
        rng = np.random.default_rng(0)
        k = rng.standard_normal((B, HKV, ctx, D), dtype=np.float32).astype(d)
        v = rng.standard_normal((B, HKV, ctx, D), dtype=np.float32).astype(d)
        q = rng.standard_normal((B, HQ, 1, D), dtype=np.float32) * np.float32(D**-0.5)
        kflat, kst, kind = cpu_decode._flat(k, k)
        vflat, vst, _ = cpu_decode._flat(v, v)
        table = np.arange(B, dtype=np.int64).reshape(B, 1)
        kvlen = np.full(B, ctx, dtype=np.int64)
        slopes = np.zeros((1, 1), np.float32)

        def call(m, sp):
            return m.run_serial(q, kflat, kst, vflat, vst, table, ctx, kind, kvlen, sp, True, -1, -1, 0.0, 1.0, slopes, False, D)

        first = {n: call(m, sp)[0] for n, (m, sp) in versions.items()}  # compiles
        names = list(versions)
        same = all(np.array_equal(first[names[0]], first[n]) for n in names[1:])
        best = {n: [] for n in names}
        for _ in range(rounds):
            for n, (m, sp) in versions.items():
                ts = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    call(m, sp)
                    ts.append(time.perf_counter() - t0)
                best[n].append(min(ts))
        per = B * HKV * ctx
        cells = "  ".join(
            f"{n} min {sorted(t)[0] / per * 1e9:.1f} med {sorted(t)[len(t) // 2] / per * 1e9:.1f}" for n, t in best.items()
        )
        with open("/proc/loadavg") as f:
            load = f.read().split()[0]
        print(f"{dt} ctx {ctx} (ns per key and K/V head): {cells}; same bits {same}; load {load}", flush=True)


if __name__ == "__main__":
    main()
