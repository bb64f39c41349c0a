"""KV-cache decoding: :func:`attention_with_kvcache` and :class:`KVCache`.

Autoregressive generation attends a few new query rows to a growing cache of keys and
values.  This module validates a decode call (with the checks of :mod:`dotattn.semantics`),
writes the new keys/values into the caller's cache in place, and hands one
:class:`DecodeCall` to a decode kernel:

* ``cpu``  — split-KV ("flash decoding") compiled by Numba (:mod:`dotattn.kernels.cpu_decode`);
* ``numpy`` — the same split in NumPy, parts merged by :func:`dotattn.merge_attention_states`
  (:mod:`dotattn.kernels.numpy_decode`);
* ``reference`` — gathers the visible keys and runs the float64 reference backend of
  ``attention()``: the oracle.

Semantics are those of ``attention()`` (``docs/semantics.md``) with
``kv_lengths = cache_lengths + Lnew``: query row ``i`` of sequence ``b`` sits at position
``cache_lengths[b] + Lnew − Lq + i`` (bottom-right alignment), which is where ALiBi, windows,
causal and rotary measure from.  Keys are split into chunks of :data:`SPLIT_SIZE` positions
counted from position 0, whatever the batch, the capacity or the pages, so a sequence's
output is bitwise the same in any batch (``docs/decoding.md``).

Shape legend (``layout="bhld"``; ``"blhd"`` swaps the L and H axes of q, k_new, v_new, out and
of the contiguous cache, and the page-size and head axes of a paged cache)::

    q            (B, Hq, Lq, D)              out  (B, Hq, Lq, Dv)     lse (B, Hq, Lq)
    k_cache      (B, Hkv, capacity, D)       or paged (num_pages, Hkv, page_size, D)
    v_cache      (B, Hkv, capacity, Dv)      or paged (num_pages, Hkv, page_size, Dv)
    k_new/v_new  (B, Hkv, Lnew, D / Dv)      block_table (B, max_pages)   cache_lengths (B,)
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import semantics
from .errors import AttentionTypeError, AttentionValueError, UnsupportedCallError
from .frameworks import framework_of
from .semantics import BFLOAT16, FLOAT_DTYPES

__all__ = ["attention_with_kvcache", "KVCache", "SPLIT_SIZE", "DecodeCall"]

# Keys per split-KV chunk, counted from position 0 of each sequence.  A constant — never
# derived from the capacity, the batch or the core count — so the chunk boundaries, and with
# them every rounding, depend only on the sequence itself (flash-attention sizes its splits
# from the capacity, and its outputs change with it: flash-attention issues 1417, 1570).
SPLIT_SIZE = 256

_IMPLEMENTATIONS = {
    "cpu": "dotattn.kernels.cpu_decode",
    "numpy": "dotattn.kernels.numpy_decode",
    "reference": "dotattn.kernels.numpy_decode",
}
_kernel_modules: dict[str, Any] = {}
_cpu_ok: bool | None = None

_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)
_SIXTEEN_BIT = (np.dtype(np.float16), BFLOAT16)


# =================================================================================
# the normalized call
# =================================================================================


@dataclass(eq=False)
class DecodeCall:
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
    rotary: tuple[np.ndarray, np.ndarray] | None  # (cos, sin) (P, R/2) in the compute dtype
    dtype: np.dtype  # q's dtype = the output's
    cache_dtype: np.dtype
    layout: str
    paged: bool
    k_cache: np.ndarray  # the caller's cache arrays as given (layout order), for fast paths
    v_cache: np.ndarray

    @property
    def B(self) -> int:
        return self.q.shape[0]

    @property
    def Hq(self) -> int:
        return self.q.shape[1]

    @property
    def Lq(self) -> int:
        return self.q.shape[2]

    @property
    def D(self) -> int:
        return self.q.shape[3]

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

    @property
    def compute_dtype(self) -> np.dtype:
        return _F64 if self.dtype == _F64 else _F32


# =================================================================================
# validation: one small function per concern, messages that name the argument
# =================================================================================


def _shape(x) -> str:
    return "(" + ", ".join(str(s) for s in x) + ")"


def _float_array(name: str, x: Any) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise AttentionTypeError(
            f"{name} must be a NumPy array or a torch tensor, got {type(x).__module__}.{type(x).__name__}"
        )
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
    if q.dtype != k_cache.dtype and not (q.dtype == _F32 and k_cache.dtype in _SIXTEEN_BIT):
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
            f"k_cache must have q's head dim D={D} (last axis), got k_cache{_shape(k_cache.shape)}"
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
        table = np.asarray(block_table)
        if table.dtype == bool or not np.issubdtype(table.dtype, np.integer):
            raise AttentionTypeError(f"block_table must hold integers (page indices), got dtype {table.dtype}")
        if table.ndim != 2 or table.shape[0] != B:
            raise AttentionValueError(
                f"block_table must have shape (B, max_pages) = ({B}, max_pages), got {_shape(table.shape)}"
            )
        if k_cache.shape[l_ax] < 1:
            raise AttentionValueError(f"page_size must be ≥ 1, got k_cache{_shape(k_cache.shape)}")
        table = table.astype(np.int64, copy=False)
    return B, Hq, Lq, D, Hkv, v_cache.shape[3], table


def _check_new(name: str, x: Any, want: tuple[int, ...], layout: str, cache_dtype, q_dtype) -> np.ndarray:
    x = _float_array(name, x)
    if x.dtype != cache_dtype and x.dtype != q_dtype:
        raise AttentionTypeError(f"{name} must have the cache's dtype {cache_dtype} (or q's {q_dtype}), got {x.dtype}")
    if x.ndim != 4 or x.shape[0] != want[0] or x.shape[3] != want[3] or (
        (x.shape[1], x.shape[2]) != ((want[1], x.shape[2]) if layout == "bhld" else (x.shape[1], want[1]))
    ):
        legend = "(B, Hkv, Lnew, " if layout == "bhld" else "(B, Lnew, Hkv, "
        legend += "D)" if name == "k_new" else "Dv)"
        expect = f"B={want[0]}, Hkv={want[1]}, {'D' if name == 'k_new' else 'Dv'}={want[3]}"
        raise AttentionValueError(f"{name} must have shape {legend} with {expect}, got {_shape(x.shape)}")
    return x


def _check_lengths(cache_lengths: Any, B: int, Lnew, room: int, paged: bool) -> np.ndarray:
    if cache_lengths is None:
        raise AttentionValueError("cache_lengths is required: the tokens already in the cache, one int per sequence")
    lengths = semantics.check_batch_ints("cache_lengths", cache_lengths, B)
    neg = lengths < 0
    if neg.any():
        b = int(np.argmax(neg))
        raise AttentionValueError(f"cache_lengths must be ≥ 0, got cache_lengths[{b}] = {int(lengths[b])}")
    over = lengths + Lnew > room
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
    """Pages a sequence uses must exist and belong to it alone (unused entries are ignored)."""
    used = -(-kv_lengths // page_size)  # pages in use per sequence
    in_use = np.arange(table.shape[1])[None, :] < used[:, None]
    pages = table[in_use]
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


def _check_rotary(rotary: Any, D: int, dtype: np.dtype, lengths: np.ndarray, Lnew: int, Lq: int):
    if rotary is None:
        return None
    if not isinstance(rotary, (tuple, list)) or len(rotary) != 2:
        raise AttentionValueError(f"rotary must be a pair (cos, sin) of (positions, rotary_dim/2) arrays, got {type(rotary).__name__}")
    cos, sin = (np.asarray(_as_numpy(f"rotary[{i}]", x)) for i, x in enumerate(rotary))
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
    return np.ascontiguousarray(cos, dtype=dtype), np.ascontiguousarray(sin, dtype=dtype)


def _check_causal(causal: Any) -> bool:
    kind = semantics.check_causal(causal)
    if kind == "top_left":
        raise AttentionValueError(
            "causal='top_left' has no meaning against a KV cache (queries are the newest tokens); "
            "pass causal=True (bottom-right) or False"
        )
    return kind is not None


def normalize(
    q, k_cache, v_cache, k_new, v_new, *, cache_lengths, block_table, causal, window, scale, softcap,
    alibi_slopes, rotary, layout, new_counts: np.ndarray | None = None,
) -> DecodeCall:
    """Validate every argument of a decode call (nothing is written) → :class:`DecodeCall`.

    ``new_counts`` (B,) (:meth:`KVCache.append` of padded prompts): sequence b stores only its
    first ``new_counts[b]`` new tokens, so only those need room and pages.
    """
    layout = semantics.check_layout(layout)
    q = _float_array("q", q)
    k_cache = _float_array("k_cache", k_cache)
    v_cache = _float_array("v_cache", v_cache)
    _check_dtypes(q, k_cache, v_cache)
    B, Hq, Lq, D, Hkv, Dv, table = _check_geometry(q, k_cache, v_cache, block_table, layout)
    if (k_new is None) != (v_new is None):
        given, missing = ("k_new", "v_new") if v_new is None else ("v_new", "k_new")
        raise AttentionValueError(f"{given} was given without {missing}: pass both new keys and new values, or neither")
    if k_new is not None:
        k_new = _check_new("k_new", k_new, (B, Hkv, 0, D), layout, k_cache.dtype, q.dtype)
        v_new = _check_new("v_new", v_new, (B, Hkv, 0, Dv), layout, k_cache.dtype, q.dtype)
        l_ax = 2 if layout == "bhld" else 1
        if k_new.shape[l_ax] != v_new.shape[l_ax]:
            raise AttentionValueError(
                f"k_new and v_new must hold the same number of new tokens, got k_new{_shape(k_new.shape)} "
                f"and v_new{_shape(v_new.shape)}"
            )
        for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
            if not x.flags.writeable:
                raise AttentionValueError(f"{name} is read-only, but k_new/v_new must be written into it")
    # canonical (bhld) views: nothing is copied
    if layout == "blhd":
        q = q.swapaxes(1, 2)
        kp, vp = k_cache.swapaxes(1, 2), v_cache.swapaxes(1, 2)
        if k_new is not None:
            k_new, v_new = k_new.swapaxes(1, 2), v_new.swapaxes(1, 2)
    else:
        kp, vp = k_cache, v_cache
    Lnew = 0 if k_new is None else k_new.shape[2]
    paged = table is not None
    if paged:
        room = table.shape[1] * kp.shape[2]
    else:
        room = kp.shape[2]
        table = np.arange(B, dtype=np.int64)[:, None]
    added = Lnew if new_counts is None else new_counts
    lengths = _check_lengths(cache_lengths, B, added, room, paged)
    if paged:
        _check_pages(table, lengths + added, kp.shape[2], kp.shape[0])
    compute = _F64 if q.dtype == _F64 else _F32
    return DecodeCall(
        q=q,
        k_pages=kp,
        v_pages=vp,
        block_table=table,
        cache_lengths=lengths,
        k_new=k_new,
        v_new=v_new,
        causal=_check_causal(causal),
        window=semantics.check_window(window),
        scale=semantics.check_scale(scale, D),
        softcap=semantics.check_softcap(softcap),
        alibi_slopes=semantics.check_alibi_slopes(alibi_slopes, B, Hq, compute),
        rotary=_check_rotary(rotary, D, compute, lengths, Lnew, Lq),
        dtype=q.dtype,
        cache_dtype=k_cache.dtype,
        layout=layout,
        paged=paged,
        k_cache=k_cache,
        v_cache=v_cache,
    )


# =================================================================================
# positions, rotary and the in-place append
# =================================================================================


def query_positions(call: DecodeCall) -> np.ndarray:
    """int64 (B, Lq): position of each query row on its sequence's key axis (bottom-right)."""
    return (call.kv_lengths - call.Lq)[:, None] + np.arange(call.Lq)[None, :]


def apply_rotary(x: np.ndarray, positions: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """RoPE in the non-interleaved ("rotate half") form on the first ``2·R`` dims of ``x``.

    ``x (B, H, L, D)`` in the compute dtype, ``positions (B, L)``, ``cos``/``sin`` ``(P, R)``:
    ``x[:R], x[R:2R] ← x[:R]·cos − x[R:2R]·sin, x[R:2R]·cos + x[:R]·sin`` at each row's
    position — the convention of GPT-NeoX, Llama in ``transformers`` and FlashAttention's
    default (``rotary_interleaved=False``).  Returns a new array.
    """
    R = cos.shape[1]
    c = cos[positions][:, None]  # (B, 1, L, R)
    s = sin[positions][:, None]
    out = np.array(x, copy=True)
    x1, x2 = x[..., :R], x[..., R : 2 * R]
    out[..., :R] = x1 * c - x2 * s
    out[..., R : 2 * R] = x2 * c + x1 * s
    return out


def write_new(call: DecodeCall, counts: np.ndarray | None = None) -> None:
    """Write ``k_new``/``v_new`` at ``[cache_lengths[b], cache_lengths[b] + Lnew)`` in place.

    ``counts`` (B,) writes only the first ``counts[b]`` new tokens of sequence b (padded
    prompts appended by :class:`KVCache`).  Keys are rotated first when ``call.rotary`` is set.
    """
    if call.k_new is None or call.Lnew == 0:
        return
    k_new, v_new = call.k_new, call.v_new
    pos = call.cache_lengths[:, None] + np.arange(call.Lnew)[None, :]  # (B, Lnew)
    if call.rotary is not None:
        k_new = apply_rotary(k_new.astype(call.compute_dtype), pos, *call.rotary)
    ps = call.page_size
    if counts is None:
        if call.paged:
            pages, slots = call.block_table[np.arange(call.B)[:, None], pos // ps], pos % ps
        else:  # one page per sequence: no division
            pages, slots = np.arange(call.B)[:, None], pos
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


# =================================================================================
# the public call
# =================================================================================


def _as_numpy(name: str, x: Any):
    """Torch CPU tensors → NumPy views of their memory; anything else unchanged."""
    if x is None or isinstance(x, np.ndarray):
        return x
    if framework_of(x) == "torch":
        from .torch._convert import check_device, to_numpy

        check_device(name, x)
        return to_numpy(name, x)
    return x


def _check_library(arrays: dict[str, Any]) -> str:
    kinds = {}
    for name, x in arrays.items():
        if x is None:
            continue
        fw = framework_of(x)
        if fw not in ("numpy", "torch"):
            what = fw or f"{type(x).__module__}.{type(x).__name__}"
            raise AttentionTypeError(f"{name} must be a NumPy array or a torch tensor, got {what}")
        kinds[name] = fw
    if len(set(kinds.values())) > 1:
        desc = ", ".join(f"{n} is {f}" for n, f in kinds.items())
        raise AttentionTypeError(f"q, the caches and the new keys/values must come from one library, got {desc}")
    return kinds.get("q", "numpy")


def _check_no_grad(arrays: dict[str, Any]) -> None:
    import torch

    if not torch.is_grad_enabled():
        return
    for name, x in arrays.items():
        if x is not None and x.requires_grad:
            raise AttentionValueError(
                f"{name} requires grad, but attention_with_kvcache has no backward pass; "
                "call it under torch.no_grad() or torch.inference_mode() (use dotattn.attention() for training)"
            )


def _kernel(implementation: str | None):
    """The decode kernel module for ``implementation`` (None: ``cpu`` when Numba is there)."""
    global _cpu_ok
    if implementation is None:
        if _cpu_ok is None:
            _cpu_ok = "cpu" in _IMPLEMENTATIONS and importlib.util.find_spec("numba") is not None
        implementation = "cpu" if _cpu_ok else "numpy"
    module = _kernel_modules.get(implementation)
    if module is not None:
        return implementation, module
    if implementation not in _IMPLEMENTATIONS:
        raise AttentionValueError(
            f"implementation must be None or one of {list(_IMPLEMENTATIONS)} for attention_with_kvcache, "
            f"got {implementation!r}"
        )
    try:
        module = importlib.import_module(_IMPLEMENTATIONS[implementation])
    except ImportError as exc:
        raise UnsupportedCallError(f"implementation={implementation!r} is not available here: {exc}") from None
    _kernel_modules[implementation] = module
    return implementation, module


def attention_with_kvcache(
    q: Any,
    k_cache: Any,
    v_cache: Any,
    k_new: Any = None,
    v_new: Any = None,
    *,
    cache_lengths: Any,
    block_table: Any = None,
    causal: bool | str = True,
    window: tuple[int | None, int | None] | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    alibi_slopes: Any = None,
    rotary: tuple[Any, Any] | None = None,
    return_lse: bool = False,
    layout: str = "bhld",
    implementation: str | None = None,
):
    """Attention of new query rows over a KV cache, appending new keys/values in place.

    Shapes (``layout="bhld"``; ``"blhd"`` swaps the L and H axes of q, k_new, v_new, out and
    the contiguous cache, and the page-size and head axes of a paged cache)::

        q            (B, Hq, Lq, D)            out (B, Hq, Lq, Dv)      lse (B, Hq, Lq)
        k_cache      (B, Hkv, capacity, D)     v_cache (B, Hkv, capacity, Dv)
          or paged   (num_pages, Hkv, page_size, D) with block_table int (B, max_pages)
        k_new, v_new (B, Hkv, Lnew, D), (B, Hkv, Lnew, Dv)      cache_lengths int (B,)

    Args:
        cache_lengths: tokens already in each sequence's cache *before* this call.  The call
            does not change it (:class:`KVCache` keeps lengths for you).
        k_new, v_new: written in place at ``[cache_lengths[b], cache_lengths[b] + Lnew)``
            (both or neither).  They may be in q's dtype; they are stored in the cache's.
        block_table: logical page ``i`` of sequence ``b`` is physical page
            ``block_table[b, i]``; any page size ≥ 1.  Entries past the pages a sequence
            uses are ignored (may hold −1); pages in use must lie in the pool and not repeat.
        causal: True (bottom-right: query ``i`` sits at ``cache_lengths[b] + Lnew − Lq + i``
            and sees keys up to it) or False (every key in ``[0, cache_lengths[b] + Lnew)``).
        window, scale, softcap, alibi_slopes: as in :func:`dotattn.attention`.
        rotary: ``(cos, sin)``, each ``(positions, R)`` with ``2R ≤ D``: RoPE (non-interleaved,
            "rotate half") applied to q and k_new at their absolute positions; the cache keeps
            rotated keys.
        return_lse: also return the natural-log LSE ``(B, Hq, Lq)`` (float32; float64 for a
            float64 call).
        implementation: None (``cpu`` when Numba is installed, else ``numpy``), ``"cpu"``,
            ``"numpy"`` or ``"reference"``.  CUDA tensors run on the Triton split-KV kernel
            (``kernels/triton_decode.py``); ``"triton"`` runs it on CPU tensors under
            ``TRITON_INTERPRET=1``.

    Caches may be float64, float32, float16 or bfloat16; q has the cache's dtype or is float32
    with a 16-bit cache; the output has q's dtype.  NumPy arrays or torch CPU tensors (written
    in place through a shared-memory view).  No backward pass: with torch, call it under
    ``torch.no_grad()``.  A refused call writes nothing.  Keys are processed in chunks of
    :data:`SPLIT_SIZE` positions, so each sequence's output is bitwise independent of the
    rest of the batch, the capacity and the page layout.
    """
    arrays = dict(q=q, k_cache=k_cache, v_cache=v_cache, k_new=k_new, v_new=v_new)
    # The common NumPy call skips the library scan (a decode step is many small calls).
    plain = type(q) is np.ndarray and type(k_cache) is np.ndarray and type(v_cache) is np.ndarray
    fw = "numpy" if plain and (k_new is None or type(k_new) is np.ndarray) else _check_library(arrays)
    if fw == "torch":
        _check_no_grad(arrays)
        if q.device.type != "cpu" or implementation == "triton":
            # CUDA tensors (or CPU ones under Triton's interpreter): the triton split-KV kernel,
            # validated by normalize() on stand-ins, appended in place on the device.
            from .kernels.triton_decode import attention_with_kvcache_tensors

            if not isinstance(return_lse, (bool, np.bool_)):
                raise AttentionTypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
            return attention_with_kvcache_tensors(
                q, k_cache, v_cache, k_new, v_new, cache_lengths=cache_lengths, block_table=block_table,
                causal=causal, window=window, scale=scale, softcap=softcap, alibi_slopes=alibi_slopes,
                rotary=rotary, return_lse=bool(return_lse), layout=layout,
            )
        q, k_cache, v_cache, k_new, v_new = (_as_numpy(n, x) for n, x in arrays.items())
        cache_lengths = _as_numpy("cache_lengths", cache_lengths)
        block_table = _as_numpy("block_table", block_table)
        alibi_slopes = _as_numpy("alibi_slopes", alibi_slopes)
    if not isinstance(return_lse, (bool, np.bool_)):
        raise AttentionTypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    name, kernel = _kernel(implementation)
    call = normalize(
        q, k_cache, v_cache, k_new, v_new, cache_lengths=cache_lengths, block_table=block_table,
        causal=causal, window=window, scale=scale, softcap=softcap, alibi_slopes=alibi_slopes,
        rotary=rotary, layout=layout,
    )
    out, lse = kernel.decode(call, reference=name == "reference")
    out = out.astype(call.dtype, copy=False)
    if layout == "blhd":
        out = np.ascontiguousarray(out.swapaxes(1, 2))
    if fw == "torch":
        from .torch._convert import from_numpy

        out = from_numpy(out)
        lse = from_numpy(lse) if return_lse else None
    return (out, lse) if return_lse else out


# =================================================================================
# KVCache: buffers, lengths and pages for a model
# =================================================================================


def _resolve_dtype(dtype: Any, library: str):
    """A dtype given as a name, a NumPy dtype or a torch dtype → (numpy dtype, library's dtype)."""
    if library == "torch":
        import torch

        if isinstance(dtype, torch.dtype):
            names = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float64: "float64"}
            if dtype not in names:
                raise AttentionTypeError(f"dtype must be float16, bfloat16, float32 or float64, got {dtype}")
            dtype = names[dtype]
    try:
        np_dtype = BFLOAT16 if str(dtype) == "bfloat16" else np.dtype(dtype)
    except TypeError:
        raise AttentionTypeError(f"dtype must be float16, bfloat16, float32 or float64, got {dtype!r}") from None
    if np_dtype not in FLOAT_DTYPES:
        raise AttentionTypeError(f"dtype must be float16, bfloat16, float32 or float64, got {np_dtype}")
    if library == "numpy":
        return np_dtype, np_dtype
    import torch

    return np_dtype, getattr(torch, "bfloat16" if np_dtype == BFLOAT16 else np_dtype.name)


def _positive_int(name: str, x: Any, minimum: int = 1) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise AttentionTypeError(f"{name} must be an int, got {type(x).__name__}")
    if x < minimum:
        raise AttentionValueError(f"{name} must be ≥ {minimum}, got {x}")
    return int(x)


class KVCache:
    """A KV cache for one model: buffers, per-sequence lengths, pages from a free list.

    Contiguous (``page_size=None``): ``k`` is ``(num_layers, B, Hkv, capacity, D)``.
    Paged (``page_size=p``): ``k`` is ``(num_layers, num_pages, Hkv, p, D)`` and
    :attr:`block_table` ``(B, ⌈capacity/p⌉)`` maps each sequence's logical pages to physical
    ones, handed out from a free list as sequences grow and returned by :meth:`reset`.
    (``layout="blhd"`` swaps the last axes as in :func:`attention_with_kvcache`.)

    **One cache for all layers** (``num_layers=L``) is the intended use for a model: the
    layers share one page table and one set of lengths, since every layer stores the same
    tokens.  A decoding step calls :meth:`attend` (or :meth:`append`) once per layer, in
    order 0…L−1; each call writes at the current lengths and the lengths advance when layer
    L−1 has written.  With ``num_layers=1`` (e.g. one cache per layer, or a single attention
    layer) every call advances them.

    Example (a 30-layer model, a batch of prompts of different lengths)::

        cache = KVCache(batch_size=4, num_kv_heads=3, head_dim=64, capacity=8192,
                        num_layers=30, page_size=64)
        for layer in range(30):                     # prefill: real tokens only
            cache.append(k[layer], v[layer], layer=layer, lengths=prompt_lengths)
        for layer in range(30):                     # one decoding step
            out = cache.attend(q[layer], k_new[layer], v_new[layer], layer=layer, rotary=(cos, sin))

    Buffers are NumPy arrays or, with ``library="torch"``, torch CPU tensors; unused slots
    start as zeros (``fill=`` chooses another value; tests use NaN).
    """

    def __init__(
        self,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        *,
        value_dim: int | None = None,
        dtype: Any = "float32",
        num_layers: int = 1,
        page_size: int | None = None,
        num_pages: int | None = None,
        layout: str = "bhld",
        library: str = "numpy",
        fill: float = 0.0,
    ):
        self.batch_size = _positive_int("batch_size", batch_size)
        self.num_kv_heads = _positive_int("num_kv_heads", num_kv_heads)
        self.head_dim = _positive_int("head_dim", head_dim)
        self.value_dim = self.head_dim if value_dim is None else _positive_int("value_dim", value_dim)
        self.capacity = _positive_int("capacity", capacity)
        self.num_layers = _positive_int("num_layers", num_layers)
        self.layout = semantics.check_layout(layout)
        if library not in ("numpy", "torch"):
            raise AttentionValueError(f"library must be 'numpy' or 'torch', got {library!r}")
        self.library = library
        self.dtype, lib_dtype = _resolve_dtype(dtype, library)
        self.page_size = None if page_size is None else _positive_int("page_size", page_size)
        B, H, cap = self.batch_size, self.num_kv_heads, self.capacity
        if self.page_size is None:
            if num_pages is not None:
                raise AttentionValueError("num_pages needs page_size= (a paged cache)")
            self.max_pages = 1
            lead = (self.num_layers, B, H, cap) if layout == "bhld" else (self.num_layers, B, cap, H)
            self.num_pages = 0
        else:
            self.max_pages = -(-cap // self.page_size)
            default_pages = B * self.max_pages
            self.num_pages = default_pages if num_pages is None else _positive_int("num_pages", num_pages)
            p = self.page_size
            lead = (self.num_layers, self.num_pages, H, p) if layout == "bhld" else (self.num_layers, self.num_pages, p, H)
        self.k = self._buffer(lead + (self.head_dim,), lib_dtype, fill)
        self.v = self._buffer(lead + (self.value_dim,), lib_dtype, fill)
        # NumPy views of the buffers' memory (the buffers themselves for NumPy), made once:
        # converting the buffers on every call would cost more than a small decode step.
        self._k_np, self._v_np = _as_numpy("k", self.k), _as_numpy("v", self.v)
        self._lengths = np.zeros(B, dtype=np.int64)
        if self.page_size is not None:
            self._table = np.full((B, self.max_pages), -1, dtype=np.int64)
            self._free = list(range(self.num_pages - 1, -1, -1))  # pop() hands out page 0 first

    def _buffer(self, shape, lib_dtype, fill):
        if self.library == "numpy":
            return np.full(shape, fill, dtype=lib_dtype)
        import torch

        return torch.full(shape, fill, dtype=lib_dtype)

    # ---- state ------------------------------------------------------------------
    @property
    def lengths(self) -> np.ndarray:
        """Tokens each sequence holds (a copy, int64 ``(B,)``)."""
        return self._lengths.copy()

    @property
    def block_table(self) -> np.ndarray | None:
        """int64 ``(B, max_pages)``: physical page of each logical page, −1 where none (paged only)."""
        return None if self.page_size is None else self._table.copy()

    @property
    def free_pages(self) -> int:
        """Pages not held by any sequence (paged only; 0 for a contiguous cache)."""
        return len(self._free) if self.page_size is not None else 0

    def layer(self, layer: int) -> tuple[Any, Any]:
        """``(k, v)`` buffers of one layer (views)."""
        return self.k[self._layer_index(layer)], self.v[self._layer_index(layer)]

    def _layer_index(self, layer: Any) -> int:
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or not 0 <= layer < self.num_layers:
            raise AttentionValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")
        return int(layer)

    def reset(self, b: int | None = None) -> None:
        """Empty sequence ``b`` (every sequence when None); its pages go back to the free list."""
        seqs = range(self.batch_size) if b is None else [self._seq_index(b)]
        for s in seqs:
            self._lengths[s] = 0
            if self.page_size is not None:
                held = [int(p) for p in self._table[s] if p >= 0]
                self._free.extend(reversed(held))
                self._table[s] = -1

    def _seq_index(self, b: Any) -> int:
        if isinstance(b, bool) or not isinstance(b, numbers.Integral) or not 0 <= b < self.batch_size:
            raise AttentionValueError(f"b must be a sequence index in [0, {self.batch_size}), got {b!r}")
        return int(b)

    # ---- pages ------------------------------------------------------------------
    def _plan(self, new_lengths: np.ndarray) -> np.ndarray | None:
        """The block table with the pages ``new_lengths`` need added (not yet taken: a refused
        call must leave the cache as it was; :meth:`_commit` takes them)."""
        if self.page_size is None:
            return None
        need = -(-new_lengths // self.page_size)
        have = (self._table >= 0).sum(axis=1)
        missing = np.maximum(need - have, 0)
        total = int(missing.sum())
        if total == 0:
            return self._table
        if total > len(self._free):
            raise AttentionValueError(
                f"the KV cache is out of pages: this step needs {total} more page(s) of {self.page_size} tokens, "
                f"{len(self._free)} are free; reset() finished sequences or create the cache with more num_pages"
            )
        table = self._table.copy()
        free = len(self._free)
        for b in np.flatnonzero(missing):
            for i in range(int(have[b]), int(need[b])):
                free -= 1
                table[b, i] = self._free[free]
        return table

    def _commit(self, table: np.ndarray | None) -> None:
        if table is None or table is self._table:
            return
        taken = int((table >= 0).sum() - (self._table >= 0).sum())
        del self._free[len(self._free) - taken :]
        self._table = table

    def _room_check(self, new_lengths: np.ndarray) -> None:
        over = new_lengths > self.capacity
        if over.any():
            b = int(np.argmax(over))
            raise AttentionValueError(
                f"sequence {b} does not fit: {int(self._lengths[b])} cached token(s) plus the new ones exceed "
                f"capacity={self.capacity}"
            )

    def _advance(self, layer: int, added: np.ndarray) -> None:
        if layer == self.num_layers - 1:
            self._lengths += added

    # ---- writing and attending ----------------------------------------------------
    def append(self, k_new: Any, v_new: Any, *, layer: int = 0, lengths: Any = None) -> None:
        """Store new keys/values without attending (e.g. after a prefill through ``attention()``).

        ``k_new (B, Hkv, Lnew, D)``; ``lengths`` (B,) stores only the first ``lengths[b]``
        tokens of sequence b (padded prompts); default all ``Lnew``.  Keys are stored as given
        (rotate them first if the model uses RoPE).
        """
        layer = self._layer_index(layer)
        k_buf, v_buf = self._k_np[layer], self._v_np[layer]
        k_np, v_np = _as_numpy("k_new", k_new), _as_numpy("v_new", v_new)
        k_np = _float_array("k_new", k_np)
        l_ax = 2 if self.layout == "bhld" else 1
        Lnew = k_np.shape[l_ax] if k_np.ndim == 4 else 0
        counts = np.full(self.batch_size, Lnew, dtype=np.int64)
        if lengths is not None:
            counts = semantics.check_batch_ints("lengths", _as_numpy("lengths", lengths), self.batch_size)
            bad = (counts < 0) | (counts > Lnew)
            if bad.any():
                b = int(np.argmax(bad))
                raise AttentionValueError(f"lengths must lie in [0, Lnew={Lnew}], got lengths[{b}] = {int(counts[b])}")
        new_lengths = self._lengths + counts
        self._room_check(new_lengths)
        # A query of no rows: the validation of attention_with_kvcache covers the append alone.
        q_shape = (self.batch_size, self.num_kv_heads, 0, self.head_dim)
        # float32 new keys may go into a 16-bit cache (as with a float32 q in attend()).
        q_dtype = _F32 if (k_np.dtype == _F32 and self.dtype in _SIXTEEN_BIT) else self.dtype
        q_none = np.empty(q_shape if self.layout == "bhld" else (q_shape[0], 0, q_shape[1], q_shape[3]), q_dtype)
        table = self._plan(new_lengths)
        call = normalize(
            q_none, _as_numpy("k_cache", k_buf), _as_numpy("v_cache", v_buf), k_np, v_np,
            cache_lengths=self._lengths, block_table=table, causal=True, window=None, scale=None,
            softcap=None, alibi_slopes=None, rotary=None, layout=self.layout, new_counts=counts,
        )
        self._commit(table)
        write_new(call, counts)
        self._advance(layer, counts)

    def attend(
        self,
        q: Any,
        k_new: Any = None,
        v_new: Any = None,
        *,
        layer: int = 0,
        causal: bool | str = True,
        window: tuple[int | None, int | None] | None = None,
        scale: float | None = None,
        softcap: float | None = None,
        alibi_slopes: Any = None,
        rotary: tuple[Any, Any] | None = None,
        return_lse: bool = False,
        implementation: str | None = None,
    ):
        """Append ``k_new``/``v_new`` (if given) and attend ``q`` over the sequence so far.

        Same arguments and results as :func:`attention_with_kvcache`, with the cache, its
        lengths and its pages supplied by this object.
        """
        layer = self._layer_index(layer)
        k_buf, v_buf = self._k_np[layer], self._v_np[layer]
        fw = framework_of(q)
        if fw != self.library:
            raise AttentionTypeError(
                f"q is a {fw or type(q).__name__} array, but this KVCache holds {self.library} buffers "
                f"(library={self.library!r})"
            )
        if fw == "torch":  # the buffers' NumPy views are kept: convert only the new arrays
            arrays = dict(q=q, k_new=k_new, v_new=v_new)
            _check_library(arrays)
            _check_no_grad(arrays)
            q, k_new, v_new = (_as_numpy(n, x) for n, x in arrays.items())
            alibi_slopes = _as_numpy("alibi_slopes", alibi_slopes)
        Lnew = 0
        if k_new is not None:
            shape = tuple(k_new.shape)
            if len(shape) == 4:
                Lnew = shape[2] if self.layout == "bhld" else shape[1]
        new_lengths = self._lengths + Lnew
        self._room_check(new_lengths)
        table = self._plan(new_lengths)
        result = attention_with_kvcache(
            q, k_buf, v_buf, k_new, v_new, cache_lengths=self._lengths, block_table=table,
            causal=causal, window=window, scale=scale, softcap=softcap, alibi_slopes=alibi_slopes,
            rotary=rotary, return_lse=return_lse, layout=self.layout, implementation=implementation,
        )
        self._commit(table)
        self._advance(layer, np.full(self.batch_size, Lnew, dtype=np.int64))
        if fw == "torch":
            from .torch._convert import from_numpy

            return tuple(from_numpy(x) for x in result) if return_lse else from_numpy(result)
        return result
