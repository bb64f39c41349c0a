"""dotattn.attention on torch tensors: forward and gradients.

* against ``torch.nn.functional.scaled_dot_product_attention`` in float64 over what SDPA
  supports (bool masks, additive masks, ``is_causal`` = top-left, ``causal_lower_right``,
  ``enable_gqa``, ``scale``);
* against the float64 reference for the rest of the semantics (window, softcap, ALiBi,
  lengths with NaN padding, segment ids, dropout, layouts, LSE, weights, low dtypes);
* ``torch.autograd.gradcheck`` in float64; error paths.

This directory has no ``__init__.py`` on purpose: ``tests/`` is on ``sys.path`` and a
``tests/torch`` package would shadow PyTorch.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("torch.nn.functional")  # a real PyTorch, not the tests/torch directory

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention.bias import causal_lower_right  # noqa: E402

import dotattn  # noqa: E402
import dotattn.torch  # noqa: E402
from dotattn.errors import AttentionTypeError, AttentionValueError, UnsupportedCallError  # noqa: E402
from dotattn.semantics import BFLOAT16  # noqa: E402
from helpers import (  # noqa: E402
    assert_close_to_reference,
    naive,
    naive_grads,
    random_lengths,
    random_mask,
    random_qkv,
    reference,
    reference_grads,
    reference_weights,
)

F64 = torch.float64


def tensors(*arrays, requires_grad=True):
    """NumPy float arrays → leaf tensors (float64 stays float64) that require grad."""
    out = []
    for a in arrays:
        if a.dtype == BFLOAT16:
            t = torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
        else:
            t = torch.from_numpy(a.copy())
        out.append(t.requires_grad_(requires_grad))
    return out


def numpy_of(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(BFLOAT16)
    return t.numpy()


def grads_of(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout)


def assert_f64_close(ours, theirs, name):
    """float64 against float64: ≤ 1e-12 relative to the magnitude (a different summation order)."""
    ours, theirs = numpy_of(ours), numpy_of(theirs)
    assert_close_to_reference(ours, theirs, name=name, dtype=np.float64)


# =================================================================================
# vs torch SDPA, float64
# =================================================================================

SDPA_CASES = {
    # id: (shape kwargs, our options, SDPA options); masks are built per case below
    "plain": (dict(Lq=7, Lk=9), {}, {}),
    "scale": (dict(Lq=5, Lk=5), dict(scale=0.37), dict(scale=0.37)),
    "scale0": (dict(Lq=5, Lk=6), dict(scale=0.0), dict(scale=0.0)),
    "dv-differs": (dict(Lq=6, Lk=8, D=5, Dv=11), {}, {}),
    "causal-top-left": (dict(Lq=6, Lk=9), dict(causal="top_left"), dict(is_causal=True)),
    "causal-top-left-square": (dict(Lq=8, Lk=8), dict(causal="top_left"), dict(is_causal=True)),
    "causal-lower-right": (dict(Lq=5, Lk=9), dict(causal=True), "lower_right"),
    "gqa": (dict(Hq=6, Hkv=2, Lq=7, Lk=7), {}, dict(enable_gqa=True)),
    "mqa-causal": (dict(Hq=4, Hkv=1, Lq=7, Lk=7), dict(causal="top_left"), dict(enable_gqa=True, is_causal=True)),
    "bool-mask-full": (dict(Lq=6, Lk=7), "mask-full", "mask-full"),
    "bool-mask-2d": (dict(Lq=6, Lk=7), "mask-2d", "mask-2d"),
    "bool-mask-b11": (dict(Lq=6, Lk=7), "mask-b1", "mask-b1"),
    "additive-mask": (dict(Lq=6, Lk=7), "bias-full", "bias-full"),
    "additive-mask-broadcast": (dict(Lq=6, Lk=7), "bias-1h", "bias-1h"),
    "gqa-bias-scale": (dict(Hq=4, Hkv=2, Lq=5, Lk=8), "bias-gqa", "bias-gqa"),
}


def _sdpa_case(case_id: str, seed: int = 0):
    shape, ours, theirs = SDPA_CASES[case_id]
    dims = dict(batch=(2,), Hq=2, D=4) | shape
    q, k, v = tensors(*random_qkv(seed, dtype=np.float64, **dims))
    B, Hq, Lq, Lk = 2, dims["Hq"], dims["Lq"], dims["Lk"]
    rng = np.random.default_rng(seed + 1)
    if isinstance(ours, str):
        kind = ours
        ours, theirs = {}, {}
        if kind.startswith("mask"):
            shape_m = {"mask-full": (B, Hq, Lq, Lk), "mask-2d": (Lq, Lk), "mask-b1": (B, 1, Lq, Lk)}[kind]
            m = random_mask(seed + 2, shape_m)
            m[..., 0] = True  # every row sees a key (fully masked rows are tested against the reference)
            ours["mask"] = theirs["attn_mask"] = torch.from_numpy(m)
        else:
            shape_b = {"bias-full": (B, Hq, Lq, Lk), "bias-1h": (1, Hq, 1, Lk), "bias-gqa": (B, Hq, Lq, Lk)}[kind]
            b = torch.from_numpy(rng.standard_normal(shape_b)).requires_grad_(True)
            ours["bias"] = theirs["attn_mask"] = b
            if kind == "bias-gqa":
                ours["scale"] = theirs["scale"] = 0.5
                theirs["enable_gqa"] = True
    elif theirs == "lower_right":
        theirs = dict(attn_mask=causal_lower_right(Lq, Lk))
    return q, k, v, ours, theirs


@pytest.mark.parametrize("case_id", list(SDPA_CASES))
def test_forward_and_grads_match_sdpa_float64(case_id):
    q, k, v, ours, theirs = _sdpa_case(case_id)
    out = dotattn.attention(q, k, v, **ours)
    ref = F.scaled_dot_product_attention(q, k, v, **theirs)
    assert isinstance(out, torch.Tensor) and out.dtype == F64 and out.shape == ref.shape
    assert_f64_close(out, ref, "out")
    inputs = [q, k, v] + ([ours["bias"]] if "bias" in ours else [])
    names = ("q", "k", "v", "bias")[: len(inputs)]
    dout = torch.randn_like(ref)
    for name, g, g_ref in zip(names, grads_of(out, inputs, dout), grads_of(ref, inputs, dout), strict=True):
        assert g.shape == g_ref.shape, name
        assert_f64_close(g, g_ref, f"d{name}")


@settings(max_examples=25)
@given(
    seed=st.integers(0, 2**16),
    B=st.integers(1, 2),
    Hkv=st.integers(1, 2),
    group=st.integers(1, 3),
    Lq=st.integers(1, 9),
    Lk=st.integers(1, 9),
    D=st.integers(1, 6),
    Dv=st.integers(1, 6),
    causal=st.sampled_from([None, "top_left", "bottom_right"]),
    masked=st.booleans(),
    scale=st.one_of(st.none(), st.floats(0.05, 2.0)),
)
def test_matches_sdpa_on_random_shapes_float64(seed, B, Hkv, group, Lq, Lk, D, Dv, causal, masked, scale):
    Hq = Hkv * group
    q, k, v = tensors(*random_qkv(seed, batch=(B,), Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D, Dv=Dv, dtype=np.float64))
    ours, theirs = dict(scale=scale), dict(scale=scale, enable_gqa=group > 1)
    if causal == "top_left":
        ours["causal"], theirs["is_causal"] = "top_left", True
    elif causal == "bottom_right":
        ours["causal"] = "bottom_right"
    visible = np.ones((Lq, Lk), bool)
    if masked:
        visible = random_mask(seed, (B, 1, Lq, Lk))
        ours["mask"] = torch.from_numpy(visible)
    if causal == "bottom_right" or masked:
        # SDPA takes is_causal or attn_mask, not both: fold the causal rule into its mask.
        full = np.broadcast_to(visible, (B, 1, Lq, Lk)).copy()
        if causal is not None:
            full &= np.tril(np.ones((Lq, Lk), bool), k=Lk - Lq if causal == "bottom_right" else 0)
            theirs.pop("is_causal", None)
        theirs["attn_mask"] = torch.from_numpy(full)  # rows with no visible key: 0 in both
    out = dotattn.attention(q, k, v, **ours)
    ref = F.scaled_dot_product_attention(q, k, v, **theirs)
    assert_f64_close(out, ref, "out")
    dout = torch.randn_like(ref)
    for name, g, g_ref in zip("qkv", grads_of(out, (q, k, v), dout), grads_of(ref, (q, k, v), dout), strict=True):
        assert_f64_close(g, g_ref, f"d{name}")


# =================================================================================
# vs the float64 reference: the rest of the semantics
# =================================================================================

REFERENCE_CASES = {
    "window": dict(opts=dict(window=(2, 1))),
    "window-causal": dict(opts=dict(window=(3, None), causal=True), Lq=6, Lk=10),
    "softcap": dict(opts=dict(softcap=1.5), magnitude=3.0),
    "alibi-per-head": dict(opts=dict(alibi_slopes=np.array([0.5, 0.125]))),
    "alibi-per-batch": dict(opts=dict(alibi_slopes=np.array([[0.5, 0.25], [0.1, 0.3]]))),
    "lengths": dict(opts="lengths", Lq=7, Lk=9),
    "lengths-causal": dict(opts="lengths-causal", Lq=7, Lk=9),
    "segments": dict(opts="segments", Lq=8, Lk=8),
    "segments-pair": dict(opts="segments-pair", Lq=6, Lk=9),
    "blhd-gqa-causal": dict(opts=dict(causal=True, layout="blhd"), Hq=4, Hkv=2, layout="blhd"),
    "fully-masked-rows": dict(opts="fully-masked"),
    "dropout-seeded": dict(opts=dict(dropout_p=0.3, seed=1234)),
    "2d": dict(opts=dict(causal=True), batch=(), Hq=None),
    "3d-gqa": dict(opts=dict(), batch=(), Hq=4, Hkv=2),
    "4d-batch": dict(opts=dict(causal="top_left"), batch=(2, 3), Lq=4, Lk=6),
    "bias-broadcast-grad": dict(opts="bias-broadcast"),
    "empty-keys": dict(opts=dict(), Lk=0),
}


def _reference_case(case_id: str, seed: int = 0, dtype=np.float64):
    spec = dict(REFERENCE_CASES[case_id])
    opts = spec.pop("opts")
    magnitude = spec.pop("magnitude", 1.0)
    dims = dict(batch=(2,), Hq=2, Lq=5, Lk=7, D=4) | spec
    batch = dims["batch"]
    numpy_opts = {}
    if isinstance(opts, str):
        kind = opts
        opts = {}
        if kind.startswith("lengths"):
            numpy_opts["q_lengths"] = random_lengths(seed, batch, dims["Lq"])
            numpy_opts["kv_lengths"] = random_lengths(seed + 1, batch, dims["Lk"])
            if kind == "lengths-causal":
                opts["causal"] = True
        elif kind == "segments":
            ids = np.sort(np.random.default_rng(seed).integers(0, 3, (2, dims["Lq"])), axis=-1)
            numpy_opts["segment_ids"] = ids
            opts["causal"] = True
        elif kind == "segments-pair":
            rng = np.random.default_rng(seed)
            numpy_opts["segment_ids"] = (rng.integers(0, 2, (2, dims["Lq"])), rng.integers(0, 2, (2, dims["Lk"])))
        elif kind == "fully-masked":
            m = random_mask(seed, (2, 2, dims["Lq"], dims["Lk"]), p_attend=0.5)
            m[0, 0, 1] = False
            m[1, 1, 3] = False
            numpy_opts["mask"] = m
        elif kind == "bias-broadcast":
            numpy_opts["bias"] = np.random.default_rng(seed).standard_normal((2, 1, 1, dims["Lk"]))
    q_np, k_np, v_np = random_qkv(
        seed, dtype=dtype, magnitude=magnitude, q_lengths=numpy_opts.get("q_lengths"),
        kv_lengths=numpy_opts.get("kv_lengths"), **dims,
    )
    return (q_np, k_np, v_np), opts, numpy_opts


def _torch_options(opts, numpy_opts):
    """NumPy option arrays → tensors (a float bias requires grad)."""
    out = dict(opts)
    for name, x in numpy_opts.items():
        if isinstance(x, tuple):
            out[name] = tuple(torch.from_numpy(a) for a in x)
        elif name == "bias":
            out[name] = torch.from_numpy(x.copy()).requires_grad_(True)
        else:
            out[name] = torch.from_numpy(x)
    return out


@pytest.mark.parametrize("case_id", list(REFERENCE_CASES))
def test_forward_lse_and_grads_match_reference_float64(case_id):
    (q_np, k_np, v_np), opts, numpy_opts = _reference_case(case_id)
    all_np = opts | numpy_opts
    t_opts = _torch_options(opts, numpy_opts)
    q, k, v = tensors(q_np, k_np, v_np)
    out, lse = dotattn.attention(q, k, v, return_lse=True, **t_opts)
    ref_out, ref_lse = reference(q_np, k_np, v_np, **all_np)
    assert out.dtype == F64 and lse.dtype == F64
    assert_close_to_reference(numpy_of(out), ref_out, name="out", dtype=np.float64)
    assert_close_to_reference(numpy_of(lse), ref_lse, name="lse", dtype=np.float64)
    dout_np = np.random.default_rng(7).standard_normal(ref_out.shape)
    inputs = [q, k, v] + ([t_opts["bias"]] if "bias" in t_opts else [])
    grads = torch.autograd.grad(out, inputs, torch.from_numpy(dout_np))
    ref = reference_grads(q_np, k_np, v_np, dout_np, **all_np)
    for name, g, g_ref in zip(("dq", "dk", "dv", "dbias")[: len(inputs)], grads, ref, strict=True):
        assert tuple(g.shape) == g_ref.shape, name
        assert_close_to_reference(numpy_of(g), g_ref, name=name, dtype=np.float64)


@pytest.mark.parametrize("dtype", [np.float16, BFLOAT16, np.float32], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case_id", ["plain", "gqa-causal-lengths", "bias"])
def test_low_precision_within_tolerance_rule(dtype, case_id):
    """Output and gradients in the input dtype, as close to float64 as the rule asks."""
    opts, np_opts, dims = {}, {}, dict(batch=(2,), Hq=4, Hkv=2, Lq=9, Lk=13, D=8)
    if case_id == "gqa-causal-lengths":
        np_opts = dict(kv_lengths=np.array([13, 10]), q_lengths=np.array([9, 6]))
        opts = dict(causal=True)
    elif case_id == "bias":
        dims["Hkv"] = 4
        np_opts = dict(bias=np.random.default_rng(3).standard_normal((1, 4, 9, 13)).astype(dtype))
    q_np, k_np, v_np = random_qkv(5, dtype=dtype, **dims, q_lengths=np_opts.get("q_lengths"),
                                  kv_lengths=np_opts.get("kv_lengths"))
    all_np = opts | np_opts
    t_opts = dict(opts)
    for name, x in np_opts.items():
        t_opts[name] = tensors(x)[0] if name == "bias" else torch.from_numpy(x)
    q, k, v = tensors(q_np, k_np, v_np)
    out = dotattn.attention(q, k, v, **t_opts)
    assert out.dtype == q.dtype
    ref_out, _ = reference(q_np, k_np, v_np, **all_np)
    naive_out, _ = naive(q_np, k_np, v_np, **all_np)
    assert_close_to_reference(numpy_of(out), ref_out, naive_out, name="out")
    dout_np = np.random.default_rng(9).standard_normal(ref_out.shape).astype(dtype)
    inputs = [q, k, v] + ([t_opts["bias"]] if "bias" in t_opts else [])
    grads = torch.autograd.grad(out, inputs, tensors(dout_np, requires_grad=False)[0])
    ref = reference_grads(q_np, k_np, v_np, dout_np, **all_np)
    base = naive_grads(q_np, k_np, v_np, dout_np, **all_np)
    for name, g, g_ref, g_naive in zip(("dq", "dk", "dv", "dbias")[: len(inputs)], grads, ref, base, strict=True):
        assert g.dtype == q.dtype, name
        assert_close_to_reference(numpy_of(g), g_ref, g_naive, name=name, factor=3.0)


def test_return_weights_match_reference_and_carry_no_gradient():
    q_np, k_np, v_np = random_qkv(2, batch=(2,), Hq=4, Hkv=2, Lq=5, Lk=6, dtype=np.float32)
    q, k, v = tensors(q_np, k_np, v_np)
    out, lse, w = dotattn.attention(q, k, v, causal=True, return_lse=True, return_weights=True)
    assert w.shape == (2, 4, 5, 6) and w.dtype == torch.float32 and lse.dtype == torch.float32
    assert not w.requires_grad and out.requires_grad
    assert_close_to_reference(numpy_of(w), reference_weights(q_np, k_np, v_np, causal=True), name="weights",
                              dtype=np.float32)


def test_weights_over_the_size_limit_are_refused():
    q, k, v = tensors(*random_qkv(0, Lq=8, Lk=8))
    with pytest.raises(AttentionValueError, match="max_weights_bytes"):
        dotattn.attention(q, k, v, return_weights=True, max_weights_bytes=100)
    with pytest.raises(AttentionTypeError, match="max_weights_bytes must be an int"):
        dotattn.attention(q, k, v, return_weights=True, max_weights_bytes=None)


def test_segment_ids_as_nested_lists_read_as_numpy_does():
    """[[...], [...]] for a batch of 2 is one (B, L) array, not a (q_ids, kv_ids) pair."""
    q_np, k_np, v_np = random_qkv(1, batch=(2,), Lq=3, Lk=3, dtype=np.float64)
    q, k, v = tensors(q_np, k_np, v_np, requires_grad=False)
    ids = [[0, 0, 1], [0, 1, 1]]
    out = dotattn.attention(q, k, v, segment_ids=ids)
    assert_close_to_reference(numpy_of(out), reference(q_np, k_np, v_np, segment_ids=np.array(ids))[0],
                              name="out", dtype=np.float64)
    pair = (torch.tensor([[0, 0, 1], [0, 1, 1]]), torch.tensor([[0, 1, 1], [1, 1, 0]]))
    out = dotattn.attention(q, k, v, segment_ids=pair)
    ref = reference(q_np, k_np, v_np, segment_ids=tuple(t.numpy() for t in pair))[0]
    assert_close_to_reference(numpy_of(out), ref, name="out (pair)", dtype=np.float64)


def test_grad_through_lse_only():
    """A loss of the LSE alone (as ring attention combines partial results) gets its gradient."""
    q_np, k_np, v_np = random_qkv(4, dtype=np.float64)
    q, k, v = tensors(q_np, k_np, v_np)
    _, lse = dotattn.attention(q, k, v, return_lse=True)
    gq, gk, gv = torch.autograd.grad(lse.sum(), (q, k, v))
    qr, kr, vr = tensors(q_np, k_np, v_np)
    s = qr @ kr.transpose(-1, -2) * (8 ** -0.5)
    lse_ref = torch.logsumexp(s, dim=-1)
    rq, rk = torch.autograd.grad(lse_ref.sum(), (qr, kr))
    assert_f64_close(gq, rq, "dq")
    assert_f64_close(gk, rk, "dk")
    assert torch.count_nonzero(gv) == 0


# =================================================================================
# gradcheck
# =================================================================================

GRADCHECK_CASES = {
    "plain": dict(),
    "causal-gqa-lse": dict(causal=True, Hq=4, Hkv=2, return_lse=True),
    "bias-broadcast": dict(bias=(1, 2, 1, 5)),
    "bias-full-softcap": dict(bias=(1, 2, 4, 5), softcap=2.0),
    "alibi-window-blhd": dict(alibi_slopes=np.array([0.3, 0.7]), window=(1, 2), layout="blhd"),
    "lengths-segments": dict(kv_lengths=np.array([4]), q_lengths=np.array([3]),
                             segment_ids=(np.array([[0, 0, 1, 1]]), np.array([[0, 1, 1, 0, 1]]))),
    "dropout-seeded-lse": dict(dropout_p=0.25, seed=99, return_lse=True),
}


@pytest.mark.parametrize("case_id", list(GRADCHECK_CASES))
def test_gradcheck_float64(case_id):
    """Analytic vs numerical gradients of the whole front end (operator, autograd wiring,
    bias reduction, LSE gradient) on the default backend."""
    spec = dict(GRADCHECK_CASES[case_id])
    Hq, Hkv = spec.pop("Hq", 2), spec.pop("Hkv", 2)
    layout = spec.get("layout", "bhld")
    q_np, k_np, v_np = random_qkv(11, batch=(1,), Hq=Hq, Hkv=Hkv, Lq=4, Lk=5, D=3, Dv=2, dtype=np.float64,
                                  layout=layout)
    inputs = tensors(q_np, k_np, v_np)
    bias_shape = spec.pop("bias", None)
    if bias_shape is not None:
        inputs.append(torch.randn(bias_shape, dtype=F64, requires_grad=True))
    for name in ("alibi_slopes", "kv_lengths", "q_lengths"):
        if name in spec:
            spec[name] = torch.from_numpy(spec[name])
    if "segment_ids" in spec:
        spec["segment_ids"] = tuple(torch.from_numpy(a) for a in spec["segment_ids"])

    def fn(q, k, v, *bias):
        return dotattn.attention(q, k, v, bias=bias[0] if bias else None, **spec)

    assert torch.autograd.gradcheck(fn, tuple(inputs), atol=1e-8)


# =================================================================================
# dropout, seeds, backends, memory sharing
# =================================================================================


def test_dropout_seed_matches_numpy_and_is_reused_by_backward():
    q_np, k_np, v_np = random_qkv(6, dtype=np.float64, Lq=6, Lk=8)
    q, k, v = tensors(q_np, k_np, v_np)
    torch.manual_seed(123)
    out = dotattn.attention(q, k, v, dropout_p=0.4)
    dout_np = np.random.default_rng(1).standard_normal(out.shape)
    grads = torch.autograd.grad(out, (q, k, v), torch.from_numpy(dout_np))
    # The front end drew its seed from torch's generator; draw the same one again.
    torch.manual_seed(123)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    ref_out, _ = reference(q_np, k_np, v_np, dropout_p=0.4, seed=seed)
    assert_close_to_reference(numpy_of(out), ref_out, name="out", dtype=np.float64)
    ref = reference_grads(q_np, k_np, v_np, dout_np, dropout_p=0.4, seed=seed)
    for name, g, g_ref in zip(("dq", "dk", "dv"), grads, ref, strict=True):
        assert_close_to_reference(numpy_of(g), g_ref, name=name, dtype=np.float64)
    # same seed, same numbers as the NumPy API
    np_out = dotattn.attention(q_np, k_np, v_np, dropout_p=0.4, seed=seed)
    assert_close_to_reference(numpy_of(out), np_out, name="out vs numpy", dtype=np.float64)


def test_dropout_without_seed_follows_torch_manual_seed():
    q, k, v = tensors(*random_qkv(6, Lq=6, Lk=8), requires_grad=False)
    torch.manual_seed(5)
    a = dotattn.attention(q, k, v, dropout_p=0.5)
    b = dotattn.attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(5)
    c = dotattn.attention(q, k, v, dropout_p=0.5)
    assert torch.equal(a, c)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("implementation", ["cpu", "numpy", "reference"])
def test_every_backend_gives_the_same_autograd_results(implementation):
    q_np, k_np, v_np = random_qkv(8, batch=(2,), Hq=4, Hkv=2, Lq=9, Lk=11, D=8, dtype=np.float64)
    lengths = np.array([11, 7])
    q, k, v = tensors(q_np, k_np, v_np)
    bias = torch.randn(1, 4, 1, 11, dtype=F64, requires_grad=True)
    opts = dict(causal=True, kv_lengths=lengths, softcap=5.0)
    torch_opts = dict(opts, kv_lengths=torch.tensor(lengths))
    out = dotattn.attention(q, k, v, bias=bias, implementation=implementation, **torch_opts)
    dout = np.random.default_rng(0).standard_normal(out.shape)
    grads = torch.autograd.grad(out, (q, k, v, bias), torch.from_numpy(dout))
    all_np = dict(opts, bias=bias.detach().numpy())
    assert_close_to_reference(numpy_of(out), reference(q_np, k_np, v_np, **all_np)[0], name="out", dtype=np.float64)
    ref = reference_grads(q_np, k_np, v_np, dout, **all_np)
    for name, g, g_ref in zip(("dq", "dk", "dv", "dbias"), grads, ref, strict=True):
        assert_close_to_reference(numpy_of(g), g_ref, name=name, dtype=np.float64)


def test_inputs_reach_the_kernels_without_copies(monkeypatch):
    """The NumPy arrays the semantics module sees share memory with the caller's tensors."""
    from dotattn import semantics

    seen = {}
    real_normalize = semantics.normalize

    def spy(q, k, v, **kw):
        seen.update(q=q, k=k, v=v, mask=kw.get("mask"))
        return real_normalize(q, k, v, **kw)

    monkeypatch.setattr(semantics, "normalize", spy)
    q = torch.randn(2, 5, 3, 4).transpose(1, 2)  # a non-contiguous (blhd → bhld) view
    k = torch.randn(2, 3, 6, 4, dtype=torch.float32)
    v = torch.randn(2, 3, 6, 4)
    mask = torch.ones(6, dtype=torch.bool).expand(5, 6)
    dotattn.attention(q, k, v, mask=mask)
    assert np.shares_memory(seen["q"], q.numpy()) and seen["q"].strides == tuple(s * 4 for s in q.stride())
    assert np.shares_memory(seen["k"], k.numpy())
    assert seen["mask"].strides[0] == 0  # the expanded mask stays a zero-stride view
    qb = torch.randn(1, 2, 3, 4).to(torch.bfloat16)
    dotattn.attention(qb, qb, qb)
    assert seen["q"].dtype == BFLOAT16 and seen["q"].ctypes.data == qb.data_ptr()


def test_meta_tensors_give_shapes_without_running_a_kernel():
    q = torch.empty(2, 4, 7, 8, device="meta")
    k = torch.empty(2, 2, 9, 8, device="meta")
    v = torch.empty(2, 2, 9, 5, device="meta")
    out, lse, w = dotattn.attention(q, k, v, return_lse=True, return_weights=True)
    assert out.shape == (2, 4, 7, 5) and lse.shape == (2, 4, 7) and w.shape == (2, 4, 7, 9)
    out, lse = dotattn.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), layout="blhd",
                                 return_lse=True)
    assert out.shape == (2, 7, 4, 5) and lse.shape == (2, 4, 7)


@pytest.mark.parametrize("ndim", [2, 3, 4, 5])
@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_meta_shapes_are_the_eager_shapes_for_every_rank(ndim, layout):
    """The fake (meta) forward gave a 3-D "blhd" call an LSE of (Lq, Hq) and weights of
    (Lq, Hq, Lk) where eager gives (Hq, Lq) and (Hq, Lq, Lk) — torch.compile's inductor then
    failed on the size check (review of 7 Dec 2026); a list of segment ids went the same way."""
    lead = (2, 3, 4, 5)[: ndim - 2]  # batch dims, then Hq where there is one
    if layout == "blhd" and ndim >= 3:
        shapes = [lead[:-1] + (L, lead[-1], d) for L, d in ((5, 4), (7, 4), (7, 3))]
    else:
        shapes = [lead + (L, d) for L, d in ((5, 4), (7, 4), (7, 3))]
    q, k, v = (torch.randn(s) for s in shapes)
    eager = dotattn.attention(q, k, v, layout=layout, return_lse=True, return_weights=True)
    meta = dotattn.attention(*(t.to("meta") for t in (q, k, v)), layout=layout, return_lse=True, return_weights=True)
    assert [tuple(t.shape) for t in meta] == [tuple(t.shape) for t in eager]
    if ndim == 3:  # segment ids as a Python list (one array of shape (Lq,))
        ids = [0, 0, 1, 1, 1]
        got = dotattn.attention(q, q, q, layout=layout, segment_ids=ids)
        want = dotattn.attention(q, q, q, layout=layout, segment_ids=torch.tensor(ids))
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("option", ["mask", "kv_lengths", "alibi_slopes", "segment_ids"])
def test_an_option_changed_in_place_before_the_backward_raises(option):
    """The eager autograd Function kept the array options as a plain attribute, and its backward
    recomputes from them: one changed in place after the forward gave gradients 0.4–1.7 off,
    silently (review of 7 Dec 2026).  Saved, torch raises its in-place error, as on the
    operator's path."""
    q, k, v = (torch.randn(1, 2, 4, 6, dtype=torch.float64, requires_grad=True) for _ in range(3))
    opts = dict(mask=torch.rand(1, 1, 4, 4) > 0.3, kv_lengths=torch.tensor([3]),
                alibi_slopes=torch.tensor([0.3, 0.6], dtype=torch.float64), segment_ids=torch.tensor([[0, 0, 1, 1]]))
    opts["mask"][..., 0] = True
    out = dotattn.attention(q, k, v, **{option: opts[option]})
    opts[option].fill_(1 if option != "mask" else True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_forward_mode_ad_is_refused_not_dropped():
    """dotattn has no JVP rule: dual tensors' tangents came out None and torch.func.jvp/jacfwd
    gave zeros, silently (review of 7 Dec 2026); now each is refused by name."""
    import torch.autograd.forward_ad as fwAD

    q, k, v = (torch.randn(1, 2, 4, 8, dtype=torch.float64) for _ in range(3))
    with fwAD.dual_level():
        with pytest.raises(dotattn.AttentionTypeError, match="q carries a forward-mode tangent"):
            dotattn.attention(fwAD.make_dual(q, torch.ones_like(q)), k, v)
        with pytest.raises(dotattn.AttentionTypeError, match="bias carries a forward-mode tangent"):
            dotattn.attention(q, k, v, bias=fwAD.make_dual(torch.zeros(4, 4, dtype=torch.float64), torch.ones(4, 4, dtype=torch.float64)))
        dotattn.attention(fwAD.make_dual(q, torch.ones_like(q)).detach(), k, v)  # no tangent: runs
    for transform in (lambda f: torch.func.jvp(f, (q,), (torch.ones_like(q),)), lambda f: torch.func.jacfwd(f)(q)):
        with pytest.raises(dotattn.AttentionTypeError, match="no forward-mode derivative"):
            transform(lambda a: dotattn.attention(a, k, v))
    with torch.no_grad(), fwAD.dual_level():
        with pytest.raises(dotattn.AttentionTypeError, match="q carries a forward-mode tangent.*attention_with_kvcache"):
            dotattn.attention_with_kvcache(fwAD.make_dual(q[:, :, :1], torch.ones_like(q[:, :, :1])), k, v,
                                           cache_lengths=4)
    # reverse mode is untouched
    qg = q.clone().requires_grad_()
    dotattn.attention(qg, k, v).sum().backward()
    assert torch.isfinite(qg.grad).all()


def test_torch_inside_the_package_is_the_real_torch():
    from dotattn.torch import functional, layers

    assert functional.torch is sys.modules["torch"] and layers.torch is sys.modules["torch"]
    assert hasattr(functional.torch, "library") and functional.torch.__name__ == "torch"


# =================================================================================
# errors: the semantics module's messages, through torch
# =================================================================================


def _qkv(dtype=torch.float32, **shape):
    dims = dict(B=1, H=2, L=4, D=3) | shape
    t = torch.randn(dims["B"], dims["H"], dims["L"], dims["D"], dtype=torch.float64).to(dtype)
    return t, t.clone(), t.clone()


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(causal="upper"), AttentionValueError, "causal must be"),
        (dict(window=(-1, 2)), AttentionValueError, "dotattn uses None"),
        (dict(softcap=0.0), AttentionValueError, "softcap=None"),
        (dict(scale=float("nan")), AttentionValueError, "scale must be finite"),
        (dict(dropout_p=1.0), AttentionValueError, r"dropout_p must be in \[0, 1\)"),
        (dict(layout="lbhd"), AttentionValueError, "layout must be"),
        (dict(mask=torch.zeros(4, 4)), AttentionTypeError, "pass an additive float mask as bias="),
        (dict(mask=torch.ones(3, 4, dtype=torch.bool)), AttentionValueError, "does not broadcast"),
        (dict(kv_lengths=torch.tensor([9])), AttentionValueError, r"kv_lengths must lie in \[0, 4\]"),
        (dict(kv_lengths=torch.tensor([1.5])), AttentionTypeError, "must hold integers"),
        (dict(segment_ids=(torch.zeros(1, 4, dtype=torch.int64),) * 3), AttentionValueError, "a pair"),
        (dict(implementation="gpu"), AttentionValueError, "implementation must be None or one of"),
        (dict(alibi_slopes=torch.ones(2, requires_grad=True)), AttentionValueError, "alibi_slopes.detach"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_bad_options_raise_the_semantics_errors(kwargs, exc, match):
    q, k, v = _qkv()
    with pytest.raises(exc, match=match):
        dotattn.attention(q, k, v, **kwargs)


def test_bad_inputs_raise_clear_errors():
    q, k, v = _qkv()
    with pytest.raises(AttentionTypeError, match="unexpected keyword argument 'casual'; did you mean 'causal'"):
        dotattn.attention(q, k, v, casual=True)
    with pytest.raises(AttentionTypeError, match="share one dtype"):
        dotattn.attention(q, k.double(), v)
    with pytest.raises(AttentionTypeError, match="floating dtype"):
        dotattn.attention(q.int(), k.int(), v.int())
    with pytest.raises(AttentionValueError, match="not a multiple"):
        dotattn.attention(torch.randn(1, 3, 4, 3), torch.randn(1, 2, 4, 3), torch.randn(1, 2, 4, 3))
    with pytest.raises(AttentionTypeError, match="dtype torch.complex64"):
        dotattn.attention(q.to(torch.complex64), k.to(torch.complex64), v.to(torch.complex64))
    with pytest.raises(AttentionTypeError, match="must be a torch.Tensor"):
        dotattn.torch.attention(q.numpy(), k, v)
    with pytest.raises(TypeError, match="one library"):
        dotattn.attention(q, k.numpy(), v)


def test_devices_other_than_cpu_and_cuda_raise_not_implemented():
    from dotattn.torch._convert import check_device

    fake_mps = types.SimpleNamespace(device=torch.device("mps", 0))
    with pytest.raises(NotImplementedError, match=r"q is on device 'mps:0'.*CPU and CUDA.*\.cpu\(\)"):
        check_device("q", fake_mps)
    check_device("q", types.SimpleNamespace(device=torch.device("cuda", 0)))  # CUDA goes to the triton backend


def test_cuda_tensors_without_a_device_name_every_backends_reason(monkeypatch):
    """CUDA tensors are routed to the tensor backends; where none can run, each says why."""
    from dotattn.kernels import triton_backend

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(triton_backend, "_cuda_present", lambda: False)  # as on a machine without a GPU

    class CudaLooking(torch.Tensor):
        @property
        def device(self):
            return torch.device("cuda", 0)

    q = torch.randn(1, 2, 3, 4).as_subclass(CudaLooking)
    with pytest.raises(UnsupportedCallError) as err:
        dotattn.attention(q, q, q)
    msg = str(err.value)
    assert "triton: no CUDA device" in msg or "triton: triton not installed" in msg, msg
    assert "cpu: runs on CPU arrays; the tensors are on 'cuda'" in msg, msg


def test_numpy_option_arrays_are_accepted():
    q_np, k_np, v_np = random_qkv(3, Lq=5, Lk=5)
    q, k, v = tensors(q_np, k_np, v_np, requires_grad=False)
    m = random_mask(0, (5, 5))
    m[:, 0] = True
    out = dotattn.attention(q, k, v, mask=m, kv_lengths=np.array([5, 4]), alibi_slopes=[0.1, 0.2])
    ref, _ = reference(q_np, k_np, v_np, mask=m, kv_lengths=np.array([5, 4]), alibi_slopes=np.array([0.1, 0.2]))
    assert_close_to_reference(numpy_of(out), ref, naive(q_np, k_np, v_np, mask=m, kv_lengths=np.array([5, 4]),
                                                       alibi_slopes=np.array([0.1, 0.2]))[0], name="out")


def test_backend_extras_reach_the_backend_through_the_eager_path(monkeypatch):
    """Backend-specific ``**extras`` cannot pass an operator schema; they take the eager
    autograd.Function path, and both forward and backward receive them."""
    from dotattn import registry
    from dotattn.kernels.reference import ReferenceBackend

    received = []

    def allow_all(b, h, q_idx, kv_idx):
        return True

    class RecordingReference(ReferenceBackend):
        """The reference, told to accept (and ignore) a mask_mod that hides nothing."""

        def unsupported_reasons(self, call):
            received.append(dict(call.extras))
            return []

    monkeypatch.setitem(registry._INSTANCES, "reference", RecordingReference())
    q_np, k_np, v_np = random_qkv(12, Lq=6, Lk=6, dtype=np.float64)
    q, k, v = tensors(q_np, k_np, v_np)
    out = dotattn.attention(q, k, v, causal=True, implementation="reference", mask_mod=allow_all)
    out.sum().backward()
    assert received == [{"mask_mod": allow_all}, {"mask_mod": allow_all}]
    ref_out, _ = reference(q_np, k_np, v_np, causal=True)
    assert_close_to_reference(numpy_of(out), ref_out, name="out", dtype=np.float64)
    dout = np.ones(out.shape)
    ref = reference_grads(q_np, k_np, v_np, dout, causal=True)
    for name, g, g_ref in zip(("dq", "dk", "dv"), (q.grad, k.grad, v.grad), ref, strict=True):
        assert_close_to_reference(numpy_of(g), g_ref, name=name, dtype=np.float64)


@pytest.mark.slow
def test_score_mod_runs_through_the_eager_autograd_function():
    """The cpu backend's ``score_mod`` (compiled on the fly, ~30 s) with gradients."""
    pytest.importorskip("numba")
    q_np, k_np, v_np = random_qkv(12, Lq=6, Lk=6, dtype=np.float64)
    q, k, v = tensors(q_np, k_np, v_np)

    def distance_penalty(score, b, h, q_idx, kv_idx):
        return score - 0.25 * abs(q_idx - kv_idx)

    out = dotattn.attention(q, k, v, score_mod=distance_penalty, implementation="cpu")
    slopes = np.full(2, 0.25)
    ref_out, _ = reference(q_np, k_np, v_np, alibi_slopes=slopes)
    assert_close_to_reference(numpy_of(out), ref_out, name="out", dtype=np.float64)
    dout = np.random.default_rng(2).standard_normal(out.shape)
    grads = torch.autograd.grad(out, (q, k, v), torch.from_numpy(dout))
    ref = reference_grads(q_np, k_np, v_np, dout, alibi_slopes=slopes)
    for name, g, g_ref in zip(("dq", "dk", "dv"), grads, ref, strict=True):
        assert_close_to_reference(numpy_of(g), g_ref, name=name, dtype=np.float64)


@pytest.mark.parametrize("options", [{}, {"causal": True}], ids=["dense", "causal"])
def test_bf16_output_with_grad_is_the_kernels_rounding(options):
    """A bfloat16 call that requires grad gets its output as ``dotattn.attention`` on NumPy
    arrays and the no-grad path do (``dispatch.run_forward(final=True)``: rounded by the cpu
    kernel as it writes the rows, the same bits as the float32 output cast afterwards), and its
    gradients stay within the float64 reference's 2×-naive rule."""
    from dotattn import semantics
    from dotattn.kernels import cpu

    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((1, 2, 300, 64)).astype(BFLOAT16) for _ in range(3))
    do = rng.standard_normal((1, 2, 300, 64)).astype(BFLOAT16)
    qt, kt, vt = tensors(q, k, v)
    out = dotattn.attention(qt, kt, vt, implementation="cpu", **options)
    with torch.no_grad():
        out_nograd = dotattn.attention(*tensors(q, k, v, requires_grad=False), implementation="cpu", **options)
    out_np = dotattn.attention(q, k, v, implementation="cpu", **options)
    out32, _ = cpu.forward(semantics.normalize(q, k, v, **options))
    assert out.dtype == torch.bfloat16
    assert np.array_equal(numpy_of(out).view(np.uint16), numpy_of(out_nograd).view(np.uint16))
    assert np.array_equal(numpy_of(out).view(np.uint16), out_np.view(np.uint16))
    assert np.array_equal(numpy_of(out).view(np.uint16), out32.astype(BFLOAT16).view(np.uint16))
    grads = [numpy_of(g) for g in grads_of(out, (qt, kt, vt), tensors(do, requires_grad=False)[0])]
    ref = reference_grads(q, k, v, do, **options)
    nai = naive_grads(q, k, v, do, **options)
    for g, r, n, name in zip(grads, ref, nai, ("dq", "dk", "dv")):
        assert_close_to_reference(g, r, n, name=name)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_a_list_of_slopes_reads_as_the_numpy_front_end_reads_it(dtype):
    """A Python list of ALiBi slopes became a float32 tensor (torch's default dtype), 3e-9 off
    the NumPy front end's float64 slopes in a float64 call."""
    rng = np.random.default_rng(12)
    q, k, v = (rng.standard_normal((1, 3, 5, 8)).astype(dtype) for _ in range(3))
    slopes = [0.1, 0.3, 0.7]
    want = dotattn.attention(q, k, v, alibi_slopes=slopes, causal=True)
    got = dotattn.attention(*(torch.from_numpy(x) for x in (q, k, v)), alibi_slopes=slopes, causal=True)
    np.testing.assert_array_equal(got.numpy(), want)


def test_a_second_backward_is_refused_not_cut_off():
    """Eager calls with grad run an autograd Function whose backward was differentiable in
    name only: with create_graph=True the gradients came back detached, and a loss using them
    lost its second-order terms silently (1.0 where the true value is ≈ 1.133).  There is no
    double backward (docs/torch.md): it raises, as the operator's path does."""
    from dotattn.torch import attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    (g,) = torch.autograd.grad(attention(q, k, v).pow(2).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        (g.sum() + q.sum()).backward()
