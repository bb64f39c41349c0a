"""attention_with_kvcache against the float64 reference: random lengths, permuted pages,
NaN in every unused slot, Lnew ∈ {1, 2, 7}, GQA, windows, softcap, ALiBi, rotary, every cache
dtype, both layouts, both kernels; the cache contents after the append; bitwise invariance."""

from __future__ import annotations

import threading

import numba
import numpy as np
import pytest

import decode_cases as C
import helpers as H
import dotattn
from dotattn import decoding

BACKENDS = C.decode_backends()

# (id, make_case kwargs, call options); each runs on every backend
CASES = [
    ("f32-contig-L1", dict(), {}),
    ("f32-paged-ps1-L1", dict(page_size=1), {}),
    ("f32-paged-ps7-L2-gqa", dict(page_size=7, Hq=6, Hkv=2, Lq=2, Lnew=2), {}),
    ("f32-paged-ps16-L7-blhd", dict(page_size=16, Lq=7, Lnew=7, layout="blhd"), {}),
    ("f64-contig-L7-window", dict(dtype=np.float64, Lq=7, Lnew=7), dict(window=(40, None))),
    ("f64-paged-ps5-softcap-alibi", dict(dtype=np.float64, page_size=5), dict(softcap=3.0, alibi_slopes="per-head")),
    ("f16-contig-L1-mqa", dict(dtype=np.float16, Hq=4, Hkv=1), {}),
    ("f16-paged-ps3-L2-q32", dict(dtype=np.float16, q_dtype=np.float32, page_size=3, Lq=2, Lnew=2), {}),
    ("bf16-contig-L1-q32-blhd", dict(dtype=H.DTYPES[1], q_dtype=np.float32, layout="blhd"), {}),
    ("bf16-paged-ps9-L7-window", dict(dtype=H.DTYPES[1], page_size=9, Lq=7, Lnew=7), dict(window=(30, 2))),
    ("f32-noncausal-Lq3-nonew", dict(Lq=3, Lnew=None), dict(causal=False)),
    ("f32-paged-ps4-rotary-dv", dict(page_size=4, Dv=12, Lq=2, Lnew=2), dict(rotary=True)),
    ("bf16-contig-rotary-q32", dict(dtype=H.DTYPES[1], q_dtype=np.float32), dict(rotary=True, softcap=2.0)),
    ("f32-long-multi-split", dict(max_len=900, B=2, page_size=32), dict(alibi_slopes="batch")),
    # float64 over several chunks: the merge of the parts keeps float64 weights (a float32 weight
    # cost 1e-8 of error where float64's naive error is 1e-16)
    ("f64-contig-multi-split", dict(dtype=np.float64, B=2, lengths=[257, 700], Hq=6, Hkv=2, D=64), {}),
    ("f64-paged-ps32-multi-split-L2", dict(dtype=np.float64, B=2, lengths=[900, 300], page_size=32, Lq=2, Lnew=2), {}),
    ("f32-empty-sequences", dict(lengths=[0, 0, 5], Lnew=None, Lq=1), {}),
    # R = G·Lq = 40 folded query rows per K/V head (a chunked-prefill shape)
    ("f32-contig-R40", dict(Hq=8, Hkv=1, Lq=5, Lnew=5, max_len=700), {}),
    ("f32-paged-ps16-R40-window", dict(Hq=8, Hkv=1, Lq=5, Lnew=5, page_size=16), dict(window=(50, None))),
    # head dims of several 16-lane pieces (the cpu kernel's vector loops): SmolLM2's shape on
    # 256-token pages; D 128 with Dv 80 (five pieces: a group of four and one) and R = 5 rows
    ("f32-paged-ps256-smollm", dict(B=2, Hq=9, Hkv=3, D=64, page_size=256, max_len=700), {}),
    ("bf16-contig-d128-dv80-r5", dict(dtype=H.DTYPES[1], q_dtype=np.float32, Hq=5, Hkv=1, D=128, Dv=80, max_len=600), {}),
    ("f16-paged-ps64-d48-L2-window", dict(dtype=np.float16, Hq=6, Hkv=2, D=48, Lq=2, Lnew=2, page_size=64, max_len=600),
     dict(window=(100, None), softcap=5.0)),
    # softcap in the fused pass (every row sees every key of the chunk): float32 over several
    # chunks, and a 16-bit cache on pages; a small cap, so that most scores are capped hard
    ("f32-contig-softcap-multi-split", dict(B=2, lengths=[700, 300], Hq=8, Hkv=2, D=128), dict(softcap=1.5)),
    ("f16-paged-ps16-softcap-d128", dict(dtype=np.float16, q_dtype=np.float32, page_size=16, Hq=8, Hkv=2, D=128,
                                         max_len=600), dict(softcap=4.0)),
    # ALiBi in the fused pass, alone and after a softcap, one query and two (a row's own position)
    ("f32-contig-alibi-multi-split", dict(B=2, lengths=[600, 513], Hq=8, Hkv=2, D=128), dict(alibi_slopes="per-head")),
    ("bf16-paged-ps32-alibi-softcap-L2", dict(dtype=H.DTYPES[1], q_dtype=np.float32, page_size=32, Hq=8, Hkv=2, D=64,
                                              Lq=2, Lnew=2, max_len=700), dict(alibi_slopes="batch", softcap=3.0)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,shape,options", CASES, ids=[c[0] for c in CASES])
def test_matches_reference(backend, name, shape, options):
    C.check_call(backend, sum(map(ord, name)), shape, options, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["bhld", "blhd"])
@pytest.mark.parametrize("page_size", [None, 1, 6])
def test_cache_holds_the_new_tokens_and_nothing_else_changes(backend, layout, page_size):
    case = C.make_case(11, page_size=page_size, Lq=3, Lnew=3, layout=layout, dtype=np.float16, q_dtype=np.float32)
    before_k, before_v = case.k_cache.copy(), case.v_cache.copy()
    dotattn.attention_with_kvcache(
        case.q, case.k_cache, case.v_cache, case.k_new, case.v_new, implementation=backend, **case.kwargs()
    )
    ks, vs = C.logical_after(case)
    for b, n in enumerate(case.cache_lengths + 3):
        k, v = C.read_cache(case, b, n)
        np.testing.assert_array_equal(k, ks[b])
        np.testing.assert_array_equal(v, vs[b])
    # every slot outside the new tokens is bitwise unchanged (NaN included)
    kc = C.canonical(case.k_cache, layout)
    new_slots = np.zeros(kc.shape[:3], dtype=bool)
    ps = kc.shape[2]
    for b, n in enumerate(case.cache_lengths):
        for j in range(n, n + 3):
            page = b if case.block_table is None else case.block_table[b, j // ps]
            new_slots[page, :, j % ps if case.block_table is not None else j] = True
    untouched = ~new_slots
    after = C.canonical(case.k_cache, layout)[untouched]
    assert after.tobytes() == C.canonical(before_k, layout)[untouched].tobytes()
    assert C.canonical(case.v_cache, layout)[untouched].tobytes() == C.canonical(before_v, layout)[untouched].tobytes()


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu decode kernel is not under test")
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_a_blhd_call_runs_the_kernel_signatures_of_a_bhld_one(dtype):
    # q of a "blhd" call is a transposed view (strided where Lq > 1): the kernel must get it C-contiguous, as a
    # "bhld" call's, so that no first "blhd" call compiles another signature (`dotattn
    # precompile` runs "bhld" calls; a first "blhd" call compiled for 25–160 s before)
    from dotattn.decode_semantics import normalize
    from dotattn.kernels import _cpu_decode_kernels as K
    from dotattn.kernels import cpu_decode

    entries = (K.run_serial, K.run_items, K.run_items_caller)
    for layout in ("bhld", "blhd"):
        for parallel_min_bytes in (None, 0):  # the one-entry kernel; plan and items
            case = C.make_case(21, page_size=None, Lq=3, Lnew=3, layout=layout, dtype=dtype, q_dtype=np.float32)
            call = normalize(case.q, case.k_cache, case.v_cache, case.k_new, case.v_new, causal=True, window=None,
                             scale=None, softcap=None, alibi_slopes=None, rotary=None, **case.kwargs())
            before = [len(e.signatures) for e in entries]
            out, _ = cpu_decode.decode(call, **({} if parallel_min_bytes is None else {"parallel_min_bytes": 0}))
            assert np.isfinite(out).all()
            if layout == "blhd":
                assert [len(e.signatures) for e in entries] == before, (parallel_min_bytes, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rotary_keys_are_stored_rotated(backend):
    case = C.make_case(5, page_size=4, Lq=2, Lnew=2)
    cos, sin = C.rope_tables(1024, 8)
    dotattn.attention_with_kvcache(
        case.q, case.k_cache, case.v_cache, case.k_new, case.v_new, rotary=(cos, sin), implementation=backend,
        **case.kwargs(),
    )
    ks, _ = C.logical_after(case, rotary=(cos, sin))
    for b, n in enumerate(case.cache_lengths + 2):
        k, _ = C.read_cache(case, b, n)
        np.testing.assert_allclose(k, ks[b], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtype, q_dtype",
    [(np.float32, None), (np.float16, None), (C.BFLOAT16, None), (np.float16, np.float32), (C.BFLOAT16, np.float32)],
    ids=["float32", "float16", "bfloat16", "float16-q32", "bfloat16-q32"],
)
@pytest.mark.parametrize("Lnew", [1, 3])
def test_bitwise_invariant_to_batch_capacity_and_pages(backend, dtype, q_dtype, Lnew, monkeypatch):
    """The same sequence gives the same bits alone, in a batch, in a bigger cache, in pages —
    every cache dtype, a float32 q over a 16-bit cache, one new token or a few (Lq = Lnew), and
    (cpu) with every call of a batch on both cores as well as where the size choice puts it."""
    rng = np.random.default_rng(3)
    q_dtype = dtype if q_dtype is None else q_dtype
    n, D, Hkv, Hq = 2 * decoding.SPLIT_SIZE + 77, 32, 2, 6
    k_seq = rng.standard_normal((Hkv, n + Lnew, D)).astype(dtype)
    v_seq = rng.standard_normal((Hkv, n + Lnew, D)).astype(dtype)
    q = rng.standard_normal((1, Hq, Lnew, D)).astype(q_dtype)

    def run(B, slot, capacity, page_size):
        others = rng.integers(0, capacity - Lnew + 1, size=B)  # the other sequences: any length that fits
        others[slot] = n
        qs = rng.standard_normal((B, Hq, Lnew, D)).astype(q_dtype)
        qs[slot] = q[0]
        kn = rng.standard_normal((B, Hkv, Lnew, D)).astype(dtype)
        vn = rng.standard_normal((B, Hkv, Lnew, D)).astype(dtype)
        kn[slot], vn[slot] = k_seq[:, n:], v_seq[:, n:]
        if page_size is None:
            kc = rng.standard_normal((B, Hkv, capacity, D)).astype(dtype)
            vc = rng.standard_normal((B, Hkv, capacity, D)).astype(dtype)
            kc[slot, :, :n], vc[slot, :, :n] = k_seq[:, :n], v_seq[:, :n]
            table = None
        else:
            max_pages = -(-capacity // page_size)
            table = rng.permutation(B * max_pages).reshape(B, max_pages)
            kc = rng.standard_normal((B * max_pages, Hkv, page_size, D)).astype(dtype)
            vc = rng.standard_normal((B * max_pages, Hkv, page_size, D)).astype(dtype)
            for j in range(n):
                kc[table[slot, j // page_size], :, j % page_size] = k_seq[:, j]
                vc[table[slot, j // page_size], :, j % page_size] = v_seq[:, j]
        out, lse = dotattn.attention_with_kvcache(
            qs, kc, vc, kn, vn, cache_lengths=others, block_table=table, return_lse=True, implementation=backend
        )
        return out[slot], lse[slot]

    alone = run(1, 0, n + Lnew, None)
    configs = [(4, 2, 3 * decoding.SPLIT_SIZE + 5, None), (3, 1, 1000, 16), (5, 4, n + 9, 1), (2, 0, 2048, 100),
               (16, 7, 4096, 64)]  # (≈ 8–16 MiB of K/V read)
    for pool in (False, True) if backend == "cpu" else (False,):
        if pool:  # every call on the pool's threads, whatever its size
            from dotattn.kernels import cpu_decode

            monkeypatch.setattr(cpu_decode, "PARALLEL_MIN_BYTES", 0)
            monkeypatch.setattr(cpu_decode, "POOL_ONLY_BYTES", 0)
        for B, slot, capacity, page_size in configs:
            got = run(B, slot, capacity, page_size)
            where = f"B={B} capacity={capacity} page_size={page_size}{' on the pool' if pool else ''}"
            H.assert_bitwise_equal(got[0], alone[0], name=f"out {where}")
            H.assert_bitwise_equal(got[1], alone[1], name=f"lse {where}")


_ROW_BLOCK_OPTIONS = [
    {}, {"causal": False}, {"window": (16, 3)}, {"window": (16, 3), "causal": False},
    {"alibi_slopes": "per-head"}, {"alibi_slopes": "batch", "causal": False}, {"softcap": 5.0}, {"rotary": True},
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "options, Lnew",
    # (rotary needs every query row at a position ≥ 0: Lnew = Lq)
    [(o, n) for o in _ROW_BLOCK_OPTIONS for n in (None, 5, 40) if n == 40 or not o.get("rotary")],
    ids=lambda x: ("-".join(x) or "plain") if isinstance(x, dict) else f"Lnew{x}",
)
def test_many_query_rows_run_in_blocks_against_the_reference(backend, options, Lnew, monkeypatch):
    """Calls with more folded query rows (G · Lq) than a split-KV pass takes run block of rows by
    block (their chunk partials bounded; decode_semantics.ROWS_PER_PASS, here 16 for blocks of
    4 rows): each block keeps its rows' positions — the causal mask, windows, ALiBi and rotary
    measure from them —, rows before the first key (Lq > the keys) get zeros and −inf, and
    calls whose rows cannot be split (no causal mask, with a window or ALiBi) run whole; against
    the float64 reference, contiguous and paged, 16-bit and float32 caches, a float32 q."""
    from dotattn import decode_semantics

    monkeypatch.setattr(decode_semantics, "ROWS_PER_PASS", 16)
    configs = [(None, np.float32, None), (16, np.float16, None), (None, C.BFLOAT16, np.float32), (3, np.float16, np.float32)]
    first = (_ROW_BLOCK_OPTIONS.index(options) + (Lnew or 0)) % 4  # two of the four a case, all four over the cases
    for seed, (page_size, dtype, q_dtype) in enumerate([configs[first], configs[(first + 2) % 4]]):
        shape = dict(B=3, Hq=8, Hkv=2, D=32, Lq=40, Lnew=Lnew, page_size=page_size, dtype=dtype, q_dtype=q_dtype,
                     lengths=[0, 23, 300])
        C.check_call(backend, seed, shape, dict(options), f"{backend} {shape} {options}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_query_row_blocks_depend_on_the_rows_alone(backend, monkeypatch):
    """A call of many query rows gives each sequence the bits it gets alone (blocks are cut from
    Lq and the group, never from the batch), and the blocked call agrees with the whole one
    within the tolerance rule."""
    from dotattn import decode_semantics

    case = C.make_case(4, B=3, Hq=8, Hkv=2, D=32, Lq=40, Lnew=40, lengths=[500, 7, 300], dtype=np.float16,
                       q_dtype=np.float32)

    def run(sel=slice(None), rows=16):
        monkeypatch.setattr(decode_semantics, "ROWS_PER_PASS", rows)
        kc, vc = case.k_cache[sel].copy(), case.v_cache[sel].copy()
        return dotattn.attention_with_kvcache(
            case.q[sel], kc, vc, case.k_new[sel], case.v_new[sel], cache_lengths=case.cache_lengths[sel],
            return_lse=True, implementation=backend,
        )

    out, lse = run()
    for b in range(3):
        alone = run(slice(b, b + 1))
        H.assert_bitwise_equal(out[b : b + 1], alone[0], name=f"out of sequence {b}")
        H.assert_bitwise_equal(lse[b : b + 1], alone[1], name=f"lse of sequence {b}")
    whole = run(rows=10**6)
    np.testing.assert_allclose(out, whole[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, whole[1], rtol=1e-6, atol=1e-6)


def test_a_pass_of_the_cpu_kernel_folds_at_most_rows_per_pass_rows(monkeypatch):
    """The cpu kernel's partial outputs (``_scratch``: items × folded rows × Dv) are asked for
    ROWS_PER_PASS rows at most, whatever Lq and the group (1,024 rows here were one pass)."""
    from dotattn import decode_semantics
    from dotattn.kernels import cpu_decode

    monkeypatch.setattr(cpu_decode, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(cpu_decode, "POOL_ONLY_BYTES", 0)  # the pool's path: parts from _scratch
    asked = []
    scratch = cpu_decode._scratch
    monkeypatch.setattr(cpu_decode, "_scratch", lambda n, R, Dv, T: asked.append(R) or scratch(n, R, Dv, T))
    case = C.make_case(2, B=2, Hq=32, Hkv=2, D=16, Lq=64, Lnew=64, lengths=[700, 300])
    out = dotattn.attention_with_kvcache(case.q, case.k_cache, case.v_cache, case.k_new, case.v_new,
                                         implementation="cpu", **case.kwargs())
    assert asked and max(asked) <= decode_semantics.ROWS_PER_PASS == 256, asked
    assert len(asked) == 4  # 1,024 rows: four passes of 256
    out64, _, naive = C.expected(case)
    H.assert_close_to_reference(out, out64, naive, name="out", dtype=np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Lq", [1, 3])
def test_a_group_wider_than_a_pass_runs_without_splitting_forever(backend, Lq):
    """More query heads a K/V head than a pass folds (G = 260 > ROWS_PER_PASS = 256, MQA): one
    query row's group is the smallest block, so a one-token call runs whole and longer ones in
    blocks of one row — until 23:00 on 6 Dec 2026 every block of one row was split again, the
    call recursing until Python's RecursionError (a one-token decode step included)."""
    for page_size in (None, 4):
        C.check_call(backend, 5 + Lq, dict(B=2, Hq=260, Hkv=1, D=8, Lq=Lq, Lnew=Lq, max_len=40, page_size=page_size),
                     {}, f"{backend} G260 Lq{Lq} page {page_size}")


@pytest.mark.parametrize("page_size", [None, 2, 16])
def test_numpy_kernel_gives_the_same_bits_alone_on_a_worker_thread_and_again(page_size):
    """The numpy kernel fills one set of scratch buffers chunk after chunk, sequence after
    sequence (fresh per-chunk temporaries cost page faults in the main thread): each sequence
    gets the bits it gets alone, on a worker thread and on a second call, whatever a longer
    sequence or a chunk with ±inf/NaN values left in those buffers before it."""
    S = decoding.SPLIT_SIZE
    case = C.make_case(5, B=3, lengths=[3 * S + 40, 2 * S - 9, 100], Lq=2, Lnew=2, Hq=6, Hkv=2, D=32,
                       page_size=page_size, dtype=np.float16, q_dtype=np.float32)

    def slot(b, j):  # (cache, index) of position j of sequence b
        if page_size is None:
            return b, slice(None), j
        return case.block_table[b, j // page_size], slice(None), j % page_size

    case.v_cache[slot(0, S + 44)] = np.inf  # sequence 0: ±inf/NaN values in its second and last chunks
    case.v_cache[slot(0, 3 * S + 30)] = np.nan
    case.k_cache[slot(0, 3 * S + 31)] = -np.inf

    def run(b=None):
        sel = slice(None) if b is None else slice(b, b + 1)
        caches = [x.copy() if page_size is not None else x[sel].copy() for x in (case.k_cache, case.v_cache)]
        table = None if page_size is None else case.block_table[sel]
        return dotattn.attention_with_kvcache(
            case.q[sel], *caches, case.k_new[sel], case.v_new[sel], cache_lengths=case.cache_lengths[sel],
            block_table=table, return_lse=True, implementation="numpy",
        )

    first = run()
    assert np.isnan(first[0][0]).any() and np.isfinite(first[0][1:]).all()  # the NaN stays in its sequence
    on_worker = []
    worker = threading.Thread(target=lambda: on_worker.append(run()))
    worker.start()
    worker.join()
    for name, got in [("second call", run()), ("worker thread", on_worker[0])]:
        H.assert_bitwise_equal(got[0], first[0], name=f"out, {name}")
        H.assert_bitwise_equal(got[1], first[1], name=f"lse, {name}")
    for b in (2, 1, 0):  # each after other contents than in the batch
        out, lse = run(b)
        H.assert_bitwise_equal(out[0], first[0][b], name=f"out of sequence {b} alone")
        H.assert_bitwise_equal(lse[0], first[1][b], name=f"lse of sequence {b} alone")


def test_backends_agree_on_an_empty_and_a_zero_length_call():
    for backend in BACKENDS + ["reference"]:
        case = C.make_case(2, lengths=[0, 0], B=2, Lnew=None)
        out, lse = dotattn.attention_with_kvcache(
            case.q, case.k_cache, case.v_cache, return_lse=True, implementation=backend, **case.kwargs()
        )
        assert (out == 0).all() and np.isneginf(lse).all()


@pytest.mark.parametrize("dtype", H.DTYPES, ids=H.dtype_name)
@pytest.mark.parametrize("form", ["capacity-slice", "batch-step", "combined-kv-blhd", "expanded", "paged-slice"])
def test_strided_caches_give_the_bits_of_contiguous_copies(dtype, form):
    """A cache that is a view (a slice of a larger buffer, every other sequence, one half of a
    combined K/V tensor, a broadcast) runs on the cpu kernel through a flat view of its memory:
    the bits of a contiguous copy (an audit of 6 Dec found such caches sent to the numpy kernel,
    which rounds differently).  New tokens land in the caller's view."""
    rng = np.random.default_rng(7)
    qdt = np.float32 if dtype in (np.float16, H.DTYPES[1]) else dtype
    B, Hq, Hkv, D, n = 2, 4, 2, 64, 300
    q = rng.standard_normal((B, Hq, 2, D)).astype(qdt)
    kn, vn = (rng.standard_normal((B, Hkv, 2, D)).astype(dtype) for _ in range(2))
    big_k, big_v = (rng.standard_normal((2 * B, Hkv, 2 * n, D)).astype(dtype) for _ in range(2))
    layout, table = "bhld", None
    if form == "capacity-slice":
        k, v = big_k[:B, :, :n], big_v[:B, :, :n]
    elif form == "batch-step":
        k, v = big_k[::2], big_v[::2]
    elif form == "combined-kv-blhd":  # (B, capacity, 2, Hkv, D): keys and values interleaved by position
        kv = np.stack([big_k[:B].swapaxes(1, 2), big_v[:B].swapaxes(1, 2)], axis=2)
        k, v, layout = kv[:, :, 0], kv[:, :, 1], "blhd"
        q, kn, vn = (x.swapaxes(1, 2).copy() for x in (q, kn, vn))
    elif form == "expanded":  # read only: one sequence's cache seen by both
        k, v = (np.broadcast_to(x[:1, :, :n], (B, Hkv, n, D)) for x in (big_k, big_v))
        kn = vn = None
    else:  # pages (num_pages, Hkv, page_size, D) sliced from a longer page buffer
        k, v = big_k[:, :, :64], big_v[:, :, :64]  # 4 pages of 64 slots
        table = np.array([[3, 0, -1], [2, -1, -1]])
    lengths = np.array([100 if table is not None else 200, 5])
    kwargs = dict(cache_lengths=lengths, block_table=table, layout=layout, return_lse=True, implementation="cpu")
    copies = [np.ascontiguousarray(x) for x in (k, v)]
    want = dotattn.attention_with_kvcache(q, *copies, kn, vn, **kwargs)
    assert not k.flags.c_contiguous
    got = dotattn.attention_with_kvcache(q, k, v, kn, vn, **kwargs)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))
    assert np.array_equal(np.ascontiguousarray(k).view(np.uint8), copies[0].view(np.uint8))  # the appended tokens
    assert np.array_equal(np.ascontiguousarray(v).view(np.uint8), copies[1].view(np.uint8))


@pytest.mark.parametrize("dtype", H.DTYPES, ids=H.dtype_name)
def test_read_only_caches_decode(dtype):
    """A read-only cache (flags.writeable off, a read-only memmap, a broadcast) with no new
    tokens: the bits of a writeable one (until 6 Dec the cpu kernel failed to type it)."""
    case = C.make_case(4, B=2, lengths=[300, 9], capacity=320, Lnew=None, dtype=dtype)
    kwargs = dict(cache_lengths=case.cache_lengths, return_lse=True)
    want = dotattn.attention_with_kvcache(case.q, case.k_cache, case.v_cache, **kwargs)
    case.k_cache.flags.writeable = False
    case.v_cache.flags.writeable = False
    got = dotattn.attention_with_kvcache(case.q, case.k_cache, case.v_cache, **kwargs)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


def test_caches_the_cpu_kernel_cannot_index_take_the_numpy_kernel():
    """A negative stride, or a head dim that is not contiguous: the numpy kernel (same results,
    to rounding)."""
    case = C.make_case(3, B=2, lengths=[5, 9], capacity=12, Lnew=None)
    reversed_buffer = np.ascontiguousarray(case.k_cache[:, :, ::-1])
    for k in (reversed_buffer[:, :, ::-1], np.repeat(case.k_cache, 2, -1)[..., ::2]):
        assert not k.flags.c_contiguous
        got = dotattn.attention_with_kvcache(case.q, k, case.v_cache, cache_lengths=case.cache_lengths)
        want = dotattn.attention_with_kvcache(case.q, case.k_cache, case.v_cache, cache_lengths=case.cache_lengths)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("one", [5, np.int64(5), np.array(5), np.uint8(5)], ids=["int", "int64", "0-d", "uint8"])
def test_one_length_for_every_sequence(one):
    """``cache_lengths`` as one int is that length for every sequence (FlashAttention's
    ``cache_seqlens`` takes an int too): the same writes and output as ``[5, 5]``."""
    case = C.make_case(6, B=2, lengths=[5, 5], capacity=12)
    k, v = case.k_cache.copy(), case.v_cache.copy()
    want = dotattn.attention_with_kvcache(case.q, k, v, case.k_new, case.v_new, cache_lengths=np.array([5, 5]))
    got = dotattn.attention_with_kvcache(case.q, case.k_cache, case.v_cache, case.k_new, case.v_new, cache_lengths=one)
    np.testing.assert_array_equal(got, want)
    assert case.k_cache.tobytes() == k.tobytes() and case.v_cache.tobytes() == v.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_the_reference_returns_the_documented_lse_dtype(dtype):
    """float32 LSEs (float64 for a float64 call) from every implementation, the float64
    reference's included — which gave its float64 LSE as it was until 6 Dec 2026."""
    case = C.make_case(5, dtype=dtype)
    lses = {}
    for backend in ["reference", *C.decode_backends()]:
        k, v = case.k_cache.copy(), case.v_cache.copy()
        _, lses[backend] = dotattn.attention_with_kvcache(case.q, k, v, case.k_new, case.v_new, return_lse=True,
                                                          implementation=backend, **case.kwargs())
    for backend, lse in lses.items():
        assert lse.dtype == (np.float64 if dtype == np.float64 else np.float32), backend


def test_default_implementation_runs():
    case = C.make_case(4)
    out = dotattn.attention_with_kvcache(case.q, case.k_cache, case.v_cache, case.k_new, case.v_new, **case.kwargs())
    out64, _, naive = C.expected(case)
    H.assert_close_to_reference(out, out64, naive)


def test_cpu_result_does_not_depend_on_the_thread_count():
    """Small calls run on one Numba thread, large ones on all: the same bits either way."""
    if "cpu" not in BACKENDS:
        pytest.skip("the cpu decode kernel is not under test")
    from dotattn.kernels import cpu_decode

    case = C.make_case(8, B=3, max_len=3 * decoding.SPLIT_SIZE, page_size=8, Lq=2, Lnew=2, Hq=6, Hkv=3)
    cpu_decode._CHOICES.clear()  # a fresh size class: its first large call runs on the pool
    results = []
    for min_bytes in (0, 1 << 62):
        kc, vc = case.k_cache.copy(), case.v_cache.copy()
        old = cpu_decode.PARALLEL_MIN_BYTES
        cpu_decode.PARALLEL_MIN_BYTES = min_bytes
        try:
            results.append(dotattn.attention_with_kvcache(
                case.q, kc, vc, case.k_new, case.v_new, return_lse=True, implementation="cpu", **case.kwargs()
            ))
        finally:
            cpu_decode.PARALLEL_MIN_BYTES = old
    H.assert_bitwise_equal(results[0][0], results[1][0], name="out")
    H.assert_bitwise_equal(results[0][1], results[1][1], name="lse")


def test_cpu_large_call_stays_on_the_calling_thread_when_numba_threads_are_one(monkeypatch):
    """A caller's one-thread block (numba.set_num_threads(1), as SmolLM's busy-machine mode)
    keeps a call that would use the pool on the calling thread; the bits are those of the pool."""
    if "cpu" not in BACKENDS:
        pytest.skip("the cpu decode kernel is not under test")
    import numba

    from dotattn.kernels import cpu_decode

    case = C.make_case(8, B=3, max_len=3 * decoding.SPLIT_SIZE, page_size=8, Hq=6, Hkv=3)
    monkeypatch.setattr(cpu_decode, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(cpu_decode, "_CHOICES", {})  # a fresh size class: the first call on the pool
    pooled = dotattn.attention_with_kvcache(case.q, case.k_cache.copy(), case.v_cache.copy(), case.k_new, case.v_new,
                                            return_lse=True, implementation="cpu", **case.kwargs())

    def no_pool():
        raise AssertionError("the pool was used under numba.set_num_threads(1)")

    monkeypatch.setattr(cpu_decode, "_pool", no_pool)
    previous = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        alone = dotattn.attention_with_kvcache(case.q, case.k_cache.copy(), case.v_cache.copy(), case.k_new, case.v_new,
                                               return_lse=True, implementation="cpu", **case.kwargs())
    finally:
        numba.set_num_threads(previous)
    H.assert_bitwise_equal(alone[0], pooled[0], name="out")
    H.assert_bitwise_equal(alone[1], pooled[1], name="lse")


def test_cpu_items_on_numba_team_give_the_bits_of_the_pool(monkeypatch):
    """on_numba_team(): a parallel call's items run on Numba's team, not the pool (SmolLM's
    decode steps), with the same bits; the setting is restored after the block."""
    if "cpu" not in BACKENDS:
        pytest.skip("the cpu decode kernel is not under test")
    from dotattn.kernels import _cpu_decode_kernels as K
    from dotattn.kernels import cpu_decode

    case = C.make_case(9, B=3, max_len=3 * decoding.SPLIT_SIZE, page_size=8, Lq=2, Lnew=2, Hq=6, Hkv=3)
    monkeypatch.setattr(cpu_decode, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(cpu_decode, "_CHOICES", {})  # fresh size classes: their first calls in parallel
    pooled = dotattn.attention_with_kvcache(case.q, case.k_cache.copy(), case.v_cache.copy(), case.k_new, case.v_new,
                                            return_lse=True, implementation="cpu", **case.kwargs())
    team_calls = []
    team_kernel = K.run_items_team

    def counted(*args):
        team_calls.append(args[2])
        return team_kernel(*args)

    def no_pool():
        raise AssertionError("the pool was used inside on_numba_team()")

    monkeypatch.setattr(K, "run_items_team", counted)
    monkeypatch.setattr(cpu_decode, "_pool", no_pool)
    with cpu_decode.on_numba_team():
        on_team = dotattn.attention_with_kvcache(case.q, case.k_cache.copy(), case.v_cache.copy(), case.k_new,
                                                 case.v_new, return_lse=True, implementation="cpu", **case.kwargs())
    assert team_calls == ([min(cpu_decode._workers(), numba.get_num_threads())] if cpu_decode._workers() > 1 else [])
    assert not cpu_decode._launch.in_numba_team()
    H.assert_bitwise_equal(on_team[0], pooled[0], name="out")
    H.assert_bitwise_equal(on_team[1], pooled[1], name="lse")
    out64, _, naive = C.expected(case)
    H.assert_close_to_reference(on_team[0], out64, naive)


def test_cpu_calls_of_pool_only_bytes_run_on_the_pool_without_a_choice(monkeypatch):
    """A call reading POOL_ONLY_BYTES or more of K/V runs on the pool every time (no size class,
    so no exploration or retry alone) with the bits of a call the choice ran; smaller calls keep
    the choice.  ``mode_counts`` counts the pool-only calls as pool calls."""
    if "cpu" not in BACKENDS:
        pytest.skip("the cpu decode kernel is not under test")
    from dotattn.kernels import cpu_decode

    if min(cpu_decode._workers(), numba.get_num_threads()) < 2:
        pytest.skip(H.lacks("a second core", "every call runs on the calling thread"))
    case = C.make_case(10, B=3, max_len=3 * decoding.SPLIT_SIZE, page_size=8, Hq=6, Hkv=3)
    monkeypatch.setattr(cpu_decode, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(cpu_decode, "_CHOICES", {})

    def call():
        return dotattn.attention_with_kvcache(case.q, case.k_cache.copy(), case.v_cache.copy(), case.k_new,
                                              case.v_new, return_lse=True, implementation="cpu", **case.kwargs())

    chosen = call()  # the size class's first call: on the pool, through its choice
    assert len(cpu_decode._CHOICES) == 1
    monkeypatch.setattr(cpu_decode, "_CHOICES", {})
    monkeypatch.setattr(cpu_decode, "POOL_ONLY_BYTES", 0)

    def no_choice(self):
        raise AssertionError("a pool-only call consulted the pool-or-alone choice")

    monkeypatch.setattr(cpu_decode.ParallelChoice, "choose", no_choice)
    ran = []
    run_items = cpu_decode._run_items
    monkeypatch.setattr(cpu_decode, "_run_items", lambda pool, *a: (ran.append(pool), run_items(pool, *a))[1])
    before = cpu_decode.mode_counts()
    for _ in range(6):  # past the choice's exploration (pool, pool, alone, alone)
        pooled = call()
        H.assert_bitwise_equal(pooled[0], chosen[0], name="out")
        H.assert_bitwise_equal(pooled[1], chosen[1], name="lse")
    after = cpu_decode.mode_counts()
    assert ran == [True] * 6 and not cpu_decode._CHOICES
    assert (after[0] - before[0], after[1] - before[1]) == (0, 6)


def test_cpu_parallel_choice_runs_the_faster_mode_and_retries_the_other():
    """Large calls run on the pool or alone by their measured times (same bits either way)."""
    if "cpu" not in BACKENDS:
        pytest.skip("the cpu decode kernel is not under test")
    from dotattn.kernels.cpu_decode import ParallelChoice

    choice = ParallelChoice()
    assert choice.choose() is True  # first: the pool, a warm-up whose time is not kept
    choice.record(True, 1.0)  # (a compile: ignored)
    assert choice.choose() is True
    choice.record(True, 2e-9)
    assert choice.choose() is False  # then alone once
    choice.record(False, 1e-9)
    modes = []
    for _ in range(6 * ParallelChoice.RETRY):
        modes.append(choice.choose())
        choice.record(modes[-1], 2e-9 if modes[-1] else 1e-9)
    # alone is faster: the pool only on its retries, 2, 4, 8, 16 calls apart, then every RETRY
    retries = [i for i, m in enumerate(modes) if m]
    gaps = [b - a for a, b in zip(retries, retries[1:])]
    first = ParallelChoice.RETRY_POOL_FIRST
    assert retries[0] == 1 + first  # the switch came at the second call of the loop
    assert gaps[:4] == [2 * first, 4 * first, 8 * first, ParallelChoice.RETRY], gaps
    assert set(gaps[4:]) == {ParallelChoice.RETRY}, gaps
    assert choice.counts == [modes.count(False) + 1, modes.count(True) + 2]  # with the three before
    assert choice.choose() is False
    choice.record(False, 5e-6)  # one slow call alone (an outlier) changes nothing
    assert choice.choose() is False
    choice.record(False, 1e-9)
    modes = []
    while not modes or not modes[-1]:  # the load went away: the pool's next retry measures faster
        modes.append(choice.choose())
        choice.record(modes[-1], 0.2e-9 if modes[-1] else 1e-9)
    assert len(modes) <= ParallelChoice.RETRY
    assert choice.choose() is True and choice.choose() is True  # and the pool runs from then on


def test_cpu_parallel_choice_comes_back_to_the_pool_after_a_moment_of_slow_pool_calls():
    """A few slow pool calls (another program on a core for a moment) send a class alone; the
    pool's retry comes RETRY_POOL_FIRST calls later and its one good time brings the class back
    (its kept times are replaced): it ran 64–96 calls alone before (1 Dec 2026)."""
    if "cpu" not in BACKENDS:
        pytest.skip("the cpu decode kernel is not under test")
    from dotattn.kernels.cpu_decode import ParallelChoice

    choice = ParallelChoice()
    pool_t, alone_t = 1e-9, 1.9e-9  # an idle machine: the pool ≈ 1.9× faster
    for _ in range(40):
        mode = choice.choose()
        choice.record(mode, pool_t if mode else alone_t)
    assert choice.choose() is True
    choice.record(True, pool_t)
    for _ in range(ParallelChoice.KEEP):  # the moment: the pool as slow as alone
        choice.record(choice.choose(), alone_t)
    assert choice.choose() is False  # the class went alone
    choice.record(False, alone_t)
    modes = []
    for _ in range(ParallelChoice.RETRY):
        modes.append(choice.choose())
        choice.record(modes[-1], pool_t if modes[-1] else alone_t)
    back = modes.index(True)
    assert back < ParallelChoice.RETRY_POOL_FIRST, modes  # the pool's retry ...
    assert all(modes[back:]), modes  # ... and its one good time brings the class back
    assert choice.times[1] == [pool_t] * ParallelChoice.KEEP
    # a retry due on a call after a pause (not timed) waits for the next call
    for _ in range(ParallelChoice.KEEP):
        choice.record(choice.choose(), alone_t)
    assert choice.choose() is False
    choice.record(False, alone_t)
    choice.next_retry = choice.calls + 1  # the pool's retry is due on the next call ...
    choice.last -= 10 * ParallelChoice.IDLE_S  # ... which comes after a pause
    assert choice.choose() is False  # not timed: no retry
    choice.record(False, alone_t)
    assert choice.choose() is True  # the retry, on the next call


@pytest.mark.parametrize("alone_t, widening", [(1.9e-9, True), (1.2e-9, False)], ids=["wide", "narrow"])
def test_cpu_parallel_choice_backs_off_alone_retries_while_the_pool_wins_widely(alone_t, widening):
    """While the pool wins by WIDE_MARGIN, alone's retries come RETRY calls apart, then twice as far
    at each retry up to RETRY_ALONE_MAX (one call in 32 at alone's time cost a loop ≈ 2–3 %); by a
    narrower margin they stay RETRY apart."""
    if "cpu" not in BACKENDS:
        pytest.skip("the cpu decode kernel is not under test")
    from dotattn.kernels.cpu_decode import ParallelChoice

    choice, pool_t = ParallelChoice(), 1e-9
    modes = []
    for _ in range(12 * ParallelChoice.RETRY_ALONE_MAX):
        modes.append(choice.choose())
        choice.record(modes[-1], pool_t if modes[-1] else alone_t)
    alone_calls = [i for i, m in enumerate(modes) if not m][2:]  # after the two exploring calls
    gaps = [b - a for a, b in zip(alone_calls, alone_calls[1:])]
    R, top = ParallelChoice.RETRY, ParallelChoice.RETRY_ALONE_MAX
    if widening:
        doubling = [R * 2**k for k in range(1, 8) if R * 2**k < top]
        assert gaps[: len(doubling)] == doubling, gaps
        assert set(gaps[len(doubling):]) == {top}, gaps
    else:
        assert set(gaps) == {R}, gaps
    assert all(modes[i] for i in range(4, len(modes)) if i not in alone_calls)  # every other call: the pool
    # alone becoming faster sends the class alone at the next retry; the gaps start again at RETRY
    while modes[-1]:
        modes.append(choice.choose())
        choice.record(modes[-1], 5 * pool_t if modes[-1] else alone_t)
    assert choice.alone_gap == R


def test_cpu_parallel_choice_retries_the_pool_again_when_its_retry_found_the_partner_parked():
    """A pool retry after the class ran alone found its partner parked (it parks 300 µs after a
    call): its time was the partner's wake-up, not the pool's.  It is not kept, and the next call
    retries the pool (the partner now awake); a cold pool call that was no retry (the pool is the
    class's mode, its calls far apart) is timed as it is."""
    if "cpu" not in BACKENDS:
        pytest.skip("the cpu decode kernel is not under test")
    from dotattn.kernels.cpu_decode import ParallelChoice

    choice = ParallelChoice()
    pool_t, alone_t, wake_t = 1e-9, 1.5e-9, 3e-9
    for _ in range(8):  # exploration; alone is kept as the faster (the pool's first times were slow)
        mode = choice.choose()
        choice.record(mode, wake_t if mode else alone_t)
    assert choice.best is False
    kept = list(choice.times[1])
    modes = []
    while not any(modes):  # up to the pool's retry
        modes.append(choice.choose())
        if modes[-1]:
            choice.cold = True  # decode found the partner parked
        choice.record(modes[-1], wake_t if modes[-1] else alone_t)
    assert choice.times[1] == kept  # the cold retry's time: not kept
    assert choice.cold is False  # (record clears it)
    assert choice.choose() is True  # the retry again, at once
    choice.record(True, pool_t)
    assert choice.times[1][-1] == pool_t
    for _ in range(ParallelChoice.KEEP - 1):  # the pool's warm times bring the class over
        assert choice.choose() is True
        choice.record(True, pool_t)
    assert choice.choose() is True and choice.best is True
    choice.cold = True  # the pool as the class's mode, a cold call: timed
    choice.record(True, wake_t)
    assert choice.times[1][-1] == wake_t


def test_cpu_parallel_choice_times_a_second_cold_retry_in_a_row():
    """Where calls come further apart than the partner's spin every pool call finds it parked:
    a cold retry is retried once at the next call, and when that one is cold too its time is
    kept (it is the pool's time in such a program) — the class does not retry the pool call
    after call."""
    if "cpu" not in BACKENDS:
        pytest.skip("the cpu decode kernel is not under test")
    from dotattn.kernels.cpu_decode import ParallelChoice

    choice = ParallelChoice()
    alone_t, cold_t = 1e-9, 2e-9
    modes = []
    for _ in range(8 * ParallelChoice.RETRY):
        modes.append(choice.choose())
        if modes[-1]:
            choice.cold = True  # every pool call cold
        choice.record(modes[-1], cold_t if modes[-1] else alone_t)
    pool_runs = "".join("P" if m else "a" for m in modes[4:]).split("a")
    assert max(len(r) for r in pool_runs) <= 2, modes  # a retry and its one recheck, no more
    assert sum(modes) < len(modes) // 8, modes  # alone, the pool only on its (backed-off) retries
    assert choice.times[1] and set(choice.times[1]) == {cold_t}


def _call_under_the_rule(seed, monkeypatch):
    """``(cpu_decode, nbytes, call)``: a parallel-sized case (two cores, else skipped) whose call
    reads ``nbytes`` of K/V, the rule (PARALLEL_MIN_BYTES) just above it, fresh size classes."""
    if "cpu" not in BACKENDS:
        pytest.skip("the cpu decode kernel is not under test")
    from dotattn.kernels import cpu_decode

    if min(cpu_decode._workers(), numba.get_num_threads()) < 2:
        pytest.skip(H.lacks("a second core", "every call runs on the calling thread"))
    case = C.make_case(seed, B=2, max_len=3 * decoding.SPLIT_SIZE, page_size=8, Hq=6, Hkv=3)
    nbytes = int((case.kwargs()["cache_lengths"] + case.k_new.shape[2]).sum()) * 3 * 2 * case.q.shape[-1] * 4
    monkeypatch.setattr(cpu_decode, "PARALLEL_MIN_BYTES", nbytes + 1)
    monkeypatch.setattr(cpu_decode, "_CHOICES", {})

    def call():
        return dotattn.attention_with_kvcache(case.q, case.k_cache.copy(), case.v_cache.copy(), case.k_new,
                                              case.v_new, return_lse=True, implementation="cpu", **case.kwargs())

    return cpu_decode, nbytes, call


def test_cpu_decode_takes_two_threads_from_a_lower_size_inside_on_numba_team(monkeypatch):
    """Calls between PARALLEL_MIN_BYTES_TEAM and PARALLEL_MIN_BYTES run alone outside
    on_numba_team() (no size class) and through the choice on the team inside it (SmolLM's
    decode steps: two threads won there from ≈ 0.6 MiB); the same bits."""
    cpu_decode, nbytes, call = _call_under_the_rule(11, monkeypatch)
    from dotattn.kernels import _cpu_decode_kernels as K

    monkeypatch.setattr(cpu_decode, "PARALLEL_MIN_BYTES_TEAM", nbytes)
    team_calls = []
    team_kernel = K.run_items_team
    monkeypatch.setattr(K, "run_items_team", lambda *a: (team_calls.append(a[2]), team_kernel(*a))[1])
    alone = call()
    assert not cpu_decode._CHOICES and not team_calls  # below the plain rule: this thread, no choice
    with cpu_decode.on_numba_team():
        on_team = call()  # the class's first call: on the team
    assert len(cpu_decode._CHOICES) == 1 and len(team_calls) == 1
    H.assert_bitwise_equal(on_team[0], alone[0], name="out")
    H.assert_bitwise_equal(on_team[1], alone[1], name="lse")
    monkeypatch.setattr(cpu_decode, "PARALLEL_MIN_BYTES_TEAM", nbytes + 1)
    with cpu_decode.on_numba_team():
        call()  # above the call: alone inside the team's block too
    assert len(team_calls) == 1


def test_cpu_decode_takes_the_choice_below_the_rule_only_for_calls_back_to_back(monkeypatch):
    """A call between PARALLEL_MIN_BYTES_BACK_TO_BACK and PARALLEL_MIN_BYTES takes the
    pool-or-alone choice only when it starts within BACK_TO_BACK_S of the previous such call's
    end (a loop of calls: two threads won 1.3–1.6× there); with other work between calls it runs
    on its thread without the choice's Python.  The same bits either way."""
    cpu_decode, nbytes, call = _call_under_the_rule(12, monkeypatch)
    monkeypatch.setattr(cpu_decode, "PARALLEL_MIN_BYTES_BACK_TO_BACK", nbytes)
    monkeypatch.setattr(cpu_decode, "_LAST_BACK_TO_BACK_END", [0.0])
    monkeypatch.setattr(cpu_decode, "BACK_TO_BACK_S", 0.0)  # every call "after other work"
    alone = call()
    call()
    assert not cpu_decode._CHOICES
    assert cpu_decode._LAST_BACK_TO_BACK_END[0] > 0.0  # the calls' ends are kept
    monkeypatch.setattr(cpu_decode, "BACK_TO_BACK_S", 60.0)  # every call right after the last
    chosen = call()  # the class's first call: on the pool
    assert len(cpu_decode._CHOICES) == 1
    H.assert_bitwise_equal(chosen[0], alone[0], name="out")
    H.assert_bitwise_equal(chosen[1], alone[1], name="lse")
    monkeypatch.setattr(cpu_decode, "PARALLEL_MIN_BYTES_BACK_TO_BACK", nbytes + 1)  # above the call: no choice
    monkeypatch.setattr(cpu_decode, "_CHOICES", {})
    call()
    assert not cpu_decode._CHOICES


def test_cpu_decode_mode_counts_add_every_class(monkeypatch):
    from dotattn.kernels import cpu_decode
    from dotattn.kernels.cpu_decode import ParallelChoice

    a, b = ParallelChoice(), ParallelChoice()
    a.counts, b.counts = [3, 4], [1, 10]
    monkeypatch.setattr(cpu_decode, "_CHOICES", {(1, 2, False): a, (5, 2, False): b})
    monkeypatch.setattr(cpu_decode, "_POOL_ONLY_CALLS", [2])  # calls too large for a choice: on the pool
    assert cpu_decode.mode_counts() == (4, 16)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, C.BFLOAT16], ids=["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_reaches_only_the_rows_that_see_it(backend, dtype):
    """A NaN key/value poisons the rows that see it (IEEE), no other row; unused slots are NaN too."""
    case = C.make_case(9, B=1, lengths=[40], Lq=3, Lnew=None, Hq=2, Hkv=1, capacity=64, dtype=dtype,
                       q_dtype=np.float32)
    # key 38 is seen by query rows 1 and 2 (positions 38, 39) under causal; not by row 0 (37)
    case.k_cache[0, 0, 38, 0] = np.nan
    case.v_cache[0, 0, 38, 1] = np.nan
    out = dotattn.attention_with_kvcache(case.q, case.k_cache, case.v_cache, implementation=backend, **case.kwargs())
    assert np.isfinite(out[0, :, 0]).all()
    assert np.isnan(out[0, :, 1:]).any(axis=-1).all()
    # a window that hides key 38 from every row keeps all rows finite
    out = dotattn.attention_with_kvcache(
        case.q, case.k_cache, case.v_cache, implementation=backend, **case.kwargs(window=(None, None), causal=True)
    )
    assert np.isnan(out[0, :, 1:]).any()
    case.k_cache[0, 0, 38] = case.v_cache[0, 0, 38] = 0
    case.k_cache[0, 0, 10, 0] = case.v_cache[0, 0, 10, 0] = np.nan
    out = dotattn.attention_with_kvcache(
        case.q, case.k_cache, case.v_cache, implementation=backend, **case.kwargs(window=(20, None))
    )
    assert np.isfinite(out).all(), "a key outside every row's window leaked NaN"
    # key 17: inside the range the rows' windows span, seen by row 0 (window [17, 37]) only —
    # rows 1 and 2 weigh it exactly 0, and 0 · NaN must not reach them
    case.k_cache[0, 0, 10] = case.v_cache[0, 0, 10] = 0
    case.v_cache[0, 0, 17] = np.nan
    out = dotattn.attention_with_kvcache(
        case.q, case.k_cache, case.v_cache, implementation=backend, **case.kwargs(window=(20, None))
    )
    assert np.isnan(out[0, :, 0]).any(axis=-1).all()
    assert np.isfinite(out[0, :, 1:]).all(), "a value weighed 0 leaked NaN into a row that does not see it"


@pytest.mark.parametrize(
    "B, L, sink, D",
    [(1, 4096, 0, 16), (1, 4096, 300, 16), (2, 32768, 5000, 16), (1, 4096, 0, 32)],
)
def test_float32_attention_sink_among_many_tiny_weights(B, L, sink, D):
    """One key with weight ≈ 1 (an attention sink) among thousands of weights ≈ 5e-8, under
    half an ulp of it: the kernel's lane sums and P·V accumulators add in blocks
    (SUM_VECTORS, PV_SUM_KEYS), not key by key into a sum that already holds the sink — which
    lost every small term and came out 3.6× the naive error at 4k (1 Dec)."""
    rng = np.random.default_rng(L + sink)
    Hkv, G = 2, 4
    k = rng.standard_normal((B, Hkv, L, D)).astype(np.float32)
    k[..., 0] = rng.uniform(-0.5, 0.5, (B, Hkv, L)).astype(np.float32)
    k[:, :, sink, 0] = 17.0
    v = (rng.standard_normal((B, Hkv, L, D)) + 3.0).astype(np.float32)
    q = np.zeros((B, Hkv * G, 1, D), np.float32)
    q[..., 0] = 1.0
    out, lse = dotattn.attention_with_kvcache(
        q, k, v, cache_lengths=np.full(B, L), scale=1.0, return_lse=True, implementation="cpu"
    )
    ref_out, ref_lse = H.reference(q, k, v, scale=1.0)
    naive_out, naive_lse = H.naive(q, k, v, scale=1.0)
    H.assert_close_to_reference(out, ref_out, naive_out, name="out")
    H.assert_close_to_reference(lse, ref_lse, naive_lse, name="lse")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_alibi_slopes_give_the_float32_slopes_result(backend):
    """bfloat16 slopes were refused ("must be a float array, got dtype bfloat16")."""
    rng = np.random.default_rng(8)
    q = rng.standard_normal((2, 4, 1, 8)).astype(np.float32)
    k_cache, v_cache = (rng.standard_normal((2, 2, 40, 8)).astype(np.float32) for _ in range(2))
    slopes = np.array([0.5, 0.25, 0.125, 0.0625], np.float32)  # (exact in bfloat16)
    call = dict(cache_lengths=np.array([37, 12]), implementation=backend)
    want = dotattn.attention_with_kvcache(q, k_cache, v_cache, alibi_slopes=slopes, **call)
    got = dotattn.attention_with_kvcache(q, k_cache, v_cache, alibi_slopes=slopes.astype(C.BFLOAT16), **call)
    np.testing.assert_array_equal(got, want)
