"""The split-KV merge keeps the tolerance rule at large scores, on every decode kernel.

Each chunk's LSE ``m + log l`` was rounded to float32 before the chunks were merged: at a
score of 1e4 that is up to half an ulp of 1e4 (≈ 5e-4) off, and a merge weight
``exp(lseᵢ − M)`` as much off relatively — 5.2e-5 of error in an output the naive float32
softmax gets to 1e-8 (keys tied across a chunk boundary: the differential fuzzing of 6 Dec
2026, seed 73803). The chunk LSEs are float64 now, in the ``cpu``, ``numpy`` and Triton
kernels (whose merge takes the difference to the largest in float64, then its exp in float32).
"""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import pytest

import decode_cases as C
import dotattn

TRITON = all(importlib.util.find_spec(m) is not None for m in ("torch", "triton"))
BACKENDS = C.decode_backends() + (["triton"] if TRITON else [])
BF16 = C.BFLOAT16
SPLIT = 256  # the decode kernels' chunk (decode_semantics.SPLIT_SIZE)


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    if TRITON:
        import torch

        if not torch.cuda.is_available():
            monkeypatch.setenv("TRITON_INTERPRET", "1")


def test_the_chunk_size_is_the_one_these_cases_straddle():
    from dotattn import decode_semantics

    assert decode_semantics.SPLIT_SIZE == SPLIT


def _tensor(x):
    import torch

    x = np.ascontiguousarray(x)
    t = torch.from_numpy(x.view(np.int16)).view(torch.bfloat16) if x.dtype == BF16 else torch.from_numpy(x)
    return t.to("cuda") if torch.cuda.is_available() else t


def _call(backend, q, k, v, n, block_table=None):
    args, lengths = (q, k, v), np.array([n], np.int32)
    kw = {} if block_table is None else {"block_table": block_table}
    if backend == "triton":
        args, lengths = tuple(_tensor(x) for x in args), _tensor(lengths)
        kw = {name: _tensor(x) for name, x in kw.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if backend == "triton" else "error", RuntimeWarning)
        out, lse = dotattn.attention_with_kvcache(*args, cache_lengths=lengths, scale=1.0, return_lse=True,
                                                  implementation=backend, **kw)
    if backend == "triton":
        out, lse = out.float().cpu().numpy(), lse.float().cpu().numpy()
    return np.asarray(out, np.float64), np.asarray(lse)


def _paged(k, v, page_size, rng):
    """The contiguous cache's keys in pages of ``page_size`` in a random order (NaN-filled spares)."""
    _, Hkv, cap, D = k.shape
    pages = -(-cap // page_size)
    order = rng.permutation(pages + 2)[:pages]
    kp = np.full((pages + 2, Hkv, page_size, D), np.nan, k.dtype)
    vp = np.full((pages + 2, Hkv, page_size, v.shape[3]), np.nan, v.dtype)
    for logical, physical in enumerate(order):
        j0, j1 = logical * page_size, min((logical + 1) * page_size, cap)
        kp[physical, :, : j1 - j0] = k[0, :, j0:j1]
        vp[physical, :, : j1 - j0] = v[0, :, j0:j1]
    return kp, vp, order[None, :].astype(np.int32)


def _case(n, score, offsets, dtype, D=16, seed=0):
    """One query row ``q = score/100 · e₀`` over ``n`` keys whose first dim is 100 (score
    ``score``) at ``offsets`` — each offset's key scoring ``score + δ`` for its given δ — and
    −100 elsewhere; every score exact in float32 (one nonzero product), values N(0, 1)."""
    rng = np.random.default_rng(seed)
    q = np.zeros((1, 1, 1, D), np.float32)
    q[..., 0] = score / 100.0
    k = np.zeros((1, 1, n + 5, D), np.float32)
    k[..., 0] = -100.0
    for j, delta in offsets.items():
        k[0, 0, j, 0] = 100.0 + delta * 100.0 / score
    v = rng.standard_normal((1, 1, n + 5, D)).astype(np.float32)
    k[:, :, n:], v[:, :, n:] = np.nan, np.nan  # unused slots: never read
    k, v = k.astype(dtype), v.astype(dtype)
    return (q if dtype in (np.float32, np.float64) else q.astype(np.float32)), k, v


def _exact(q, k, v, n):
    """The float64 answer on the rounded inputs, and the naive float32 softmax's error there."""
    s = (q[0, 0].astype(np.float64) @ k[0, 0, :n].astype(np.float64).T)[0]
    p = np.exp(s - s.max())
    want = p @ v[0, 0, :n].astype(np.float64) / p.sum()
    lse = s.max() + np.log(p.sum())
    s32 = (q[0, 0].astype(np.float32) @ k[0, 0, :n].astype(np.float32).T)[0]
    p32 = np.exp(s32 - s32.max())
    naive = (p32 @ v[0, 0, :n].astype(np.float32)) / p32.sum()
    return want, lse, np.abs(naive - want).max()


CASES = {
    # three keys tied at the top: one ends chunk 0, two start chunk 1 (the fuzzing's case)
    "tie-across-a-boundary": (300, {255: 0.0, 256: 0.0, 257: 0.0}),
    # near ties over four chunks, offsets exact in float32 and in the 16-bit caches
    "near-ties-over-4-chunks": (1000, {3: 0.0, 255: -0.5, 300: 0.25, 511: -1.0, 512: 0.5, 999: -0.25}),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.dtype(np.float32), np.dtype(np.float16), BF16], ids=lambda d: d.name)
@pytest.mark.parametrize("score", [1e4, 2.0**17], ids=["1e4", "2^17"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("page_size", [None, 7], ids=["contiguous", "paged"])
def test_a_merge_of_chunks_at_large_scores_keeps_the_tolerance_rule(backend, dtype, score, case, page_size):
    n, offsets = CASES[case]
    if dtype != np.float32 and case != "tie-across-a-boundary":
        # the keys' 100 + δ·100/score are not 16-bit numbers; ties are (100 is)
        offsets = {j: 0.0 for j in offsets}
    q, k, v = _case(n, score, offsets, dtype)
    want, want_lse, naive_error = _exact(q, k, v, n)
    table = None
    if page_size is not None:
        k, v, table = _paged(k, v, page_size, np.random.default_rng(1))
    out, lse = _call(backend, q, k, v, n, table)
    error = np.abs(out[0, 0, 0] - want).max()
    assert error <= 2 * naive_error + 1e-6, f"{backend}: error {error:.3g}, naive float32 {naive_error:.3g}"
    # the LSE is float32: within its rounding of the exact value
    assert lse.dtype == np.float32
    assert abs(float(lse[0, 0, 0]) - want_lse) <= np.spacing(np.float32(want_lse)), (float(lse[0, 0, 0]), want_lse)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_same_sequence_gives_the_same_bits_in_any_batch_at_large_scores(backend):
    """Batch invariance holds through the float64 parts: the sequence alone, and beside a longer one."""
    n, offsets = CASES["near-ties-over-4-chunks"]
    q, k, v = _case(n, 1e4, offsets, np.float32)
    alone, alone_lse = _call(backend, q, k, v, n)
    q2 = np.concatenate([q, q * 0.5])
    k2 = np.concatenate([k, np.concatenate([k[:, :, :n], k[:, :, :5]], axis=2)])
    v2 = np.concatenate([v, np.concatenate([v[:, :, :n], v[:, :, :5]], axis=2)])
    k2[1, :, n:] = 1.0  # the other sequence's longer context (its own keys there)
    if backend == "triton":
        lengths = _tensor(np.array([n, n + 5], np.int32))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out, lse = dotattn.attention_with_kvcache(_tensor(q2), _tensor(k2), _tensor(v2), cache_lengths=lengths,
                                                      scale=1.0, return_lse=True, implementation=backend)
        out, lse = out.float().cpu().numpy(), lse.float().cpu().numpy()
    else:
        out, lse = dotattn.attention_with_kvcache(q2, k2, v2, cache_lengths=[n, n + 5], scale=1.0, return_lse=True,
                                                  implementation=backend)
    np.testing.assert_array_equal(np.asarray(out[:1], np.float64), alone)
    np.testing.assert_array_equal(lse[:1], alone_lse)
