"""Block masks of the ``cpu`` backend: the per-tile classes of a ``mask_mod`` and the pass that fills them.

Below both :mod:`dotattn.blockmask` (the public ``block_mask()``) and the ``cpu`` backend,
which reads the classes.  Importing this module imports no JIT compiler: Numba loads on the
first :func:`classify` / :func:`compile_mod`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import AttentionTypeError, AttentionValueError
from ._cpu_options import FULL, PARTIAL, SKIP  # noqa: F401  (the class values)

# The cpu backend's forward tiles: query rows × key columns per block (docs/performance.md);
# a block mask built with them serves the backward too.
DEFAULT_BLOCK_SIZE = (256, 256)


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


def compile_mod(fn: Callable, name: str):
    """A Numba-compiled version of a user's ``score_mod``/``mask_mod`` (already compiled ones pass through)."""
    if not callable(fn):
        raise AttentionTypeError(f"{name} must be a function, got {type(fn).__name__}")
    from numba.core.registry import CPUDispatcher
    from numba import njit

    return fn if isinstance(fn, CPUDispatcher) else njit(fn)


_classify: dict[bool, Callable] = {}


def classify(mask_mod, classes, BQ, BK, Lq, Lk) -> None:
    """``classes[b, h, qb, kb]`` = SKIP (all hidden), PARTIAL (mixed) or FULL (all visible) for every tile."""
    from ._forked import team_unusable

    parallel = not team_unusable()  # (one thread in a process forked from one whose team ran)
    fn = _classify.get(parallel)
    if fn is None:
        fn = _classify[parallel] = _compile_classify(parallel)
    fn(mask_mod, classes, BQ, BK, Lq, Lk)


def _compile_classify(parallel: bool):
    from numba import njit, prange

    @njit(parallel=parallel)
    def classify_tiles(mask_mod, classes, BQ, BK, Lq, Lk):
        Bm, Hm, nqb, nkb = classes.shape
        for t in prange(Bm * Hm * nqb):
            b = t // (Hm * nqb)
            h = (t // nqb) % Hm
            qb = t % nqb
            for kb in range(nkb):
                seen = 0
                hidden = 0
                for i in range(qb * BQ, min((qb + 1) * BQ, Lq)):
                    for j in range(kb * BK, min((kb + 1) * BK, Lk)):
                        if mask_mod(b, h, i, j):
                            seen += 1
                        else:
                            hidden += 1
                classes[b, h, qb, kb] = SKIP if seen == 0 else (FULL if hidden == 0 else PARTIAL)

    return classify_tiles
