"""The ``triton`` backend against the float64 reference: every option, forward and backward.

Without a GPU the kernels run through Triton's interpreter (``TRITON_INTERPRET=1``, set by
the ``interpreter`` fixture for these tests only) on CPU tensors, with 16×16 tiles, so shapes
of ~40 tokens already span several query and key blocks.  The interpreter is slow (Python per
tile operation): shapes are tiny, and each case checks the output, the LSE and all gradients
at once.  float32 and float16 run here; bfloat16's accuracy needs a real GPU (the
interpreter's bfloat16 ``tl.dot`` multiplies raw bit patterns — the kernels widen their
operands there — and it stores bfloat16 by truncation) and lives in ``test_triton_gpu.py``;
here one test checks bfloat16 to a looser bound.

On a machine with CUDA the same tests run on CUDA tensors with the compiled kernels.
"""

from __future__ import annotations

import helpers as H
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import torch  # noqa: E402  (a test dependency: the Makefile installs torch and triton)

import dotattn  # noqa: E402
import dotattn.torch as dtorch  # noqa: E402
from dotattn import registry  # noqa: E402
from dotattn.errors import UnsupportedCallError  # noqa: E402
from dotattn.kernels.dropout import keep_block  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
F32, F16 = np.dtype(np.float32), np.dtype(np.float16)


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    """Triton's interpreter for CPU tensors, for these tests only (no effect where CUDA exists)."""
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


def _t(x, requires_grad=False):
    if x is None:
        return None
    t = torch.from_numpy(np.ascontiguousarray(x)).to(DEVICE)
    return t.requires_grad_() if requires_grad else t


def _torch_opts(opts, bias_grad=True):
    """Options as tensors on the device (mask/bias must share q's device)."""
    out = dict(opts)
    for name in ("mask", "bias"):
        if opts.get(name) is not None:
            out[name] = _t(opts[name], requires_grad=(name == "bias" and bias_grad))
    return out


def check(q, k, v, opts, *, grads=True, lse_in_loss=False):
    """Forward (out, lse) and backward (dq, dk, dv[, dbias]) on triton vs the reference, 2×/3× naive rule."""
    tq, tk, tv = (_t(x, requires_grad=grads) for x in (q, k, v))
    topts = _torch_opts(opts, bias_grad=grads)
    out, lse = dtorch.attention(tq, tk, tv, return_lse=True, implementation="triton", **topts)
    assert out.shape == q.shape[:-1] + v.shape[-1:] and out.dtype == tq.dtype and out.device.type == DEVICE
    assert lse.dtype == torch.float32
    ref_out, ref_lse = H.reference(q, k, v, **opts)
    nai_out, nai_lse = H.naive(q, k, v, **opts)
    out_np, lse_np = out.detach().cpu().numpy(), lse.detach().cpu().numpy()
    H.assert_close_to_reference(out_np, ref_out, nai_out, name="triton out")
    H.assert_close_to_reference(lse_np, ref_lse, nai_lse, name="triton lse")
    empty = np.isneginf(ref_lse)
    if opts.get("layout") == "blhd":
        empty = np.swapaxes(empty, -1, -2)
    assert (out_np[empty] == 0).all(), "rows with no visible key must be exactly 0"
    if not grads:
        return out, lse
    dout = np.random.default_rng(7).standard_normal(out.shape).astype(q.dtype)
    loss = (out * _t(dout)).sum()
    if lse_in_loss:
        loss = loss + torch.where(torch.isfinite(lse), lse, 0.0).sum()
    loss.backward()
    got = [tq.grad, tk.grad, tv.grad]
    if opts.get("bias") is not None:
        got.append(topts["bias"].grad)
    if lse_in_loss:
        ref, nai = _grads_with_lse(q, k, v, dout, opts)
    else:
        ref = H.reference_grads(q, k, v, dout, **opts)
        nai = H.naive_grads(q, k, v, dout, **opts)
    finite = [np.nan_to_num(np.abs(x.astype(np.float64))).max(initial=0.0) for x in (q, k, v, dout)]
    magnitude = max(finite) ** 2
    for name, g, r, n, like in zip(("dq", "dk", "dv", "dbias"), got, ref, nai, (q, k, v, opts.get("bias"))):
        g_np = g.detach().cpu().numpy()
        assert g_np.shape == like.shape and g_np.dtype == like.dtype, f"{name}: {g_np.shape}/{g_np.dtype}"
        dtype = max(q.dtype, g_np.dtype, key=lambda d: H.FLOORS.get(np.dtype(d), 0.0))
        floor = None if n is not None else H.FLOORS[np.dtype(dtype)] * 10 * max(1.0, magnitude)
        H.assert_close_to_reference(g_np, r, n, name=f"triton {name}", factor=3.0, dtype=dtype, magnitude=magnitude,
                                    floor=floor)
    return out, lse


def _grads_with_lse(q, k, v, dout, opts):
    """Float64 grads of ``Σ out·dout + Σ lse`` from the reference backend through the same
    torch front end (its LSE gradient is checked against finite differences in tests/torch);
    no naive baseline: the caller's floor decides."""
    t = [torch.from_numpy(x.astype(np.float64)).requires_grad_() for x in (q, k, v)]
    out, lse = dtorch.attention(*t, return_lse=True, implementation="reference", **opts)
    ((out * torch.from_numpy(dout.astype(np.float64))).sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum()).backward()
    return [x.grad.numpy() for x in t], [None, None, None]


def qkv(seed=0, dtype=F32, **sizes):
    sizes.setdefault("batch", (1,))
    return H.random_qkv(seed, dtype=dtype, **sizes)


# =================================================================================
# options one by one (float32 and float16), forward and backward
# =================================================================================

SHAPES = dict(Hq=4, Hkv=2, Lq=37, Lk=29, D=20, Dv=12)  # GQA, Lq ≠ Lk, Dv ≠ D, 3 × 2 blocks


@pytest.mark.parametrize("dtype", [F32, F16], ids=H.dtype_name)
def test_plain_gqa(dtype):
    q, k, v = qkv(0, dtype, **SHAPES)
    check(q, k, v, {})


@pytest.mark.parametrize("dtype", [F32, F16], ids=H.dtype_name)
@pytest.mark.parametrize("causal", [True, "top_left"])
@pytest.mark.parametrize("lq_lk", [(37, 21), (21, 37)], ids=["Lq>Lk", "Lq<Lk"])
def test_causal(dtype, causal, lq_lk):
    Lq, Lk = lq_lk
    q, k, v = qkv(1, dtype, Hq=2, Lq=Lq, Lk=Lk, D=16)
    check(q, k, v, {"causal": causal})


@pytest.mark.parametrize("window", [(5, None), (None, 3), (4, 2), (0, 0)], ids=str)
def test_window(window):
    q, k, v = qkv(2, F32, Hq=2, Lq=35, Lk=40, D=16)
    check(q, k, v, {"window": window, "causal": window[1] is None and window[0] == 5})


@pytest.mark.parametrize("dtype", [F32, F16], ids=H.dtype_name)
def test_lengths_with_nan_padding(dtype):
    """Padding (NaN) is never read; zero lengths give rows with no visible key (0, −inf, zero grads)."""
    batch = (3,)
    q_len = np.array([37, 20, 5])
    kv_len = np.array([29, 0, 17])
    q, k, v = H.random_qkv(3, batch=batch, Hq=2, Lq=37, Lk=29, D=16, dtype=dtype, q_lengths=q_len, kv_lengths=kv_len)
    check(q, k, v, {"q_lengths": q_len, "kv_lengths": kv_len, "causal": True, "alibi_slopes": np.array([0.5, 0.1])})


def test_segment_ids_skip_blocks_and_match():
    """Packed documents: tiles of two different documents are skipped, the rest masked."""
    ids = np.array([[0] * 18 + [1] * 5 + [2] * 17, [0] * 40])
    q, k, v = H.random_qkv(4, batch=(2,), Hq=2, Lq=40, D=16)
    check(q, k, v, {"segment_ids": ids, "causal": True})
    q_ids = np.array([[0] * 20 + [1] * 17])
    kv_ids = np.array([[0] * 3 + [1] * 26])
    q, k, v = H.random_qkv(5, batch=(1,), Hq=2, Lq=37, Lk=29, D=16)
    check(q, k, v, {"segment_ids": (q_ids, kv_ids)})


@pytest.mark.parametrize("dtype", [F32, F16], ids=H.dtype_name)
def test_alibi_softcap_scale(dtype):
    q, k, v = qkv(6, dtype, Hq=2, Lq=33, Lk=33, D=16, magnitude=3.0)
    check(q, k, v, {"alibi_slopes": np.array([[0.25, 0.75]]), "softcap": 2.0, "scale": 0.4})


def test_scale_zero_softcap_large():
    q, k, v = qkv(7, F32, Hq=2, Lq=20, Lk=30, D=16)
    check(q, k, v, {"scale": 0.0})
    check(q, k, v, {"softcap": 30.0, "causal": "top_left"})


@pytest.mark.parametrize("dtype", [F32, F16], ids=H.dtype_name)
def test_broadcast_mask_and_bias_with_bias_gradient(dtype):
    """mask (Lq, Lk) and bias (Hq, 1, Lk) are read with stride-0 dims; dbias comes back in the bias's shape."""
    rng = np.random.default_rng(8)
    q, k, v = qkv(8, dtype, Hq=2, Lq=37, Lk=29, D=16)
    mask = H.random_mask(9, (37, 29), 0.6)
    mask[3] = False  # a fully masked row
    bias = rng.standard_normal((2, 1, 29)).astype(np.float32)
    check(q, k, v, {"mask": mask, "bias": bias})


def test_full_mask_and_bias_per_head():
    rng = np.random.default_rng(10)
    q, k, v = H.random_qkv(10, batch=(2,), Hq=2, Lq=21, Lk=34, D=16)
    mask = H.random_mask(11, (2, 2, 21, 34), 0.8)
    mask[:, :, :, :16] = False  # whole key blocks masked: skipped
    bias = rng.standard_normal((2, 2, 21, 34)).astype(np.float32)
    check(q, k, v, {"mask": mask, "bias": bias, "window": (None, 6)})


@pytest.mark.parametrize("dtype", [F32, F16], ids=H.dtype_name)
def test_dropout_same_mask_as_the_cpu_backends(dtype):
    """The reference draws the keep mask with kernels/dropout.py: any differing element would be
    off by a whole p·v/(1−p), far outside the tolerance — forward and backward."""
    q, k, v = qkv(12, dtype, **SHAPES)
    check(q, k, v, {"dropout_p": 0.3, "seed": 2**40 + 7, "causal": True})


def test_dropout_keep_pattern_is_bit_identical():
    """q = 0 gives uniform weights and v = I makes out = the dropped weights: zeros = dropped."""
    Lq, Lk, p, seed = 23, 33, 0.4, 123456789
    q = np.zeros((2, 2, Lq, 16), np.float32)
    k = np.random.default_rng(0).standard_normal((2, 2, Lk, 16)).astype(np.float32)
    v = np.broadcast_to(np.eye(Lk, dtype=np.float32), (2, 2, Lk, Lk)).copy()
    out = dtorch.attention(_t(q), _t(k), _t(v), dropout_p=p, seed=seed, implementation="triton").cpu().numpy()
    for b in range(2):
        for h in range(2):
            keep = keep_block(seed, p, b, h, np.arange(Lq), np.arange(Lk), 2, Lq, Lk)
            np.testing.assert_array_equal(out[b, h] != 0, keep)
    kept = out[out != 0]
    np.testing.assert_allclose(kept, 1.0 / Lk / (1.0 - p), rtol=1e-6)


def test_mqa_blhd_layout_and_lse_gradient():
    q, k, v = qkv(13, F32, Hq=3, Hkv=1, Lq=19, Lk=35, D=16, layout="blhd")
    check(q, k, v, {"layout": "blhd", "causal": True}, lse_in_loss=True)


@pytest.mark.parametrize("ndim", [2, 3, 5])
def test_input_ranks(ndim):
    if ndim == 2:
        q, k, v = H.random_qkv(14, batch=(), Hq=None, Lq=18, Lk=20, D=16)
    elif ndim == 3:
        q, k, v = H.random_qkv(14, batch=(), Hq=2, Lq=18, Lk=20, D=16)
    else:
        q, k, v = H.random_qkv(14, batch=(2, 1), Hq=2, Lq=18, Lk=20, D=16, layout="blhd")
    opts = {"layout": "blhd"} if ndim == 5 else {}
    check(q, k, v, dict(opts, window=(3, 3)))


@pytest.mark.parametrize("dtype", [F32, F16], ids=H.dtype_name)
@pytest.mark.parametrize("D", [1, 59, 80, 96, 256])
def test_head_dims(dtype, D):
    """Head dims are padded to a power of two ≥ 16 inside the kernels (masked loads and stores)."""
    Dv = {1: 3, 59: 59, 80: 80, 96: 40, 256: 256}[D]
    q, k, v = qkv(15, dtype, Hq=1, Lq=18, Lk=21, D=D, Dv=Dv)
    check(q, k, v, {"causal": True}, grads=D != 256 or dtype == F32)


def test_fully_masked_rows_and_empty_keys():
    q, k, v = qkv(16, F32, Hq=2, Lq=20, Lk=7, D=16)
    out, lse = check(q, k, v, {"causal": True})  # Lq > Lk: the first 13 rows see nothing
    assert torch.isneginf(lse[..., :13]).all() and not torch.isnan(out).any()
    q, k, v = qkv(17, F32, Hq=2, Lq=5, Lk=0, D=16)
    check(q, k, v, {})
    q, k, v = qkv(18, F32, Hq=2, Lq=0, Lk=5, D=16)
    check(q, k, v, {})


def test_weights_match_the_reference():
    q, k, v = qkv(19, F32, Hq=2, Lq=21, Lk=26, D=16)
    opts = {"causal": "top_left", "softcap": 3.0, "mask": H.random_mask(20, (21, 26))}
    topts = _torch_opts(opts)
    out, w = dtorch.attention(_t(q), _t(k), _t(v), return_weights=True, implementation="triton", **topts)
    assert w.dtype == torch.float32 and w.shape == (1, 2, 21, 26)
    H.assert_close_to_reference(w.cpu().numpy(), H.reference_weights(q, k, v, **opts),
                                H.naive_weights(q, k, v, **opts), name="triton weights")


def test_backward_is_deterministic():
    q, k, v = qkv(21, F32, **SHAPES)
    grads = []
    for _ in range(2):
        tq, tk, tv = (_t(x, requires_grad=True) for x in (q, k, v))
        dtorch.attention(tq, tk, tv, causal=True, implementation="triton").square().sum().backward()
        grads.append([g.grad.cpu().numpy() for g in (tq, tk, tv)])
    for a, b in zip(*grads):
        H.assert_bitwise_equal(a, b, "gradient")


# =================================================================================
# every option together, drawn by hypothesis
# =================================================================================


@st.composite
def combos(draw):
    Hkv = draw(st.integers(1, 2))
    Hq = Hkv * draw(st.sampled_from([1, 2]))
    B = draw(st.integers(1, 2))
    Lq = draw(st.integers(1, 36))
    Lk = draw(st.sampled_from([Lq, draw(st.integers(1, 36))]))
    D = draw(st.sampled_from([8, 16, 24]))
    dtype = draw(st.sampled_from([F32, F16]))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    opts = {}
    causal = draw(st.sampled_from([False, True, "top_left"]))
    if causal:
        opts["causal"] = causal
    if draw(st.booleans()):
        side = st.one_of(st.none(), st.integers(0, 12))
        opts["window"] = (draw(side), draw(side))
    if draw(st.booleans()):
        opts["mask"] = H.random_mask(seed, draw(st.sampled_from([(Lq, Lk), (Hq, 1, Lk), (B, Hq, Lq, Lk)])), 0.8)
    if draw(st.booleans()):
        opts["bias"] = rng.standard_normal(draw(st.sampled_from([(1, Lk), (B, Hq, Lq, Lk)]))).astype(np.float32)
    if draw(st.booleans()):
        opts["softcap"] = 5.0
    if draw(st.booleans()):
        opts["alibi_slopes"] = rng.uniform(0, 1, (Hq,))
    if draw(st.booleans()):
        opts["q_lengths"] = H.random_lengths(seed + 1, (B,), Lq)
        opts["kv_lengths"] = H.random_lengths(seed + 2, (B,), Lk)
    if draw(st.booleans()):
        q_ids = np.sort(rng.integers(0, 3, (B, Lq)), axis=-1)
        opts["segment_ids"] = (q_ids, np.sort(rng.integers(0, 3, (B, Lk)), axis=-1))
    if draw(st.booleans()):
        opts["dropout_p"], opts["seed"] = 0.2, seed
    q, k, v = H.random_qkv(seed, batch=(B,), Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D, dtype=dtype,
                           q_lengths=opts.get("q_lengths"), kv_lengths=opts.get("kv_lengths"))
    return q, k, v, opts


@pytest.mark.heavy
@settings(max_examples=12)
@given(case=combos())
def test_option_combinations(case):
    q, k, v, opts = case
    check(q, k, v, opts)


# =================================================================================
# dispatch, availability, refusals
# =================================================================================


def test_info_lists_triton_first():
    rows = dotattn.info()
    assert rows[0]["name"] == "triton"
    assert rows[0]["available"], rows[0]
    assert ("interpreter" in rows[0]["status"]) != CUDA


def test_unavailable_without_cuda_or_interpreter(monkeypatch):
    from dotattn.kernels import triton_backend

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(triton_backend, "_cuda_present", lambda: False)
    row = dotattn.info()[0]
    assert row == {"name": "triton", "available": False, "status": row["status"]}
    assert row["status"].startswith("no CUDA device"), row
    with pytest.raises(UnsupportedCallError, match="triton: no CUDA device"):
        dtorch.attention(*(torch.ones(1, 2, 16) for _ in range(3)), implementation="triton")


def test_numpy_arrays_and_cpu_tensors_do_not_go_to_triton_unasked():
    q = np.ones((1, 4, 16), np.float32)
    with pytest.raises(UnsupportedCallError, match="triton: runs on torch tensors"):
        dotattn.attention(q, q, q, implementation="triton")
    call = dotattn.semantics.normalize(q, q, q)
    assert registry.select(call, device="cpu").name != "triton"  # CPU tensors: the CPU backends
    assert registry.select(call, None).name != "triton"  # NumPy arrays


def test_refusals_name_the_reason():
    q = torch.ones(1, 4, 16, dtype=torch.float64, device=DEVICE)
    with pytest.raises(UnsupportedCallError, match="triton: takes float16, bfloat16 or float32"):
        dtorch.attention(q, q, q, implementation="triton")
    q = torch.ones(1, 4, 300, device=DEVICE)
    with pytest.raises(UnsupportedCallError, match="head dims up to 256"):
        dtorch.attention(q, q, q, implementation="triton")
    q = torch.ones(1, 4, 16, device=DEVICE)
    with pytest.raises(UnsupportedCallError, match="triton: does not take score_mod"):
        dtorch.attention(q, q, q, implementation="triton", score_mod=lambda s, b, h, i, j: s)


def test_torch_compile_traces_the_custom_op():
    q, k, v = qkv(22, F32, Hq=2, Lq=17, Lk=17, D=16)
    tq, tk, tv = (_t(x, requires_grad=True) for x in (q, k, v))

    def f(q, k, v):
        return dtorch.attention(q, k, v, causal=True, implementation="triton").sum()

    torch._dynamo.reset()
    try:
        loss = torch.compile(f, fullgraph=True, backend="aot_eager")(tq, tk, tv)
        loss.backward()
    finally:
        torch._dynamo.reset()
    ref_out, _ = H.reference(q, k, v, causal=True)
    np.testing.assert_allclose(loss.item(), ref_out.sum(), rtol=1e-5)
    ref = H.reference_grads(q, k, v, np.ones((1, 2, 17, 16), np.float32), causal=True)
    for g, r in zip((tq, tk, tv), ref):
        np.testing.assert_allclose(g.grad.cpu().numpy(), r, atol=1e-5)


# =================================================================================
# block calls (internal semantics.BlockGeometry: one block of a larger problem, ring attention)
# =================================================================================


@pytest.mark.parametrize("opts", [
    {"causal": "top_left"},
    {"causal": True, "window": (6, 2), "dropout_p": 0.3, "seed": 99},
    {"alibi_slopes": np.array([0.5, 0.25, 0.125, 0.0625]), "causal": True},
], ids=["top-left", "dropout-causal-window", "alibi-causal"])
def test_blocks_merged_equal_the_full_call(opts):
    """Query × key × head blocks through the backend, merged over key blocks, give the full call."""
    from dotattn import merge_attention_states, semantics
    from dotattn.kernels import triton_backend
    from dotattn.semantics import BlockGeometry

    Lq, Lk = 29, 23
    q, k, v = H.random_qkv(23, batch=(1,), Hq=4, Hkv=2, Lq=Lq, Lk=Lk, D=16, Dv=8)
    call = semantics.normalize(q, k, v, **opts)
    ref_out, ref_lse = H.reference(q, k, v, **opts)
    got_out, got_lse = np.zeros_like(ref_out), np.zeros_like(ref_lse)
    for h0, h1 in ((0, 2), (2, 4)):
        for i0, i1 in ((0, 5), (5, 29)):
            parts = []
            for j0, j1 in ((0, 17), (17, 23)):
                g0, g1 = h0 // call.group, h1 // call.group
                changes = dict(q=call.q[:, h0:h1, i0:i1], k=call.k[:, g0:g1, j0:j1], v=call.v[:, g0:g1, j0:j1])
                if call.alibi_slopes is not None:
                    changes["alibi_slopes"] = call.alibi_slopes[:, h0:h1]
                geom = BlockGeometry(q_start=i0, k_start=j0, Lq=Lq, Lk=Lk, h_start=h0, Hq=4)
                bc = semantics.block_call(call, geom, **changes)
                out, lse = triton_backend.forward(bc, *(_t(x) for x in (bc.q, bc.k, bc.v)), None, None)
                parts.append((out.cpu(), lse.cpu()))
            o, s = merge_attention_states([p[0] for p in parts], [p[1] for p in parts])
            got_out[:, h0:h1, i0:i1], got_lse[:, h0:h1, i0:i1] = o.numpy(), s.numpy()
    nai_out, nai_lse = H.naive(q, k, v, **opts)
    H.assert_close_to_reference(got_out, ref_out, nai_out, name="blocks out")
    H.assert_close_to_reference(got_lse, ref_lse, nai_lse, name="blocks lse")


def test_numpy_view_entry_points_refuse_cuda_tensors_clearly():
    """attention() takes CUDA tensors now; entry points that compute on NumPy views say they do not."""
    from dotattn.torch._convert import to_numpy

    class CudaLooking(torch.Tensor):
        @property
        def device(self):
            return torch.device("cuda", 0)

    t = torch.zeros(2, 3).as_subclass(CudaLooking)
    with pytest.raises(NotImplementedError, match=r"k_cache is on device 'cuda:0'.*CPU tensors only.*\.cpu\(\)"):
        to_numpy("k_cache", t)


def test_non_finite_inputs_follow_the_policy():
    """docs/semantics.md 'Non-finite inputs': NaN reaches only the rows that read it; a −inf bias
    entry hides its key as a mask does; NaN in positions a row cannot see leaks nowhere."""
    q, k, v = qkv(24, F32, Hq=2, Lq=20, Lk=20, D=16)
    q[0, 1, 5, 3] = np.nan  # one query row
    bias = np.zeros((20, 20), np.float32)
    bias[:, 7] = -np.inf  # key 7 hidden from every row
    bias[2, :] = -np.inf  # row 2 sees nothing
    k[0, 0, 19] = np.nan  # the last key: causal rows before it never see it
    out, lse = dtorch.attention(_t(q), _t(k), _t(v), bias=_t(bias), causal=True, return_lse=True,
                                implementation="triton")
    out, lse = out.cpu().numpy(), lse.cpu().numpy()
    assert np.isnan(out[0, 1, 5]).all() and np.isnan(lse[0, 1, 5])
    assert np.isnan(out[0, 0, 19]).all()  # row 19 of head 0 reads the NaN key
    clean = np.ones((2, 20), bool)
    clean[1, 5] = clean[0, 19] = False
    assert np.isfinite(out[0][clean]).all()
    assert (out[0, :, 2] == 0).all() and np.isneginf(lse[0, :, 2]).all()
    q2, k2 = q.copy(), k.copy()
    q2[0, 1, 5, 3] = 0.0
    k2[0, 0, 19] = 0.0
    mask = np.ones((20, 20), bool)
    mask[:, 7] = False
    mask[2, :] = False
    ref, _ = H.reference(q2, k2, v, mask=mask, causal=True)
    np.testing.assert_allclose(out[0][clean], ref[0][clean], atol=1e-5)


def test_interpreter_switched_on_too_late_is_refused_with_the_reason():
    """TRITON_INTERPRET must be set before triton is imported (torch.compile imports it);
    set later, the call is refused with that reason instead of failing inside Triton."""
    import os
    import subprocess
    import sys

    script = (
        "import os, torch, triton\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "import dotattn.torch as dt\n"
        "from dotattn.errors import UnsupportedCallError\n"
        "t = torch.ones(1, 4, 16)\n"
        "try:\n"
        "    dt.attention(t, t, t, implementation='triton')\n"
        "except UnsupportedCallError as e:\n"
        "    print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    if not CUDA:
        assert "TRITON_INTERPRET=1 was set after triton was imported" in done.stdout, done.stdout


@pytest.mark.parametrize("causal", [False, True])
def test_bfloat16_through_the_interpreter_is_attention_not_raw_bits(causal):
    """Triton's interpreter multiplies bfloat16 tiles' raw bit patterns in ``tl.dot``: a bfloat16
    call through it returned outputs of ~1e9 and gradients of ~2e9 (7 Dec 2026).  The attention
    kernels' dots now widen their operands under the interpreter (exact; compiled kernels
    unchanged).  The bound is looser than the 2× naive rule of the GPU tests
    (test_triton_gpu.py): the interpreter also rounds float32 to bfloat16 by truncation where
    it stores the output and gradients."""
    rng = np.random.default_rng(21)
    q, k, v = (rng.standard_normal((1, 2, 40, 16)).astype(np.float32) for _ in range(3))
    bf = [torch.from_numpy(x).to(torch.bfloat16).to(DEVICE).requires_grad_() for x in (q, k, v)]
    exact = [x.detach().double().cpu().numpy() for x in bf]
    out = dotattn.attention(*bf, causal=causal, implementation="triton")
    ref, _ = H.reference(*exact, causal=causal)
    err = float(np.abs(out.detach().double().cpu().numpy() - ref).max())
    assert err <= 4 * 2.0**-8 * float(np.abs(ref).max()) + 1e-3, err
    out.backward(torch.ones_like(out))
    dq_ref = H.reference_grads(*exact, np.ones_like(ref), causal=causal)[0]
    assert float(np.abs(bf[0].grad.double().cpu().numpy() - dq_ref).max()) <= 4 * 2.0**-8 * float(np.abs(dq_ref).max()) + 1e-2


def test_lazily_negated_tensors_are_read_as_their_values():
    """A view with torch's negative bit (``z.conj().imag``) holds the values' negatives in its
    memory; the kernels read memory, so the backend resolves such tensors first (it did not:
    outputs and gradients 0.97–0.99 off; review of 7 Dec 2026).  q, k, v, bias and dout as
    negated views give the results of their resolved copies, bit for bit."""
    gen = torch.Generator().manual_seed(0)

    def negated(*shape):
        z = torch.complex(torch.randn(*shape, generator=gen), torch.randn(*shape, generator=gen)).to(DEVICE)
        t = z.conj().imag
        assert t.is_neg()
        return t

    q, k, v, bias, dout = negated(1, 2, 20, 16), negated(1, 2, 24, 16), negated(1, 2, 24, 8), negated(1, 2, 20, 24), negated(1, 2, 20, 8)
    results = []
    for resolve in (False, True):
        ins = [t.resolve_neg() if resolve else t for t in (q, k, v, bias)]
        leaves = [t.detach().clone() if resolve else t for t in ins]  # (a negated leaf keeps its bit)
        for t in leaves:
            t.requires_grad_()
        out = dtorch.attention(*leaves[:3], bias=leaves[3], causal=True, implementation="triton")
        out.backward(dout.resolve_neg() if resolve else dout)
        results.append([out.detach()] + [t.grad for t in leaves])
    for name, a, b in zip(("out", "dq", "dk", "dv", "dbias"), *results):
        assert torch.equal(a, b), f"{name}: a negated view gives other values ({(a - b).abs().max().item():.3g} off)"
    want = dtorch.attention(q.resolve_neg(), k.resolve_neg(), v.resolve_neg(), bias=bias.resolve_neg(), causal=True,
                            implementation="reference")
    torch.testing.assert_close(results[0][0].cpu(), want.cpu(), rtol=1e-4, atol=1e-4)
