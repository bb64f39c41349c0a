"""Peak memory of forward + backward through torch autograd: dotattn vs SDPA vs naive.

Each measurement runs in a fresh subprocess: it builds q, k, v (B=1, H heads, L tokens,
D=64, float32, requires_grad), warms the implementation up on a small input (so JIT
compilation is not counted), resets the kernel's peak-RSS counter (``/proc/self/clear_refs``
← 5, Linux ≥ 4.0), runs ``out = attention(q, k, v, causal=True); out.backward(dout)`` and
reports ``VmHWM − RSS before the call``: the memory the call itself needed, above the inputs.

    .venv/bin/python benchmarks/torch_memory.py                 # L = 2048 … 16384, table
    .venv/bin/python benchmarks/torch_memory.py --lengths 16384 --json

Rows: ``dotattn`` (dotattn.attention, default backend), ``sdpa`` (torch's
scaled_dot_product_attention, CPU flash kernel), ``naive`` (softmax(q·kᵀ)·v in torch ops,
which keeps the ``L × L`` probabilities for backward; only up to ``--naive-max``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

IMPLEMENTATIONS = ("dotattn", "sdpa", "naive")


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _attention_fn(impl: str):
    import torch

    if impl == "dotattn":
        import dotattn

        return lambda q, k, v: dotattn.attention(q, k, v, causal=True)
    if impl == "sdpa":
        return lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    def naive(q, k, v):
        L = q.shape[-2]
        s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        s = s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
        return torch.softmax(s, dim=-1) @ v

    return naive


def child(impl: str, L: int, heads: int, D: int) -> dict:
    """One measurement in this (fresh) process."""
    import gc

    import torch

    fn = _attention_fn(impl)

    def inputs(n):
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, heads, n, D, generator=g, requires_grad=True) for _ in range(3))
        return q, k, v, torch.randn(1, heads, n, D, generator=g)

    q, k, v, dout = inputs(256)
    fn(q, k, v).backward(dout)  # warm-up: JIT compilation and lazy imports are not the call's memory
    q, k, v, dout = inputs(L)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _rss_kib("VmRSS")
    t0 = time.perf_counter()
    out = fn(q, k, v)
    out.backward(dout)
    seconds = time.perf_counter() - t0
    peak = _rss_kib("VmHWM")
    assert q.grad is not None and torch.isfinite(q.grad).all()
    return {
        "impl": impl,
        "L": L,
        "heads": heads,
        "D": D,
        "peak_extra_mib": (peak - before) / 1024,
        "seconds": seconds,
        "inputs_and_grads_mib": 8 * heads * L * D * 4 / 2**20,  # q, k, v, dout, out, dq, dk, dv
        "scores_mib": heads * L * L * 4 / 2**20,  # one float32 L × L matrix per head
        "torch_threads": torch.get_num_threads(),
    }


def measure(impl: str, L: int, heads: int, D: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", impl, str(L), str(heads), str(D)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"impl": impl, "L": L, "heads": heads, "D": D, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--impls", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS))
    parser.add_argument(
        "--naive-max", type=int, default=8192, help="largest L for the naive row (it needs ~3·L² floats)"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    parser.add_argument("--child", nargs=4, metavar=("IMPL", "L", "H", "D"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        impl, L, heads, D = args.child
        print(json.dumps(child(impl, int(L), int(heads), int(D))))
        return 0
    if not args.json:
        print(f"forward+backward, causal, float32, B=1, H={args.heads}, D={args.head_dim}; "
              "peak memory above the inputs (MiB)")
        print(f"{'impl':8} {'L':>6} {'peak MiB':>9} {'time s':>7} {'in+grads MiB':>13} {'L×L MiB':>8}")
    for L in args.lengths:
        for impl in args.impls:
            if impl == "naive" and L > args.naive_max:
                row = {"impl": impl, "L": L, "skipped": f"L > --naive-max={args.naive_max}"}
            else:
                row = measure(impl, L, args.heads, args.head_dim)
            if args.json:
                print(json.dumps(row), flush=True)
            elif "peak_extra_mib" in row:
                print(f"{impl:8} {L:>6} {row['peak_extra_mib']:>9.1f} {row['seconds']:>7.2f} "
                      f"{row['inputs_and_grads_mib']:>13.1f} {row['scores_mib']:>8.0f}", flush=True)
            else:
                print(f"{impl:8} {L:>6}  n/a ({row.get('skipped') or row.get('error')})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
