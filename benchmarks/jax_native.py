"""The native JAX backend against ``jax.nn.dot_product_attention(implementation="xla")``.

Two measurements (CPU here; the numbers quoted in docs/frameworks.md come from this script):

1. **memory** at L = 16k, H = 8, D = 64 under ``jit``: XLA's own buffer assignment of the
   compiled program (``compiled.memory_analysis()``: temporaries + arguments + outputs),
   for the forward and for ``grad``; the peer is compiled (not run: its logits alone are
   8 GiB) for comparison.  With ``--run-16k`` the forward and grad also run once in a fresh
   subprocess each and report the process's peak RSS growth.
2. **speed** at L = 4k (``--L``): forward and forward+backward, jitted, medians of
   ``--repeats`` calls, peer and ours alternating in one process; GFLOP/s count 4·B·H·L²·D
   (forward) and 2.5× that for forward+backward.  The machine's load (``uptime``) is printed.

Run: ``PYTHONPATH=src python benchmarks/jax_native.py [--L 4096] [--repeats 5] [--run-16k]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np


def _inputs(L, H, D, seed=0):
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    # jax.nn layout (B, L, H, D) = dotattn's "blhd"
    return tuple(jnp.asarray(rng.standard_normal((1, L, H, D)).astype(np.float32)) for _ in range(3))


def _fns(causal: bool):
    import jax

    import dotattn

    def ours(q, k, v):
        return dotattn.attention(q, k, v, layout="blhd", causal="top_left" if causal else False, implementation="jax")

    def peer(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")

    def loss(f):
        return lambda q, k, v: (f(q, k, v).astype("float32") ** 2).sum()

    return {
        "ours fwd": jax.jit(ours),
        "xla fwd": jax.jit(peer),
        "ours fwd+bwd": jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2))),
        "xla fwd+bwd": jax.jit(jax.grad(loss(peer), argnums=(0, 1, 2))),
    }


def memory(L=16384, H=8, D=64, causal=False):
    import jax

    q, k, v = (jax.ShapeDtypeStruct((1, L, H, D), np.float32) for _ in range(3))
    rows = {}
    for name, fn in _fns(causal).items():
        m = fn.lower(q, k, v).compile().memory_analysis()
        rows[name] = {
            "temp_MiB": m.temp_size_in_bytes / 2**20,
            "args+out_MiB": (m.argument_size_in_bytes + m.output_size_in_bytes) / 2**20,
        }
    return rows


def _rss_child(which: str, L: int, H: int, D: int) -> None:
    """Run one jitted function once (after compiling it) and print the peak RSS growth."""
    q, k, v = _inputs(L, H, D)
    fn = _fns(False)[which]
    compiled = fn.lower(q, k, v).compile()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    out = compiled(q, k, v)
    import jax

    jax.block_until_ready(out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"which": which, "rss_growth_MiB": (peak - base) / 1024, "seconds": time.perf_counter() - t}))


def speed(L=4096, H=8, D=64, repeats=5, causal=False):
    import jax

    q, k, v = _inputs(L, H, D)
    fns = _fns(causal)
    times = {n: [] for n in fns}
    for fn in fns.values():  # compile + warm up
        jax.block_until_ready(fn(q, k, v))
    for _ in range(repeats):
        for name, fn in fns.items():  # alternate, so load changes hit both alike
            t = time.perf_counter()
            jax.block_until_ready(fn(q, k, v))
            times[name].append(time.perf_counter() - t)
    flops = 4 * H * L * L * D * (0.5 if causal else 1.0)
    rows = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        f = flops * (2.5 if "bwd" in name else 1.0)
        rows[name] = {"median_s": med, "GFLOP/s": f / med / 1e9, "all_s": [round(x, 4) for x in ts]}
    return rows


def dispatch(repeats=5):
    """Eager calls on concrete CPU arrays: the host callback (cpu kernels) vs the native kernel."""
    import jax

    import dotattn

    rows = {}
    for L, H in ((128, 8), (1024, 8), (4096, 8)):
        q, k, v = _inputs(L, H, 64)
        fns = {
            "callback": lambda q, k, v: dotattn.attention(q, k, v, layout="blhd", causal=True),
            "native": lambda q, k, v: dotattn.attention(q, k, v, layout="blhd", causal=True, implementation="jax"),
        }
        times = {n: [] for n in fns}
        for fn in fns.values():
            jax.block_until_ready(fn(q, k, v))
        for _ in range(repeats):
            for name, fn in fns.items():
                t = time.perf_counter()
                jax.block_until_ready(fn(q, k, v))
                times[name].append(time.perf_counter() - t)
        rows[L] = {n: statistics.median(ts) for n, ts in times.items()}
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--L", type=int, default=4096)
    ap.add_argument("--H", type=int, default=8)
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--run-16k", action="store_true", help="also run forward and grad at 16k once (peak RSS)")
    ap.add_argument("--dispatch", action="store_true", help="eager CPU: host callback vs native, causal, H8 D64")
    ap.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rss_child:
        _rss_child(args.rss_child, 16384, args.H, args.D)
        return 0
    print("load:", os.popen("uptime").read().strip())
    if not args.skip_memory:
        print("memory at L=16384 (XLA buffer assignment, compiled, not run):")
        for name, row in memory(H=args.H, D=args.D).items():
            print(f"  {name:<14} temp {row['temp_MiB']:9.1f} MiB   args+out {row['args+out_MiB']:7.1f} MiB")
    if args.run_16k:
        for which in ("ours fwd", "ours fwd+bwd"):
            done = subprocess.run(
                [sys.executable, __file__, "--rss-child", which, "--H", str(args.H), "--D", str(args.D)],
                capture_output=True, text=True, check=False,
            )
            print("  run once at 16k:", done.stdout.strip() or done.stderr[-500:])
    if args.dispatch:
        print("eager, concrete CPU arrays, causal, B=1, H=8, D=64 (median seconds):")
        for L, row in dispatch(args.repeats).items():
            print(f"  L={L:<5} callback {row['callback']:.4f} s   native {row['native']:.4f} s   "
                  f"native/callback = {row['native'] / row['callback']:.2f}")
    if not args.skip_speed:
        kind = "causal (top-left)" if args.causal else "dense"
        print(f"speed at L={args.L}, H={args.H}, D={args.D}, {kind}, B=1, float32, {args.repeats} repeats:")
        rows = speed(args.L, args.H, args.D, args.repeats, args.causal)
        for name, row in rows.items():
            print(f"  {name:<14} median {row['median_s']:.3f} s  {row['GFLOP/s']:6.1f} GFLOP/s  {row['all_s']}")
        for what in ("fwd", "fwd+bwd"):
            print(f"  ratio {what}: xla / ours = {rows[f'xla {what}']['median_s'] / rows[f'ours {what}']['median_s']:.2f}x")
    print("load:", os.popen("uptime").read().strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
