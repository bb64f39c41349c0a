"""Where a whole decode call's time goes at the bench's B1 shape (docs/decoding.md, issue 9 §2).

``attention_with_kvcache(q, kc, vc, cache_lengths=…, implementation="cpu")`` on the bench's
inputs (one query, Hq 32, Hkv 8, D 128, CONTEXT keys), with ``perf_counter`` stamps at the
boundaries of the call's parts — the public entry's checks (``normalize``), ``cpu_decode.decode``'s
Python before the plan, the plan, the Python up to the items, the caller's kernel entry (its
items, then the wait for the partner), what follows — by wrapping those functions (each wrapper
adds ≈ 0.1–0.2 µs).  MODE ``pool`` forces the parallel items on (partners), ``alone`` the calling
thread (``run_serial``: then only checks / Python / kernel / return).  Prints the median of each
span over CALLS calls (after a warm-up), the call's median, and the load.

    flock /tmp/bench.lock env PYTHONPATH=src python benchmarks/decode_call_split.py [CONTEXT] [DTYPE] [CALLS] [pool|alone] [--batch=B] [--profile]

``--batch=B``: B sequences instead of one (B8 4k: the bench's other 4k rows).
``--profile``: a cProfile of the calls instead (cumulative time, top functions; the profiler
itself makes each Python function call dearer, so read its shares, not its µs).
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np

import dotattn
from dotattn import bench_decode as bd
from dotattn import decoding
from dotattn.kernels import cpu_decode

STAMPS: list[tuple[str, float]] = []
now = time.perf_counter


def _wrap(owner, name: str, label: str):
    fn = getattr(owner, name)

    def wrapped(*a, **k):
        STAMPS.append((label + ">", now()))
        try:
            return fn(*a, **k)
        finally:
            STAMPS.append((label + "<", now()))

    setattr(owner, name, wrapped)


class _KProxy:
    """cpu_decode.K with some entries stamped."""

    def __init__(self, module, names):
        self._m = module
        for n in names:
            setattr(self, n, getattr(module, n))
            _wrap(self, n, n)

    def __getattr__(self, name):
        return getattr(self._m, name)


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    ctx = int(args[0]) if len(args) > 0 else 4096
    dt = args[1] if len(args) > 1 else "bfloat16"
    calls = int(args[2]) if len(args) > 2 else 300
    mode = args[3] if len(args) > 3 else "pool"
    choose = mode == "pool"
    cpu_decode.ParallelChoice.choose = lambda self: choose
    B = next((int(a.split("=", 1)[1]) for a in sys.argv if a.startswith("--batch=")), 1)
    q, kc, vc = bd.case_inputs(B, ctx, dt)
    lengths = np.full(B, ctx, dtype=np.int64)

    def run():
        return dotattn.attention_with_kvcache(q, kc, vc, cache_lengths=lengths, implementation="cpu")

    for _ in range(20):
        run()
    if "--profile" in sys.argv:
        import cProfile
        import pstats

        pr = cProfile.Profile()
        pr.enable()
        for _ in range(calls):
            run()
        pr.disable()
        pstats.Stats(pr).sort_stats("cumulative").print_stats(30)
        return
    _wrap(decoding, "normalize", "checks")
    _wrap(cpu_decode, "decode", "decode")
    _wrap(cpu_decode, "_on_partners", "partners")
    cpu_decode.K = _KProxy(cpu_decode.K, ["plan", "run_items_caller", "run_serial"])
    load0 = open("/proc/loadavg").read().split()[0]
    spans: dict[str, list[float]] = {}
    totals = []
    for _ in range(calls):
        STAMPS.clear()
        t0 = now()
        run()
        t1 = now()
        totals.append(t1 - t0)
        marks = [("call>", t0)] + STAMPS + [("call<", t1)]
        for (a, ta), (b, tb) in zip(marks, marks[1:]):
            spans.setdefault(f"{a} → {b}", []).append(tb - ta)
    load1 = open("/proc/loadavg").read().split()[0]
    print(f"B{B} {ctx} {dt} {mode}: {calls} calls, load {load0} → {load1}")
    for k, v in spans.items():
        print(f"  {k:45s} {statistics.median(v) * 1e6:8.1f} µs  (min {min(v) * 1e6:.1f})")
    print(f"  {'whole call':45s} {statistics.median(totals) * 1e6:8.1f} µs  (min {min(totals) * 1e6:.1f})")


if __name__ == "__main__":
    main()
