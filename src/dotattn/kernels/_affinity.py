"""Pinning the Numba OpenMP team's worker threads to cores — opt-in (``DOTATTN_PIN_WORKERS=1``).

Why: on this project's KVM hosts, a libgomp worker that went to sleep (≥ 10 ms without a
parallel launch) is woken onto the *caller's* core in most launches — the guest's scheduler
does not take the other, idle vCPU (descheduled by the host) — and starts only when the caller's
time slice ends, 2–4 ms later.  Pinned to a core of its own it starts 0.1–0.14 ms after the
launch; an H4 L4096 D128 bfloat16 forward after a 0.2 s pause took ×0.929 of its time in a
process running only dotattn, but gained nothing with torch's calls in between
(docs/performance-log.md, "bfloat16 D128 forward after a pause"; ``benchmarks/
bf16_forward_after_idle.py --part pin``).

Why opt-in: the team is Numba's, shared with any other Numba code in the process, and a pinned
thread cannot leave a core another program keeps busy.  So the default leaves every thread
where it is until the effect is measured on loaded hosts too.  When on, worker ``i`` of the team
(Numba's thread id ``i ≥ 1``; the caller is ``0`` and stays free) is pinned to the ``i``-th of
the cores the process may use, once per process and team size; :func:`unpin` undoes it.
"""

from __future__ import annotations

import ctypes
import os

PIN_ENV_VAR = "DOTATTN_PIN_WORKERS"

# (pid, team size, allowed cores) of the pinning done, and the thread ids pinned
_pinned: dict = {"key": None, "tids": []}


def requested() -> bool:
    """Whether ``DOTATTN_PIN_WORKERS`` asks for pinned workers (``1``/``on``/``true``/``yes``)."""
    return os.environ.get(PIN_ENV_VAR, "").strip().lower() in ("1", "on", "true", "yes")


def _gettid():
    """libc's ``gettid`` as a ctypes function Numba can call, or None (glibc < 2.30)."""
    fn = getattr(ctypes.CDLL(None), "gettid", None)
    if fn is not None:
        fn.restype, fn.argtypes = ctypes.c_int, ()
    return fn


_team_ids_kernel = None


def team_thread_ids(n: int) -> list[int]:
    """The OS thread id of each of the ``n`` threads of Numba's team, by Numba thread id (0 is
    the caller).  A ``prange`` over ``n`` iterations gives each thread of an ``n``-thread team
    one (Numba splits the range into one block per thread)."""
    global _team_ids_kernel
    if _team_ids_kernel is None:
        gettid = _gettid()
        if gettid is None:
            return []
        from numba import get_thread_id, njit, prange

        @njit(parallel=True, nogil=True)
        def ids(out):
            for _ in prange(out.shape[0]):
                out[get_thread_id()] = gettid()

        _team_ids_kernel = ids
    import numpy as np

    out = np.zeros(n, dtype=np.int64)
    _team_ids_kernel(out)
    return [int(t) for t in out]


def ensure_pinned() -> None:
    """Pin the team's workers when :func:`requested` and not yet done for this process, team
    size and set of allowed cores; else nothing (the cost is one environment lookup)."""
    if not requested() or not hasattr(os, "sched_setaffinity"):
        return
    from ._forked import team_unusable

    if team_unusable():  # (no team here: its pinning pass is a parallel kernel)
        return
    import numba

    n = numba.get_num_threads()
    allowed = tuple(sorted(os.sched_getaffinity(0)))
    key = (os.getpid(), n, allowed)
    if _pinned["key"] == key or n < 2 or len(allowed) < 2:
        return
    unpin()
    tids = team_thread_ids(n)
    caller = tids[0] if tids else None
    pinned = []
    for i, tid in enumerate(tids[1:], start=1):
        if tid and tid != caller:
            try:
                os.sched_setaffinity(tid, {allowed[i % len(allowed)]})
                pinned.append(tid)
            except OSError:  # (a thread gone, or a core taken away meanwhile) left as it is
                pass
    _pinned["key"], _pinned["tids"] = key, pinned


def unpin() -> None:
    """Give the pinned workers back every core the process may use."""
    if not _pinned["tids"] or _pinned["key"] is None or _pinned["key"][0] != os.getpid():
        _pinned["key"], _pinned["tids"] = None, []
        return
    allowed = set(os.sched_getaffinity(0))
    for tid in _pinned["tids"]:
        try:
            os.sched_setaffinity(tid, allowed)
        except OSError:
            pass
    _pinned["key"], _pinned["tids"] = None, []


def pinned_threads() -> list[int]:
    """The thread ids pinned now (empty when off)."""
    return list(_pinned["tids"])
