"""What ``dotattn bench`` and ``dotattn bench --shapes decode`` share.

Both run every peer in one process, case by case: a pause so the previous peer's worker
threads park, a warm-up call, ``repeats`` timed calls, and ``× sdpa`` = torch SDPA's median
time over the peer's.  Kept apart from both modules (``bench`` hands ``--shapes decode`` to
``bench_decode``, so neither may import the other back).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

# BLAS and OpenMP worker threads spin for a while after a peer's last call; this pause lets
# them park so they do not steal the cores from the next peer's measurement.
PAUSE_S = 0.3


def time_calls(
    run: Callable[[], Any], repeats: int, after_first: Callable[[], Any] | None = None
) -> tuple[float, list[float]]:
    """One warm-up call, then ``repeats`` timed ones: ``(warm-up seconds, [ms per call])``.

    The warm-up's time is a first call's cost (JIT compiles, loads, allocations).
    ``after_first``, if given, is called between the warm-up call and the timed ones (untimed).
    """
    t0 = time.perf_counter()
    run()
    first_s = time.perf_counter() - t0
    if after_first is not None:
        after_first()
    times_ms = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times_ms.append((time.perf_counter() - t0) * 1e3)
    return first_s, times_ms


def fill_ratios(rows: list) -> None:
    """Set ``ratio_vs_sdpa`` = the ``torch-sdpa`` row's ``ms`` / each row's, case by case."""
    sdpa = {r.case: r.ms for r in rows if r.peer == "torch-sdpa" and r.ms}
    for r in rows:
        if r.ms and r.case in sdpa:
            r.ratio_vs_sdpa = sdpa[r.case] / r.ms


@contextlib.contextmanager
def progress_steps(total: int, describe: Callable[..., str]) -> Iterator[Callable[..., None]]:
    """A transient progress bar of ``total`` steps; yields ``step(*key)``, which advances it
    with the description ``describe(*key)``."""
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task("benchmarking", total=total)

        def step(*key) -> None:
            bar.update(task, advance=1, description=describe(*key))

        yield step
