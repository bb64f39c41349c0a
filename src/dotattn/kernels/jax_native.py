"""Blockwise online-softmax attention written in ``jax.lax`` — the native JAX backend.

The FlashAttention algorithm (as :mod:`dotattn.kernels.numpy_tiled`, whose structure it
follows) expressed for XLA, so it runs under ``jit``, ``grad``, ``vmap`` and
``jax.checkpoint`` on whatever device the arrays live on, with every array option traced:

- forward: ``lax.map`` over query blocks; for each, a ``lax.fori_loop`` over the key blocks
  that can be visible (causal/window bounds skip the rest) keeps a running row max ``m``, row
  sum ``row_sum`` and accumulator ``acc`` in float32 (float64 for float64 inputs); the
  natural-log LSE is saved;
- backward (``jax.custom_vjp``, FlashAttention-2): ``lax.scan`` over key blocks, an inner
  loop over query blocks recomputes ``P = exp(S − lse)`` and accumulates dK, dV per key
  block and dQ in place — neither pass ever holds an ``Lq × Lk`` matrix.

All blocks of a step cover every sequence and head at once (batched ``dot_general``), and
grouped-query heads are a ``(Hkv, G)`` split of the query heads, so K/V are never repeated.
Lengths that are not a multiple of the block size use a last block shifted back to fit
(``dynamic_slice`` semantics); the rows/keys it shares with the previous block are hidden
from it.  Visibility comes from :func:`dotattn.semantics.visibility`, the rule every
backend shares; dropout uses the counter-based SplitMix64 hash of
:mod:`dotattn.kernels.dropout`, reproduced with pairs of uint32 (so it also works with
``jax_enable_x64`` off): the same seed gives the NumPy backends' mask bit for bit.

Canonical arguments (what :func:`attention` takes)::

    q (B, Hq, Lq, D)   k (B, Hkv, Lk, D)   v (B, Hkv, Lk, Dv)
    bias, mask         4-D, each dim 1 or full: (B|1, Hq|1, Lq|1, Lk|1)
    q_len, kv_len      int (B,)           q_seg (B, Lq), kv_seg (B, Lk)
    slopes             (B|1, Hq)          seed_key  uint32 (2,) = (hi, lo) of splitmix64(seed)
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ..semantics import visibility
from .dropout import seed_key

NAME = "jax"
# Block sizes: a (B·Hq, 256, 512) float32 score block stays in the L2 caches for B·Hq ≤ 8;
# larger blocks cost XLA more passes over memory than they save in loop steps (benchmarks/jax_native.py).
BLOCK_Q = 256
BLOCK_K = 512


@dataclass(frozen=True)
class Config:
    """The static part of a call: everything that changes the compiled program."""

    scale: float
    softcap: float | None
    causal: str | None
    window: tuple[int | None, int | None] | None
    dropout_p: float
    block_q: int
    block_k: int


def config(scale, softcap, causal, window, dropout_p) -> Config:
    """A :class:`Config` with the module's current block sizes (tests shrink them)."""
    return Config(scale, softcap, causal, window, dropout_p, BLOCK_Q, BLOCK_K)


# =================================================================================
# 64-bit SplitMix64 on pairs of uint32 (hi, lo)
# =================================================================================

_U32 = jnp.uint32


def _const64(x: int):
    # NumPy scalars, not jnp: a jnp value made while a trace is active (this module may be
    # imported inside someone's jit) would be a tracer, and leak as a module constant.
    return (np.uint32((x >> 32) & 0xFFFFFFFF), np.uint32(x & 0xFFFFFFFF))


def _mul32(a, b):
    """Full 64-bit product of uint32 arrays, as (hi, lo)."""
    a0, a1 = a & 0xFFFF, a >> 16
    b0, b1 = b & 0xFFFF, b >> 16
    p00, p01, p10, p11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1
    mid = (p00 >> 16) + (p01 & 0xFFFF) + (p10 & 0xFFFF)
    lo = (mid << 16) | (p00 & 0xFFFF)
    hi = p11 + (p01 >> 16) + (p10 >> 16) + (mid >> 16)
    return hi, lo


def _mul64(a, b):
    """Low 64 bits of a · b."""
    hi, lo = _mul32(a[1], b[1])
    return hi + a[1] * b[0] + a[0] * b[1], lo


def _add64(a, b):
    lo = a[1] + b[1]
    return a[0] + b[0] + (lo < a[1]).astype(_U32), lo


def _xor64(a, b):
    return a[0] ^ b[0], a[1] ^ b[1]


def _shr64(a, n: int):
    return a[0] >> n, (a[1] >> n) | (a[0] << (32 - n))


_GOLDEN = _const64(0x9E3779B97F4A7C15)
_MIX1 = _const64(0xBF58476D1CE4E5B9)
_MIX2 = _const64(0x94D049BB133111EB)


def _splitmix64(x):
    z = _add64(x, _GOLDEN)
    z = _mul64(_xor64(z, _shr64(z, 30)), _MIX1)
    z = _mul64(_xor64(z, _shr64(z, 27)), _MIX2)
    return _xor64(z, _shr64(z, 31))


def seed_key_pair(seed: int) -> np.ndarray:
    """``splitmix64(seed)`` as uint32 ``[hi, lo]`` — a traced input, so a new seed never recompiles."""
    key = int(seed_key(seed))
    return np.array([key >> 32, key & 0xFFFFFFFF], dtype=np.uint32)


def traced_seed_key(seed):
    """``splitmix64(seed)`` of a traced integer seed, computed in the graph (``seed mod 2**32``)."""
    hi, lo = _splitmix64((jnp.zeros((), _U32), seed.astype(_U32)))
    return jnp.stack([hi, lo])


def _keep(key, p: float, b, h, rows, cols, Hq: int, Lq: int, Lk: int):
    """Keep mask of :func:`dotattn.kernels.dropout.keep_block`, broadcast over b, h, rows, cols.

    Kept when ``u = (z >> 11) · 2⁻⁵³ ≥ p``, i.e. when ``z ≥ ceil(p · 2⁵³) · 2¹¹`` — an exact
    integer comparison (``p · 2⁵³`` is exact in float64), so no float64 is needed.
    """
    zero = np.uint32(0)
    bh = (b * Hq + h).astype(_U32)
    row = _add64(_mul64((zero, bh), _const64(Lq)), (zero, rows.astype(_U32)))
    counter = _add64(_mul64(row, _const64(Lk)), (zero, cols.astype(_U32)))
    z = _splitmix64(_xor64(counter, (key[0], key[1])))
    threshold = math.ceil(p * 2.0**53) << 11
    t_hi, t_lo = _const64(threshold)
    return (z[0] > t_hi) | ((z[0] == t_hi) & (z[1] >= t_lo))


# =================================================================================
# integer options: lengths and segment ids are never wrapped (docs/semantics.md)
# =================================================================================


def clip_lengths(x, L: int):
    """Lengths as int32 in ``[0, L]``, clipped in their own integer type first.

    Casting first would wrap (a traced int64 ``2**32 + 3`` became 3); clipped, every value
    fits int32 (``L`` does: it is an array axis).  Concrete lengths were range-checked by
    the semantics already; traced ones cannot be, and clipping is their documented meaning.
    """
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.unsignedinteger):
        return jnp.minimum(x, np.array(L, x.dtype)).astype(jnp.int32)
    return jnp.clip(x, np.array(0, x.dtype), np.array(min(L, np.iinfo(x.dtype).max), x.dtype)).astype(jnp.int32)


def host_segment_ids(q_ids: np.ndarray, kv_ids: np.ndarray):
    """Concrete segment ids (NumPy ints) → equal-dtype ids the kernel compares, values intact.

    int32 when they fit (the cheap case); int64 when JAX has 64-bit ints (``jax_enable_x64``);
    otherwise their dense ranks (``np.unique`` over both arrays): only equality matters to a
    segment, and ranks keep it exactly where a cast to int32 would merge ids that differ by
    a multiple of 2**32.
    """
    lo = min(int(q_ids.min(initial=0)), int(kv_ids.min(initial=0)))
    hi = max(int(q_ids.max(initial=0)), int(kv_ids.max(initial=0)))
    i32 = np.iinfo(np.int32)
    if i32.min <= lo and hi <= i32.max:
        return q_ids.astype(np.int32), kv_ids.astype(np.int32)
    if jax.config.jax_enable_x64:
        return q_ids.astype(np.int64), kv_ids.astype(np.int64)
    _, ranks = np.unique(np.concatenate([q_ids.ravel(), kv_ids.ravel()]), return_inverse=True)
    ranks = ranks.astype(np.int32)
    return ranks[: q_ids.size].reshape(q_ids.shape), ranks[q_ids.size :].reshape(kv_ids.shape)


def traced_segment_ids(q_ids, kv_ids):
    """JAX segment ids (possibly traced) → one dtype for both, without wrapping.

    Equal dtypes are compared as they are.  Otherwise both go to JAX's widest int (int64
    with ``jax_enable_x64``, else int32) when their dtypes fit it exactly; a pair that does
    not (uint64 with int64 ids, or uint32 with int32 ids without x64) is refused rather than
    compared after a wrap.
    """
    from ..errors import AttentionTypeError, AttentionValueError

    wide = jnp.dtype(jnp.int64 if jax.config.jax_enable_x64 else jnp.int32)
    names = ("segment_ids[0] (query ids)", "segment_ids[1] (key ids)")
    pair = []
    for name, ids in zip(names, (q_ids, kv_ids)):
        if not isinstance(ids, jax.Array):  # NumPy ids beside JAX ones: JAX would truncate them silently
            ids = np.asarray(ids)
            info = np.iinfo(wide)
            if ids.size and (int(ids.min()) < info.min or int(ids.max()) > info.max):
                raise AttentionValueError(
                    f"{name} holds values outside {wide} ({int(ids.min())}..{int(ids.max())}), which "
                    f"implementation='jax' would wrap; enable jax_enable_x64 or renumber the segments"
                )
            ids = ids.astype(wide)
        pair.append(jnp.asarray(ids))
    q_ids, kv_ids = pair
    if q_ids.dtype == kv_ids.dtype:
        return q_ids, kv_ids
    for name, ids in zip(names, (q_ids, kv_ids)):
        if not jnp.can_cast(ids.dtype, wide, casting="safe"):
            raise AttentionTypeError(
                f"{name} has dtype {ids.dtype} and the other ids {(kv_ids if ids is q_ids else q_ids).dtype}: "
                f"implementation='jax' compares them as {wide}, which cannot hold every {ids.dtype} value; "
                f"pass both id arrays with one dtype (or ids that fit {wide})"
            )
    return q_ids.astype(wide), kv_ids.astype(wide)


# =================================================================================
# blocks
# =================================================================================


def _block_size(L: int, target: int) -> int:
    """``L`` when it fits one block; else a multiple of 8 near ``target`` dividing ``L`` if any."""
    if L <= target:
        return max(L, 1)
    for size in range(target, target // 2 - 1, -8):
        if L % size == 0:
            return size
    return target


def _start(index, size: int, L: int):
    """Where block ``index`` starts: ``index · size``, the last block shifted back to fit."""
    return jnp.minimum(index * size, L - size)


def _block_span(lo, hi, L: int, size: int):
    """The blocks of ``size`` that cover positions [lo, hi) of an axis of length ``L``, as int32
    block indices [first, end); empty (end = first) when nothing is left."""
    first = jnp.clip(lo, 0, L) // size
    end = jnp.maximum(-(-jnp.clip(hi, 0, L) // size), first)
    return jnp.asarray(first, jnp.int32), jnp.asarray(end, jnp.int32)


def _assemble(blocks, size: int, L: int, axis: int):
    """Stacked blocks ``(n, …, size, …)`` → ``(…, L, …)``: the last, shifted block keeps only its tail."""
    n = blocks.shape[0]
    parts = jnp.moveaxis(blocks, 0, axis)  # (..., n, size, ...)
    shape = parts.shape[:axis] + (n * size,) + parts.shape[axis + 2 :]
    flat = parts.reshape(shape)
    if n * size == L:
        return flat
    tail = (L - (n - 1) * size)  # rows of the last block that are new
    head = lax.slice_in_dim(flat, 0, (n - 1) * size, axis=axis)
    last = lax.slice_in_dim(flat, n * size - tail, n * size, axis=axis)
    return jnp.concatenate([head, last], axis=axis)


def _live_einsum(spec: str, a, live, b, positive=None):
    """``einsum(spec, a, b)`` over the pairs ``live`` marks only (docs/semantics.md, NaN policy).

    ``a`` is 0 off ``live``; a NaN/±inf of ``b`` must not meet those zeros (0·NaN would leak a
    hidden value).  A finite ``b`` block (the usual case, decided per block with ``lax.cond``)
    is one product; otherwise the finite part is one product and the non-finite entries are
    added as IEEE would over the live pairs: NaN where a live pair meets NaN (or 0·inf, or
    both infinities), else ±inf with the sign of the coefficient.  ``positive`` marks the
    pairs whose exact coefficient is > 0 (weights of visible, kept keys): there an underflowed
    0 still gives ±inf.  (As :func:`dotattn.kernels.numpy_tiled.live_matmul`.)
    """
    ct = a.dtype
    finite = jnp.isfinite(b)

    def plain(a, b):
        return jnp.einsum(spec, a, b, preferred_element_type=ct)

    def exact(a, b):
        out = plain(a, jnp.where(finite, b, 0))
        if positive is None:
            pos, neg, zero = live & (a > 0), live & (a < 0), live & (a == 0)
        else:
            pos, neg, zero = live & positive, None, live & ~positive
        f = lambda m, x: plain(m.astype(ct), x.astype(ct)) > 0  # noqa: E731
        nan_b, pinf, ninf = jnp.isnan(b), b == jnp.inf, b == -jnp.inf
        nan = f(live, nan_b) | f(zero, pinf | ninf)
        up, down = f(pos, pinf), f(pos, ninf)
        if neg is not None:
            up, down = up | f(neg, ninf), down | f(neg, pinf)
        out = jnp.where(up, jnp.inf, out)
        out = jnp.where(down, -jnp.inf, out)
        return jnp.where(nan | (up & down), jnp.nan, out)

    return lax.cond(jnp.all(finite), plain, exact, a, b)


class _Problem:
    """Static sizes and the per-block pieces shared by forward and backward (traced arrays inside)."""

    def __init__(self, cfg: Config, q, k, v, bias, mask, q_len, kv_len, q_seg, kv_seg, slopes, key):
        self.cfg = cfg
        self.B, self.Hq, self.Lq, self.D = q.shape
        self.Hkv, self.Lk, self.Dv = k.shape[1], k.shape[2], v.shape[3]
        self.G = self.Hq // self.Hkv
        self.ct = jnp.float64 if q.dtype == jnp.float64 else jnp.float32
        self.bq = _block_size(self.Lq, cfg.block_q)
        self.bk = _block_size(self.Lk, cfg.block_k)
        self.nq = -(-self.Lq // self.bq)
        self.nk = -(-self.Lk // self.bk)
        self.bias, self.mask, self.slopes, self.key = bias, mask, slopes, key
        self.q_len, self.kv_len, self.q_seg, self.kv_seg = q_len, kv_len, q_seg, kv_seg
        ct = self.ct
        # Rows past the real lengths are zeroed once: padding may hold NaN, and 0 · NaN in a
        # block product would leak it into visible rows.
        q = q.astype(ct)
        k = k.astype(ct)
        v = v.astype(ct)
        if q_len is not None:
            q = jnp.where(jnp.arange(self.Lq)[:, None] < q_len[:, None, None, None], q, 0)
        if kv_len is not None:
            keep = jnp.arange(self.Lk)[:, None] < kv_len[:, None, None, None]
            k = jnp.where(keep, k, 0)
            v = jnp.where(keep, v, 0)
        self.q = q.reshape(self.B, self.Hkv, self.G, self.Lq, self.D)  # unscaled (dK needs it)
        # The scores are (q·scale)·k, the numpy backend's order: a product straight out of the
        # einsum.  As q·k·scale, XLA's CPU code fused the multiply by the scale into each use,
        # and contracted it into an FMA in exp(s − max) but not in the max: an ulp apart, which
        # at scores of 1e17 is exp(±1e10) — NaN rows (2e17 with scale 0.1) where every other
        # backend gives the answer (7 Dec 2026; tests/reliability/test_nonfinite.py).
        self.qs = self.q * jnp.asarray(cfg.scale, ct)
        self.k, self.v = k, v

    # ---- which blocks can hold a visible key -----------------------------------
    def q_offset(self):
        """Position of query row 0 on the key axis, (B,1,1,1,1) or a Python int."""
        if self.q_len is None and self.kv_len is None:
            return self.Lk - self.Lq
        kv = self.kv_len if self.kv_len is not None else jnp.full((self.B,), self.Lk, jnp.int32)
        ql = self.q_len if self.q_len is not None else jnp.full((self.B,), self.Lq, jnp.int32)
        return (kv - ql).astype(jnp.int32).reshape(self.B, 1, 1, 1, 1)

    def _offset_range(self):
        off = self.q_offset()
        if isinstance(off, int):
            return off, off
        return jnp.min(off), jnp.max(off)

    def key_block_range(self, r0, r1):
        """Key blocks [lo, hi) that rows [r0, r1) can see (causal/window/length bounds)."""
        cfg = self.cfg
        lo, hi = 0, self.Lk
        if self.kv_len is not None:
            hi = jnp.max(self.kv_len).astype(jnp.int32)
        off_lo, off_hi = self._offset_range()
        if cfg.causal == "bottom_right":
            hi = jnp.minimum(hi, r1 + off_hi)
        elif cfg.causal == "top_left":
            hi = jnp.minimum(hi, r1)
        if cfg.window is not None:
            left, right = cfg.window
            if left is not None:
                lo = jnp.maximum(lo, r0 + off_lo - left)
            if right is not None:
                hi = jnp.minimum(hi, r1 + off_hi + right)
        return _block_span(lo, hi, self.Lk, self.bk)

    def query_block_range(self, c0, c1):
        """Query blocks [lo, hi) that can see any key of [c0, c1)."""
        cfg = self.cfg
        lo, hi = 0, self.Lq
        if self.q_len is not None:
            hi = jnp.max(self.q_len).astype(jnp.int32)
        off_lo, off_hi = self._offset_range()
        if cfg.causal == "bottom_right":
            lo = jnp.maximum(lo, c0 - off_hi)
        elif cfg.causal == "top_left":
            lo = jnp.maximum(lo, c0)
        if cfg.window is not None:
            left, right = cfg.window
            if left is not None:
                hi = jnp.minimum(hi, c1 + left - off_lo)
            if right is not None:
                lo = jnp.maximum(lo, c0 - off_hi - right)
        return _block_span(lo, hi, self.Lq, self.bq)

    # ---- one block ---------------------------------------------------------------
    def _pairwise_block(self, x, r, c):
        """A 4-D (B|1, Hq|1, Lq|1, Lk|1) array's block → (B|1, Hkv|1, G|1, bq|1, bk|1)."""
        if x.shape[2] != 1:
            x = lax.dynamic_slice_in_dim(x, r, self.bq, axis=2)
        if x.shape[3] != 1:
            x = lax.dynamic_slice_in_dim(x, c, self.bk, axis=3)
        if x.shape[1] == 1:
            return x[:, :, None]
        return x.reshape(x.shape[0], self.Hkv, self.G, x.shape[2], x.shape[3])

    def rows_cols(self, r, c):
        rows = (r + jnp.arange(self.bq, dtype=jnp.int32)).reshape(1, 1, 1, self.bq, 1)
        cols = (c + jnp.arange(self.bk, dtype=jnp.int32)).reshape(1, 1, 1, 1, self.bk)
        return rows, cols

    def scores(self, qb, kb, r, c, i0, j0):
        """Scores of rows [r, r+bq) × keys [c, c+bk): −inf where invisible; tanh(s/c) if softcapped.

        ``i0``/``j0`` are the blocks' nominal starts: rows/keys before them belong to the
        previous (unshifted) block and are hidden here.  Returns (s, visible | None, tanh).
        """
        cfg, ct = self.cfg, self.ct
        s = jnp.einsum("bhgqd,bhkd->bhgqk", qb, kb, preferred_element_type=ct)  # (qb: scaled rows of qs)
        tanh = None
        if cfg.softcap is not None:
            tanh = jnp.tanh(s / jnp.asarray(cfg.softcap, ct))
            cap = jnp.asarray(cfg.softcap, ct)
            # cap·tanh ≥ −cap already: the max only stands between the product and its uses.
            # XLA's CPU code contracted the product into an FMA in exp(s − max) and the
            # backward's exp(s − lse) but not in the max — half an ulp of the score apart, which
            # made rows NaN at scores of 9e11 and dV 0.26 off at 3e7 (7 Dec 2026).  A rounding
            # op (reduce_precision, a bitcast round trip) is removed by XLA's simplifier; a max
            # is not, and LLVM does not contract through it.  (NaN passes: jnp.maximum keeps it.)
            s = jnp.maximum(cap * tanh, -cap)
        bias_hides = None
        if self.bias is not None:
            bias = self._pairwise_block(self.bias, r, c).astype(ct)
            s = s + bias
            bias_hides = bias == -jnp.inf  # hides its key as a mask does, even if the score is NaN/+inf
        rows, cols = self.rows_cols(r, c)
        if self.slopes is not None:
            slope = self.slopes.astype(ct).reshape(self.slopes.shape[0], self.Hkv, self.G, 1, 1)
            s = s - slope * jnp.abs(rows + self.q_offset() - cols).astype(ct)
        vis = self.visible(rows, cols, r, c, i0, j0)
        if vis is not None:
            s = jnp.where(vis, s, -jnp.inf)
        if bias_hides is not None:
            s = jnp.where(bias_hides, -jnp.inf, s)
        return s, vis, tanh

    def visible(self, rows, cols, r, c, i0, j0):
        q_seg = kv_seg = None
        if self.q_seg is not None:
            q_seg = lax.dynamic_slice_in_dim(self.q_seg, r, self.bq, axis=1).reshape(self.B, 1, 1, self.bq, 1)
            kv_seg = lax.dynamic_slice_in_dim(self.kv_seg, c, self.bk, axis=1).reshape(self.B, 1, 1, 1, self.bk)
        bshape = (self.B, 1, 1, 1, 1)
        vis = visibility(
            rows,
            cols,
            causal=self.cfg.causal,
            window=self.cfg.window,
            q_offset=self.q_offset(),
            q_len=None if self.q_len is None else self.q_len.reshape(bshape),
            kv_len=None if self.kv_len is None else self.kv_len.reshape(bshape),
            q_seg=q_seg,
            kv_seg=kv_seg,
        )
        extra = []
        if self.mask is not None:
            extra.append(self._pairwise_block(self.mask, r, c))
        if i0 is not None and self.Lq % self.bq:
            extra.append(rows >= i0)
        if self.Lk % self.bk:
            extra.append(cols >= j0)
        for e in extra:
            vis = e if vis is None else vis & e
        return vis

    def dropout_scale(self, rows, cols):
        """keep / (1 − p) for the block (B, Hkv, G, bq, bk), or None without dropout."""
        p = self.cfg.dropout_p
        if p == 0.0:
            return None
        b = jnp.arange(self.B, dtype=jnp.int32).reshape(self.B, 1, 1, 1, 1)
        h = jnp.arange(self.Hq, dtype=jnp.int32).reshape(1, self.Hkv, self.G, 1, 1)
        keep = _keep(self.key, p, b, h, rows, cols, self.Hq, self.Lq, self.Lk)
        return keep.astype(self.ct) * jnp.asarray(1.0 / (1.0 - p), self.ct)


# =================================================================================
# forward and backward
# =================================================================================


def _forward(cfg: Config, *args):
    """(out (B, Hq, Lq, Dv), lse (B, Hq, Lq)) in the compute dtype."""
    pb = _Problem(cfg, *args)
    B, Hkv, G, ct = pb.B, pb.Hkv, pb.G, pb.ct
    if pb.Lq == 0 or pb.Lk == 0:
        return (jnp.zeros((B, pb.Hq, pb.Lq, pb.Dv), ct), jnp.full((B, pb.Hq, pb.Lq), -jnp.inf, ct))

    def query_block(iq):
        i0 = iq * pb.bq
        r = _start(iq, pb.bq, pb.Lq)
        qb = lax.dynamic_slice_in_dim(pb.qs, r, pb.bq, axis=3)
        lo, hi = pb.key_block_range(r, r + pb.bq)

        def step(jb, carry):
            m, row_sum, acc = carry
            j0 = jb * pb.bk
            c = _start(jb, pb.bk, pb.Lk)
            kb = lax.dynamic_slice_in_dim(pb.k, c, pb.bk, axis=2)
            vb = lax.dynamic_slice_in_dim(pb.v, c, pb.bk, axis=2)
            s, _, _ = pb.scores(qb, kb, r, c, None, j0)
            live = s != -jnp.inf  # the pairs that take part (NaN scores included)
            m_new = jnp.maximum(m, s.max(axis=-1))  # NaN propagates: a NaN score makes a NaN row
            # rows that have seen no visible key yet keep m = −inf; 0 keeps exp() finite
            m_safe = jnp.where(m_new == -jnp.inf, jnp.zeros((), ct), m_new)
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(m - m_safe)
            row_sum = row_sum * alpha + p.sum(axis=-1)
            rows, cols = pb.rows_cols(r, c)
            keep = pb.dropout_scale(rows, cols)
            positive = live
            if keep is not None:
                p = p * keep  # the row sum above stays pre-dropout
                positive = live & (keep > 0)
            # ±inf already summed (an infinite value) stays ±inf when alpha underflows to 0
            acc = jnp.where(jnp.isinf(acc), acc, acc * alpha[..., None])
            acc = acc + _live_einsum("bhgqk,bhkd->bhgqd", p, live, vb, positive)
            return m_new, row_sum, acc

        init = (
            jnp.full((B, Hkv, G, pb.bq), -jnp.inf, ct),
            jnp.zeros((B, Hkv, G, pb.bq), ct),
            jnp.zeros((B, Hkv, G, pb.bq, pb.Dv), ct),
        )
        m, row_sum, acc = lax.fori_loop(lo, hi, step, init)
        # Rows that saw a key; a NaN max (a NaN or +inf score) reaches out and lse through
        # row_sum as IEEE says (a row_sum > 0 test would have read a NaN row as empty).
        seen = m != -jnp.inf
        safe = jnp.where(seen, row_sum, 1)
        out = jnp.where(seen[..., None], acc / safe[..., None], 0)
        lse = jnp.where(seen, m + jnp.log(safe), -jnp.inf)
        return out, lse

    outs, lses = lax.map(query_block, jnp.arange(pb.nq, dtype=jnp.int32))
    out = _assemble(outs, pb.bq, pb.Lq, axis=3).reshape(B, pb.Hq, pb.Lq, pb.Dv)
    lse = _assemble(lses, pb.bq, pb.Lq, axis=3).reshape(B, pb.Hq, pb.Lq)
    return out, lse


def _backward(cfg: Config, args, out, lse, dout):
    """Cotangents of (q, k, v, bias, mask, q_len, kv_len, q_seg, kv_seg, slopes, key)."""
    q_in, k_in, v_in, bias_in, mask, q_len, kv_len, q_seg, kv_seg, slopes_in, key = args
    pb = _Problem(cfg, *args)
    B, Hkv, G, ct = pb.B, pb.Hkv, pb.G, pb.ct
    shape5 = (B, Hkv, G, pb.Lq)
    dout = dout.astype(ct).reshape(shape5 + (pb.Dv,))
    out = out.astype(ct).reshape(shape5 + (pb.Dv,))
    if q_len is not None:  # padded rows: out is 0 there, dout may hold anything
        dout = jnp.where(jnp.arange(pb.Lq)[:, None] < q_len.reshape(B, 1, 1, 1, 1), dout, 0)
    delta = jnp.sum(dout * out, axis=-1)  # D_i = rowsum(dO ∘ O)
    lse = lse.astype(ct).reshape(shape5)
    # −inf LSE (rows that see nothing) would make exp(s − lse) = exp(−inf + inf) = NaN: +inf gives 0.
    # A NaN LSE stays NaN: that row's P is NaN at the keys it sees (docs/semantics.md).
    lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)
    scale = jnp.asarray(cfg.scale, ct)

    dq = jnp.zeros(shape5 + (pb.D,), ct)
    dbias = None if bias_in is None else jnp.zeros(bias_in.shape, ct)
    dslopes = None if slopes_in is None else jnp.zeros(slopes_in.shape, ct)
    if pb.Lq == 0 or pb.Lk == 0:
        dk = jnp.zeros((B, Hkv, pb.Lk, pb.D), ct)
        dv = jnp.zeros((B, Hkv, pb.Lk, pb.Dv), ct)
    else:

        def key_block(carry, jb):
            dq, dbias, dslopes = carry
            j0 = jb * pb.bk
            c = _start(jb, pb.bk, pb.Lk)
            kb = lax.dynamic_slice_in_dim(pb.k, c, pb.bk, axis=2)
            vb = lax.dynamic_slice_in_dim(pb.v, c, pb.bk, axis=2)
            lo, hi = pb.query_block_range(c, c + pb.bk)

            def step(ib, inner):
                dk_acc, dv_acc, dq, dbias, dslopes = inner
                i0 = ib * pb.bq
                r = _start(ib, pb.bq, pb.Lq)
                qb = lax.dynamic_slice_in_dim(pb.q, r, pb.bq, axis=3)
                dob = lax.dynamic_slice_in_dim(dout, r, pb.bq, axis=3)
                s, _, tanh = pb.scores(lax.dynamic_slice_in_dim(pb.qs, r, pb.bq, axis=3), kb, r, c, i0, j0)
                live = s != -jnp.inf  # pairs that take part; hidden ones never read a value
                p = jnp.where(live, jnp.exp(s - lax.dynamic_slice_in_dim(lse, r, pb.bq, axis=3)[..., None]), 0)
                dp = jnp.einsum("bhgqd,bhkd->bhgqk", dob, vb, preferred_element_type=ct)
                rows, cols = pb.rows_cols(r, c)
                keep = pb.dropout_scale(rows, cols)
                pd, positive = p, live
                if keep is not None:
                    pd = p * keep
                    dp = dp * keep
                    positive = live & (keep > 0)
                dv_acc = dv_acc + _live_einsum("bhgqk,bhgqd->bhkd", pd, live, dob, positive)
                ds = p * (dp - lax.dynamic_slice_in_dim(delta, r, pb.bq, axis=3)[..., None])  # dS = P ∘ (dP − D_i)
                ds = jnp.where(live, ds, 0)
                if dbias is not None:
                    dbias = _add_pairwise(pb, dbias, ds, r, c, i0, j0)
                if dslopes is not None:
                    dist = jnp.abs(rows + pb.q_offset() - cols).astype(ct)
                    g = -(ds * dist).sum(axis=(3, 4)).reshape(B, pb.Hq)
                    dslopes = dslopes + (g.sum(axis=0, keepdims=True) if dslopes.shape[0] == 1 else g)
                if tanh is not None:
                    ds = jnp.where(live, ds * (1 - tanh * tanh), 0)  # d(c·tanh(x/c))/dx
                ds = ds * scale
                dq_rows = lax.dynamic_slice_in_dim(dq, r, pb.bq, axis=3)
                dq_rows = dq_rows + _live_einsum("bhgqk,bhkd->bhgqd", ds, live, kb)
                dq = lax.dynamic_update_slice_in_dim(dq, dq_rows, r, axis=3)
                dk_acc = dk_acc + _live_einsum("bhgqk,bhgqd->bhkd", ds, live, qb)
                return dk_acc, dv_acc, dq, dbias, dslopes

            init = (jnp.zeros((B, Hkv, pb.bk, pb.D), ct), jnp.zeros((B, Hkv, pb.bk, pb.Dv), ct), dq, dbias, dslopes)
            dk_b, dv_b, dq, dbias, dslopes = lax.fori_loop(lo, hi, step, init)
            return (dq, dbias, dslopes), (dk_b, dv_b)

        (dq, dbias, dslopes), (dks, dvs) = lax.scan(key_block, (dq, dbias, dslopes), jnp.arange(pb.nk, dtype=jnp.int32))
        dk = _assemble(dks, pb.bk, pb.Lk, axis=2)
        dv = _assemble(dvs, pb.bk, pb.Lk, axis=2)
    dq = dq.reshape(B, pb.Hq, pb.Lq, pb.D).astype(q_in.dtype)
    grads = [dq, dk.astype(k_in.dtype), dv.astype(v_in.dtype)]
    grads.append(None if bias_in is None else dbias.astype(bias_in.dtype))
    grads += [None] * 5  # mask, lengths and segment ids are not differentiable
    grads.append(None if slopes_in is None else dslopes.astype(slopes_in.dtype))
    grads.append(None)  # the dropout key
    return tuple(grads)


def _add_pairwise(pb: _Problem, acc, ds, r, c, i0, j0):
    """Add a block's dS (B, Hkv, G, bq, bk) into a (B|1, Hq|1, Lq|1, Lk|1) gradient, summing broadcast dims."""
    Bb, Hb, Lqb, Lkb = acc.shape
    g = ds
    if Bb == 1:
        g = g.sum(axis=0, keepdims=True)
    g = g.reshape(g.shape[0], pb.Hq, pb.bq, pb.bk)
    if Hb == 1:
        g = g.sum(axis=1, keepdims=True)
    if Lqb == 1:
        g = g.sum(axis=2, keepdims=True)
    if Lkb == 1:
        g = g.sum(axis=3, keepdims=True)
    # The shifted last block shares rows/keys with the previous one; its ds is 0 there.
    i32 = jnp.int32
    at = (i32(0), i32(0), jnp.asarray(r if Lqb != 1 else 0, i32), jnp.asarray(c if Lkb != 1 else 0, i32))
    cur = lax.dynamic_slice(acc, at, g.shape)
    return lax.dynamic_update_slice(acc, cur + g, at)


@functools.lru_cache(maxsize=None)
def _attention_fn(cfg: Config):
    """The differentiable canonical attention for one static configuration (jitted).

    ``cfg`` is a :func:`_structure`: the values of scale and softcap come as the function's
    last two arguments, traced, so a new value compiles nothing.  (Keyed by their values, a
    program passing a new scale each call — a temperature, a per-request scale — compiled
    ≈ 0.5 s per call and this cache grew without bound, ≈ 1.4 MB per call; the resource
    audit of 6 Dec 2026.)"""

    def split(args):
        *arrays, scale, softcap = args
        return replace(cfg, scale=scale, softcap=softcap), tuple(arrays)

    @jax.custom_vjp
    def fused(*args):
        c, arrays = split(args)
        return _forward(c, *arrays)

    def fwd(*args):
        c, arrays = split(args)
        out, lse = _forward(c, *arrays)
        return (out, lse), (args, out, lse)

    def bwd(res, cotangents):
        args, out, lse = res
        c, arrays = split(args)
        dout, _ = cotangents  # the LSE carries no gradient (documented, as FlashAttention)
        return tuple(_backward(c, arrays, out, lse, dout)) + (None, None)  # (none for scale, softcap)

    fused.defvjp(fwd, bwd)
    return jax.jit(fused)


def _structure(cfg: Config) -> Config:
    """``cfg`` without the values of scale and softcap (whether there is a softcap stays)."""
    return replace(cfg, scale=1.0, softcap=None if cfg.softcap is None else 1.0)


def _values(cfg: Config) -> tuple:
    """Scale and softcap as float64 scalars: cast to the compute dtype inside, as the Python
    floats were (x64 off: float32 on the way in, the same single rounding)."""
    return np.float64(cfg.scale), None if cfg.softcap is None else np.float64(cfg.softcap)


def attention(cfg: Config, q, k, v, bias=None, mask=None, q_len=None, kv_len=None, q_seg=None, kv_seg=None,
              slopes=None, key=None):
    """Canonical native attention: ``(out (B, Hq, Lq, Dv) in q's dtype, lse (B, Hq, Lq) compute dtype)``."""
    if cfg.dropout_p > 0.0 and key is None:
        raise ValueError("dropout needs the seed's key (seed_key_pair)")
    out, lse = _attention_fn(_structure(cfg))(q, k, v, bias, mask, q_len, kv_len, q_seg, kv_seg, slopes, key, *_values(cfg))
    return out.astype(q.dtype), lse


def weights(cfg: Config, q, k, v, bias=None, mask=None, q_len=None, kv_len=None, q_seg=None, kv_seg=None,
            slopes=None, key=None, lse=None):
    """Pre-dropout probabilities (B, Hq, Lq, Lk) in the compute dtype — materialized on request."""
    full = Config(cfg.scale, cfg.softcap, cfg.causal, cfg.window, 0.0, max(q.shape[2], 1), max(k.shape[2], 1))
    pb = _Problem(full, q, k, v, bias, mask, q_len, kv_len, q_seg, kv_seg, slopes, key)
    if pb.Lq == 0 or pb.Lk == 0:
        return jnp.zeros((pb.B, pb.Hq, pb.Lq, pb.Lk), pb.ct)
    s, _, _ = pb.scores(pb.qs, pb.k, 0, 0, None, 0)
    live = s != -jnp.inf
    m = s.max(axis=-1, keepdims=True)  # NaN for a NaN row
    seen = m != -jnp.inf
    e = jnp.where(live, jnp.exp(s - jnp.where(seen, m, 0)), 0)
    total = e.sum(axis=-1, keepdims=True)
    # NaN at the keys a NaN row sees, 0 at the keys it cannot see; rows that see nothing are 0
    w = jnp.where(live & seen, e / jnp.where(seen, total, 1), 0)
    return w.reshape(pb.B, pb.Hq, pb.Lq, pb.Lk)
