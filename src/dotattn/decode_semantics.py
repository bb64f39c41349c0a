"""The semantics of a decode call: :class:`DecodeCall`, its validation and the in-place append.

What :func:`dotattn.attention_with_kvcache` means, below both its users: the public module
(:mod:`dotattn.decoding`, which picks a kernel and converts torch tensors) and the decode
kernels (``kernels/*_decode.py``), which read a :class:`DecodeCall` and never import a public
module.  Like :mod:`dotattn.semantics` for ``attention()``, this module decides; kernels
compute.

Semantics are those of ``attention()`` (``docs/semantics.md``) with
``kv_lengths = cache_lengths + Lnew``: query row ``i`` of sequence ``b`` sits at position
``cache_lengths[b] + Lnew − Lq + i`` (bottom-right alignment), which is where ALiBi, windows,
causal and rotary measure from.  Keys are split into chunks of :data:`SPLIT_SIZE` positions
counted from position 0, whatever the batch, the capacity or the pages, so a sequence's
output is bitwise the same in any batch (``docs/decoding.md``).

Arrays here are NumPy (torch CPU tensors arrive as views of their memory; device tensors as
stand-ins, see :func:`dotattn.torch._convert.standin`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import semantics
from .errors import AttentionTypeError, AttentionValueError
from .semantics import BFLOAT16, FLOAT_DTYPES

__all__ = ["SPLIT_SIZE", "DecodeCall", "normalize", "query_positions", "apply_rotary", "write_new", "rotated_q",
           "float_array", "SIXTEEN_BIT", "call_key", "clear_kinds", "check_caches_apart", "check_own_slots"]

# Keys per split-KV chunk, counted from position 0 of each sequence.  A constant — never
# derived from the capacity, the batch or the core count — so the chunk boundaries, and with
# them every rounding, depend only on the sequence itself (flash-attention sizes its splits
# from the capacity, and its outputs change with it: flash-attention issues 1417, 1570).
SPLIT_SIZE = 256

_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)
_I64 = np.dtype(np.int64)
# 16-bit cache dtypes (a float32 q may read them)
SIXTEEN_BIT = (np.dtype(np.float16), BFLOAT16)


# =================================================================================
# the normalized call
# =================================================================================


@dataclass(eq=False)
class DecodeCall(semantics.QuerySizes):
    """One validated decode call, in canonical (``bhld``) NumPy views of the caller's memory.

    A contiguous cache is described as a paged one with one page per sequence
    (``page_size = capacity``, ``block_table[b] = [b]``), so kernels see a single form.
    """

    q: np.ndarray  # (B, Hq, Lq, D), q's dtype (a view)
    k_pages: np.ndarray  # (num_pages, Hkv, page_size, D), the cache's memory (a view)
    v_pages: np.ndarray  # (num_pages, Hkv, page_size, Dv)
    block_table: np.ndarray  # int64 (B, max_pages)
    cache_lengths: np.ndarray  # int64 (B,), before this call's append
    k_new: np.ndarray | None  # (B, Hkv, Lnew, D) view, or None
    v_new: np.ndarray | None
    causal: bool
    window: tuple[int | None, int | None] | None
    scale: float
    softcap: float | None
    alibi_slopes: np.ndarray | None  # (B, Hq) in the compute dtype
    # (cos, sin) (P, R/2) as the caller gave them (views, any float dtype): the rows a call
    # rotates at are gathered and converted to the compute dtype then (apply_rotary)
    rotary: tuple[np.ndarray, np.ndarray] | None
    dtype: np.dtype  # q's dtype = the output's
    cache_dtype: np.dtype
    layout: str
    paged: bool
    k_cache: np.ndarray  # the caller's cache arrays as given (layout order), for fast paths
    v_cache: np.ndarray
    # the _Kind the call was bound from (shapes, dtypes, options): a backend keeps what it derives
    # from those alone in ``kind.derived`` (cpu_decode: one dict lookup per call instead of
    # re-deriving sizes, dtypes and flags)
    kind: Any = None

    @property
    def Hkv(self) -> int:
        return self.k_pages.shape[1]

    @property
    def Dv(self) -> int:
        return self.v_pages.shape[3]

    @property
    def group(self) -> int:
        return self.Hq // self.Hkv

    @property
    def page_size(self) -> int:
        return self.k_pages.shape[2]

    @property
    def Lnew(self) -> int:
        return 0 if self.k_new is None else self.k_new.shape[2]

    @property
    def kv_lengths(self) -> np.ndarray:
        """Visible keys per sequence after the append: ``cache_lengths + Lnew``."""
        return self.cache_lengths + self.Lnew


# =================================================================================
# validation: one small function per concern, messages that name the argument
# =================================================================================


def _shape(x) -> str:
    return "(" + ", ".join(str(s) for s in x) + ")"


def float_array(name: str, x: Any) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise AttentionTypeError(
            f"{name} must be a NumPy array or a torch tensor, got {type(x).__module__}.{type(x).__name__}"
        )
    semantics.refuse_masked(name, x)
    if x.dtype not in FLOAT_DTYPES:
        raise AttentionTypeError(
            f"{name} must have a floating dtype (float16, bfloat16, float32 or float64), got {x.dtype}"
        )
    return x


def _check_dtypes(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray) -> None:
    if k_cache.dtype != v_cache.dtype:
        raise AttentionTypeError(
            f"k_cache and v_cache must share one dtype, got k_cache.dtype={k_cache.dtype}, v_cache.dtype={v_cache.dtype}"
        )
    if q.dtype != k_cache.dtype and not (q.dtype == _F32 and k_cache.dtype in SIXTEEN_BIT):
        raise AttentionTypeError(
            f"q must have the cache's dtype ({k_cache.dtype}) or float32 with a float16/bfloat16 cache, "
            f"got q.dtype={q.dtype}"
        )


def _check_geometry(q, k_cache, v_cache, block_table, layout: str):
    """Shapes of q and the caches; returns ``(B, Hq, Lq, D, Hkv, Dv, block_table int64 | None)``."""
    if q.ndim != 4:
        want = "(B, Hq, Lq, D)" if layout == "bhld" else "(B, Lq, Hq, D)"
        raise AttentionValueError(f"q must be 4-D {want} (layout={layout!r}), got shape {_shape(q.shape)}")
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        if x.ndim != 4:
            if block_table is None:
                want = "(B, Hkv, capacity, D)" if layout == "bhld" else "(B, capacity, Hkv, D)"
            else:
                want = "(num_pages, Hkv, page_size, D)" if layout == "bhld" else "(num_pages, page_size, Hkv, D)"
            raise AttentionValueError(f"{name} must be 4-D {want} (layout={layout!r}), got shape {_shape(x.shape)}")
    h_ax, l_ax = (1, 2) if layout == "bhld" else (2, 1)
    B, Hq, Lq, D = q.shape[0], q.shape[h_ax], q.shape[l_ax], q.shape[3]
    Hkv = k_cache.shape[h_ax]
    if k_cache.shape[:3] != v_cache.shape[:3]:
        raise AttentionValueError(
            f"k_cache and v_cache must agree on every axis but the last, got k_cache{_shape(k_cache.shape)} "
            f"and v_cache{_shape(v_cache.shape)}"
        )
    if k_cache.shape[3] != D:
        raise AttentionValueError(
            # (both named: through KVCache.attend the caller gave q alone, and the message blamed
            # k_cache only)
            f"q and k_cache must share the head dim D (last axis), got q{_shape(q.shape)} with D={D} and "
            f"k_cache{_shape(k_cache.shape)} with D={k_cache.shape[3]}"
        )
    if D < 1 or v_cache.shape[3] < 1:
        raise AttentionValueError(f"head dims must be ≥ 1, got q{_shape(q.shape)} and v_cache{_shape(v_cache.shape)}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise AttentionValueError(
            f"k_cache has {Hkv} heads, but q's {Hq} heads are not a multiple of it "
            f"(grouped-query attention needs Hq % Hkv == 0; layout={layout!r})"
        )
    table = None
    if block_table is None:
        if k_cache.shape[0] != B:
            raise AttentionValueError(
                f"k_cache must have q's batch size B={B} on axis 0 (or pass block_table= for a paged cache), "
                f"got k_cache{_shape(k_cache.shape)}"
            )
    else:
        # int_array: the values as given (a uint64 2**64 − 1 is not reported as −1), int64 or refused
        table = semantics.int_array("block_table", block_table)
        if table.ndim != 2 or table.shape[0] != B:
            raise AttentionValueError(
                f"block_table must have shape (B, max_pages) = ({B}, max_pages), got {_shape(table.shape)}"
            )
        if k_cache.shape[l_ax] < 1:
            raise AttentionValueError(f"page_size must be ≥ 1, got k_cache{_shape(k_cache.shape)}")
        # (int64 by _bind: the columns in use only — _table_in_use)
    return B, Hq, Lq, D, Hkv, v_cache.shape[3], table


def _check_new(name: str, x: Any, want: tuple[int, ...], layout: str, cache_dtype, q_dtype) -> np.ndarray:
    x = float_array(name, x)
    if x.dtype != cache_dtype and x.dtype != q_dtype:
        raise AttentionTypeError(f"{name} must have the cache's dtype {cache_dtype} (or q's {q_dtype}), got {x.dtype}")
    _check_new_shape(name, x, want, layout)
    return x


def _check_new_shape(name: str, x: Any, want: tuple[int, ...], layout: str) -> None:
    """``x``'s shape (any array with ``ndim``/``shape``) against ``want`` = (B, Hkv, _, D or Dv)."""
    if x.ndim != 4 or x.shape[0] != want[0] or x.shape[3] != want[3] or (
        (x.shape[1], x.shape[2]) != ((want[1], x.shape[2]) if layout == "bhld" else (x.shape[1], want[1]))
    ):
        legend = "(B, Hkv, Lnew, " if layout == "bhld" else "(B, Lnew, Hkv, "
        legend += "D)" if name == "k_new" else "Dv)"
        expect = f"B={want[0]}, Hkv={want[1]}, {'D' if name == 'k_new' else 'Dv'}={want[3]}"
        raise AttentionValueError(f"{name} must have shape {legend} with {expect}, got {_shape(x.shape)}")


def _check_new_pair(k_new: Any, v_new: Any) -> None:
    if (k_new is None) != (v_new is None):
        given, missing = ("k_new", "v_new") if v_new is None else ("v_new", "k_new")
        raise AttentionValueError(f"{given} was given without {missing}: pass both new keys and new values, or neither")


def _check_new_lengths(k_new: Any, v_new: Any, layout: str) -> int:
    l_ax = 2 if layout == "bhld" else 1
    if k_new.shape[l_ax] != v_new.shape[l_ax]:
        raise AttentionValueError(
            f"k_new and v_new must hold the same number of new tokens, got k_new{_shape(k_new.shape)} "
            f"and v_new{_shape(v_new.shape)}"
        )
    return k_new.shape[l_ax]


def check_shapes(q: Any, k_cache: Any, v_cache: Any, k_new: Any, v_new: Any, block_table: Any, layout: str) -> None:
    """The checks of :func:`normalize` that need only shapes (NumPy arrays or torch tensors, of
    any dtype and device), with its messages.

    For an owner that checks room or pages before it calls :func:`normalize`
    (:class:`dotattn.KVCache`): a call whose arrays do not match the cache is told so, rather
    than that its new tokens do not fit.
    """
    B, Hq, Lq, D, Hkv, Dv, _ = _check_geometry(q, k_cache, v_cache, block_table, layout)
    _check_new_pair(k_new, v_new)
    if k_new is not None:
        _check_new_shape("k_new", k_new, (B, Hkv, 0, D), layout)
        _check_new_shape("v_new", v_new, (B, Hkv, 0, Dv), layout)
        _check_new_lengths(k_new, v_new, layout)


def _check_lengths(cache_lengths: Any, B: int, Lnew, room: int, paged: bool) -> np.ndarray:
    if (
        type(cache_lengths) is np.ndarray and cache_lengths.dtype == _I64 and cache_lengths.shape == (B,)
        and type(Lnew) is int and B
    ):
        # The common valid call (int64 lengths, one new count) settles with two Python ints; a
        # refused one goes on below, where the message is made.
        if B <= 16:
            vals = cache_lengths.tolist()
            lo, hi = min(vals), max(vals)
        else:
            lo, hi = int(cache_lengths.min()), int(cache_lengths.max())
        if lo >= 0 and hi + Lnew <= room:
            return cache_lengths
    if cache_lengths is None:
        raise AttentionValueError("cache_lengths is required: the tokens already in the cache, one int per sequence")
    lengths = semantics.check_batch_ints("cache_lengths", cache_lengths, B)
    neg = lengths < 0
    if neg.any():
        b = int(np.argmax(neg))
        raise AttentionValueError(f"cache_lengths must be ≥ 0, got cache_lengths[{b}] = {int(lengths[b])}")
    over = lengths > room - np.asarray(Lnew)  # not lengths + Lnew: a length near 2**63 would wrap past room
    if over.any():
        b = int(np.argmax(over))
        where = "the pages block_table gives it (max_pages · page_size)" if paged else "the cache capacity"
        added = int(Lnew if np.ndim(Lnew) == 0 else Lnew[b])
        raise AttentionValueError(
            f"sequence {b} does not fit: cache_lengths[{b}] = {int(lengths[b])} plus {added} new token(s) "
            f"exceeds {where} = {room}"
        )
    return lengths


def _check_pages(table: np.ndarray, kv_lengths: np.ndarray, page_size: int, num_pages: int) -> None:
    """Pages a sequence uses must exist and belong to it alone (unused entries are ignored).

    The common valid table is settled without memory per page in use beyond a flag per pool
    page: until 6 Dec 2026 a small batch's check built a Python list and set of every page in
    use (≈ 84 bytes a page) and a larger one a masked and a sorted int64 copy (18) — with small
    pages, a third of a one-K/V-head float16 cache of head dim 64 and 1-token pages (256 bytes a
    page), on every call (tests/decoding/test_decode_memory.py)."""
    counts = [-(-n // page_size) for n in kv_lengths.tolist()]  # pages in use per sequence
    total = sum(counts)
    if total <= _PAGES_AS_INTS:
        # A decode step's few pages (its table is checked once per layer): Python ints settle
        # the common valid table; a bad one is reported by the masks below.
        pages: list[int] = []
        for b, u in enumerate(counts):
            if u > 0:
                pages += table[b, :u].tolist()
        if not pages or (min(pages) >= 0 and max(pages) < num_pages and len(set(pages)) == len(pages)):
            return
    elif _pages_valid(table, counts, total, num_pages):
        return
    used = -(-kv_lengths // page_size)  # pages in use per sequence
    in_use = np.arange(table.shape[1])[None, :] < used[:, None]
    pages = table[in_use]
    if pages.size == 0:
        return
    # The common valid table is settled by a min/max and a sort (a decode step of a 30-layer
    # model checks its table 30 times); the masks below only find what to report.
    srt = np.sort(pages)
    if srt[0] >= 0 and srt[-1] < num_pages and not (srt[1:] == srt[:-1]).any():
        return
    bad = (table < 0) | (table >= num_pages)
    bad &= in_use
    if bad.any():
        b, i = (int(x) for x in np.argwhere(bad)[0])
        raise AttentionValueError(
            f"block_table[{b}, {i}] = {int(table[b, i])} is outside the page pool [0, {num_pages}) "
            f"(sequence {b} uses its first {int(used[b])} page(s))"
        )
    if pages.size > 1:
        uniq, counts = np.unique(pages, return_counts=True)
        if (counts > 1).any():
            page = int(uniq[np.argmax(counts > 1)])
            where = [f"[{int(b)}, {int(i)}]" for b, i in np.argwhere((table == page) & in_use)]
            raise AttentionValueError(
                f"block_table repeats page {page} at {', '.join(where)}: each page in use must belong to "
                "one sequence position only"
            )


# Pages in use up to which _check_pages settles a table with Python ints (≈ 84 bytes a page,
# faster than NumPy's calls for a few pages); past it, _pages_valid.
_PAGES_AS_INTS = 1024

# Table entries (rows × the columns in use) _pages_valid gathers in one step: at most 128 KiB of
# int64 pages.  Rows one at a time cost a NumPy call or three per sequence: a batch of 128
# sequences of 16 pages took 0.7 ms a call, where one gather of all of them takes ≈ 40 µs.
_CHECK_BLOCK = 16384

# A pool of more pages than this many times the pages in use is not given a flag per page: the
# pages in use gathered and sorted (≈ 9 bytes a page in use) cost less memory, and less time
# than zeroing and counting the flags (a 4,194,304-page pool, 2,048 pages in use: 263 µs, 143
# sorted).
_FLAGS_POOL_RATIO = 8


def _row_groups(counts: list[int]) -> list[tuple[int, int, int]]:
    """``[(b0, b1, width)]``: consecutive rows whose columns in use (rows × the widest row's
    count) stay within :data:`_CHECK_BLOCK` entries — a row longer than that alone."""
    B, W = len(counts), max(counts, default=0)
    if B * W <= _CHECK_BLOCK:
        return [(0, B, W)]
    groups, b0, w = [], 0, 0
    for b, u in enumerate(counts):
        wider = max(w, u)
        if b > b0 and (b + 1 - b0) * wider > _CHECK_BLOCK:
            groups.append((b0, b, w))
            b0, wider = b, u
        w = wider
    groups.append((b0, B, w))
    return groups


def _gathered(table: np.ndarray, counts: list[int], b0: int, b1: int, w: int) -> np.ndarray:
    """The pages rows ``[b0, b1)`` use (a view for one row, else a copy of ≤ _CHECK_BLOCK)."""
    if b1 - b0 == 1:
        return table[b0, :w]
    used = np.asarray(counts[b0:b1])
    return table[b0:b1, :w][np.arange(w)[None, :] < used[:, None]]


def _pages_valid(table: np.ndarray, counts: list[int], total: int, num_pages: int) -> bool:
    """Whether the pages in use (``table[b, :counts[b]]``) lie in the pool and none repeats —
    without memory per page of table capacity, and per page in use at most ≈ 9 bytes: a flag per
    pool page (pools up to :data:`_FLAGS_POOL_RATIO` times the pages in use) or the pages
    gathered and sorted, rows taken in groups of :data:`_CHECK_BLOCK` entries (a long row as a
    view).  False: let the masks find what to report."""
    groups = _row_groups(counts)
    if num_pages <= _FLAGS_POOL_RATIO * total:
        seen = np.zeros(num_pages, dtype=bool)
        for b0, b1, w in groups:
            if w <= 0:
                continue
            pages = _gathered(table, counts, b0, b1, w)
            if pages.min() < 0 or pages.max() >= num_pages or seen[pages].any():
                return False
            seen[pages] = True
        return int(np.count_nonzero(seen)) == total  # (fewer: a page repeats within a group)
    pages = np.empty(total, dtype=np.int64)
    n = 0
    for b0, b1, w in groups:
        if w > 0:
            part = _gathered(table, counts, b0, b1, w)
            pages[n : n + part.size] = part
            n += part.size
    pages.sort()
    return bool(pages[0] >= 0 and pages[-1] < num_pages and not (pages[1:] == pages[:-1]).any())


def _check_rotary(rotary: Any, D: int, lengths: np.ndarray, Lnew: int, Lq: int):
    """``(cos, sin)`` checked, as given: views of the caller's tables, never converted here.

    Until 6 Dec 2026 both were returned as contiguous compute-dtype copies, whole, on every call:
    a table of another dtype (float64, as ``np.cos`` gives it; a model's bfloat16 one) or a slice
    of a wider one cost a copy of every position it covers — a model's whole context, 64 MiB per
    table for Llama 3's 131,072 × 64 in float32, on each call of each layer — where a decode step
    rotates one row per sequence.  :func:`apply_rotary` converts the rows it gathers (the same
    values: a conversion is elementwise)."""
    if rotary is None:
        return None
    if not isinstance(rotary, (tuple, list)) or len(rotary) != 2:
        raise AttentionValueError(f"rotary must be a pair (cos, sin) of (positions, rotary_dim/2) arrays, got {type(rotary).__name__}")
    # torch tables arrive as NumPy views (dotattn.decoding converts them before this call)
    tables = []
    for name, x in (("rotary cos", rotary[0]), ("rotary sin", rotary[1])):
        semantics.refuse_masked(name, x)
        tables.append(x if isinstance(x, np.ndarray) else semantics.small_array(name, x))
    cos, sin = tables
    for name, x in (("rotary cos", cos), ("rotary sin", sin)):
        if x.dtype not in FLOAT_DTYPES:
            raise AttentionTypeError(f"{name} must be a float array, got dtype {x.dtype}")
        if x.ndim != 2 or x.shape[1] < 1 or 2 * x.shape[1] > D:
            raise AttentionValueError(
                f"{name} must have shape (positions, rotary_dim/2) with 1 ≤ rotary_dim/2 ≤ D/2 = {D // 2}, "
                f"got {_shape(x.shape)}"
            )
    if cos.shape != sin.shape:
        raise AttentionValueError(f"rotary cos and sin must have one shape, got {_shape(cos.shape)} and {_shape(sin.shape)}")
    if lengths.size:
        first_q = lengths + Lnew - Lq
        last = int((lengths + Lnew).max()) - 1
        if (first_q < 0).any():
            b = int(np.argmax(first_q < 0))
            raise AttentionValueError(
                f"rotary: query row 0 of sequence {b} would sit at position {int(first_q[b])} < 0 "
                f"(cache_lengths[{b}] + Lnew = {int(lengths[b]) + Lnew} < Lq = {Lq})"
            )
        if last >= cos.shape[0]:
            raise AttentionValueError(
                f"rotary tables cover positions [0, {cos.shape[0]}), but this call reaches position {last}"
            )
    return cos, sin


def _check_causal(causal: Any) -> bool:
    kind = semantics.check_causal(causal)
    if kind == "top_left":
        raise AttentionValueError(
            "causal='top_left' has no meaning against a KV cache (queries are the newest tokens); "
            "pass causal=True (bottom-right) or False"
        )
    return kind is not None


def _check_writeable(k_cache: np.ndarray, v_cache: np.ndarray, overlap: bool) -> None:
    """The caches can take k_new/v_new in place: writeable, and each slot its own memory.

    A zero stride on an axis longer than one (a torch ``expand``, a writeable ``as_strided``
    view) would put one sequence's new key into another's slots too, and caches sharing memory
    with each other would have the values overwrite the keys.  ``overlap=False`` skips those two
    checks: a :class:`KVCache`'s own buffers (allocated apart), and the device path's stand-ins
    (whose tensors ``dotattn.decoding`` checks).
    """
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not x.flags.writeable:
            raise AttentionValueError(f"{name} is read-only, but k_new/v_new must be written into it")
        if overlap and 0 in x.strides:
            check_own_slots(name, x.shape, x.strides, x.size, "a copy")
    if overlap:
        check_caches_apart(k_cache, v_cache)


def check_own_slots(name: str, shape: tuple, strides: tuple, size: int, copy: str) -> None:
    """Refuse a cache with a zero stride on an axis longer than one (a broadcast, a torch
    ``expand``, a writeable ``as_strided`` view): one new key would land in several slots.
    ``copy`` names how the caller's library makes a cache with its own memory."""
    if size and any(st == 0 and n > 1 for st, n in zip(strides, shape)):
        raise AttentionValueError(
            f"{name} has a zero stride (strides {tuple(strides)}, shape {_shape(tuple(shape))}: a broadcast or "
            "expanded view), so k_new/v_new would be written into several slots at once; pass a cache "
            f"with its own memory (e.g. {copy})"
        )


# Work np.shares_memory may do to settle whether the caches overlap (its max_work).  The layouts
# met in practice settle in 1–20 units (separate buffers, slices of one buffer, the halves
# kv[:, :, 0] and kv[:, :, 1] of a combined (B, L, 2, H, D) tensor, paged pools); at ≈ 40 ns a
# unit, a contrived as_strided layout costs at most ≈ 0.5 ms before it is refused as unsettled.
OVERLAP_WORK = 10_000
_TOO_HARD = getattr(np, "exceptions", np).TooHardError  # (np.exceptions: NumPy ≥ 1.25)


def check_caches_apart(k_cache: np.ndarray, v_cache: np.ndarray) -> None:
    """Refuse caches with a byte in common (writing v_new would overwrite keys), exactly.

    ``np.shares_memory`` reads addresses, shapes and strides only, never the memory: the device
    path passes arrays that describe a tensor's memory this way (``dotattn.decoding``).  Disjoint
    interleaved layouts (the two halves of one combined K/V tensor) are accepted.  When the exact
    test gives up after :data:`OVERLAP_WORK` units, the call is refused: an overlap could not be
    ruled out.
    """
    if not np.may_share_memory(k_cache, v_cache):  # (byte ranges apart: the common case, ≈ 0.4 µs)
        return
    try:
        shared = np.shares_memory(k_cache, v_cache, max_work=OVERLAP_WORK)
    except _TOO_HARD:
        raise AttentionValueError(
            "k_cache and v_cache interleave in memory, and an overlap could not be ruled out (np.shares_memory "
            f"gave up after max_work={OVERLAP_WORK}): writing v_new could overwrite keys (or k_new values); "
            "pass two caches that do not overlap, e.g. separate arrays"
        ) from None
    if shared:
        raise AttentionValueError(
            "k_cache and v_cache share memory, so writing v_new would overwrite keys (or k_new values); "
            "pass two caches that do not overlap"
        )


def normalize(
    q, k_cache, v_cache, k_new, v_new, *, cache_lengths, block_table, causal, window, scale, softcap,
    alibi_slopes, rotary, layout, new_counts: np.ndarray | None = None, trusted: bool = False,
    standins: bool = False,
) -> DecodeCall:
    """Validate every argument of a decode call (nothing is written) → :class:`DecodeCall`.

    ``new_counts`` (B,) (:meth:`KVCache.append` of padded prompts): sequence b stores only its
    first ``new_counts[b]`` new tokens, so only those need room and pages.

    ``trusted=True`` is the path of an owner that keeps ``cache_lengths`` and ``block_table``
    valid itself (:class:`dotattn.KVCache`: int64 lengths it advances, room it checks before
    the call, pages from its own free list): their values are not checked again on a call of a
    kind seen before.  Everything the caller supplies — q, k_new, v_new, the caches' shapes,
    dtypes and writeability, every option, ALiBi slopes and rotary tables — is checked as ever
    (but not whether the owner's caches overlap: they were allocated apart).  ``standins=True``:
    the caches are zero-stride stand-ins of device tensors, whose overlap the caller checked.

    Repeated calls: what the checks decide from shapes, dtypes and option values alone is kept
    per :func:`call_key` (as :func:`dotattn.semantics.plan_key` does for ``attention()``); a
    call of a kind seen before checks only what depends on values (writeability, lengths,
    pages, slopes, rotary tables), with the same functions and messages.
    """
    key = None
    if new_counts is None:
        key = call_key(q, k_cache, v_cache, k_new, v_new, block_table, causal, window, scale, softcap, layout)
        if key is not None:
            kind = _KINDS.get(key)
            if kind is not None:
                return _bind(kind, q, k_cache, v_cache, k_new, v_new, cache_lengths, block_table, alibi_slopes,
                             rotary, None, trusted, overlap=not (trusted or standins), standins=standins)
    layout = semantics.check_layout(layout)
    q = float_array("q", q)
    k_cache = float_array("k_cache", k_cache)
    v_cache = float_array("v_cache", v_cache)
    _check_dtypes(q, k_cache, v_cache)
    B, Hq, Lq, D, Hkv, Dv, table = _check_geometry(q, k_cache, v_cache, block_table, layout)
    _check_new_pair(k_new, v_new)
    Lnew = 0
    if k_new is not None:
        k_new = _check_new("k_new", k_new, (B, Hkv, 0, D), layout, k_cache.dtype, q.dtype)
        v_new = _check_new("v_new", v_new, (B, Hkv, 0, Dv), layout, k_cache.dtype, q.dtype)
        Lnew = _check_new_lengths(k_new, v_new, layout)
    paged = table is not None
    # the caches' token axis: capacity, or page_size for a paged cache
    slots = k_cache.shape[2 if layout == "bhld" else 1]
    kind = _Kind(
        B=B, Hq=Hq, Lq=Lq, D=D, Lnew=Lnew, paged=paged, layout=layout,
        room=table.shape[1] * slots if paged else slots,
        table=None if paged else np.arange(B, dtype=np.int64)[:, None],
        compute=_F64 if q.dtype == _F64 else _F32,
        fields=dict(dtype=q.dtype, cache_dtype=k_cache.dtype, layout=layout, paged=paged),
    )
    call = _bind(kind, q, k_cache, v_cache, k_new, v_new, cache_lengths, table, alibi_slopes, rotary, new_counts,
                 False, options=(causal, window, scale, softcap), overlap=not (trusted or standins), standins=standins)
    if key is not None:
        # checked once for this kind: the options' decisions join the fields every call copies
        for name in ("causal", "window", "scale", "softcap"):
            kind.fields[name] = getattr(call, name)
        if len(_KINDS) >= _MAX_KINDS:
            _KINDS.clear()
        _KINDS[key] = kind
    return call


class _Kind:
    """What :func:`normalize` decided for calls of one :func:`call_key`: sizes, and the fields of
    :class:`DecodeCall` that hold no array of the caller's."""

    __slots__ = ("B", "Hq", "Lq", "D", "Lnew", "paged", "layout", "room", "table", "compute", "fields", "derived")

    def __init__(self, **kw):
        self.derived: dict = {}  # a backend's values derived from the kind alone (DecodeCall.kind)
        for name, value in kw.items():
            setattr(self, name, value)


# Kinds by call_key(); cleared whole when full (a program makes few kinds of decode call).
_KINDS: dict[tuple, _Kind] = {}
_MAX_KINDS = 256


def clear_kinds() -> None:
    """Forget every kept kind (tests comparing the first call of a kind with a later one)."""
    _KINDS.clear()


def call_key(q, k_cache, v_cache, k_new, v_new, block_table, causal, window, scale, softcap, layout) -> tuple | None:
    """What :func:`normalize` decides from everything but array VALUES, as a dict key — or None.

    For NumPy arrays (exactly ``np.ndarray``: a subclass or a torch tensor takes the full path),
    the shape checks depend on the shapes and dtypes of q, the caches, k_new, v_new and the
    block table, and on the option values keyed as :func:`dotattn.semantics.plan_key` keys them
    (type and value; a float by its bits).  Strides decide nothing here (writeability is
    checked every call).  ALiBi slopes and rotary tables are checked every call.
    """
    nd = np.ndarray
    if type(q) is not nd or type(k_cache) is not nd or type(v_cache) is not nd:
        return None
    if k_new is None and v_new is None:
        new = None
    elif type(k_new) is nd and type(v_new) is nd:
        new = (k_new.shape, k_new.dtype, v_new.shape, v_new.dtype)
    else:
        return None
    if block_table is None:
        table = None
    elif type(block_table) is nd:
        table = (block_table.shape, block_table.dtype)
    else:
        return None
    opt = semantics._option_key
    key = (
        q.shape, q.dtype, k_cache.shape, k_cache.dtype, v_cache.shape, v_cache.dtype, new, table,
        opt(causal), opt(window), opt(scale), opt(softcap), opt(layout),
    )
    return None if semantics._NOT_KEYABLE in key[8:] else key


def _table_in_use(table: np.ndarray, kv_lengths: np.ndarray, page_size: int) -> np.ndarray:
    """A block table of another integer dtype as int64: its columns up to the last page in use
    (the kernels read no other).  Until 6 Dec 2026 an int32 table — what
    FlashAttention's callers pass — was converted whole on every call: 8 bytes per page of
    capacity per sequence, however short the sequences (16 MiB a call and layer for 256
    sequences of 8,192-page rows; tests/decoding/test_decode_memory.py).  A small table
    (:data:`_TABLE_WHOLE` entries, 32 KiB as int64) is still converted whole: finding its last
    page in use (a NumPy reduction, a slice) cost a one-token decode call 3–7 µs more than the
    conversion it saves (≈ 0.6 µs for a 64-page row)."""
    if table.size <= _TABLE_WHOLE:
        return table.astype(np.int64)
    longest = (max(kv_lengths.tolist(), default=0) if kv_lengths.shape[0] <= 64
               else int(kv_lengths.max(initial=0)))
    return table[:, : min(table.shape[1], -(-longest // page_size))].astype(np.int64)


# Block-table entries up to which a table of another integer dtype is converted whole
# (_table_in_use): 32 KiB as int64, less than the check of its pages reads anyway.
_TABLE_WHOLE = 4096


def _bind(kind: _Kind, q, k_cache, v_cache, k_new, v_new, cache_lengths, table, alibi_slopes, rotary, new_counts,
          trusted: bool, options=None, overlap: bool = True, standins: bool = False) -> DecodeCall:
    """The value checks of a call whose shapes, dtypes (and, without ``options``, option values)
    ``kind`` has settled → its :class:`DecodeCall`.  ``options`` (causal, window, scale,
    softcap): the first call of a kind checks them here, in normalize()'s order."""
    if k_new is not None:
        _check_writeable(k_cache, v_cache, overlap)
    # canonical (bhld) views: nothing is copied
    if kind.layout == "blhd":
        qc = q.swapaxes(1, 2)
        kp, vp = k_cache.swapaxes(1, 2), v_cache.swapaxes(1, 2)
        if k_new is not None:
            k_new, v_new = k_new.swapaxes(1, 2), v_new.swapaxes(1, 2)
    else:
        qc, kp, vp = q, k_cache, v_cache
    B, Lnew = kind.B, kind.Lnew
    added = Lnew if new_counts is None else new_counts
    if trusted:
        lengths = cache_lengths
    else:
        lengths = _check_lengths(cache_lengths, B, added, kind.room, kind.paged)
    if kind.paged:
        kv_lengths = None
        if table.dtype != _I64:
            # (the device path's table keeps its width: its kernels' plans are keyed by its strides)
            if standins:
                table = table.astype(np.int64)
            else:
                kv_lengths = lengths + added
                table = _table_in_use(table, kv_lengths, kp.shape[2])
        if not trusted:
            _check_pages(table, lengths + added if kv_lengths is None else kv_lengths, kp.shape[2], kp.shape[0])
    else:
        table = kind.table
    call = object.__new__(DecodeCall)
    fields = call.__dict__
    fields.update(kind.fields)
    if options is not None:
        causal, window, scale, softcap = options
        fields["causal"] = _check_causal(causal)
        # a side reaching past every key hides nothing: None (a side ≥ 2**63 would not fit the
        # kernels' int64 positions); the kind's room bounds the keys of every call of the kind
        fields["window"] = semantics.clamp_window(semantics.check_window(window), kind.Lq, kind.room)
        fields["scale"] = semantics.check_scale(scale, kind.D)
        fields["softcap"] = semantics.check_softcap(softcap)
    compute = kind.compute
    fields["alibi_slopes"] = (
        None if alibi_slopes is None else semantics.check_alibi_slopes(alibi_slopes, B, kind.Hq, compute)
    )
    fields["rotary"] = None if rotary is None else _check_rotary(rotary, kind.D, lengths, Lnew, kind.Lq)
    fields.update(
        q=qc, k_pages=kp, v_pages=vp, block_table=table, cache_lengths=lengths, k_new=k_new, v_new=v_new,
        k_cache=k_cache, v_cache=v_cache, kind=kind,
    )
    return call


# =================================================================================
# positions, rotary and the in-place append
# =================================================================================


def query_positions(call: DecodeCall) -> np.ndarray:
    """int64 (B, Lq): position of each query row on its sequence's key axis (bottom-right)."""
    return (call.kv_lengths - call.Lq)[:, None] + np.arange(call.Lq)[None, :]


def apply_rotary(x: np.ndarray, positions: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """RoPE in the non-interleaved ("rotate half") form on the first ``2·R`` dims of ``x``.

    ``x (B, H, L, D)`` in the compute dtype, ``positions (B, L)``, ``cos``/``sin`` ``(P, R)``
    of any float dtype (the rows at ``positions`` are converted to ``x``'s — never the whole
    table): ``x[:R], x[R:2R] ← x[:R]·cos − x[R:2R]·sin, x[R:2R]·cos + x[:R]·sin`` at each row's
    position — the convention of GPT-NeoX, Llama in ``transformers`` and FlashAttention's
    default (``rotary_interleaved=False``).  Returns a new array.  The same code serves torch
    tensors (all four on one device): the device decode path rotates with it too.
    """
    R = cos.shape[1]
    c = cos[positions][:, None]  # (B, 1, L, R)
    s = sin[positions][:, None]
    if isinstance(x, np.ndarray):
        c, s = c.astype(x.dtype, copy=False), s.astype(x.dtype, copy=False)
    elif c.dtype != x.dtype:
        c, s = c.to(x.dtype), s.to(x.dtype)
    out = np.array(x, copy=True) if isinstance(x, np.ndarray) else x.clone()
    x1, x2 = x[..., :R], x[..., R : 2 * R]
    # (±inf · sin 0 is NaN and a huge value may overflow, as the rule of NaN and ±inf wants:
    # without NumPy's RuntimeWarnings, which the numpy kernel's callers kept in and the cpu
    # kernel's did not)
    with np.errstate(invalid="ignore", over="ignore"):
        out[..., :R] = x1 * c - x2 * s
        out[..., R : 2 * R] = x2 * c + x1 * s
    return out


def write_new(call: DecodeCall, counts: np.ndarray | None = None) -> None:
    """Write ``k_new``/``v_new`` at ``[cache_lengths[b], cache_lengths[b] + Lnew)`` in place.

    ``counts`` (B,) writes only the first ``counts[b]`` new tokens of sequence b (padded
    prompts appended by :class:`KVCache`).  Keys are rotated first when ``call.rotary`` is set.
    """
    k_new, v_new = call.k_new, call.v_new
    if k_new is None or k_new.shape[2] == 0:
        return
    if call.rotary is not None or k_new.dtype != call.k_pages.dtype or v_new.dtype != call.v_pages.dtype:
        # new tokens rounded to a 16-bit cache: a value past its range is stored as ±inf (what
        # the rounding gives), without NumPy's overflow warning (the numpy kernel's decode is
        # @quiet; the cpu kernel's and KVCache.append's calls are not)
        with np.errstate(over="ignore", invalid="ignore"):
            return _write_new(call, k_new, v_new, counts)
    return _write_new(call, k_new, v_new, counts)


def _write_new(call: DecodeCall, k_new: np.ndarray, v_new: np.ndarray, counts: np.ndarray | None) -> None:
    Lnew = k_new.shape[2]
    pos = None
    if call.rotary is not None:
        pos = call.cache_lengths[:, None] + np.arange(Lnew)[None, :]  # (B, Lnew)
        k_new = apply_rotary(k_new.astype(call.compute_dtype), pos, *call.rotary)
    ps = call.page_size
    table, kp, vp = call.block_table, call.k_pages, call.v_pages
    if counts is None and Lnew == 1 and table.shape[0] <= 8:
        # one new token per sequence of a small batch (a decode step): plain indexing is a
        # few µs, where building index arrays for advanced indexing cost ≈ 15
        for b, n in enumerate(call.cache_lengths.tolist()):
            page, slot = table.item(b, n // ps), n % ps  # contiguous: page b, slot n
            kp[page, :, slot] = k_new[b, :, 0]
            vp[page, :, slot] = v_new[b, :, 0]
        return
    if pos is None:
        pos = call.cache_lengths[:, None] + np.arange(Lnew)[None, :]
    n_new = np.full(call.B, call.Lnew, dtype=np.int64) if counts is None else counts
    # Runs of consecutive slots within one page, per sequence: one slice assignment each
    # (a 4,096-token prompt into 256-token pages is 16 runs), where advanced indexing built
    # and scattered one index pair per token (≈ 3 ms per SmolLM layer at 4,096 tokens).  A
    # call with many short runs (tiny pages) keeps advanced indexing.
    first = call.cache_lengths
    runs = int(((first % ps + n_new + ps - 1) // ps).sum()) if call.paged else call.B
    if runs <= 4 * call.B + 64:
        for b, (start, n) in enumerate(zip(first.tolist(), n_new.tolist())):
            t = 0
            while t < n:
                i, slot = divmod(start + t, ps)
                run = min(ps - slot, n - t)
                page = int(call.block_table[b, i])  # contiguous: page b
                call.k_pages[page, :, slot : slot + run] = k_new[b, :, t : t + run]
                call.v_pages[page, :, slot : slot + run] = v_new[b, :, t : t + run]
                t += run
        return
    if counts is None:
        pages, slots = call.block_table[np.arange(call.B)[:, None], pos // ps], pos % ps
        # advanced indices around a slice: the result's axes are (B, Lnew, Hkv, D)
        call.k_pages[pages, :, slots] = k_new.swapaxes(1, 2)
        call.v_pages[pages, :, slots] = v_new.swapaxes(1, 2)
        return
    for b in range(call.B):
        n = int(counts[b])
        if n == 0:
            continue
        p = pos[b, :n]
        pg = call.block_table[b, p // ps]
        call.k_pages[pg, :, p % ps] = k_new[b, :, :n].swapaxes(0, 1)
        call.v_pages[pg, :, p % ps] = v_new[b, :, :n].swapaxes(0, 1)


def rotated_q(call: DecodeCall) -> np.ndarray:
    """q in the compute dtype, rotated at its positions when ``call.rotary`` is set."""
    q = call.q.astype(call.compute_dtype, copy=False)
    if call.rotary is None:
        return q
    return apply_rotary(q, query_positions(call), *call.rotary)



# Folded query rows (G · Lq) a split-KV pass takes at once.  A pass keeps one partial output per
# chunk of SPLIT_SIZE keys and row — rows · 4 bytes · Dv per chunk against the chunk's
# SPLIT_SIZE · (D + Dv) · itemsize bytes of K/V: with many rows a chunked prefill's partials
# outgrew the cache it read (Lq 256 over a float16 cache with 4 query heads a K/V head: 4 × the
# cache; 8 heads and Lq 512, 16 ×).  At 256 they are about a 16-bit cache's size (peak 1.1 × on
# the cpu kernel, 1.3 × on the numpy one, against 4.2 × and 5 ×; half that for float32).  Fewer
# rows a pass cost time on 16-bit caches, whose chunks each pass converts again (B1 32/8/128 at
# 8–16k keys, Lq 256: whole 456 / 1,210 ms, 128 rows 537 / 1,608, 256 rows 1,304 at 16k; float32
# level within the machine's noise — docs/decoding-log.md).
ROWS_PER_PASS = 256


def query_row_blocks(call: DecodeCall) -> list[tuple[int, DecodeCall]] | None:
    """``[(i0, sub-call)]`` over blocks of the query rows ``[i0, i0 + Lq_b)`` such that each
    sub-call folds at most :data:`ROWS_PER_PASS` rows (read per call: tests lower it) — None when the call is small enough, or when
    its rows cannot be split exactly (no causal mask, with a window or ALiBi: their positions
    are fixed by the whole block; such calls run whole).

    Call after :func:`write_new` (the sub-calls append nothing).  Each sub-call sees the rows'
    own keys and positions: under the causal mask block ``[i0, i1)`` ends at key position
    ``kv_len − (Lq − i1)`` — its ``cache_lengths``, so the bottom-right alignment puts row ``i``
    at ``kv_len − Lq + i`` as in the whole call, and keys past its last row (hidden from it)
    are not read; a block whose rows all lie before the first key (more query rows than keys)
    gets 0 keys, so zeros and −inf as in the whole call.  Without the causal mask every row sees
    every key: the lengths stay.  A rotary q is rotated once at its positions (sub-calls carry
    no tables).  The blocks depend on ``Lq`` and the group alone, never on the batch: a
    sequence's bits stay the same whatever else is in the batch.
    """
    Lq = call.Lq
    block = rows_a_block(call.group, Lq, call.causal, call.window, call.alibi_slopes, ROWS_PER_PASS)
    if block is None:
        return None
    q = call.q if call.rotary is None else rotated_q(call)
    kv = call.kv_lengths
    subs = []
    for i0 in range(0, Lq, block):
        i1 = min(i0 + block, Lq)
        lengths = np.maximum(kv - (Lq - i1), 0) if call.causal else kv
        sub = dataclasses.replace(
            call, q=q[:, :, i0:i1], k_new=None, v_new=None, cache_lengths=lengths.astype(np.int64, copy=False),
            rotary=None, kind=None,
        )
        subs.append((i0, sub))
    return subs


def rows_a_block(group: int, Lq: int, causal: bool, window, alibi_slopes, rows_per_pass: int) -> int | None:
    """Query rows a block of a call of ``Lq`` rows takes so that it folds at most
    ``rows_per_pass`` rows (``group`` query heads a K/V head each), or None where the call runs
    whole: it is small enough, its rows' positions are fixed by the whole block (no causal mask,
    with a window or ALiBi), or one row's group alone passes the limit.

    A block ``[i0, i1)`` of a causal call is the call with ``kv_lengths − (Lq − i1)`` keys
    (clamped at 0): bottom-right alignment then puts its rows where the whole call puts them
    (:func:`query_row_blocks`); without the causal mask it keeps the lengths.
    """
    if group * Lq <= rows_per_pass:
        return None
    if not causal and (window is not None or alibi_slopes is not None):
        return None
    block = max(1, rows_per_pass // group)
    if block >= Lq:
        # one query row's group alone passes the limit (G > rows_per_pass: more query heads a
        # K/V head than a pass takes): no smaller block exists — blocks of one row would be
        # this call again, split again without end (RecursionError before 6 Dec 2026, 23:00)
        return None
    return block


def decode_in_row_blocks(call: DecodeCall, decode: Any):
    """``decode(call)``'s ``(out, lse)`` computed block of query rows by block
    (:func:`query_row_blocks`) after the append — or None where the call runs whole."""
    blocks = query_row_blocks(call)
    if blocks is None:
        return None
    write_new(call)
    out = lse = None
    for i0, sub in blocks:
        o, s = decode(sub)
        if out is None:
            out = np.empty(call.q.shape[:3] + o.shape[3:], dtype=o.dtype)
            lse = np.empty(call.q.shape[:3], dtype=s.dtype)
        out[:, :, i0 : i0 + o.shape[2]] = o
        lse[:, :, i0 : i0 + s.shape[2]] = s
    return out, lse
