"""Shared test utilities: the tolerance rule, input makers, a naive same-dtype attention, ids.

The public surface is small on purpose (other test modules import it):

* ``DTYPES``, ``dtype_name(dt)``, ``case_id(...)`` — dtypes under test and readable ids.
* ``backends_under_test()`` — available backends, narrowed by ``DOTATTN_TEST_BACKENDS=cpu,numpy``.
* ``random_qkv(...)``, ``random_lengths(...)``, ``random_mask(...)`` — inputs, NaN past lengths.
* ``reference(...)``, ``reference_weights(...)``, ``reference_grads(...)`` — the float64
  oracle, shaped like the caller's arrays but never rounded to the input dtype.
* ``naive(...)``, ``naive_weights(...)``, ``naive_grads(...)`` — seed-style materialized attention computed in the
  input dtype (rounded after every operation): the baseline of the tolerance rule.
* ``assert_close_to_reference(ours, ref64, naive, ...)`` — the rule itself:
  ``max|ours − ref| ≤ factor · max|naive − ref| + floor(dtype) · max(1, max|ref|)``,
  non-finite reference values (lse = −inf) must be matched exactly.

Options (``mask``, ``causal``, ``dropout_p``, …) are those of :func:`dotattn.attention`.
"""

from __future__ import annotations

import os
import zlib

import numpy as np

from dotattn import registry, semantics
from dotattn.kernels import reference as reference_backend
from dotattn.kernels.dropout import keep_block
from dotattn.semantics import BFLOAT16

DTYPES = (np.dtype(np.float16), BFLOAT16, np.dtype(np.float32), np.dtype(np.float64))

# A test that needs a CPU feature this machine lacks (AMX tiles, AVX-512 BF16, a second core)
# skips with a reason made by lacks(): no install can add the feature, so DOTATTN_NO_SKIPS
# (conftest.py) lets exactly these skips through and still fails the run on any other.
HARDWARE_SKIP = "this CPU lacks "


def lacks(feature: str, what: str) -> str:
    """The skip reason of a test needing ``feature`` (see :data:`HARDWARE_SKIP`)."""
    return f"{HARDWARE_SKIP}{feature}: {what}"


# Absolute floor of the tolerance rule, per input dtype, relative to max(1, max|ref|): about
# one unit of rounding of the output dtype (float64 leaves room for a different summation order).
FLOORS = {
    np.dtype(np.float16): 1e-3,
    BFLOAT16: 8e-3,
    np.dtype(np.float32): 1e-6,
    np.dtype(np.float64): 1e-12,
}


# =================================================================================
# ids
# =================================================================================


def dtype_name(dt) -> str:
    """'float16', 'bfloat16', 'float32', 'float64'."""
    return np.dtype(dt).name


def case_id(*parts, **sizes) -> str:
    """Readable parametrize id: ``case_id('numpy', np.float16, 'causal', Lq=97, Lk=1025)``
    → ``numpy-float16-causal-Lq97-Lk1025``.  Falsy parts are dropped."""
    words = []
    for p in parts:
        if p is None or p is False or p == "":
            continue
        words.append(dtype_name(p) if isinstance(p, (np.dtype, type)) else str(p))
    words += [f"{k}{v}" for k, v in sizes.items()]
    return "-".join(words)


# Backends the shared sweeps run only when DOTATTN_TEST_BACKENDS names them: XLA compiles
# every new shape, so hypothesis sweeps would take minutes; tests/frontends/test_jax_native.py
# covers the native JAX kernel option by option.
OPT_IN_BACKENDS = ("jax",)


def backends_under_test() -> list[str]:
    """Available backend names in dispatch order; ``DOTATTN_TEST_BACKENDS`` (comma-separated)
    narrows them, e.g. to iterate on one kernel.  Naming an unavailable backend is an error,
    so a typo cannot silently test nothing."""
    import dotattn
    from dotattn import registry

    # Tensor backends (triton) take torch tensors, not the NumPy arrays these tests pass;
    # they have their own tests (tests/kernels/test_triton*.py).
    available = [row["name"] for row in dotattn.info() if row["available"] and row["name"] not in registry.TENSOR_BACKENDS]
    wanted = os.environ.get("DOTATTN_TEST_BACKENDS", "").strip()
    if not wanted:
        return [n for n in available if n not in OPT_IN_BACKENDS]
    names = [n.strip() for n in wanted.split(",") if n.strip()]
    missing = [n for n in names if n not in available]
    if missing:
        raise RuntimeError(f"DOTATTN_TEST_BACKENDS names {missing}, but the available backends are {available}")
    return [n for n in available if n in names]


def import_tensorflow():
    """``tensorflow``, loaded after Triton (through ``torch._dynamo``) where torch is installed.

    The other order aborts a process that later uses torch's compiled paths (an upstream LLVM
    conflict; dotattn refuses such torch calls, tests/reliability/test_import_order.py), so a
    test process that mixes front ends must load TensorFlow this way.  Skips where TensorFlow
    is absent (``make test`` installs it, and DOTATTN_NO_SKIPS turns a skip into a failure).
    """
    import importlib.util

    import pytest

    if importlib.util.find_spec("torch") is not None:
        import torch._dynamo  # noqa: F401  (loads Triton before TensorFlow)
    return pytest.importorskip("tensorflow")


TENSOR_BACKENDS = tuple(sorted(registry.TENSOR_BACKENDS))  # take torch tensors, not NumPy arrays


def policy_backends() -> list[str]:
    """The backends the shared policy sweeps (NaN/Inf, docs/semantics.md) must hold on: every
    host backend of :func:`backends_under_test`, the opt-in ``jax`` and the tensor backend
    ``triton`` — on CPU tensors through Triton's interpreter where there is no GPU
    (tests/conftest.py sets ``TRITON_INTERPRET=1``).  ``DOTATTN_TEST_BACKENDS`` narrows them."""
    import importlib.util

    import dotattn

    wanted = {n.strip() for n in os.environ.get("DOTATTN_TEST_BACKENDS", "").split(",") if n.strip()}
    host = [row["name"] for row in dotattn.info() if row["available"] and row["name"] not in TENSOR_BACKENDS]
    names = [n for n in host if not wanted or n in wanted]
    if not wanted or "triton" in wanted:
        if importlib.util.find_spec("triton") is not None and importlib.util.find_spec("torch") is not None:
            names.append("triton")
    unknown = wanted - set(names)
    if unknown:
        raise RuntimeError(f"DOTATTN_TEST_BACKENDS names {sorted(unknown)}, but the policy backends here are {names}")
    return names


# =================================================================================
# inputs
# =================================================================================


def _length_axis(ndim: int, layout: str) -> int:
    if ndim == 2 or layout == "bhld":
        return -2
    return -3


def _nan_pad(x: np.ndarray, lengths, layout: str) -> np.ndarray:
    """NaN in the rows past ``lengths`` (shape = the batch dims, or a scalar)."""
    if lengths is None:
        return x
    axis = _length_axis(x.ndim, layout)
    L = x.shape[axis]
    lengths = np.asarray(lengths)
    pad = np.arange(L) >= lengths[..., None]  # (batch..., L)
    if x.ndim == 2:
        pad = pad[:, None]
    elif axis == -2:
        pad = pad[..., None, :, None]
    else:
        pad = pad[..., :, None, None]
    return np.where(pad, np.array(np.nan, dtype=x.dtype), x)


def random_qkv(
    seed: int,
    *,
    batch: tuple[int, ...] = (2,),
    Hq: int | None = 2,
    Hkv: int | None = None,
    Lq: int = 5,
    Lk: int | None = None,
    D: int = 8,
    Dv: int | None = None,
    dtype=np.float32,
    layout: str = "bhld",
    q_lengths=None,
    kv_lengths=None,
    magnitude: float = 1.0,
):
    """Standard-normal q, k, v (times ``magnitude``) in the caller's layout.

    ``Hq=None`` gives 2-D ``(L, D)`` inputs (``batch`` must be ``()``); ``batch=()`` with
    heads gives 3-D.  Rows past ``q_lengths``/``kv_lengths`` hold NaN, so a backend that
    reads padding turns valid outputs into NaN.
    """
    rng = np.random.default_rng(seed)
    Lk = Lq if Lk is None else Lk
    Dv = D if Dv is None else Dv
    Hkv = Hq if Hkv is None else Hkv

    def make(H, L, d):
        if H is None:
            assert batch == (), "2-D inputs have no batch dims"
            shape = (L, d)
        elif layout == "bhld":
            shape = batch + (H, L, d)
        else:
            shape = batch + (L, H, d)
        return (magnitude * rng.standard_normal(shape)).astype(dtype)

    q, k, v = make(Hq, Lq, D), make(Hkv, Lk, D), make(Hkv, Lk, Dv)
    return _nan_pad(q, q_lengths, layout), _nan_pad(k, kv_lengths, layout), _nan_pad(v, kv_lengths, layout)


def random_lengths(seed: int, batch: tuple[int, ...], L: int, *, allow_zero: bool = True) -> np.ndarray:
    """int64 lengths of shape ``batch`` (``()`` gives a scalar) in ``[0, L]`` (``[1, L]`` without zero)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0 if allow_zero else min(1, L), L + 1, size=batch).astype(np.int64)


def random_mask(seed: int, shape: tuple[int, ...], p_attend: float = 0.7) -> np.ndarray:
    """Random bool mask, True = attend."""
    return np.random.default_rng(seed).random(shape) < p_attend


# =================================================================================
# the float64 oracle, caller-shaped
# =================================================================================


def _caller(call, x, pairwise: bool = False) -> np.ndarray:
    return semantics._from_canonical(call, x, pairwise=pairwise)


def reference(q, k, v, **options):
    """Float64 ``(out, lse)`` of the reference backend, shaped as ``attention()`` returns them."""
    call = semantics.normalize(q, k, v, **options)
    out, lse = reference_backend.forward(call)
    return _caller(call, out), _caller(call, lse[..., None], pairwise=True)[..., 0]


def reference_weights(q, k, v, **options) -> np.ndarray:
    """Float64 pre-dropout probabilities ``(..., Hq, Lq, Lk)``."""
    call = semantics.normalize(q, k, v, **options)
    return _caller(call, reference_backend.probabilities(call), pairwise=True)


def reference_grads(q, k, v, dout, **options):
    """Float64 ``(dq, dk, dv)`` (+ ``dbias`` reduced to the bias's shape when a bias is given)."""
    call = semantics.normalize(q, k, v, **options)
    out, lse = reference_backend.forward(call)
    dout_c = semantics.canonical_like(call, "dout", dout, call.Dv)
    dq, dk, dv, dbias = reference_backend.backward(call, out, lse, dout_c, call.bias is not None)
    grads = (_caller(call, dq), _caller(call, dk), _caller(call, dv))
    if call.bias is not None:
        grads += (semantics.reduce_bias_grad(call, dbias),)
    return grads


# =================================================================================
# the naive baseline: seed-style, materialized, in the input dtype
# =================================================================================


def _naive_heads(call, dout_c=None):
    """Per-head forward (and backward when ``dout_c`` is given) rounded to ``call.dtype`` after
    every operation — what a straightforward NumPy implementation in that dtype computes.

    It keeps the two things without which the comparison is meaningless: the max-subtracted
    softmax (the seeds' un-shifted ``exp`` overflows) and zeroed padding (NaN · 0 = NaN).
    """
    dt = call.dtype

    def rd(x):
        return np.asarray(x).astype(dt)

    one = np.ones((), dtype=dt)
    out = np.zeros((call.B, call.Hq, call.Lq, call.Dv), dtype=dt)
    weights = np.zeros((call.B, call.Hq, call.Lq, call.Lk), dtype=dt)
    lse = np.full((call.B, call.Hq, call.Lq), -np.inf, dtype=dt)
    grads = None
    if dout_c is not None:
        grads = [
            np.zeros((call.B, call.Hq, call.Lq, call.D), dtype=dt),
            np.zeros((call.B, call.Hkv, call.Lk, call.D), dtype=dt),
            np.zeros((call.B, call.Hkv, call.Lk, call.Dv), dtype=dt),
            np.zeros((call.B, call.Hq, call.Lq, call.Lk), dtype=dt),
        ]
    rows, cols = np.arange(call.Lq), np.arange(call.Lk)
    for b in range(call.B):
        nq, nk = call.q_len(b), call.kv_len(b)
        for h in range(call.Hq):
            hk = h // call.group
            q, k, v = (rd(x) for x in (call.q[b, h], call.k[b, hk], call.v[b, hk]))
            q[nq:], k[nk:], v[nk:] = 0, 0, 0
            s = rd(rd(q @ k.T) * rd(call.scale))
            tanh = None
            if call.softcap is not None:
                c = rd(call.softcap)
                tanh = rd(np.tanh(rd(s / c)))
                s = rd(c * tanh)
            if call.bias is not None:
                s = rd(s + rd(call.bias[b, h]))
            if call.alibi_slopes is not None:
                dist = np.abs(rows[:, None] + call.q_offset(b) - cols[None, :])
                s = rd(s - rd(rd(call.alibi_slopes[b, h]) * rd(dist)))
            visible = call.visible(b, h, rows, cols)
            s = np.where(visible, s, rd(-np.inf))
            m = s.max(axis=-1, initial=-np.inf)
            m = np.where(np.isfinite(m), m, 0).astype(dt)
            e = rd(np.exp(rd(s - m[:, None])))
            total = rd(e.sum(axis=-1))
            with np.errstate(divide="ignore", invalid="ignore"):
                p = np.where(total[:, None] > 0, rd(e / total[:, None]), rd(0))
                lse[b, h] = np.where(total > 0, rd(m + rd(np.log(total))), rd(-np.inf))
            weights[b, h] = p
            keep = None
            if call.dropout_p > 0:
                kb = keep_block(call.seed, call.dropout_p, b, h, rows, cols, call.Hq, call.Lq, call.Lk)
                keep = rd(kb * (1.0 / (1.0 - call.dropout_p)))
            pd = p if keep is None else rd(p * keep)
            o = rd(pd @ v)
            out[b, h] = o
            if grads is None:
                continue
            dq, dk, dv, dbias = grads
            do = rd(dout_c[b, h])
            do[nq:] = 0
            dv[b, hk] = rd(dv[b, hk] + rd(pd.T @ do))
            dp = rd(do @ v.T)
            if keep is not None:
                dp = rd(dp * keep)
            delta = rd((rd(do * o)).sum(axis=-1))
            ds = rd(p * rd(dp - delta[:, None]))
            dbias[b, h] = ds
            if tanh is not None:
                ds = rd(ds * rd(one - rd(tanh * tanh)))
            dq[b, h] = rd(rd(ds @ k) * rd(call.scale))
            dk[b, hk] = rd(dk[b, hk] + rd(rd(ds.T @ q) * rd(call.scale)))
    return out, lse, weights, grads


def naive(q, k, v, **options):
    """``(out, lse)`` of the naive same-dtype implementation, caller-shaped, in the input dtype."""
    call = semantics.normalize(q, k, v, **options)
    with np.errstate(over="ignore", under="ignore"):
        out, lse, _, _ = _naive_heads(call)
    return _caller(call, out), _caller(call, lse[..., None], pairwise=True)[..., 0]


def naive_weights(q, k, v, **options) -> np.ndarray:
    """Pre-dropout probabilities ``(..., Hq, Lq, Lk)`` of the naive implementation, input dtype."""
    call = semantics.normalize(q, k, v, **options)
    with np.errstate(over="ignore", under="ignore"):
        _, _, weights, _ = _naive_heads(call)
    return _caller(call, weights, pairwise=True)


def naive_grads(q, k, v, dout, **options):
    """``(dq, dk, dv[, dbias])`` of the naive same-dtype implementation, caller-shaped."""
    call = semantics.normalize(q, k, v, **options)
    dout_c = semantics.canonical_like(call, "dout", dout, call.Dv)
    with np.errstate(over="ignore", under="ignore"):
        _, _, _, (dq, dk, dv, dbias) = _naive_heads(call, dout_c)
    grads = (_caller(call, dq), _caller(call, dk), _caller(call, dv))
    if call.bias is not None:
        grads += (semantics.reduce_bias_grad(call, dbias.astype(np.float64)).astype(call.dtype),)
    return grads


# =================================================================================
# the tolerance rule
# =================================================================================


def assert_close_to_reference(
    ours,
    ref64,
    naive=None,
    *,
    name: str = "output",
    factor: float = 2.0,
    dtype=None,
    floor: float | None = None,
    magnitude: float = 1.0,
) -> None:
    """Assert ``ours`` is as close to the float64 ``ref64`` as the tolerance rule asks.

    ``max|ours − ref| ≤ factor · max|naive − ref| + floor``, with ``floor`` defaulting to
    ``FLOORS[dtype] · max(1, max|ref|, magnitude)`` and ``dtype`` to ``naive.dtype`` (the input
    dtype).  ``magnitude`` is for results that are small differences of large terms
    (gradients: ``dS = P ∘ (dP − δ)``), whose rounding scales with the terms, not the result.
    Where ``ref64`` is ±inf (lse of a fully-masked row) ``ours`` must be the same infinity;
    NaN in ``ours`` is always an error.  A failure names the worst element's index, the
    three values, the tolerance and the share of elements out of it.
    """
    ours = np.asarray(ours)
    ref = np.asarray(ref64, dtype=np.float64)
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape}, reference has {ref.shape}"
    ours64 = ours.astype(np.float64)
    assert not np.isnan(ref).any(), f"{name}: the reference itself holds NaN"
    nan = np.isnan(ours64)
    if nan.any():
        idx = tuple(int(i) for i in np.argwhere(nan)[0])
        raise AssertionError(
            f"{name}: {int(nan.sum())} of {nan.size} elements are NaN (first at {idx}, reference {ref[idx]!r})"
        )
    infinite = ~np.isfinite(ref)
    if infinite.any():
        bad = infinite & (ours64 != ref)
        if bad.any():
            idx = tuple(int(i) for i in np.argwhere(bad)[0])
            raise AssertionError(f"{name}: at {idx} the reference is {ref[idx]} but ours is {ours64[idx]}")
    finite = ~infinite
    err = np.where(finite, np.abs(ours64 - np.where(finite, ref, 0)), 0.0)
    naive_err = 0.0
    if naive is not None:
        naive64 = np.asarray(naive).astype(np.float64)
        assert naive64.shape == ref.shape, f"{name}: naive shape {naive64.shape}, reference has {ref.shape}"
        diff = np.abs(naive64[finite] - ref[finite])
        assert not np.isnan(diff).any(), f"{name}: the naive baseline holds NaN where the reference is finite"
        naive_err = float(diff.max(initial=0.0))
    if floor is None:
        dt = np.dtype(dtype if dtype is not None else (naive.dtype if naive is not None else ours.dtype))
        biggest = float(np.abs(ref[finite]).max(initial=0.0))
        floor = FLOORS.get(dt, FLOORS[np.dtype(np.float32)]) * max(1.0, biggest, magnitude)
    tol = factor * naive_err + floor
    worst = float(err.max(initial=0.0))
    if worst > tol:
        idx = tuple(int(i) for i in np.unravel_index(int(np.argmax(err)), err.shape))
        share = float((err > tol).mean())
        naive_here = "" if naive is None else f", naive {float(np.asarray(naive)[idx])!r}"
        raise AssertionError(
            f"{name}: max error {worst:.3g} > tolerance {tol:.3g} "
            f"(= {factor} × naive error {naive_err:.3g} + floor {floor:.3g}); "
            f"worst at index {idx}: ours {ours64[idx]!r}, reference {ref[idx]!r}{naive_here}; "
            f"{share:.2%} of {err.size} elements out of tolerance"
        )


def assert_forward_backward_close_to_reference(q, k, v, dout, out, lse, grads, **options) -> None:
    """A backend's ``out``, ``lse`` and ``grads`` (``(dq, dk, dv)``, plus a ``dbias`` already
    reduced to the bias's shape when ``options`` carry a bias) against the float64 reference:
    the tolerance rule at 2× naive for the output and LSE, 3× for the gradients."""
    ref_out, ref_lse = reference(q, k, v, **options)
    naive_out, naive_lse = naive(q, k, v, **options)
    assert_close_to_reference(out.astype(q.dtype), ref_out, naive_out, name="out")
    assert_close_to_reference(lse, ref_lse, naive_lse, name="lse", dtype=q.dtype)
    refs, naives = reference_grads(q, k, v, dout, **options), naive_grads(q, k, v, dout, **options)
    for name, g, r, n in zip(("dq", "dk", "dv", "dbias"), grads, refs, naives):
        assert_close_to_reference(g.astype(q.dtype), r, n, name=name, factor=3.0, magnitude=4.0)


def assert_bitwise_equal(a, b, name: str = "output") -> None:
    """Same shape, dtype and bytes (NaN patterns included)."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype, f"{name}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
    if a.tobytes() != b.tobytes():
        diff = a.astype(np.float64) != b.astype(np.float64)
        idx = tuple(int(i) for i in np.argwhere(diff)[0]) if diff.any() else "?"
        raise AssertionError(f"{name}: repeated calls differ ({int(diff.sum())} elements, first at {idx})")


# =================================================================================
# non-finite inputs (docs/semantics.md, "Non-finite inputs"): one rule for every backend
# =================================================================================

NONFINITE_VALUES = (np.nan, np.inf, -np.inf)
# The ways a row can be kept from seeing a key; each case hides the bad value from some rows.
HIDING_RULES = ("causal", "mask", "window", "segment", "bias_neginf", "kv_lengths")
NONFINITE_TARGETS = ("q", "k", "v", "bias", "alibi_slopes")
_BAD_KEY = {"kv_lengths": 4}  # the key that holds the bad value (3 unless the rule needs another)


def nonfinite_case(target: str, value: float, rule: str, dtype=np.float32):
    """``(q, k, v, options)`` with one NaN/±inf ``value`` in ``target`` that ``rule`` hides from some rows.

    Sizes: batch 2, Hq 2 reading one K/V head, Lq 5, Lk 6, D 4, Dv 3.  The bad value sits in
    key 3 (key 4 for ``kv_lengths``, which makes it padding in sequence 0 only) for ``k``/``v``,
    in query rows 0 and 3 for ``q`` (row 0 sees no key under ``mask``), at (row 1, key 3) and
    (row 3, key 3) for ``bias`` and in head 1's slope for ``alibi_slopes``.
    """
    rng = np.random.default_rng(zlib.crc32(f"{target}-{rule}".encode()))  # the same data for every value
    B, Hq, Hkv, Lq, Lk, D, Dv = 2, 2, 1, 5, 6, 4, 3
    q = rng.standard_normal((B, Hq, Lq, D)).astype(dtype)
    k = rng.standard_normal((B, Hkv, Lk, D)).astype(dtype)
    v = rng.standard_normal((B, Hkv, Lk, Dv)).astype(dtype)
    opts: dict = {}
    j = _BAD_KEY.get(rule, 3)
    if rule == "causal":
        opts["causal"] = "bottom_right"  # row i sees keys ≤ i + 1
    elif rule == "mask":
        mask = rng.random((B, Hq, Lq, Lk)) < 0.8
        mask[:, :, 0] = False  # a row with no visible key
        mask[:, :, 1, j] = False
        mask[:, :, 3, j] = True
        opts["mask"] = mask
    elif rule == "window":
        opts["window"] = (1, 0)  # row i (position i + 1) sees keys i and i + 1
    elif rule == "segment":
        opts["segment_ids"] = (np.array([[0, 0, 1, 1, 1]] * B), np.array([[0, 0, 0, 1, 1, 1]] * B))
    elif rule == "kv_lengths":
        opts["kv_lengths"] = np.array([4, 6])
    if rule == "bias_neginf" or target == "bias":
        bias = rng.standard_normal((B, Hq, Lq, Lk)).astype(np.float32)
        if rule == "bias_neginf":
            bias[:, :, :2, j] = -np.inf
        opts["bias"] = bias
    if target == "alibi_slopes" or rng.random() < 0.3:
        opts["alibi_slopes"] = rng.uniform(0.1, 0.5, Hq)
    bad = np.array(value, dtype=dtype)
    if target == "q":
        q[:, :, [0, 3], 1] = bad
    elif target == "k":
        k[:, :, j, 1] = bad
    elif target == "v":
        v[:, :, j, 1] = bad
    elif target == "bias":
        opts["bias"][:, :, [1, 3], j] = value
    elif target == "alibi_slopes":
        opts["alibi_slopes"][1] = value
    return q, k, v, opts


def nonfinite_cases():
    """``(target, value, rule)`` triples of :func:`nonfinite_case` (a −inf bias cannot also hold the bad bias)."""
    return [
        (t, val, r)
        for t in NONFINITE_TARGETS
        for val in NONFINITE_VALUES
        for r in HIDING_RULES
        if not (t == "bias" and r == "bias_neginf")
    ]


def assert_nonfinite_match(ours, ref64, naive=None, *, name: str, dtype=np.float32, factor: float = 2.0, magnitude=1.0):
    """NaN, +inf and −inf exactly where the float64 reference has them; the finite rest within
    the tolerance rule (``naive`` values that leaked where the reference is finite are ignored)."""
    ours64 = np.asarray(ours).astype(np.float64)
    ref = np.asarray(ref64, dtype=np.float64)
    assert ours64.shape == ref.shape, f"{name}: shape {ours64.shape}, reference has {ref.shape}"
    for kind, test in (("NaN", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf)):
        differ = test(ours64) != test(ref)
        if differ.any():
            idx = tuple(int(i) for i in np.argwhere(differ)[0])
            raise AssertionError(
                f"{name}: {int(differ.sum())} elements differ in being {kind}; first at {idx}: "
                f"ours {ours64[idx]!r}, reference {ref[idx]!r}"
            )
    finite = np.isfinite(ref)
    nv = None
    if naive is not None:
        nv = np.asarray(naive).astype(np.float64)
        nv = np.where(finite & np.isfinite(nv), nv, np.where(finite, ref, 0.0))
    assert_close_to_reference(
        np.where(finite, ours64, 0.0), np.where(finite, ref, 0.0), nv, name=name, dtype=dtype,
        factor=factor, magnitude=magnitude,
    )


def assert_backward_checks_find_nonfinite(q, k, v, out, do, lse, *, causal: bool, block_size) -> None:
    """``cpu._backward_checks_and_delta`` says "not finite" for a NaN or ±inf in dO, in O and
    in q (the checks' two halves: dO and O on one thread, q, K and V on the other)."""
    from dotattn.kernels import cpu

    call = semantics.normalize(q, k, v, causal=causal)
    p = cpu.prepare(call, block_size)
    L = q.shape[2]
    for bad_value in (np.nan, np.inf):
        bad_do, bad_out = do.copy(), out.copy()
        bad_do[-1, -1, -1, -1] = bad_value
        bad_out[0, 0, 0, 0] = bad_value
        assert cpu._backward_checks_and_delta(call, p, out, bad_do, lse)[0] is False
        assert cpu._backward_checks_and_delta(call, p, bad_out, do, lse)[0] is False
        bad_q = q.copy()
        bad_q[0, -1, L // 2, 0] = bad_value
        p_bad = cpu.prepare(semantics.normalize(bad_q, k, v, causal=causal), block_size)
        assert cpu._backward_checks_and_delta(call, p_bad, out, do, lse)[0] is False


def split_product_operands(seed: int, M: int, N: int, D: int, a_rows: int | None = None):
    """``(a, b, ap, bp)`` for the float32 split product ``A·Bᵀ`` (``_cpu_amx_f32``; AMX hosts
    only): ``a (M, D)`` and ``b (N, D)`` random float32, ``ap (3, a_rows, 64)`` A's pieces in rows
    (``a_rows`` ≥ M, default M) and ``bp (1, 1, 3, 32, N)`` B's in depth pairs (D ≤ 64)."""
    from dotattn.kernels import _cpu_amx_f32

    rng = np.random.default_rng(seed)
    a = rng.standard_normal((M, D)).astype(np.float32)
    b = rng.standard_normal((N, D)).astype(np.float32)
    ap = np.zeros((3, M if a_rows is None else a_rows, 64), np.uint16)
    _cpu_amx_f32.split_rows(a, ap, M, D)
    bp = np.zeros((1, 1, 3, 32, N), np.uint32)
    _cpu_amx_f32.split_columns(b[None, None], np.array([N]), bp, 2)
    return a, b, ap, bp


class FailingPartnerKernels:
    """A kernels module (``K``) whose partner entry ``partner`` raises, and whose caller entry
    ``caller`` first posts the call and waits (GIL released) until partner 0 has claimed it —
    else the caller may finish first and cancel the partner's part (``_launch.Partners``
    tests of the decode and small-call kernels)."""

    def __init__(self, K, caller: str, partner: str):
        self._K, self._caller, self._partner = K, caller, partner

    def __getattr__(self, name):
        if name == self._partner:
            def failing(*args):
                raise RuntimeError("partner failed")
            return failing
        if name == self._caller:
            return self._waiting_caller
        return getattr(self._K, name)

    def _waiting_caller(self, flags, gen, *args):
        import time

        from dotattn.kernels import _cpu_sync as S

        flags[S.ENTERED] = gen
        deadline = time.monotonic() + 10
        while flags[S.FLAG_STRIDE + S.CLAIM] != 2 * gen and time.monotonic() < deadline:
            time.sleep(0.0005)
        return getattr(self._K, self._caller)(flags, gen, *args)


def run_concurrently(calls, repeats: int) -> list[list]:
    """``calls[i]()`` ``repeats`` times on thread i, all threads at once (``Partners`` tests:
    one caller holds the partners, the others take the pool); each thread's results in order.
    Raises the first error a thread met."""
    import threading

    results: list[list] = [[] for _ in calls]
    errors: list[BaseException] = []

    def caller(i):
        try:
            for _ in range(repeats):
                results[i].append(calls[i]())
        except BaseException as exc:  # re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    assert all(len(r) == repeats for r in results), "a caller did not finish"
    return results


def park_partners_for_good(launch, monkeypatch):
    """Wait until every partner of ``launch._partners`` has parked, then keep callers from
    waking them (``Partners.wake`` a no-op): a partner that never wakes.  Returns the set."""
    import time

    p = launch._partners
    deadline = time.monotonic() + 10
    while not all(p.parked) and time.monotonic() < deadline:
        time.sleep(0.001)
    assert all(p.parked)
    monkeypatch.setattr(launch.Partners, "wake", lambda self: None)
    return p
