"""Plans for repeated ``dotattn.torch.attention`` calls (plain eager, no grad, CPU tensors).

A call without array options other than CPU-tensor lengths runs its kind's plan
(``dispatch.find_plan``) after the first call: the same bytes as the unplanned path, lengths
checked every call, and no plan where autograd, a dispatch/function mode or a non-tensor
length needs the full path.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch.nn.functional")  # a real PyTorch, not the tests/torch directory

import torch  # noqa: E402

import dotattn  # noqa: E402
import dotattn.torch  # noqa: E402
from dotattn import dispatch, semantics  # noqa: E402
from dotattn.errors import AttentionTypeError, AttentionValueError  # noqa: E402
from dotattn.semantics import BFLOAT16  # noqa: E402

import helpers as H  # noqa: E402


@pytest.fixture(autouse=True)
def _no_plans():
    dispatch.clear_plans()
    yield
    dispatch.clear_plans()


def _t(x):
    if x.dtype == BFLOAT16:
        return torch.from_numpy(x.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(x))


def _np(t):
    return t.view(torch.int16).numpy().view(BFLOAT16) if t.dtype == torch.bfloat16 else t.numpy()


def _unplanned(q, k, v, **options):
    """The NumPy path without plans on the same data."""
    call = semantics.normalize(q, k, v, **options)
    out, lse, _ = dispatch.run_forward(call)
    return semantics.finalize_output(call, out), semantics.finalize_lse(call, lse)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, BFLOAT16])
@pytest.mark.parametrize("layout", ["bhld", "blhd"])
@pytest.mark.parametrize("lengths", [False, True])
def test_a_planned_call_gives_the_unplanned_bytes(dtype, layout, lengths):
    ql = kl = None
    if lengths:
        ql, kl = np.array([5, 2, 0]), np.array([7, 3, 4])
    q, k, v = H.random_qkv(1, batch=(3,), Hq=4, Hkv=2, Lq=5, Lk=7, D=16, dtype=dtype, layout=layout,
                           q_lengths=ql, kv_lengths=kl)
    opts = dict(layout=layout, causal=True)
    topts = dict(opts)
    if lengths:
        opts.update(q_lengths=ql, kv_lengths=kl)
        topts.update(q_lengths=torch.from_numpy(ql), kv_lengths=torch.from_numpy(kl))
    want_out, want_lse = _unplanned(q, k, v, **opts)
    tq, tk, tv = _t(q), _t(k), _t(v)
    with torch.no_grad():
        results = [dotattn.attention(tq, tk, tv, return_lse=True, **topts) for _ in range(3)]
    assert len(dispatch._PLANS) == 1
    for out, lse in results:
        H.assert_bitwise_equal(_np(out), want_out)
        H.assert_bitwise_equal(lse.numpy(), want_lse)
    with torch.no_grad():
        out_only = dotattn.attention(tq, tk, tv, **topts)
    H.assert_bitwise_equal(_np(out_only), want_out)


def test_lengths_are_checked_on_every_planned_call():
    q, k, v = (_t(x) for x in H.random_qkv(2, batch=(2,), Hq=2, Lq=4, Lk=6))
    good = dict(q_lengths=torch.tensor([4, 1]), kv_lengths=torch.tensor([6, 2]))
    with torch.no_grad():
        dotattn.attention(q, k, v, **good)
        dotattn.attention(q, k, v, **good)
        plans = dict(dispatch._PLANS)
        with pytest.raises(AttentionValueError, match=r"kv_lengths must lie in \[0, 6\]"):
            dotattn.attention(q, k, v, q_lengths=good["q_lengths"], kv_lengths=torch.tensor([7, 2]))
        with pytest.raises(AttentionTypeError, match="q_lengths must hold integers"):
            dotattn.attention(q, k, v, q_lengths=torch.tensor([4.0, 1.0]), kv_lengths=good["kv_lengths"])
        with pytest.raises(AttentionValueError, match="q_lengths must have shape"):
            dotattn.attention(q, k, v, q_lengths=torch.tensor([4, 1, 1]), kv_lengths=good["kv_lengths"])
    assert dispatch._PLANS == plans
    # non-tensor lengths are not planned, and give the same result
    with torch.no_grad():
        a = dotattn.attention(q, k, v, q_lengths=[4, 1], kv_lengths=np.array([6, 2]))
        b = dotattn.attention(q, k, v, **good)
    H.assert_bitwise_equal(a.numpy(), b.numpy())


def test_autograd_calls_take_no_plan_and_still_differentiate():
    q, k, v = (_t(x).requires_grad_(True) for x in H.random_qkv(3, batch=(1,), Hq=2, Lq=4, D=8, dtype=np.float64))
    with torch.no_grad():
        dotattn.attention(q, k, v, causal=True)  # planned: no grad wanted
    assert len(dispatch._PLANS) == 1
    out = dotattn.attention(q, k, v, causal=True)
    assert out.requires_grad
    out.sum().backward()
    dq, dk, dv = H.reference_grads(q.detach().numpy(), k.detach().numpy(), v.detach().numpy(),
                                   np.ones(out.shape), causal=True)
    for got, want, name in ((q.grad, dq, "dq"), (k.grad, dk, "dk"), (v.grad, dv, "dv")):
        H.assert_close_to_reference(got.numpy(), want, name=name, dtype=np.float64)


def test_a_function_mode_sees_the_call_after_a_plan_exists():
    q, k, v = (_t(x) for x in H.random_qkv(4, batch=(1,), Hq=2, Lq=3))
    with torch.no_grad():
        dotattn.attention(q, k, v)
        dotattn.attention(q, k, v)
    seen = []

    class Recorder(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Recorder():
        dotattn.attention(q, k, v)
    assert seen, "the call bypassed an active TorchFunctionMode"


def test_changed_dtype_or_option_gets_its_own_plan():
    q, k, v = H.random_qkv(5, batch=(2,), Hq=2, Lq=4, D=8)
    tq, tk, tv = _t(q), _t(k), _t(v)
    with torch.no_grad():
        dotattn.attention(tq, tk, tv)
        a = dotattn.attention(tq, tk, tv, causal="top_left")
        b = dotattn.attention(tq.double(), tk.double(), tv.double())
    H.assert_bitwise_equal(a.numpy(), _unplanned(q, k, v, causal="top_left")[0])
    H.assert_bitwise_equal(b.numpy(), _unplanned(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64))[0])
    assert len(dispatch._PLANS) == 3


def test_planned_views_of_lazy_negations_and_grad_tensors():
    """A planned call reads a tensor that requires grad (under no_grad) and a lazily negated
    view (``torch._neg_view``) as the unplanned path does."""
    q, k, v = H.random_qkv(6, batch=(1,), Hq=2, Lq=4, D=8)
    tq, tk, tv = _t(q), _t(k), _t(v)
    with torch.no_grad():
        dotattn.attention(tq, tk, tv)
        dotattn.attention(tq, tk, tv)  # planned from here on
        neg = torch._neg_view(tk)
        assert neg.is_neg()
        got = dotattn.attention(tq, neg, tv)
        grad_q = tq.clone().requires_grad_(True)
        got_grad = dotattn.attention(grad_q, tk, tv)
    H.assert_bitwise_equal(got.numpy(), _unplanned(q, -k, v)[0])
    H.assert_bitwise_equal(got_grad.numpy(), _unplanned(q, k, v)[0])
    assert not got_grad.requires_grad
