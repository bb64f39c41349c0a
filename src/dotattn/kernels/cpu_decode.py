"""The ``cpu`` decode kernel: prepares a :class:`~dotattn.decode_semantics.DecodeCall` for the split-KV
Numba kernels of :mod:`dotattn.kernels._cpu_decode_kernels` and runs them.

Per-call work in Python is kept small (a decode step of a 30-layer model is 30 calls): the
cache is passed as a flat view of the caller's memory plus element strides, 16-bit caches as
``uint16``; partial results go to a per-thread scratch buffer that only grows, so a steady
decode loop allocates nothing large.  The Numba kernels are serial and release the GIL;
calls reading more than :data:`PARALLEL_MIN_BYTES` of K/V split their work items between the
calling thread and a pool of Python threads, one per other core (a Numba ``prange`` launch cost ~100 µs per call here
even with one thread, and its OpenMP barrier stalled whole calls on a loaded machine).  The
thread count never changes a bit of the result: every work item and merge is the same code,
each item writes its own part, and parts are merged in a fixed order (tested).
"""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..decode_semantics import SPLIT_SIZE, DecodeCall, rotated_q, write_new
from ..semantics import BFLOAT16
from . import _cpu_decode_kernels as K
from ._blas import ONE_BLAS_THREAD

# Below this many bytes of K/V to read, one thread (≈ 200 µs at 20 GB/s) beats a parallel
# launch; SmolLM2 at a 512-token context reads 0.8 MB per layer, at 4k 6.4 MB.
PARALLEL_MIN_BYTES = 4 << 20

_local = threading.local()
_executor: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_F16 = np.dtype(np.float16)


def _scratch(n_items: int, R: int, Dv: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Views ``(n_items, R, Dv)`` and ``(n_items, R)`` of this thread's grow-only buffers."""
    key = np.dtype(dtype).char
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    need_o, need_l = n_items * R * Dv, n_items * R
    o, l = bufs.get(key, (None, None))
    if o is None or o.size < need_o or l.size < need_l:
        o = np.empty(max(need_o, 1), dtype=dtype)
        l = np.empty(max(need_l, 1), dtype=dtype)
        bufs[key] = (o, l)
    return o[:need_o].reshape(n_items, R, Dv), l[:need_l].reshape(n_items, R)


def _flat(cache: np.ndarray, pages: np.ndarray):
    """``(flat 1-D view, element strides (page, head, slot, Hkv), kind)`` of a C-contiguous cache."""
    if cache.dtype == BFLOAT16:
        flat, kind = cache.reshape(-1).view(np.uint16), K.KIND_BF16
    elif cache.dtype == _F16:
        flat, kind = cache.reshape(-1).view(np.uint16), K.KIND_F16
    else:
        flat, kind = cache.reshape(-1), K.KIND_FLOAT
    item = cache.itemsize
    st = pages.strides
    return flat, np.array([st[0] // item, st[1] // item, st[2] // item, pages.shape[1]], dtype=np.int64), kind


def unsupported_reason(call: DecodeCall) -> str | None:
    for name, x in (("k_cache", call.k_cache), ("v_cache", call.v_cache)):
        if not x.flags.c_contiguous:
            return f"{name} is not C-contiguous (the cpu kernel reads the cache through a flat view)"
    return None


def decode(call: DecodeCall, reference: bool = False):
    """Append, then ``(out (B, Hq, Lq, Dv), lse (B, Hq, Lq))`` in the compute dtype."""
    del reference
    reason = unsupported_reason(call)
    if reason is not None:
        from . import numpy_decode

        return numpy_decode.decode(call)
    write_new(call)
    T = call.compute_dtype
    q = rotated_q(call)
    q = np.multiply(q, T.type(call.scale), dtype=T)  # a fresh C-contiguous array
    kflat, kst, kind = _flat(call.k_cache, call.k_pages)
    vflat, vst, _ = _flat(call.v_cache, call.v_pages)
    kvlen = call.kv_lengths
    B, Hq, Lq, Dv = call.B, call.Hq, call.Lq, call.Dv
    R = call.group * Lq
    max_n = int(kvlen.max(initial=0))
    n_items = B * call.Hkv * (-(-max_n // SPLIT_SIZE))
    part_o, part_lse = _scratch(n_items, R, Dv, T)
    out = np.empty((B, Hq, Lq, Dv), dtype=T)
    lse = np.empty((B, Hq, Lq), dtype=T)
    left, right = call.window if call.window is not None else (None, None)
    slopes = call.alibi_slopes if call.alibi_slopes is not None else np.zeros((1, 1), dtype=T)
    left = -1 if left is None else left
    right = -1 if right is None else right
    c0, nch, start = K.plan(kvlen, Lq, call.Hkv, SPLIT_SIZE, left, right)
    total = int(start[-1])
    common = (
        q, kflat, kst, vflat, vst, call.block_table, call.page_size, kind, kvlen, SPLIT_SIZE,
        call.causal, left, right, 0.0 if call.softcap is None else call.softcap, slopes,
        call.alibi_slopes is not None, c0, nch, start, part_o, part_lse,
    )
    nbytes = int(kvlen.sum()) * call.Hkv * (call.D + Dv) * call.k_cache.itemsize
    workers = _workers()
    # The chunks' GEMMs (R × SPLIT × D) stay on the calling thread in OpenBLAS up to 64³
    # multiply-adds; bigger ones (long chunked prefills) would start BLAS threads inside ours.
    blas_limit = ONE_BLAS_THREAD if R * SPLIT_SIZE * max(call.D, Dv) > 64**3 else contextlib.nullcontext()
    with blas_limit:
        if nbytes < PARALLEL_MIN_BYTES or workers == 1 or total < 2:
            K.run_items(0, total, *common)
        else:
            # Contiguous item ranges, two per core (items are of nearly equal size): the pool
            # threads take ranges 1…, the caller range 0 and then, from the last one back,
            # every range no pool thread has started.  On an idle machine the ranges run side
            # by side; on a loaded one a pool thread the scheduler has not woken costs the call
            # nothing (the caller does its work).  Each item writes its own part: same bits.
            pieces = 2 * workers
            bounds = [total * w // pieces for w in range(pieces + 1)]
            futures = [_pool().submit(K.run_items, bounds[w], bounds[w + 1], *common) for w in range(1, pieces)]
            K.run_items(bounds[0], bounds[1], *common)
            for w in range(pieces - 1, 0, -1):
                if futures[w - 1].cancel():
                    K.run_items(bounds[w], bounds[w + 1], *common)
            for future in futures:
                if not future.cancelled():
                    future.result()  # re-raises a worker's exception here
    K.run_merges(call.Hkv, nch, start, part_o, part_lse, out, lse)
    return out, lse


def _workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def _pool() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        with _pool_lock:
            if _executor is None:
                # the caller is one of the cores' workers
                _executor = ThreadPoolExecutor(max_workers=max(1, _workers() - 1), thread_name_prefix="dotattn-decode")
    return _executor
