"""Zero-size B, H, Lq, Lk: empty (or zero) results of the right shapes, forward and backward,
on every backend and front end — as PyTorch's own SDPA tests expect.  D = 0 stays an error
(``1/√D`` has no value; docs/semantics.md)."""

from __future__ import annotations

import helpers as H
import numpy as np
import pytest

import dotattn
from dotattn.errors import AttentionValueError

BACKENDS = H.backends_under_test()

# (batch, Hq, Hkv, Lq, Lk): each empties one axis
SHAPES = {
    "B0": ((0,), 2, 1, 3, 4),
    "B0x2": ((2, 0), 2, 2, 3, 4),
    "H0": ((2,), 0, 0, 3, 4),
    "Hq0": ((2,), 0, 1, 3, 4),
    "Lq0": ((2,), 2, 1, 0, 4),
    "Lk0": ((2,), 2, 1, 3, 0),
    "all0": ((0,), 0, 0, 0, 0),
}


def _inputs(name, dtype=np.float32):
    batch, Hq, Hkv, Lq, Lk = SHAPES[name]
    rng = np.random.default_rng(0)
    q = rng.standard_normal(batch + (Hq, Lq, 5)).astype(dtype)
    k = rng.standard_normal(batch + (Hkv, Lk, 5)).astype(dtype)
    v = rng.standard_normal(batch + (Hkv, Lk, 3)).astype(dtype)
    return q, k, v


@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_forward_weights_backward(backend, name):
    q, k, v = _inputs(name)
    opts = dict(causal=True, bias=np.zeros(q.shape[:-1] + (k.shape[-2],), np.float32))
    out, lse, w = dotattn.attention(q, k, v, return_lse=True, return_weights=True, implementation=backend, **opts)
    assert out.shape == q.shape[:-1] + (3,) and out.dtype == q.dtype
    assert lse.shape == q.shape[:-1] and w.shape == q.shape[:-1] + (k.shape[-2],)
    # Rows with no key (Lk = 0) are 0 with LSE −inf; otherwise the arrays are empty.
    assert not out.any() and np.all(np.isneginf(lse))
    dout = np.ones_like(out)
    dq, dk, dv, dbias = dotattn.attention_backward(
        q, k, v, out, lse, dout, implementation=backend, return_dbias=True, **opts
    )
    for g, x in ((dq, q), (dk, k), (dv, v), (dbias, opts["bias"])):
        assert g.shape == x.shape and g.dtype == x.dtype
        assert not g.any()  # no query row, or no key: nothing flows back


def _torch_forward_backward(q, k, v):
    torch = pytest.importorskip("torch")
    q, k, v = (torch.from_numpy(x).requires_grad_() for x in (q, k, v))
    out, lse, w = dotattn.attention(q, k, v, return_lse=True, return_weights=True, causal=True)
    out.sum().backward()
    return [x.detach().numpy() for x in (out, lse, w, q.grad, k.grad, v.grad)]


def _jax_forward_backward(q, k, v, implementation=None):
    jax = pytest.importorskip("jax")
    q, k, v = (jax.numpy.asarray(x) for x in (q, k, v))
    out, lse, w = dotattn.attention(q, k, v, return_lse=True, return_weights=True, causal=True, implementation=implementation)
    grads = jax.grad(lambda a, b, c: dotattn.attention(a, b, c, causal=True, implementation=implementation).sum(), argnums=(0, 1, 2))(q, k, v)
    return [np.asarray(x) for x in (out, lse, w, *grads)]


def _tensorflow_forward_backward(q, k, v, graph=False):
    tf = H.import_tensorflow()

    def run(q, k, v):
        with tf.GradientTape() as tape:
            tape.watch([q, k, v])
            out, lse, w = dotattn.attention(q, k, v, return_lse=True, return_weights=True, causal=True)
            loss = tf.reduce_sum(out)
        return (out, lse, w, *tape.gradient(loss, [q, k, v]))

    if graph:  # the batch dims unknown while tracing, as in a Keras model
        spec = [tf.TensorSpec((None,) * (x.ndim - 3) + x.shape[-3:], tf.float32) for x in (q, k, v)]
        run = tf.function(run, input_signature=spec)
    return [x.numpy() for x in run(*(tf.constant(x) for x in (q, k, v)))]


FRONT_ENDS = {
    "torch": _torch_forward_backward,
    "jax": _jax_forward_backward,
    "jax-native": lambda q, k, v: _jax_forward_backward(q, k, v, implementation="jax"),
    "tensorflow": _tensorflow_forward_backward,
    "tf.function": lambda q, k, v: _tensorflow_forward_backward(q, k, v, graph=True),
}


@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_empty_through_the_front_ends(front_end, name):
    """Forward (out, lse, weights) and backward through each framework's autodiff."""
    q, k, v = _inputs(name)
    out, lse, w, dq, dk, dv = FRONT_ENDS[front_end](q, k, v)
    assert out.shape == q.shape[:-1] + (3,) and out.dtype == q.dtype
    assert lse.shape == q.shape[:-1] and w.shape == q.shape[:-1] + (k.shape[-2],)
    assert not out.any() and np.all(np.isneginf(lse)) and not w.any()
    for g, x in ((dq, q), (dk, k), (dv, v)):
        assert g.shape == x.shape and g.dtype == x.dtype
        assert not g.any()  # no query row, or no key: nothing flows back


def test_empty_layer():
    mha = dotattn.MultiHeadAttention(8, 2)
    x = np.zeros((0, 5, 8), np.float32)
    assert mha(x).shape == (0, 5, 8)
    assert mha(np.zeros((3, 0, 8), np.float32)).shape == (3, 0, 8)


def test_head_dim_zero_stays_an_error():
    q = np.zeros((1, 2, 3, 0), np.float32)
    with pytest.raises(AttentionValueError, match="head dim D must be ≥ 1"):
        dotattn.attention(q, q, q)


def test_query_heads_without_key_heads_is_an_error():
    q = np.zeros((1, 2, 3, 4), np.float32)
    k = np.zeros((1, 0, 3, 4), np.float32)
    with pytest.raises(AttentionValueError, match="k has 0 heads"):
        dotattn.attention(q, k, k)
