"""Huge finite logits: a row whose maximum score is ≈ 1e20 is an ordinary softmax.

The kernels compute ``2**(s·c − m)`` with ``m`` the row maximum in the same units.  Fused
into one multiply-add (or a float64 product), ``s·c`` for the maximum itself kept the
rounding that ``m`` lost — up to ulp(m)/2, ≈ 1e13 at m ≈ 1e20 — and the whole row was scaled
by ``2**±1e13``: the general and decode kernels returned 0 with LSE −inf for rows that see
keys.  The exact answer (float64 reference): all weight on the largest score.
"""

from __future__ import annotations

import numpy as np
import pytest

import dotattn
from dotattn import semantics
from dotattn.kernels import cpu

BACKENDS = ["cpu", "numpy", "reference"]


def _case(Lq=2, Lk=5, D=4, huge=1e20):
    q = np.ones((1, 1, Lq, D), np.float32)
    k = np.ones((1, 1, Lk, D), np.float32)
    v = np.arange(Lk * D, dtype=np.float32).reshape(1, 1, Lk, D)
    k[0, 0, 2] = huge  # key 2 scores D·huge·scale, far above the others
    return q, k, v


@pytest.mark.parametrize("huge", [1e7, 1e12, 1e20])
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_puts_all_weight_on_the_huge_score(backend, huge):
    q, k, v = _case(huge=huge)
    out, lse = dotattn.attention(q, k, v, implementation=backend, return_lse=True)
    np.testing.assert_array_equal(out[0, 0], np.broadcast_to(v[0, 0, 2], out[0, 0].shape))
    expected_lse = np.float32(4 * huge * 0.5)  # D · huge · 1/√D
    np.testing.assert_allclose(lse[0, 0], expected_lse, rtol=1e-6)


@pytest.mark.parametrize("huge", [1e12, 1e20])
def test_general_cpu_kernels_forward_and_backward(huge):
    """The general kernels themselves (the small-call path would take this shape first)."""
    q, k, v = _case(huge=huge)
    call = semantics.normalize(q, k, v)
    out, lse = cpu.forward(call)
    np.testing.assert_array_equal(out[0, 0], np.broadcast_to(v[0, 0, 2], out[0, 0].shape))
    assert np.all(np.isfinite(lse))
    dq, dk, dv, _ = cpu.backward(call, out, lse, np.ones_like(out))
    # all probability on key 2: dv[2] = Σ_rows dout, the other values get nothing
    np.testing.assert_array_equal(dv[0, 0, 2], np.full(4, 2.0, np.float32))
    np.testing.assert_array_equal(dv[0, 0, [0, 1, 3, 4]], 0.0)
    assert np.all(np.isfinite(dq)) and np.all(np.isfinite(dk))


@pytest.mark.parametrize("implementation", ["cpu", "numpy"])
def test_decode_puts_all_weight_on_the_huge_score(implementation):
    B, Hkv, Hq, D, cap = 1, 1, 2, 4, 8
    k_cache = np.ones((B, Hkv, cap, D), np.float32)
    v_cache = np.arange(cap * D, dtype=np.float32).reshape(B, Hkv, cap, D)
    k_cache[0, 0, 3] = 1e20
    q = np.ones((B, Hq, 1, D), np.float32)
    out, lse = dotattn.attention_with_kvcache(
        q, k_cache, v_cache, cache_lengths=np.array([6]), return_lse=True, implementation=implementation
    )
    np.testing.assert_array_equal(out[0, :, 0], np.broadcast_to(v_cache[0, 0, 3], (Hq, D)))
    np.testing.assert_allclose(lse[0, :, 0], np.float32(4 * 1e20 * 0.5), rtol=1e-6)
