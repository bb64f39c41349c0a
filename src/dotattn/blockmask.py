"""Block masks: which ``BQ × BK`` tiles a ``mask_mod`` hides, computed once and reused.

FlexAttention's idea (``create_block_mask``) for the ``cpu`` backend: evaluate the user's
``mask_mod(b, h, q_idx, kv_idx) -> bool`` on every element once, record per tile whether it
is fully hidden (skipped by the kernel), fully visible (no per-element ``mask_mod`` calls) or
mixed, and pass the result with ``attention(..., mask_mod=f, block_mask=bm)``.  Building it
costs one pass over ``Lq × Lk`` (compiled, both cores); every later call reuses it.

Importing this module imports no JIT compiler: Numba loads inside :func:`block_mask`.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable

import numpy as np

from .errors import AttentionTypeError, AttentionValueError
from .kernels._cpu_blockmask import DEFAULT_BLOCK_SIZE, BlockMask, classify, compile_mod

__all__ = ["DEFAULT_BLOCK_SIZE", "BlockMask", "block_mask", "compile_mod"]


def _check_size(name: str, x: Any, *, allow_none: bool, minimum: int) -> int | None:
    if x is None and allow_none:
        return None
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise AttentionTypeError(f"{name} must be an int{' or None' if allow_none else ''}, got {x!r}")
    if x < minimum:
        raise AttentionValueError(f"{name} must be ≥ {minimum}, got {x}")
    return int(x)


def block_mask(
    mask_mod: Callable[[int, int, int, int], bool],
    B: int | None = None,
    H: int | None = None,
    Lq: int = 0,
    Lk: int = 0,
    *,
    block_size: tuple[int, int] = DEFAULT_BLOCK_SIZE,
) -> BlockMask:
    """Classify every ``block_size`` tile of ``mask_mod(b, h, q_idx, kv_idx) -> bool``.

    Args:
        mask_mod: a plain Python function of four ints returning True where the query sees
            the key (it is compiled with Numba; use ``math``/NumPy scalars and arrays it
            closes over, as FlexAttention's mask_mods use captured tensors).  The
            attention kernels built for a module-level ``def`` that uses only
            ``math``/NumPy and int/float constants are cached on disk across processes; a
            closure or captured array recompiles them in every process.
        B, H: batch size and query heads the mask depends on; None = the same for all.
        Lq, Lk: query and key lengths of the calls it will serve.
        block_size: ``(BQ, BK)`` tile; the kernel tiles with it when this mask is passed.

    Returns:
        A :class:`BlockMask` to pass as ``attention(..., mask_mod=mask_mod, block_mask=bm)``.
    """
    Bn = _check_size("B", B, allow_none=True, minimum=1)
    Hn = _check_size("H", H, allow_none=True, minimum=1)
    Lq = _check_size("Lq", Lq, allow_none=False, minimum=0)
    Lk = _check_size("Lk", Lk, allow_none=False, minimum=0)
    if not (isinstance(block_size, (tuple, list)) and len(block_size) == 2):
        raise AttentionValueError(f"block_size must be a pair (BQ, BK), got {block_size!r}")
    BQ = _check_size("block_size[0]", block_size[0], allow_none=False, minimum=1)
    BK = _check_size("block_size[1]", block_size[1], allow_none=False, minimum=1)
    fn = compile_mod(mask_mod, "mask_mod")
    Bm = 1 if Bn is None else Bn
    Hm = 1 if Hn is None else Hn
    nqb = -(-Lq // BQ)
    nkb = -(-Lk // BK)
    classes = np.empty((Bm, Hm, nqb, nkb), dtype=np.int8)
    classify(fn, classes, BQ, BK, Lq, Lk)
    return BlockMask(mask_mod=mask_mod, classes=classes, block_size=(BQ, BK), Lq=Lq, Lk=Lk)
