"""What ``dotattn bench`` and ``dotattn bench --shapes decode`` share.

Both run every peer in one process, case by case: each peer's warm-up call first, then
``repeats`` **rounds**; a round times every peer once, in an order shuffled per round
(:func:`rounds_of`), each after a pause so the previous peer's worker threads park.  ``× sdpa``
is torch SDPA's median time over the peer's.

Why rounds: on a shared machine the speed of a core moves by up to 2× within minutes (another
tenant's work on the same host; 1 Dec 2026, docs/performance.md).  Timing one peer's calls back
to back and then the next peer's compared two different moments of the machine: the same tree's
dense float32 forward came out at 1.22× torch SDPA at 10:28 and 0.61× at 12:28.  Interleaved,
every peer's calls sample the same stretch of time, so their medians — and the ratio — see the
same machine (``benchmarks/cpu_vs_sdpa_interleaved.py`` did this first).

Kept apart from both modules (``bench`` hands ``--shapes decode`` to ``bench_decode``, so
neither may import the other back).
"""

from __future__ import annotations

import contextlib
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

# BLAS and OpenMP worker threads spin for a while after a peer's last call; this pause lets
# them park so they do not steal the cores from the next peer's measurement.
PAUSE_S = 0.3


def rounds_of(peers: Sequence[str], rounds: int, seed: int = 0) -> Iterator[tuple[int, str]]:
    """``(round, peer)`` for ``rounds`` rounds: every round names each peer once, in an order
    shuffled per round — seeded, so a run's order is the same every time — so that no peer is
    always the one timed right after another particular peer."""
    rng = random.Random(seed)
    order = list(peers)
    for r in range(rounds):
        rng.shuffle(order)
        for peer in order:
            yield r, peer


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


# The narrowest a table is laid out: on a narrower terminal its lines wrap, but its cells keep
# their text (at COLUMNS=20 the bench table's eight columns had no room left for any of it).
MIN_TABLE_WIDTH = 60


def table_console():
    """A rich console for the tables: 140 columns into a file or pipe; the terminal's width, and
    at least :data:`MIN_TABLE_WIDTH`, on a terminal.  (The tables' columns fold a value too
    long for their width onto a second line: cut with an ellipsis, as they were on an
    80-column terminal, the ms column read "6…" and "n…".)"""
    from rich.console import Console

    if not sys.stdout.isatty():
        return Console(width=140)
    console = Console()
    console.width = max(console.width, MIN_TABLE_WIDTH)
    return console


def add_case_rows(table, rows: list, cells: Callable[[Any], Sequence[str]]) -> None:
    """Add ``rows`` to a rich ``table`` whose columns start with case and peer and end with a
    note: a section per case, ``cells(row)`` for a measured row, and ``n/a`` with the reason
    for a row whose peer could not run the case."""
    last = None
    for r in rows:
        if last is not None and r.case != last:
            table.add_section()
        last = r.case
        if r.status != "ok":
            table.add_row(r.case, r.peer, "n/a", *[""] * (len(table.columns) - 4), r.reason)
        else:
            table.add_row(*cells(r))
