"""Every path runs a kernel's own machine code, whatever the process loaded first.

A kernel run from another jitted entry (the partner threads' ``chunks_caller``,
``forward_caller``, ``run_items_caller``…) is compiled into that entry's object as a weak copy,
optimized once more there; the JIT links a caller loaded after the kernel's own entry to that
entry, and a caller loaded first to its copy.  SwiGLU's copy rounded differently in 985 of
6,240 outputs, so before ``kernels/_entry_order.py`` the partners' prompt-pass steps gave the
pool's bits only in a process that had loaded the pool's path first.  The real check runs the
partners' or the team's entries first in a fresh process; the ordering itself is checked in-process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from numba import njit

from dotattn.kernels._entry_order import load_callee_first

SRC = Path(__file__).resolve().parents[2] / "src"

# In a fresh process: each family's partner entries ("partners") or Numba's team entries ("team")
# first, then the same work through the kernels' own entries.  Prints one line per comparison:
# "SAME name 0" or "DIFF name count", and the cache hits of the entries run first (the order
# matters only for entries loaded from the disk cache: `dotattn precompile`, run by `make
# install`; a caller compiled in the process compiles its kernel first anyway).
FIRST_THEN_OWN = r"""
import sys
import numpy as np
import dotattn
from dotattn import decoding, semantics
from dotattn.kernels import _cpu_decode_kernels as DK, _cpu_model_ops as ops, _cpu_small_kernels as SK
from dotattn.kernels import _launch, cpu_decode, cpu_small

mode = sys.argv[1]
team = _launch.on_numba_team if mode == "team" else None

def report(name, got, expected):
    diff = sum(int(np.count_nonzero(a != b)) for a, b in zip(got, expected))
    print(("SAME " if diff == 0 else "DIFF ") + name + " " + str(diff), flush=True)

def hits(*entries):
    print("HITS " + " ".join(str(sum(e.stats.cache_hits.values())) for e in entries), flush=True)

rng = np.random.default_rng(5)
n, e, heads, D, f = 130, 64, 3, 16, 48
if mode == "partners":
    x, proj = rng.standard_normal((n, e), dtype=np.float32), rng.standard_normal((n, e), dtype=np.float32)
    table = rng.standard_normal((n + 4, D), dtype=np.float32)
    qkv = rng.standard_normal((n, (heads + 1) * D), dtype=np.float32)
    gate_up = rng.standard_normal((n, 2 * f), dtype=np.float32)
    steps = [
        ("add_rms_norm", (x, proj, True, rng.standard_normal(e, dtype=np.float32), np.float32(1e-5), np.empty_like(x)), (0, 5)),
        ("rope", (qkv, np.arange(n, dtype=np.int64), table, table, np.empty((n, heads, D), np.float32)), (4,)),
        ("swiglu", (gate_up, np.empty((n, f), np.float32)), (1,)),
    ]
    for name, args, outs in steps:
        fresh = lambda: [a.copy() if isinstance(a, np.ndarray) else a for a in args]
        first = fresh()
        assert _launch.on_partners(1, ops.chunks_caller, (tuple(first), 2), ops.chunks_partner, (tuple(first), 2))
        own = fresh()
        for chunk in range(2):
            getattr(ops, name)(*own, chunk, 2)
        report(name, [first[i] for i in outs], [own[i] for i in outs])
    hits(ops.chunks_caller)
else:
    x, w = rng.standard_normal((3, 64), dtype=np.float32), rng.standard_normal((90, 64), dtype=np.float32)
    first, own = np.empty((3, 90), np.float32), np.empty((3, 90), np.float32)
    ops.gemv(x, w, first, 2)
    ops.gemv_rows(x, w, own, 0, 90)
    report("gemv", [first], [own])
    hits(ops.gemv)

cpu_small.cores = lambda: 2
q, k, v = (rng.standard_normal((2, h, 70, 32)).astype(np.float32) for h in (6, 2, 2))
call = semantics.normalize(q, k, v, causal=True)
if team:
    with team():
        first = cpu_small.forward(call, threads=2)
    hits(SK.forward_team)
else:
    first = cpu_small.forward(call, threads=2)
    assert _launch._partners is not None and _launch._partners.gen > 0, "the small call did not run on the partners"
    hits(SK.forward_caller)
report("small forward", first, cpu_small.forward(call, threads=1))

cpu_decode.ParallelChoice.choose = lambda self: True
cpu_decode.PARALLEL_MIN_BYTES = 0  # (the call reads 3 MB)
B, Hq, Hkv, D, cap = 3, 8, 2, 64, 3 * decoding.SPLIT_SIZE
k_cache, v_cache = (rng.standard_normal((B, Hkv, cap, D)).astype(np.float32) for _ in range(2))
q = rng.standard_normal((B, Hq, 1, D)).astype(np.float32)
lengths = np.array([cap - 1, cap // 2, 700], dtype=np.int64)
decode = lambda: dotattn.attention_with_kvcache(q, k_cache, v_cache, cache_lengths=lengths, return_lse=True, implementation="cpu")
if team:
    with team():
        first = decode()
    assert DK.run_items_team.overloads, "the decode call did not run on the team"
    hits(DK.run_items_team)
else:
    first = decode()
    assert DK.run_items_caller.overloads, "the decode call did not run on the partners"
    hits(DK.run_items_caller)
cpu_decode.USE_PARTNERS = False  # the executor's path: run_items itself, on the caller and a pool thread
own = decode()
assert not DK.run_serial.overloads, "the decode call ran serially"
report("decode", first, own)
"""


@pytest.mark.parametrize("mode", ["partners", "team"])
def test_entries_loaded_first_give_the_kernels_own_bits(mode):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", FIRST_THEN_OWN, mode], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.split("\n")
    reports = [line for line in lines if line.startswith(("SAME ", "DIFF "))]
    assert len(reports) == (5 if mode == "partners" else 3), done.stdout
    assert all(line.startswith("SAME ") for line in reports), done.stdout
    # the premise: the entries run first were loaded from the disk cache, not compiled here
    hits = [int(h) for line in lines if line.startswith("HITS ") for h in line.split()[1:]]
    assert len(hits) == 3 and all(h >= 1 for h in hits), done.stdout


def test_a_callers_new_signature_loads_its_callee_first():
    """The wrapped ``compile`` loads the callee's matching signature before the caller's own —
    for calls from Python and for explicit compiles — and only once per signature."""

    @njit
    def callee(x, scale):
        return x * scale

    @njit
    def caller(args):
        return callee(*args)

    order = []
    callee_compile = callee.compile

    def spy_callee(sig):
        order.append(("callee", tuple(sig)))
        return callee_compile(sig)

    callee.compile = spy_callee
    caller_compile = caller.compile

    def spy_caller(sig):
        order.append(("caller", tuple(sig) if isinstance(sig, tuple) else sig))
        return caller_compile(sig)

    caller.compile = spy_caller
    load_callee_first(caller, lambda args: (callee, tuple(args[0].types)))
    load_callee_first(caller, lambda args: pytest.fail("a second wrap ran"))  # (wraps once)
    assert caller((np.float32(2), 3.0)) == 6.0
    from numba import types

    first = types.Tuple((types.float32, types.float64))
    assert order[:2] == [("callee", (types.float32, types.float64)), ("caller", (first,))]
    assert (types.float32, types.float64) in callee.overloads
    before = len(order)
    assert caller((np.float32(1), 1.0)) == 1.0  # loaded already: no compile at all
    assert len(order) == before
    caller.compile((types.UniTuple(types.int64, 2),))  # an explicit compile, as `dotattn precompile`'s
    assert order[before] == ("callee", (types.int64, types.int64))


def test_a_call_of_another_form_gets_numbas_typing_error():
    """Arguments the hook cannot read (an int where the entry takes a tuple) reach Numba's own
    typing, whose error names the call — not an AttributeError from the hook."""
    from numba.core.errors import TypingError

    @njit
    def callee(x):
        return x

    @njit
    def caller(args):
        return callee(*args)

    load_callee_first(caller, lambda args: (callee, tuple(args[0].types)))
    with pytest.raises(TypingError):
        caller(5)


def test_every_partner_and_team_entry_loads_its_kernel_first():
    from dotattn.kernels import _cpu_decode_kernels, _cpu_kernels, _cpu_model_ops, _cpu_small_kernels

    entries = [
        _cpu_model_ops.chunks_caller, _cpu_model_ops.chunks_partner,
        _cpu_small_kernels.forward_caller, _cpu_small_kernels.forward_partner, _cpu_small_kernels.forward_team,
        _cpu_decode_kernels.run_items_caller, _cpu_decode_kernels.run_items_partner, _cpu_decode_kernels.run_items_team,
        _cpu_kernels.forward, _cpu_kernels.backward, _cpu_kernels.weights,
        _cpu_model_ops.gemv, _cpu_model_ops.gemm_columns, _cpu_model_ops.gemm_blocks, _cpu_model_ops.gemv_blocks,
    ]
    assert [getattr(e, "_loads_callee_first", False) for e in entries] == [True] * len(entries)


# In a fresh process: decode calls of three cache dtypes, on one thread (``run_serial``, which
# carries its own copies of the item and merge code) and as work items (``run_items``, the
# executor's path), in the order given by argv[1].  Prints a digest of each call's bits.
SERIAL_AND_ITEMS = r"""
import hashlib, sys
import ml_dtypes
import numpy as np
import dotattn
from dotattn import decoding
from dotattn.kernels import _cpu_decode_kernels as DK, cpu_decode

rng = np.random.default_rng(5)
B, Hq, Hkv, D, cap = 3, 8, 2, 64, 3 * decoding.SPLIT_SIZE
lengths = np.array([cap - 1, cap // 2, 700], dtype=np.int64)
cases = {}
for dt in (np.float32, ml_dtypes.bfloat16, np.float16):
    cases[np.dtype(dt).name] = [rng.standard_normal(s).astype(dt) for s in ((B, Hq, 1, D), (B, Hkv, cap, D), (B, Hkv, cap, D))]

def run(path, q, k, v):
    cpu_decode.PARALLEL_MIN_BYTES = (1 << 40) if path == "serial" else 0
    cpu_decode.ParallelChoice.choose = lambda self: True
    cpu_decode.USE_PARTNERS = False
    out, lse = dotattn.attention_with_kvcache(q, k, v, cache_lengths=lengths, return_lse=True, implementation="cpu")
    return hashlib.sha1(out.tobytes() + lse.tobytes()).hexdigest()

paths = ("serial", "items") if sys.argv[1] == "serial" else ("items", "serial")
for name, (q, k, v) in cases.items():
    for path in paths:
        print("BITS", name, path, run(path, q, k, v), flush=True)
assert DK.run_serial.overloads and DK.run_items.overloads, "a path did not run"
print("HITS", sum(DK.run_serial.stats.cache_hits.values()), sum(DK.run_items.stats.cache_hits.values()), flush=True)
"""


def test_one_thread_decode_gives_the_items_bits_whatever_loads_first():
    """``run_serial`` (one-thread decode calls) compiles its own copies of the item and merge
    code, not load-ordered like the entries above: its bits must equal ``run_items``' both when
    it is loaded first and when it is loaded second, for each kind of cache."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])))
    bits = {}
    for first in ("serial", "items"):
        done = subprocess.run([sys.executable, "-c", SERIAL_AND_ITEMS, first], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        lines = done.stdout.split("\n")
        for line in lines:
            if line.startswith("BITS "):
                _, name, path, digest = line.split()
                bits[(first, name, path)] = digest
        # the premise, as above: both entries came from the disk cache
        hits = [int(h) for line in lines if line.startswith("HITS ") for h in line.split()[1:]]
        assert len(hits) == 2 and all(h >= 1 for h in hits), done.stdout
    assert len(bits) == 12, bits
    for name in ("float32", "bfloat16", "float16"):
        assert len({bits[(first, name, path)] for first in ("serial", "items") for path in ("serial", "items")}) == 1, bits
