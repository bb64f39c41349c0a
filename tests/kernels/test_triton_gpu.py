"""The ``triton`` backend on a real GPU: bfloat16 (the interpreter's bf16 ``tl.dot`` is wrong),
realistic sizes, default dispatch of CUDA tensors, torch SDPA agreement, Inductor.

Every test is ``@pytest.mark.gpu``: ``tests/conftest.py`` deselects them where
``torch.cuda.is_available()`` is False, so CPU machines neither run nor skip them.
"""

from __future__ import annotations

import helpers as H
import numpy as np
import pytest
import torch

import dotattn
import dotattn.torch as dtorch

pytestmark = pytest.mark.gpu

BF16 = H.BFLOAT16


def _cuda(x, requires_grad=False):
    x = np.ascontiguousarray(x)
    t = torch.from_numpy(x.view(np.int16)).view(torch.bfloat16) if x.dtype == BF16 else torch.from_numpy(x)
    t = t.cuda()
    return t.requires_grad_() if requires_grad else t


def _host(t):
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(BF16)
    return t.numpy()


def check(q, k, v, opts):
    tq, tk, tv = (_cuda(x, True) for x in (q, k, v))
    topts = dict(opts)
    for name in ("mask", "bias"):
        if name in opts:
            topts[name] = _cuda(opts[name], requires_grad=name == "bias")
    out, lse = dtorch.attention(tq, tk, tv, return_lse=True, **topts)  # default dispatch: triton on CUDA
    ref_out, ref_lse = H.reference(q, k, v, **opts)
    H.assert_close_to_reference(_host(out), ref_out, H.naive(q, k, v, **opts)[0], name="out")
    H.assert_close_to_reference(_host(lse), ref_lse, None, name="lse", dtype=np.float32, floor=1e-3)
    dout = np.random.default_rng(1).standard_normal(out.shape).astype(q.dtype)
    (out.float() * _cuda(dout).float()).sum().backward()
    ref = H.reference_grads(q, k, v, dout, **opts)
    nai = H.naive_grads(q, k, v, dout, **opts)
    got = [tq.grad, tk.grad, tv.grad] + ([topts["bias"].grad] if "bias" in opts else [])
    magnitude = max(float(np.abs(x.astype(np.float64)).max()) for x in (q, k, v, dout)) ** 2
    for name, g, r, n in zip(("dq", "dk", "dv", "dbias"), got, ref, nai):
        H.assert_close_to_reference(_host(g), r, n, name=name, factor=3.0, dtype=q.dtype, magnitude=magnitude)


@pytest.mark.parametrize("D", [64, 128, 80])
@pytest.mark.parametrize("causal", [False, True])
def test_bfloat16_against_the_reference(D, causal):
    q, k, v = H.random_qkv(0, batch=(2,), Hq=4, Hkv=2, Lq=300, Lk=333, D=D, dtype=BF16)
    check(q, k, v, {"causal": causal})


def test_bfloat16_every_option():
    B, Hq, Lq, Lk = 2, 4, 200, 257
    rng = np.random.default_rng(3)
    q_len, kv_len = np.array([200, 150]), np.array([257, 99])
    q, k, v = H.random_qkv(3, batch=(B,), Hq=Hq, Hkv=1, Lq=Lq, Lk=Lk, D=64, dtype=BF16, q_lengths=q_len,
                           kv_lengths=kv_len)
    opts = {
        "q_lengths": q_len, "kv_lengths": kv_len, "window": (64, 8), "softcap": 20.0,
        "alibi_slopes": rng.uniform(0, 0.1, (Hq,)), "mask": H.random_mask(4, (Lq, Lk), 0.9),
        "bias": rng.standard_normal((Hq, 1, Lk)).astype(np.float32), "dropout_p": 0.1, "seed": 99,
    }
    check(q, k, v, opts)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_long_sequence_float16_float32(dtype):
    q, k, v = H.random_qkv(5, batch=(1,), Hq=2, Lq=1024, Lk=1024, D=128, dtype=dtype)
    check(q, k, v, {"causal": True})


def test_matches_torch_sdpa_flash():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 8, 2048, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ours = dotattn.attention(q, k, v, causal=True)
    theirs = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    assert (ours.double() - ref).abs().max() <= 2 * (theirs.double() - ref).abs().max() + 8e-3


def test_inductor_compiles_around_the_custom_op():
    torch._dynamo.reset()
    q, k, v = (torch.randn(1, 4, 256, 64, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(3))

    def f(q, k, v):
        return (dtorch.attention(q * 2, k, v, causal=True).float() ** 2).sum()  # float32 sum: same in both

    compiled = torch.compile(f, fullgraph=True)
    loss_c = compiled(q, k, v)
    grads_c = torch.autograd.grad(loss_c, (q, k, v))
    loss_e = f(q, k, v)
    grads_e = torch.autograd.grad(loss_e, (q, k, v))
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b)
    torch._dynamo.reset()


def test_info_says_cuda():
    row = dotattn.info()[0]
    assert row["name"] == "triton" and row["available"] and "CUDA" in row["status"]


@pytest.mark.parametrize("huge", [1e12, 1e20])
def test_huge_finite_logits_forward_and_backward(huge):
    """A row whose largest score is ≈ 1e20 is an ordinary softmax on the GPU too.

    The CPU kernels once lost such rows (0, LSE −inf) because ``s·c − m`` was fused into one
    multiply-add that kept the rounding ``m`` lost; on a GPU the compiler fuses multiply-adds
    by default, which Triton's interpreter (one rounding per operation) cannot show.
    """
    q = torch.ones(1, 1, 2, 4, device="cuda", requires_grad=True)
    k = torch.ones(1, 1, 5, 4, device="cuda")
    k[0, 0, 2] = huge  # key 2 scores D·huge·scale, far above the others
    k.requires_grad_()
    v = torch.arange(20.0, device="cuda").reshape(1, 1, 5, 4).requires_grad_()
    out, lse = dtorch.attention(q, k, v, return_lse=True, implementation="triton")
    torch.testing.assert_close(out[0, 0], v[0, 0, 2].expand(2, 4), rtol=0, atol=0)
    torch.testing.assert_close(lse[0, 0], torch.full((2,), 2.0 * huge, device="cuda"), rtol=1e-6, atol=0)
    out.sum().backward()
    torch.testing.assert_close(v.grad[0, 0, 2], torch.full((4,), 2.0, device="cuda"), rtol=0, atol=0)
    assert float(v.grad[0, 0, [0, 1, 3, 4]].abs().max()) == 0.0
    assert bool(torch.isfinite(q.grad).all()) and bool(torch.isfinite(k.grad).all())


def test_huge_finite_logits_decode():
    k_cache = torch.ones(1, 1, 8, 4, device="cuda")
    v_cache = torch.arange(32.0, device="cuda").reshape(1, 1, 8, 4)
    k_cache[0, 0, 3] = 1e20
    q = torch.ones(1, 2, 1, 4, device="cuda")
    out, lse = dotattn.attention_with_kvcache(
        q, k_cache, v_cache, cache_lengths=torch.tensor([6], device="cuda"), return_lse=True
    )
    torch.testing.assert_close(out[0, :, 0], v_cache[0, 0, 3].expand(2, 4), rtol=0, atol=0)
    torch.testing.assert_close(lse[0, :, 0], torch.full((2,), 2e20, device="cuda"), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_launches_of_the_kept_compiled_kernel_give_tritons_bits(dtype, monkeypatch):
    """A decode plan keeps each compiled kernel and launches it again without Triton's
    per-call specialization (triton_decode._Launch): the outputs are bitwise those of Triton's own launch, over calls
    whose specialization changes (a cache view 8 bytes off 16-byte alignment, paged and
    contiguous caches, growing lengths), each call made twice so the second uses the kept kernel."""
    from dotattn.kernels import triton_decode

    gen = torch.Generator(device="cuda").manual_seed(0)
    B, Hq, Hkv, D, cap = 2, 8, 2, 64, 700
    k = torch.randn(B, Hkv, cap + 1, D, device="cuda", generator=gen).to(dtype)
    v = torch.randn(B, Hkv, cap + 1, D, device="cuda", generator=gen).to(dtype)
    q = torch.randn(B, Hq, 1, D, device="cuda", generator=gen).to(dtype)
    pages = torch.randn(12, Hkv, 64, D, device="cuda", generator=gen).to(dtype)
    table = np.random.default_rng(0).permutation(12).reshape(B, 6).astype(np.int32)
    off = 8 // k.element_size()  # a view starting 8 bytes into the buffer: not 16-byte aligned
    k_off = k.reshape(-1)[off:off + B * Hkv * cap * D].view(B, Hkv, cap, D)
    v_off = v.reshape(-1)[off:off + B * Hkv * cap * D].view(B, Hkv, cap, D)
    assert k_off.data_ptr() % 16 == 8
    calls = [dict(k_cache=k[:, :, :cap], v_cache=v[:, :, :cap], cache_lengths=np.array([300, 650])),
             dict(k_cache=k_off, v_cache=v_off, cache_lengths=np.array([300, 650])),
             dict(k_cache=k[:, :, :cap], v_cache=v[:, :, :cap], cache_lengths=np.array([17, 1])),
             dict(k_cache=pages, v_cache=pages, cache_lengths=np.array([200, 384]), block_table=table)]

    def run_all():
        outs = []
        for call in calls:
            for _ in range(2):
                outs.append(dotattn.attention_with_kvcache(q, **call, return_lse=True, softcap=30.0))
        return outs

    monkeypatch.setattr(triton_decode, "FAST_LAUNCH", False)
    want = run_all()
    monkeypatch.setattr(triton_decode, "FAST_LAUNCH", True)
    monkeypatch.setattr(triton_decode, "_plans", {})
    got = run_all()
    plans = triton_decode._plans.values()
    assert len(plans) >= 3 and all(p.split.compiled is not None and p.redo.compiled is not None for p in plans)
    for (o, l), (wo, wl) in zip(got, want):
        assert torch.equal(o, wo) and torch.equal(l, wl)


def test_host_arrays_reach_the_device_through_reused_pinned_slots():
    """host_to_device's pinned slots: more calls than slots, each sending its own values while
    the GPU is kept busy, and every copy arrives with its own values (a slot is refilled only
    after its last copy has left)."""
    from dotattn.kernels.triton_decode import _PinnedSlots, host_to_device

    busy = torch.randn(4096, 4096, device="cuda")
    got = []
    for i in range(3 * _PinnedSlots.SLOTS):
        busy = busy @ busy.T * 1e-4  # a queue of GPU work ahead of each copy
        got.append(host_to_device(np.arange(100) + i, np.full(3, i, np.float32), device=torch.device("cuda")))
    torch.cuda.synchronize()
    for i, (a, b) in enumerate(got):
        assert torch.equal(a.cpu(), torch.arange(100) + i) and torch.equal(b.cpu(), torch.full((3,), float(i)))
