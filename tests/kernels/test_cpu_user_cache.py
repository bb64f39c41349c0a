"""Disk-cached kernel copies for self-contained user ``score_mod``/``mask_mod`` functions.

A module-level ``def`` whose globals are only ``math``/``numpy``/numeric constants gets its
kernel copy as a generated file (``cpu.user_kernel_dir()``) that Numba caches, so a second
process loads it instead of compiling; anything else (closures, captured arrays) keeps the
in-memory copy.  The two-process test compiles once (≈ 20 s on 2 cores) — the only compile
of this file besides the closure test's.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from numba import njit

import dotattn
from dotattn import semantics
from dotattn.kernels import _cpu_kernels, cpu, reference

WIDTH = 5
SCALE_UP = 1.5
LIMIT = 4.0
an_array = np.arange(3)


def distance_penalty(score, b, h, q_idx, kv_idx):
    return score - 0.1 * abs(q_idx - kv_idx) * SCALE_UP + math.log(1.0) + np.float32(0.0)


def near(b, h, q_idx, kv_idx):
    return abs(q_idx - kv_idx) <= WIDTH


def uses_array(b, h, q_idx, kv_idx):
    return q_idx > an_array[0]


def with_default(score, b, h, q_idx, kv_idx, k=2.0):
    return score * k


def clashes_with_kernel_global(score, b, h, q_idx, kv_idx):
    return score * LOG2E


@njit
def jitted(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


@njit(fastmath=True)
def jitted_fast(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


LOG2E = 3.0  # a kernel-module name bound to another value: the generated file would shadow it


def _portable(fn):
    return cpu._portable_source(fn, "_renamed", vars(_cpu_kernels))


def test_portable_source_writes_constants_and_module_imports():
    header, source, name = _portable(distance_penalty)
    assert name == "_renamed"
    assert header == ["SCALE_UP = float('1.5')", "import math", "import numpy as np"]
    assert source.startswith("def _renamed(score, b, h, q_idx, kv_idx):")
    assert _portable(near)[0] == ["WIDTH = 5"]
    assert _portable(jitted) == ([], "def _renamed(b, h, q_idx, kv_idx):\n    return q_idx >= kv_idx", "_renamed")


def test_portable_source_takes_lambdas_and_closures_over_constants():
    width = 3
    scale = 0.5
    assert _portable(lambda b, h, i, j: i >= j) == ([], "_renamed = lambda b, h, i, j: i >= j", "_renamed")
    assert _portable(lambda b, h, i, j: abs(i - j) <= width) == (
        ["width = 3"],
        "_renamed = lambda b, h, i, j: abs(i - j) <= width",
        "_renamed",
    )
    first, second = lambda b, h, i, j: i > j, lambda b, h, i, j: i < j  # two on one line
    assert _portable(second)[1] == "_renamed = lambda b, h, i, j: i < j"

    def closure(score, b, h, q_idx, kv_idx):
        return score * scale - abs(q_idx - kv_idx) * WIDTH

    header, source, _ = _portable(closure)
    assert header == ["WIDTH = 5", "scale = float('0.5')"]
    assert source.startswith("def _renamed(score, b, h, q_idx, kv_idx):")


def test_portable_source_refuses_what_a_file_cannot_recreate():
    captured = np.arange(3)
    assert _portable(lambda b, h, i, j: i > captured[0]) is None
    assert _portable(uses_array) is None
    assert _portable(with_default) is None
    assert _portable(clashes_with_kernel_global) is None
    assert _portable(len) is None
    assert _portable(jitted_fast) is None  # its fastmath would be lost


def test_user_kernel_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DOTATTN_CACHE_DIR", str(tmp_path / "a"))
    assert cpu.user_kernel_dir() == tmp_path / "a" / "user_kernels"
    monkeypatch.delenv("DOTATTN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cpu.user_kernel_dir() == tmp_path / "x" / "dotattn" / "user_kernels"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cpu.user_kernel_dir() == tmp_path / "home" / ".cache" / "dotattn" / "user_kernels"


def test_unwritable_cache_dir_falls_back_to_memory(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("DOTATTN_CACHE_DIR", str(blocker))
    assert cpu._cached_user_kernels(near, None) is None


def test_same_text_gives_one_file_with_a_fixed_stamp(monkeypatch, tmp_path):
    """Generated files are named by their content; a rewrite leaves Numba's (mtime, size) stamp alone."""
    monkeypatch.setenv("DOTATTN_CACHE_DIR", str(tmp_path))
    module = cpu._cached_user_kernels(None, near)
    path = module.__file__
    assert os.path.dirname(path) == str(tmp_path / "user_kernels")
    assert module.HAS_MASK_MOD and not module.HAS_SCORE_MOD and module._JIT_CACHE
    assert os.stat(path).st_mtime == cpu._GENERATED_MTIME
    os.unlink(path)
    assert cpu._cached_user_kernels(None, near).__file__ == path
    assert os.stat(path).st_mtime == cpu._GENERATED_MTIME
    assert cpu._cached_user_kernels(distance_penalty, near).__file__ != path


@pytest.mark.heavy
def test_mod_capturing_an_array_runs_in_memory():
    width = np.array([5])
    mask_mod = lambda b, h, i, j: abs(i - j) <= width[0]
    module = cpu.kernels_for(None, mask_mod)
    assert module._JIT_CACHE is False and module.__file__ == _cpu_kernels.__file__
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((1, 2, 12, 8)).astype(np.float32) for _ in range(3))
    out = dotattn.attention(q, k, v, mask_mod=mask_mod, implementation="cpu")
    i = np.arange(12)
    expected, _ = reference.forward(semantics.normalize(q, k, v, mask=np.abs(i[:, None] - i[None, :]) <= width))
    np.testing.assert_allclose(out, expected.astype(np.float32), rtol=1e-5, atol=1e-5)


# A closure over a constant, as a lambda: its generated file binds ``shift`` as a constant.
USER_MODULE = """
import math


def make_tilt(shift):
    return lambda score, b, h, q_idx, kv_idx: score + shift * math.cos(q_idx - kv_idx)


tilt = make_tilt(0.25)
"""

CHILD = """
import json, sys
import numpy as np
import dotattn
from dotattn.kernels import cpu
import user_tilt

rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((1, 2, 16, 8)).astype(np.float32) for _ in range(3))
out = dotattn.attention(q, k, v, score_mod=user_tilt.tilt, implementation="cpu")
module = cpu.kernels_for(user_tilt.tilt, None)
json.dump({"file": module.__file__, "cache_hits": sum(module._forward_chunk.stats.cache_hits.values()),
           "team_entry_compiled": bool(module.forward.overloads),
           "out": out.tolist()}, sys.stdout)
"""


@pytest.mark.heavy
def test_second_process_loads_the_cached_kernel(tmp_path):
    (tmp_path / "user_tilt.py").write_text(USER_MODULE)
    env = {key: value for key, value in os.environ.items() if key != "NUMBA_CACHE_DIR"}
    env.update(DOTATTN_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=os.pathsep.join([str(tmp_path)] + sys.path))

    def run():
        result = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(CHILD)], check=False, env=env, cwd=tmp_path, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    first = run()
    generated = tmp_path / "cache" / "user_kernels"
    assert os.path.dirname(first["file"]) == str(generated)
    stem = os.path.basename(first["file"])[: -len(".py")]
    indexes = sorted(p.name for p in generated.rglob(f"{stem}.*.nbi"))
    # the user's kernels run the one-thread entry on the pool (cpu._run_tasks): no prange entry
    assert any("._forward_chunk-" in name for name in indexes) and not any(".forward-" in name for name in indexes), indexes
    assert not first["team_entry_compiled"]
    assert first["cache_hits"] == 0

    second = run()
    assert second["file"] == first["file"]
    assert second["cache_hits"] >= 1
    assert second["out"] == first["out"]
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, 16, 8)).astype(np.float32) for _ in range(3))
    i = np.arange(16)
    bias = 0.25 * np.cos(i[:, None] - i[None, :])  # score_mod sees the scaled score, like a bias
    expected, _ = reference.forward(semantics.normalize(q, k, v, bias=bias))
    np.testing.assert_allclose(np.array(second["out"]), expected, rtol=1e-5, atol=1e-5)
