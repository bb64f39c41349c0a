"""What an ``attention()`` call means — decided here once, for every backend.

``normalize()`` validates every argument up front and turns the call into one
:class:`AttentionCall`: NumPy arrays in the canonical ``(B, H, L, D)`` layout plus
plain-Python options.  Backends only consume an ``AttentionCall``; they never
re-interpret masks, alignments or defaults.  ``finalize()`` turns a backend's
canonical results back into what the caller asked for.

Shape legend (used in every docstring and comment of the package)::

    B   batch (all leading dims flattened)     Hq / Hkv  query / key-value heads
    Lq  query length                           Lk        key length
    D   query/key head dim                     Dv        value head dim

Score order (see docs/semantics.md)::

    s = scale · q·kᵀ → softcap → + bias − ALiBi → masks → softmax → dropout → · v
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .errors import AttentionTypeError, AttentionValueError

try:  # ml_dtypes is a core dependency; the guard only keeps the error readable.
    import ml_dtypes

    BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml_dtypes is declared in pyproject
    BFLOAT16 = None

FLOAT_DTYPES = tuple(
    d for d in (np.dtype(np.float16), BFLOAT16, np.dtype(np.float32), np.dtype(np.float64)) if d is not None
)
CAUSAL_KINDS = ("bottom_right", "top_left")
LAYOUTS = ("bhld", "blhd")
DEFAULT_MAX_WEIGHTS_BYTES = 1 << 30  # 1 GiB of float32 weights unless the caller raises it


@dataclass(frozen=True)
class BlockGeometry:
    """INTERNAL (not public API): this call is one block of a larger attention problem.

    Ring and Ulysses attention (:mod:`dotattn.distributed`) compute a full problem of
    ``Hq`` query heads, ``Lq`` queries and ``Lk`` keys block by block; a block holds query
    rows ``[q_start, q_start + block Lq)``, keys ``[k_start, k_start + block Lk)`` and query
    heads ``[h_start, h_start + block Hq)`` of it.  Every position rule then measures in the
    full problem (bottom-right causal, windows and ALiBi use the full ``Lk − Lq``; top-left
    causal compares absolute indices) and the dropout counter uses the full problem's sizes
    and absolute indices, so a block's result is exactly the matching slice of the full
    call (merged over key blocks with :func:`dotattn.merge_attention_states`).
    A block call has no ``q_lengths``/``kv_lengths`` (the full problem has none).
    """

    q_start: int
    k_start: int
    Lq: int  # the full problem's query length
    Lk: int  # the full problem's key length
    h_start: int = 0
    Hq: int | None = None  # the full problem's query heads; None = the block's own


_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)


class QuerySizes:
    """The sizes a normalized call reads off its canonical ``q`` ``(B, Hq, Lq, D)``, and the
    accumulation dtype of its inputs' ``dtype``: shared by :class:`AttentionCall` and
    ``decode_semantics.DecodeCall``."""

    __slots__ = ()

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
    def compute_dtype(self) -> np.dtype:
        """Accumulation dtype: float64 for float64 inputs, float32 otherwise."""
        return _F64 if self.dtype == _F64 else _F32


@dataclass(frozen=True, eq=False)
class AttentionCall(QuerySizes):
    """One normalized attention call: what every backend consumes.

    Arrays are NumPy, canonical layout, leading batch dims flattened to ``B``:
    ``q (B, Hq, Lq, D)``, ``k (B, Hkv, Lk, D)``, ``v (B, Hkv, Lk, Dv)``.  They may be
    non-contiguous views of the caller's data (``layout="blhd"`` gives transposed
    views); backends copy what they need.
    """

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    batch_shape: tuple[int, ...]  # the caller's leading dims; () for 2-D and 3-D inputs
    input_ndim: int  # 2, 3 or ≥ 4
    layout: str
    scale: float
    softcap: float | None
    bias: np.ndarray | None  # (B, Hq, Lq, Lk), possibly a zero-stride broadcast view
    bias_shape: tuple[int, ...] | None  # the caller's bias shape, for reducing its gradient
    alibi_slopes: np.ndarray | None  # (B, Hq) in the compute dtype
    mask: np.ndarray | None  # bool (B, Hq, Lq, Lk), True = attend, possibly a broadcast view
    causal: str | None  # None, "bottom_right" or "top_left"
    window: tuple[int | None, int | None] | None
    q_lengths: np.ndarray | None  # int64 (B,)
    kv_lengths: np.ndarray | None  # int64 (B,)
    q_segment_ids: np.ndarray | None  # int64 (B, Lq)
    kv_segment_ids: np.ndarray | None  # int64 (B, Lk)
    dropout_p: float
    seed: int | None
    dtype: np.dtype  # the inputs' dtype, also the output's
    extras: dict[str, Any] = field(default_factory=dict)  # backend-specific options (score_mod, …)
    block: BlockGeometry | None = None  # INTERNAL: one block of a larger problem (see BlockGeometry)

    # ---- sizes -----------------------------------------------------------------
    @property
    def Hkv(self) -> int:
        return self.k.shape[1]

    @property
    def group(self) -> int:
        """Query heads per K/V head: query head ``h`` reads K/V head ``h // group`` (1 with no heads)."""
        return self.Hq // self.Hkv if self.Hkv else 1

    @property
    def Lk(self) -> int:
        return self.k.shape[2]

    @property
    def Dv(self) -> int:
        return self.v.shape[3]

    # ---- positions -------------------------------------------------------------
    def q_len(self, b: int) -> int:
        """Real query length of sequence ``b`` (rows past it are padding)."""
        return self.Lq if self.q_lengths is None else int(self.q_lengths[b])

    def kv_len(self, b: int) -> int:
        """Real key length of sequence ``b`` (keys past it are invisible)."""
        return self.Lk if self.kv_lengths is None else int(self.kv_lengths[b])

    def q_offset(self, b: int) -> int:
        """Position of query row 0 on the key axis (bottom-right alignment).

        Query ``i`` sits at position ``i + q_offset(b)``; ALiBi, windows and bottom-right
        causal all measure distances from there.  Top-left causal uses offset 0.
        """
        return self.kv_len(b) - self.q_len(b) + self.position_shift

    @property
    def position_shift(self) -> int:
        """Extra bottom-right offset of a block call (0 for a whole problem).

        A block's query ``i`` sits at full-problem position ``i + q_start + (Lk − Lq)`` of
        the full sizes, i.e. at local key index ``i + q_start − k_start + Lk − Lq``.
        """
        g = self.block
        if g is None:
            return 0
        return (g.q_start - g.k_start + g.Lk - g.Lq) - (self.Lk - self.Lq)

    @property
    def top_left_offset(self) -> int:
        """Top-left causal lets query ``i`` see local keys ``j ≤ i + top_left_offset``."""
        g = self.block
        return 0 if g is None else g.q_start - g.k_start

    @property
    def dropout_geometry(self) -> tuple[int, int, int, int, int, int]:
        """``(h0, row0, col0, Hq, Lq, Lk)`` of the dropout counter.

        Element ``(b, h, i, j)`` of this call draws counter
        ``((b·Hq + h0 + h)·Lq + row0 + i)·Lk + col0 + j`` — the full problem's sizes and
        absolute indices for a block call, so its mask is the full call's, bit for bit.
        """
        g = self.block
        if g is None:
            return 0, 0, 0, self.Hq, self.Lq, self.Lk
        return g.h_start, g.q_start, g.k_start, (g.Hq or self.Hq), g.Lq, g.Lk

    @property
    def has_structure_mask(self) -> bool:
        """True when some rule other than lengths hides keys (used to pick fast paths)."""
        return (
            self.mask is not None
            or self.causal is not None
            or self.window is not None
            or self.q_segment_ids is not None
        )

    def visible(self, b: int, h: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Boolean visibility of keys ``cols`` for queries ``rows`` of sequence ``b``, head ``h``.

        ``rows``/``cols`` are 1-D int arrays of absolute indices; the result is
        ``(len(rows), len(cols))``.  This is the single definition of visibility; the
        reference uses it whole and tiled backends use it on blocks.
        """
        r = rows[:, None]
        c = cols[None, :]
        q_seg = kv_seg = None
        if self.q_segment_ids is not None:
            q_seg = self.q_segment_ids[b, rows][:, None]
            kv_seg = self.kv_segment_ids[b, cols][None, :]
        vis = visibility(
            r, c, causal=self.causal, window=self.window, q_offset=self.q_offset(b),
            q_len=self.q_len(b), kv_len=self.kv_len(b), q_seg=q_seg, kv_seg=kv_seg,
            top_left_offset=self.top_left_offset,
        )
        if self.mask is not None:
            vis = vis & self.mask[b, h][np.ix_(rows, cols)]
        return vis


def block_call(call: AttentionCall, block: BlockGeometry, **changes: Any) -> AttentionCall:
    """INTERNAL: a copy of ``call`` computing one block of a larger problem.

    ``changes`` replaces fields (``q``, ``k``, ``v`` of the block in canonical layout, its
    ``q_segment_ids``/``kv_segment_ids`` and ``alibi_slopes`` slices, ``causal``/``window``
    when the caller knows the block needs none).  Block calls carry no lengths, mask or bias
    (the distributed entry points take none), and the block must lie inside the full problem.
    """
    new = replace(call, block=block, **changes)
    if new.q_lengths is not None or new.kv_lengths is not None or new.mask is not None or new.bias is not None:
        raise AttentionValueError("a block call takes no q_lengths, kv_lengths, mask or bias")
    inside = (
        0 <= block.q_start and block.q_start + new.Lq <= block.Lq
        and 0 <= block.k_start and block.k_start + new.Lk <= block.Lk
        and 0 <= block.h_start and block.h_start + new.Hq <= (block.Hq or new.Hq)
    )
    if not inside:
        raise AttentionValueError(
            f"block rows [{block.q_start}, {block.q_start + new.Lq}), keys [{block.k_start}, "
            f"{block.k_start + new.Lk}), heads [{block.h_start}, {block.h_start + new.Hq}) do not lie inside "
            f"the full problem (Hq={block.Hq or new.Hq}, Lq={block.Lq}, Lk={block.Lk})"
        )
    return new


def visibility(
    rows, cols, *, causal, window, q_offset, q_len=None, kv_len=None, q_seg=None, kv_seg=None, top_left_offset=0
):
    """The visibility rules other than ``mask``, on any array library with NumPy operators.

    ``rows``/``cols`` are absolute query/key indices broadcast against each other (and
    against ``q_len``, ``kv_len``, ``q_offset``, ``q_seg``, ``kv_seg``, which may be Python
    ints or arrays of NumPy or JAX).  Query ``i`` sits at position ``i + q_offset`` on the
    key axis (bottom-right alignment; ``q_offset = kv_len − q_len``); top-left causal lets
    query ``i`` see keys ``j ≤ i + top_left_offset`` (non-zero only for internal block calls).  Returns the boolean
    visibility, or ``None`` when no rule applies (everything visible).  This is the single
    definition of the rules: :meth:`AttentionCall.visible` and the JAX kernel both use it.
    """
    vis = None

    def both(a, b):
        return b if a is None else a & b

    if q_len is not None:
        vis = both(vis, rows < q_len)
    if kv_len is not None:
        vis = both(vis, cols < kv_len)
    pos_q = rows + q_offset
    if causal == "bottom_right":
        vis = both(vis, cols <= pos_q)
    elif causal == "top_left":
        vis = both(vis, cols <= rows + top_left_offset)
    if window is not None:
        left, right = window
        if left is not None:
            vis = both(vis, cols >= pos_q - left)
        if right is not None:
            vis = both(vis, cols <= pos_q + right)
    if q_seg is not None:
        vis = both(vis, q_seg == kv_seg)
    return vis


def _call_defaults() -> tuple[tuple[str, Any, Any], ...]:
    import dataclasses

    return tuple(
        (f.name, f.default, None if f.default_factory is dataclasses.MISSING else f.default_factory)
        for f in dataclasses.fields(AttentionCall)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    )


_CALL_DEFAULTS = _call_defaults()


def _new_call(**values: Any) -> AttentionCall:
    """``AttentionCall(**values)``, without the frozen dataclass's ``__init__``.

    That ``__init__`` sets each of the ~20 fields through ``object.__setattr__`` (≈ 3 µs,
    a tenth of a whole decode-step call); filling ``__dict__`` gives the same object in
    ≈ 0.5 µs.  Fields with defaults that ``values`` lacks get them, as ``__init__`` would.
    """
    call = object.__new__(AttentionCall)
    fields = call.__dict__
    for name, default, factory in _CALL_DEFAULTS:
        if name not in values:
            fields[name] = default if factory is None else factory()
    fields.update(values)
    return call


# =================================================================================
# validation helpers: one small function per concern, messages that name names
# =================================================================================


def _shape_str(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def stand_in(shape: tuple[int, ...], dtype: Any, fill: Any = 0) -> np.ndarray:
    """A zero-stride NumPy array of ``shape`` and ``dtype``: validates a traced or device array.

    Front ends whose values are not available yet (JAX tracers, symbolic TensorFlow tensors)
    pass these to :func:`normalize`, so shape, dtype and option checks are the same
    functions for them as for NumPy; only value checks (lengths in range) see ``fill``.
    """
    return np.broadcast_to(np.full((), fill, dtype=np.dtype(dtype)), tuple(shape))


def refuse_masked(name: str, x: Any) -> None:
    """A NumPy masked array is refused: no kernel reads its mask, so its hidden entries would
    count silently (or its type would reach a compiled kernel that cannot take it)."""
    if isinstance(x, _MASKED_ARRAY):
        raise AttentionTypeError(
            f"{name} is a numpy.ma.MaskedArray, whose mask dotattn does not read; pass its data "
            f"(numpy.ma.getdata({name})) and say what to hide with mask=, kv_lengths= or cache_lengths="
        )


_MASKED_ARRAY = np.ma.MaskedArray


def _require_array(name: str, x: Any) -> np.ndarray:
    if type(x) is np.ndarray:
        return x
    if isinstance(x, np.ndarray):
        refuse_masked(name, x)
        return x
    if isinstance(x, (list, tuple)) or np.isscalar(x):
        raise AttentionTypeError(
            f"{name} must be an array (numpy.ndarray or a tensor of a supported framework), "
            f"got {type(x).__name__}; wrap it with numpy.asarray() first"
        )
    raise AttentionTypeError(f"{name} must be an array, got {type(x).__module__}.{type(x).__name__}")


def _check_qkv(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.dtype:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in FLOAT_DTYPES:
            raise AttentionTypeError(
                f"{name} must have a floating dtype (float16, bfloat16, float32 or float64), got {x.dtype}"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise AttentionTypeError(
            f"q, k and v must share one dtype, got q.dtype={q.dtype}, k.dtype={k.dtype}, v.dtype={v.dtype}; "
            "cast them to one dtype first"
        )
    if not (q.ndim == k.ndim == v.ndim):
        raise AttentionValueError(
            f"q, k and v must have the same number of dims, got q{_shape_str(q.shape)}, "
            f"k{_shape_str(k.shape)}, v{_shape_str(v.shape)}"
        )
    if q.ndim < 2:
        raise AttentionValueError(
            f"q, k and v need at least 2 dims (L, D), got q with {q.ndim} dim(s) {_shape_str(q.shape)}"
        )
    return q.dtype


def _to_canonical(x: np.ndarray, layout: str) -> np.ndarray:
    """(..., H, L, D) or (..., L, H, D) → (B, H, L, D) view (2-D/3-D get unit dims)."""
    if x.ndim == 2:
        return x[None, None]
    if layout == "blhd":
        x = x.swapaxes(-3, -2)  # a method: NumPy, JAX and torch arrays all have it
    if x.ndim == 3:
        return x[None]
    # An explicit B, not -1: NumPy cannot infer -1 when another dim is 0.
    return x.reshape((math.prod(x.shape[:-3]),) + x.shape[-3:]) if x.ndim > 4 else x


def to_canonical(x, layout: str):
    """The caller's q/k/v/out-shaped array → its canonical ``(B, H, L, D)`` view.

    Uses only ``swapaxes``/``reshape``/indexing, so it serves tensor backends too (a torch
    tensor gives a torch view).
    """
    return _to_canonical(x, layout)


def _check_shapes(q: np.ndarray, k: np.ndarray, v: np.ndarray, layout: str) -> None:
    """Leading dims equal, head counts compatible, D and Lk agree; layout-aware names."""
    if q.shape[:-3] != k.shape[:-3] or q.shape[:-3] != v.shape[:-3]:
        raise AttentionValueError(
            f"q, k and v must have equal leading (batch) dims — dotattn does not broadcast them — got "
            f"q{_shape_str(q.shape)}, k{_shape_str(k.shape)}, v{_shape_str(v.shape)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise AttentionValueError(
            f"q and k must have the same head dim D (last axis), got q D={q.shape[-1]} and k D={k.shape[-1]}"
        )
    if q.shape[-1] < 1:
        raise AttentionValueError(f"the head dim D must be ≥ 1, got q{_shape_str(q.shape)}")
    l_axis = -2
    h_axis = -3 if layout == "bhld" else -2
    if layout == "blhd":
        l_axis = -3
    if q.ndim == 2:
        h_axis = None
        l_axis = -2
    if k.shape[l_axis] != v.shape[l_axis]:
        raise AttentionValueError(
            f"k and v must have the same length Lk, got k{_shape_str(k.shape)} and v{_shape_str(v.shape)} "
            f"(layout={layout!r})"
        )
    if h_axis is not None and q.ndim >= 3:
        hq, hk, hv = q.shape[h_axis], k.shape[h_axis], v.shape[h_axis]
        if hk != hv:
            raise AttentionValueError(
                f"k and v must have the same number of heads, got k with {hk} and v with {hv} "
                f"(layout={layout!r})"
            )
        if (hk == 0 and hq != 0) or (hk != 0 and hq % hk != 0):
            raise AttentionValueError(
                f"k has {hk} heads, but q's {hq} heads are not a multiple of it "
                f"(grouped-query attention needs Hq % Hkv == 0; layout={layout!r})"
            )


def _as_float(name: str, x: numbers.Real) -> float:
    """``float(x)``; an int too large for a float is a ValueError naming ``name``, not a bare OverflowError."""
    try:
        return float(x)
    except OverflowError:
        raise AttentionValueError(f"{name} must be a finite number, got an int of {int(x).bit_length()} bits") from None


def check_scale(scale: Any, D: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(D)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise AttentionTypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    scale = _as_float("scale", scale)
    if not math.isfinite(scale):
        raise AttentionValueError(f"scale must be finite, got {scale}")
    return scale


def check_softcap(softcap: Any) -> float | None:
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise AttentionTypeError(f"softcap must be a positive number or None, got {type(softcap).__name__}")
    softcap = _as_float("softcap", softcap)
    if softcap == 0.0:
        raise AttentionValueError(
            "softcap must be > 0 or None; got 0.0 — FlashAttention uses softcap=0.0 for 'off', "
            "dotattn uses softcap=None"
        )
    if not (softcap > 0 and math.isfinite(softcap)):
        raise AttentionValueError(f"softcap must be a finite number > 0 or None, got {softcap}")
    return softcap


def check_causal(causal: Any) -> str | None:
    if isinstance(causal, np.bool_):  # a flag read from a NumPy array or config
        causal = bool(causal)
    if causal is False or causal is None:
        return None
    if causal is True:
        return "bottom_right"
    if isinstance(causal, str) and causal in CAUSAL_KINDS:
        return causal
    raise AttentionValueError(
        f"causal must be False, True, 'bottom_right' or 'top_left', got {causal!r}"
    )


def check_window(window: Any) -> tuple[int | None, int | None] | None:
    if window is None:
        return None
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise AttentionValueError(f"window must be a pair (left, right) or None, got {window!r}")
    sides = []
    for side_name, side in zip(("left", "right"), window):
        if side is None:
            sides.append(None)
            continue
        if isinstance(side, bool) or not isinstance(side, numbers.Integral):
            raise AttentionTypeError(f"window {side_name} side must be an int ≥ 0 or None, got {side!r}")
        if side < 0:
            hint = " — FlashAttention uses -1 for 'unbounded', dotattn uses None" if side == -1 else ""
            raise AttentionValueError(f"window {side_name} side must be ≥ 0 or None, got {side}{hint}")
        sides.append(int(side))
    if sides == [None, None]:
        return None
    return (sides[0], sides[1])


def clamp_window(window: tuple[int | None, int | None] | None, Lq: int, Lk: int):
    """A side that reaches past every key is unbounded (None): ``(0, 2**63 − 1)`` means ``(0, None)``.

    Query positions and keys lie within ``Lq + Lk`` of each other (bottom-right alignment,
    lengths included), so a larger side hides nothing; keeping it would overflow int64
    position arithmetic in the kernels.
    """
    if window is None:
        return None
    sides = tuple(None if side is None or side >= Lq + Lk else side for side in window)
    return None if sides == (None, None) else sides


def check_dropout(dropout_p: Any, seed: Any) -> tuple[float, int | None]:
    if seed is None and type(dropout_p) is float and dropout_p == 0.0:  # the common case, fast
        return 0.0, None
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise AttentionTypeError(f"dropout_p must be a number in [0, 1), got {type(dropout_p).__name__}")
    dropout_p = _as_float("dropout_p", dropout_p)
    if not (0.0 <= dropout_p < 1.0):
        raise AttentionValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return dropout_p, (None if seed is None else check_seed(seed))


def check_seed(seed: Any, name: str = "seed") -> int:
    """A random seed: an int in ``[0, 2**63)`` (dropout masks and layer initializations alike)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise AttentionTypeError(f"{name} must be an int or None, got {type(seed).__name__}")
    if not (0 <= int(seed) < 2**63):
        raise AttentionValueError(f"{name} must be in [0, 2**63), got {seed}")
    return int(seed)


_INT64_MAX = np.iinfo(np.int64).max


def int_array(name: str, x: Any) -> np.ndarray:
    """An integer array (Python ints beyond int64 and unsigned values included), refusing bool/float.

    Values outside int64 are refused with their real value, never wrapped by a cast.
    """
    if not isinstance(x, np.ndarray):
        arr = small_array(name, x)
        if arr.dtype.kind in "iu" and arr.ndim and isinstance(x, (list, tuple)):
            # NumPy reads [True, 2] as the ints [1, 2]; a bool is refused in an array, so in a list
            if any(isinstance(e, (bool, np.bool_)) for e in np.asarray(x, dtype=object).flat):
                raise AttentionTypeError(f"{name} must hold integers, got a bool among them")
    else:
        refuse_masked(name, x)
        arr = x
    if not isinstance(x, np.ndarray) and arr.dtype.kind == "f":
        # NumPy reads a list holding an int past int64 as float64 (or object): keep exact ints.
        exact = np.asarray(x, dtype=object)
        if exact.size and all(isinstance(e, numbers.Integral) and not isinstance(e, bool) for e in exact.flat):
            arr = exact
    if arr.dtype == object and arr.size and all(
        isinstance(e, numbers.Integral) and not isinstance(e, (bool, np.bool_)) for e in arr.flat
    ):
        big = [int(e) for e in arr.flat if not -_INT64_MAX - 1 <= int(e) <= _INT64_MAX]
        if big:
            raise AttentionValueError(f"{name} must fit in int64, got {big[0]}")
        arr = arr.astype(np.int64)
    # (kind, not issubdtype: NumPy files timedelta64 under np.integer, and bool is kind "b")
    if arr.dtype.kind not in "iu":
        raise AttentionTypeError(f"{name} must hold integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 8 and arr.size and int(arr.max()) > _INT64_MAX:
        raise AttentionValueError(f"{name} must fit in int64, got {int(arr.max())}")
    return arr


def small_array(name: str, x: Any) -> np.ndarray:
    """``np.asarray(x)`` for a small argument that is not an array (a list, a scalar): a ragged
    nested list gets an error naming the argument, not NumPy's "inhomogeneous shape"."""
    try:
        return np.asarray(x)
    except ValueError:
        raise AttentionValueError(
            f"{name} must be a rectangular array; got a {type(x).__name__} whose nested sequences differ in length"
        ) from None


def _batch_index_array(name: str, x: Any, batch_shape: tuple[int, ...], B: int) -> np.ndarray:
    """An int array of shape ``batch_shape`` (or a scalar) → int64 ``(B,)``."""
    arr = int_array(name, x)
    if arr.ndim == 0:
        return np.full(B, int(arr), dtype=np.int64)
    if arr.shape != batch_shape:
        want = _shape_str(batch_shape) if batch_shape else "() (a scalar, since the inputs have no batch dims)"
        raise AttentionValueError(f"{name} must have shape {want}, got {_shape_str(arr.shape)}")
    return arr.reshape(B).astype(np.int64)


def _check_lengths(name: str, x: Any, L: int, batch_shape, B) -> np.ndarray | None:
    if x is None:
        return None
    # Range first, in the caller's own dtype and values (a cast could wrap 2**64 − 1 to −1).
    arr = int_array(name, x)
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > L):
        flat = arr.reshape(-1)
        i = int(np.argmax((flat < 0) | (flat > L)))
        where = f"{name}[{i}]" if arr.ndim else name
        raise AttentionValueError(f"{name} must lie in [0, {L}], got {where} = {int(flat[i])}")
    return _batch_index_array(name, arr, batch_shape, B)


def is_one_id_array(ids: list | tuple, shape: tuple[int, ...]) -> bool:
    """True when a nested list is one ``(..., L)`` array of ids rather than a pair.

    A pair stacks to ``(2, ..., L)`` (or is ragged), never to ``(..., L)``, so the shape
    decides; without it, ``[[0, 0, 1], [0, 1, 1]]`` for a batch of 2 would read as a pair.
    """
    try:
        return np.shape(ids) == shape
    except ValueError:  # ragged: q_ids and kv_ids of different lengths
        return False


def _check_segment_ids(segment_ids: Any, batch_shape, B: int, Lq: int, Lk: int):
    if segment_ids is None:
        return None, None
    if isinstance(segment_ids, (tuple, list)) and not is_one_id_array(segment_ids, batch_shape + (Lq,)):
        if len(segment_ids) != 2:
            raise AttentionValueError(
                f"segment_ids must be one array (self-attention) or a pair (q_ids, kv_ids), "
                f"got a sequence of {len(segment_ids)}"
            )
        pairs = (("segment_ids[0] (query ids)", segment_ids[0], Lq), ("segment_ids[1] (key ids)", segment_ids[1], Lk))
    else:
        if Lq != Lk:
            raise AttentionValueError(
                f"a single segment_ids array needs Lq == Lk, got Lq={Lq}, Lk={Lk}; "
                "pass a pair (q_ids, kv_ids) for cross-attention"
            )
        pairs = (("segment_ids", segment_ids, Lq),)
    out = []
    for name, ids, L in pairs:
        arr = int_array(name, ids)
        want = batch_shape + (L,)
        if arr.shape != want:
            raise AttentionValueError(f"{name} must have shape {_shape_str(want)}, got {_shape_str(arr.shape)}")
        out.append(np.ascontiguousarray(arr.reshape(B, L), dtype=np.int64))
    if len(out) == 1:
        return out[0], out[0]
    return out[0], out[1]


def _broadcast_pairwise(
    name: str, x: Any, batch_shape: tuple[int, ...], Hq: int, Lq: int, Lk: int, B: int, kind: str
) -> tuple[np.ndarray, tuple[int, ...]]:
    """mask/bias broadcastable to (..., Hq, Lq, Lk) → a (B, Hq, Lq, Lk) view."""
    refuse_masked(name, x)
    arr = x if isinstance(x, np.ndarray) else np.asarray(x)
    if kind == "mask":
        if arr.dtype != bool:
            raise AttentionTypeError(
                f"mask must be a bool array (True = attend), got dtype {arr.dtype}; "
                "pass an additive float mask as bias= instead"
            )
    else:
        if not np.issubdtype(arr.dtype, np.floating) and arr.dtype != BFLOAT16:
            raise AttentionTypeError(f"bias must be a floating array, got dtype {arr.dtype}")
    full = batch_shape + (Hq, Lq, Lk)
    ok = arr.ndim <= len(full) and all(a in (1, f) for a, f in zip(arr.shape[::-1], full[::-1]))
    if not ok:
        raise AttentionValueError(
            f"{name} of shape {_shape_str(arr.shape)} does not broadcast to (..., Hq, Lq, Lk) = "
            f"{_shape_str(full)}"
        )
    view = np.broadcast_to(arr, full).reshape((B, Hq, Lq, Lk))
    return view, arr.shape


def _check_alibi(alibi_slopes: Any, batch_shape, B: int, Hq: int, dtype: np.dtype) -> np.ndarray | None:
    if alibi_slopes is None:
        return None
    refuse_masked("alibi_slopes", alibi_slopes)
    arr = alibi_slopes if isinstance(alibi_slopes, np.ndarray) else small_array("alibi_slopes", alibi_slopes)
    # (bfloat16 is ml_dtypes' type, which NumPy does not count as floating: a bfloat16 model's
    # slopes were refused as "not a float array")
    floating = np.issubdtype(arr.dtype, np.floating) or arr.dtype == BFLOAT16
    if not (floating or np.issubdtype(arr.dtype, np.integer)) or arr.dtype == bool:
        raise AttentionTypeError(f"alibi_slopes must be a float array, got dtype {arr.dtype}")
    if arr.shape == (Hq,):
        arr = np.broadcast_to(arr, (B, Hq))
    elif arr.shape == batch_shape + (Hq,) and batch_shape:
        arr = arr.reshape(B, Hq)
    else:
        want = "(Hq,)" + (f" or (..., Hq) = {_shape_str(batch_shape + (Hq,))}" if batch_shape else "")
        raise AttentionValueError(f"alibi_slopes must have shape {want} with Hq={Hq}, got {_shape_str(arr.shape)}")
    # NaN/±inf slopes are not refused: like any value that takes part in a row's scores they
    # follow IEEE arithmetic (docs/semantics.md, non-finite inputs).
    return np.ascontiguousarray(arr, dtype=dtype)


# Options that only some backends implement (user functions compiled into the ``cpu``
# kernels); they travel in ``AttentionCall.extras`` and backends refuse what they lack.
BACKEND_OPTIONS = ("score_mod", "mask_mod", "block_mask")


def _check_extras(extras: dict[str, Any] | None) -> None:
    """A keyword that is neither an option nor a backend option is a typo: say so, as Python would."""
    import difflib

    for name in extras or {}:
        if name not in BACKEND_OPTIONS:
            known = list(BACKEND_OPTIONS) + [n for n in normalize.__kwdefaults__ if n not in ("extras", "for_backward")]
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise AttentionTypeError(f"attention() got an unexpected keyword argument {name!r}{hint}")


def check_layout(layout: Any) -> str:
    if layout not in LAYOUTS:
        raise AttentionValueError(f"layout must be 'bhld' or 'blhd', got {layout!r}")
    return layout


# =================================================================================
# the entry points
# =================================================================================


def normalize(
    q: Any,
    k: Any,
    v: Any,
    *,
    mask: Any = None,
    bias: Any = None,
    causal: Any = False,
    window: Any = None,
    scale: Any = None,
    softcap: Any = None,
    alibi_slopes: Any = None,
    q_lengths: Any = None,
    kv_lengths: Any = None,
    segment_ids: Any = None,
    dropout_p: Any = 0.0,
    seed: Any = None,
    layout: Any = "bhld",
    extras: dict[str, Any] | None = None,
    for_backward: bool = False,
) -> AttentionCall:
    """Validate every argument and return the one :class:`AttentionCall` backends consume.

    With dropout and no ``seed``, a fresh seed is drawn from the OS entropy pool (as torch
    draws from its global generator); ``for_backward=True`` refuses that, since a backward
    pass must re-draw the forward's mask.
    """
    _check_extras(extras)
    q = _require_array("q", q)
    k = _require_array("k", k)
    v = _require_array("v", v)
    layout = check_layout(layout)
    dtype = _check_qkv(q, k, v)
    _check_shapes(q, k, v, layout)
    batch_shape = tuple(q.shape[:-3]) if q.ndim >= 4 else ()
    qc, kc, vc = (_to_canonical(x, layout) for x in (q, k, v))
    B, Hq, Lq, D = qc.shape
    Lk = kc.shape[2]
    compute = np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)

    scale_f = check_scale(scale, D)
    softcap_f = check_softcap(softcap)
    causal_s = check_causal(causal)
    window_t = clamp_window(check_window(window), Lq, Lk)
    dropout_f, seed_i = check_dropout(dropout_p, seed)
    if dropout_f > 0.0 and seed_i is None:
        if for_backward:
            raise AttentionValueError(
                "seed must be given for a backward pass with dropout_p > 0 — pass the seed the forward used"
            )
        seed_i = int(np.random.SeedSequence().generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
    q_len = _check_lengths("q_lengths", q_lengths, Lq, batch_shape, B)
    kv_len = _check_lengths("kv_lengths", kv_lengths, Lk, batch_shape, B)
    q_seg, kv_seg = _check_segment_ids(segment_ids, batch_shape, B, Lq, Lk)
    mask_v = bias_v = bias_shape = None
    if mask is not None:
        mask_v, _ = _broadcast_pairwise("mask", mask, batch_shape, Hq, Lq, Lk, B, "mask")
    if bias is not None:
        bias_v, bias_shape = _broadcast_pairwise("bias", bias, batch_shape, Hq, Lq, Lk, B, "bias")
    slopes = _check_alibi(alibi_slopes, batch_shape, B, Hq, compute)

    return _new_call(
        q=qc,
        k=kc,
        v=vc,
        batch_shape=batch_shape,
        input_ndim=q.ndim,
        layout=layout,
        scale=scale_f,
        softcap=softcap_f,
        bias=bias_v,
        bias_shape=bias_shape,
        alibi_slopes=slopes,
        mask=mask_v,
        causal=causal_s,
        window=window_t,
        q_lengths=q_len,
        kv_lengths=kv_len,
        q_segment_ids=q_seg,
        kv_segment_ids=kv_seg,
        dropout_p=dropout_f,
        seed=seed_i,
        dtype=dtype,
        extras=dict(extras or {}),
    )


# =================================================================================
# repeated calls: what normalize() decided once, reused for the next call of that kind
# =================================================================================

# Option values a plan key may hold: immutable, and (with their type in the key) equal only
# when normalize() treats them alike.  Anything else (NumPy scalars, lists, arrays) is not
# keyed, and the call takes normalize() every time.
_KEYABLE = frozenset({type(None), bool, int, str})


def _option_key(x: Any):
    """A hashable stand-in for an option value, or ``_NOT_KEYABLE``.

    The type is part of it: ``True == 1 == 1.0`` in Python, but ``causal=1`` is refused where
    ``causal=True`` is not.  A float keys on its exact bits (``-0.0 != 0.0`` here; NaN equals
    itself, and is refused by normalize() before any plan is made).
    """
    t = type(x)
    if t in _KEYABLE:
        return (t, x)
    if t is float:
        return (t, x.hex())
    if t is tuple:
        parts = tuple(_option_key(e) for e in x)
        return _NOT_KEYABLE if _NOT_KEYABLE in parts else (t, parts)
    return _NOT_KEYABLE


_NOT_KEYABLE = object()


def plan_key(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    causal: Any,
    window: Any,
    scale: Any,
    softcap: Any,
    dropout_p: Any,
    layout: Any,
    has_q_lengths: bool,
    has_kv_lengths: bool,
    implementation: Any,
) -> tuple | None:
    """What :func:`normalize` decides from everything but array VALUES, as a dict key — or None.

    For a call with no mask, bias, ALiBi slopes, segment ids, seed or backend extras (the
    caller checks that), ``normalize(q, k, v, **options)`` depends on the shapes and dtypes of
    q, k, v (strides never change a decision: backends read views of any layout), on the
    option values keyed here, and on the VALUES of ``q_lengths``/``kv_lengths`` only through
    the checks :func:`rebind` repeats.  Two calls with one key thus normalize to the same call
    but for those arrays, which :func:`rebind` puts in.  ``implementation`` is keyed for the
    dispatch decision a plan holds (``dotattn.dispatch``).
    """
    key = (
        q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype,
        _option_key(causal), _option_key(window), _option_key(scale), _option_key(softcap),
        _option_key(dropout_p), _option_key(layout), _option_key(implementation),
        has_q_lengths, has_kv_lengths,
    )
    return None if _NOT_KEYABLE in key[6:13] else key


# The fields rebind() sets per call; the template keeps none of the caller's arrays.
_PER_CALL_FIELDS = ("q", "k", "v", "q_lengths", "kv_lengths")


def call_template(call: AttentionCall) -> tuple[dict[str, Any], bool, bool]:
    """``call``'s fields without its arrays: what :func:`rebind` completes for the next call.

    Only for calls that :func:`plan_key` keys (no mask, bias, slopes, segment ids, extras or
    dropout): every other field is then a plain, immutable value.
    """
    if (
        call.mask is not None or call.bias is not None or call.alibi_slopes is not None
        or call.q_segment_ids is not None or call.extras or call.dropout_p != 0.0 or call.block is not None
    ):
        raise ValueError("call_template: the call has array options or dropout (no plan for it)")
    fields = dict(call.__dict__)
    for name in _PER_CALL_FIELDS:
        fields[name] = None
    return fields, call.q_lengths is not None, call.kv_lengths is not None


def rebind(template: tuple[dict[str, Any], bool, bool], q: np.ndarray, k: np.ndarray, v: np.ndarray,
           q_lengths: Any, kv_lengths: Any) -> AttentionCall:
    """The :class:`AttentionCall` that ``normalize()`` would return for this call.

    ``q``, ``k``, ``v`` must be NumPy arrays whose :func:`plan_key` (with these options) is the
    template's: their shapes and dtypes were validated when the template was made.  The
    lengths' values are checked here with normalize()'s own check, every call — a refused
    call raises the same error and changes nothing.
    """
    fields, has_q_lengths, has_kv_lengths = template
    layout = fields["layout"]
    call = object.__new__(AttentionCall)
    new = call.__dict__
    new.update(fields)
    qc = new["q"] = _to_canonical(q, layout)
    kc = new["k"] = _to_canonical(k, layout)
    new["v"] = _to_canonical(v, layout)
    new["extras"] = {}  # normalize() gives each call its own dict
    if has_q_lengths:
        new["q_lengths"] = _check_lengths("q_lengths", q_lengths, qc.shape[2], fields["batch_shape"], qc.shape[0])
    if has_kv_lengths:
        new["kv_lengths"] = _check_lengths("kv_lengths", kv_lengths, kc.shape[2], fields["batch_shape"], qc.shape[0])
    return call


def _from_canonical(call: AttentionCall, x: np.ndarray, *, pairwise: bool = False) -> np.ndarray:
    """(B, Hq, Lq, X) → the caller's shape. ``pairwise`` arrays (lse, weights) ignore ``layout``."""
    if call.input_ndim == 2:
        return x[0, 0]
    if call.input_ndim == 3:
        x = x[0]
    else:
        x = x.reshape(call.batch_shape + x.shape[1:])
    if call.layout == "blhd" and not pairwise:
        x = x.swapaxes(-3, -2)  # a method: NumPy, JAX and torch arrays all have it
    return x


def from_canonical(call: AttentionCall, x, *, pairwise: bool = False):
    """Canonical ``(B, Hq, Lq, X)`` → the caller's shape (a view; NumPy arrays or torch tensors)."""
    return _from_canonical(call, x, pairwise=pairwise)


def finalize_output(call: AttentionCall, out: np.ndarray) -> np.ndarray:
    """Canonical (B, Hq, Lq, Dv) output → caller's layout and dtype (contiguous)."""
    return np.ascontiguousarray(_from_canonical(call, out).astype(call.dtype, copy=False))


def finalize_lse(call: AttentionCall, lse: np.ndarray) -> np.ndarray:
    """Canonical (B, Hq, Lq) LSE → ``(..., Hq, Lq)`` float32 (float64 for float64 inputs)."""
    return _from_canonical(call, lse[..., None], pairwise=True)[..., 0].astype(call.compute_dtype, copy=False)


def finalize_pairwise(call: AttentionCall, x: np.ndarray) -> np.ndarray:
    """Canonical (B, Hq, Lq, Lk) → ``(..., Hq, Lq, Lk)``, whatever the layout."""
    return _from_canonical(call, x, pairwise=True)


def fold_lse_grad(call: AttentionCall, out: np.ndarray, dout: np.ndarray, dlse: np.ndarray):
    """``(call, out, dout)`` whose plain backward also carries the LSE's gradient ``dlse``
    (canonical ``(B, Hq, Lq)``), for any backend: the shared meaning of a gradient through the LSE.

    ``∂lse_i/∂s_ij = p_ij``, so an upstream ``dlse`` turns ``dS = P ∘ (dP − Δ)`` into
    ``P ∘ (dP − (Δ − dlse))`` with ``Δ_i = rowsum(dO ∘ O)``.  Appending one column to v
    (zeros), to dO (ones) and to O (``−dlse``) leaves ``dP = dO·vᵀ`` unchanged and makes every
    backend compute ``Δ − dlse``; the caller drops the extra column of dv afterwards.
    """
    dt = call.compute_dtype
    B, Hq, Lq, Hkv, Lk = call.B, call.Hq, call.Lq, call.Hkv, call.Lk
    v_aug = np.concatenate([call.v, np.zeros((B, Hkv, Lk, 1), dtype=call.v.dtype)], axis=-1)
    dlse_col = np.asarray(dlse).astype(dt)[..., None]
    out_aug = np.concatenate([np.asarray(out).astype(dt), -dlse_col], axis=-1)
    dout_aug = np.concatenate([np.asarray(dout).astype(dt), np.ones((B, Hq, Lq, 1), dtype=dt)], axis=-1)
    return replace(call, v=v_aug), out_aug, dout_aug


def backward_with_folded_lse_grad(run, call: AttentionCall, out, lse, dout, dlse):
    """``run(call, out, lse, dout)``'s ``(dq, dk, dv, dbias)`` for the call with ``dlse`` folded in
    (:func:`fold_lse_grad`), dv without the extra column."""
    f_call, f_out, f_dout = fold_lse_grad(call, out, dout, dlse)
    dq, dk, dv, dbias = run(f_call, f_out, lse, f_dout)
    return dq, dk, dv[..., : call.Dv], dbias


def finalize_grad(call: AttentionCall, g: np.ndarray, like: str) -> np.ndarray:
    """Canonical gradient of q/k/v → the caller's shape and dtype."""
    del like  # q, k and v share the same canonical→caller mapping
    return np.ascontiguousarray(_from_canonical(call, g).astype(call.dtype, copy=False))


def reduce_bias_grad(call: AttentionCall, dbias_full: np.ndarray) -> np.ndarray:
    """(B, Hq, Lq, Lk) gradient of the broadcast bias → the caller's bias shape (summing broadcast dims)."""
    assert call.bias_shape is not None
    full = call.batch_shape + dbias_full.shape[1:]
    g = dbias_full.reshape(full)
    target = call.bias_shape
    lead = g.ndim - len(target)
    if lead:
        g = g.sum(axis=tuple(range(lead)))
    axes = tuple(i for i, (t, s) in enumerate(zip(target, g.shape)) if t == 1 and s != 1)
    if axes:
        g = g.sum(axis=axes, keepdims=True)
    return g.reshape(target)


def check_max_weights_bytes(max_weights_bytes: Any) -> int:
    """The weights size limit: an int number of bytes ≥ 0 (values past int64 mean "no limit")."""
    if isinstance(max_weights_bytes, bool) or not isinstance(max_weights_bytes, numbers.Integral):
        raise AttentionTypeError(
            f"max_weights_bytes must be an int (bytes), got {type(max_weights_bytes).__name__}"
        )
    if max_weights_bytes < 0:
        raise AttentionValueError(f"max_weights_bytes must be ≥ 0, got {int(max_weights_bytes)}")
    return min(int(max_weights_bytes), _INT64_MAX)


def check_flag(name: str, value: Any) -> bool:
    """A yes/no option must be a bool: ``return_lse="no"`` or ``0.0`` is refused, not read as truthy."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise AttentionTypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")


def check_weights_size(call: AttentionCall, max_weights_bytes: int) -> None:
    """``return_weights`` materializes (…, Hq, Lq, Lk); refuse past the caller's limit."""
    max_weights_bytes = check_max_weights_bytes(max_weights_bytes)
    nbytes = call.B * call.Hq * call.Lq * call.Lk * call.compute_dtype.itemsize
    if nbytes > max_weights_bytes:
        raise AttentionValueError(
            f"return_weights=True would materialize {nbytes / 2**20:.1f} MiB of weights "
            f"(B={call.B}, Hq={call.Hq}, Lq={call.Lq}, Lk={call.Lk}), over max_weights_bytes="
            f"{max_weights_bytes}; raise max_weights_bytes, or use dotattn.attention_map() for pooled maps"
        )


def canonical_like(call: AttentionCall, name: str, x: Any, last_dim: int) -> np.ndarray:
    """A caller-layout array shaped like the output (``out``/``dout``) → canonical (B, Hq, Lq, X)."""
    x = _require_array(name, x)
    want = _from_canonical(call, np.empty((call.B, call.Hq, call.Lq, last_dim), dtype=np.int8)).shape
    if x.shape != want:
        raise AttentionValueError(f"{name} must have shape {_shape_str(want)}, got {_shape_str(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise AttentionTypeError(f"{name} must have a floating dtype, got {x.dtype}")
    return _to_canonical(x, call.layout) if call.input_ndim != 2 else x[None, None]


def canonical_lse(call: AttentionCall, lse: Any) -> np.ndarray:
    """Caller-shaped LSE ``(..., Hq, Lq)`` → canonical (B, Hq, Lq)."""
    lse = _require_array("lse", lse)
    want = finalize_lse(call, np.empty((call.B, call.Hq, call.Lq), dtype=call.compute_dtype)).shape
    if lse.shape != want:
        raise AttentionValueError(f"lse must have shape {_shape_str(want)}, got {_shape_str(lse.shape)}")
    if not np.issubdtype(lse.dtype, np.floating):
        raise AttentionTypeError(f"lse must have a floating dtype, got {lse.dtype}")
    return lse.reshape(call.B, call.Hq, call.Lq)


# =================================================================================
# public checks shared with other entry points (KV-cache decoding)
# =================================================================================


def check_batch_ints(name: str, x: Any, B: int) -> np.ndarray:
    """Per-sequence integers: an int array ``(B,)`` or an int scalar → int64 ``(B,)``.

    Bool and float arrays are refused (a length of 3.0 is a bug upstream, not a length).
    """
    return _batch_index_array(name, x, (B,), B)


def check_alibi_slopes(alibi_slopes: Any, B: int, Hq: int, dtype: np.dtype) -> np.ndarray | None:
    """``alibi_slopes`` of shape ``(Hq,)`` or ``(B, Hq)`` → ``(B, Hq)`` in ``dtype`` (or None); NaN/±inf follow IEEE."""
    return _check_alibi(alibi_slopes, (B,), B, Hq, dtype)
