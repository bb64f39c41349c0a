"""Pinned kernel workers (``kernels/_affinity.py``, opt-in ``DOTATTN_PIN_WORKERS``): off by
default, each worker on one allowed core when on, the caller left free, the same bits either
way, and undone by ``unpin``.  Each case runs in a fresh interpreter, so the suite's own
process never has pinned threads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[2] / "src")

pytestmark = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="pinning needs Linux affinity calls and at least two allowed cores",
)

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import numba, numpy as np
    import dotattn
    from dotattn.kernels import _affinity

    numba.set_num_threads(2)
    allowed = sorted(os.sched_getaffinity(0))  # before any pinning
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 4, 1024, 64)).astype(np.float32) for _ in range(3))
    out = dotattn.attention(q, k, v, implementation="cpu", causal=True)
    tids = _affinity.pinned_threads()
    team = _affinity.team_thread_ids(2)
    report = {
        "pinned": [sorted(os.sched_getaffinity(t)) for t in tids],
        "team": team,
        "caller": sorted(os.sched_getaffinity(0)),
        "allowed": allowed,
        "out": out.tobytes().hex(),
    }
    _affinity.unpin()
    report["after_unpin"] = [sorted(os.sched_getaffinity(t)) for t in tids]
    report["left"] = _affinity.pinned_threads()
    print(json.dumps(report))
    """
)


def _run(pin: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "DOTATTN_PIN_WORKERS"}
    if pin is not None:
        env["DOTATTN_PIN_WORKERS"] = pin
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_workers_are_left_free_by_default():
    report = _run(None)
    assert report["pinned"] == []
    assert report["left"] == []


def test_each_worker_is_pinned_to_one_allowed_core_and_unpin_undoes_it():
    free = _run("0")
    pinned = _run("1")
    assert free["pinned"] == []
    assert len(pinned["pinned"]) == 1  # a two-thread team: one worker besides the caller
    (cores,) = pinned["pinned"]
    assert len(cores) == 1 and cores[0] in pinned["allowed"]
    assert pinned["caller"] == pinned["allowed"]  # the caller is never pinned
    assert pinned["after_unpin"] == [pinned["allowed"]]
    assert pinned["left"] == []
    assert pinned["out"] == free["out"]  # the same bits: only where threads run changes
