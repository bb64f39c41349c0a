"""Tiled online-softmax attention in pure NumPy + BLAS — the always-available backend.

The FlashAttention algorithm (Dao et al. 2022; FlashAttention-2, Dao 2023), built on the
online softmax of Milakov & Gimelshein (2018): queries are processed in blocks of
``BLOCK_Q`` rows; for each, key blocks of ``BLOCK_K`` columns stream past while a running
row max ``m``, row sum ``row_sum`` and output accumulator ``acc`` are rescaled, so no ``Lq × Lk``
matrix ever exists.  Extra memory is O(Lq·D + BLOCK_Q·BLOCK_K) per worker.

Blocks that causal/window/length/segment rules make invisible are never computed; blocks
that are fully visible skip the per-element mask.  Work items (sequence, head, query block)
run on a thread pool, one per core, with BLAS held to one thread so the cores do not fight.

The backward pass (FlashAttention-2) recomputes each block's probabilities from the saved
LSE, ``P = exp(S − lse)``, with ``D_i = rowsum(dO ∘ O)``:
``dV += Pᵀ dO``, ``dS = P ∘ (dP − D_i)``, ``dQ += dS K · scale``, ``dK += dSᵀ Q · scale``.

This module is also the readable twin of the Numba ``cpu`` backend.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import _launch
from ._blas import ONE_BLAS_THREAD
from ._ieee import quiet
from ..semantics import AttentionCall
from .dropout import keep_block_of

NAME = "numpy"
BLOCK_Q = 256
BLOCK_K = 512
# Below this many multiply-adds a call runs in the caller's thread: thread hand-off and
# BLAS-limit toggling cost more than they save on tiny problems (e.g. a 20-token sentence).
PARALLEL_MIN_WORK = 1 << 22

SKIP, FULL, PARTIAL = 0, 1, 2

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def run_parallel(tasks, fn) -> None:
    """Run ``fn(task)`` for every task on the pool, BLAS limited to one thread meanwhile."""
    global _pool
    fn = quiet(fn)  # NumPy's error state is per thread: each task sets it
    if len(tasks) <= 1 or _workers() == 1:
        for t in tasks:
            fn(t)
        return
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=_workers(), thread_name_prefix="dotattn")
    # The process-wide counted limit (dotattn.kernels._blas): shared with the cpu backend, so calls of
    # both from several threads never leave the user's BLAS on one thread.
    with ONE_BLAS_THREAD:
        parts, futures = _launch.Tasks(), []
        try:
            for t in tasks:
                futures.append(parts.submit(_pool, fn, t))
            for future in futures:
                future.result()  # re-raises a worker's exception here
        except BaseException:
            # Stopped (a task's error; Ctrl-C in the wait): the unstarted tasks never run and the
            # running ones end, still under the limit, before the exception goes on — they wrote
            # the call's arrays, BLAS on the user's count, after it had raised (and the queued
            # ones started after it).  Their own errors are dropped: this one wins.
            parts.stop(futures)
            raise


def all_finite(x: np.ndarray) -> bool:
    """No NaN/±inf in ``x``: one vectorized sum (NaN and inf propagate), exact check if it overflows."""
    if x.size == 0:
        return True
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(np.sum(x)):
            return True
    return bool(np.isfinite(x).all())


def _real_part(x: np.ndarray, call: AttentionCall, lengths):
    """The parts of ``x (B, H, L, X)`` inside the lengths (padding may hold anything)."""
    if lengths is None:
        return [x]
    return [x[b, :, : int(lengths[b])] for b in range(call.B)]


def live_matmul(a: np.ndarray, live: np.ndarray, b: np.ndarray, b_finite: bool, positive=None) -> np.ndarray:
    """``a @ b`` summing only the pairs ``live`` marks: a hidden pair's coefficient 0 never meets
    a NaN/±inf of ``b`` (IEEE's 0·NaN = NaN would leak it, docs/semantics.md).

    ``a`` must be 0 where ``live`` is False.  With a finite ``b`` this is one BLAS product;
    otherwise the finite part goes through BLAS and the non-finite entries of ``b`` are added
    as IEEE would over the live pairs: NaN if a live pair meets NaN (or 0·inf, or both
    infinities), else ±inf with the sign of ``a``'s coefficient.  ``positive`` marks the pairs
    whose exact coefficient is > 0 (softmax weights of visible, kept keys): a 0 there is an
    underflow, and ±inf times it stays ±inf — rounding does not turn the answer into NaN.
    """
    if b_finite:
        return a @ b
    fin = np.isfinite(b)
    if fin.all():
        return a @ b
    out = a @ np.where(fin, b, 0)
    dt = out.dtype
    live_f = live.astype(dt)
    if positive is None:
        pos, neg, zero = (live & (a > 0)).astype(dt), (live & (a < 0)).astype(dt), (live & (a == 0)).astype(dt)
    else:  # probabilities: never negative; a 0 is exact only off ``positive`` (a dropped key)
        pos, neg, zero = (live & positive).astype(dt), np.zeros_like(out, shape=a.shape), (live & ~positive).astype(dt)
    b_nan, b_pinf, b_ninf = np.isnan(b).astype(dt), (b == np.inf).astype(dt), (b == -np.inf).astype(dt)
    nan = (live_f @ b_nan > 0) | (zero @ (b_pinf + b_ninf) > 0)
    up = pos @ b_pinf + neg @ b_ninf > 0
    down = pos @ b_ninf + neg @ b_pinf > 0
    with np.errstate(invalid="ignore"):
        out = out + np.where(up, dt.type(np.inf), dt.type(0)) - np.where(down, dt.type(np.inf), dt.type(0))
    out[nan] = np.nan
    return out


def _compact(x: np.ndarray) -> np.ndarray:
    """A broadcast view's own data (zero-stride axes read once)."""
    return x[tuple(slice(0, 1) if st == 0 else slice(None) for st in x.strides)]


class Prepared:
    """Per-call data shared by the blocks: contiguous compute-dtype inputs, pre-scaled q."""

    def __init__(self, call: AttentionCall):
        self.call = call
        dt = call.compute_dtype
        # q is multiplied by the scale once: (scale·q)·kᵀ is the score, one pass over Lq·D.
        self.q = np.ascontiguousarray(call.q, dtype=dt) * dt.type(call.scale)
        self.k = np.ascontiguousarray(call.k, dtype=dt)
        self.v = np.ascontiguousarray(call.v, dtype=dt)
        self.q_raw = None  # unscaled q, only the backward needs it (dK = dSᵀ Q · scale)
        # Non-finite inputs (docs/semantics.md) take the pair-by-pair products of live_matmul;
        # finite ones (the usual case) plain BLAS.  Padding is never read, so it is not checked.
        self.v_finite = all(all_finite(x) for x in _real_part(self.v, call, call.kv_lengths))
        self.k_finite = all(all_finite(x) for x in _real_part(self.k, call, call.kv_lengths))
        # A −inf bias entry hides its key as a mask does, even where the score is NaN or +inf.
        self.bias_hides = call.bias is not None and bool(np.isneginf(_compact(call.bias)).any())

    def query_bounds(self, b: int, i0: int, i1: int) -> tuple[int, int]:
        """Key range [lo, hi) that can be visible to query rows [i0, i1) of sequence ``b``."""
        call = self.call
        off = call.q_offset(b)
        lo, hi = 0, call.kv_len(b)
        if call.causal == "bottom_right":
            hi = min(hi, i1 - 1 + off + 1)
        elif call.causal == "top_left":
            hi = min(hi, i1 + call.top_left_offset)
        if call.window is not None:
            left, right = call.window
            if left is not None:
                lo = max(lo, i0 + off - left)
            if right is not None:
                hi = min(hi, i1 - 1 + off + right + 1)
        return lo, hi

    def key_bounds(self, b: int, j0: int, j1: int) -> tuple[int, int]:
        """Query range [lo, hi) that can see any key of [j0, j1) in sequence ``b``."""
        call = self.call
        off = call.q_offset(b)
        lo, hi = 0, call.q_len(b)
        if call.causal == "bottom_right":
            lo = max(lo, j0 - off)
        elif call.causal == "top_left":
            lo = max(lo, j0 - call.top_left_offset)
        if call.window is not None:
            left, right = call.window
            if left is not None:
                hi = min(hi, j1 - 1 + left - off + 1)
            if right is not None:
                lo = max(lo, j0 - off - right)
        return lo, hi

    def status(self, b: int, h: int, i0: int, i1: int, j0: int, j1: int) -> int:
        """SKIP, FULL or PARTIAL for the block rows [i0, i1) × keys [j0, j1) (inside the lengths)."""
        call = self.call
        full = True
        off = call.q_offset(b)
        if call.causal is not None:
            o = off if call.causal == "bottom_right" else call.top_left_offset
            if j0 > i1 - 1 + o:
                return SKIP
            full &= j1 - 1 <= i0 + o
        if call.window is not None:
            left, right = call.window
            if left is not None:
                if j1 - 1 < i0 + off - left:
                    return SKIP
                full &= j0 >= i1 - 1 + off - left
            if right is not None:
                if j0 > i1 - 1 + off + right:
                    return SKIP
                full &= j1 - 1 <= i0 + off + right
        if call.q_segment_ids is not None:
            qs = call.q_segment_ids[b, i0:i1]
            ks = call.kv_segment_ids[b, j0:j1]
            q_lo, q_hi, k_lo, k_hi = qs.min(), qs.max(), ks.min(), ks.max()
            if q_hi < k_lo or k_hi < q_lo or not np.isin(ks, qs).any():
                return SKIP
            full &= q_lo == q_hi == k_lo == k_hi
        if call.mask is not None:
            m = call.mask[b, h, i0:i1, j0:j1]
            if not m.any():
                return SKIP
            full &= bool(m.all())
        return FULL if full else PARTIAL

    def scores(self, b: int, h: int, i0: int, i1: int, j0: int, j1: int, status: int):
        """Scores of a block in the compute dtype, −inf where invisible, and tanh(s/c) if softcapped."""
        call = self.call
        s = self.q[b, h, i0:i1] @ self.k[b, h // call.group, j0:j1].T
        tanh = None
        if call.softcap is not None:
            tanh = np.tanh(s / call.softcap)
            s = call.softcap * tanh
        if call.bias is not None:
            s += call.bias[b, h, i0:i1, j0:j1]
        if call.alibi_slopes is not None:
            pos_q = np.arange(i0, i1) + call.q_offset(b)
            s -= call.alibi_slopes[b, h] * np.abs(pos_q[:, None] - np.arange(j0, j1)[None, :])
        if self.bias_hides:
            s[call.bias[b, h, i0:i1, j0:j1] == -np.inf] = -np.inf
        if status == PARTIAL:
            s[~call.visible(b, h, np.arange(i0, i1), np.arange(j0, j1))] = -np.inf
        return s, tanh

    def dropout_scale(self, b: int, h: int, i0: int, i1: int, j0: int, j1: int):
        call = self.call
        keep = keep_block_of(call, b, h, np.arange(i0, i1), np.arange(j0, j1))
        return keep.astype(call.compute_dtype) * call.compute_dtype.type(1.0 / (1.0 - call.dropout_p))


def prepare(call: AttentionCall) -> Prepared:
    """Per-call preparation; ``block_scores`` users (attention maps) call it once."""
    return Prepared(call)


def block_scores(prep: Prepared, b: int, h: int, i0: int, i1: int, j0: int, j1: int) -> np.ndarray:
    """Masked scores of rows [i0, i1) × keys [j0, j1) of (sequence b, head h); −inf where invisible.

    Any indices are accepted: rows and keys outside the real lengths come back −inf.
    """
    call = prep.call
    s = np.full((i1 - i0, j1 - j0), -np.inf, dtype=call.compute_dtype)
    n_q, n_k = call.q_len(b), call.kv_len(b)
    i1c, j1c = min(i1, n_q), min(j1, n_k)
    if i0 >= i1c or j0 >= j1c:
        return s
    st = prep.status(b, h, i0, i1c, j0, j1c)
    if st != SKIP:
        s[: i1c - i0, : j1c - j0] = prep.scores(b, h, i0, i1c, j0, j1c, st)[0]
    return s


def _forward_block_row(prep: Prepared, out: np.ndarray, lse: np.ndarray, b: int, h: int, i0: int, i1: int) -> None:
    """Online softmax over the visible key blocks for query rows [i0, i1) of (b, h)."""
    call = prep.call
    dt = call.compute_dtype
    v = prep.v[b, h // call.group]
    lo, hi = prep.query_bounds(b, i0, i1)
    n = i1 - i0
    m = np.full(n, -np.inf, dtype=dt)  # running row max
    row_sum = np.zeros(n, dtype=dt)  # running row sum of exp(s − m)
    acc = np.zeros((n, call.Dv), dtype=dt)  # running Σ exp(s − m) · v
    for j0 in range(lo, hi, BLOCK_K):
        j1 = min(j0 + BLOCK_K, hi)
        st = prep.status(b, h, i0, i1, j0, j1)
        if st == SKIP:
            continue
        s, _ = prep.scores(b, h, i0, i1, j0, j1, st)
        live = None if prep.v_finite else s != -np.inf  # pairs that take part (non-finite v only)
        # update running max (NaN propagates); rows that have seen no visible key yet keep m = −inf
        m_new = np.maximum(m, s.max(axis=1))
        m_safe = np.where(m_new == -np.inf, dt.type(0), m_new)
        p = s  # in place: the block's buffer becomes exp(s − m), saving an allocation per block
        np.subtract(s, m_safe[:, None], out=p)
        np.exp(p, out=p)
        alpha = np.exp(m - m_safe)  # rescale factor of the old sums (0 when m was −inf)
        row_sum *= alpha
        row_sum += p.sum(axis=1)
        positive = live
        if call.dropout_p > 0.0:
            keep = prep.dropout_scale(b, h, i0, i1, j0, j1)
            p *= keep  # the sum above stays pre-dropout
            positive = None if live is None else live & (keep > 0)
        if prep.v_finite:
            acc *= alpha[:, None]
        else:  # ±inf already summed stays ±inf when alpha underflows to 0 (inf·0 would be NaN)
            acc[:] = np.where(np.isinf(acc), acc, acc * alpha[:, None])
        acc += live_matmul(p, live, v[j0:j1], prep.v_finite, positive)
        m = m_new
    # rows that saw a key; a NaN max (NaN or +inf score) gives NaN through row_sum (IEEE)
    seen = m != -np.inf
    with np.errstate(divide="ignore", invalid="ignore"):
        out[b, h, i0:i1] = np.where(seen[:, None], acc / row_sum[:, None], dt.type(0))
        lse[b, h, i0:i1] = np.where(seen, m + np.log(row_sum), -np.inf)


@quiet
def forward(call: AttentionCall) -> tuple[np.ndarray, np.ndarray]:
    """(out (B, Hq, Lq, Dv), lse (B, Hq, Lq)) in the compute dtype."""
    prep = prepare(call)
    dt = call.compute_dtype
    out = np.zeros((call.B, call.Hq, call.Lq, call.Dv), dtype=dt)
    lse = np.full((call.B, call.Hq, call.Lq), -np.inf, dtype=dt)
    tasks = [
        (b, h, i0, min(i0 + BLOCK_Q, call.q_len(b)))
        for b in range(call.B)
        for h in range(call.Hq)
        for i0 in range(0, call.q_len(b), BLOCK_Q)
    ]
    # Longest first (e.g. the last query blocks under causal) so the pool ends evenly loaded.
    tasks.sort(key=lambda t: -np.subtract(*prep.query_bounds(t[0], t[2], t[3])[::-1]))
    work = call.B * call.Hq * call.Lq * call.Lk * (call.D + call.Dv)
    run = run_parallel if work >= PARALLEL_MIN_WORK else _run_serial
    run(tasks, lambda t: _forward_block_row(prep, out, lse, *t))
    return out, lse


def _run_serial(tasks, fn) -> None:
    for t in tasks:  # (on the caller's thread: forward's and backward's @quiet covers them)
        fn(t)


def _backward_key_chunk(prep, grads, dout, lse, delta, task) -> None:
    """Gradients from key blocks [c0, c1) of (b, h): dK, dV of those keys and a partial dQ."""
    call = prep.call
    b, h, c0, c1, part = task
    dq_part, dk_full, dv_full, dbias = grads
    hk = h // call.group
    k, v = prep.k[b, hk], prep.v[b, hk]
    q_raw = prep.q_raw[b, h]
    do = dout[b, h]
    # −inf LSE (fully masked rows) would make exp(s − lse) = exp(−inf + inf) = NaN: +inf gives 0.
    # A NaN LSE stays NaN: that row's weights are NaN at the keys it sees (IEEE).
    lse_bh = np.where(lse[b, h] == -np.inf, np.inf, lse[b, h])
    scale = call.compute_dtype.type(call.scale)
    # With any non-finite value about, hidden pairs are zeroed explicitly (0·NaN would leak).
    exact = not prep.all_finite
    for j0 in range(c0, c1, BLOCK_K):
        j1 = min(j0 + BLOCK_K, c1)
        dk_acc = np.zeros((j1 - j0, call.D), dtype=call.compute_dtype)
        dv_acc = np.zeros((j1 - j0, call.Dv), dtype=call.compute_dtype)
        lo, hi = prep.key_bounds(b, j0, j1)
        for i0 in range(lo, hi, BLOCK_Q):
            i1 = min(i0 + BLOCK_Q, hi)
            st = prep.status(b, h, i0, i1, j0, j1)
            if st == SKIP:
                continue
            s, tanh = prep.scores(b, h, i0, i1, j0, j1, st)
            p = np.exp(s - lse_bh[i0:i1, None])
            live = s != -np.inf if exact else None
            if exact:
                p[~live] = 0
            dp = do[i0:i1] @ v[j0:j1].T
            p_kept = p
            positive = live
            if call.dropout_p > 0.0:
                keep_scale = prep.dropout_scale(b, h, i0, i1, j0, j1)
                p_kept = p * keep_scale
                dp *= keep_scale
                positive = None if live is None else live & (keep_scale > 0)
            dv_acc += live_matmul(
                p_kept.T, None if live is None else live.T, do[i0:i1], prep.dout_finite,
                None if positive is None else positive.T,
            )
            ds = p * (dp - delta[b, h, i0:i1, None])  # dS = P ∘ (dP − D_i)
            if exact:
                ds[~live] = 0
            if dbias is not None:
                dbias[b, h, i0:i1, j0:j1] = ds
            if tanh is not None:
                ds *= 1 - tanh * tanh  # d(c·tanh(x/c))/dx
                if exact:
                    ds[~live] = 0
            dq_part[part][b, h, i0:i1] += live_matmul(ds, live, k[j0:j1], prep.k_finite) * scale
            dk_acc += live_matmul(ds.T, None if live is None else live.T, q_raw[i0:i1], prep.q_finite) * scale
        dk_full[b, h, j0:j1] = dk_acc
        dv_full[b, h, j0:j1] = dv_acc


@quiet
def backward(call: AttentionCall, out, lse, dout, want_dbias: bool = False):
    """(dq, dk, dv, dbias | None) in the compute dtype, canonical shapes; dbias is (B, Hq, Lq, Lk)."""
    prep = prepare(call)
    dt = call.compute_dtype
    prep.q_raw = np.ascontiguousarray(call.q, dtype=dt)
    dout = np.ascontiguousarray(dout, dtype=dt)
    out = np.asarray(out, dtype=dt)
    # D_i = rowsum(dO ∘ O), over real rows only (padding rows may hold NaN).
    delta = np.zeros((call.B, call.Hq, call.Lq), dtype=dt)
    for b in range(call.B):
        n_q = call.q_len(b)
        delta[b, :, :n_q] = np.einsum("hld,hld->hl", dout[b, :, :n_q], out[b, :, :n_q])
    prep.q_finite = all(all_finite(x) for x in _real_part(prep.q_raw, call, call.q_lengths))
    prep.dout_finite = all(all_finite(x) for x in _real_part(dout, call, call.q_lengths))
    lse_real = _real_part(np.asarray(lse)[..., None], call, call.q_lengths)
    prep.all_finite = (
        prep.q_finite
        and prep.k_finite
        and prep.v_finite
        and prep.dout_finite
        and all_finite(delta)
        and all(bool(np.all(np.isfinite(x) | (x == -np.inf))) for x in lse_real)
    )  # (a NaN bias entry or ALiBi slope a row sees has made its LSE NaN)
    # Split each head's keys into chunks so that even B·Hq = 1 keeps every core busy;
    # each chunk writes its own partial dQ, summed at the end (no locks, deterministic).
    n_key_blocks = max(1, -(-call.Lk // BLOCK_K))
    n_chunks = min(n_key_blocks, max(1, -(-2 * _workers() // max(1, call.B * call.Hq))))
    chunk_blocks = -(-n_key_blocks // n_chunks)
    tasks = []
    for b in range(call.B):
        n_k = call.kv_len(b)
        for h in range(call.Hq):
            for part, c0 in enumerate(range(0, n_k, chunk_blocks * BLOCK_K)):
                tasks.append((b, h, c0, min(c0 + chunk_blocks * BLOCK_K, n_k), part))
    n_parts = 1 + max((t[4] for t in tasks), default=0)
    dq_part = [np.zeros((call.B, call.Hq, call.Lq, call.D), dtype=dt) for _ in range(n_parts)]
    # dK/dV per query head, summed over each GQA group afterwards (K/V are never repeated).
    dk_full = np.zeros((call.B, call.Hq, call.Lk, call.D), dtype=dt)
    dv_full = np.zeros((call.B, call.Hq, call.Lk, call.Dv), dtype=dt)
    dbias = np.zeros((call.B, call.Hq, call.Lq, call.Lk), dtype=dt) if want_dbias else None
    grads = (dq_part, dk_full, dv_full, dbias)
    work = call.B * call.Hq * call.Lq * call.Lk * (call.D + call.Dv)
    run = run_parallel if work >= PARALLEL_MIN_WORK // 2 else _run_serial
    run(tasks, lambda t: _backward_key_chunk(prep, grads, dout, lse, delta, t))
    dq = dq_part[0]
    for extra in dq_part[1:]:
        dq += extra
    shape_k = (call.B, call.Hkv, call.group, call.Lk)
    dk = dk_full.reshape(shape_k + (call.D,)).sum(axis=2)
    dv = dv_full.reshape(shape_k + (call.Dv,)).sum(axis=2)
    return dq, dk, dv, dbias


@quiet
def weights(call: AttentionCall, lse: np.ndarray) -> np.ndarray:
    """Pre-dropout probabilities (B, Hq, Lq, Lk), block by block from the LSE."""
    prep = prepare(call)
    w = np.zeros((call.B, call.Hq, call.Lq, call.Lk), dtype=call.compute_dtype)
    for b in range(call.B):
        n_q = call.q_len(b)
        for h in range(call.Hq):
            lse_bh = np.where(lse[b, h] == -np.inf, np.inf, lse[b, h])  # NaN stays NaN
            for i0 in range(0, n_q, BLOCK_Q):
                i1 = min(i0 + BLOCK_Q, n_q)
                lo, hi = prep.query_bounds(b, i0, i1)
                for j0 in range(lo, hi, BLOCK_K):
                    j1 = min(j0 + BLOCK_K, hi)
                    st = prep.status(b, h, i0, i1, j0, j1)
                    if st != SKIP:
                        s, _ = prep.scores(b, h, i0, i1, j0, j1, st)
                        # hidden keys get weight 0 also in a NaN row (exp(−inf − NaN) is NaN)
                        w[b, h, i0:i1, j0:j1] = np.where(s == -np.inf, 0, np.exp(s - lse_bh[i0:i1, None]))
    # The float32 LSE carries a relative rounding of ~|lse|·6e-8 into every exp(s − lse); the
    # weights are materialized anyway, so renormalizing each row removes it (rows with no
    # visible key stay 0).
    total = w.sum(axis=-1, keepdims=True)
    np.divide(w, total, out=w, where=total > 0)
    return w


class NumpyTiledBackend:
    """Pure NumPy + BLAS tiles: every option, O(N) memory, threads over blocks."""

    name = NAME
    description = f"tiled online softmax in NumPy+BLAS (blocks {BLOCK_Q}×{BLOCK_K}, {_workers()} threads)"

    def available(self) -> tuple[bool, str]:
        return True, "always available"

    def unsupported_reasons(self, call: AttentionCall) -> list[str]:
        if call.extras:
            return [f"does not take {', '.join(sorted(call.extras))} (the 'cpu' backend does)"]
        return []

    def forward(self, call):
        return forward(call)

    def backward(self, call, out, lse, dout, want_dbias=False):
        return backward(call, out, lse, dout, want_dbias)

    def weights(self, call, lse):
        return weights(call, lse)
