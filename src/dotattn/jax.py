"""JAX front end: ``jax.Array`` in, ``jax.Array`` out, differentiable, under ``jit``/``vmap``.

Two paths, one meaning (``docs/frameworks.md`` has the measurements behind the rule):

- **native** (``implementation="jax"``, :mod:`dotattn.kernels.jax_native`): blockwise online
  softmax in ``jax.lax`` with a ``custom_vjp`` backward.  Every array option may be traced
  (masks, bias, lengths, segment ids and ALiBi slopes computed inside ``jit``); ``vmap``
  batches it and it runs on the arrays' device.  Used whenever anything is traced (``jit``,
  ``grad``, ``vmap``, ``checkpoint``) or an array is on an accelerator.
- **host callback** (``jax.pure_callback`` into the ``cpu``/``numpy`` kernels): concrete
  arrays on the CPU — there the Numba kernels are faster than XLA's loops — or when another
  backend is named.  Array options must then be concrete.

The LSE output is not differentiable (as in FlashAttention); the weights are returned under
``stop_gradient``.  Argument checks are those of :mod:`dotattn.semantics`, run on
zero-stride stand-ins with the arrays' shapes and dtypes, so a traced option gets the same
shape/dtype errors as a NumPy one; options that decide the program (causal, window, scale,
softcap, dropout_p, seed, layout) must be Python values.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import dispatch, semantics
from .errors import AttentionTypeError, AttentionValueError

_ARRAY_OPTIONS = ("mask", "bias", "alibi_slopes", "q_lengths", "kv_lengths", "segment_ids")


def _concrete(name: str, x: Any) -> Any:
    """An option as NumPy; traced values cannot be, and get an explanation instead."""
    if x is None or (name not in _ARRAY_OPTIONS and isinstance(x, (bool, int, float, str, tuple, list))):
        return x
    if name in semantics.BACKEND_OPTIONS:  # user functions and block masks go to the kernels as they are
        return x  # (np.asarray made them object arrays, which every call then refused)
    if isinstance(x, jax.core.Tracer):
        raise AttentionTypeError(
            f"{name} is a traced JAX value; implementation={_NAMED[0]!r} runs on the host and needs array "
            "options concretely — use implementation='jax' (or None), which takes traced options"
        )
    if isinstance(x, (tuple, list)):
        return type(x)(_concrete(name, e) for e in x)
    return np.asarray(x)


def _spec(x) -> np.ndarray:
    """A zero-stride stand-in with the array's shape and dtype, for validating before tracing ends."""
    return np.broadcast_to(np.zeros((), dtype=np.dtype(x.dtype)), x.shape)


def _callback_attention(
    q, k, v, *, return_lse=False, return_weights=False, implementation=None,
    max_weights_bytes=semantics.DEFAULT_MAX_WEIGHTS_BYTES, **options,
):
    """The host-callback path: the CPU kernels through ``jax.pure_callback``."""
    options = {name: _concrete(name, value) for name, value in options.items()}
    extras = {n: options.pop(n) for n in list(options) if n not in dispatch.OPTION_NAMES}
    # Validate now, on stand-ins, so bad input fails at the call and not inside a callback.
    call = semantics.normalize(_spec(q), _spec(k), _spec(v), extras=extras, **options)
    if return_weights:
        semantics.check_weights_size(call, max_weights_bytes)
    options["seed"] = call.seed  # a drawn dropout seed must be the same in forward and backward

    def host_call(qn, kn, vn):
        return semantics.normalize(np.asarray(qn), np.asarray(kn), np.asarray(vn), extras=extras, **options)

    out_shape = semantics.finalize_output(call, np.zeros((call.B, call.Hq, call.Lq, call.Dv), call.compute_dtype)).shape
    lse_shape = semantics.finalize_lse(call, np.zeros((call.B, call.Hq, call.Lq), call.compute_dtype)).shape
    out_struct = jax.ShapeDtypeStruct(out_shape, q.dtype)
    lse_struct = jax.ShapeDtypeStruct(lse_shape, call.compute_dtype)

    def host_forward(qn, kn, vn):
        c = host_call(qn, kn, vn)
        out, lse, _ = dispatch.run_forward(c, implementation=implementation)
        return semantics.finalize_output(c, out), semantics.finalize_lse(c, lse)

    def host_backward(qn, kn, vn, out, lse, dout):
        c = host_call(qn, kn, vn)
        return dispatch.backward_in_caller_layout(
            c, np.asarray(out), np.asarray(lse), np.asarray(dout), implementation=implementation
        )

    device = _eager_device(q, k, v)
    if device is not None:
        # Concrete arrays and no transformation around the call (a jit, grad, vmap would have
        # made q, k or v tracers): nothing to trace or differentiate, so the host kernels run
        # here and the results go to q's device.  Through jax.pure_callback every such call
        # compiled an XLA program for its new callback (≈ 20 ms) and kept ≈ 1.4 MB of it for
        # good, even at one shape and scale (the resource audit of 6 Dec 2026).
        qn, kn, vn = np.asarray(q), np.asarray(k), np.asarray(v)
        out, lse = host_forward(qn, kn, vn)
        results = [jax.device_put(np.asarray(out).astype(out_struct.dtype, copy=False), device)]
        if return_lse:
            results.append(jax.device_put(np.asarray(lse).astype(lse_struct.dtype, copy=False), device))
        if return_weights:
            c = host_call(qn, kn, vn)  # (as host_weights below)
            _, _, w = dispatch.run_forward(c, implementation=implementation, return_weights=True, max_weights_bytes=1 << 62)
            results.append(jax.device_put(np.asarray(semantics.finalize_pairwise(c, w), dtype=c.compute_dtype), device))
        return results[0] if len(results) == 1 else tuple(results)

    def forward_callback(q_, k_, v_):
        # vmap_method: under jax.vmap the host call runs once per mapped element (without one,
        # vmap raised JAX's NotImplementedError on this path)
        return jax.pure_callback(host_forward, (out_struct, lse_struct), q_, k_, v_, vmap_method="sequential")

    @jax.custom_vjp
    def fused(q_, k_, v_):
        return forward_callback(q_, k_, v_)

    def fused_fwd(q_, k_, v_):
        out, lse = forward_callback(q_, k_, v_)
        return (out, lse), (q_, k_, v_, out, lse)

    def fused_bwd(residuals, cotangents):
        q_, k_, v_, out, lse = residuals
        dout, _ = cotangents  # the LSE is not differentiable (documented)
        structs = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q_, k_, v_))
        return jax.pure_callback(host_backward, structs, q_, k_, v_, out, lse, dout, vmap_method="sequential")

    fused.defvjp(fused_fwd, fused_bwd)
    out, lse = fused(q, k, v)
    results = [out]
    if return_lse:
        results.append(jax.lax.stop_gradient(lse))
    if return_weights:
        w_shape = semantics.finalize_pairwise(call, np.broadcast_to(np.zeros((), call.compute_dtype), (call.B, call.Hq, call.Lq, call.Lk))).shape

        def host_weights(qn, kn, vn):
            c = host_call(qn, kn, vn)
            _, _, w = dispatch.run_forward(c, implementation=implementation, return_weights=True, max_weights_bytes=1 << 62)
            return np.asarray(semantics.finalize_pairwise(c, w), dtype=c.compute_dtype)

        w = jax.pure_callback(host_weights, jax.ShapeDtypeStruct(w_shape, call.compute_dtype), q, k, v,
                              vmap_method="sequential")
        results.append(jax.lax.stop_gradient(w))
    return results[0] if len(results) == 1 else tuple(results)


_NAMED = [None]  # the named host backend, for the error above
_STATIC_OPTIONS = ("causal", "window", "scale", "softcap", "dropout_p", "seed", "layout")
_STATIC_KIND = {
    "causal": "bool or str",
    "window": "pair of ints/None",
    "scale": "float",
    "softcap": "float",
    "dropout_p": "float",
    "seed": "int",
    "layout": "str",
}


def _eager_device(*arrays) -> Any:
    """The one device of concrete ``jax.Array`` s on a single device, all the same; else None
    (a tracer, a NumPy array among them, a sharded array: the callback path)."""
    device = None
    for x in arrays:
        if not isinstance(x, jax.Array) or _is_traced(x):
            return None
        devices = x.devices()
        if len(devices) != 1:
            return None
        (d,) = devices
        if device is not None and d != device:
            return None
        device = d
    return device


def _is_traced(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def _static(name: str, value: Any) -> Any:
    """A static option as a Python value; a traced one is refused, naming the argument."""
    items = value if isinstance(value, (tuple, list)) else (value,)
    if any(_is_traced(x) for x in items):
        raise AttentionTypeError(
            f"{name} is a traced JAX value, but dotattn compiles it into the kernel: it must be a "
            f"static Python {_STATIC_KIND[name]}; under jax.jit pass it with static_argnums/static_argnames "
            "or close over a Python value"
        )
    if isinstance(value, jax.Array) and value.ndim == 0:  # a concrete scalar array: its Python value
        return value.item()
    if isinstance(value, (tuple, list)):
        return type(value)(x.item() if isinstance(x, jax.Array) and x.ndim == 0 else x for x in value)
    return value


def _stand_in(name: str, x: Any) -> Any:
    """What semantics.normalize checks for an array option: the value if it is cheap and
    concrete (lengths and slopes get range checks), otherwise a stand-in of its shape/dtype."""
    if x is None:
        return None
    if isinstance(x, (tuple, list)) and name == "segment_ids":
        if all(isinstance(e, (jax.Array, np.ndarray)) for e in x):
            return type(x)(_stand_in(name, e) for e in x)
        return x
    if isinstance(x, jax.Array):
        if not _is_traced(x) and name in ("q_lengths", "kv_lengths", "alibi_slopes"):
            return np.asarray(x)
        return semantics.stand_in(x.shape, x.dtype)
    return x


def _on_accelerator(x: Any) -> bool:
    if not isinstance(x, jax.Array) or _is_traced(x):
        return False
    return any(d.platform != "cpu" for d in x.devices())


def _wants_native(implementation, arrays) -> bool:
    """The dispatch rule (measured: docs/frameworks.md)."""
    if implementation == "jax":
        return True
    if implementation is not None:
        return False
    flat = []
    for x in arrays:
        flat.extend(x if isinstance(x, (tuple, list)) else (x,))
    return any(_is_traced(x) or _on_accelerator(x) for x in flat)


def attention(
    q,
    k,
    v,
    *,
    return_lse=False,
    return_weights=False,
    implementation=None,
    max_weights_bytes=semantics.DEFAULT_MAX_WEIGHTS_BYTES,
    **options,
):
    """``dotattn.attention`` for JAX arrays (see its docstring for the arguments)."""
    return_lse = semantics.check_flag("return_lse", return_lse)
    return_weights = semantics.check_flag("return_weights", return_weights)
    if implementation is not None and not isinstance(implementation, str):
        raise AttentionValueError(f"implementation must be None or a backend name, got {implementation!r}")
    for name in _STATIC_OPTIONS:
        if name in options and not (name == "seed" and _is_traced(options[name])):
            options[name] = _static(name, options[name])
    array_opts = [options.get(n) for n in _ARRAY_OPTIONS + ("seed",)]
    if not _wants_native(implementation, [q, k, v] + array_opts):
        _NAMED[0] = implementation
        return _callback_attention(
            q, k, v, return_lse=return_lse, return_weights=return_weights, implementation=implementation,
            max_weights_bytes=max_weights_bytes, **options,
        )
    return _native_attention(q, k, v, return_lse=return_lse, return_weights=return_weights,
                             max_weights_bytes=max_weights_bytes, **options)


def _native_attention(q, k, v, *, return_lse, return_weights, max_weights_bytes, **options):
    from .kernels import jax_native

    traced_seed = options.get("seed") if _is_traced(options.get("seed")) else None
    if traced_seed is not None:
        # A seed drawn inside jit (e.g. Keras' seed generator): a fresh mask per step without
        # recompiling.  Its key is hashed in the graph; values in [0, 2**31) match NumPy's masks.
        if traced_seed.ndim != 0 or not jnp.issubdtype(traced_seed.dtype, jnp.integer):
            raise AttentionTypeError(f"seed must be an int or an integer scalar array, got {traced_seed.dtype}{traced_seed.shape}")
        options["seed"] = 0  # checked as an int; the traced value is used below
    extras = {n: options.pop(n) for n in list(options) if n not in dispatch.OPTION_NAMES}
    checked = {n: (_stand_in(n, x) if n in _ARRAY_OPTIONS else x) for n, x in options.items()}
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, jax.Array):
            raise AttentionTypeError(f"{name} must be a jax.Array like q, got {type(x).__name__}")
    call = semantics.normalize(*(semantics.stand_in(x.shape, x.dtype) for x in (q, k, v)), extras=extras, **checked)
    if call.extras:
        raise AttentionValueError(
            f"implementation='jax' does not take {', '.join(sorted(call.extras))} (the host 'cpu' backend does: "
            "pass implementation='cpu' with concrete arrays)"
        )
    if call.dtype == np.float64 and not jax.config.jax_enable_x64:  # pragma: no cover - JAX cannot make one
        raise AttentionTypeError("float64 inputs need jax_enable_x64")
    if return_weights:
        semantics.check_weights_size(
            call, semantics.DEFAULT_MAX_WEIGHTS_BYTES if max_weights_bytes is None else max_weights_bytes
        )
    B, Hq, Lq, Lk = call.B, call.Hq, call.Lq, call.Lk
    qc, kc, vc = (semantics.to_canonical(x, call.layout) for x in (q, k, v))
    lead = call.batch_shape

    def lengths(x, L):
        if x is None:
            return None
        if isinstance(x, np.ndarray) or not isinstance(x, jax.Array):
            x = np.asarray(x)  # concrete and range-checked: no JAX cast may truncate it first
            x = np.clip(x, 0, L).astype(np.int32)
        x = jnp.broadcast_to(x, (B,)) if x.ndim == 0 else jnp.asarray(x).reshape(B)
        # Traced lengths cannot be range-checked up front; clipping keeps them in [0, L].
        return jax_native.clip_lengths(x, L)

    seg = options.get("segment_ids")
    q_seg = kv_seg = None
    if seg is not None:
        pair = call.q_segment_ids is not call.kv_segment_ids  # a pair (q_ids, kv_ids)
        ids = tuple(seg) if pair else (seg, seg)
        if not any(isinstance(x, jax.Array) for x in ids):  # NumPy ids: their values, on the host
            q_seg, kv_seg = jax_native.host_segment_ids(call.q_segment_ids, call.kv_segment_ids)
            q_seg, kv_seg = jnp.asarray(q_seg), jnp.asarray(kv_seg)
        else:
            q_seg, kv_seg = jax_native.traced_segment_ids(*ids)
            q_seg, kv_seg = q_seg.reshape(B, Lq), kv_seg.reshape(B, Lk)
    slopes = options.get("alibi_slopes")
    if slopes is not None:
        slopes = jnp.asarray(slopes)
        slopes = slopes.reshape(1, Hq) if slopes.ndim == 1 else slopes.reshape(B, Hq)
        slopes = slopes.astype(call.compute_dtype)
    key = None
    if call.dropout_p > 0.0:
        key = jax_native.traced_seed_key(traced_seed) if traced_seed is not None else jnp.asarray(jax_native.seed_key_pair(call.seed))
    cfg = jax_native.config(call.scale, call.softcap, call.causal, call.window, call.dropout_p)
    args = (
        qc, kc, vc,
        _compact_pairwise(options.get("bias"), lead, B, Hq, Lq, Lk),
        _compact_pairwise(options.get("mask"), lead, B, Hq, Lq, Lk),
        lengths(options.get("q_lengths"), Lq), lengths(options.get("kv_lengths"), Lk),
        q_seg, kv_seg, slopes, key,
    )
    empty = B * Hq * Lq == 0  # no query row: empty results, nothing to run (docs/semantics.md)
    if empty:
        out = jnp.zeros((B, Hq, Lq, call.Dv), q.dtype)
        lse = jnp.zeros((B, Hq, Lq), call.compute_dtype)
    else:
        out, lse = jax_native.attention(cfg, *args)
    results = [semantics.from_canonical(call, out)]
    if return_lse:
        results.append(jax.lax.stop_gradient(semantics.from_canonical(call, lse[..., None], pairwise=True)[..., 0]))
    if return_weights:
        w = jnp.zeros((B, Hq, Lq, Lk), call.compute_dtype) if empty else jax_native.weights(cfg, *args)
        results.append(jax.lax.stop_gradient(semantics.from_canonical(call, w, pairwise=True)))
    return results[0] if len(results) == 1 else tuple(results)


def _compact_pairwise(x, lead: tuple[int, ...], B: int, Hq: int, Lq: int, Lk: int):
    """A mask/bias broadcastable to ``lead + (Hq, Lq, Lk)`` (checked by semantics) → 4-D
    ``(B|1, Hq|1, Lq|1, Lk|1)`` without materializing the broadcast dims."""
    if x is None:
        return None
    x = jnp.asarray(x)
    full_ndim = len(lead) + 3
    x = x.reshape((1,) * (full_ndim - x.ndim) + x.shape)
    batch = x.shape[: len(lead)]
    if all(d == 1 for d in batch):
        b = 1
    else:
        if batch != lead:  # partly broadcast batch dims: expand those only
            x = jnp.broadcast_to(x, lead + x.shape[len(lead):])
        b = B
    return x.reshape((b,) + x.shape[len(lead):])


__all__ = ["attention"]
