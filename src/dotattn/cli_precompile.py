"""``dotattn precompile``: compile the ``cpu`` backend's kernels once, at install time.

``make install`` runs it.  The machine code goes to the package's own kernel cache
(``dotattn/kernels/_precompiled``), which every later process loads from in well under a
second — whatever ``NUMBA_CACHE_DIR`` says — instead of compiling for ≈ 35 s on its first call.
On a CPU with AMX it then times float32's two product routes and stores the faster for this
machine (:mod:`dotattn.kernels.f32_route`; ``--skip-route`` leaves the stored choice as it is).

It also writes the package's bytecode (``compileall``): an editable install has none, and where
the environment sets ``PYTHONDONTWRITEBYTECODE`` no import writes it either, so every process
compiled dotattn's modules from source first — 75–100 ms of each start here (4 Dec 2026).
"""

from __future__ import annotations

import argparse
import sys
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtypes",
        default="float32,bfloat16,float64",
        help="comma-separated input dtypes to compile for (default float32,bfloat16,float64)",
    )
    parser.add_argument(
        "--skip-route",
        action="store_true",
        help="do not time float32's two product routes (split-AMX, MKL) to store the faster for this machine",
    )


def run(args: argparse.Namespace) -> int:
    from .kernels import _cpu_cache, cpu

    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = [d for d in dtypes if d not in cpu.PRECOMPILE_DTYPES]
    if unknown:
        print(f"--dtypes: unknown {unknown}; known: {', '.join(cpu.PRECOMPILE_DTYPES)}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    print(f"dotattn precompile: cpu kernels → {_cpu_cache.PRECOMPILED_DIR}", flush=True)
    for what, seconds in cpu.precompile(dtypes, progress=lambda w: print(f"  {w} …", end="", flush=True)):
        print(f" {seconds:.1f} s", flush=True)
    from .kernels import _cpu_kernels

    if not _cpu_cache.uses_precompiled(_cpu_kernels.forward):
        print(
            f"warning: {_cpu_cache.PRECOMPILED_DIR} is not writable; the kernels went to Numba's usual cache",
            file=sys.stderr,
        )
    if "float32" in dtypes and not args.skip_route:
        _measure_f32_route()
    _write_bytecode()
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 0


def _write_bytecode() -> None:
    """The package's ``.pyc`` files, written whatever ``PYTHONDONTWRITEBYTECODE`` says (a file
    that cannot be written is left to import, which compiles it from source as before)."""
    import compileall
    from pathlib import Path

    package = Path(__file__).resolve().parent
    ok = compileall.compile_dir(str(package), quiet=2, workers=1)
    print(f"  bytecode of {package} {'written' if ok else 'written in part (some files could not be)'}", flush=True)


def _measure_f32_route() -> None:
    from .kernels import cpu, f32_route

    on, why = f32_route.available()
    if not on:
        print(f"  float32 products: {why} (nothing to choose)", flush=True)
        return
    print("  float32 products: timing the split-AMX and MKL routes …", end="", flush=True)
    record = cpu.measure_f32_routes()
    where = "stored" if f32_route.store(record) else f"not stored ({f32_route.path()} is not writable)"
    ms = record["ms"]
    print(f" {record['route']} ({', '.join(f'{r} {ms[r]:.0f} ms' for r in f32_route.ROUTES)}, "
          f"fwd+bwd medians of {record['rounds']}) — {where}", flush=True)
