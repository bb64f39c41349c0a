"""The cpu decode kernel on the spinning partner threads (``_launch.Partners``): a parallel call's
items on the caller and the partners give the bits of the executor and of one thread, whatever
path the hand-over takes (partner spinning, parked, the caller's spin running out, a second
caller at once, a partner's error)."""

from __future__ import annotations

import time

import numpy as np
import pytest

import decode_cases as C
import helpers as H
import dotattn
from dotattn import decoding
from dotattn.kernels import _cpu_sync as S
from dotattn.kernels import _launch

BACKENDS = C.decode_backends()
pytestmark = pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu decode kernel is not under test")


@pytest.fixture
def parallel(monkeypatch):
    """Every call of the cpu kernel in parallel (no size floor, the pool always chosen), on a
    fresh set of partners made with the settings the test gives (``_launch``'s: ``_launch.
    PARTNER_SPIN_S`` etc.); yields ``cpu_decode``."""
    import types

    import numba

    from dotattn.kernels import _launch, cpu_decode

    if cpu_decode._workers() < 2 or numba.get_num_threads() < 2:
        # one core: the calls would stay on their thread; two threads on it are tested all the same
        monkeypatch.setattr(cpu_decode, "_WORKERS", [2])
        monkeypatch.setattr(cpu_decode, "numba", types.SimpleNamespace(get_num_threads=lambda: 2))
    monkeypatch.setattr(cpu_decode, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(cpu_decode.ParallelChoice, "choose", lambda self: True)
    monkeypatch.setattr(_launch, "_partners", None)
    yield cpu_decode


def _case(seed, dtype=np.float32, page_size=8):
    # unused slots and pages hold NaN (make_case); several chunks per sequence: many items
    return C.make_case(seed, B=3, max_len=3 * decoding.SPLIT_SIZE, page_size=page_size, Lq=1, Lnew=1,
                       Hq=8, Hkv=2, D=64, dtype=dtype)


def _run(case, **kw):
    return dotattn.attention_with_kvcache(case.q, case.k_cache.copy(), case.v_cache.copy(), case.k_new, case.v_new,
                                          return_lse=True, implementation="cpu", **case.kwargs(**kw))


def _modes(cpu_decode, case, monkeypatch):
    """(partners, executor, one thread) results of the same call."""
    on_partners = _run(case)
    assert _launch._partners is not None and _launch._partners.gen >= 1, "the partners did not run it"
    monkeypatch.setattr(cpu_decode, "USE_PARTNERS", False)
    executor = _run(case)
    monkeypatch.setattr(cpu_decode, "PARALLEL_MIN_BYTES", 1 << 62)
    alone = _run(case)
    return on_partners, executor, alone


@pytest.mark.parametrize("dtype", [np.float32, C.BFLOAT16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("page_size", [None, 8], ids=["contiguous", "paged8"])
def test_partners_give_the_bits_of_the_executor_and_of_one_thread(parallel, monkeypatch, dtype, page_size):
    case = _case(21, dtype, page_size)
    on_partners, executor, alone = _modes(parallel, case, monkeypatch)
    for other, name in ((executor, "executor"), (alone, "one thread")):
        H.assert_bitwise_equal(on_partners[0], other[0], name=f"out vs {name}")
        H.assert_bitwise_equal(on_partners[1], other[1], name=f"lse vs {name}")
    out64, _, naive = C.expected(case)
    H.assert_close_to_reference(on_partners[0], out64, naive)


def test_parked_partners_and_a_caller_whose_spin_runs_out(parallel, monkeypatch):
    """Partners that park at once (no spin) and a caller that waits in Python at once: every
    call still gets every item (the calls' bits equal one thread's), call after call."""
    monkeypatch.setattr(_launch, "PARTNER_SPIN_S", 0.0)
    monkeypatch.setattr(_launch, "CALLER_SPIN_S", 0.0)
    case = _case(22)
    monkeypatch.setattr(parallel, "PARALLEL_MIN_BYTES", 1 << 62)
    alone = _run(case)
    monkeypatch.setattr(parallel, "PARALLEL_MIN_BYTES", 0)
    for i in range(6):
        got = _run(case)
        H.assert_bitwise_equal(got[0], alone[0], name=f"out, call {i}")
        H.assert_bitwise_equal(got[1], alone[1], name=f"lse, call {i}")
        if i % 2:
            time.sleep(0.002)  # the partners park between calls
    assert _launch._partners.gen == 6


def test_two_callers_at_once_share_the_partners_or_take_the_executor(parallel):
    """Threads calling at once: one holds the partners, the others run on the executor; every
    result has the bits of the same call made alone."""
    cases = [_case(30 + i) for i in range(3)]
    expected = [_run(c) for c in cases]
    results = H.run_concurrently([lambda c=c: _run(c) for c in cases], 8)
    for i in range(3):
        for got in results[i]:
            H.assert_bitwise_equal(got[0], expected[i][0], name=f"out of caller {i}")
            H.assert_bitwise_equal(got[1], expected[i][1], name=f"lse of caller {i}")


def test_a_partners_error_reaches_the_caller_and_the_next_call_runs(parallel, monkeypatch):
    case = _case(40)
    good = _run(case)
    K = parallel.K

    monkeypatch.setattr(parallel, "K", H.FailingPartnerKernels(K, "run_items_caller", "run_items_partner"))
    monkeypatch.setattr(_launch._partners, "caller_spin", 0)
    with pytest.raises(RuntimeError, match="partner failed"):
        _run(case)
    monkeypatch.setattr(parallel, "K", K)
    again = _run(case)
    H.assert_bitwise_equal(again[0], good[0], name="out after the error")
    H.assert_bitwise_equal(again[1], good[1], name="lse after the error")


@pytest.mark.parametrize("page_size", [None, 8], ids=["contiguous", "paged8"])
def test_sequences_without_keys_are_merged_too(parallel, monkeypatch, page_size):
    """The items' threads merge each (sequence, K/V head) as its last item ends; the thread with
    ticket 0 writes those with no item at all (empty sequences): out 0, lse −inf, in every mode."""
    case = C.make_case(50, B=4, lengths=[0, 2 * decoding.SPLIT_SIZE + 7, 0, 5], max_len=3 * decoding.SPLIT_SIZE,
                       page_size=page_size, Lnew=None, Hq=8, Hkv=2, D=64)
    results = _modes(parallel, case, monkeypatch)
    for got in results:
        assert (got[0][[0, 2]] == 0).all() and np.isneginf(got[1][[0, 2]]).all()
        H.assert_bitwise_equal(got[0], results[2][0], name="out")
        H.assert_bitwise_equal(got[1], results[2][1], name="lse")
    out64, _, naive = C.expected(case)
    H.assert_close_to_reference(results[0][0], out64, naive)
    # every sequence empty: no item, no ticket below the total — the ticket-0 thread still writes them
    empty = C.make_case(51, B=2, lengths=[0, 0], max_len=64, page_size=page_size, Lnew=None, Hq=8, Hkv=2, D=64)
    out, lse = _run(empty)
    assert (out == 0).all() and np.isneginf(lse).all()


def test_wake_partners_says_whether_a_partner_was_parked(parallel, monkeypatch):
    """``_launch.wake_partners`` is True when it woke a parked partner (decode then does not let
    the pool-or-alone choice keep a retry's time: it timed the wake-up), False when none was."""
    monkeypatch.setattr(_launch, "PARTNER_SPIN_S", 0.0)
    _run(_case(61))  # makes the partners; they park at once after it
    p = _launch._partners
    deadline = time.monotonic() + 10
    while not all(p.parked) and time.monotonic() < deadline:
        time.sleep(0.001)
    assert all(p.parked), "the partners did not park"
    assert _launch.wake_partners(p.n) is True
    assert _launch.wake_partners(p.n) is False  # woken already


def test_a_partner_that_never_wakes_is_not_waited_for(parallel, monkeypatch):
    """A partner that has not claimed a call when the caller's items are done (asleep: here it
    is never woken) gets its part cancelled: the caller ran every item, the bits are one
    thread's, and the call does not wait for it; woken again, it takes part in the next calls."""
    monkeypatch.setattr(_launch, "PARTNER_SPIN_S", 0.0)
    case = _case(60)
    monkeypatch.setattr(parallel, "PARALLEL_MIN_BYTES", 1 << 62)
    alone = _run(case)
    monkeypatch.setattr(parallel, "PARALLEL_MIN_BYTES", 0)
    _run(case)  # makes the partners; they park at once after it
    p = H.park_partners_for_good(_launch, monkeypatch)
    for i in range(3):
        got = _run(case)
        H.assert_bitwise_equal(got[0], alone[0], name=f"out, call {i}")
        H.assert_bitwise_equal(got[1], alone[1], name=f"lse, call {i}")
        assert p.flags[S.FLAG_STRIDE + S.CLAIM] == 2 * p.gen + 1, "the sleeping partner's part was not cancelled"
    monkeypatch.undo()
    monkeypatch.setattr(parallel, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(parallel.ParallelChoice, "choose", lambda self: True)
    for _ in range(3):
        got = _run(case)
        H.assert_bitwise_equal(got[0], alone[0], name="out after waking")


def test_the_choice_does_not_time_a_modes_first_call_nor_a_call_after_a_pause(monkeypatch):
    """ParallelChoice keeps no time of each mode's first call in a class (it may load a kernel)
    nor of a call that came more than IDLE_S after the previous one (a core and a thread wake)."""
    from dotattn.kernels.cpu_decode import ParallelChoice

    choice = ParallelChoice()
    assert choice.choose() is True
    choice.record(True, 5.0)  # the pool's first: not kept
    assert choice.choose() is True
    choice.record(True, 2e-9)
    assert choice.choose() is False
    choice.record(False, 5.0)  # alone's first: not kept
    assert choice.times == ([], [2e-9])
    assert choice.choose() is False
    choice.record(False, 1e-9)
    assert choice.times == ([1e-9], [2e-9])
    choice.last -= 10 * ParallelChoice.IDLE_S  # a pause since the last call
    mode = choice.choose()
    choice.record(mode, 7.0)
    assert choice.times == ([1e-9], [2e-9]), "a call after a pause was timed"
    mode = choice.choose()
    choice.record(mode, 3e-9)
    assert choice.times[int(mode)][-1] == 3e-9


def test_decode_and_small_calls_share_one_set_of_partners(parallel, monkeypatch):
    """A decode call and a small-call forward (``cpu_small``) in turn run on the same partner
    threads, each with the bits of its call made alone."""
    from dotattn import semantics
    from dotattn.kernels import cpu_small

    monkeypatch.setattr(cpu_small, "cores", lambda: parallel._workers())
    case = _case(70)
    q, k, v = H.random_qkv(71, batch=(2,), Hq=6, Hkv=2, Lq=70, D=32)
    call = semantics.normalize(q, k, v, causal=True)
    alone = cpu_small.forward(call, threads=1)
    first = _run(case)
    p = _launch._partners
    assert p is not None and p.gen == 1
    for i in range(3):
        got = cpu_small.forward(call, threads=parallel._workers())
        H.assert_bitwise_equal(got[0], alone[0], name=f"small out, call {i}")
        H.assert_bitwise_equal(got[1], alone[1], name=f"small lse, call {i}")
        again = _run(case)
        H.assert_bitwise_equal(again[0], first[0], name=f"decode out, call {i}")
    assert _launch._partners is p and p.gen == 7


def test_an_executor_call_stopped_in_the_callers_items_ends_after_the_pool_threads_items(parallel, monkeypatch):
    """The executor's path (another call holds the partners, or ``USE_PARTNERS`` off): a Ctrl-C
    in the caller's items, or in its wait for the pool thread, let the call raise with the pool
    thread still running items — writing the part outputs in this thread's kept buffers
    (``_scratch``), which its next call reuses — and its error was dropped or came later.  As
    ``_launch.run_chunks``: the call raises once the pool thread's items are written."""
    import threading

    case = _case(45)
    good = _run(case)
    K = parallel.K
    real = K.run_items
    started, events = threading.Event(), []

    def spy(counter, total, role, *common):
        if threading.current_thread() is threading.main_thread():
            assert started.wait(5.0), "the pool thread never started its items"
            raise KeyboardInterrupt
        started.set()
        time.sleep(0.3)
        real(counter, total, role, *common)
        events.append("pool items written")

    monkeypatch.setattr(parallel, "USE_PARTNERS", False)
    monkeypatch.setattr(K, "run_items", spy)
    with pytest.raises(KeyboardInterrupt):
        _run(case)
    assert events == ["pool items written"], "the stopped call returned before its pool thread's items were written"
    monkeypatch.setattr(K, "run_items", real)
    again = _run(case)
    H.assert_bitwise_equal(again[0], good[0], name="out after the stopped call")
    H.assert_bitwise_equal(again[1], good[1], name="lse after the stopped call")
