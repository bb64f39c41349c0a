"""The cpu backend's workspace (``kernels/_workspace.py``): per-call scratch kept between calls.

What must hold: a call on kept buffers gives the bits of a call on fresh memory, whatever ran
before it (other shapes, other dtypes, interleaved); nothing a call hands back lies in the
workspace, so a later call never changes an earlier result; the buffers are reused (same
addresses) by calls that fit in them; the limit and ``release_workspace`` bound what is kept;
two threads never share a buffer.  No timing here (benchmarks/ measures the speed).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

import dotattn
from dotattn.kernels import _workspace, cpu
from dotattn.semantics import BFLOAT16

import helpers as H

DTYPES = [pytest.param(BFLOAT16, id="bfloat16"), pytest.param(np.float32, id="float32")]
# (shape (B, H, L, D), causal): whole tiles at D 128; causal with a ragged last tile (and the
# bfloat16 Δ's row blocks crossing heads) at D 64; sizes above the small-call kernel's
SHAPES = [((1, 2, 512, 128), False), ((2, 3, 700, 64), True)]


def _operands(shape, dtype, seed):
    """q, k, v, dO at 64-byte boundaries (a bfloat16 K elsewhere takes an aligned copy, the
    workspace's "k tiles": whether it does would depend on where malloc put it)."""
    rng = np.random.default_rng(seed)
    arrays = []
    for _ in range(4):
        x = cpu._empty_aligned(shape, dtype)
        x[...] = rng.standard_normal(shape).astype(np.float32).astype(dtype)
        arrays.append(x)
    return arrays


def _fwd_bwd(shape, causal, dtype, seed=0):
    """The NumPy API's forward and (final) backward: ``[out, lse, dq, dk, dv]``."""
    q, k, v, do = _operands(shape, dtype, seed)
    out, lse = dotattn.attention(q, k, v, causal=causal, implementation="cpu", return_lse=True)
    grads = dotattn.attention_backward(q, k, v, out, lse, do, causal=causal, implementation="cpu")
    return [out, lse, *grads]


def _raw_backward(shape, causal, dtype, seed=0):
    """``cpu.backward`` itself (not final: float32 sums the caller keeps): ``[dq, dk, dv]``."""
    from dotattn import semantics

    q, k, v, do = _operands(shape, dtype, seed)
    call = semantics.normalize(q, k, v, causal=causal)
    out, lse = cpu.forward(call)
    return list(cpu.backward(call, out, lse, do.astype(out.dtype))[:3])


def _fresh(fn, *args):
    """``fn(*args)`` on fresh memory: the workspace dropped before (and kept out of) the call."""
    cpu.release_workspace()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(_workspace.LIMIT_ENV_VAR, "0")
        results = fn(*args)
    assert _workspace.held_bytes(all_threads=False) == 0
    return results


def _kept_buffers() -> list[np.ndarray]:
    return [b for kept in list(_workspace._every) for b in list(kept.buffers.values())]


@pytest.mark.parametrize("dtype", DTYPES)
def test_interleaved_shapes_give_the_bits_of_fresh_calls(dtype):
    fresh = [_fresh(_fwd_bwd, shape, causal, dtype) for shape, causal in SHAPES]
    raw = [_fresh(_raw_backward, shape, causal, dtype) for shape, causal in SHAPES]
    cpu.release_workspace()
    for _ in range(2):  # A, B, A, B: each call on buffers the other shape used (or grew) last
        for (shape, causal), expect, expect_raw in zip(SHAPES, fresh, raw):
            for got, want in zip(_fwd_bwd(shape, causal, dtype), expect):
                H.assert_bitwise_equal(np.asarray(got), np.asarray(want))
            for got, want in zip(_raw_backward(shape, causal, dtype), expect_raw):
                H.assert_bitwise_equal(got, want)
    assert _workspace.held_bytes(all_threads=False) > 0


# Masks under which some key tiles are seen by no query (keys past a sequence's length) or
# some query tiles skip key tiles (windows): the rounded backward's dK/dV scratch is not
# zeroed between calls (the kernel writes every key tile whole), so a stale value there would
# show up as a nonzero gradient of a key no query sees
MASKED = [
    pytest.param(dict(kv_lengths=np.array([300, 1024])), id="kv-lengths"),
    pytest.param(dict(causal=True, kv_lengths=np.array([700, 1024])), id="causal-kv-lengths"),
    pytest.param(dict(causal=True, window=(64, 0)), id="causal-window"),
    pytest.param(dict(window=(128, 0)), id="window"),
]


def _masked_fwd_bwd(shape, dtype, seed, mask):
    q, k, v, do = _operands(shape, dtype, seed)
    out, lse = dotattn.attention(q, k, v, implementation="cpu", return_lse=True, **mask)
    return [out, lse, *dotattn.attention_backward(q, k, v, out, lse, do, implementation="cpu", **mask)]


@pytest.mark.parametrize("mask", MASKED)
@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_key_tiles_after_a_dense_call_give_fresh_bits(dtype, mask):
    shape = (2, 2, 1024, 64)
    expect = _fresh(_masked_fwd_bwd, shape, dtype, 7, mask)
    cpu.release_workspace()
    _fwd_bwd(shape, False, dtype, seed=8)  # dense: every scratch tile written with nonzeros
    got = _masked_fwd_bwd(shape, dtype, 7, mask)
    for g, e in zip(got, expect):
        H.assert_bitwise_equal(np.asarray(g), np.asarray(e))
    if "kv_lengths" in mask:  # dK and dV of keys past sequence 0's length: exact zeros
        past = int(mask["kv_lengths"][0])
        for grad in got[3:5]:
            assert not np.asarray(grad)[0, :, past:].astype(np.float32).any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_results_never_lie_in_the_workspace(dtype):
    cpu.release_workspace()
    shape, causal = SHAPES[0]
    first = _fwd_bwd(shape, causal, dtype, seed=1) + _raw_backward(shape, causal, dtype, seed=1)
    copies = [np.array(x, copy=True) for x in first]
    second = _fwd_bwd(shape, causal, dtype, seed=2) + _raw_backward(shape, causal, dtype, seed=2)
    kept = _kept_buffers()
    assert kept
    for x in first + second:
        assert not any(np.shares_memory(np.asarray(x), b) for b in kept)
    for x, copy in zip(first, copies):  # the second call left the first call's results alone
        H.assert_bitwise_equal(np.asarray(x), copy)


@pytest.mark.parametrize("dtype", DTYPES)
def test_buffers_are_reused_by_calls_that_fit(dtype):
    cpu.release_workspace()
    (big, causal_big), (small, causal_small) = SHAPES[0], ((1, 1, 512, 128), True)  # (fewer heads: fits)
    _fwd_bwd(big, causal_big, dtype)
    roles = _workspace.held_roles()
    # the backward's dQ parts (bfloat16, rounded into new arrays; float32 on the split route,
    # summed transposed) — float32 on MKL's route sums dQ in place as part 0 and keeps only dO
    # with its LSE fix — and the packings or pieces of the dtype's route
    prepared = _prepared(big, causal_big, dtype)
    if dtype == BFLOAT16 or cpu.f32_split_route(prepared[0]):
        assert "bwd dq parts" in roles
    else:
        assert set(roles) == {"bwd dO fixed"}
    if dtype == BFLOAT16 and cpu.bf16_backward_amx(*prepared):
        assert {"bwd q pairs t", "bwd dO row pairs", "bwd dk tiles", "v tiles"} <= set(roles)
    addresses = {role: _workspace.buffer_address(role) for role in roles}
    held = _workspace.held_bytes(all_threads=False)
    for shape, causal in ((big, causal_big), (small, causal_small)):  # the same shape, then a smaller one
        _fwd_bwd(shape, causal, dtype, seed=5)
        assert {role: _workspace.buffer_address(role) for role in roles} == addresses
        assert _workspace.held_bytes(all_threads=False) == held


def _prepared(shape, causal, dtype):
    from dotattn import semantics

    q, k, v, _ = _operands(shape, dtype, 0)
    call = semantics.normalize(q, k, v, causal=causal)
    return call, cpu.prepare(call, cpu.BF16_BACKWARD_BLOCK_SIZE)


def test_limit_and_release(monkeypatch):
    shape, causal = SHAPES[0]
    cpu.release_workspace()
    _fwd_bwd(shape, causal, BFLOAT16)
    held = _workspace.held_bytes()
    assert held > 0
    assert cpu.release_workspace() == held
    assert _workspace.held_bytes() == 0
    # a limit below one call's scratch: the buffers that fit are kept, the rest are fresh per call
    monkeypatch.setenv(_workspace.LIMIT_ENV_VAR, "1")
    _fwd_bwd(shape, causal, BFLOAT16)
    assert 0 < _workspace.held_bytes(all_threads=False) <= 1 << 20
    monkeypatch.setenv(_workspace.LIMIT_ENV_VAR, "0")
    cpu.release_workspace()
    _fwd_bwd(shape, causal, BFLOAT16)
    assert _workspace.held_bytes() == 0


def test_scratch_rules():
    cpu.release_workspace()
    a = _workspace.scratch("test a", (3, 100), np.float32)
    assert a.ctypes.data % 64 == 0 and a.flags.c_contiguous and a.shape == (3, 100)
    a[...] = 7
    # the same role, a request that fits: the same memory, the last values unless zeros are asked
    b = _workspace.scratch("test a", (10, 10), np.float64)
    assert b.ctypes.data == a.ctypes.data and b.dtype == np.float64
    z = _workspace.scratch("test a", (300,), np.float32, zero=True)
    assert z.ctypes.data == a.ctypes.data and not z.any()
    # a larger request replaces the buffer; another role never shares one
    big = _workspace.scratch("test a", (4 << 20,), np.uint8, zero=True)
    other = _workspace.scratch("test b", (4 << 20,), np.uint8)
    assert not np.shares_memory(big, other)
    assert _workspace.held_roles() == {"test a": 4 << 20, "test b": 4 << 20}
    big[:] = 1
    _workspace.zero_fill(big)  # (in halves on two threads)
    assert not big.any()
    cpu.release_workspace()


def test_threads_keep_their_own_buffers():
    """Two threads calling at once (their kernel launches serialized by the launch lock, their
    packings and sums not) get the bits of fresh calls, from buffers of their own."""
    cases = [(SHAPES[0], BFLOAT16), (SHAPES[1], np.float32)]
    fresh = [_fresh(_fwd_bwd, shape, causal, dtype) for (shape, causal), dtype in cases]
    cpu.release_workspace()
    results, addresses, errors = {}, {}, []

    def worker(i):
        try:
            (shape, causal), dtype = cases[i]
            for _ in range(3):
                results[i] = _fwd_bwd(shape, causal, dtype)
            addresses[i] = {role: _workspace.buffer_address(role) for role in _workspace.held_roles()}
        except Exception as exc:  # (reported by the main thread)
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(2):
        for got, want in zip(results[i], fresh[i]):
            H.assert_bitwise_equal(np.asarray(got), np.asarray(want))
    shared = set(addresses[0].values()) & set(addresses[1].values())
    assert addresses[0] and addresses[1] and not shared
    assert _workspace.held_bytes() >= _workspace.held_bytes(all_threads=False)
    cpu.release_workspace()
    assert _workspace.held_bytes() == 0


def test_bf16_delta_in_row_blocks_is_einsums():
    """The bfloat16 Δ summed over blocks of widened rows (``DELTA_BLOCK_ROWS``, blocks crossing
    heads and a ragged last one) is ``einsum``'s over the whole float32 arrays, bit for bit."""
    from dotattn import semantics
    from dotattn.kernels._cpu_isa import _cpu_features

    if not {"avx512bf16", "amx-bf16"} & _cpu_features():  # bfloat16 operands compute in float32
        pytest.skip(H.lacks("AVX-512 BF16", "no bfloat16 backward here: its Δ pass never runs"))

    shape = (2, 3, 700, 64)
    q, k, v, do = _operands(shape, BFLOAT16, 4)
    out = _operands(shape, BFLOAT16, 5)[0]
    call = semantics.normalize(q, k, v)
    p = cpu.prepare(call, cpu.BF16_BACKWARD_BLOCK_SIZE)
    lse = np.zeros(shape[:3], np.float32)
    finite, delta, _ = cpu._backward_checks_and_delta(call, p, out, do, lse)
    assert finite
    expect = np.einsum("bhld,bhld->bhl", do.astype(np.float32), out.astype(np.float32), dtype=np.float32)
    H.assert_bitwise_equal(delta, expect, name="delta")


def _decode_call(monkeypatch, seed=0, B=2, Hq=8, Hkv=2, L=700, D=64):
    """A cpu-backend decode call of a few chunks on the partner threads (the path whose partial
    results are kept scratch; the one-entry kernel allocates its own inside Numba)."""
    from dotattn.kernels import cpu_decode

    monkeypatch.setattr(cpu_decode, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(cpu_decode, "POOL_ONLY_BYTES", 0)
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, Hq, 1, D)).astype(np.float32)
    k = rng.standard_normal((B, Hkv, L, D)).astype(np.float32)
    v = rng.standard_normal((B, Hkv, L, D)).astype(np.float32)
    return lambda: dotattn.attention_with_kvcache(q, k, v, cache_lengths=np.array([L, L // 2]),
                                                  implementation="cpu", return_lse=True)


def test_decode_parts_live_in_the_workspace_and_are_released(monkeypatch):
    """The decode kernels' partial outputs and LSEs are kept in the calling thread's workspace
    (until 6 Dec 2026 a grow-only dict of their own, which neither the limit nor
    release_workspace reached): release_workspace drops them — every thread's — and the next
    call gives the same bits."""
    monkeypatch.delenv(_workspace.LIMIT_ENV_VAR, raising=False)
    call = _decode_call(monkeypatch)
    cpu.release_workspace()
    want = call()
    assert any(role.startswith("decode part") for role in _workspace.held_roles())
    held = []

    def worker():  # another thread's parts: released from this one
        call()
        held.append(sorted(r for r in _workspace.held_roles() if r.startswith("decode part")))

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert held[0]
    assert cpu.release_workspace() > 0
    assert _workspace.held_bytes() == 0
    got = call()
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def test_decode_parts_keep_within_the_limit(monkeypatch):
    """With DOTATTN_CPU_WORKSPACE_MB=0 a decode call keeps nothing, with the same bits."""
    call = _decode_call(monkeypatch, seed=1)
    monkeypatch.delenv(_workspace.LIMIT_ENV_VAR, raising=False)
    want = call()
    cpu.release_workspace()
    monkeypatch.setenv(_workspace.LIMIT_ENV_VAR, "0")
    got = call()
    assert _workspace.held_bytes(all_threads=False) == 0
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
