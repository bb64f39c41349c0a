"""Registry entry for the native JAX kernel (``implementation="jax"``) on NumPy calls.

Kept apart from :mod:`dotattn.kernels.jax_native` so that listing backends
(``dotattn.info()``) does not import JAX: availability is a package lookup, and JAX loads
when a call is actually routed here.  JAX arrays reach the kernel through
:mod:`dotattn.jax` instead, with their options still traced.
"""

from __future__ import annotations

import importlib.util

import numpy as np

from ..semantics import AttentionCall

NAME = "jax"


def compact(x: np.ndarray | None) -> np.ndarray | None:
    """A broadcast view → the array it was broadcast from (zero-stride dims become 1).

    ``AttentionCall`` holds masks, biases and slopes as full-shaped views; copying those to a
    device would materialize every broadcast copy.
    """
    if x is None:
        return None
    return np.ascontiguousarray(x[tuple(slice(0, 1) if st == 0 else slice(None) for st in x.strides)])


def _args(call: AttentionCall, full_bias: bool = False):
    import jax.numpy as jnp

    from . import jax_native

    def j(x):
        return None if x is None else jnp.asarray(x)

    def lengths(x):  # checked to lie in [0, L] by the semantics: int32 holds them
        return None if x is None else jnp.asarray(x.astype(np.int32))

    q_seg = kv_seg = None
    if call.q_segment_ids is not None:
        q_seg, kv_seg = (jnp.asarray(x) for x in jax_native.host_segment_ids(call.q_segment_ids, call.kv_segment_ids))

    key = jnp.asarray(jax_native.seed_key_pair(call.seed)) if call.dropout_p > 0.0 else None
    cfg = jax_native.config(call.scale, call.softcap, call.causal, call.window, call.dropout_p)
    args = (
        j(np.ascontiguousarray(call.q)),
        j(np.ascontiguousarray(call.k)),
        j(np.ascontiguousarray(call.v)),
        j(np.ascontiguousarray(call.bias) if full_bias and call.bias is not None else compact(call.bias)),
        j(compact(call.mask)),
        lengths(call.q_lengths),
        lengths(call.kv_lengths),
        q_seg,
        kv_seg,
        j(compact(call.alibi_slopes)),
        key,
    )
    return cfg, args


class JaxBackend:
    """Blockwise online softmax in ``jax.lax`` (runs on JAX's default device)."""

    name = NAME
    description = "blockwise online softmax in jax.lax (custom_vjp; jit/grad/vmap; any XLA device)"

    def available(self) -> tuple[bool, str]:
        if importlib.util.find_spec("jax") is None:
            return False, "JAX is not installed (pip install 'dotattn[jax]')"
        return True, "available"

    def unsupported_reasons(self, call: AttentionCall) -> list[str]:
        reasons = []
        if call.extras:
            reasons.append(f"does not take {', '.join(sorted(call.extras))} (the 'cpu' backend does)")
        if call.block is not None:
            reasons.append("does not take internal block calls (dotattn.distributed uses the host backends)")
        if call.dtype == np.float64:
            import jax

            if not jax.config.jax_enable_x64:
                reasons.append("float64 inputs need jax_enable_x64 (JAX would silently compute in float32)")
        return reasons

    def forward(self, call: AttentionCall):
        from . import jax_native

        cfg, args = _args(call)
        out, lse = jax_native.attention(cfg, *args)
        return np.asarray(out, dtype=call.compute_dtype), np.asarray(lse)

    def backward(self, call: AttentionCall, out, lse, dout, want_dbias: bool = False):
        import jax
        import jax.numpy as jnp

        from . import jax_native

        # A full-shaped bias gives the full (B, Hq, Lq, Lk) dbias that attention_backward reduces.
        cfg, args = _args(call, full_bias=want_dbias)
        grads = jax.jit(jax_native._backward, static_argnums=0)(
            cfg, args, jnp.asarray(out, call.compute_dtype), jnp.asarray(lse), jnp.asarray(dout, call.compute_dtype)
        )
        dq, dk, dv, dbias = (None if g is None else np.asarray(g, dtype=call.compute_dtype) for g in grads[:4])
        return dq, dk, dv, dbias if want_dbias else None

    def weights(self, call: AttentionCall, lse):
        from . import jax_native

        cfg, args = _args(call)
        return np.asarray(jax_native.weights(cfg, *args))
