"""The native JAX backend (``implementation="jax"``): every option against the float64
reference, parity with ``jax.nn.dot_product_attention``, traced options under ``jit``,
``grad`` (finite differences in float64), ``vmap``, ``jax.checkpoint``, dropout masks equal
to NumPy's, dispatch and errors.

Block sizes are shrunk (8 × 16) so that a few dozen tokens already cover shifted last
blocks, skipped blocks and multi-block loops.
"""

import numpy as np
import pytest

jax = pytest.importorskip("jax")  # jax is an optional extra; `make test` installs it
jnp = jax.numpy

import helpers  # noqa: E402
import helpers as H  # noqa: E402

import dotattn  # noqa: E402
import dotattn.jax as dj  # noqa: E402
from dotattn.kernels import jax_native  # noqa: E402
from jax import test_util as jtu  # noqa: E402

LQ, LK = 37, 53


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(jax_native, "BLOCK_Q", 8)
    monkeypatch.setattr(jax_native, "BLOCK_K", 16)


def J(x):
    return None if x is None else jnp.asarray(x)


def _cases():
    rng = np.random.default_rng(0)
    qlen, kvlen = np.array([37, 3]), np.array([50, 0])
    return {
        "plain": {},
        "causal-bottom-right": dict(causal=True),
        "causal-top-left": dict(causal="top_left"),
        "window": dict(window=(5, 2)),
        "window-left-causal": dict(window=(9, None), causal=True),
        "softcap": dict(softcap=2.0, scale=0.7),
        "lengths-causal": dict(q_lengths=qlen, kv_lengths=kvlen, causal=True),
        "alibi-lengths": dict(alibi_slopes=rng.random((2, 4)), kv_lengths=np.array([40, 20])),
        "bias-full": dict(bias=rng.standard_normal((LQ, LK)).astype(np.float32)),
        "bias-broadcast": dict(bias=rng.standard_normal((2, 4, LQ, 1)).astype(np.float32)),
        "mask": dict(mask=rng.random((2, 1, LQ, LK)) < 0.5),
        "segments": dict(segment_ids=(np.sort(rng.integers(0, 3, (2, LQ))), np.sort(rng.integers(0, 3, (2, LK))))),
        "dropout": dict(dropout_p=0.3, seed=5, causal=True),
    }


CASES = _cases()


@pytest.mark.parametrize("name", list(CASES))
def test_native_forward_and_grads_match_the_float64_reference(name):
    opts = CASES[name]
    q, k, v = helpers.random_qkv(1, Hq=4, Hkv=2, Lq=LQ, Lk=LK, q_lengths=opts.get("q_lengths"), kv_lengths=opts.get("kv_lengths"))
    dout = np.random.default_rng(2).standard_normal((2, 4, LQ, 8)).astype(np.float32)
    jopts = {n: (J(x) if isinstance(x, np.ndarray) else tuple(J(e) for e in x) if isinstance(x, tuple) and n == "segment_ids" else x)
             for n, x in opts.items()}
    bias = jopts.pop("bias", None)

    def loss(q, k, v, bias):
        out, lse = dotattn.attention(q, k, v, bias=bias, return_lse=True, implementation="jax", **jopts)
        return (out * J(dout)).sum(), (out, lse)

    grad_args = (0, 1, 2, 3) if bias is not None else (0, 1, 2)
    grads, (out, lse) = jax.jit(jax.grad(loss, argnums=grad_args, has_aux=True))(J(q), J(k), J(v), bias)
    ref_out, ref_lse = helpers.reference(q, k, v, **opts)
    naive_out, naive_lse = helpers.naive(q, k, v, **opts)
    helpers.assert_close_to_reference(np.asarray(out), ref_out, naive_out)
    helpers.assert_close_to_reference(np.asarray(lse), ref_lse, naive_lse, name="lse", dtype=np.float32)
    ref_g = helpers.reference_grads(q, k, v, dout, **opts)
    naive_g = helpers.naive_grads(q, k, v, dout, **opts)
    for g, r, n, what in zip(grads, ref_g, naive_g, ("dq", "dk", "dv", "dbias")):
        helpers.assert_close_to_reference(np.asarray(g), r, n, name=what, magnitude=10)


def test_native_alibi_gradient_matches_finite_differences_in_float64():
    with jax.enable_x64(True):
        q, k, v = (J(x) for x in helpers.random_qkv(3, Hq=2, Lq=11, Lk=13, dtype=np.float64))
        slopes = jnp.asarray([0.3, 0.05])
        bias = J(np.random.default_rng(4).standard_normal((11, 13)))

        def f(q, k, v, slopes, bias):
            return dotattn.attention(q, k, v, alibi_slopes=slopes, bias=bias, causal=True, softcap=3.0,
                                     implementation="jax")

        jtu.check_grads(f, (q, k, v, slopes, bias), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)
        out = f(q, k, v, slopes, bias)
        assert out.dtype == jnp.float64


def test_parity_with_jax_nn_dot_product_attention():
    """jax.nn layout is (B, L, H, D) = dotattn's "blhd"; causal is top-left; lengths pad."""
    q, k, v = (J(x) for x in helpers.random_qkv(5, Hq=4, Hkv=2, Lq=LQ, Lk=LK, layout="blhd"))
    mask = J(np.random.default_rng(6).random((2, 4, LQ, LK)) < 0.6) | (jnp.arange(LK) == 0)  # no empty row
    qlen, kvlen = jnp.asarray([LQ, 20]), jnp.asarray([LK, 9])
    for ours, theirs in (
        (dict(causal="top_left"), dict(is_causal=True)),
        (dict(mask=mask), dict(mask=mask)),
        (dict(q_lengths=qlen, kv_lengths=kvlen), dict(query_seq_lengths=qlen, key_value_seq_lengths=kvlen)),
    ):
        got = jax.jit(lambda q, k, v: dotattn.attention(q, k, v, layout="blhd", **ours))(q, k, v)
        want = jax.nn.dot_product_attention(q, k, v, implementation="xla", **theirs)
        if "q_lengths" in ours:  # jax.nn leaves padded query rows unspecified; dotattn gives 0
            want = jnp.where((jnp.arange(LQ) < qlen[:, None])[..., None, None], want, 0)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6, rtol=1e-5)


def test_jit_takes_masks_bias_lengths_segments_and_slopes_computed_inside():
    q, k, v = helpers.random_qkv(7, Hq=4, Hkv=2, Lq=LQ, Lk=LK)
    kvlen = np.array([30, 53])

    @jax.jit
    def f(q, k, v, kvlen):
        mask = (jnp.arange(LQ)[:, None] + jnp.arange(LK)) % 5 != 0
        bias = jnp.sin(jnp.arange(LK, dtype=jnp.float32))
        seg = jnp.arange(LQ) // 20, jnp.arange(LK) // 20
        seg = tuple(jnp.broadcast_to(s, (2, s.shape[0])) for s in seg)
        slopes = jnp.linspace(0.1, 0.4, 4)
        return dotattn.attention(q, k, v, mask=mask, bias=bias, kv_lengths=kvlen, segment_ids=seg,
                                 alibi_slopes=slopes)

    got = f(J(q), J(k), J(v), J(kvlen))
    opts = dict(
        mask=(np.arange(LQ)[:, None] + np.arange(LK)) % 5 != 0,
        bias=np.sin(np.arange(LK, dtype=np.float32)),
        kv_lengths=kvlen,
        segment_ids=tuple(np.broadcast_to(np.arange(n) // 20, (2, n)) for n in (LQ, LK)),
        alibi_slopes=np.linspace(0.1, 0.4, 4),
    )
    helpers.assert_close_to_reference(np.asarray(got), helpers.reference(q, k, v, **opts)[0], helpers.naive(q, k, v, **opts)[0])


def test_vmap_adds_batch_dims_with_per_example_lengths():
    q, k, v = helpers.random_qkv(8, batch=(3,), Hq=2, Lq=LQ, Lk=LK)
    kvlen = np.array([53, 10, 1])

    def one(q, k, v, n):  # 3-D inputs: a scalar length per example
        return dotattn.attention(q, k, v, kv_lengths=n, causal=True)

    got = jax.vmap(one)(J(q), J(k), J(v), J(kvlen))
    ref = helpers.reference(q, k, v, kv_lengths=kvlen, causal=True)[0]
    helpers.assert_close_to_reference(np.asarray(got), ref, helpers.naive(q, k, v, kv_lengths=kvlen, causal=True)[0])
    g = jax.grad(lambda q: jax.vmap(one)(q, J(k), J(v), J(kvlen)).sum())(J(q))
    assert np.isfinite(np.asarray(g)).all()


def test_checkpoint_gives_the_same_gradients():
    q, k, v = (J(x) for x in helpers.random_qkv(9, Hq=2, Lq=LQ, Lk=LK))

    def f(q, k, v):
        return (dotattn.attention(q, k, v, causal=True, window=(7, None)) ** 2).sum()

    plain = jax.grad(f, argnums=(0, 1, 2))(q, k, v)
    ckpt = jax.jit(jax.grad(jax.checkpoint(f), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(plain, ckpt):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)  # jit vs eager rounding


@pytest.mark.parametrize("x64", [False, True], ids=["uint32-pairs", "x64-on"])
def test_dropout_mask_is_numpys_for_the_same_seed(x64):
    q, k, v = helpers.random_qkv(10, Hq=4, Hkv=2, Lq=LQ, Lk=LK)
    opts = dict(dropout_p=0.4, seed=2**40 + 17, causal=True)
    want = dotattn.attention(q, k, v, implementation="numpy", **opts)
    with jax.enable_x64(x64):
        got = jax.jit(lambda q, k, v: dotattn.attention(q, k, v, **opts))(J(q), J(k), J(v))
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-6, rtol=1e-5)


def test_a_seed_traced_inside_jit_draws_numpys_mask_without_recompiling():
    q, k, v = helpers.random_qkv(15, Hq=2, Lq=LQ, Lk=LK)
    f = jax.jit(lambda q, k, v, seed: dotattn.attention(q, k, v, dropout_p=0.5, seed=seed))
    for seed in (7, 2**31 - 1):
        want = dotattn.attention(q, k, v, implementation="numpy", dropout_p=0.5, seed=seed)
        np.testing.assert_allclose(np.asarray(f(J(q), J(k), J(v), jnp.int32(seed))), want, atol=2e-6, rtol=1e-5)
    assert f._cache_size() == 1
    with pytest.raises(TypeError, match="seed must be an int or an integer scalar array"):
        f(J(q), J(k), J(v), jnp.float32(1.0))


def test_rows_that_see_nothing_give_zero_lse_minus_inf_and_zero_gradients():
    q, k, v = (J(x) for x in helpers.random_qkv(11, Hq=2, Lq=LQ, Lk=LK))
    mask = jnp.ones((LQ, LK), bool).at[3].set(False)

    def f(q, k, v):
        out, lse = dotattn.attention(q, k, v, mask=mask, kv_lengths=jnp.asarray([LK, 0]), return_lse=True)
        return out.sum(), (out, lse)

    (dq, dk, dv), (out, lse) = jax.jit(jax.grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    assert (np.asarray(out)[:, :, 3] == 0).all() and (np.asarray(out)[1] == 0).all()
    assert np.isneginf(np.asarray(lse)[:, :, 3]).all() and np.isneginf(np.asarray(lse)[1]).all()
    assert (np.asarray(dq)[:, :, 3] == 0).all() and (np.asarray(dq)[1] == 0).all() and (np.asarray(dk)[1] == 0).all()
    assert all(np.isfinite(np.asarray(g)).all() for g in (dq, dk, dv))


def test_weights_and_empty_keys():
    q, k, v = helpers.random_qkv(12, Hq=2, Lq=LQ, Lk=LK)
    out, w = dotattn.attention(J(q), J(k), J(v), causal=True, return_weights=True, implementation="jax")
    ref_w = helpers.reference_weights(q, k, v, causal=True)
    helpers.assert_close_to_reference(np.asarray(w), ref_w, helpers.naive_weights(q, k, v, causal=True), name="weights")
    out, lse = dotattn.attention(J(q), J(k[:, :, :0]), J(v[:, :, :0]), return_lse=True, implementation="jax")
    assert (np.asarray(out) == 0).all() and np.isneginf(np.asarray(lse)).all()


def test_dispatch_concrete_cpu_uses_the_host_kernels_traced_uses_native(monkeypatch):
    q, k, v = (J(x) for x in helpers.random_qkv(13, Hq=2, Lq=9, Lk=9))
    used = []
    native = dj._native_attention
    monkeypatch.setattr(dj, "_native_attention", lambda *a, **kw: used.append("native") or native(*a, **kw))
    dotattn.attention(q, k, v)
    assert used == []
    jax.jit(lambda q: dotattn.attention(q, k, v))(q)
    assert used == ["native"]
    dotattn.attention(q, k, v, implementation="jax")
    assert used == ["native"] * 2


def test_errors_name_the_argument():
    q = J(helpers.random_qkv(14, Hq=2, Lq=9)[0])
    for name, value in (("scale", 0.5), ("softcap", 2.0), ("dropout_p", 0.1)):
        with pytest.raises(TypeError, match=f"{name} is a traced JAX value.*static Python"):
            jax.jit(lambda q, x, name=name: dotattn.attention(q, q, q, **{name: x}))(q, value)
    with pytest.raises(TypeError, match="window is a traced JAX value"):
        jax.jit(lambda q, n: dotattn.attention(q, q, q, window=(n, None)))(q, 3)
    with pytest.raises(ValueError, match=r"mask of shape \(4, 4\) does not broadcast"):
        jax.jit(lambda q, m: dotattn.attention(q, q, q, mask=m))(q, jnp.ones((4, 4), bool))
    with pytest.raises(TypeError, match="mask must be a bool array"):
        jax.jit(lambda q, m: dotattn.attention(q, q, q, mask=m))(q, jnp.ones((9, 9)))
    with pytest.raises(TypeError, match="kv_lengths must hold integers"):
        jax.jit(lambda q, n: dotattn.attention(q, q, q, kv_lengths=n))(q, jnp.ones((2,)))
    with pytest.raises(ValueError, match=r"kv_lengths must have shape \(2\), got \(3\)"):
        jax.jit(lambda q, n: dotattn.attention(q, q, q, kv_lengths=n))(q, jnp.ones((3,), jnp.int32))
    with pytest.raises(ValueError, match=r"kv_lengths must lie in \[0, 9\]"):
        dotattn.attention(q, q, q, kv_lengths=jnp.asarray([3, 10]), implementation="jax")
    with pytest.raises(ValueError, match="softcap must be > 0 or None"):
        jax.jit(lambda q: dotattn.attention(q, q, q, softcap=0.0))(q)
    with pytest.raises(TypeError, match="unexpected keyword argument 'casual'"):
        jax.jit(lambda q: dotattn.attention(q, q, q, casual=True))(q)


def test_softcap_at_large_scores_keeps_the_top_keys_weight():
    """With a softcap the scores are ``cap · tanh(…)``; XLA's CPU code contracted that product
    into an FMA in ``exp(s − max)`` (and the backward's ``exp(s − lse)``) but not in the max, an
    ulp of the score apart: NaN rows with LSE −inf at scores of 9e11, dV 0.26 off at 3e7 (review
    of 7 Dec 2026).  Both cases' answers are one-hot: the top key's value, dV = dout there."""
    import jax
    import jax.numpy as jnp

    q = np.zeros((1, 1, 1, 4), np.float32)
    q[..., 0] = 1.0
    k = np.zeros((1, 1, 3, 4), np.float32)
    k[0, 0, :, 0] = [3e12, 1e12, -2e12]
    v = np.arange(12, dtype=np.float32).reshape(1, 1, 3, 4)
    opts = dict(softcap=1e13, scale=0.3)
    want_out, want_lse = dotattn.attention(q, k, v, implementation="reference", return_lse=True, **opts)
    call = lambda *a: dj.attention(*a, return_lse=True, **opts)  # noqa: E731
    for f in (call, jax.jit(call)):
        out, lse = f(*map(jnp.asarray, (q, k, v)))
        np.testing.assert_array_equal(np.asarray(out), want_out.astype(np.float32))
        np.testing.assert_allclose(np.asarray(lse), want_lse, rtol=1e-6)
    rng = np.random.default_rng(0)
    q, k = (rng.standard_normal(s).astype(np.float32) * np.float32(1e4) for s in ((1, 1, 4, 4), (1, 1, 3, 4)))
    v = rng.standard_normal((1, 1, 3, 4)).astype(np.float32)
    dout = np.ones((1, 1, 4, 4), np.float32)
    opts = dict(softcap=1e7, scale=0.3)
    loss = lambda q, k, v: (dj.attention(q, k, v, **opts) * dout).sum()  # noqa: E731
    _, _, dv = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*map(jnp.asarray, (q, k, v)))
    _, _, want_dv = H.reference_grads(q, k, v, dout, **opts)
    np.testing.assert_allclose(np.asarray(dv), want_dv, atol=1e-5)
