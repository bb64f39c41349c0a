"""TensorFlow front end: same results as the NumPy path, gradients vs a plain TF softmax."""

import numpy as np
import pytest

# Triton (loaded by torch._dynamo) must come before TensorFlow in a process that has both: the
# other order aborts it (upstream LLVM conflict; see dotattn.torch._convert.check_torch_llvm_order).
try:
    import torch._dynamo  # noqa: F401
except ImportError:  # torch is optional here
    pass

tf = pytest.importorskip("tensorflow")  # optional extra: absent from the default test install

import dotattn  # noqa: E402


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((2, 4, 9, 8)).astype(np.float32)
    k = rng.standard_normal((2, 2, 11, 8)).astype(np.float32)
    v = rng.standard_normal((2, 2, 11, 8)).astype(np.float32)
    return q, k, v


def _plain_tf(q, k, v):
    group = q.shape[-3] // k.shape[-3]
    k = tf.repeat(k, group, axis=-3)
    v = tf.repeat(v, group, axis=-3)
    s = tf.matmul(q, k, transpose_b=True) / np.sqrt(q.shape[-1])
    return tf.matmul(tf.nn.softmax(s, axis=-1), v)


def test_tf_in_tf_out_matches_numpy_path():
    q, k, v = _inputs()
    opts = dict(causal=True, kv_lengths=np.array([11, 4]))
    out = dotattn.attention(tf.constant(q), tf.constant(k), tf.constant(v), **opts)
    assert tf.is_tensor(out)
    np.testing.assert_allclose(out.numpy(), dotattn.attention(q, k, v, **opts), atol=1e-6)


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "tf.function"])
def test_tf_gradients_match_plain_tf(graph):
    args = [tf.constant(x) for x in _inputs()]

    def grads(fn):
        def run(q, k, v):
            with tf.GradientTape() as tape:
                tape.watch([q, k, v])
                loss = tf.reduce_sum(fn(q, k, v) ** 2)
            return tape.gradient(loss, [q, k, v])

        return tf.function(run)(*args) if graph else run(*args)

    got = grads(lambda q, k, v: dotattn.attention(q, k, v))
    want = grads(_plain_tf)
    for name, g, w in zip("qkv", got, want):
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-4, atol=2e-5, err_msg=f"d{name}")


def test_tf_lse_and_weights():
    q, k, v = _inputs()
    out, lse, w = dotattn.attention(*(tf.constant(x) for x in (q, k, v)), return_lse=True, return_weights=True)
    _, ref_lse, ref_w = dotattn.attention(q, k, v, return_lse=True, return_weights=True)
    assert lse.shape == (2, 4, 9) and w.shape == (2, 4, 9, 11)
    np.testing.assert_allclose(lse.numpy(), ref_lse, atol=1e-6)
    np.testing.assert_allclose(w.numpy(), ref_w, atol=1e-6)


def test_tf_bad_input_fails_at_the_call():
    q, k, v = (tf.constant(x) for x in _inputs())
    with pytest.raises(ValueError, match="window"):
        dotattn.attention(q, k, v, window=(-1, 0))


def test_tf_function_takes_symbolic_masks_lengths_and_seed_with_unknown_batch():
    q, k, v = _inputs()
    lengths = np.array([11, 4])
    spec = [tf.TensorSpec((None, 4, 9, 8), tf.float32), tf.TensorSpec((None, 2, 11, 8), tf.float32),
            tf.TensorSpec((None, 2, 11, 8), tf.float32), tf.TensorSpec((None,), tf.int64), tf.TensorSpec((), tf.int32)]

    @tf.function(input_signature=spec)
    def f(q, k, v, lengths, seed):
        mask = tf.range(11)[None, :] % 3 != 1  # symbolic, computed in the graph
        return dotattn.attention(q, k, v, mask=mask, kv_lengths=lengths, causal=True, dropout_p=0.25, seed=seed)

    got = f(tf.constant(q), tf.constant(k), tf.constant(v), tf.constant(lengths), tf.constant(7))
    mask = np.arange(11)[None, :] % 3 != 1
    want = dotattn.attention(q, k, v, mask=mask, kv_lengths=lengths, causal=True, dropout_p=0.25, seed=7)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6)
    # values of symbolic options are checked on the host: the error comes back through the callback
    with pytest.raises((ValueError, tf.errors.OpError), match=r"kv_lengths must lie in \[0, 11\]"):
        f(tf.constant(q), tf.constant(k), tf.constant(v), tf.constant(np.array([12, 1])), tf.constant(7))


@pytest.mark.parametrize("option", ["kv_lengths", "mask", "bias", "alibi_slopes"])
def test_options_of_a_known_batch_size_under_an_unknown_batch_dim(option):
    """Under an input_signature of batch None, the trace-time check ran on batch-1 stand-ins: an
    option of batch 2 was refused ("kv_lengths must have shape (1), got (2)"; "mask … does not
    broadcast to (1, 2, 8, 8)"), though the same call ran eagerly.  The stand-ins now take the
    batch size such an option gives."""
    from dotattn.tensorflow import attention

    B, H, L, D = 2, 2, 8, 4
    x = np.random.default_rng(3).standard_normal((B, H, L, D))
    value = {
        "kv_lengths": np.array([3, 8]),
        "mask": np.random.default_rng(4).random((B, 1, 1, L)) < 0.7,
        "bias": np.random.default_rng(5).standard_normal((B, H, L, L)),
        "alibi_slopes": np.array([[0.5, 0.25], [0.125, 1.0]]),
    }[option]
    spec = [tf.TensorSpec([None, H, L, D], tf.float64)] * 3
    fn = tf.function(lambda q, k, v: attention(q, k, v, causal=True, **{option: value}), input_signature=spec)
    want = dotattn.attention(x, x, x, causal=True, implementation="reference", **{option: value})
    np.testing.assert_allclose(fn(x, x, x).numpy(), want, rtol=0, atol=1e-12)
