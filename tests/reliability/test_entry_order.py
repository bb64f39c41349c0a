"""Every path runs a kernel's own machine code, whatever the process loaded first.

A kernel run from another jitted entry (the partner threads' ``chunks_caller``,
``forward_caller``, ``run_items_caller``…) is compiled into that entry's object as a weak copy,
optimized once more there; the JIT links a caller loaded after the kernel's own entry to that
entry, and a caller loaded first to its copy.  SwiGLU's copy rounded differently in 985 of
6,240 outputs, so before ``kernels/_entry_order.py`` the partners' prompt-pass steps gave the
pool's bits only in a process that had loaded the pool's path first.  The real check runs the
partners' entries first in a fresh process; the ordering itself is checked in-process.
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

# In a fresh process: each family's partner entries first, then the same work on one thread
# (the kernels' own entries).  Prints one line per comparison: "SAME name" or "DIFF name count".
PARTNERS_FIRST = r"""
import numpy as np
import dotattn
from dotattn import decoding, semantics
from dotattn.kernels import _cpu_model_ops as ops, _launch, cpu_decode, cpu_small

def report(name, got, expected):
    diff = sum(int(np.count_nonzero(a != b)) for a, b in zip(got, expected))
    print(("SAME " if diff == 0 else "DIFF ") + name + " " + str(diff), flush=True)

rng = np.random.default_rng(5)
n, e, heads, D, f = 130, 64, 3, 16, 48
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
    on_partners = fresh()
    assert _launch.on_partners(1, ops.chunks_caller, (tuple(on_partners), 2), ops.chunks_partner, (tuple(on_partners), 2))
    alone = fresh()
    for chunk in range(2):
        getattr(ops, name)(*alone, chunk, 2)
    report(name, [on_partners[i] for i in outs], [alone[i] for i in outs])

cpu_small.cores = lambda: 2
q, k, v = (rng.standard_normal((2, h, 70, 32)).astype(np.float32) for h in (6, 2, 2))
call = semantics.normalize(q, k, v, causal=True)
on_partners = cpu_small.forward(call, threads=2)
assert _launch._partners is not None and _launch._partners.gen > 3, "the small call did not run on the partners"
report("small forward", on_partners, cpu_small.forward(call, threads=1))

cpu_decode.ParallelChoice.choose = lambda self: True
cpu_decode.PARALLEL_MIN_BYTES = 0  # (the call reads 3 MB)
B, Hq, Hkv, D, cap = 3, 8, 2, 64, 3 * decoding.SPLIT_SIZE
k_cache, v_cache = (rng.standard_normal((B, Hkv, cap, D)).astype(np.float32) for _ in range(2))
q = rng.standard_normal((B, Hq, 1, D)).astype(np.float32)
lengths = np.array([cap - 1, cap // 2, 700], dtype=np.int64)
decode = lambda: dotattn.attention_with_kvcache(q, k_cache, v_cache, cache_lengths=lengths, return_lse=True, implementation="cpu")
gen = _launch._partners.gen
on_partners = decode()
assert _launch._partners.gen > gen, "the decode call did not run on the partners"
cpu_decode.PARALLEL_MIN_BYTES = 1 << 62
report("decode", on_partners, decode())
"""


def test_the_partners_entries_loaded_first_give_the_kernels_own_bits():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", PARTNERS_FIRST], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.split("\n")
    reports = [line for line in lines if line.startswith(("SAME ", "DIFF "))]
    assert len(reports) == 5, done.stdout
    assert all(line.startswith("SAME ") for line in reports), done.stdout


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


def test_every_partner_and_team_entry_loads_its_kernel_first():
    from dotattn.kernels import _cpu_decode_kernels, _cpu_kernels, _cpu_model_ops, _cpu_small_kernels

    entries = [
        _cpu_model_ops.chunks_caller, _cpu_model_ops.chunks_partner,
        _cpu_small_kernels.forward_caller, _cpu_small_kernels.forward_partner, _cpu_small_kernels.forward_team,
        _cpu_decode_kernels.run_items_caller, _cpu_decode_kernels.run_items_partner, _cpu_decode_kernels.run_items_team,
        _cpu_kernels.forward, _cpu_kernels.backward, _cpu_kernels.weights,
    ]
    assert [getattr(e, "_loads_callee_first", False) for e in entries] == [True] * len(entries)
