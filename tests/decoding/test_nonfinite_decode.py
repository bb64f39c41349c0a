"""The NaN and ±inf rule of docs/semantics.md on ``attention_with_kvcache``, every decode kernel.

The cases ``attention()`` already meets (tests/reliability/test_nonfinite.py) that the decode
kernels missed until 4 Dec 2026: a −inf score hides its key (the ``cpu`` kernel made the row
NaN), a live key whose weight underflows still brings its ±inf/NaN value — inside a chunk and
across the chunk merge (``cpu`` and ``numpy`` dropped it, as ``merge_attention_states`` did) —
and none of it lets NumPy's RuntimeWarnings out.  Each call is also held to the reference
backend's NaN and ±inf pattern and, elsewhere, its values.
"""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import pytest

import decode_cases as C
import dotattn

# the decode kernels on NumPy arrays, and the Triton kernel on torch tensors (through Triton's
# interpreter on CPU tensors where there is no GPU), which takes no float64 cache
TRITON = all(importlib.util.find_spec(m) is not None for m in ("torch", "triton"))
BACKENDS = C.decode_backends() + (["triton"] if TRITON else [])
DTYPES = [np.dtype(np.float32), np.dtype(np.float16), C.BFLOAT16, np.dtype(np.float64)]
PAIRS = [pytest.param(b, d, id=f"{b}-{d.name}") for b in BACKENDS for d in DTYPES
         if not (b == "triton" and d == np.float64)]
D = 16


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    if TRITON:
        import torch

        if not torch.cuda.is_available():
            monkeypatch.setenv("TRITON_INTERPRET", "1")


def _tensor(x):
    import torch

    x = np.ascontiguousarray(x)
    t = torch.from_numpy(x.view(np.int16)).view(torch.bfloat16) if x.dtype == C.BFLOAT16 else torch.from_numpy(x)
    return t.to("cuda") if torch.cuda.is_available() else t


def _call(backend, q, k, v, lengths, **options):
    args, lengths = (q, k, v), np.asarray(lengths)
    if backend == "triton":
        args, lengths = tuple(_tensor(x) for x in args), _tensor(lengths)
        options = {n: _tensor(x) if isinstance(x, np.ndarray) else x for n, x in options.items()}
    with warnings.catch_warnings():
        # (Triton's interpreter runs a kernel's arithmetic in NumPy, which warns at inf·0; a GPU does not)
        warnings.simplefilter("ignore" if backend == "triton" else "error", RuntimeWarning)
        out, lse = dotattn.attention_with_kvcache(
            *args, cache_lengths=lengths, implementation=backend, return_lse=True, **options
        )
    if backend == "triton":
        out, lse = out.float().cpu().numpy(), lse.float().cpu().numpy()
    return np.asarray(out, np.float64), np.asarray(lse, np.float64)


def _like_reference(backend, q, k, v, lengths, **options):
    out, lse = _call(backend, q, k, v, lengths, **options)
    ref, ref_lse = _call("reference", q, k, v, lengths, **options)
    for got, want, what in ((out, ref, "out"), (lse, ref_lse, "lse")):
        for mark in (np.isnan, np.isposinf, np.isneginf):
            np.testing.assert_array_equal(mark(got), mark(want), err_msg=f"{backend} {what}: {mark.__name__}")
        fin = np.isfinite(want)
        np.testing.assert_allclose(got[fin], want[fin], rtol=2e-2, atol=2e-2, err_msg=f"{backend} {what}")
    return out, lse


def _inputs(dtype, n=300, cap=320, Hq=2, Hkv=1, seed=0):
    """q positive in every dim (so k = −inf in a dim gives a −inf score), unused slots NaN."""
    rng = np.random.default_rng(seed)
    q = np.abs(rng.standard_normal((1, Hq, 1, D))).astype(np.float32).astype(dtype)
    k = rng.standard_normal((1, Hkv, cap, D)).astype(dtype)
    v = rng.standard_normal((1, Hkv, cap, D)).astype(dtype)
    k[:, :, n:] = np.nan
    v[:, :, n:] = np.nan
    return q, k, v, [n]


@pytest.mark.parametrize("options", [{}, {"softcap": 30.0}, {"alibi_slopes": np.array([0.01, 0.02])}],
                         ids=["fused", "softcap", "alibi"])
@pytest.mark.parametrize("backend, dtype", PAIRS)
def test_a_minus_inf_score_hides_its_key(backend, dtype, options):
    q, k, v, lengths = _inputs(dtype)
    k[0, 0, 7, 3] = -np.inf  # q > 0: key 7's score is −inf for both query heads
    v[0, 0, 7] = np.nan  # and what a hidden key holds never reaches a row
    out, lse = _like_reference(backend, q, k, v, lengths, **options)
    if "softcap" in options:  # softcap·tanh(−inf) = −softcap: the key is live again
        assert np.isnan(out).all()
        return
    assert np.isfinite(out).all() and np.isfinite(lse).all()


@pytest.mark.parametrize("backend, dtype", PAIRS)
def test_every_key_hidden_by_minus_inf_scores_is_a_row_that_sees_nothing(backend, dtype):
    q, k, v, lengths = _inputs(dtype)
    k[0, 0, :300, 5] = -np.inf
    out, lse = _like_reference(backend, q, k, v, lengths)
    assert (out == 0).all() and np.isneginf(lse).all()


@pytest.mark.parametrize("backend, dtype", PAIRS)
def test_a_plus_inf_score_makes_its_row_nan(backend, dtype):
    q, k, v, lengths = _inputs(dtype, Hq=2, Hkv=2)
    k[0, 1, 40, 2] = np.inf  # head 1 only
    out, lse = _like_reference(backend, q, k, v, lengths)
    assert np.isnan(out[0, 1]).all() and np.isnan(lse[0, 1]).all()
    assert np.isfinite(out[0, 0]).all() and np.isfinite(lse[0, 0]).all()


def _underflow_inputs(dtype, key, others):
    """Key ``key``'s score −1000 (its weight underflows in every dtype), the keys in ``others``
    score 0, every other key −1000 as well; key ``key``'s value +inf, NaN, −inf in dims 0–2."""
    n = 300
    q = np.zeros((1, 1, 1, D), np.float32)
    q[..., 0] = 80.0
    k = np.zeros((1, 1, n, D), np.float32)
    k[0, 0, :, 0] = -50.0  # score 80·(−50)/4 = −1000
    k[0, 0, others, 0] = 0.0
    v = np.random.default_rng(1).standard_normal((1, 1, n, D)).astype(np.float32)
    v[0, 0, key, :3] = [np.inf, np.nan, -np.inf]
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), [n]


@pytest.mark.parametrize(
    "where, others",
    [("in the chunk of the live keys", [3, 200]), ("alone in its chunk, across the merge", [260, 280])],
)
@pytest.mark.parametrize("backend, dtype", PAIRS)
def test_a_live_key_whose_weight_underflows_still_brings_its_infinite_and_nan_values(backend, dtype, where, others):
    q, k, v, lengths = _underflow_inputs(dtype, 10, others)
    out, lse = _like_reference(backend, q, k, v, lengths)
    assert out[0, 0, 0, 0] == np.inf and np.isnan(out[0, 0, 0, 1]) and out[0, 0, 0, 2] == -np.inf
    assert np.isfinite(out[0, 0, 0, 3:]).all() and np.isfinite(lse).all()
    # hidden by a window, the same key brings nothing
    out, lse = _like_reference(backend, q, k, v, lengths, window=(289 - min(others), None))
    assert np.isfinite(out).all()



@pytest.mark.parametrize("q_value, scale", [(-np.inf, 0.0), (1e30, 1e30)], ids=["inf-times-zero", "overflow"])
@pytest.mark.parametrize("backend", C.decode_backends())
def test_a_strided_q_scaled_to_nan_or_inf_lets_no_warning_out(backend, q_value, scale):
    """A "blhd" q of several rows (a strided view in the kernels' layout) whose scaling gives NaN
    (−inf · 0) or overflows: the ``cpu`` kernel scaled such a q with a bare ``np.multiply`` and
    let NumPy's RuntimeWarning out (an error under ``-W error``) — found by differential fuzzing."""
    q, k, v, lengths = _inputs(np.dtype(np.float32), n=40, cap=48)
    q = np.concatenate([q, q], axis=2)  # Lq = 2 rows
    q[0, 1, 0, 3] = q_value
    blhd = [np.ascontiguousarray(x.swapaxes(1, 2)) for x in (q, k, v)]
    # (an overflow of float32 scores is no NaN of the float64 reference's: no pattern to hold it to)
    check = _like_reference if np.isinf(q_value) else _call
    out, lse = check(backend, *blhd, lengths, scale=scale, layout="blhd")
    # the row with the bad value (row 0, head 1: out[0, 0, 1] in "blhd") is NaN, no other row is
    assert np.isnan(out[0, 0, 1]).all() and np.isnan(lse[0, 1, 0])
    assert np.isfinite(out[0, 1]).all() and np.isfinite(out[0, 0, 0]).all()


@pytest.mark.parametrize("where", ["q", "k_new"])
@pytest.mark.parametrize("backend, dtype", PAIRS)
def test_rotary_over_an_infinite_value_lets_no_warning_out(backend, dtype, where):
    """RoPE at position 0 turns an inf in the second half of a rotated pair into inf · sin 0 =
    NaN: the row is NaN, as the reference says, and no NumPy RuntimeWarning escapes (the ``cpu``
    kernel's rotation of q and of the new keys let it out — found by differential fuzzing)."""
    q, k, v, lengths = _inputs(dtype, n=0, cap=8)
    rng = np.random.default_rng(3)
    k_new = rng.standard_normal((1, 1, 1, D)).astype(np.float32).astype(dtype)
    v_new = rng.standard_normal((1, 1, 1, D)).astype(np.float32).astype(dtype)
    R = 4
    cos, sin = C.rope_tables(8, R)
    if where == "q":
        q[0, 1, 0, R] = np.inf  # head 1 only
    else:
        k_new[0, 0, 0, R] = np.inf  # the one key of both heads
    out, lse = _like_reference(backend, q, k, v, lengths, k_new=k_new, v_new=v_new,
                               rotary=(cos.astype(np.float32), sin.astype(np.float32)))
    assert np.isnan(out[0, 1]).all() and np.isnan(lse[0, 1]).all()
    assert np.isnan(out[0, 0]).all() == (where == "k_new")


@pytest.mark.parametrize("backend, dtype", [p for p in PAIRS if p.values[1].itemsize == 2])
def test_float32_new_tokens_past_a_16_bit_range_are_stored_as_inf_without_a_warning(backend, dtype):
    """float32 new keys/values into a 16-bit cache are stored rounded: 1e30 becomes +inf there
    (3.4e38 in bfloat16), and the value reads as what the cache holds.  The
    ``cpu`` kernel's append let NumPy's "overflow encountered in cast" out (an error under
    ``-W error``) — found by differential fuzzing."""
    q, k, v, lengths = _inputs(dtype, n=20, cap=24)
    q = q.astype(np.float32)
    rng = np.random.default_rng(4)
    k_new = rng.standard_normal((1, 1, 1, D)).astype(np.float32)
    v_new = rng.standard_normal((1, 1, 1, D)).astype(np.float32)
    # past the range (bfloat16's largest is 3.39e38): +inf once stored
    v_new[0, 0, 0, 0] = 1e30 if dtype == np.float16 else 3.4e38
    out, lse = _like_reference(backend, q, k, v, lengths, k_new=k_new, v_new=v_new)
    assert (out[..., 0] == np.inf).all() and np.isfinite(out[..., 1:]).all() and np.isfinite(lse).all()
