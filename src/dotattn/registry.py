"""Backend registry: each backend declares what it supports; dispatch takes the first able one.

Backends are named by module path and built on first use, so ``import dotattn`` imports no
JIT compiler and no framework.  A backend object provides::

    name, description
    available() -> (bool, reason)               # can it run on this machine at all?
    unsupported_reasons(call) -> list[str]      # why it cannot take this call ([] = it can)
    forward(call) -> (out (B,Hq,Lq,Dv), lse (B,Hq,Lq))
    backward(call, out, lse, dout, want_dbias) -> (dq, dk, dv, dbias | None)
    weights(call, lse) -> (B, Hq, Lq, Lk)

Tensor backends (``triton``) consume the caller's torch tensors instead of the call's NumPy
arrays (the call still comes from ``semantics.normalize``, which decided every option)::

    device_reasons(device, forced) -> list[str]  # why tensors on this device cannot run
    forward_tensors / backward_tensors / weights_tensors   (kernels/triton_backend.py)

``select(..., device=)`` says where the inputs live: ``None`` for NumPy arrays, else the
torch device type.  NumPy backends take NumPy arrays and CPU tensors (as NumPy views); tensor
backends are not even imported for NumPy calls.
"""

from __future__ import annotations

import importlib
import threading
from typing import Any

from .errors import AttentionValueError, UnsupportedCallError
from .semantics import AttentionCall

# Priority order: dispatch tries them top to bottom.
_SPECS: dict[str, tuple[str, str]] = {
    "triton": ("dotattn.kernels.triton_backend", "TritonBackend"),
    "cpu": ("dotattn.kernels.cpu", "CpuBackend"),
    "numpy": ("dotattn.kernels.numpy_tiled", "NumpyTiledBackend"),
    "reference": ("dotattn.kernels.reference", "ReferenceBackend"),
    # Last: NumPy calls reach it only by name (JAX arrays go through dotattn.jax instead).
    "jax": ("dotattn.kernels.jax_backend", "JaxBackend"),
}
# Backends that consume torch tensors; their availability depends on the environment
# (a CUDA device, TRITON_INTERPRET), so it is asked again rather than cached.
TENSOR_BACKENDS = frozenset({"triton"})
_INSTANCES: dict[str, Any] = {}
_UNAVAILABLE: dict[str, str] = {}
# The backends' modules are imported on first use, and Numba with the CPU ones.  First calls
# from several threads at once imported them concurrently, and a thread could see one of
# Numba's modules partially initialized (its modules import each other in cycles): "cannot
# import name 'NullCache' from partially initialized module 'numba.core.caching'" in 8 of 9
# cold starts of four threads (an audit, 6 Dec 2026) — recorded as the backend being
# unavailable for the rest of the process, and implementation=None then ran another backend.
# One lock for every lazy import of a kernel module (the decode kernels' too: dotattn.decoding).
_IMPORT_LOCK = threading.RLock()
_RETRY: set[str] = set()  # backends whose import failed for another reason than a missing package


def import_kernel_module(module_name: str):
    """``importlib.import_module`` under the kernels' import lock (see ``_IMPORT_LOCK``)."""
    with _IMPORT_LOCK:
        return importlib.import_module(module_name)


def names() -> list[str]:
    """Registered backend names, in dispatch priority order."""
    return list(_SPECS)


def _load(name: str):
    """The backend object, or None with the reason recorded when its module cannot load."""
    backend = _INSTANCES.get(name)
    if backend is not None:
        return backend
    if name in _UNAVAILABLE and name not in TENSOR_BACKENDS and name not in _RETRY:
        return None
    with _IMPORT_LOCK:  # (a first call: one thread at a time loads and checks a backend)
        if name in _INSTANCES:
            return _INSTANCES[name]
        module_name, cls_name = _SPECS[name]
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:  # a missing optional dependency or a backend not built yet
            _UNAVAILABLE[name] = f"cannot import {module_name}: {exc}"
            if not isinstance(exc, ModuleNotFoundError):
                _RETRY.add(name)  # (not a missing package: asked again at the next call)
            return None
        _RETRY.discard(name)
        backend = getattr(module, cls_name)()
        ok, reason = backend.available()
        if not ok:
            _UNAVAILABLE[name] = reason
            return None
        _UNAVAILABLE.pop(name, None)
        if name not in TENSOR_BACKENDS:
            _INSTANCES[name] = backend
        return backend


def _device_reasons(name: str, device: str | None, forced: bool) -> list[str] | None:
    """Reasons that need no backend import: array kind and device.  None = ask the backend."""
    if name in TENSOR_BACKENDS:
        if device is None:
            return ["runs on torch tensors (dotattn.torch.attention), not NumPy arrays"]
        if device == "cpu" and not forced:
            return ["CPU tensors go to the CPU backends unless implementation='triton' is asked for"]
        return None
    if device not in (None, "cpu"):
        return [f"runs on CPU arrays; the tensors are on {device!r} (move them with .cpu())"]
    return []


def get(name: str):
    """The named backend; raises when the name is unknown or the backend cannot run here."""
    if name not in _SPECS:
        raise AttentionValueError(
            f"implementation must be None or one of {names()}, got {name!r}"
        )
    backend = _load(name)
    if backend is None:
        raise UnsupportedCallError(f"backend {name!r} is not available here: {_UNAVAILABLE[name]}")
    return backend


def select(
    call: AttentionCall, implementation: str | None = None, *, need_backward: bool = False, device: str | None = None
):
    """The backend that runs ``call``: the forced one, or the first able one in priority order.

    ``device``: None for NumPy arrays, else the torch device type of the tensors.
    """
    if implementation is not None and not isinstance(implementation, str):
        raise AttentionValueError(f"implementation must be None or a backend name, got {implementation!r}")
    candidates = [implementation] if implementation is not None else names()
    if implementation is not None and implementation not in _SPECS:
        get(implementation)  # raises the unknown-name error
    all_reasons: dict[str, list[str]] = {}
    for name in candidates:
        early = _device_reasons(name, device, implementation is not None)
        if early:
            all_reasons[name] = early
            continue
        backend = _load(name)
        if backend is None:
            all_reasons[name] = [_UNAVAILABLE[name]]
            continue
        reasons = [] if early is not None else list(backend.device_reasons(device, implementation is not None))
        reasons += list(backend.unsupported_reasons(call))
        if need_backward and not hasattr(backend, "backward_tensors" if name in TENSOR_BACKENDS else "backward"):
            reasons.append("has no backward pass")
        if not reasons:
            return backend
        all_reasons[name] = reasons
    lines = "\n".join(f"  - {n}: {'; '.join(r)}" for n, r in all_reasons.items())
    what = f"implementation={implementation!r} cannot" if implementation else "no backend can"
    raise UnsupportedCallError(f"{what} take this call:\n{lines}")


def info() -> list[dict[str, Any]]:
    """One row per backend: name, available, status (reason or description)."""
    rows = []
    for name in names():
        backend = _load(name)
        rows.append(
            {
                "name": name,
                "available": backend is not None,
                "status": backend.description if backend is not None else _UNAVAILABLE[name],
            }
        )
    return rows
