"""The first call of a fresh process with empty Numba and dotattn caches loads precompiled kernels.

``dotattn precompile`` (run by ``make install``) puts the default kernels' machine code in
the package (``kernels/_precompiled``); a process whose ``NUMBA_CACHE_DIR`` and
``DOTATTN_CACHE_DIR`` are empty must load them from there — no compile — and give the same
bits as this process: general kernels (plain, causal, windowed forward and backward), the
small-call kernel and the split-KV decode kernels.  The time it takes is the benchmark's business
(``benchmarks/cpu_first_call.py``), not this test's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dotattn.kernels import _cpu_cache, cpu

# Lq·Lk above the small-call rule (65,536), so the general kernels — the precompiled ones — run.
CALLS = {"plain": {}, "causal": {"causal": True}, "window": {"window": (8, 8)}}
# Then a small call (48·48 scores: the small-call kernel) and a decode step per cache dtype
# (the split-KV kernels); `dotattn precompile` covers both.
DECODE_DTYPES = ("float32", "bfloat16", "float16")

RUN = """
import hashlib
import numpy as np
import pytest
import dotattn
from dotattn.semantics import BFLOAT16


def digest(*arrays):
    return hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)).hexdigest()


def run(calls, decode_dtypes):
    q = np.random.default_rng(0).standard_normal((1, 2, 300, 16), dtype=np.float32)
    digests = {}
    for name, options in calls.items():
        out, lse = dotattn.attention(q, q, q, implementation="cpu", return_lse=True, **options)
        grads = dotattn.attention_backward(q, q, q, out, lse, out, implementation="cpu", **options)
        digests[name] = digest(out, lse, *grads)
    small = q[:, :, :48]
    digests["small"] = digest(*dotattn.attention(small, small, small, implementation="cpu", return_lse=True))
    rng = np.random.default_rng(1)
    for name in decode_dtypes:
        dtype = BFLOAT16 if name == "bfloat16" else np.dtype(name)
        k_cache, v_cache = (rng.standard_normal((2, 2, 64, 16)).astype(dtype) for _ in range(2))
        k_new, v_new = (rng.standard_normal((2, 2, 1, 16)).astype(dtype) for _ in range(2))
        q1 = rng.standard_normal((2, 6, 1, 16)).astype(np.float32)
        out, lse = dotattn.attention_with_kvcache(q1, k_cache, v_cache, k_new, v_new, cache_lengths=[40, 7],
                                                  return_lse=True, implementation="cpu")
        digests[f"decode {name}"] = digest(out, lse, k_cache, v_cache)
        # the same call through the kernel's parallel entries (plan, items, merges), which
        # calls reading more K/V take; a small call runs the one-entry serial kernel
        from dotattn.kernels import cpu_decode

        old, cpu_decode.PARALLEL_MIN_BYTES = cpu_decode.PARALLEL_MIN_BYTES, 0
        try:
            out, lse = dotattn.attention_with_kvcache(q1, k_cache, v_cache, cache_lengths=[41, 8],
                                                      return_lse=True, implementation="cpu")
        finally:
            cpu_decode.PARALLEL_MIN_BYTES = old
        digests[f"decode {name} (parallel entries)"] = digest(out, lse)
    return digests
"""

CHILD = """
import json
from dotattn.kernels import _cpu_cache, _cpu_decode_kernels, _cpu_kernels, _cpu_small_kernels

digests = run(CALLS, DECODE_DTYPES)
dispatchers = {"forward": _cpu_kernels.forward, "backward": _cpu_kernels.backward,
               "small forward": _cpu_small_kernels.forward_chunk, "decode plan": _cpu_decode_kernels.plan,
               "decode items": _cpu_decode_kernels.run_items,
               "decode serial": _cpu_decode_kernels.run_serial}
if _cpu_decode_kernels.run_items_caller.signatures:
    # more than one core: the parallel entries' items ran on the caller and the spinning
    # partner threads (_launch.Partners), whose entries call run_items from machine code
    # (a partner thread's own entries load when it first runs, maybe after these counts:
    # precompile's test below checks them)
    del dispatchers["decode items"]
    dispatchers["decode items, caller"] = _cpu_decode_kernels.run_items_caller
stats = {k: (sum(d.stats.cache_hits.values()), sum(d.stats.cache_misses.values())) for k, d in dispatchers.items()}
print(json.dumps({"digests": digests, "stats": stats,
                  "precompiled": {k: _cpu_cache.uses_precompiled(d) for k, d in dispatchers.items()}}))
"""


def _digests() -> dict[str, str]:
    namespace: dict = {}
    exec(RUN, namespace)
    return namespace["run"](CALLS, DECODE_DTYPES)


@pytest.mark.heavy
def test_fresh_process_with_empty_caches_loads_the_precompiled_kernels(tmp_path):
    cpu.precompile(("float32", "bfloat16"))  # what `make install` did (a load when it already has)
    ours = _digests()
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba"), DOTATTN_CACHE_DIR=str(tmp_path / "dotattn"))
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    source = f"CALLS = {CALLS!r}\nDECODE_DTYPES = {DECODE_DTYPES!r}\n" + RUN + CHILD
    done = subprocess.run([sys.executable, "-c", source], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    child = json.loads(done.stdout.strip().splitlines()[-1])
    not_there = [k for k, used in child["precompiled"].items() if not used]
    assert not not_there, f"not cached in the package's precompiled directory: {not_there}"
    for kernel, (hits, misses) in child["stats"].items():
        # one specialization per kernel, but the decode kernels have two here (float32 and 16-bit caches)
        assert hits >= 1 and misses == 0, f"{kernel}: {hits} cache hits, {misses} misses (a miss compiles)"
    items = "decode items, caller" if "decode items, caller" in child["stats"] else "decode items"
    assert child["stats"][items][0] == 2
    assert child["stats"]["decode serial"][0] == 2
    assert child["digests"] == ours  # the same bits as a process that compiled or loaded them earlier
    assert set(ours) == set(CALLS) | {"small"} | {f"decode {d}{p}" for d in DECODE_DTYPES for p in ("", " (parallel entries)")}
    assert "compiling" not in done.stderr


PRECOMPILE_ONLY = """
import json
from dotattn.kernels import _cpu_decode_kernels, _cpu_kernels, _cpu_model_ops, _cpu_small_kernels, _cpu_sync, cpu

cpu.precompile(("float32", "bfloat16"))
entries = {"forward": _cpu_kernels.forward, "grouped forward": _cpu_kernels.forward_grouped,
           "backward": _cpu_kernels.backward,
           "backward, one chunk": _cpu_kernels._backward_chunk, "weights": _cpu_kernels.weights,
           "small forward": _cpu_small_kernels.forward_chunk, "decode plan": _cpu_decode_kernels.plan,
           "decode items": _cpu_decode_kernels.run_items,
           "decode serial": _cpu_decode_kernels.run_serial,
           "model RMSNorm": _cpu_model_ops.add_rms_norm, "model RoPE": _cpu_model_ops.rope,
           "model SwiGLU": _cpu_model_ops.swiglu, "model GEMV": _cpu_model_ops.gemv,
           "model GEMV, one thread": _cpu_model_ops.gemv_rows,
           "model block GEMV": _cpu_model_ops.gemv_blocks, "model block GEMV, one thread": _cpu_model_ops.gemv_blocks_rows,
           "model block GEMM": _cpu_model_ops.gemm_blocks, "model block GEMM, one thread": _cpu_model_ops.gemm_blocks_rows,
           "model chunked steps, caller": _cpu_model_ops.chunks_caller,
           "model chunked steps, partner": _cpu_model_ops.chunks_partner}
from dotattn.kernels._cpu_isa import f32_gemm
if f32_gemm()[0]:  # the short prompt passes' column-chunk GEMM (MKL's sgemm only)
    entries.update({"model column GEMM": _cpu_model_ops.gemm_columns,
                    "model column GEMM, one thread": _cpu_model_ops.gemm_columns_rows})
from dotattn.kernels import cpu_decode
if cpu_decode._workers() > 1:  # parallel decode items on the caller and the spinning partner threads
    entries.update({"decode items, caller": _cpu_decode_kernels.run_items_caller,
                    "decode items, partner": _cpu_decode_kernels.run_items_partner,
                    "partner wait": _cpu_sync.partner_wait,
                    "small forward, caller": _cpu_small_kernels.forward_caller,
                    "small forward, partner": _cpu_small_kernels.forward_partner,
                    "small forward, Numba's team": _cpu_small_kernels.forward_team})
print(json.dumps({k: len(d.signatures) for k, d in entries.items()}))
"""


def test_precompile_alone_reaches_every_kernel_entry():
    """`dotattn precompile` must load or compile every entry point a call can launch — in a
    fresh process, where nothing else has run (the test above cannot tell: its own in-process
    calls fill the cache before the child looks).  A small backward pass launches the
    backward's one chunk directly and a larger one the prange kernel; both must be there."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, "-c", PRECOMPILE_ONLY], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    missing = [k for k, n in loaded.items() if n == 0]
    assert not missing, f"dotattn precompile never launched: {missing}"


def test_a_first_launch_that_compiles_says_so(monkeypatch, capsys):
    """A kernel without machine code past the notice delay prints a line, then one when ready."""
    import time
    import types

    monkeypatch.setattr(cpu, "COMPILE_NOTICE_AFTER_S", 0.05)
    fake = types.ModuleType("dotattn.kernels._cpu_user_fake")
    fake.__file__ = "/elsewhere/_cpu_user_fake.py"
    # (a user's forward compiles its one-thread entry: cpu._run_tasks runs it on the pool)
    fake._forward_chunk = types.SimpleNamespace(overloads={}, stats=types.SimpleNamespace(cache_misses={}))
    with cpu._kernel_launch(fake, "forward", np.dtype(np.float32)):
        fake._forward_chunk.stats.cache_misses["sig"] = 1  # not in any cache: Numba compiles
        time.sleep(0.3)
    err = capsys.readouterr().err
    assert "compiling the cpu forward kernel for your score_mod/mask_mod, float32" in err
    assert "ready after" in err
    with cpu._kernel_launch(fake, "forward", np.dtype(np.float32)):  # launched before: silent
        time.sleep(0.2)
    assert capsys.readouterr().err == ""


def test_a_team_entry_whose_chunk_entry_compiles_says_so(monkeypatch, capsys):
    """A prange entry loads or compiles its one-thread entry first (kernels/_entry_order.py):
    the chunk entry's cache miss is this launch's compile, and the notice says so then."""
    import time
    import types

    monkeypatch.setattr(cpu, "COMPILE_NOTICE_AFTER_S", 0.05)
    fake = types.ModuleType(cpu._KERNEL_MODULE)  # the package's own kernels (not registered)
    fake.__file__ = cpu._KERNEL_FILE
    for name in ("weights", "_weights_chunk"):
        setattr(fake, name, types.SimpleNamespace(overloads={}, stats=types.SimpleNamespace(cache_misses={})))
    monkeypatch.setattr(cpu, "_launched", set())
    with cpu._kernel_launch(fake, "weights", np.dtype(np.float32)):
        fake._weights_chunk.stats.cache_misses["sig"] = 1  # the chunk entry compiles first
        time.sleep(0.3)
    err = capsys.readouterr().err
    assert "compiling the cpu weights kernel, float32 (once: `dotattn precompile` does it at install)" in err


def test_a_slow_load_or_a_long_call_says_nothing(monkeypatch, capsys):
    import time
    import types

    monkeypatch.setattr(cpu, "COMPILE_NOTICE_AFTER_S", 0.05)
    fake = types.ModuleType("dotattn.kernels._cpu_user_other")
    fake.__file__ = "/elsewhere/_cpu_user_other.py"
    fake._forward_chunk = types.SimpleNamespace(overloads={}, stats=types.SimpleNamespace(cache_misses={}))
    with cpu._kernel_launch(fake, "forward", np.dtype(np.float32)):
        time.sleep(0.3)  # loading from disk (no miss counted) takes long on a loaded machine
        fake._forward_chunk.overloads["sig"] = object()  # loaded; the call itself is long
        time.sleep(0.3)
    assert capsys.readouterr().err == ""


def test_precompile_command(capsys):
    from dotattn import cli

    assert cli.main(["precompile", "--dtypes", "float8"]) == 2
    assert "unknown ['float8']" in capsys.readouterr().err
    assert cli.main(["precompile", "--dtypes", "float32"]) == 0  # loads what the test above made
    out = capsys.readouterr().out
    assert str(_cpu_cache.PRECOMPILED_DIR) in out and "forward float32" in out and "done in" in out
    # and the package's bytecode, current for its sources (an import then compiles nothing)
    import importlib.util

    import dotattn.decoding

    assert "bytecode of" in out
    source = Path(dotattn.decoding.__file__)
    pyc = Path(importlib.util.cache_from_source(str(source)))
    header = pyc.read_bytes()[:16]
    flags = int.from_bytes(header[4:8], "little")
    assert header[:4] == importlib.util.MAGIC_NUMBER and flags == 0  # a timestamp-checked .pyc
    assert int.from_bytes(header[8:12], "little") == int(source.stat().st_mtime) & 0xFFFFFFFF
    assert int.from_bytes(header[12:16], "little") == source.stat().st_size & 0xFFFFFFFF


def test_precompile_compiles_dtypes_in_parallel_processes():
    """Several dtypes go to as many spawned processes (``--jobs``), whose rows come out as
    they finish; a count below one is refused by name."""
    from dotattn import cli

    assert cli.main(["precompile", "--dtypes", "float64", "--jobs", "0"]) == 2
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(Path(cpu.__file__).parents[2]), os.environ.get("PYTHONPATH")) if p))
    done = subprocess.run(
        [sys.executable, "-m", "dotattn.cli", "precompile", "--dtypes", "float64,bfloat16", "--jobs", "2", "--skip-route"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    for row in ("forward float64:", "decode float64 cache:", "forward bfloat16:", "decode float16 cache:", "done in"):
        assert row in done.stdout, (row, done.stdout)


def test_precompile_without_a_process_pool_compiles_in_this_process(monkeypatch, capsys):
    """Where no process pool can start (a sandbox without semaphores), precompile says so and
    compiles (here: loads) everything in the calling process instead of failing."""
    import concurrent.futures

    from dotattn import cli

    class NoPool:
        def __init__(self, *args, **kwargs):
            raise OSError("no semaphores here")

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", NoPool)
    done = []
    monkeypatch.setattr(cpu, "precompile", lambda dtypes, progress=None: done.append(tuple(dtypes)) or [])
    assert cli.main(["precompile", "--dtypes", "float64,bfloat16", "--jobs", "2", "--skip-route"]) == 0
    out = capsys.readouterr().out
    assert "compiling in parallel failed (OSError: no semaphores here)" in out
    assert done == [("float64", "bfloat16")]


SAVE_MANY = """
import sys
from numba.core import caching
from dotattn.kernels import _cpu_cache

_cpu_cache.install_locator()
index = caching.IndexDataCacheFile(str(_cpu_cache.PRECOMPILED_DIR), "kernel-1.py311", b"stamp")
for i in range(150):
    index.save((sys.argv[1], i), (sys.argv[1], i))
"""


def test_processes_saving_one_kernel_at_once_lose_no_entry(tmp_path):
    """Two processes saving signatures of one function into the precompiled directory together
    (parallel precompile, pytest's workers after an edit): every entry is in the index and
    names its own machine code.  Numba's unlocked save lost 253 of 600 entries so here, and 47
    of those kept pointed at another signature's data."""
    env = dict(os.environ, DOTATTN_PRECOMPILED_DIR=str(tmp_path))
    workers = [subprocess.Popen([sys.executable, "-c", SAVE_MANY, who], env=env) for who in "ab"]
    assert [w.wait(timeout=300) for w in workers] == [0, 0]
    from numba.core import caching

    index = caching.IndexDataCacheFile(str(tmp_path), "kernel-1.py311", b"stamp")
    keys = [(who, i) for who in "ab" for i in range(150)]
    assert len(index._load_index()) == len(keys)
    wrong = [k for k in keys if index.load(k) != k]
    assert not wrong, f"{len(wrong)} entries name another entry's data, e.g. {wrong[:3]}"
    assert not list(tmp_path.glob("*.tmp.*"))


def test_user_kernel_copies_save_under_the_lock_too(tmp_path):
    """A user function's kernel copy is cached in ``user_kernel_dir()/__pycache__``; pytest's
    workers can compile one copy for two dtypes at once, so those saves take turns as well —
    and only dotattn's directories: other Numba caches keep Numba's own save."""
    assert _cpu_cache._locked(str(_cpu_cache.PRECOMPILED_DIR))
    assert not _cpu_cache._locked(str(tmp_path / "__pycache__"))
    mine = tmp_path / "user_kernels"
    _cpu_cache.lock_saves_under(mine)
    try:
        assert _cpu_cache._locked(str(mine / "__pycache__")) and not _cpu_cache._locked(str(tmp_path))
    finally:
        _cpu_cache._LOCKED_ROOTS.discard(mine.resolve())


def test_a_failed_save_in_dotattns_cache_is_a_warning_and_the_call_runs(tmp_path, monkeypatch):
    """A compiled function whose save raises (Numba's "no compiled object yet for <Library …>",
    seen while other processes compiled into the same directory) still runs, with a
    KernelCacheWarning, where the cache is dotattn's; anywhere else Numba's error stands."""
    import importlib.util
    import warnings

    from numba.core import caching

    def failing_save(self, key, data):
        raise RuntimeError("no compiled object yet for <Library 'twice'>")

    _cpu_cache.install_locator()  # (as every kernel module does on import)
    monkeypatch.setattr(caching.IndexDataCacheFile, "save", failing_save)
    modules = []
    for name in ("mine", "theirs"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / f"{name}_kernel.py").write_text("from numba import njit\n\n@njit(cache=True)\ndef twice(x):\n    return 2 * x\n")
        spec = importlib.util.spec_from_file_location(f"{name}_kernel", folder / f"{name}_kernel.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        modules.append(module)
    monkeypatch.setattr(_cpu_cache, "_LOCKED_ROOTS", _cpu_cache._LOCKED_ROOTS | {(tmp_path / "mine").resolve()})
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert modules[0].twice(21) == 42
    assert [w.category for w in seen] == [_cpu_cache.KernelCacheWarning]
    assert "could not be saved" in str(seen[0].message) and "no compiled object yet" in str(seen[0].message)
    with pytest.raises(RuntimeError, match="no compiled object yet"):
        modules[1].twice(21)


def test_cache_entries_are_keyed_by_every_kernel_source(tmp_path):
    """The kernels inline helpers from other files (``_cpu_primitives.py``): an edit to any of
    them must change the key of every cached kernel, or processes load stale machine code."""
    import shutil

    here = Path(_cpu_cache.__file__).resolve().parent
    for name in _cpu_cache.SOURCE_FILES:
        shutil.copy(here / name, tmp_path / name)
    before = _cpu_cache.sources_stamp(tmp_path)
    assert _cpu_cache.sources_stamp(tmp_path) == before  # stable
    helper = tmp_path / "_cpu_primitives.py"
    helper.write_text(helper.read_text() + "\n# an edit to a shared helper\n")
    assert _cpu_cache.sources_stamp(tmp_path) != before
    # and the locator of a kernel file answers with that joint stamp
    from dotattn.kernels import _cpu_kernels

    locator = _cpu_cache.KernelCacheLocator(_cpu_kernels.forward.py_func, str(here / "_cpu_kernels.py"))
    assert locator.get_source_stamp() == _cpu_cache.sources_stamp()
