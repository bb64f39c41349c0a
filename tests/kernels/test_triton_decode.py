"""The Triton split-KV decode kernel (``kernels/triton_decode.py``) against the float64 oracle
of the decode tests: contiguous and paged caches (NaN in every unused slot, permuted pages),
GQA folded into rows, several chunks, windows, softcap, ALiBi, rotary, 16-bit caches.

Through Triton's interpreter on CPU memory (``TRITON_INTERPRET=1`` for these tests only), via
the decode-kernel protocol (``decode(DecodeCall)``): :mod:`dotattn.decoding` validates and
appends exactly as for its own kernels.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import helpers as H
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dotattn import decoding

if "decode_cases" not in sys.modules:  # the decode tests' case maker (tests/decoding/conftest.py registers it too)
    _spec = importlib.util.spec_from_file_location(
        "decode_cases", Path(__file__).resolve().parent.parent / "decoding" / "decode_cases.py"
    )
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["decode_cases"] = _module
    _spec.loader.exec_module(_module)
import decode_cases as C  # noqa: E402

CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


CASES = [
    ("f32-contig-L1", dict(B=2, max_len=40), {}),
    ("f32-paged-ps7-L2-gqa", dict(B=2, page_size=7, Hq=6, Hkv=2, Lq=2, Lnew=2, max_len=50), {}),
    ("f16-paged-ps5-L3-window-blhd", dict(dtype=np.float16, page_size=5, Lq=3, Lnew=3, layout="blhd", max_len=45),
     dict(window=(20, None))),
    ("bf16-contig-q32-softcap-alibi", dict(dtype=H.DTYPES[1], q_dtype=np.float32, B=2, max_len=40),
     dict(softcap=3.0, alibi_slopes=True)),
    ("f32-noncausal-nonew-window", dict(Lq=3, Lnew=None, B=2, max_len=40), dict(causal=False, window=(7, 2))),
    ("f32-paged-ps4-rotary", dict(page_size=4, Lq=2, Lnew=2, B=2, max_len=40), dict(rotary=True)),
    ("f32-multi-chunk-empty", dict(B=2, Hq=2, Hkv=1, lengths=[0, 520], page_size=64), {}),
]


@pytest.mark.parametrize("name,shape,options", CASES, ids=[c[0] for c in CASES])
def test_split_kv_kernel_matches_reference(name, shape, options):
    from dotattn.kernels import triton_decode

    seed = sum(map(ord, name))
    case = C.make_case(seed, **shape)
    rng = np.random.default_rng(seed)
    call_opts, ref_opts = dict(options), dict(options)
    Hq = C.canonical(case.q, case.layout).shape[1]
    if options.get("alibi_slopes"):
        call_opts["alibi_slopes"] = ref_opts["alibi_slopes"] = rng.uniform(0.01, 0.3, Hq)
    if options.get("rotary"):
        D = C.canonical(case.q, case.layout).shape[3]
        cos, sin = C.rope_tables(1024, D // 2 - 1)
        call_opts["rotary"] = (cos.astype(np.float32), sin.astype(np.float32))
        ref_opts["rotary"] = tuple(x.astype(np.float32).astype(np.float64) for x in (cos, sin))
    out64, lse64, naive = C.expected(case, **ref_opts)
    kw = dict(causal=True, window=None, scale=None, softcap=None, alibi_slopes=None, rotary=None)
    kw.update(call_opts)
    call = decoding.normalize(case.q, case.k_cache, case.v_cache, case.k_new, case.v_new,
                              cache_lengths=case.cache_lengths, block_table=case.block_table, layout=case.layout, **kw)
    out, lse = triton_decode.decode(call)
    H.assert_close_to_reference(out.astype(case.q.dtype), out64, naive, name=f"{name} out", dtype=case.k_cache.dtype)
    finite = np.isfinite(lse64)
    assert (np.isneginf(lse) == ~finite).all(), "rows with no visible key must have lse = −inf"
    np.testing.assert_allclose(lse[finite], lse64[finite], rtol=1e-5, atol=1e-5)
    # the append went where the oracle says (rotated keys are rounded differently: not compared bitwise)
    if ref_opts.get("rotary") is None:
        ks, vs = C.logical_after(case)
        for b, (k, v) in enumerate(zip(ks, vs)):
            got_k, got_v = C.read_cache(case, b, k.shape[1])
            np.testing.assert_array_equal(got_k, k)
            np.testing.assert_array_equal(got_v, v)


def _tensor(x):
    if x is None:
        return None
    x = np.ascontiguousarray(x)
    t = torch.from_numpy(x.view(np.int16)).view(torch.bfloat16) if x.dtype == H.DTYPES[1] else torch.from_numpy(x)
    return t.to("cuda") if CUDA else t


def _numpy(t):
    t = t.cpu()
    return t.view(torch.int16).numpy().view(H.DTYPES[1]) if t.dtype == torch.bfloat16 else t.numpy()


@pytest.mark.parametrize("name,shape,options", CASES, ids=[c[0] for c in CASES])
def test_attention_with_kvcache_on_tensors(name, shape, options):
    """The tensor path (CUDA's, here on CPU tensors with implementation='triton'): validation by
    decoding.normalize on stand-ins, the append with torch indexing into the caller's cache."""
    import dotattn

    seed = sum(map(ord, name)) + 1
    case = C.make_case(seed, **shape)
    rng = np.random.default_rng(seed)
    call_opts, ref_opts = dict(options), dict(options)
    Hq = C.canonical(case.q, case.layout).shape[1]
    if options.get("alibi_slopes"):
        call_opts["alibi_slopes"] = ref_opts["alibi_slopes"] = rng.uniform(0.01, 0.3, Hq)
    if options.get("rotary"):
        D = C.canonical(case.q, case.layout).shape[3]
        cos, sin = C.rope_tables(1024, D // 2 - 1)
        call_opts["rotary"] = (_tensor(cos.astype(np.float32)), _tensor(sin.astype(np.float32)))
        ref_opts["rotary"] = tuple(x.astype(np.float32).astype(np.float64) for x in (cos, sin))
    out64, lse64, naive = C.expected(case, **ref_opts)
    kc, vc = _tensor(case.k_cache), _tensor(case.v_cache)
    out, lse = dotattn.attention_with_kvcache(
        _tensor(case.q), kc, vc, _tensor(case.k_new), _tensor(case.v_new), return_lse=True,
        implementation=None if CUDA else "triton", **case.kwargs(**call_opts),
    )
    assert out.dtype == _tensor(case.q).dtype and out.shape == case.q.shape[:-1] + case.v_cache.shape[-1:]
    H.assert_close_to_reference(C.canonical(_numpy(out), case.layout), out64, naive, name=f"{name} out",
                                dtype=case.k_cache.dtype)
    finite = np.isfinite(lse64)
    lse = lse.cpu().numpy()
    assert (np.isneginf(lse) == ~finite).all()
    np.testing.assert_allclose(lse[finite], lse64[finite], rtol=1e-5, atol=1e-5)
    case.k_cache, case.v_cache = _numpy(kc), _numpy(vc)  # the tensors the call wrote into
    if ref_opts.get("rotary") is None:
        ks, vs = C.logical_after(case)
        for b, (k, v) in enumerate(zip(ks, vs)):
            got_k, got_v = C.read_cache(case, b, k.shape[1])
            np.testing.assert_array_equal(got_k, k)
            np.testing.assert_array_equal(got_v, v)


def test_apply_rotary_on_tensors_is_the_numpy_one():
    """The device path rotates torch tensors with decode_semantics.apply_rotary itself."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4, 10)).astype(np.float32)
    pos = rng.integers(0, 50, (2, 4))
    cos, sin = (t.astype(np.float32) for t in C.rope_tables(50, 4))
    want = decoding.apply_rotary(x, pos, cos, sin)
    got = decoding.apply_rotary(torch.from_numpy(x), torch.from_numpy(pos), torch.from_numpy(cos), torch.from_numpy(sin))
    np.testing.assert_array_equal(got.numpy(), want)


def test_tensor_path_refuses_float64_caches_and_mixed_devices():
    import dotattn
    from dotattn.errors import AttentionValueError

    case = C.make_case(3, B=1, dtype=np.float64, max_len=10)
    with pytest.raises(AttentionValueError, match="float64 caches run on the CPU decode kernels"):
        dotattn.attention_with_kvcache(*(_tensor(x) for x in (case.q, case.k_cache, case.v_cache)),
                                       implementation="triton", **case.kwargs())


def test_tensor_path_refuses_caches_that_cannot_take_the_new_tokens():
    """The device path checks what decode_semantics checks of host caches (it validates on
    stand-ins): an expanded cache, and one tensor as both caches, are refused before any write."""
    import dotattn
    from dotattn.errors import AttentionValueError

    case = C.make_case(3, B=2, max_len=10)
    q, k, v, kn, vn = (_tensor(x) for x in (case.q, case.k_cache, case.v_cache, case.k_new, case.v_new))
    before = k.clone()
    with pytest.raises(AttentionValueError, match="k_cache has a zero stride"):
        dotattn.attention_with_kvcache(q, k[:1].expand_as(k), v, kn, vn, implementation="triton", **case.kwargs())
    with pytest.raises(AttentionValueError, match="k_cache and v_cache share memory"):
        dotattn.attention_with_kvcache(q, k, k, kn, vn, implementation="triton", **case.kwargs())
    assert k.cpu().numpy().tobytes() == before.cpu().numpy().tobytes()


DEVICE = "cuda" if CUDA else "cpu"
OVERLAP_FORMS = ["one tensor", "shifted slices", "shifted tokens", "shared batch row", "as_strided one per row",
                 "as_strided strides 3 and 2", "two storages, one memory"]


def _overlapping_caches(form: str, B: int, H: int, L: int, D: int):
    """``(memory, k_cache, v_cache)``: (B, H, L, D) float32 caches sharing memory, ``memory`` a
    tensor over all of it (to see that a refused call wrote nothing).  Only "one tensor" has
    caches starting at one address (what the device path used to catch)."""
    rng = np.random.default_rng(sum(map(ord, form)))

    def filled(*shape):
        return torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(DEVICE)

    if form == "one tensor":
        buf = filled(B, H, L, D)
        return buf, buf, buf
    if form == "shifted slices":  # buf[..., :D] and buf[..., 1:D+1]
        buf = filled(B, H, L, D + 1)
        return buf, buf[..., :D], buf[..., 1:]
    if form == "shifted tokens":  # v one token behind k in one buffer
        buf = filled(B, H, L + 1, D)
        return buf, buf[:, :, :L], buf[:, :, 1:]
    if form == "shared batch row":  # both contiguous: k's last sequence is v's first
        buf = filled(2 * B - 1, H, L, D)
        return buf, buf[:B], buf[B - 1:]
    flat = filled(B * H * L * 2 * D)
    shape = (B, H, L, D)
    if form == "as_strided one per row":  # rows of 2·D: k the first D, v from k's last element on
        strides = (H * L * 2 * D, L * 2 * D, 2 * D, 1)
        return flat, flat.as_strided(shape, strides, 0), flat.as_strided(shape, strides, D - 1)
    if form == "as_strided strides 3 and 2":  # k on every 3rd element of a row, v on odd ones: some shared
        rows = (H * L * 3 * D, L * 3 * D, 3 * D)
        flat = filled(B * H * L * 3 * D)
        return flat, flat.as_strided(shape, rows + (3,), 0), flat.as_strided(shape, rows + (2,), 1)
    if form == "two storages, one memory":  # torch tensors of two overlapping NumPy views
        base = rng.standard_normal((B, H, L, D + 1)).astype(np.float32)
        return torch.from_numpy(base), torch.from_numpy(base[..., :D]), torch.from_numpy(base[..., 1:])
    raise AssertionError(form)


def _new_tokens(B, Hq, Hkv, D, Dv=None, seed=0):
    rng = np.random.default_rng(seed)
    q, kn, vn = (rng.standard_normal(shape).astype(np.float32) for shape in
                 ((B, Hq, 1, D), (B, Hkv, 1, D), (B, Hkv, 1, D if Dv is None else Dv)))
    return tuple(torch.from_numpy(x).to(DEVICE) for x in (q, kn, vn))


@pytest.mark.parametrize("form", OVERLAP_FORMS)
def test_tensor_path_refuses_every_overlap_of_the_caches(form):
    """The device path refuses caches sharing any memory, not only a first element (audit: slices or
    as_strided views of one buffer were taken, and the values written over keys): the host path's
    exact test (decode_semantics.check_caches_apart), with its message, on arrays describing the
    tensors' memory.  Nothing is written; the host path refuses the same caches with the same words."""
    import dotattn
    from dotattn.errors import AttentionValueError

    if CUDA and form == "two storages, one memory":
        pytest.skip("tensors of NumPy memory are CPU tensors")
    B, H, L, D = 2, 2, 12, 16
    memory, k, v = _overlapping_caches(form, B, H, L, D)
    q, kn, vn = _new_tokens(B, 2 * H, H, D)
    lengths = np.array([3, 7])
    before = memory.clone()
    paths = ["triton"] if CUDA else ["triton", "numpy"]
    for implementation in paths:
        for _ in range(2):  # a kind seen before too
            with torch.no_grad(), pytest.raises(AttentionValueError, match="k_cache and v_cache share memory"):
                dotattn.attention_with_kvcache(q, k, v, kn, vn, cache_lengths=lengths, implementation=implementation)
        assert memory.cpu().numpy().tobytes() == before.cpu().numpy().tobytes(), implementation
    # without new tokens nothing is written: overlapping caches may be read
    dotattn.attention_with_kvcache(q, k, v, cache_lengths=lengths, implementation="triton")


@pytest.mark.parametrize("layout,paged", [("blhd", False), ("blhd", True), ("bhld", False), ("interleaved", False)])
def test_tensor_path_takes_disjoint_interleaved_caches(layout, paged):
    """K and V as the two halves of one combined tensor (``kv[:, :, 0]``, ``kv[:, :, 1]`` of a
    (B, L, 2, H, D) cache, or of a page pool), or on alternate elements of one buffer, share no
    byte: taken, and computed as the numpy implementation computes them, the new tokens written
    where it writes them."""
    import dotattn

    B, Hq, Hkv, D, cap = 2, 4, 2, 16, 24
    rng = np.random.default_rng(len(layout) + paged)
    lengths = np.array([5, 17])
    table = None
    if paged:
        ps = 8
        table = rng.permutation(2 * cap // ps).reshape(B, cap // ps).astype(np.int64)
        shape = (2 * cap // ps, ps, 2, Hkv, D)  # (pages, page_size, K/V, Hkv, D)
    else:
        shape = {"blhd": (B, cap, 2, Hkv, D), "bhld": (B, Hkv, 2, cap, D), "interleaved": (B, Hkv, cap, 2 * D)}[layout]
    kv = torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(DEVICE)
    kv_numpy = kv.cpu().clone()

    def halves(t):
        return (t[..., 0::2], t[..., 1::2]) if layout == "interleaved" else (t[:, :, 0], t[:, :, 1])

    q, kn, vn = _new_tokens(B, Hq, Hkv, D, seed=1)
    call_layout = "bhld" if layout == "interleaved" else layout
    if call_layout == "blhd":
        q, kn, vn = (t.transpose(1, 2) for t in (q, kn, vn))
    kw = dict(cache_lengths=lengths, block_table=table, layout=call_layout, return_lse=True)
    out, lse = dotattn.attention_with_kvcache(q, *halves(kv), kn, vn, implementation="triton", **kw)
    want, want_lse = dotattn.attention_with_kvcache(q.cpu(), *halves(kv_numpy), kn.cpu(), vn.cpu(),
                                                    implementation="numpy", **kw)
    torch.testing.assert_close(out.cpu(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse.cpu(), want_lse, rtol=1e-5, atol=1e-6)
    assert kv.cpu().numpy().tobytes() == kv_numpy.numpy().tobytes()  # the same slots written, nothing else


def test_caches_whose_overlap_cannot_be_settled_are_refused(monkeypatch):
    """np.shares_memory may give up (its max_work, decode_semantics.OVERLAP_WORK): then an overlap
    could not be ruled out, and the call is refused on either path before anything is written."""
    import dotattn
    from dotattn import decode_semantics
    from dotattn.errors import AttentionValueError

    monkeypatch.setattr(decode_semantics, "OVERLAP_WORK", 0)  # gives up on any layout whose ranges meet
    B, Hkv, D = 2, 2, 16
    kv = torch.from_numpy(np.random.default_rng(2).standard_normal((B, 12, 2, Hkv, D)).astype(np.float32)).to(DEVICE)
    before = kv.clone()
    q, kn, vn = (t.transpose(1, 2) for t in _new_tokens(B, Hkv, Hkv, D))
    for implementation in ["triton"] if CUDA else ["triton", "numpy"]:
        with torch.no_grad(), pytest.raises(AttentionValueError, match="an overlap could not be ruled out"):
            dotattn.attention_with_kvcache(q, kv[:, :, 0], kv[:, :, 1], kn, vn, cache_lengths=np.array([1, 4]),
                                           layout="blhd", implementation=implementation)
    assert torch.equal(kv, before)


@pytest.mark.parametrize("D,Dv", [(320, 320), (272, 64), (64, 320)])
def test_triton_decode_refuses_head_dims_over_256_before_writing(D, Dv):
    """The decode kernel takes the prefill kernels' head dims (triton_backend.MAX_HEAD_DIM = 256,
    docs/backends.md): D = 320 was taken under the interpreter, and would not compile or fit a
    GPU.  Refused on both entry points, naming the dims, before the append."""
    import dotattn
    from dotattn.errors import UnsupportedCallError
    from dotattn.kernels import triton_decode

    case = C.make_case(11, B=2, Hq=2, Hkv=1, D=D, Dv=Dv, lengths=[3, 5], max_len=8)
    q, k, v, kn, vn = (_tensor(x) for x in (case.q, case.k_cache, case.v_cache, case.k_new, case.v_new))
    def memory():
        return [_numpy(x).tobytes() for x in (k, v)] + [x.tobytes() for x in (case.k_cache, case.v_cache)]

    before = memory()
    message = rf"implementation='triton' cannot take this call: .*head dims up to 256, got D={D}, Dv={Dv} \(D: "
    with pytest.raises(UnsupportedCallError, match=message):
        dotattn.attention_with_kvcache(q, k, v, kn, vn, implementation="triton", **case.kwargs())
    call = decoding.normalize(case.q, case.k_cache, case.v_cache, case.k_new, case.v_new, causal=True, window=None,
                              scale=None, softcap=None, alibi_slopes=None, rotary=None, **case.kwargs())
    with pytest.raises(UnsupportedCallError, match=message):
        triton_decode.decode(call)
    assert memory() == before


def test_triton_decode_takes_head_dim_256():
    import dotattn

    case = C.make_case(12, B=2, Hq=2, Hkv=1, D=256, lengths=[3, 20], max_len=24)
    out64, _, naive = C.expected(case)
    out = dotattn.attention_with_kvcache(*(_tensor(x) for x in (case.q, case.k_cache, case.v_cache, case.k_new,
                                                               case.v_new)), implementation="triton", **case.kwargs())
    H.assert_close_to_reference(_numpy(out), out64, naive, name="D=256 out", dtype=case.k_cache.dtype)


def test_tensor_path_resolves_negated_inputs_and_refuses_a_negated_or_inference_cache_it_writes():
    """The kernel reads memory: a lazily negated q or cache was read as its negation (audit of
    6 Dec).  Read-only inputs are resolved (the host path's NumPy view does the same); a cache
    taking new tokens with such a bit, or an inference tensor outside inference mode (torch
    refused the second cache's update after the first was written), is refused first."""
    import dotattn
    from dotattn.errors import AttentionValueError

    case = C.make_case(5, B=2, max_len=10)
    q, k, v, kn, vn = (_tensor(x) for x in (case.q, case.k_cache, case.v_cache, case.k_new, case.v_new))
    kw = dict(implementation="triton", **case.kwargs())
    want = dotattn.attention_with_kvcache(q, k, v, **kw)
    for args in ((torch._neg_view(-q), k, v), (q, torch._neg_view(-k), v), (q, k, torch._neg_view(-v))):
        torch.testing.assert_close(dotattn.attention_with_kvcache(*args, **kw), want, rtol=0, atol=0, equal_nan=True)
    before = k.clone()
    with pytest.raises(AttentionValueError, match="k_cache carries a lazy negation or conjugation bit"):
        dotattn.attention_with_kvcache(q, torch._neg_view(k), v, kn, vn, **kw)
    with torch.inference_mode():
        v_inference = v.clone()
    with pytest.raises(AttentionValueError, match="v_cache is an inference tensor"):
        dotattn.attention_with_kvcache(q, k, v_inference, kn, vn, **kw)
    assert k.cpu().numpy().tobytes() == before.cpu().numpy().tobytes()


@pytest.mark.skipif(CUDA, reason="CPU torch buffers: the interpreter's path")
def test_a_cpu_torch_kvcache_attends_through_the_triton_kernel():
    """KVCache(library="torch") on the CPU with implementation="triton" runs the triton kernel on
    its tensors (it was refused: the buffers went to NumPy first), with the numpy implementation's
    results and buffers."""
    from dotattn import KVCache

    rng = np.random.default_rng(3)
    caches = {impl: KVCache(2, 2, 16, 40, num_layers=2, page_size=3, library="torch", fill=np.nan)
              for impl in ("triton", "numpy")}
    for step in range(3):
        L = 5 if step == 0 else 1
        for layer in range(2):
            q, k, v = (torch.from_numpy(rng.standard_normal((2, h, L, 16)).astype(np.float32)) for h in (4, 2, 2))
            outs = {impl: c.attend(q, k, v, layer=layer, implementation=impl) for impl, c in caches.items()}
            assert isinstance(outs["triton"], torch.Tensor)
            torch.testing.assert_close(outs["triton"], outs["numpy"], rtol=1e-5, atol=1e-6)
    assert caches["triton"].lengths.tolist() == caches["numpy"].lengths.tolist() == [7, 7]
    a, b = (c.k.numpy() for c in caches.values())
    assert a.tobytes() == b.tobytes()


# ---------------------------------------------------------------------------------
# the kernel's arithmetic: 16-bit caches at float32 accuracy, the merge kernel
# ---------------------------------------------------------------------------------


def _decode_f64(q, k, v, lengths, scale):
    """float64 decode of one query row per head over a contiguous cache (GQA folded)."""
    B, Hq, _, D = q.shape
    G = Hq // k.shape[1]
    out = np.zeros((B, Hq, 1, v.shape[-1]))
    for b in range(B):
        for h in range(Hq):
            n = lengths[b]
            s = (k[b, h // G, :n] @ q[b, h, 0]) * scale
            p = np.exp(s - s.max())
            out[b, h, 0] = p @ v[b, h // G, :n] / p.sum()
    return out


@pytest.mark.parametrize("cache", ["float16", "bfloat16"])
@pytest.mark.parametrize("q_magnitude", [1.0, 1e5, 1e-5])
def test_16bit_caches_decode_at_float32_accuracy(cache, q_magnitude):
    """The 16-bit path's dots take q and the weights in 16-bit terms (three bfloat16, or two
    float16 after q's rows are scaled into float16's range): the result must be as accurate as
    a float32 computation on the widened cache, not as a 16-bit one — also for q far outside
    float16's range (1e5) or under its normal range (1e-5)."""
    import dotattn

    rng = np.random.default_rng(7)
    B, Hq, Hkv, D, L = 2, 4, 2, 64, 600  # several chunks of SPLIT_SIZE keys
    lengths = np.array([L, 333])
    tdt = getattr(torch, cache)
    k = torch.randn(B, Hkv, L, D, generator=torch.Generator().manual_seed(1)).to(tdt)
    v = torch.randn(B, Hkv, L, D, generator=torch.Generator().manual_seed(2)).to(tdt)
    q = rng.standard_normal((B, Hq, 1, D)).astype(np.float32) * np.float32(q_magnitude)
    scale = 2.0 / (np.sqrt(D) * q_magnitude)  # scores of order 1 whatever q's magnitude
    k64, v64 = (t.float().numpy().astype(np.float64) for t in (k, v))
    want = _decode_f64(q.astype(np.float64), k64, v64, lengths, scale)
    # the float32 computation the kernel must match: scores, softmax and P·V in float32
    k32, v32 = k.float().numpy(), v.float().numpy()
    naive32 = np.zeros_like(want)
    for b in range(B):
        for h in range(Hq):
            s = (k32[b, h // 2, :lengths[b]] @ q[b, h, 0]) * np.float32(scale)
            p = np.exp(s - s.max())
            naive32[b, h, 0] = (p / p.sum(dtype=np.float32)) @ v32[b, h // 2, :lengths[b]]
    dev = "cuda" if CUDA else "cpu"
    out = dotattn.attention_with_kvcache(torch.from_numpy(q).to(dev), k.to(dev), v.to(dev), cache_lengths=lengths,
                                         scale=scale, implementation=None if CUDA else "triton")
    err = np.abs(out.cpu().numpy().astype(np.float64) - want).max()
    err32 = np.abs(naive32 - want).max()
    assert err <= 2 * err32 + 1e-6, f"{cache} q×{q_magnitude}: error {err:.3g}, float32's {err32:.3g}"


@pytest.mark.parametrize("gap, bound", [(8, 1e-6), (12, 1e-6), (16, 1e-5), (20, 1e-3)])
def test_float16_weights_far_below_the_chunks_largest_keep_their_share(gap, bound):
    """One key scores ``gap`` above 149 others whose values are large (60000) while its own is
    0, so the output is carried by weights e^-gap.  Cut unscaled into float16 terms those fell
    under float16's normal range (2⁻¹⁴): 6 % off at gap 16, dropped (0.0) at gap 20.  Scaled
    by 2¹⁵ first, they keep float32's accuracy to about 2⁻²⁹ (gap ≈ 20); past that they lose
    bits gradually (docs/backends.md) — still far beyond a float16 computation, which drops
    them at 2⁻²⁴."""
    import dotattn

    D = 16
    q = torch.zeros(1, 1, 1, D)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, 200, D, dtype=torch.float16)
    k[0, 0, 0, 0] = 4.0 * gap  # (the scale is 1/4)
    v = torch.zeros(1, 1, 200, D, dtype=torch.float16)
    v[0, 0, 1:] = 60000.0
    dev = "cuda" if CUDA else "cpu"
    want = dotattn.attention_with_kvcache(q, k, v, cache_lengths=150, implementation="reference")
    got = dotattn.attention_with_kvcache(q.to(dev), k.to(dev), v.to(dev), cache_lengths=150,
                                         implementation=None if CUDA else "triton").cpu()
    rel = ((got.double() - want.double()).abs() / want.double().abs()).max().item()
    assert rel <= bound, f"gap {gap}: relative error {rel:.3g}"


def test_a_float32_q_row_of_magnitude_past_2_to_127_on_a_float16_cache():
    """q's rows are scaled by a power of two into float16's range; for a largest magnitude ≥ 2¹²⁷
    the factor 2⁻¹²⁷ is not a normal float32 and was built as 0.0: the row's scores were all 0,
    the output the mean of the values (4.5 here, not 9) and the LSE log 10."""
    import dotattn

    D = 16
    q = torch.zeros(1, 1, 1, D)
    q[..., 0] = 2e38
    k = torch.zeros(1, 1, 10, D, dtype=torch.float16)
    k[0, 0, :, 0] = torch.linspace(-0.5, 0.5, 10).half()
    v = torch.arange(10, dtype=torch.float16).view(1, 1, 10, 1).expand(1, 1, 10, D).contiguous()
    dev = "cuda" if CUDA else "cpu"
    want, want_lse = dotattn.attention_with_kvcache(q, k, v, cache_lengths=10, return_lse=True, implementation="reference")
    got, lse = dotattn.attention_with_kvcache(q.to(dev), k.to(dev), v.to(dev), cache_lengths=10, return_lse=True,
                                              implementation=None if CUDA else "triton")
    assert torch.equal(got.cpu(), want)  # (9.0: the last key's weight is 1)
    torch.testing.assert_close(lse.cpu(), want_lse, rtol=1e-6, atol=0)


def test_merge_kernel_keeps_the_rule_of_merge_attention_states():
    """decode_merge against dotattn.merge_attention_states on parts built for each corner:
    empty parts (−inf), a NaN LSE, a part whose weight underflows to 0 while it holds ±inf and
    NaN, a row with no part that saw a key, and a sequence with fewer chunks than the batch."""
    import dotattn
    from dotattn.decode_semantics import SPLIT_SIZE
    from dotattn.kernels import triton_decode

    kern = triton_decode._kernels()
    rng = np.random.default_rng(3)
    B, Hq, Lq, n_chunks, Dv = 2, 3, 2, 20, 24  # more chunks than the kernel reads at once
    parts = rng.standard_normal((B, Hq, Lq, n_chunks, Dv)).astype(np.float32)
    lses = rng.uniform(-3, 3, (B, Hq, Lq, n_chunks)).astype(np.float32)
    lses[0, 0, 0, 5:9] = -np.inf  # empty parts
    lses[0, 0, 1, :] = -np.inf  # a row that saw no key
    lses[0, 1, 0, 3] = np.nan  # a NaN row
    lses[0, 1, 1, 7] = -200.0  # weight underflows to 0 against the others…
    parts[0, 1, 1, 7, :3] = [np.inf, -np.inf, np.nan]  # …yet its non-finite entries count
    parts[0, 2, 0, 4, 0] = np.inf  # an empty part's infinity never counts
    lses[0, 2, 0, 4] = -np.inf
    lengths = np.array([n_chunks * SPLIT_SIZE, 7 * SPLIT_SIZE - 3])  # the second sequence: 7 chunks
    dev = "cuda" if CUDA else "cpu"
    t_parts, t_lses = torch.from_numpy(parts).to(dev), torch.from_numpy(lses).to(dev)
    out = torch.empty((B, Hq, Lq, Dv), device=dev)
    lse = torch.empty((B, Hq, Lq), device=dev)
    with np.errstate(all="ignore"):  # the interpreter's NumPy meets the NaN and −inf on purpose
        kern.decode_merge[(B * Hq * Lq,)](
            t_parts, t_lses, torch.from_numpy(lengths).to(dev), out, lse, *t_parts.stride(), *t_lses.stride(),
            *out.stride(), *lse.stride(), Hq, Lq, Dv, SPLIT_SIZE, BLOCK_C=triton_decode.MERGE_CHUNKS, BLOCK_DV=32,
        )
    out, lse = out.cpu().numpy(), lse.cpu().numpy()
    for b, n_c in enumerate([n_chunks, 7]):
        want_out, want_lse = dotattn.merge_attention_states([parts[b, :, :, c] for c in range(n_c)],
                                                            [lses[b, :, :, c] for c in range(n_c)])
        np.testing.assert_allclose(out[b], want_out, rtol=2e-6, atol=1e-6, equal_nan=True)
        np.testing.assert_allclose(lse[b], want_lse, rtol=2e-6, atol=1e-6, equal_nan=True)
    assert np.isnan(out[0, 1, 0]).all() and np.isnan(lse[0, 1, 0])
    assert (out[0, 0, 1] == 0).all() and lse[0, 0, 1] == -np.inf
    assert out[0, 1, 1, 0] == np.inf and out[0, 1, 1, 1] == -np.inf and np.isnan(out[0, 1, 1, 2])
    assert np.isfinite(out[0, 2, 0]).all()


@pytest.mark.parametrize("cache", ["float32", "bfloat16"])
def test_a_sequence_decodes_to_the_same_bits_in_any_batch(cache):
    """Chunks at fixed positions, the merge reading a row's own chunks at fixed places: a
    sequence alone, beside a much longer one (more chunks in the grid) and in a larger cache
    gives the same bits."""
    import dotattn

    tdt = getattr(torch, cache)
    gen = torch.Generator().manual_seed(5)
    Hq, Hkv, D, n = 4, 2, 32, 700
    q = torch.randn(1, Hq, 1, D, generator=gen)
    k = torch.randn(1, Hkv, n, D, generator=gen).to(tdt)
    v = torch.randn(1, Hkv, n, D, generator=gen).to(tdt)
    dev = "cuda" if CUDA else "cpu"
    impl = None if CUDA else "triton"

    def run(qb, kb, vb, lengths):
        return dotattn.attention_with_kvcache(qb.to(dev), kb.to(dev), vb.to(dev), cache_lengths=np.array(lengths),
                                              return_lse=True, implementation=impl)

    alone, alone_lse = run(q, k, v, [n])
    cap = 1400
    kb = torch.randn(2, Hkv, cap, D, generator=gen).to(tdt)
    vb = torch.randn(2, Hkv, cap, D, generator=gen).to(tdt)
    kb[1, :, :n], vb[1, :, :n] = k[0], v[0]
    kb[1, :, n:], vb[1, :, n:] = float("nan"), float("nan")  # never read
    qb = torch.cat([torch.randn(1, Hq, 1, D, generator=gen), q])
    batch, batch_lse = run(qb, kb, vb, [cap, n])
    assert torch.equal(batch[1:].cpu(), alone.cpu()) and torch.equal(batch_lse[1:].cpu(), alone_lse.cpu())


def test_host_arrays_reach_the_device_in_one_packed_copy(monkeypatch):
    """host_to_device on CUDA packs the arrays into one buffer and views the copy back in each
    array's dtype and shape (each at a multiple of 16 bytes, as Triton's kernels are specialized
    on a pointer's 16-byte alignment): small ones through a reused pinned slot, more
    than a slot holds through a buffer pinned for the copy.  Here the pinning and the copies
    are stand-ins (no GPU), the packing and the views are the real ones (the slots on a GPU:
    test_triton_gpu.py)."""
    from dotattn.kernels import triton_decode

    sent, copies = [], []

    class Slots:
        SLOT_BYTES = triton_decode._PinnedSlots.SLOT_BYTES

        def __init__(self, device):
            pass

        def send(self, packed):
            sent.append(packed.size)
            return torch.from_numpy(packed.copy())

    monkeypatch.setattr(triton_decode, "_PinnedSlots", Slots)
    monkeypatch.setattr(triton_decode, "_slots", {})
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: copies.append(k) or self.clone())

    class Cuda:
        type, index = "cuda", 0

    small = [np.arange(5), np.full((2, 3), 1.5, np.float32), np.array([[7, -8, 9]], np.int32),
             np.zeros(0, np.int64), np.linspace(0, 1, 7)]
    large = small + [np.arange(3000, dtype=np.int64)]  # 24 KB: past a slot
    for arrays in (small, large):
        got = triton_decode.host_to_device(*arrays, device=Cuda())
        for want, t in zip(arrays, got):
            assert t.dtype == torch.from_numpy(want).dtype and tuple(t.shape) == want.shape
            np.testing.assert_array_equal(t.numpy(), want)
            assert t.storage_offset() * t.element_size() % 16 == 0
    assert sent == [48 + 32 + 16 + 0 + 64]
    assert copies == [{"non_blocking": True}]


def _stand_in_kernel(log: list, params: list[tuple[str, bool]]):
    """A class standing in for a ``@triton.jit`` kernel (no GPU needed): ``fn[grid](*args, **kw)``
    logs ("triton", grid, args, kw) — Triton's own launch — and returns a compiled kernel whose
    ``[grid](*args)`` logs ("compiled", grid, args); ``params`` are (name, is_constexpr)."""
    from types import SimpleNamespace

    class Compiled:
        def __getitem__(self, grid):
            return lambda *args: log.append(("compiled", grid, args))

    class Jit:
        def __getitem__(self, grid):
            return lambda *args, **kw: log.append(("triton", grid, args, kw)) or Compiled()

    Jit.params = [SimpleNamespace(name=n, is_constexpr=c) for n, c in params]
    return Jit


def test_a_launch_reuses_the_compiled_kernel_for_the_same_specialization(monkeypatch):
    """triton_decode.launch: the first call of a specialization goes through Triton and keeps
    the compiled kernel it returns; a later call with the same key launches that kernel with
    every argument, constexprs included, in the kernel's order; a different alignment, a 1, a
    multiple of 16, a dtype or a constexpr makes a new key.  (Triton stands in here; the real
    one on a GPU: test_triton_gpu.py.)"""
    from types import SimpleNamespace

    from dotattn.kernels import triton_decode

    monkeypatch.setattr(triton_decode, "_kernels", lambda: SimpleNamespace(INTERPRETED=False))
    device = [0]
    monkeypatch.setattr(triton_decode, "_current_device", lambda: device[0])
    monkeypatch.setattr(triton_decode, "_compiled", {})
    log = []
    Jit = _stand_in_kernel(log, [("X", False), ("n", False), ("s", False), ("A", True), ("B", True)])

    class Ptr:
        def __init__(self, at, dtype="f32"):
            self.at, self.dtype, self.device = at, dtype, "cuda:0"

        def data_ptr(self):
            return self.at

    fn, x, y = Jit(), Ptr(4096), Ptr(8192)
    triton_decode.launch(fn, (3, 2), (x, 7, 1.5), dict(B=2, A=1), 4, 3)
    triton_decode.launch(fn, (3, 2), (y, 7, 1.5), dict(B=2, A=1), 4, 3)  # another tensor, as aligned
    assert log == [("triton", (3, 2), (x, 7, 1.5), dict(B=2, A=1, num_warps=4, num_stages=3)),
                   ("compiled", (3, 2, 1), (y, 7, 1.5, 1, 2))]
    for args, consts, options in [((Ptr(4104), 7, 1.5), dict(B=2, A=1), (4, 3)),  # not 16-byte aligned
                                  ((x, 1, 1.5), dict(B=2, A=1), (4, 3)),  # 1
                                  ((x, 32, 1.5), dict(B=2, A=1), (4, 3)),  # a multiple of 16
                                  ((x, 1 << 40, 1.5), dict(B=2, A=1), (4, 3)),  # past 32 bits
                                  ((x, 7, 2.5), dict(B=2, A=1), (4, 3)),  # numbers are keyed by value
                                  ((x, 7.0, 1.5), dict(B=2, A=1), (4, 3)),  # and by type
                                  ((Ptr(4096, "bf16"), 7, 1.5), dict(B=2, A=1), (4, 3)),
                                  ((x, 7, 1.5), dict(B=3, A=1), (4, 3)),
                                  ((x, 7, 1.5), dict(B=2, A=1), (8, 3))]:
        log.clear()
        triton_decode.launch(fn, (3, 2), args, consts, *options)
        assert [e[0] for e in log] == ["triton"], (args, consts, options)
    log.clear()
    device[0] = 1  # another current device: Triton loads its kernels per device
    triton_decode.launch(fn, (3, 2), (x, 7, 1.5), dict(B=2, A=1), 4, 3)
    assert [e[0] for e in log] == ["triton"]
    log.clear()
    triton_decode.launch(fn, (3, 2), (x, True, 1.5), dict(B=2, A=1), 4, 3)  # a bool: never kept
    triton_decode.launch(fn, (3, 2), (x, True, 1.5), dict(B=2, A=1), 4, 3)
    assert [e[0] for e in log] == ["triton", "triton"]
    log.clear()
    monkeypatch.setattr(triton_decode, "FAST_LAUNCH", False)
    triton_decode.launch(fn, (3, 2), (x, 9, 2.5), dict(B=2, A=1), 4, None)
    assert log == [("triton", (3, 2), (x, 9, 2.5), dict(B=2, A=1, num_warps=4))]


def test_a_plan_launch_goes_through_triton_once_then_runs_the_compiled_kernel(monkeypatch):
    """triton_decode._Launch (one launch of a decode plan): its first call goes through Triton
    with the tensors, the plan's numbers, constexprs and options, and keeps the compiled kernel
    Triton returns; later calls run it with every argument, constexprs included, in the
    kernel's order.  Never kept under the interpreter or with FAST_LAUNCH off.  (Triton stands
    in; the real one on a GPU: test_triton_gpu.py.)"""
    from types import SimpleNamespace

    from dotattn.kernels import triton_decode

    interpreted = [False]
    monkeypatch.setattr(triton_decode, "_kernels", lambda: SimpleNamespace(INTERPRETED=interpreted[0]))
    log = []
    Jit = _stand_in_kernel(log, [("X", False), ("Y", False), ("n", False), ("s", False), ("A", True), ("B", True)])

    x, y, z = object(), object(), object()
    run = triton_decode._Launch(Jit(), (7, 1.5), dict(B=2, A=1), 4, 3)
    run((3, 2, 1), x, y)
    run((5, 2, 1), z, y)
    assert log == [("triton", (3, 2, 1), (x, y, 7, 1.5), dict(B=2, A=1, num_warps=4, num_stages=3)),
                   ("compiled", (5, 2, 1), (z, y, 7, 1.5, 1, 2))]
    for flag, value in (("FAST_LAUNCH", False), ("interpreted", True)):
        log.clear()
        if flag == "interpreted":
            monkeypatch.setattr(triton_decode, "FAST_LAUNCH", True)
            interpreted[0] = True
        else:
            monkeypatch.setattr(triton_decode, "FAST_LAUNCH", value)
        run = triton_decode._Launch(Jit(), (7,), dict(A=1, B=2), 8, None)
        run((1, 1, 1), x, y)
        run((1, 1, 1), x, y)
        assert [e[0] for e in log] == ["triton", "triton"] and log[0][3] == dict(A=1, B=2, num_warps=8), flag


@pytest.mark.heavy
def test_calls_of_one_kind_share_a_plan_and_give_a_fresh_plans_bits():
    """A decode plan (the launches' numbers, kept per kind of call: triton_decode._Plan) is made
    once per kind: calls with new lengths and new values reuse it; a cache view off 16-byte
    alignment, a call growing from one chunk to several, another layout or dtype, ALiBi, an
    LSE asked for get their own.  Each call gives the bits of the same call on a fresh plan."""
    import dotattn
    from dotattn.kernels import triton_decode

    rng = np.random.default_rng(7)
    B, Hq, Hkv, D, cap = 2, 4, 2, 16, 700

    def tensor(*shape, dtype=torch.float32):
        return _tensor(rng.standard_normal(shape).astype(np.float32)).to(dtype)

    k, v = tensor(B, Hkv, cap + 2, D), tensor(B, Hkv, cap + 2, D)
    off = 2  # elements: 8 bytes into the buffer
    k_off = k.reshape(-1)[off:off + B * Hkv * cap * D].view(B, Hkv, cap, D)
    v_off = v.reshape(-1)[off:off + B * Hkv * cap * D].view(B, Hkv, cap, D)
    kc, vc = k[:, :, :cap], v[:, :, :cap]
    q, q16 = tensor(B, Hq, 1, D), tensor(B, Hq, 1, D, dtype=torch.float16)
    kc16, vc16 = kc.to(torch.float16), vc.to(torch.float16)
    impl = None if CUDA else "triton"
    slopes = rng.uniform(0.1, 0.5, Hq)
    calls = [  # (keyword arguments, new plan?)
        (dict(q=q, k_cache=kc, v_cache=vc, cache_lengths=np.array([100, 40])), True),
        (dict(q=tensor(B, Hq, 1, D), k_cache=kc, v_cache=vc, cache_lengths=np.array([3, 250])), False),
        (dict(q=q, k_cache=kc, v_cache=vc, cache_lengths=np.array([300, 40])), True),  # two chunks
        (dict(q=q, k_cache=kc, v_cache=vc, cache_lengths=np.array([600, 2])), False),  # three
        (dict(q=q, k_cache=k_off, v_cache=v_off, cache_lengths=np.array([600, 2])), True),
        (dict(q=q16, k_cache=kc16, v_cache=vc16, cache_lengths=np.array([600, 2])), True),
        (dict(q=q, k_cache=kc, v_cache=vc, cache_lengths=np.array([600, 2]), alibi_slopes=slopes), True),
        (dict(q=q, k_cache=kc, v_cache=vc, cache_lengths=np.array([600, 2]), return_lse=True), True),
        (dict(q=q.transpose(1, 2), k_cache=kc.transpose(1, 2), v_cache=vc.transpose(1, 2),
              cache_lengths=np.array([600, 2]), layout="blhd"), True),
        (dict(q=q, k_cache=kc, v_cache=vc, cache_lengths=np.array([500, 9])), False),
    ]
    triton_decode._plans.clear()
    for i, (kw, new_plan) in enumerate(calls):
        before = len(triton_decode._plans)
        got = dotattn.attention_with_kvcache(**kw, implementation=impl)
        assert len(triton_decode._plans) == before + new_plan, i
        kept = dict(triton_decode._plans)
        triton_decode._plans.clear()
        want = dotattn.attention_with_kvcache(**kw, implementation=impl)
        triton_decode._plans.clear()
        triton_decode._plans.update(kept)
        for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            assert g.dtype == w.dtype and g.shape == w.shape and torch.equal(g, w), i


_CAST_CASES = CASES + ([("bf16-contig-q16", dict(dtype=H.DTYPES[1], B=2, max_len=600), {})] if CUDA else [])


@pytest.mark.parametrize("name,shape,options", _CAST_CASES, ids=[c[0] for c in _CAST_CASES])
def test_in_kernel_casts_give_torchs_bits(name, shape, options, monkeypatch):
    """On a GPU the decode kernels read q in its own dtype and write the output in q's dtype and
    the caller's layout (triton_decode.IN_KERNEL_CASTS); the other way (q made float32 and the
    float32 output converted by torch, as under the interpreter) gives the same bits, and the
    same cache contents after the append.  Under the interpreter: float32 and float16 q (its
    bfloat16 casts truncate); on a GPU bfloat16 too."""
    import dotattn
    from dotattn.kernels import triton_decode

    seed = sum(map(ord, name)) + 2
    results = []
    for in_kernel in (False, True):
        monkeypatch.setattr(triton_decode, "IN_KERNEL_CASTS", in_kernel)
        case = C.make_case(seed, **shape)
        kw = dict(options)
        Hq = C.canonical(case.q, case.layout).shape[1]
        if options.get("alibi_slopes"):
            kw["alibi_slopes"] = np.random.default_rng(seed).uniform(0.01, 0.3, Hq)
        if options.get("rotary"):
            cos, sin = C.rope_tables(1024, C.canonical(case.q, case.layout).shape[3] // 2 - 1)
            kw["rotary"] = (_tensor(cos.astype(np.float32)), _tensor(sin.astype(np.float32)))
        kc, vc = _tensor(case.k_cache), _tensor(case.v_cache)
        out, lse = dotattn.attention_with_kvcache(
            _tensor(case.q), kc, vc, _tensor(case.k_new), _tensor(case.v_new), return_lse=True,
            implementation=None if CUDA else "triton", **case.kwargs(**kw),
        )
        results.append((out, lse, kc, vc))
    (o1, l1, k1, v1), (o2, l2, k2, v2) = results
    assert o1.dtype == o2.dtype and o1.shape == o2.shape and o1.is_contiguous() and o2.is_contiguous()
    bits = {2: torch.int16, 4: torch.int32}
    for a, b in ((o1, o2), (l1, l2), (k1, k2), (v1, v2)):  # (bits: the caches' unused slots hold NaN)
        assert torch.equal(a.view(bits[a.element_size()]), b.view(bits[b.element_size()]))


@st.composite
def _random_calls(draw):
    """A random decode call for the tensor path: every cache dtype the kernel takes (float16 q
    or float32 q over a 16-bit cache), GQA groups up to 9 (9·Lq rows past one 16-row tile),
    head dims on and off the power-of-two blocks (the masked lanes), value dims of their own,
    Lq = Lnew ∈ {1, 2, 7}, page sizes from 1 to past a chunk, windows, softcap, ALiBi, rotary."""
    dtype = draw(st.sampled_from([np.float32, np.float16, H.DTYPES[1]]))
    Hkv = draw(st.integers(1, 2))
    G = draw(st.sampled_from([1, 3, 4, 9]))
    D = draw(st.sampled_from([16, 40, 64, 80]))
    Lq = draw(st.sampled_from([1, 1, 2, 7]))
    shape = dict(B=draw(st.integers(1, 3)), Hq=G * Hkv, Hkv=Hkv, D=D, Dv=draw(st.sampled_from([D, 16, 80])), Lq=Lq,
                 Lnew=Lq if Lq > 1 or draw(st.booleans()) else None, dtype=dtype,
                 page_size=draw(st.sampled_from([None, 1, 16, 300])), max_len=draw(st.sampled_from([5, 100, 600])),
                 layout=draw(st.sampled_from(["bhld", "blhd"])))
    if np.dtype(dtype).itemsize == 2 and draw(st.booleans()):
        shape["q_dtype"] = np.float32
    opts = {}
    if draw(st.integers(0, 3)) == 0:
        opts["window"] = (draw(st.integers(0, 600)), draw(st.sampled_from([None, 0, 2])))
    if draw(st.integers(0, 3)) == 0:
        opts["softcap"] = draw(st.sampled_from([2.0, 10.0]))
    if draw(st.integers(0, 3)) == 0:
        opts["alibi_slopes"] = draw(st.sampled_from(["per-head", "batch"]))
    if shape["Lnew"] is not None and draw(st.integers(0, 4)) == 0:
        opts["rotary"] = True
    if draw(st.integers(0, 4)) == 0:
        opts["causal"] = False
    if draw(st.integers(0, 3)) == 0:
        opts["tile_rows"] = draw(st.sampled_from([3, 8]))  # TILE_ROWS lowered: blocks of query rows
    return shape, opts, draw(st.integers(0, 2**31 - 1))


@pytest.mark.heavy
@settings(max_examples=25)
@given(call=_random_calls())
def test_random_calls_on_the_tensor_path_match_the_reference(call):
    """The kernel's tiles, terms, masked lanes and merge on random calls (the tensor path: CUDA
    tensors on a GPU, CPU tensors through the interpreter here), against the float64 oracle.

    25 calls a run (the interpreter takes ≈ 0.8 s a call alone, 2–4 × that beside the suite's
    other worker); the slow sweep below runs 300."""
    _check_random_call(call)


@pytest.mark.slow
@settings(max_examples=300)
@given(call=_random_calls())
def test_random_calls_on_the_tensor_path_match_the_reference_sweep(call):
    _check_random_call(call)


def _check_random_call(call):
    from unittest import mock

    from dotattn.kernels import triton_decode

    shape, options, seed = call
    options = dict(options)
    tile_rows = options.pop("tile_rows", triton_decode.TILE_ROWS)
    with mock.patch.object(triton_decode, "TILE_ROWS", tile_rows):
        _check_random_call_as_given(shape, options, seed)


def _check_random_call_as_given(shape, options, seed):
    import dotattn

    case = C.make_case(seed, **shape)
    call_opts, ref_opts = C.call_options(case, options, np.random.default_rng(seed))
    if "rotary" in call_opts:
        call_opts["rotary"] = tuple(_tensor(x) for x in call_opts["rotary"])
    out64, lse64, naive = C.expected(case, **ref_opts)
    out, lse = dotattn.attention_with_kvcache(
        _tensor(case.q), _tensor(case.k_cache), _tensor(case.v_cache), _tensor(case.k_new), _tensor(case.v_new),
        return_lse=True, implementation=None if CUDA else "triton", **case.kwargs(**call_opts),
    )
    H.assert_close_to_reference(C.canonical(_numpy(out), case.layout), out64, naive, name="out",
                                dtype=case.k_cache.dtype)
    lse, finite = lse.cpu().numpy(), np.isfinite(lse64)
    assert (np.isneginf(lse) == ~finite).all(), "rows with no visible key must have lse = −inf"
    tol = 1e-3 if case.k_cache.dtype.itemsize == 2 else 1e-5
    np.testing.assert_allclose(lse[finite], lse64[finite], rtol=tol, atol=tol)


MANY_ROWS = [
    # (name, shape, options): G·Lq past TILE_ROWS (lowered to 8 here: blocks of 2 query rows a
    # group of 4, of 1 row a group of 9)
    ("causal-paged", dict(B=2, Hq=8, Hkv=2, Lq=5, Lnew=5, page_size=7, max_len=40), {}),
    ("causal-window-alibi-softcap", dict(B=2, Hq=8, Hkv=2, Lq=6, Lnew=6, max_len=300),
     dict(window=(9, None), alibi_slopes="per-head", softcap=5.0)),
    ("rotary-f16-blhd", dict(B=2, Hq=8, Hkv=2, Lq=5, Lnew=5, dtype=np.float16, layout="blhd", max_len=40),
     dict(rotary=True)),
    ("more-rows-than-keys", dict(B=2, Hq=4, Hkv=1, Lq=7, Lnew=None, lengths=[3, 0], max_len=10), {}),
    ("group-past-the-tile", dict(B=1, Hq=9, Hkv=1, Lq=3, Lnew=3, max_len=300), {}),
    ("noncausal-plain", dict(B=2, Hq=8, Hkv=2, Lq=5, Lnew=None, max_len=300), dict(causal=False)),
    ("noncausal-window-runs-whole", dict(B=2, Hq=8, Hkv=2, Lq=5, Lnew=None, max_len=60),
     dict(causal=False, window=(4, 2))),
]


@pytest.mark.parametrize("name,shape,options", MANY_ROWS, ids=[c[0] for c in MANY_ROWS])
def test_calls_of_many_query_rows_run_in_blocks_of_rows(monkeypatch, name, shape, options):
    """A call of more folded rows (G·Lq) than a program's tile holds runs in blocks of query
    rows: each block's tile and partial outputs stay bounded (the plans' row tiles ≤ TILE_ROWS,
    or one row's group), and the rows keep their positions — against the float64 reference,
    with the causal end, window, ALiBi and rotary positions of the whole call, rows before the
    first key giving zeros and −inf.  Calls whose rows' positions the block fixes (no causal
    mask, with a window) run whole."""
    from dotattn.kernels import triton_decode

    monkeypatch.setattr(triton_decode, "TILE_ROWS", 8)
    monkeypatch.setattr(triton_decode, "_plans", {})  # (this call's plans alone)
    launched = []
    real = triton_decode.decode_tensors

    def spy(q, *args, **kwargs):
        launched.append(q.shape[2])
        return real(q, *args, **kwargs)

    monkeypatch.setattr(triton_decode, "decode_tensors", spy)
    _check_random_call_as_given(shape, options, sum(map(ord, name)))
    Lq, G = shape["Lq"], shape["Hq"] // shape["Hkv"]
    if name.endswith("runs-whole"):
        assert launched == [Lq]
    else:
        rows = max(1, 8 // G)
        assert launched[0] == Lq and launched[1:] == [min(rows, Lq - i0) for i0 in range(0, Lq, rows)], launched
    tiles = {plan.split.consts["BLOCK_R"] for plan in triton_decode._plans.values()}
    assert tiles == ({max(16, triton_decode._next_pow2(G * Lq))} if name.endswith("runs-whole") else {16}), tiles


def test_read_only_host_arrays_reach_the_cpu_device_without_torchs_warning():
    """torch.as_tensor warned "The given NumPy array is not writable" for a call's read-only
    host arrays on the interpreter's CPU device (seen in a windowed ALiBi call of many rows)."""
    import warnings

    from dotattn.kernels.triton_decode import host_to_device

    a = np.arange(6, dtype=np.int64).reshape(2, 3)
    a.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (t,) = host_to_device(a, device=torch.device("cpu"))
    assert torch.equal(t, torch.arange(6).reshape(2, 3))
