"""Processes forked from one whose Numba thread team ran: the team cannot run there.

Numba's parallel kernels (``prange``) run on its OpenMP threading layer, and GNU OpenMP is not
fork-safe: a forked child has the parent's team in memory but none of its threads.  Numba's
layer therefore ends such a child (SIGTERM, "Terminating: fork() called from a process already
using GNU OpenMP, this is unsafe.") at its first parallel kernel — a multiprocessing pool's
workers with the "fork" start method (Linux's default before Python 3.14), a preforking
server's workers, PyTorch DataLoader workers — and a fork of that child would wait on threads
that do not exist.  Until 6 Dec 2026 a dotattn call that ran a ``prange`` kernel (a forward or
backward past the small-call rule, SmolLM's products) in such a child killed it, and a
multiprocessing pool waited for its results forever.

:func:`team_unusable` says whether this process is such a child (or a fork of one); the
kernels' callers then run the same work without the team — the kernels' own one-thread entries
(each task computes what it computes on any thread: the same bits), the spinning partners and
the pool (plain threads, which a child starts afresh) as before.  Nothing is imported here: the
hook only reads what the parent had loaded.
"""

from __future__ import annotations

import os
import sys

_UNUSABLE: list[str] = []  # the reason, once this process is known to be such a child
_TORCH_BEFORE: list[bool] = []  # [True] in a process forked from one that had imported torch


def _after_fork_in_child() -> None:
    if "torch" in sys.modules and not _TORCH_BEFORE:
        _TORCH_BEFORE.append(True)
    if _UNUSABLE:
        return  # a fork of such a child: the same
    parallel = sys.modules.get("numba.np.ufunc.parallel")
    if parallel is None or not getattr(parallel, "_is_initialized", False):
        return  # the parent never started a team: the child starts its own, safely
    layer = getattr(parallel, "_threading_layer", None)
    omppool = sys.modules.get("numba.np.ufunc.omppool")
    vendor = getattr(omppool, "openmp_vendor", None) if omppool is not None else None
    if layer == "omp" and vendor in (None, "GNU"):  # (Intel's and LLVM's OpenMP are fork-safe; tbb and workqueue too)
        _UNUSABLE.append(
            f"this process was forked from one (pid {os.getppid()}) whose Numba OpenMP thread team ran, "
            "and GNU OpenMP cannot run a team in a forked child"
        )


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def team_unusable() -> str | None:
    """Why Numba's thread team cannot run in this process (module docstring), or None."""
    return _UNUSABLE[0] if _UNUSABLE else None


def torch_imported_before_fork() -> bool:
    """Whether this process was forked from one that had imported torch.  torch's CPU products
    run on its own GNU OpenMP team, and a forked child's product on more than one thread waits
    for that team's threads forever (plain torch does so too; PyTorch's DataLoader workers run
    on one thread for this reason).  Whether the parent's team ran cannot be told from here."""
    return bool(_TORCH_BEFORE)
