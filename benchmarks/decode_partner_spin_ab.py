"""The decode partners' spin after a call (``_launch.PARTNER_SPIN_S``), A/B in one process.

Under one other busy process, a B1 4k pool call's Python outside the kernel took 0.78 ms against
0.15 idle (docs/decoding-log.md, "A straggling partner's item redone by the caller"): were the
partners, spinning 300 µs after each call, taking the caller's core?  This alternates the
partners' spin (300 µs, 50 µs, none: their ``partner_spin``, read at each wait) round by round
in random order, on B1 4k pool calls (the bench's inputs) each preceded by ~0.1 ms of
one-thread NumPy work (a model's step between attention calls: a parked partner must be woken),
idle and then with one spinning process; medians, ratios to 300 µs.  Run it under the bench
lock:

    PYTHONPATH=src python benchmarks/decode_partner_spin_ab.py --rounds 101
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import statistics
import time

import numpy as np

from decode_mode_under_load import _spin  # (benchmarks/: the script's own folder)
from dotattn import bench_decode as bd
from dotattn.kernels import _launch, cpu_decode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=41)
    rounds = ap.parse_args().rounds
    spins = {"spin300": 300e-6, "spin50": 50e-6, "spin0": 0.0}  # (300 µs: PARTNER_SPIN_S)
    rate = _launch.tsc_rate()
    buf = np.random.default_rng(0).standard_normal(40_000).astype(np.float32)
    out = np.empty_like(buf)
    choose = cpu_decode.ParallelChoice.choose
    cpu_decode.ParallelChoice.choose = lambda self: True  # the pool for every call
    for dt in ("float16", "float32"):
        q, kc, vc = bd.case_inputs(1, 4096, dt)
        run = bd._make_peer("dotattn", 1, 4096, dt, q, kc, vc)
        for _ in range(5):
            run()
        p = _launch._partners
        t0 = time.perf_counter()
        np.exp(buf, out=out)
        gap = time.perf_counter() - t0
        for spinners in (0, 1):
            stop = mp.Event()
            procs = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(spinners)]
            for pr in procs:
                pr.start()
            time.sleep(0.3 if spinners else 0)
            times = {k: [] for k in spins}
            try:
                for _ in range(rounds):
                    order = list(spins.items())
                    random.shuffle(order)
                    for name, s in order:
                        p.partner_spin = int(s * rate)
                        for _ in range(3):  # settle the partners into this mode
                            np.exp(buf, out=out)
                            run()
                        t0 = time.perf_counter()
                        for _ in range(10):
                            np.exp(buf, out=out)
                            run()
                        times[name].append((time.perf_counter() - t0) / 10)
            finally:
                stop.set()
                for pr in procs:
                    pr.join(5)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            base = med["spin300"]
            print(f"B1 4k {dt} spinners {spinners} (gap {gap*1e3:.2f} ms): " + ", ".join(
                f"{k} {v:.3f} ms ({v / base:.3f})" for k, v in med.items()), f"load {open('/proc/loadavg').read().split()[0]}", flush=True)
        p.partner_spin = int(_launch.PARTNER_SPIN_S * rate)
    cpu_decode.ParallelChoice.choose = choose


if __name__ == "__main__":
    main()
