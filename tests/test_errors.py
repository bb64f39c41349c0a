"""Every validation rule: the exception type and what its message names.

One case per rule of ``dotattn.semantics`` (plus dispatch, the weights limit and the
backward's own arguments).  Messages must name the argument, the expectation and what came.
"""

from __future__ import annotations

import helpers as H
import numpy as np
import pytest

import dotattn
from dotattn import registry
from dotattn.errors import (
    AttentionTypeError,
    AttentionValueError,
    DotAttnError,
    UnsupportedCallError,
)


def qkv(B=2, Hq=4, Hkv=2, Lq=5, Lk=6, D=8, Dv=8, dtype=np.float32):
    return H.random_qkv(0, batch=(B,), Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D, Dv=Dv, dtype=dtype)


Q, K, V = qkv()
Q3, K3, V3 = (x[0] for x in (Q, K, V))  # (H, L, D), no batch


def with_qkv(q=Q, k=K, v=V, **options):
    return lambda: dotattn.attention(q, k, v, **options)


# (id, thunk, exception type, fragments that must all appear in the message)
CASES = [
    # ---- q, k, v themselves
    ("q-list", with_qkv(q=Q.tolist()), AttentionTypeError, ["q must be an array", "list", "numpy.asarray"]),
    ("k-scalar", with_qkv(k=1.0), AttentionTypeError, ["k must be an array", "float"]),
    ("v-object", with_qkv(v=object()), AttentionTypeError, ["v must be an array", "builtins.object"]),
    # a masked array reached the compiled kernels (Numba's "Unsupported array type"): audit of 6 Dec
    ("q-masked", with_qkv(q=np.ma.masked_array(Q, mask=False)), AttentionTypeError,
     ["q is a numpy.ma.MaskedArray", "mask=", "kv_lengths="]),
    ("mask-masked", with_qkv(mask=np.ma.masked_array(np.ones((5, 6), bool))), AttentionTypeError,
     ["mask is a numpy.ma.MaskedArray"]),
    ("q-int-dtype", with_qkv(q=Q.astype(np.int32), k=K.astype(np.int32), v=V.astype(np.int32)), AttentionTypeError,
     ["q must have a floating dtype", "int32"]),
    ("mixed-dtypes", with_qkv(k=K.astype(np.float64)), AttentionTypeError,
     ["share one dtype", "q.dtype=float32", "k.dtype=float64"]),
    ("ndim-differs", with_qkv(q=Q3), AttentionValueError, ["same number of dims", "q(4, 5, 8)"]),
    ("ndim-1", with_qkv(q=np.ones(3, np.float32), k=np.ones(3, np.float32), v=np.ones(3, np.float32)),
     AttentionValueError, ["at least 2 dims", "(3)"]),
    ("batch-differs", with_qkv(k=np.concatenate([K, K]), v=np.concatenate([V, V])), AttentionValueError,
     ["equal leading (batch) dims", "does not broadcast"]),
    ("head-dim-differs", with_qkv(k=K[..., :7]), AttentionValueError, ["same head dim D", "q D=8", "k D=7"]),
    ("head-dim-zero", with_qkv(q=Q[..., :0], k=K[..., :0]), AttentionValueError, ["D must be ≥ 1"]),
    ("kv-length-differs", with_qkv(v=V[:, :, :5]), AttentionValueError, ["same length Lk", "k(2, 2, 6, 8)", "v(2, 2, 5, 8)"]),
    ("kv-heads-differ", with_qkv(v=V[:, :1]), AttentionValueError, ["same number of heads", "k with 2", "v with 1"]),
    ("gqa-not-multiple", with_qkv(q=np.concatenate([Q, Q[:, :1]], axis=1)), AttentionValueError,
     ["k has 2 heads, but q's 5 heads are not a multiple of it"]),
    ("zero-kv-heads", with_qkv(k=K[:, :0], v=V[:, :0]), AttentionValueError, ["k has 0 heads"]),
    ("layout", with_qkv(layout="bshd"), AttentionValueError, ["layout must be 'bhld' or 'blhd'", "'bshd'"]),
    # ---- scalars
    ("scale-type", with_qkv(scale="0.1"), AttentionTypeError, ["scale must be a real number or None", "str"]),
    ("scale-nonfinite", with_qkv(scale=float("inf")), AttentionValueError, ["scale must be finite", "inf"]),
    ("softcap-type", with_qkv(softcap=True), AttentionTypeError, ["softcap must be a positive number or None", "bool"]),
    ("softcap-zero", with_qkv(softcap=0.0), AttentionValueError, ["softcap must be > 0 or None", "FlashAttention", "softcap=None"]),
    ("softcap-negative", with_qkv(softcap=-2.0), AttentionValueError, ["softcap must be a finite number > 0", "-2.0"]),
    ("causal-value", with_qkv(causal="lower_right"), AttentionValueError,
     ["causal must be False, True, 'bottom_right' or 'top_left'", "'lower_right'"]),
    ("window-not-pair", with_qkv(window=5), AttentionValueError, ["window must be a pair (left, right)", "5"]),
    ("window-side-type", with_qkv(window=(2.5, None)), AttentionTypeError, ["window left side must be an int", "2.5"]),
    ("window-minus-one", with_qkv(window=(-1, 3)), AttentionValueError, ["window left side must be ≥ 0", "-1", "dotattn uses None"]),
    ("window-negative", with_qkv(window=(3, -4)), AttentionValueError, ["window right side must be ≥ 0", "-4"]),
    ("dropout-type", with_qkv(dropout_p="0.1"), AttentionTypeError, ["dropout_p must be a number in [0, 1)", "str"]),
    ("dropout-range", with_qkv(dropout_p=1.0), AttentionValueError, ["dropout_p must be in [0, 1)", "1.0"]),
    ("seed-type", with_qkv(dropout_p=0.1, seed=1.5), AttentionTypeError, ["seed must be an int or None", "float"]),
    ("seed-range", with_qkv(dropout_p=0.1, seed=-1), AttentionValueError, ["seed must be in [0, 2**63)", "-1"]),
    # ---- lengths and segments
    ("lengths-dtype", with_qkv(kv_lengths=np.array([1.0, 2.0])), AttentionTypeError, ["kv_lengths must hold integers", "float64"]),
    ("lengths-shape", with_qkv(q_lengths=np.array([1, 2, 3])), AttentionValueError, ["q_lengths must have shape (2)", "(3)"]),
    ("lengths-shape-no-batch", with_qkv(Q3, K3, V3, q_lengths=np.array([1])), AttentionValueError,
     ["q_lengths must have shape ()", "no batch dims"]),
    ("lengths-range", with_qkv(kv_lengths=np.array([6, 7])), AttentionValueError, ["kv_lengths must lie in [0, 6]", "kv_lengths[1] = 7"]),
    ("lengths-negative", with_qkv(q_lengths=np.array([-1, 2])), AttentionValueError, ["q_lengths must lie in [0, 5]", "= -1"]),
    ("segments-not-pair", with_qkv(segment_ids=(np.zeros((2, 5), int),) * 3), AttentionValueError,
     ["one array (self-attention) or a pair", "sequence of 3"]),
    ("segments-single-cross", with_qkv(segment_ids=np.zeros((2, 5), int)), AttentionValueError,
     ["needs Lq == Lk", "Lq=5, Lk=6", "pair (q_ids, kv_ids)"]),
    ("segments-dtype", with_qkv(segment_ids=(np.zeros((2, 5)), np.zeros((2, 6), int))), AttentionTypeError,
     ["segment_ids[0] (query ids) must hold integers", "float64"]),
    ("segments-shape", with_qkv(segment_ids=(np.zeros((2, 5), int), np.zeros((2, 5), int))), AttentionValueError,
     ["segment_ids[1] (key ids) must have shape (2, 6)", "(2, 5)"]),
    # ---- mask, bias, ALiBi
    ("mask-dtype", with_qkv(mask=np.ones((5, 6), np.float32)), AttentionTypeError,
     ["mask must be a bool array (True = attend)", "float32", "bias="]),
    ("mask-shape", with_qkv(mask=np.ones((5, 5), bool)), AttentionValueError,
     ["mask of shape (5, 5) does not broadcast to (..., Hq, Lq, Lk) = (2, 4, 5, 6)"]),
    ("bias-dtype", with_qkv(bias=np.ones((5, 6), np.int64)), AttentionTypeError, ["bias must be a floating array", "int64"]),
    ("bias-shape", with_qkv(bias=np.ones((3, 4, 5, 6), np.float32)), AttentionValueError,
     ["bias of shape (3, 4, 5, 6) does not broadcast", "(2, 4, 5, 6)"]),
    ("alibi-dtype", with_qkv(alibi_slopes=np.ones(4, bool)), AttentionTypeError, ["alibi_slopes must be a float array", "bool"]),
    ("alibi-shape", with_qkv(alibi_slopes=np.ones(2)), AttentionValueError, ["alibi_slopes must have shape (Hq,)", "Hq=4", "(2)"]),
    # ---- dispatch and limits
    ("implementation-unknown", with_qkv(implementation="flash"), AttentionValueError,
     ["implementation must be None or one of", "'reference'", "'numpy'", "'flash'"]),
    ("implementation-type", with_qkv(implementation=3), AttentionValueError, ["implementation must be None or a backend name", "3"]),
    ("weights-limit", with_qkv(return_weights=True, max_weights_bytes=100), AttentionValueError,
     ["return_weights=True would materialize", "max_weights_bytes=100", "raise max_weights_bytes"]),
    ("weights-limit-type", with_qkv(return_weights=True, max_weights_bytes=None), AttentionTypeError,
     ["max_weights_bytes must be an int", "NoneType"]),
]


def test_numpy_bool_causal_is_a_flag():
    np.testing.assert_array_equal(
        dotattn.attention(Q, K, V, causal=np.bool_(True)), dotattn.attention(Q, K, V, causal=True)
    )


@pytest.mark.parametrize("thunk,exc_type,fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_validation_rule(thunk, exc_type, fragments):
    with pytest.raises(exc_type) as info:
        thunk()
    assert isinstance(info.value, DotAttnError)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_valid_call_passes():
    """The fixtures above are valid apart from the one thing each case breaks."""
    out = dotattn.attention(Q, K, V, causal=True, window=(2, None), softcap=5.0, dropout_p=0.1, seed=1)
    assert out.shape == (2, 4, 5, 8)


def test_errors_subclass_the_builtin_types():
    assert issubclass(AttentionTypeError, TypeError)
    assert issubclass(AttentionValueError, ValueError)
    assert issubclass(UnsupportedCallError, ValueError)


def test_forced_backend_that_cannot_take_the_call_lists_its_reasons():
    with pytest.raises(UnsupportedCallError) as info:
        dotattn.attention(Q, K, V, implementation="reference", score_mod=lambda s: s)
    message = str(info.value)
    assert "implementation='reference' cannot take this call" in message
    assert "reference: does not take score_mod" in message


def test_no_backend_can_take_the_call_lists_every_backend(monkeypatch):
    # Without the cpu backend, nobody compiles a user score_mod: every backend says why.
    # A copy without "cpu" (deleting and restoring the item would move cpu to the end of the
    # dispatch order for every later test of the process).
    monkeypatch.setattr(registry, "_SPECS", {n: spec for n, spec in registry._SPECS.items() if n != "cpu"})
    with pytest.raises(UnsupportedCallError) as info:
        dotattn.attention(Q, K, V, score_mod=lambda score, b, h, q_idx, kv_idx: score)
    message = str(info.value)
    assert "no backend can take this call" in message
    for name in registry.names():
        assert f"  - {name}: " in message and "score_mod" in message, message


def test_unavailable_backend_is_named(monkeypatch):
    monkeypatch.setitem(registry._SPECS, "ghost", ("dotattn.kernels.ghost_module", "Ghost"))
    monkeypatch.delitem(registry._UNAVAILABLE, "ghost", raising=False)
    with pytest.raises(UnsupportedCallError) as info:
        dotattn.attention(Q, K, V, implementation="ghost")
    assert "ghost: cannot import dotattn.kernels.ghost_module" in str(info.value)
    monkeypatch.delitem(registry._UNAVAILABLE, "ghost", raising=False)


def test_mixed_frameworks():
    torch = pytest.importorskip("torch")
    with pytest.raises(AttentionTypeError) as info:
        dotattn.attention(Q, torch.from_numpy(K), V)
    message = str(info.value)
    assert "one library" in message and "q is numpy" in message and "k is torch" in message


def test_mixed_frameworks_in_mask():
    torch = pytest.importorskip("torch")
    with pytest.raises(AttentionTypeError) as info:
        dotattn.attention(Q, K, V, mask=torch.ones(5, 6, dtype=torch.bool))
    assert "mask is torch" in str(info.value)


# ---- attention_backward's own arguments


def _saved(**options):
    out, lse = dotattn.attention(Q, K, V, return_lse=True, **options)
    return out, lse, np.ones_like(out)


def test_backward_needs_the_seed_with_dropout():
    out, lse, dout = _saved(dropout_p=0.2, seed=3)
    with pytest.raises(AttentionValueError, match="seed must be given for a backward pass with dropout_p > 0"):
        dotattn.attention_backward(Q, K, V, out, lse, dout, dropout_p=0.2)


def test_backward_dbias_needs_a_bias():
    out, lse, dout = _saved()
    with pytest.raises(AttentionValueError, match="return_dbias=True needs a bias= argument"):
        dotattn.attention_backward(Q, K, V, out, lse, dout, return_dbias=True)


@pytest.mark.parametrize(
    "which,bad,exc_type,fragment",
    [
        ("out", lambda o: o[:, :, :4], AttentionValueError, "out must have shape (2, 4, 5, 8), got (2, 4, 4, 8)"),
        ("dout", lambda o: o.astype(np.int32), AttentionTypeError, "dout must have a floating dtype, got int32"),
        ("dout", lambda o: o.tolist(), AttentionTypeError, "dout must be an array"),
        ("lse", lambda lse: lse[..., :3], AttentionValueError, "lse must have shape (2, 4, 5), got (2, 4, 3)"),
        ("lse", lambda lse: lse.astype(np.int64), AttentionTypeError, "lse must have a floating dtype, got int64"),
    ],
    ids=["out-shape", "dout-dtype", "dout-list", "lse-shape", "lse-dtype"],
)
def test_backward_saved_tensors(which, bad, exc_type, fragment):
    saved = dict(zip(("out", "lse", "dout"), _saved()))
    saved[which] = bad(saved[which])
    with pytest.raises(exc_type) as info:
        dotattn.attention_backward(Q, K, V, saved["out"], saved["lse"], saved["dout"])
    assert fragment in str(info.value)


def test_misspelled_keyword_is_a_type_error_with_a_suggestion():
    q = np.zeros((3, 4), np.float32)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'casual'; did you mean 'causal'\?"):
        dotattn.attention(q, q, q, casual=True)
    with pytest.raises(TypeError, match="unexpected keyword argument 'zzz'$"):
        dotattn.attention(q, q, q, zzz=1)
