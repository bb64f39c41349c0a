"""The ``cpu`` backend's small-call path: the size rule and the call into ``_cpu_small_kernels``.

:class:`~dotattn.kernels.cpu.CpuBackend` sends a forward here when :func:`unsupported_reasons`
is empty — when one work item's whole score block, ``R × Lk`` with ``R = (Hq / Hkv) · Lq``
rows, holds at most :data:`MAX_SCORES` elements (256 KiB of float32: it stays in L2) and no
backend function (``score_mod``, ``mask_mod``, ``block_mask``) is given.  Every other option
is computed here, with the same semantics and the same dropout bits as the general kernels;
the tests check both paths against the float64 reference on both sides of the rule.

Below :data:`PARALLEL_MIN_WORK` multiply-adds (an item's fixed cost counted as
:data:`ITEM_WORK` of them) the kernel runs in the caller's thread: a thread hand-off costs
time such a call does not gain back.  Above it, the caller and one spinning partner thread
per other core (``_launch.Partners``, the decode kernel's too: no thread woken through the OS
on the way) take items from a shared queue; a call with another chunk count, or made while
another call holds the partners, runs its chunks on a small pool (``_launch.run_chunks``) —
never on a Numba ``prange`` team, whose launch waits for every thread of the team (40 ms at
load 15 for a 1 ms call).  BLAS is held to one thread only when a GEMM is big enough for
OpenBLAS to thread it (M·N·K > 64³).
"""

from __future__ import annotations

import threading

import numpy as np

from ._blas import ONE_BLAS_THREAD
from ._cpu_options import flat_pairwise
from ..semantics import AttentionCall
from ._launch import cores, in_numba_team, num_threads, on_partners, run_chunks, wake_partners
from .dropout import seed_key

# One item's score block (R × Lk elements) must fit this: 64 Ki elements = 256 KiB float32.
MAX_SCORES = 1 << 16
# Calls estimated below this many multiply-adds run in the caller's thread: the products'
# B·Hq·Lq·Lk·(D + Dv) plus ITEM_WORK for each work item — an item's fixed cost (its set-up,
# two GEMM calls, the passes' loops: ≈ 2 µs, as many multiply-adds as a tiny item's products
# take ≈ 20,000 of), so that a batch of many tiny items splits and a few small items do not.
# Measured on the AMD EPYC Zen 3 of 5 Dec, one thread against two (docs/performance-log.md,
# "The small kernel's scores transposed"): 256 items of B64 H4 L11 D16 causal (10⁶ products)
# 533 against 343 µs, 128 of them (B32) 272 against 237; 3 items of GQA 9/3 L16 D64 causal (0.3·10⁶)
# 43–48 against 70–119 µs, 12 of H12 L20 D32 72 against 116, 24 of B2 H12 L20 138 against
# 149, 12 of H12 L32 D32 (0.8·10⁶) 115–135 against 112–156.  (The limit was 2¹⁸ products
# alone, 30 Nov.)  That was the pool's hand-off; on the spinning partners (USE_PARTNERS) two
# threads win from less work: on the Intel Xeon of 5 Dec, through ``dotattn.attention``, two
# threads took 0.87 of one thread's time at GQA 9/3 L32 D64 causal (1.24·10⁶), 0.79 at B2 H12
# L20 D32 (1.09·10⁶), 0.82 at H12 L32 D32 (1.03·10⁶), 0.94 at L24 (0.72·10⁶), 0.98 at H12 L20
# (0.55·10⁶) and 1.13 at L16 (0.35·10⁶) (docs/performance-log.md, "Small calls' threads:
# spinning partners").  1.5·10⁶ → 10⁶.
PARALLEL_MIN_WORK = 1_000_000
ITEM_WORK = 20_000
# Queries per work item under a causal mask or a window that hides later keys: a block of
# early queries reads only the keys they see, so the blocks skip most of the hidden scores
# (L 128: 5/8 of a whole item's), and a sequence of a few K/V heads still makes enough items
# for both threads.
QUERY_BLOCK = 32
# OpenBLAS runs a GEMM of M·N·K ≤ 64³ on the calling thread whatever its thread count
# (interface/gemm.c: SMP_THRESHOLD_MIN · GEMM_MULTITHREAD_THRESHOLD), so our threads need no
# BLAS limit below that.
_BLAS_SINGLE_THREAD_MNK = 64**3
# Parallel calls on the spinning partner threads (``_launch.Partners``, the decode kernel's too)
# where a chunk per core runs: on the Intel Xeon of 5 Dec 2026 the pool's hand-off (a
# ``submit`` of ≈ 23 µs, the pool thread starting ≈ 45 µs after it, the caller woken from
# ``future.result()``) made two threads slower than one up to L 96 at SmolLM2's shape
# (docs/performance-log.md, "Small calls' threads: spinning partners").  False: the pool alone.
USE_PARTNERS = True

# Grouped calls (Hq/Hkv ≥ 2) that hide later keys are taken whenever one query block's scores,
# (Hq/Hkv)·QUERY_BLOCK·Lk, fit MAX_SCORES and its keys and values, Lk·(D + Dv) elements, fit
# MAX_BLOCK_KV (512 KiB of float32), not only when the whole (Hq/Hkv)·Lq·Lk does: on the Intel
# Xeon of 5 Dec 2026, with the items on the spinning partners, through ``dotattn.attention``
# against the general kernels (``/tmp/s58/grouped.py``, two runs): GQA 9/3 D64 causal L160 0.39
# of the time, L256 0.63, L512 0.85; 32/8 D128 L256 0.75.  One query head a group (MHA) is
# not: 12/12 D64 L256 1.03–1.10, L1024 1.10–1.15 (docs/performance-log.md, "Small calls'
# threads: spinning partners").  (On the Zen 3 with the pool's hand-off this rule was level,
# 0.95–1.05: not landed then.)
BLOCKED_MIN_GROUP = 2
MAX_BLOCK_KV = 1 << 17

RULE = (
    f"small calls — (Hq/Hkv)·Lq·Lk ≤ {MAX_SCORES:,} (grouped calls hiding later keys: per block "
    f"of {QUERY_BLOCK} queries, with Lk·(D + Dv) ≤ {MAX_BLOCK_KV:,}), no score_mod/mask_mod/block_mask "
    "— run a one-block kernel per (sequence, K/V head; causal: per block of "
    f"{QUERY_BLOCK} queries), in the caller's thread below {PARALLEL_MIN_WORK:,} multiply-adds "
    f"(each item counted {ITEM_WORK:,} more)"
)

_dummies: dict[np.dtype, tuple] = {}
_full_lengths: dict[tuple[int, int], np.ndarray] = {}
_NO_KEY = np.uint64(0)


def unsupported_reasons(call: AttentionCall) -> list[str]:
    """Why the small-call kernel cannot take ``call`` (empty: it can)."""
    reasons = []
    if call.extras:
        reasons.append(f"{', '.join(sorted(call.extras))} run in the general kernels")
    if call.block is not None:
        reasons.append("block calls of a larger problem (ring attention) run in the general kernels")
    rows = call.group * call.Lq
    if rows * call.Lk > MAX_SCORES:
        blocked = query_block(call) < call.Lq and call.group >= BLOCKED_MIN_GROUP
        kv = call.Lk * (call.q.shape[3] + call.v.shape[3])
        block_rows = call.group * QUERY_BLOCK
        if not blocked:
            reasons.append(f"score block (Hq/Hkv)·Lq·Lk = {rows}·{call.Lk} > {MAX_SCORES}")
        elif block_rows * call.Lk > MAX_SCORES:
            reasons.append(f"a query block's scores (Hq/Hkv)·{QUERY_BLOCK}·Lk = {block_rows}·{call.Lk} > {MAX_SCORES}")
        elif kv > MAX_BLOCK_KV:
            reasons.append(f"a query block's keys and values Lk·(D + Dv) = {kv} > {MAX_BLOCK_KV}")
    return reasons


def query_block(call: AttentionCall) -> int:
    """Queries per work item: :data:`QUERY_BLOCK` where the call hides later keys (causal, or a
    window with a right side) and has more queries than that, else all of them."""
    hides_later = call.causal is not None or (call.window is not None and call.window[1] is not None)
    return QUERY_BLOCK if hides_later and call.Lq > QUERY_BLOCK else max(call.Lq, 1)


def _lengths(given: np.ndarray | None, B: int, L: int) -> np.ndarray:
    if given is not None:
        return np.ascontiguousarray(given, dtype=np.int64)
    full = _full_lengths.get((B, L))
    if full is None:
        if len(_full_lengths) > 256:
            _full_lengths.clear()
        full = _full_lengths[(B, L)] = np.full(B, L, dtype=np.int64)
    return full


def _placeholders(T: np.dtype) -> tuple:
    """Arrays of the right types for options a call does not use (made once per dtype)."""
    d = _dummies.get(T)
    if d is None:
        d = _dummies[T] = (
            np.zeros(1, dtype=T),  # bias
            np.zeros(4, dtype=np.int64),  # strides
            np.zeros((1, 1), dtype=T),  # slopes
            np.zeros(1, dtype=np.uint8),  # mask
            np.zeros((1, 1), dtype=np.int64),  # segment ids
        )
    return d


_CAUSAL_CODE = {None: 0, "bottom_right": 1, "top_left": 2}
_kernels = None


def _kernel_module():
    """The compiled kernels, imported on first use (``import dotattn`` compiles nothing)."""
    global _kernels
    if _kernels is None:
        from ._cpu_isa import f32_gemm

        f32_gemm()  # binds the sgemm (and MKL thread pin) the kernels link, before they load
        from . import _cpu_small_kernels

        _kernels = _cpu_small_kernels
    return _kernels


# Per-thread scratch for contiguous copies of strided inputs (a "blhd" layout, a transposed
# view): q, k and v of one call.  Fresh arrays of that size cost more in page faults and
# unmapping than the copy itself (measured: a B32 H12 L20 D32 "blhd" call spent 1.8 ms on
# its three 1 MB copies in fresh memory, 0.2 ms in reused memory).  Bounded per thread.
_SCRATCH_MAX_BYTES = 64 << 20
_scratch = threading.local()


def _contiguous(x: np.ndarray, dtype: np.dtype, slot: int) -> np.ndarray:
    """``x`` itself when the kernel can read it, else a C-contiguous copy in ``dtype``.

    The copy lives in this thread's scratch ``slot`` (0, 1, 2 for q, k, v), reused by the
    next call: these copies are internal, never returned.
    """
    if x.dtype == dtype and x.flags.c_contiguous and x.flags.writeable:
        return x
    nbytes = x.size * dtype.itemsize
    if nbytes > _SCRATCH_MAX_BYTES:
        return np.array(x, dtype=dtype, order="C", copy=True)
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = [None, None, None]
    buf = buffers[slot]
    if buf is None or buf.dtype != dtype or buf.size < x.size:
        buf = buffers[slot] = np.empty(max(x.size, 1), dtype=dtype)
    dst = buf[: x.size].reshape(x.shape)
    np.copyto(dst, x, casting="unsafe")
    return dst


def forward(call: AttentionCall, *, threads: int | None = None):
    """``(out (B, Hq, Lq, Dv), lse (B, Hq, Lq))`` in the compute dtype, or None for a call that
    meets a non-finite score or output: the NaN policy (``docs/semantics.md``) is the general
    kernels' job, so such calls rerun there.  The kernel notices them itself (a NaN/+inf row
    maximum, a non-finite output element), which costs nothing where every value is finite —
    unlike scanning q, k and v before the call.

    ``threads``: None = the size rule (:data:`PARALLEL_MIN_WORK`) on Numba's thread count; 1
    forces the caller's thread, more forces that many chunks whatever the size (tests use both).
    """
    return SmallForward(call)(call, threads=threads)


class SmallForward:
    """The kernel's set-up for one kind of call, made once and reused by every call of that kind.

    What depends only on shapes, dtype and option values — the row folding, result shapes,
    placeholder arrays, the scalar arguments, whether to split the work and to limit BLAS —
    is worked out here; a call then does only what depends on its arrays.  A repeated
    ``attention()`` call reuses one through its plan (``dotattn.dispatch``), so a decode step
    pays for this set-up once.  Calls with array options (bias, mask, ALiBi, segment ids) or
    dropout get those arguments made per call from the call itself.
    """

    __slots__ = ("T", "q_rows", "out_shape", "lse_shape", "out_final", "lse_final", "B", "Lq", "Lk", "group",
                 "query_block", "items", "parallel", "blas_limit", "options")

    def __init__(self, call: AttentionCall):
        T = self.T = call.compute_dtype
        B, Hq, Lq, D = call.q.shape
        Hkv, Lk = call.k.shape[1], call.k.shape[2]
        Dv = call.v.shape[3]
        group = self.group = Hq // Hkv
        R = group * Lq
        self.B, self.Lq, self.Lk = B, Lq, Lk
        # (B, Hq, Lq, D) → (B, Hkv, R, D): a group's query heads are consecutive rows (a view)
        self.q_rows = (B, Hkv, R, D)
        self.out_shape, self.lse_shape = (B, Hkv, R, Dv), (B, Hkv, R)
        self.out_final, self.lse_final = (B, Hq, Lq, Dv), (B, Hq, Lq)
        # (a call that hides no later key reads every key from every row: one block)
        self.query_block = query_block(call)
        self.items = B * Hkv * -(-Lq // self.query_block)
        self.parallel = self.items > 1 and B * Hq * Lq * Lk * (D + Dv) + self.items * ITEM_WORK >= PARALLEL_MIN_WORK
        # Small GEMMs never wake BLAS threads; bigger ones would (even in a serial run, where on
        # a loaded machine waiting for descheduled BLAS threads cost 40× — measured).
        self.blas_limit = Lk * R * max(D, Dv) > _BLAS_SINGLE_THREAD_MNK
        array_options = (
            call.bias is not None or call.mask is not None or call.alibi_slopes is not None
            or call.q_segment_ids is not None or call.dropout_p > 0.0
        )
        self.options = None if array_options else self._options(call)

    def _options(self, call: AttentionCall) -> tuple:
        """The kernel's arguments from ``scale`` to ``dropout_key``, in its order."""
        T = self.T
        bias, strides, slopes, mask, q_seg = _placeholders(T)
        bstr = mstr = strides
        kv_seg = q_seg
        if call.bias is not None:
            bias, bstr = flat_pairwise(call.bias, T)  # the general kernels' compact broadcast form
        if call.mask is not None:
            mask, mstr = flat_pairwise(call.mask, np.uint8)
        if call.alibi_slopes is not None:
            slopes = np.ascontiguousarray(call.alibi_slopes, dtype=T)
        if call.q_segment_ids is not None:
            q_seg = np.ascontiguousarray(call.q_segment_ids, dtype=np.int64)
            kv_seg = np.ascontiguousarray(call.kv_segment_ids, dtype=np.int64)
        left = right = -1
        if call.window is not None:
            left = -1 if call.window[0] is None else int(call.window[0])
            right = -1 if call.window[1] is None else int(call.window[1])
        dropout_p = float(call.dropout_p)
        return (
            float(call.scale),
            0.0 if call.softcap is None else float(call.softcap),
            bias,
            bstr,
            call.bias is not None,
            slopes,
            call.alibi_slopes is not None,
            mask,
            mstr,
            call.mask is not None,
            _CAUSAL_CODE[call.causal],
            left,
            right,
            q_seg,
            kv_seg,
            call.q_segment_ids is not None,
            dropout_p,
            np.uint64(seed_key(call.seed)) if dropout_p > 0.0 else _NO_KEY,
        )

    def __call__(self, call: AttentionCall, threads: int | None = None):
        """:func:`forward` of ``call``, a call of the kind this set-up was made for."""
        kernels = _kernels or _kernel_module()
        nchunks = 1
        if threads is None:
            if self.parallel:
                nchunks = min(num_threads(), self.items)
        elif threads > 1:
            nchunks = min(threads, self.items)
        team = nchunks > 1 and in_numba_team()
        partners = nchunks > 1 and not team and USE_PARTNERS and nchunks == cores()
        if partners:
            wake_partners(nchunks - 1)  # a parked partner wakes while the Python below runs
        T = self.T
        q = _contiguous(call.q, T, 0).reshape(self.q_rows)
        k = _contiguous(call.k, T, 1)
        v = _contiguous(call.v, T, 2)
        out = np.empty(self.out_shape, dtype=T)
        lse = np.empty(self.lse_shape, dtype=T)
        status = np.zeros(nchunks, dtype=np.int64)  # chunk c sets status[c] on a non-finite value
        args = (
            (q, k, v, out, lse, self.group, self.Lq, self.query_block,
             _lengths(call.q_lengths, self.B, self.Lq), _lengths(call.kv_lengths, self.B, self.Lk))
            + (self.options or self._options(call))
            + (status, np.zeros(1, dtype=np.int64))  # the items' shared queue (its next index)
        )
        if self.blas_limit:
            with ONE_BLAS_THREAD:
                _run(kernels, args, nchunks, partners, team)
        else:
            _run(kernels, args, nchunks, partners, team)
        if status[0] if nchunks == 1 else status.any():
            return None
        return out.reshape(self.out_final), lse.reshape(self.lse_final)


def _run(kernels, args: tuple, nchunks: int, partners: bool, team: bool) -> None:
    """The call's chunks: on Numba's team where ``team`` (``_launch.on_numba_team``), on the
    caller and the spinning partners where ``partners`` (and no other call holds them), else
    on ``run_chunks``'s pool (or the caller alone, one chunk)."""
    if team:
        kernels.forward_team(args, nchunks)
        return
    if partners and on_partners(nchunks - 1, kernels.forward_caller, (args, nchunks), kernels.forward_partner, (args, nchunks)):
        return
    run_chunks(kernels.forward_chunk, args, nchunks)


def precompile_partner_entries() -> None:
    """Load or compile the parallel entries (:func:`_cpu_small_kernels.forward_caller`,
    ``forward_partner``, ``forward_team``) for every signature the kernel has so far
    (``dotattn precompile``, after its small forward calls): a parallel call's first launch
    then compiles nothing."""
    from numba import types

    kernels = _kernel_module()
    flags = types.Array(types.int64, 1, "C")
    for sig in list(kernels.forward_chunk.signatures):
        args = types.Tuple(sig[:-2])  # (forward_chunk's arguments before chunk, nchunks)
        kernels.forward_caller.compile((flags, types.int64, types.int64, types.int64, args, types.int64))
        kernels.forward_partner.compile((flags, types.int64, types.int64, args, types.int64))
        kernels.forward_team.compile((args, types.int64))
