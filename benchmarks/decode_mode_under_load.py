"""The decode call's two modes — items on the pool (both cores) or on the calling thread alone —
alternated in one process, with and without other programs keeping cores busy (docs/decoding.md,
issue 9 §2).

``cpu_decode.ParallelChoice`` picks a mode per size class from the calls' times, because on a
busy machine the pool thread shares a core and small calls ran slower on the pool.  This script
asks at which size that can still happen: for each case it runs the bench's inputs (one query,
Hq 32, Hkv 8, D 128, ``bench_decode``'s peers) in both modes, call by call in a random order per
round, first on the machine as it is, then with ``--spinners N`` processes spinning in pure
Python (each wants a whole core; the scheduler shares the cores between them and us).  Prints
the median ms per mode and alone/pool (> 1: the pool is faster).  On a shared machine run it
under ``flock /tmp/bench.lock``:

    PYTHONPATH=src python benchmarks/decode_mode_under_load.py --rounds 9 --spinners 1 \\
        --cases 8:32768:float16,1:32768:float16,8:4096:float32,1:4096:float16
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import statistics
import time

from dotattn import bench_decode as bd
from dotattn.kernels import cpu_decode


def _spin(stop):
    while not stop.is_set():
        for _ in range(100_000):
            pass


def _load() -> str:
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


def _measure(run, rounds: int) -> dict[str, float]:
    modes = {"pool": True, "alone": False}
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(rounds):
        order = list(modes.items())
        random.shuffle(order)
        for name, pool in order:
            cpu_decode.ParallelChoice.choose = lambda self, p=pool: p
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    return {m: statistics.median(t) for m, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="8:32768:float16,1:32768:float16,8:4096:float32,1:4096:float16",
                    help="B:context:dtype, comma-separated")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--spinners", type=int, default=1, help="busy processes for the loaded half")
    ap.add_argument("--paged", action="store_true")
    args = ap.parse_args()
    choose = cpu_decode.ParallelChoice.choose
    for case in args.cases.split(","):
        B, ctx, dt = case.split(":")
        B, ctx = int(B), int(ctx)
        q, kc, vc = bd.case_inputs(B, ctx, dt)
        run = bd._make_peer("dotattn-paged" if args.paged else "dotattn", B, ctx, dt, q, kc, vc)
        for pool in (True, False, True, False):  # warm-up: each mode's first calls compile or wake threads
            cpu_decode.ParallelChoice.choose = lambda self, p=pool: p
            run()
        mb = (kc.nbytes + vc.nbytes) / 2**20
        for spinners in (0, args.spinners):
            stop = mp.Event()
            procs = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(spinners)]
            for p in procs:
                p.start()
            time.sleep(0.3 if spinners else 0)
            try:
                med = _measure(run, args.rounds)
            finally:
                stop.set()
                for p in procs:
                    p.join(5)
            print(f"B{B} {ctx} {dt}{' paged' if args.paged else ''} ({mb:.0f} MiB) spinners {spinners}: "
                  f"pool {med['pool'] * 1e3:.2f} ms, alone {med['alone'] * 1e3:.2f} ms, "
                  f"alone/pool {med['alone'] / med['pool']:.2f}  (load {_load()})", flush=True)
        del q, kc, vc, run
    cpu_decode.ParallelChoice.choose = choose


if __name__ == "__main__":
    main()
