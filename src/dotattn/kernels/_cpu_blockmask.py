"""The compiled pass behind :func:`dotattn.blockmask.block_mask` (imports Numba)."""

from __future__ import annotations

from numba import njit, prange


@njit(parallel=True)
def classify(mask_mod, classes, BQ, BK, Lq, Lk):
    """``classes[b, h, qb, kb]`` = 0 (all hidden), 1 (mixed) or 2 (all visible) for every tile."""
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
            classes[b, h, qb, kb] = 0 if seen == 0 else (2 if hidden == 0 else 1)
