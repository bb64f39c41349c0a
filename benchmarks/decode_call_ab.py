"""Alternating A/B of ``cpu_decode.py`` versions (the Python around the decode kernels) in one
process, with torch SDPA beside them (docs/decoding-log.md, "The decode call's fixed costs").

OLD is a copy of ``src/dotattn/kernels/cpu_decode.py`` (e.g. ``git show main:… > /tmp/cd_old.py``),
imported as its own module beside the one dotattn imported (``new``); both drive the same
kernels and the same partner threads.  ``attention_with_kvcache(implementation="cpu")`` runs the
bench's inputs (B1, one query, Hq 32, Hkv 8, D 128, CONTEXT keys) with each in turn and, with
``--torch``, ``torch.nn.functional.scaled_dot_product_attention`` (bench_decode's peer), in a
random order each round (a peer right after torch finds torch's OpenMP workers still spinning).
``pool`` forces the parallel items on, ``alone`` the calling thread.  Prints medians of REPEATS
calls, the ratios to torch's, whether old and new gave the same bits, and the load.

    flock /tmp/bench.lock env PYTHONPATH=src python benchmarks/decode_call_ab.py /tmp/cd_old.py bfloat16 300 pool [CONTEXT] [--torch]
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import time

import numpy as np

import dotattn
from dotattn import bench_decode as bd
from dotattn import decoding
from dotattn.kernels import cpu_decode as new


def _load() -> str:
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if len(args) < 4:
        print(__doc__)
        raise SystemExit(2)
    spec = importlib.util.spec_from_file_location("dotattn.kernels._cd_old", args[0])
    old = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = old
    spec.loader.exec_module(old)
    if hasattr(old, "_get_partners"):  # a copy from before the partners moved to _launch (5 Dec, b353cf9)
        # its own partner class: two sets of threads then spin against each other between calls
        print("note: the old copy runs its own partner threads", file=sys.stderr)
    dt, reps, mode = args[1], int(args[2]), args[3]
    ctx = int(args[4]) if len(args) > 4 else 4096
    for m in (old, new):
        m.ParallelChoice.choose = (lambda self: True) if mode == "pool" else (lambda self: False)
    q, kc, vc = bd.case_inputs(1, ctx, dt)
    lengths = np.full(1, ctx, dtype=np.int64)

    def run():
        return dotattn.attention_with_kvcache(q, kc, vc, cache_lengths=lengths, implementation="cpu")

    torch_run = bd._make_peer("torch-sdpa", 1, ctx, dt, q, kc, vc) if "--torch" in sys.argv else None
    mods = {"old": old, "new": new}
    first = {}
    for n, m in mods.items():
        decoding._kernel_modules["cpu"] = m
        for _ in range(30):
            r = run()
        first[n] = np.asarray(r, dtype=np.float32)
    if torch_run is not None:
        bd.warm_up(torch_run, 0.25)
    load0 = _load()
    times: dict[str, list[float]] = {n: [] for n in list(mods) + (["torch"] if torch_run else [])}
    names = list(times)
    order = np.random.default_rng(1)
    for _ in range(reps):
        for n in [names[j] for j in order.permutation(len(names))]:
            if n == "torch":
                f = torch_run
            else:
                decoding._kernel_modules["cpu"] = mods[n]
                f = run
            t0 = time.perf_counter()
            f()
            times[n].append(time.perf_counter() - t0)
    decoding._kernel_modules["cpu"] = new
    med = {n: statistics.median(t) * 1e3 for n, t in times.items()}
    line = f"B1 {ctx} {dt} {mode}, {reps} calls each: old {med['old']:.3f} ms, new {med['new']:.3f} ms (new/old {med['new'] / med['old']:.3f})"
    if torch_run is not None:
        line += f", torch SDPA {med['torch']:.3f} ms: x SDPA old {med['torch'] / med['old']:.2f}, new {med['torch'] / med['new']:.2f}"
    same = np.array_equal(first["old"], first["new"])
    print(f"{line}; same bits {same}; load {load0} -> {_load()}", flush=True)


if __name__ == "__main__":
    main()
