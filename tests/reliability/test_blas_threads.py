"""The user's BLAS thread count survives any mix of dotattn calls, concurrent ones included.

Kernel launches hold BLAS to one thread (``dotattn.kernels._blas``).  Each backend used to hold it
with a ``threadpoolctl`` limit of its own, and two overlapping calls from two threads
restored each other's "1": BLAS stayed on one thread for the rest of the process (issue 14).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
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


@pytest.mark.parametrize("first", [1, 3])
def test_a_count_the_user_sets_during_a_call_stays(first):
    """A thread count set while another thread's call holds the limit is the user's: it stays.

    The old restore put back the count found at the first entry where that was not one (so a
    change made during a call was lost) and kept the change where it was one.
    """
    _blas._blas_libraries()
    with threadpoolctl.threadpool_limits(limits=first, user_api="blas"):
        inside, release = threading.Event(), threading.Event()

        def call():
            with _blas.ONE_BLAS_THREAD:  # what every kernel launch holds
                inside.set()
                release.wait(timeout=60)

        t = threading.Thread(target=call)
        t.start()
        try:
            assert inside.wait(timeout=60)
            assert set(_blas_threads()) == {1}
            threadpoolctl.threadpool_limits(limits=4, user_api="blas")  # the user's change, mid-call
        finally:
            release.set()
            t.join(timeout=60)
        assert not t.is_alive()
        assert set(_blas_threads()) == {4} and _blas.holders() == 0


def _in_thread(fn):
    errors: list[BaseException] = []

    def run():
        try:
            fn()
        except BaseException as exc:  # re-raised in the calling thread
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join(timeout=60)
    assert not t.is_alive()
    if errors:
        raise errors[0]


def test_the_limit_holds_in_a_thread_after_the_main_thread_held_it(user_blas_threads):
    """threadpoolctl 3.8 lets only its first caller's thread set OpenBLAS's count; ours sets it anywhere.

    Through threadpoolctl, a holder in a worker thread after one in the main thread left OpenBLAS
    on all its threads (the ``numpy`` backend ran 2× slower there).
    """
    with _blas.ONE_BLAS_THREAD:
        assert set(_blas_threads()) == {1}
    seen = []

    def worker():
        with _blas.ONE_BLAS_THREAD:
            seen.append(set(_blas_threads()))
        seen.append(set(_blas_threads()))

    _in_thread(worker)
    assert seen == [{1}, {user_blas_threads}]


@pytest.fixture
def count_set_without_threadpoolctl():
    """The user's count (3) set through OpenBLAS's own function, so no thread is threadpoolctl's controller."""
    libs = _blas._blas_libraries()
    before = [lib.get_num_threads() for lib in libs]
    for lib in libs:
        _blas._set_threads(lib, 3)
    try:
        assert set(_blas_threads()) == {3}
        yield 3
    finally:
        for lib, n in zip(libs, before):
            _blas._set_threads(lib, n)


def test_the_last_holder_restores_whichever_thread_it_is(count_set_without_threadpoolctl):
    """A enters, B enters, A leaves (and lives on), B leaves last: B restores the user's count.

    Through threadpoolctl 3.8, thread A became the only thread whose settings took, so B's restore
    did nothing while A lived: BLAS stayed on one thread for the rest of the process.
    """
    user_blas_threads = count_set_without_threadpoolctl
    a_in, b_in, a_out, b_out = (threading.Event() for _ in range(4))
    errors: list[BaseException] = []
    after_b: list[set[int]] = []

    def a():
        try:
            with _blas.ONE_BLAS_THREAD:
                a_in.set()
                assert b_in.wait(timeout=60)
            a_out.set()
            assert b_out.wait(timeout=60)  # thread A lives on, as a server's worker would
        except BaseException as exc:
            errors.append(exc)

    def b():
        try:
            assert a_in.wait(timeout=60)
            with _blas.ONE_BLAS_THREAD:
                b_in.set()
                assert a_out.wait(timeout=60)
            after_b.append(set(_blas_threads()))  # while thread A still lives
        except BaseException as exc:
            errors.append(exc)
        finally:
            b_out.set()

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    assert after_b == [{user_blas_threads}]
    assert set(_blas_threads()) == {user_blas_threads} and _blas.holders() == 0


WORKER_AFTER_MAIN = """
import threading
import numpy as np
import dotattn
from dotattn.kernels import _blas

rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((1, 2, 512, 64)) for _ in range(3))  # float64: BLAS block GEMMs
dotattn.attention(q, k, v, implementation="cpu")  # the main thread first
counts = []

def worker():
    with _blas.ONE_BLAS_THREAD:
        counts.append([lib.get_num_threads() for lib in _blas._blas_libraries()])
    for impl in ("cpu", "numpy"):
        dotattn.attention(q, k, v, implementation=impl)

t = threading.Thread(target=worker)
t.start()
t.join(timeout=300)
assert not t.is_alive()
print(counts)
"""


def test_calls_in_a_worker_thread_after_the_main_thread_keep_blas_on_one_thread():
    """In a fresh process, as a server runs: the main thread's call first, then a worker's.

    Through threadpoolctl 3.8 the worker could not limit OpenBLAS, whose threads then ran inside
    the kernels' threads: calls 2× slower, and OpenBLAS printed "Detect OpenMP Loop and this
    application may hang" hundreds of times.
    """
    done = subprocess.run([sys.executable, "-c", WORKER_AFTER_MAIN], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "OpenBLAS Warning" not in done.stderr, done.stderr[-3000:]
    counts = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    assert counts and all(n == 1 for n in counts[0]), counts


class _FakeFunction:
    def __init__(self, name):
        self.name = name

    def __call__(self, n):
        pass


class _FakeLibrary:
    """A stand-in for a ``ctypes.CDLL``: the exported names given."""

    def __init__(self, *exported):
        self.exported = exported

    def __getitem__(self, name):
        if name not in self.exported:
            raise AttributeError(name)
        return _FakeFunction(name)


class _FakeController:
    def __init__(self, internal_api, threading_layer, *exported):
        self.internal_api, self.threading_layer = internal_api, threading_layer
        self.dynlib = _FakeLibrary(*exported)

    def set_num_threads(self, n):  # threadpoolctl's (per thread, or first thread only, since 3.8)
        pass


@pytest.mark.parametrize(
    "controller, expected",
    [
        (_FakeController("openblas", "pthreads", "scipy_openblas_set_num_threads64_"), "scipy_openblas_set_num_threads64_"),
        (_FakeController("openblas", "pthreads", "openblas_set_num_threads"), "openblas_set_num_threads"),
        (_FakeController("mkl", "intel", "MKL_Set_Num_Threads", "MKL_Set_Num_Threads_Local"), "MKL_Set_Num_Threads"),
        (_FakeController("openblas", "openmp", "openblas_set_num_threads"), None),  # per-thread counts
        (_FakeController("mkl", "intel", "MKL_Set_Num_Threads_Local"), None),  # no process-wide setter exported
        (_FakeController("blis", "pthreads", "bli_thread_set_num_threads"), None),
    ],
)
def test_each_library_is_set_through_its_process_wide_function(controller, expected):
    """threadpoolctl 3.8 sets MKL per thread (MKL_Set_Num_Threads_Local) and OpenBLAS from one thread only."""
    setter = _blas._thread_count_setter(controller)
    if expected is None:
        assert setter == controller.set_num_threads
    else:
        assert isinstance(setter, _FakeFunction) and setter.name == expected


WITHOUT_THREADPOOLCTL = """
import sys
sys.modules["threadpoolctl"] = None  # an install without the declared dependencies
import numpy as np
import dotattn
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((1, 4, 1024, 64)) for _ in range(3))  # big enough for the numpy backend's pool
out = dotattn.attention(q, k, v, causal=True, implementation="numpy")
ref = dotattn.attention(q, k, v, causal=True, implementation="reference")
assert np.abs(out - ref).max() < 1e-12
print("OK")
"""


def test_the_numpy_backend_runs_without_threadpoolctl():
    """It needs NumPy alone; its big calls raised a bare ModuleNotFoundError from the BLAS limit."""
    done = subprocess.run([sys.executable, "-c", WITHOUT_THREADPOOLCTL], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), done.stderr[-3000:]


ENVIRONMENT_AFTER_CALLS = """
import os, sys
import numpy as np
import dotattn
before = dict(os.environ)
rng = np.random.default_rng(0)
q = rng.standard_normal((1, 4, 16, 32), dtype=np.float32)
dotattn.attention(q, q, q, implementation="cpu")  # imports threadpoolctl (the BLAS limit, the cpu backend's check)
q = rng.standard_normal((1, 4, 1024, 64))
dotattn.attention(q, q, q, causal=True, implementation="numpy")
assert "threadpoolctl" in sys.modules
changed = {k: (before.get(k), os.environ.get(k)) for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)}
print(changed)
"""


@pytest.mark.parametrize("user_value", [None, "FALSE"])
def test_calls_leave_the_environment_as_it_was(user_value):
    """threadpoolctl's import sets KMP_DUPLICATE_LIB_OK=True; dotattn's first calls took it along."""
    env = {k: v for k, v in os.environ.items() if k != "KMP_DUPLICATE_LIB_OK"}
    if user_value is not None:
        env["KMP_DUPLICATE_LIB_OK"] = user_value
    done = subprocess.run([sys.executable, "-c", ENVIRONMENT_AFTER_CALLS], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "{}"


def test_numpy_pool_stopped_by_a_failing_task_ends_its_running_tasks_under_the_limit(monkeypatch):
    """``numpy_tiled.run_parallel`` (the numpy backend's pool, ``dotattn.maps``'s too): a task's
    error (or Ctrl-C in the caller's wait) raised at once, releasing the BLAS limit while the
    call's other tasks still ran — with BLAS on the user's count, writing the call's arrays
    after it had raised — and the queued ones still started after it.  Now the unstarted tasks
    are cancelled and the running ones end, under the limit, before the error goes on."""
    import time

    from dotattn.kernels import numpy_tiled

    monkeypatch.setattr(numpy_tiled, "_workers", lambda: 2)  # (a pool of two on any machine)
    events, lock = [], threading.Lock()

    def task(t):
        if t == 0:
            time.sleep(0.05)  # the other worker has started task 1
            raise RuntimeError("task 0 failed")
        with lock:
            events.append(("start", t))
        time.sleep(0.3)
        with lock:
            events.append(("end", t, _blas.holders()))

    with pytest.raises(RuntimeError, match="task 0 failed"):
        numpy_tiled.run_parallel(list(range(6)), task)
    with lock:
        seen = list(events)
    started = {e[1] for e in seen if e[0] == "start"}
    ended = {e[1] for e in seen if e[0] == "end"}
    assert started and started == ended, f"tasks still running after the call raised: {sorted(started - ended)}"
    assert all(e[2] >= 1 for e in seen if e[0] == "end"), "a task ran on after the BLAS limit was released"
    time.sleep(0.4)
    with lock:
        assert len(events) == len(seen), "a queued task of the failed call started after it raised"
    assert _blas.holders() == 0


def test_a_holder_stopped_while_it_sets_or_restores_the_counts_leaves_the_users(user_blas_threads, monkeypatch):
    """A Ctrl-C between one library set to 1 and the holder counted left BLAS on 1 thread with
    no holder (the next holder saved 1 as the user's count: lost for good); one in the last
    holder's restore, after it was uncounted, left the limit in force for good."""
    assert len(_blas._blas_libraries()) >= 2  # NumPy's and SciPy's (the fixture loads both)
    set_threads = _blas._set_threads
    settings_left = [0]  # a Ctrl-C right after that many more settings (0: none)

    def stopped_after(lib, n):
        set_threads(lib, n)
        if settings_left[0]:
            settings_left[0] -= 1
            if not settings_left[0]:
                raise KeyboardInterrupt

    monkeypatch.setattr(_blas, "_set_threads", stopped_after)
    settings_left[0] = 1  # on its way in: the first library on 1 thread, the second not yet
    with pytest.raises(KeyboardInterrupt):
        with _blas.ONE_BLAS_THREAD:
            pytest.fail("the holder was stopped on its way in")
    assert set(_blas_threads()) == {user_blas_threads} and _blas.holders() == 0
    with pytest.raises(KeyboardInterrupt):
        with _blas.ONE_BLAS_THREAD:
            assert set(_blas_threads()) == {1}
            settings_left[0] = 1  # on its way out: the first library restored, the second not yet
    assert set(_blas_threads()) == {user_blas_threads} and _blas.holders() == 0
    with _blas.ONE_BLAS_THREAD:  # and the next holder works as ever
        assert set(_blas_threads()) == {1}
    assert set(_blas_threads()) == {user_blas_threads} and _blas.holders() == 0
