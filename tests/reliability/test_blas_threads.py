"""The user's BLAS thread count survives any mix of dotattn calls, concurrent ones included.

Kernel launches hold BLAS to one thread (``dotattn.kernels._blas``).  Each backend used to hold it
with a ``threadpoolctl`` limit of its own, and two overlapping calls from two threads
restored each other's "1": BLAS stayed on one thread for the rest of the process (issue 14).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

threadpoolctl = pytest.importorskip("threadpoolctl")

import dotattn  # noqa: E402
from dotattn.kernels import _blas  # noqa: E402


def _blas_threads() -> list[int]:
    return [lib.get_num_threads() for lib in _blas._blas_libraries()]


@pytest.fixture
def user_blas_threads():
    """The user sets an unusual BLAS thread count (3) first; restored after the test."""
    _blas._blas_libraries()  # load SciPy's BLAS too, so both libraries are under test
    with threadpoolctl.threadpool_limits(limits=3, user_api="blas"):
        assert _blas_threads() and set(_blas_threads()) == {3}
        yield 3


def _qkv(seed: int, L: int):
    # Big enough that the numpy backend runs its thread pool (≥ 4 M multiply-adds).
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((1, 4, L, 64), dtype=np.float32) for _ in range(3)]


def test_limit_is_held_during_a_call_and_restored_after(user_blas_threads):
    seen = []
    with _blas.ONE_BLAS_THREAD:
        seen.append(_blas_threads())
        with _blas.ONE_BLAS_THREAD:  # nested holders only count
            seen.append(_blas_threads())
        seen.append(_blas_threads())
    assert [set(s) for s in seen] == [{1}, {1}, {1}]
    assert set(_blas_threads()) == {user_blas_threads} and _blas.holders() == 0


def test_exception_inside_restores(user_blas_threads):
    with pytest.raises(RuntimeError):
        with _blas.ONE_BLAS_THREAD:
            raise RuntimeError("kernel failed")
    assert set(_blas_threads()) == {user_blas_threads} and _blas.holders() == 0


def test_concurrent_cpu_numpy_and_model_calls_leave_user_count(user_blas_threads):
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def worker(seed: int, implementation: str, backward: bool):
        try:
            q, k, v = _qkv(seed, 256)
            start.wait(timeout=60)
            for _ in range(2):
                out, lse = dotattn.attention(q, k, v, causal=True, return_lse=True, implementation=implementation)
                if backward:
                    dotattn.attention_backward(q, k, v, out, lse, out, causal=True, implementation=implementation)
        except BaseException as exc:  # re-raised in the main thread below
            errors.append(exc)

    threads = [
        threading.Thread(target=worker, args=(0, "cpu", False)),
        threading.Thread(target=worker, args=(1, "numpy", False)),
        threading.Thread(target=worker, args=(2, "numpy", True)),
        threading.Thread(target=worker, args=(3, "cpu", True)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    assert set(_blas_threads()) == {user_blas_threads}
    assert _blas.holders() == 0


def test_small_and_large_calls_in_sequence_leave_user_count(user_blas_threads):
    q, k, v = _qkv(4, 16)
    dotattn.attention(q, k, v, implementation="cpu")
    dotattn.attention(q[:, :, :1], k, v)
    q, k, v = _qkv(5, 512)
    dotattn.attention(q, k, v, implementation="numpy")
    assert set(_blas_threads()) == {user_blas_threads}
