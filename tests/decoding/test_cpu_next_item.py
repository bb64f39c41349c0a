"""The ``cpu`` decode kernel asking for each item's next item (``NEXT_SCHEME``) gives the bits it
gives without.

Calls reading at least ``_cpu_decode_kernels.PREFETCH_NEXT_MIN_BYTES`` of K/V (24 MiB with
AVX-512, 64 MiB without) run other code: the scores pass asks for the next item's key rows in
place of this block's values, the P·V passes for its value rows, and the float32 fused pass is
emitted per request case.  Those are hints, so no output may change — but until 7 Dec 2026 no
test call was that big, and that code ran only in benchmarks.  Here each case's sequences are
decoded twice: in a batch of their own (under the threshold) and beside a long filler sequence
that takes the call past it — the batch invariance of docs/decoding.md says the bits are the
same — on one thread and on two, for every cache dtype, contiguous and paged caches, one and
several query rows, a window, softcap and ALiBi.
"""

from __future__ import annotations

import numpy as np
import pytest

import decode_cases as C
from dotattn.semantics import BFLOAT16

pytestmark = pytest.mark.skipif("cpu" not in C.decode_backends(), reason="the cpu decode kernel is not under test")

HQ, HKV, D, PAGE = 8, 2, 128, 16
LENGTHS = [900, 300]  # several 256-key chunks: an item's next one is often its head's next chunk


def _caches(rng, lengths, cap, lnew, dtype):
    """Contiguous caches with ``lengths + lnew`` keys, unused slots NaN."""
    k = np.full((len(lengths), HKV, cap, D), np.nan, dtype=np.float32)
    v = np.full_like(k, np.nan)
    for b, n in enumerate(np.asarray(lengths) + lnew):
        k[b, :, :n] = rng.standard_normal((HKV, n, D), dtype=np.float32)
        v[b, :, :n] = rng.standard_normal((HKV, n, D), dtype=np.float32)
    return k.astype(dtype), v.astype(dtype)


def _paged(rng, k, v):
    """The caches as a shuffled pool of pages and its block table."""
    B, _, cap, _ = k.shape
    per = cap // PAGE
    table = rng.permutation(B * per).reshape(B, per)
    pk = np.full((B * per, HKV, PAGE, D), np.nan, dtype=k.dtype)
    pv = np.full_like(pk, np.nan)
    for b in range(B):
        for i in range(per):
            pk[table[b, i]] = k[b, :, i * PAGE : (i + 1) * PAGE]
            pv[table[b, i]] = v[b, :, i * PAGE : (i + 1) * PAGE]
    return pk, pv, table


@pytest.fixture(params=["one thread", "two threads"])
def threads(request, monkeypatch):
    from dotattn.kernels import cpu_decode

    if request.param == "one thread":
        monkeypatch.setattr(cpu_decode, "_WORKERS", [1])
    else:  # every call's items on the pool: the caller from the first item up, a partner from the last down
        monkeypatch.setattr(cpu_decode, "_WORKERS", [2])
        monkeypatch.setattr(cpu_decode, "PARALLEL_MIN_BYTES", 0)
        monkeypatch.setattr(cpu_decode.ParallelChoice, "choose", lambda self: True)
    return request.param


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize(
    "cache_dtype, q_dtype",
    [(np.float32, np.float32), (np.float16, np.float32), (BFLOAT16, np.float32), (BFLOAT16, BFLOAT16)],
    ids=["float32", "float16", "bfloat16", "bfloat16-q"],
)
def test_a_call_past_the_threshold_gives_the_bits_of_one_under_it(threads, cache_dtype, q_dtype, paged):
    import dotattn
    from dotattn.kernels import _cpu_decode_kernels as K

    rng = np.random.default_rng(7)
    itemsize = np.dtype(cache_dtype).itemsize
    # the filler's keys take the call to the threshold (counted over every sequence's K and V)
    filler = -(-K.PREFETCH_NEXT_MIN_BYTES // (HKV * 2 * D * itemsize))
    cap = -(-(filler + 8) // PAGE) * PAGE
    for lnew, opts in [(1, {}), (3, dict(window=(400, 0), softcap=20.0, alibi_slopes=np.linspace(0.01, 0.1, HQ)))]:
        k, v = _caches(rng, LENGTHS + [filler - lnew], cap, lnew, cache_dtype)
        q = rng.standard_normal((3, HQ, lnew, D)).astype(q_dtype)
        lengths = np.array(LENGTHS + [filler - lnew]) + lnew  # every key in the cache already: no append
        small_k, small_v = np.ascontiguousarray(k[:2, :, :1024]), np.ascontiguousarray(v[:2, :, :1024])
        big, small = dict(cache_lengths=lengths), dict(cache_lengths=lengths[:2])
        if paged:
            k, v, big["block_table"] = _paged(rng, k, v)
            small_k, small_v, small["block_table"] = _paged(rng, small_k, small_v)
        assert k.nbytes + v.nbytes >= K.PREFETCH_NEXT_MIN_BYTES > small_k.nbytes + small_v.nbytes
        out, lse = dotattn.attention_with_kvcache(q, k, v, return_lse=True, implementation="cpu", **big, **opts)
        alone, alone_lse = dotattn.attention_with_kvcache(
            q[:2], small_k, small_v, return_lse=True, implementation="cpu", **small, **opts
        )
        name = f"{threads}, Lnew {lnew}"
        assert np.array_equal(out[:2].view(np.uint8), alone.view(np.uint8)), f"{name}: outputs differ past the threshold"
        assert np.array_equal(lse[:2], alone_lse), f"{name}: LSEs differ past the threshold"
        # and they are attention: against the NumPy decode kernel (the rounding of the dtype)
        want = dotattn.attention_with_kvcache(q[:2], small_k, small_v, implementation="numpy", **small, **opts)
        np.testing.assert_allclose(
            alone.astype(np.float32), want.astype(np.float32), rtol=3e-2, atol=3e-2, err_msg=name
        )
        assert np.isfinite(out.astype(np.float32)).all(), name  # NaN-filled unused slots never read
