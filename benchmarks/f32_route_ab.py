"""float32's two product routes and torch SDPA, alternated round by round in one process.

``DOTATTN_F32_PRODUCTS=amx5`` (the split-AMX route: each float32 product six bfloat16 products
on AMX) and ``=mkl`` (MKL's float32 sgemm tiles) — the variable is read on every call — and
torch SDPA, in an order shuffled per round; forward and forward+backward at the issue's shapes.
Prints medians with their interquartile range, × SDPA by the ratio of medians and by the median
of the rounds' paired ratios.  ``dotattn precompile`` makes the same comparison, smaller, to
choose this machine's route (``kernels/f32_route.py``); this is the whole-call picture behind it
(docs/performance-log.md, "The sixth session: …").

    PYTHONPATH=src .venv/bin/python benchmarks/f32_route_ab.py [--rounds 9] [--cases fwd64,fwd128,causal,fwdbwd,fwdbwd128,causal-fwdbwd]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

CASES = {  # (H, D, causal, backward) at L 4096
    "fwd64": (8, 64, False, False),
    "fwd128": (4, 128, False, False),
    "causal": (8, 64, True, False),
    "fwdbwd": (8, 64, False, True),
    "fwdbwd128": (4, 128, False, True),
    "causal-fwdbwd": (8, 64, True, True),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()
    import torch
    import torch.nn.functional as F

    import dotattn.torch as dt

    rng = random.Random(0)
    for name in args.cases.split(","):
        H, D, causal, bwd = CASES[name]
        g = torch.Generator().manual_seed(0)
        q, k, v, do = (torch.randn(1, H, 4096, D, generator=g) for _ in range(4))

        def ours(route):
            os.environ["DOTATTN_F32_PRODUCTS"] = route
            if not bwd:
                with torch.no_grad():
                    dt.attention(q, k, v, causal=causal, implementation="cpu")
                return
            qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
            dt.attention(qq, kk, vv, causal=causal, implementation="cpu").backward(do)

        def sdpa(_):
            if not bwd:
                with torch.no_grad():
                    F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                return
            qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
            F.scaled_dot_product_attention(qq, kk, vv, is_causal=causal).backward(do)

        peers = [("amx5", ours), ("mkl", ours), ("sdpa", sdpa)]
        times = {p: [] for p, _ in peers}
        for r in range(args.rounds + 1):  # round 0 warms every peer up
            rng.shuffle(peers)
            for p, run in peers:
                time.sleep(0.2)  # the previous peer's worker threads park
                t0 = time.perf_counter()
                run(p)
                if r:
                    times[p].append((time.perf_counter() - t0) * 1e3)
        os.environ.pop("DOTATTN_F32_PRODUCTS", None)
        med = {p: statistics.median(t) for p, t in times.items()}
        iqr = {p: (sorted(t)[len(t) // 4], sorted(t)[3 * len(t) // 4]) for p, t in times.items()}
        paired = {p: statistics.median(s / o for s, o in zip(times["sdpa"], times[p])) for p in ("amx5", "mkl")}
        cols = " ".join(f"{p} {med[p]:.0f} [{iqr[p][0]:.0f}-{iqr[p][1]:.0f}]" for p in ("amx5", "mkl", "sdpa"))
        print(f"{name:14s} median ms {cols} | x sdpa amx5 {med['sdpa'] / med['amx5']:.2f} mkl {med['sdpa'] / med['mkl']:.2f}"
              f" | paired amx5 {paired['amx5']:.2f} mkl {paired['mkl']:.2f}", flush=True)


if __name__ == "__main__":
    main()
