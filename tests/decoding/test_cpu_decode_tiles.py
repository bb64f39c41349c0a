"""The ``cpu`` decode kernel's narrow register blocks (AVX2 targets) give the wide blocks' bits.

Where the compile target lacks AVX-512 (an AVX2-only Zen 3), the 16-lane passes run their
register blocks in narrower passes (``_cpu_decode_kernels.NARROW_TILES``: the scores' block in
passes of ``SCORES_NARROW_ACCS`` accumulators, ``P·V`` in tiles of ``PV_NARROW_TILE`` pieces), so
their accumulators stay in AVX2's 16 registers.  Each accumulator gets the same FMAs in the same
order either way, so both must give the same bits.  Here both forms are compiled on this machine
(the flag forced each way; small wrappers, not cached) and run on the same chunks: every row
count of a register block's switch (1–8 rows), chunks ending mid-block, the next item's
requests on and off — the fused pass of 16-bit caches by default; float32 caches and the three
passes (head dims with a masked tail piece among them) with ``-m slow``.
"""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

import decode_cases as C

pytestmark = pytest.mark.skipif("cpu" not in C.decode_backends(), reason="the cpu decode kernel is not under test")

K = pytest.importorskip("dotattn.kernels._cpu_decode_kernels")


def _wrappers(narrow: bool, full: bool):
    """The fused pass (and with ``full`` the three passes' scores and P·V, and float32 caches
    beside 16-bit ones), compiled with NARROW_TILES = narrow (fastmath as the kernel's ``_chunk``
    that inlines them).  Each compile takes ≈ 11 s here: the default run compiles two."""
    saved = K.NARROW_TILES, K._scores_keys_per_pass, K._pv_pieces_per_pass
    seen = set()  # the narrow argument the block shapes were asked for with, while compiling

    def scores_keys_per_pass(rows, flag):
        seen.add(flag)
        return saved[1](rows, flag)

    def pv_pieces_per_pass(rows, flag):
        seen.add(flag)
        return saved[2](rows, flag)

    K.NARROW_TILES, K._scores_keys_per_pass, K._pv_pieces_per_pass = narrow, scores_keys_per_pass, pv_pieces_per_pass
    try:
        fused16, scores16, pv16 = K._fused16, K._scores16, K._pv16

        @njit(cache=False, fastmath={"nsz", "contract", "reassoc"}, _nrt=False)
        def fused(q, R, D, flat, kind, offs, n, s, Dv, o, m, st, npf, ab):
            fused16(q, R, D, flat, kind, offs, n, s, s.shape[0] // R, flat, offs, Dv, o, m, st, offs, offs, npf, np.float32(0.0), ab, 0)

        @njit(cache=False, fastmath={"nsz", "contract", "reassoc"}, _nrt=False)
        def passes(q, R, D, flat, kind, offs, n, s, Dv, o, npf):
            ns = s.shape[0] // R
            scores16(q, R, D, flat, kind, offs, n, s, ns, flat, offs, Dv, offs, npf)
            pv16(s, ns, R, n, flat, kind, offs, Dv, o, flat, offs, npf, D)

        # compiled now, while the flag holds (a later first call would read it then)
        rng = np.random.default_rng(0)
        flats = (np.zeros(64 * 128, np.uint16),) + ((rng.standard_normal(64 * 128).astype(np.float32),) if full else ())
        for flat in flats:
            q = np.zeros(4 * 128, np.float32)
            offs = np.arange(64, dtype=np.int64) * 128
            s = np.zeros(4 * 64, np.float32)
            o = np.zeros(4 * 128, np.float32)
            fused(q, 4, 128, flat, 0 if flat.dtype == np.float32 else K.KIND_F16, offs, 64, s, 128, o,
                  np.full(4, -np.inf, np.float32), np.zeros(4 * K.FUSED_STATS, np.float32), 0, np.zeros(8, np.float32))
            if full:
                passes(q, 4, 128, flat, 0 if flat.dtype == np.float32 else K.KIND_F16, offs, 64, s, 128, o, 0)
        assert seen == {narrow}, seen  # the flag reached the codegen of the blocks
        return fused, (passes if full else None)
    finally:
        K.NARROW_TILES, K._scores_keys_per_pass, K._pv_pieces_per_pass = saved


def _cache(rng, dtype: str, n: int, D: int):
    x = rng.standard_normal(n * D).astype(np.float32)
    if dtype == "float32":
        return x, K.KIND_FLOAT
    if dtype == "float16":
        return x.astype(np.float16).view(np.uint16), K.KIND_F16
    return (x.view(np.uint32) >> 16).astype(np.uint16), K.KIND_BF16


def test_narrow_and_wide_blocks_of_the_fused_16bit_pass_give_the_same_bits():
    # the decode path of a float16 / bfloat16 cache; one test for both: two compiles
    both = {narrow: _wrappers(narrow, full=False) for narrow in (False, True)}
    for dtype in ("float16", "bfloat16"):
        _same_bits(both, dtype)


@pytest.mark.slow
def test_narrow_and_wide_register_blocks_give_the_same_bits_on_every_route():
    # float32 caches too, and the three passes (chunks the fused pass does not take): 8 compiles
    both = {narrow: _wrappers(narrow, full=True) for narrow in (False, True)}
    for dtype in ("float32", "float16", "bfloat16"):
        _same_bits(both, dtype)


def _same_bits(both, dtype):
    rng = np.random.default_rng(7)
    cases = 0
    for R in (1, 2, 3, 4, 5, 8):
        for D in (64, 128, 80, 72):  # 72: a masked tail piece (the three passes only; the fused pass needs Dv % 16 == 0)
            for n in (40, 64):
                for npf in (0, n):
                    flat, kind = _cache(rng, dtype, n, D)
                    offs = rng.permutation(n).astype(np.int64) * D  # rows in any order, as a paged cache's
                    q = (rng.standard_normal(R * D) * D**-0.5).astype(np.float32)
                    ns = (n + 15) // 16 * 16
                    got = {}
                    if D % 16 and both[False][1] is None:
                        continue  # (a masked tail piece: the three passes only)
                    for narrow, (fused, passes) in both.items():
                        got[narrow] = []
                        if passes is not None:
                            s = np.zeros(R * ns, np.float32)
                            o = np.zeros(R * D, np.float32)
                            passes(q, R, D, flat, kind, offs, n, s, D, o, npf)
                            got[narrow] += [s.copy(), o.copy()]
                        if D % 16 == 0:
                            s = np.zeros(R * ns, np.float32)
                            o = np.zeros(R * D, np.float32)
                            m = np.full(R, -np.inf, np.float32)
                            st = np.zeros(R * K.FUSED_STATS, np.float32)
                            fused(q, R, D, flat, kind, offs, n, s, D, o, m, st, npf, np.zeros(2 * R, np.float32))
                            got[narrow] += [o, m, st]
                    for a, b in zip(got[False], got[True]):
                        assert np.isfinite(a).all()
                        assert np.array_equal(a, b), (dtype, R, D, n, npf, float(np.abs(a - b).max()))
                    cases += 1
    assert cases == 6 * (4 if both[False][1] is not None else 3) * 2 * 2


def test_the_narrow_passes_tile_each_block():
    for rows in range(1, 5):
        assert K._scores_keys_per_pass(rows, False) is None  # the whole register block in one pass
        keys = K._scores_keys_per_pass(rows, True)
        assert 16 % keys == 0 and 1 <= keys  # a run-time loop of 16 / keys passes covers the block's keys
        assert rows * keys <= K.SCORES_NARROW_ACCS or keys == 1
    for narrow in (False, True):
        for rows in range(1, 5):
            per = K._pv_pieces_per_pass(rows, narrow)
            assert 1 <= per <= 4
            assert rows * per <= (K.PV_NARROW_TILE if narrow else 16) or per == 1
