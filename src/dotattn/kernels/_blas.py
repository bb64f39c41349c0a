"""One process-wide "BLAS on one thread" limit, reference-counted so it cannot leak.

dotattn's kernels run their own threads and call BLAS on small blocks from each of them;
left at its default thread count, OpenBLAS would wake its own threads for every block GEMM
(3–30× slower, ``docs/performance.md``).  So a kernel launch holds :data:`ONE_BLAS_THREAD`.

Why one shared, counted limit instead of ``threadpoolctl``'s ``limit()`` per call: each
``limit()`` saves the thread count it finds and restores it on exit.  Two overlapping calls
from two threads (the ``cpu`` backend in one, the ``numpy`` backend in another) interleave as
*A saves 2, sets 1; B saves 1; A restores 2; B restores 1* — and the user's BLAS stays on one
thread for the rest of the process.  Here the first holder saves the user's counts, later
holders only count, and the last one out restores what the first one saved.  (A thread count
the user changes *while* a dotattn call runs is overwritten by that restore.)

The libraries are found once (``threadpoolctl`` scans the loaded shared objects: slow), after
SciPy's BLAS is loaded — Numba's ``np.dot`` calls that one, and a library loaded after the
scan would keep all its threads.
"""

from __future__ import annotations

import threading

_lock = threading.Lock()
_depth = 0
_saved: list[tuple[object, int]] = []
_libs: list | None = None


def _blas_libraries() -> list:
    """threadpoolctl's controllers of every BLAS loaded in the process (found once)."""
    global _libs
    if _libs is None:
        try:  # the BLAS Numba's np.dot calls; absent without SciPy (the numpy backend needs none)
            import scipy.linalg.cython_blas  # noqa: F401
        except ImportError:
            pass
        from threadpoolctl import ThreadpoolController

        _libs = list(ThreadpoolController().select(user_api="blas").lib_controllers)
    return _libs


class _OneBlasThread:
    """Context manager: BLAS limited to one thread while any holder, in any thread, is inside."""

    __slots__ = ()

    def __enter__(self):
        global _depth, _saved
        with _lock:
            if _depth == 0:
                libs = _blas_libraries()
                _saved = [(lib, lib.get_num_threads()) for lib in libs]
                for lib, n in _saved:
                    if n != 1:
                        lib.set_num_threads(1)
            _depth += 1
        return self

    def __exit__(self, *exc):
        global _depth, _saved
        with _lock:
            _depth -= 1
            if _depth == 0:
                for lib, n in _saved:
                    if n != 1:
                        lib.set_num_threads(n)
                _saved = []
        return False


ONE_BLAS_THREAD = _OneBlasThread()


def holders() -> int:
    """How many kernel launches hold the limit right now (0 = the user's counts are in force)."""
    return _depth
