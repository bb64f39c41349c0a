"""Resources over long runs (the audit of 6 Dec 2026): what a server or a long chat session
would accumulate call after call.  Each test checks a bound directly — a thread count, a
cache's size, a compile count — never RSS or time."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest


def _live_partner_threads() -> int:
    return sum(t.name.startswith("dotattn-partner-") for t in threading.enumerate())


def test_partner_sets_of_changing_sizes_leave_no_threads_behind(monkeypatch):
    """``_launch.get_partners(n)`` with n changing (decode calls under
    ``numba.set_num_threads(k)`` < cores take k − 1 partners, small calls cores − 1): each new
    set used to leave the old one's threads parked for good — n threads per change."""
    from dotattn.kernels import _launch

    monkeypatch.setattr(_launch, "_partners", None)
    before = _live_partner_threads()
    for i in range(20):
        _launch.get_partners(1 + i % 2)
    deadline = time.monotonic() + 10.0  # a spinning partner sees its retirement within ~1 ms
    while _live_partner_threads() - before > 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _live_partner_threads() - before <= 2, "replaced partner sets kept their threads"
    current = _launch._partners
    assert current is not None and current.n == 2 and not current.retired
    current.retire()  # (this test's own set: monkeypatch puts the process's back)


def test_a_retired_partner_set_ends_its_threads_and_is_not_handed_out_again(monkeypatch):
    from dotattn.kernels import _launch

    monkeypatch.setattr(_launch, "_partners", None)
    before = set(threading.enumerate())
    old = _launch.get_partners(1)
    mine = [t for t in threading.enumerate() if t not in before and t.name.startswith("dotattn-partner-")]
    assert len(mine) == 1
    new = _launch.get_partners(2)  # retires `old`
    assert old.retired and new is not old
    mine[0].join(10.0)
    assert not mine[0].is_alive(), "a retired partner thread kept running"
    monkeypatch.setattr(_launch, "_partners", old)  # as a caller that still held it would find it
    assert _launch.get_partners(1) is not old, "a retired set was handed out again"
    _launch._partners.retire()
    new.retire()


class _Compiles:
    """XLA backend compiles while in the block (jax.monitoring's compile event)."""

    def __enter__(self):
        from jax._src import monitoring
        from jax._src.dispatch import BACKEND_COMPILE_EVENT

        self.count = 0
        self._monitoring = monitoring

        def listener(event, duration, **kwargs):
            if event == BACKEND_COMPILE_EVENT:
                self.count += 1

        self._listener = listener
        monitoring.register_event_duration_secs_listener(listener)
        return self

    def __exit__(self, *exc):
        self._monitoring.unregister_event_duration_listener(self._listener)


def test_eager_jax_calls_on_concrete_cpu_arrays_compile_nothing_each_call():
    """The host-callback path for concrete CPU arrays: each eager call made a new
    ``jax.pure_callback`` function, which XLA compiled anew (≈ 20 ms) and whose program it kept
    (≈ 1.4 MB a call, without bound) — at one shape and one scale."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    import dotattn

    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, 2, 16, 32)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 2, 24, 32)), jnp.float32)
    for _ in range(2):
        dotattn.attention(q, k, k, scale=0.125).block_until_ready()
    with _Compiles() as compiles:
        for i in range(10):
            dotattn.attention(q, k, k, scale=0.125 + i / 64).block_until_ready()
    assert compiles.count == 0, f"{compiles.count} XLA compiles in 10 eager calls of one shape"

    # the same results as the callback (under jit: traced q, k, v), each output in its dtype
    opts = dict(causal=True, softcap=5.0, scale=0.3, implementation="cpu", return_lse=True, return_weights=True)
    eager = dotattn.attention(q, k, k, **opts)
    traced = jax.jit(lambda q, k: dotattn.attention(q, k, k, **opts))(q, k)
    for name, a, b in zip(("out", "lse", "weights"), eager, traced):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
    assert isinstance(dotattn.attention(q, k, k), jax.Array)


def test_native_jax_calls_with_a_new_scale_each_call_compile_once():
    """``implementation="jax"``: scale and softcap were keys of the compiled-function cache, so
    a new value each call compiled ≈ 0.5 s and the cache grew without bound."""
    pytest.importorskip("jax")
    import jax.numpy as jnp

    import dotattn
    from dotattn.kernels import jax_native

    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, 2, 16, 32)), jnp.float32)
    jax_native._attention_fn.cache_clear()
    dotattn.attention(q, q, q, scale=0.1, softcap=10.0, implementation="jax").block_until_ready()
    with _Compiles() as compiles:
        for i in range(5):
            out = dotattn.attention(q, q, q, scale=0.2 + i / 32, softcap=3.0 + i, implementation="jax")
    assert jax_native._attention_fn.cache_info().currsize == 1
    assert compiles.count == 0, f"{compiles.count} XLA compiles for 5 new scales"
    # the values reach the program: the last call against the host kernels
    want = dotattn.attention(np.asarray(q), np.asarray(q), np.asarray(q), scale=0.2 + 4 / 32, softcap=7.0)
    np.testing.assert_allclose(np.asarray(out), want, rtol=2e-5, atol=2e-6)
