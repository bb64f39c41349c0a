"""The float32 exp passes' ``2**n`` scaling (``_cpu_simd.ir_times_pow2``, ``_cpu_primitives._ldexp``).

Where the compile target lacks AVX-512, ``llvm.ldexp`` became a call of libm's ``ldexpf`` per
element (5 ns an element on an AVX2 Zen 3: 60 % of a float32 forward tile).  The passes now
build the power of two from its exponent bits there; these tests hold that form to ``ldexp``'s
bits over the passes' operands, the vector pass to its scalar twin, and the compiled code to
no libm call.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from numba import njit, types
from numba.extending import intrinsic

from dotattn.kernels import _cpu_primitives as P
from dotattn.kernels import _cpu_simd as S


@intrinsic
def _times_pow2(typingctx, p, e):
    """``ir_times_pow2`` itself, whatever the target (``_ldexp`` takes ``llvm.ldexp`` with AVX-512)."""
    sig = types.float32(types.float32, types.int32)

    def codegen(context, builder, signature, args):
        return S.ir_times_pow2(builder, args[0], args[1])

    return sig, codegen


@njit
def _portable(p, e, out):
    for i in range(p.shape[0]):
        out[i] = _times_pow2(p[i], e[i])


@njit
def _as_compiled(p, e, out):
    for i in range(p.shape[0]):
        out[i] = P._ldexp(p[i], e[i])


def _operands(n=1 << 18, seed=0):
    """``p ∈ [½, 2)`` and ``e`` from −125 (the passes' smallest kept exponent) past overflow."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.5, 2.0, n).astype(np.float32)
    e = rng.integers(-125, 200, n).astype(np.int32)
    edges_p = [0.5, np.nextafter(np.float32(2.0), np.float32(0.0)), 1.0, 0.70710677, 1.4142135, 0.99999994]
    edges_e = [-125, -124, 0, 126, 127, 128, 129, 2**30, np.iinfo(np.int32).max]
    k = 0
    for a in edges_p:
        for b in edges_e:
            p[k], e[k] = a, b
            k += 1
    return p, e


@pytest.mark.parametrize("form", [_portable, _as_compiled], ids=["bits-form", "as-compiled"])
def test_the_power_of_two_gives_ldexps_bits(form):
    p, e = _operands()
    out = np.empty_like(p)
    form(p, e, out)
    with np.errstate(over="ignore"):
        want = np.ldexp(p, e)
    assert np.isinf(want).any() and (want < 2.0**-124).any()  # both ends reached
    np.testing.assert_array_equal(out.view(np.int32), want.view(np.int32))


def test_no_libm_call_in_the_compiled_scaling():
    p, e = _operands(64)
    _as_compiled(p, e, np.empty_like(p))
    asm = "\n".join(_as_compiled.inspect_asm().values())
    assert "ldexp" not in asm


_BASE_FEATURES = "+sse2,+sse3,+ssse3,+sse4.1,+sse4.2,+popcnt,+avx,+avx2,+fma,+f16c,+bmi,+bmi2,+lzcnt,+movbe"
_AVX512 = ",+avx512f,+avx512dq,+avx512bw,+avx512vl,+evex512"


@pytest.mark.parametrize("cpu, features, scalef", [
    ("znver3", _BASE_FEATURES, False),  # AVX2 only: the form from the exponent bits
    ("skylake-avx512", _BASE_FEATURES + _AVX512, True),  # llvm.ldexp: vscalefps, vscalefss
], ids=["avx2", "avx512"])
def test_each_target_compiles_the_scaling_without_libm(cpu, features, scalef):
    # compiled (not run) for another CPU in a child process: both of ldexp_exp2's forms are
    # checked on any host
    code = textwrap.dedent("""
        import numpy as np
        from numba import njit, types
        from dotattn.kernels import _cpu_primitives as P

        @njit(cache=False)
        def scale(p, e, out):
            for i in range(p.shape[0]):
                out[i] = P._ldexp(p[i], e[i])

        scale.compile((types.float32[::1], types.int32[::1], types.float32[::1]))
        asm = "\\n".join(scale.inspect_asm().values())
        print("ldexp" in asm, "vscalefps" in asm)
    """)
    env = dict(os.environ, NUMBA_CPU_NAME=cpu, NUMBA_CPU_FEATURES=features)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", str(scalef)]


@njit(fastmath={"contract", "afn", "nsz"})  # as _exp2_core_f32, which inlines the scalar twin
def _exp2_scalar(ST, mul, sub):
    for c in range(ST.shape[0]):
        row = ST[c]
        for r in range(ST.shape[1]):
            row[r] = P._exp2_one(row[r], mul, sub[r])


@njit
def _exp2_vector(ST, mul, sub):
    S.exp2_tile16(ST, mul, sub, sub, ST.shape[1] // S.LANES, False, np.zeros(4, np.int64))


def test_the_vector_pass_matches_its_scalar_twin_and_exp2():
    rng = np.random.default_rng(1)
    rows, cols = 40, 64
    st = (rng.standard_normal((rows, cols)) * 60).astype(np.float32)
    # the edges: 2**x's cut at −125.5, overflow, the non-finite scores
    st[0, :8] = [-125.5, -125.49, -126.0, 127.4, 127.6, 200.0, np.inf, -np.inf]
    st[1, :2] = [np.nan, 0.0]
    sub = rng.uniform(-5, 5, cols).astype(np.float32)
    sub[:16] = 0.0
    mul = np.float32(1.0)
    a, b = st.copy(), st.copy()
    _exp2_scalar(a, mul, sub)
    _exp2_vector(b, mul, sub)
    np.testing.assert_array_equal(a.view(np.int32), b.view(np.int32))
    x = (st - sub).astype(np.float64)  # the pass's x = s·mul − sub, rounded once (mul = 1)
    with np.errstate(over="ignore", invalid="ignore"):
        want = np.where(x > -125.5, np.exp2(x), 0.0)
    want[np.isnan(x)] = 0.0
    assert b[0, 5] == np.inf and b[0, 6] == np.inf and b[0, 7] == 0.0 and b[1, 0] == 0.0
    fin = np.isfinite(want) & (want > 0) & (want < np.finfo(np.float32).max)
    rel = np.abs(b[fin] - want[fin]) / want[fin]
    assert rel.max() < 2.5e-7  # the polynomial's 0.94 ulp and the product's rounding
    np.testing.assert_array_equal(b[want == 0], 0.0)
    assert np.all(b[want >= np.finfo(np.float32).max] == np.inf)
