"""The ``cpu`` decode kernel's narrow register blocks (AVX2 targets) against its wide ones.

Where the compile target lacks AVX-512 (an AVX2-only Zen 3), the 16-lane passes run their
register blocks in narrower passes (``_cpu_decode_kernels.NARROW_TILES``): ``P·V`` in tiles of
``PV_NARROW_TILE`` pieces — each output element gets the same FMAs in the same order as in the
wide tiles, so the same bits — and the scores in 8-lane accumulators (``SCORES_NARROW_ACCS`` a
pass), whose sums are other bits than the 16-lane ones: each score within the float32 rule's
tolerance of the float64 dot product, and the same bits for a key wherever it sits (its place
in a block, the block, the rows beside its query row).  Here both forms are compiled on this
machine (the flag forced each way; small wrappers, not cached) and run on the same chunks:
every row count of a register block's switch (1–8 rows), chunks ending mid-block, the next
item's requests on and off, head dims with and without a masked tail piece — 16-bit caches by
default, float32 caches with ``-m slow``.
"""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

import decode_cases as C

pytestmark = pytest.mark.skipif("cpu" not in C.decode_backends(), reason="the cpu decode kernel is not under test")

K = pytest.importorskip("dotattn.kernels._cpu_decode_kernels")

ROWS = (1, 2, 3, 4, 5, 8)


def _wrappers(narrow: bool, full: bool):
    """The fused pass, the scores pass and the ``P·V`` pass (16-bit caches; with ``full`` float32
    caches too), compiled with NARROW_TILES = narrow (fastmath as the kernel's ``_chunk`` that
    inlines them)."""
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
        def scores(q, R, D, flat, kind, offs, n, s, npf):
            scores16(q, R, D, flat, kind, offs, n, s, s.shape[0] // R, flat, offs, D, offs, npf)

        @njit(cache=False, fastmath={"nsz", "contract", "reassoc"}, _nrt=False)
        def pv(p, R, n, flat, kind, offs, Dv, o, npf):
            pv16(p, p.shape[0] // R, R, n, flat, kind, offs, Dv, o, flat, offs, npf, Dv)

        # compiled now, while the flag holds (a later first call would read it then)
        rng = np.random.default_rng(0)
        flats = (np.zeros(64 * 128, np.uint16),) + ((rng.standard_normal(64 * 128).astype(np.float32),) if full else ())
        for flat in flats:
            kind = K.KIND_FLOAT if flat.dtype == np.float32 else K.KIND_F16
            q = np.zeros(4 * 128, np.float32)
            offs = np.arange(64, dtype=np.int64) * 128
            s = np.zeros(4 * 64, np.float32)
            o = np.zeros(4 * 128, np.float32)
            fused(q, 4, 128, flat, kind, offs, 64, s, 128, o,
                  np.full(4, -np.inf, np.float32), np.zeros(4 * K.FUSED_STATS, np.float32), 0, np.zeros(8, np.float32))
            scores(q, 4, 128, flat, kind, offs, 64, s, 0)
            pv(s, 4, 64, flat, kind, offs, 128, o, 0)
        assert seen == {narrow}, seen  # the flag reached the codegen of the blocks
        return fused, scores, pv
    finally:
        K.NARROW_TILES, K._scores_keys_per_pass, K._pv_pieces_per_pass = saved


def _cache(rng, dtype: str, n: int, D: int):
    """``n`` rows of ``D`` (the kernel's flat words) and their float32 values."""
    x = rng.standard_normal(n * D).astype(np.float32)
    if dtype == "float32":
        return x, K.KIND_FLOAT, x
    if dtype == "float16":
        h = x.astype(np.float16)
        return h.view(np.uint16), K.KIND_F16, h.astype(np.float32)
    bits = (x.view(np.uint32) >> 16).astype(np.uint16)
    return bits, K.KIND_BF16, (bits.astype(np.uint32) << 16).view(np.float32)


@pytest.fixture(scope="module")
def compiled():
    # 16-bit caches (the fused pass's decode path): six compiles
    return {narrow: _wrappers(narrow, False) for narrow in (False, True)}


@pytest.mark.slow
def test_float32_caches_too():
    # the passes compiled for float32 caches as well (the FUSED32 route and the three passes)
    compiled = {narrow: _wrappers(narrow, True) for narrow in (False, True)}
    for check in (_check_pv, _check_scores, _check_fused):
        check(compiled, ("float32",))


SIXTEEN_BIT = ("float16", "bfloat16")


def _chunks(rng, dtype):
    """Chunks of every shape the tests run: (R, D, n, npf, flat, kind, values, offs, q)."""
    for R in ROWS:
        for D in (64, 128, 80, 72):  # 72: a masked tail piece (80 is a multiple of 16)
            for n in (40, 64):
                for npf in (0, n):
                    flat, kind, values = _cache(rng, dtype, n, D)
                    offs = rng.permutation(n).astype(np.int64) * D  # rows in any order, as a paged cache's
                    q = (rng.standard_normal(R * D) * D**-0.5).astype(np.float32)
                    yield R, D, n, npf, flat, kind, values, offs, q


def _each_chunk(dtypes, seed):
    """``(rng, dtype, chunk)`` for every chunk of :func:`_chunks` of each dtype (all of them: the
    count is checked at the end)."""
    rng = np.random.default_rng(seed)
    cases = 0
    for dtype in dtypes:
        for chunk in _chunks(rng, dtype):
            yield rng, dtype, chunk
            cases += 1
    assert cases == len(dtypes) * len(ROWS) * 4 * 2 * 2


def test_narrow_pv_tiles_give_the_wide_tiles_bits(compiled):
    _check_pv(compiled, SIXTEEN_BIT)


def _check_pv(compiled, dtypes):
    for rng, dtype, (R, D, n, npf, flat, kind, _, offs, _) in _each_chunk(dtypes, 3):
        ns = (n + 15) // 16 * 16
        p = rng.random(R * ns).astype(np.float32)
        p[rng.random(R * ns) < 0.2] = 0.0  # P = 0 is used as any other weight
        got = []
        for narrow in (False, True):
            o = np.full(R * D, np.nan, np.float32)  # overwritten
            compiled[narrow][2](p, R, n, flat, kind, offs, D, o, npf)
            got.append(o)
        assert np.isfinite(got[0]).all()
        assert np.array_equal(got[0], got[1]), (dtype, R, D, n, npf)


def _scores(fn, q, R, D, flat, kind, offs, n, npf):
    ns = (n + 15) // 16 * 16
    s = np.zeros(R * ns, np.float32)
    fn(q, R, D, flat, kind, offs, n, s, npf)
    return s.reshape(R, ns)[:, :n]


def test_narrow_scores_are_within_the_rule_and_the_same_for_a_key_wherever_it_sits(compiled):
    _check_scores(compiled, SIXTEEN_BIT)


def _check_scores(compiled, dtypes):
    for rng, dtype, (R, D, n, npf, flat, kind, values, offs, q) in _each_chunk(dtypes, 5):
        keys = values.reshape(n, D)[offs // D]  # key t is the row at offs[t]
        exact = q.reshape(R, D).astype(np.float64) @ keys.astype(np.float64).T
        naive = q.reshape(R, D) @ keys.T  # float32 BLAS
        tol = 2 * np.abs(naive - exact).max() + 1e-6
        perm = rng.permutation(n)
        for narrow in (False, True):
            fn = compiled[narrow][1]
            s = _scores(fn, q, R, D, flat, kind, offs, n, npf)
            assert np.abs(s - exact).max() <= tol, (dtype, R, D, n, narrow, np.abs(s - exact).max(), tol)
            # the keys in another order (other places in their blocks, other blocks): each key's bits
            moved = _scores(fn, q, R, D, flat, kind, offs[perm], n, npf)
            assert np.array_equal(moved, s[:, perm]), (dtype, R, D, n, narrow)
            # a query row alone (a one-row register block), and the rows beside one more row
            for r in {0, R - 1}:
                alone = _scores(fn, q[r * D : (r + 1) * D].copy(), 1, D, flat, kind, offs, n, npf)
                assert np.array_equal(alone[0], s[r]), (dtype, R, D, n, r, narrow)
            more = np.concatenate([q, q[:D]])
            assert np.array_equal(_scores(fn, more, R + 1, D, flat, kind, offs, n, npf)[:R], s), (dtype, R, D, n, narrow)


def test_narrow_and_wide_fused_passes_agree(compiled):
    # the fused pass (the decode path of 16-bit caches): the scores' last bits aside, the same
    _check_fused(compiled, SIXTEEN_BIT)


def _check_fused(compiled, dtypes):
    for _, dtype, (R, D, n, npf, flat, kind, _, offs, q) in _each_chunk(dtypes, 7):
        if D % 16:
            continue  # the fused pass needs Dv % 16 == 0
        ns = (n + 15) // 16 * 16
        got = []
        for narrow in (False, True):
            s = np.zeros(R * ns, np.float32)
            o = np.zeros(R * D, np.float32)
            m = np.full(R, -np.inf, np.float32)
            st = np.zeros(R * K.FUSED_STATS, np.float32)
            compiled[narrow][0](q, R, D, flat, kind, offs, n, s, D, o, m, st, npf, np.zeros(2 * R, np.float32))
            got.append((o, m))
        (o0, m0), (o1, m1) = got
        assert np.isfinite(o0).all() and np.isfinite(o1).all()
        np.testing.assert_allclose(m1, m0, rtol=1e-5, atol=1e-6, err_msg=str((dtype, R, D, n, npf)))
        np.testing.assert_allclose(o1, o0, rtol=1e-4, atol=1e-5 * np.abs(o0).max(), err_msg=str((dtype, R, D, n, npf)))


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
