"""KVCache: buffers, lengths it advances itself, pages from a free list, reset, both libraries."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

import decode_cases as C
import helpers as H
import dotattn
from dotattn import AttentionValueError, KVCache

BACKENDS = C.decode_backends()


def _reference_step(ks, vs, q, **options):
    """Float64 reference of one step from the logical sequences ``ks[b] (Hkv, n, D)``."""
    n = np.array([k.shape[1] for k in ks])
    B, Hkv, D = len(ks), ks[0].shape[0], ks[0].shape[2]
    K = np.zeros((B, Hkv, n.max(), D))
    V = np.zeros((B, Hkv, n.max(), D))
    for b in range(B):
        K[b, :, : n[b]], V[b, :, : n[b]] = ks[b], vs[b]
    return H.reference(q.astype(np.float64), K, V, kv_lengths=n, causal=True, **options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("page_size", [None, 5])
@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_prefill_then_decode_over_layers(backend, page_size, layout):
    """Padded prompts appended per layer, then decode steps: every layer matches the reference."""
    rng = np.random.default_rng(0)
    B, Hq, Hkv, D, L, layers = 3, 6, 2, 8, 9, 2
    prompt = np.array([9, 4, 0])
    cache = KVCache(B, Hkv, D, 40, num_layers=layers, page_size=page_size, layout=layout, fill=np.nan)
    seqs = [[[np.zeros((Hkv, 0, D))] * 2 for _ in range(B)] for _ in range(layers)]  # [layer][b] = [k, v]

    def to_layout(x):
        return x if layout == "bhld" else np.ascontiguousarray(x.swapaxes(1, 2))

    for layer in range(layers):
        k = rng.standard_normal((B, Hkv, L, D)).astype(np.float32)
        v = rng.standard_normal((B, Hkv, L, D)).astype(np.float32)
        cache.append(to_layout(k), to_layout(v), layer=layer, lengths=prompt)
        for b in range(B):
            seqs[layer][b] = [k[b, :, : prompt[b]], v[b, :, : prompt[b]]]
        expect = prompt if layer == layers - 1 else np.zeros(B)
        np.testing.assert_array_equal(cache.lengths, expect)
    for step in range(3):
        for layer in range(layers):
            q = rng.standard_normal((B, Hq, 1, D)).astype(np.float32)
            kn = rng.standard_normal((B, Hkv, 1, D)).astype(np.float32)
            vn = rng.standard_normal((B, Hkv, 1, D)).astype(np.float32)
            out, lse = cache.attend(to_layout(q), to_layout(kn), to_layout(vn), layer=layer, return_lse=True,
                                    implementation=backend)
            for b in range(B):
                seqs[layer][b][0] = np.concatenate([seqs[layer][b][0], kn[b]], axis=1)
                seqs[layer][b][1] = np.concatenate([seqs[layer][b][1], vn[b]], axis=1)
            ref_out, ref_lse = _reference_step([s[0] for s in seqs[layer]], [s[1] for s in seqs[layer]], q)
            out_c = out if layout == "bhld" else out.swapaxes(1, 2)
            np.testing.assert_allclose(out_c, ref_out, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(cache.lengths, prompt + step + 1)


def test_pages_come_from_the_free_list_and_go_back():
    cache = KVCache(2, 1, 4, 10, page_size=3, num_pages=5)
    assert cache.free_pages == 5 and (cache.block_table == -1).all()
    kv = np.ones((2, 1, 4, 4), np.float32)
    cache.append(kv, kv, lengths=[4, 1])  # 2 pages + 1 page
    assert cache.free_pages == 2
    table = cache.block_table
    assert sorted(int(p) for p in table[table >= 0]) == [0, 1, 2]
    with pytest.raises(AttentionValueError, match="out of pages"):
        kv6 = np.ones((2, 1, 6, 4), np.float32)
        cache.append(kv6, kv6)  # lengths 10 and 7 need 4 more pages; 2 are free
    assert cache.free_pages == 2 and (cache.block_table == table).all(), "a refused append took pages"
    np.testing.assert_array_equal(cache.lengths, [4, 1])
    cache.reset(0)
    assert cache.free_pages == 4 and (cache.block_table[0] == -1).all()
    np.testing.assert_array_equal(cache.lengths, [0, 1])
    cache.reset()
    assert cache.free_pages == 5 and (cache.lengths == 0).all()


def test_capacity_is_enforced_without_writing():
    cache = KVCache(1, 1, 4, 6, fill=np.nan)
    kv = np.ones((1, 1, 4, 4), np.float32)
    cache.append(kv, kv)
    before = cache.k.tobytes()
    with pytest.raises(AttentionValueError, match="sequence 0 does not fit"):
        cache.append(kv, kv)
    assert cache.k.tobytes() == before and cache.lengths[0] == 4


def test_refused_attend_changes_nothing():
    cache = KVCache(2, 2, 8, 20, page_size=4, fill=np.nan)
    kv = np.ones((2, 2, 3, 8), np.float32)
    cache.append(kv, kv)
    state = (cache.k.tobytes(), cache.block_table, cache.free_pages, cache.lengths)
    q = np.ones((2, 3, 1, 8), np.float32)  # 3 query heads over 2 K/V heads: refused
    with pytest.raises(AttentionValueError, match="multiple"):
        cache.attend(q, kv[:, :, :2], kv[:, :, :2])
    assert cache.k.tobytes() == state[0] and (cache.block_table == state[1]).all()
    assert cache.free_pages == state[2] and (cache.lengths == state[3]).all()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(batch_size=0), "batch_size"),
        (dict(capacity=2.5), "capacity"),
        (dict(dtype="int32"), "dtype"),
        (dict(page_size=0), "page_size"),
        (dict(num_pages=3), "num_pages needs page_size"),
        (dict(library="jax"), "library"),
        (dict(layout="bshd"), "layout"),
        (dict(fill="nan"), "fill"),
        (dict(capacity=2**63), "more than an array can hold"),
        (dict(fill=True), "fill"),
        # a paged cache's block table is part of its size (1 × 2**60 pages: 8 EiB of int64)
        (dict(capacity=2**62, page_size=4, num_pages=4), "its block table"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    args = dict(batch_size=1, num_kv_heads=1, head_dim=4, capacity=8) | kwargs
    with pytest.raises((AttentionValueError, TypeError), match=match):
        KVCache(**args)


@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_a_cache_larger_than_memory_is_refused_by_name(library):
    """128 PiB of buffers (under the 2**63 bytes an array can index, over any address space: no
    allocator can map it, whatever the machine's overcommit setting) — an AttentionMemoryError,
    a MemoryError that names the sizes and the arguments, not the allocator's message alone."""
    if library == "torch":
        pytest.importorskip("torch")
    from dotattn import AttentionMemoryError, DotAttnError

    with pytest.raises(AttentionMemoryError, match="capacity") as caught:
        KVCache(1, 1, 16, 2**50, library=library)
    assert isinstance(caught.value, MemoryError) and isinstance(caught.value, DotAttnError)
    assert "needs 144115188075855872 bytes" in str(caught.value)


def test_a_block_table_larger_than_memory_is_refused_by_name():
    """Small buffers, but a block table of 2**50 pages (8 PiB: past any address space, whatever
    the overcommit setting): the same AttentionMemoryError as buffers too large, naming the
    table (it was NumPy's MemoryError)."""
    from dotattn import AttentionMemoryError

    with pytest.raises(AttentionMemoryError, match=r"its block table \(1 × 1125899906842624 pages\)"):
        KVCache(1, 1, 4, 2**50, page_size=1, num_pages=4)


@pytest.mark.parametrize("fill", [10**400, -(10**400)])
def test_a_fill_past_float64_is_the_infinity_of_its_sign(fill):
    """As a fill past the cache dtype's range becomes ±inf, so does one past float64's (an int):
    it was an OverflowError from float()."""
    cache = KVCache(1, 1, 4, 8, fill=fill)
    assert np.all(cache.k == np.inf * np.sign(fill)) and np.all(cache.v == np.inf * np.sign(fill))


def test_bad_layer_and_sequence_index():
    cache = KVCache(1, 1, 4, 8, num_layers=2)
    with pytest.raises(AttentionValueError, match="layer"):
        cache.layer(2)
    with pytest.raises(AttentionValueError, match="sequence index"):
        cache.reset(1)
    with pytest.raises(AttentionValueError, match="lengths"):
        cache.append(np.ones((1, 1, 2, 4), np.float32), np.ones((1, 1, 2, 4), np.float32), lengths=[3])


def test_torch_buffers_bfloat16():
    torch = pytest.importorskip("torch")
    cache = KVCache(2, 1, 8, 16, dtype=torch.bfloat16, library="torch", page_size=4)
    assert isinstance(cache.k, torch.Tensor) and cache.k.dtype == torch.bfloat16
    k = torch.randn(2, 1, 3, 8)
    cache.append(k, k)
    q = torch.randn(2, 2, 1, 8)
    with torch.no_grad():
        out = cache.attend(q, k[:, :, :1], k[:, :, :1])
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (2, 2, 1, 8)
    page = int(cache.block_table[0, 0])
    torch.testing.assert_close(cache.k[0, page, :, :3], k[0, :, :3].bfloat16(), rtol=0, atol=0)


@pytest.mark.parametrize("library", ["numpy", "torch"])
@pytest.mark.parametrize("page_size", [None, 4])
@pytest.mark.parametrize(
    "call, match",
    [
        # new tokens past the capacity AND arrays that do not match the cache: the shapes are
        # named (the room was checked first, and the call was told its tokens do not fit)
        ("attend-k_new-head-dim", r"k_new must have shape \(B, Hkv, Lnew, D\) with B=1, Hkv=2, D=8, got \(1, 2, 40, 4\)"),
        ("append-k_new-head-dim", r"k_new must have shape .* got \(1, 2, 40, 4\)"),
        ("attend-q-head-dim", r"q and k_cache must share the head dim D .* q\(1, 2, 1, 4\)"),
        ("attend-v_new-tokens", r"k_new and v_new must hold the same number of new tokens"),
        ("attend-v_new-missing", r"k_new was given without v_new"),
        ("append-v_new-batch", r"v_new must have shape .* got \(2, 2, 40, 8\)"),
        # the shapes right: the room is what is refused, and the count of new tokens is named
        ("attend-too-many", r"sequence 0 does not fit: 3 cached token\(s\) plus 40 new one\(s\) exceed capacity=16"),
    ],
)
def test_arrays_that_do_not_match_the_cache_are_named_before_the_room(library, page_size, call, match):
    if library == "torch":
        torch = pytest.importorskip("torch")
        arr = torch.from_numpy
    else:
        arr = lambda x: x  # noqa: E731
    cache = KVCache(1, 2, 8, 16, page_size=page_size, library=library, fill=np.nan)
    kv = np.ones((1, 2, 3, 8), np.float32)
    cache.append(arr(kv), arr(kv))
    state = (np.asarray(cache.k).tobytes(), cache.block_table, cache.free_pages, cache.lengths)
    q = arr(np.ones((1, 2, 1, 8), np.float32))
    long, long_d4 = arr(np.ones((1, 2, 40, 8), np.float32)), arr(np.ones((1, 2, 40, 4), np.float32))
    calls = {
        "attend-k_new-head-dim": lambda: cache.attend(q, long_d4, long),
        "append-k_new-head-dim": lambda: cache.append(long_d4, long),
        "attend-q-head-dim": lambda: cache.attend(arr(np.ones((1, 2, 1, 4), np.float32)), long, long),
        "attend-v_new-tokens": lambda: cache.attend(q, long, arr(np.ones((1, 2, 39, 8), np.float32))),
        "attend-v_new-missing": lambda: cache.attend(q, long, None),
        "append-v_new-batch": lambda: cache.append(long, arr(np.ones((2, 2, 40, 8), np.float32))),
        "attend-too-many": lambda: cache.attend(q, long, long),
    }
    with pytest.raises(AttentionValueError, match=match):
        calls[call]()
    after = (np.asarray(cache.k).tobytes(), cache.block_table, cache.free_pages, cache.lengths)
    assert after[0] == state[0] and after[2] == state[2] and (after[3] == state[3]).all()
    assert (after[1] is None and state[1] is None) or np.array_equal(after[1], state[1])


@pytest.mark.parametrize("library", ["numpy", "torch"])
@pytest.mark.parametrize("page_size", [None, 4])
def test_a_batch_that_is_not_the_caches_is_named(library, page_size):
    """q or k_new of another batch size than the cache's: a paged cache's message was about
    "block_table must have shape (B, max_pages)", a table the caller never passed (a contiguous
    one's about k_cache's axis 0); now the argument and the cache's batch_size, nothing changed."""
    if library == "torch":
        torch = pytest.importorskip("torch")
        arr = torch.zeros
    else:
        arr = lambda *shape: np.zeros(shape, np.float32)  # noqa: E731
    cache = KVCache(3, 2, 8, 16, page_size=page_size, library=library)
    with pytest.raises(AttentionValueError, match=r"q has batch size 2 \(axis 0 of q\(2, 4, 1, 8\)\), but this KVCache holds batch_size=3"):
        cache.attend(arr(2, 4, 1, 8), arr(2, 2, 1, 8), arr(2, 2, 1, 8))
    with pytest.raises(AttentionValueError, match=r"k_new has batch size 2 .* batch_size=3"):
        cache.append(arr(2, 2, 1, 8), arr(2, 2, 1, 8))
    assert (cache.lengths == 0).all()
    if page_size is not None:
        assert cache.free_pages == cache.num_pages


@pytest.mark.parametrize("method", ["attend", "append"])
@pytest.mark.parametrize("bad", [[[[[1.0] * 4]]], "keys", 3.0])
def test_new_arrays_that_are_not_arrays_are_refused_by_name(method, bad):
    cache = KVCache(1, 1, 4, 8)
    q = np.ones((1, 1, 1, 4), np.float32)
    call = (lambda: cache.attend(q, bad, bad)) if method == "attend" else (lambda: cache.append(bad, bad))
    with pytest.raises(dotattn.AttentionTypeError, match=r"k_new must be a NumPy array \(this KVCache holds numpy buffers\), got builtins\."):
        call()
    assert cache.lengths[0] == 0
    good = np.ones((1, 1, 1, 4), np.float32)
    with pytest.raises(dotattn.AttentionTypeError, match=r"v_new must be a NumPy array .* got builtins\."):
        cache.attend(q, good, bad) if method == "attend" else cache.append(good, bad)


def test_queries_must_match_the_buffers_library():
    cache = KVCache(1, 1, 4, 8)
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="numpy buffers"):
        cache.attend(torch.ones(1, 1, 1, 4))
    tcache = KVCache(1, 1, 4, 8, library="torch")
    with pytest.raises(TypeError, match="torch buffers"):
        tcache.attend(np.ones((1, 1, 1, 4), np.float32))
    out, lse = tcache.attend(torch.ones(1, 2, 1, 4), torch.ones(1, 1, 1, 4), torch.ones(1, 1, 1, 4), return_lse=True)
    assert isinstance(out, torch.Tensor) and isinstance(lse, torch.Tensor)
    assert tcache.k[0, 0, 0, 0, 0].item() == 1.0  # the append reached the torch buffer


def test_torch_buffers_live_on_the_given_device():
    """Buffers are allocated on ``device`` (here "meta": no GPU needed to see where they go), and
    appends into device buffers take the tensor path (stand-ins for validation, torch indexing)."""
    torch = pytest.importorskip("torch")
    for device in ("meta", torch.device("meta")):
        cache = KVCache(2, 2, 8, 16, dtype=torch.bfloat16, library="torch", device=device, page_size=4, num_layers=2)
        assert cache.k.device.type == cache.v.device.type == "meta" and cache.device == torch.device("meta")
        assert cache.k.dtype == torch.bfloat16 and cache.k.shape == (2, 8, 2, 4, 8)
    k = torch.empty(2, 2, 5, 8, device="meta")
    for layer in range(2):
        cache.append(k, k, layer=layer, lengths=[5, 3])
    assert (cache.lengths == [5, 3]).all() and cache.free_pages == 8 - 3
    assert cache.k.device.type == "meta"
    with pytest.raises(AttentionValueError, match="out of pages|does not fit"):  # checks still run
        cache.append(torch.empty(2, 2, 12, 8, device="meta"), torch.empty(2, 2, 12, 8, device="meta"))
    with pytest.raises(TypeError, match="k_new must be a torch tensor on the cache's device 'meta'"):
        cache.append(torch.ones(2, 2, 1, 8), torch.ones(2, 2, 1, 8))
    assert (cache.lengths == [5, 3]).all()
    assert KVCache(1, 1, 4, 8, library="torch").k.device.type == "cpu"  # the default stays the CPU


@pytest.mark.parametrize("layout", ["bhld", "blhd"])
@pytest.mark.parametrize("page_size", [None, 4])
def test_attend_on_a_meta_cache_gives_meta_results_of_the_right_shapes(layout, page_size):
    """Shapes only, as torch's operations on meta tensors: it launched the Triton kernel, which
    failed with "0 active drivers" on a machine without a GPU (and cannot run on meta anywhere)."""
    torch = pytest.importorskip("torch")
    cache = KVCache(2, 2, 8, 16, value_dim=6, dtype=torch.bfloat16, library="torch", device="meta",
                    page_size=page_size, layout=layout, num_layers=2)

    def meta(B, H, L, D, dtype=torch.bfloat16):
        return torch.empty((B, H, L, D) if layout == "bhld" else (B, L, H, D), dtype=dtype, device="meta")

    for layer in range(2):
        out, lse = cache.attend(meta(2, 4, 3, 8, torch.float32), meta(2, 2, 3, 8), meta(2, 2, 3, 6), layer=layer, return_lse=True)
        assert out.device.type == lse.device.type == "meta"
        assert out.dtype == torch.float32 and lse.dtype == torch.float32
        assert tuple(out.shape) == ((2, 4, 3, 6) if layout == "bhld" else (2, 3, 4, 6)) and tuple(lse.shape) == (2, 4, 3)
    assert cache.lengths.tolist() == [3, 3]
    out = cache.attend(meta(2, 4, 1, 8), meta(2, 2, 1, 8), meta(2, 2, 1, 6))
    assert out.dtype == torch.bfloat16 and out.device.type == "meta"
    with pytest.raises(AttentionValueError, match="head dim"):  # the checks still run, nothing changed
        cache.attend(meta(2, 4, 1, 5), meta(2, 2, 1, 8), meta(2, 2, 1, 6), layer=1)
    assert cache.lengths.tolist() == [3, 3]
    # meta rotary tables: their shapes and dtypes checked, nothing copied out (a host copy of them
    # raised "Cannot copy out of meta tensor; no data!")
    cos, sin = (torch.empty(16, 4, device="meta") for _ in range(2))
    out = cache.attend(meta(2, 4, 1, 8), meta(2, 2, 1, 8), meta(2, 2, 1, 6), layer=1, rotary=(cos, sin))
    assert out.device.type == "meta" and cache.lengths.tolist() == [4, 4]
    with pytest.raises(AttentionValueError, match=r"rotary tables cover positions \[0, 4\)"):
        cache.attend(meta(2, 4, 1, 8), meta(2, 2, 1, 8), meta(2, 2, 1, 6), rotary=(cos[:4], sin[:4]))
    with pytest.raises(dotattn.AttentionTypeError, match="rotary cos must be a float array"):
        cache.attend(meta(2, 4, 1, 8), meta(2, 2, 1, 8), meta(2, 2, 1, 6), rotary=(cos.int(), sin.int()))
    assert cache.lengths.tolist() == [4, 4]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(device="cuda:0"), "needs library='torch'"),
        (dict(library="torch", device="nonsense"), "device must name a torch device"),
        (dict(library="torch", device="mps"), "CPU or CUDA device"),
        (dict(library="torch", device=3), "device must be a str or a torch.device"),
    ],
)
def test_bad_device(kwargs, match):
    pytest.importorskip("torch")
    with pytest.raises((AttentionValueError, TypeError), match=match):
        KVCache(1, 1, 4, 8, **kwargs)


@pytest.mark.parametrize("page_size", [None, 3])
@pytest.mark.parametrize("rotary", [False, True])
@pytest.mark.parametrize("counts", [None, [2, 0, 3]])
def test_device_append_writes_what_the_numpy_append_writes(page_size, rotary, counts):
    """kernels.triton_decode.write_new_tensors (device caches' append, run here on CPU tensors)
    stores the same bits in the same slots as decode_semantics.write_new."""
    torch = pytest.importorskip("torch")
    from dotattn import decode_semantics
    from dotattn.kernels.triton_decode import write_new_tensors

    rng = np.random.default_rng(7)
    B, Hkv, D, Lnew, cap = 3, 2, 8, 3, 12
    cache_lengths = np.array([4, 0, 7])
    if page_size is None:
        k_cache = np.full((B, Hkv, cap, D), np.nan, np.float16)
        table = None
    else:
        k_cache = np.full((14, Hkv, page_size, D), np.nan, np.float16)  # 2 pages never used
        table = rng.permutation(14)[: B * 4].reshape(B, 4)
    v_cache = k_cache.copy()
    k_new = rng.standard_normal((B, Hkv, Lnew, D)).astype(np.float32)
    v_new = rng.standard_normal((B, Hkv, Lnew, D)).astype(np.float32)
    tables = tuple(t.astype(np.float32) for t in C.rope_tables(32, D // 2)) if rotary else None
    kc_t, vc_t = torch.from_numpy(k_cache.copy()), torch.from_numpy(v_cache.copy())
    call = decode_semantics.normalize(
        np.empty((B, Hkv, 0, D), np.float32), k_cache, v_cache, k_new, v_new, cache_lengths=cache_lengths,
        block_table=table, causal=True, window=None, scale=None, softcap=None, alibi_slopes=None, rotary=tables,
        layout="bhld", new_counts=None if counts is None else np.array(counts),
    )
    stored = None if counts is None else np.array(counts)
    decode_semantics.write_new(call, stored)
    write_new_tensors(call, kc_t, vc_t, torch.from_numpy(k_new), torch.from_numpy(v_new), stored)
    np.testing.assert_array_equal(kc_t.numpy(), k_cache)  # NaN where nothing was written, on both sides
    np.testing.assert_array_equal(vc_t.numpy(), v_cache)


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [None, 4])
def test_cuda_cache_decodes_what_the_numpy_cache_decodes(page_size):
    """A KVCache on the GPU (appends by write_new_tensors, attends through the triton decode
    kernel) gives the NumPy cache's answer on the same prompts and steps."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    B, Hq, Hkv, D, L = 2, 6, 2, 16, 7
    prompt = np.array([7, 3])
    host = KVCache(B, Hkv, D, 32, page_size=page_size)
    dev = KVCache(B, Hkv, D, 32, page_size=page_size, library="torch", device="cuda")
    assert dev.k.device.type == "cuda"
    k = rng.standard_normal((B, Hkv, L, D)).astype(np.float32)
    v = rng.standard_normal((B, Hkv, L, D)).astype(np.float32)
    host.append(k, v, lengths=prompt)
    dev.append(torch.from_numpy(k).cuda(), torch.from_numpy(v).cuda(), lengths=prompt)
    for _ in range(3):
        q, kn, vn = (rng.standard_normal((B, h, 1, D)).astype(np.float32) for h in (Hq, Hkv, Hkv))
        out_h, lse_h = host.attend(q, kn, vn, return_lse=True)
        with torch.no_grad():
            out_d, lse_d = dev.attend(*(torch.from_numpy(x).cuda() for x in (q, kn, vn)), return_lse=True)
        assert out_d.device.type == "cuda"
        np.testing.assert_allclose(out_d.cpu().numpy(), out_h, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(lse_d.cpu().numpy(), lse_h, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(dev.lengths, host.lengths)


@pytest.mark.parametrize("page_size", [None, 1, 3, 64, 256])
@pytest.mark.parametrize("counts", [None, [150, 0, 97]])
def test_append_writes_every_token_to_its_slot_and_nothing_else(page_size, counts):
    """decode_semantics.write_new by page runs (slices: contiguous caches, large pages) and by
    advanced indexing (many short runs: tiny pages) stores token t of sequence b at
    ``cache_lengths[b] + t`` through the block table, casting to the cache dtype, and leaves
    every other slot untouched (NaN)."""
    from dotattn import decode_semantics

    rng = np.random.default_rng(11)
    B, Hkv, D, Lnew, cap = 3, 2, 8, 150, 420
    cache_lengths = np.array([5, 0, 263])
    if page_size is None:
        k_cache = np.full((B, Hkv, cap, D), np.nan, np.float16)
        table = None
    else:
        per_seq = -(-cap // page_size)
        k_cache = np.full((B * per_seq + 2, Hkv, page_size, D), np.nan, np.float16)  # 2 pages never used
        table = rng.permutation(B * per_seq + 2)[: B * per_seq].reshape(B, per_seq)
    v_cache = k_cache.copy()
    k_new = rng.standard_normal((B, Hkv, Lnew, D)).astype(np.float32)
    v_new = rng.standard_normal((B, Hkv, Lnew, D)).astype(np.float32)
    stored = np.full(B, Lnew) if counts is None else np.array(counts)
    call = decode_semantics.normalize(
        np.empty((B, Hkv, 0, D), np.float32), k_cache, v_cache, k_new, v_new, cache_lengths=cache_lengths,
        block_table=table, causal=True, window=None, scale=None, softcap=None, alibi_slopes=None, rotary=None,
        layout="bhld", new_counts=None if counts is None else stored,
    )
    decode_semantics.write_new(call, None if counts is None else stored)
    want_k, want_v = np.full_like(k_cache, np.nan), np.full_like(v_cache, np.nan)
    for b in range(B):
        for t in range(int(stored[b])):
            pos = int(cache_lengths[b]) + t
            page, slot = (b, pos) if page_size is None else (table[b, pos // page_size], pos % page_size)
            want_k[page, :, slot] = k_new[b, :, t]
            want_v[page, :, slot] = v_new[b, :, t]
    np.testing.assert_array_equal(k_cache, want_k)
    np.testing.assert_array_equal(v_cache, want_v)


def test_a_huge_integer_fill_is_a_float():
    cache = KVCache(1, 1, 4, 8, fill=2**64)  # past int64: NumPy's full() would refuse the int
    assert (cache.k == np.float32(2.0**64)).all()


@pytest.mark.parametrize("fill", [1e30, -1e30, 2**63, float("nan")])
def test_fill_past_the_dtype_is_what_the_dtype_holds_in_both_libraries(fill):
    """A float16 cache filled past its range holds ±inf, NumPy and torch buffers alike (torch.full
    alone refuses such a value)."""
    torch = pytest.importorskip("torch")
    a = KVCache(1, 1, 4, 8, dtype="float16", fill=fill)
    b = KVCache(1, 1, 4, 8, dtype="float16", fill=fill, library="torch")
    assert np.array_equal(a.k, b.k.numpy(), equal_nan=True)
    with np.errstate(over="ignore"):
        held = np.array([fill], np.float64).astype(np.float16)
    assert np.array_equal(a.k[0, 0, 0, 0, :1], held, equal_nan=True)


def test_layers_out_of_order_are_refused_before_they_read_unwritten_slots():
    """The lengths advance when the last layer stores; a layer that had not stored the step would
    then attend over slots that hold no tokens.  The last layer's call that would leave a layer
    behind is refused, with the order to follow and nothing changed (before 6 Dec it was taken,
    and every later call of the skipped layer refused until reset()).  Storing a layer twice
    in a step rewrites the same slots (allowed), and the layers before the last may come in
    any order."""
    cache = KVCache(1, 1, 4, 8, num_layers=3, fill=np.nan)
    kv = np.ones((1, 1, 1, 4), np.float32)
    q = np.ones((1, 1, 1, 4), np.float32)

    def state():
        return cache.k.tobytes(), cache.v.tobytes(), cache.lengths.tolist()

    before = state()
    with pytest.raises(AttentionValueError, match=r"layer\(s\) 0, 1 have not stored this step's tokens"):
        cache.attend(q, kv, kv, layer=2)  # the last layer first
    with pytest.raises(AttentionValueError, match="in order 0 … 2"):
        cache.append(kv, kv, layer=2)
    assert state() == before

    for step in range(3):
        for layer in range(3):
            out = cache.attend(q, kv, kv, layer=layer)
            assert np.isfinite(out).all()
        out = cache.attend(q, kv, kv, layer=0)  # layer 0 again in the next step, then stored twice:
        out = cache.attend(q, kv, kv, layer=0)  # the same slots rewritten
        assert np.isfinite(out).all()
        cache.attend(q, kv, kv, layer=1)
        cache.attend(q, kv, kv, layer=2)
    assert cache.lengths[0] == 6
    cache.append(kv, kv, layer=0)  # a layer skipped in a step: the last layer's call is refused
    before = state()
    with pytest.raises(AttentionValueError, match=r"layer\(s\) 1 have not stored"):
        cache.append(kv, kv, layer=2)
    assert state() == before
    cache.append(kv, kv, layer=1)  # ... and the step goes on once it is stored
    cache.append(kv, kv, layer=2)
    assert cache.lengths[0] == 7
    cache.attend(q, kv, kv, layer=1)  # layers before the last in any order
    cache.attend(q, kv, kv, layer=0)
    assert np.isfinite(cache.attend(q, kv, kv, layer=2)).all() and cache.lengths[0] == 8

    # a layer left behind (only reachable through the state itself now) is still refused
    cache.reset()
    cache._steps = 1
    with pytest.raises(AttentionValueError, match="layer 0 has not stored the tokens of the last 1 step"):
        cache.attend(q, kv, kv, layer=0)


def test_every_layer_of_a_step_stores_the_same_tokens():
    """The last layer advances the lengths by what it stores: a layer that stored fewer tokens in
    the step would leave slots below the lengths with no tokens — refused before writing."""
    cache = KVCache(2, 1, 4, 16, num_layers=2, fill=np.nan)
    kv = np.ones((2, 1, 3, 4), np.float32)
    q = np.ones((2, 1, 2, 4), np.float32)
    cache.attend(q, kv[:, :, :2], kv[:, :, :2], layer=0)
    before = cache.k.tobytes()
    with pytest.raises(AttentionValueError, match="layer 1 would store 3 new token.s. per sequence in this step, but the step's first layer stored 2"):
        cache.append(kv, kv, layer=1)
    with pytest.raises(AttentionValueError, match=r"new tokens per sequence \[2, 1\]"):
        cache.append(kv, kv, layer=1, lengths=[2, 1])
    assert cache.k.tobytes() == before and (cache.lengths == 0).all()
    cache.append(kv, kv, layer=1, lengths=[2, 2])  # the same two tokens each: accepted
    assert (cache.lengths == 2).all()
    cache.append(kv, kv, layer=0, lengths=[3, 1])  # a new step: padded prompts, then the same at layer 1
    cache.append(kv, kv, layer=1, lengths=[3, 1])
    assert cache.lengths.tolist() == [5, 3]


@pytest.mark.parametrize("library", ["numpy", "torch"])
@pytest.mark.parametrize("page_size", [None, 4])
def test_copy_copy_is_a_whole_copy_neither_cache_writes_the_other(library, page_size):
    """``copy.copy`` shared the buffers, lengths, page table and free list but not the step
    counters or the room left: after the copy took a step, the original's next step wrote over
    the copy's tokens (a page the copy held was still the original's to fill), silently."""
    import copy

    if library == "torch":
        torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    B, Hkv, D = 2, 1, 4
    cache = KVCache(B, Hkv, D, 16, page_size=page_size, library=library, fill=np.nan)

    def tensors(n):
        arrays = [rng.standard_normal((B, Hkv, n, D)).astype(np.float32) for _ in range(3)]
        return arrays, [torch.from_numpy(a) for a in arrays] if library == "torch" else arrays

    def attend(c, args):
        out = c.attend(*args)
        return out.numpy() if library == "torch" else out

    first, first_lib = tensors(2)
    attend(cache, first_lib)
    twin = copy.copy(cache)
    ks, vs = [[first[1][b]] for b in range(B)], [[first[2][b]] for b in range(B)]
    (_, k_twin, v_twin), twin_lib = tensors(2)
    attend(twin, twin_lib)  # the copy's step must leave the original as it was
    assert cache.lengths.tolist() == [2, 2] and twin.lengths.tolist() == [4, 4]
    (q, k, v), lib = tensors(2)
    out = attend(cache, lib)
    for b in range(B):
        ks[b].append(k[b])
        vs[b].append(v[b])
    want, _ = _reference_step([np.concatenate(x, axis=1) for x in ks], [np.concatenate(x, axis=1) for x in vs], q)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    # The copy's tokens are where it put them, untouched by the original's step.
    (q2, k2, v2), lib2 = tensors(1)
    out_twin = attend(twin, lib2)
    ks_twin = [np.concatenate([first[1][b], k_twin[b], k2[b]], axis=1) for b in range(B)]
    vs_twin = [np.concatenate([first[2][b], v_twin[b], v2[b]], axis=1) for b in range(B)]
    np.testing.assert_allclose(out_twin, _reference_step(ks_twin, vs_twin, q2)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_a_cache_buffer_cannot_be_replaced_by_assignment(library):
    """``cache.k = other`` was taken and went unseen: a NumPy cache kept writing its old
    buffer through the views it made once, so the new array never showed a token."""
    if library == "torch":
        pytest.importorskip("torch")
    cache = KVCache(1, 1, 4, 8, library=library)
    before = cache.k
    for name in ("k", "v"):
        with pytest.raises(AttributeError, match=rf"KVCache\.{name} is the cache's own buffer"):
            setattr(cache, name, np.zeros((1, 1, 1, 8, 4), np.float32))
    assert cache.k is before
    kv = np.ones((1, 1, 2, 4), np.float32)
    if library == "torch":
        import torch

        kv = torch.from_numpy(kv)
    cache.k[0, 0, 0, 5] = 7  # writing into the buffers stays the caller's to do
    cache.append(kv, kv)
    assert float(cache.k[0, 0, 0, :2].sum()) == 8 and float(cache.k[0, 0, 0, 5, 0]) == 7


def test_a_torch_dtype_makes_numpy_buffers_too():
    """docs/decoding.md: ``dtype`` may be "a name, a NumPy dtype or a torch dtype".  A torch
    dtype with the default library="numpy" was refused: "dtype must be float16, bfloat16,
    float32 or float64, got torch.float16"."""
    torch = pytest.importorskip("torch")
    for torch_dtype, name in ((torch.float16, "float16"), (torch.bfloat16, "bfloat16"), (torch.float64, "float64")):
        cache = KVCache(1, 1, 4, 8, dtype=torch_dtype)
        assert type(cache.k) is np.ndarray and cache.k.dtype == KVCache(1, 1, 4, 8, dtype=name).k.dtype
    with pytest.raises(dotattn.AttentionTypeError, match="dtype must be float16, bfloat16, float32 or float64, got torch.int32"):
        KVCache(1, 1, 4, 8, dtype=torch.int32)


@pytest.mark.parametrize("new_dtype", ["float16", "bfloat16", "float64"])
def test_the_dtype_follows_torch_buffers_converted_in_place(new_dtype):
    """``cache.k.data = cache.k.data.half()`` (as a module's parameters are converted): the calls
    followed the new buffers, but ``cache.dtype`` kept the constructor's float32."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    kv = torch.from_numpy(rng.standard_normal((1, 2, 3, 8)).astype(np.float32))
    q = torch.from_numpy(rng.standard_normal((1, 4, 1, 8)).astype(np.float32))
    converted = KVCache(1, 2, 8, 16, library="torch")
    tdtype = getattr(torch, new_dtype)
    converted.append(kv, kv)
    converted.k.data, converted.v.data = converted.k.data.to(tdtype), converted.v.data.to(tdtype)
    made = KVCache(1, 2, 8, 16, library="torch", dtype=new_dtype)
    made.append(kv.to(tdtype), kv.to(tdtype))
    assert converted.dtype == made.dtype == KVCache(1, 1, 4, 8, dtype=new_dtype).k.dtype
    qx = q if new_dtype != "float64" else q.double()
    new = (kv[:, :, :1] if new_dtype != "float64" else kv[:, :, :1].double())
    out = converted.attend(qx, new, new)
    assert torch.equal(out, made.attend(qx, new, new)) and torch.equal(converted.k, made.k)
    assert pickle.loads(pickle.dumps(converted)).dtype == made.dtype


def test_a_cache_pickled_with_its_dtype_attribute_loads():
    """Caches pickled before ``dtype`` was read from the buffers carry it in their state."""
    cache = KVCache(1, 1, 4, 8, dtype="float16")
    state = cache.__getstate__()
    state["dtype"] = np.dtype("float32")  # stale, as a converted torch cache's was
    old = KVCache.__new__(KVCache)
    old.__setstate__(state)
    assert old.dtype == np.float16 and "dtype" not in old.__dict__


@pytest.mark.parametrize("page_size", [None, 2])
def test_one_sequence_is_reset_between_steps_not_within_one(page_size):
    """``reset(b)`` after layer 0 stored a step and before the last layer did: layer 0 kept the
    old sequence's key where the new sequence's first token went (the last layer then gave it
    one token), so its next step attended a key of the previous conversation, silently."""
    rng = np.random.default_rng(8)
    cache = KVCache(2, 1, 4, 8, num_layers=2, page_size=page_size, fill=np.nan)

    def step_inputs(n=1):
        return [rng.standard_normal((2, 1, n, 4)).astype(np.float32) for _ in range(3)]

    for layer in range(2):
        cache.attend(*step_inputs(3), layer=layer)
    cache.attend(*step_inputs(), layer=0)
    before = (cache.lengths, cache.block_table, cache.free_pages, cache.k.copy())
    with pytest.raises(AttentionValueError, match=r"reset\(b=1\) in the middle of a step: layer\(s\) 0 have stored"):
        cache.reset(1)
    after = (cache.lengths, cache.block_table, cache.free_pages, cache.k)
    np.testing.assert_array_equal(after[0], before[0])
    assert after[2] == before[2] and (page_size is None or (after[1] == before[1]).all())
    np.testing.assert_array_equal(after[3], before[3])
    cache.attend(*step_inputs(), layer=1)  # the step ends; now the sequence may be emptied
    cache.reset(1)
    assert cache.lengths.tolist() == [4, 0]
    cache.attend(*step_inputs(), layer=0)
    cache.reset()  # every sequence: taken in the middle of a step too (nothing is left behind)
    assert cache.lengths.tolist() == [0, 0]
    for layer in range(2):  # a fresh step from layer 0
        q, k, v = step_inputs()
        out = cache.attend(q, k, v, layer=layer)
        want, _ = _reference_step([k[0], k[1]], [v[0], v[1]], q)
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("library", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_append_takes_float32_or_the_cache_dtype_for_each_of_k_and_v(library, dtype):
    """A 16-bit cache's append took (float32 k, 16-bit v) but refused (16-bit k, float32 v) with a
    message naming a q that append does not take: k_new's dtype alone decided what v_new could be."""
    if library == "torch":
        torch = pytest.importorskip("torch")
    rng = np.random.default_rng(9)
    k32, v32 = (rng.standard_normal((1, 2, 3, 4)).astype(np.float32) for _ in range(2))
    half = np.dtype(C.BFLOAT16) if dtype == "bfloat16" else np.dtype(np.float16)

    def as_library(x):
        if library == "numpy":
            return x
        t = torch.from_numpy(x.view(np.uint16) if x.dtype == C.BFLOAT16 else x)
        return t.view(torch.bfloat16) if x.dtype == C.BFLOAT16 else t

    def stored(buf):
        return np.asarray(buf.float() if library == "torch" else buf.astype(np.float32))

    for k_dtype in (np.float32, half):
        for v_dtype in (np.float32, half):
            cache = KVCache(1, 2, 4, 8, dtype=dtype, library=library)
            cache.append(as_library(k32.astype(k_dtype)), as_library(v32.astype(v_dtype)))
            np.testing.assert_array_equal(stored(cache.k[0][:, :, :3]), k32.astype(half).astype(np.float32))
            np.testing.assert_array_equal(stored(cache.v[0][:, :, :3]), v32.astype(half).astype(np.float32))
    cache = KVCache(1, 2, 4, 8, dtype=dtype, library=library)
    for k, v, name in ((k32.astype(np.float64), v32, "k_new"), (k32, v32.astype(np.float64), "v_new")):
        with pytest.raises(dotattn.AttentionTypeError, match=f"^{name} must have the cache's dtype {dtype} or float32, got float64$"):
            cache.append(as_library(k), as_library(v))
    assert int(cache.lengths[0]) == 0  # nothing stored
    f32 = KVCache(1, 2, 4, 8, dtype="float32", library=library)
    with pytest.raises(dotattn.AttentionTypeError, match=f"^v_new must have the cache's dtype float32, got {dtype}$"):
        f32.append(as_library(k32), as_library(v32.astype(half)))
