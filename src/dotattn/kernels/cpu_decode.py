"""The ``cpu`` decode kernel: prepares a :class:`~dotattn.decode_semantics.DecodeCall` for the split-KV
Numba kernels of :mod:`dotattn.kernels._cpu_decode_kernels` and runs them.

Per-call work in Python is kept small (a decode step of a 30-layer model is 30 calls): the
cache is passed as a flat view of the caller's memory plus element strides, 16-bit caches as
``uint16``; partial results go to a per-thread scratch buffer that only grows, so a steady
decode loop allocates nothing large.  The Numba kernels are serial and release the GIL;
calls reading more than :data:`PARALLEL_MIN_BYTES` of K/V split their work items between the
calling thread and a pool of Python threads, one per other core (a Numba ``prange`` launch cost ~100 µs per call here
even with one thread, and its OpenMP barrier stalled whole calls on a loaded machine), taking
items from a shared counter; Numba's thread count (``numba.set_num_threads``, thread-local)
caps the threads used, so a caller's one-thread block keeps the call on its thread, and a
:class:`ParallelChoice` per call size runs such calls alone when that has been faster (a busy
machine) — below :data:`POOL_ONLY_BYTES`; larger calls always use the pool.  The
thread count never changes a bit of the result: every work item and merge is the same code,
each item writes its own part, and parts are merged in a fixed order (tested).
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numba
import numba.np.ufunc.parallel as _numba_parallel
import numpy as np

from .. import decode_semantics
from ..decode_semantics import SPLIT_SIZE, DecodeCall, decode_in_row_blocks, rotated_q, write_new
from ..semantics import BFLOAT16
from . import _cpu_decode_kernels as K
from . import _cpu_sync, _launch, _workspace
from ._blas import ONE_BLAS_THREAD

# Below this many bytes of K/V to read a call runs on its thread without a ParallelChoice;
# from it on the choice times both modes.  4 MiB (≈ 200 µs at 20 GB/s) since the pool's
# threads woke 20–90 µs late.  On the spinning partners two threads win from 2 MiB in loops of
# back-to-back calls (Intel Xeon, 2 MiB of L2 a core, 5 Dec 2026: 2–4 MiB 1.2–1.5× faster), but
# with 1 ms of other work between calls the partner has parked, every pool call is cold, and
# the choice's own Python (cold too) made the calls it ran alone 3–8 % slower than this rule's
# (docs/decoding-log.md "Mid-size decode calls"): a model's calls come between its other steps,
# so plain calls keep 4 MiB — unless they come back to back: a call of at least
# PARALLEL_MIN_BYTES_BACK_TO_BACK that starts within BACK_TO_BACK_S of the end of the previous
# such call takes the choice too.
PARALLEL_MIN_BYTES = 4 << 20
PARALLEL_MIN_BYTES_BACK_TO_BACK = 2 << 20
BACK_TO_BACK_S = 50e-6
_LAST_BACK_TO_BACK_END = [0.0]  # perf_counter at the end of the last call of that size
# Inside on_numba_team() (SmolLM's decode steps: the team's workers are awake after the step's
# products) two threads won from ≈ 0.6 MiB — SmolLM2's decode tokens/s, one process, alternated
# against the 4 MiB rule: 600 tokens of context 1.08–1.18×, 1,000 1.22–1.27×, 1,500 1.33×, 2,000
# 1.35–1.40×, 2,700 1.27× (a 256 KiB rule: 200 tokens, 0.3 MiB, 0.98×).  Never above
# PARALLEL_MIN_BYTES (tests set that one).
PARALLEL_MIN_BYTES_TEAM = 512 << 10
# From this many bytes of K/V on, a call runs on the pool without a ParallelChoice: both cores
# read more than one even when other programs keep every core busy — alternated in one process
# with three spinning processes on the two cores, alone/pool was 1.61 at 1 GiB and 1.16 at
# 128 MiB (0.95 at 16 MiB: there the choice still decides), 2 Dec 2026, docs/decoding-log.md "Large
# calls always on the pool".  The choice's exploration and retries ran such calls alone at
# about twice the pool's time (the bench's B8 32k float16 row read 74–79 % of the all-core rate).
POOL_ONLY_BYTES = 64 << 20

_executor: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_F16 = np.dtype(np.float16)


def _bf16_dot_available() -> bool:
    """Whether bfloat16 decode scores may run on ``vdpbf16ps`` (:data:`BF16_DOT`)."""
    from . import _cpu_isa

    if os.environ.get(_cpu_isa.ENV_VAR, "").strip().lower() in _cpu_isa._OFF:
        return False
    return _cpu_sync._X86 and "avx512bf16" in _cpu_isa._cpu_features()


# A bfloat16 q on a bfloat16 cache, one query row per K/V head (R = group · Lq = 1: no GQA
# folding, one new token): the scores q·k by ``vdpbf16ps`` (32 bfloat16 pairs per instruction,
# exact products, float32 accumulators; K._scores_dot16) instead of widening k to float32 for
# FMAs with the pre-scaled float32 q — where the CPU has avx512_bf16, D % 32 == 0, Dv % 16 == 0
# and q is not rotated (a rotated q is not bfloat16).  Only R = 1: here (Sapphire Rapids-class
# VM) one vdpbf16ps occupies both FMA ports for 2 cycles (4 FMAs' time for 32 products, the FMAs
# 64), so it wins only where k's widening (2 operations per 16 elements, shared by the R rows)
# is a large part of the work: R = 1 3–5 % faster, R = 4 (the bench's GQA shape) up to 7 % slower
# (docs/decoding-log.md, "bfloat16 scores on vdpbf16ps").  Decided once per process
# (``DOTATTN_CPU_BF16=off`` forces the widening path, like the bfloat16 GEMMs' fallback); tests
# set it to compare both.
BF16_DOT = _bf16_dot_available()
BF16_DOT_MAX_ROWS = 1


def _cache_kind(dtype: np.dtype) -> int:
    """The kernels' K.KIND_* of a cache dtype (16-bit caches are read as uint16)."""
    return K.KIND_BF16 if dtype == BFLOAT16 else K.KIND_F16 if dtype == _F16 else K.KIND_FLOAT


# The chunks' partial outputs and LSEs of a call are kept between calls in the calling thread's
# part of the cpu backend's workspace (kernels/_workspace.py): bounded with its other roles by
# DOTATTN_CPU_WORKSPACE_MB and dropped by cpu.release_workspace().  Until 6 Dec 2026 they sat in a
# thread-local dict of their own, grow-only and outside both: a server thread that once decoded a
# large batch kept its parts for good (the resource audit of that day).
_PART_ROLES: dict[str, tuple[str, str]] = {}


def _scratch(n_items: int, R: int, Dv: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Views ``(n_items, R, Dv)`` and ``(n_items, R)`` float64 of this thread's kept buffers (fresh ones
    for this call alone where keeping them would pass the workspace's limit)."""
    key = np.dtype(dtype).char
    roles = _PART_ROLES.get(key)
    if roles is None:
        roles = _PART_ROLES[key] = (f"decode part outputs {key}", f"decode part lses {key}")
    bufs = _workspace.thread_buffers()
    need_o, need_l = n_items * R * Dv, n_items * R
    o, l = bufs.get(roles[0]), bufs.get(roles[1])
    if o is None or l is None or o.size < need_o or l.size < need_l:
        o = np.empty(max(need_o, 1), dtype=dtype)
        l = np.empty(max(need_l, 1), dtype=np.float64)  # every LSE part in float64 (the kernel's _chunk)
        others = sum(b.nbytes for role, b in list(bufs.items()) if role not in roles)
        if others + o.nbytes + l.nbytes <= _workspace.limit_bytes():
            bufs[roles[0]], bufs[roles[1]] = o, l
        # (else this call's alone: a smaller pair kept before stays for the calls it fits)
    return o[:need_o].reshape(n_items, R, Dv), l[:need_l].reshape(n_items, R)


# Element strides (page, head, slot, Hkv) by (byte strides, Hkv, itemsize): the same few for
# every call of a model (its layers' caches are alike); cleared whole when full.
_STRIDES: dict[tuple, np.ndarray] = {}


def _flat(cache: np.ndarray, pages: np.ndarray, kind: int | None = None):
    """``(flat 1-D view, element strides (page, head, slot, Hkv), kind)`` of a C-contiguous cache;
    ``kind`` (K.KIND_*: float, bfloat16, float16) when the caller knows it (_Derived.kind)."""
    if kind is None:
        kind = _cache_kind(cache.dtype)
    flat = cache.reshape(-1) if kind == K.KIND_FLOAT else cache.reshape(-1).view(np.uint16)
    item = cache.itemsize
    key = (pages.strides, pages.shape[1], item)
    st = _STRIDES.get(key)
    if st is None:
        b = pages.strides
        st = np.array([b[0] // item, b[1] // item, b[2] // item, pages.shape[1]], dtype=np.int64)
        # shared by calls and never written (left writeable: Numba types a read-only array
        # apart, which would compile every kernel twice)
        if len(_STRIDES) >= 64:
            _STRIDES.clear()
        _STRIDES[key] = st
    return flat, st, kind


def _writeable_alias(flat: np.ndarray) -> np.ndarray:
    """``flat`` itself when writeable, else a writeable array over the same memory.

    The kernels only read the caches, but Numba types a read-only array apart and the entries
    are compiled for writeable ones: a read-only cache (flags.writeable = False, a read-only
    memmap, a broadcast view) failed to type ("No implementation of function _fused16") until
    6 Dec.  The alias holds no reference to the memory: the call's arrays keep it alive until
    the kernel returns, and nothing the call returns points into it."""
    if flat.flags.writeable:
        return flat
    import ctypes

    return np.frombuffer((ctypes.c_char * flat.nbytes).from_address(flat.ctypes.data), dtype=flat.dtype)


def _strided_flat(cache: np.ndarray, pages: np.ndarray, kind: int):
    """``(flat 1-D view, element strides)`` of a cache that is not C-contiguous (a slice of a
    larger buffer, one half of a combined K/V tensor, an expanded view), or None where the
    kernel cannot index it: a negative stride, a stride not a whole number of elements, a head
    dim not contiguous, unaligned or empty memory.

    The kernels address a cache as ``flat[page·s₀ + head·s₁ + slot·s₂ + d]``; ``flat`` here
    spans the cache's memory from its first element to its last, so the same kernel reads the
    same values in the same order as from a contiguous copy — the same bits (before 6 Dec such
    caches went to the numpy kernel, whose rounding differs)."""
    item = cache.itemsize
    st = cache.strides
    if cache.size == 0 or not cache.flags.aligned or any(x < 0 or x % item for x in st):
        return None
    if cache.shape[-1] > 1 and st[-1] != item:
        return None
    span = 1 + sum((n - 1) * (x // item) for n, x in zip(cache.shape, st))
    flat = np.lib.stride_tricks.as_strided(cache, shape=(span,), strides=(item,))
    if kind != K.KIND_FLOAT:
        flat = flat.view(np.uint16)
    b = pages.strides
    strides = np.array([b[0] // item, b[1] // item, b[2] // item, pages.shape[1]], dtype=np.int64)
    return flat, strides


def unsupported_reason(call: DecodeCall) -> str | None:
    for name, x, pages in (("k_cache", call.k_cache, call.k_pages), ("v_cache", call.v_cache, call.v_pages)):
        if not x.flags.c_contiguous and _strided_flat(x, pages, _cache_kind(x.dtype)) is None:
            return (f"{name} has strides {x.strides} the cpu kernel cannot index (a negative stride, or a "
                    "head dim not contiguous)")
    return None


class _Derived:
    """What :func:`decode` derives from a call's kind alone (shapes, dtypes, options): kept in
    ``call.kind.derived`` so a repeated call reads it back with one lookup — the call's Python
    runs cold (the items have just streamed the caches), where each attribute, property and
    dtype step cost a few µs at B1 4k (docs/decoding-log.md, "The decode call's fixed costs")."""

    __slots__ = ("B", "Hq", "Lq", "Hkv", "D", "Dv", "R", "Lnew", "T", "kind", "per_key", "items_per_chunk",
                 "left", "right", "softcap", "scale", "big_gemm", "dot_static", "strides", "half")

    def __init__(self, call: DecodeCall) -> None:
        self.B, self.Hq, self.Lq, self.D = call.q.shape
        self.Hkv, self.Dv, self.Lnew = call.Hkv, call.Dv, call.Lnew
        self.R = call.group * call.Lq
        self.T = T = call.compute_dtype
        self.kind = _cache_kind(call.cache_dtype)
        self.per_key = self.Hkv * (self.D + self.Dv) * call.k_cache.itemsize  # K/V bytes per key
        self.items_per_chunk = self.B * self.Hkv
        left, right = call.window if call.window is not None else (None, None)
        self.left = -1 if left is None else left
        self.right = -1 if right is None else right
        self.softcap = 0.0 if call.softcap is None else call.softcap
        self.scale = T.type(call.scale)
        # The chunks' GEMMs (R × SPLIT × D) stay on the calling thread in OpenBLAS up to 64³
        # multiply-adds; bigger ones (long chunked prefills) would start BLAS threads inside ours.
        self.big_gemm = self.R * SPLIT_SIZE * max(self.D, self.Dv) > 64**3
        # the caches' element strides (page, head, slot, Hkv), set by the kind's first call: for
        # C-contiguous caches (decode checks every call) they follow from the shapes alone
        self.strides: tuple[np.ndarray, np.ndarray] | None = None
        # the conditions of the vdpbf16ps scores (BF16_DOT) that the kind settles; BF16_DOT, its
        # row limit and the rotary table are read per call (tests switch the first, any call may
        # bring the last)
        self.dot_static = (
            self.kind == K.KIND_BF16 and call.q.dtype == BFLOAT16
            and T == np.float32 and self.D % 32 == 0 and self.Dv % 16 == 0
        )
        # a float16 call computing in float32: q's scaling and the output's rounding by the kernels'
        # loops (half_from_float, float_from_half_scaled), not NumPy's casts — which have no
        # vector loop for float16 here: 14 + 21.6 µs of a B1 4k call, 53 + 96 at B8 (warm)
        self.half = call.q.dtype == _F16 and call.dtype == _F16 and T == np.float32


def _derived(call: DecodeCall) -> _Derived:
    kind = call.kind
    if kind is None:
        return _Derived(call)
    d = kind.derived.get(_Derived)  # keyed by the class: a second copy of this module keeps its own
    if d is None:
        d = kind.derived[_Derived] = _Derived(call)
    return d


def decode(call: DecodeCall, reference: bool = False, *, parallel_min_bytes: int | None = None):
    """Append, then ``(out (B, Hq, Lq, Dv), lse (B, Hq, Lq))`` in the compute dtype — ``out``
    already float16 for a float16 call computing in float32 (the caller's ``astype`` then
    copies nothing; the same bits as its cast).

    ``parallel_min_bytes`` (default :data:`PARALLEL_MIN_BYTES`, inside
    :func:`on_numba_team` the lower :data:`PARALLEL_MIN_BYTES_TEAM`): calls reading fewer bytes
    of K/V run whole on this thread (``precompile`` passes 0 to reach the parallel entries too).
    """
    del reference
    kc, vc = call.k_cache, call.v_cache
    strided = None
    if not (kc.flags.c_contiguous and vc.flags.c_contiguous):
        kind = _cache_kind(kc.dtype)
        strided = (_strided_flat(kc, call.k_pages, kind), _strided_flat(vc, call.v_pages, kind))
        if strided[0] is None or strided[1] is None:  # unsupported_reason()
            from . import numpy_decode

            return numpy_decode.decode(call)
    d = _derived(call)
    if d.R > decode_semantics.ROWS_PER_PASS:  # many query rows (a chunked prefill): blocks of them, partials bounded
        blocked = decode_in_row_blocks(call, lambda sub: decode(sub, parallel_min_bytes=parallel_min_bytes))
        if blocked is not None:
            return blocked
    lengths = call.cache_lengths
    # the kernels' lengths: the caller's own array when it is what they take (an int64 (B,) array,
    # C-contiguous, aligned, writeable: one compiled type) and nothing is appended — a fresh
    # array from an add cost ≈ 6 µs of a B1 4k call's cold Python; they only read it
    kvlen = lengths if d.Lnew == 0 and lengths.flags.carray else lengths + d.Lnew
    # Python's sum of a small batch's lengths: a NumPy reduction costs ≈ 1 µs even on one element
    if kvlen.shape[0] <= 64:
        lengths = kvlen.tolist()
        keys, max_n = sum(lengths), max(lengths, default=0)
    else:
        keys, max_n = int(kvlen.sum()), int(kvlen.max(initial=0))
    nbytes = keys * d.per_key
    closely = False  # a call of PARALLEL_MIN_BYTES_BACK_TO_BACK or more, under PARALLEL_MIN_BYTES
    if parallel_min_bytes is None:  # (the team's threshold looked up only where it decides)
        small = nbytes < PARALLEL_MIN_BYTES and (nbytes < PARALLEL_MIN_BYTES_TEAM or not _launch.in_numba_team())
        if small and nbytes >= PARALLEL_MIN_BYTES_BACK_TO_BACK:
            closely = True
            small = time.perf_counter() - _LAST_BACK_TO_BACK_END[0] > BACK_TO_BACK_S
    else:
        small = nbytes < parallel_min_bytes
    n_items = d.items_per_chunk * (-(-max_n // SPLIT_SIZE))
    choice = None
    pool = team = False
    if not small:
        # Numba's thread count (thread-local) caps the threads: a caller that set it to 1 for a
        # block of work — SmolLM's one-thread mode on a busy machine — keeps the call on its thread
        workers = min(_workers(), _numba_threads())
        team = _launch.in_numba_team()  # parallel items on Numba's team (on_numba_team)
        if workers > 1 and n_items >= 2:
            if nbytes >= POOL_ONLY_BYTES:
                pool = True
                _POOL_ONLY_CALLS[0] += 1
            else:
                key = (nbytes.bit_length(), workers, team)
                choice = _CHOICES.get(key)
                if choice is None:
                    choice = _CHOICES[key] = ParallelChoice()
                pool = choice.choose()
        if pool and not team and USE_PARTNERS and _wake_partners(workers - 1):
            # decided first: a parked partner wakes while the Python below runs — late, so the
            # call is the wake's time, not the pool's (ParallelChoice.record)
            if choice is not None:
                choice.cold = True
    if call.k_new is not None:
        write_new(call)
    T = d.T
    kind = d.kind
    if strided is not None:  # (strides of the call's own views: not the kind's, which assume C order)
        (kflat, kst), (vflat, vst) = strided
    else:
        if d.strides is None:
            d.strides = (_flat(kc, call.k_pages, kind)[1], _flat(vc, call.v_pages, kind)[1])
        kst, vst = d.strides
        if kind == K.KIND_FLOAT:  # the caches as flat views (_flat), 16-bit ones as uint16
            kflat, vflat = kc.reshape(-1), vc.reshape(-1)
        else:
            kflat, vflat = kc.reshape(-1).view(np.uint16), vc.reshape(-1).view(np.uint16)
    if not (kflat.flags.writeable and vflat.flags.writeable):
        kflat, vflat = _writeable_alias(kflat), _writeable_alias(vflat)
    qscale = 1.0
    if d.dot_static and BF16_DOT and d.R <= BF16_DOT_MAX_ROWS and call.rotary is None:
        # q unscaled (its bfloat16 values), the scale applied to the scores (K._scores_dot16)
        kind, qscale = K.KIND_BF16_DOT, float(call.scale)
        q = np.ascontiguousarray(call.q, dtype=T)
    else:
        q = call.q if call.rotary is None else rotated_q(call)
        if d.half and q.dtype == _F16 and q.flags.c_contiguous:
            # float32(q) · scale, as np.multiply gives it (a float32 scale: one float32 rounding)
            qs = np.empty(q.shape, dtype=T)
            K.float_from_half_scaled(q.reshape(-1).view(np.uint16), d.scale, qs.reshape(-1))
            q = qs
        elif q.dtype == T and T == np.float32 and q.flags.carray and call.rotary is None:
            # (C-contiguous, aligned, writeable: the type the kernels are compiled for) scaled by
            # the kernels as they copy each item's rows (_item): the same bits as the
            # product below, without its call and array (≈ 1.5 µs of a one-token call)
            qscale = float(d.scale)
        else:
            # a fresh C-contiguous array in the compute dtype — order="C": NumPy keeps a strided
            # q's memory order otherwise ("blhd" caches' q is a transposed view), and the kernel
            # entries would compile a second signature for it on the first such call (25 s here)
            # (−inf · 0 gives NaN and a huge q·scale overflows, as the rule of NaN and ±inf wants:
            # without NumPy's RuntimeWarnings, as everywhere in the decode kernels)
            with np.errstate(invalid="ignore", over="ignore"):
                q = np.multiply(q, d.scale, dtype=T, order="C")
    alibi = call.alibi_slopes
    slopes = alibi if alibi is not None else _no_slopes(T)
    left, right, Dv = d.left, d.right, d.Dv
    table, ps = call.block_table, call.page_size
    if small or (not pool and n_items >= 2):
        args = (q, kflat, kst, vflat, vst, table, ps, kind, kvlen, SPLIT_SIZE,
                call.causal, left, right, d.softcap, qscale, slopes, alibi is not None, Dv)
        if small:
            # A small call (a model's decode step): plan, items and merges in one Numba entry,
            # parts allocated there — the per-call Python here is most of such a call's cost.
            out, lse = _serial(args, d.big_gemm)
            return _result(out, lse, d.half, closely)
        # on this thread alone: the one-entry kernel, the same bits (through the three entries
        # below, SmolLM's 4k calls that the choice ran alone took 903 µs against 842 by this
        # one: their arguments are passed three times, and the Python between them)
        started = time.perf_counter()
        out, lse = _serial(args, d.big_gemm)
        if choice is not None:
            choice.record(False, (time.perf_counter() - started) / nbytes)
        return _result(out, lse, d.half, closely)
    # the pool's time from here: its Python (plan, parts) is part of what the choice weighs
    # against the one-entry kernel's (≈ 4 µs: a fifth of a 0.5 MB call's items)
    started = time.perf_counter()
    B, Hkv = d.B, d.Hkv
    part_o, part_lse = _scratch(n_items, d.R, Dv, T)
    out = np.empty((B, d.Hq, d.Lq, Dv), dtype=T)
    lse = np.empty((B, d.Hq, d.Lq), dtype=T)
    c0, nch, start = K.plan(kvlen, d.Lq, Hkv, SPLIT_SIZE, left, right)
    total = int(start[-1])
    common = (
        q, kflat, kst, vflat, vst, table, ps, kind, kvlen, SPLIT_SIZE,
        call.causal, left, right, d.softcap, qscale, slopes, alibi is not None, c0, nch, start, part_o, part_lse,
        out, lse, np.zeros(B * Hkv, dtype=np.int64),  # merged by the items' threads as pairs finish
    )
    if d.big_gemm:
        with ONE_BLAS_THREAD:
            _run_items(pool, team, workers if pool else 1, choice, nbytes, total, common, started)
    else:
        _run_items(pool, team, workers if pool else 1, choice, nbytes, total, common, started)
    return _result(out, lse, d.half, closely)


def _result(out: np.ndarray, lse: np.ndarray, half: bool, closely: bool) -> tuple[np.ndarray, np.ndarray]:
    """:func:`decode`'s return: ``out`` as float16 for a float16 call (``half``); a call of the
    back-to-back rule's size (``closely``) leaves its end time for the next one."""
    if closely:
        _LAST_BACK_TO_BACK_END[0] = time.perf_counter()
    return (_half(out) if half else out), lse


def _half(out: np.ndarray) -> np.ndarray:
    """A float32 output as float16, bit for bit NumPy's ``astype`` (K.half_from_float)."""
    h = np.empty(out.shape, dtype=_F16)
    K.half_from_float(out.reshape(-1), h.reshape(-1).view(np.uint16))
    return h


def _run_items(pool: bool, team: bool, workers: int, choice, nbytes: int, total: int, common: tuple,
               started: float) -> None:
    """The items of :func:`decode`'s parallel entries (and merges, as pairs finish); ``started``:
    when the call's pool path began (perf_counter), for the choice's time."""
    counter = np.zeros(1, dtype=np.int64)  # tickets taken (the kernel's atomic add)
    if not pool:
        # one item (``precompile`` reaches the parallel entries this way): this thread
        K.run_items(counter, total, K.ROLE_FRONT, *common)
        return
    # Items by tickets from a shared counter, on the caller and one pool thread per
    # other core: a pool thread the scheduler wakes late, or that shares its core with
    # another program's spinning thread (the OpenMP workers of torch or of Numba's
    # parallel kernels spin after each of a model's products), takes fewer items
    # instead of holding the call up by a fixed range — the caller waits for at most
    # the item it runs.  With two threads the caller takes items from the first up
    # and the pool thread from the last down, so each thread's items are neighbours
    # (long stretches of a contiguous cache; alternating items cut every thread's
    # reads into 64 KB pieces); with more threads, any item by ticket.  A pool task
    # not started when the tickets run out is cancelled.  Each item writes its own
    # part: the same bits whichever thread ran it.
    if team:
        K.run_items_team(counter, total, workers, common)
    elif not _on_partners(workers - 1, counter, total, common):
        pair = workers == 2
        tasks, futures = _launch.Tasks(), []
        try:
            for _ in range(workers - 1):
                futures.append(tasks.submit(_pool(), K.run_items, counter, total, K.ROLE_BACK if pair else K.ROLE_SHARED, *common))
            K.run_items(counter, total, K.ROLE_FRONT if pair else K.ROLE_SHARED, *common)
            for future in futures:
                if not future.cancel():
                    future.result()  # re-raises a worker's exception here
        except BaseException:
            # Stopped (Ctrl-C in the caller's items or its wait; an error) with a pool thread's
            # items still running: they write this thread's kept part buffers (_scratch), which
            # its next call reuses — as _launch.run_chunks, they end before the exception goes on
            # (unstarted tasks never run, one queued by a submit the Ctrl-C stopped too:
            # _launch.Tasks; their errors are dropped: this one wins).
            tasks.stop(futures)
            raise
    if choice is not None:
        choice.record(True, (time.perf_counter() - started) / nbytes)


# (a parallel call's items inside _launch.on_numba_team(): Numba's team, run_items_team)
on_numba_team = _launch.on_numba_team


def _serial(args, big_gemm: bool):
    """:func:`~._cpu_decode_kernels.run_serial` (BLAS on this thread for big GEMMs)."""
    if big_gemm:
        with ONE_BLAS_THREAD:
            return K.run_serial(*args)
    return K.run_serial(*args)


class ParallelChoice:
    """Whether calls of one size class run on the pool or on the calling thread alone, chosen by
    their times.

    The pool wins on an idle machine (two cores read about twice what one does), but when the
    other cores are busy — other programs, or a model's OpenMP workers spinning after its
    products — the pool thread shares a core, and the calls ran slower on the pool than alone
    (at load 3, SmolLM-sized 4k calls from DRAM: 1,868 µs per call on the pool against 1,240
    alone).  Both modes give the same bits, so the faster one runs: the class's first call on
    the pool, not timed (it may compile the kernel or start the pool), the second on the pool,
    the third alone, then the mode with the lower median of its last :data:`KEEP` times per
    K/V byte — the pool only when it is faster by :data:`POOL_MARGIN` (on an idle machine it
    is 1.6–1.9× faster; within the noise, alone costs no second thread) — and the other mode
    now and then (has the load changed?): alone :data:`RETRY` calls after the pool took over,
    then twice as far apart at each retry while the pool stays faster by :data:`WIDE_MARGIN`,
    up to :data:`RETRY_ALONE_MAX` calls; the pool :data:`RETRY_POOL_FIRST` calls after the
    class went alone, then twice as many calls later at each retry, up to :data:`RETRY`
    apart — back to the first gap once the pool has run RETRY calls in a row (when the class
    goes alone while the gap is long, the pool had lost a few calls before: a busy machine);
    a retry due on a call after a pause
    (not timed) waits for the next call.  A retry's time replaces the retried mode's kept
    times: they were taken before the load changed, if it did.  Races between
    threads calling at once only blur the times.

    Why the pool is retried soon after a switch: a few slow pool calls — another program on a
    core for a moment, the first calls after a pause — sent a class alone, and with a retry
    every 32 calls and three kept times to outvote it ran 64–96 calls on one thread at ≈ 1.9×
    the time on an idle machine.  ``dotattn bench --shapes decode`` timed its B8 32k bfloat16
    row that way (110.8 ms against 59–64 on the pool, 1 Dec 2026, docs/decoding-log.md "The
    decode bench's one-thread rows"): that row shares its class with the float16 rows before
    it, whose paged calls had met such a moment.  A retry of the pool on a busy machine costs
    one call at the pool's time (≈ 1.1–1.5× alone's), and the doubling makes them rare.

    The first call of each mode is not timed (the first alone call of a class loaded the
    one-entry kernel: 25–42 ms, which kept a busy machine's calls on the slower pool for the
    next 32), nor is a call that comes more than :data:`IDLE_S` after the class's previous one:
    after a pause the first pool calls are slow (the pool thread and the idle core
    wake — torch's first SDPA calls after the bench's 0.3 s pauses took 2–10× their time too),
    and three such times made the class run alone for the next 64–96 calls, until its retries
    had brought three good pool times back: the bench's B1 4k rows timed the calling thread
    alone (1.2 ms against 0.76 on both cores, float16, 1 Dec).  Nor is a pool retry that found
    its partner parked (``cold``, set by :func:`decode`): the next call retries the pool, once
    (:meth:`record`).
    """

    RETRY = 32
    RETRY_POOL_FIRST = 2  # the pool's first retry after the class went alone; doubled up to RETRY
    # alone's retries while the pool wins by WIDE_MARGIN (its median below this fraction of
    # alone's): RETRY calls apart, then twice as far at each retry that finds the margin still
    # wide, up to RETRY_ALONE_MAX; back to RETRY at a narrower margin or a switch.  Every retry
    # runs a call at alone's time (1.7–2× the pool's on an idle machine): backing off took a B1
    # 4k loop's time ×0.961–0.969 (docs/decoding-log.md, "The decode bench's first row of a size class …")
    WIDE_MARGIN = 0.7
    RETRY_ALONE_MAX = 128
    KEEP = 3
    POOL_MARGIN = 0.9  # the pool runs when its median time is below this fraction of alone's
    IDLE_S = 0.02

    __slots__ = ("times", "calls", "last", "idle", "ran", "best", "gap", "alone_gap", "next_retry", "retrying", "counts",
                 "cold", "rechecked")

    def __init__(self) -> None:
        self.times: tuple[list[float], list[float]] = ([], [])  # seconds per K/V byte: (alone, pool)
        self.calls = 0
        self.ran = [False, False]  # each mode's first call is not timed (it may load its kernel)
        self.last = 0.0  # when the class's previous call ended (perf_counter)
        self.idle = False  # this call came after a pause
        self.best = True  # the faster mode by the kept times (True: the pool)
        self.gap = self.RETRY_POOL_FIRST  # calls from a switch to alone, or a pool retry, to the next
        self.alone_gap = self.RETRY  # calls from an alone retry to the next while the pool wins
        self.next_retry = self.RETRY  # the call number of the next retry
        self.retrying = False  # this call runs the other mode
        self.counts = [0, 0]  # calls run (alone, pool), for ``dotattn bench --shapes decode``
        self.cold = False  # this pool call found a partner parked (decode sets it; record clears it)
        self.rechecked = False  # the last pool retry was cold and the next call retries it again

    def choose(self) -> bool:
        """True: run this call on the pool."""
        self.calls += 1
        self.idle = time.perf_counter() - self.last > self.IDLE_S
        self.retrying = False
        alone, pool = self.times
        if not pool:
            return True
        if not alone:
            return False
        best = _median(pool) < self.POOL_MARGIN * _median(alone)
        if best != self.best:  # the class switched
            self.best = best
            self.alone_gap = self.RETRY
            self.next_retry = self.calls + (self.RETRY if best else self.gap)
        if self.calls >= self.next_retry and not self.idle:  # (a call after a pause is not timed)
            self.retrying = True
            if best:
                # alone's retry: the pool has run RETRY calls or more since it last lost, so a
                # next switch to alone is likely a moment — its pool retry comes soon again
                self.gap = self.RETRY_POOL_FIRST
                wide = _median(pool) < self.WIDE_MARGIN * _median(alone)
                self.alone_gap = min(2 * self.alone_gap, self.RETRY_ALONE_MAX) if wide else self.RETRY
                self.next_retry = self.calls + self.alone_gap
            else:
                # the pool's retry (when it stays slower, the next comes twice as late: on a
                # busy machine a lucky pool time brings one pool call, then alone again, and
                # the gap keeps growing)
                self.gap = min(2 * self.gap, self.RETRY)
                self.next_retry = self.calls + self.gap
            return not best
        return best

    def record(self, pool: bool, per_byte: float) -> None:
        self.last = time.perf_counter()
        self.counts[int(pool)] += 1
        first, self.ran[int(pool)] = not self.ran[int(pool)], True
        cold, self.cold = self.cold, False
        if first or self.idle:
            return  # a mode's first call in the class, or the first after a pause: a warm-up
        rechecked, self.rechecked = self.rechecked, False
        if pool and cold and self.retrying and not rechecked:
            # the pool's retry found its partner parked — the class ran alone meanwhile, and a
            # partner parks 300 µs after its last call — so it timed the partner's wake-up
            # (20–90 µs on these VMs): the next call retries the pool with the partner awake.
            # Without this a class of ≈ 100 µs calls (2 MB) stayed alone for 270 calls at 1.4×
            # the pool's time: every retry was such a call (5 Dec 2026, docs/decoding-log.md
            # "Mid-size decode calls").  Once only: where the calls come further apart than the
            # partner's spin, every pool call is cold, and that second retry's time is the pool's.
            self.rechecked = True
            self.next_retry = self.calls + 1
            return
        kept = self.times[int(pool)]
        if self.retrying:
            kept.clear()  # times from before the load changed, if it did
        kept.append(per_byte)
        if len(kept) > self.KEEP:
            del kept[0]


def mode_counts() -> tuple[int, int]:
    """Calls run (alone, on the pool) so far by the pool-or-alone choices of all size classes
    and, on the pool, by the calls of :data:`POOL_ONLY_BYTES` or more (``dotattn bench
    --shapes decode`` reports each row's)."""
    counts = [c.counts for c in list(_CHOICES.values())]
    return sum(c[0] for c in counts), sum(c[1] for c in counts) + _POOL_ONLY_CALLS[0]


def _median(x: list[float]) -> float:
    return sorted(x)[len(x) // 2]


# one choice per (size class: K/V bytes' bit length, thread count); a model's calls share a few
_CHOICES: dict[tuple[int, int], ParallelChoice] = {}
_POOL_ONLY_CALLS = [0]  # calls of POOL_ONLY_BYTES or more, run on the pool without a choice

_NO_SLOPES: dict[np.dtype, np.ndarray] = {}


def _no_slopes(T: np.dtype) -> np.ndarray:
    """The kernels' stand-in slopes of a call without ALiBi (never read; shared, never written)."""
    x = _NO_SLOPES.get(T)
    if x is None:
        x = _NO_SLOPES[T] = np.zeros((1, 1), dtype=T)
    return x


def _numba_threads() -> int:
    """``numba.get_num_threads()`` (this thread's setting) without the launch check it makes on
    every call — two locks, ≈ 10 µs of a B1 4k call's cold Python: once Numba's threads are
    launched, its C getter itself (as numba.get_num_threads calls it)."""
    if getattr(_numba_parallel, "_is_initialized", False):
        get = getattr(_numba_parallel, "_get_num_threads", None)
        if get is not None:
            n = get()
            if n > 0:
                return n
    return numba.get_num_threads()  # launches the threads; raises on an invalid count


_WORKERS: list[int] = []


def _workers() -> int:
    """The cores this process may run on (read once: a call's Python runs cold, after the items
    have streamed the caches, and every step of it counts)."""
    if not _WORKERS:  # (a list of its own: tests set it to run the parallel paths on one core)
        _WORKERS.append(_launch.cores())
    return _WORKERS[0]


# The spinning partner threads (``_launch.Partners``, shared with the small-call kernel): a
# parallel call's items on the caller and one partner per other core, no thread woken through
# the OS on the way (on these VMs such a wake-up started 85–90 µs late, twice a call: at B1 4k,
# ≈ 0.9 ms calls, a fifth of the call).
USE_PARTNERS = True  # False: the executor (the A/B's old mode)


def _wake_partners(n: int) -> bool:
    return _launch.wake_partners(n)


def _on_partners(n: int, counter, total: int, common: tuple) -> bool:
    """Run the items on the calling thread and the ``n`` partners; False (nothing run) when
    another call holds them.  With one partner the caller takes items from the first up and the
    partner from the last down."""
    if not USE_PARTNERS:
        return False
    pair = n == 1
    return _launch.on_partners(
        n,
        K.run_items_caller, (counter, total, K.ROLE_FRONT if pair else K.ROLE_SHARED, common),
        K.run_items_partner, (counter, total, K.ROLE_BACK if pair else K.ROLE_SHARED, common),
    )


def precompile_partners() -> None:
    """Load or compile the partner threads' entries (``dotattn precompile``): their wait, and
    their items for every signature the caller's entry has — a partner runs items only when it
    claims a call before the caller has run them all, so a small call may never reach it."""
    from numba import types

    _cpu_sync.partner_wait(np.zeros(_cpu_sync.FLAG_STRIDE * 2, dtype=np.int64), 0, 0, 0)  # no call: returns at once
    for sig in K.run_items_caller.signatures:
        K.run_items_partner.compile((sig[0], types.int64, types.int64) + tuple(sig[4:]))


def _pool() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        with _pool_lock:
            if _executor is None:
                # the caller is one of the cores' workers
                _executor = ThreadPoolExecutor(max_workers=max(1, _workers() - 1), thread_name_prefix="dotattn-decode")
    return _executor
