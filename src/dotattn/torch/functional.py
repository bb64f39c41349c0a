"""``attention()`` on torch tensors: differentiable, and traceable by ``torch.compile``.

Layers (as flash-attention's interface module):

* :func:`attention` — the public call.  It checks the scalar options with the semantics
  module's own checks, turns array-like options into tensors, draws a dropout seed from
  torch's generator when none is given, and calls the operator.
* ``torch.ops.dotattn.attention_fwd`` / ``attention_bwd`` — two ``torch.library.custom_op``
  operators with fake (shape-only) implementations, so ``torch.compile(fullgraph=True)``
  traces through them without graph breaks.  Their bodies view the tensors as NumPy arrays,
  run :func:`dotattn.semantics.normalize` (which validates everything) and the registry's
  backend through :func:`dotattn.dispatch.run_forward` / :func:`dotattn.dispatch.run_backward`.
* ``register_autograd`` wires them into a ``torch.autograd.Function`` (torch generates it
  for the operator): the forward saves q, k, v, the output and the LSE; the backward
  recomputes blockwise from the LSE — never an ``Lq × Lk`` matrix (unless the caller's bias
  asks for its own ``Lq × Lk`` gradient).
* :class:`_AttentionWithExtras` — the same two bodies in a hand-written
  ``torch.autograd.Function`` for backend-specific ``**extras`` (e.g. a ``score_mod``
  callable), which no operator schema can carry; that path runs eagerly only.
* Plain eager CPU calls (no ``torch.compile``, functorch transform, dispatch or function
  mode: :func:`_plain_eager`) skip the operator, whose dispatch and generated autograd cost
  tens of µs a call: with grad they take :class:`_AttentionWithExtras`, without it the
  forward body directly.  Everything else (compile, ``opcheck``, meta tensors, CUDA) goes
  through the operators.

Shapes (``layout="bhld"``; ``"blhd"`` swaps the L and H axes of q, k, v and out)::

    q (..., Hq, Lq, D)   k (..., Hkv, Lk, D)   v (..., Hkv, Lk, Dv)
    out (..., Hq, Lq, Dv)   lse (..., Hq, Lq)   weights (..., Hq, Lq, Lk)

This module deliberately avoids ``from __future__ import annotations``: ``custom_op``
infers each operator's schema from the annotations, which must be real types.
"""

import dataclasses
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from .. import dispatch, registry, semantics
from ..errors import AttentionTypeError, AttentionValueError
from ..semantics import DEFAULT_MAX_WEIGHTS_BYTES
from ._convert import (
    check_dense, check_device, check_no_forward_ad, check_torch_llvm_order, compute_dtype, from_numpy, standin, to_numpy,
)

# The operators' tensor inputs after q, k, v, in schema order (also the order saved for backward).
_ARRAY_OPTIONS = (
    "mask",
    "bias",
    "alibi_slopes",
    "q_lengths",
    "kv_lengths",
    "q_segment_ids",
    "kv_segment_ids",
    "seed",
)
_BIAS_INPUT = 4  # index of ``bias`` among the forward operator's inputs (q, k, v, mask, bias, …)


# =================================================================================
# the operator bodies (NumPy views in, tensors out)
# =================================================================================


@dataclasses.dataclass(frozen=True)
class _Scalars:
    """The non-tensor options, already checked and canonical (they are the operators' attributes)."""

    causal: Optional[str]
    window_left: Optional[int]
    window_right: Optional[int]
    scale: Optional[float]
    softcap: Optional[float]
    dropout_p: float
    layout: str
    implementation: Optional[str]

    @property
    def window(self):
        if self.window_left is None and self.window_right is None:
            return None
        return (self.window_left, self.window_right)


# Options whose data a kernel reads in place (the others are small index arrays and scalars).
_LARGE_OPTIONS = ("mask", "bias")


def _on_tensor_backend(q: Tensor, sc: "_Scalars") -> bool:
    """True when the call runs on a tensor backend: tensors off the CPU, or one asked for by name."""
    return q.device.type != "cpu" or sc.implementation in registry.TENSOR_BACKENDS


def _normalize(q, k, v, arrays: dict, sc: _Scalars, extras: dict, for_backward: bool) -> semantics.AttentionCall:
    """Tensor arguments → the one validated :class:`~dotattn.semantics.AttentionCall`.

    CPU tensors become NumPy views.  Tensors NumPy cannot view (CUDA) become zero-stride
    stand-ins with their shape and dtype (:func:`~dotattn.torch._convert.standin`): the call
    then carries every decision but no data, and a tensor backend reads the tensors
    themselves.  Small index arrays (lengths, segment ids, slopes, seed) are copied to the
    host, where their values are checked.
    """
    for name, t in (("q", q), ("k", k), ("v", v), *arrays.items()):
        if t is not None:
            check_device(name, t)
    host = q.device.type == "cpu"

    def view(name, t):
        if t is None:
            return None
        if name in ("q", "k", "v") + _LARGE_OPTIONS and not host:
            return standin(name, t)
        return to_numpy(name, t.cpu() if t.device.type != "cpu" else t)

    np_arrays = {name: view(name, t) for name, t in arrays.items()}
    q_ids, kv_ids = np_arrays.pop("q_segment_ids"), np_arrays.pop("kv_segment_ids")
    segment_ids = q_ids if kv_ids is None else (q_ids, kv_ids)
    seed = np_arrays.pop("seed")
    return semantics.normalize(
        view("q", q),
        view("k", k),
        view("v", v),
        causal=sc.causal or False,
        window=sc.window,
        scale=sc.scale,
        softcap=sc.softcap,
        dropout_p=sc.dropout_p,
        seed=None if seed is None else int(seed.reshape(-1)[0]),
        layout=sc.layout,
        segment_ids=segment_ids,
        extras=extras,
        for_backward=for_backward,
        **np_arrays,
    )


def _tensor(x: np.ndarray) -> Tensor:
    """A backend result as a tensor owning (sharing) its memory; read-only views are copied."""
    x = np.ascontiguousarray(x)
    return from_numpy(x if x.flags.writeable else x.copy())


def _forward_tensors(q, k, v, arrays, sc: _Scalars, return_weights, max_weights_bytes, extras):
    """The forward on a tensor backend (triton): the same call, the tensors read in place."""
    call = _normalize(q, k, v, arrays, sc, extras, for_backward=False)
    if return_weights:
        semantics.check_weights_size(call, max_weights_bytes)
    backend = registry.select(call, sc.implementation, device=q.device.type)
    mask, bias = arrays["mask"], arrays["bias"]
    out, lse_c = backend.forward_tensors(call, q, k, v, mask, bias)
    lse = semantics.from_canonical(call, lse_c[..., None], pairwise=True)[..., 0].contiguous()
    if return_weights:
        w = semantics.from_canonical(call, backend.weights_tensors(call, q, k, mask, bias, lse_c), pairwise=True)
        w = w.contiguous().to(compute_dtype(q.dtype))
    else:
        w = torch.empty((0,), dtype=compute_dtype(q.dtype), device=q.device)
    return out, lse, w


def _forward_body(q, k, v, arrays, sc: _Scalars, return_weights, max_weights_bytes, extras, want_lse=True,
                  plan_key=None):
    """(out, lse, weights) as tensors; ``weights`` is an empty tensor unless asked for (and
    ``lse`` None when ``want_lse`` is False: a no-grad call that does not return it).

    ``plan_key`` (:func:`_plan_key`): keep a plan for the next call of this kind
    (``dispatch.plan_forward``), which :func:`_planned_forward` then runs.
    """
    if _on_tensor_backend(q, sc):
        return _forward_tensors(q, k, v, arrays, sc, return_weights, max_weights_bytes, extras)
    call = _normalize(q, k, v, arrays, sc, extras, for_backward=False)
    plan = None
    if plan_key is not None and call.dropout_p == 0.0 and not return_weights:
        plan = dispatch.plan_forward(plan_key, call, sc.implementation)
    if plan is not None:
        out, lse = plan.run(call)
        weights = None
    else:
        # ``final``: the output goes to the caller (and autograd keeps it for the backward) as
        # it is, so a bfloat16 call gets it rounded by the kernel as it writes the rows, as
        # dotattn.attention and the planned no-grad calls do — not as a float32 array cast by
        # ml_dtypes' astype (4.1 ms of a 100 ms H4 L4096 D128 fwd+bwd, holding the GIL while
        # the other core idled: docs/performance-log.md, "bfloat16 fwd+bwd: the time around the kernels")
        out, lse, weights = dispatch.run_forward(
            call, implementation=sc.implementation, return_weights=return_weights, max_weights_bytes=max_weights_bytes,
            final=True,
        )
    out_t = _tensor(semantics.finalize_output(call, out))
    lse_t = _tensor(semantics.finalize_lse(call, lse)) if want_lse else None
    if return_weights:
        w_t = _tensor(semantics.finalize_pairwise(call, weights))
    else:
        w_t = torch.empty((0,), dtype=compute_dtype(q.dtype)) if want_lse else None
    return out_t, lse_t, w_t


def _backward_tensors(dout, dlse, q, k, v, out, lse, arrays, sc: _Scalars, want_dbias, extras):
    """The backward on a tensor backend; shapes of out/dout/lse are checked on stand-ins."""
    call = _normalize(q, k, v, arrays, sc, extras, for_backward=True)
    semantics.canonical_like(call, "out", standin("out", out), call.Dv)
    semantics.canonical_like(call, "dout", standin("dout", dout), call.Dv)
    semantics.canonical_lse(call, standin("lse", lse))
    if dlse is not None:
        semantics.canonical_lse(call, standin("dlse", dlse))
    backend = registry.select(call, sc.implementation, need_backward=True, device=q.device.type)
    bias = arrays["bias"]
    dq, dk, dv, dbias = backend.backward_tensors(call, q, k, v, out, lse, dout, dlse, arrays["mask"], bias, want_dbias)
    if want_dbias:
        dbias = semantics.reduce_bias_grad(call, dbias).to(bias.dtype).contiguous()
    else:
        dbias = torch.empty((0,), dtype=q.dtype, device=q.device)
    return dq, dk, dv, dbias


def _backward_body(dout, dlse, q, k, v, out, lse, arrays, sc: _Scalars, want_dbias, extras):
    """(dq, dk, dv, dbias) as tensors; ``dbias`` is empty unless ``want_dbias``."""
    if _on_tensor_backend(q, sc):
        return _backward_tensors(dout, dlse, q, k, v, out, lse, arrays, sc, want_dbias, extras)
    call = _normalize(q, k, v, arrays, sc, extras, for_backward=True)
    Dv = call.Dv
    out_c = semantics.canonical_like(call, "out", to_numpy("out", out), Dv)
    dout_c = semantics.canonical_like(call, "dout", to_numpy("dout", dout), Dv)
    lse_c = semantics.canonical_lse(call, to_numpy("lse", lse))
    dlse_c = None if dlse is None else semantics.canonical_lse(call, to_numpy("dlse", dlse))
    dq, dk, dv, dbias = dispatch.run_backward(
        call, out_c, lse_c, dout_c, implementation=sc.implementation, want_dbias=want_dbias, final=True, dlse=dlse_c
    )
    grads = [_tensor(semantics.finalize_grad(call, g, name)) for g, name in ((dq, "q"), (dk, "k"), (dv, "v"))]
    if want_dbias:
        bias_dtype = arrays["bias"].dtype
        grads.append(_tensor(semantics.reduce_bias_grad(call, dbias)).to(bias_dtype))
    else:
        grads.append(torch.empty((0,), dtype=q.dtype))
    return tuple(grads)


# =================================================================================
# the operators
# =================================================================================


@torch.library.custom_op("dotattn::attention_fwd", mutates_args=())
def _attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Optional[Tensor],
    bias: Optional[Tensor],
    alibi_slopes: Optional[Tensor],
    q_lengths: Optional[Tensor],
    kv_lengths: Optional[Tensor],
    q_segment_ids: Optional[Tensor],
    kv_segment_ids: Optional[Tensor],
    seed: Optional[Tensor],
    causal: Optional[str],
    window_left: Optional[int],
    window_right: Optional[int],
    scale: Optional[float],
    softcap: Optional[float],
    dropout_p: float,
    layout: str,
    implementation: Optional[str],
    return_weights: bool,
    max_weights_bytes: int,
) -> tuple[Tensor, Tensor, Tensor]:
    arrays = dict(
        zip(_ARRAY_OPTIONS, (mask, bias, alibi_slopes, q_lengths, kv_lengths, q_segment_ids, kv_segment_ids, seed),
            strict=True)
    )
    sc = _Scalars(causal, window_left, window_right, scale, softcap, dropout_p, layout, implementation)
    return _forward_body(q, k, v, arrays, sc, return_weights, max_weights_bytes, {})


def _lse_shape(q: Tensor, layout: str) -> tuple:
    """(..., Hq, Lq) from q's shape — by shape arithmetic only, so symbolic sizes pass."""
    # (3-D "blhd" is (Lq, Hq, D): its LSE is (Hq, Lq), as 4-D's — taken for bhld until 7 Dec
    # 2026, so meta tensors and torch.compile's inductor got (Lq, Hq))
    if q.dim() <= 2 or layout == "bhld":
        return tuple(q.shape[:-1])
    return tuple(q.shape[:-3]) + (q.shape[-2], q.shape[-3])


def _lk(k: Tensor, layout: str):
    return k.shape[-3] if (layout == "blhd" and k.dim() >= 3) else k.shape[-2]


@_attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, mask, bias, alibi_slopes, q_lengths, kv_lengths, q_segment_ids, kv_segment_ids,
                        seed, causal, window_left, window_right, scale, softcap, dropout_p, layout, implementation,
                        return_weights, max_weights_bytes):
    out = q.new_empty(tuple(q.shape[:-1]) + (v.shape[-1],))
    lse_shape = _lse_shape(q, layout)
    lse = q.new_empty(lse_shape, dtype=compute_dtype(q.dtype))
    w_shape = lse_shape + (_lk(k, layout),) if return_weights else (0,)
    return out, lse, q.new_empty(w_shape, dtype=compute_dtype(q.dtype))


@torch.library.custom_op("dotattn::attention_bwd", mutates_args=())
def _attention_bwd(
    dout: Tensor,
    dlse: Optional[Tensor],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    mask: Optional[Tensor],
    bias: Optional[Tensor],
    alibi_slopes: Optional[Tensor],
    q_lengths: Optional[Tensor],
    kv_lengths: Optional[Tensor],
    q_segment_ids: Optional[Tensor],
    kv_segment_ids: Optional[Tensor],
    seed: Optional[Tensor],
    causal: Optional[str],
    window_left: Optional[int],
    window_right: Optional[int],
    scale: Optional[float],
    softcap: Optional[float],
    dropout_p: float,
    layout: str,
    implementation: Optional[str],
    want_dbias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    arrays = dict(
        zip(_ARRAY_OPTIONS, (mask, bias, alibi_slopes, q_lengths, kv_lengths, q_segment_ids, kv_segment_ids, seed),
            strict=True)
    )
    sc = _Scalars(causal, window_left, window_right, scale, softcap, dropout_p, layout, implementation)
    return _backward_body(dout, dlse, q, k, v, out, lse, arrays, sc, want_dbias, {})


@_attention_bwd.register_fake
def _attention_bwd_fake(dout, dlse, q, k, v, out, lse, mask, bias, *rest):
    want_dbias = rest[-1]
    dbias = bias.new_empty(bias.shape) if want_dbias else q.new_empty((0,))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias


def _setup_context(ctx, inputs, output):
    q, k, v, *array_opts = inputs[:11]
    ctx.scalars = inputs[11:19]  # causal … implementation, in _attention_bwd's order
    out, lse, weights = output
    ctx.save_for_backward(q, k, v, out, lse, *array_opts)
    ctx.mark_non_differentiable(weights)
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse, dweights):
    del dweights  # weights are marked non-differentiable
    q, k, v, out, lse, *array_opts = ctx.saved_tensors
    bias = array_opts[1]
    want_dbias = bias is not None and ctx.needs_input_grad[_BIAS_INPUT]
    if dout is None:  # only the LSE reached the loss
        dout = torch.zeros_like(out)
    dq, dk, dv, dbias = torch.ops.dotattn.attention_bwd(
        dout, dlse, q, k, v, out, lse, *array_opts, *ctx.scalars, want_dbias
    )
    n_inputs = 21
    grads = [dq, dk, dv, None, dbias if want_dbias else None] + [None] * (n_inputs - 5)
    return tuple(grads)


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


class _AttentionWithExtras(torch.autograd.Function):
    """Eager-only twin of the operator for ``**extras`` (callables cannot pass an op schema)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, arrays, sc, return_weights, max_weights_bytes, extras):
        arrays = dict(arrays, bias=bias)
        out, lse, weights = _forward_body(q, k, v, arrays, sc, return_weights, max_weights_bytes, extras)
        # the array options too (mask, lengths, slopes, segment ids): the backward recomputes
        # from them, so one changed in place since would give wrong gradients silently — saved,
        # torch raises its in-place error, as on the operator's path (before 7 Dec 2026 they
        # were kept as a plain attribute: gradients 0.4–1.7 off)
        ctx.save_for_backward(q, k, v, out, lse, *(arrays[name] for name in _ARRAY_OPTIONS))
        ctx.sc, ctx.extras = sc, extras
        ctx.mark_non_differentiable(weights)
        ctx.set_materialize_grads(False)
        return out, lse, weights

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dlse, dweights):
        # once_differentiable: a second backward (create_graph=True) raises, as the operator's
        # path does; without it the gradients came back cut off from the graph, and a loss
        # that used them got its second-order terms dropped silently
        del dweights
        q, k, v, out, lse, *array_opts = ctx.saved_tensors
        arrays = dict(zip(_ARRAY_OPTIONS, array_opts, strict=True))
        bias = arrays["bias"]
        want_dbias = bias is not None and ctx.needs_input_grad[3]
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv, dbias = _backward_body(dout, dlse, q, k, v, out, lse, arrays, ctx.sc, want_dbias, ctx.extras)
        return dq, dk, dv, (dbias if want_dbias else None), None, None, None, None, None


# =================================================================================
# the public call
# =================================================================================


def _as_tensor(name: str, x: Any) -> Optional[Tensor]:
    """Array-likes (NumPy arrays, lists, ints) → CPU tensors; tensors pass unchanged."""
    if x is None or isinstance(x, Tensor):
        return x
    try:
        if isinstance(x, (list, tuple)):
            # Python numbers read as NumPy (and the NumPy front end) reads them: floats as
            # float64 — torch's default dtype made a list of slopes float32, 3e-9 off in a
            # float64 call
            arr = np.asarray(x)
            if arr.dtype != object:
                return torch.from_numpy(arr)
        return torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise AttentionTypeError(f"{name} must be a tensor or an array, got {type(x).__name__}: {exc}") from exc


def _split_segment_ids(segment_ids: Any, q: Tensor, layout: str):
    """One ids array → (ids, None); a pair (q_ids, kv_ids) → both, as tensors.

    A nested Python list shaped ``(..., Lq)`` is one array, as the semantics module reads it
    (a pair stacks to ``(2, ..., L)`` or is ragged).
    """
    if segment_ids is None:
        return None, None
    if isinstance(segment_ids, (tuple, list)):
        lse_shape = _lse_shape(q, layout)  # (..., Hq, Lq), or (Lq,) for 2-D inputs
        one_array_shape = lse_shape[:-2] + lse_shape[-1:]
        if not any(isinstance(x, Tensor) for x in segment_ids) and semantics.is_one_id_array(
            segment_ids, tuple(one_array_shape)
        ):
            return _as_tensor("segment_ids", segment_ids), None
        if len(segment_ids) != 2:
            # Let the semantics module word the error, as it does for NumPy callers.
            semantics.normalize(np.zeros((1, 1)), np.zeros((1, 1)), np.zeros((1, 1)), segment_ids=segment_ids)
        return _as_tensor("segment_ids[0]", segment_ids[0]), _as_tensor("segment_ids[1]", segment_ids[1])
    return _as_tensor("segment_ids", segment_ids), None


def _plain_eager(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """True for plain CPU tensors outside ``torch.compile``, functorch transforms and dispatch
    or function modes: calls that can bypass the operator (which those need to see)."""
    return (
        type(q) is Tensor
        and type(k) is Tensor
        and type(v) is Tensor
        and q.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and not torch._C._are_functorch_transforms_active()
        and torch._C._len_torch_dispatch_stack() == 0
        and torch._C._len_torch_function_stack() == 0
    )


def _check_qkv_tensors(q, k, v) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor):
            raise AttentionTypeError(
                f"{name} must be a torch.Tensor in dotattn.torch.attention, "
                f"got {type(x).__module__}.{type(x).__name__}; "
                "dotattn.attention takes NumPy arrays"
            )
        check_device(name, x)
        check_dense(name, x)
    _check_same_device(q, k=k, v=v)


def _check_same_device(q: Tensor, **tensors) -> None:
    """k, v, mask and bias are read where q is: one device for all of them."""
    for name, t in tensors.items():
        if t is not None and t.device != q.device and "meta" not in (t.device.type, q.device.type):
            raise AttentionValueError(
                f"{name} is on device {str(t.device)!r} but q is on {str(q.device)!r}; "
                f"put q, k, v, mask and bias on one device (e.g. {name}.to(q.device))"
            )


def _plan_key(q: Tensor, k: Tensor, v: Tensor, q_lengths, kv_lengths, causal, window, scale, softcap, dropout_p,
              layout, implementation):
    """A plan key (``semantics.plan_key``'s, for tensors) for a plain eager no-grad CPU call
    without array options, or None.  Besides what ``normalize()`` decides from, it holds what
    this front end checks of the tensors themselves (device, layout): a call that passed those
    checks once passes them again.  Lengths must be CPU tensors (other array-likes take the
    unplanned path, whose conversion words their errors)."""
    for t in (q_lengths, kv_lengths):
        if t is not None and (type(t) is not Tensor or t.device.type != "cpu" or t.layout != torch.strided):
            return None
    if not _plain_eager(q, k, v) or (
        torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    ):
        return None
    try:
        key = semantics.plan_key(
            q, k, v, causal=causal, window=window, scale=scale, softcap=softcap, dropout_p=dropout_p, layout=layout,
            has_q_lengths=q_lengths is not None, has_kv_lengths=kv_lengths is not None, implementation=implementation,
        )
    except RuntimeError:
        # a tensor without sizes (a nested one: "NestedTensorImpl doesn't support sizes"): the
        # checked path below refuses it by name (check_dense)
        return None
    if key is None:
        return None
    return ("torch", k.device.type, v.device.type, q.layout, k.layout, v.layout) + key


def _planned_view(t: Tensor) -> np.ndarray:
    """:func:`to_numpy` for q, k, v of a planned call, whose key holds their device and layout
    (CPU, strided) and dtype: only what can change between calls of one kind is looked at."""
    if t.requires_grad or t.is_neg() or t.dtype == torch.bfloat16:
        return to_numpy("q, k or v", t)
    return t.numpy()


def _planned_forward(plan, q: Tensor, k: Tensor, v: Tensor, q_lengths, kv_lengths, return_lse: bool):
    """A call of a planned kind: NumPy views, the lengths checked (``semantics.rebind``), the
    plan's backend run, tensors out — what the unplanned no-grad path returns."""
    if q_lengths is not None:
        q_lengths = to_numpy("q_lengths", q_lengths)
    if kv_lengths is not None:
        kv_lengths = to_numpy("kv_lengths", kv_lengths)
    call = semantics.rebind(plan.template, _planned_view(q), _planned_view(k), _planned_view(v), q_lengths, kv_lengths)
    out, lse = plan.run(call)
    out_t = _tensor(semantics.finalize_output(call, out))
    if return_lse:
        return out_t, _tensor(semantics.finalize_lse(call, lse))
    return out_t


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Any = None,
    bias: Any = None,
    causal: Any = False,
    window: Any = None,
    scale: Optional[float] = None,
    softcap: Optional[float] = None,
    alibi_slopes: Any = None,
    q_lengths: Any = None,
    kv_lengths: Any = None,
    segment_ids: Any = None,
    dropout_p: float = 0.0,
    seed: Optional[int] = None,
    return_lse: bool = False,
    return_weights: bool = False,
    layout: str = "bhld",
    implementation: Optional[str] = None,
    max_weights_bytes: int = DEFAULT_MAX_WEIGHTS_BYTES,
    **extras: Any,
):
    """Exact scaled dot-product attention on CPU and CUDA tensors, differentiable by autograd.

    The same call and semantics as :func:`dotattn.attention` (``docs/semantics.md``); this is
    where :func:`dotattn.attention` sends torch tensors.  Shapes (``layout="bhld"``)::

        q (..., Hq, Lq, D)   k (..., Hkv, Lk, D)   v (..., Hkv, Lk, Dv)
        out (..., Hq, Lq, Dv)   lse (..., Hq, Lq)   weights (..., Hq, Lq, Lk)

    Gradients flow to ``q``, ``k``, ``v`` and a float ``bias`` that requires grad (reduced to
    the bias's own shape), and through the returned LSE.  The backward recomputes from the
    saved LSE, never keeping the ``Lq × Lk`` probabilities.  Returned ``weights`` (the
    pre-dropout probabilities, float32 — float64 for float64 inputs) carry no gradient.

    Torch specifics:

    * ``mask`` is bool with True = attend (as SDPA's bool ``attn_mask``); an additive float
      mask goes in ``bias``.
    * with ``dropout_p > 0`` and no ``seed``, the seed is drawn from torch's default
      generator (so ``torch.manual_seed`` makes runs repeatable) and reused by the backward.
    * CUDA tensors run on the ``triton`` backend (fused Triton kernels, forward and
      backward); ``q, k, v, mask, bias`` must share one device.  With ``TRITON_INTERPRET=1``,
      ``implementation="triton"`` runs the same kernels on CPU tensors through Triton's
      interpreter (slow; for tests and machines without a GPU).
    * ``torch.compile(fullgraph=True)`` traces through it (a custom operator); backend
      ``**extras`` (such as a ``score_mod`` callable) run eagerly only.

    Returns ``out``; ``(out, lse)``; ``(out, weights)``; or ``(out, lse, weights)``.
    """
    check_no_forward_ad("dotattn.torch.attention", q=q, k=k, v=v, bias=bias, alibi_slopes=alibi_slopes)
    plan_key = None
    if (
        type(q) is Tensor
        and type(k) is Tensor
        and type(v) is Tensor
        and mask is None
        and bias is None
        and alibi_slopes is None
        and segment_ids is None
        and seed is None
        and not extras
        and return_weights is False
        and q.device.type == "cpu"
    ):
        # A kind of call seen before runs its plan (dispatch.plan_forward): the checks below
        # and normalize() passed for it, and only the lengths' values are checked again.
        plan_key = _plan_key(
            q, k, v, q_lengths, kv_lengths, causal, window, scale, softcap, dropout_p, layout, implementation
        )
        if plan_key is not None:
            plan = dispatch.find_plan(plan_key)
            if plan is not None:
                check_torch_llvm_order()
                return _planned_forward(
                    plan, q, k, v, q_lengths, kv_lengths, semantics.check_flag("return_lse", return_lse)
                )
    _check_qkv_tensors(q, k, v)
    return_lse = semantics.check_flag("return_lse", return_lse)
    return_weights = semantics.check_flag("return_weights", return_weights)
    if not torch.compiler.is_compiling():  # compiled code has loaded Triton already
        check_torch_llvm_order()
    # Scalar options: the semantics module's own checks (plain Python, so compile can trace them).
    layout = semantics.check_layout(layout)
    causal_s = semantics.check_causal(causal)
    window_t = semantics.check_window(window) or (None, None)
    scale_f = semantics.check_scale(scale, q.shape[-1]) if scale is not None else None
    softcap_f = semantics.check_softcap(softcap)
    dropout_f, seed_i = semantics.check_dropout(dropout_p, seed)
    if implementation is not None and not isinstance(implementation, str):
        raise AttentionValueError(f"implementation must be None or a backend name, got {implementation!r}")
    # Checked only when weights are asked for, as the NumPy path does.
    max_weights_bytes = (
        semantics.check_max_weights_bytes(max_weights_bytes) if return_weights else DEFAULT_MAX_WEIGHTS_BYTES
    )

    mask_t = _as_tensor("mask", mask)
    bias_t = _as_tensor("bias", bias)
    slopes_t = _as_tensor("alibi_slopes", alibi_slopes)
    if slopes_t is not None and slopes_t.requires_grad:
        raise AttentionValueError(
            "alibi_slopes requires grad, but dotattn does not differentiate with respect to the slopes; "
            "pass alibi_slopes.detach()"
        )
    q_len_t = _as_tensor("q_lengths", q_lengths)
    kv_len_t = _as_tensor("kv_lengths", kv_lengths)
    q_seg_t, kv_seg_t = _split_segment_ids(segment_ids, q, layout)
    seed_t = None
    if dropout_f > 0.0:
        if seed_i is None:
            seed_t = torch.randint(0, 2**62, (), dtype=torch.int64)
        else:
            seed_t = torch.tensor(seed_i, dtype=torch.int64)
    for name, t in (("mask", mask_t), ("bias", bias_t), ("alibi_slopes", slopes_t), ("q_lengths", q_len_t),
                    ("kv_lengths", kv_len_t), ("segment_ids", q_seg_t), ("segment_ids", kv_seg_t)):
        if t is not None:
            check_device(name, t)
            check_dense(name, t)
    _check_same_device(q, mask=mask_t, bias=bias_t)

    eager = _plain_eager(q, k, v)
    if extras or eager:
        # Eager CPU calls skip the operator: its dispatch and generated autograd cost ≈ 40–90 µs
        # a call (a decode step's whole budget); the hand-written Function runs the same bodies.
        arrays = dict(
            zip(_ARRAY_OPTIONS, (mask_t, None, slopes_t, q_len_t, kv_len_t, q_seg_t, kv_seg_t, seed_t), strict=True)
        )
        sc = _Scalars(causal_s, *window_t, scale_f, softcap_f, dropout_f, layout, implementation)
        needs_grad = torch.is_grad_enabled() and (
            q.requires_grad or k.requires_grad or v.requires_grad or (bias_t is not None and bias_t.requires_grad)
        )
        if needs_grad or not eager:
            out, lse, weights = _AttentionWithExtras.apply(
                q, k, v, bias_t, arrays, sc, return_weights, max_weights_bytes, extras
            )
        else:
            out, lse, weights = _forward_body(
                q, k, v, dict(arrays, bias=bias_t), sc, return_weights, max_weights_bytes, extras,
                want_lse=bool(return_lse), plan_key=plan_key,
            )
    else:
        out, lse, weights = torch.ops.dotattn.attention_fwd(
            q, k, v, mask_t, bias_t, slopes_t, q_len_t, kv_len_t, q_seg_t, kv_seg_t, seed_t,
            causal_s, window_t[0], window_t[1], scale_f, softcap_f, dropout_f, layout, implementation,
            bool(return_weights), int(max_weights_bytes),
        )
    results = [out]
    if return_lse:
        results.append(lse)
    if return_weights:
        results.append(weights)
    return results[0] if len(results) == 1 else tuple(results)
