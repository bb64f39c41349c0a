"""The cpu kernels' float32 tile GEMMs: MKL's sgemm (from torch's library) or OpenBLAS's.

The bound sgemm against NumPy on every operand layout the kernels pass (transposed views,
row slices with a leading dimension above their width, in-place accumulation); the kernels
through it against the float64 reference with the 2× naive rule (odd head dims, lengths no
multiple of the tile, GQA, causal, window, forward and backward); and the OpenBLAS fallback
forced by ``DOTATTN_CPU_F32_GEMM=openblas`` in a child process (the binding is made once per
process), which must say so and agree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from numba import njit

import dotattn
from dotattn import semantics
from dotattn.kernels import _cpu_isa, cpu
from dotattn.kernels import _cpu_primitives as P

import helpers as H

HAS_MKL = _cpu_isa._torch_library() is not None


@njit
def _gemm_on_thread(a, b, c, beta):
    threads = P._gemm_threads_begin(c)
    P._gemm(a, b, c, beta)
    P._gemm_threads_end(c, threads)


def test_the_path_is_bound_once_and_reported():
    on, what = cpu.f32_gemm_path()
    assert on == (HAS_MKL and os.environ.get(_cpu_isa.F32_ENV_VAR, "") == ""), what
    assert ("MKL sgemm" if on else "OpenBLAS sgemm") in what
    status = next(r["status"] for r in dotattn.info() if r["name"] == "cpu")
    assert "float32 tiles: " in status


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_the_bound_sgemm_on_every_layout_the_kernels_pass(beta):
    cpu.f32_gemm_path()
    rng = np.random.default_rng(0)
    M, N, K = 37, 19, 45
    a_c = rng.standard_normal((M, K), dtype=np.float32)
    a_f = np.asfortranarray(a_c)
    b_c = rng.standard_normal((K, N), dtype=np.float32)
    big = rng.standard_normal((60, K + 7), dtype=np.float32)  # a row slice: ld above the width
    for a in (a_c, a_f, big[:M, 3 : 3 + K], big.T[3 : 3 + K, :M].T):
        for b in (b_c, np.asfortranarray(b_c), rng.standard_normal((N, K), dtype=np.float32).T):
            store = rng.standard_normal((M + 3, N + 5), dtype=np.float32)
            c = store[1 : M + 1, 2 : N + 2]  # rows contiguous, leading dimension N + 5
            expected = a.astype(np.float64) @ b.astype(np.float64) + beta * c.astype(np.float64)
            untouched = store.copy()
            _gemm_on_thread(a, b, c, beta)
            np.testing.assert_allclose(c, expected, rtol=1e-5, atol=1e-4)
            untouched[1 : M + 1, 2 : N + 2] = c
            assert np.array_equal(store, untouched)  # nothing outside c written


CASES = [
    ((2, 2, 37, 45, 59), (16, 32), {}),  # odd head dim, lengths no multiple of the tiles
    ((4, 2, 50, 70, 64), (16, 16), {"causal": True}),  # GQA, causal
    ((2, 1, 33, 70, 24), (8, 32), {"window": (5, 9), "softcap": 20.0}),
    ((2, 2, 300, 300, 33), None, {"kv_lengths": np.array([211])}),  # the default tiles
    # the dense forward's 256×512 tiles: a partial last key tile, padding past kv_lengths
    ((2, 1, 530, 1100, 64), None, {"kv_lengths": np.array([1037])}),
]


def test_dense_float32_forwards_take_the_deeper_key_tiles():
    q, k, v = H.random_qkv(1, batch=(1,), Hq=2, Hkv=1, Lq=530, Lk=1100, D=64, Dv=64, dtype=np.float32)
    assert cpu._dense_f32(semantics.normalize(q, k, v, kv_lengths=np.array([1037])))
    segments = (np.zeros((1, 530), np.int64), np.zeros((1, 1100), np.int64))
    for options in ({"causal": True}, {"window": (8, 8)}, {"segment_ids": segments}):
        assert not cpu._dense_f32(semantics.normalize(q, k, v, **options)), options
    assert not cpu._dense_f32(semantics.normalize(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64)))


@pytest.mark.parametrize(
    "shape, tiles, options", CASES, ids=["odd-D59", "gqa-causal", "window-softcap", "default-tiles", "dense-deep-tiles"]
)
def test_float32_through_the_bound_sgemm_matches_the_reference(shape, tiles, options):
    Hq, Hkv, Lq, Lk, D = shape
    q, k, v = H.random_qkv(7, batch=(1,), Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D, Dv=D, dtype=np.float32)
    call = semantics.normalize(q, k, v, **options)
    out, lse = cpu.forward(call, block_size=tiles)
    dout = np.random.default_rng(3).standard_normal(out.shape).astype(np.float32)
    ref_out, ref_lse = H.reference(q, k, v, **options)
    naive_out, naive_lse = H.naive(q, k, v, **options)
    H.assert_close_to_reference(out, ref_out, naive_out, name="out")
    H.assert_close_to_reference(lse, ref_lse, naive_lse, name="lse")
    grads = cpu.backward(call, out, lse, dout, block_size=tiles)[:3]
    ref_grads = H.reference_grads(q, k, v, dout, **options)
    naive_grads = H.naive_grads(q, k, v, dout, **options)
    for name, g, r, n in zip(("dq", "dk", "dv"), grads, ref_grads, naive_grads):
        H.assert_close_to_reference(g, r, n, name=name)


CHILD = """
import json, sys
import numpy as np
from dotattn import semantics
from dotattn.kernels import cpu
data = np.load(sys.argv[1])
q, k, v, dout = (data[n] for n in "q k v dout".split())
call = semantics.normalize(q, k, v, causal=True)
out, lse = cpu.forward(call, block_size=(16, 32))
dq, dk, dv, _ = cpu.backward(call, out, lse, dout, block_size=(16, 32))
np.savez(sys.argv[2], out=out, lse=lse, dq=dq, dk=dk, dv=dv)
print(json.dumps(cpu.f32_gemm_path()))
"""


def test_forced_openblas_fallback_says_so_and_agrees(tmp_path):
    q, k, v = H.random_qkv(5, batch=(1,), Hq=4, Hkv=2, Lq=70, Lk=83, D=41, Dv=41, dtype=np.float32)
    dout = np.random.default_rng(4).standard_normal((1, 4, 70, 41)).astype(np.float32)
    np.savez(tmp_path / "in.npz", q=q, k=k, v=v, dout=dout)
    env = dict(os.environ, **{_cpu_isa.F32_ENV_VAR: "openblas"}, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    on, what = json.loads(done.stdout.strip().splitlines()[-1])
    assert not on and what == f"OpenBLAS sgemm (SciPy's), forced by {_cpu_isa.F32_ENV_VAR}=openblas"
    fallback = np.load(tmp_path / "out.npz")
    call = semantics.normalize(q, k, v, causal=True)
    out, lse = cpu.forward(call, block_size=(16, 32))
    grads = dict(zip(("dq", "dk", "dv"), cpu.backward(call, out, lse, dout, block_size=(16, 32))))
    ref_out, _ = H.reference(q, k, v, causal=True)
    naive_out, _ = H.naive(q, k, v, causal=True)
    ref_grads = H.reference_grads(q, k, v, dout, causal=True)
    naive_grads = H.naive_grads(q, k, v, dout, causal=True)
    for ours in (out, fallback["out"]):
        H.assert_close_to_reference(ours, ref_out, naive_out, name="out")
    for i, name in enumerate(("dq", "dk", "dv")):
        for ours in (grads[name], fallback[name]):
            H.assert_close_to_reference(ours, ref_grads[i], naive_grads[i], name=name)
    np.testing.assert_allclose(fallback["lse"], lse, rtol=1e-5, atol=1e-5)


def test_info_without_loading_reports_a_forced_fallback(monkeypatch):
    monkeypatch.setattr(_cpu_isa, "_f32_state", None)  # as before the first float32 call
    monkeypatch.setenv(_cpu_isa.F32_ENV_VAR, "openblas")
    assert _cpu_isa.f32_gemm(load=False) == (False, f"OpenBLAS sgemm (SciPy's), forced by {_cpu_isa.F32_ENV_VAR}=openblas")
    monkeypatch.delenv(_cpu_isa.F32_ENV_VAR)
    assert _cpu_isa.f32_gemm(load=False)[0] == HAS_MKL


def test_float32_is_bitwise_repeatable():
    q, k, v = H.random_qkv(9, batch=(1,), Hq=2, Hkv=2, Lq=300, Lk=300, D=40, Dv=40, dtype=np.float32)
    a = dotattn.attention(q, k, v, causal=True, implementation="cpu")
    b = dotattn.attention(q, k, v.copy(), causal=True, implementation="cpu")
    assert np.array_equal(a, b)


NO_TORCH_CHILD = """
import json, sys
import numpy as np
from dotattn.kernels import _cpu_isa
_cpu_isa._torch_library = lambda: None  # as where torch is not installed
from dotattn import semantics
from dotattn.kernels import cpu
data = np.load(sys.argv[1])
call = semantics.normalize(data["q"], data["k"], data["v"], causal=True)
out, lse = cpu.forward(call, block_size=(16, 32))
np.save(sys.argv[2], out)
print(json.dumps(cpu.f32_gemm_path()))
"""


def test_without_torch_openblas_runs_and_the_thread_pin_is_a_no_op(tmp_path):
    q, k, v = H.random_qkv(6, batch=(1,), Hq=2, Hkv=1, Lq=45, Lk=61, D=24, Dv=24, dtype=np.float32)
    np.savez(tmp_path / "in.npz", q=q, k=k, v=v)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    env.pop(_cpu_isa.F32_ENV_VAR, None)
    done = subprocess.run(
        [sys.executable, "-c", NO_TORCH_CHILD, str(tmp_path / "in.npz"), str(tmp_path / "out.npy")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    on, what = json.loads(done.stdout.strip().splitlines()[-1])
    assert not on and "torch is not installed" in what
    ref, _ = H.reference(q, k, v, causal=True)
    naive, _ = H.naive(q, k, v, causal=True)
    H.assert_close_to_reference(np.load(tmp_path / "out.npy"), ref, naive, name="out")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("B, Hq, Hkv, L, D, Dv, causal", [(1, 4, 4, 1024, 64, 64, False), (2, 3, 1, 700, 128, 96, True)])
def test_backward_checks_delta_and_fix_on_two_threads(B, Hq, Hkv, L, D, Dv, causal, threads, monkeypatch):
    """A float32 backward's checks, Δ and LSE rounding fix of dO and Δ on the caller and the pool
    (``cpu._backward_checks_and_delta``), and dQ's parts summed by halves (``cpu._sum_dq_parts``),
    give the serial steps' gradients bit for bit, and a NaN/inf in dO, O or q is found."""
    from dotattn.kernels import _launch

    monkeypatch.setattr(cpu, "f32_split_route", lambda call: False)  # the MKL route's steps
    rng = np.random.default_rng(17)
    q, k = (rng.standard_normal((B, h, L, D), dtype=np.float32) * 3 for h in (Hq, Hkv))
    v = rng.standard_normal((B, Hkv, L, Dv), dtype=np.float32)
    call = semantics.normalize(q, k, v, causal=causal)
    out, lse = cpu.forward(call)
    do = rng.standard_normal(out.shape, dtype=np.float32)
    monkeypatch.setattr(_launch, "num_threads", lambda: threads)
    p = cpu.prepare(call, cpu.DEFAULT_BACKWARD_BLOCK_SIZE)
    finite, delta, do_k = cpu._backward_checks_and_delta(call, p, out, do, lse)
    fix = cpu.lse_rounding_fix(lse)
    assert not np.all(fix == 1.0)  # the fix is applied (scores ≈ 9 · √D: lse's rounding shows)
    expect = (np.einsum("bhld,bhld->bhl", do, out, dtype=np.float32) * fix).astype(np.float32)
    assert finite is True and np.array_equal(delta, expect)
    assert np.array_equal(do_k, do * fix.astype(np.float32)[..., None])
    H.assert_backward_checks_find_nonfinite(q, k, v, out, do, lse, causal=causal, block_size=cpu.DEFAULT_BACKWARD_BLOCK_SIZE)
    grads = cpu.backward(call, out, lse, do)
    monkeypatch.setattr(cpu, "_backward_checks_and_delta", lambda *a: None)
    monkeypatch.setattr(cpu, "_sum_dq_parts", lambda parts, scale, n: _serial_sum(parts, scale))
    serial = cpu.backward(call, out, lse, do)
    assert all(np.array_equal(a, b) for a, b in zip(grads[:3], serial[:3]))


def _serial_sum(parts, scale):
    dq = parts[0]
    for part in parts[1:]:
        dq += part
    dq *= scale
    return dq
