"""Inputs and the float64 oracle for KV-cache decode tests.

``make_case`` builds a cache (contiguous or paged with a random page permutation) whose unused
slots and pages hold NaN, random lengths, q and new keys/values.  ``expected`` computes the
float64 reference from the *logical* sequences (the old cache contents plus the new tokens,
rounded to the cache dtype as the append stores them) with ``attention()``'s reference backend
and ``kv_lengths``, plus the naive same-dtype baseline of the tolerance rule.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

import dotattn
import helpers as H
from dotattn.semantics import BFLOAT16

DTYPES = (np.dtype(np.float64), np.dtype(np.float32), np.dtype(np.float16), BFLOAT16)


def decode_backends() -> list[str]:
    """Decode kernels under test (``DOTATTN_TEST_BACKENDS`` narrows them, as for attention())."""
    from dotattn import decoding

    names = [n for n in decoding._IMPLEMENTATIONS if n != "reference"]
    wanted = os.environ.get("DOTATTN_TEST_BACKENDS", "").strip()
    if wanted:
        names = [n for n in names if n in {w.strip() for w in wanted.split(",")}]
    return names


@dataclass
class Case:
    q: np.ndarray
    k_cache: np.ndarray
    v_cache: np.ndarray
    k_new: np.ndarray | None
    v_new: np.ndarray | None
    cache_lengths: np.ndarray
    block_table: np.ndarray | None
    layout: str
    # logical sequences, canonical (Hkv, n, D): what the cache holds before the call
    old_k: list = field(default_factory=list)
    old_v: list = field(default_factory=list)

    def kwargs(self, **options):
        return dict(cache_lengths=self.cache_lengths, block_table=self.block_table, layout=self.layout, **options)


def _page_size_and_table(rng, B, room, page_size):
    max_pages = -(-room // page_size)
    num_pages = B * max_pages + int(rng.integers(0, 4))  # some pages belong to nobody
    perm = rng.permutation(num_pages)[: B * max_pages].reshape(B, max_pages)
    return max_pages, num_pages, perm.astype(np.int32)


def make_case(
    seed: int,
    *,
    B: int = 3,
    Hq: int = 4,
    Hkv: int = 2,
    D: int = 16,
    Dv: int | None = None,
    Lq: int = 1,
    Lnew: int | None = 1,
    lengths=None,
    max_len: int = 300,
    capacity: int | None = None,
    page_size: int | None = None,
    dtype=np.float32,
    q_dtype=None,
    layout: str = "bhld",
) -> Case:
    """A random case; ``Lnew=None`` means no new tokens; unused cache memory is NaN."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    q_dtype = dtype if q_dtype is None else np.dtype(q_dtype)
    Dv = D if Dv is None else Dv
    n_new = 0 if Lnew is None else Lnew
    if lengths is None:
        lengths = rng.integers(0, max_len + 1, size=B)
    lengths = np.asarray(lengths, dtype=np.int64)
    room = capacity if capacity is not None else int(lengths.max(initial=0)) + n_new + int(rng.integers(0, 20))
    room = max(room, 1)

    def normal(*shape):
        return rng.standard_normal(shape)

    old_k = [normal(Hkv, n, D).astype(dtype) for n in lengths]
    old_v = [normal(Hkv, n, Dv).astype(dtype) for n in lengths]
    block_table = None
    if page_size is None:
        kc = np.full((B, Hkv, room, D), np.nan, dtype=dtype)
        vc = np.full((B, Hkv, room, Dv), np.nan, dtype=dtype)
        for b, n in enumerate(lengths):
            kc[b, :, :n], vc[b, :, :n] = old_k[b], old_v[b]
    else:
        max_pages, num_pages, block_table = _page_size_and_table(rng, B, room, page_size)
        kc = np.full((num_pages, Hkv, page_size, D), np.nan, dtype=dtype)
        vc = np.full((num_pages, Hkv, page_size, Dv), np.nan, dtype=dtype)
        for b, n in enumerate(lengths):
            for j in range(n):
                kc[block_table[b, j // page_size], :, j % page_size] = old_k[b][:, j]
                vc[block_table[b, j // page_size], :, j % page_size] = old_v[b][:, j]
        # entries past the pages a sequence uses are not looked at: make them invalid
        used = -(-(lengths + n_new) // page_size)
        for b in range(B):
            block_table[b, used[b]:] = -1
    q = normal(B, Hq, Lq, D).astype(q_dtype)
    k_new = v_new = None
    if Lnew is not None:
        k_new = normal(B, Hkv, Lnew, D).astype(dtype)
        v_new = normal(B, Hkv, Lnew, Dv).astype(dtype)
    if layout == "blhd":
        q = np.ascontiguousarray(q.swapaxes(1, 2))
        kc, vc = np.ascontiguousarray(kc.swapaxes(1, 2)), np.ascontiguousarray(vc.swapaxes(1, 2))
        if k_new is not None:
            k_new, v_new = np.ascontiguousarray(k_new.swapaxes(1, 2)), np.ascontiguousarray(v_new.swapaxes(1, 2))
    return Case(q, kc, vc, k_new, v_new, lengths, block_table, layout, old_k, old_v)


def canonical(x: np.ndarray | None, layout: str):
    return x if x is None or layout == "bhld" else x.swapaxes(1, 2)


def rope_tables(positions: int, half: int, base: float = 10000.0):
    """float64 ``(cos, sin)`` of shape (positions, half)."""
    inv = base ** (-np.arange(half) / half)
    angles = np.arange(positions)[:, None] * inv[None, :]
    return np.cos(angles), np.sin(angles)


def rope64(x: np.ndarray, positions: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """float64 RoPE ("rotate half") of ``x (B, H, L, D)`` at ``positions (B, L)``."""
    x = x.astype(np.float64)
    R = cos.shape[1]
    c, s = cos[positions][:, None], sin[positions][:, None]
    out = x.copy()
    out[..., :R] = x[..., :R] * c - x[..., R : 2 * R] * s
    out[..., R : 2 * R] = x[..., R : 2 * R] * c + x[..., :R] * s
    return out


def call_options(case: Case, options: dict, rng) -> tuple[dict, dict]:
    """Call options and the matching reference options: ``options`` may say ``alibi_slopes=
    "per-head"`` or ``"batch"`` (random slopes) and ``rotary=True`` (tables with a rotary dim
    smaller than D); everything else passes as given."""
    call, ref = dict(options), dict(options)
    Hq = canonical(case.q, case.layout).shape[1]
    if options.get("alibi_slopes") == "per-head":
        call["alibi_slopes"] = ref["alibi_slopes"] = rng.uniform(0.01, 0.3, Hq)
    elif options.get("alibi_slopes") == "batch":
        call["alibi_slopes"] = ref["alibi_slopes"] = rng.uniform(0.001, 0.05, (len(case.cache_lengths), Hq))
    if options.get("rotary"):
        D = canonical(case.q, case.layout).shape[3]
        cos, sin = rope_tables(2048, D // 2 - 1)  # a rotary dim smaller than D
        call["rotary"] = (cos.astype(np.float32), sin.astype(np.float32))
        ref["rotary"] = (cos.astype(np.float32).astype(np.float64), sin.astype(np.float32).astype(np.float64))
    return call, ref


def logical_after(case: Case, rotary=None):
    """The sequences after the append, per sequence ``(Hkv, n, D)`` in the cache dtype
    (rotated new keys rounded to it, as the append stores them)."""
    k_new, v_new = canonical(case.k_new, case.layout), canonical(case.v_new, case.layout)
    dtype = case.k_cache.dtype
    ks, vs = [], []
    for b, n in enumerate(case.cache_lengths):
        k, v = case.old_k[b], case.old_v[b]
        if k_new is not None:
            kn = k_new[b : b + 1]
            if rotary is not None:
                Lnew = kn.shape[2]
                kn = rope64(kn, (n + np.arange(Lnew))[None], *rotary)
            k = np.concatenate([k, kn[0].astype(dtype)], axis=1)
            v = np.concatenate([v, v_new[b]], axis=1)
        ks.append(k)
        vs.append(v)
    return ks, vs


def read_cache(case: Case, b: int, n: int):
    """What the cache holds for positions [0, n) of sequence b: ``(Hkv, n, D)``, ``(Hkv, n, Dv)``."""
    kc, vc = canonical(case.k_cache, case.layout), canonical(case.v_cache, case.layout)
    if case.block_table is None:
        return kc[b, :, :n], vc[b, :, :n]
    ps = kc.shape[2]
    idx = np.arange(n)
    pages = case.block_table[b, idx // ps]
    return kc[pages, :, idx % ps].swapaxes(0, 1), vc[pages, :, idx % ps].swapaxes(0, 1)


def expected(case: Case, *, rotary=None, **options):
    """``(out64, lse64, naive_out)`` in canonical shapes for ``attention_with_kvcache(case, **options)``.

    Keys come from the logical sequences after the append; the naive baseline runs in the
    cache dtype (q cast to it), the precision a straightforward implementation would use.
    """
    ks, vs = logical_after(case, rotary)
    n = np.array([k.shape[1] for k in ks])
    B = len(ks)
    Hkv, D = ks[0].shape[0], ks[0].shape[2]
    Dv = vs[0].shape[2]
    Lk = int(n.max(initial=0))
    dtype = case.k_cache.dtype
    K = np.full((B, Hkv, Lk, D), np.nan, dtype=dtype)
    V = np.full((B, Hkv, Lk, Dv), np.nan, dtype=dtype)
    for b in range(B):
        K[b, :, : n[b]], V[b, :, : n[b]] = ks[b], vs[b]
    q = canonical(case.q, case.layout).astype(np.float64)
    Lq = q.shape[2]
    if rotary is not None:
        q = rope64(q, (n - Lq)[:, None] + np.arange(Lq)[None, :], *rotary)
    causal = options.pop("causal", True)
    opts = dict(kv_lengths=n, causal=causal, **options)
    out, lse = H.reference(q, K.astype(np.float64), V.astype(np.float64), **opts)
    naive_out, _ = H.naive(q.astype(dtype), K, V, **opts)
    return out, lse, naive_out


def check_call(backend: str, seed: int, shape: dict, options: dict, name: str) -> None:
    """One ``attention_with_kvcache`` call of ``make_case(seed, **shape)`` with ``options``
    (:func:`call_options`'s forms) on ``backend``, against the float64 reference: output dtype
    and tolerance rule, LSE dtype, −inf exactly where no key is visible, LSE close."""
    case = make_case(seed, **shape)
    call_opts, ref_opts = call_options(case, options, np.random.default_rng(seed))
    out64, lse64, naive = expected(case, **ref_opts)
    out, lse = dotattn.attention_with_kvcache(
        case.q, case.k_cache, case.v_cache, case.k_new, case.v_new, return_lse=True,
        implementation=backend, **case.kwargs(**call_opts),
    )
    f64 = case.q.dtype == np.float64
    assert out.dtype == case.q.dtype and lse.dtype == (np.float64 if f64 else np.float32)
    H.assert_close_to_reference(canonical(out, case.layout), out64, naive, name=f"{name} out", dtype=case.k_cache.dtype)
    finite = np.isfinite(lse64)
    assert (np.isneginf(lse) == ~finite).all(), "rows with no visible key must have lse = −inf"
    tol = 1e-3 if case.k_cache.dtype.itemsize == 2 else (1e-12 if case.k_cache.dtype == np.float64 else 1e-5)
    np.testing.assert_allclose(lse[finite], lse64[finite], rtol=tol, atol=tol)
