"""torch.Tensor ↔ numpy.ndarray without copies where the memory allows it.

CPU tensors share their memory with the NumPy views made here (``Tensor.numpy()``), strides
included, so a transposed or expanded tensor becomes a transposed or zero-stride view: the
semantics module and the backends see the caller's bytes.  NumPy has no bfloat16 of its
own; ``ml_dtypes.bfloat16`` has the same bit layout, so bfloat16 goes through an int16 view.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from ..errors import AttentionTypeError, ImportOrderError
from ..semantics import BFLOAT16

# dtypes ``Tensor.numpy()`` maps one-to-one; the semantics module decides which are legal where.
_NUMPY_NATIVE = frozenset(
    {
        torch.float16,
        torch.float32,
        torch.float64,
        torch.bool,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.uint8,
    }
    # (torch ≥ 2.3's wider unsigned dtypes; their .numpy() is NumPy's uint16/32/64 — lengths
    # may be any int or uint dtype, as with NumPy arrays)
    | {getattr(torch, name) for name in ("uint16", "uint32", "uint64") if hasattr(torch, name)}
)

_COMPUTE_DTYPE = {torch.float64: torch.float64}  # everything else accumulates in float32

# Device types whose tensors run here.  "meta" never reaches a kernel: it only asks for shapes;
# "cuda" tensors go to the triton backend (kernels/triton_backend.py).
_DEVICES = ("cpu", "meta", "cuda")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the LSE and the weights: float64 for float64 inputs, else float32."""
    return _COMPUTE_DTYPE.get(dtype, torch.float32)


def check_device(name: str, t: torch.Tensor) -> None:
    """CPU and CUDA tensors run; any other device gets a NotImplementedError that says what to do."""
    if t.device.type not in _DEVICES:
        raise NotImplementedError(
            f"dotattn.attention: {name} is on device {str(t.device)!r}, but dotattn's PyTorch front end "
            "runs on CPU and CUDA tensors only. Move the tensors with .cpu() (or .cuda()), or use "
            "torch.nn.functional.scaled_dot_product_attention on that device."
        )


_NUMPY_DTYPES: dict[torch.dtype, np.dtype] = {}


def numpy_dtype(name: str, dtype: torch.dtype) -> np.dtype:
    """The NumPy dtype a tensor of ``dtype`` is viewed as (bfloat16 → ``ml_dtypes.bfloat16``)."""
    if dtype == torch.bfloat16:
        return BFLOAT16
    found = _NUMPY_DTYPES.get(dtype)
    if found is None:
        if dtype not in _NUMPY_NATIVE:
            raise AttentionTypeError(
                f"{name} has dtype {dtype}, which dotattn does not take; "
                "q, k, v, bias need float16, bfloat16, float32 or float64, mask bool, lengths and segment ids integers"
            )
        # Asked of torch once per dtype (a tensor allocation costs ≈ 7 µs, three per call).
        found = _NUMPY_DTYPES[dtype] = torch.empty((), dtype=dtype).numpy().dtype
    return found


_ONE_ELEMENT = bytearray(16)  # the memory of every stand-in (never written: see standin)


def standin(name: str, t: torch.Tensor, writeable: bool = False) -> np.ndarray:
    """A NumPy array with ``t``'s shape and dtype and no data (every stride 0, one element).

    For tensors NumPy cannot view (CUDA): :func:`dotattn.semantics.normalize` checks shapes and
    dtypes on it, and reshapes/broadcasts of it stay views, so nothing of size is allocated.
    ``writeable=True`` only satisfies checks on outputs that will be written — through the
    tensor, never through the stand-in.
    """
    # np.ndarray over a one-element buffer: what as_strided builds, at a tenth of its cost; and
    # kept by (shape, dtype, writeable), since nothing writes or re-flags a stand-in (a device
    # decode step makes three to five a call: ≈ 1.8 µs each, ≈ 0.4 found)
    key = (t.shape, t.dtype, writeable)
    a = _STANDINS.get(key)
    if a is None:
        a = np.ndarray(tuple(t.shape), numpy_dtype(name, t.dtype), _ONE_ELEMENT, 0, (0,) * t.dim())
        if not writeable:
            a.flags.writeable = False
        if len(_STANDINS) >= 256:
            _STANDINS.clear()
        _STANDINS[key] = a
    return a


_STANDINS: dict[tuple, np.ndarray] = {}


def check_dense(name: str, t: torch.Tensor) -> None:
    """Sparse (and other non-strided) tensors get an error naming the argument, not torch's own;
    so do nested (jagged) tensors, whose layout may say strided ("NestedTensorImpl doesn't
    support sizes", torch's own, before)."""
    if t.is_nested:
        raise AttentionTypeError(
            f"{name} is a nested tensor; dotattn takes dense tensors — pad it ({name}.to_padded_tensor(0.0)) "
            "and say which positions count with lengths (kv_lengths=, cache_lengths=)"
        )
    if t.layout != torch.strided:
        raise AttentionTypeError(
            f"{name} is a {t.layout} tensor; dotattn takes dense tensors — pass {name}.to_dense()"
        )


# (bound once: looked up through torch._C on every conversion it cost ≈ 0.06 µs more a tensor)
_is_functorch_wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", lambda t: False)


import torch.autograd.forward_ad as _forward_ad  # noqa: E402  (torch is imported above)


def check_no_forward_ad(where: str, **tensors) -> None:
    """Forward-mode AD (``torch.autograd.forward_ad``'s dual tensors, ``torch.func.jvp`` and
    ``jacfwd``) is refused: dotattn has no JVP rule, and the tangents came out as None or zeros,
    silently (until 7 Dec 2026).  Costs one attribute read when no dual level is active."""
    if _forward_ad._current_level < 0:
        return
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and _forward_ad.unpack_dual(t).tangent is not None:
            raise AttentionTypeError(_forward_ad_message(where, name))
    if torch._C._are_functorch_transforms_active():
        from torch._C._functorch import TransformType
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

        if any(i.key() == TransformType.Jvp for i in retrieve_all_functorch_interpreters()):
            raise AttentionTypeError(_forward_ad_message(where, None))


def _forward_ad_message(where: str, name: str | None) -> str:
    what = f"{name} carries a forward-mode tangent" if name else "the call runs under torch.func.jvp/jacfwd"
    return (
        f"{what}, but {where} has no forward-mode derivative (JVP); use reverse mode "
        "(backward(), torch.func.grad, jacrev) instead"
    )


def check_not_transformed(name: str, t: torch.Tensor) -> None:
    """A tensor inside a ``torch.func`` transform (``vmap``'s batched tensors, ``grad``'s) has no
    memory of its own to view or write: refused by name, not by torch's "Cannot access data
    pointer of Tensor that doesn't have storage"."""
    if _is_functorch_wrapped(t):
        raise AttentionTypeError(
            f"{name} is a tensor inside a torch.func transform (vmap, grad, jacrev, …), which dotattn's "
            "decoding and NumPy-based entry points cannot take: they read and write the tensors' memory "
            "(a KV cache in place). Call them outside the transform (for vmap: once on the whole batch)"
        )


def to_numpy(name: str, t: torch.Tensor) -> np.ndarray:
    """A NumPy view of a CPU tensor's memory (a copy only for lazy negation/conjugation bits)."""
    check_dense(name, t)
    check_not_transformed(name, t)
    if t.device.type not in ("cpu", "meta"):
        # Entry points that compute on NumPy views (decoding, merges) cannot read device memory.
        raise NotImplementedError(
            f"dotattn: {name} is on device {str(t.device)!r}, but this entry point runs on CPU tensors only "
            "(dotattn.attention runs CUDA tensors on the triton backend); move the tensors with .cpu()"
        )
    if t.requires_grad:  # detach() makes a new tensor object (≈ 1 µs): only where numpy() needs it
        t = t.detach()
    if t.is_neg() or t.is_conj():
        t = t.resolve_neg().resolve_conj()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(BFLOAT16)
    numpy_dtype(name, t.dtype)  # raises for dtypes NumPy cannot view
    return t.numpy()


def from_numpy(x: np.ndarray) -> torch.Tensor:
    """A tensor sharing ``x``'s memory (``x`` must be writable and of a dtype torch knows)."""
    if x.dtype == BFLOAT16:
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(x)



_LLVM_ORDER_CHECKED = False
_TRITON_INSTALLED: bool | None = None


def check_torch_llvm_order() -> None:
    """Refuse, with the fix, a PyTorch operator call that would abort the whole process.

    A ``torch.library`` custom operator (dotattn's torch ops) imports ``torch._dynamo`` on its
    first call, which imports Triton.  Triton and TensorFlow each bundle LLVM and register the
    same LLVM command-line options, so loading Triton after TensorFlow kills the process with
    "LLVM ERROR: inconsistency in registered CommandLine options" (an upstream conflict:
    ``import tensorflow, torch._dynamo`` reproduces it without dotattn).  Loaded the other way
    round they coexist.  Passes once for good: after the first call Triton is loaded.
    """
    global _LLVM_ORDER_CHECKED, _TRITON_INSTALLED
    if _LLVM_ORDER_CHECKED:
        return
    if _TRITON_INSTALLED is None:
        # Looked up once: find_spec walks sys.path (≈ 140 µs), and calls that never reach a
        # custom operator (the eager CPU path) never load Triton, so this runs on every call.
        import importlib.util

        _TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
    if "triton" in sys.modules or not _TRITON_INSTALLED:
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
