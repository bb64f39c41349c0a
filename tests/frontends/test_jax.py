"""JAX front end: same results as the NumPy path, gradients vs jax.grad of a plain JAX softmax."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")  # jax is an optional extra; the suite installs it via `make test`
jnp = jax.numpy

import dotattn  # noqa: E402


def _inputs(shape_q=(2, 4, 9, 8), shape_kv=(2, 2, 11, 8), seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal(shape_q).astype(np.float32),
        rng.standard_normal(shape_kv).astype(np.float32),
        rng.standard_normal(shape_kv).astype(np.float32),
    )


def _plain_jax(q, k, v, causal_top_left=False):
    """Seed-style JAX attention (materialized), GQA by repeating heads — the comparison baseline."""
    group = q.shape[-3] // k.shape[-3]
    k = jnp.repeat(k, group, axis=-3)
    v = jnp.repeat(v, group, axis=-3)
    s = q @ jnp.swapaxes(k, -1, -2) / jnp.sqrt(q.shape[-1])
    if causal_top_left:
        s = jnp.where(jnp.tril(jnp.ones(s.shape[-2:], bool)), s, -jnp.inf)
    return jax.nn.softmax(s, axis=-1) @ v


def test_jax_in_jax_out_matches_numpy_path():
    q, k, v = _inputs()
    opts = dict(causal=True, kv_lengths=np.array([11, 4]), softcap=5.0)
    out = dotattn.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), **opts)
    assert isinstance(out, jax.Array)
    np.testing.assert_allclose(np.asarray(out), dotattn.attention(q, k, v, **opts), rtol=0, atol=1e-6)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_jax_gradients_match_plain_jax(jit):
    q, k, v = _inputs()
    args = tuple(jnp.asarray(x) for x in (q, k, v))

    def ours(q, k, v):
        return (dotattn.attention(q, k, v, causal="top_left") ** 2).sum()

    def plain(q, k, v):
        return (_plain_jax(q, k, v, causal_top_left=True) ** 2).sum()

    grad = jax.grad(ours, argnums=(0, 1, 2))
    got = (jax.jit(grad) if jit else grad)(*args)
    want = jax.grad(plain, argnums=(0, 1, 2))(*args)
    for name, g, w in zip("qkv", got, want):
        assert g.shape == w.shape, name
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=2e-5, err_msg=f"d{name}")


def test_jax_lse_and_weights():
    q, k, v = _inputs()
    out, lse, w = dotattn.attention(*(jnp.asarray(x) for x in (q, k, v)), return_lse=True, return_weights=True)
    ref_out, ref_lse, ref_w = dotattn.attention(q, k, v, return_lse=True, return_weights=True)
    assert lse.dtype == jnp.float32 and lse.shape == (2, 4, 9) and w.shape == (2, 4, 9, 11)
    np.testing.assert_allclose(np.asarray(lse), ref_lse, atol=1e-6)
    np.testing.assert_allclose(np.asarray(w), ref_w, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out), ref_out, atol=1e-6)


def test_jax_traced_array_option_is_refused_with_explanation():
    q, k, v = (jnp.asarray(x) for x in _inputs())

    @jax.jit
    def f(q, k, v, lengths):  # a host backend by name: the native path (the default) takes traced options
        return dotattn.attention(q, k, v, kv_lengths=lengths, implementation="numpy")

    with pytest.raises(TypeError, match="kv_lengths is a traced JAX value.*implementation='jax'"):
        f(q, k, v, jnp.array([3, 4]))


def test_jax_bad_input_fails_at_the_call():
    q, k, v = (jnp.asarray(x) for x in _inputs())
    with pytest.raises(ValueError, match="softcap"):
        dotattn.attention(q, k, v, softcap=0.0)


def test_mixed_numpy_and_jax_is_a_type_error():
    q, k, v = _inputs()
    with pytest.raises(TypeError, match="one library"):
        dotattn.attention(jnp.asarray(q), k, v)


def _sm_halve(score, b, h, q_idx, kv_idx):
    return score * 0.5


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_user_functions_reach_the_host_kernels_as_they_are(monkeypatch, jit):
    """score_mod/mask_mod/block_mask went through np.asarray on the host path: object arrays,
    refused ("score_mod must be a function … got array(<function …>, dtype=object)") with JAX
    arrays only.  The kernels' call is spied on here (compiling a user kernel takes a minute)."""
    from dotattn import dispatch

    seen = []
    real = dispatch.run_forward

    def spy(call, **kwargs):
        seen.append(dict(call.extras))
        plain = dotattn.semantics.normalize(call.q, call.k, call.v)  # (shapes for a stand-in result)
        return real(plain, implementation="numpy")

    monkeypatch.setattr(dispatch, "run_forward", spy)
    q, k, v = _inputs(shape_kv=(2, 4, 9, 8))
    fn = lambda a, b, c: dotattn.attention(a, b, c, score_mod=_sm_halve, implementation="cpu")  # noqa: E731
    out = (jax.jit(fn) if jit else fn)(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
    assert np.asarray(out).shape == (2, 4, 9, 8)
    assert seen and all(extras["score_mod"] is _sm_halve for extras in seen)


@pytest.mark.parametrize("implementation", ["numpy", "cpu"])
def test_vmap_over_the_host_path_maps_each_element(implementation):
    """jax.vmap of a host-path call raised JAX's NotImplementedError (no vmap_method on the
    callbacks); each mapped element now runs its own host call — forward and gradients."""
    q, k, v = (jnp.asarray(x) for x in _inputs(shape_kv=(2, 4, 9, 8)))
    fn = lambda a, b, c: dotattn.attention(a, b, c, causal=True, implementation=implementation)  # noqa: E731
    out = jax.vmap(fn)(q, k, v)
    want = dotattn.attention(np.asarray(q), np.asarray(k), np.asarray(v), causal=True, implementation="reference")
    np.testing.assert_allclose(np.asarray(out), want, rtol=0, atol=1e-6)
    grads = jax.vmap(jax.grad(lambda a, b, c: fn(a, b, c).sum()))(q, k, v)
    want_grads = jax.grad(lambda a: fn(a, k, v).sum())(q)
    np.testing.assert_allclose(np.asarray(grads), np.asarray(want_grads), rtol=0, atol=1e-6)
