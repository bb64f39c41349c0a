"""JAX front end: ``jax.Array`` in, ``jax.Array`` out, differentiable, usable under ``jax.jit``.

The kernels run on the host through ``jax.pure_callback``; gradients come from dotattn's
blockwise backward through ``jax.custom_vjp`` (the saved LSE, never the ``Lq × Lk``
matrix).  Array options (mask, bias, lengths, segment ids, ALiBi slopes) must be concrete:
under ``jit``, close over them as NumPy arrays rather than passing traced values.  The LSE
output is not differentiable (as in FlashAttention); the weights are returned under
``stop_gradient``.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from . import api, semantics
from .errors import AttentionTypeError

_ARRAY_OPTIONS = ("mask", "bias", "alibi_slopes", "q_lengths", "kv_lengths", "segment_ids")


def _concrete(name: str, x: Any) -> Any:
    """An option as NumPy; traced values cannot be, and get an explanation instead."""
    if x is None or (name not in _ARRAY_OPTIONS and isinstance(x, (bool, int, float, str, tuple, list))):
        return x
    if isinstance(x, jax.core.Tracer):
        raise AttentionTypeError(
            f"{name} is a traced JAX value; dotattn needs array options concretely — under jax.jit, "
            "close over them as NumPy arrays (or mark them static) instead of passing them as arguments"
        )
    if isinstance(x, (tuple, list)):
        return type(x)(_concrete(name, e) for e in x)
    return np.asarray(x)


def _spec(x) -> np.ndarray:
    """A zero-stride stand-in with the array's shape and dtype, for validating before tracing ends."""
    return np.broadcast_to(np.zeros((), dtype=np.dtype(x.dtype)), x.shape)


def attention(q, k, v, *, return_lse=False, return_weights=False, implementation=None, max_weights_bytes=None, **options):
    """``dotattn.attention`` for JAX arrays (see its docstring for the arguments)."""
    options = {name: _concrete(name, value) for name, value in options.items()}
    extras = {n: options.pop(n) for n in list(options) if n not in api._OPTION_NAMES}
    # Validate now, on stand-ins, so bad input fails at the call and not inside a callback.
    call = semantics.normalize(_spec(q), _spec(k), _spec(v), extras=extras, **options)
    if return_weights:
        semantics.check_weights_size(call, max_weights_bytes or semantics.DEFAULT_MAX_WEIGHTS_BYTES)
    options["seed"] = call.seed  # a drawn dropout seed must be the same in forward and backward

    def host_call(qn, kn, vn):
        return semantics.normalize(np.asarray(qn), np.asarray(kn), np.asarray(vn), extras=extras, **options)

    out_shape = semantics.finalize_output(call, np.zeros((call.B, call.Hq, call.Lq, call.Dv), call.compute_dtype)).shape
    lse_shape = semantics.finalize_lse(call, np.zeros((call.B, call.Hq, call.Lq), call.compute_dtype)).shape
    out_struct = jax.ShapeDtypeStruct(out_shape, q.dtype)
    lse_struct = jax.ShapeDtypeStruct(lse_shape, call.compute_dtype)

    def host_forward(qn, kn, vn):
        c = host_call(qn, kn, vn)
        out, lse, _ = api.run_forward(c, implementation=implementation)
        return semantics.finalize_output(c, out), semantics.finalize_lse(c, lse)

    def host_backward(qn, kn, vn, out, lse, dout):
        c = host_call(qn, kn, vn)
        return api.backward_in_caller_layout(
            c, np.asarray(out), np.asarray(lse), np.asarray(dout), implementation=implementation
        )

    def forward_callback(q_, k_, v_):
        return jax.pure_callback(host_forward, (out_struct, lse_struct), q_, k_, v_)

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
        return jax.pure_callback(host_backward, structs, q_, k_, v_, out, lse, dout)

    fused.defvjp(fused_fwd, fused_bwd)
    out, lse = fused(q, k, v)
    results = [out]
    if return_lse:
        results.append(jax.lax.stop_gradient(lse))
    if return_weights:
        w_shape = semantics.finalize_pairwise(call, np.broadcast_to(np.zeros((), call.compute_dtype), (call.B, call.Hq, call.Lq, call.Lk))).shape

        def host_weights(qn, kn, vn):
            c = host_call(qn, kn, vn)
            _, _, w = api.run_forward(c, implementation=implementation, return_weights=True, max_weights_bytes=1 << 62)
            return np.asarray(semantics.finalize_pairwise(c, w), dtype=c.compute_dtype)

        w = jax.pure_callback(host_weights, jax.ShapeDtypeStruct(w_shape, call.compute_dtype), q, k, v)
        results.append(jax.lax.stop_gradient(w))
    return results[0] if len(results) == 1 else tuple(results)


__all__ = ["attention"]
