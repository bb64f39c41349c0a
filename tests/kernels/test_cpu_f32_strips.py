"""float32's split route, forward: PARTIAL tiles in query strips (``_cpu_kernels._tile_in_strips``).

A PARTIAL tile whose rows see very different keys (a causal diagonal) runs as strips of
``cpu.SPLIT_STRIP_ROWS`` query rows, each over only the keys its rows may see
(``_cpu_kernels._strips_pay`` decides per tile).  Each score is the same bits whatever part of
a tile computes it (the split product's order is per element), the running max, sum and
accumulator are per row, and the keys cut off have P = 0; only the lazy softmax step's check
(no row's maximum grown past 2^8) is per strip instead of per tile.  These tests hold the
strips to the float64 reference, to the whole tiles' bits where every strip takes its whole
tile's step, and check which tiles take them.  The suite's
default tiles are small, so the calls here ask for 256-row tiles.
"""

from __future__ import annotations

import numpy as np
import pytest

from dotattn import semantics
from dotattn.kernels import _cpu_isa, _cpu_kernels, cpu

import helpers as H

AMX = cpu.f32_products_path()[0]
TILES = (256, 256)


@pytest.fixture(autouse=True)
def split_route(monkeypatch):
    monkeypatch.setenv(_cpu_isa.F32_PRODUCTS_ENV_VAR, "amx5")  # (windowed calls too)


CASES = {
    "causal aligned": dict(Lq=768, Lk=768, D=64, causal=True),
    "causal, 128-key prefix": dict(Lq=472, Lk=600, D=64, causal=True),
    "top-left Lq > Lk": dict(Lq=700, Lk=333, D=64, causal="top_left"),
    "causal odd D": dict(Lq=517, Lk=517, D=59, causal=True, scale=2.5),
    "causal D128": dict(Lq=512, Lk=512, D=128, causal=True),
    "causal + lengths": dict(Lq=520, Lk=560, D=64, causal=True, q_lengths=[520, 301], kv_lengths=[560, 333]),
    "window": dict(Lq=600, Lk=600, D=64, window=(100, 30)),
}


def _call(case, seed=3):
    c = dict(CASES[case])
    opts = {k: c.pop(k) for k in ("causal", "window", "scale", "q_lengths", "kv_lengths") if k in c}
    q, k, v = H.random_qkv(seed, batch=(2,), Hq=2, dtype=np.float32, q_lengths=opts.get("q_lengths"),
                           kv_lengths=opts.get("kv_lengths"), **c)
    return q, k, v, opts, semantics.normalize(q, k, v, **opts)


def _tiles_in_strips(call) -> list[tuple[int, int, int]]:
    """``(b, qb, kb)`` of every PARTIAL tile that the forward computes in strips, by the kernel's rule."""
    p = cpu.prepare(call, TILES, forward=True, split=True)
    o = p.options._replace(strip_rows=cpu.SPLIT_STRIP_ROWS)
    BQ, BK = o.BQ, p.kp.shape[3]
    lo, hi = np.empty(BQ, np.int64), np.empty(BQ, np.int64)
    taken = []
    for b in range(call.B):
        for qb in range(-(-call.Lq // BQ)):
            i0, nrows, nr = _cpu_kernels._rows(b, qb, o)
            for kb in range(p.kp.shape[2]):
                if nr > 0 and _cpu_kernels._tile_class(b, 0, qb, kb, BK, o) == _cpu_kernels.PARTIAL:
                    if _cpu_kernels._strips_pay(lo, hi, b, i0, nr, kb * BK, BK, o):
                        taken.append((b, qb, kb))
    return taken


@pytest.mark.parametrize("case", list(CASES))
def test_strips_match_the_reference(case, monkeypatch):
    q, k, v, opts, call = _call(case)
    assert cpu.f32_split_route(call) == AMX
    ref_out, ref_lse = H.reference(q, k, v, **opts)
    naive_out, naive_lse = H.naive(q, k, v, **opts)
    for rows in (0, 32, 64, 128):
        monkeypatch.setattr(cpu, "SPLIT_STRIP_ROWS", rows)
        out, lse = cpu.forward(call, block_size=TILES)
        H.assert_close_to_reference(out, ref_out, naive_out, name=f"out, strips of {rows}")
        H.assert_close_to_reference(lse, ref_lse, naive_lse, name=f"lse, strips of {rows}")


@pytest.mark.parametrize("case", ["causal aligned", "causal, 128-key prefix", "top-left Lq > Lk", "causal + lengths"])
def test_strips_keep_the_whole_tiles_bits_where_the_steps_agree(case, monkeypatch):
    """At scale 1 every strip here takes the softmax step its whole tile takes (the lazy one:
    no row's maximum grows by more than 2^8), so the strips give the whole tiles' bits — the
    scores, the row sums (whole 32-key blocks) and P·V over only zeros fewer.  (At scale 2.5,
    or a window, a strip's lazy check — over its rows only — passes where the whole tile's
    failed: other bits, as accurate: the test above.)"""
    _, _, _, _, call = _call(case)
    results = {}
    for rows in (0, cpu.SPLIT_STRIP_ROWS):
        monkeypatch.setattr(cpu, "SPLIT_STRIP_ROWS", rows)
        results[rows] = cpu.forward(call, block_size=TILES)
    assert _tiles_in_strips(call)
    strips, whole = results[cpu.SPLIT_STRIP_ROWS], results[0]
    H.assert_bitwise_equal(strips[0], whole[0], "out")
    H.assert_bitwise_equal(strips[1], whole[1], "lse")


def test_strips_on_the_diagonals_only():
    # aligned causal, 768 rows at 256 × 256: the three diagonal tiles of each sequence, no other
    # PARTIAL tile; a 128-key prefix: the tiles the diagonal cuts at mid-tile (not those whose
    # rows all see at least half of their keys); a dense ragged last key tile and key lengths:
    # none (every row sees the same keys)
    assert _tiles_in_strips(_call("causal aligned")[4]) == [(b, t, t) for b in range(2) for t in range(3)]
    prefix = _tiles_in_strips(_call("causal, 128-key prefix")[4])
    assert prefix and all(kb == qb + 1 for _, qb, kb in prefix)
    q, k, v = H.random_qkv(1, batch=(2,), Hq=2, Lq=333, Lk=700, D=64, dtype=np.float32, kv_lengths=[700, 401])
    assert _tiles_in_strips(semantics.normalize(q, k, v, kv_lengths=[700, 401])) == []


def test_strips_with_rows_that_see_no_key(monkeypatch):
    # bottom-right causal with more queries than keys (the first 40 rows see none) and a
    # sequence of no keys: zeros and lse −inf, the same bits as whole tiles
    q, k, v = H.random_qkv(5, batch=(2,), Hq=2, Lq=300, Lk=260, D=64, dtype=np.float32, kv_lengths=[0, 260])
    call = semantics.normalize(q, k, v, causal=True, kv_lengths=[0, 260])
    assert _tiles_in_strips(call)
    whole = None
    for rows in (0, 64):
        monkeypatch.setattr(cpu, "SPLIT_STRIP_ROWS", rows)
        out, lse = cpu.forward(call, block_size=TILES)
        assert np.all(out[0] == 0) and np.all(lse[0] == -np.inf)
        assert np.all(out[1, :, :40] == 0) and np.all(lse[1, :, :40] == -np.inf)
        if whole is None:
            whole = out, lse
    H.assert_bitwise_equal(out, whole[0], "out")
    H.assert_bitwise_equal(lse, whole[1], "lse")
    ref_out, _ = H.reference(q, k, v, causal=True, kv_lengths=[0, 260])
    naive_out, _ = H.naive(q, k, v, causal=True, kv_lengths=[0, 260])
    H.assert_close_to_reference(out, ref_out, naive_out, name="out")


def test_product_from_a_row_is_the_products_sub_tile():
    if not AMX:
        assert not cpu.f32_products_path()[0]
        return
    from dotattn.kernels import _cpu_amx_f32 as F
    from dotattn.kernels._cpu_amx import tile_config

    M, N, D = 128, 96, 64
    _, _, ap, bp = H.split_product_operands(4, M, N, D, a_rows=M + 1)
    cfg = tile_config()
    whole = np.empty((M, N), np.float32)
    F.product(ap, bp[0, 0], whole, cfg)
    part = np.empty((64, 64), np.float32)
    F.product_from(ap, 32, bp[0, 0][:, :, 32:96], part, cfg)
    H.assert_bitwise_equal(part, whole[32:96, 32:96], "rows 32-95, columns 32-95")


# The backward on the split route with all five products (Options.split_all) trims a PARTIAL
# tile to the keys its rows see, in 32-key steps (_cpu_kernels._split_tile over keys c0 … c1):
# the keys cut off have P = dS = 0 and would add exact zeros (the same bits as the whole tile:
# cpu_ab_trees.py's hashes, docs/performance.md).  These hold it to the float64 reference.
BACKWARD_CASES = ["causal aligned", "causal, 128-key prefix", "top-left Lq > Lk",  # (head dims in whole 32-steps)
                  "causal D128", "causal + lengths"]


def _trimmed_backward_tiles(call) -> int:
    """How many PARTIAL tiles the split backward computes over fewer keys than the tile's."""
    p = cpu.prepare(call, cpu.F32_SPLIT_BACKWARD_BLOCK_SIZE, split=True)
    o, BK = p.options, p.kp.shape[3]
    lo, hi = np.empty(o.BQ, np.int64), np.empty(o.BQ, np.int64)
    n = 0
    for b in range(call.B):
        for kb in range(p.kp.shape[2]):
            for qb in range(-(-call.Lq // o.BQ)):
                i0, nrows, nr = _cpu_kernels._rows(b, qb, o)
                if nr > 0 and _cpu_kernels._tile_class(b, 0, qb, kb, BK, o) == _cpu_kernels.PARTIAL:
                    c0, c1 = _cpu_kernels._key_extent(lo, hi, b, i0, nr, kb * BK, BK, o)
                    n += c1 - c0 < BK
    return n


@pytest.mark.parametrize("case", BACKWARD_CASES)
def test_backward_trimmed_tiles_match_the_reference(case):
    q, k, v, opts, call = _call(case)
    assert cpu.f32_split_route(call) == AMX
    if AMX:
        assert _trimmed_backward_tiles(call) > 0  # (the case reaches the trimmed tiles)
    dout = np.random.default_rng(4).standard_normal(q.shape[:3] + (v.shape[3],)).astype(np.float32)
    out, lse = cpu.forward(call)
    grads = cpu.backward(call, out, lse, dout)[:3]
    H.assert_forward_backward_close_to_reference(q, k, v, dout, out, lse, grads, **opts)
