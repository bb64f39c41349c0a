"""How late ``_launch.run_chunks``' pool thread starts its chunk after the caller submits it,
by how long the pool sat idle before: the wake-up a short parallel step pays on this host.
Both chunks only sleep (releasing the GIL), so neither thread waits on the other for it.

    flock /tmp/bench.lock .venv/bin/python benchmarks/launch_wake_latency.py [--calls 60]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
from dotattn.kernels import _launch  # noqa: E402

CHUNK_SECONDS = 0.002  # each chunk's sleep: long enough that the pool thread starts inside it


def start_delays_us(idle_seconds: float, calls: int) -> list[float]:
    """For each call after ``idle_seconds`` of idleness: µs from the call to chunk 1's start."""
    delays = []
    for _ in range(calls):
        if idle_seconds:
            time.sleep(idle_seconds)
        started = {}

        def chunk(index: int, nchunks: int) -> None:
            started[index] = time.perf_counter()
            time.sleep(CHUNK_SECONDS)

        t0 = time.perf_counter()
        _launch.run_chunks(chunk, (), 2)
        delays.append((started[1] - t0) * 1e6)
    return delays


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=60)
    args = ap.parse_args()
    print(f"{time.strftime('%H:%M', time.gmtime())} UTC, load {os.getloadavg()[0]:.2f}, {args.calls} calls each")
    for idle in (0.0, 0.001, 0.01, 0.1):
        d = start_delays_us(idle, args.calls)
        print(f"idle {idle * 1e3:6.1f} ms before: the pool thread starts {statistics.median(d):7.1f} µs "
              f"after the call (median), p90 {statistics.quantiles(d, n=10)[8]:7.1f}")


if __name__ == "__main__":
    main()
