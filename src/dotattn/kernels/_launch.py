"""Running a kernel's chunks on Python threads: a small pool (:func:`run_chunks`), and the
spinning partner threads (:class:`Partners`) of the decode and small-call kernels.

The kernels release the GIL (``nogil``), so plain Python threads run chunks side by side —
without a Numba ``prange`` team, whose launch returns only when every thread of the team has
been scheduled and finished.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import threading
import time

import numpy as np

from . import _forked


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
                from concurrent.futures import ThreadPoolExecutor

                _pool = ThreadPoolExecutor(max_workers=max(1, cores() - 1), thread_name_prefix="dotattn-small")
    return _pool


def _forget_pool_in_child() -> None:
    # A forked child has none of its parent's threads: a task given to the parent's executor
    # would never start (the caller ran every chunk itself).  The child makes its own.
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)

_local = threading.local()


@contextlib.contextmanager
def on_numba_team():
    """Within this block, this thread's parallel kernel calls (decode items, small-call chunks)
    run on Numba's thread team instead of the spinning partners or the pool — for a caller
    whose surrounding work runs on that team (SmolLM's decode steps and short prompt passes):
    the team's workers spin after each of its products, and a partner or pool thread would
    share a core with one of them.  Same bits either way.  Restores the previous setting."""
    previous = getattr(_local, "team", False)
    _local.team = True
    try:
        yield
    finally:
        _local.team = previous


def in_numba_team() -> bool:
    """Whether this thread is inside :func:`on_numba_team` (never in a process forked from one
    whose team ran: ``_forked``; the partners and the pool take the work there)."""
    return getattr(_local, "team", False) and not _forked.team_unusable()


def cores() -> int:
    """The cores this process may run on (read once)."""
    if not _CORES:
        _CORES.append(max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)))
    return _CORES[0]


_CORES: list[int] = []


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
    tasks = Tasks()
    futures = []
    try:
        for chunk in range(1, nchunks):
            futures.append(tasks.submit(pool, fn, *args, chunk, nchunks))
        fn(*args, 0, nchunks)
        # The pool starts chunks from the first: the caller takes the unstarted ones from the
        # last, and waits for a started one only when none is left (waiting in order, it sat idle
        # on a worker's chunk while later ones waited in the queue: a busy machine's usual case).
        started = []
        for chunk, future in reversed(list(zip(range(1, nchunks), futures))):
            if future.cancel():
                fn(*args, chunk, nchunks)
            else:
                started.append(future)
        for future in reversed(started):
            future.result()  # re-raises a worker's exception here
    except BaseException:
        # As on_partners: chunks still running write this call's buffers, which the thread's
        # next call may reuse — they end before the exception goes on (unstarted ones never run).
        tasks.stop(futures)
        raise


class Tasks:
    """One call's tasks on a pool (:meth:`submit`), which a caller stopped by an exception
    ends for sure (:meth:`stop`): the running ones are waited for, the rest never run.

    Cancelling and waiting for the futures alone missed a task whose future was never
    returned: a Ctrl-C raised inside the pool's ``submit`` after it queued the task (in
    ``ThreadPoolExecutor._adjust_thread_count``, a Python call) — the task ran after the call
    had raised, into its buffers.  Here a task checks, under :attr:`lock`, that its call has
    not stopped before it starts, and counts itself running till it ends."""

    __slots__ = ("lock", "stopped", "running")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.stopped = False
        self.running = 0

    def submit(self, pool, fn, *args) -> concurrent.futures.Future:
        """``pool.submit(fn, *args)``: its result or exception in the future, as without."""
        return pool.submit(self._run, fn, args)

    def _run(self, fn, args):
        with self.lock:
            if self.stopped:
                return None
            self.running += 1
        try:
            return fn(*args)
        finally:
            with self.lock:
                self.running -= 1

    def stop(self, futures) -> None:
        """No task of the call starts from now; returns when the started ones have ended (a
        Ctrl-C meanwhile deferred: milliseconds, a task's length at most).  ``futures``: those
        :meth:`submit` returned (cancelled here)."""
        run_to_the_end(self._end, futures)

    def _end(self, futures) -> None:
        with self.lock:
            self.stopped = True
        for future in futures:
            future.cancel()
        while self.running:
            time.sleep(0.0005)


# =================================================================================
# spinning partner threads
# =================================================================================

# Partners: one thread per other core that, after a call, spins PARTNER_SPIN_S for the next one
# before it parks (as OpenMP's workers do: KMP_BLOCKTIME, GOMP_SPINCOUNT), and a caller that
# spins CALLER_SPIN_S for their last items before it waits in Python.  On these VMs a thread
# woken through a futex (a ThreadPoolExecutor task; the caller's future.result()) started
# 20–90 µs late, twice a call, and ``submit`` itself took ≈ 23 µs on the Intel Xeon of 5 Dec
# 2026: at B1 4k decode, ≈ 0.9 ms calls, that was a fifth of the call (docs/decoding-log.md);
# a small call of 50–300 µs lost more than its second thread gained (docs/performance-log.md,
# "Small calls' threads: spinning partners").
PARTNER_SPIN_S = 300e-6
CALLER_SPIN_S = 0.5e-3
WAKE_SPIN_S = 1e-3  # a partner woken by a caller spins this long for its call (a few µs, normally)


class Partners:
    """Spinning partner threads for a kernel call that has a caller's and a partner's entry
    (:func:`on_partners`; the handshake: ``kernels/_cpu_sync.py``).

    A call: the caller takes :attr:`lock` (a concurrent call takes the pool instead), sets
    :attr:`job`, stores the call's number at ``flags[POSTED]`` and wakes parked partners (in
    Python, under the GIL), then its kernel entry stores it at ``flags[ENTERED]``; each
    partner, spinning in ``partner_wait`` since its last call, sees that and claims the call (a
    compare-and-swap), takes the GIL (free: the caller is in its ``nogil`` kernel) to read the
    job, runs its entry and stores the number in its DONE slot; the caller, its own work done,
    cancels the part of a partner that has not claimed the call (it runs nothing then) and
    spins on the DONE slots of those that did.  A partner that saw no call for PARTNER_SPIN_S
    parks on its semaphore — unless, under the GIL, it finds a call posted: so a caller either
    sees it parked and wakes it, or it sees the call.  A caller whose spin runs out (a partner
    off its core on a busy machine) waits on the partner's event.  (Without the cancel, a
    partner that woke late — a parked thread here woke 0.1 to several ms after its futex when
    the machine had idled — held up the call, and the next one found it parked again: 2–7 ms
    decode calls in the bench's runs after its pauses.)"""

    def __init__(self, n: int) -> None:
        from . import _cpu_sync as S

        self.n = n
        self.pid = os.getpid()
        self.flags = np.zeros(S.FLAG_STRIDE * (n + 1), dtype=np.int64)
        self.lock = threading.Lock()
        self.gen = 0
        self.job: tuple | None = None  # (the partner's entry, its arguments after (flags, i, gen))
        self.errors: list[BaseException | None] = [None] * n
        self.failed = False  # some partner stored an exception in errors (read by the caller)
        self.parked = [False] * n
        self.sems = [threading.Semaphore(0) for _ in range(n)]
        self.done = [threading.Event() for _ in range(n)]
        self.retired = False  # replaced by a set of another size (get_partners): threads end
        rate = tsc_rate()
        self.partner_spin = int(PARTNER_SPIN_S * rate)
        self.wake_spin = int(WAKE_SPIN_S * rate)
        self.caller_spin = int(CALLER_SPIN_S * rate)
        for i in range(n):
            threading.Thread(target=self._loop, args=(i,), daemon=True, name=f"dotattn-partner-{i}").start()

    def wake(self) -> bool:
        """Wake the parked partners; True when one was parked (its call starts late)."""
        woke = False
        for i in range(self.n):
            if self.parked[i]:
                self.parked[i] = False
                self.sems[i].release()
                woke = True
        return woke

    def retire(self) -> None:
        """Let the threads end (:func:`get_partners` replaced this set): each returns the next
        time it finds no call, parked or spinning.  A call a caller still posts here meanwhile
        is safe: a partner that has not claimed its part by the caller's end is cancelled (the
        caller runs that part), as for a partner late to wake."""
        self.retired = True
        for sem in self.sems:
            sem.release()

    def _loop(self, i: int) -> None:
        from . import _cpu_sync as S

        seen = 0
        spin = self.partner_spin
        while True:
            g = S.partner_wait(self.flags, i, seen, spin)
            if g == seen:  # no call for a while: park, unless one was posted meanwhile
                if self.retired:
                    return
                self.parked[i] = True
                if self.flags[S.POSTED] == seen:  # (under the GIL, as the caller's post and wake)
                    self.sems[i].acquire()
                self.parked[i] = False
                if self.retired:
                    return
                spin = self.wake_spin  # woken by a caller (or a call posted): it comes soon
                continue
            spin = self.partner_spin
            if g < 0:  # that call's caller ran this partner's part itself
                seen = -g
                continue
            seen = g
            entry, args = self.job
            try:
                entry(self.flags, i, g, *args)
            except BaseException as exc:  # handed to the caller, which re-raises it
                self.errors[i] = exc
                self.failed = True
                self.flags[S.FLAG_STRIDE * (i + 1) + S.DONE] = g
            self.done[i].set()


_partners: Partners | None = None


def get_partners(n: int) -> Partners | None:
    """The process's ``n`` partner threads (made on first use; again after a fork, whose child
    has no threads)."""
    global _partners
    p = _partners
    if p is None or p.n != n or p.pid != os.getpid() or p.retired:
        with _pool_lock:
            p = _partners
            if p is None or p.n != n or p.pid != os.getpid() or p.retired:
                old = p
                p = _partners = Partners(n) if n >= 1 else None
                # A set of another size replaces this one: its threads must end, or every
                # change of n — decode calls under numba.set_num_threads(k) < cores between
                # small calls, whose n is cores − 1 — left n threads behind for good (threads
                # without bound; the resource audit of 6 Dec 2026).
                # (In a forked child the old set's threads do not exist: nothing to end.)
                if old is not None and old.pid == os.getpid():
                    old.retire()
    return p


def wake_partners(n: int) -> bool:
    """Wake parked partners early: a caller that knows a call is coming calls this before the
    Python that prepares it.  True when a partner was parked."""
    p = get_partners(n)
    return p is not None and p.wake()


def on_partners(n: int, caller_entry, caller_args: tuple, partner_entry, partner_args: tuple) -> bool:
    """One call on the calling thread and the ``n`` partners: ``caller_entry(flags, gen, n,
    caller_spin, *caller_args)`` here (it stores ENTERED, runs its part, then
    ``_cpu_sync.finish_partners``; True when no partner is left running) and
    ``partner_entry(flags, i, gen, *partner_args)`` on partner i.  False (nothing run) when
    another call holds the partners."""
    from . import _cpu_sync as S

    p = get_partners(n)
    if p is None or not p.lock.acquire(blocking=False):
        return False
    try:
        p.gen += 1
        gen = p.gen
        p.job = (partner_entry, partner_args)
        try:
            # posted, then parked partners woken, both under the GIL: a partner that parks after
            # this sees the call posted and does not sleep (its kernel's ENTERED store comes later)
            p.flags[S.POSTED] = gen
            p.wake()
            if not caller_entry(p.flags, gen, n, p.caller_spin, *caller_args):
                _wait_for_partners(p, gen)
        except BaseException:
            # Stopped (Ctrl-C in the wait; an error in the caller's part) while a partner may
            # still run its part: the part writes this call's buffers — the thread's kept part
            # buffers among them, which its next call reuses on any path — so it is waited for
            # before the exception goes on, and its own error is dropped (this one wins).
            # Before 6 Dec 2026 the late part could land in the middle of the next call.
            def settle() -> None:
                _wait_for_partners(p, gen)
                p.failed, p.errors = False, [None] * n
                # Stopped before the caller's entry stored ENTERED (a Ctrl-C in wake(), an entry
                # refusing its arguments): no partner can claim the call, but left posted it kept
                # every partner from parking — each spun on its core until the next call.
                if p.flags[S.ENTERED] != gen:
                    p.flags[S.POSTED] = p.flags[S.ENTERED]

            run_to_the_end(settle)
            raise
        finally:
            p.job = None
        if p.failed:
            p.failed = False
            errors = [e for e in p.errors if e is not None]
            p.errors = [None] * n
            raise errors[0]
        return True
    finally:
        p.lock.release()


def run_to_the_end(fn, *args) -> None:
    """``fn(*args)`` — idempotent: a wait for parts already running (milliseconds, a call's
    length at most), a restore of settings — run to its end: a Ctrl-C meanwhile runs it again
    and is raised after it (from a handler, in place of the exception handled)."""
    interrupted = False
    while True:
        try:
            fn(*args)
            break
        except KeyboardInterrupt:
            interrupted = True
    if interrupted:
        raise KeyboardInterrupt


def _wait_for_partners(p: Partners, gen: int) -> None:
    """Until every partner has written its parts of call ``gen`` or was cancelled from it."""
    from . import _cpu_sync as S

    if p.flags[S.ENTERED] != gen:  # the caller's entry stopped before posting it: no partner can claim it
        return
    for i, e in enumerate(p.done):
        # the DONE slot decides (an event may still be set from an earlier call):
        # cleared, then the slot checked, then a wait that the partner's set() ends
        base = S.FLAG_STRIDE * (i + 1)
        while True:
            e.clear()
            if p.flags[base + S.DONE] == gen or p.flags[base + S.CLAIM] == 2 * gen + 1:  # done, or cancelled
                break
            e.wait(0.01)


def tsc_rate() -> float:
    """Time-stamp counter ticks per second (measured over 5 ms, once per process)."""
    if not _TSC_RATE:
        from ._cpu_sync import tsc

        c0, t0 = tsc(), time.perf_counter()
        time.sleep(0.005)
        c1, t1 = tsc(), time.perf_counter()
        _TSC_RATE.append(max((c1 - c0) / (t1 - t0), 1e6))
    return _TSC_RATE[0]


_TSC_RATE: list[float] = []
