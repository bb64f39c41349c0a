"""The ``cpu`` decode kernel: prepares a :class:`~dotattn.decoding.DecodeCall` for the split-KV
Numba kernels of :mod:`dotattn.kernels._cpu_decode_kernels` and runs them.

Per-call work in Python is kept small (a decode step of a 30-layer model is 30 calls): the
cache is passed as a flat view of the caller's memory plus element strides, 16-bit caches as
``uint16``; partial results go to a per-thread scratch buffer that only grows, so a steady
decode loop allocates nothing large.  Calls reading little K/V run on one Numba thread: a
parallel launch costs more than it saves there (and, on a loaded machine, a sibling thread
that is not scheduled stalls the whole call).  The thread count never changes a bit of the
result: every work item and merge is the same code in a fixed order (tested).
"""

from __future__ import annotations

import threading

import numba
import numpy as np

from ..decoding import SPLIT_SIZE, DecodeCall, rotated_q, write_new
from ..semantics import BFLOAT16
from . import _cpu_decode_kernels as K

# Below this many bytes of K/V to read, one thread (≈ 200 µs at 20 GB/s) beats a parallel
# launch; SmolLM2 at a 512-token context reads 0.8 MB per layer, at 4k 6.4 MB.
PARALLEL_MIN_BYTES = 4 << 20

_local = threading.local()
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
    args = (
        q, kflat, kst, vflat, vst, call.block_table, call.page_size, kind, kvlen, SPLIT_SIZE,
        call.causal, -1 if left is None else left, -1 if right is None else right,
        0.0 if call.softcap is None else call.softcap, slopes, call.alibi_slopes is not None,
        part_o, part_lse, out, lse,
    )
    nbytes = int(kvlen.sum()) * call.Hkv * (call.D + Dv) * call.k_cache.itemsize
    if nbytes >= PARALLEL_MIN_BYTES:
        K.decode_parallel(*args)
        return out, lse
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        K.decode_parallel(*args)
    finally:
        numba.set_num_threads(threads)
    return out, lse
