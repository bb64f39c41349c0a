"""Split-KV decoding in NumPy — the readable twin of :mod:`dotattn.kernels.cpu_decode`.

Flash decoding (Dao, Haziza, Massa & Sizov, 2023): with few query rows there is too little
work per (sequence, head) to keep the cores busy, so each sequence's keys are split into
chunks of :data:`dotattn.decode_semantics.SPLIT_SIZE` positions; each chunk gives a partial output
and its log-sum-exp, and the parts are merged exactly by
:func:`dotattn.merge_attention_states`'s merge (``kernels/_merge.py``).  Chunk boundaries are fixed positions
(``[c·S, (c+1)·S)``), so a sequence is computed the same way in any batch and any cache.

GQA: the query heads of one K/V head are folded into the rows, ``(Hkv, G·Lq, D)``, so each
K/V row is read once for all of them.  Only positions below ``cache_lengths[b] + Lnew`` are
read — unused slots and pages may hold anything.

``reference=True`` instead gathers each sequence's visible keys and runs the float64
reference backend of ``attention()`` on them with ``kv_lengths``: the test oracle.
"""

from __future__ import annotations

import numpy as np

from ..decode_semantics import SPLIT_SIZE, DecodeCall, decode_in_row_blocks, query_positions, rotated_q, write_new
from ._ieee import quiet
from ._merge import merge_numpy
from .numpy_tiled import live_matmul


def gather(call: DecodeCall, b: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Keys and values of positions ``[0, n)`` of sequence ``b``: ``(Hkv, n, D)``, ``(Hkv, n, Dv)``."""
    idx = np.arange(n)
    pages = call.block_table[b, idx // call.page_size]
    slots = idx % call.page_size
    # advanced indices around a slice: (n, Hkv, X)
    return call.k_pages[pages, :, slots].swapaxes(0, 1), call.v_pages[pages, :, slots].swapaxes(0, 1)


def _key_range(call: DecodeCall, n: int, pos: np.ndarray) -> tuple[int, int]:
    """Keys ``[lo, hi)`` that some query row (positions ``pos``) of the sequence can see."""
    lo, hi = 0, n
    if pos.size == 0:
        return 0, 0
    if call.causal:
        hi = min(hi, int(pos.max()) + 1)
    if call.window is not None:
        left, right = call.window
        if left is not None:
            lo = max(lo, int(pos.min()) - left)
        if right is not None:
            hi = min(hi, int(pos.max()) + right + 1)
    return lo, hi


class _Scratch:
    """The buffers every chunk of one call fills in turn: its keys and values in the compute
    dtype, their finiteness, its scores and its weights.

    Fresh per-chunk temporaries (a few MiB of keys and values for a 256-key chunk of 8×128
    heads) cost a page fault per 4 KiB: glibc hands big freed blocks back to the OS (in the
    main thread's heap; a worker thread's arena less often), so each chunk faulted its pages in
    anew — a 32k-token float16 cache (Hq 32, Hkv 8, D 128) took 77k faults and 391 ms a call in
    the main thread, 270 ms in a worker thread; with these buffers, 179 ms in either.
    A chunk of ``n`` keys takes views of the first ``n`` rows (or ``Hkv·R·n`` scores): C-contiguous
    arrays of the shapes and strides the fresh ones had, so the same BLAS calls and ufunc loops
    run and give the same bits.
    """

    def __init__(self, call: DecodeCall, rows: int):
        dt, Hkv = call.compute_dtype, call.Hkv
        self.k = np.empty((SPLIT_SIZE, Hkv, call.D), dtype=dt)  # (n, Hkv, D) as a gather gives them
        self.v = np.empty((SPLIT_SIZE, Hkv, call.Dv), dtype=dt)
        self.v_finite = np.empty(self.v.shape, dtype=bool)
        self.shape = (Hkv, rows)
        self._s = np.empty(Hkv * rows * SPLIT_SIZE, dtype=dt)  # flat: a C-contiguous (Hkv, R, n) for any n
        self._p = np.empty_like(self._s)

    def scores(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores and weights of ``n`` keys: two C-contiguous ``(Hkv, R, n)`` views."""
        size = self.shape[0] * self.shape[1] * n
        return self._s[:size].reshape(*self.shape, n), self._p[:size].reshape(*self.shape, n)


def _read_chunk(call: DecodeCall, b: int, j0: int, j1: int, scratch: _Scratch) -> None:
    """Keys and values of positions ``[j0, j1)`` of sequence ``b`` into ``scratch.k[:n]``,
    ``scratch.v[:n]`` (``(n, Hkv, X)``), converted to the compute dtype on assignment."""
    n, ps = j1 - j0, call.page_size
    if ps < 8:  # tiny pages: one gather (a temporary in the cache dtype) beats a loop over them
        # (a float32 chunk of 8×128 heads: 0.11 ms gathered, 0.54 ms a slot at a time; even at 8)
        idx = np.arange(j0, j1)
        pages, slots = call.block_table[b, idx // ps], idx % ps
        scratch.k[:n] = call.k_pages[pages, :, slots]  # advanced indices around a slice: (n, Hkv, D)
        scratch.v[:n] = call.v_pages[pages, :, slots]
        return
    for page in range(j0 // ps, (j1 - 1) // ps + 1):  # a slice of each page the chunk spans
        a, e = max(j0, page * ps), min(j1, (page + 1) * ps)
        physical = call.block_table[b, page]
        scratch.k[a - j0 : e - j0] = call.k_pages[physical, :, a - page * ps : e - page * ps].swapaxes(0, 1)
        scratch.v[a - j0 : e - j0] = call.v_pages[physical, :, a - page * ps : e - page * ps].swapaxes(0, 1)


def _chunk(call: DecodeCall, qg, b, row_pos, heads, j0, j1, scratch: _Scratch):
    """Partial ``(out (Hkv, R, Dv), lse (Hkv, R))`` of keys ``[j0, j1)`` for the folded rows."""
    dt = call.compute_dtype
    n = j1 - j0
    _read_chunk(call, b, j0, j1, scratch)
    k = scratch.k[:n].transpose(1, 2, 0)  # (Hkv, D, n)
    v = scratch.v[:n].swapaxes(0, 1)  # (Hkv, n, Dv)
    s, p = scratch.scores(n)  # (Hkv, R, n) each
    np.matmul(qg, k, out=s)  # q pre-scaled
    if call.softcap is not None:  # s = softcap · tanh(s / softcap)
        np.divide(s, call.softcap, out=s)
        np.tanh(s, out=s)
        np.multiply(call.softcap, s, out=s)
    idx = np.arange(j0, j1)
    dist = row_pos[:, None] - idx[None, :]  # (R, n): query position − key position
    if call.alibi_slopes is not None:
        np.multiply(call.alibi_slopes[b][heads][..., None], np.abs(dist).astype(dt), out=p)  # p: a scratch here
        s -= p
    visible = np.ones(dist.shape, dtype=bool)
    if call.causal:
        visible &= dist >= 0
    if call.window is not None:
        left, right = call.window
        if left is not None:
            visible &= dist <= left
        if right is not None:
            visible &= dist >= -right
    np.copyto(s, -np.inf, where=~visible)  # hidden keys score −inf
    m = s.max(axis=-1)
    m_safe = np.where(np.isneginf(m), 0, m).astype(dt)
    np.subtract(s, m_safe[..., None], out=p)
    np.exp(p, out=p)  # p = exp(s − m)
    total = p.sum(axis=-1)
    if np.isfinite(scratch.v[:n], out=scratch.v_finite[:n]).all():
        pv = p @ v
    else:
        # the pairs that take part — visible keys whose score is not −inf — and no other: a
        # hidden key's NaN/±inf value never reaches the row (not even as 0·NaN), while a
        # live key's weight is positive however it rounds (an underflowed p still carries a
        # ±inf or NaN value: docs/semantics.md, non-finite inputs)
        live = s != -np.inf
        pv = np.stack([live_matmul(p[h], live[h], v[h], False, positive=live[h]) for h in range(p.shape[0])])
    with np.errstate(divide="ignore", invalid="ignore"):
        # total == 0: no visible key (0, −inf); a NaN total (NaN score) stays NaN
        out = np.where(total[..., None] == 0, 0, pv / total[..., None]).astype(dt)
        # the LSE in float64 whatever dt (the cpu kernel's too): m + log l rounded to float32 is
        # ≈ ulp(m) off — 1e-3 at m ≈ 1e4, a merge weight 5e-5 off where the scores were exact
        lse = np.where(total == 0, -np.inf, m_safe.astype(np.float64) + np.log(total.astype(np.float64)))
    return out, lse


def _split_kv(call: DecodeCall, q: np.ndarray):
    dt = call.compute_dtype
    B, Hq, Lq, Dv, Hkv, G = call.B, call.Hq, call.Lq, call.Dv, call.Hkv, call.group
    out = np.zeros((B, Hq, Lq, Dv), dtype=dt)
    lse = np.full((B, Hq, Lq), -np.inf, dtype=dt)
    q = q * dt.type(call.scale)
    positions = query_positions(call)
    heads = np.arange(Hq).reshape(Hkv, G, 1).repeat(Lq, axis=2).reshape(Hkv, G * Lq)  # query head of each folded row
    scratch = _Scratch(call, G * Lq)
    for b in range(B):
        n = int(call.kv_lengths[b])
        row_pos = np.tile(positions[b], G)  # (R,), row r = g·Lq + i
        lo, hi = _key_range(call, n, positions[b])
        if lo >= hi:
            continue
        qg = q[b].reshape(Hkv, G * Lq, call.D)
        outs, lses = [], []
        for c in range(lo // SPLIT_SIZE, (hi - 1) // SPLIT_SIZE + 1):
            j0, j1 = max(c * SPLIT_SIZE, lo), min((c + 1) * SPLIT_SIZE, hi)
            o, s = _chunk(call, qg, b, row_pos, heads, j0, j1, scratch)
            outs.append(o)
            lses.append(s)
        o, s = merge_numpy(outs, lses, "bhld")  # (Hkv, R, Dv), (Hkv, R)
        out[b] = o.reshape(Hq, Lq, Dv)
        lse[b] = s.reshape(Hq, Lq)
    return out, lse


def _reference(call: DecodeCall, q: np.ndarray):
    """Gather the visible keys and run ``attention()``'s float64 reference with ``kv_lengths``."""
    from .. import semantics
    from . import reference

    n = call.kv_lengths
    Lk = int(n.max(initial=0))
    k = np.zeros((call.B, call.Hkv, Lk, call.D))
    v = np.zeros((call.B, call.Hkv, Lk, call.Dv))
    for b in range(call.B):
        k[b, :, : n[b]], v[b, :, : n[b]] = gather(call, b, int(n[b]))
    ref = semantics.normalize(
        q.astype(np.float64),
        k,
        v,
        kv_lengths=n,
        causal=call.causal,
        window=call.window,
        scale=call.scale,
        softcap=call.softcap,
        alibi_slopes=call.alibi_slopes,
    )
    out, lse = reference.forward(ref)
    return out, lse


@quiet
def decode(call: DecodeCall, reference: bool = False):
    """Append, then ``(out (B, Hq, Lq, Dv), lse (B, Hq, Lq))`` in the compute dtype (float64 for ``reference``)."""
    if not reference:  # many query rows (a chunked prefill): blocks of them, partials bounded
        blocked = decode_in_row_blocks(call, decode)
        if blocked is not None:
            return blocked
    write_new(call)
    q = rotated_q(call)
    if reference:
        return _reference(call, q)
    return _split_kv(call, q)
