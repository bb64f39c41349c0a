"""Sequence-parallel attention across processes on ``torch.distributed``: ring and Ulysses.

Each rank passes its shard of the sequence axis; the result is this rank's shard of exactly
what the single-process :func:`dotattn.attention` gives on the full sequence — causal,
windows, ALiBi and the dropout mask included (positions and dropout counters are those of
the full sequence, through the semantics module's internal ``BlockGeometry``).

* :func:`ring_attention` — K/V shards travel round the ring (``isend``/``irecv``; NCCL:
  ``batch_isend_irecv``) while the block in hand is computed.  Partial results over key
  blocks merge through :func:`dotattn.merge_attention_states` in float32 (float64 for
  float64), never rounded to the input dtype between steps.  Backward: K/V travel again,
  each shard's dK/dV accumulator travels one step behind it and ends at its owner, dQ stays
  local; probabilities are recomputed from the saved LSE.
* :func:`ulysses_attention` — two all-to-alls: heads scattered, sequence gathered, one local
  attention over the whole sequence for ``H/P`` heads, then back.
* :func:`shard` / :func:`unshard` — between a full sequence and the ranks' shards, for the
  ``"contiguous"`` (rank r holds block r) and ``"zigzag"`` (2P chunks, rank r holds chunks r
  and 2P−1−r: balanced causal work) layouts.  Lengths that do not divide give chunks whose
  sizes differ by at most one.

Messages per rank and call (P ranks, shard of ``n_s`` positions on rank s; K/V shard
``B·Hkv·n_s·(D+Dv)`` elements): forward ``P−1`` K/V hops of two messages each, K then V
(input dtype); backward the same plus ``P`` sends of dK/dV (accumulation dtype) — see
``docs/distributed.md``.
Each call also makes one ``all_gather_object`` of a small description of every rank's
arguments (shapes, options, segment ids), so a rank with bad input makes every rank raise
a clear error instead of leaving the others waiting.

Only this module imports ``torch.distributed``, and only when called.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from . import semantics
from .errors import AttentionTypeError, AttentionValueError, DotAttnError
from .merge import merge_attention_states
from .semantics import BlockGeometry

__all__ = [
    "ring_attention",
    "ulysses_attention",
    "shard",
    "unshard",
    "shard_bounds",
    "ring_message_sizes",
    "DistributedAttentionError",
]

SHARDINGS = ("zigzag", "contiguous")
_TAG_K, _TAG_DKV, _TAG_V = 0, 1, 2


class DistributedAttentionError(DotAttnError, RuntimeError):
    """Another rank failed, disagreed about the call, or a message did not arrive in time."""


# =================================================================================
# sharding (pure: NumPy arrays or torch tensors, no process group needed)
# =================================================================================


def _check_sharding(sharding: Any) -> str:
    if sharding not in SHARDINGS:
        raise AttentionValueError(f"sharding must be 'zigzag' or 'contiguous', got {sharding!r}")
    return sharding


def _check_world(rank: Any, world_size: Any) -> tuple[int, int]:
    for name, x in (("rank", rank), ("world_size", world_size)):
        if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
            raise AttentionTypeError(f"{name} must be an int, got {type(x).__name__}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise AttentionValueError(f"need world_size ≥ 1 and 0 ≤ rank < world_size, got rank={rank}, world_size={world_size}")
    return int(rank), int(world_size)


def shard_bounds(L: int, world_size: int, sharding: str = "zigzag") -> list[list[tuple[int, int]]]:
    """Per rank, the ``[start, stop)`` ranges of the full sequence it holds, in shard order.

    ``"contiguous"``: one range per rank, sizes ``L // P`` or one more (the first ``L % P``
    ranks).  ``"zigzag"``: the sequence cut into ``2P`` chunks the same way; rank r holds
    chunks ``r`` and ``2P − 1 − r``.  Chunks may be empty when ``L < 2P``.
    """
    _check_sharding(sharding)
    _, P = _check_world(0, world_size)
    if isinstance(L, bool) or not isinstance(L, (int, np.integer)):
        raise AttentionTypeError(f"L must be an int (the full sequence's length), got {type(L).__name__}")
    if L < 0:
        raise AttentionValueError(f"L must be ≥ 0 (the full sequence's length), got {L}")
    L = int(L)
    n = P if sharding == "contiguous" else 2 * P
    sizes = [L // n + (1 if c < L % n else 0) for c in range(n)]
    starts = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    chunk = [(int(starts[c]), int(starts[c + 1])) for c in range(n)]
    if sharding == "contiguous":
        return [[chunk[r]] for r in range(P)]
    return [[chunk[r], chunk[2 * P - 1 - r]] for r in range(P)]


def _take(x, dim: int, ranges):
    parts = [x[(slice(None),) * (dim % x.ndim) + (slice(a, b),)] for a, b in ranges]
    if len(parts) == 1:
        return parts[0]
    if isinstance(x, np.ndarray):
        return np.concatenate(parts, axis=dim)
    import torch

    return torch.cat(parts, dim=dim)


def shard(x, rank: int, world_size: int, sharding: str = "zigzag", dim: int = -2):
    """This rank's shard of a full-sequence array ``x`` (sequence on axis ``dim``).

    ``dim=-2`` fits q/k/v in ``"bhld"`` layout; use ``-3`` for ``"blhd"`` and ``-1`` for
    segment ids ``(..., L)``.  NumPy arrays and torch tensors alike.
    """
    rank, world_size = _check_world(rank, world_size)
    L = x.shape[dim]
    return _take(x, dim, shard_bounds(L, world_size, sharding)[rank])


def unshard(shards, sharding: str = "zigzag", dim: int = -2):
    """The full sequence from every rank's shard (a list in rank order, e.g. from ``all_gather``)."""
    if not isinstance(shards, (list, tuple)) or not shards:
        raise AttentionTypeError("shards must be a non-empty list of every rank's shard, in rank order")
    P = len(shards)
    L = sum(s.shape[dim] for s in shards)
    bounds = shard_bounds(L, P, sharding)
    for r, (s, ranges) in enumerate(zip(shards, bounds)):
        want = sum(b - a for a, b in ranges)
        if s.shape[dim] != want:
            raise AttentionValueError(
                f"shards[{r}] has {s.shape[dim]} positions on axis {dim}, but a {sharding} sharding of "
                f"{L} positions over {P} ranks gives rank {r} {want}"
            )
    pieces = []  # (global start, piece)
    for s, ranges in zip(shards, bounds):
        off = 0
        for a, b in ranges:
            pieces.append((a, _take(s, dim, [(off, off + b - a)])))
            off += b - a
    pieces.sort(key=lambda t: t[0])
    return _take_cat([p for _, p in pieces], dim)


def _take_cat(parts, dim):
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts, axis=dim)
    import torch

    return torch.cat(parts, dim=dim)


def ring_message_sizes(lengths, B: int, Hkv: int, D: int, Dv: int, rank: int) -> dict[str, list[int]]:
    """Elements of each point-to-point message ``rank`` sends in one ring call (the docs' formula).

    ``lengths[s]`` is rank s's shard length.  At step ``t`` a rank forwards the K/V shard
    that started at rank ``(rank − t) mod P`` as two messages: K, ``B·Hkv·n·D`` elements
    (tag 0), then V, ``B·Hkv·n·Dv`` (tag 2), in the input dtype.  Forward: steps 0…P−2.
    Backward: the same K/V sends, plus a dK/dV accumulator (``B·Hkv·n·(D+Dv)`` elements, in
    the accumulation dtype, tag 1) after every step 0…P−1.  One rank sends nothing.
    """
    P = len(lengths)
    n = [int(lengths[(rank - t) % P]) for t in range(P)]
    kv = [x for t in range(P - 1) for x in (B * Hkv * n[t] * D, B * Hkv * n[t] * Dv)]
    dkv = [B * Hkv * m * (D + Dv) for m in n] if P > 1 else []  # one rank: nothing travels
    return {"forward": kv, "backward_kv": list(kv), "backward_dkv": dkv}


# =================================================================================
# block planning: which (query chunk, key chunk) pairs to compute, with which masks
# =================================================================================


def _plan_block(qa: tuple[int, int], kc: tuple[int, int], causal: str | None, window):
    """``None`` when no query of ``qa`` sees a key of ``kc`` (by causal/window), else the
    ``(causal, window)`` the block still needs (``None`` for rules every pair satisfies).

    Self-attention on the full sequence: bottom-right and top-left causal coincide, query
    ``i`` at position ``i``.
    """
    (a0, a1), (c0, c1) = qa, kc
    if a1 <= a0 or c1 <= c0:
        return None
    need_causal = causal
    if causal is not None:
        if c0 > a1 - 1:
            return None
        if c1 - 1 <= a0:
            need_causal = None  # every key precedes every query: plain, unmasked block
    need_window = None
    if window is not None:
        left, right = window
        if left is not None and c1 - 1 < a0 - left:
            return None
        if right is not None and c0 > a1 - 1 + right:
            return None
        keep_left = left if left is not None and c0 < a1 - 1 - left else None
        keep_right = right if right is not None and c1 - 1 > a0 + right else None
        if keep_left is not None or keep_right is not None:
            need_window = (keep_left, keep_right)
    return need_causal, need_window


class _Plan:
    """One call's geometry: ranks, shard bounds, options, the base ``AttentionCall``."""

    def __init__(self, base, group, rank, P, lengths, sharding, kv_segment_ids, implementation, global_ranks):
        self.base = base
        self.group = group
        self.rank = rank
        self.P = P
        self.lengths = lengths
        self.L = int(sum(lengths))
        self.sharding = sharding
        self.bounds = shard_bounds(self.L, P, sharding)
        self.kv_segment_ids = kv_segment_ids  # full (B, L) int64 or None
        self.implementation = implementation
        self.global_ranks = global_ranks
        self.next = (rank + 1) % P
        self.prev = (rank - 1) % P

    def local_ranges(self, r: int):
        """``[(global start, global stop, local start)]`` of rank ``r``'s chunks."""
        out, off = [], 0
        for a, b in self.bounds[r]:
            out.append((a, b, off))
            off += b - a
        return out

    def k_slice(self, src: int, kc: int) -> slice:
        """Rank ``src``'s chunk ``kc`` in its shard's local positions."""
        c0, c1, lc = self.local_ranges(src)[kc]
        return slice(lc, lc + c1 - c0)

    def blocks(self, src: int):
        """Calls for this rank's queries × rank ``src``'s keys: ``(q local slice, k chunk index,
        geometry, changes)``."""
        base = self.base
        for a0, a1, la in self.local_ranges(self.rank):
            for kc, (c0, c1, lc) in enumerate(self.local_ranges(src)):
                planned = _plan_block((a0, a1), (c0, c1), base.causal, base.window)
                if planned is None:
                    continue
                causal, window = planned
                geom = BlockGeometry(q_start=a0, k_start=c0, Lq=self.L, Lk=self.L)
                changes = dict(causal=causal, window=window)
                if base.q_segment_ids is not None:
                    changes["q_segment_ids"] = base.q_segment_ids[:, la : la + a1 - a0]
                    changes["kv_segment_ids"] = self.kv_segment_ids[:, c0:c1]
                yield slice(la, la + a1 - a0), kc, geom, changes


# =================================================================================
# point-to-point messages
# =================================================================================


def _dist():
    import torch.distributed as dist

    return dist


def _start(plan: _Plan, sends, recvs):
    """Post non-blocking sends ``(tensor, group rank, tag)`` and receives; return the works."""
    dist = _dist()
    if dist.get_backend(plan.group) == "nccl":  # NCCL needs the pair batched (no deadlock)
        ops = [dist.P2POp(dist.isend, t, group=plan.group, tag=tag, group_peer=p) for t, p, tag in sends]
        ops += [dist.P2POp(dist.irecv, t, group=plan.group, tag=tag, group_peer=p) for t, p, tag in recvs]
        return dist.batch_isend_irecv(ops) if ops else []
    works = [dist.isend(t, group=plan.group, group_dst=p, tag=tag) for t, p, tag in sends]
    works += [dist.irecv(t, group=plan.group, group_src=p, tag=tag) for t, p, tag in recvs]
    return works


def _wait(works, what: str) -> None:
    for w in works:
        try:
            w.wait()
        except RuntimeError as exc:  # gloo/NCCL timeouts and closed connections
            raise DistributedAttentionError(
                f"{what} did not complete: {exc} — another rank probably failed or stopped calling; "
                "its own error names the cause (the process group's timeout bounds this wait)"
            ) from exc


# =================================================================================
# the ring passes (canonical NumPy arrays; torch only for the messages)
# =================================================================================


def _numpy(t, name: str = "tensor"):
    """A torch CPU tensor as NumPy, any dtype torch has (bfloat16 too: Tensor.numpy() refuses it)."""
    from .torch._convert import to_numpy

    return to_numpy(name, t)


def _torch(x: np.ndarray):
    from .torch._convert import from_numpy

    x = np.ascontiguousarray(x)
    return from_numpy(x if x.flags.writeable else x.copy())


def _unpack(buf_np: np.ndarray, B, H, n, D, Dv):
    """A K/V message buffer or a dK/dV accumulator → ``(k, v)`` / ``(dk, dv)`` views,
    ``(B, H, n, D)`` and ``(B, H, n, Dv)`` (the shards' own layout: the accumulator that
    comes home is returned as the gradients as it is)."""
    nk = B * H * n * D
    return buf_np[:nk].reshape(B, H, n, D), buf_np[nk : nk + B * H * n * Dv].reshape(B, H, n, Dv)


def _np_dtype(torch_dtype) -> np.dtype:
    from .torch._convert import numpy_dtype

    return numpy_dtype("ring buffer", torch_dtype)


def _kv_elements(plan: _Plan, s: int) -> int:
    """Elements of rank ``s``'s K/V message (and of its dK/dV accumulator): ``B·Hkv·n_s·(D+Dv)``."""
    base = plan.base
    return base.B * base.Hkv * plan.lengths[s] * (base.D + base.Dv)


class _Buffers:
    """Two message buffers of the largest shard's size, allocated when first needed and used
    in turn: one is computed on (and forwarded) while the next message arrives in the other.

    A step's message is the first ``E`` elements of its buffer (shards may differ in length).
    NumPy allocates them (so ``tracemalloc`` sees them: tests/distributed checks the bound);
    the torch tensors that gloo reads and writes share their memory.
    """

    def __init__(self, elements: int, torch_dtype):
        self.elements = elements
        self.dtype = _np_dtype(torch_dtype)
        self.bufs: list = [None, None]

    def get(self, i: int, n: int) -> np.ndarray:
        """The first ``n`` elements of buffer ``i``."""
        if self.bufs[i] is None:
            self.bufs[i] = np.empty(self.elements, dtype=self.dtype)
        return self.bufs[i][:n]

    def drop(self, i: int) -> None:
        """Buffer ``i`` holds nothing needed any more: free it now, not at the pass's end."""
        self.bufs[i] = None


def _kv_views(plan: _Plan, flat: np.ndarray, s: int):
    """Rank ``s``'s K/V in a message buffer: ``(k, v)`` views, ``(B, Hkv, n_s, D)`` and ``(…, Dv)``."""
    base = plan.base
    return _unpack(flat, base.B, base.Hkv, plan.lengths[s], base.D, base.Dv)


def _kv_messages(k: np.ndarray, v: np.ndarray, peer: int):
    """The K/V hop: two messages, K then V (each its own contiguous array: a rank's own K and
    V go out of the caller's memory, with no packing copy)."""
    return [(_torch(k), peer, _TAG_K), (_torch(v), peer, _TAG_V)]


def _chunks(plan: _Plan, k: np.ndarray, v: np.ndarray, src: int):
    """Rank ``src``'s K/V → ``[(k chunk, v chunk)]`` views, one pair per chunk of ``src``."""
    return [(k[:, :, la : la + b - a], v[:, :, la : la + b - a]) for a, b, la in plan.local_ranges(src)]


def _pack_kv(plan: _Plan, bufs: _Buffers):
    """This rank's K and V as its first messages: the caller's memory when it is contiguous
    (``"bhld"`` shards), else a copy into message buffer 0 (``"blhd"`` gives strided views)."""
    base = plan.base
    if all(x.flags.c_contiguous and x.flags.writeable for x in (base.k, base.v)):
        return base.k, base.v
    k, v = _kv_views(plan, bufs.get(0, _kv_elements(plan, plan.rank)), plan.rank)
    k[...] = base.k
    v[...] = base.v
    return k, v


# A merge of partial outputs runs on tiles of about this many bytes of output: its temporaries
# (the weighted parts, the stacked LSEs) are a tile each, not a query chunk.
_MERGE_TILE_BYTES = 1 << 20


def _merge_into(acc_o: np.ndarray, acc_s: np.ndarray, o: np.ndarray, s: np.ndarray) -> None:
    """``acc ← merge_attention_states([acc, part])`` in place, tile by tile.

    The merge is row-wise and elementwise, so tiles give the whole call's numbers bit for bit;
    only the temporaries shrink (a whole-chunk merge held three more chunk-sized arrays).
    """
    B, H, m, Dv = acc_o.shape
    row_bytes = max(1, Dv * acc_o.itemsize)
    if m * row_bytes >= _MERGE_TILE_BYTES:
        heads, rows = 1, max(1, _MERGE_TILE_BYTES // row_bytes)
    else:
        heads, rows = max(1, _MERGE_TILE_BYTES // max(1, m * row_bytes)), max(m, 1)
    for b in range(B):
        for h0 in range(0, H, heads):
            hs = slice(h0, h0 + heads)
            for r0 in range(0, m, rows):
                rs = slice(r0, r0 + rows)
                mo, ms = merge_attention_states([acc_o[b, hs, rs][None], o[b, hs, rs][None]],
                                                [acc_s[b, hs, rs][None], s[b, hs, rs][None]])
                acc_o[b, hs, rs] = mo[0]
                acc_s[b, hs, rs] = ms[0]


def _owned(g: np.ndarray, dtype) -> np.ndarray:
    """A block gradient we may add into in place (backends return fresh arrays; copy otherwise)."""
    g = g.astype(dtype, copy=False)
    return g if g.flags.writeable else g.copy()


# One block call covers at most about this many bytes of query rows (whole K/V heads at a
# time): the kernels copy their operands and allocate their results per call, so a block's
# temporaries stay a few MiB instead of several query chunks of every head (1 MiB: a head
# of 4096 rows × 64 in float32 per call, ≈ 0.1 s of kernel time on one core).
_BLOCK_CALL_BYTES = 1 << 20


def _head_groups(base, rows: int):
    """``(query heads, K/V heads)`` slices of one block's calls: whole K/V heads with their
    query heads (GQA groups stay together), as many per call as fit :data:`_BLOCK_CALL_BYTES`."""
    g = base.group
    per_kv_head = base.B * g * rows * max(base.D, base.Dv) * base.compute_dtype.itemsize
    n = max(1, _BLOCK_CALL_BYTES // max(1, per_kv_head))
    for j0 in range(0, base.Hkv, n):
        j1 = min(base.Hkv, j0 + n)
        yield slice(j0 * g, j1 * g), slice(j0, j1)


def _block_calls(plan: _Plan, src: int, chunks):
    """This rank's queries × rank ``src``'s keys as kernel calls: ``(q slice, k chunk, query
    heads, K/V heads, call)``.  A head group is a block of the full problem (``h_start``): its
    dropout counters and ALiBi slopes are those of its heads, so the numbers are the same."""
    base = plan.base
    for qs, kc, geom, changes in plan.blocks(src):
        k, v = chunks[kc]
        for hs, hks in _head_groups(base, qs.stop - qs.start):
            ch = dict(changes)
            if base.alibi_slopes is not None:
                ch["alibi_slopes"] = base.alibi_slopes[:, hs]
            g = dataclasses.replace(geom, h_start=hs.start, Hq=base.Hq)
            call = semantics.block_call(base, g, q=base.q[:, hs, qs], k=k[:, hks], v=v[:, hks], **ch)
            yield qs, kc, hs, hks, call


def _ring_forward(plan: _Plan, torch_dtype):
    """``(out, lse)`` of this rank's queries, canonical, accumulation dtype (never rounded).

    Memory (``docs/distributed.md``): the output and LSE accumulators, the K/V message
    buffers (two; one at P = 2), and one block call's temporaries — nothing per step.
    """
    from . import api

    base = plan.base
    B, Hq, n, Dv = base.B, base.Hq, base.Lq, base.Dv
    ct = base.compute_dtype
    acc_out = np.zeros((B, Hq, n, Dv), dtype=ct)
    acc_lse = np.full((B, Hq, n), -np.inf, dtype=ct)
    seen = set()  # (query chunk, heads) with a part already: the first part is copied, not merged
    P = plan.P
    bufs = _Buffers(max(_kv_elements(plan, s) for s in range(P)), torch_dtype)
    k, v = _pack_kv(plan, bufs) if P > 1 else (base.k, base.v)
    for t in range(P):
        src = (plan.rank - t) % P
        works = []
        if t < P - 1:  # the next shard travels while this one is computed
            k_next, v_next = _kv_views(plan, bufs.get((t + 1) % 2, _kv_elements(plan, (src - 1) % P)), (src - 1) % P)
            works = _start(plan, _kv_messages(k, v, plan.next), _kv_messages(k_next, v_next, plan.prev))
        chunks = _chunks(plan, k, v, src)
        for qs, kc, hs, _, call in _block_calls(plan, src, chunks):
            o, s, _ = api.run_forward(call, implementation=plan.implementation)
            o, s = o.astype(ct, copy=False), s.astype(ct, copy=False)
            if (qs.start, hs.start) in seen:
                _merge_into(acc_out[:, hs, qs], acc_lse[:, hs, qs], o, s)
            else:
                seen.add((qs.start, hs.start))
                acc_out[:, hs, qs], acc_lse[:, hs, qs] = o, s
            del o, s, call
        del chunks
        if works:
            _wait(works, f"ring_attention forward: K/V from rank {plan.global_ranks[plan.prev]} (step {t + 1})")
            k, v = k_next, v_next
            if t == P - 2:  # the last step only computes: the buffer just sent is done with
                bufs.drop(t % 2)
        del works
    return acc_out, acc_lse


def _ring_backward(plan: _Plan, out_c, lse_c, dout_c, torch_dtype):
    """``(dq, dk, dv)`` canonical, accumulation dtype.

    Memory: dq, the K/V message buffers (two; one at P = 2), two dK/dV accumulators (the one
    in flight to the next rank and the one arriving from the previous), the parts of this
    step's dK/dV finished before the arriving one is awaited, and one block call's temporaries.  dk/dv come back as views of this
    rank's own accumulator once it is home (no copy).
    """
    import torch

    from . import api

    base = plan.base
    B, Hkv, D, Dv = base.B, base.Hkv, base.D, base.Dv
    ct = base.compute_dtype
    torch_ct = torch.float64 if ct == np.float64 else torch.float32
    P = plan.P
    most = max(_kv_elements(plan, s) for s in range(P))
    kv_bufs, dkv_bufs = _Buffers(most, torch_dtype), _Buffers(most, torch_ct)
    dq = np.zeros((B, base.Hq, base.Lq, D), dtype=ct)
    k, v = _pack_kv(plan, kv_bufs) if P > 1 else (base.k, base.v)
    sending = []  # the dK/dV accumulator sent after the previous step
    for t in range(P):
        src = (plan.rank - t) % P
        n_src = plan.lengths[src]
        kv_works = []
        if t < P - 1:
            k_next, v_next = _kv_views(plan, kv_bufs.get((t + 1) % 2, _kv_elements(plan, (src - 1) % P)), (src - 1) % P)
            kv_works = _start(plan, _kv_messages(k, v, plan.next), _kv_messages(k_next, v_next, plan.prev))
        # Accumulator t % 2 left at step t − 2 and that send was waited for at step t − 1: free.
        acc_np = dkv_bufs.get(t % 2, _kv_elements(plan, src))
        acc = _torch(acc_np)
        in_works = []
        if t > 0:  # what the previous holders of this shard accumulated: needed from half the step on
            in_works = _start(plan, [], [(acc, plan.prev, _TAG_DKV)])
        else:
            acc_np[...] = 0
        dk, dv = _unpack(acc_np, B, Hkv, n_src, D, Dv)
        chunks = _chunks(plan, k, v, src)
        calls = list(_block_calls(plan, src, chunks))
        # (k chunk, K/V heads) → calls left this step that add to it.  A part's sum over the
        # step's blocks is added to the arriving accumulator only once complete (the same
        # additions in the same order as one step-wide buffer, so the same bits); parts
        # complete before the arrival are held.  The arrival is awaited after half the step's
        # calls: it had half a step of compute to travel, and parts completing later (a
        # zigzag step's second K chunk) go straight in instead of being held too.
        left: dict = {}
        # (the heads' whole range in the key: a zigzag rank's two query chunks may split the K/V
        # heads into calls differently — 1,025 rows against 1,024 at the per-call budget — and
        # keyed by the first head alone their parts collided: a shape error at L 4,097)
        for _, kc, _, hks, _ in calls:
            left[kc, hks.start, hks.stop] = left.get((kc, hks.start, hks.stop), 0) + 1
        held: dict = {}  # (k chunk, K/V heads) → [k slice, K/V heads, dk part, dv part]
        arrived = t == 0  # step 0: our own shard, the accumulator starts here (zeroed)
        for i, (qs, kc, hs, hks, call) in enumerate(calls):
            calls[i] = None  # the call's views go with it
            gq, gk, gv, _ = api.run_backward(
                call, out_c[:, hs, qs], lse_c[:, hs, qs], dout_c[:, hs, qs], implementation=plan.implementation
            )
            dq[:, hs, qs] += gq
            del gq, call
            key = (kc, hks.start, hks.stop)
            left[key] -= 1
            if t == 0:
                dk[:, hks, plan.k_slice(src, kc)] += gk
                dv[:, hks, plan.k_slice(src, kc)] += gv
            elif key in held:
                held[key][2] += gk
                held[key][3] += gv
            else:
                held[key] = [plan.k_slice(src, kc), hks, _owned(gk, ct), _owned(gv, ct)]
            del gk, gv
            if not arrived and 2 * (i + 1) >= len(calls):
                _wait(in_works, f"ring_attention backward: dK/dV from rank {plan.global_ranks[plan.prev]} (step {t})")
                arrived = True
            if arrived:
                for done in [k for k in held if left[k] == 0]:
                    ks, hk, gk, gv = held.pop(done)
                    dk[:, hk, ks] += gk
                    dv[:, hk, ks] += gv
                    del gk, gv
        if not arrived:  # a step without calls
            _wait(in_works, f"ring_attention backward: dK/dV from rank {plan.global_ranks[plan.prev]} (step {t})")
        del chunks, calls, held
        del dk, dv
        if P > 1:
            # the previous step's accumulator left a whole compute ago: wait for it (no stall)
            # so at most one dK/dV buffer is in flight
            _wait(sending, "ring_attention backward: dK/dV send")
            sending = _start(plan, [(acc, plan.next, _TAG_DKV)], [])
        del acc, acc_np
        if kv_works:
            _wait(kv_works, f"ring_attention backward: K/V from rank {plan.global_ranks[plan.prev]} (step {t + 1})")
            k, v = k_next, v_next
            if t == P - 2:
                kv_bufs.drop(t % 2)
        del kv_works
    del k, v
    kv_bufs.drop(0)
    kv_bufs.drop(1)
    if P == 1:  # a one-rank ring: the accumulator never left (gloo has no messages to oneself)
        mine_np = dkv_bufs.get(0, _kv_elements(plan, plan.rank))
    else:
        # our own shard's accumulator comes home from the previous rank after its last step,
        # into the accumulator that left at step P − 2 (its send was waited for at step P − 1)
        mine_np = dkv_bufs.get(P % 2, _kv_elements(plan, plan.rank))
        _wait(_start(plan, [], [(_torch(mine_np), plan.prev, _TAG_DKV)]),
              f"ring_attention backward: final dK/dV from rank {plan.global_ranks[plan.prev]}")
        _wait(sending, "ring_attention backward: dK/dV sends")
        dkv_bufs.drop((P + 1) % 2)
    dk, dv = _unpack(mine_np, B, Hkv, plan.lengths[plan.rank], D, Dv)
    return dq, dk, dv


# =================================================================================
# agreement between ranks: every rank validates, then all compare
# =================================================================================


def _group_info(group):
    dist = _dist()
    if group is not None and dist.is_available() and not isinstance(group, dist.ProcessGroup):
        # (a str reached get_world_size: AttributeError 'str' object has no attribute 'size')
        raise AttentionTypeError(
            f"group must be None (the default group) or a torch.distributed ProcessGroup, got {type(group).__name__}"
        )
    if not dist.is_available() or not dist.is_initialized():
        raise DistributedAttentionError(
            "torch.distributed is not initialized: call torch.distributed.init_process_group() first "
            "(e.g. under torchrun; see docs/distributed.md)"
        )
    if group is None:
        group = dist.group.WORLD
    P = dist.get_world_size(group)
    rank = dist.get_rank(group)
    global_ranks = [dist.get_global_rank(group, r) for r in range(P)]
    return group, rank, P, global_ranks


def _exchange(group, info: dict, what: str, own_error: BaseException | None) -> list[dict]:
    """Every rank's ``info`` (an all_gather_object); raises on every rank if one refused.

    The rank that refused re-raises its own error; the others raise
    :class:`DistributedAttentionError` quoting it.  Options the ranks disagree about are an
    ``AttentionValueError`` on all of them.
    """
    dist = _dist()
    gathered: list = [None] * dist.get_world_size(group)
    try:
        dist.all_gather_object(gathered, info, group=group)
    except RuntimeError as exc:
        raise DistributedAttentionError(
            f"{what}: a rank did not join the call ({exc}) — it probably failed before calling "
            "or called something else; the process group's timeout bounds this wait"
        ) from exc
    if own_error is not None:
        raise own_error
    failed = [(r, g) for r, g in enumerate(gathered) if g.get("error")]
    if failed:
        desc = "; ".join(f"rank {r}: {g['error']}" for r, g in failed)
        raise DistributedAttentionError(f"{what} refused on another rank — {desc}")
    keys = [k for k in gathered[0] if k not in ("length", "segment_ids", "seed_draw")]
    for k in keys:
        values = [g.get(k) for g in gathered]
        if any(not _same(values[0], x) for x in values[1:]):
            shown = ", ".join(f"rank {r}: {_show(x)}" for r, x in enumerate(values))
            raise AttentionValueError(f"{what}: the ranks disagree about {k} ({shown}); every rank must pass the same")
    return gathered


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        # (equal_nan: the same NaN slopes on every rank are the same option, as one process takes it)
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape
                and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
    return a == b


def _show(x) -> str:
    return f"array{tuple(x.shape)}" if isinstance(x, np.ndarray) else repr(x)


def _check_tensors(q, k, v):
    import torch

    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise AttentionTypeError(
                f"{name} must be a torch.Tensor (this rank's shard), got {type(t).__module__}.{type(t).__name__}"
            )
        if t.device.type != "cpu":
            raise NotImplementedError(
                f"{name} is on {t.device}: dotattn's kernels run on CPU tensors (gloo); move the shards "
                "to the CPU, or use a GPU sequence-parallel library until dotattn's GPU kernels land"
            )


# =================================================================================
# the public calls
# =================================================================================


def _prepare(name, q, k, v, group, options, implementation, *, need_hkv_split=False):
    """Validate locally, agree across ranks, and build the plan (or raise on every rank)."""
    import torch

    group, rank, P, global_ranks = _group_info(group)
    info: dict[str, Any] = {}
    try:
        _check_tensors(q, k, v)
        sharding = _check_sharding(options.pop("sharding"))
        seg = options.pop("segment_ids")
        if seg is not None:
            if isinstance(seg, (tuple, list)):
                raise AttentionValueError(
                    "segment_ids must be one array (..., n) of this rank's shard: sequence-parallel attention is "
                    "self-attention over one sharded sequence"
                )
            # (to_numpy: Tensor.numpy() refused bfloat16 with a bare TypeError)
            seg = _numpy(seg.detach().cpu(), "segment_ids") if isinstance(seg, torch.Tensor) else np.asarray(seg)
        slopes = options.get("alibi_slopes")
        if isinstance(slopes, torch.Tensor):
            options["alibi_slopes"] = _numpy(slopes.detach().cpu(), "alibi_slopes")
        dropout_p, seed = semantics.check_dropout(options["dropout_p"], options["seed"])
        if dropout_p > 0.0 and seed is None:
            info["seed_draw"] = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        qn, kn, vn = (_numpy(t) for t in (q, k, v))
        base = semantics.normalize(qn, kn, vn, segment_ids=seg, **{**options, "seed": seed or 0})
        if base.Lq != base.Lk:
            raise AttentionValueError(
                f"q and k must hold the same positions of one sequence on every rank (self-attention), got "
                f"{base.Lq} query and {base.Lk} key positions on this rank"
            )
        if need_hkv_split:
            for heads, label in ((base.Hq, "q"), (base.Hkv, "k/v")):
                if heads % P:
                    raise AttentionValueError(
                        f"ulysses_attention scatters heads over the {P} ranks, but {label} has {heads} heads, not a "
                        f"multiple of {P}; use ring_attention (it splits the sequence, not the heads)"
                        + (" — with grouped-query attention Hkv must divide too, since K/V heads are never copied"
                           if label == "k/v" else "")
                    )
        info.update(
            # (which function: ring_attention on one rank and ulysses_attention on another
            # passed every other check and waited for the group's timeout, then blamed a rank)
            function=name,
            length=base.Lq,
            segment_ids=base.q_segment_ids,
            batch=base.batch_shape,
            shape=(base.Hq, base.Hkv, base.D, base.Dv, base.input_ndim),
            dtype=str(base.dtype),
            layout=base.layout,
            sharding=sharding,
            causal=base.causal,
            # (the window as asked: normalize() clamped it with this shard's lengths — a side of
            # 2·n or more became None, unbounded, which was wrong for the full sequence of L > n
            # keys, and uneven shards clamped differently; clamped with L below)
            window=semantics.check_window(options["window"]),
            scale=base.scale,
            softcap=base.softcap,
            alibi_slopes=base.alibi_slopes,
            dropout_p=base.dropout_p,
            seed=seed,
            segments=base.q_segment_ids is not None,
            implementation=implementation,
        )
    except (DotAttnError, TypeError, ValueError, NotImplementedError) as exc:
        own_error = exc
        info = {"error": f"{type(exc).__name__}: {exc}"}
    else:
        own_error = None
    gathered = _exchange(group, info, name, own_error)
    lengths = [int(g["length"]) for g in gathered]
    L = sum(lengths)
    # every rank's shard must be what the sharding gives it of L positions (the blocks' positions
    # come from the bounds, the buffers from the lengths: a 5/3 split of 8 was attended as 4/4)
    want = [sum(b - a for a, b in ranges) for ranges in shard_bounds(L, P, info["sharding"])]
    if lengths != want:
        raise AttentionValueError(
            f"{name}: the shards hold {lengths} positions (ranks 0–{P - 1}), but {info['sharding']} sharding of "
            f"L={L} positions over {P} ranks gives {want}; cut the sequence with dotattn.distributed.shard()"
        )
    base = dataclasses.replace(base, window=semantics.clamp_window(info["window"], L, L))
    if base.dropout_p > 0.0:
        seed = info["seed"] if info["seed"] is not None else int(gathered[0]["seed_draw"])
        base = dataclasses.replace(base, seed=seed)
    kv_seg = None
    if base.q_segment_ids is not None:
        kv_seg = unshard([g["segment_ids"] for g in gathered], info["sharding"], dim=-1)
    return _Plan(base, group, rank, P, lengths, info["sharding"], kv_seg, implementation, global_ranks)


def _function_class():
    """The autograd Function (built on first use: importing this module imports no torch)."""
    global _RingFunction
    if _RingFunction is not None:
        return _RingFunction
    import torch

    class RingAttentionFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, plan, impl):  # noqa: D401 - autograd hook
            # saved for their version counters: the ring's backward reads q/k/v again from the
            # caller's memory (NumPy views), so one changed in place after the forward gave wrong
            # gradients silently; saved, backward raises torch's "modified by an inplace
            # operation", as single-process attention does
            out_c, lse_c = impl.forward(plan, q.dtype)
            ctx.plan, ctx.impl, ctx.out_c, ctx.lse_c, ctx.dtype = plan, impl, out_c, lse_c, q.dtype
            out = _torch(semantics.finalize_output(plan.base, out_c))
            lse = _torch(semantics.finalize_lse(plan.base, lse_c))
            # out and lse too: they are views of the out_c/lse_c the backward reads, so one
            # changed in place gave wrong gradients silently (until 7 Dec 2026)
            ctx.save_for_backward(q, k, v, out, lse)
            ctx.mark_non_differentiable(lse)
            return out, lse

        @staticmethod
        def backward(ctx, dout, _dlse):
            ctx.saved_tensors  # noqa: B018 - (the version check: raises if q/k/v/out/lse changed in place)
            plan = ctx.plan
            dout_c = semantics.canonical_like(plan.base, "dout", _numpy(dout.contiguous()), plan.base.Dv)
            dout_c = np.asarray(dout_c, dtype=plan.base.compute_dtype)
            dq, dk, dv = ctx.impl.backward(plan, ctx.out_c, ctx.lse_c, dout_c, ctx.dtype)
            grads = [_torch(semantics.finalize_grad(plan.base, g, n)) for g, n in ((dq, "q"), (dk, "k"), (dv, "v"))]
            return grads[0], grads[1], grads[2], None, None

    _RingFunction = RingAttentionFunction
    return _RingFunction


_RingFunction = None


class _RingImpl:
    @staticmethod
    def forward(plan, torch_dtype):
        return _ring_forward(plan, torch_dtype)

    @staticmethod
    def backward(plan, out_c, lse_c, dout_c, torch_dtype):
        return _ring_backward(plan, out_c, lse_c, dout_c, torch_dtype)


def ring_attention(
    q,
    k,
    v,
    *,
    group=None,
    sharding: str = "zigzag",
    causal: bool | str = False,
    window=None,
    scale: float | None = None,
    softcap: float | None = None,
    alibi_slopes=None,
    segment_ids=None,
    dropout_p: float = 0.0,
    seed: int | None = None,
    return_lse: bool = False,
    layout: str = "bhld",
    implementation: str | None = None,
):
    """Exact attention over a sequence sharded across the ranks of ``group`` (ring).

    Every rank passes its shard (torch CPU tensors)::

        q (..., Hq, n, D)   k (..., Hkv, n, D)   v (..., Hkv, n, Dv)     ("bhld")

    where ``n`` is this rank's share of the full length ``L`` under ``sharding`` (see
    :func:`shard`); shards may differ in length by the rounding of ``L / (2P)``.  Returns this
    rank's shard of the output ``(..., Hq, n, Dv)`` (and of the LSE ``(..., Hq, n)`` with
    ``return_lse``), equal to the single-process :func:`dotattn.attention` on the full
    sequence sliced the same way, gradients included (torch autograd).

    Options are :func:`dotattn.attention`'s, with positions in the full sequence:
    ``causal`` (both alignments coincide for self-attention), ``window``, ``alibi_slopes``
    (the same on every rank), ``segment_ids`` (this rank's shard, ``(..., n)``), and
    ``dropout_p``/``seed`` — the mask is the full call's, bit for bit; without a seed,
    rank 0 draws one from torch's generator.  ``implementation`` picks the local backend.
    Every rank must pass the same options; one that refuses its input makes all raise.
    """
    options = dict(sharding=sharding, causal=causal, window=window, scale=scale, softcap=softcap,
                   alibi_slopes=alibi_slopes, segment_ids=segment_ids, dropout_p=dropout_p, seed=seed, layout=layout)
    plan = _prepare("ring_attention", q, k, v, group, options, implementation)
    out, lse = _function_class().apply(q, k, v, plan, _RingImpl)
    return (out, lse) if return_lse else out


# =================================================================================
# Ulysses: all-to-all heads ↔ sequence
# =================================================================================


def _all_to_all(plan: _Plan, send_parts: list[np.ndarray], recv_shapes: list[tuple], dtype: np.dtype, what: str):
    """Send ``send_parts[s]`` to group rank ``s``; receive arrays of ``recv_shapes[s]`` from each."""
    import torch

    dist = _dist()
    send = _torch(np.concatenate([np.ascontiguousarray(p, dtype=dtype).reshape(-1) for p in send_parts]))
    sizes_in = [int(np.prod(p.shape)) for p in send_parts]
    sizes_out = [int(np.prod(s)) for s in recv_shapes]
    recv = torch.empty(sum(sizes_out), dtype=send.dtype)
    try:
        dist.all_to_all_single(recv, send, output_split_sizes=sizes_out, input_split_sizes=sizes_in, group=plan.group)
    except RuntimeError as exc:
        raise DistributedAttentionError(f"{what}: all_to_all did not complete: {exc}") from exc
    flat = _numpy(recv)
    out, off = [], 0
    for shape, size in zip(recv_shapes, sizes_out):
        out.append(flat[off : off + size].reshape(shape))
        off += size
    return out


class _UlyssesImpl:
    """Scatter heads, gather the sequence; one local attention; and back."""

    @staticmethod
    def _gather_seq(plan, x, heads_per_rank):
        """(B, H, n, X) shard → (B, H/P, L, X): this rank's heads over the whole sequence."""
        P, B, X = plan.P, x.shape[0], x.shape[3]
        parts = [x[:, s * heads_per_rank : (s + 1) * heads_per_rank] for s in range(P)]
        shapes = [(B, heads_per_rank, plan.lengths[s], X) for s in range(P)]
        got = _all_to_all(plan, parts, shapes, x.dtype, "ulysses_attention")
        full = np.empty((B, heads_per_rank, plan.L, X), dtype=x.dtype)
        for s in range(P):
            for a, b, la in plan.local_ranges(s):
                full[:, :, a:b] = got[s][:, :, la : la + b - a]
        return full

    @staticmethod
    def _scatter_seq(plan, full, heads_per_rank):
        """(B, H/P, L, X) → (B, H, n, X): every rank's heads over this rank's shard."""
        P, B, X = plan.P, full.shape[0], full.shape[3]
        parts = [np.concatenate([full[:, :, a:b] for a, b, _ in plan.local_ranges(s)], axis=2) for s in range(P)]
        n = plan.lengths[plan.rank]
        got = _all_to_all(plan, parts, [(B, heads_per_rank, n, X)] * P, full.dtype, "ulysses_attention")
        return np.concatenate(got, axis=1)

    @classmethod
    def _local_call(cls, plan):
        base = plan.base
        hq, hk = base.Hq // plan.P, base.Hkv // plan.P
        q = cls._gather_seq(plan, np.ascontiguousarray(base.q), hq)
        k = cls._gather_seq(plan, np.ascontiguousarray(base.k), hk)
        v = cls._gather_seq(plan, np.ascontiguousarray(base.v), hk)
        h0 = plan.rank * hq
        geom = BlockGeometry(q_start=0, k_start=0, Lq=plan.L, Lk=plan.L, h_start=h0, Hq=base.Hq)
        changes: dict[str, Any] = dict(q=q, k=k, v=v)
        if base.alibi_slopes is not None:
            changes["alibi_slopes"] = base.alibi_slopes[:, h0 : h0 + hq]
        if base.q_segment_ids is not None:
            changes["q_segment_ids"] = changes["kv_segment_ids"] = plan.kv_segment_ids
        return semantics.block_call(base, geom, **changes), hq

    @classmethod
    def forward(cls, plan, torch_dtype):
        from . import api

        call, hq = cls._local_call(plan)
        plan.ulysses_call = call
        out, lse, _ = api.run_forward(call, implementation=plan.implementation)
        ct = plan.base.compute_dtype
        plan.ulysses_out, plan.ulysses_lse = out.astype(ct, copy=False), lse.astype(ct, copy=False)
        out_s = cls._scatter_seq(plan, plan.ulysses_out, hq)
        lse_s = cls._scatter_seq(plan, plan.ulysses_lse[..., None], hq)[..., 0]
        return out_s, lse_s

    @classmethod
    def backward(cls, plan, out_c, lse_c, dout_c, torch_dtype):
        from . import api

        call = plan.ulysses_call
        hq, hk = call.Hq, call.Hkv
        dout_full = cls._gather_seq(plan, dout_c, hq)
        dq, dk, dv, _ = api.run_backward(call, plan.ulysses_out, plan.ulysses_lse, dout_full,
                                         implementation=plan.implementation)
        ct = plan.base.compute_dtype
        return tuple(cls._scatter_seq(plan, g.astype(ct, copy=False), h) for g, h in ((dq, hq), (dk, hk), (dv, hk)))


def ulysses_attention(
    q,
    k,
    v,
    *,
    group=None,
    sharding: str = "zigzag",
    causal: bool | str = False,
    window=None,
    scale: float | None = None,
    softcap: float | None = None,
    alibi_slopes=None,
    segment_ids=None,
    dropout_p: float = 0.0,
    seed: int | None = None,
    return_lse: bool = False,
    layout: str = "bhld",
    implementation: str | None = None,
):
    """The all-to-all alternative to :func:`ring_attention` (DeepSpeed Ulysses), same arguments and results.

    Heads are scattered and the sequence gathered (one all-to-all each for q, k, v), each rank
    computes ``Hq/P`` heads over the whole sequence, and one all-to-all brings the output
    back (backward: dO out, dQ/dK/dV back).  Needs ``Hq % P == 0`` and ``Hkv % P == 0``
    (K/V heads are never copied); otherwise use :func:`ring_attention`.
    """
    options = dict(sharding=sharding, causal=causal, window=window, scale=scale, softcap=softcap,
                   alibi_slopes=alibi_slopes, segment_ids=segment_ids, dropout_p=dropout_p, seed=seed, layout=layout)
    plan = _prepare("ulysses_attention", q, k, v, group, options, implementation, need_hkv_split=True)
    out, lse = _function_class().apply(q, k, v, plan, _UlyssesImpl)
    return (out, lse) if return_lse else out
