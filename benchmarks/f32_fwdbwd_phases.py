"""Where a float32 forward+backward call's time goes on the split-AMX route: wall and CPU time
per phase (``bf16_fwdbwd_phases.py``'s timers — wall per phase and every thread's CPU time from
``/proc/self/task/*/schedstat``, so ``busy = CPU / wall`` says how many cores a phase kept busy
— around float32's steps instead of bfloat16's).

A torch call with ``requires_grad`` (as ``cpu_vs_sdpa_interleaved.py``'s fwd+bwd cases: the
tensors made once, outside the timed call) or the NumPy API (``dotattn.attention`` +
``attention_backward``).  Phases: the forward's checks (``_forward_largest``), its split
operands (``_with_split_operands``, K's pieces), its kernel; the backward's one pass over its
operands (``_query_side_pass``: checks, dO's LSE fix, Δ, q's and dO's pieces), the zeroed
``dq_parts``/dK/dV (``np.zeros``), its kernel, dQ's sum (``run_chunks: dq_from_transposed``);
``rest`` is the call less the outer phases (torch's autograd engine, conversions, the front
end's glue, the gradients out).  Run with the route pinned as the A/Bs are
(``DOTATTN_F32_PRODUCTS=amx5``) and with glibc's malloc mode pinned
(``MALLOC_MMAP_THRESHOLD_=33554432``: docs/performance.md, "The slow mode is glibc's malloc").

    flock /tmp/bench.lock env MALLOC_MMAP_THRESHOLD_=33554432 PYTHONPATH=src .venv/bin/python \
        benchmarks/f32_fwdbwd_phases.py [--H 4 --D 128] [--rounds 9] [--numpy] [--causal]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bf16_fwdbwd_phases import Phases, _thread_cpu  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--L", type=int, default=4096)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--numpy", action="store_true", help="the NumPy API instead of torch autograd")
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()

    import torch

    import dotattn
    import dotattn.torch as dt
    from dotattn import dispatch
    from dotattn.kernels import _launch, cpu
    from dotattn.torch import functional

    g = torch.Generator().manual_seed(0)
    shape = (1, args.H, args.L, args.D)
    q, k, v, dout = (torch.randn(*shape, generator=g) for _ in range(4))
    qn, kn, vn, don = (x.numpy() for x in (q, k, v, dout))

    def call():
        if args.numpy:
            out, lse = dotattn.attention(qn, kn, vn, causal=args.causal, implementation="cpu", return_lse=True)
            dotattn.attention_backward(qn, kn, vn, out, lse, don, causal=args.causal, implementation="cpu")
            return
        qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
        dt.attention(qq, kk, vv, causal=args.causal, implementation="cpu").backward(dout)

    call()  # loads (or compiles) the kernels before anything is wrapped
    call()
    ph = Phases()
    kern = cpu.default_kernels()
    wrapped = [
        (functional, "_forward_body", "torch: _forward_body"),
        (functional, "_backward_body", "torch: _backward_body"),
        (dispatch, "run_forward", "dispatch.run_forward"),
        (dispatch, "run_backward", "dispatch.run_backward"),
        (cpu, "forward", "cpu.forward"),
        (cpu, "backward", "cpu.backward"),
        (cpu, "prepare", "prepare (K/V packing)"),
        (cpu, "_forward_largest", "fwd checks"),
        (cpu, "_with_split_operands", "split operands"),
        (cpu, "_query_side_pass", "bwd query-side pass"),
        (kern, "forward", "fwd kernel"),
        (kern, "backward", "bwd kernel"),
        (np, "zeros", "np.zeros (any)"),
        (np, "empty", "np.empty (any)"),
    ]
    for mod, attr, name in wrapped:
        setattr(mod, attr, ph.wrap(name, getattr(mod, attr)))
    chunks = _launch.run_chunks

    def run_chunks(fn, args_, nchunks):  # a phase per function run in chunks (the dQ sum, the pass …)
        return ph.wrap(f"run_chunks: {getattr(fn, '__name__', fn)}", chunks)(fn, args_, nchunks)

    run_chunks.__wrapped__ = chunks
    _launch.run_chunks = run_chunks
    wrapped.append((_launch, "run_chunks", ""))
    ph.outer = {"torch: _forward_body", "torch: _backward_body"} if not args.numpy else {"cpu.forward", "cpu.backward"}
    try:
        for _ in range(args.rounds):
            time.sleep(0.2)
            c0, t0 = _thread_cpu(), time.perf_counter()
            call()
            t1, c1 = time.perf_counter(), _thread_cpu()
            ph.end_round(t1 - t0, sum(c1[k] - c0.get(k, 0) for k in c1) * 1e-9)
    finally:
        for mod, attr, _ in wrapped:
            setattr(mod, attr, getattr(mod, attr).__wrapped__)

    load = os.getloadavg()
    api = "NumPy API" if args.numpy else "torch autograd"
    route = cpu.f32_products_path()[1] if hasattr(cpu, "f32_products_path") else "?"
    print(f"float32 fwd+bwd H{args.H} L{args.L} D{args.D}{' causal' if args.causal else ''}, {api}, "
          f"{args.rounds} rounds, {time.strftime('%H:%M', time.gmtime())} UTC, load {load[0]:.2f}, "
          f"route {os.environ.get('DOTATTN_F32_PRODUCTS', 'stored')} ({route}), "
          f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', 'unset')}")
    print(f"{'phase':<32} {'wall ms':>8} {'CPU ms':>8} {'busy':>5}  idle core-ms (2·wall − CPU)   per thread (ms, top 3)")
    for name in list(ph.wall):
        w = statistics.median(ph.wall[name]) * 1e3
        c = statistics.median(ph.cpu[name]) * 1e3
        pt = ""
        if ph.per_thread.get(name):
            pt = " / ".join(f"{statistics.median(r[i] for r in ph.per_thread[name] if len(r) > i) * 1e3:.1f}"
                            for i in range(max(len(r) for r in ph.per_thread[name])))
        print(f"{name:<32} {w:8.2f} {c:8.2f} {c / w if w > 0 else 0:5.2f}  {2 * w - c:8.2f}                     {pt}")


if __name__ == "__main__":
    main()
