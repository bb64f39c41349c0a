"""The ``cpu`` decode kernels compile and run on an x86 CPU without AVX-512 (an AVX2-only Zen 3).

Until 4 Dec 2026 the bfloat16 scores' ``vdpbf16ps`` (``_cpu_decode_kernels._scores_dot16``)
was emitted inline in a function compiled for the host: where the compile target lacks
avx512bf16, LLVM aborted the whole process ("Do not know how to split the result of this
operator!") while compiling any 16-bit cache's kernel — ``dotattn precompile`` and pytest with
it — although ``cpu_decode.BF16_DOT`` never runs that path there.  An abort cannot be caught in
the process, so each check runs in a child and asserts its exit status:

* the bfloat16 scores compiled for a target without avx512bf16 (``NUMBA_CPU_NAME=haswell``,
  avx512 features off: the bug on any host, AVX-512 or not), still as ``vdpbf16ps``;
* a decode step of every cache dtype through ``attention_with_kvcache(implementation="cpu")``
  on this machine, against the ``numpy`` decode kernel.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import decode_cases as C
import helpers as H

pytestmark = pytest.mark.skipif("cpu" not in C.decode_backends(), reason="the cpu decode kernel is not under test")

# the score function alone (no cache: a compile for another target must not land in the
# package's kernel cache), compiled but not run — a CPU without avx512bf16 cannot run it
SCORES_CHILD = textwrap.dedent(
    """
    from numba import njit, types
    from dotattn.kernels import _cpu_decode_kernels as K

    @njit(cache=False)
    def scores(qp, R, D, flat, qscale, offs, n, s, ns, Dv, npf):
        K._scores_dot(qp, R, D, flat, qscale, offs, n, s, ns, flat, offs, Dv, offs, npf)

    u16, i64, f32 = types.uint16[::1], types.int64[::1], types.float32[::1]
    sig = (u16, types.int64, types.int64, u16, types.float32, i64, types.int64, f32, types.int64, types.int64, types.int64)
    scores.compile(sig)
    asm = scores.inspect_asm(sig)
    assert "vdpbf16ps" in asm, "the bfloat16 scores no longer use vdpbf16ps"
    print("compiled")
    """
)

DECODE_CHILD = textwrap.dedent(
    """
    import numpy as np
    import dotattn
    from dotattn.semantics import BFLOAT16

    rng = np.random.default_rng(0)
    B, H, L, D = 2, 2, 70, 64  # bfloat16: one row per K/V head, D % 32 == 0 (vdpbf16ps where it runs)
    for dtype in (np.dtype(np.float32), np.dtype(np.float16), BFLOAT16):
        q, k, v = (rng.standard_normal(shape).astype(dtype) for shape in [(B, H, 1, D), (B, H, L, D), (B, H, L, D)])
        lengths = np.array([L, 33])
        got, lse = dotattn.attention_with_kvcache(q, k, v, cache_lengths=lengths, return_lse=True, implementation="cpu")
        want, lse0 = dotattn.attention_with_kvcache(q, k, v, cache_lengths=lengths, return_lse=True, implementation="numpy")
        assert got.dtype == dtype and got.shape == (B, H, 1, D), (dtype, got.dtype, got.shape)
        np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=2e-2, atol=2e-2)
        np.testing.assert_allclose(lse, lse0, rtol=1e-3, atol=1e-3)
        print(dtype.name, "ok")
    """
)


def _run(code: str, **env) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), **env)
    # a first compile of the decode kernels takes minutes (a stale kernel cache); later ones load
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1800)


def _check(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, f"the child exited with {done.returncode}:\n{done.stdout}\n{done.stderr[-4000:]}"


def test_bf16_dot_scores_compile_for_a_target_without_avx512bf16():
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip(H.lacks("x86-64", "the target forced here (haswell) and vdpbf16ps are x86's"))
    done = _run(
        SCORES_CHILD,
        NUMBA_CPU_NAME="haswell",
        NUMBA_CPU_FEATURES="+avx2,+fma,-avx512f,-avx512bw,-avx512dq,-avx512vl,-avx512bf16",
        DOTATTN_DECODE_NOCACHE="1",  # the decode kernels' functions not cached (another target)
    )
    _check(done)
    assert done.stdout.strip().splitlines()[-1] == "compiled"


def test_every_cache_dtype_decodes_on_this_cpu():
    done = _run(DECODE_CHILD)
    _check(done)
    assert [line.split()[0] for line in done.stdout.split("\n") if line.endswith(" ok")] == ["float32", "float16", "bfloat16"]
