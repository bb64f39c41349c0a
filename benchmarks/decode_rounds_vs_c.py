"""Kernel copies, torch SDPA and C's item order, round by round in one process, split by the machine's state.

    flock /tmp/bench.lock env PYTHONPATH=src python benchmarks/decode_rounds_vs_c.py B L DTYPE ROUNDS FILE... [--one=NAMES]

Each FILE is a copy of ``src/dotattn/kernels/_cpu_decode_kernels.py`` (``new``: the imported one;
loaded as ``decode_ab.kernel_versions`` does).  Per round, in a shuffled order, each peer runs
after a 0.05 s warm-up and the median of 5 calls is kept: every kernel version through
``attention_with_kvcache`` on the bench's inputs (the parallel items forced on), torch SDPA's
decode in its fastest form, and — for float32 — ``decode_access_patterns.c``'s item order on two
OpenMP threads (``C item``).  ``--one=a,b`` adds those versions on one thread.  Prints whether
the versions give the same bits, every round, the medians, × SDPA, the rounds ≥ 1.5× SDPA, each
version's time over C's in the same round, and the same split into the third of rounds where C
ran fastest and the rest: the machine's fast and slow states (docs/decoding-log.md, "Requests, orders
of reads, and the pass alone").
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # spinning OpenMP threads would take the cores from the peers

import random  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import decode_ab  # noqa: E402
import decode_access_patterns as dap  # noqa: E402

from dotattn import bench_decode as bd  # noqa: E402
from dotattn.kernels import cpu_decode  # noqa: E402


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    one = next((a.split("=", 1)[1].split(",") for a in sys.argv[1:] if a.startswith("--one=")), [])
    B, ctx, dt, rounds = int(args[0]), int(args[1]), args[2], int(args[3])
    mods = decode_ab.kernel_versions(args[4:])
    cpu_decode.ParallelChoice.choose = lambda self: True
    q, kc, vc = bd.case_inputs(B, ctx, dt)
    call = bd._make_peer("dotattn", B, ctx, dt, q, kc, vc)
    runs = {}
    for name, m in mods.items():
        def version(m=m):
            cpu_decode.K = m
            return call()
        runs[name] = version
        if name in one:
            import numba

            def alone(m=m):
                cpu_decode.K = m
                numba.set_num_threads(1)
                try:
                    return call()
                finally:
                    numba.set_num_threads(2)
            runs[name + "/1"] = alone
    runs["sdpa"] = bd._make_peer("torch-sdpa", B, ctx, dt, q, kc, vc)
    if dt == "float32":
        dll = dap.build()
        rows = np.ascontiguousarray(np.random.default_rng(0).standard_normal((4, 128)).astype(np.float32))
        nitems = kc.size // (dap.CHUNK * 128)
        runs["C item"] = lambda: dll.run(kc.ctypes.data, vc.ctypes.data, rows.ctypes.data, nitems, dap.CHUNK, dap.PATTERNS["item"])
    first = {}
    for name, run in runs.items():
        for _ in range(3):
            first[name] = run()
    names = list(mods)
    print("same bits:", {n: bool(np.array_equal(np.asarray(first[names[0]]), np.asarray(first[n]))) for n in names})
    times = {name: [] for name in runs}
    order = list(runs)
    print("load", open("/proc/loadavg").read().split()[0])
    print("round " + " ".join(f"{n:>9s}" for n in runs))
    for i in range(rounds):
        random.shuffle(order)
        for name in order:
            time.sleep(0.02)
            bd.warm_up(runs[name], 0.05)
            calls = []
            for _ in range(5):
                t0 = time.perf_counter()
                runs[name]()
                calls.append(time.perf_counter() - t0)
            times[name].append(statistics.median(calls))
        print(f"{i:5d} " + " ".join(f"{times[n][-1] * 1e3:9.2f}" for n in runs), flush=True)
    sdpa = times["sdpa"]
    print("median " + " ".join(f"{statistics.median(times[n]) * 1e3:9.2f}" for n in runs))
    for name, ts in times.items():
        ratio = [s / t for s, t in zip(sdpa, ts)]
        print(f"{name:12s} × SDPA median {statistics.median(ratio):.2f}, rounds ≥ 1.5×: {sum(r >= 1.5 for r in ratio)}/{len(ratio)}")
    if "C item" not in times:
        return
    c = times["C item"]
    fast = sorted(range(rounds), key=lambda i: c[i])[: max(1, rounds // 3)]
    rest = [i for i in range(rounds) if i not in set(fast)]
    for label, sel in (("C's fastest third", fast), ("the other rounds", rest)):
        if not sel:
            continue
        cells = "  ".join(
            f"{n} {statistics.median(times[n][i] for i in sel) * 1e3:.2f} ms (×C {statistics.median(times[n][i] / c[i] for i in sel):.3f},"
            f" ≥1.5× {sum(sdpa[i] / times[n][i] >= 1.5 for i in sel)})"
            for n in runs if n != "sdpa"
        )
        print(f"{label}, {len(sel)} rounds: {cells}")
    print("load", open("/proc/loadavg").read().split()[0])


if __name__ == "__main__":
    main()
