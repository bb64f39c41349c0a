"""TensorFlow front end: ``tf.Tensor`` in, ``tf.Tensor`` out, differentiable.

The kernels run on the host through ``tf.numpy_function`` (so the call also works inside
``tf.function`` and Keras' ``model.fit``); gradients come from dotattn's blockwise backward
through ``tf.custom_gradient``.  Array options and the dropout ``seed`` may be symbolic
tensors inside ``tf.function``: they travel into the callback with q, k and v, and are
checked up front on stand-ins of their shape and dtype (their values — e.g. lengths in
range — on the host).  Leading batch dims may be unknown (``None``); the others must be
static.  The LSE output is not differentiable (as in FlashAttention); weights and a
tensor ``bias`` carry no gradient.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from . import dispatch, semantics
from .errors import AttentionTypeError

_ARRAY_OPTIONS = ("mask", "bias", "alibi_slopes", "q_lengths", "kv_lengths", "segment_ids")


def _static_shape(x) -> tuple[int, ...]:
    """The shape with unknown dims as 1 (only leading batch dims of q/k/v may be unknown)."""
    return tuple(1 if d is None else int(d) for d in x.shape)


# Per array option, how many trailing dims of its shape are not batch dims.
_OPTION_TAIL = {"mask": 3, "bias": 3, "q_lengths": 0, "kv_lengths": 0, "segment_ids": 1, "alibi_slopes": 1}


def _stand_in_shapes(tensors, checked: dict) -> list[tuple[int, ...]]:
    """Static shapes of q/k/v for the trace-time check, an unknown leading batch dim taking the
    size an array option gives it where one does (a concrete batch dim > 1), else 1.  With 1
    throughout, an option of a known batch size — ``kv_lengths`` of shape (2,) under an
    ``input_signature`` of batch None — was refused with "must have shape (1)", a size the user
    never gave (those calls ran eagerly)."""
    hint: dict[int, int] = {}  # batch dim counted from the right (0: the last batch dim) → size
    for name, value in checked.items():
        tail = _OPTION_TAIL.get(name)
        if tail is None or value is None:
            continue
        for arr in value if isinstance(value, tuple) else (value,):
            shape = getattr(arr, "shape", None)
            if shape is None or (name == "alibi_slopes" and len(shape) < 2):
                continue
            batch = tuple(shape)[: len(shape) - tail]
            for i, size in enumerate(reversed(batch)):
                if size is not None and size > 1:
                    hint[i] = max(hint.get(i, 1), int(size))
    shapes = []
    for x in tensors:
        dims = list(x.shape)
        n_batch = len(dims) - 3
        shapes.append(tuple(
            (hint.get(n_batch - 1 - j, 1) if j < n_batch else 1) if d is None else int(d) for j, d in enumerate(dims)
        ))
    return shapes


def _np_dtype(x):
    return x.dtype.as_numpy_dtype


class _Feeds:
    """Symbolic option tensors that must travel into the callbacks as inputs."""

    def __init__(self):
        self.tensors: list = []
        self.slots: list[tuple[str, int | None]] = []

    def add(self, name: str, index: int | None, x) -> None:
        self.tensors.append(x)
        self.slots.append((name, index))

    def fill(self, options: dict, values) -> dict:
        """``options`` with the fed tensors' NumPy values put back in their places."""
        options = dict(options)
        for (name, index), value in zip(self.slots, values):
            value = np.asarray(value)
            if name == "seed":
                options["seed"] = int(value)
            elif index is None:
                options[name] = value
            else:
                parts = list(options[name])
                parts[index] = value
                options[name] = tuple(parts)
        return options


def _prepare(name, x, feeds: _Feeds, index=None):
    """What the host will see for an array option (concrete) and what semantics checks now."""
    if x is None:
        return None, None
    if isinstance(x, (tuple, list)) and name == "segment_ids":
        pairs = [_prepare(name, e, feeds, i) for i, e in enumerate(x)]
        return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
    if tf.is_tensor(x):
        if tf.executing_eagerly():
            value = x.numpy()
            return value, value
        feeds.add(name, index, x)
        return None, semantics.stand_in(_static_shape(x), _np_dtype(x))
    return x, x


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
    for name, x in (("q", q), ("k", k), ("v", v)):
        if any(dim is None for dim in x.shape[-3:]) or (x.shape.rank is not None and x.shape.rank < 4 and None in x.shape):
            raise AttentionTypeError(
                f"{name} needs static length, head and feature dims for dotattn's TensorFlow front end "
                f"(only leading batch dims may be unknown), got shape {tuple(x.shape)}"
            )
    feeds = _Feeds()
    host_options, checked = {}, {}
    for name, value in options.items():
        if name in _ARRAY_OPTIONS:
            host_options[name], checked[name] = _prepare(name, value, feeds)
        elif name == "seed" and tf.is_tensor(value):
            if value.shape.rank != 0 or not value.dtype.is_integer:
                raise AttentionTypeError(f"seed must be an int or an integer scalar tensor, got {value.dtype.name}{tuple(value.shape)}")
            if tf.executing_eagerly():
                host_options[name] = checked[name] = int(value.numpy())
            else:
                feeds.add("seed", None, value)
                host_options[name], checked[name] = None, 0  # its value is checked on the host
        else:
            host_options[name] = checked[name] = value
    extras = {n: host_options.pop(n) for n in list(host_options) if n not in dispatch.OPTION_NAMES}
    checked = {n: x for n, x in checked.items() if n in dispatch.OPTION_NAMES}
    stand_ins = (semantics.stand_in(shape, _np_dtype(x)) for shape, x in zip(_stand_in_shapes((q, k, v), checked), (q, k, v)))
    call = semantics.normalize(*stand_ins, extras=extras, **checked)
    if return_weights:
        semantics.check_weights_size(call, max_weights_bytes)
    if not any(n == "seed" for n, _ in feeds.slots):
        host_options["seed"] = call.seed  # the forward and the backward must draw one dropout mask
    compute_tf = tf.as_dtype(call.compute_dtype)
    n_feeds = len(feeds.tensors)

    def host_call(qn, kn, vn, fed):
        return semantics.normalize(qn, kn, vn, extras=extras, **feeds.fill(host_options, fed))

    def host_forward(qn, kn, vn, *fed):
        c = host_call(qn, kn, vn, fed)
        out, lse, _ = dispatch.run_forward(c, implementation=implementation)
        return semantics.finalize_output(c, out), semantics.finalize_lse(c, lse)

    def host_backward(qn, kn, vn, out, lse, dout, *fed):
        return dispatch.backward_in_caller_layout(host_call(qn, kn, vn, fed), out, lse, dout, implementation=implementation)

    def relax(shape):
        """Static result shape with q's unknown leading batch dims unknown again."""
        shape = list(shape)
        if q.shape.rank is not None and q.shape.rank >= 4:
            for i, d in enumerate(q.shape[: q.shape.rank - 3]):
                if d is None:
                    shape[i] = None
        return shape

    out_shape = relax(semantics.finalize_output(call, np.zeros((call.B, call.Hq, call.Lq, call.Dv), call.compute_dtype)).shape)
    lse_shape = relax(semantics.finalize_lse(call, np.zeros((call.B, call.Hq, call.Lq), call.compute_dtype)).shape)

    @tf.custom_gradient
    def fused(q_, k_, v_, *fed):
        out, lse = tf.numpy_function(host_forward, [q_, k_, v_, *fed], [q_.dtype, compute_tf], stateful=False)
        out = tf.ensure_shape(out, out_shape)
        lse = tf.ensure_shape(lse, lse_shape)

        def grad(dout, dlse):
            del dlse  # the LSE is not differentiable (documented)
            grads = tf.numpy_function(
                host_backward, [q_, k_, v_, out, lse, dout, *fed], [q_.dtype] * 3, stateful=False
            )
            return [tf.ensure_shape(g, x.shape) for g, x in zip(grads, (q_, k_, v_))] + [None] * n_feeds

        return (out, lse), grad

    out, lse = fused(q, k, v, *feeds.tensors)
    results = [out]
    if return_lse:
        results.append(tf.stop_gradient(lse))
    if return_weights:

        def host_weights(qn, kn, vn, *fed):
            c = host_call(qn, kn, vn, fed)
            _, _, w = dispatch.run_forward(c, implementation=implementation, return_weights=True, max_weights_bytes=1 << 62)
            return np.asarray(semantics.finalize_pairwise(c, w), dtype=c.compute_dtype)

        w = tf.numpy_function(host_weights, [q, k, v, *feeds.tensors], compute_tf, stateful=False)
        w_shape = relax(semantics.finalize_pairwise(call, semantics.stand_in((call.B, call.Hq, call.Lq, call.Lk), np.int8)).shape)
        results.append(tf.stop_gradient(tf.ensure_shape(w, w_shape)))
    return results[0] if len(results) == 1 else tuple(results)


__all__ = ["attention"]
