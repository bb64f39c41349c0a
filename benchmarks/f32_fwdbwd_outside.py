"""Where a float32 forward+backward through the torch front end spends its time outside the kernels.

One call is ``dotattn.torch.attention(q, k, v, causal=…, implementation="cpu").backward(dO)``
(the issue-13 row, as ``cpu_vs_sdpa_interleaved.py`` times it).  Every compiled entry point
the cpu backend calls from Python (the forward and backward kernels, the split-AMX passes,
the range checks' maximum, dQ's epilogue, …) is wrapped in a timer, and the torch autograd
step is split at the forward/backward boundary; what is not inside a wrapped entry is
"outside the kernels" (NumPy passes, allocations, checks, the torch glue).  ``--cprofile``
also prints the outside functions by own time.

    flock /tmp/bench.lock env PYTHONPATH=src .venv/bin/python benchmarks/f32_fwdbwd_outside.py \\
        [--cases fwdbwd,fwdbwd128,causal-fwdbwd] [--rounds 7] [--cprofile] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import functools
import io
import pstats
import statistics
import time

CASES = {
    "fwdbwd": dict(H=8, L=4096, D=64, causal=False),
    "fwdbwd128": dict(H=4, L=4096, D=128, causal=False),
    "causal-fwdbwd": dict(H=8, L=4096, D=64, causal=True),
}

# (module, attribute) of the compiled entries cpu.py calls from Python
ENTRIES = {
    "dotattn.kernels._cpu_kernels": ("forward", "backward", "_backward_chunk"),
    "dotattn.kernels._cpu_amx_f32": (
        "_abs_bits_max", "split_tiles", "split_columns", "split_row_pairs", "split_tiles_t",
    ),
    # bfloat16 (--dtype bfloat16): the packings and the gradients' rounding
    "dotattn.kernels._cpu_amx": ("pack_vt", "pack_pairs_t", "pack_row_pairs"),
    "dotattn.kernels._cpu_primitives": ("_round_to_bf16",),
}
# run_chunks' jobs (a pool thread and the caller): timed whole, by the job's name

spent: dict[str, float] = collections.defaultdict(float)


def _timed(name, fn):
    @functools.wraps(fn)
    def run(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[name] += time.perf_counter() - t0

    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default="fwdbwd,fwdbwd128,causal-fwdbwd")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--cprofile", action="store_true")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args()
    import importlib

    import torch

    import dotattn.torch as dt
    from dotattn.kernels import cpu  # noqa: F401  (loads the kernel modules)

    for modname, names in ENTRIES.items():
        mod = importlib.import_module(modname)
        for name in names:
            if hasattr(mod, name):
                setattr(mod, name, _timed(name, getattr(mod, name)))
    from dotattn.kernels import _launch

    run_chunks = _launch.run_chunks

    def chunks_timed(fn, args, nchunks):
        return _timed(getattr(fn, "__name__", "run_chunks"), run_chunks)(fn, args, nchunks)

    _launch.run_chunks = chunks_timed
    for case in args.cases.split(","):
        c = CASES[case]
        g = torch.Generator().manual_seed(0)
        dtype = getattr(torch, args.dtype)
        q, k, v, do = (torch.randn(1, c["H"], c["L"], c["D"], generator=g).to(dtype) for _ in range(4))
        rows = collections.defaultdict(list)

        def one():
            qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
            spent.clear()
            t0 = time.perf_counter()
            out = dt.attention(qq, kk, vv, causal=c["causal"], implementation="cpu")
            t1 = time.perf_counter()
            fwd = dict(spent)
            spent.clear()
            out.backward(do)
            t2 = time.perf_counter()
            return (t1 - t0, fwd), (t2 - t1, dict(spent))

        one()  # warm-up: loads the kernels
        profile = cProfile.Profile() if args.cprofile else None
        for _ in range(args.rounds):
            time.sleep(0.2)
            if profile is not None:
                profile.enable()
            (tf, fwd), (tb, bwd) = one()
            if profile is not None:
                profile.disable()
            for phase, total, parts in (("fwd", tf, fwd), ("bwd", tb, bwd)):
                rows[(phase, "total")].append(total)
                for name, s in parts.items():
                    rows[(phase, name)].append(s)
                rows[(phase, "outside")].append(total - sum(parts.values()))
        print(f"{case} {args.dtype} (H{c['H']} L{c['L']} D{c['D']}{' causal' if c['causal'] else ''}), medians of {args.rounds}, ms:")
        for (phase, name), ts in rows.items():
            print(f"  {phase} {name:<22} {statistics.median(ts) * 1e3:8.2f}   (min {min(ts) * 1e3:.2f})")
        if profile is not None:
            text = io.StringIO()
            pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(25)
            print(text.getvalue())


if __name__ == "__main__":
    main()
