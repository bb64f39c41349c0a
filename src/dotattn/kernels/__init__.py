"""Compute backends. Each consumes a normalized :class:`dotattn.semantics.AttentionCall`."""

import sys as _sys


def _share_torchs_openmp() -> None:
    """Load torch's own OpenMP runtime now, where torch is installed but not imported yet.

    Numba's parallel kernels run on its OpenMP layer, which loads ``libgomp.so.1``; torch
    ships its own ``torch/lib/libgomp.so.1`` under the same name.  Whichever loads first is
    the one both get (the dynamic loader reuses a loaded library of that name).  A process
    that imported torch first has torch's runtime in both; one that called a dotattn kernel
    first had the system's, and torch's float16 SDPA then ran 10–40× slower on it (B1 32k
    decode: 358 ms against 24–36; benchmarks/decode_torch_order.py, 30 Nov 2026).  Loading
    torch's runtime here (a shared library, not ``import torch``) gives every process the
    torch-first state, whatever its import order.
    """
    if not _sys.platform.startswith("linux") or "torch" in _sys.modules:
        return
    import ctypes
    import importlib.util
    import os

    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = os.path.join(folder, "lib", "libgomp.so.1")
        if os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                pass  # then Numba loads the system's, as before
            return


_share_torchs_openmp()
