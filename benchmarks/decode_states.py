"""Whether a float32 decode cell misses 1.5× SDPA because of the machine or because of our kernel.

    flock /tmp/bench.lock .venv/bin/python benchmarks/decode_states.py [B=8] [L=4096] [rounds=40]

Per round, in a shuffled order, the median of 5 calls of each: the all-core read of the call's
own K and V (``kernels.stream_read.sum_parts`` over each, both cores), dotattn's decode call and
torch SDPA's (folded query-head group, float32).  Per round it prints × SDPA, the bound
(SDPA's time over the read's) and ours/read; at the end, the rounds split by whether the bound
was below 1.5 — a round whose bound is ≥ 1.5 but whose × SDPA is not is held by our kernel.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import dotattn
from dotattn.kernels.stream_read import sum_parts


def median_ms(fn, calls: int = 5) -> float:
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def main(B: int = 8, L: int = 4096, rounds: int = 40) -> None:
    Hq, Hkv, D = 32, 8, 128
    rng = np.random.default_rng(0)
    k = rng.standard_normal((B, Hkv, L, D), dtype=np.float32)
    v = rng.standard_normal((B, Hkv, L, D), dtype=np.float32)
    q = rng.standard_normal((B, Hq, 1, D), dtype=np.float32)
    lengths = np.full(B, L)
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
    folded = tq.view(B, Hkv, Hq // Hkv, D)
    k_flat, v_flat = k.reshape(-1), v.reshape(-1)

    def read():
        sum_parts(k_flat, 2)
        sum_parts(v_flat, 2)

    def ours():
        dotattn.attention_with_kvcache(q, k, v, cache_lengths=lengths)

    def sdpa():
        with torch.no_grad():
            F.scaled_dot_product_attention(folded, tk, tv)

    fns = {"read": read, "ours": ours, "sdpa": sdpa}
    for fn in fns.values():
        for _ in range(5):
            fn()
    rows, order = [], list(fns)
    for r in range(rounds):
        rng.shuffle(order)
        res = {name: median_ms(fns[name]) for name in order}
        rows.append((res["read"], res["ours"], res["sdpa"]))
        print(f"{r:3d} read {res['read']:6.2f}  ours {res['ours']:6.2f}  sdpa {res['sdpa']:6.2f}"
              f"  x {res['sdpa'] / res['ours']:5.2f}  bound {res['sdpa'] / res['read']:5.2f}"
              f"  ours/read {res['ours'] / res['read']:5.2f}", flush=True)
    a = np.array(rows)
    ratio, bound = a[:, 2] / a[:, 1], a[:, 2] / a[:, 0]
    print(f"rounds {len(a)}: x SDPA median {np.median(ratio):.2f} (>= 1.5 in {np.sum(ratio >= 1.5)}), "
          f"bound median {np.median(bound):.2f} (>= 1.5 in {np.sum(bound >= 1.5)}); "
          f"ours/read median {np.median(a[:, 1] / a[:, 0]):.2f}")
    for lo, hi in ((0, 1.5), (1.5, np.inf)):
        m = (bound >= lo) & (bound < hi)
        if m.any():
            print(f"  rounds with bound in [{lo}, {hi}): {m.sum()}: x SDPA {np.median(ratio[m]):.2f} "
                  f"[{ratio[m].min():.2f}-{ratio[m].max():.2f}], read {np.median(a[m, 0]):.2f} ms, "
                  f"ours {np.median(a[m, 1]):.2f}, sdpa {np.median(a[m, 2]):.2f}")


if __name__ == "__main__":
    main(*(int(x) for x in sys.argv[1:4]))
