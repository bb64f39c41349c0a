"""Mid-size calls against torch SDPA: the lengths between the small-call kernel and the bench's L 4096.

The issue benchmarks time tiny calls (``small_calls.py``) and L 4096 (``dotattn bench``); encoder
and prompt calls of a few hundred to a few thousand tokens fall between them (BERT's 384 and
512, ViT's 197 and 577, …).  For each length: ``dotattn.attention`` (the ``cpu`` backend, its
own choice of path) and torch SDPA on the same arrays, called in a random order per round, each
timed call after one untimed call; medians, × SDPA, and which path the call took (the small-call
kernel or the general tiled kernels, and the general kernels' tile padding: the tiles' rows ×
keys over the call's).  Under ``flock /tmp/bench.lock`` on a shared machine:

    PYTHONPATH=src python benchmarks/mid_sizes.py float32 full 197,256,257,384,512,577,1024 [--heads=12 --dim=64 --batch=1 --rounds=9]

``full`` or ``causal``; dtypes float32, bfloat16, float16.
"""

from __future__ import annotations

import random
import statistics
import sys
import time

import numpy as np


def _opt(name: str, default: int) -> int:
    for a in sys.argv:
        if a.startswith(f"--{name}="):
            return int(a.split("=", 1)[1])
    return default


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if len(args) != 3:
        print(__doc__)
        raise SystemExit(2)
    import torch
    import torch.nn.functional as F

    import dotattn
    from dotattn import semantics
    from dotattn.kernels import cpu, cpu_small

    dtype, mode, lengths = args[0], args[1], [int(x) for x in args[2].split(",")]
    causal = mode == "causal"
    B, H, D, rounds = _opt("batch", 1), _opt("heads", 12), _opt("dim", 64), _opt("rounds", 9)
    np_dtype = semantics.BFLOAT16 if dtype == "bfloat16" else np.dtype(dtype)
    t_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    rng = np.random.default_rng(0)
    with open("/proc/loadavg") as f:
        print(f"{dtype} {mode} B{B} H{H} D{D}, {rounds} rounds, load {f.read().split()[0]}")
    for L in lengths:
        x = [rng.standard_normal((B, H, L, D), dtype=np.float32) for _ in range(3)]
        q, k, v = (a.astype(np_dtype) for a in x)
        tq, tk, tv = (torch.from_numpy(a).to(t_dtype) for a in x)
        call = semantics.normalize(q, k, v, causal=True if causal else None)
        if not cpu_small.unsupported_reasons(call):
            path = "small"
        else:
            BQ, BK = cpu.DEFAULT_BLOCK_SIZE
            pad = (-(-L // BQ) * BQ) * (-(-L // BK) * BK) / (L * L)
            path = f"general (256-tiles pad x{pad:.2f})"
        runs = {
            "ours": lambda: dotattn.attention(q, k, v, causal=causal),
            "sdpa": lambda: F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal),
        }
        times: dict[str, list[float]] = {n: [] for n in runs}
        for _ in range(rounds):
            for name in random.sample(list(runs), len(runs)):
                runs[name]()
                t0 = time.perf_counter()
                runs[name]()
                times[name].append(time.perf_counter() - t0)
        ours, sdpa = (statistics.median(times[n]) * 1e3 for n in ("ours", "sdpa"))
        flops = 4 * B * H * L * L * D / (2 if causal else 1)
        print(f"  L{L:5d}: ours {ours:7.3f} ms ({flops / ours / 1e6:5.0f} GFLOP/s), SDPA {sdpa:7.3f} ms, "
              f"x SDPA {sdpa / ours:4.2f}  [{path}]", flush=True)


if __name__ == "__main__":
    main()
