"""Keras 3: ``MultiHeadAttention`` whose attention is computed by dotattn.

A subclass of ``keras.layers.MultiHeadAttention``: the same constructor, call signature,
weights (query, key, value, output ``EinsumDense`` layers in Keras' own layout, so
``layer.set_weights(keras_mha.get_weights())`` works), masks and config — only the
attention itself runs through :func:`dotattn.attention`, with the arrays of whichever
backend Keras runs on (JAX: the native kernel under ``jit``; PyTorch: ``dotattn.torch``;
TensorFlow: ``dotattn.tensorflow``).  Extra arguments: ``num_kv_heads`` (grouped-query
attention: the key/value projections have that many heads), ``window``, ``softcap`` and
``alibi_slopes`` as in :func:`dotattn.attention`.

Differences from Keras, on purpose (``docs/keras.md``): a query row that may attend to no key
(e.g. a padded query under ``query_mask``) outputs 0 before the output projection, where
Keras returns the mean of the values; and attention over more than one axis
(``attention_axes`` with several axes) is not supported.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from . import semantics
from .api import attention
from .errors import AttentionValueError

__all__ = ["MultiHeadAttention"]


@keras.saving.register_keras_serializable(package="dotattn")
class MultiHeadAttention(keras.layers.MultiHeadAttention):
    """``keras.layers.MultiHeadAttention`` computed by dotattn (see the module docstring).

    Args (beyond Keras' own):
        num_kv_heads: key/value heads (default ``num_heads``); ``num_heads`` must be a multiple.
        window: ``(left, right)`` sliding window of :func:`dotattn.attention` (None = off).
        softcap: logit soft cap (None = off).
        alibi_slopes: per-head ALiBi slopes, a sequence of ``num_heads`` floats.
    """

    def __init__(
        self,
        num_heads,
        key_dim,
        value_dim=None,
        dropout=0.0,
        use_bias=True,
        output_shape=None,
        attention_axes=None,
        *,
        num_kv_heads=None,
        window=None,
        softcap=None,
        alibi_slopes=None,
        **kwargs,
    ):
        if kwargs.get("flash_attention"):
            raise AttentionValueError("flash_attention is Keras' own kernel choice; dotattn computes attention here")
        kwargs["flash_attention"] = False
        super().__init__(
            num_heads, key_dim, value_dim=value_dim, dropout=dropout, use_bias=use_bias,
            output_shape=output_shape, attention_axes=attention_axes, **kwargs,
        )
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads <= 0:
            raise AttentionValueError(f"num_kv_heads must be a positive int or None, got {num_kv_heads!r}")
        if num_heads % num_kv_heads:
            raise AttentionValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        if attention_axes is not None and tuple(np.atleast_1d(attention_axes)) not in ((1,), (-2,)):
            raise AttentionValueError(
                f"attention_axes={attention_axes!r}: dotattn.keras.MultiHeadAttention attends over one axis "
                "(inputs (batch, length, features)); use keras.layers.MultiHeadAttention for several axes"
            )
        # The same checks as dotattn.attention, at construction rather than at the first call.
        window = semantics.check_window(window)
        softcap = semantics.check_softcap(softcap)
        if alibi_slopes is not None:
            alibi_slopes = [float(s) for s in np.asarray(alibi_slopes, dtype=np.float64).reshape(-1)]
            if len(alibi_slopes) != num_heads:
                raise AttentionValueError(
                    f"alibi_slopes must hold num_heads={num_heads} slopes, got {len(alibi_slopes)}"
                )
        self._num_kv_heads = num_kv_heads
        self._window = window
        self._softcap = softcap
        self._alibi_slopes = alibi_slopes
        self._dotattn_causal = False

    def get_config(self):
        config = super().get_config()
        config.pop("flash_attention", None)
        config.update(
            num_kv_heads=self._num_kv_heads,
            window=None if self._window is None else list(self._window),
            softcap=self._softcap,
            alibi_slopes=self._alibi_slopes,
        )
        return config

    @property
    def num_kv_heads(self):
        return self._num_kv_heads

    def build(self, query_shape, value_shape, key_shape=None):
        if len(query_shape) != 3:
            raise AttentionValueError(
                f"query must have shape (batch, length, features), got rank {len(query_shape)} {tuple(query_shape)}; "
                "use keras.layers.MultiHeadAttention for attention over several axes"
            )
        super().build(query_shape, value_shape, key_shape)
        if self._num_kv_heads == self._num_heads:
            return
        # Grouped-query attention: key/value projections with num_kv_heads heads, swapped in
        # at the place of Keras' own so the weight order stays query, key, value, output.
        key_shape = value_shape if key_shape is None else key_shape
        for attr, shape, dim, name in (
            ("_key_dense", key_shape, self._key_dim, "key"),
            ("_value_dense", value_shape, self._value_dim, "value"),
        ):
            old = getattr(self, attr)
            new = keras.layers.EinsumDense(
                old.equation,
                output_shape=list(old.partial_output_shape[:-2]) + [self._num_kv_heads, dim],
                bias_axes=old.bias_axes,
                name=name,
                **self._get_common_kwargs_for_sublayer(),
            )
            new.build(shape)
            self._tracker.replace_tracked_value("layers", old, new)
            object.__setattr__(self, attr, new)

    def call(
        self,
        query,
        value,
        key=None,
        query_mask=None,
        value_mask=None,
        key_mask=None,
        attention_mask=None,
        return_attention_scores=False,
        training=None,
        use_causal_mask=False,
    ):
        # Causality goes to dotattn as causal="top_left" (Keras' alignment) instead of an
        # (Lq, Lk) mask; Keras merges the other masks into attention_mask as usual.
        self._dotattn_causal = bool(use_causal_mask)
        try:
            return super().call(
                query, value, key=key, query_mask=query_mask, value_mask=value_mask, key_mask=key_mask,
                attention_mask=attention_mask, return_attention_scores=return_attention_scores,
                training=training, use_causal_mask=False,
            )
        finally:
            self._dotattn_causal = False

    def _compute_attention(
        self, query, key, value, attention_mask=None, training=None, return_attention_scores=False, **kwargs
    ):
        # query (B, T, Hq, key_dim), key (B, S, Hkv, key_dim), value (B, S, Hkv, value_dim):
        # dotattn's "blhd" layout as is.
        options = dict(layout="blhd", scale=float(self._inverse_sqrt_key_dim), window=self._window, softcap=self._softcap)
        if self._dotattn_causal or kwargs.get("use_causal_mask"):
            options["causal"] = "top_left"
        if attention_mask is not None:
            mask = ops.cast(attention_mask, "bool")
            options["mask"] = ops.expand_dims(mask, axis=-3)  # (B, T, S) → (B, 1, T, S): every head
        if self._alibi_slopes is not None:
            options["alibi_slopes"] = ops.convert_to_tensor(np.asarray(self._alibi_slopes), dtype=self.compute_dtype)
        if training and self._dropout > 0.0:
            options["dropout_p"] = float(self._dropout)
            # A seed drawn in the graph from Keras' own dropout seed generator, so every
            # training step (also under jit / tf.function) gets a fresh mask.
            seed = keras.random.randint((), 0, 2**31 - 1, dtype="int32", seed=self._dropout_layer.seed_generator)
            if keras.config.backend() == "torch":  # eager: dotattn.torch takes a Python int
                seed = int(ops.convert_to_numpy(seed))
            options["seed"] = seed
        if return_attention_scores:
            out, scores = attention(query, key, value, return_weights=True, **options)
            return out, ops.cast(scores, query.dtype)
        return attention(query, key, value, **options), None
