"""``dotattn precompile``: compile the ``cpu`` backend's kernels once, at install time.

``make install`` runs it.  The machine code goes to the package's own kernel cache
(``dotattn/kernels/_precompiled``), which every later process loads from in well under a
second — whatever ``NUMBA_CACHE_DIR`` says — instead of compiling for ≈ 35 s on its first call.
On a CPU with AMX it then times float32's two product routes and stores the faster for this
machine (:mod:`dotattn.kernels.f32_route`; ``--skip-route`` leaves the stored choice as it is).

It also writes the package's bytecode (``compileall``): an editable install has none, and where
the environment sets ``PYTHONDONTWRITEBYTECODE`` no import writes it either, so every process
compiled dotattn's modules from source first — 75–100 ms of each start here (4 Dec 2026).

Each dtype compiles in its own process where the machine has more than one core (``--jobs``):
Numba compiles on one core, and one after the other the three dtypes took 419 s here.  The
processes' saves into the one directory take turns (``kernels/_cpu_cache.py``: Numba's own
save, unlocked, lost and crossed entries when two processes saved one function's signatures).
"""

from __future__ import annotations

import argparse
import os
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
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="processes compiling at once, one dtype each (Numba compiles on one core; "
        "default: one per dtype where the machine has more than one core)",
    )


def run(args: argparse.Namespace) -> int:
    from .kernels import _cpu_cache, cpu

    dtypes = list(dict.fromkeys(d.strip() for d in args.dtypes.split(",") if d.strip()))  # (a repeat once)
    if not dtypes:  # ("," compiled nothing and said "done", exit status 0, until 7 Dec 2026)
        print(f"--dtypes names no dtype, got {args.dtypes!r}; known: {', '.join(cpu.PRECOMPILE_DTYPES)}", file=sys.stderr)
        return 2
    unknown = [d for d in dtypes if d not in cpu.PRECOMPILE_DTYPES]
    if unknown:
        print(f"--dtypes: unknown {unknown}; known: {', '.join(cpu.PRECOMPILE_DTYPES)}", file=sys.stderr)
        return 2
    if args.jobs is not None and args.jobs < 1:
        print(f"--jobs: expected a count of processes ≥ 1, got {args.jobs}", file=sys.stderr)
        return 2
    jobs = args.jobs if args.jobs is not None else (len(dtypes) if (os.cpu_count() or 1) > 1 else 1)
    started = time.perf_counter()
    print(f"dotattn precompile: cpu kernels → {_cpu_cache.PRECOMPILED_DIR}", flush=True)
    if jobs > 1 and len(dtypes) > 1:
        _compile_in_processes(dtypes, jobs)
    else:
        cpu.precompile(dtypes, progress=_print_row)
    from .kernels import _cpu_kernels

    if not _cpu_cache.uses_precompiled(_cpu_kernels.forward):
        print(
            f"warning: {_cpu_cache.PRECOMPILED_DIR} is not writable, nor a user cache; the kernels went to Numba's usual cache",
            file=sys.stderr,
        )
    elif _cpu_cache.cache_dir() != _cpu_cache.PRECOMPILED_DIR:
        print(
            f"note: {_cpu_cache.PRECOMPILED_DIR} is not writable; the kernels went to {_cpu_cache.cache_dir()} "
            "(this user's copy of it)",
            file=sys.stderr,
        )
    if "float32" in dtypes and not args.skip_route:
        _measure_f32_route()
    _write_bytecode()
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 0


def _print_row(what: str, seconds: float) -> None:
    print(f"  {what}: {seconds:.1f} s", flush=True)


def _compile_dtype(name: str) -> None:
    """One worker's share: ``name``'s kernels (the rows go to the shared stdout as they finish)."""
    from .kernels import cpu

    cpu.precompile((name,), progress=_print_row)


def _die_with_parent(parent: int) -> None:
    """A worker's start: it ends when the ``dotattn precompile`` that spawned it ends (killed,
    interrupted) instead of compiling on, orphaned, for minutes (Linux: ``PR_SET_PDEATHSIG``;
    elsewhere nothing is done).  A parent already gone before the call: the worker exits."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        os._exit(1)


def _compile_in_processes(dtypes: list[str], jobs: int) -> None:
    """Each dtype in its own process, ``jobs`` at once: Numba compiles on one core, and the
    dtypes' kernels are separate specializations (≈ 160, 165 and 95 s here for float32,
    bfloat16 and float64 one after the other).  Their saves into the one directory are
    serialized by :mod:`dotattn.kernels._cpu_cache`'s lock.  Fresh (spawned) processes: the
    parent has imported Numba, and a forked copy of a process with threads is unsafe."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    try:
        with ProcessPoolExecutor(max_workers=min(jobs, len(dtypes)), mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_die_with_parent, initargs=(os.getpid(),)) as pool:
            for future in [pool.submit(_compile_dtype, name) for name in dtypes]:
                future.result()  # a worker's exception is raised here, with its traceback
        return
    except (OSError, NotImplementedError, BrokenProcessPool) as exc:
        # no process pool here (no semaphores in a sandbox, a worker killed): one process does
        # it all, as before — what is already compiled loads, and a real error shows itself
        print(f"  compiling in parallel failed ({type(exc).__name__}: {exc}); compiling in this process", flush=True)
    from .kernels import cpu

    cpu.precompile(dtypes, progress=_print_row)


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
