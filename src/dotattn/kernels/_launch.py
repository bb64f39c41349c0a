"""Running a small-call kernel's chunks on Python threads (``cpu_small``).

The kernels release the GIL (``nogil``), so plain Python threads run chunks side by side —
without a Numba ``prange`` team, whose launch returns only when every thread of the team has
been scheduled and finished.
"""

from __future__ import annotations

import threading


def num_threads() -> int:
    """Numba's current thread count (``numba.set_num_threads`` may lower it at run time)."""
    import numba

    return numba.get_num_threads()


# =================================================================================
# chunks on a small pool, the caller taking what no worker has started
# =================================================================================

_pool = None
_pool_lock = threading.Lock()


def _executor():
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                import os
                from concurrent.futures import ThreadPoolExecutor

                cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
                _pool = ThreadPoolExecutor(max_workers=max(1, cores - 1), thread_name_prefix="dotattn-small")
    return _pool


def run_chunks(fn, args: tuple, nchunks: int) -> None:
    """``fn(*args, chunk, nchunks)`` for every chunk; ``fn`` must release the GIL (``nogil``).

    Chunks 1… go to a pool thread each and the caller runs chunk 0, then every chunk no pool
    thread has started yet.  On an idle machine the chunks run side by side; on a loaded one
    a pool thread that the scheduler has not woken costs nothing — where a Numba ``prange``
    launch waits for every thread of its team (measured: 40 ms instead of 1 ms at load 15).
    """
    if nchunks <= 1:
        fn(*args, 0, 1)
        return
    pool = _executor()
    futures = [pool.submit(fn, *args, chunk, nchunks) for chunk in range(1, nchunks)]
    fn(*args, 0, nchunks)
    # The pool starts chunks from the first: the caller takes the unstarted ones from the last,
    # and waits for a started one only when none is left (waiting in order, it sat idle on a
    # worker's chunk while later ones waited in the queue: a busy machine's usual case).
    started = []
    for chunk, future in reversed(list(zip(range(1, nchunks), futures))):
        if future.cancel():
            fn(*args, chunk, nchunks)
        else:
            started.append(future)
    for future in reversed(started):
        future.result()  # re-raises a worker's exception here
