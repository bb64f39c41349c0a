"""The ``cpu`` backend's workspace: per-call scratch arrays kept between calls.

A call of the ``cpu`` backend needs tens of MiB of scratch besides its results: packed
operands (V transposed for the forward, q and dO in AMX pair layouts, the float32 split
route's pieces), dQ's partial sums, and bfloat16 gradients' float32 sums before they are
rounded.  glibc serves an allocation that large either by a fresh ``mmap`` — every page
faulted in on first touch, on every call — or from its heap (pages reused), by a threshold it
raises as the process frees mmapped blocks.  So a process's history decided the speed of its
calls: a bfloat16 H4 L4096 D128 forward+backward took 97 ms in one mode and 127–140 ms in the
other (docs/performance-log.md, "bfloat16 fwd+bwd: the time around the kernels", and "Per-call
scratch kept between calls").  Keeping the scratch between calls makes every call after the
first one find its pages already there, whatever the allocator does — what PyTorch's caching
allocator does for its tensors (freed blocks kept for the next request of a fitting size).

The rules:

* **Scratch only.**  An array a call hands back (an output, an LSE, a gradient the caller
  keeps) never comes from here: results are always fresh memory, so nothing the caller holds
  changes under a later call.
* **One buffer per role and thread.**  A call names each scratch array by a role (``"bwd
  dq_parts"``); two arrays alive in one call have distinct roles.  Each thread keeps its own
  buffers (a call runs on one Python thread; the ``_launch`` pool and Numba's team only fill
  the caller's arrays during that call), so calls from two threads never share one.
* **Reused when large enough.**  A role's buffer serves any request that fits in it (the
  array is a view of its first bytes, at a 64-byte boundary); a larger request replaces it.
  A process alternating two shapes keeps the larger.
* **Bounded.**  What a thread keeps, all roles together, stays within :func:`limit_bytes`
  (``DOTATTN_CPU_WORKSPACE_MB``, default 256 MiB; 0 keeps nothing): a request that would pass
  it gets fresh memory for that call, freed with it (the behaviour before the workspace).
* **Zeros only where asked.**  A reused buffer holds the last call's values; ``zero=True``
  clears it (split over the caller and the ``_launch`` pool) for kernels that add into it.
* **Freed on request.**  :func:`release` drops every thread's buffers (``cpu.release_workspace``).
"""

from __future__ import annotations

import os
import threading
import weakref

import numpy as np

LIMIT_ENV_VAR = "DOTATTN_CPU_WORKSPACE_MB"
DEFAULT_LIMIT_MB = 256
ALIGN = 64  # AMX tile loads and the vector packings want cache-line starts


def limit_bytes() -> int:
    """What one thread may keep (``DOTATTN_CPU_WORKSPACE_MB`` MiB, read at every call)."""
    text = os.environ.get(LIMIT_ENV_VAR, "").strip()
    try:
        mib = float(text) if text else DEFAULT_LIMIT_MB
    except ValueError:
        mib = DEFAULT_LIMIT_MB
    return max(0, int(mib * (1 << 20)))


class _Kept:
    """One thread's buffers: role → uint8 array starting at a 64-byte boundary."""

    __slots__ = ("buffers", "__weakref__")

    def __init__(self):
        self.buffers: dict[str, np.ndarray] = {}

    def nbytes(self) -> int:
        return sum(b.nbytes for b in list(self.buffers.values()))


_local = threading.local()
_every: "weakref.WeakSet[_Kept]" = weakref.WeakSet()  # every thread's, for release() and held_bytes()
_every_lock = threading.Lock()


def _mine() -> _Kept:
    kept = getattr(_local, "kept", None)
    if kept is None:
        kept = _local.kept = _Kept()
        with _every_lock:
            _every.add(kept)
    return kept


def thread_buffers() -> dict[str, np.ndarray]:
    """The calling thread's kept buffers, role → array, for a caller with a leaner lookup of its
    own (the decode kernels' partial results, ``cpu_decode._scratch``: a decode step makes 30
    calls, and :func:`scratch` takes ≈ 7 µs a buffer).  Such roles' arrays may have any dtype;
    they count towards :func:`limit_bytes` and :func:`release` drops them with the others."""
    return _mine().buffers


def _aligned_bytes(n: int, allocate) -> np.ndarray:
    """``n`` bytes (``allocate`` is ``np.empty`` or ``np.zeros``) starting at a 64-byte boundary."""
    raw = allocate(n + ALIGN, dtype=np.uint8)
    skip = -raw.ctypes.data % ALIGN
    return raw[skip : skip + n]


def scratch(role: str, shape, dtype, zero: bool = False) -> np.ndarray:
    """A C-ordered ``shape`` array of ``dtype`` at a 64-byte boundary for ``role``: the calling
    thread's kept buffer for that role when it is large enough (its values are the last
    call's unless ``zero``), else a new buffer, kept when the thread's total stays within
    :func:`limit_bytes` (else used for this call only)."""
    dtype = np.dtype(dtype)
    shape = tuple(int(n) for n in shape)
    n = int(np.prod(shape)) * dtype.itemsize
    kept = _mine()
    held = kept.buffers.get(role)
    if held is not None and held.nbytes >= n:
        out = held[:n].view(dtype).reshape(shape)
        if zero:
            zero_fill(out)
        return out
    fresh = _aligned_bytes(n, np.zeros if zero else np.empty)
    others = kept.nbytes() - (held.nbytes if held is not None else 0)
    if others + n <= limit_bytes():
        kept.buffers[role] = fresh
    # (else: this call's alone; a smaller held buffer stays for the calls it fits)
    return fresh.view(dtype).reshape(shape)


def zero_fill(x: np.ndarray) -> None:
    """``x[...] = 0`` for a C-contiguous ``x``, its bytes in halves over the caller and the
    ``_launch`` pool (NumPy's fill releases the GIL; one thread clears ≈ 10 GB/s here)."""
    from . import _launch

    flat = x.reshape(-1).view(np.uint8)
    n = flat.size
    nchunks = 2 if n >= (1 << 20) and _launch.num_threads() >= 2 else 1
    # each chunk's bytes from a cache-line boundary (no line written by both threads)
    bounds = [n * c // nchunks // ALIGN * ALIGN for c in range(nchunks)] + [n]

    def job(chunk: int, count: int) -> None:
        flat[bounds[chunk] : bounds[chunk + 1]] = 0

    _launch.run_chunks(job, (), nchunks)


def held_bytes(all_threads: bool = True) -> int:
    """Bytes kept: by every thread (default) or by the calling one."""
    if not all_threads:
        return _mine().nbytes()
    with _every_lock:
        return sum(k.nbytes() for k in list(_every))


def held_roles() -> dict[str, int]:
    """The calling thread's kept buffers: role → bytes (tests, ``dotattn info``)."""
    return {role: b.nbytes for role, b in _mine().buffers.items()}


def buffer_address(role: str) -> int | None:
    """Where the calling thread's buffer for ``role`` starts (None: none kept) — for tests
    that check a call reused it."""
    held = _mine().buffers.get(role)
    return None if held is None else int(held.ctypes.data)


def release() -> int:
    """Drop every thread's kept buffers; returns the bytes dropped.  Arrays a running call
    still uses stay alive until it returns (NumPy's references), so this is safe at any time."""
    with _every_lock:
        everyone = list(_every)
    freed = 0
    for kept in everyone:
        freed += kept.nbytes()
        kept.buffers.clear()
    return freed
