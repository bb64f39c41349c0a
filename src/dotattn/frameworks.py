"""Which array library a value belongs to — without importing any library the caller didn't.

As einops and array-api-compat do, a type is matched against libraries already present in
``sys.modules``; a library that is not imported cannot have made the value.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from .errors import AttentionTypeError

SUPPORTED = ("numpy", "torch", "jax", "tensorflow")
_FRONTENDS = {"torch": "dotattn.torch", "jax": "dotattn.jax", "tensorflow": "dotattn.tensorflow"}


def framework_of(x: Any) -> str | None:
    """'numpy', 'torch', 'jax', 'tensorflow', or None for anything else (lists, scalars…)."""
    if isinstance(x, np.ndarray):
        return "numpy"
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return "torch"
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(x, jax.Array):
        return "jax"
    tf = sys.modules.get("tensorflow")
    if tf is not None and tf.is_tensor(x):
        return "tensorflow"
    return None


def common_framework(**arrays: Any) -> str:
    """The one framework of q, k, v (and array options); mixing libraries is a TypeError."""
    seen: dict[str, str] = {}
    for name, x in arrays.items():
        if x is None:
            continue
        fw = framework_of(x)
        # Values of no library (lists, scalars) are left to semantics.normalize, whose error
        # says "q must be an array … wrap it with numpy.asarray()" rather than "mixed libraries".
        if fw is not None and (fw != "numpy" or name in ("q", "k", "v")):
            seen[name] = fw
    kinds = set(seen.values())
    if len(kinds) > 1:
        desc = ", ".join(f"{n} is {f}" for n, f in seen.items())
        raise AttentionTypeError(f"all arrays of one call must come from one library, got {desc}")
    fw = seen.get("q")
    if fw not in SUPPORTED:
        return "numpy"  # let semantics.normalize raise its precise error on q
    return fw


def frontend(name: str):
    """The front-end module for a framework (imported lazily)."""
    if name == "torch":
        # An import statement, not importlib: torch.compile(fullgraph=True) can trace the
        # former but refuses to trace importlib.import_module.
        from . import torch as torch_frontend

        return torch_frontend
    import importlib

    return importlib.import_module(_FRONTENDS[name])

