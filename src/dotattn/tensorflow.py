"""TensorFlow front end: ``tf.Tensor`` in, ``tf.Tensor`` out, differentiable.

The kernels run on the host through ``tf.numpy_function`` (so the call also works inside
``tf.function``); gradients come from dotattn's blockwise backward through
``tf.custom_gradient``.  Array options must be concrete (eager tensors or NumPy arrays).
The LSE output is not differentiable (as in FlashAttention); weights carry no gradient.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from . import dispatch, semantics
from .errors import AttentionTypeError

_ARRAY_OPTIONS = ("mask", "bias", "alibi_slopes", "q_lengths", "kv_lengths", "segment_ids")


def _concrete(name, x):
    if x is None or name not in _ARRAY_OPTIONS:
        return x
    if isinstance(x, (tuple, list)):
        return type(x)(_concrete(name, e) for e in x)
    if tf.is_tensor(x):
        if not tf.executing_eagerly():
            raise AttentionTypeError(
                f"{name} is a symbolic TensorFlow tensor; dotattn needs array options concretely — "
                "inside tf.function, capture them as NumPy arrays instead"
            )
        return x.numpy()
    return np.asarray(x)


def _spec(x) -> np.ndarray:
    return np.broadcast_to(np.zeros((), dtype=x.dtype.as_numpy_dtype), tuple(x.shape))


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
    """``dotattn.attention`` for TensorFlow tensors (see its docstring for the arguments)."""
    return_lse = semantics.check_flag("return_lse", return_lse)
    return_weights = semantics.check_flag("return_weights", return_weights)
    if any(dim is None for x in (q, k, v) for dim in x.shape):
        raise AttentionTypeError("q, k and v need fully known static shapes for dotattn's TensorFlow front end")
    options = {name: _concrete(name, value) for name, value in options.items()}
    extras = {n: options.pop(n) for n in list(options) if n not in dispatch.OPTION_NAMES}
    call = semantics.normalize(_spec(q), _spec(k), _spec(v), extras=extras, **options)
    if return_weights:
        semantics.check_weights_size(call, max_weights_bytes)
    options["seed"] = call.seed  # the forward and the backward must draw one dropout mask
    compute_tf = tf.as_dtype(call.compute_dtype)

    def host_call(qn, kn, vn):
        return semantics.normalize(qn, kn, vn, extras=extras, **options)

    def host_forward(qn, kn, vn):
        c = host_call(qn, kn, vn)
        out, lse, _ = dispatch.run_forward(c, implementation=implementation)
        return semantics.finalize_output(c, out), semantics.finalize_lse(c, lse)

    def host_backward(qn, kn, vn, out, lse, dout):
        return dispatch.backward_in_caller_layout(host_call(qn, kn, vn), out, lse, dout, implementation=implementation)

    out_shape = semantics.finalize_output(call, np.zeros((call.B, call.Hq, call.Lq, call.Dv), call.compute_dtype)).shape
    lse_shape = semantics.finalize_lse(call, np.zeros((call.B, call.Hq, call.Lq), call.compute_dtype)).shape

    @tf.custom_gradient
    def fused(q_, k_, v_):
        out, lse = tf.numpy_function(host_forward, [q_, k_, v_], [q_.dtype, compute_tf], stateful=False)
        out = tf.ensure_shape(out, out_shape)
        lse = tf.ensure_shape(lse, lse_shape)

        def grad(dout, dlse):
            del dlse  # the LSE is not differentiable (documented)
            grads = tf.numpy_function(host_backward, [q_, k_, v_, out, lse, dout], [q_.dtype] * 3, stateful=False)
            return [tf.ensure_shape(g, x.shape) for g, x in zip(grads, (q_, k_, v_))]

        return (out, lse), grad

    out, lse = fused(q, k, v)
    results = [out]
    if return_lse:
        results.append(tf.stop_gradient(lse))
    if return_weights:

        def host_weights(qn, kn, vn):
            c = host_call(qn, kn, vn)
            _, _, w = dispatch.run_forward(c, implementation=implementation, return_weights=True, max_weights_bytes=1 << 62)
            return np.asarray(semantics.finalize_pairwise(c, w), dtype=c.compute_dtype)

        w = tf.numpy_function(host_weights, [q, k, v], compute_tf, stateful=False)
        results.append(tf.stop_gradient(w))
    return results[0] if len(results) == 1 else tuple(results)


__all__ = ["attention"]
