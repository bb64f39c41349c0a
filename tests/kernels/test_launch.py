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
