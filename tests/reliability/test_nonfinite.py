"""NaN and ±inf inputs: one answer on every backend (docs/semantics.md, "Non-finite inputs").

A NaN/±inf that takes part in a row's computation follows IEEE arithmetic; positions a row
cannot see never leak into it; rows with no visible key stay 0 with LSE −inf.  Every backend
is compared with the float64 reference (NaN, +inf and −inf in the same places, the finite rest
within the tolerance rule), and the reference itself with an oracle built from visibility
alone: a NaN reaches exactly the rows that see it.

The sweep runs on every backend, the opt-in and tensor ones included: ``jax`` (native JAX on
NumPy calls, with blocks shrunk so that a 6-key row spans several blocks and a shifted last
block) and ``triton`` (torch tensors; Triton's interpreter on CPU tensors where there is no
GPU).  Both are slow to start a new configuration (XLA compiles each one; the interpreter runs
Python per tile operation), so their backward runs a representative subset here (two hiding
rules, every target and value) and the whole sweep under ``-m slow``.
"""

from __future__ import annotations

import helpers as H
import numpy as np
import pytest

import dotattn

BACKENDS = H.policy_backends()
CASES = H.nonfinite_cases()
# jax's and triton's backward in the default run: one rule that hides keys by position and one
# by a −inf bias (the other rules reach the same kernel code through the same visibility tile)
SUBSET_BACKENDS = ("jax", "triton")
SUBSET_BACKWARD_RULES = ("causal", "bias_neginf")


@pytest.fixture(autouse=True)
def small_jax_blocks(monkeypatch):
    """Several query and key blocks (and shifted last blocks) even on these 5×6 problems."""
    from dotattn.kernels import jax_native

    monkeypatch.setattr(jax_native, "BLOCK_Q", 4)
    monkeypatch.setattr(jax_native, "BLOCK_K", 4)


def _device():
    """CUDA where there is one (the compiled kernels), else CPU tensors for Triton's interpreter."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _torch_opts(opts):
    import torch

    def t(x):
        return torch.from_numpy(np.ascontiguousarray(x)).to(_device()) if isinstance(x, np.ndarray) else x

    return {n: (tuple(t(e) for e in x) if isinstance(x, tuple) else t(x)) for n, x in opts.items()}


def _forward(backend, q, k, v, opts):
    """(out, lse, weights) as NumPy arrays; triton takes torch tensors."""
    if backend not in H.TENSOR_BACKENDS:
        return dotattn.attention(q, k, v, return_lse=True, return_weights=True, implementation=backend, **opts)
    t = _torch_opts(dict(opts, q=q, k=k, v=v))
    res = dotattn.attention(t.pop("q"), t.pop("k"), t.pop("v"), return_lse=True, return_weights=True,
                            implementation=backend, **t)
    return [x.cpu().numpy() for x in res]


def _backward(backend, q, k, v, out, lse, dout, opts):
    """(dq, dk, dv) from a given out/lse/dout; triton's through the torch operator's backward body."""
    if backend not in H.TENSOR_BACKENDS:
        return dotattn.attention_backward(q, k, v, out, lse, dout, implementation=backend, **opts)[:3]
    import torch

    from dotattn import semantics
    from dotattn.torch import functional as F

    t = _torch_opts(dict(opts, q=q, k=k, v=v, out=out, lse=lse, dout=dout))
    q_seg, kv_seg = F._split_segment_ids(t.get("segment_ids"), t["q"], "bhld")
    arrays = dict(mask=t.get("mask"), bias=t.get("bias"), alibi_slopes=t.get("alibi_slopes"),
                  q_lengths=t.get("q_lengths"), kv_lengths=t.get("kv_lengths"), q_segment_ids=q_seg,
                  kv_segment_ids=kv_seg, seed=None)
    assert tuple(arrays) == F._ARRAY_OPTIONS
    window = semantics.check_window(opts.get("window")) or (None, None)
    sc = F._Scalars(semantics.check_causal(opts.get("causal", False)), *window, None, None, 0.0, "bhld", backend)
    with torch.no_grad():
        grads = F._backward_body(t["dout"], None, t["q"], t["k"], t["v"], t["out"], t["lse"], arrays, sc, False, {})
    return [g.cpu().numpy() for g in grads[:3]]


def _backward_params():
    """(backend, case) pairs of the backward sweep: jax's and triton's subset unless ``-m slow``."""
    params = []
    for backend in BACKENDS:
        for case in CASES:
            if case[1] == -np.inf and case[0] not in ("v", "bias"):
                continue  # a −inf q/k/slope gives −inf/NaN scores: the forward sweep covers them
            slow = backend in SUBSET_BACKENDS and case[2] not in SUBSET_BACKWARD_RULES
            marks = [pytest.mark.slow] if slow else []
            params.append(pytest.param(backend, case, marks=marks, id=f"{backend}-{_ids(case)}"))
    return params


def _ids(case):
    target, value, rule = case
    return f"{target}-{value}-{rule}"


# =================================================================================
# the reference against visibility alone (NaN values)
# =================================================================================


@pytest.mark.parametrize("case", [c for c in CASES if np.isnan(c[1])], ids=_ids)
def test_reference_nan_reaches_exactly_the_rows_that_see_it(case):
    target, value, rule = case
    q, k, v, opts = H.nonfinite_case(*case)
    out, lse = H.reference(q, k, v, **opts)
    clean = H.nonfinite_case(target, 0.0, rule)
    clean_out, clean_lse = H.reference(*clean[:3], **clean[3])
    sees = H.reference_weights(*clean[:3], **clean[3]) > 0  # (B, Hq, Lq, Lk): row i sees key j
    j = H._BAD_KEY.get(rule, 3)
    if target in ("k", "v"):
        rows = sees[..., j]
    elif target == "q":
        rows = np.zeros(sees.shape[:3], bool)
        rows[:, :, [0, 3]] = sees[:, :, [0, 3]].any(-1)
    elif target == "bias":
        rows = np.zeros(sees.shape[:3], bool)
        rows[:, :, [1, 3]] = sees[:, :, [1, 3], j]
    else:  # alibi_slopes of head 1
        rows = np.zeros(sees.shape[:3], bool)
        rows[:, 1] = sees[:, 1].any(-1)
    assert rows.any() and not rows.all(), "the case must hide the value from some rows and show it to others"
    nan_cols = np.zeros(out.shape, bool)
    if target == "v":  # only the bad feature's column; the softmax itself is untouched
        nan_cols[..., 1] = rows
        np.testing.assert_array_equal(lse, clean_lse)
    else:
        nan_cols[:] = rows[..., None]
        np.testing.assert_array_equal(np.isnan(lse), rows)
    np.testing.assert_array_equal(np.isnan(out), nan_cols)
    # Everything else is what it is without the value: hidden positions leak nowhere.
    np.testing.assert_allclose(out[~nan_cols], clean_out[~nan_cols], rtol=1e-12, atol=0)


# =================================================================================
# every backend against the reference
# =================================================================================


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_and_weights_follow_the_policy(backend, case):
    q, k, v, opts = H.nonfinite_case(*case)
    with np.errstate(all="ignore"):
        out, lse, w = _forward(backend, q, k, v, opts)
        ref_out, ref_lse = H.reference(q, k, v, **opts)
        ref_w = H.reference_weights(q, k, v, **opts)
        naive_out, naive_lse = H.naive(q, k, v, **opts)
    H.assert_nonfinite_match(out, ref_out, naive_out, name=f"{backend} out")
    H.assert_nonfinite_match(lse, ref_lse, naive_lse, name=f"{backend} lse")
    H.assert_nonfinite_match(w, ref_w, name=f"{backend} weights")


@pytest.mark.parametrize("backend,case", _backward_params())
def test_backward_follows_the_policy(backend, case):
    q, k, v, opts = H.nonfinite_case(*case)
    with np.errstate(all="ignore"):
        out, lse, _ = _forward(backend, q, k, v, opts)
        dout = np.random.default_rng(5).standard_normal(out.shape).astype(q.dtype)
        grads = _backward(backend, q, k, v, out, lse, dout, opts)
        ref = H.reference_grads(q, k, v, dout, **opts)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref):
        H.assert_nonfinite_match(g, r, name=f"{backend} {name}", factor=3.0, magnitude=10.0)


@pytest.mark.parametrize("value", H.NONFINITE_VALUES, ids=str)
@pytest.mark.parametrize("what", ["lse", "dout"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_with_nonfinite_lse_or_dout(backend, what, value):
    """Row 3 of (sequence 0, head 0) gets the bad lse/dout; under bottom-right causal it sees keys 0-4."""
    q, k, v, opts = H.nonfinite_case("q", 0.0, "causal")  # all finite
    out, lse, _ = _forward(backend, q, k, v, opts)
    dout = np.random.default_rng(3).standard_normal(out.shape).astype(q.dtype)
    silent = dout.copy()
    silent[0, 0, 3] = 0  # row 3 contributing nothing
    expected = [g.copy() for g in H.reference_grads(q, k, v, silent, **opts)]
    if what == "dout":
        dout[0, 0, 3, 1] = value
        expected = H.reference_grads(q, k, v, dout, **opts)
    else:
        lse = lse.copy()
        lse[0, 0, 3] = value
        if np.isnan(value):  # P of row 3 is NaN at the keys it sees: dq of the row, dk/dv of those keys
            expected[0][0, 0, 3] = np.nan
            expected[1][0, 0, :5] = np.nan
            expected[2][0, 0, :5] = np.nan
    with np.errstate(all="ignore"):
        grads = _backward(backend, q, k, v, out, lse, dout, opts)
    for name, g, r in zip(("dq", "dk", "dv"), grads, expected):
        H.assert_nonfinite_match(g, r, name=f"{backend} {name}", factor=3.0, magnitude=10.0)


# =================================================================================
# a visible ±inf value whose weight underflows to 0
# =================================================================================


def _underflow_case():
    """Key 0 holds v = (+inf, −inf, +inf); key 3 holds −inf in feature 2.  Row 0 sees key 0
    with weight exp(−200) (0 in float32), row 1 sees it first as its block's largest weight and
    then a key 200 higher (the running rescale underflows: inf · 0), row 2 hides it (−inf bias),
    row 3 sees it with an ordinary weight."""
    rng = np.random.default_rng(11)
    q = rng.standard_normal((1, 1, 4, 4)).astype(np.float32) * 0.1
    k = rng.standard_normal((1, 1, 10, 4)).astype(np.float32) * 0.1
    v = rng.standard_normal((1, 1, 10, 3)).astype(np.float32)
    v[0, 0, 0] = (np.inf, -np.inf, np.inf)
    v[0, 0, 3, 2] = -np.inf
    bias = np.zeros((1, 1, 4, 10), np.float32)
    bias[0, 0, 0, 0] = -200.0
    bias[0, 0, 1, 9] = 200.0
    bias[0, 0, 2, 0] = -np.inf
    return q, k, v, dict(bias=bias)


@pytest.mark.parametrize("backend", BACKENDS)
def test_visible_infinite_value_with_underflowed_weight(backend):
    """A visible key's weight is positive, however it rounds: ±inf in its value gives ±inf
    (NaN only where +inf and −inf meet), forward and in dV (docs/semantics.md)."""
    q, k, v, opts = _underflow_case()
    with np.errstate(all="ignore"):
        out, lse, w = _forward(backend, q, k, v, opts)
        ref_out, ref_lse = H.reference(q, k, v, **opts)
    H.assert_nonfinite_match(out, ref_out, name=f"{backend} out")
    H.assert_nonfinite_match(lse, ref_lse, name=f"{backend} lse")
    assert np.all(np.isfinite(lse))
    rows = out[0, 0]
    # rows 0, 1, 3 see key 0: +inf, −inf, and NaN where key 3's −inf meets key 0's +inf
    for i in (0, 1, 3):
        assert rows[i, 0] == np.inf and rows[i, 1] == -np.inf and np.isnan(rows[i, 2]), (i, rows[i])
    assert np.isfinite(rows[2, :2]).all() and rows[2, 2] == -np.inf  # key 0 hidden, key 3 seen
    # backward: +inf in dout of row 0 reaches dV of key 0 through its underflowed weight
    dout = np.random.default_rng(2).standard_normal(out.shape).astype(np.float32)
    dout[0, 0, 0, 0] = np.inf
    v_fin = np.where(np.isfinite(v), v, 0).astype(np.float32)  # the value's own infinities aside
    with np.errstate(all="ignore"):
        out_f, lse_f, _ = _forward(backend, q, k, v_fin, opts)
        dq, dk, dv = _backward(backend, q, k, v_fin, out_f, lse_f, dout, opts)
        ref = H.reference_grads(q, k, v_fin, dout, **opts)
    assert dv[0, 0, 0, 0] == np.inf, dv[0, 0, 0]
    for name, g, r in zip(("dq", "dk", "dv"), (dq, dk, dv), ref):
        H.assert_nonfinite_match(g, r, name=f"{backend} {name}", factor=3.0, magnitude=10.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_infinite_value_of_a_dropped_key_gives_nan(backend):
    """Dropout's 0 is exact, not a rounding: 0 · ±inf is NaN in the rows that drop the key,
    ±inf in those that keep it — the same rows on every backend (one dropout mask)."""
    rng = np.random.default_rng(12)
    q, k = (rng.standard_normal((1, 1, L, 4)).astype(np.float32) for L in (16, 6))
    v = rng.standard_normal((1, 1, 6, 2)).astype(np.float32)
    v[0, 0, 2, 0] = np.inf
    opts = dict(dropout_p=0.5, seed=3)
    with np.errstate(all="ignore"):
        out, _, _ = _forward(backend, q, k, v, opts)
        ref_out, _ = H.reference(q, k, v, **opts)
    H.assert_nonfinite_match(out, ref_out, name=f"{backend} out")
    col = out[0, 0, :, 0]
    assert np.isnan(col).any() and (col == np.inf).any(), col


# =================================================================================
# no NumPy warnings on the way
# =================================================================================


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("backend", [b for b in ("cpu", "numpy", "reference") if b in BACKENDS or b == "reference"])
def test_nonfinite_inputs_raise_no_numpy_warnings(backend, case):
    """The rule is IEEE arithmetic: ``inf − inf`` and ``0·inf`` on the way to a NaN are not the
    user's business.  The ``numpy`` backend (which the ``cpu`` one runs such calls on) let
    "invalid value encountered" RuntimeWarnings out of its worker threads, the reference out of
    its score products, until 4 Dec 2026."""
    import warnings

    q, k, v, opts = H.nonfinite_case(*case)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        out, lse, _ = _forward(backend, q, k, v, opts)
        dout = np.random.default_rng(5).standard_normal(out.shape).astype(q.dtype)
        _backward(backend, q, k, v, out, lse, dout, opts)


# =================================================================================
# scores near float32's limit (docs/semantics.md, "Finite inputs whose scores …")
# =================================================================================

# (q's first element, k's first elements, scale): finite scores of ≈ 1e38 reached three ways —
# large q·k, q·k past nothing but a large scale (numpy scales q first), q·k that a small scale
# brings down.  Every backend gives the largest key's value and LSE = its score.
LARGE_SCORES = [(1.0, (1e38, 5e37), 1.0), (1e19, (1e19, -1e19), 1.0), (4.0, (0.25, 0.125), 2e37), (2.0, (1e18, 5e17), 1e-2)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("q0, k0, scale", LARGE_SCORES, ids=["qk", "qk-opposite", "large-scale", "small-scale"])
def test_finite_scores_up_to_1e38_agree_on_every_backend(backend, q0, k0, scale):
    """The backends form the scaled scores at different points (numpy scales q first; cpu and
    triton form q·k; the cpu kernels exponentiate in base 2, so they overflow past ≈ 2.36e38),
    so near float32's limit they part — documented; up to ≈ 1e38 they must agree."""
    q = np.zeros((1, 1, 3, 16), np.float32)
    q[..., 0] = q0
    k = np.zeros((1, 1, 2, 16), np.float32)
    k[0, 0, :, 0] = k0
    v = np.arange(32, dtype=np.float32).reshape(1, 1, 2, 16)
    out, lse, _ = _forward(backend, q, k, v, dict(scale=scale))
    np.testing.assert_array_equal(out, np.broadcast_to(v[:, :, :1], out.shape))
    np.testing.assert_allclose(lse, np.float32(q0 * k0[0] * scale), rtol=1e-6)
