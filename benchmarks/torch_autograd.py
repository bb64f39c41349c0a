"""Forward + backward through torch autograd: dotattn vs torch SDPA, same process.

For each named shape: float32 CPU tensors that require grad, ``out = attention(q, k, v);
out.backward(dout)`` timed after warm-up, median of ``--repeats`` runs.  GFLOP/s count
``3.5 × 4·B·H·Lq·Lk·D`` (forward + backward = 3.5 forwards), halved for causal.

    .venv/bin/python benchmarks/torch_autograd.py
    .venv/bin/python benchmarks/torch_autograd.py --shapes h8-n4096-d64 --repeats 5 --json

Rows: ``dotattn[<backend>]`` for each ``--backends`` entry (``default`` = dispatch's pick)
and ``sdpa`` (``torch.nn.functional.scaled_dot_product_attention``); a peer that cannot run
shows ``n/a`` with the reason.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

SHAPES = {
    # name: (B, H, L, D, causal)
    "b4-h8-n512-d64": (4, 8, 512, 64, False),
    "h8-n4096-d64": (1, 8, 4096, 64, False),
    "h8-n4096-d64-causal": (1, 8, 4096, 64, True),
    "h4-n4096-d128": (1, 4, 4096, 128, False),
}


PAUSE_S = 0.3


def flops(B, H, L, D, causal) -> float:
    forward = 4.0 * B * H * L * L * D
    return 3.5 * forward / (2 if causal else 1)


def _runner(peer: str, causal: bool):
    import torch

    if peer == "sdpa":
        return lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    import dotattn

    backend = peer[len("dotattn[") : -1]
    implementation = None if backend == "default" else backend
    # Lq == Lk here, so bottom-right and top-left causal are the same mask.
    return lambda q, k, v: dotattn.attention(q, k, v, causal=causal, implementation=implementation)


def time_peer(peer: str, shape: tuple, repeats: int, warmup: int) -> dict:
    import torch

    B, H, L, D, causal = shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=g, requires_grad=True) for _ in range(3))
    dout = torch.randn(B, H, L, D, generator=g)
    fn = _runner(peer, causal)

    def step():
        for t in (q, k, v):
            t.grad = None
        fn(q, k, v).backward(dout)

    for _ in range(warmup):
        step()
    # BLAS/OpenMP/Numba worker threads spin for a while after the previous peer's last call;
    # let them park so they do not steal the cores from this measurement (as dotattn bench does).
    time.sleep(PAUSE_S)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    ms = 1e3 * statistics.median(times)
    return {"peer": peer, "ms": ms, "gflops": flops(*shape) / (ms * 1e6)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--backends", nargs="+", default=["default", "numpy"],
                        help="dotattn backends to time ('default' = dispatch's choice)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    import torch

    peers = [f"dotattn[{b}]" for b in args.backends] + ["sdpa"]
    if not args.json:
        print(f"forward+backward through autograd, float32, torch {torch.__version__}, "
              f"{torch.get_num_threads()} torch threads; median of {args.repeats}")
        print(f"{'shape':22} {'peer':18} {'ms':>9} {'GFLOP/s':>8} {'vs sdpa':>8}")
    for name in args.shapes:
        rows = []
        for peer in peers:
            try:
                row = time_peer(peer, SHAPES[name], args.repeats, args.warmup)
            except (ImportError, RuntimeError, ValueError) as exc:  # a peer that cannot run this shape
                row = {"peer": peer, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
            row["shape"] = name
            rows.append(row)
        sdpa_ms = next((r["ms"] for r in rows if r["peer"] == "sdpa" and "ms" in r), None)
        for row in rows:
            if "ms" in row and sdpa_ms:
                row["speedup_vs_sdpa"] = sdpa_ms / row["ms"]
            if args.json:
                print(json.dumps(row), flush=True)
            elif "ms" in row:
                ratio = f"{row['speedup_vs_sdpa']:.2f}×" if "speedup_vs_sdpa" in row else "n/a"
                print(f"{name:22} {row['peer']:18} {row['ms']:>9.1f} {row['gflops']:>8.1f} {ratio:>8}", flush=True)
            else:
                print(f"{name:22} {row['peer']:18}  n/a ({row['error']})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
