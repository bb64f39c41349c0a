"""torch's SDPA decode with torch imported before or after dotattn's first call (docs/decoding.md).

Run once per order (each a fresh process); prints our median ms, torch SDPA's (the bench's
folded-group form), and ours again after torch ran:

    PYTHONPATH=src python benchmarks/decode_torch_order.py torch_first float16
    PYTHONPATH=src python benchmarks/decode_torch_order.py torch_later float16

Imported after a decode call has loaded Numba's OpenMP layer (the system ``libgomp.so.1``),
torch binds to that runtime instead of its own ``torch/lib/libgomp.so.1``, and its float16
SDPA ran 20–30× slower here (30 Nov 2026).
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np

if len(sys.argv) > 1 and sys.argv[1] == "torch_first":
    import torch  # noqa: F401

from dotattn import bench_decode as bd  # noqa: E402


def main() -> None:
    order, dt = sys.argv[1], sys.argv[2]
    B, ctx = 1, int(sys.argv[3]) if len(sys.argv) > 3 else 32768
    q, kc, vc = bd.case_inputs(B, ctx, dt)
    ours = bd._make_peer("dotattn", B, ctx, dt, q, kc, vc)

    def median_ms(f, n=9):
        f()
        f()
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        return round(statistics.median(ts) * 1e3, 2)

    a = median_ms(ours)
    b = median_ms(bd._make_peer("torch-sdpa", B, ctx, dt, q, kc, vc))
    c = median_ms(ours)
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    print(f"{order} {dt} B{B} {ctx}: dotattn {a} ms, torch SDPA {b} ms, dotattn after {c} ms; load {load}")


if __name__ == "__main__":
    main()
