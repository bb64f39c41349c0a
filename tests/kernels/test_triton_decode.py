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
