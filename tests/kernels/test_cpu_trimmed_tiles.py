"""PARTIAL tiles trimmed to the keys their rows may see (``_cpu_kernels._key_extent``).

On MKL's products (float32's MKL route, float64, bfloat16 without AMX) a PARTIAL tile's
scores, exp pass and products run only over the keys ``c0 … c1−1`` that one of its query rows
may see by lengths, causal and window, rounded out to ``TRIM_KEYS``.  The suite's small tiles
(≤ 16 keys) never trim, and the suite runs float32's causal calls on the split-AMX route
(tests/conftest.py), so these tests pin the MKL route and take tiles of 64–512 keys.
"""

from __future__ import annotations

import numpy as np
import pytest

from dotattn import semantics
from dotattn.kernels import _cpu_isa, _cpu_kernels, cpu

import helpers as H


@pytest.fixture(autouse=True)
def mkl_route(monkeypatch):
    monkeypatch.setenv(_cpu_isa.F32_PRODUCTS_ENV_VAR, "mkl")


def _tile_visibility(call, b, i0, i1, j0, j1):
    rows = np.arange(i0, i1)[:, None]
    cols = np.arange(j0, j1)[None, :]
    q_len = int(call.q_lengths[b]) if call.q_lengths is not None else call.Lq
    kv_len = int(call.kv_lengths[b]) if call.kv_lengths is not None else call.Lk
    vis = semantics.visibility(
        rows, cols, causal=call.causal, window=call.window, q_offset=kv_len - q_len, q_len=q_len, kv_len=kv_len
    )
    return np.broadcast_to(True if vis is None else vis, (i1 - i0, j1 - j0))


EXTENT_CASES = {
    "causal 1317": dict(Lq=1317, Lk=1317, tiles=(256, 512), opts=dict(causal=True)),
    "causal Lq < Lk": dict(Lq=700, Lk=1317, tiles=(256, 512), opts=dict(causal=True)),
    "top-left Lq > Lk": dict(Lq=1317, Lk=700, tiles=(128, 256), opts=dict(causal="top_left")),
    "window": dict(Lq=900, Lk=900, tiles=(128, 128), opts=dict(window=(300, 17))),
    "lengths causal": dict(Lq=600, Lk=800, tiles=(64, 128), opts=dict(causal=True),
                           q_lengths=np.array([600, 333]), kv_lengths=np.array([800, 417])),
}


@pytest.mark.parametrize("case", list(EXTENT_CASES))
def test_key_extent_holds_every_visible_key_and_no_more_than_a_block(case):
    c = EXTENT_CASES[case]
    B = 1 if "q_lengths" not in c else len(c["q_lengths"])
    q = np.zeros((B, 1, c["Lq"], 8), np.float32)
    k = v = np.zeros((B, 1, c["Lk"], 8), np.float32)
    opts = dict(c["opts"])
    if "q_lengths" in c:
        opts.update(q_lengths=c["q_lengths"], kv_lengths=c["kv_lengths"])
    call = semantics.normalize(q, k, v, **opts)
    BQ, BK = c["tiles"]
    o = cpu.prepare(call, (BQ, BK)).options
    lo, hi = np.empty(BQ, np.int64), np.empty(BQ, np.int64)
    T = _cpu_kernels.TRIM_KEYS
    trimmed = 0
    for b in range(B):
        for qb in range(-(-call.Lq // BQ)):
            i0, i1 = qb * BQ, min(call.Lq, (qb + 1) * BQ)
            nr = min(i1, int(o.q_lens[b])) - i0
            for kb in range(-(-call.Lk // BK)):
                if _cpu_kernels._tile_class(b, 0, qb, kb, BK, o) != _cpu_kernels.PARTIAL or nr <= 0:
                    continue
                j0 = kb * BK
                c0, c1 = _cpu_kernels._key_extent(lo, hi, b, i0, nr, j0, BK, o)
                vis = _tile_visibility(call, b, i0, i1, j0, min(call.Lk, j0 + BK))
                cols = np.flatnonzero(vis.any(axis=0))
                if cols.size == 0:
                    assert (c0, c1) == (0, BK)
                    continue
                assert c0 == cols[0] // T * T, (b, qb, kb)
                assert c1 == min(BK, (cols[-1] // T + 1) * T), (b, qb, kb)
                trimmed += c1 - c0 < BK
    assert trimmed > 0


def _check(q, k, v, tiles, **options):
    """cpu forward and backward with ``tiles`` against the float64 reference
    (``helpers.assert_forward_backward_close_to_reference``: 2× naive out, 3× gradients)."""
    dout = np.random.default_rng(7).standard_normal(q.shape[:-1] + (v.shape[-1],)).astype(q.dtype)
    call = semantics.normalize(q, k, v, **options)
    out, lse = cpu.forward(call, block_size=tiles)
    grads = cpu.backward(call, out, lse, dout, want_dbias=call.bias is not None, block_size=tiles)
    ours = grads[:3] + ((semantics.reduce_bias_grad(call, grads[3]),) if grads[3] is not None else ())
    H.assert_forward_backward_close_to_reference(q, k, v, dout, out, lse, ours, **options)
    return out, grads


REFERENCE_CASES = {
    # (B, Hq, Hkv, Lq, Lk, D, tiles, options)
    "causal 317, default tiles": (1, 2, 2, 317, 317, 64, None, dict(causal=True)),
    "causal Lq < Lk": (1, 2, 2, 150, 333, 32, (64, 128), dict(causal=True)),
    "top-left Lq > Lk": (1, 2, 2, 333, 150, 32, (64, 128), dict(causal="top_left")),
    "window": (1, 2, 2, 300, 300, 32, (64, 128), dict(window=(70, 5))),
    "lengths causal": (2, 2, 2, 260, 290, 32, (64, 128), dict(causal=True)),
    "gqa causal": (1, 6, 2, 270, 270, 32, (64, 128), dict(causal=True)),
    "dropout causal": (1, 2, 2, 200, 200, 32, (64, 128), dict(causal=True, dropout_p=0.25, seed=5)),
    "softcap bias causal": (1, 2, 2, 200, 230, 32, (64, 128), dict(causal=True, softcap=8.0, bias=True)),
    "segments causal": (1, 2, 2, 250, 250, 32, (64, 128), dict(causal=True, segments=True)),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", list(REFERENCE_CASES))
def test_trimmed_tiles_match_the_reference(case, dtype):
    B, Hq, Hkv, Lq, Lk, D, tiles, options = REFERENCE_CASES[case]
    options = dict(options)
    q_len = kv_len = None
    if case == "lengths causal":
        q_len, kv_len = np.array([260, 131]), np.array([290, 97])
        options.update(q_lengths=q_len, kv_lengths=kv_len)
    if options.pop("bias", False):
        options["bias"] = np.random.default_rng(1).standard_normal((Hq, Lq, Lk)).astype(dtype)
    if options.pop("segments", False):
        options["segment_ids"] = np.repeat(np.arange(3), [90, 100, 60])[None]
    q, k, v = H.random_qkv(11, batch=(B,), Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D, dtype=dtype,
                           q_lengths=q_len, kv_lengths=kv_len)
    _check(q, k, v, tiles, **options)


def test_trimmed_tiles_keep_dq_parts_bitwise_whoever_runs_them(monkeypatch):
    """dQ's parts stay bitwise the same with trimmed tiles whichever thread runs a part (as
    tests/kernels/test_cpu.py checks for whole tiles): three parts, the team's kernel against
    every part run by the calling thread, and a second team call."""
    q, k, v = H.random_qkv(4, batch=(2,), Hq=4, Hkv=2, Lq=700, Lk=1317, D=64, dtype=np.float32)
    dout = np.random.default_rng(2).standard_normal(q.shape).astype(np.float32)
    call = semantics.normalize(q, k, v, causal=True)
    out, lse = cpu.forward(call)
    monkeypatch.setattr(cpu, "_num_threads", lambda: 3)
    team = cpu.backward(call, out, lse, dout, serial=False)[:3]
    again = cpu.backward(call, out, lse, dout, serial=False)[:3]
    kernel = _cpu_kernels.backward

    def one_thread(*args):  # every part on the calling thread: the others delayed for good
        *args, nchunks = args
        _cpu_kernels._backward_chunk(np.zeros(1, dtype=np.int64), nchunks, *args)

    one_thread.overloads, one_thread.stats = kernel.overloads, kernel.stats
    monkeypatch.setattr(_cpu_kernels, "backward", one_thread)
    alone = cpu.backward(call, out, lse, dout, serial=False)[:3]
    for name, a, b, c in zip(("dq", "dk", "dv"), team, again, alone):
        H.assert_bitwise_equal(a, b, name)
        H.assert_bitwise_equal(a, c, name)
