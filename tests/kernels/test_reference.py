"""The oracle itself, checked against SEMANTICS.md read literally.

Everything else is tested against ``reference``; here the reference (and through it
``AttentionCall.visible``) is tested against a scalar loop written from the spec's words, and
against visibility patterns worked out by hand.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dotattn
from dotattn import semantics
from dotattn.kernels import reference
from dotattn.kernels.dropout import keep_block


def spec_attention(q, k, v, *, mask=None, bias=None, causal=None, window=None, scale=None, softcap=None,
                   alibi=None, q_len=None, kv_len=None, q_seg=None, kv_seg=None, dropout_p=0.0, seed=None):
    """(out, lse) for canonical float64 (B, H, L, D) inputs, one scalar at a time, per SEMANTICS.md."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    scale = 1 / math.sqrt(D) if scale is None else scale
    out = np.zeros((B, Hq, Lq, Dv))
    lse = np.full((B, Hq, Lq), -np.inf)
    for b in range(B):
        nq = Lq if q_len is None else q_len[b]
        nk = Lk if kv_len is None else kv_len[b]
        for h in range(Hq):
            g = h // (Hq // Hkv)
            for i in range(nq):
                pos = i + nk - nq  # bottom-right position of query i
                logits, js = [], []
                for j in range(nk):
                    if causal == "bottom_right" and j > pos:
                        continue
                    if causal == "top_left" and j > i:
                        continue
                    if window is not None:
                        left, right = window
                        if left is not None and j < pos - left:
                            continue
                        if right is not None and j > pos + right:
                            continue
                    if q_seg is not None and q_seg[b, i] != kv_seg[b, j]:
                        continue
                    if mask is not None and not mask[b, h, i, j]:
                        continue
                    s = scale * float(q[b, h, i] @ k[b, g, j])
                    if softcap is not None:
                        s = softcap * math.tanh(s / softcap)
                    if bias is not None:
                        s += bias[b, h, i, j]
                    if alibi is not None:
                        s -= alibi[b, h] * abs(pos - j)
                    logits.append(s)
                    js.append(j)
                if not js:
                    continue
                m = max(logits)
                weights = [math.exp(s - m) for s in logits]
                total = sum(weights)
                lse[b, h, i] = m + math.log(total)
                for w, j in zip(weights, js):
                    p = w / total
                    if dropout_p:
                        kept = keep_block(seed, dropout_p, b, h, np.array([i]), np.array([j]), Hq, Lq, Lk)[0, 0]
                        p = p / (1 - dropout_p) if kept else 0.0
                    out[b, h, i] += p * v[b, g, j]
    return out, lse


@st.composite
def calls(draw):
    B, Hkv, group = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    Hq, Lq, Lk = Hkv * group, draw(st.integers(0, 7)), draw(st.integers(0, 7))
    D, Dv = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    q, k, v = rng.standard_normal((B, Hq, Lq, D)), rng.standard_normal((B, Hkv, Lk, D)), rng.standard_normal((B, Hkv, Lk, Dv))
    api, spec = {}, {}
    if draw(st.booleans()):
        api["causal"] = spec["causal"] = draw(st.sampled_from(["bottom_right", "top_left"]))
    if draw(st.booleans()):
        side = st.one_of(st.none(), st.integers(0, 4))
        api["window"] = spec["window"] = (draw(side), draw(side))
    if draw(st.booleans()):
        api["mask"] = spec["mask"] = rng.random((B, Hq, Lq, Lk)) < 0.7
    if draw(st.booleans()):
        api["bias"] = spec["bias"] = rng.standard_normal((B, Hq, Lq, Lk))
    if draw(st.booleans()):
        api["softcap"] = spec["softcap"] = draw(st.sampled_from([0.7, 3.0]))
    if draw(st.booleans()):
        api["alibi_slopes"] = spec["alibi"] = rng.uniform(0, 1, (B, Hq))
    if draw(st.booleans()):
        api["scale"] = spec["scale"] = draw(st.sampled_from([0.0, 0.5, 2.0]))
    if draw(st.booleans()):
        api["q_lengths"] = spec["q_len"] = rng.integers(0, Lq + 1, B)
    if draw(st.booleans()):
        api["kv_lengths"] = spec["kv_len"] = rng.integers(0, Lk + 1, B)
    if draw(st.booleans()):
        spec["q_seg"], spec["kv_seg"] = rng.integers(0, 2, (B, Lq)), rng.integers(0, 2, (B, Lk))
        api["segment_ids"] = (spec["q_seg"], spec["kv_seg"])
    if draw(st.booleans()):
        api["dropout_p"] = spec["dropout_p"] = 0.3
        api["seed"] = spec["seed"] = draw(st.integers(0, 2**62))
    return q, k, v, api, spec


@settings(max_examples=150)
@given(case=calls())
def test_reference_follows_the_spec(case):
    q, k, v, api, spec = case
    out, lse = reference.forward(semantics.normalize(q, k, v, **api))
    want_out, want_lse = spec_attention(q, k, v, **spec)
    np.testing.assert_allclose(out, want_out, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
    np.testing.assert_allclose(lse[np.isfinite(lse)], want_lse[np.isfinite(want_lse)], rtol=1e-12)


def _visible(Lq, Lk, **options):
    call = semantics.normalize(np.zeros((Lq, 1)), np.zeros((Lk, 1)), np.zeros((Lk, 1)), **options)
    return call.visible(0, 0, np.arange(Lq), np.arange(Lk)).astype(int)


def test_bottom_right_and_top_left_causal_by_hand():
    # Lq = 2, Lk = 4: bottom-right puts the queries at positions 2 and 3.
    np.testing.assert_array_equal(_visible(2, 4, causal=True), [[1, 1, 1, 0], [1, 1, 1, 1]])
    np.testing.assert_array_equal(_visible(2, 4, causal="top_left"), [[1, 0, 0, 0], [1, 1, 0, 0]])
    # Lq > Lk: the first Lq − Lk rows see nothing under bottom-right alignment.
    np.testing.assert_array_equal(_visible(3, 2, causal=True), [[0, 0], [1, 0], [1, 1]])


def test_window_by_hand():
    np.testing.assert_array_equal(
        _visible(4, 4, window=(1, 0)), [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    )
    np.testing.assert_array_equal(_visible(2, 5, window=(None, 0)), [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(_visible(2, 5, window=(0, 1)), [[0, 0, 0, 1, 1], [0, 0, 0, 0, 1]])


def test_lengths_shift_positions_per_sequence():
    # Sequence 1 has 2 real queries and 3 real keys: its queries sit at positions 1 and 2.
    q = np.zeros((2, 1, 3, 1))
    k = np.zeros((2, 1, 4, 1))
    call = semantics.normalize(q, k, k, causal=True, q_lengths=np.array([3, 2]), kv_lengths=np.array([4, 3]))
    got = call.visible(1, 0, np.arange(3), np.arange(4)).astype(int)
    np.testing.assert_array_equal(got, [[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]])


def test_alibi_uses_bottom_right_positions():
    # Lq = 3, Lk = 5: query 0 sits at position Lk − Lq = 2, its logits fall as slope · |2 − j|.
    q, k = np.zeros((1, 3, 1)), np.zeros((1, 5, 1))
    _, w = dotattn.attention(q, k, k, alibi_slopes=np.array([1.0]), return_weights=True)
    expected = np.exp(-np.abs(2 - np.arange(5)))
    np.testing.assert_allclose(w[0, 0], expected / expected.sum(), rtol=1e-12)


def test_segments_with_causal_use_packed_positions():
    ids = np.array([0, 0, 1, 1])
    got = _visible(4, 4, causal=True, segment_ids=ids)
    np.testing.assert_array_equal(got, [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]])


def test_finite_mask_value_is_not_what_we_do():
    # JAX/Keras mask with a large finite negative: a fully-masked row becomes the mean of V.
    q, k, v = np.ones((1, 2)), np.ones((3, 2)), np.arange(6.0).reshape(3, 2)
    out = dotattn.attention(q, k, v, mask=np.zeros((1, 3), bool))
    np.testing.assert_array_equal(out, [[0.0, 0.0]])
    out_bias = dotattn.attention(q, k, v, bias=np.full((1, 3), -1e9))
    np.testing.assert_allclose(out_bias, v.mean(axis=0, keepdims=True))


def test_reference_backward_zero_for_padded_rows_and_keys():
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((1, 1, 4, 2)), rng.standard_normal((1, 1, 5, 2)), rng.standard_normal((1, 1, 5, 2))
    call = semantics.normalize(q, k, v, q_lengths=np.array([2]), kv_lengths=np.array([3]))
    out, lse = reference.forward(call)
    dq, dk, dv, _ = reference.backward(call, out, lse, np.ones_like(out))
    assert (dq[0, 0, 2:] == 0).all() and (dk[0, 0, 3:] == 0).all() and (dv[0, 0, 3:] == 0).all()
    assert (np.abs(dv[0, 0, :3]).sum(axis=-1) > 0).all()


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keep_share(p):
    keep = keep_block(7, p, 1, 0, np.arange(200), np.arange(200), 1, 200, 200)
    assert abs(keep.mean() - (1 - p)) < 0.01
