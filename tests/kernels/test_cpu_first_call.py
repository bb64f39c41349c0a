"""The first call of a fresh process with empty Numba and dotattn caches loads precompiled kernels.

``dotattn precompile`` (run by ``make install``) puts the default kernels' machine code in
the package (``kernels/_precompiled``); a process whose ``NUMBA_CACHE_DIR`` and
``DOTATTN_CACHE_DIR`` are empty must load them from there — no compile — and give the same
bits as this process.  The time it takes is the benchmark's business
(``benchmarks/cpu_first_call.py``), not this test's.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np

import dotattn
from dotattn.kernels import _cpu_cache, cpu

# Lq·Lk above the small-call rule (65,536), so the general kernels — the precompiled ones — run.
CALLS = {"plain": {}, "causal": {"causal": True}, "window": {"window": (8, 8)}}

CHILD = """
import hashlib, json
import numpy as np
import dotattn
from dotattn.kernels import _cpu_cache, _cpu_kernels

q = np.random.default_rng(0).standard_normal((1, 2, 300, 16), dtype=np.float32)
digests = {}
for name, options in CALLS.items():
    out, lse = dotattn.attention(q, q, q, implementation="cpu", return_lse=True, **options)
    grads = dotattn.attention_backward(q, q, q, out, lse, out, implementation="cpu", **options)
    digests[name] = hashlib.sha256(b"".join(a.tobytes() for a in (out, lse) + grads)).hexdigest()
stats = {k: (sum(getattr(_cpu_kernels, k).stats.cache_hits.values()),
             sum(getattr(_cpu_kernels, k).stats.cache_misses.values())) for k in ("forward", "backward")}
print(json.dumps({"digests": digests, "stats": stats,
                  "precompiled": _cpu_cache.uses_precompiled(_cpu_kernels.forward)}))
"""


def _digests() -> dict[str, str]:
    q = np.random.default_rng(0).standard_normal((1, 2, 300, 16), dtype=np.float32)
    digests = {}
    for name, options in CALLS.items():
        out, lse = dotattn.attention(q, q, q, implementation="cpu", return_lse=True, **options)
        grads = dotattn.attention_backward(q, q, q, out, lse, out, implementation="cpu", **options)
        digests[name] = hashlib.sha256(b"".join(a.tobytes() for a in (out, lse) + grads)).hexdigest()
    return digests


def test_fresh_process_with_empty_caches_loads_the_precompiled_kernels(tmp_path):
    cpu.precompile(("float32",))  # what `make install` did (a load when it already has)
    ours = _digests()
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba"), DOTATTN_CACHE_DIR=str(tmp_path / "dotattn"))
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    done = subprocess.run(
        [sys.executable, "-c", f"CALLS = {CALLS!r}\n" + CHILD], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    child = json.loads(done.stdout.strip().splitlines()[-1])
    assert child["precompiled"], "the kernels' cache is not the package's precompiled directory"
    for kernel, (hits, misses) in child["stats"].items():
        assert (hits, misses) == (1, 0), f"{kernel}: {hits} cache hits, {misses} misses (a miss compiles)"
    assert child["digests"] == ours  # the same bits as a process that compiled or loaded them earlier
    assert "compiling" not in done.stderr


def test_a_first_launch_that_compiles_says_so(monkeypatch, capsys):
    """A kernel without machine code past the notice delay prints a line, then one when ready."""
    import time
    import types

    monkeypatch.setattr(cpu, "COMPILE_NOTICE_AFTER_S", 0.05)
    fake = types.ModuleType("dotattn.kernels._cpu_user_fake")
    fake.__file__ = "/elsewhere/_cpu_user_fake.py"
    fake.forward = types.SimpleNamespace(overloads={}, stats=types.SimpleNamespace(cache_misses={}))
    with cpu._kernel_launch(fake, "forward", np.dtype(np.float32)):
        fake.forward.stats.cache_misses["sig"] = 1  # not in any cache: Numba compiles
        time.sleep(0.3)
    err = capsys.readouterr().err
    assert "compiling the cpu forward kernel for your score_mod/mask_mod, float32" in err
    assert "ready after" in err
    with cpu._kernel_launch(fake, "forward", np.dtype(np.float32)):  # launched before: silent
        time.sleep(0.2)
    assert capsys.readouterr().err == ""


def test_a_slow_load_or_a_long_call_says_nothing(monkeypatch, capsys):
    import time
    import types

    monkeypatch.setattr(cpu, "COMPILE_NOTICE_AFTER_S", 0.05)
    fake = types.ModuleType("dotattn.kernels._cpu_user_other")
    fake.__file__ = "/elsewhere/_cpu_user_other.py"
    fake.forward = types.SimpleNamespace(overloads={}, stats=types.SimpleNamespace(cache_misses={}))
    with cpu._kernel_launch(fake, "forward", np.dtype(np.float32)):
        time.sleep(0.3)  # loading from disk (no miss counted) takes long on a loaded machine
        fake.forward.overloads["sig"] = object()  # loaded; the call itself is long
        time.sleep(0.3)
    assert capsys.readouterr().err == ""


def test_precompile_command(capsys):
    from dotattn import cli

    assert cli.main(["precompile", "--dtypes", "float8"]) == 2
    assert "unknown ['float8']" in capsys.readouterr().err
    assert cli.main(["precompile", "--dtypes", "float32"]) == 0  # loads what the test above made
    out = capsys.readouterr().out
    assert str(_cpu_cache.PRECOMPILED_DIR) in out and "forward float32" in out and "done in" in out
