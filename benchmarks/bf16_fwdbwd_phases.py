"""Where a bfloat16 (or, ``--dtype float32``, a float32) forward+backward call leaves a core
idle: wall and CPU time per phase.

A torch call with ``requires_grad`` (as ``cpu_vs_sdpa_interleaved.py``'s fwd+bwd cases) or the
NumPy API (``dotattn.attention`` + ``attention_backward``), with the cpu backend's steps wrapped
in timers: each phase's wall time and the CPU time every thread of the process spent in it
(``/proc/self/task/*/schedstat``: time on a CPU, spinning included), so ``busy = CPU / wall``
says how many of the cores the phase kept busy.  ``rest`` is the call's time outside the
wrapped steps (torch's autograd engine, conversions, the front end's glue).

The kernels themselves report per thread: ``kernel: per thread`` lists each thread's CPU
time inside the kernel; a thread that ran out of work early and parked shows less.

    flock /tmp/bench.lock .venv/bin/python benchmarks/bf16_fwdbwd_phases.py [--H 4 --D 128] [--rounds 9] [--numpy] [--causal] [--forward] [--dtype float32]

float32 runs (``f32_fwdbwd_phases.py`` is this script with ``--dtype float32`` by default) also
name the split route's steps and print the product route and glibc's malloc threshold.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict

import numpy as np


def _thread_cpu() -> dict[int, int]:
    """ns on a CPU for each thread of this process."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                out[int(tid)] = int(f.read().split()[0])
        except OSError:
            pass
    return out


class Phases:
    def __init__(self):
        self.wall = defaultdict(list)
        self.cpu = defaultdict(list)
        self.per_thread = defaultdict(list)
        self.active = set()
        self.outer = set()  # the phases that ``rest`` leaves out (the others nest in them)
        self.round = defaultdict(lambda: [0.0, 0.0, []])

    def wrap(self, name, fn):
        phases = self

        def timed(*a, **kw):
            if name in phases.active:  # (recursion: counted once)
                return fn(*a, **kw)
            phases.active.add(name)
            c0, t0 = _thread_cpu(), time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                t1, c1 = time.perf_counter(), _thread_cpu()
                phases.active.discard(name)
                d = sorted((c1[k] - c0.get(k, 0) for k in c1), reverse=True)
                r = phases.round[name]
                r[0] += t1 - t0
                r[1] += sum(d) * 1e-9
                r[2] = [x * 1e-9 for x in d[:3]]

        timed.__wrapped__ = fn
        return timed

    def end_round(self, total_wall, total_cpu):
        inside_w = sum(r[0] for n, r in self.round.items() if n in self.outer)
        inside_c = sum(r[1] for n, r in self.round.items() if n in self.outer)
        for name, (w, c, pt) in self.round.items():
            self.wall[name].append(w)
            self.cpu[name].append(c)
            self.per_thread[name].append(pt)
        self.wall["rest"].append(total_wall - inside_w)
        self.cpu["rest"].append(total_cpu - inside_c)
        self.wall["TOTAL"].append(total_wall)
        self.cpu["TOTAL"].append(total_cpu)
        self.round.clear()


def main(dtype: str = "bfloat16") -> None:
    """``dtype``: the default of ``--dtype`` (``f32_fwdbwd_phases.py`` runs this with float32)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default=dtype)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--L", type=int, default=4096)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--numpy", action="store_true", help="the NumPy API instead of torch autograd")
    ap.add_argument("--forward", action="store_true",
                    help="the forward alone (torch under no_grad, as the interleaved script's forward cases)")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--pause", type=float, default=0.2,
                    help="seconds idle before each timed call (0: back to back, as the interleaved script's calls)")
    args = ap.parse_args()

    import torch

    import dotattn
    import dotattn.torch as dt
    from dotattn import dispatch
    from dotattn.kernels import _cpu_primitives, _launch, cpu
    from dotattn.torch import functional

    g = torch.Generator().manual_seed(0)
    shape = (1, args.H, args.L, args.D)
    q, k, v, dout = (torch.randn(*shape, generator=g).to(getattr(torch, args.dtype)) for _ in range(4))
    if args.dtype == "bfloat16":
        qn, kn, vn, don = (x.view(torch.int16).numpy().view(cpu.BFLOAT16) for x in (q, k, v, dout))
    else:
        qn, kn, vn, don = (x.numpy() for x in (q, k, v, dout))

    def call():
        if args.forward:
            if args.numpy:
                dotattn.attention(qn, kn, vn, causal=args.causal, implementation="cpu")
            else:
                with torch.no_grad():
                    dt.attention(q, k, v, causal=args.causal, implementation="cpu")
            return
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
    # (both dtypes' steps: a step the call does not reach prints no row)
    wrapped = [
        (functional, "_forward_body", "torch: _forward_body"),
        (functional, "_backward_body", "torch: _backward_body"),
        (dispatch, "run_forward", "dispatch.run_forward"),
        (dispatch, "run_backward", "dispatch.run_backward"),
        (cpu, "forward", "cpu.forward"),
        (cpu, "backward", "cpu.backward"),
        (cpu, "prepare", "prepare (K/V packing)"),
        (cpu, "_forward_largest", "fwd checks (float32 split)"),
        (cpu, "_with_split_operands", "split operands"),
        (cpu, "_query_side_pass", "bwd query-side pass (f32)"),
        (cpu, "_backward_checks_and_delta", "bwd checks + delta"),
        (cpu, "_bf16_query_side_pairs", "bwd q/dO AMX packings"),
        (cpu, "_zeros_aligned", "bwd dq_parts zeros"),
        (kern, "forward", "fwd kernel"),
        (kern, "backward", "bwd kernel"),
        (np, "zeros", "np.zeros (any)"),
        (np, "empty", "np.empty (any)"),
        (_cpu_primitives, "_round_to_bf16", "bwd grads rounding"),
    ]
    for mod, attr, name in wrapped:
        setattr(mod, attr, ph.wrap(name, getattr(mod, attr)))
    chunks = _launch.run_chunks

    def run_chunks(fn, args_, nchunks):  # a phase per function run in chunks (the dQ sum, the checks …)
        return ph.wrap(f"run_chunks: {getattr(fn, '__name__', fn)}", chunks)(fn, args_, nchunks)

    run_chunks.__wrapped__ = chunks
    _launch.run_chunks = run_chunks
    wrapped.append((_launch, "run_chunks", ""))
    # ``rest``: the call less these (the others are parts of them)
    ph.outer = {"torch: _forward_body", "torch: _backward_body"} if not args.numpy else {"cpu.forward", "cpu.backward"}
    if args.forward and not args.numpy:  # (under no_grad the front end calls dispatch directly)
        ph.outer = {"dispatch.run_forward"}
    # np.zeros of dK/dV: counted by a wrapper on the module's np (cpu.np is numpy itself)
    try:
        for rnd in range(args.rounds):
            time.sleep(args.pause)
            c0, t0 = _thread_cpu(), time.perf_counter()
            call()
            t1, c1 = time.perf_counter(), _thread_cpu()
            ph.end_round(t1 - t0, sum(c1[k] - c0.get(k, 0) for k in c1) * 1e-9)
    finally:
        for mod, attr, _ in wrapped:
            setattr(mod, attr, getattr(mod, attr).__wrapped__)

    load = os.getloadavg()
    api = "NumPy API" if args.numpy else "torch autograd"
    route = ""
    if args.dtype == "float32":
        route = (f", route {os.environ.get('DOTATTN_F32_PRODUCTS', 'stored')} ({cpu.f32_products_path()[1]}), "
                 f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', 'unset')}")
    print(f"{args.dtype} {'forward' if args.forward else 'fwd+bwd'} H{args.H} L{args.L} D{args.D}{' causal' if args.causal else ''}, {api}, "
          f"{args.rounds} rounds, {time.strftime('%H:%M', time.gmtime())} UTC, load {load[0]:.2f}{route}")
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
