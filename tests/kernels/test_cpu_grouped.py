"""The cpu backend's grouped GQA forward (``_cpu_kernels.forward_grouped``): one task holds a
query tile's rows of every query head of a K/V group.

Which calls take it (:func:`dotattn.kernels.cpu._grouped_f32`), and on them, with tiles small
enough for skipped, partial and full tiles, padding rows and several tiles per task: the
float64 reference with the 2× naive rule, the per-head kernel's result, and NaN/±inf inputs
where the per-head kernel puts them.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dotattn import semantics
from dotattn.kernels import cpu

import helpers as H


def _call(Hq=6, Hkv=2, L=40, dtype=np.float32, **options):
    q, k, v = H.random_qkv(0, batch=(1,), Hq=Hq, Hkv=Hkv, Lq=L, Lk=L, D=8, dtype=dtype)
    return semantics.normalize(q, k, v, **options)


def test_the_rule_takes_plain_float32_gqa_causal_calls_only():
    assert cpu._grouped_f32(_call(causal=True))
    assert cpu._grouped_f32(_call(causal="top_left", q_lengths=np.array([30]), kv_lengths=np.array([35])))
    assert cpu._grouped_f32(_call(causal=True, dtype=np.float16))  # computed in float32
    segments = np.zeros((1, 40), np.int64)
    refused = [
        _call(Hq=2, Hkv=2, causal=True),  # no group
        _call(),  # no causal mask: the dense tiles
        _call(causal=True, window=(4, 0)),
        _call(causal=True, softcap=5.0),
        _call(causal=True, bias=np.zeros((40, 40), np.float32)),
        _call(causal=True, alibi_slopes=np.linspace(0.1, 0.5, 6)),
        _call(causal=True, mask=np.ones((40, 40), bool)),
        _call(causal=True, segment_ids=segments),
        _call(causal=True, dropout_p=0.2, seed=1),
        _call(causal=True, scale=-0.5),
        _call(causal=True, scale=0.0),
        _call(causal=True, dtype=np.float64),
    ]
    for call in refused:
        assert not cpu._grouped_f32(call)
    with pytest.raises(ValueError):
        cpu.forward(_call(causal=True, window=(4, 0)), grouped=True)


@st.composite
def cases(draw):
    B = draw(st.integers(1, 2))
    Hkv = draw(st.integers(1, 2))
    Hq = Hkv * draw(st.sampled_from([2, 3, 4]))
    Lq = draw(st.integers(1, 45))
    Lk = draw(st.sampled_from([Lq, draw(st.integers(1, 45))]))
    D = draw(st.sampled_from([1, 8, 33]))
    Dv = draw(st.sampled_from([D, 5]))
    options = {"causal": draw(st.sampled_from([True, "top_left"]))}
    if draw(st.booleans()):
        options["q_lengths"] = H.random_lengths(draw(st.integers(0, 99)), (B,), Lq)
        options["kv_lengths"] = H.random_lengths(draw(st.integers(0, 99)), (B,), Lk)
    if draw(st.booleans()):
        # (scale 2.5: scores reach ≈ 40 at D 33, where the score products' rounding decides the
        # error — tests/kernels/test_cpu_f32_accuracy.py)
        options["scale"] = draw(st.sampled_from([0.3, 1.7, 2.5]))
    tiles = draw(st.sampled_from([(4, 8), (8, 4), (3, 5), (16, 16), None]))
    return dict(seed=draw(st.integers(0, 2**16)), B=B, Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D, Dv=Dv,
                tiles=tiles, options=options)


@settings(max_examples=50, deadline=None)
@given(cases())
def test_grouped_forward_matches_the_reference_and_the_per_head_kernel(case):
    opts = case["options"]
    q, k, v = H.random_qkv(
        case["seed"], batch=(case["B"],), Hq=case["Hq"], Hkv=case["Hkv"], Lq=case["Lq"], Lk=case["Lk"],
        D=case["D"], Dv=case["Dv"], dtype=np.float32,
        q_lengths=opts.get("q_lengths"), kv_lengths=opts.get("kv_lengths"),
    )  # NaN past the lengths: padding must never be read
    call = semantics.normalize(q, k, v, **opts)
    assert cpu._grouped_f32(call)
    out, lse = cpu.forward(call, block_size=case["tiles"])
    ref_out, ref_lse = H.reference(q, k, v, **opts)
    naive_out, naive_lse = H.naive(q, k, v, **opts)
    H.assert_close_to_reference(out, ref_out, naive_out, name="out")
    H.assert_close_to_reference(lse, ref_lse, naive_lse, name="lse")
    per_head_out, per_head_lse = cpu.forward(call, block_size=case["tiles"], grouped=False)
    np.testing.assert_allclose(out, per_head_out, rtol=1e-5, atol=3e-6)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(per_head_lse))


@pytest.mark.parametrize("L", [300, 1100])  # 64 × 64 tiles up to 1,024 keys, 128 × 128 beyond
def test_smollm_prompt_shape_with_the_default_tiles(L):
    """SmolLM's prompt pass (Hq 9, Hkv 3, D 64, causal) at a length no multiple of the tiles."""
    q, k, v = H.random_qkv(5, batch=(1,), Hq=9, Hkv=3, Lq=L, Lk=L, D=64, dtype=np.float32, layout="blhd")
    call = semantics.normalize(q, k, v, causal=True, layout="blhd")
    assert cpu._grouped_f32(call)
    out, lse = cpu.forward(call)
    ref_out, ref_lse = H.reference(q, k, v, causal=True, layout="blhd")
    naive_out, naive_lse = H.naive(q, k, v, causal=True, layout="blhd")
    H.assert_close_to_reference(out.swapaxes(1, 2), ref_out, naive_out, name="out")
    H.assert_close_to_reference(lse, ref_lse, naive_lse, name="lse")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("target", ["q", "k"])
def test_nonfinite_scores_stay_in_their_rows(target, value):
    """A NaN/±inf in one query row or key (q, k: the kernel's own policy, values go to NumPy)
    spoils exactly the rows the per-head kernel spoils, not the group's other heads."""
    q, k, v = H.random_qkv(2, batch=(1,), Hq=6, Hkv=2, Lq=37, Lk=37, D=8, dtype=np.float32)
    if target == "q":
        q[0, 1, 9, 3] = value
    else:
        k[0, 0, 20, 2] = value
    call = semantics.normalize(q, k, v, causal=True)
    out, lse = cpu.forward(call, block_size=(8, 8))
    per_head = cpu.forward(call, block_size=(8, 8), grouped=False)
    for ours, theirs in zip((out, lse), per_head):
        np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
        np.testing.assert_array_equal(np.isinf(ours), np.isinf(theirs))
        finite = np.isfinite(theirs)
        np.testing.assert_allclose(ours[finite], theirs[finite], rtol=0, atol=2e-6)


@pytest.mark.parametrize("L, lengths", [(64, None), (50, None), (64, [64, 40])])
def test_strided_views_are_read_in_place_and_written_in_the_callers_layout(L, lengths):
    """SmolLM's case: q, k, v are head slices of one (B, L, heads, D) projection buffer,
    layout "blhd".  Read in place (no copy when the tiles need no padding), the output comes
    back C-contiguous in that layout, and agrees with the reference and the per-head kernel;
    so does a K/V whose rows run backwards (not read in place)."""
    import dotattn

    B, Hq, Hkv, D = 2, 6, 2, 16
    buf = np.random.default_rng(4).standard_normal((B, L, Hq + 2 * Hkv, D)).astype(np.float32)
    q, k, v = buf[:, :, :Hq], buf[:, :, Hq : Hq + Hkv], buf[:, :, Hq + Hkv :]
    opts = {"causal": True, "layout": "blhd"}
    if lengths is not None:
        opts["q_lengths"] = opts["kv_lengths"] = np.array(lengths)
    call = semantics.normalize(q, k, v, **opts)
    p = cpu.prepare(call, (16, 16), forward=True, grouped=True)
    assert p.q is call.q
    assert np.shares_memory(p.kp, buf) == (L % 16 == 0 and lengths is None)  # a view of the buffer, or a copy
    out = dotattn.attention(q, k, v, implementation="cpu", **opts)
    assert out.flags.c_contiguous and out.shape == (B, L, Hq, D)
    ref_out, _ = H.reference(q, k, v, **opts)
    naive_out, _ = H.naive(q, k, v, **opts)
    real = np.ones((B, L), bool) if lengths is None else np.arange(L)[None] < np.array(lengths)[:, None]
    H.assert_close_to_reference(np.where(real[..., None, None], out, 0), np.where(real[..., None, None], ref_out, 0),
                                np.where(real[..., None, None], naive_out, 0), name="out")
    per_head, _ = cpu.forward(call, grouped=False)
    np.testing.assert_allclose(out, per_head.swapaxes(1, 2), rtol=0, atol=2e-6)
    backwards = semantics.normalize(q, k[:, ::-1], v[:, ::-1], **opts)
    assert cpu._grouped_f32(backwards)
    got, _ = cpu.forward(backwards)
    want, _ = cpu.forward(backwards, grouped=False)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
