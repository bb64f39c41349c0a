"""The small-call kernel on the spinning partner threads (``_launch.Partners``, shared with the
decode kernel): a parallel call's items on the caller and the partners give the bits of the
pool and of one thread, whatever path the hand-over takes (partner spinning, parked, never
woken, the caller's spin running out, a second caller at once, a partner's error)."""

from __future__ import annotations

import time

import pytest

import helpers as H
from dotattn import semantics
from dotattn.kernels import _cpu_sync as S
from dotattn.kernels import _launch, cpu_small


@pytest.fixture
def partners(monkeypatch):
    """Parallel small calls (two chunks) on the partners, whatever the machine's core count, on
    a fresh set of partners made with the settings the test gives."""
    monkeypatch.setattr(cpu_small, "cores", lambda: 2)
    monkeypatch.setattr(_launch, "_partners", None)
    yield _launch


def _call(seed, Lq=70):
    q, k, v = H.random_qkv(seed, batch=(2,), Hq=6, Hkv=2, Lq=Lq, D=32)
    return semantics.normalize(q, k, v, causal=True)


def _qkv(seed, Lq=70):
    return H.random_qkv(seed, batch=(2,), Hq=6, Hkv=2, Lq=Lq, D=32)


def _same(got, expected, what):
    for a, b, name in zip(got, expected, ("out", "lse"), strict=True):
        H.assert_bitwise_equal(a, b, name=f"{name}, {what}")


def test_partners_give_the_bits_of_the_pool_and_of_one_thread(partners, monkeypatch):
    call = _call(1)
    alone = cpu_small.forward(call, threads=1)
    for i in range(5):
        _same(cpu_small.forward(call, threads=2), alone, f"partners, call {i}")
    assert partners._partners is not None and partners._partners.gen == 5, "the calls did not run on the partners"
    monkeypatch.setattr(cpu_small, "USE_PARTNERS", False)
    _same(cpu_small.forward(call, threads=2), alone, "pool")
    assert partners._partners.gen == 5, "USE_PARTNERS=False still took the partners"
    ref_out, _ = H.reference(*_qkv(1), causal=True)
    naive_out, _ = H.naive(*_qkv(1), causal=True)
    H.assert_close_to_reference(alone[0], ref_out, naive_out)


def test_other_chunk_counts_take_the_pool(partners):
    """Partners run one chunk per core; a call forced to another count runs on the pool."""
    call = _call(2)
    alone = cpu_small.forward(call, threads=1)
    _same(cpu_small.forward(call, threads=3), alone, "three chunks")
    assert partners._partners is None


def test_parked_partners_and_a_caller_whose_spin_runs_out(partners, monkeypatch):
    """Partners that park at once and a caller that waits in Python at once: every call still
    gets every item, call after call."""
    monkeypatch.setattr(partners, "PARTNER_SPIN_S", 0.0)
    monkeypatch.setattr(partners, "CALLER_SPIN_S", 0.0)
    call = _call(3)
    alone = cpu_small.forward(call, threads=1)
    for i in range(6):
        _same(cpu_small.forward(call, threads=2), alone, f"call {i}")
        if i % 2:
            time.sleep(0.002)  # the partner parks between calls
    assert partners._partners.gen == 6


def test_a_partner_that_never_wakes_is_not_waited_for(partners, monkeypatch):
    """A parked partner that is never woken gets its part cancelled: the caller takes every
    item from the queue and does not wait."""
    monkeypatch.setattr(partners, "PARTNER_SPIN_S", 0.0)
    call = _call(4)
    alone = cpu_small.forward(call, threads=1)
    cpu_small.forward(call, threads=2)  # makes the partner; it parks at once after it
    p = H.park_partners_for_good(_launch, monkeypatch)
    for i in range(3):
        _same(cpu_small.forward(call, threads=2), alone, f"call {i}")
        assert p.flags[S.FLAG_STRIDE + S.CLAIM] == 2 * p.gen + 1, "the sleeping partner's part was not cancelled"


def test_two_callers_at_once_share_the_partners_or_take_the_pool(partners):
    calls = [_call(10 + i) for i in range(3)]
    expected = [cpu_small.forward(c, threads=1) for c in calls]
    results = H.run_concurrently([lambda c=c: cpu_small.forward(c, threads=2) for c in calls], 10)
    for i in range(3):
        for got in results[i]:
            _same(got, expected[i], f"caller {i}")


def test_a_partners_error_reaches_the_caller_and_the_next_call_runs(partners, monkeypatch):
    call = _call(5)
    good = cpu_small.forward(call, threads=2)
    K = cpu_small._kernel_module()

    monkeypatch.setattr(cpu_small, "_kernels", H.FailingPartnerKernels(K, "forward_caller", "forward_partner"))
    monkeypatch.setattr(partners._partners, "caller_spin", 0)
    with pytest.raises(RuntimeError, match="partner failed"):
        cpu_small.forward(call, threads=2)
    monkeypatch.setattr(cpu_small, "_kernels", K)
    _same(cpu_small.forward(call, threads=2), good, "after the error")


def test_calls_inside_on_numba_team_run_on_the_team(partners, monkeypatch):
    """Inside ``_launch.on_numba_team()`` (SmolLM's short prompt passes, whose products run on
    Numba's team) a parallel call's chunks run on that team: neither the partners nor the pool,
    and the bits of one thread."""
    call = _call(8)
    alone = cpu_small.forward(call, threads=1)

    def refuse(*args, **kwargs):
        raise AssertionError("the partners or the pool ran a chunk inside on_numba_team()")

    monkeypatch.setattr(cpu_small, "on_partners", refuse)
    monkeypatch.setattr(cpu_small, "run_chunks", refuse)
    with partners.on_numba_team():
        assert partners.in_numba_team()
        for i in range(3):
            _same(cpu_small.forward(call, threads=2), alone, f"team, call {i}")
        _same(cpu_small.forward(call, threads=3), alone, "team, three chunks")
    assert not partners.in_numba_team()
    assert partners._partners is None
