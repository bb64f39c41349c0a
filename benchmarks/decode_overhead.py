"""Per-call cost of one decode step at SmolLM2-135M's attention shape (B 1, Hq 9, Hkv 3, D 64).

A decode step of that model is 30 ``attention_with_kvcache`` calls, so the fixed cost of a
call matters as much as the kernel.  For cached contexts of 100 … 1000 tokens this prints the
median wall time per call (µs) of:

* ``dotattn``        — ``attention_with_kvcache`` with one new token appended (NumPy arrays);
* ``dotattn-torch``  — the same on torch tensors (zero-copy views, in-place append);
* ``dotattn-nonew``  — no append (k_new/v_new None);
* ``torch-sdpa``     — torch SDPA on the visible prefix, query heads folded into rows
  (no append; the peer a model would call otherwise);

plus the thread CPU time per call of the three dotattn columns (less sensitive to a loaded
machine), and the machine's load.  The four calls alternate in ``--rounds`` rounds (a random
order each round, ``--calls / --rounds`` calls of each per round): on a shared host whose core
speed swings within minutes, columns timed one after the other differed by tens of µs that were
the host's (the 1000-token append "costing" 64 µs, 1 Dec 13:12; alternated it is ≈ 7).  Run::

    PYTHONPATH=src python benchmarks/decode_overhead.py [--calls 3000] [--rounds 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def _alternated(fns, calls: int, rounds: int, seed: int):
    """Median wall time per call (µs) of each of ``fns`` and its thread CPU time per call (µs),
    the functions alternating in ``rounds`` rounds of random order."""
    rng = np.random.default_rng(seed)
    per_round = max(1, calls // rounds)
    walls: list[list[float]] = [[] for _ in fns]
    cpu = [0.0 for _ in fns]
    for fn in fns:
        fn()
    for _ in range(rounds):
        for i in rng.permutation(len(fns)):
            fn, times = fns[i], walls[i]
            c0 = time.thread_time()
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            cpu[i] += time.thread_time() - c0
    n = per_round * rounds
    return [statistics.median(t) * 1e6 for t in walls], [c / n * 1e6 for c in cpu]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    import torch
    import torch.nn.functional as F

    import dotattn

    with open("/proc/loadavg") as f:
        print("load before:", " ".join(f.read().split()[:3]))
    B, Hq, Hkv, D, capacity = 1, 9, 3, 64, 2048
    rng = np.random.default_rng(0)
    kc = rng.standard_normal((B, Hkv, capacity, D), dtype=np.float32)
    vc = rng.standard_normal((B, Hkv, capacity, D), dtype=np.float32)
    q = rng.standard_normal((B, Hq, 1, D), dtype=np.float32)
    kn = rng.standard_normal((B, Hkv, 1, D), dtype=np.float32)
    tkc, tvc, tq, tkn = (torch.from_numpy(x) for x in (kc, vc, q, kn))
    print(f"{'context':>8} {'dotattn':>9} {'dotattn-torch':>14} {'dotattn-nonew':>14} {'torch-sdpa':>11}"
          f"   {'cpu-time: dotattn':>17} {'-torch':>7} {'-nonew':>7}  (µs per call; wall: medians)")
    for n in (100, 250, 500, 1000):
        lengths = np.array([n])
        tlengths = torch.tensor([n])

        def ours():
            dotattn.attention_with_kvcache(q, kc, vc, kn, kn, cache_lengths=lengths)

        def ours_torch():
            with torch.no_grad():
                dotattn.attention_with_kvcache(tq, tkc, tvc, tkn, tkn, cache_lengths=tlengths)

        def ours_nonew():
            dotattn.attention_with_kvcache(q, kc, vc, cache_lengths=lengths)

        tk, tv = tkc[:, :, : n + 1], tvc[:, :, : n + 1]
        tqg = tq.view(B, Hkv, Hq // Hkv, D)

        def sdpa():
            with torch.no_grad():
                F.scaled_dot_product_attention(tqg, tk, tv)

        walls, cpus = _alternated((ours, ours_torch, ours_nonew, sdpa), args.calls, args.rounds, n)
        row = walls + cpus[:3]
        print(f"{n:>8} " + " ".join(f"{x:>{w}.1f}" for x, w in zip(row, (9, 14, 14, 11, 20, 7, 7))))
    with open("/proc/loadavg") as f:
        print("load after:", " ".join(f.read().split()[:3]))


if __name__ == "__main__":
    main()
