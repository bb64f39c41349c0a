"""Plans for repeated calls (``dispatch.plan_forward``, ``semantics.plan_key``/``rebind``).

A NumPy ``attention()`` call without array options (mask, bias, ALiBi, segment ids), seed,
extras or weights is keyed by what ``normalize()`` decides from (shapes, dtypes, option
values with their types); a repeated call of that key reuses the normalized call's template,
the backend and its set-up, and checks only the lengths' values again.  Here: a hit gives the
bytes the uncached path gives, for every shape and option the key covers; anything that
changes a decision (an option, its type, a shape, a dtype, a layout, the backend) gets a plan
of its own; a stride change needs none; errors on lengths are raised on cached kinds as on
new ones, and a refused call keeps nothing.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dotattn
from dotattn import dispatch, semantics
from dotattn.errors import AttentionTypeError, AttentionValueError, UnsupportedCallError

import helpers as H


@pytest.fixture(autouse=True)
def _no_plans():
    dispatch.clear_plans()
    yield
    dispatch.clear_plans()


def _uncached(q, k, v, return_lse=False, implementation=None, **options):
    """The path without plans: normalize, run_forward, finalize (what attention() did before)."""
    call = semantics.normalize(q, k, v, **options)
    out, lse, _ = dispatch.run_forward(call, implementation=implementation)
    out = semantics.finalize_output(call, out)
    return (out, semantics.finalize_lse(call, lse)) if return_lse else out


def _key(q, k, v, implementation=None, q_lengths=None, kv_lengths=None, **options):
    defaults = dict(causal=False, window=None, scale=None, softcap=None, dropout_p=0.0, layout="bhld")
    defaults.update(options)
    return semantics.plan_key(
        q, k, v, **defaults, has_q_lengths=q_lengths is not None, has_kv_lengths=kv_lengths is not None,
        implementation=implementation,
    )


@st.composite
def plannable_cases(draw):
    ndim = draw(st.sampled_from([2, 3, 4, 5]))
    batch = {2: (), 3: (), 4: (draw(st.integers(1, 3)),), 5: (2, draw(st.integers(1, 2)))}[ndim]
    Hkv = None if ndim == 2 else draw(st.integers(1, 3))
    Hq = None if ndim == 2 else Hkv * draw(st.sampled_from([1, 3]))
    Lq = draw(st.sampled_from([1, draw(st.integers(1, 24))]))
    Lk = draw(st.sampled_from([Lq, draw(st.integers(1, 40))]))
    D = draw(st.sampled_from([8, 16, 32]))
    dtype = draw(st.sampled_from([np.float32, np.float64, np.float16, H.BFLOAT16]))
    layout = draw(st.sampled_from(["bhld", "blhd"]))
    options = {"layout": layout}
    if draw(st.booleans()):
        options["causal"] = draw(st.sampled_from([True, "top_left", "bottom_right", False]))
    if draw(st.booleans()):
        options["window"] = (draw(st.sampled_from([None, 0, 3])), draw(st.sampled_from([None, 2])))
    if draw(st.booleans()):
        options["scale"] = draw(st.sampled_from([0.5, 1, 0.0]))
    if draw(st.booleans()):
        options["softcap"] = draw(st.sampled_from([0.5, 5.0]))
    if batch and draw(st.booleans()):
        options["q_lengths"] = H.random_lengths(draw(st.integers(0, 99)), batch, Lq)
        options["kv_lengths"] = H.random_lengths(draw(st.integers(0, 99)), batch, Lk)
    q, k, v = H.random_qkv(
        draw(st.integers(0, 2**16)), batch=batch, Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D, dtype=dtype, layout=layout,
        q_lengths=options.get("q_lengths"), kv_lengths=options.get("kv_lengths"),
    )
    return q, k, v, options, draw(st.booleans())


@settings(max_examples=60)
@given(plannable_cases())
def test_a_hit_gives_the_bytes_of_the_uncached_path(case):
    q, k, v, options, return_lse = case
    want = _uncached(q, k, v, return_lse=return_lse, **options)
    first = dotattn.attention(q, k, v, return_lse=return_lse, **options)  # makes the plan
    assert dispatch.find_plan(_key(q, k, v, **options)) is not None
    again = dotattn.attention(q, k, v, return_lse=return_lse, **options)  # uses it
    for got in (first, again):
        for a, b in zip(got if return_lse else (got,), want if return_lse else (want,), strict=True):
            H.assert_bitwise_equal(a, b)
    ref_out, _ = H.reference(q, k, v, **options)
    naive_out, _ = H.naive(q, k, v, **options)
    H.assert_close_to_reference(again[0] if return_lse else again, ref_out, naive_out, name="out")


@settings(max_examples=40)
@given(plannable_cases())
def test_rebind_is_what_normalize_returns(case):
    q, k, v, options, _ = case
    call = semantics.normalize(q, k, v, **options)
    # New arrays of the same kind (fresh values, other lengths): the template fills in the rest.
    q2, k2, v2 = (x.copy() for x in (q, k, v))
    lengths = {n: (x + 0) for n, x in options.items() if n.endswith("lengths")}
    rebound = semantics.rebind(
        semantics.call_template(call), q2, k2, v2, lengths.get("q_lengths"), lengths.get("kv_lengths")
    )
    fresh = semantics.normalize(q2, k2, v2, **dict(options, **lengths))
    assert rebound.__dict__.keys() == fresh.__dict__.keys()
    for name, value in fresh.__dict__.items():
        got = rebound.__dict__[name]
        if isinstance(value, np.ndarray):
            assert got.shape == value.shape and got.dtype == value.dtype and got.strides == value.strides, name
            H.assert_bitwise_equal(got, value, name=name)
            if name in ("q", "k", "v"):
                assert np.shares_memory(got, value), name  # views of the caller's arrays, as normalize gives
        else:
            assert type(got) is type(value) and got == value, name


def test_the_template_keeps_no_caller_array():
    q, k, v = H.random_qkv(0, batch=(2,), Hq=2, Lq=3)
    lengths = np.array([3, 2])
    dotattn.attention(q, k, v, q_lengths=lengths, kv_lengths=lengths)
    plan = dispatch.find_plan(_key(q, k, v, q_lengths=lengths, kv_lengths=lengths))
    fields = plan.template[0]
    assert all(not isinstance(x, np.ndarray) for x in fields.values())


def test_calls_that_get_no_plan():
    q, k, v = H.random_qkv(1, batch=(2,), Hq=2, Lq=4)
    mask = np.ones((4, 4), dtype=bool)
    dotattn.attention(q, k, v, mask=mask)
    dotattn.attention(q, k, v, bias=np.zeros((4, 4), np.float32))
    dotattn.attention(q, k, v, alibi_slopes=np.array([0.1, 0.2]))
    dotattn.attention(q, k, v, segment_ids=np.zeros((2, 4), np.int64))
    dotattn.attention(q, k, v, dropout_p=0.5, seed=3)
    dotattn.attention(q, k, v, dropout_p=0.5)  # a fresh seed every call: never planned
    dotattn.attention(q, k, v, return_weights=True)
    dotattn.attention(q, k, v, causal=np.True_)  # a NumPy scalar option is not keyed
    dotattn.attention(q, k, v, window=[1, 1])  # nor is a list
    dotattn.attention(q[:, :, :0], k, v)  # no query row
    assert dispatch._PLANS == {}


def test_dropout_calls_keep_their_fresh_seeds():
    q, k, v = H.random_qkv(2, batch=(1,), Hq=1, Lq=16, D=8)
    a = dotattn.attention(q, k, v, dropout_p=0.5)
    b = dotattn.attention(q, k, v, dropout_p=0.5)
    assert not np.array_equal(a, b)


# ---- a changed decision never reuses a wrong plan ---------------------------------------


def _variants():
    """Pairs of calls that differ in one thing a plan depends on."""
    q, k, v = H.random_qkv(3, batch=(2,), Hq=4, Hkv=2, Lq=6, Lk=9, D=16)
    base = dict(q=q, k=k, v=v)
    ql, kl = np.array([6, 3]), np.array([9, 4])
    yield "causal", dict(base), dict(base, causal=True)
    yield "causal kind", dict(base, causal=True), dict(base, causal="top_left")
    yield "window", dict(base, window=(1, None)), dict(base, window=(2, None))
    yield "window side", dict(base, window=(1, None)), dict(base, window=(None, 1))
    yield "scale", dict(base, scale=0.5), dict(base, scale=0.25)
    yield "scale sign of zero", dict(base, scale=0.0), dict(base, scale=-0.0)
    yield "softcap", dict(base, softcap=1.0), dict(base, softcap=2.0)
    yield "lengths given", dict(base), dict(base, q_lengths=ql, kv_lengths=kl)
    yield "kv lengths only", dict(base, q_lengths=ql), dict(base, kv_lengths=kl)
    yield "dtype", dict(base), dict(q=q.astype(np.float64), k=k.astype(np.float64), v=v.astype(np.float64))
    yield "Lk", dict(base), dict(base, k=k[:, :, :5], v=v[:, :, :5])
    yield "Lq", dict(base), dict(base, q=q[:, :, :2])
    yield "Dv", dict(base), dict(base, v=np.concatenate([v, v], axis=-1))
    yield "heads", dict(base), dict(base, q=q[:, :2])
    yield "batch dims", dict(base), dict(q=q[None], k=k[None], v=v[None])
    yield "layout", dict(base), dict(
        q=np.ascontiguousarray(q.swapaxes(1, 2)), k=np.ascontiguousarray(k.swapaxes(1, 2)),
        v=np.ascontiguousarray(v.swapaxes(1, 2)), layout="blhd",
    )
    yield "implementation", dict(base), dict(base, implementation="reference")
    yield "strides", dict(base), dict(
        q=np.asfortranarray(q), k=k[..., ::-1].copy()[..., ::-1], v=np.repeat(v, 2, axis=-1)[..., ::2]
    )
    readonly = [x.copy() for x in (q, k, v)]
    for x in readonly:
        x.flags.writeable = False
    yield "read-only", dict(base), dict(q=readonly[0], k=readonly[1], v=readonly[2])


@pytest.mark.parametrize("name, first, second", list(_variants()), ids=[n for n, *_ in _variants()])
def test_a_changed_call_gets_its_own_result(name, first, second):
    dotattn.attention(**first)
    dotattn.attention(**first)
    got = dotattn.attention(**second)
    H.assert_bitwise_equal(got, _uncached(**second), name=name)
    again = dotattn.attention(**second)
    H.assert_bitwise_equal(again, got, name=name)
    opts = {n: x for n, x in second.items() if n not in ("q", "k", "v", "implementation")}
    ref_out, _ = H.reference(second["q"], second["k"], second["v"], **opts)
    naive_out, _ = H.naive(second["q"], second["k"], second["v"], **opts)
    H.assert_close_to_reference(got, ref_out, naive_out, name=name)


@pytest.mark.parametrize(
    "option, planned, other",
    [("causal", True, 1), ("scale", 1.0, 1), ("scale", 0.0, -0.0), ("window", (1, None), (True, None)),
     ("dropout_p", 0.0, 0), ("dropout_p", 0.0, False), ("softcap", 2.0, 2)],
)
def test_option_types_are_keyed(option, planned, other):
    """``True == 1 == 1.0`` in Python; normalize() may treat them differently, so keys do not."""
    q, k, v = H.random_qkv(4, batch=(1,), Hq=1, Lq=3)
    assert _key(q, k, v, **{option: planned}) != _key(q, k, v, **{option: other})


def test_a_refused_option_is_refused_after_its_lookalike_was_planned():
    q, k, v = H.random_qkv(5, batch=(1,), Hq=1, Lq=3)
    dotattn.attention(q, k, v, causal=True)
    dotattn.attention(q, k, v, causal=True)
    with pytest.raises(AttentionValueError, match="causal must be False, True"):
        dotattn.attention(q, k, v, causal=1)
    dotattn.attention(q, k, v, window=(1, None))
    with pytest.raises(AttentionTypeError, match="window left side"):
        dotattn.attention(q, k, v, window=(True, None))
    dotattn.attention(q, k, v, dropout_p=0.0)
    with pytest.raises(AttentionTypeError, match="dropout_p"):
        dotattn.attention(q, k, v, dropout_p=False)


# ---- value checks on cached kinds ------------------------------------------------------------


def test_lengths_are_checked_on_every_call():
    q, k, v = H.random_qkv(6, batch=(2,), Hq=2, Lq=5, Lk=7)
    good_q, good_kv = np.array([5, 2]), np.array([7, 3])
    dotattn.attention(q, k, v, q_lengths=good_q, kv_lengths=good_kv)
    dotattn.attention(q, k, v, q_lengths=good_q, kv_lengths=good_kv)
    plans = dict(dispatch._PLANS)
    assert len(plans) == 1
    cases = [
        (dict(q_lengths=np.array([6, 2]), kv_lengths=good_kv), AttentionValueError, r"q_lengths must lie in \[0, 5\]"),
        (dict(q_lengths=good_q, kv_lengths=np.array([7, -1])), AttentionValueError, r"kv_lengths must lie in \[0, 7\]"),
        (dict(q_lengths=good_q, kv_lengths=np.array([7, 3, 1])), AttentionValueError, "kv_lengths must have shape"),
        (dict(q_lengths=np.array([5.0, 2.0]), kv_lengths=good_kv), AttentionTypeError, "q_lengths must hold integers"),
        (dict(q_lengths=good_q, kv_lengths=np.array([True, True])), AttentionTypeError, "must hold integers"),
    ]
    for options, error, message in cases:
        with pytest.raises(error, match=message):
            dotattn.attention(q, k, v, **options)
        with pytest.raises(error, match=message):  # the same error the uncached path gives
            _uncached(q, k, v, **options)
    assert dispatch._PLANS == plans  # a refused call keeps and changes nothing
    # lengths as a scalar and as a list are the same check's business
    H.assert_bitwise_equal(
        dotattn.attention(q, k, v, q_lengths=[5, 2], kv_lengths=3), _uncached(q, k, v, q_lengths=[5, 2], kv_lengths=3)
    )


def test_a_refused_backend_keeps_no_plan():
    q, k, v = H.random_qkv(7, batch=(1,), Hq=1, Lq=3)
    with pytest.raises(UnsupportedCallError):
        dotattn.attention(q, k, v, implementation="triton")  # tensor backend: NumPy arrays refused
    with pytest.raises(AttentionValueError, match="implementation must be None or one of"):
        dotattn.attention(q, k, v, implementation="no-such-backend")
    assert dispatch._PLANS == {}


def test_shape_errors_are_the_uncached_ones_after_a_plan():
    q, k, v = H.random_qkv(8, batch=(2,), Hq=4, Hkv=2, Lq=3)
    dotattn.attention(q, k, v)
    with pytest.raises(AttentionValueError, match="not a multiple of it"):
        dotattn.attention(q[:, :3], k, v)
    with pytest.raises(AttentionTypeError, match="share one dtype"):
        dotattn.attention(q, k.astype(np.float64), v)


def test_nonfinite_values_on_a_planned_kind_follow_the_nan_policy():
    q, k, v = H.random_qkv(9, batch=(1,), Hq=2, Lq=4, Lk=6, D=8)
    dotattn.attention(q, k, v, causal=True)
    dotattn.attention(q, k, v, causal=True)
    k_bad = k.copy()
    k_bad[0, 0, 5, 0] = np.nan  # key 5: bottom-right causal (Lk − Lq = 2) shows it to row 3 only
    got = dotattn.attention(q, k_bad, v, causal=True)
    H.assert_bitwise_equal(got, _uncached(q, k_bad, v, causal=True))
    assert np.isfinite(got[0, 0, :3]).all() and np.isnan(got[0, 0, 3]).all() and np.isfinite(got[0, 1]).all()


def test_a_full_plan_table_starts_again(monkeypatch):
    monkeypatch.setattr(dispatch, "_MAX_PLANS", 3)
    for L in range(1, 6):
        q, k, v = H.random_qkv(L, batch=(1,), Hq=1, Lq=L)
        dotattn.attention(q, k, v)
        assert 1 <= len(dispatch._PLANS) <= 3
