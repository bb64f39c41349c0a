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
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .errors import AttentionTypeError, AttentionValueError

# The cpu backend's forward tiles: query rows × key columns per block (docs/performance.md);
# a block mask built with them serves the backward too.
DEFAULT_BLOCK_SIZE = (256, 256)

SKIP, PARTIAL, FULL = 0, 1, 2


@dataclass(frozen=True, eq=False)
class BlockMask:
    """Per-tile classes of one ``mask_mod``: ``classes (Bm, Hm, nqb, nkb)`` int8.

    ``Bm``/``Hm`` are 1 when the mask was built with ``B=None``/``H=None`` (the same for
    every sequence/head).  Values: 0 = every element hidden, 1 = mixed, 2 = every element
    visible.
    """

    mask_mod: Callable[..., bool]
    classes: np.ndarray
    block_size: tuple[int, int]
    Lq: int
    Lk: int

    @property
    def sparsity(self) -> float:
        """Share of tiles the kernel skips."""
        return float(np.mean(self.classes == SKIP)) if self.classes.size else 0.0

    def __repr__(self) -> str:
        Bm, Hm, nqb, nkb = self.classes.shape
        return (
            f"BlockMask(Lq={self.Lq}, Lk={self.Lk}, block_size={self.block_size}, B={Bm}, H={Hm}, "
            f"tiles={nqb}×{nkb}, skipped={self.sparsity:.1%}, full={float(np.mean(self.classes == FULL)):.1%})"
        )

    def check_call(self, B: int, Hq: int, Lq: int, Lk: int) -> None:
        """Raise when this mask was built for other sizes than the call's."""
        Bm, Hm = self.classes.shape[:2]
        if (self.Lq, self.Lk) != (Lq, Lk):
            raise AttentionValueError(
                f"block_mask was built for Lq={self.Lq}, Lk={self.Lk}, but the call has Lq={Lq}, Lk={Lk}; "
                "build it with dotattn.block_mask(mask_mod, Lq=..., Lk=...) for these lengths"
            )
        if Bm not in (1, B) or Hm not in (1, Hq):
            raise AttentionValueError(
                f"block_mask was built for B={Bm}, H={Hm}, but the call has B={B}, Hq={Hq}; "
                "use B=None / H=None for a mask shared by every sequence / head"
            )


def _check_size(name: str, x: Any, *, allow_none: bool, minimum: int) -> int | None:
    if x is None and allow_none:
        return None
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise AttentionTypeError(f"{name} must be an int{' or None' if allow_none else ''}, got {x!r}")
    if x < minimum:
        raise AttentionValueError(f"{name} must be ≥ {minimum}, got {x}")
    return int(x)


def compile_mod(fn: Callable, name: str):
    """A Numba-compiled version of a user's ``score_mod``/``mask_mod`` (already compiled ones pass through)."""
    if not callable(fn):
        raise AttentionTypeError(f"{name} must be a function, got {type(fn).__name__}")
    from numba.core.registry import CPUDispatcher
    from numba import njit

    return fn if isinstance(fn, CPUDispatcher) else njit(fn)


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
    from .kernels._cpu_blockmask import classify

    Bm = 1 if Bn is None else Bn
    Hm = 1 if Hn is None else Hn
    nqb = -(-Lq // BQ)
    nkb = -(-Lk // BK)
    classes = np.empty((Bm, Hm, nqb, nkb), dtype=np.int8)
    classify(fn, classes, BQ, BK, Lq, Lk)
    return BlockMask(mask_mod=mask_mod, classes=classes, block_size=(BQ, BK), Lq=Lq, Lk=Lk)
