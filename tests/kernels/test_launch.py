"""``_launch.run_chunks``: every chunk runs exactly once, whichever thread takes it, and an
exception in a chunk reaches the caller."""

from __future__ import annotations

import threading
import time

import pytest

from dotattn.kernels._launch import run_chunks


@pytest.mark.parametrize("nchunks", [1, 2, 3, 5, 8])
def test_every_chunk_runs_once(nchunks):
    seen, lock = [], threading.Lock()

    def fn(delay, chunk, n):
        assert n == nchunks
        time.sleep(delay * (chunk % 3))  # uneven chunks: the caller and the worker interleave
        with lock:
            seen.append((chunk, threading.get_ident()))

    for delay in (0.0, 0.002):
        seen.clear()
        run_chunks(fn, (delay,), nchunks)
        assert sorted(c for c, _ in seen) == list(range(nchunks))


def test_an_exception_in_a_chunk_reaches_the_caller():
    def fn(chunk, n):
        if chunk == n - 1:
            raise ValueError(f"chunk {chunk}")

    for nchunks in (2, 4):
        with pytest.raises(ValueError, match=f"chunk {nchunks - 1}"):
            run_chunks(fn, (), nchunks)


def test_the_caller_takes_unstarted_chunks_before_waiting_for_a_started_one():
    """With the pool's worker busy in chunk 1 until the last chunk has run, the caller must
    run the later chunks itself instead of waiting for chunk 1 first (on a machine with
    more cores, other workers may take them: the event is set either way)."""
    done = threading.Event()
    waited = []

    def fn(chunk, n):
        if chunk == 1:
            waited.append(done.wait(timeout=5.0))
        elif chunk == n - 1:
            done.set()

    run_chunks(fn, (), 4)
    assert waited == [True]



def test_a_call_stopped_in_its_wait_ends_when_the_late_partner_is_done(monkeypatch):
    """Ctrl-C in ``on_partners``' wait for a partner off its core released the partners with
    that partner still running its part: its late writes (into the caller's kept part buffers,
    which the thread's next call reuses on any path) could land in the middle of the next call,
    and its error was raised by the next call."""
    from dotattn.kernels import _cpu_sync as S
    from dotattn.kernels import _launch

    p = _launch.get_partners(1)
    landed = []

    def caller_entry(flags, gen, n, spin):  # posts the call, then returns with the partner running
        flags[S.ENTERED] = gen
        while flags[S.FLAG_STRIDE + S.CLAIM] != 2 * gen:
            time.sleep(0.001)
        return False

    def slow_partner(flags, i, gen):
        time.sleep(0.3)
        landed.append(gen)
        flags[S.FLAG_STRIDE * (i + 1) + S.DONE] = gen
        raise RuntimeError("the stopped call's partner failed")

    class StoppedOnce(threading.Event):
        stopped = False

        def wait(self, timeout=None):
            if not StoppedOnce.stopped:
                StoppedOnce.stopped = True
                raise KeyboardInterrupt
            return super().wait(timeout)

    monkeypatch.setattr(p, "done", [StoppedOnce()])
    with pytest.raises(KeyboardInterrupt):
        _launch.on_partners(1, caller_entry, (), slow_partner, ())
    assert landed == [p.gen], "the stopped call returned before its partner's part was written"
    monkeypatch.setattr(p, "done", [threading.Event()])

    def quick_partner(flags, i, gen):
        flags[S.FLAG_STRIDE * (i + 1) + S.DONE] = gen

    # the old partner's error is not the next call's
    assert _launch.on_partners(1, caller_entry, (), quick_partner, ())


class _SlowChunks:
    """A chunk function that takes 0.3 s and records when each chunk starts and ends."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []
        self.lock = threading.Lock()

    def __call__(self, chunk: int, n: int) -> None:
        with self.lock:
            self.events.append(("start", chunk))
        time.sleep(0.3)
        with self.lock:
            self.events.append(("end", chunk))

    def started_and_ended(self) -> tuple[set, set]:
        with self.lock:
            seen = list(self.events)
        return {c for e, c in seen if e == "start"}, {c for e, c in seen if e == "end"}


def test_run_chunks_stopped_in_the_callers_chunk_ends_after_the_started_chunks():
    """As on_partners: a pool thread's chunk still running when the caller's part raised
    (Ctrl-C) wrote the call's buffers after run_chunks had returned."""
    slow = _SlowChunks()

    def fn(chunk, n):
        if chunk == 0:
            time.sleep(0.05)  # the pool's chunks start
            raise KeyboardInterrupt
        slow(chunk, n)

    with pytest.raises(KeyboardInterrupt):
        run_chunks(fn, (), 3)
    started, ended = slow.started_and_ended()
    assert started and started == ended


def test_run_chunks_stopped_inside_a_submit_ends_after_the_chunk_it_queued(monkeypatch):
    """A Ctrl-C landing inside the pool's ``submit`` after it queued the chunk (its
    ``_adjust_thread_count``: a Python call, where the interrupt is raised) lost the chunk's
    future: run_chunks raised without waiting for that chunk, which ran on (or started only
    later) and wrote the call's buffers after it."""
    from dotattn.kernels import _launch

    pool = _launch._executor()

    class InterruptedInSubmit:
        def submit(self, fn, *args):
            pool.submit(fn, *args)  # queued …
            time.sleep(0.05)  # (the worker has started it)
            raise KeyboardInterrupt  # … and the future lost

    monkeypatch.setattr(_launch, "_executor", lambda: InterruptedInSubmit())
    slow = _SlowChunks()
    with pytest.raises(KeyboardInterrupt):
        run_chunks(slow, (), 2)
    started, ended = slow.started_and_ended()
    assert started == ended, "the stopped call returned with its queued chunk running"
    time.sleep(0.4)
    assert slow.started_and_ended() == (started, ended), "the stopped call's queued chunk ran after it had returned"


def test_a_call_stopped_before_its_entry_leaves_the_partners_parked(monkeypatch):
    """A call stopped after posting (``flags[POSTED]``) but before its kernel entry stored
    ENTERED — a Ctrl-C in ``Partners.wake``, an entry's dispatcher refusing its arguments —
    left the call posted for good: a partner whose spin ran out found it posted, did not park,
    and spun again, each partner busy on its core until the process's next call."""
    from dotattn.kernels import _cpu_sync as S
    from dotattn.kernels import _launch

    monkeypatch.setattr(_launch, "_partners", None)  # a fresh set (no call of other tests pending)
    p = _launch.get_partners(1)

    def caller_entry(flags, gen, n, spin):
        raise KeyboardInterrupt  # before its ENTERED store

    def partner_entry(flags, i, gen):
        raise AssertionError("a partner ran a call that never entered")

    with pytest.raises(KeyboardInterrupt):
        _launch.on_partners(1, caller_entry, (), partner_entry, ())
    time.sleep(0.05)  # ≫ PARTNER_SPIN_S + WAKE_SPIN_S
    parked = []
    for _ in range(20):
        parked.append(p.parked[0])
        time.sleep(0.002)
    assert all(parked), "the partner spins on after the stopped call (never parks)"

    def quick_caller(flags, gen, n, spin):
        flags[S.ENTERED] = gen
        return False  # the partner's part is waited for

    def quick_partner(flags, i, gen):
        flags[S.FLAG_STRIDE * (i + 1) + S.DONE] = gen

    assert _launch.on_partners(1, quick_caller, (), quick_partner, ())  # the next call runs as usual
    p.retire()


FORKED_POOL = r"""
import os, threading
from dotattn.kernels import _launch

def names():
    started, seen = threading.Event(), {}

    def job(chunk, n):
        if chunk == 0:
            started.wait(20)  # the caller's chunk waits until chunk 1 has started somewhere
        else:
            seen[chunk] = threading.current_thread().name
            started.set()

    _launch.run_chunks(job, (), 2)
    return seen[1]

print("parent", names(), flush=True)  # the parent's executor exists from here on
pid = os.fork()
if pid == 0:
    print("child", names(), flush=True)
    os._exit(0)
os.waitpid(pid, 0)
"""


def test_a_forked_child_runs_chunks_on_its_own_pool_threads():
    """A child forked after the parent's pool started gets a pool of its own: the parent's
    executor has no threads there, and its tasks never started (the caller ran every chunk)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    src = str(Path(__file__).resolve().parents[2] / "src")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", FORKED_POOL], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert lines["parent"].startswith("dotattn-small"), done.stdout
    assert lines["child"].startswith("dotattn-small"), done.stdout
