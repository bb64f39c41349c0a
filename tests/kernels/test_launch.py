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
