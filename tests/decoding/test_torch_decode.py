"""attention_with_kvcache on torch CPU tensors: in-place appends visible in the caller's tensors."""

from __future__ import annotations

import numpy as np
import pytest

import decode_cases as C
import helpers as H
import dotattn

torch = pytest.importorskip("torch")
BACKENDS = C.decode_backends()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("paged", [False, True])
def test_torch_tensors_in_place(backend, dtype, paged):
    np_dtype = H.DTYPES[1] if dtype == "bfloat16" else np.dtype(dtype)
    case = C.make_case(21, page_size=3 if paged else None, Lq=2, Lnew=2, dtype=np_dtype, q_dtype=np.float32)
    tdt = getattr(torch, dtype)

    def t(x):
        return None if x is None else torch.from_numpy(x.astype(np.float32)).to(tdt)

    kc, vc = t(case.k_cache), t(case.v_cache)
    q = torch.from_numpy(case.q)
    table = None if case.block_table is None else torch.from_numpy(case.block_table)
    with torch.no_grad():
        out, lse = dotattn.attention_with_kvcache(
            q, kc, vc, t(case.k_new), t(case.v_new), cache_lengths=torch.from_numpy(case.cache_lengths),
            block_table=table, return_lse=True, implementation=backend,
        )
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and isinstance(lse, torch.Tensor)
    out64, lse64, naive = C.expected(case)
    H.assert_close_to_reference(out.numpy(), out64, naive, dtype=np_dtype)
    # the caller's tensors hold the new tokens
    case.k_cache = kc.float().numpy().astype(np_dtype)
    case.v_cache = vc.float().numpy().astype(np_dtype)
    ks, vs = C.logical_after(case)
    for b, n in enumerate(case.cache_lengths + 2):
        k, v = C.read_cache(case, b, n)
        np.testing.assert_array_equal(k, ks[b])
        np.testing.assert_array_equal(v, vs[b])


def test_grad_enabled_inputs_are_refused():
    case = C.make_case(2)
    q = torch.from_numpy(case.q).requires_grad_()
    with pytest.raises(ValueError, match="no_grad"):
        dotattn.attention_with_kvcache(q, torch.from_numpy(case.k_cache), torch.from_numpy(case.v_cache), **case.kwargs())


def test_inference_mode_tensors():
    case = C.make_case(3)
    with torch.inference_mode():
        kc, vc = torch.from_numpy(case.k_cache).clone(), torch.from_numpy(case.v_cache).clone()
        out = dotattn.attention_with_kvcache(
            torch.from_numpy(case.q), kc, vc, torch.from_numpy(case.k_new), torch.from_numpy(case.v_new),
            cache_lengths=case.cache_lengths,
        )
    out64, _, naive = C.expected(case)
    H.assert_close_to_reference(out.numpy(), out64, naive)
    b, n = 0, int(case.cache_lengths[0])
    np.testing.assert_array_equal(kc[b, :, n].numpy(), case.k_new[b, :, 0])
