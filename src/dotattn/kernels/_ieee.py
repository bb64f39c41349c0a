"""NumPy kernels on NaN and ±inf inputs: IEEE arithmetic, without NumPy's warnings.

The rule (docs/semantics.md, non-finite inputs) is IEEE arithmetic: ``inf − inf`` in an online
softmax, ``0·inf`` in a product, are how a NaN reaches the rows it should.  NumPy warns at each
("invalid value encountered in …"); those warnings are not the user's business — the Numba
kernels raise none — so the NumPy kernels run with them off.  NumPy's error state is per
thread: a pool's tasks set it themselves (:func:`quiet` around the task).
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["quiet"]


def quiet(fn):
    """``fn`` run with NumPy's invalid-operation and overflow warnings off."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with np.errstate(invalid="ignore", over="ignore"):
            return fn(*args, **kwargs)

    return run
