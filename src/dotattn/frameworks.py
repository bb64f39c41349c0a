"""Which array library a value belongs to — without importing any library the caller didn't.

As einops and array-api-compat do, a type is matched against libraries already present in
``sys.modules``; a library that is not imported cannot have made the value.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from .errors import AttentionTypeError, ImportOrderError

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


_LLVM_ORDER_CHECKED = False


def check_torch_llvm_order() -> None:
    """Refuse, with the fix, a PyTorch operator call that would abort the whole process.

    A ``torch.library`` custom operator (dotattn's torch ops) imports ``torch._dynamo`` on its
    first call, which imports Triton.  Triton and TensorFlow each bundle LLVM and register the
    same LLVM command-line options, so loading Triton after TensorFlow kills the process with
    "LLVM ERROR: inconsistency in registered CommandLine options" (an upstream conflict:
    ``import tensorflow, torch._dynamo`` reproduces it without dotattn).  Loaded the other way
    round they coexist.  Passes once for good: after the first call Triton is loaded.
    """
    global _LLVM_ORDER_CHECKED
    if _LLVM_ORDER_CHECKED:
        return
    import importlib.util

    if "triton" in sys.modules or importlib.util.find_spec("triton") is None:
        _LLVM_ORDER_CHECKED = True  # nothing left to conflict
        return
    if "tensorflow" in sys.modules:
        raise ImportOrderError(
            "TensorFlow is loaded, and this PyTorch call would now load Triton (through "
            "torch._dynamo, which PyTorch's custom operators import on first use); Triton and "
            "TensorFlow bundle conflicting LLVM copies and loading Triton second aborts the process "
            "(LLVM ERROR: inconsistency in registered CommandLine options — an upstream conflict). "
            "Import PyTorch's compiler stack before TensorFlow: put `import torch, torch._dynamo` "
            "(or any dotattn.torch call) before `import tensorflow` in your program."
        )
