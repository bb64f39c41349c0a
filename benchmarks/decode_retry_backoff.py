"""A decode loop's time with the pool-or-alone choice's alone retries every 32 calls against
backed off (``ParallelChoice.RETRY_ALONE_MAX``), blocks alternated in one process.

Each block makes ``CALLS`` back-to-back calls of the bench's decode case on a fresh choice
(the class's exploration included, as a new process's loop has it), with ``RETRY_ALONE_MAX``
set to 32 (every alone retry RETRY calls apart: the choice before 2 Dec 2026) or to the
module's value; prints each setting's median block time, its calls run alone, and the ratio.

    PYTHONPATH=src .venv/bin/python benchmarks/decode_retry_backoff.py [B] [CONTEXT] [DTYPE] [CALLS] [ROUNDS]
"""

from __future__ import annotations

import random
import statistics
import sys
import time

from dotattn import bench_decode
from dotattn.kernels import cpu_decode


def main() -> None:
    args = sys.argv[1:] + ["1", "4096", "float32", "640", "8"][len(sys.argv) - 1:]
    B, ctx, dtype, calls, rounds = int(args[0]), int(args[1]), args[2], int(args[3]), int(args[4])
    run = bench_decode._make_peer("dotattn", B, ctx, dtype, *bench_decode.case_inputs(B, ctx, dtype))
    settings = {"every 32": cpu_decode.ParallelChoice.RETRY, "backed off": cpu_decode.ParallelChoice.RETRY_ALONE_MAX}
    times, alone = {k: [] for k in settings}, {k: [] for k in settings}
    for _ in range(2):
        run()
    for r in range(rounds):
        order = list(settings)
        random.Random(r).shuffle(order)
        for name in order:
            cpu_decode.ParallelChoice.RETRY_ALONE_MAX = settings[name]
            cpu_decode._CHOICES.clear()  # a fresh choice: the counts start at 0
            t0 = time.perf_counter()
            for _ in range(calls):
                run()
            times[name].append((time.perf_counter() - t0) * 1e3)
            alone[name].append(cpu_decode.mode_counts()[0])
    for name in settings:
        print(f"{name:11s} median block {statistics.median(times[name]):8.1f} ms  "
              f"alone calls a block {statistics.median(alone[name]):5.1f}  blocks {[round(t) for t in times[name]]}")
    print(f"backed off / every 32: {statistics.median(times['backed off']) / statistics.median(times['every 32']):.3f}")


if __name__ == "__main__":
    main()
