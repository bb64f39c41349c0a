"""The ``cpu`` decode kernel's merge of a sequence with one chunk (``_finish``'s shortcut).

A sequence of up to ``SPLIT_SIZE`` keys has one part per K/V head; ``_finish`` then writes
``0 + o`` and the part's LSE straight into the output rows instead of ``_merge``'s weights
(``exp(lse − M)``, ``log Σ``).  Its bits must be ``_merge``'s for every kind of part: finite
rows, ``−0`` outputs and LSEs (IEEE: ``0 + 1·(−0) = +0``), rows without keys (``−inf``), NaN
and ``+inf`` LSEs (``_merge``'s ``exp(inf − inf)`` makes the row NaN), NaN and ±inf outputs.
"""

from __future__ import annotations

import numpy as np
import pytest

import decode_cases as C

pytestmark = pytest.mark.skipif("cpu" not in C.decode_backends(), reason="the cpu decode kernel is not under test")

K = pytest.importorskip("dotattn.kernels._cpu_decode_kernels")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_one_chunk_merges_give_merge_bits(dtype):
    rng = np.random.default_rng(3)
    B, Hkv, G, Lq, Dv = 2, 3, 2, 2, 19
    R = G * Lq
    nch = np.ones(B, dtype=np.int64)
    start = np.arange(0, B * Hkv + 1, Hkv, dtype=np.int64)
    part_o = rng.standard_normal((B * Hkv, R, Dv)).astype(dtype)
    part_o[0, 0, :5] = [-0.0, np.nan, np.inf, -np.inf, 0.0]
    part_o[1, :, :] = -0.0
    part_lse = rng.standard_normal((B * Hkv, R)).astype(dtype) * 30
    part_lse[1, :] = [-0.0, 0.0, -np.inf, np.nan]
    part_lse[2, :] = [np.inf, -np.inf, 1e30, -1e30]
    part_o[2, 1] = 0.0  # a row without keys: zeros, as _chunk writes them
    out = np.full((B, G * Hkv, Lq, Dv), 7.0, dtype=dtype)
    lse = np.full((B, G * Hkv, Lq), 7.0, dtype=dtype)
    rows_o, rows_l = np.empty((R, Dv), dtype=dtype), np.empty(R, dtype=dtype)
    wbuf, wcast = np.empty(1, dtype=np.float64), np.empty(1, dtype=dtype)
    for pair in range(B * Hkv):
        K._finish(pair, Hkv, nch, start, part_o, part_lse, out, lse, rows_o, rows_l, wbuf, wcast)
    bits = np.uint32 if dtype == np.float32 else np.uint64
    for pair in range(B * Hkv):
        b, hk = divmod(pair, Hkv)
        K._merge(part_o, part_lse, int(start[b]) + hk, 1, rows_o, rows_l, wbuf, wcast)
        got_o = out[b, hk * G : (hk + 1) * G].reshape(R, Dv)
        got_l = lse[b, hk * G : (hk + 1) * G].reshape(R)
        np.testing.assert_array_equal(got_o.view(bits), rows_o.view(bits), err_msg=f"pair {pair} out")
        np.testing.assert_array_equal(got_l.view(bits), rows_l.view(bits), err_msg=f"pair {pair} lse")
    # the cases are there: +0 from −0, NaN rows from NaN and +inf LSEs, empty rows
    assert np.signbit(part_o[1]).all() and not np.signbit(out[0, 2:4]).any()
    assert np.isnan(lse[0, 4, 0]) and np.isnan(out[0, 4, 0]).all() and lse[0, 4, 1] == -np.inf
    assert np.isnan(lse[0, 3, 1]) and np.isnan(out[0, 3, 1]).all()
