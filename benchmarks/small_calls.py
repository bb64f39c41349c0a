"""Per-call time of small attention calls: dotattn against torch SDPA, calls interleaved.

``dotattn bench --shapes tiny`` times each peer's calls back to back; on a machine that other
jobs load, a peer can land in a quiet or a busy second.  Here every round calls each peer
once, in turn, for ``--rounds`` rounds, and reports each peer's median and its ratio to
SDPA's median (``× sdpa`` above 1 = faster than torch, as in ``dotattn bench``).  torch SDPA
runs twice: with torch's default thread count and with one thread (``torch.set_num_threads(1)``
around its call), since a loaded machine makes a multi-threaded launch wait for its threads.

    .venv/bin/python benchmarks/small_calls.py
    .venv/bin/python benchmarks/small_calls.py --rounds 500 --json

Shapes (float32, forward): the issue's MiniLM-like causal batch B64 H4 L11 D16, a SmolLM2
decode step B1 Hq9 Hkv3 with 1 query × 128 keys D64, and B1 H12 L128 D64.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

SHAPES = {
    # name: (B, Hq, Hkv, Lq, Lk, D, causal)
    "causal-b64-h4-n11-d16": (64, 4, 4, 11, 11, 16, True),
    "decode-h9kv3-q1-k128-d64": (1, 9, 3, 1, 128, 64, False),
    "dense-h12-n128-d64": (1, 12, 12, 128, 128, 64, False),
}


def _peers(shape):
    import torch
    import torch.nn.functional as F

    import dotattn
    import dotattn.torch  # noqa: F401  (the torch front end)

    B, Hq, Hkv, Lq, Lk, D, causal = shape
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(s, dtype=np.float32) for s in ((B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, D)))
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
    threads = torch.get_num_threads()
    sdpa_kw = dict(is_causal=causal, enable_gqa=Hq != Hkv)

    def sdpa():
        with torch.no_grad():
            F.scaled_dot_product_attention(tq, tk, tv, **sdpa_kw)

    def sdpa_1():
        torch.set_num_threads(1)
        try:
            with torch.no_grad():
                F.scaled_dot_product_attention(tq, tk, tv, **sdpa_kw)
        finally:
            torch.set_num_threads(threads)

    def dotattn_numpy():
        dotattn.attention(q, k, v, causal=causal)

    def dotattn_torch():
        with torch.no_grad():
            dotattn.attention(tq, tk, tv, causal=causal)

    return {
        "dotattn (NumPy arrays)": dotattn_numpy,
        "dotattn (torch tensors)": dotattn_torch,
        f"torch SDPA ({threads} threads)": sdpa,
        "torch SDPA (1 thread)": sdpa_1,
    }


def run(rounds: int) -> dict:
    result = {"load_before": os.getloadavg(), "rounds": rounds, "shapes": {}}
    for name, shape in SHAPES.items():
        peers = _peers(shape)
        for fn in peers.values():  # warm-up: compiles, caches
            fn()
            fn()
        times = {p: [] for p in peers}
        for _ in range(rounds):
            for p, fn in peers.items():
                t0 = time.perf_counter()
                fn()
                times[p].append(time.perf_counter() - t0)
        med = {p: statistics.median(t) * 1e6 for p, t in times.items()}
        sdpa = next(v for p, v in med.items() if p.startswith("torch SDPA ("))
        result["shapes"][name] = {p: {"median_us": m, "x_sdpa": sdpa / m} for p, m in med.items()}
    result["load_after"] = os.getloadavg()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = run(args.rounds)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    load = lambda xs: ", ".join(f"{x:.2f}" for x in xs)  # noqa: E731
    print(f"medians of {args.rounds} interleaved rounds; load {load(result['load_before'])} → {load(result['load_after'])}")
    for name, rows in result["shapes"].items():
        print(name)
        for peer, r in rows.items():
            print(f"  {peer:<26} {r['median_us']:10.1f} µs   × sdpa {r['x_sdpa']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
