"""The torch CPU path of attention_with_kvcache / KVCache.attend: the same bits as the NumPy path,
every check kept, and a refused call writes nothing into the caller's tensors.

The torch path takes ``Tensor.numpy()`` directly for a plain ``torch.Tensor`` (decoding._cpu_view)
and falls back to the checked conversion (torch/_convert.py) for anything that call refuses or
converts otherwise; these tests hold both routes to the same result and the same messages.
"""

from __future__ import annotations

import numpy as np
import pytest

import decode_cases as C
import helpers as H
import dotattn
from dotattn import KVCache
from dotattn.errors import AttentionTypeError, AttentionValueError

torch = pytest.importorskip("torch")
from dotattn.torch._convert import from_numpy  # noqa: E402

BF16 = H.DTYPES[1]


def _tensor(x):
    """A torch tensor of its own memory holding ``x``'s bits (bfloat16 included)."""
    return None if x is None else from_numpy(np.array(x, copy=True))


def _bits(x) -> np.ndarray:
    a = x.numpy() if isinstance(x, torch.Tensor) and x.dtype != torch.bfloat16 else x
    if isinstance(a, torch.Tensor):
        a = a.view(torch.int16).numpy()
    a = np.asarray(a)
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def _same_bits(a, b) -> None:
    np.testing.assert_array_equal(_bits(a), _bits(b))


@pytest.mark.parametrize("dtype,q_dtype", [
    (np.float32, None), (np.float16, None), (BF16, None), (BF16, np.float32), (np.float64, None),
])
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_torch_call_has_the_numpy_calls_bits(dtype, q_dtype, paged, layout):
    case = C.make_case(31, page_size=4 if paged else None, Lq=1, Lnew=1, dtype=dtype, q_dtype=q_dtype,
                       layout=layout)
    kc, vc = case.k_cache.copy(), case.v_cache.copy()
    opts = dict(cache_lengths=case.cache_lengths, block_table=case.block_table, return_lse=True, layout=layout)
    out, lse = dotattn.attention_with_kvcache(case.q, kc, vc, case.k_new, case.v_new, **opts)
    tkc, tvc = _tensor(case.k_cache), _tensor(case.v_cache)
    topts = dict(opts, cache_lengths=torch.from_numpy(case.cache_lengths.copy()),
                 block_table=None if case.block_table is None else torch.from_numpy(case.block_table.copy()))
    for _ in range(2):  # the first call of a kind, then one seen before
        tkc2, tvc2 = tkc.clone(), tvc.clone()
        with torch.no_grad():
            tout, tlse = dotattn.attention_with_kvcache(
                _tensor(case.q), tkc2, tvc2, _tensor(case.k_new), _tensor(case.v_new), **topts)
        assert isinstance(tout, torch.Tensor) and isinstance(tlse, torch.Tensor)
        _same_bits(tout, out)
        _same_bits(tlse, lse)
        _same_bits(tkc2, kc)  # the append reached the caller's tensors, in place
        _same_bits(tvc2, vc)


@pytest.mark.parametrize("dtype", [np.float32, BF16])
def test_kvcache_torch_buffers_have_the_numpy_cache_bits(dtype):
    rng = np.random.default_rng(5)
    B, Hq, Hkv, D, layers = 2, 6, 2, 16, 2
    tdt = torch.bfloat16 if dtype == BF16 else torch.float32
    nc = KVCache(B, Hkv, D, 64, num_layers=layers, dtype=str(np.dtype(dtype)), page_size=8)
    tc = KVCache(B, Hkv, D, 64, num_layers=layers, dtype=tdt, page_size=8, library="torch")
    prompt = rng.standard_normal((layers, B, Hkv, 5, D)).astype(dtype)
    for layer in range(layers):
        nc.append(prompt[layer], prompt[layer], layer=layer)
        tc.append(_tensor(prompt[layer]), _tensor(prompt[layer]), layer=layer)
    for _step in range(3):
        for layer in range(layers):
            q = rng.standard_normal((B, Hq, 1, D)).astype(np.float32)
            k = rng.standard_normal((B, Hkv, 1, D)).astype(dtype)
            v = rng.standard_normal((B, Hkv, 1, D)).astype(dtype)
            out, lse = nc.attend(q, k, v, layer=layer, return_lse=True)
            with torch.no_grad():
                tout, tlse = tc.attend(_tensor(q), _tensor(k), _tensor(v), layer=layer, return_lse=True)
            _same_bits(tout, out)
            _same_bits(tlse, lse)
    _same_bits(tc.k, nc.k)
    _same_bits(tc.v, nc.v)
    np.testing.assert_array_equal(tc.lengths, nc.lengths)


def _plain_call(q, kc, vc, kn, vn, lengths):
    with torch.no_grad():
        return dotattn.attention_with_kvcache(q, kc, vc, kn, kn if vn is None else vn, cache_lengths=lengths)


def test_tensors_the_direct_view_does_not_take_give_the_same_bits():
    """Tensors that Tensor.numpy() refuses or that are not torch.Tensor itself go the checked way:
    requires_grad under no_grad, a lazy negation bit, a Parameter, strided views."""
    case = C.make_case(7, Lq=1, Lnew=1)
    lengths = torch.from_numpy(case.cache_lengths)
    ref_kc = case.k_cache.copy()
    ref = dotattn.attention_with_kvcache(case.q, ref_kc, case.v_cache.copy(), case.k_new, case.v_new,
                                         cache_lengths=case.cache_lengths)
    variants = {
        "requires_grad": _tensor(case.q).requires_grad_(),
        "parameter": torch.nn.Parameter(_tensor(case.q)),
        "negative bit": torch._neg_view(_tensor(-case.q)),
        "transposed view": _tensor(np.ascontiguousarray(case.q.swapaxes(1, 3))).transpose(1, 3),
    }
    for what, q in variants.items():
        kc = _tensor(case.k_cache)
        out = _plain_call(q, kc, _tensor(case.v_cache), _tensor(case.k_new), _tensor(case.v_new), lengths)
        _same_bits(out, ref)
        _same_bits(kc, ref_kc)


@pytest.mark.parametrize("what,make,error,message", [
    ("complex q", lambda q: q.to(torch.complex64), AttentionTypeError,
     "q has dtype torch.complex64, which dotattn does not take"),
    ("int q", lambda q: q.to(torch.int32), AttentionTypeError, "q must have a floating dtype"),
    ("sparse q", lambda q: q.to_sparse(), AttentionTypeError, "q is a torch.sparse_coo tensor"),
    ("meta q", lambda q: q.to("meta"), None, None),
])
def test_refused_tensors_keep_their_messages_and_write_nothing(what, make, error, message):
    case = C.make_case(8, Lq=1, Lnew=1)
    kc, vc = _tensor(case.k_cache), _tensor(case.v_cache)
    before = kc.clone(), vc.clone()
    q = make(_tensor(case.q))
    with pytest.raises(Exception) as info:
        _plain_call(q, kc, vc, _tensor(case.k_new), _tensor(case.v_new), torch.from_numpy(case.cache_lengths))
    if error is not None:
        assert isinstance(info.value, error), (what, info.value)
        assert message in str(info.value), (what, str(info.value))
    torch.testing.assert_close(kc, before[0], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(vc, before[1], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("bad", ["lengths", "window", "k_new dtype", "return_lse", "v_new missing", "grad"])
def test_a_refused_torch_call_leaves_the_caches_unwritten(bad):
    case = C.make_case(9, Lq=1, Lnew=1, capacity=None)
    kc, vc = _tensor(case.k_cache), _tensor(case.v_cache)
    before = kc.clone(), vc.clone()
    kn, vn = _tensor(case.k_new), _tensor(case.v_new)
    lengths = torch.from_numpy(case.cache_lengths.copy())
    kwargs = dict(cache_lengths=lengths)
    if bad == "lengths":
        kwargs["cache_lengths"] = torch.full_like(lengths, case.k_cache.shape[2])  # no room for the new token
    elif bad == "window":
        kwargs["window"] = (-2, 0)
    elif bad == "k_new dtype":
        kn = kn.double()
    elif bad == "return_lse":
        kwargs["return_lse"] = "yes"
    elif bad == "v_new missing":
        vn = None
    q = _tensor(case.q)
    if bad == "grad":
        q.requires_grad_()
        with pytest.raises(AttentionValueError, match="requires grad"):
            dotattn.attention_with_kvcache(q, kc, vc, kn, vn, **kwargs)
    else:
        for _ in range(2):  # a kind seen before too
            with torch.no_grad(), pytest.raises((AttentionValueError, AttentionTypeError)):
                dotattn.attention_with_kvcache(q, kc, vc, kn, vn, **kwargs)
    torch.testing.assert_close(kc, before[0], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(vc, before[1], rtol=0, atol=0, equal_nan=True)


def test_a_refused_kvcache_attend_leaves_torch_buffers_and_lengths_as_they_were():
    cache = KVCache(1, 2, 8, 16, library="torch", num_layers=1)
    with torch.no_grad():
        cache.attend(torch.ones(1, 4, 1, 8), torch.ones(1, 2, 1, 8), torch.ones(1, 2, 1, 8))
    k0, v0, n0 = cache.k.clone(), cache.v.clone(), cache.lengths
    bad_calls = [
        (lambda: cache.attend(torch.ones(1, 3, 1, 8), torch.ones(1, 2, 1, 8), torch.ones(1, 2, 1, 8)), "heads"),
        (lambda: cache.attend(torch.ones(1, 4, 1, 8), torch.ones(1, 2, 1, 8, dtype=torch.float64),
                              torch.ones(1, 2, 1, 8)), "k_new"),
        (lambda: cache.attend(torch.ones(1, 4, 1, 8), torch.ones(1, 2, 1, 8), torch.ones(1, 2, 1, 8),
                              window=(-2, 0)), "window"),
        (lambda: cache.attend(torch.ones(1, 4, 1, 8).to(torch.complex64), torch.ones(1, 2, 1, 8),
                              torch.ones(1, 2, 1, 8)), "does not take"),
    ]
    for call, _what in bad_calls:
        with torch.no_grad(), pytest.raises((AttentionValueError, AttentionTypeError)):
            call()
        torch.testing.assert_close(cache.k, k0, rtol=0, atol=0)
        torch.testing.assert_close(cache.v, v0, rtol=0, atol=0)
        np.testing.assert_array_equal(cache.lengths, n0)
    with pytest.raises(AttentionValueError, match="requires grad"):
        cache.attend(torch.ones(1, 4, 1, 8, requires_grad=True), torch.ones(1, 2, 1, 8), torch.ones(1, 2, 1, 8))
    torch.testing.assert_close(cache.k, k0, rtol=0, atol=0)
    np.testing.assert_array_equal(cache.lengths, n0)


def test_the_first_torch_call_takes_the_checked_path_and_sets_up_the_direct_one(monkeypatch):
    """Before any torch conversion the direct path is off (dotattn.torch is imported where it
    always was: at the first conversion); that call sets it up; both give the same bits."""
    from dotattn import decoding

    monkeypatch.setattr(decoding, "_TENSOR", None)
    case = C.make_case(11, Lq=1, Lnew=1)
    outs = []
    for _ in range(2):
        kc = _tensor(case.k_cache)
        outs.append(_plain_call(_tensor(case.q), kc, _tensor(case.v_cache), _tensor(case.k_new), _tensor(case.v_new),
                                torch.from_numpy(case.cache_lengths)))
        assert decoding._TENSOR is torch.Tensor
    _same_bits(outs[0], outs[1])
