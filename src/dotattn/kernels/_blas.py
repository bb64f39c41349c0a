"""One process-wide "BLAS on one thread" limit, reference-counted so it cannot leak.

dotattn's kernels run their own threads and call BLAS on small blocks from each of them;
left at its default thread count, OpenBLAS would wake its own threads for every block GEMM
(3–30× slower, ``docs/performance.md``).  So a kernel launch holds :data:`ONE_BLAS_THREAD`.

Why one shared, counted limit instead of ``threadpoolctl``'s ``limit()`` per call: each
``limit()`` saves the thread count it finds and restores it on exit.  Two overlapping calls
from two threads (the ``cpu`` backend in one, the ``numpy`` backend in another) interleave as
*A saves 2, sets 1; B saves 1; A restores 2; B restores 1* — and the user's BLAS stays on one
thread for the rest of the process.  Here the first holder saves the user's counts, later
holders only count, and the last one out restores what the first one saved — to each library
still at the one thread set here.  A count the user sets *while* a dotattn call runs (from
another thread) is theirs and stays: it is not one, so the restore leaves it.  (Only a count set
to one then cannot be told from ours; it gets the saved count back.)  Until 6 Dec 2026 the
restore overwrote such a change where the first count was not one and kept it where it was.

The libraries are found once (``threadpoolctl`` scans the loaded shared objects: slow), after
SciPy's BLAS is loaded — Numba's ``np.dot`` calls that one, and a library loaded after the
scan would keep all its threads.

The count is set through the library's own process-wide C function — OpenBLAS's
``openblas_set_num_threads`` on its own threads (not OpenMP), MKL's ``MKL_Set_Num_Threads`` —
not through ``threadpoolctl``'s ``set_num_threads``: since threadpoolctl 3.8 that does nothing
for OpenBLAS in any thread but the first one that used it (its "controlling thread", until it
ends), and sets MKL's count for the calling thread only (``MKL_Set_Num_Threads_Local``), while
the kernels call BLAS from their own threads.  Through it, a dotattn call in a worker thread
after one in the main thread left OpenBLAS on all its threads inside the kernels' threads (the
``numpy`` backend 2× slower, OpenBLAS's "may hang" warnings), and a last holder in another
thread than the first could not restore the user's count: BLAS stayed on one thread for the
rest of the process (6 Dec 2026).  An OpenBLAS built on OpenMP has per-thread counts
(``omp_set_num_threads``) and keeps threadpoolctl's call; BLAS called inside an OpenMP parallel
region runs on one thread there anyway.

Without threadpoolctl (an install without the declared dependencies) no limit is set: the
``numpy`` backend, which needs NumPy alone, still runs, with BLAS on its default threads.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import sys
import threading

from ._launch import run_to_the_end

_lock = threading.Lock()
_depth = 0
_saved: list[tuple[object, int]] = []
_libs: list | None = None
_setters: dict[int, object] = {}  # id(controller) -> the function that sets its thread count


def _blas_libraries() -> list:
    """threadpoolctl's controllers of every BLAS loaded in the process (found once)."""
    global _libs
    if _libs is None:
        try:  # the BLAS Numba's np.dot calls; absent without SciPy (the numpy backend needs none)
            import scipy.linalg.cython_blas  # noqa: F401
        except ImportError:
            pass
        try:
            threadpoolctl = import_threadpoolctl()
        except ImportError:  # module docstring: no limit without it
            _libs = []
            return _libs
        libs = list(threadpoolctl.ThreadpoolController().select(user_api="blas").lib_controllers)
        _setters.update((id(lib), _thread_count_setter(lib)) for lib in libs)
        _libs = libs
    return _libs


def import_threadpoolctl():
    """``import threadpoolctl``, leaving the process's environment as it was.

    Its import sets ``KMP_DUPLICATE_LIB_OK=True`` in ``os.environ`` (Intel's OpenMP runtime then
    tolerates a second copy of itself, in this process and its children) where the user has not
    set it; a dotattn call should not change that for them, so the setting is taken back when
    this import is the one that made it.  (A process that imported it itself — scikit-learn
    does — keeps what it got.)
    """
    if "threadpoolctl" in sys.modules:
        return importlib.import_module("threadpoolctl")  # raises ImportError for a None entry too
    had = "KMP_DUPLICATE_LIB_OK" in os.environ
    try:
        return importlib.import_module("threadpoolctl")
    finally:
        if not had:
            os.environ.pop("KMP_DUPLICATE_LIB_OK", None)


# The process-wide setters by library (module docstring), under the names their builds export
# (OpenBLAS's affixes as threadpoolctl lists them).
_PROCESS_WIDE_SETTERS = {
    "openblas": tuple(f"{prefix}openblas_set_num_threads{suffix}" for prefix in ("", "scipy_") for suffix in ("", "64_", "_64")),
    "mkl": ("MKL_Set_Num_Threads",),
}


def _thread_count_setter(lib):
    """The function that sets ``lib``'s thread count for every thread, from any thread (module docstring)."""
    names = _PROCESS_WIDE_SETTERS.get(lib.internal_api, ())
    if getattr(lib, "threading_layer", None) == "openmp" and lib.internal_api == "openblas":
        names = ()  # per-thread counts: threadpoolctl's omp_set_num_threads
    for name in names:
        try:
            fn = lib.dynlib[name]  # a new function pointer, not the one threadpoolctl holds
        except (AttributeError, TypeError):
            continue
        fn.argtypes, fn.restype = [ctypes.c_int], None
        return fn
    return lib.set_num_threads


def _set_threads(lib, n: int) -> None:
    _setters[id(lib)](n)


class _OneBlasThread:
    """Context manager: BLAS limited to one thread while any holder, in any thread, is inside."""

    __slots__ = ()

    # The first holder's settings and the last one's restore complete or undo themselves: a
    # Ctrl-C (or an error) between one library set to 1 and the holder counted left the count at
    # 1 uncounted — the next holder then saved 1 as the user's — and one in the restore, after
    # the holder was uncounted, left the limit in force for good.
    def __enter__(self):
        global _depth, _saved
        with _lock:
            if _depth == 0:
                saved = [(lib, lib.get_num_threads()) for lib in _blas_libraries()]
                try:
                    for lib, n in saved:
                        if n != 1:
                            _set_threads(lib, 1)
                except BaseException:
                    run_to_the_end(_restore, saved)
                    raise
                _saved = saved
            _depth += 1
        return self

    def __exit__(self, *exc):
        global _depth, _saved
        with _lock:
            if _depth == 1:
                try:
                    run_to_the_end(_restore, _saved)
                finally:
                    _saved = []
                    _depth = 0
            else:
                _depth -= 1
        return False


def _restore(saved) -> None:
    for lib, n in saved:
        if n != 1 and lib.get_num_threads() == 1:  # not changed by the user meanwhile
            _set_threads(lib, n)


ONE_BLAS_THREAD = _OneBlasThread()


def holders() -> int:
    """How many kernel launches hold the limit right now (0 = the user's counts are in force)."""
    return _depth
