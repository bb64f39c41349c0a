"""attention_with_kvcache on random calls (hypothesis): every cache dtype, contiguous and paged
(page sizes from 1 to past a split), both layouts, GQA groups up to 9, head dims on and off
the 16-lane pieces, value dims of their own, Lq = Lnew ∈ {1, 2, 3, 7} or no new tokens,
windows, softcap, ALiBi, rotary, non-causal — against the float64 reference, on every decode
kernel, with the cache's unused slots NaN.  Lengths reach past several ``SPLIT_SIZE`` chunks,
so the merge of a sequence's parts is under test too (a float64 call's merge once weighted
its parts in float32: 1e-8 of error where float64's naive has 1e-16)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import decode_cases as C
import helpers as H
import dotattn

BACKENDS = C.decode_backends()


@st.composite
def decode_calls(draw, max_len: int):
    """``(make_case kwargs, call options, seed)`` of one random decode call."""
    dtype = draw(st.sampled_from(C.DTYPES))
    Hkv = draw(st.integers(1, 3))
    G = draw(st.sampled_from([1, 2, 4, 9]))
    D = draw(st.sampled_from([8, 16, 24, 40, 64, 128]))
    Dv = draw(st.sampled_from([D, D, 4, 16, 80]))
    Lq = draw(st.sampled_from([1, 1, 2, 3, 7]))
    Lnew = Lq if Lq > 1 or draw(st.booleans()) else None
    shape = dict(
        B=draw(st.integers(1, 3)), Hq=G * Hkv, Hkv=Hkv, D=D, Dv=Dv, Lq=Lq, Lnew=Lnew,
        page_size=draw(st.sampled_from([None, None, 1, 3, 16, 256, 300])),
        max_len=draw(st.sampled_from([5, 100, max_len])), dtype=dtype,
        layout=draw(st.sampled_from(["bhld", "bhld", "blhd"])),
    )
    if dtype.itemsize == 2 and draw(st.booleans()):
        shape["q_dtype"] = np.float32
    opts = {}
    if draw(st.integers(0, 3)) == 0:
        opts["window"] = (draw(st.integers(0, max_len)), draw(st.sampled_from([None, 0, 2])))
    if draw(st.integers(0, 4)) == 0:
        opts["softcap"] = draw(st.sampled_from([2.0, 10.0]))
    if draw(st.integers(0, 4)) == 0:
        opts["alibi_slopes"] = draw(st.sampled_from(["per-head", "batch"]))
    if Lnew is not None and draw(st.integers(0, 4)) == 0:
        opts["rotary"] = True
    if draw(st.integers(0, 4)) == 0:
        opts["causal"] = False
    return shape, opts, draw(st.integers(0, 2**31 - 1))


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=150)
@given(call=decode_calls(max_len=700))
def test_random_calls_match_reference(backend, call):
    shape, options, seed = call
    C.check_call(backend, seed, shape, options, backend)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=400)
@given(call=decode_calls(max_len=1300))
def test_random_calls_match_reference_exhaustive(backend, call):
    shape, options, seed = call
    C.check_call(backend, seed, shape, options, backend)


@settings(max_examples=60)
@given(call=decode_calls(max_len=700))
def test_torch_tensors_give_the_numpy_bits(call):
    """The same random call on torch CPU tensors: the same output bits, LSE and cache contents
    (appended in the caller's tensors) as on NumPy arrays."""
    torch = pytest.importorskip("torch")
    from dotattn.torch._convert import from_numpy

    shape, opts, seed = call
    case = C.make_case(seed, **shape)
    call_opts, _ = C.call_options(case, opts, np.random.default_rng(seed))
    tensors = [None if x is None else from_numpy(x.copy()) for x in (case.q, case.k_cache, case.v_cache, case.k_new, case.v_new)]
    t_opts = dict(call_opts)
    if isinstance(t_opts.get("alibi_slopes"), np.ndarray):
        t_opts["alibi_slopes"] = torch.from_numpy(t_opts["alibi_slopes"])
    out, lse = dotattn.attention_with_kvcache(case.q, case.k_cache, case.v_cache, case.k_new, case.v_new,
                                              return_lse=True, **case.kwargs(**call_opts))
    with torch.no_grad():
        t_out, t_lse = dotattn.attention_with_kvcache(*tensors, return_lse=True, **case.kwargs(**t_opts))
    assert isinstance(t_out, torch.Tensor) and isinstance(t_lse, torch.Tensor)
    H.assert_bitwise_equal(t_out.float().numpy(), out.astype(np.float32))
    H.assert_bitwise_equal(t_lse.numpy(), lse, "lse")
    for name, mine, theirs in (("k_cache", tensors[1], case.k_cache), ("v_cache", tensors[2], case.v_cache)):
        assert np.array_equal(mine.float().numpy(), theirs.astype(np.float32), equal_nan=True), name
