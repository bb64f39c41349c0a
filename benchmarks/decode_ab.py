"""Alternating A/B of decode kernel versions in one process (docs/decoding.md, issue 9 §2).

Each FILE is a copy of ``src/dotattn/kernels/_cpu_decode_kernels.py`` (an old commit's, a
variant's; ``new`` = the one imported with dotattn); they are imported side by side and
``attention_with_kvcache(implementation="cpu")`` runs the bench's inputs (one query, Hq 32,
Hkv 8, D 128, ``bench_decode``'s peers) with each in turn, call by call, in a random order per
round, so background load hits all of them alike.  ``pool`` forces the parallel items on, ``alone`` the calling thread.
Prints the median time of REPEATS calls per version, the K/V GB/s, the median CPU time of the
process per call (both threads; a thread off its core is not counted — on a busy machine the
steadier figure), the load and the NumPy
one-thread read before and after.  On a shared machine run it under ``flock /tmp/bench.lock``:

    git show main:src/dotattn/kernels/_cpu_decode_kernels.py > /tmp/old.py
    PYTHONPATH=src python benchmarks/decode_ab.py 1 32768 float16 15 pool /tmp/old.py new [--paged]

(A file copy's Numba cache goes to a ``__pycache__`` beside it, keyed by its module name, the
file's stem: give different versions different names.  A copy from before the entries' ``qscale``
argument (1 Dec 2026) is called through :class:`_NoScaleArg`, which drops it.)
``new:widen`` is the imported kernels with the bfloat16 ``vdpbf16ps`` scores off
(``cpu_decode.BF16_DOT = False``: k widened to float32 and FMAs, as before), e.g.

    PYTHONPATH=src python benchmarks/decode_ab.py 1 4096 bfloat16 41 alone new:widen new  ``--shape=HQ,HKV,D`` changes the heads
and head dim (SmolLM2-135M: ``--shape=9,3,64``).
"""

from __future__ import annotations

import importlib.util
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from dotattn import bench_decode as bd
from dotattn.kernels import cpu_decode


def _load():
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


class _NoScaleArg:
    """A kernels module from before the entries took ``qscale`` (after ``softcap``; the
    ``cpu_decode`` imported passes it, 1.0 for a pre-scaled q): its entries called without it
    (a Python wrapper: ≈ 1 µs a call more for the old version), everything else forwarded."""

    def __init__(self, module):
        self._m = module

    def __getattr__(self, name):
        return getattr(self._m, name)

    @staticmethod
    def _drop(common):
        return tuple(common[:14]) + tuple(common[15:])

    def run_serial(self, *args):
        return self._m.run_serial(*self._drop(args))

    def run_items(self, counter, total, role, *common):
        return self._m.run_items(counter, total, role, *self._drop(common))

    def run_items_team(self, counter, total, workers, common):
        return self._m.run_items_team(counter, total, workers, self._drop(common))

    def run_items_caller(self, flags, gen, partners, max_cycles, counter, total, role, common):
        return self._m.run_items_caller(flags, gen, partners, max_cycles, counter, total, role, self._drop(common))

    def run_items_partner(self, flags, i, gen, counter, total, role, common):
        return self._m.run_items_partner(flags, i, gen, counter, total, role, self._drop(common))


def kernel_versions(files: list[str]) -> dict:
    """``{name: module}``: each FILE (a copy of ``_cpu_decode_kernels.py``) imported as its own
    module beside dotattn's kernels (its stem names it); ``new`` = the kernels dotattn imported.

    The imported kernels' own file is taken as ``new``, not imported a second time: a second
    module from that path would save its Numba cache under the package's cache locator
    (``kernels/_precompiled``), beside the real module's entries for the same source, and a
    later process loading the kernels could then load an entry that names the copy's module
    (``ModuleNotFoundError: dotattn.kernels._dk__cpu_decode_kernels``; 4 Dec 2026)."""
    mods = {}
    own = Path(cpu_decode.K.__file__).resolve()
    for f in files:
        if f in ("new", "new:widen"):
            mods[f] = cpu_decode.K
            continue
        if Path(f).resolve() == own:
            print(f"{f}: the imported kernels themselves; run as 'new'", file=sys.stderr)
            mods["new"] = cpu_decode.K
            continue
        stem = f.split("/")[-1][:-3]
        spec = importlib.util.spec_from_file_location("dotattn.kernels._dk_" + stem, f)
        m = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = m
        spec.loader.exec_module(m)
        # a copy from before the float16 casts moved into the kernels (1 Dec 2026) lacks them:
        # the imported ones stand in (cpu_decode calls them for float16 calls)
        for name in ("half_from_float", "float_from_half_scaled"):
            if not hasattr(m, name):
                setattr(m, name, getattr(cpu_decode.K, name))
        mods[stem] = m if "qscale" in m.run_serial.py_func.__code__.co_varnames else _NoScaleArg(m)
    return mods


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if len(args) < 6:
        print(__doc__)
        raise SystemExit(2)
    B, ctx, dt, reps, mode = int(args[0]), int(args[1]), args[2], int(args[3]), args[4]
    mods = kernel_versions(args[5:])
    dot = cpu_decode.BF16_DOT  # per version: the vdpbf16ps scores where the process has them
    dots = {n: dot and n == "new" for n in mods}
    for a in sys.argv:
        if a.startswith("--shape="):
            bd.HQ, bd.HKV, bd.D = (int(x) for x in a.split("=", 1)[1].split(","))
    choose = mode == "pool"
    cpu_decode.ParallelChoice.choose = lambda self: choose
    q, kc, vc = bd.case_inputs(B, ctx, dt)
    paged = "--paged" in sys.argv
    run = bd._make_peer("dotattn-paged" if paged else "dotattn", B, ctx, dt, q, kc, vc)
    first = {}
    for n, m in mods.items():  # compile, warm up, and check the versions agree bit for bit
        cpu_decode.K, cpu_decode.BF16_DOT = m, dots[n]
        first[n] = np.asarray(run(), dtype=np.float32)
        run()
    names = list(mods)
    same = all(np.array_equal(first[names[0]], first[n]) for n in names[1:])
    print("load", _load(), "read", [round(x, 1) for x in bd.read_bandwidth(3)], "same bits:", same, flush=True)
    times = {n: [] for n in mods}
    cpu = {n: [] for n in mods}  # CPU seconds of the process (both threads): time off the core not counted
    for _ in range(reps):
        order = list(mods.items())
        random.shuffle(order)  # a random order per round: a drift in the machine's speed hits all alike
        for n, m in order:
            cpu_decode.K, cpu_decode.BF16_DOT = m, dots[n]
            c0 = time.process_time()
            t0 = time.perf_counter()
            run()
            times[n].append(time.perf_counter() - t0)
            cpu[n].append(time.process_time() - c0)
    nb = kc.nbytes + vc.nbytes
    cells = "  ".join(
        f"{n} {statistics.median(t) * 1e3:.3f} ms ({nb / statistics.median(t) / 1e9:.1f} GB/s, cpu {statistics.median(cpu[n]) * 1e3:.1f})"
        for n, t in times.items()
    )
    print(f"B{B} {ctx} {dt}{' paged' if paged else ''} {mode}: {cells}", "load", _load(),
          "read", [round(x, 1) for x in bd.read_bandwidth(3)], flush=True)


if __name__ == "__main__":
    main()
