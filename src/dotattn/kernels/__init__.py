"""Compute backends. Each consumes a normalized :class:`dotattn.semantics.AttentionCall`."""

import sys as _sys


def _share_torchs_openmp() -> None:
    """Load torch's own OpenMP runtime now, where torch is installed but not imported yet.

    torch's libraries ask for ``libgomp.so.1`` and ship their own ``torch/lib/libgomp.so.1``;
    the dynamic loader gives a library asking for a name the one already loaded under it.  A
    process that called a dotattn kernel before ``import torch`` had the system's runtime
    loaded under that name (by Numba's OpenMP layer, then), and torch's float16 SDPA ran
    10–40× slower on it (B1 32k decode: 358 ms against 24–36; benchmarks/decode_torch_order.py,
    30 Nov 2026).  Loading torch's runtime here (a shared library, not ``import torch``) gives
    torch its own runtime whatever the import order.  (Numba 0.68's layer asks for the system's
    ``libgomp.so.1.0.0`` by that full name, so it loads its own beside torch's: two runtimes,
    each library on the one it was built with — ``tests/reliability/test_openmp_runtime.py``.)
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

from . import _forked  # noqa: E402,F401  (its fork hook, before any kernel can start Numba's team)
