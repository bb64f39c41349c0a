"""Block-averaged attention maps at any length, in O(N) memory.

``attention_map()`` answers "where does this layer look?" for sequences whose full
``Lq × Lk`` probability matrix would not fit (16,384² float32 = 1 GiB per head).  It runs
the forward once to get each row's log-sum-exp, then recomputes the scores block by block:
``p = exp(s − lse)`` is exact for every element, so the block averages are exact too — only
one block of scores and the pooled map exist at a time.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from . import semantics
from .dispatch import run_forward
from .errors import AttentionTypeError, AttentionValueError

# Score blocks are about this many rows × columns (rounded to whole pooling cells): big
# enough for an efficient GEMM, small enough to stay in cache.
TARGET_BLOCK_Q = 256
TARGET_BLOCK_K = 512


def _check_pool(pool: Any) -> tuple[int, int]:
    if not isinstance(pool, (tuple, list)) or len(pool) != 2:
        raise AttentionValueError(f"pool must be a pair (bq, bk) of ints ≥ 1, got {pool!r}")
    sizes = []
    for name, size in zip(("bq", "bk"), pool):
        if isinstance(size, bool) or not isinstance(size, numbers.Integral):
            raise AttentionTypeError(f"pool's {name} must be an int ≥ 1, got {size!r}")
        if size < 1:
            raise AttentionValueError(f"pool's {name} must be ≥ 1, got {size}")
        sizes.append(int(size))
    return sizes[0], sizes[1]


def attention_map(
    q: Any,
    k: Any,
    *,
    pool: tuple[int, int],
    mask: Any = None,
    bias: Any = None,
    causal: bool | str = False,
    window: tuple[int | None, int | None] | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    alibi_slopes: Any = None,
    q_lengths: Any = None,
    kv_lengths: Any = None,
    segment_ids: Any = None,
    layout: str = "bhld",
    implementation: str | None = None,
    max_weights_bytes: int = semantics.DEFAULT_MAX_WEIGHTS_BYTES,
) -> np.ndarray:
    """Attention probabilities averaged over ``bq × bk`` blocks, without the ``Lq × Lk`` matrix.

    Shapes (``layout="blhd"`` swaps the L and H axes of q and k)::

        q   (..., Hq, Lq, D)        k   (..., Hkv, Lk, D)
        map (..., Hq, ceil(Lq / bq), ceil(Lk / bk))

    ``map[..., h, I, J]`` is the mean of ``p[..., h, i, j]`` over the rows ``i`` of block
    ``I`` and keys ``j`` of block ``J``; an edge block averages only the elements it has.
    Invisible keys and padded rows count as probability 0, so a block of rows whose keys are
    all visible sums to 1 over ``J`` (times ``bk`` / the block's width).

    The options mean what they mean for :func:`dotattn.attention` (dropout excepted: maps are
    of the pre-dropout probabilities).  NumPy arrays; the result is float32 (float64 for
    float64 inputs).  Memory: the map plus one block of scores; time: about two forwards.
    A map that would need more than ``max_weights_bytes`` (1 GiB by default; the pooled sums
    are float64) is refused before anything is allocated — raise the limit or the pooling.
    """
    bq, bk = _check_pool(pool)
    if not isinstance(q, np.ndarray) or not isinstance(k, np.ndarray):
        bad = "q" if not isinstance(q, np.ndarray) else "k"
        obj = q if bad == "q" else k
        raise AttentionTypeError(
            f"attention_map takes NumPy arrays, got {bad} of type {type(obj).__module__}.{type(obj).__name__}; "
            "convert it with .numpy() / numpy.asarray() first"
        )
    # The forward needs a v: one zero column (Dv = 1) costs a GEMV per block and gives the LSE
    # we want.  A zero-width v is legal too, but an edge case a backend may not plan for.
    v_shape = k.shape[:-1] + (1,)
    v = np.zeros(v_shape, dtype=k.dtype)
    call = semantics.normalize(
        q,
        k,
        v,
        mask=mask,
        bias=bias,
        causal=causal,
        window=window,
        scale=scale,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        q_lengths=q_lengths,
        kv_lengths=kv_lengths,
        segment_ids=segment_ids,
        layout=layout,
    )
    limit = semantics.check_max_weights_bytes(max_weights_bytes)
    n_rows, n_cols = -(-call.Lq // bq), -(-call.Lk // bk)
    nbytes = call.B * call.Hq * n_rows * n_cols * 8
    if nbytes > limit:
        raise AttentionValueError(
            f"attention_map would materialize {nbytes / 2**20:.1f} MiB (B={call.B}, Hq={call.Hq}, "
            f"{n_rows}×{n_cols} cells of pool={bq, bk}), over max_weights_bytes={limit}; "
            "raise max_weights_bytes or pool over larger blocks"
        )
    _, lse, _ = run_forward(call, implementation=implementation)
    return semantics.finalize_pairwise(call, pooled_probabilities(call, lse, bq, bk))


def pooled_probabilities(call: semantics.AttentionCall, lse: np.ndarray, bq: int, bk: int) -> np.ndarray:
    """Canonical ``(B, Hq, ceil(Lq/bq), ceil(Lk/bk))`` block means of ``exp(s − lse)``."""
    # backends load on first use, not with `import dotattn`
    from .kernels import numpy_tiled

    dt = call.compute_dtype
    n_rows, n_cols = -(-call.Lq // bq), -(-call.Lk // bk)
    sums = np.zeros((call.B, call.Hq, n_rows, n_cols), dtype=np.float64)
    prep = numpy_tiled.prepare(call)
    # Whole pooling cells per score block, so a block reshapes straight into cells.
    cells_q, cells_k = max(1, TARGET_BLOCK_Q // bq), max(1, TARGET_BLOCK_K // bk)
    step_q, step_k = cells_q * bq, cells_k * bk
    # −inf LSE (no visible key) must give p = 0, not exp(−inf + inf) = NaN; a NaN LSE (a row
    # that saw a NaN) stays NaN at the keys the row sees (docs/semantics.md).
    lse_safe = np.where(lse == -np.inf, np.inf, lse).astype(dt, copy=False)

    def pool_rows(task) -> None:
        """Sum the cells of query rows [i0, i1) of (b, h); tasks write disjoint rows of ``sums``."""
        b, h, i0, i1 = task
        # Only the key range causal/window/lengths leave visible, widened to whole cells.
        lo, hi = prep.query_bounds(b, i0, i1)
        for j0 in range(max(0, lo) // step_k * step_k, hi, step_k):
            j1 = min(j0 + step_k, call.kv_len(b))
            s = numpy_tiled.block_scores(prep, b, h, i0, i1, j0, j1)
            hidden = s == -np.inf
            if hidden.all():
                continue
            p = np.where(hidden, 0, np.exp(s - lse_safe[b, h, i0:i1, None]))
            # pad to whole cells with zeros, then sum each (bq × bk) cell
            rows, cols = -(-(i1 - i0) // bq), -(-(j1 - j0) // bk)
            if p.shape != (rows * bq, cols * bk):
                p = np.pad(p, ((0, rows * bq - p.shape[0]), (0, cols * bk - p.shape[1])))
            cell = p.reshape(rows, bq, cols, bk).sum(axis=(1, 3), dtype=np.float64)
            sums[b, h, i0 // bq : i0 // bq + rows, j0 // bk : j0 // bk + cols] += cell

    tasks = [
        (b, h, i0, min(i0 + step_q, call.q_len(b)))
        for b in range(call.B)
        for h in range(call.Hq)
        for i0 in range(0, call.q_len(b), step_q)
    ]
    # The tiled backend's pool (its public run_parallel): one thread per core with BLAS held to
    # one thread, which is what small block GEMMs need (two BLAS threads on a 256×512 block
    # cost more than they give).
    numpy_tiled.run_parallel(tasks, pool_rows)
    # Each cell's element count within (Lq, Lk) — padding positions count as p = 0.
    row_counts = np.minimum(bq, call.Lq - np.arange(n_rows) * bq)
    col_counts = np.minimum(bk, call.Lk - np.arange(n_cols) * bk)
    return (sums / (row_counts[:, None] * col_counts[None, :])).astype(dt)
