"""The cpu decode kernel's float16 casts (``_cpu_decode_kernels.half_from_float``,
``float_from_half_scaled``) give NumPy's bits: a float16 call's scaled q and its output no
longer go through NumPy's float16 casts (no vector loop for them here: 35 µs of a B1 4k call),
and must not change a bit for it (docs/decoding-log.md, "Reference counting in the per-item
functions, and the float16 casts")."""

from __future__ import annotations

import numpy as np
import pytest

import dotattn
from dotattn import decode_semantics
from dotattn.kernels import _cpu_decode_kernels as K
from dotattn.kernels import cpu_decode


def _special_float32_bits() -> np.ndarray:
    """Float32 patterns where a float16 rounding can go wrong: zeros, ±inf, quiet and signaling
    NaNs (payloads that vanish in the top 10 bits too), float16's overflow and subnormal edges
    with every low-bit ending around the rounding point, and a random sample."""
    edges = []
    for v in (0.0, 65504.0, 65520.0, 65536.0, 2.0**-14, 2.0**-24, 2.0**-25, 2.0**-26, 1.0, 1.5, 3.0e-8):
        b = int(np.float32(v).view(np.uint32))
        edges.extend(range(max(b - 4100, 0), b + 4100))
    nans = [0x7F800000, 0x7F800001, 0x7F801FFF, 0x7F802000, 0x7FC00000, 0x7FFFFFFF, 0x7FA00000, 0x7F8FE000]
    rng = np.random.default_rng(0)
    sample = rng.integers(0, 1 << 32, size=1 << 18, dtype=np.uint64)
    b = np.concatenate([np.array(edges + nans, dtype=np.uint64), sample]).astype(np.uint32)
    return np.concatenate([b, b | np.uint32(0x80000000)])


def test_half_from_float_gives_numpys_bits():
    bits = _special_float32_bits()
    x = bits.view(np.float32)
    with np.errstate(all="ignore"):
        ref = x.astype(np.float16).view(np.uint16)
    got = np.empty(x.shape[0], dtype=np.uint16)
    K.half_from_float(x, got)
    bad = np.nonzero(got != ref)[0]
    assert bad.size == 0, f"{bad.size} patterns differ, first {hex(bits[bad[0]])}: numpy {hex(ref[bad[0]])}, kernel {hex(got[bad[0]])}"


@pytest.mark.parametrize("scale", [0.08838834764831845, 1.0, 3.0e-5, 7.1e4, 0.0, -0.5])
def test_float_from_half_scaled_gives_numpys_bits(scale):
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)  # every float16
    sc = np.float32(scale)
    with np.errstate(all="ignore"):
        ref = np.multiply(h.view(np.float16), sc, dtype=np.float32).view(np.uint32)
    got = np.empty(h.shape[0], dtype=np.float32)
    K.float_from_half_scaled(h, sc, got)
    bad = np.nonzero(got.view(np.uint32) != ref)[0]
    assert bad.size == 0, f"{bad.size} halves differ, first {hex(h[bad[0]])}: numpy {hex(ref[bad[0]])}, kernel {hex(got.view(np.uint32)[bad[0]])}"


def _caches_with_nonfinite_rows(seed, shape, dtype, inf_in):
    """``(rng, k_cache, v_cache)`` of ``shape``: a NaN in sequence 1's first K/V head's keys
    (position 17) and an inf in sequence ``inf_in``'s second head's values (position 40), both
    visible; ``rng`` goes on to draw the rest of the call."""
    rng = np.random.default_rng(seed)
    kc = rng.standard_normal(shape).astype(dtype)
    vc = (rng.standard_normal(shape) * 300).astype(dtype)
    kc[1, 0, 17, 5] = np.nan
    vc[inf_in, 1, 40, 3] = np.inf
    return rng, kc, vc


@pytest.mark.parametrize("parallel_min_bytes", [None, 0])
def test_a_float16_call_gives_the_bits_of_numpys_casts(monkeypatch, parallel_min_bytes):
    """The public call's output with the kernel's casts against the same call with NumPy's (the
    float32 output returned, cast by the public entry's astype; q scaled by np.multiply), NaN
    and ±inf in the cache's visible rows included, small (one entry) and parallel calls."""
    B, Hq, Hkv, L, D = 3, 8, 2, 700, 64
    rng, kc, vc = _caches_with_nonfinite_rows(5, (B, Hkv, L, D), np.float16, inf_in=2)
    q = (rng.standard_normal((B, Hq, 1, D)) * 4).astype(np.float16)
    lengths = np.array([700, 513, 64])
    if parallel_min_bytes is not None:
        real = cpu_decode.decode
        monkeypatch.setattr(cpu_decode, "decode", lambda call, reference=False: real(call, parallel_min_bytes=0))

    def run():
        return dotattn.attention_with_kvcache(q, kc, vc, cache_lengths=lengths, return_lse=True, implementation="cpu")

    decode_semantics.clear_kinds()  # (a kind keeps its derived values: cpu_decode._Derived)
    out, lse = run()
    assert out.dtype == np.float16
    init = cpu_decode._Derived.__init__

    def numpy_casts(self, call):
        init(self, call)
        self.half = False  # q by np.multiply, the float32 output cast by the public entry's astype

    monkeypatch.setattr(cpu_decode._Derived, "__init__", numpy_casts)
    decode_semantics.clear_kinds()
    try:
        out_np, lse_np = run()
    finally:
        monkeypatch.undo()
        decode_semantics.clear_kinds()
    assert out_np.dtype == np.float16
    np.testing.assert_array_equal(out.view(np.uint16), out_np.view(np.uint16))
    np.testing.assert_array_equal(lse, lse_np)


@pytest.mark.parametrize("parallel_min_bytes", [None, 0])
@pytest.mark.parametrize("Lq", [1, 5])
def test_a_float32_q_scaled_in_the_kernel_gives_numpys_product(monkeypatch, parallel_min_bytes, Lq):
    """A C-contiguous float32 q goes to the kernels unscaled, each item's rows multiplied by the
    float32 scale as they are copied (``_item``); a read-only q still takes np.multiply.  Both
    give the same bits — one entry and two threads, one query row per head and five (R 20:
    the GEMM path), NaN and ±inf in visible rows, a scale that is not a power of two."""
    B, Hq, Hkv, L, D = 2, 8, 2, 600, 48
    rng, kc, vc = _caches_with_nonfinite_rows(6, (B, Hkv, L, D), np.float32, inf_in=0)
    q = (rng.standard_normal((B, Hq, Lq, D)) * 4).astype(np.float32)
    q_read_only = q.copy()
    q_read_only.flags.writeable = False
    lengths = np.array([590, 300]) - Lq
    k_new = rng.standard_normal((B, Hkv, Lq, D)).astype(np.float32)
    v_new = rng.standard_normal((B, Hkv, Lq, D)).astype(np.float32)
    if parallel_min_bytes is not None:
        real = cpu_decode.decode
        monkeypatch.setattr(cpu_decode, "decode", lambda call, reference=False: real(call, parallel_min_bytes=0))
    seen = []
    run_serial, run_items = K.run_serial, K.run_items

    def spy_serial(*args):
        seen.append(args[14])  # qscale
        return run_serial(*args)

    def spy_items(counter, total, role, *common):
        seen.append(common[14])
        return run_items(counter, total, role, *common)

    monkeypatch.setattr(K, "run_serial", spy_serial)
    monkeypatch.setattr(K, "run_items", spy_items)
    monkeypatch.setattr(cpu_decode, "USE_PARTNERS", False)  # (the pool's own entry: run_items, spied)

    def run(qq):
        return dotattn.attention_with_kvcache(qq, kc.copy(), vc.copy(), k_new, v_new, cache_lengths=lengths, scale=0.3,
                                              return_lse=True, implementation="cpu")

    out, lse = run(q)
    assert seen and all(np.float32(s) == np.float32(0.3) for s in seen)  # unscaled q, the scale passed on
    seen.clear()
    out_np, lse_np = run(q_read_only)
    assert seen and all(s == 1.0 for s in seen)  # q scaled by np.multiply
    np.testing.assert_array_equal(out.view(np.uint32), out_np.view(np.uint32))
    np.testing.assert_array_equal(lse.view(np.uint32), lse_np.view(np.uint32))
    assert np.isnan(out[1]).any() and np.isinf(out[0]).any()
