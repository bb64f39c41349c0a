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
