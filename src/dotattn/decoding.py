"""KV-cache decoding: :func:`attention_with_kvcache` and :class:`KVCache`.

Autoregressive generation attends a few new query rows to a growing cache of keys and
values.  This module converts the caller's arrays, validates the call with
:func:`dotattn.decode_semantics.normalize` (the definition the kernels read), writes the new
keys/values into the caller's cache in place, and hands one :class:`DecodeCall` to a decode
kernel:

* ``cpu``  — split-KV ("flash decoding") compiled by Numba (:mod:`dotattn.kernels.cpu_decode`);
* ``numpy`` — the same split in NumPy, parts merged by :func:`dotattn.merge_attention_states`
  (:mod:`dotattn.kernels.numpy_decode`);
* ``reference`` — gathers the visible keys and runs the float64 reference backend of
  ``attention()``: the oracle.

Semantics are those of ``attention()`` with ``kv_lengths = cache_lengths + Lnew`` and
bottom-right alignment; :mod:`dotattn.decode_semantics` states them, with the fixed
:data:`SPLIT_SIZE` chunks that make a sequence's output bitwise the same in any batch
(``docs/decoding.md``).

Shape legend (``layout="bhld"``; ``"blhd"`` swaps the L and H axes of q, k_new, v_new, out and
of the contiguous cache, and the page-size and head axes of a paged cache)::

    q            (B, Hq, Lq, D)              out  (B, Hq, Lq, Dv)     lse (B, Hq, Lq)
    k_cache      (B, Hkv, capacity, D)       or paged (num_pages, Hkv, page_size, D)
    v_cache      (B, Hkv, capacity, Dv)      or paged (num_pages, Hkv, page_size, Dv)
    k_new/v_new  (B, Hkv, Lnew, D / Dv)      block_table (B, max_pages)   cache_lengths (B,)
"""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.util
import math
import numbers
import sys
from typing import Any

import numpy as np

from . import semantics

# The call's definition lives below the kernels (they read it, and never import this
# module); SPLIT_SIZE, DecodeCall, normalize, apply_rotary… stay importable from here.
from .decode_semantics import (  # noqa: F401
    SIXTEEN_BIT,
    SPLIT_SIZE,
    DecodeCall,
    apply_rotary,
    check_caches_apart,
    check_shapes,
    check_own_slots,
    float_array,
    normalize,
    query_positions,
    rotated_q,
    write_new,
)
from .errors import AttentionMemoryError, AttentionTypeError, AttentionValueError, UnsupportedCallError
from .frameworks import framework_of
from .registry import import_kernel_module
from .semantics import BFLOAT16, FLOAT_DTYPES

__all__ = ["attention_with_kvcache", "KVCache", "SPLIT_SIZE", "DecodeCall"]

_IMPLEMENTATIONS = {
    "cpu": "dotattn.kernels.cpu_decode",
    "numpy": "dotattn.kernels.numpy_decode",
    "reference": "dotattn.kernels.numpy_decode",
}
_kernel_modules: dict[str, Any] = {}
_cpu_ok: bool | None = None
_F32 = np.dtype(np.float32)


# =================================================================================
# the public call
# =================================================================================


# The public entry points, each run outside torch.compile's tracer (Dynamo) — see _eager.
_EAGER: dict[Any, Any] = {}


def _eager(fn):
    """``fn`` run outside ``torch.compile``: a call from compiled code graph-breaks and runs eagerly.

    Dynamo would otherwise trace into the call — its NumPy views through ``torch._numpy``
    (copies: the append into the caller's cache is lost or refused), its Numba dispatchers
    (the first call of a process crashed in Dynamo's bytecode transform: "exception table entry
    start instruction has no offset"), the NumPy kernel (``np.copyto`` into a fake tensor).  Once
    ``torch._dynamo`` is loaded (``torch.compile`` loads it) ``fn`` goes through
    ``torch._dynamo.disable`` (≈ 0.5 µs a call); before, nothing can be compiling, and ``fn``
    runs as it is — no torch import.
    """

    @functools.wraps(fn)
    def entry(*args, **kwargs):
        run = _EAGER.get(fn)
        if run is None:
            dynamo = sys.modules.get("torch._dynamo")
            if dynamo is None or not hasattr(dynamo, "disable"):  # (not loaded, or still loading)
                return fn(*args, **kwargs)
            run = _EAGER[fn] = dynamo.disable(fn, recursive=True)
        return run(*args, **kwargs)

    # Dynamo reads these attributes without importing anything: a call from compiled code is a
    # graph break (with fullgraph=True, torch's error "Skip calling `torch.compiler.disable()`d
    # function" with this reason), never traced — not even this wrapper, whose first call builds
    # the disabled function.
    entry._torchdynamo_disable = True
    entry._torchdynamo_disable_msg = (
        f"dotattn's {fn.__qualname__} writes the caller's cache in place through NumPy views and runs "
        "compiled kernels: it runs eagerly, outside the graph"
    )
    return entry


# the NumPy dtypes of the torch dtypes that torch/_convert.py's to_numpy views as they are
# (filled on first use from its list); bfloat16 goes through an int16 view
_VIEW_DTYPES: frozenset = frozenset()
_torch_convert: Any = None  # dotattn.torch._convert once a torch call has come


def _convert_module():
    """``dotattn.torch._convert``, imported once (an import statement in a function costs ≈ 0.4–2 µs a call)."""
    global _torch_convert, _VIEW_DTYPES
    if _torch_convert is None:
        from .torch import _convert

        _VIEW_DTYPES = frozenset(_convert.numpy_dtype("", dt) for dt in _convert._NUMPY_NATIVE)
        _torch_convert = _convert
    return _torch_convert


def _cpu_view(t: Any):
    """``t.numpy()`` when it is what ``_as_numpy``'s checked path would return, else None.

    ``Tensor.numpy()`` itself refuses what that path refuses or converts otherwise — a tensor
    off the CPU, not dense, requiring grad while grad mode is on, with a lazy negation or
    conjugation bit, of a dtype NumPy has not — and a view of one of the dtypes that path takes
    is the view it would return (bfloat16 through int16, as there).  One torch call instead of
    the checked path's eight (≈ 8 µs warm, twice that cold after a kernel); anything refused or
    of another dtype returns None, and the caller takes the checked path with its messages.
    (``t`` is a ``torch.Tensor`` itself: subclasses take the checked path.)
    """
    if t.dtype is _TORCH_BF16:
        try:
            return t.view(_TORCH_I16).numpy().view(BFLOAT16)
        except (TypeError, RuntimeError):
            return None
    try:
        view = t.numpy()
    except (TypeError, RuntimeError):
        return None
    return view if view.dtype in _VIEW_DTYPES else None


_TORCH_BF16 = _TORCH_I16 = _TENSOR = None  # torch's, set by _torch_ready()


def _torch_ready():
    """torch's Tensor type (and the constants :func:`_cpu_view` compares with), once torch is imported."""
    global _TORCH_BF16, _TORCH_I16, _TENSOR
    if _TENSOR is None:
        torch = sys.modules["torch"]
        _convert_module()
        _TORCH_BF16, _TORCH_I16 = torch.bfloat16, torch.int16
        _TENSOR = torch.Tensor
    return _TENSOR


def _as_numpy(name: str, x: Any, written: bool = False):
    """Torch CPU tensors → NumPy views of their memory; anything else unchanged.

    ``written``: k_new/v_new go into ``x`` — a tensor with a lazy negation or conjugation bit,
    which only a copy could show NumPy, is refused (the write would land in the copy), and so is
    an inference tensor outside ``torch.inference_mode()`` (as torch and the device path refuse
    its in-place update).  A tensor off the CPU (meta, or CUDA beside a CPU q) is refused by name."""
    if x is None or isinstance(x, np.ndarray):
        return x
    if type(x) is _TENSOR:
        if written and x.is_inference() and not sys.modules["torch"].is_inference_mode_enabled():
            raise _inference_cache_error(name)  # (torch refuses such in-place updates; NumPy's view would not)
        view = _cpu_view(x)
        if view is not None:
            return view
    if framework_of(x) == "torch":
        _torch_ready()  # the first torch conversion: the fast path's constants for the next ones
        from .torch._convert import check_device, to_numpy

        check_device(name, x)
        if x.device.type != "cpu":  # (a meta or CUDA tensor beside a CPU q: NumPy cannot read it)
            raise AttentionValueError(
                f"{name} is on device {str(x.device)!r} but this call runs on the CPU (q is a CPU tensor or a "
                "NumPy array); q, the caches and the other tensors must share one device"
            )
        if written and (x.is_neg() or x.is_conj()):
            raise _negated_cache_error(name)
        if written and x.is_inference() and not sys.modules["torch"].is_inference_mode_enabled():
            raise _inference_cache_error(name)
        return to_numpy(name, x)
    return x


def _inference_cache_error(name: str) -> AttentionValueError:
    """A cache to be written that is an inference tensor, outside ``torch.inference_mode()``:
    torch refuses in-place updates of such tensors there (host and device paths alike)."""
    return AttentionValueError(
        f"{name} is an inference tensor, which torch updates in place only under torch.inference_mode(); "
        "call attention_with_kvcache there, or pass a cache made outside it"
    )


def _negated_cache_error(name: str) -> AttentionValueError:
    """A cache to be written whose torch tensor carries a lazy negation/conjugation bit (host and
    device paths alike: a copy would take the write, or the kernel would read the negation)."""
    return AttentionValueError(
        f"{name} carries a lazy negation or conjugation bit, so its memory does not hold its values "
        f"and k_new/v_new cannot be written into it in place; pass {name}.resolve_neg().resolve_conj()"
    )


def _host(name: str, x: Any):
    """Small arguments of a device call (lengths, page table, slopes, rotary tables) as host NumPy."""
    if x is None or type(x) is np.ndarray:  # (the common forms, without the library scan)
        return x
    if framework_of(x) == "torch":
        from .torch._convert import to_numpy

        return to_numpy(name, x.detach().cpu())
    return x


def _rotary_tables(rotary: Any, convert) -> Any:
    """``(cos, sin)`` with torch tables made NumPy by ``convert``; anything else is normalize()'s to refuse."""
    if isinstance(rotary, (tuple, list)) and len(rotary) == 2:
        return tuple(convert(f"rotary[{i}]", x) for i, x in enumerate(rotary))
    return rotary


def _normalize_on_device(arrays: dict[str, Any], **kwargs) -> DecodeCall:
    """:func:`normalize` for torch tensors that NumPy cannot view (CUDA; meta), all on q's device.

    It runs on zero-stride stand-ins of the large tensors (shape and dtype only) and host copies
    of the small arguments; the caller writes and reads the tensors themselves.
    """
    from .torch._convert import check_device, standin

    q = arrays["q"]
    check_device("q", q)
    device = q.device
    for name, t in arrays.items():
        if t is not None and t.device != device:  # (q's device is checked: so is any equal to it)
            check_device(name, t)
            raise AttentionValueError(
                f"{name} is on device {str(t.device)!r} but q is on {str(device)!r}; "
                "q, the caches and the new keys/values must share one device"
            )
    if arrays["k_new"] is not None:
        _check_device_caches_writeable(arrays["k_cache"], arrays["v_cache"])
    # normalize() refuses read-only caches when it must write into them; a stand-in is never
    # written (the kernel writes the tensors).
    stand = [None if t is None else standin(n, t, writeable=n in ("k_cache", "v_cache")) for n, t in arrays.items()]
    for key in ("cache_lengths", "block_table", "alibi_slopes"):
        kwargs[key] = _host(key, kwargs[key])
    if kwargs.get("rotary") is not None:
        # meta tables have shapes and dtypes only, which is all their checks read (a host copy
        # raised "Cannot copy out of meta tensor"); a meta call computes nothing with them
        kwargs["rotary"] = _rotary_tables(
            kwargs["rotary"], lambda n, x: standin(n, x) if getattr(x, "is_meta", False) else _host(n, x)
        )
    return normalize(*stand, **kwargs, standins=True)


def _check_device_caches_writeable(k_cache: Any, v_cache: Any) -> None:
    """What ``decode_semantics`` checks of host caches that take k_new/v_new, on device tensors:
    no zero stride on an axis longer than one (an ``expand``), no byte of k_cache in v_cache (its
    exact test, :func:`~dotattn.decode_semantics.check_caches_apart`, on arrays describing the
    tensors' memory: see :func:`_memory`), and no inference tensor outside inference mode (torch
    refuses its in-place update — after the other cache was written)."""
    torch = sys.modules["torch"]
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.is_inference() and not torch.is_inference_mode_enabled():
            raise _inference_cache_error(name)
        check_own_slots(name, tuple(t.shape), tuple(t.stride()), t.numel(), ".clone()")
    if not k_cache.numel() or not v_cache.numel() or k_cache.is_meta:  # (meta tensors have no memory)
        return
    if k_cache.is_contiguous() and v_cache.is_contiguous():
        # the common call, two buffers of their own: byte ranges apart (≈ 1 µs); caches whose
        # ranges meet, or strided ones (one buffer's halves, slices), take the exact test
        k_at, v_at = k_cache.data_ptr(), v_cache.data_ptr()
        if k_at + k_cache.nbytes <= v_at or v_at + v_cache.nbytes <= k_at:
            return
    check_caches_apart(_memory(k_cache), _memory(v_cache))  # (byte ranges in C first, then exact: ≈ 7 µs)


class _MemoryInterface:
    __slots__ = ("__array_interface__",)


def _memory(t: Any) -> np.ndarray:
    """An ndarray over ``t``'s memory (address, shape, byte strides, item size), built without
    reading it: for ``np.shares_memory``, which compares addresses only, on device tensors too.
    Never read or write it."""
    size = t.element_size()
    desc = _MemoryInterface()
    desc.__array_interface__ = {
        "shape": tuple(t.shape), "typestr": f"|V{size}", "data": (t.data_ptr(), False),
        "strides": tuple([st * size for st in t.stride()]), "version": 3,
    }
    return np.asarray(desc)


def _written_in_place(tensors) -> None:
    """Tell autograd that torch tensors were written in place by a kernel it did not see (through
    a NumPy view or a pointer): their version counters move, as a torch in-place operation's do,
    so a backward that saved one of them before the write fails with torch's "modified by an
    inplace operation" instead of computing with the new values.  (Called also where a write
    may not have happened — an interrupt — since a counter moved in vain does no harm.)"""
    sys.modules["torch"].autograd.graph.increment_version(tensors)


def _check_library(arrays: dict[str, Any]) -> str:
    # the common torch call: torch.Tensor itself (no subclass) throughout — "torch", as below
    # (set by the first torch conversion, which imports dotattn.torch as it always did)
    tensor = _TENSOR
    if tensor is not None and type(arrays["q"]) is tensor:
        for x in arrays.values():
            if x is not None and type(x) is not tensor:
                break
        else:
            return "torch"
    kinds = {}
    for name, x in arrays.items():
        if x is None:
            continue
        fw = framework_of(x)
        if fw not in ("numpy", "torch"):
            what = fw or f"{type(x).__module__}.{type(x).__name__}"
            raise AttentionTypeError(f"{name} must be a NumPy array or a torch tensor, got {what}")
        kinds[name] = fw
    if len(set(kinds.values())) > 1:
        desc = ", ".join(f"{n} is {f}" for n, f in kinds.items())
        raise AttentionTypeError(f"q, the caches and the new keys/values must come from one library, got {desc}")
    return kinds.get("q", "numpy")


def _check_no_grad(arrays: dict[str, Any]) -> None:
    torch = sys.modules["torch"]  # a torch tensor came: torch is imported
    # (forward-mode tangents whatever the grad mode: the call would drop them silently)
    _convert_module().check_no_forward_ad("attention_with_kvcache", **arrays)
    if not torch.is_grad_enabled():
        return
    for name, x in arrays.items():
        if x is not None and x.requires_grad:
            raise AttentionValueError(
                f"{name} requires grad, but attention_with_kvcache has no backward pass; "
                "call it under torch.no_grad() or torch.inference_mode() (use dotattn.attention() for training)"
            )


def _check_options_no_grad(alibi_slopes: Any, rotary: Any) -> None:
    """ALiBi slopes and rotary tables that require grad in a torch call, with grad mode on:
    refused as q is — the call has no backward, so a model training them would get no gradient
    and no error (they were converted to host values and used).  A NumPy call, whose result
    carries no graph anyway, converts them (tests/decoding/test_errors.py)."""
    named = [("alibi_slopes", alibi_slopes)]
    if isinstance(rotary, (tuple, list)) and len(rotary) == 2:
        named += [("rotary[0]", rotary[0]), ("rotary[1]", rotary[1])]
    tensors = {name: x for name, x in named if getattr(x, "requires_grad", False) is True}
    if tensors:
        _check_no_grad(tensors)


def _kernel(implementation: str | None):
    """The decode kernel module for ``implementation`` (None: ``cpu`` when Numba is there)."""
    global _cpu_ok
    if implementation is None:
        if _cpu_ok is None:
            _cpu_ok = "cpu" in _IMPLEMENTATIONS and importlib.util.find_spec("numba") is not None
        implementation = "cpu" if _cpu_ok else "numpy"
    if not isinstance(implementation, str):  # (before the dict lookups: a list is unhashable)
        raise AttentionTypeError(
            f"implementation must be None or a str (one of {list(_IMPLEMENTATIONS)}), "
            f"got {type(implementation).__name__}"
        )
    module = _kernel_modules.get(implementation)
    if module is not None:
        return implementation, module
    if implementation == "triton":  # (torch tensors never reach here with it: the device branch)
        raise AttentionValueError(
            "implementation='triton' runs torch tensors (CUDA ones, or CPU ones under TRITON_INTERPRET=1), "
            f"but these are NumPy arrays; use None or one of {list(_IMPLEMENTATIONS)}"
        )
    if implementation not in _IMPLEMENTATIONS:
        # ('triton' too: torch tensors take it, and a misspelled 'Triton' came here listing the others only)
        raise AttentionValueError(
            f"implementation must be None or one of {list(_IMPLEMENTATIONS) + ['triton']} for "
            f"attention_with_kvcache, got {implementation!r}"
        )
    try:
        module = import_kernel_module(_IMPLEMENTATIONS[implementation])  # (under the kernels' import lock)
    except ImportError as exc:
        raise UnsupportedCallError(f"implementation={implementation!r} is not available here: {exc}") from None
    _kernel_modules[implementation] = module
    return implementation, module


@_eager
def attention_with_kvcache(
    q: Any,
    k_cache: Any,
    v_cache: Any,
    k_new: Any = None,
    v_new: Any = None,
    *,
    cache_lengths: Any,
    block_table: Any = None,
    causal: bool | str = True,
    window: tuple[int | None, int | None] | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    alibi_slopes: Any = None,
    rotary: tuple[Any, Any] | None = None,
    return_lse: bool = False,
    layout: str = "bhld",
    implementation: str | None = None,
):
    """Attention of new query rows over a KV cache, appending new keys/values in place.

    Shapes (``layout="bhld"``; ``"blhd"`` swaps the L and H axes of q, k_new, v_new, out and
    the contiguous cache, and the page-size and head axes of a paged cache)::

        q            (B, Hq, Lq, D)            out (B, Hq, Lq, Dv)      lse (B, Hq, Lq)
        k_cache      (B, Hkv, capacity, D)     v_cache (B, Hkv, capacity, Dv)
          or paged   (num_pages, Hkv, page_size, D) with block_table int (B, max_pages)
        k_new, v_new (B, Hkv, Lnew, D), (B, Hkv, Lnew, Dv)      cache_lengths int (B,)

    Args:
        cache_lengths: tokens already in each sequence's cache *before* this call, int
            ``(B,)`` (or one int for every sequence, as FlashAttention's ``cache_seqlens``).
            The call does not change it (:class:`KVCache` keeps lengths for you).
        k_new, v_new: written in place at ``[cache_lengths[b], cache_lengths[b] + Lnew)``
            (both or neither).  They may be in q's dtype; they are stored in the cache's.
        block_table: logical page ``i`` of sequence ``b`` is physical page
            ``block_table[b, i]``; any page size ≥ 1.  Entries past the pages a sequence
            uses are ignored (may hold −1); pages in use must lie in the pool and not repeat.
        causal: True (bottom-right: query ``i`` sits at ``cache_lengths[b] + Lnew − Lq + i``
            and sees keys up to it) or False (every key in ``[0, cache_lengths[b] + Lnew)``).
        window, scale, softcap, alibi_slopes: as in :func:`dotattn.attention`.
        rotary: ``(cos, sin)``, each ``(positions, R)`` with ``2R ≤ D``: RoPE (non-interleaved,
            "rotate half") applied to q and k_new at their absolute positions; the cache keeps
            rotated keys.
        return_lse: also return the natural-log LSE ``(B, Hq, Lq)`` (float32; float64 for a
            float64 call).
        implementation: None (``cpu`` when Numba is installed, else ``numpy``), ``"cpu"``,
            ``"numpy"`` or ``"reference"``.  CUDA tensors run on the Triton split-KV kernel
            (``kernels/triton_decode.py``); ``"triton"`` runs it on CPU tensors under
            ``TRITON_INTERPRET=1``.

    Caches may be float64, float32, float16 or bfloat16; q has the cache's dtype or is float32
    with a 16-bit cache; the output has q's dtype.  NumPy arrays or torch CPU tensors (written
    in place through a shared-memory view).  No backward pass: with torch, call it under
    ``torch.no_grad()``.  A refused call writes nothing.  Keys are processed in chunks of
    :data:`SPLIT_SIZE` positions, so each sequence's output is bitwise independent of the
    rest of the batch, the capacity and the page layout.
    """
    return _attention_with_kvcache(
        q, k_cache, v_cache, k_new, v_new, cache_lengths=cache_lengths, block_table=block_table, causal=causal,
        window=window, scale=scale, softcap=softcap, alibi_slopes=alibi_slopes, rotary=rotary,
        return_lse=return_lse, layout=layout, implementation=implementation, trusted=False,
    )


def _attention_with_kvcache(
    q, k_cache, v_cache, k_new, v_new, *, cache_lengths, block_table, causal, window, scale, softcap, alibi_slopes,
    rotary, return_lse, layout, implementation, trusted: bool,
):
    """:func:`attention_with_kvcache`; ``trusted=True`` is :meth:`KVCache.attend`'s path, whose
    lengths and block table the cache keeps valid itself (``decode_semantics.normalize``)."""
    # The common NumPy call skips the library scan (a decode step is many small calls).
    written = None  # torch caches the call writes through NumPy views (their version counters)
    nd = np.ndarray
    plain = (
        type(q) is nd and type(k_cache) is nd and type(v_cache) is nd
        and (k_new is None or type(k_new) is nd) and (v_new is None or type(v_new) is nd)
    )
    fw = "numpy"
    if not plain:
        arrays = dict(q=q, k_cache=k_cache, v_cache=v_cache, k_new=k_new, v_new=v_new)
        fw = _check_library(arrays)
    if fw == "torch":
        _torch_ready()  # (once: later calls take _check_library's quick path, device ones too)
        _check_no_grad(arrays)
        if alibi_slopes is not None or rotary is not None:
            _check_options_no_grad(alibi_slopes, rotary)
        if not q.is_cpu or implementation == "triton":  # (is_cpu: device.type == "cpu", without the device object)
            # CUDA tensors (or CPU ones under Triton's interpreter): the triton split-KV kernel,
            # validated on stand-ins, appended in place on the device.
            from .kernels.triton_decode import attention_with_kvcache_tensors
            from .torch._convert import check_not_transformed

            for name, t in arrays.items():
                if t is not None:
                    check_not_transformed(name, t)  # (the kernel reads memory such a tensor lacks)
                # A lazy negation/conjugation bit: the memory holds other values than the tensor
                # (the kernel reads memory).  Read-only inputs are resolved (a copy, as NumPy's
                # view of one is); a cache that takes new tokens is refused, as on the host path.
                if t is not None and (t.is_neg() or t.is_conj()):
                    if name in ("k_cache", "v_cache") and arrays["k_new"] is not None:
                        raise _negated_cache_error(name)
                    arrays[name] = t.resolve_neg().resolve_conj()
            if not isinstance(return_lse, (bool, np.bool_)):
                raise AttentionTypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
            call = _normalize_on_device(
                arrays, cache_lengths=cache_lengths, block_table=block_table, causal=causal, window=window,
                scale=scale, softcap=softcap, alibi_slopes=alibi_slopes, rotary=rotary, layout=layout, trusted=trusted,
            )
            if call.cache_dtype == np.float64:
                raise AttentionValueError(
                    "float64 caches run on the CPU decode kernels only (the triton decode kernel computes in float32)"
                )
            return attention_with_kvcache_tensors(call, *arrays.values(), return_lse=bool(return_lse))
        # (written out, in the order the checks ran before: a generator cost ≈ 1 µs more)
        written = (k_cache, v_cache) if k_new is not None else None
        if k_new is not None:  # (the tensors' own strides and copy hint, not their NumPy views' byte strides)
            for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
                _convert_module().check_dense(name, t)  # (a sparse tensor's strides are not its memory's, or raise)
                if 0 in t.stride():
                    check_own_slots(name, tuple(t.shape), tuple(t.stride()), t.numel(), ".clone()")
        q = _as_numpy("q", q)
        k_cache = _as_numpy("k_cache", k_cache, k_new is not None)
        v_cache = _as_numpy("v_cache", v_cache, k_new is not None)
        k_new = _as_numpy("k_new", k_new)
        v_new = _as_numpy("v_new", v_new)
        cache_lengths = _as_numpy("cache_lengths", cache_lengths)
        block_table = _as_numpy("block_table", block_table)
        alibi_slopes = _as_numpy("alibi_slopes", alibi_slopes)
    else:  # NumPy arrays, with maybe a torch tensor among the small arguments (made NumPy as above)
        if not (cache_lengths is None or type(cache_lengths) is nd):
            cache_lengths = _as_numpy("cache_lengths", cache_lengths)
        if not (block_table is None or type(block_table) is nd):
            block_table = _as_numpy("block_table", block_table)
        if not (alibi_slopes is None or type(alibi_slopes) is nd):
            alibi_slopes = _as_numpy("alibi_slopes", alibi_slopes)
    if rotary is not None:
        rotary = _rotary_tables(rotary, _as_numpy)
    if not isinstance(return_lse, (bool, np.bool_)):
        raise AttentionTypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    name, kernel = _kernel(implementation)
    call = normalize(
        q, k_cache, v_cache, k_new, v_new, cache_lengths=cache_lengths, block_table=block_table,
        causal=causal, window=window, scale=scale, softcap=softcap, alibi_slopes=alibi_slopes,
        rotary=rotary, layout=layout, trusted=trusted,
    )
    try:
        out, lse = kernel.decode(call, reference=name == "reference")
    except SystemError as exc:
        # Ctrl-C while Numba boxes a kernel's result (it calls back into Python for the array
        # type): Numba reports the pending KeyboardInterrupt as a SystemError "returned a result
        # with an exception set", its cause — 3 of 30 random Ctrl-Cs of a streamed generation
        # (an audit, 6 Dec 2026); the caller gets theirs, as `except KeyboardInterrupt` expects
        cause = exc.__cause__
        while isinstance(cause, SystemError):  # (one SystemError a dispatcher it passed through)
            cause = cause.__cause__
        if isinstance(cause, KeyboardInterrupt):
            raise cause from None
        raise
    finally:
        if written is not None:
            _written_in_place(written)
    out = out.astype(call.dtype, copy=False)
    # float32 LSEs (float64 for a float64 call), as documented — the reference computes in float64
    lse = lse.astype(np.float64 if call.dtype == np.float64 else np.float32, copy=False)
    if layout == "blhd":
        out = np.ascontiguousarray(out.swapaxes(1, 2))
    if fw == "torch":
        from_numpy = _convert_module().from_numpy
        out = from_numpy(out)
        lse = from_numpy(lse) if return_lse else None
    return (out, lse) if return_lse else out


# =================================================================================
# KVCache: buffers, lengths and pages for a model
# =================================================================================


def _resolve_dtype(dtype: Any, library: str):
    """A dtype given as a name, a NumPy dtype or a torch dtype → (numpy dtype, library's dtype)."""
    # A torch dtype for NumPy buffers too (docs/decoding.md: "a name, a NumPy dtype or a torch
    # dtype"): it was refused there as "dtype must be float16, …, got torch.float16".
    torch = sys.modules.get("torch") if library == "numpy" else None
    if library == "torch":
        import torch
    if torch is not None and isinstance(dtype, torch.dtype):
        names = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float64: "float64"}
        if dtype not in names:
            raise AttentionTypeError(f"dtype must be float16, bfloat16, float32 or float64, got {dtype}")
        dtype = names[dtype]
    if dtype is None:  # (np.dtype(None) is float64, which the default is not: as nn's layers)
        raise AttentionTypeError("dtype must be float16, bfloat16, float32 or float64, got None")
    try:
        np_dtype = BFLOAT16 if str(dtype) == "bfloat16" else np.dtype(dtype)
    except TypeError:
        raise AttentionTypeError(f"dtype must be float16, bfloat16, float32 or float64, got {dtype!r}") from None
    if np_dtype not in FLOAT_DTYPES:
        raise AttentionTypeError(f"dtype must be float16, bfloat16, float32 or float64, got {np_dtype}")
    if library == "numpy":
        return np_dtype, np_dtype
    import torch

    return np_dtype, getattr(torch, "bfloat16" if np_dtype == BFLOAT16 else np_dtype.name)


_DEVICE_TYPES = ("cpu", "cuda", "meta")


def _resolve_device(device: Any, library: str):
    """``device`` (None, a name or a ``torch.device``) → the torch device of the buffers.

    NumPy buffers live in host memory: ``device`` may only be None or ``"cpu"`` there (and
    the cache's ``device`` is the string ``"cpu"``).
    """
    if library == "numpy":
        if device is not None and str(device) != "cpu":
            raise AttentionValueError(
                f"device={device!r} needs library='torch' (NumPy buffers live in host memory), or leave device=None"
            )
        return "cpu"
    import torch

    if device is None:
        return torch.device("cpu")
    if not isinstance(device, (str, torch.device)):
        raise AttentionTypeError(f"device must be a str or a torch.device, got {type(device).__name__}")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise AttentionValueError(f"device must name a torch device such as 'cpu' or 'cuda:0', got {device!r}") from None
    if dev.type not in _DEVICE_TYPES:
        raise AttentionValueError(
            f"device must be a CPU or CUDA device (or 'meta'), got {str(dev)!r}: dotattn decodes on those only"
        )
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AttentionValueError(f"device={device!r}, but torch finds no CUDA device here; use device='cpu'")
    return dev


def _positive_int(name: str, x: Any, minimum: int = 1) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise AttentionTypeError(f"{name} must be an int, got {type(x).__name__}")
    if x < minimum:
        raise AttentionValueError(f"{name} must be ≥ {minimum}, got {x}")
    return int(x)


class KVCache:
    """A KV cache for one model: buffers, per-sequence lengths, pages from a free list.

    Contiguous (``page_size=None``): ``k`` is ``(num_layers, B, Hkv, capacity, D)``.
    Paged (``page_size=p``): ``k`` is ``(num_layers, num_pages, Hkv, p, D)`` and
    :attr:`block_table` ``(B, ⌈capacity/p⌉)`` maps each sequence's logical pages to physical
    ones, handed out from a free list as sequences grow and returned by :meth:`reset`.
    (``layout="blhd"`` swaps the last axes as in :func:`attention_with_kvcache`.)

    **One cache for all layers** (``num_layers=L``) is the intended use for a model: the
    layers share one page table and one set of lengths, since every layer stores the same
    tokens.  A decoding step calls :meth:`attend` (or :meth:`append`) once per layer, in
    order 0…L−1; each call writes at the current lengths and the lengths advance when layer
    L−1 has written.  A call on a layer that has not stored every earlier step is refused (its
    slots below the lengths hold no tokens); storing a layer twice in one step rewrites the same
    slots.  With ``num_layers=1`` (e.g. one cache per layer, or a single attention layer) every
    call advances them.

    Example (a 30-layer model, a batch of prompts of different lengths)::

        cache = KVCache(batch_size=4, num_kv_heads=3, head_dim=64, capacity=8192,
                        num_layers=30, page_size=64)
        for layer in range(30):                     # prefill: real tokens only
            cache.append(k[layer], v[layer], layer=layer, lengths=prompt_lengths)
        for layer in range(30):                     # one decoding step
            out = cache.attend(q[layer], k_new[layer], v_new[layer], layer=layer, rotary=(cos, sin))

    Buffers are NumPy arrays or, with ``library="torch"``, torch tensors on ``device``
    (default CPU; ``"cuda"`` keeps the cache on the GPU, where :meth:`attend` runs the Triton
    decode kernel and :meth:`append` writes with its copy kernel; ``"meta"`` allocates nothing).
    Unused slots start as zeros (``fill=`` chooses another value; tests use NaN).
    """

    def __init__(
        self,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        *,
        value_dim: int | None = None,
        dtype: Any = "float32",
        num_layers: int = 1,
        page_size: int | None = None,
        num_pages: int | None = None,
        layout: str = "bhld",
        library: str = "numpy",
        device: Any = None,
        fill: float = 0.0,
    ):
        self.batch_size = _positive_int("batch_size", batch_size)
        self.num_kv_heads = _positive_int("num_kv_heads", num_kv_heads)
        self.head_dim = _positive_int("head_dim", head_dim)
        self.value_dim = self.head_dim if value_dim is None else _positive_int("value_dim", value_dim)
        self.capacity = _positive_int("capacity", capacity)
        self.num_layers = _positive_int("num_layers", num_layers)
        self.layout = semantics.check_layout(layout)
        if library not in ("numpy", "torch"):
            raise AttentionValueError(f"library must be 'numpy' or 'torch', got {library!r}")
        self.library = library
        np_dtype, lib_dtype = _resolve_dtype(dtype, library)
        self.device = _resolve_device(device, library)
        # NumPy views of the buffers exist for host memory only; device buffers are read and
        # written as tensors (validation runs on stand-ins, as for attention_with_kvcache).
        self._host = library == "numpy" or self.device.type == "cpu"
        self.page_size = None if page_size is None else _positive_int("page_size", page_size)
        if isinstance(fill, bool) or not isinstance(fill, numbers.Real):
            raise AttentionTypeError(f"fill must be a real number (the value of unused slots), got {fill!r}")
        # the fill as the cache's dtype holds it (±inf past its range), the same for NumPy and torch
        # buffers (torch.full refuses a value a float16 cannot hold; an int past int64 would not
        # fill a NumPy array)
        try:
            fill = float(fill)
        except OverflowError:  # an int past float64's range: past every cache dtype's too
            fill = math.inf if fill > 0 else -math.inf
        with np.errstate(over="ignore"):
            fill = float(np.array(fill).astype(np_dtype))
        B, H, cap = self.batch_size, self.num_kv_heads, self.capacity
        if self.page_size is None:
            if num_pages is not None:
                raise AttentionValueError("num_pages needs page_size= (a paged cache)")
            self.max_pages = 1
            lead = (self.num_layers, B, H, cap) if layout == "bhld" else (self.num_layers, B, cap, H)
            self.num_pages = 0
        else:
            self.max_pages = -(-cap // self.page_size)
            default_pages = B * self.max_pages
            self.num_pages = default_pages if num_pages is None else _positive_int("num_pages", num_pages)
            p = self.page_size
            lead = (self.num_layers, self.num_pages, H, p) if layout == "bhld" else (self.num_layers, self.num_pages, p, H)
        # sizes past what an array can index (2**63 bytes) are refused by name, not by NumPy's
        # "array is too big"; an allocation that exceeds memory by name too (AttentionMemoryError,
        # a MemoryError), not by NumPy's or torch's allocator message alone
        itemsize = np.dtype(np_dtype).itemsize
        elements = math.prod(lead) * (self.head_dim + self.value_dim)
        # a paged cache's block table (B, max_pages) int64 too: a huge capacity over few pages
        table_bytes = 0 if self.page_size is None else B * self.max_pages * 8
        sizes = (f"a KVCache of {' × '.join(map(str, lead))} slots × (head_dim {self.head_dim} + value_dim "
                 f"{self.value_dim}) needs {elements * itemsize} bytes")
        if table_bytes:
            sizes += f", its block table ({B} × {self.max_pages} pages) {table_bytes} more"
        if elements * itemsize + table_bytes >= 2**63:
            raise AttentionValueError(
                f"{sizes}, more than an array can hold: check batch_size, num_kv_heads, capacity, num_pages "
                "and num_layers"
            )
        try:
            self._k = self._buffer(lead + (self.head_dim,), lib_dtype, fill)
            self._v = self._buffer(lead + (self.value_dim,), lib_dtype, fill)
            if self.page_size is not None:
                self._table = np.full((B, self.max_pages), -1, dtype=np.int64)
        except (MemoryError, RuntimeError) as exc:  # torch: RuntimeError (CPU), OutOfMemoryError (CUDA)
            if not isinstance(exc, MemoryError) and not any(w in str(exc).lower() for w in ("alloc", "out of memory")):
                raise
            raise AttentionMemoryError(
                f"{sizes} ({(elements * itemsize + table_bytes) / 2**30:.1f} GiB), which could not be allocated ({exc}): check "
                "batch_size, num_kv_heads, capacity, num_pages and num_layers"
            ) from None
        if library == "torch":
            self.device = self.k.device  # "cuda" → "cuda:0": the device tensors compare against
        # NumPy views of the buffers' memory (the buffers themselves for NumPy), made once:
        # converting the buffers on every call would cost more than a small decode step.
        if self._host:
            self._make_views()
        self._lengths = np.zeros(B, dtype=np.int64)
        # The layers' order within a step (0 … L−1, each once): _steps counts the steps taken
        # (the lengths advanced by the last layer), _layer_steps[ℓ] the steps layer ℓ has stored
        # tokens for.  A layer may store when it is level with the steps (its first call of this
        # step) or one ahead (it stored this step already: storing again rewrites the same
        # slots).  A layer behind has unwritten slots below the lengths — attending would read
        # them — and is refused (_check_layer_order).
        self._steps = 0
        self._layer_steps = [0] * self.num_layers
        # what the step's first layer stored (an int for every sequence alike, else a tuple):
        # every layer of a step must store the same, or a layer's slots below the lengths the
        # last layer advances to would hold no tokens
        self._step_added: int | tuple | None = None
        # _headroom()'s answer until the lengths or the pages change (None: to be worked out)
        self._room: int | None = None
        if self.page_size is not None:  # (self._table: allocated with the buffers above)
            self._free = list(range(self.num_pages - 1, -1, -1))  # pop() hands out page 0 first

    # Copies (copy.deepcopy, pickle, torch.save/load, torch.multiprocessing): the NumPy views
    # of host buffers are rebuilt over the copy's own buffers.  Copied with the rest, a torch
    # cache's views became NumPy arrays of their own — the copy's attend() and append() wrote
    # there, and its k, v and layer() never showed the new tokens.
    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_k_np", None)
        state.pop("_v_np", None)
        return state

    def __setstate__(self, state):
        for name in ("k", "v"):  # (a cache pickled before the buffers became read-only properties)
            if name in state:
                state[f"_{name}"] = state.pop(name)
        state.pop("dtype", None)  # (… and before the dtype was read from them)
        self.__dict__.update(state)
        if self._host:
            self._make_views()

    def __copy__(self):
        """``copy.copy`` gives a whole copy, as ``copy.deepcopy`` does (and as ``copy.copy`` of a
        NumPy array copies its data).  Python's default shallow copy shared the buffers, the
        lengths, the page table and the free list but not the step counters or the room left:
        each cache then wrote where the other's tokens were (pages taken by one still free to
        the other; a step past a page the other allocated), silently, with no error."""
        return copy.deepcopy(self)

    def _make_views(self) -> None:
        self._k_np, self._v_np = _as_numpy("k", self.k), _as_numpy("v", self.v)
        if self.library == "torch":
            self._views_at = (self.k.data_ptr(), self.v.data_ptr())

    def _views(self) -> tuple[np.ndarray, np.ndarray]:
        """The NumPy views of the host buffers, made again where torch moved a buffer's memory:
        ``share_memory_()`` — which torch.multiprocessing calls on every tensor it sends to another
        process — gives the tensor a new allocation and frees the old one, which the views still
        pointed at (the calls wrote freed memory, and ``k``/``v`` never showed the new tokens)."""
        if self.library == "torch" and self._views_at != (self.k.data_ptr(), self.v.data_ptr()):
            self._make_views()
        return self._k_np, self._v_np

    def _buffer(self, shape, lib_dtype, fill):
        if self.library == "numpy":
            return np.full(shape, fill, dtype=lib_dtype)
        import torch

        return torch.full(shape, fill, dtype=lib_dtype, device=self.device)

    def _check_device(self, arrays: dict[str, Any]) -> None:
        """New keys/values of a device cache: torch tensors on the buffers' device."""
        for name, t in arrays.items():
            if t is not None and (framework_of(t) != "torch" or t.device != self.device):
                where = f"on {str(t.device)!r}" if framework_of(t) == "torch" else f"a {type(t).__name__}"
                raise AttentionTypeError(
                    f"{name} must be a torch tensor on the cache's device {str(self.device)!r}, got {where}"
                )

    # ---- state ------------------------------------------------------------------
    # The buffers are the cache's own: the calls write through views of them made once, and
    # the lengths, pages and capacity describe them.  A buffer put in their place by assignment
    # went unseen (a NumPy cache kept writing the old array: the new one never showed a token),
    # so assigning is refused; writing into them (``cache.k[...] = x``) is the caller's to do.
    @property
    def k(self) -> Any:
        """Key buffer: ``(num_layers, B, Hkv, capacity, D)`` contiguous, ``(num_layers, num_pages,
        Hkv, page_size, D)`` paged (last axes swapped for ``layout="blhd"``)."""
        return self._k

    @k.setter
    def k(self, value: Any) -> None:
        self._refuse_new_buffer("k")

    @property
    def v(self) -> Any:
        """Value buffer, as :attr:`k` with ``value_dim`` last."""
        return self._v

    @v.setter
    def v(self, value: Any) -> None:
        self._refuse_new_buffer("v")

    @staticmethod
    def _refuse_new_buffer(name: str) -> None:
        raise AttributeError(
            f"KVCache.{name} is the cache's own buffer and cannot be replaced: write into it "
            f"(cache.{name}[...] = x) or make a new KVCache (its lengths and pages describe this buffer)"
        )

    @property
    def lengths(self) -> np.ndarray:
        """Tokens each sequence holds (a copy, int64 ``(B,)``)."""
        return self._lengths.copy()

    @property
    def block_table(self) -> np.ndarray | None:
        """int64 ``(B, max_pages)``: physical page of each logical page, −1 where none (paged only)."""
        return None if self.page_size is None else self._table.copy()

    @property
    def dtype(self) -> np.dtype:
        """The buffers' dtype as NumPy names it (ml_dtypes' ``bfloat16`` for ``torch.bfloat16``).

        Read from the buffer: a torch user may convert the buffers in place
        (``cache.k.data = cache.k.data.half()``, as a module's parameters are converted), after
        which the calls follow the new dtype and a dtype kept from the constructor was stale."""
        if self.library == "numpy":
            return self._k.dtype
        return _resolve_dtype(self._k.dtype, "torch")[0]

    def _table_or_none(self) -> np.ndarray | None:
        return None if self.page_size is None else self._table

    @property
    def free_pages(self) -> int:
        """Pages not held by any sequence (paged only; 0 for a contiguous cache)."""
        return len(self._free) if self.page_size is not None else 0

    def layer(self, layer: int) -> tuple[Any, Any]:
        """``(k, v)`` buffers of one layer (views)."""
        return self.k[self._layer_index(layer)], self.v[self._layer_index(layer)]

    def _layer_index(self, layer: Any) -> int:
        if type(layer) is int and 0 <= layer < self.num_layers:
            return layer
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or not 0 <= layer < self.num_layers:
            raise AttentionValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")
        return int(layer)

    def reset(self, b: int | None = None) -> None:
        """Empty sequence ``b`` (every sequence when None); its pages go back to the free list.

        One sequence is emptied between steps only: in the middle of a step (some layers have
        stored its tokens, the last layer not yet) the layers that stored would keep the old
        sequence's keys where the new one's first tokens go — the rest of the step would give
        the sequence one new token in the later layers and none in the earlier ones.  That
        call is refused (nothing changed); ``reset()`` of every sequence is always taken.
        """
        seqs = range(self.batch_size) if b is None else [self._seq_index(b)]
        if b is not None and self._step_added is not None:
            stored = [i for i in range(self.num_layers) if self._layer_steps[i] > self._steps]
            raise AttentionValueError(
                f"reset(b={b}) in the middle of a step: layer(s) {', '.join(map(str, stored))} have stored this "
                f"step's tokens and layer {self.num_layers - 1} has not; finish the step (attend() or append() "
                "on the remaining layers), then reset the sequence, or reset() every sequence (nothing was changed)"
            )
        self._room = None
        if b is None:  # nothing stored anywhere: every layer level again
            self._steps = 0
            self._layer_steps = [0] * self.num_layers
            self._step_added = None
        for s in seqs:
            self._lengths[s] = 0
            if self.page_size is not None:
                held = [int(p) for p in self._table[s] if p >= 0]
                self._free.extend(reversed(held))
                self._table[s] = -1

    def _seq_index(self, b: Any) -> int:
        if isinstance(b, bool) or not isinstance(b, numbers.Integral) or not 0 <= b < self.batch_size:
            raise AttentionValueError(f"b must be a sequence index in [0, {self.batch_size}), got {b!r}")
        return int(b)

    # ---- pages ------------------------------------------------------------------
    def _plan(self, new_lengths: np.ndarray) -> np.ndarray | None:
        """The block table with the pages ``new_lengths`` need added (not yet taken: a refused
        call must leave the cache as it was; :meth:`_commit` takes them)."""
        if self.page_size is None:
            return None
        need = -(-new_lengths // self.page_size)
        have = (self._table >= 0).sum(axis=1)
        missing = np.maximum(need - have, 0)
        total = int(missing.sum())
        if total == 0:
            return self._table
        if total > len(self._free):
            raise AttentionValueError(
                f"the KV cache is out of pages: this step needs {total} more page(s) of {self.page_size} tokens, "
                f"{len(self._free)} are free; reset() finished sequences or create the cache with more num_pages"
            )
        table = self._table.copy()
        free = len(self._free)
        for b in np.flatnonzero(missing):
            for i in range(int(have[b]), int(need[b])):
                free -= 1
                table[b, i] = self._free[free]
        return table

    def _commit(self, table: np.ndarray | None) -> None:
        if table is None or table is self._table:
            return
        taken = int((table >= 0).sum() - (self._table >= 0).sum())
        del self._free[len(self._free) - taken :]
        self._table = table
        self._room = None

    def _headroom(self) -> int:
        """New tokens every sequence can take without passing the capacity or needing a page
        it does not hold yet (then a call needs neither :meth:`_room_check` nor :meth:`_plan`).

        Worked out once per change of the lengths or the pages: a decode step of an L-layer
        model asks L times and changes the lengths once.
        """
        room = self._room
        if room is None:
            free = self.capacity - self._lengths
            if self.page_size is not None:
                free = np.minimum(free, (self._table >= 0).sum(axis=1) * self.page_size - self._lengths)
            room = self._room = int(free.min())
        return room

    def _room_check(self, new_lengths: np.ndarray) -> None:
        over = new_lengths > self.capacity
        if over.any():
            b = int(np.argmax(over))
            raise AttentionValueError(
                f"sequence {b} does not fit: {int(self._lengths[b])} cached token(s) plus "
                f"{int(new_lengths[b] - self._lengths[b])} new one(s) exceed capacity={self.capacity}"
            )

    def _check_layer_order(self, layer: int) -> None:
        behind = self._steps - self._layer_steps[layer]
        if behind > 0:
            raise AttentionValueError(
                f"layer {layer} has not stored the tokens of the last {behind} step(s): the sequences' "
                f"lengths advance when layer {self.num_layers - 1} stores, so each step must call attend() or "
                f"append() on every layer in order 0 … {self.num_layers - 1} (this layer's slots below the "
                "lengths hold no tokens)"
            )
        last = self.num_layers - 1
        if layer == last and last:
            # The last layer's call ends the step (the lengths advance): a layer that has not
            # stored this step would be left behind for good (every later call of it refused
            # above), so the call that skips it is the one refused, before anything changes.
            steps = self._layer_steps
            if min(steps[:last]) <= self._steps:
                missing = [i for i in range(last) if steps[i] <= self._steps]
                shown = ", ".join(map(str, missing[:8])) + (" …" if len(missing) > 8 else "")
                raise AttentionValueError(
                    f"layer {last} is the last layer, whose call advances the sequences' lengths, but layer(s) "
                    f"{shown} have not stored this step's tokens: each step must call attend() or append() on "
                    f"every layer in order 0 … {last} (nothing was changed)"
                )

    @staticmethod
    def _added_key(added: np.ndarray | int) -> int | tuple:
        if isinstance(added, int):
            return added
        counts = added.tolist()
        return counts[0] if counts and counts.count(counts[0]) == len(counts) else tuple(counts)

    def _check_step_tokens(self, layer: int, added: np.ndarray | int) -> None:
        """Every layer of a step stores the same new tokens per sequence (checked before writing)."""
        if self._step_added is None or self.num_layers == 1:
            return
        mine = self._added_key(added)
        if mine != self._step_added:
            def say(x):
                return f"{x} new token(s) per sequence" if isinstance(x, int) else f"new tokens per sequence {list(x)}"

            raise AttentionValueError(
                f"layer {layer} would store {say(mine)} in this step, but the step's first layer stored "
                f"{say(self._step_added)}: every layer of a step stores the same tokens"
            )

    def _advance(self, layer: int, added: np.ndarray | int) -> None:
        if layer == self.num_layers - 1:
            self._lengths += added
            self._room = None
            self._steps += 1
            self._layer_steps[layer] = self._steps
            self._step_added = None
        else:
            self._layer_steps[layer] = self._steps + 1
            if self._step_added is None:
                self._step_added = self._added_key(added)

    # ---- writing and attending ----------------------------------------------------
    def _check_batch(self, name: str, x: Any) -> None:
        """``x``'s batch axis against the cache's sequences (axis 0 in both layouts), named so:
        further down a paged cache's message was about a block table the caller never passed."""
        shape = x.shape
        if len(shape) == 4 and shape[0] != self.batch_size:
            raise AttentionValueError(
                f"{name} has batch size {shape[0]} (axis 0 of {name}{tuple(shape)}), but this KVCache holds "
                f"batch_size={self.batch_size} sequences"
            )

    def _framework_of(self, name: str, x: Any) -> str:
        """``x``'s library, refused unless it is this cache's (``library``)."""
        fw = "numpy" if type(x) is np.ndarray else framework_of(x)
        if fw is None:
            raise AttentionTypeError(
                f"{name} must be a {'NumPy array' if self.library == 'numpy' else 'torch tensor'} (this KVCache "
                f"holds {self.library} buffers), got {type(x).__module__}.{type(x).__name__}"
            )
        if fw != self.library:
            raise AttentionTypeError(
                f"{name} is a {fw or type(x).__name__} array, but this KVCache holds {self.library} buffers "
                f"(library={self.library!r})"
            )
        if fw == "torch":  # (before its shape is read: a nested tensor's raises torch's internal error)
            _convert_module().check_dense(name, x)
        return fw

    @_eager
    def append(self, k_new: Any, v_new: Any, *, layer: int = 0, lengths: Any = None) -> None:
        """Store new keys/values without attending (e.g. after a prefill through ``attention()``).

        ``k_new (B, Hkv, Lnew, D)``; ``lengths`` (B,) stores only the first ``lengths[b]``
        tokens of sequence b (padded prompts); default all ``Lnew``.  Keys are stored as given
        (rotate them first if the model uses RoPE).
        """
        layer = self._layer_index(layer)
        self._check_layer_order(layer)
        arrays = dict(k_new=k_new, v_new=v_new)
        for name, x in arrays.items():  # (attend()'s checks of its q, on what is stored here)
            if x is not None:
                self._framework_of(name, x)
        if self.library == "torch":
            _check_no_grad(arrays)
        if self._host:
            k_views, v_views = self._views()
            k_buf, v_buf = k_views[layer], v_views[layer]
            k_np, v_np = _as_numpy("k_new", k_new), _as_numpy("v_new", v_new)
        else:  # stand-ins of the device tensors: normalize() checks shapes and dtypes on them
            k_buf, v_buf = self.k[layer], self.v[layer]
            self._check_device(dict(k_new=k_new, v_new=v_new))
            from .torch._convert import standin

            k_buf, v_buf = standin("k_cache", k_buf, writeable=True), standin("v_cache", v_buf, writeable=True)
            k_np = None if k_new is None else standin("k_new", k_new)
            v_np = None if v_new is None else standin("v_new", v_new)
        k_np = float_array("k_new", k_np)
        self._check_batch("k_new", k_np)
        # float32 new keys and values may go into a 16-bit cache (as with a float32 q in
        # attend()), each of the two in either dtype: checked here, as append takes no q (the
        # check below allows q's dtype, and k_new's alone decided it: (bfloat16, float32) was
        # refused where (float32, bfloat16) was stored, with a message naming a q)
        sixteen = self.dtype in SIXTEEN_BIT
        for name, x in (("k_new", k_np), ("v_new", v_np)):
            dtype = None if x is None else float_array(name, x).dtype
            if dtype is not None and dtype != self.dtype and not (sixteen and dtype == _F32):
                also = " or float32" if sixteen else ""
                raise AttentionTypeError(f"{name} must have the cache's dtype {self.dtype}{also}, got {dtype}")
        # A query of no rows: the validation of attention_with_kvcache covers the append alone.
        q_shape = (self.batch_size, self.num_kv_heads, 0, self.head_dim)
        q_dtype = _F32 if sixteen else self.dtype
        q_none = np.empty(q_shape if self.layout == "bhld" else (q_shape[0], 0, q_shape[1], q_shape[3]), q_dtype)
        # shapes before lengths and room: new arrays that do not match the cache are told so
        check_shapes(q_none, k_buf, v_buf, k_np, v_np, self._table_or_none(), self.layout)
        l_ax = 2 if self.layout == "bhld" else 1
        Lnew = k_np.shape[l_ax]
        counts = np.full(self.batch_size, Lnew, dtype=np.int64)
        if lengths is not None:
            counts = semantics.check_batch_ints("lengths", _as_numpy("lengths", lengths), self.batch_size)
            bad = (counts < 0) | (counts > Lnew)
            if bad.any():
                b = int(np.argmax(bad))
                raise AttentionValueError(f"lengths must lie in [0, Lnew={Lnew}], got lengths[{b}] = {int(counts[b])}")
        self._check_step_tokens(layer, counts)
        new_lengths = self._lengths + counts
        self._room_check(new_lengths)
        table = self._plan(new_lengths)
        call = normalize(
            q_none, k_buf, v_buf, k_np, v_np,
            cache_lengths=self._lengths, block_table=table, causal=True, window=None, scale=None,
            softcap=None, alibi_slopes=None, rotary=None, layout=self.layout, new_counts=counts,
            standins=not self._host,  # (the device buffers are this object's own, allocated apart)
        )
        self._commit(table)
        if self._host:
            write_new(call, counts)
            if self.library == "torch":
                _written_in_place((self.k[layer], self.v[layer]))
        else:
            from .kernels.triton_decode import write_new_tensors

            canon = (lambda t: t) if self.layout == "bhld" else (lambda t: t.transpose(1, 2))
            write_new_tensors(call, canon(self.k[layer]), canon(self.v[layer]), canon(k_new), canon(v_new), counts)
        self._advance(layer, counts)

    @_eager
    def attend(
        self,
        q: Any,
        k_new: Any = None,
        v_new: Any = None,
        *,
        layer: int = 0,
        causal: bool | str = True,
        window: tuple[int | None, int | None] | None = None,
        scale: float | None = None,
        softcap: float | None = None,
        alibi_slopes: Any = None,
        rotary: tuple[Any, Any] | None = None,
        return_lse: bool = False,
        implementation: str | None = None,
    ):
        """Append ``k_new``/``v_new`` (if given) and attend ``q`` over the sequence so far.

        Same arguments and results as :func:`attention_with_kvcache`, with the cache, its
        lengths and its pages supplied by this object.
        """
        layer = self._layer_index(layer)
        self._check_layer_order(layer)
        fw = self._framework_of("q", q)
        if fw == "torch" and (alibi_slopes is not None or rotary is not None):
            _check_options_no_grad(alibi_slopes, rotary)
        for name, x in (("k_new", k_new), ("v_new", v_new)):
            if x is not None:
                self._framework_of(name, x)
        self._check_batch("q", q)
        # device buffers go to attention_with_kvcache as the tensors (its device path), and so do
        # CPU torch buffers asked for the triton kernel (Triton's interpreter)
        host = self._host and not (fw == "torch" and implementation == "triton")
        if host:
            k_views, v_views = self._views()
            k_buf, v_buf = k_views[layer], v_views[layer]
        else:
            k_buf, v_buf = self.k[layer], self.v[layer]
        if fw == "torch" and host:  # the buffers' NumPy views are kept: convert only the new arrays
            arrays = dict(q=q, k_new=k_new, v_new=v_new)
            _check_library(arrays)
            _check_no_grad(arrays)
            q, k_new, v_new = _as_numpy("q", q), _as_numpy("k_new", k_new), _as_numpy("v_new", v_new)
            alibi_slopes = _as_numpy("alibi_slopes", alibi_slopes)
        Lnew = 0
        if k_new is not None:
            shape = tuple(k_new.shape)
            if len(shape) == 4:
                Lnew = shape[2] if self.layout == "bhld" else shape[1]
        self._check_step_tokens(layer, Lnew)
        if Lnew <= self._headroom():  # the common step: room and pages held already
            table = None if self.page_size is None else self._table
        else:
            # shapes before room and pages: arrays that do not match the cache are told so
            check_shapes(q, k_buf, v_buf, k_new, v_new, self._table_or_none(), self.layout)
            new_lengths = self._lengths + Lnew
            self._room_check(new_lengths)
            table = self._plan(new_lengths)
        # The lengths and the table are this object's, kept valid by it (the room was checked
        # just above, pages come from its free list): normalize() takes them as they are and
        # checks everything the caller gave (q, k_new, v_new, options) as attention_with_kvcache does.
        result = _attention_with_kvcache(
            q, k_buf, v_buf, k_new, v_new, cache_lengths=self._lengths, block_table=table,
            causal=causal, window=window, scale=scale, softcap=softcap, alibi_slopes=alibi_slopes,
            rotary=rotary, return_lse=return_lse, layout=self.layout, implementation=implementation,
            trusted=True,
        )
        self._commit(table)
        self._advance(layer, Lnew)
        if fw == "torch" and host and k_new is not None:
            _written_in_place((self.k[layer], self.v[layer]))
        if fw == "torch" and host:
            from_numpy = _convert_module().from_numpy
            return tuple(from_numpy(x) for x in result) if return_lse else from_numpy(result)
        return result
